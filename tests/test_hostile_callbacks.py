"""Callbacks and dispatchers cannot break the rules, and distinct event names cannot grow memory (issue 13).

A callback that cannot take a message, a coroutine callback on a closed loop, and a dead-letter
queue that is its own source are refused at ``subscribe``. ``drain()`` inside one of its broker's
callbacks is refused at once. A ``ManualDispatcher`` runs each subscription's callbacks one at
a time and in order, whoever calls it. The event index forgets names that retention emptied.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import WAIT, Worker, offsets, payloads, pull_all, wait_until_blocked

import mqlite
import mqlite.dispatch
from mqlite._delivery.retention import HOUSEKEEP_EVERY, MIN_RECLAIM

# -- callbacks that cannot take one message ----------------------------------------------


def _no_arguments() -> None:
    pass


def _two_arguments(message: mqlite.Message, extra: object) -> None:
    pass


def _keyword_only(message: mqlite.Message, *, extra: object) -> None:
    pass


async def _async_no_arguments() -> None:
    pass


class _TakesNothing:
    def __call__(self) -> None:
        pass


@pytest.mark.parametrize(
    "callback",
    [_no_arguments, _two_arguments, _keyword_only, _TakesNothing(), functools.partial(_no_arguments)],
    ids=["no-arguments", "two-arguments", "keyword-only", "call-without-arguments", "partial-of-no-arguments"],
)
def test_subscribe_refuses_a_callback_that_cannot_take_one_message(
    manual_broker: mqlite.Broker, callback: Callable[..., object]
) -> None:
    with pytest.raises(mqlite.InvalidArgument, match="must accept one argument") as refused:
        manual_broker.subscribe("q", name="w", callback=callback)
    assert repr(callback) in str(refused.value)
    assert manual_broker.info().subscriptions == ()  # nothing attached, no cursor made
    seen: list[Any] = []
    manual_broker.subscribe("q", name="w", callback=lambda m: seen.append(m.payload))
    manual_broker.publish("q", "e", 1)
    assert manual_broker.drain(timeout=WAIT)
    assert seen == [1]


def test_subscribe_refuses_a_coroutine_callback_that_cannot_take_one_message(broker: mqlite.Broker) -> None:
    async def main() -> None:
        with pytest.raises(mqlite.InvalidArgument, match="must accept one argument"):
            broker.subscribe("q", name="w", callback=_async_no_arguments)  # type: ignore[arg-type]  # the bad call under test
        assert broker.info().subscriptions == ()

    asyncio.run(asyncio.wait_for(main(), WAIT))


class _Handler:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def method(self, message: mqlite.Message) -> None:
        self.seen.append(message.payload)

    def __call__(self, message: mqlite.Message) -> None:
        self.seen.append(message.payload)

    def with_prefix(self, prefix: str, message: mqlite.Message) -> None:
        self.seen.append((prefix, message.payload))

    def star_args(self, *args: mqlite.Message) -> None:
        self.seen.append(args[0].payload)

    def with_default(self, message: mqlite.Message, extra: int = 0) -> None:
        self.seen.append(message.payload + extra)


def test_subscribe_accepts_every_callable_that_takes_one_message(manual_broker: mqlite.Broker) -> None:
    handler = _Handler()
    sink: list[mqlite.Message] = []
    callbacks: list[Callable[[mqlite.Message], object]] = [
        handler.method,
        handler,
        functools.partial(handler.with_prefix, "p"),
        handler.star_args,
        handler.with_default,
        sink.append,  # a builtin method
    ]
    for callback in callbacks:
        manual_broker.subscribe("q", callback=callback)
    manual_broker.publish("q", "e", 1)
    assert manual_broker.drain(timeout=WAIT)
    assert handler.seen == [1, 1, ("p", 1), 1, 1]
    assert payloads(sink) == [1]


def test_subscribe_accepts_a_callable_whose_signature_cannot_be_read(manual_broker: mqlite.Broker) -> None:
    seen: list[mqlite.Message] = []

    class NoSignature:
        @property
        def __signature__(self) -> inspect.Signature:
            raise ValueError("no signature")

        def __call__(self, message: mqlite.Message) -> None:
            seen.append(message)

    manual_broker.subscribe("q", callback=NoSignature())
    manual_broker.publish("q", "e", 1)
    assert manual_broker.drain(timeout=WAIT)
    assert payloads(seen) == [1]


def test_subscribe_accepts_a_coroutine_callback_that_takes_one_message(broker: mqlite.Broker) -> None:
    seen: list[Any] = []

    async def main() -> None:
        async def handle(message: mqlite.Message) -> None:
            seen.append(message.payload)

        broker.subscribe("q", callback=handle)
        broker.publish("q", "e", 1)
        assert await broker.adrain(timeout=WAIT)
        await broker.aclose()

    asyncio.run(asyncio.wait_for(main(), WAIT))
    assert seen == [1]


# -- a coroutine callback on a closed loop ------------------------------------------------


def test_subscribe_refuses_a_coroutine_callback_whose_loop_is_closed(broker: mqlite.Broker) -> None:
    async def handle(message: mqlite.Message) -> None:
        pass

    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(mqlite.InvalidArgument, match="is closed"):
        broker.subscribe("q", name="w", callback=handle, loop=loop)
    assert broker.info().subscriptions == ()  # no zombie consumer, no cursor
    sub = broker.subscribe("q", name="w")  # the name is usable
    broker.publish("q", "e", 1)
    assert payloads(pull_all(sub)) == [1]
    (row,) = broker.info().subscriptions
    assert (row.name, row.consumers) == ("w", 1)


class _RefusingDispatcher(mqlite.ManualDispatcher):
    """A dispatcher whose ``start`` fails, as a broken custom dispatcher might."""

    def start(self, worker: mqlite.dispatch.PushWorker) -> None:
        raise RuntimeError("no threads left")


def test_a_dispatcher_that_cannot_start_a_worker_leaves_no_consumer(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker(dispatcher=_RefusingDispatcher())
    with pytest.raises(RuntimeError, match="no threads left"):
        broker.subscribe("q", name="w", callback=lambda m: None)
    (row,) = broker.info().subscriptions  # the durable cursor was made; nothing holds it
    assert (row.name, row.consumers, row.mode) == ("w", 0, "detached")
    sub = broker.subscribe("q", name="w")
    broker.publish("q", "e", 1)
    assert payloads(pull_all(sub)) == [1]


# -- a dead-letter queue that is its own source -------------------------------------------


def test_subscribe_refuses_a_dead_letter_queue_equal_to_its_source(
    manual_broker: mqlite.Broker, clock: mqlite.ManualClock
) -> None:
    def fail(message: mqlite.Message) -> None:
        raise ValueError("always fails")

    with pytest.raises(mqlite.InvalidArgument, match="dead_letter"):
        manual_broker.subscribe("q", name="w", callback=fail, max_deliveries=1, dead_letter="q")
    assert manual_broker.info().subscriptions == ()
    manual_broker.subscribe("q", name="w", callback=fail, max_deliveries=1, dead_letter="dead")
    manual_broker.publish("q", "e", 1)
    assert manual_broker.drain(timeout=WAIT)
    dead = manual_broker.subscribe("dead", start="earliest")
    assert payloads(pull_all(dead)) == [1]


# -- drain() inside a push callback ---------------------------------------------------------


def _drain_inside_callback(broker: mqlite.Broker) -> list[BaseException | bool]:
    """Subscribe a callback that calls drain(); publish once, drain from outside; what the inner drain did."""
    outcome: list[BaseException | bool] = []

    def callback(message: mqlite.Message) -> None:
        try:
            outcome.append(broker.drain(timeout=0.5))  # bounded: without the refusal it waits for itself
        except mqlite.MqliteError as error:
            outcome.append(error)

    broker.subscribe("q", name="w", callback=callback)
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=WAIT)
    return outcome


def test_drain_inside_a_callback_on_a_thread_is_refused_at_once(broker: mqlite.Broker) -> None:
    (outcome,) = _drain_inside_callback(broker)
    assert isinstance(outcome, mqlite.WouldDeadlock), outcome
    assert isinstance(outcome, RuntimeError)
    assert "q/w#" in str(outcome)


def test_drain_inside_a_callback_of_a_manual_dispatcher_is_refused_at_once(manual_broker: mqlite.Broker) -> None:
    (outcome,) = _drain_inside_callback(manual_broker)
    assert isinstance(outcome, mqlite.WouldDeadlock), outcome
    info = manual_broker.info().subscription("q", "w")
    assert (info.acked, info.pending) == (1, 0)  # the refusal raised no error in the callback's caller


def test_drain_inside_a_coroutine_callback_is_refused_at_once(broker: mqlite.Broker) -> None:
    outcome: list[BaseException | bool] = []

    async def main() -> None:
        async def callback(message: mqlite.Message) -> None:
            try:
                outcome.append(await broker.adrain(timeout=0.5))  # would wait for this very task
            except mqlite.MqliteError as error:
                outcome.append(error)
            try:
                outcome.append(broker.drain(timeout=0.5))  # would block this loop for itself
            except mqlite.MqliteError as error:
                outcome.append(error)

        broker.subscribe("q", callback=callback)
        broker.publish("q", "e", 1)
        assert await broker.adrain(timeout=WAIT)
        await broker.aclose()

    asyncio.run(asyncio.wait_for(main(), WAIT))
    assert len(outcome) == 2
    assert all(isinstance(o, mqlite.WouldDeadlock) for o in outcome), outcome


def test_drain_of_another_broker_inside_a_callback_is_allowed(make_broker: Callable[..., mqlite.Broker]) -> None:
    dispatcher = mqlite.ManualDispatcher()  # shared: the other broker's drain runs this one's workers too
    first = make_broker(dispatcher=dispatcher)
    second = make_broker(dispatcher=dispatcher)
    outcome: list[bool] = []
    first.subscribe("q", callback=lambda m: outcome.append(second.drain(timeout=WAIT)))
    second_seen: list[Any] = []
    second.subscribe("q", callback=lambda m: second_seen.append(m.payload))
    second.publish("q", "e", 2)
    first.publish("q", "e", 1)
    assert first.drain(timeout=WAIT)
    assert outcome == [True]
    assert second_seen == [2]


# -- ManualDispatcher: one at a time, in order -------------------------------------------------


class _Recorder:
    """A callback that records offsets and how many of its calls overlap; ``pause`` holds one offset."""

    def __init__(self, pause_at: int | None = None) -> None:
        # _lock guards running, most and seen.
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.seen: list[int] = []
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.nested: Callable[[], object] | None = None

    def __call__(self, message: mqlite.Message) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.seen.append(message.offset)
        try:
            if message.offset == self.pause_at:
                self.paused.set()
                assert self.resume.wait(WAIT)
            if self.nested is not None and message.offset == 0:
                self.nested()
        finally:
            with self._lock:
                self.running -= 1


def test_manual_dispatcher_never_nests_a_subscriptions_callbacks(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher
) -> None:
    recorder = _Recorder()
    other: list[int] = []
    manual_broker.subscribe("q", callback=recorder)
    manual_broker.subscribe("q", callback=lambda m: other.append(m.offset))

    def publish_and_run() -> None:
        manual_broker.publish("q", "e", 1)
        dispatcher.run_ready()  # runs the other subscription, not this one

    recorder.nested = publish_and_run
    manual_broker.publish("q", "e", 0)
    assert manual_broker.drain(timeout=WAIT)
    assert recorder.most == 1
    assert recorder.seen == [0, 1]
    assert other == [0, 1]


class _Observed(mqlite.ManualDispatcher):
    """A manual dispatcher that says when a thread other than ``first`` has run it once."""

    def __init__(self) -> None:
        super().__init__()
        self.first: threading.Thread | None = None
        self.other_ran = threading.Event()

    def run_ready(self) -> bool:
        try:
            return super().run_ready()
        finally:
            if self.first is not None and threading.current_thread() is not self.first:
                self.other_ran.set()


@pytest.mark.parametrize("second", ["run_ready", "drain"])
def test_manual_dispatcher_runs_a_subscription_on_one_thread_at_a_time(
    make_broker: Callable[..., mqlite.Broker], second: str
) -> None:
    dispatcher = _Observed()
    broker = make_broker(dispatcher=dispatcher)
    recorder = _Recorder(pause_at=0)
    broker.subscribe("q", callback=recorder)
    broker.publish("q", "e", 0)

    def first_drain() -> bool:
        dispatcher.first = threading.current_thread()
        return broker.drain(timeout=WAIT)

    first = Worker(first_drain)
    others: list[Worker] = []
    try:
        assert recorder.paused.wait(WAIT)  # the first thread is inside the callback of offset 0
        broker.publish("q", "e", 1)
        broker.publish("q", "e", 2)
        others.append(Worker(dispatcher.run_ready if second == "run_ready" else lambda: broker.drain(timeout=WAIT)))
        assert dispatcher.other_ran.wait(WAIT)  # it looked while offset 0 was in hand
        recorder.resume.set()
        assert first.join() is True
        if second == "drain":
            assert others[0].join() is True
    finally:
        recorder.resume.set()
        first.thread.join(WAIT)
        for other in others:
            other.thread.join(WAIT)
    assert recorder.most == 1
    assert recorder.seen == [0, 1, 2]


# -- KeyboardInterrupt inside a callback that drain() runs ----------------------------------------


@pytest.mark.parametrize("ack", ["auto", "manual"])
def test_keyboard_interrupt_in_a_callback_stops_drain_and_leaves_the_message_undone(
    manual_broker: mqlite.Broker, ack: str
) -> None:
    seen: list[int] = []
    subs: list[mqlite.Subscription] = []

    def callback(message: mqlite.Message) -> None:
        seen.append(message.offset)
        if message.offset == 1 and seen.count(1) == 1:
            raise KeyboardInterrupt
        if ack == "manual":
            subs[0].ack(message)

    subs.append(manual_broker.subscribe("q", name="w", callback=callback, ack=ack))  # type: ignore[arg-type]
    for i in range(3):
        manual_broker.publish("q", "e", i)
    with pytest.raises(KeyboardInterrupt):
        manual_broker.drain(timeout=WAIT)
    info = manual_broker.info().subscription("q", "w")
    assert info.acked == 1  # offset 0 only: 1 was in hand, 2 never started
    assert seen == [0, 1]
    assert manual_broker.drain(timeout=WAIT)  # the dispatcher still runs the subscription
    assert seen == [0, 1, 1, 2]
    info = manual_broker.info().subscription("q", "w")
    assert (info.acked, info.pending, info.redelivered) == (3, 0, 0)


# -- bounded memory with an event name per message -------------------------------------------------


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
def test_memory_stays_bounded_when_every_message_has_its_own_event(broker: mqlite.Broker, filtered: bool) -> None:
    queue = broker.queue("q", retention="limits", max_messages=1000)
    reader = broker.subscribe("q", events="e-*", name="r") if filtered else None

    def publish(start: int, stop: int) -> None:
        for first in range(start, stop, 1000):
            queue.publish_many([(f"e-{i}", i) for i in range(first, first + 1000)])

    publish(0, 10_000)  # warm up: the log and the index at their working size
    gc.collect()
    before = sys.getallocatedblocks()
    publish(10_000, 100_000)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    # Each name kept would hold at least one block (90,000 more); retention keeps the count flat.
    assert grown < 9_000, f"{grown:,} more memory blocks after 90,000 more names under max_messages=1000"
    assert len(queue) == 1000
    if reader is not None:
        assert offsets(pull_all(reader)) == list(range(99_000, 100_000))


def _cycle(count: int, retained: int) -> list[str]:
    """Event names for ``count`` publishes where each name comes back just after retention dropped it."""
    return [f"e-{i % (retained + 1)}" for i in range(count)]


def test_a_forgotten_event_published_again_reaches_a_filtered_reader(broker: mqlite.Broker) -> None:
    retained = 100
    queue = broker.queue("q", retention="limits", max_messages=retained)
    reader = broker.subscribe("q", events="e-*", name="r")
    got: list[int] = []
    names = _cycle(2 * (MIN_RECLAIM + retained), retained)
    for i, event in enumerate(names):
        queue.publish(event)  # each reclaim happens in the publish of a name it forgets
        if i % 50 == 0:  # often enough that retention drops nothing the reader has not read
            got.extend(offsets(pull_all(reader)))
    got.extend(offsets(pull_all(reader)))
    assert got == list(range(len(names)))


def test_a_filter_added_after_events_were_forgotten_reads_every_retained_message(broker: mqlite.Broker) -> None:
    # Reclaims come every MIN_RECLAIM publishes (at housekeeping's cadence). Retaining more than
    # that, the message of the name each one forgot is still retained when the filter is added.
    retained = 2 * MIN_RECLAIM + HOUSEKEEP_EVERY
    queue = broker.queue("q", retention="limits", max_messages=retained)
    count = retained + MIN_RECLAIM + 2 * HOUSEKEEP_EVERY
    for event in _cycle(count, retained):
        queue.publish(event)  # nothing filters: the index holds names only, and forgets them
    reader = broker.subscribe("q", events="e-*", start="earliest")
    assert offsets(pull_all(reader)) == list(range(count - retained, count))


def test_a_reader_blocked_on_a_forgotten_event_wakes_when_it_is_published_again(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=10)
    reader = broker.subscribe("q", events="rare", name="r")
    queue.publish("rare", "old")
    queue.publish_many([("other", i) for i in range(2 * MIN_RECLAIM)])  # "rare" drops out, is forgotten
    assert reader.missed == 1
    waiting = Worker(lambda: reader.get(timeout=WAIT))
    try:
        wait_until_blocked(queue)
        queue.publish("rare", "new")
        message = waiting.join()
    finally:
        waiting.thread.join(WAIT)
    assert message is not None
    assert message.payload == "new"
