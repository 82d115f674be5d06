"""mqlite.testing.Faults: each fault does what it says, on memory and on a file, within the contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqlite
from mqlite.testing import Faults, InjectedFault, SimulatedCrash, VirtualClock, checkers, record
from mqlite.testing.strategies import fault_plans

Q = "jobs"


def kinds(faults: Faults) -> list[str]:
    return [fault.kind for fault in faults.log]


def drain_pull(make_sub: Callable[[], mqlite.Subscription], *, timeout: float = 60) -> list[mqlite.Message]:
    """Read and ack until nothing comes for ``timeout`` virtual seconds, subscribing again after a crash."""
    got: list[mqlite.Message] = []
    sub = make_sub()
    for _ in range(10_000):
        try:
            message = sub.get(timeout=timeout)
            if message is None:
                sub.close()
                return got
            got.append(message)
            if sub._cursor.manual_ack:
                sub.ack(message)
        except SimulatedCrash:
            sub = make_sub()
        except mqlite.SubscriptionClosed:  # the broker restarted
            sub = make_sub()
    raise AssertionError("never ran dry")


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"duplicate": 1.5}, "duplicate="),
        ({"crash": -0.1}, "crash="),
        ({"delay": "often"}, "delay="),
        ({"drop_ack": True}, "drop_ack="),
        ({"seed": "x"}, "seed="),
        ({"max_delay": 0}, "max_delay="),
        ({"max_delay": float("inf")}, "max_delay="),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(mqlite.InvalidArgument, match=named):
        Faults(**kwargs)


def test_a_broker_refuses_what_is_not_faults(tmp_path: Path) -> None:
    path = tmp_path / "refused.mqlite"
    with pytest.raises(mqlite.InvalidArgument, match=r"faults must be a mqlite\.testing\.Faults"):
        mqlite.Broker(path, faults={"duplicate": 0.1})  # type: ignore[arg-type]
    assert not path.exists()


def test_one_faults_serves_one_broker() -> None:
    faults = Faults(seed=1, duplicate=0.5)
    with mqlite.Broker(faults=faults) as broker:
        with pytest.raises(mqlite.InvalidArgument, match="already serves another broker"):
            mqlite.Broker(faults=faults)
        broker.publish(Q, "job", 1)  # the first broker is untouched by the refusal


def test_restart_needs_a_file() -> None:
    with pytest.raises(mqlite.InvalidArgument, match=r"restart=\) needs a broker on a file"):
        mqlite.Broker(faults=Faults(restart=0.1))


def test_without_rates_nothing_is_injected(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=3)
    broker = make_broker(clock=VirtualClock(autojump=True), faults=faults)
    sub = broker.subscribe(Q, name="w", ack="manual", ack_timeout=5)
    broker.queue(Q).publish_many([("job", i) for i in range(20)])
    assert [m.payload for m in drain_pull(lambda: sub)] == list(range(20))
    assert faults.log == []
    assert repr(faults) == "Faults(seed=3)"


# -- duplicate ------------------------------------------------------------------------------------


def test_duplicate_delivers_each_acked_message_once_more(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=1, duplicate=1.0)
    broker = make_broker(clock=VirtualClock(autojump=True), faults=faults)
    sub = broker.subscribe(Q, name="w", ack="manual")
    broker.queue(Q).publish_many([("job", i) for i in range(5)])
    payloads = [m.payload for m in drain_pull(lambda: sub)]
    assert sorted(payloads) == sorted([*range(5), *range(5)])  # each exactly twice: a replay happens once
    assert kinds(faults) == ["duplicate"] * 5
    assert {fault.offset for fault in faults.log} == set(range(5))
    assert all(f.subscription == "w" and f.queue == Q for f in faults.log)


def test_duplicate_under_auto_ack_pull_returns_each_message_twice(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=1, duplicate=1.0)
    broker = make_broker(faults=faults)
    sub = broker.subscribe(Q)
    broker.queue(Q).publish_many([("job", i) for i in range(3)])
    assert [m.payload for m in sub.poll(10)] == [0, 1, 2]
    assert [m.payload for m in sub.poll(10)] == [0, 1, 2]
    assert sub.poll(10) == []


def test_duplicate_calls_a_push_callback_twice(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=1, duplicate=1.0)
    broker = make_broker(dispatcher=mqlite.ManualDispatcher(), faults=faults)
    calls: list[int] = []
    broker.subscribe(Q, name="w", callback=lambda m: calls.append(m.payload))
    broker.queue(Q).publish_many([("job", i) for i in range(3)])
    assert broker.drain(timeout=5)
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]


# -- delay ----------------------------------------------------------------------------------------


def test_delay_holds_a_first_delivery_back_on_the_broker_clock(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = mqlite.ManualClock()
    faults = Faults(seed=2, delay=1.0, max_delay=10)
    broker = make_broker(clock=clock, faults=faults)
    sub = broker.subscribe(Q, name="w", ack="manual")
    broker.publish(Q, "job", "a")
    assert sub.get(timeout=0) is None  # held back
    [fault] = faults.log
    assert fault.kind == "delay"
    assert fault.offset == 0
    held = float(fault.detail.split()[2])
    assert 0 < held <= 10
    clock.advance(held + 0.001)
    message = sub.get(timeout=0)
    assert message is not None
    assert message.payload == "a"
    sub.ack(message)
    assert sub.pending == 0
    assert len(faults.log) == 1  # a message is delayed at most once


def test_delay_lets_later_messages_overtake(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=5, delay=0.3, max_delay=10)
    broker = make_broker(clock=VirtualClock(autojump=True), faults=faults)
    history = record(broker)
    sub = broker.subscribe(Q, name="w", ack="manual")
    broker.queue(Q).publish_many([("job", i) for i in range(30)])
    payloads = [m.payload for m in drain_pull(lambda: sub)]
    assert sorted(payloads) == list(range(30))  # nothing lost, nothing twice
    assert payloads != list(range(30))  # but not in order
    delayed = {fault.offset for fault in faults.log}
    assert delayed
    assert all(fault.kind == "delay" for fault in faults.log)
    checkers.total_queue(history, subscription="w", exactly_once=True).assert_valid()
    checkers.order(history, subscription="w").assert_valid()  # the delayed messages are excused


def test_delay_of_a_push_batch(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock()
    faults = Faults(seed=4, delay=1.0, max_delay=2)
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher(), faults=faults)
    calls: list[int] = []
    broker.subscribe(Q, name="w", callback=lambda m: calls.append(m.payload))
    broker.queue(Q).publish_many([("job", i) for i in range(3)])
    assert not broker.drain(timeout=0)  # all three held back
    assert calls == []
    clock.advance(2)
    assert broker.drain(timeout=5)
    assert sorted(calls) == [0, 1, 2]


# -- drop_ack -------------------------------------------------------------------------------------


def test_a_dropped_ack_comes_back_after_the_ack_timeout(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    faults = Faults(seed=1, drop_ack=1.0)
    broker = make_broker(clock=clock, faults=faults)
    history = record(broker)
    sub = broker.subscribe(Q, name="w", ack="manual", ack_timeout=3600, max_deliveries=3)
    broker.publish(Q, "job", "a")
    first = sub.get(timeout=0)
    assert first is not None
    start = clock.monotonic()
    sub.ack(first)  # lost
    assert sub.pending == 1
    again = sub.get(timeout=7200)
    assert again is not None
    assert again.offset == first.offset
    assert clock.monotonic() - start == pytest.approx(3600)
    assert [f.kind for f in faults.log] == ["drop_ack"]
    assert "ack" not in [op.type for op in history]  # the broker never took the ack
    checkers.redelivery(history, subscription="w").assert_valid()


def test_a_dropped_ack_without_a_timeout_comes_back_at_once_and_counts(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    faults = Faults(seed=1, drop_ack=1.0)
    broker = make_broker(faults=faults)
    sub = broker.subscribe(Q, name="w", ack="manual", max_deliveries=2)
    dead = broker.subscribe(mqlite.dead_letter_queue_name(Q))
    broker.publish(Q, "job", "a")
    for _ in range(2):
        message = sub.get(timeout=0)
        assert message is not None
        sub.ack(message)
    assert sub.get(timeout=0) is None
    letter = dead.get(timeout=1)
    assert letter is not None
    assert letter.payload == "a"
    assert letter.headers["dead_letter.reason"] == "ack lost"


def test_a_push_callback_whose_ack_is_dropped_runs_again(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=9, drop_ack=0.5)
    broker = make_broker(dispatcher=mqlite.ManualDispatcher(), faults=faults)
    history = record(broker)
    calls: list[int] = []
    broker.subscribe(Q, name="w", callback=lambda m: calls.append(m.payload))
    broker.queue(Q).publish_many([("job", i) for i in range(20)])
    assert broker.drain(timeout=5)
    dropped = [f.offset for f in faults.log]
    assert dropped
    assert all(f.kind == "drop_ack" for f in faults.log)
    assert sorted(calls) == sorted([*range(20), *dropped])
    done = [op.offset for op in history if op.type == "done"]
    assert sorted(done) == list(range(20))  # no "done" recorded for the lost settles
    checkers.total_queue(history, subscription="w").assert_valid()


# -- crash ----------------------------------------------------------------------------------------


def test_a_pull_consumer_that_crashes_raises_and_its_messages_go_to_the_others(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    faults = Faults(seed=1, crash=1.0)
    broker = make_broker(faults=faults)
    history = record(broker)
    doomed = broker.subscribe(Q, name="w", ack="manual")
    broker.queue(Q).publish_many([("job", i) for i in range(3)])
    with pytest.raises(SimulatedCrash, match="crashed") as raised:
        doomed.poll(2)
    assert isinstance(raised.value, mqlite.SubscriptionClosed)
    assert doomed.closed
    with pytest.raises(mqlite.SubscriptionClosed):
        doomed.get(timeout=0)
    [fault] = faults.log
    assert (fault.kind, fault.offset, fault.consumer) == ("crash", 0, f"#{doomed.id}")
    nacks = [op for op in history if op.type == "nack"]
    assert [(op.offset, op.reason) for op in nacks] == [(0, "consumer crashed"), (1, "consumer crashed")]
    broker_info = broker.info().subscription(Q, "w")
    assert broker_info.pending == 2  # waiting for the next consumer of the name


def test_a_crash_before_the_ack_redelivers(make_broker: Callable[..., mqlite.Broker]) -> None:
    """A crash in ``ack``: the work was done, the ack never made: the message comes back."""
    faults = Faults(seed=0, crash=0.5)
    broker = make_broker(faults=faults, clock=VirtualClock(autojump=True))
    history = record(broker)
    broker.subscribe(Q, name="w", ack="manual").close()
    broker.queue(Q).publish_many([("job", i) for i in range(40)])
    got = drain_pull(lambda: broker.subscribe(Q, name="w", ack="manual"))
    sites = [f.detail.split()[2] for f in faults.log]
    assert "ack" in sites
    assert "take" in sites
    assert {m.payload for m in got} == set(range(40))
    checkers.total_queue(history, subscription="w").assert_valid()
    checkers.redelivery(history, subscription="w").assert_valid()


def test_a_push_consumer_that_crashes_after_its_callback_hands_the_batch_over(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    faults = Faults(seed=1, crash=1.0)
    broker = make_broker(dispatcher=mqlite.ManualDispatcher(), faults=faults)
    first: list[int] = []
    doomed = broker.subscribe(Q, name="w", callback=lambda m: first.append(m.payload))
    broker.publish(Q, "job", 7)
    assert broker.drain(timeout=5)
    assert first == [7]  # the side effect happened
    assert doomed.closed
    assert faults.log[0].kind == "crash"
    faults.enabled = False
    survivor = broker.subscribe(Q, name="w", ack="manual")
    message = survivor.get(timeout=0)
    assert message is not None
    assert message.payload == 7


# -- restart --------------------------------------------------------------------------------------


def test_a_restart_closes_every_subscription_and_keeps_what_the_file_holds(tmp_path: Path) -> None:
    faults = Faults(seed=0, restart=0.2)
    with mqlite.Broker(tmp_path / "restart.mqlite", faults=faults) as broker:
        worker = broker.subscribe(Q, name="w", ack="manual")
        watcher = broker.subscribe(Q)
        restarted_at = None
        for i in range(50):
            broker.publish(Q, "job", i)
            if faults.log:
                restarted_at = i
                break
        assert restarted_at is not None, "seed 0 restarts within 50 publishes"
        [fault] = faults.log
        assert (fault.kind, fault.offset) == ("restart", restarted_at)
        assert worker.closed
        assert watcher.closed
        with pytest.raises(mqlite.SubscriptionClosed, match="restarted"):
            worker.get(timeout=0)
        again = broker.subscribe(Q, name="w", ack="manual")
        assert [m.payload for m in again.poll(100)] == list(range(restarted_at + 1))


def test_a_restart_gives_back_what_was_out_with_its_attempts(tmp_path: Path) -> None:
    seed = next(seed for seed in range(100) if Faults(seed=seed, restart=0.2).strikes("restart", Q, 0) is None)
    faults = Faults(seed=seed, restart=0.2)
    with mqlite.Broker(tmp_path / "restart.mqlite", faults=faults) as broker:
        worker = broker.subscribe(Q, name="w", ack="manual", max_deliveries=5)
        broker.publish(Q, "job", "held")
        held = worker.get(timeout=0)
        assert held is not None
        for i in range(100):
            broker.publish(Q, "job", i)
            if faults.log:
                break
        assert worker.closed
        again = broker.subscribe(Q, name="w", ack="manual")
        message = again.get(timeout=0)
        assert message is not None
        assert message.payload == "held"
        assert broker.info().subscription(Q, "w").redelivered == 1


# -- determinism and the log ----------------------------------------------------------------------


def run_workload(seed: int) -> list[InjectedFault]:
    faults = Faults(seed=seed, duplicate=0.2, delay=0.2, drop_ack=0.2, crash=0.1)
    with mqlite.Broker(clock=VirtualClock(autojump=True), faults=faults) as broker:
        broker.subscribe(Q, name="w", ack="manual", ack_timeout=30).close()
        broker.queue(Q).publish_many([("job", i) for i in range(40)])
        drain_pull(lambda: broker.subscribe(Q, name="w", ack="manual", ack_timeout=30))
    return faults.log


def test_the_same_seed_injects_the_same_faults() -> None:
    first, second = run_workload(11), run_workload(11)
    assert first == second
    assert len({f.kind for f in first}) == 4
    assert run_workload(12) != first


def test_faults_appear_in_the_history(make_broker: Callable[..., mqlite.Broker]) -> None:
    faults = Faults(seed=1, duplicate=1.0)
    broker = make_broker(faults=faults)
    history = record(broker)
    sub = broker.subscribe(Q, name="w", ack="manual")
    broker.publish(Q, "job", 1)
    message = sub.get(timeout=0)
    assert message is not None
    sub.ack(message)
    [op] = [op for op in history if op.type == "fault"]
    assert (op.fault, op.offset, op.subscription) == ("duplicate", 0, "w")
    assert "fault='duplicate'" in str(op)
    assert str(faults.log[0]) == f"fault #0 duplicate jobs@0 w/#{sub.id}: delivered once more"


# -- nothing is lost, whatever the plan -----------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(plan=fault_plans(max_rate=0.3, kinds=("duplicate", "delay", "drop_ack", "crash")), count=st.integers(1, 30))
def test_no_plan_loses_a_message(plan: dict[str, Any], count: int) -> None:
    faults = Faults(**plan)
    with mqlite.Broker(clock=VirtualClock(autojump=True), faults=faults) as broker:
        history = record(broker)
        broker.subscribe(Q, name="w", ack="manual", ack_timeout=30).close()
        broker.queue(Q).publish_many([("job", i) for i in range(count)])
        got = drain_pull(lambda: broker.subscribe(Q, name="w", ack="manual", ack_timeout=30))
        assert {m.payload for m in got} == set(range(count))
        checkers.compose(
            checkers.total_queue(history, subscription="w"), checkers.redelivery(history, subscription="w")
        ).assert_valid()


def test_no_plan_loses_a_message_on_a_file_with_restarts(tmp_path: Path) -> None:
    faults = Faults(seed=21, duplicate=0.1, delay=0.1, drop_ack=0.1, crash=0.1, restart=0.05)
    with mqlite.Broker(tmp_path / "plan.mqlite", clock=VirtualClock(autojump=True), faults=faults) as broker:
        broker.subscribe(Q, name="w", ack="manual", ack_timeout=30).close()
        for i in range(60):
            broker.publish(Q, "job", i)
        got = drain_pull(lambda: broker.subscribe(Q, name="w", ack="manual", ack_timeout=30))
        assert {m.payload for m in got} == set(range(60))
        assert {"restart", "crash", "drop_ack"} <= set(kinds(faults))
