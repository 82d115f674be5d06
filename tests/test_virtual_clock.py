"""VirtualClock: manual moves, autojump with threads, asyncio and both, limits; run_until_idle (issue 14).

Every assertion is on virtual time, never on real elapsed time. Each blocking call runs under a
real safety net: in a thread joined with a timeout (``within``), or under ``asyncio.wait_for``
on a loop with real time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

import mqlite
from mqlite.testing import (
    CallbackErrors,
    VirtualClock,
    VirtualTimeExceeded,
    record,
    run_until_idle,
    wait_until_blocked,
)

SAFETY = 10.0  # real seconds any test body may take before it counts as hung
HOUR = 3600.0
DAY = 24 * HOUR


def within(body: Callable[[], Any], seconds: float = SAFETY) -> Any:
    """Run ``body`` in a thread, joined with a real timeout: its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = body()
        except BaseException as error:  # noqa: BLE001  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the body was still blocked after {seconds} real seconds"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def joined(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(SAFETY)
    assert not any(t.is_alive() for t in threads), "a thread was still blocked"


# -- autojump: call timeouts in clock seconds ------------------------------------------------


def test_get_timeout_counts_clock_seconds(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    sub = make_broker(clock=clock).subscribe("jobs", name="w")
    assert within(lambda: sub.get(timeout=30)) is None
    assert clock.elapsed == 30


def test_poll_timeout_counts_clock_seconds(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    sub = make_broker(clock=clock).subscribe("jobs", name="w")
    assert within(lambda: sub.poll(timeout=2.5)) == []
    assert clock.elapsed == 2.5


def test_ack_timeout_of_24_hours_redelivers_at_once(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w", ack="manual", ack_timeout=DAY)
    broker.publish("jobs", "run", "job-1")
    first = sub.get(timeout=0)
    again = within(lambda: sub.get(timeout=2 * DAY))
    assert again is not None
    assert again.offset == first.offset
    assert clock.elapsed == DAY


def test_autojump_stops_where_max_age_drops_a_message(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    broker.queue("q", retention="limits", max_age=10)
    broker.publish("q", "e", "old")
    stops: list[float] = []
    clock.add_listener(lambda: stops.append(clock.elapsed))
    waiting = broker.subscribe("other", name="w")
    assert within(lambda: waiting.get(timeout=60)) is None
    assert stops == [10.0, 60.0]  # the age limit is a deadline of its own, on the way
    assert broker.info().queue("q").retained == 0


def test_a_publish_wakes_a_wait_without_moving_time(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w")
    got: list[mqlite.Message | None] = []
    reader = threading.Thread(target=lambda: got.append(sub.get(timeout=HOUR)))
    reader.start()
    try:
        wait_until_blocked(broker.queue("jobs"))
        broker.publish("jobs", "run", "job-1")
    finally:
        joined(reader)
    assert got[0] is not None
    assert got[0].payload == "job-1"
    assert clock.elapsed < HOUR


# -- autojump with threads ---------------------------------------------------------------------


def test_threads_nack_delay_and_waiting_consumers(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    subs = [broker.subscribe("jobs", name="workers", ack="manual") for _ in range(2)]
    broker.publish("jobs", "run", "job-1")
    first = subs[0].get(timeout=0)
    subs[0].nack(first, delay=HOUR)
    got: list[tuple[int, float]] = []

    def consume(i: int) -> None:
        message = subs[i].get(timeout=2 * HOUR)
        if message is not None:
            got.append((i, clock.elapsed))
            subs[i].ack(message)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    joined(*threads)
    # One of them gets the redelivery at +1 h; the other times out at +2 h.
    assert [when for _, when in got] == [HOUR]
    assert clock.elapsed == 2 * HOUR


def test_threads_push_retries_with_backoff(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    calls: list[float] = []

    def flaky(message: mqlite.Message) -> None:
        calls.append(clock.elapsed)
        if len(calls) < 3:
            raise RuntimeError("try again")

    broker.subscribe("jobs", callback=flaky, backoff=mqlite.Backoff(initial=60, factor=2, maximum=HOUR))
    broker.publish("jobs", "run", "job-1")
    assert within(lambda: broker.drain(timeout=DAY)) is True
    assert calls == [0, 60, 180]


def test_threads_drain_timeout_counts_clock_seconds(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)

    def always_fails(message: mqlite.Message) -> None:
        raise RuntimeError("never")

    broker.subscribe("jobs", callback=always_fails, backoff=mqlite.Backoff(initial=HOUR, maximum=HOUR))
    broker.publish("jobs", "run", "job-1")
    assert within(lambda: broker.drain(timeout=30)) is False
    assert clock.elapsed == 30


# -- autojump with asyncio -----------------------------------------------------------------


def test_asyncio_aget_timeout_and_redelivery(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)

    async def scenario() -> None:
        sub = broker.subscribe("jobs", name="w", ack="manual")
        assert await sub.aget(timeout=30) is None
        assert clock.elapsed == 30
        broker.publish("jobs", "run", "job-1")
        message = await sub.aget(timeout=0)
        assert message is not None
        sub.nack(message, delay=HOUR)
        again = await sub.aget(timeout=DAY)
        assert again is not None
        assert again.offset == message.offset
        assert clock.elapsed == 30 + HOUR
        assert await sub.apoll(timeout=5) == []
        assert clock.elapsed == 35 + HOUR

    asyncio.run(asyncio.wait_for(scenario(), SAFETY))


def test_asyncio_push_and_adrain(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    calls: list[float] = []

    async def scenario() -> None:
        async def flaky(message: mqlite.Message) -> None:
            calls.append(clock.elapsed)
            if len(calls) < 2:
                raise RuntimeError("try again")

        broker.subscribe("jobs", callback=flaky, backoff=mqlite.Backoff(initial=90, maximum=90))
        broker.publish("jobs", "run", "job-1")
        assert await broker.adrain(timeout=HOUR)
        assert await broker.adrain(timeout=0)

    asyncio.run(asyncio.wait_for(scenario(), SAFETY))
    assert calls == [0, 90]


def test_loop_factory_sleep_and_timers_follow_the_clock() -> None:
    clock = VirtualClock(autojump=True)
    fired: list[float] = []

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(50, lambda: fired.append(clock.elapsed))
        await asyncio.sleep(HOUR)
        try:
            await asyncio.wait_for(asyncio.Event().wait(), timeout=10)
        except TimeoutError:
            pass
        return clock.elapsed

    assert within(lambda: clock.run(scenario())) == HOUR + 10
    assert fired == [50]


def test_loop_factory_with_a_broker(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)

    async def scenario() -> float:
        sub = broker.subscribe("jobs", name="w")

        async def later() -> None:
            await asyncio.sleep(120)
            broker.publish("jobs", "run", "job-1")

        task = asyncio.create_task(later())
        message = await sub.aget(timeout=DAY)
        await task
        assert message is not None
        return clock.elapsed

    assert within(lambda: clock.run(scenario())) == 120


# -- threads and asyncio at once -----------------------------------------------------------


def test_threads_and_asyncio_at_once(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock)
    thread_sub = broker.subscribe("ticks", name="thread")
    seen: list[tuple[str, float]] = []

    def thread_side() -> None:
        # Waits 100 s of clock for nothing, then publishes what the task waits for.
        assert thread_sub.get(timeout=100) is None
        seen.append(("thread timed out", clock.elapsed))
        broker.publish("jobs", "run", "from-thread")

    async def scenario() -> None:
        sub = broker.subscribe("jobs", name="task")
        thread = threading.Thread(target=thread_side)
        thread.start()
        try:
            message = await sub.aget(timeout=DAY)
            assert message is not None
            assert message.payload == "from-thread"
            seen.append(("task got it", clock.elapsed))
        finally:
            await asyncio.to_thread(joined, thread)

    asyncio.run(asyncio.wait_for(scenario(), SAFETY))
    assert seen == [("thread timed out", 100), ("task got it", 100)]


# -- limit ---------------------------------------------------------------------------------


def test_limit_raises_from_a_wait_that_would_cross_it(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True, limit=60)
    sub = make_broker(clock=clock).subscribe("jobs", name="w")
    assert within(lambda: sub.get(timeout=60)) is None  # up to the limit is allowed
    with pytest.raises(VirtualTimeExceeded, match="limit of 60"):
        within(lambda: sub.get(timeout=1))
    assert clock.elapsed == 60


def test_limit_turns_a_deadlock_into_an_error(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True, limit=DAY)
    sub = make_broker(clock=clock).subscribe("jobs", name="w")
    with pytest.raises(VirtualTimeExceeded):
        within(lambda: sub.get())  # nothing will ever come


def test_limit_raises_in_asyncio(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True, limit=10)
    broker = make_broker(clock=clock)

    async def scenario() -> None:
        sub = broker.subscribe("jobs", name="w")
        with pytest.raises(VirtualTimeExceeded):
            await sub.aget(timeout=11)

    asyncio.run(asyncio.wait_for(scenario(), SAFETY))


def test_a_zero_threshold_jumps_as_soon_as_everything_waits(make_broker: Callable[..., mqlite.Broker]) -> None:
    # The setting docs/testing.md suggests for tests with many jumps on one thread.
    clock = VirtualClock(autojump=True, autojump_threshold=0)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w")
    assert within(lambda: [sub.get(timeout=1) for _ in range(50)]) == [None] * 50
    broker.publish("jobs", "run", "job-1")
    assert sub.get(timeout=1) is not None
    assert (clock.elapsed, clock.jumps) == (50.0, 50)


# -- busy ----------------------------------------------------------------------------------


def test_busy_keeps_the_clock_still(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True, autojump_threshold=0.001)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w")
    got: list[mqlite.Message | None] = []
    reader = threading.Thread(target=lambda: got.append(sub.get(timeout=30)))
    try:
        with clock.busy():
            reader.start()
            wait_until_blocked(broker.queue("jobs"))
            # A negative check: 100 thresholds pass, and time must not jump under busy().
            threading.Event().wait(0.1)
            assert clock.elapsed == 0
            broker.publish("jobs", "run", "job-1")
    finally:
        joined(reader)
    assert got[0] is not None
    assert clock.elapsed == 0


# -- without autojump ------------------------------------------------------------------------


def test_without_autojump_time_moves_only_on_advance(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(start=1000.0)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w", ack="manual")
    broker.publish("jobs", "run", "job-1")
    message = sub.get(timeout=0)
    sub.nack(message, delay=10)
    assert sub.get(timeout=0.01) is None  # real seconds: the clock did not move
    assert clock.monotonic() == 1000.0
    assert clock.next_deadline() == 1010.0
    assert clock.jump_to_next() == 1010.0
    assert sub.get(timeout=0) == message
    clock.advance_to(1500.0)
    clock.advance_to(1200.0)  # the past: nothing changes
    assert clock.time() == 1500.0
    assert clock.elapsed == 500.0


def test_without_autojump_advance_wakes_a_blocked_reader(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w", ack="manual")
    broker.publish("jobs", "run", "job-1")
    sub.nack(sub.get(timeout=0), delay=60)
    got: list[mqlite.Message | None] = []
    reader = threading.Thread(target=lambda: got.append(sub.get(timeout=SAFETY)))
    reader.start()
    try:
        wait_until_blocked(broker.queue("jobs"))
        clock.advance(60)
    finally:
        joined(reader)
    assert got[0] is not None
    assert got[0].payload == "job-1"


def test_manual_clock_is_unchanged(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = mqlite.ManualClock()
    broker = make_broker(clock=clock)
    sub = broker.subscribe("jobs", name="w", ack="manual", ack_timeout=30)
    broker.publish("jobs", "run", "job-1")
    first = sub.get(timeout=1)
    assert sub.get(timeout=0.01) is None  # real seconds: no autojump
    assert clock.monotonic() == 1_700_000_000.0
    clock.advance(30)
    assert sub.get(timeout=0) == first


def test_arguments_are_checked() -> None:
    for kwargs in ({"start": float("nan")}, {"autojump": 1}, {"autojump_threshold": -1}, {"limit": float("inf")}):
        with pytest.raises(mqlite.InvalidArgument):
            VirtualClock(**kwargs)
    with pytest.raises(mqlite.InvalidArgument):
        VirtualClock().advance(-1)


# -- run_until_idle ----------------------------------------------------------------------------


def test_run_until_idle_runs_callbacks_and_timers(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    calls: list[float] = []

    def flaky(message: mqlite.Message) -> None:
        calls.append(clock.elapsed)
        if len(calls) < 3:
            raise RuntimeError(f"failure {len(calls)}")

    broker.subscribe("jobs", callback=flaky, backoff=mqlite.Backoff(initial=1, factor=2))
    broker.publish("jobs", "run", "job-1")
    report = within(lambda: run_until_idle(broker))
    assert report.idle
    assert calls == [0, 1, 3]
    assert (report.callbacks, report.timers, report.advanced) == (3, 2, 3)
    assert [str(error) for _, error in report.errors] == ["failure 1", "failure 2"]
    assert "3 callbacks (2 raised), 2 timers fired, 3 virtual seconds" in str(report)


def test_run_until_idle_raises_callback_errors(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker(clock=mqlite.ManualClock(), dispatcher=mqlite.ManualDispatcher())

    def always_fails(message: mqlite.Message) -> None:
        raise ValueError("bad job")

    broker.subscribe("jobs", name="runner", callback=always_fails, max_deliveries=2)
    broker.publish("jobs", "run", "job-1")
    with pytest.raises(CallbackErrors, match="2 push callback") as caught:
        within(lambda: run_until_idle(broker, raise_errors=True))
    assert [repr(error) for _, error in caught.value.errors] == ["ValueError('bad job')"] * 2
    assert caught.value.report.idle  # dead-lettered: nothing left


def test_run_until_idle_stops_at_max_virtual(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())

    def always_fails(message: mqlite.Message) -> None:
        raise ValueError("bad job")

    broker.subscribe("jobs", callback=always_fails, backoff=mqlite.Backoff(initial=10, factor=1))
    broker.publish("jobs", "run", "job-1")
    report = within(lambda: run_until_idle(broker, max_virtual=35))
    assert not report.idle
    assert (report.timers, report.advanced, report.callbacks) == (3, 30, 4)
    assert within(lambda: run_until_idle(broker, max_steps=2)).timers == 2


def test_run_until_idle_runs_on_to_the_ack_timeout_of_an_unacked_push(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    calls: list[float] = []
    broker.subscribe(
        "jobs", name="w", ack="manual", ack_timeout=60, max_deliveries=3, callback=lambda m: calls.append(clock.elapsed)
    )
    dead = broker.subscribe("jobs.dead-letter")
    broker.publish("jobs", "run", "never acked")
    report = within(lambda: run_until_idle(broker))
    assert report.idle
    assert calls == [0, 60, 120]
    assert (report.timers, report.advanced) == (3, 180)
    letter = dead.get(timeout=0)
    assert letter is not None
    assert letter.headers["dead_letter.reason"] == "ack timeout"


def _count_due_looks(broker: mqlite.Broker) -> dict[str, int]:
    """Count, by queue, the looks run_until_idle makes for push timers (each queue's next_due)."""
    looks: dict[str, int] = {}
    for name, queue in broker._engines.items():
        look = queue.next_due

        def counted(*, push_only: bool = False, _look: Any = look, _name: str = name) -> Any:
            looks[_name] = looks.get(_name, 0) + 1
            return _look(push_only=push_only)

        queue.next_due = counted  # type: ignore[method-assign]  # an instance attribute, for this test
    return looks


@pytest.mark.memory_only  # a file's queues (which other brokers may share) and Redis's are looked at every time
def test_run_until_idle_looks_only_at_the_queues_with_work_or_timers(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    seen: list[str] = []
    for i in range(20):
        broker.subscribe(f"idle{i}", callback=lambda m: seen.append(m.queue))
        broker.publish(f"idle{i}", "e", i)
    held = broker.subscribe("held", name="w", ack="manual", ack_timeout=60, callback=lambda m: seen.append(m.queue))
    broker.publish("held", "e", "kept unacked")
    assert within(lambda: run_until_idle(broker, max_virtual=0)).callbacks == 21
    looks = _count_due_looks(broker)
    broker.publish("idle3", "e", "more")
    report = within(lambda: run_until_idle(broker, max_virtual=0))
    assert report.callbacks == 1
    assert set(looks) <= {"idle3", "held"}, f"looked at queues with nothing to do: {sorted(looks)}"
    assert "held" in looks  # its ack timeout is a push timer
    held.close()


def test_run_until_idle_reaches_an_ack_timeout_of_a_queue_that_drains_found_settled(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    calls: list[float] = []
    broker.subscribe("jobs", name="w", ack="manual", ack_timeout=60, callback=lambda m: calls.append(clock.elapsed))
    for i in range(5):
        broker.subscribe(f"idle{i}", callback=lambda m: None)
    broker.publish("jobs", "run", "never acked")
    assert broker.drain(timeout=0)  # handed over and unacked: settled, as far as drains go
    assert broker.drain(timeout=0)
    report = within(lambda: run_until_idle(broker, max_virtual=100))
    assert calls == [0, 60]
    assert report.callbacks == 1


def test_run_until_idle_reaches_the_delay_of_a_nack_made_outside_a_callback(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    held: list[mqlite.Message] = []
    sub = broker.subscribe("jobs", name="w", ack="manual", callback=held.append)
    broker.publish("jobs", "run", 1)
    assert within(lambda: run_until_idle(broker)).callbacks == 1
    sub.nack(held[0], delay=30)
    report = within(lambda: run_until_idle(broker))
    assert (report.callbacks, report.advanced) == (1, 30)
    assert [m.offset for m in held] == [0, 0]
    sub.ack(held[1])


def test_run_until_idle_reaches_an_ack_timeout_a_pull_consumer_left_to_a_new_push_one(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    clock = VirtualClock()
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    puller = broker.subscribe("jobs", name="w", ack="manual", ack_timeout=60)
    broker.publish("jobs", "run", 1)
    assert puller.get(timeout=0) is not None  # pending on the cursor, its ack timeout a pull timer
    assert within(lambda: run_until_idle(broker)).timers == 0  # no push subscription: nothing to run
    pushed: list[float] = []
    pusher = broker.subscribe(
        "jobs", name="w", ack="manual", ack_timeout=60, callback=lambda m: pushed.append(clock.elapsed)
    )
    report = within(lambda: run_until_idle(broker, max_virtual=100))
    assert pushed == [60]  # the puller's ack timeout passed: the message went to the push consumer
    assert report.callbacks == 1
    pusher.close()
    puller.close()


@pytest.mark.parametrize("stepped", ["in rounds", "one by one"])
def test_run_until_idle_counts_every_message_handed_to_a_callback(
    make_broker: Callable[..., mqlite.Broker], stepped: str
) -> None:
    broker = make_broker(clock=VirtualClock(), dispatcher=mqlite.ManualDispatcher())
    if stepped == "one by one":
        # A recorder watches each settlement, so its subscriptions are stepped alone, through
        # PushWorker (as a thread pool steps them), not in the dispatcher's rounds.
        record(broker)
    seen: list[int] = []
    for _ in range(3):
        broker.subscribe("q", callback=lambda m: seen.append(m.offset))
    for i in range(4):
        broker.publish("q", "e", i)  # a batch of four for each subscription
    report = within(lambda: run_until_idle(broker))
    assert report.idle
    assert report.callbacks == 12 == len(seen)


@pytest.mark.parametrize("stepped", ["in rounds", "one by one"])
def test_run_until_idle_counts_only_what_a_subscription_closed_mid_batch_was_handed(
    make_broker: Callable[..., mqlite.Broker], stepped: str
) -> None:
    broker = make_broker(clock=VirtualClock(), dispatcher=mqlite.ManualDispatcher())
    if stepped == "one by one":
        record(broker)  # through PushWorker.handle, as in the test above
    subs: dict[str, mqlite.Subscription] = {}
    seen: list[int] = []

    def closes_itself(message: mqlite.Message) -> None:
        seen.append(message.offset)
        subs["s"].close()

    subs["s"] = broker.subscribe("q", callback=closes_itself)
    for i in range(3):
        broker.publish("q", "e", i)
    report = within(lambda: run_until_idle(broker))
    assert seen == [0]
    assert report.callbacks == 1


def test_a_drain_that_finds_thread_pushed_batches_settled_finds_them_counted(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    # The thread pool tells drains of settled batches once a round, after settling them; a
    # drain(timeout=0) between the two (run_until_idle looks so, with threads) must still find
    # the batch in the count its report reads.
    broker = make_broker(clock=VirtualClock())
    noting = threading.Event()
    go_on = threading.Event()
    note = broker._note_progress

    def held_note(handed: int = 0) -> None:
        if threading.current_thread() is not threading.main_thread():
            noting.set()
            go_on.wait(SAFETY)
        note(handed)

    broker._note_progress = held_note  # type: ignore[method-assign]
    try:
        broker.queue("q", retention="limits")  # keeps what is published before anyone subscribes
        for i in range(3):
            broker.publish("q", "e", i)
        seen: list[int] = []
        broker.subscribe("q", start="earliest", callback=lambda m: seen.append(m.offset))  # one batch of three
        assert noting.wait(SAFETY)  # the batch of three is settled; its note is held
        assert broker.drain(timeout=0)
        assert broker._progress.handed_so_far() == 3 == len(seen)
    finally:
        go_on.set()


def test_run_until_idle_needs_a_virtual_clock(make_broker: Callable[..., mqlite.Broker]) -> None:
    with pytest.raises(mqlite.InvalidArgument, match="virtual clock"):
        run_until_idle(make_broker())


def test_autojump_drain_with_a_manual_dispatcher(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = VirtualClock(autojump=True)
    broker = make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher())
    calls: list[float] = []

    def flaky(message: mqlite.Message) -> None:
        calls.append(clock.elapsed)
        if len(calls) < 3:
            raise RuntimeError("try again")

    broker.subscribe("jobs", callback=flaky, backoff=mqlite.Backoff(initial=1, factor=2))
    broker.publish("jobs", "run", "job-1")
    assert within(lambda: broker.drain()) is True  # no timeout: the clock jumps to each retry
    assert calls == [0, 1, 3]
