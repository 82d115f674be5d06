"""Push delivery: workers that run callbacks, and the dispatchers that give them threads.

Both kinds of worker, the thread one and the asyncio one, run their batches through one
:class:`_BatchRunner`, so they share one exception policy and one settlement; they differ only
in how they call the callback (a plain call or an ``await``) and how they wait for the next batch.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import operator
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from mqlite._delivery.waiters import Waiter
from mqlite._waiting import OffLoop, await_, capped, jumping_clock, run_off_loop, wait
from mqlite.engine.base import Attempt, Consumer, QueueEngine
from mqlite.errors import StorageError
from mqlite.message import Message

__all__ = [
    "CANCEL_GRACE",
    "STALL",
    "AsyncPushWorker",
    "Dispatcher",
    "ManualDispatcher",
    "PushWorker",
    "ThreadDispatcher",
    "astop_async_workers",
    "stop_async_workers",
]

_log = logging.getLogger("mqlite")

# How many messages a worker takes per lock acquisition. Large enough to amortise the lock,
# small enough that closing a subscription stops its callbacks promptly.
PUSH_BATCH = 1024

# A push batch whose settling failed on a write error is settled again, after a back-off that
# doubles from SETTLE_RETRY_FIRST up to SETTLE_RETRY_MAX seconds, for up to SETTLE_RETRY_FOR.
SETTLE_RETRY_FIRST = 0.01
SETTLE_RETRY_MAX = 1.0
SETTLE_RETRY_FOR = 30.0

CANCEL_GRACE = 0.5
"""Seconds closing waits for a cancelled coroutine callback to unwind. It normally takes one turn
of its loop; this only bounds a callback that ignores the cancellation."""


_get_ident = threading.get_ident

FAILURE_OBSERVERS: list[Callable[[QueueEngine, Message, Exception], object]] = []
"""Called with (queue, message, error) after a callback raised, on the worker's thread, with no
lock held. ``mqlite.testing.run_until_idle(raise_errors=True)`` adds one for its run; costs only
failing deliveries a loop over an empty list."""


class _BatchRunner:
    """One push batch on its way through a callback, and its settlement; both workers use it.

    The exception policy lives here. A worker drives it the same way whether it runs on a
    thread or a loop; only the call differs (``callback(message)`` or ``await callback(message)``)::

        try:
            for message in runner:
                if consumer.closed:
                    break  # a callback that is running finishes; no new one starts
                try:
                    callback(message)
                except Exception as error:
                    runner.failed(message, error)
            else:
                runner.all_handled()
        finally:
            runner.settle()

    An ``Exception`` is a failed delivery: :meth:`failed` logs it, the queue retries or
    dead-letters the message, and the batch goes on. A ``BaseException`` that is not an
    ``Exception`` (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError) is not
    caught: it stops the work, and :meth:`settle` gives back the message in hand and every one
    after it, never marked done. So does the subscription closing mid-batch. Not thread-safe: it
    belongs to the worker running the batch.
    """

    __slots__ = ("_batch", "_consumer", "_failures", "_finished", "_queue", "_rest")

    def __init__(
        self, queue: QueueEngine, consumer: Consumer, batch: list[Message], rest: Iterator[Message] | None = None
    ) -> None:
        self._queue = queue
        self._consumer = consumer
        self._batch = batch
        self._failures: list[tuple[Message, BaseException]] = []
        # A plain list iterator, not a generator: this loop runs for every message of every push
        # subscription, and resuming a generator costs about 320 more instructions per message
        # (callgrind, CPython 3.11). Its length hint says exactly how far it got. ``rest`` is one
        # a worker began on its own (see PushWorker._deliver).
        self._rest = iter(batch) if rest is None else rest
        self._finished = False

    def __iter__(self) -> Iterator[Message]:
        """The messages not yet handed to the callback, in order."""
        return self._rest

    def failed(self, message: Message, error: Exception) -> None:
        """The callback raised ``error`` on ``message``: log it and count a failed delivery."""
        _log_failure(self._consumer, message, error)
        self._failures.append((message, error))
        for observe in FAILURE_OBSERVERS:  # empty unless a test collects them (run_until_idle)
            observe(self._queue, message, error)

    def all_handled(self) -> None:
        """The callback was called with every message of the batch, and returned or failed."""
        self._finished = True

    def settle(self) -> None:
        """Report the batch to the queue, however it ended: acks, failures, and what goes back."""
        batch = self._batch
        if self._finished:
            unprocessed: list[Message] = []
        else:
            # Stopped early: the last message taken from the iterator was in hand, not handled.
            taken = len(batch) - operator.length_hint(self._rest)
            unprocessed = batch[taken - 1 if taken else 0 :]
        _settle(self._queue, self._consumer, batch, self._failures, unprocessed)


def _settle(
    queue: QueueEngine,
    consumer: Consumer,
    batch: list[Message],
    failures: list[tuple[Message, BaseException]],
    unprocessed: list[Message],
) -> None:
    """Report a push batch to the queue (see :meth:`_BatchRunner.settle`)."""
    try:
        queue.push_done(consumer, batch, failures, unprocessed)
    except StorageError as error:
        if not queue.atomic:
            raise  # it may have settled part of the batch: making it again could count twice
        _settle_again(queue, consumer, batch, failures, unprocessed, error)


def _settle_again(
    queue: QueueEngine,
    consumer: Consumer,
    batch: list[Message],
    failures: list[tuple[Message, BaseException]],
    unprocessed: list[Message],
    error: StorageError,
) -> None:
    """Settling failed on a write error and changed nothing: try again, for a while.

    The callbacks ran, so giving the batch back is not an option; until it is settled its
    messages stay held by this broker (a restart delivers them again). Tries for up to
    SETTLE_RETRY_FOR seconds, backing off, and gives up at once when the subscription closes:
    then the error goes up and the worker stops.
    """
    _log.warning(
        "could not settle a push batch of subscription %s (%s); retrying for up to %g s",
        consumer._label,
        error,
        SETTLE_RETRY_FOR,
    )
    give_up = time.monotonic() + SETTLE_RETRY_FOR
    pause = SETTLE_RETRY_FIRST
    while not consumer.closed and time.monotonic() + pause < give_up:
        time.sleep(pause)  # a back-off between retries, not a synchronisation
        pause = min(pause * 2, SETTLE_RETRY_MAX)
        try:
            queue.push_done(consumer, batch, failures, unprocessed)
        except StorageError as again:
            error = again
        else:
            _log.warning("settled the push batch of subscription %s after all", consumer._label)
            return
    raise error


def _log_failure(consumer: Consumer, message: Message, error: BaseException) -> None:
    _log.warning(
        "callback of subscription %s failed on %s offset %d (%s): %r",
        consumer._label,
        message.queue,
        message.offset,
        message.event,
        error,
        exc_info=_log.isEnabledFor(logging.DEBUG),
    )


class PushWorker:
    """Delivers one push subscription's messages to its callback, one at a time and in order.

    A worker is run by exactly one thread at a time (its dispatcher's choice). It takes batches
    under the queue's lock and calls the callback with no lock held. A callback that raises an
    ``Exception`` is logged to the ``mqlite`` logger and counts as a failed delivery; the worker
    carries on. Any other ``BaseException`` (KeyboardInterrupt, SystemExit) gives back the rest of
    the batch and propagates to whoever runs the worker.
    """

    def __init__(
        self,
        queue: QueueEngine,
        consumer: Consumer,
        callback: Callable[[Message], object],
        on_progress: Callable[[int], None],
        on_handed: Callable[[int], None],
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.callback = callback
        self._on_progress = on_progress
        self._on_handed = on_handed
        # An engine that can register its waiter with a take saves a ManualDispatcher a step
        # that finds nothing after every batch; any engine can register one with an empty take.
        self._take_and_watch: Callable[[Consumer, int, Callable[[], object]], Attempt[list[Message] | None]] = (
            getattr(queue, "push_and_watch", None) or queue.push_or_wait
        )
        self.running_on: int | None = None
        """The thread running this worker's callbacks now, if any: ``Broker.drain`` refuses to run
        inside them. Only that thread writes its own ident here, so a thread that reads its own
        ident knows it is inside, whatever others write meanwhile."""

    def step(self, *, block: bool) -> bool | None:
        """Deliver one batch. Returns whether anything was delivered, or None once closed."""
        queue = self.queue
        consumer = self.consumer
        batch = queue.try_push(consumer, PUSH_BATCH)
        if batch is not None and not batch:
            if not block:
                return False
            batch = wait(lambda wake: queue.push_or_wait(consumer, PUSH_BATCH, wake), queue.remove_waiter, None).value
        if batch is None:
            return None
        self._deliver(batch, True)
        return True

    def step_or_watch(self, wake: Callable[[], object], note: bool) -> Attempt[list[Message] | None]:
        """Deliver one batch, and register ``wake`` for when there may be more.

        Returns the engine's attempt. Its value is the batch delivered (maybe empty), or None
        once closed. Its ``waiter``, if any, was registered with the take, so it wakes for
        whatever arrived since; ``wait_at_most`` is how many real seconds until a timer of the
        subscription falls due (None: no timer, or a virtual clock, which wakes every waiter
        when it moves). No waiter means step again: there may be more. :class:`ManualDispatcher`
        steps a worker only then, so that a run visits only the workers with work.

        ``note`` False leaves telling drains about a delivered batch (:attr:`on_progress`) to
        the caller, which may tell them once for several batches. (Positional and without a
        default, as is ``note`` of ``_deliver``: CPython 3.11 specialises calls with exactly the
        parameters best; a keyword-only ``note`` cost "publish+10 push" 18 instructions per
        publish.)
        """
        attempt = self._take_and_watch(self.consumer, PUSH_BATCH, wake)
        batch = attempt.value
        if batch:
            self._deliver(batch, note)
        return attempt

    @property
    def on_progress(self) -> Callable[[int], None]:
        """What to call once batches are settled: it wakes the broker's drains. Its argument is
        how many messages those batches handed to the callback that were not counted yet (this
        worker counts its own with ``on_handed``, before it settles each batch; a
        :class:`ManualDispatcher` round that hands messages itself counts them here)."""
        return self._on_progress

    def _deliver(self, batch: list[Message], note: bool) -> None:
        """Hand ``batch`` to the callback, one message at a time, and settle it."""
        try:
            if self.handle(batch):
                # Counted before it is settled: a drain that finds it settled finds it counted
                # (``run_until_idle``'s report reads the count once its drain returns).
                self._on_handed(len(batch))
                _settle(self.queue, self.consumer, batch, [], [])
        finally:
            if note:
                self._on_progress(0)

    def handle(self, batch: list[Message]) -> bool:
        """Hand ``batch`` to the callback, one message at a time.

        Returns True if the callback returned for every message: the batch is the caller's to
        settle as handled (``push_done(consumer, batch, [], [])``, or in a ``push_turn``). If a
        callback raised, or the subscription closed mid-batch, or a ``BaseException`` goes up,
        the batch is settled here, and it returns False (or raises).

        The batch's :class:`_BatchRunner` is made only once it is needed, when a callback
        raises or the batch stops early (3,100 of the 38,000 instructions of a one-message
        step, callgrind).
        """
        consumer = self.consumer
        callback = self.callback
        rest = iter(batch)
        runner: _BatchRunner | None = None
        handled = False
        stopped = False  # the subscription closed with the message in hand not handed over
        message = None
        self.running_on = _get_ident()  # once per batch
        try:
            # The try is outside the loop, entered again after a failure: a handler set up around
            # each call costs every message of every push subscription a little.
            while True:
                try:
                    for message in rest:
                        if consumer.closed:  # read without the lock: a hint between callbacks, re-checked per batch
                            stopped = True
                            break
                        callback(message)
                    else:
                        handled = True
                    break
                except Exception as error:  # noqa: BLE001  # a failed delivery: failed() logs it, the batch goes on
                    assert message is not None
                    if runner is None:
                        runner = _BatchRunner(self.queue, consumer, batch, rest)
                    runner.failed(message, error)
        finally:
            self.running_on = None
            if runner is not None or not handled:
                if runner is None:
                    runner = _BatchRunner(self.queue, consumer, batch, rest)
                if handled:
                    runner.all_handled()
                    self._on_handed(len(batch))  # before the settle, as in _deliver
                else:  # up to the message in hand: a callback's BaseException handed it over
                    self._on_handed(_index(batch, message) + (0 if stopped else 1))
                runner.settle()
        return runner is None

    def resume(
        self, batch: list[Message], rest: Iterator[Message], message: Message | None, error: BaseException | None
    ) -> None:
        """Finish ``batch``, whose delivery a dispatcher began itself (as :meth:`handle` would),
        and settle it: the callback raised ``error`` on ``message``, or (``error`` None) the
        subscription closed with ``message`` taken from ``rest`` but not handed over.

        An ``Exception`` is a failed delivery, and the rest of the batch goes on. A
        ``BaseException`` that is not one gives back the message in hand and the rest, and
        is raised again. :attr:`running_on` must be this thread's ident, and is cleared.
        """
        consumer = self.consumer
        callback = self.callback
        runner = _BatchRunner(self.queue, consumer, batch, rest)
        try:
            if error is None:
                return  # closed: the runner gives back the message in hand and the rest
            if not isinstance(error, Exception):
                raise error
            runner.failed(message, error)  # type: ignore[arg-type]  # the callback raised on it
            for message in runner:
                if consumer.closed:  # as in handle
                    break
                try:
                    callback(message)
                except Exception as failure:  # noqa: BLE001  # a failed delivery: failed() logs it
                    runner.failed(message, failure)
            else:
                runner.all_handled()
        finally:
            self.running_on = None
            runner.settle()

    def run(self) -> None:
        """Deliver until the subscription closes (the body of a dispatcher thread)."""
        try:
            while self.step(block=True) is not None:
                pass
        except BaseException:  # a callback's KeyboardInterrupt or SystemExit, or a bug in mqlite: say so
            _log.exception("push worker for %s stopped; its subscription gets no more callbacks", self.consumer._label)
            raise


class AsyncPushWorker:
    """Delivers one push subscription's messages to a coroutine callback, as a task on its loop.

    Calls go one at a time and in order; acks and retries apply when each coroutine finishes.
    The task waits for messages without a thread. Cancelling it (when the broker closes, or the
    loop shuts down) hands back the message being handled and the rest of its batch for
    redelivery. Thread-safe: :meth:`start` and :meth:`cancel` may be called from any thread.
    """

    def __init__(
        self,
        queue: QueueEngine,
        consumer: Consumer,
        callback: Callable[[Message], Awaitable[object]],
        on_progress: Callable[[int], None],
        on_handed: Callable[[int], None],
        loop: asyncio.AbstractEventLoop,
        off_loop: OffLoop[Any] | None = None,
    ) -> None:
        self.queue = queue
        # How engine steps run: inline, or in the broker's I/O thread for an engine with blocking I/O.
        self._off_loop = off_loop
        self.consumer = consumer
        self.callback = callback
        self._on_progress = on_progress
        self._on_handed = on_handed
        self.loop = loop
        # Set once, on the loop's thread; read from others only after `finished` or through the loop.
        self.task: asyncio.Task[None] | None = None
        self.finished = threading.Event()
        """Set when the task has ended (or will never start): nothing of its batch is left in hand."""

    def start(self) -> None:
        """Create the task on the worker's loop, from that loop's thread or any other."""
        if self._on_loop_thread():
            self._spawn()
            return
        try:
            self.loop.call_soon_threadsafe(self._spawn)
        except RuntimeError:
            self.finished.set()  # the loop is closed: the task will never start, nothing is in hand
            raise

    def cancel(self) -> None:
        """Cancel the task from any thread: a callback that is running gets CancelledError."""
        if self._on_loop_thread():
            self._cancel()
            return
        try:
            self.loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:
            pass  # the loop is closed: its tasks will never run again

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def _spawn(self) -> None:
        if self.consumer.closed:
            self.finished.set()  # closed before the task could start: nothing to deliver
            return
        self.task = self.loop.create_task(self.run(), name=f"mqlite-push-{self.consumer._label}")
        self.task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self.finished.set()  # also when it was cancelled before it ever ran, so run()'s finally did not
        # Log as a push thread does. Retrieving the exception also spares the loop's "Task exception
        # was never retrieved" when the task is collected: the exception has gone up the loop.
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error(
                "push task for %s stopped; its subscription gets no more callbacks",
                self.consumer._label,
                exc_info=error,
            )

    def _cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        """Deliver until the subscription closes."""
        queue = self.queue
        consumer = self.consumer
        callback = self.callback
        off_loop = self._off_loop
        run = None if off_loop is None else functools.partial(run_off_loop, off_loop, keep=self._give_back_taken)
        try:
            while True:
                take = functools.partial(queue.try_push, consumer, PUSH_BATCH)
                batch = take() if run is None else await run(take)
                if batch is not None and not batch:
                    batch = (
                        await await_(
                            lambda wake: queue.push_or_wait(consumer, PUSH_BATCH, wake), queue.remove_waiter, None, run
                        )
                    ).value
                if batch is None:
                    return
                runner = _BatchRunner(queue, consumer, batch)
                handed = 0
                try:
                    for message in runner:
                        if consumer.closed:
                            break
                        handed += 1
                        try:
                            await callback(message)
                        except Exception as error:  # noqa: BLE001  # a failed delivery: failed() logs it, the batch goes on
                            runner.failed(message, error)
                    else:
                        runner.all_handled()
                finally:
                    self._on_handed(handed)  # before the settle: a drain that finds it settled finds it counted
                    if off_loop is None:
                        runner.settle()
                    else:  # shielded: a second cancellation cannot stop the settlement half-way
                        await asyncio.shield(off_loop(runner.settle))
                    self._on_progress(0)
        finally:
            self.finished.set()

    def _give_back_taken(self, result: object, on_loop: bool) -> None:
        """What a take that ran for a cancelled task got goes back, unprocessed (never lost)."""
        if isinstance(result, Attempt):
            self.queue.remove_waiter(result.waiter)
            result = result.value
        if isinstance(result, list) and result:
            self.queue.push_done(self.consumer, result, [], result)


def stop_async_workers(workers: list[AsyncPushWorker], deadline: float) -> bool:
    """Wait until ``deadline`` (``time.monotonic()``) for workers to end, then cancel the rest.

    Blocks the calling thread, so it skips the workers of a loop running on this thread: they
    could not move while it waits (they end by themselves once their loop runs again). Their
    subscriptions must be closed already. True if every worker waited for ended.
    """
    waited = [w for w in workers if not w._on_loop_thread() and w.loop.is_running()]
    for worker in waited:
        worker.finished.wait(max(deadline - time.monotonic(), 0.0))
    late = [w for w in waited if not w.finished.is_set()]
    for worker in late:
        worker.cancel()
    grace = time.monotonic() + CANCEL_GRACE
    for worker in late:
        worker.finished.wait(max(grace - time.monotonic(), 0.0))
    return all(w.finished.is_set() for w in waited)


async def astop_async_workers(workers: list[AsyncPushWorker], deadline: float) -> bool:
    """:func:`stop_async_workers` for workers of the running loop, awaiting them instead of blocking.

    Skips the task it runs in (a coroutine callback that closes its own broker): it finishes
    after the close, like a push thread whose callback calls ``close()``.
    """
    current = asyncio.current_task()
    tasks = [w.task for w in workers if w.task is not None and w.task is not current and not w.task.done()]
    if not tasks:
        return True
    _, late = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
    if not late:
        return True
    for task in late:
        task.cancel()
    _, late = await asyncio.wait(late, timeout=CANCEL_GRACE)
    return not late


class Dispatcher(Protocol):
    """Runs push workers. Replace it to choose which thread delivers."""

    def start(self, worker: PushWorker) -> None:
        """Begin delivering for ``worker``'s subscription."""

    def run_ready(self) -> bool:
        """Deliver what is ready on the calling thread, if this dispatcher does that.

        Returns whether anything was delivered. ``Broker.drain`` calls it while it waits.
        """

    def close(self, timeout: float) -> bool:
        """Stop every worker (their subscriptions are already closed); True if all stopped in time."""


STALL = 0.05
"""Seconds a shared delivery thread may spend on one subscription's batch while another
subscription has messages waiting, before a second thread takes those over (see
:class:`ThreadDispatcher`). Long beside a batch of ordinary callbacks (1,024 trivial ones take
0.2-0.4 ms here), short beside what a user would call held up."""


class _Runner:
    """One thread of a :class:`ThreadDispatcher`'s pool.

    Every field but ``thread`` is guarded by the dispatcher's ``_lock``. ``signal`` is held while
    the runner has not been signalled: releasing it wakes the runner from its sleep.
    """

    __slots__ = ("generation", "nudged", "roused", "signal", "signalled", "since", "thread", "until")

    def __init__(self, generation: int) -> None:
        self.generation = generation  # the dispatcher's generation it serves; close() ends it
        self.signal = threading.Lock()
        self.signal.acquire()
        self.signalled = False  # signal was released and the runner has not yet taken it
        self.roused = False  # a wake took it off the sleepers to deliver: counted awake
        self.nudged = False  # told to look again at how long to sleep; still a sleeper
        self.since: float | None = None  # when its current step began (time.monotonic()); None between steps
        self.until: float | None = None  # when its current sleep ends by itself; None: only when signalled
        self.thread: threading.Thread | None = None


class _PoolSlot:
    """One worker of a :class:`ThreadDispatcher`, with what says it may have work.

    Every field but ``worker`` is guarded by the dispatcher's ``_lock``: ``queued`` (in the
    ready line), ``running`` (a runner is stepping it), ``again`` (it came up in the line while
    it was running: step it again after), ``waiter`` (registered with its queue, not yet woken),
    ``due`` (when a timer of the subscription falls due, ``time.monotonic()`` seconds), ``live``.
    """

    __slots__ = ("_dispatcher", "again", "due", "live", "queued", "running", "waiter", "worker")

    def __init__(self, dispatcher: ThreadDispatcher, worker: PushWorker) -> None:
        self._dispatcher = dispatcher
        self.worker = worker
        self.queued = False
        self.running = False
        self.again = False
        self.waiter: Waiter | None = None
        self.due: float | None = None
        self.live = True

    def wake(self) -> None:
        """The queue says the worker may have work: queue it, and wake a runner if none is awake.

        The engine calls it from any thread, under the queue's lock: it takes only the
        dispatcher's lock, the innermost, and under it only releases a sleeping runner's signal.
        This is the coalescing: while a runner is awake, a publish costs the runners nothing,
        and a worker already in the line is not queued twice. (It runs inside a publish, so the
        lock is taken as :meth:`_Group.wake` takes it, without ``with``.)
        """
        dispatcher = self._dispatcher
        lock = dispatcher._lock
        lock.acquire()
        try:
            self.waiter = None  # whoever wakes a waiter removes it: the slot's one waiter is gone
            self.due = None
            if self.live and not self.queued:
                self.queued = True
                dispatcher._ready.append(self)
                if not dispatcher._awake:
                    dispatcher._rouse_locked()
        finally:
            lock.release()


def _note_all(owed: dict[Callable[[int], None], None]) -> None:
    """Call each progress note owed for settled batches, once, and forget them."""
    notes = list(owed)
    owed.clear()
    for note in notes:
        note(0)


def _retire(entry: _PoolSlot | _Group, ready: collections.deque[Any]) -> None:
    """Step ``entry`` no more: not live, no waiter or timer kept, out of the ``ready`` line.
    Called under the lock of the dispatcher that guards those (its ``_lock`` or ``_ready_lock``)."""
    entry.live = False
    entry.waiter = None
    entry.due = None
    if entry.queued:
        entry.queued = False
        ready.remove(entry)


def _queue_due(slots: Iterable[_PoolSlot | _Group], ready: collections.deque[Any], next_due: float) -> float | None:
    """Put in ``ready`` the live ``slots`` whose timer is due (if ``next_due`` has come); returns
    when the next timer falls due. Called under the dispatcher's lock, which guards the slots."""
    now = time.monotonic()
    if now < next_due:
        return next_due
    soonest: float | None = None
    for slot in slots:
        due = slot.due
        if due is None or not slot.live:
            continue
        if due <= now:
            slot.due = None
            if not slot.queued:
                slot.queued = True
                ready.append(slot)
        elif soonest is None or due < soonest:
            soonest = due
    return soonest


class ThreadDispatcher:
    """A small pool of daemon threads shared by the push subscriptions it runs. Thread-safe.

    One thread delivers while the others sleep: a publish wakes a thread only when none is
    awake, so a steady publisher costs a context switch now and then, not one per subscription
    per batch. The awake thread steps every subscription that has work, one batch each in
    turn (at most ``PUSH_BATCH`` messages), so each subscription's callbacks still run one at a
    time and in order.

    A slow callback holds up nobody for long. While a thread is in a batch, a second one
    sleeps with a timeout of :data:`STALL` seconds; if it wakes to find another subscription
    waiting and every awake thread still in the batch it began more than ``STALL`` ago, it
    delivers the waiting ones itself, and a new thread takes its place as the watcher. A
    callback that blocks for good keeps only its own thread. Threads beyond two leave once
    there is nothing to do, so the pool holds at most one thread per stuck callback plus two.

    Workers of a queue on an autojumping ``VirtualClock`` get a thread each, as before: their
    waits tell the clock when they block, which a pooled sleep does not.
    """

    def __init__(self) -> None:
        # _lock guards everything below and every field of each _Runner and _PoolSlot. It is the
        # innermost lock: a queue calls _PoolSlot.wake with its own lock held, so nothing but
        # bookkeeping and releasing a runner's signal runs under it.
        self._lock = threading.Lock()
        self._ready: collections.deque[_PoolSlot] = collections.deque()  # in the order they became ready
        self._slots: list[_PoolSlot] = []  # the live slots, in start order
        self._next_due: float | None = None  # no slot's timer falls due before it; None: none has one
        self._runners: list[_Runner] = []  # every runner of this generation
        self._sleepers: list[_Runner] = []  # the sleeping ones, in the order they fell asleep
        self._awake = 0  # runners not asleep: stepping, or about to look at the line
        self._generation = 0  # close() moves it on: runners of an older one leave
        self._threads: list[threading.Thread] = []  # every runner's thread not known to have ended: close() joins them
        self._own: list[threading.Thread] = []  # the threads of workers on an autojumping clock
        self._names = itertools.count(1)

    # -- starting ---------------------------------------------------------------------------

    def start(self, worker: PushWorker) -> None:
        """Deliver for ``worker`` on the pool (on a thread of its own under an autojumping clock)."""
        if jumping_clock(worker.queue) is not None:
            thread = threading.Thread(target=worker.run, name=f"mqlite-push-{worker.consumer._label}", daemon=True)
            with self._lock:
                self._own = [t for t in self._own if t.ident is None or t.is_alive()]  # not started yet, or running
                self._own.append(thread)
            thread.start()
            return
        slot = _PoolSlot(self, worker)
        with self._lock:
            self._slots.append(slot)
            new = [self._new_runner_locked() for _ in range(self._wanted_locked() - len(self._runners))]
        try:
            self._start_runners(new)
        except BaseException:
            with self._lock:
                self._forget_locked(slot)
            raise
        slot.wake()  # a new subscription may start with messages to deliver

    def _wanted_locked(self) -> int:
        """How many runners to keep: one, or two once there are two subscriptions to isolate."""
        return 1 if len(self._slots) < 2 else 2

    def _new_runner_locked(self) -> _Runner:
        """A runner, counted awake (it looks at the line first); its thread is not started yet."""
        runner = _Runner(self._generation)
        runner.thread = threading.Thread(
            target=self._run, args=(runner,), name=f"mqlite-push-pool-{next(self._names)}", daemon=True
        )
        self._runners.append(runner)
        self._threads = [t for t in self._threads if t.ident is None or t.is_alive()]
        self._threads.append(runner.thread)
        self._awake += 1
        return runner

    def _start_runners(self, runners: list[_Runner]) -> None:
        """Start the threads of ``runners`` (with no lock held: a start waits for the thread)."""
        for index, runner in enumerate(runners):
            assert runner.thread is not None
            try:
                runner.thread.start()
            except BaseException:
                with self._lock:
                    for unstarted in runners[index:]:
                        self._leave_locked(unstarted)
                raise

    def run_ready(self) -> bool:
        """Threads deliver on their own; nothing to do on the caller's thread."""
        return False

    # -- the runners ------------------------------------------------------------------------

    def _run(self, me: _Runner) -> None:
        """The body of a pool thread: step what is ready; sleep when nothing is; leave on close."""
        lock = self._lock
        slot: _PoolSlot | None = None
        attempt: Attempt[list[Message] | None] | None = None
        # Drains are told of settled batches once a round (a batch of every live subscription)
        # and before sleeping, not after every batch: at N = 100 a drain would otherwise wake,
        # and take the GIL from this thread, for each of 100 batches of one round.
        owed: dict[Callable[[int], None], None] = {}  # each note owed (the workers counted what they handed)
        unnoted = 0
        round_size = 1
        try:
            while True:
                stale = None
                timeout: float | None = None
                with lock:
                    if slot is not None:
                        assert attempt is not None
                        self._record_locked(slot, attempt)
                        slot = attempt = None
                    me.since = None
                    if me.generation != self._generation:
                        self._leave_locked(me)
                        return
                    if self._next_due is not None:
                        self._queue_due_locked()
                    slot = self._pop_locked()
                    if slot is not None:
                        slot.running = True
                        stale = slot.waiter  # queued by its timer: its waiter was not woken
                        slot.waiter = None
                        slot.due = None
                        me.since = time.monotonic()
                        round_size = len(self._slots)
                    elif self._sleepers and len(self._runners) > self._wanted_locked():
                        self._leave_locked(me)  # a spare that a stall called up: no longer needed
                        return
                    else:
                        self._sleepers.append(me)
                        self._awake -= 1
                        timeout = self._sleep_bound_locked(me)
                if owed and (slot is None or unnoted >= round_size):
                    unnoted = 0
                    _note_all(owed)
                if slot is not None:
                    if stale is not None:
                        slot.worker.queue.remove_waiter(stale)  # a no-op if it was woken meanwhile
                    attempt = slot.worker.step_or_watch(slot.wake, False)
                    if attempt.value:
                        owed[slot.worker.on_progress] = None
                        unnoted += 1
                    continue
                self._sleep(me, timeout)
        except BaseException:  # a callback's SystemExit or a bug: logged, a spare started, re-raised
            with lock:
                if slot is not None and attempt is None:  # the step raised: that worker stopped
                    slot.running = False
                    self._forget_locked(slot)
                    owed[slot.worker.on_progress] = None  # it settled what it could before raising
                self._leave_locked(me)
                short = self._slots and len(self._runners) < self._wanted_locked()
                spare = [self._new_runner_locked()] if short else []
            if slot is not None:
                _log.exception(
                    "push worker for %s stopped; its subscription gets no more callbacks", slot.worker.consumer._label
                )
            else:
                _log.exception("a push delivery thread stopped")
            try:
                _note_all(owed)
                self._start_runners(spare)  # the other subscriptions keep a thread
            except Exception:  # noqa: BLE001  # this thread is ending anyway: say so, raise what stopped it
                _log.exception("could not start a push delivery thread in place of one that stopped")
            raise
        finally:
            _note_all(owed)

    def _sleep(self, me: _Runner, timeout: float | None) -> None:
        """Sleep until a wake hands this runner work, or a stall or a due timer needs it."""
        lock = self._lock
        spawn = False
        while True:
            got = me.signal.acquire(True, -1 if timeout is None else capped(timeout))
            with lock:
                if me.signalled:
                    me.signalled = False
                    if not got:
                        me.signal.acquire(False)  # released just after the timeout: take it now
                me.nudged = False
                if me.roused:  # the rouser took it off the sleepers and counted it awake
                    me.roused = False
                    return
                if me.generation != self._generation or self._should_join_locked(me):
                    if me in self._sleepers:
                        self._sleepers.remove(me)
                    self._awake += 1
                    spawn = self._after_join_locked()
                    break
                timeout = self._sleep_bound_locked(me)
        if spawn:
            with lock:
                new = [self._new_runner_locked()] if me.generation == self._generation else []
            try:
                self._start_runners(new)
            except Exception:  # noqa: BLE001  # out of threads: deliver on, unwatched, rather than stop
                _log.exception("could not start a push delivery thread to watch for slow callbacks")

    def _should_join_locked(self, me: _Runner) -> bool:
        """Woken by its timeout or a nudge: whether this sleeper should deliver now.

        Yes if a timer came due or something waits, and no runner is awake to take it, or
        every awake runner has been in its batch for :data:`STALL` seconds or more.
        """
        if self._next_due is not None:
            self._queue_due_locked()
        if not any(not slot.running for slot in self._ready):
            return False
        if not self._awake:
            return True
        now = time.monotonic()
        for runner in self._runners:
            if runner is me or runner in self._sleepers:
                continue
            since = runner.since
            if since is None or now - since < STALL:
                return False  # between batches, or in a short one: it will get there
        return True

    def _after_join_locked(self) -> bool:
        """A sleeper got up to deliver: whether a new runner must be started to watch."""
        sleepers = self._sleepers
        if not sleepers:
            return len(self._slots) > 1
        self._nudge_locked(sleepers[0])  # the next in line watches now
        return False

    def _sleep_bound_locked(self, me: _Runner) -> float | None:
        """How long ``me``, a sleeper, sleeps unless signalled; sets its ``until``.

        The first sleeper watches: it wakes after :data:`STALL` while a runner is awake (and
        there is another subscription it could be holding up), and when a timer falls due.
        The others sleep until signalled.
        """
        bound = None
        if self._sleepers[0] is me:
            if self._awake and len(self._slots) > 1:
                bound = STALL
            if self._next_due is not None:
                until_due = self._next_due - time.monotonic()
                until_due = until_due if until_due > 0.0 else 0.0
                bound = until_due if bound is None or until_due < bound else bound
        me.until = None if bound is None else time.monotonic() + bound
        return bound

    def _nudge_locked(self, runner: _Runner) -> None:
        """Have sleeping ``runner`` work out again how long to sleep (something it watches changed)."""
        if not runner.nudged and not runner.roused:
            runner.nudged = True
            self._signal_locked(runner)

    @staticmethod
    def _signal_locked(runner: _Runner) -> None:
        """Wake sleeping ``runner``, unless a signal it has not taken yet is on its way already."""
        if not runner.signalled:
            runner.signalled = True
            runner.signal.release()

    def _rouse_locked(self) -> None:
        """Wake a sleeping runner to deliver; no runner is awake (called by :meth:`_PoolSlot.wake`)."""
        sleepers = self._sleepers
        if not sleepers:
            return  # no thread at all for now: start() or a failing runner starts one
        runner = sleepers.pop()  # the last to fall asleep: its stack is the warmest
        runner.roused = True
        self._awake += 1
        self._signal_locked(runner)
        if sleepers and len(self._slots) > 1:
            watcher = sleepers[0]
            if watcher.until is None or watcher.until - time.monotonic() > STALL:
                self._nudge_locked(watcher)  # it slept with nobody to watch; now there is

    def _pop_locked(self) -> _PoolSlot | None:
        """The next slot to step; one that another runner is stepping is marked to go again instead."""
        ready = self._ready
        while ready:
            slot = ready.popleft()
            slot.queued = False
            if slot.running:
                slot.again = True
                continue
            return slot
        return None

    def _record_locked(self, slot: _PoolSlot, attempt: Attempt[list[Message] | None]) -> None:
        """What a step of ``slot`` left: a waiter to keep (and maybe a timer), or a step to take again."""
        slot.running = False
        again = slot.again
        slot.again = False
        if not slot.live:
            return
        if attempt.value is None:
            self._forget_locked(slot)  # its subscription closed
            return
        waiter = attempt.waiter
        if waiter is None or again:  # a full batch (there may be more), or woken while it ran
            if not slot.queued:
                slot.queued = True
                self._ready.append(slot)
            return
        if slot.queued:
            return  # woken while its batch ran: that waiter is gone, and it is in the line
        slot.waiter = waiter
        bound = attempt.wait_at_most
        if bound is not None:
            due = time.monotonic() + bound
            slot.due = due
            if self._next_due is None or due < self._next_due:
                self._next_due = due
                sleepers = self._sleepers
                if sleepers and (sleepers[0].until is None or due < sleepers[0].until):
                    self._nudge_locked(sleepers[0])  # it must wake for this timer

    def _queue_due_locked(self) -> None:
        """Queue the slots whose timer is due: a real clock's timers wake nobody."""
        if self._next_due is not None:
            self._next_due = _queue_due(self._slots, self._ready, self._next_due)

    def _forget_locked(self, slot: _PoolSlot) -> None:
        """Its subscription closed (or its worker stopped): step it no more."""
        if slot in self._slots:
            self._slots.remove(slot)
        _retire(slot, self._ready)

    def _leave_locked(self, runner: _Runner) -> None:
        """``runner``, awake, leaves the pool."""
        if runner in self._runners:
            self._runners.remove(runner)
        self._awake -= 1

    # -- closing ----------------------------------------------------------------------------

    def close(self, timeout: float) -> bool:
        """Stop every thread, waiting at most ``timeout`` seconds in all; a callback that runs finishes."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._generation += 1
            self._runners = []
            for runner in self._sleepers:
                runner.roused = True  # it wakes, sees the new generation and leaves
                self._awake += 1
                self._signal_locked(runner)
            self._sleepers.clear()
            for slot in self._slots:
                slot.live = False
                slot.queued = False
                slot.waiter = None
                slot.due = None
            self._slots = []
            self._ready.clear()
            self._next_due = None
            threads = self._threads + self._own
            self._threads = []
            self._own = []
        current = threading.current_thread()
        for thread in threads:
            if thread is not current and thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(t.is_alive() for t in threads if t is not current)


class _Slot:
    """One worker of a :class:`ManualDispatcher`, and its claim: held by the run stepping the worker."""

    __slots__ = ("callback", "claim", "consumer", "worker")

    def __init__(self, worker: PushWorker) -> None:
        self.worker = worker
        self.consumer = worker.consumer
        self.callback = worker.callback
        self.claim = threading.Lock()


class _Group:
    """Workers that a :class:`ManualDispatcher`'s run steps one after another, as one entry of its line.

    Every push subscription of one queue that wants every event, on an engine that takes turns
    (``push_turn``, and ``push_step`` for the plain ones: the memory and SQLite engines), with
    one waiter for them all; or one subscription alone: a filtered one, or one on an engine that
    takes no turns (Redis) or that watches each settlement (``mqlite.testing``'s recorder and
    faults).

    ``slots`` and ``consumers`` (theirs, in the same order) are copy-on-write tuples, replaced
    under the dispatcher's ``_lock`` and read by runs without it. ``queued`` (in the ready line),
    ``waiter`` (registered with the queue and not yet woken), ``due`` (when a timer of one of the
    subscriptions falls due, ``time.monotonic()`` seconds) and ``live`` are guarded by its
    ``_ready_lock``.
    """

    __slots__ = (
        "_dispatcher",
        "consumers",
        "due",
        "live",
        "note",
        "queue",
        "queued",
        "slots",
        "step",
        "turn",
        "waiter",
    )

    def __init__(self, dispatcher: ManualDispatcher, worker: PushWorker, turn: _Turn | None) -> None:
        self._dispatcher = dispatcher
        self.queue = worker.queue
        self.turn = turn
        # The engine's lean turn for plain subscriptions (see DeliveryCore.push_step), if it takes turns.
        self.step: _Step | None = getattr(worker.queue, "push_step", None) if turn is not None else None
        self.note = worker.on_progress  # the same for every worker of a queue: its broker's
        self.slots: tuple[_Slot, ...] = ()
        self.consumers: tuple[Consumer, ...] = ()
        self.queued = False
        self.waiter: Waiter | None = None
        self.due: float | None = None
        self.live = True

    def wake(self) -> None:
        """The queue says a worker of the group may have work: a run steps them.

        The engine calls it from any thread, under the queue's lock: it takes only the
        dispatcher's innermost lock, and calls nothing while it holds it.
        """
        dispatcher = self._dispatcher
        lock = dispatcher._ready_lock
        lock.acquire()
        try:
            # Whoever wakes a waiter removes it: the group's one waiter is gone. (A stale waiter
            # woken as it was being replaced leaves the new one untracked: that one wakes the
            # group once more, for nothing, and is gone too.)
            self.waiter = None
            self.due = None
            if self.live and not self.queued:
                self.queued = True
                dispatcher._ready.append(self)
        finally:
            lock.release()


def _index(batch: list[Message], message: Message | None) -> int:
    """Where ``message`` (the object itself, which a batch holds once) is in ``batch``; -1 for
    None (an interrupt before the first message was taken)."""
    for index, held in enumerate(batch):
        if held is message:
            return index
    return -1


def _after(batch: list[Message], message: Message | None) -> Iterator[Message]:
    """An iterator over the messages of ``batch`` after ``message``, as iterating over the batch
    would have left it: the failure paths of ``ManualDispatcher._round``, which iterates over
    the list itself. For None, the whole batch is still to go."""
    return iter(batch[_index(batch, message) + 1 :])


_Turn = Callable[
    [Consumer | None, list[Message], Consumer | None, int, Callable[[], object] | None, Sequence[Consumer]],
    tuple[bool, list[Message] | None, Waiter | None, float | None],
]
"""An engine's ``push_turn`` (see ``mqlite.engine.delivery.DeliveryCore.push_turn``)."""

_Step = Callable[[Consumer | None, list[Message], Consumer, int], list[Message] | None]
"""An engine's ``push_step`` (see ``mqlite.engine.delivery.DeliveryCore.push_step``)."""

_Round = tuple[int, bool, Waiter | None, float | None]
"""What a round of a group left: how many messages it handed to callbacks, whether a batch was full (step
it again), the waiter registered for it, and when a timer falls due (``time.monotonic()``)."""

_NOTHING: _Round = (0, False, None, None)
"""What a round that stepped nothing left."""


class ManualDispatcher:
    """Runs no threads: callbacks run when the test calls :meth:`run_ready` (or ``Broker.drain``).

    Use it for deterministic tests of push subscriptions. Thread-safe; callbacks run on the thread
    that calls :meth:`run_ready`. Each subscription's callbacks still run one at a time and in
    order: a subscription whose callback is running, on another thread or further up this one
    (a callback that calls ``run_ready``), is skipped until it returns.

    A run steps only the workers that may have work. The push subscriptions of one queue that
    want every event form a group (a filtered one is a group of its own, whose waiter wants only
    its events), stepped one after another in the order they started, which leaves one waiter with
    the queue, registered with the first take; the queue wakes it when something arrives or
    becomes ready for one of them (a publish, a failed callback, a nack, a seek, the clock
    moving). A timer that falls due on a real clock wakes nobody, so a run also steps the groups
    whose timer is due. A run with nothing to do costs one lock section, however many
    subscriptions there are.
    """

    def __init__(self) -> None:
        # _lock guards writes of _groups (in start order, copy-on-write: replaced, never mutated,
        # so a run reads it without the lock), _by_queue (each queue's shared group, of its
        # subscriptions that want every event) and each group's slots and consumers.
        self._lock = threading.Lock()
        self._groups: tuple[_Group, ...] = ()
        self._by_queue: dict[QueueEngine, _Group] = {}
        # _ready_lock guards _ready (the groups to step, in the order they became ready),
        # _next_due (no group's timer falls due before it; None: no group has one) and each
        # group's queued, waiter, due and live. It is the innermost lock: a queue calls
        # _Group.wake with its own lock held, so nothing is called while _ready_lock is held.
        self._ready_lock = threading.Lock()
        self._ready: collections.deque[_Group] = collections.deque()
        self._next_due: float | None = None
        # The groups that runs are stepping now, on this thread or others; also guarded by
        # _ready_lock. A run steps them too, as it begins: a callback that calls run_ready finds
        # the other subscriptions of its own queue not yet stepped, as when each was in the line.
        self._stepping: list[_Group] = []

    def start(self, worker: PushWorker) -> None:
        """Remember ``worker``; it delivers only inside :meth:`run_ready`."""
        turn: _Turn | None = getattr(worker.queue, "push_turn", None)
        # Only the subscriptions that want every event share their queue's group: a round steps
        # every worker of a group, and a filtered one would pay a take (an index read) for each
        # publish that any of them wants. With a group of its own, its waiter wants only its
        # events, so a publish it does not want costs it nothing: the queue neither wakes it nor,
        # in the drain's check, looks at it (100 filtered subscriptions, one of which wants the
        # message: 9 µs a publish and drain; 722 µs in one group, when the check still looked at all).
        shared = turn is not None and worker.consumer._cursor.names is None
        slot = _Slot(worker)
        with self._lock:
            group = self._by_queue.get(worker.queue) if shared else None
            if group is None:
                group = _Group(self, worker, turn)
                self._groups = (*self._groups, group)
                if shared:
                    self._by_queue[worker.queue] = group
            group.slots = (*group.slots, slot)
            group.consumers = (*group.consumers, worker.consumer)
        group.wake()  # a new subscription may start with messages to deliver

    def run_ready(self) -> bool:
        """Deliver everything that is ready, until no worker has anything left.

        Skips the workers that another call is running. Returns whether this call delivered anything.
        """
        # Groups are taken from the line one at a time, so that a run inside a callback (a drain
        # of another broker that shares this dispatcher) steps those this one has not.
        lock = self._ready_lock
        lock.acquire()
        try:
            # The first look only: a timer that leaves nothing to deliver cannot keep a run
            # going, nor can the groups other runs are stepping.
            if self._next_due is not None:
                self._queue_due_locked()
            if self._stepping:
                self._queue_stepping_locked()
            if not self._ready:
                return False  # a run with nothing to do: this one lock section
            group, stale = self._pop_locked()
        finally:
            lock.release()
        did_any = False
        busy: list[_Group] = []
        while True:
            try:
                if stale is not None:
                    group.queue.remove_waiter(stale)  # a no-op if it was woken meanwhile
                left = self._round(group, busy) if group.turn is not None else self._step_alone(group, busy)
            except BaseException:
                with lock:
                    self._stepping.remove(group)
                raise
            if left[0]:
                did_any = True
            lock.acquire()
            try:
                self._stepping.remove(group)
                if group.live:
                    self._record_locked(group, left)
                if not self._ready:
                    break
                group, stale = self._pop_locked()
            finally:
                lock.release()
        if busy:
            # Whoever runs them now steps them again if they have more; the next run steps
            # them too, in case they were claimed by a run that will not look again.
            with lock:
                for group in busy:
                    if group.live and not group.queued:
                        group.queued = True
                        self._ready.append(group)
        return did_any

    def _pop_locked(self) -> tuple[_Group, Waiter | None]:
        """The next group in the line, now being stepped, and its waiter if one is left to remove."""
        group = self._ready.popleft()
        group.queued = False
        self._stepping.append(group)
        stale = group.waiter  # queued by its timer, or by a run that found it busy
        if stale is not None:
            group.waiter = None
        group.due = None
        return group, stale

    def _round(self, group: _Group, busy: list[_Group]) -> _Round:
        """Step each worker of ``group`` once, in turns that settle one batch and take the next.

        A worker is claimed by a non-blocking acquire of its own lock, and its claim is held
        until its batch is settled. It never waits, so a callback that waits for another
        subscription's callback on another thread cannot deadlock: that one is skipped here
        (the group goes back in the line), and runs where it is.
        """
        # A turn settles a batch whose every callback returned and takes the next subscription's
        # in one lock section of the queue. Between the two no user code runs, so nothing a
        # callback can see differs from a take and a settlement of each subscription apart:
        # inside a callback, every other subscription of the queue is as it was, its batch not
        # yet taken. A drain after each publish runs this loop once per push subscription, so
        # it is kept lean: the turns after the first (which registers the group's waiter) go by
        # the engine's push_step while the subscriptions are plain ones (it returns None for
        # one that is not, which then takes a push_turn), and the callbacks are called here, as
        # PushWorker.handle would, not through it (callgrind, "drain 10 push, 1 msg": see
        # docs/benchmarks.md, scenario 14).
        turn = group.turn
        assert turn is not None
        step = group.step
        lean: _Step | None = None  # step, once the first turn has registered the group's waiter
        queue = group.queue
        wake: Callable[[], object] | None = group.wake
        watched = group.consumers
        me = _get_ident()
        message: Message | None = None  # the one in hand, when a callback loop stops early
        held: _Slot | None = None  # a worker whose batch was handled, not yet settled; its claim is held
        held_batch: list[Message] = []
        waiter = None
        due = None
        again = False
        handed = 0  # messages handed to callbacks
        try:
            for slot in group.slots:
                claim = slot.claim
                if not claim.acquire(False):
                    busy.append(group)  # running in another call, or further up this thread
                    continue
                consumer = slot.consumer
                try:
                    try:
                        handled = None if held is None else held.consumer
                        batch = None if lean is None else lean(handled, held_batch, consumer, PUSH_BATCH)
                        turned = None  # a push_turn's result, when the lean step was not one
                        if batch is None:
                            turned = turn(handled, held_batch, consumer, PUSH_BATCH, wake, watched)
                    except Exception:
                        if held is None or not queue.atomic:
                            raise  # it may have settled the batch: settling it again could count twice
                        # Nothing changed: settle it in a step of its own, which retries a write
                        # error for a while, then take as a step of its own would.
                        _settle(queue, held.consumer, held_batch, [], [])
                        turned = turn(None, [], consumer, PUSH_BATCH, wake, watched)
                    finally:
                        if held is not None:
                            held.claim.release()
                            held = None
                    if turned is not None:
                        full, batch, registered, bound = turned
                        if registered is not None:
                            waiter = registered
                            wake = None
                            lean = step
                        if full:
                            again = True  # a full batch: there may be more
                        if bound is not None:
                            when = time.monotonic() + bound
                            if due is None or when < due:
                                due = when
                except BaseException:
                    claim.release()
                    raise
                if not batch:
                    claim.release()
                    if batch is None:  # its subscription closed
                        self._forget(group, slot)
                    continue
                handed += len(batch)
                # PushWorker.handle's loop, until a callback raises or the subscription closes
                # (over the list itself: the iterator that resume needs is made only then).
                worker = slot.worker
                callback = slot.callback
                worker.running_on = me  # drain refuses to run inside it
                try:
                    for message in batch:
                        if consumer.closed:  # read without the lock: a hint between callbacks
                            break
                        callback(message)
                    else:
                        worker.running_on = None
                        held = slot
                        held_batch = batch
                        continue
                except BaseException as error:  # noqa: BLE001  # resume logs an Exception and goes on, or settles and raises
                    try:
                        worker.resume(batch, _after(batch, message), message, error)
                    finally:
                        claim.release()
                    continue
                stop = _index(batch, message)
                handed -= len(batch) - stop  # the message in hand and the rest were not handed
                try:
                    # Closed mid-batch: resume gives back the message in hand and the rest.
                    worker.resume(batch, iter(batch[stop + 1 :]), None, None)
                finally:
                    claim.release()
        finally:
            if held is not None:
                try:
                    try:
                        # A turn that only settles: push_done's work without its frames.
                        turn(held.consumer, held_batch, None, PUSH_BATCH, None, ())
                    except Exception:
                        if not queue.atomic:
                            raise  # it may have settled the batch: settling it again could count twice
                        _settle(queue, held.consumer, held_batch, [], [])  # nothing changed: retry a while
                finally:
                    held.claim.release()
            if handed:
                group.note(handed)  # once a round: every batch of it is settled
        return handed, again, waiter, due

    def _step_alone(self, group: _Group, busy: list[_Group]) -> _Round:
        """Step the one worker of a group whose engine takes no turns, as :meth:`_round` would."""
        slot = group.slots[0]
        claim = slot.claim
        if not claim.acquire(False):
            busy.append(group)
            return _NOTHING
        try:
            attempt = slot.worker.step_or_watch(group.wake, True)
        finally:
            claim.release()
        if attempt.value is None:
            self._forget(group, slot)
            return _NOTHING
        bound = attempt.wait_at_most
        due = None if bound is None else time.monotonic() + bound
        return len(attempt.value), attempt.waiter is None, attempt.waiter, due

    def _record_locked(self, group: _Group, left: _Round) -> None:
        """What a round of ``group`` left: a waiter to keep (and maybe a timer), or a round to make again."""
        _, again, waiter, due = left
        if waiter is not None:
            group.waiter = waiter  # kept even if it was woken meanwhile: removing a woken waiter is a no-op
        if again and not group.queued:
            group.queued = True
            self._ready.append(group)
        if due is not None:
            group.due = due
            if self._next_due is None or due < self._next_due:
                self._next_due = due

    def _queue_due_locked(self) -> None:
        """Queue the groups whose timer is due: a real clock's timers wake nobody."""
        if self._next_due is not None:
            self._next_due = _queue_due(self._groups, self._ready, self._next_due)

    def _queue_stepping_locked(self) -> None:
        """Queue the groups other runs are stepping: those runs may be inside a callback of one
        of their workers, and this run steps the others (the busy ones it skips)."""
        for group in self._stepping:
            if group.live and not group.queued:
                group.queued = True
                self._ready.append(group)

    def _forget(self, group: _Group, slot: _Slot) -> None:
        """The subscription of ``slot`` closed: stop stepping it (and its group, if it was the last)."""
        with self._lock:
            if slot not in group.slots:
                return  # another run forgot it first
            kept = [(s, c) for s, c in zip(group.slots, group.consumers, strict=True) if s is not slot]
            group.slots = tuple(s for s, _ in kept)
            group.consumers = tuple(c for _, c in kept)
            if kept:
                return
            self._groups = tuple(g for g in self._groups if g is not group)
            if self._by_queue.get(group.queue) is group:
                del self._by_queue[group.queue]
        with self._ready_lock:
            _retire(group, self._ready)

    def close(self, timeout: float) -> bool:
        """Forget every worker; there are no threads to stop."""
        with self._lock:
            groups, self._groups = self._groups, ()
            self._by_queue = {}
        with self._ready_lock:
            for group in groups:
                group.live = False
                group.queued = False
                group.waiter = None
                group.due = None
            self._ready.clear()
            self._next_due = None
        return True
