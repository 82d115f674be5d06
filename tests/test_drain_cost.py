"""drain() and run_ready() on a ManualDispatcher step only the workers that may have work.

A worker that took all there was waits for its queue to wake it. These tests check that every
way a push subscription gets work wakes it: a publish, a failed callback, a nack, an ack
timeout, the clock moving, a real-clock timer falling due, a new subscription, a seek, a
callback publishing to another queue. Each would leave the drain returning False (or the
messages undelivered) if its wake-up were missed. Speed is measured in benchmarks/, not here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from helpers import WAIT, fails_first, with_idle_queues

import mqlite

MakeBroker = Callable[..., mqlite.Broker]


def _manual(make_broker: MakeBroker) -> tuple[mqlite.Broker, mqlite.ManualClock]:
    clock = mqlite.ManualClock()
    return make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher()), clock


def test_draining_after_every_publish_delivers_each_message_to_every_subscription(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    seen: list[list[Any]] = [[] for _ in range(12)]
    for i in range(12):
        broker.subscribe("q", callback=seen[i].append)
    for i in range(30):
        broker.publish("q", "e", i)
        assert broker.drain(timeout=0)
        assert [len(s) for s in seen] == [i + 1] * 12
    assert all([m.payload for m in s] == list(range(30)) for s in seen)


def test_an_idle_drain_returns_true_and_runs_no_callback(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    seen: list[Any] = []
    broker.subscribe("q", callback=seen.append)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    for _ in range(5):
        assert broker.drain(timeout=0)
    assert len(seen) == 1


def test_a_filtered_subscription_is_woken_by_its_event_only(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    wanted: list[Any] = []
    everything: list[Any] = []
    broker.subscribe("q", events="wanted", callback=lambda m: wanted.append(m.payload))
    broker.subscribe("q", callback=lambda m: everything.append(m.payload))
    broker.publish("q", "other", 1)
    assert broker.drain(timeout=0)
    broker.publish("q", "wanted", 2)
    assert broker.drain(timeout=0)
    assert wanted == [2]
    assert everything == [1, 2]


def test_a_callback_that_raises_is_retried_when_the_clock_reaches_its_backoff(make_broker: MakeBroker) -> None:
    broker, clock = _manual(make_broker)
    calls: list[int] = []

    broker.subscribe("q", callback=fails_first(calls), backoff=mqlite.Backoff(initial=5.0))
    broker.publish("q", "e", 0)
    assert not broker.drain(timeout=0), "the retry is still waiting: drain must not say done"
    clock.advance(5.0)
    assert broker.drain(timeout=0)
    assert calls == [0, 0]


def test_a_callback_that_raises_with_no_backoff_is_retried_within_one_drain(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    calls: list[int] = []

    def flaky(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) < 3:
            raise RuntimeError("fails twice")

    broker.subscribe("q", callback=flaky, backoff=mqlite.Backoff(initial=0.0))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert calls == [0, 0, 0]


def test_a_nack_with_a_delay_is_redelivered_once_the_manual_clock_moves(make_broker: MakeBroker) -> None:
    broker, clock = _manual(make_broker)
    calls: list[int] = []
    holder: dict[str, mqlite.Subscription] = {}

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 1:
            holder["sub"].nack(message, delay=2.0)
        else:
            holder["sub"].ack(message)

    holder["sub"] = broker.subscribe("q", callback=callback, ack="manual")
    broker.publish("q", "e", 0)
    assert not broker.drain(timeout=0)
    clock.advance(1.0)
    assert not broker.drain(timeout=0)
    clock.advance(1.0)
    assert broker.drain(timeout=0)
    assert calls == [0, 0]


def test_an_ack_timeout_redelivers_once_the_manual_clock_passes_it(make_broker: MakeBroker) -> None:
    broker, clock = _manual(make_broker)
    calls: list[int] = []
    holder: dict[str, mqlite.Subscription] = {}

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) > 1:
            holder["sub"].ack(message)  # the first delivery is never acked

    holder["sub"] = broker.subscribe("q", callback=callback, ack="manual", ack_timeout=3.0)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert calls == [0]
    clock.advance(3.0)
    assert broker.drain(timeout=0)
    assert calls == [0, 0]


def test_a_nack_delay_on_the_real_clock_is_delivered_by_a_drain_that_waits(make_broker: MakeBroker) -> None:
    # No wake-up comes when a real-clock timer falls due: the dispatcher must step the worker
    # once its timer is due, or the drain's last look finds the retry still waiting.
    broker = make_broker(dispatcher=mqlite.ManualDispatcher())
    calls: list[int] = []
    holder: dict[str, mqlite.Subscription] = {}

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 1:
            holder["sub"].nack(message, delay=0.02)
        else:
            holder["sub"].ack(message)

    holder["sub"] = broker.subscribe("q", callback=callback, ack="manual")
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0.3)
    assert calls == [0, 0]


def test_a_subscription_made_inside_a_callback_is_drained_by_the_same_drain(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    broker.subscribe("q", name="keeper", start="earliest")  # a pull cursor that keeps the messages retained
    late: list[Any] = []

    def first(message: mqlite.Message) -> None:
        if message.payload == 0:
            broker.subscribe("q", start="earliest", callback=lambda m: late.append(m.payload))

    broker.subscribe("q", callback=first)
    for i in range(3):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    assert late == [0, 1, 2]


def test_a_callback_that_publishes_to_another_queue_is_followed_within_one_drain(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    ends: list[Any] = []
    broker.subscribe("a", callback=lambda m: broker.publish("b", "e", m.payload + 1))
    broker.subscribe("b", callback=lambda m: broker.publish("c", "e", m.payload + 1))
    broker.subscribe("c", callback=lambda m: ends.append(m.payload))
    broker.publish("a", "e", 0)
    assert broker.drain(timeout=0)
    assert ends == [2]


def test_a_callback_that_publishes_to_its_own_queue_gets_every_message(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    seen: list[int] = []

    def again(message: mqlite.Message) -> None:
        seen.append(message.payload)
        if message.payload < 5:
            broker.publish("q", "e", message.payload + 1)

    broker.subscribe("q", callback=again)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert seen == [0, 1, 2, 3, 4, 5]


def test_a_seek_back_outside_a_callback_is_delivered_again_by_the_next_drain(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    broker.subscribe("q", name="keeper", start="earliest")  # a pull cursor that keeps the messages retained
    seen: list[int] = []
    sub = broker.subscribe("q", name="s", callback=lambda m: seen.append(m.offset))
    for i in range(3):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    sub.seek(1)
    broker.publish("q", "e", 3)  # drain waits for what was published before it: include a new one
    assert broker.drain(timeout=0)
    assert seen == [0, 1, 2, 1, 2, 3]


def test_competing_push_subscriptions_share_every_message_once(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    seen: list[int] = []
    for _ in range(3):
        broker.subscribe("q", name="shared", callback=lambda m: seen.append(m.offset))
    for i in range(10):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    assert sorted(seen) == list(range(10))


def test_a_closed_subscription_gets_no_callback_and_drain_still_finishes(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    closed_seen: list[Any] = []
    open_seen: list[Any] = []
    closing = broker.subscribe("q", callback=closed_seen.append)
    broker.subscribe("q", callback=open_seen.append)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    closing.close()
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=0)
    assert len(closed_seen) == 1
    assert len(open_seen) == 2


def test_run_ready_inside_a_callback_runs_the_other_subscriptions(make_broker: MakeBroker) -> None:
    dispatcher = mqlite.ManualDispatcher()
    broker = make_broker(dispatcher=dispatcher)
    order: list[str] = []

    def outer(message: mqlite.Message) -> None:
        order.append(f"outer {message.payload}")
        assert dispatcher.run_ready()  # the inner subscription has not been stepped yet
        order.append("outer returns")

    broker.subscribe("q", callback=outer)
    broker.subscribe("q", callback=lambda m: order.append(f"inner {m.payload}"))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert order == ["outer 0", "inner 0", "outer returns"]


def test_a_drain_on_another_thread_finishes_while_this_one_runs_a_callback(make_broker: MakeBroker) -> None:
    dispatcher = mqlite.ManualDispatcher()
    broker = make_broker(dispatcher=dispatcher)
    entered = threading.Event()
    release = threading.Event()
    fast: list[Any] = []

    def slow(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)

    broker.subscribe("slow", callback=slow)
    broker.subscribe("fast", callback=fast.append)
    broker.publish("slow", "e", 0)
    runner = threading.Thread(target=dispatcher.run_ready)
    runner.start()
    try:
        assert entered.wait(WAIT)
        broker.publish("fast", "e", 1)
        assert not broker.drain(timeout=0), "the slow callback is still running"
        assert len(fast) == 1, "the fast subscription was delivered by this thread's drain"
        release.set()
        assert broker.drain(timeout=WAIT)
    finally:
        release.set()
        runner.join(WAIT)
    assert not runner.is_alive()


def test_drain_inside_a_callback_of_its_own_broker_still_refuses(make_each_or_batch: MakeBroker) -> None:
    broker, _ = _manual(make_each_or_batch)
    with_idle_queues(broker)  # settled as the drain begins: it still sees the batch out
    assert broker.drain(timeout=0)
    outcome: list[BaseException] = []

    def callback(message: mqlite.Message) -> None:
        try:
            broker.drain(timeout=0)
        except mqlite.WouldDeadlock as error:
            outcome.append(error)

    broker.subscribe("q", callback=callback)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert len(outcome) == 1
