"""Broker: the facade that owns queues, subscriptions, the clock and the push dispatcher."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import attrs

from mqlite._checks import check_broker_arguments, check_path, check_subscribe, close_deadline
from mqlite._delivery.dedup import check_dedup_id
from mqlite._delivery.entries import DeadLetter
from mqlite._draining import Drain, Progress, Unsettled, begin
from mqlite._waiting import capped
from mqlite.clock import Clock, SystemClock
from mqlite.config import Backoff, Overflow, QueueConfig, Retention, Start, dead_letter_queue_name
from mqlite.dispatch import (
    AsyncPushWorker,
    Dispatcher,
    PushWorker,
    ThreadDispatcher,
    astop_async_workers,
    stop_async_workers,
)
from mqlite.engine.base import QueueEngine, StorageEngine
from mqlite.errors import BrokerClosed, InvalidArgument, MqliteError, StorageError, TransactionError
from mqlite.filters import check_event_name, check_name
from mqlite.info import BrokerInfo, PendingMessage, SubscriptionInfo
from mqlite.message import Message, check_header_names
from mqlite.queue import Queue
from mqlite.subscription import Subscription, check_timeout
from mqlite.transaction import Transaction, in_transaction

if TYPE_CHECKING:
    from typing import Self

    from mqlite.engine.codec import Serializer
    from mqlite.engine.sqlite.store import Commit, Synchronous
    from mqlite.testing.faults import Faults

_T = TypeVar("_T")

__all__ = ["DEAD_LETTER_CONFIG", "Broker", "dead_letter_queue_name"]

_log = logging.getLogger("mqlite")
_UNSET: Any = object()

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""The URL schemes ``Broker`` opens on a Redis server (``pip install 'mqlite[redis]'``)."""

DEAD_LETTER_CONFIG = QueueConfig(retention="limits", max_messages=10_000)
"""How a dead-letter queue that the broker creates by itself is configured: it keeps the last
10,000 dead letters whether or not anyone subscribes. Create the queue yourself to choose."""


class Broker:
    """Holds named queues and their subscriptions, in memory or in a file. Thread-safe.

    Every method may be called from any thread. Use it as a context manager (``with``, or
    ``async with`` in asyncio code), or call :meth:`close` / :meth:`aclose`, to stop its push
    threads and tasks (and close its file).

    Args:
        path: None (the default) keeps everything in memory. A file path opens that mqlite file,
            or creates it: queues, messages and durable subscriptions survive restarts and
            crashes (see ``docs/durability.md``). A ``redis://``, ``rediss://`` or ``unix://`` URL
            opens the broker on that Redis server, shared by every process and host that opens
            it (see ``docs/redis.md``; needs ``pip install 'mqlite[redis]'``).
        namespace: For Redis: the prefix of mqlite's keys (default ``"mq"``).
        synchronous: For a file: ``"normal"`` (default) makes every publish and ack survive the
            process being killed once it returns; ``"full"`` also survives power loss, slower.
        commit: For a file: ``"each"`` (default) commits every publish, delivery and ack before
            it returns. ``"batch"`` returns at once and a writer thread commits in the background,
            many writes (from any number of threads) per transaction; :meth:`flush` waits for it.
        serializer: For a file: how payloads, keys and headers are stored. Default
            :class:`~mqlite.JsonSerializer`; :class:`~mqlite.PickleSerializer` is opt-in and
            unsafe for files you did not write.
        clock: Where time comes from (default: the system clock). Pass a
            :class:`~mqlite.ManualClock` in tests to control timeouts and retries.
        dispatcher: What runs push callbacks (default: a :class:`~mqlite.ThreadDispatcher`, a
            small pool of threads shared by this broker's push subscriptions). Pass a
            :class:`~mqlite.ManualDispatcher` in tests to run them when you choose.
        faults: For tests: a :class:`mqlite.testing.Faults` that injects seeded faults
            (duplicates, delays, lost acks, consumer crashes, restarts) into this broker.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        dispatcher: Dispatcher | None = None,
        synchronous: Synchronous = "normal",
        commit: Commit = "each",
        serializer: Serializer | None = None,
        faults: Faults | None = None,
        namespace: str | None = None,
    ) -> None:
        # Every argument is checked before anything opens: a refused broker leaves no file,
        # thread or claim behind.
        path = check_path(path)
        check_broker_arguments(clock, dispatcher, synchronous, commit, serializer)
        if faults is not None:
            _check_faults(faults)
        self._engine = _open_engine(
            path, synchronous=synchronous, commit=commit, serializer=serializer, namespace=namespace
        )
        try:
            if faults is not None:
                faults._attach(self)  # before any queue opens: every engine gets the fault sites
            self._set_up(clock, dispatcher)
        except BaseException:
            # All or nothing: a broker that fails to open leaves no thread, file or claim behind.
            self._engine.close()
            raise

    def _set_up(self, clock: Clock | None, dispatcher: Dispatcher | None) -> None:
        """The rest of ``__init__``, once the engine is open; the engine is closed if it raises."""
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._dispatcher: Dispatcher = dispatcher if dispatcher is not None else ThreadDispatcher()
        # _lock guards _closed, _async_workers, _push_workers and writes of _queues and _engines. Both
        # are copy-on-write: replaced, never mutated, so publish can look a queue up and drain go
        # through the engines without taking the lock.
        self._lock = threading.Lock()
        self._queues: dict[str, Queue] = {}
        self._engines: dict[str, QueueEngine] = {}
        # What a drain looks at: the queues that may have push work left, which they keep up to
        # date themselves (its own lock; lock order: a queue's lock, then its), and the queues
        # whose engine cannot (a shared file, Redis), looked at every time. _unwatched is
        # copy-on-write like _engines, under _lock.
        self._unsettled = Unsettled()
        self._unwatched: tuple[QueueEngine, ...] = ()
        # An engine with blocking I/O runs the steps of async faces in one thread of its own,
        # made on first use; _io_lock guards _io.
        self._io_lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None
        self._closed = False
        # Closing: whether it finished (a close that failed part-way is finished by the next one),
        # and the coroutine workers the finish still has to wait for. Guarded by _lock.
        self._close_done = False
        self._closing_workers: list[AsyncPushWorker] = []
        self._async_workers: list[AsyncPushWorker] = []  # close() stops them; the dispatcher never sees them
        self._push_workers: list[PushWorker] = []  # what the dispatcher runs; drain() looks at them
        self._ids = itertools.count(1)
        # Push workers report every batch here; drains wait for it.
        self._progress = Progress(self._clock)
        self._note_progress = self._progress.note
        self._count_handed = self._progress.hand
        self._clock.add_listener(self._on_clock)
        try:
            for name, config in self._engine.queues():
                self._queue(name, {}, config)
        except BaseException:
            self._clock.remove_listener(self._on_clock)
            raise  # __init__ closes the engine: a damaged file must not stay claimed

    # -- queues and publishing -----------------------------------------------------------

    def queue(
        self,
        name: str,
        *,
        retention: Retention = _UNSET,
        max_messages: int | None = _UNSET,
        max_age: float | None = _UNSET,
        overflow: Overflow = _UNSET,
        dedup_window: float = _UNSET,
        dedup_max_ids: int = _UNSET,
    ) -> Queue:
        """Get the queue called ``name``, creating it if needed.

        Settings that are given configure the queue, new or existing; those left out keep their
        current (or default) values. See :class:`~mqlite.QueueConfig`.
        """
        changes = {
            key: value
            for key, value in (
                ("retention", retention),
                ("max_messages", max_messages),
                ("max_age", max_age),
                ("overflow", overflow),
                ("dedup_window", dedup_window),
                ("dedup_max_ids", dedup_max_ids),
            )
            if value is not _UNSET
        }
        if retention is not _UNSET and retention not in self._engine.capabilities.retentions:
            QueueConfig(retention=retention)  # an unknown value: its own error
            raise InvalidArgument(
                f"retention={changes['retention']!r} is not supported by this broker's storage yet; "
                f"it offers {', '.join(repr(r) for r in self._engine.capabilities.retentions)}"
            )
        return self._queue(name, changes, QueueConfig())

    def _queue(self, name: str, changes: Mapping[str, Any], default: QueueConfig) -> Queue:
        existing = self._queues.get(name) if isinstance(name, str) else None
        if existing is not None and not changes and not self._closed:  # a hint; rechecked under the lock
            return existing
        check_name("queue", name)
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot open queue {name!r}: the broker is closed")
            queue = self._queues.get(name)
            if queue is None:
                config = attrs.evolve(default, **changes)
                engine = self._engine.open_queue(name, config, self._clock, self._send_dead_letters)
                queue = Queue(engine)
                if not engine.watch_settled(self._unsettled):  # before publish can find it
                    self._unwatched = (*self._unwatched, engine)
                self._engines = {**self._engines, name: engine}
                self._queues = {**self._queues, name: queue}
                if not changes or engine.config == config:
                    return queue
                # Shared storage that already held the queue kept its own settings: apply the
                # ones given, as for a queue this broker had open.
            else:
                engine = self._engines[name]
        if changes:
            engine.configure(attrs.evolve(engine.config, **changes))
        return queue

    def publish(
        self,
        queue: str,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Publish to the queue called ``queue`` (created if needed); see :meth:`Queue.publish`."""
        try:
            engine = self._engines[queue]
        except (KeyError, TypeError):
            # A new queue: check the message first, so that a refused publish creates no queue.
            check_name("queue", queue)
            check_event_name(event)
            if headers is not None:
                if not isinstance(headers, Mapping):
                    raise InvalidArgument(
                        f"headers must be a mapping or None, got {type(headers).__name__}: {headers!r}"
                    ) from None
                check_header_names(headers)
            if dedup_id is not None:
                check_dedup_id(dedup_id)
            self.queue(queue)
            engine = self._engines[queue]
        if dedup_id is None:
            return engine.publish(event, payload, key, headers)
        return engine.publish(event, payload, key, headers, dedup_id)

    def transaction(self) -> Transaction:
        """A transaction: ``with broker.transaction() as tx:`` applies the block's ``tx.publish``,
        ``tx.ack`` and ``tx.nack`` calls all or none, on one queue or several.

        Every call checks at once what the plain call checks. The changes are applied when the
        block ends, or forgotten if it raises; in memory no other thread sees half of them, on a
        file they are one SQLite transaction, and on Redis one script. See
        :class:`~mqlite.transaction.Transaction` for what the block may do, and
        ``docs/one-time-delivery.md``.

        Raises:
            TransactionError: (on entering the block) this thread is already inside a transaction,
                or the broker's storage has no transactions (an engine whose capabilities say so).
            BrokerClosed: the broker was closed.
        """
        if not self._engine.capabilities.transactions:
            raise TransactionError(f"this broker's storage ({type(self._engine).__name__}) does not offer transactions")
        return Transaction(self)

    def _check_open(self, verb: str) -> None:
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot {verb}: the broker is closed")

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(
        self,
        queue: str,
        events: str | Iterable[str] | None = None,
        name: str | None = None,
        start: Start | None = None,
        callback: Callable[[Message], object] | Callable[[Message], Awaitable[object]] | None = None,
        ack: Literal["auto", "manual"] = "auto",
        ack_timeout: float | None = None,
        max_deliveries: int | None = None,
        dead_letter: str | None = None,
        backoff: Backoff | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        """Attach a consumer to ``queue``.

        Args:
            queue: The queue to read (created if needed).
            events: None for every event, or an event name, wildcard pattern, or several.
            name: None for an ephemeral subscription that sees what is published while it is
                open. A name makes a durable cursor that keeps its place after close; open
                subscriptions sharing a name compete for its messages.
            start: Where a new cursor starts: ``"latest"``, ``"earliest"``, an offset or a
                datetime. Ignored when the named cursor already exists. None (the default)
                means ``"earliest"`` for a named subscription on a ``retention="workqueue"``
                queue, so that jobs published before the first worker reach it, and
                ``"latest"`` otherwise. Given explicitly, it is obeyed on a work queue too:
                the jobs a new name starts after count as handled by that name.
            callback: Push delivery: called with each message on a dispatcher thread. Without
                it, read with ``get``, ``poll`` or iteration.
            ack: ``"auto"`` settles a message when it is returned (pull) or its callback returns
                (push); ``"manual"`` keeps it pending until ``ack``.
            ack_timeout: With manual acks, seconds (broker clock) after which an unacked
                message is redelivered.
            max_deliveries: After this many failed deliveries a message is dead-lettered.
                None retries forever.
            dead_letter: The queue that receives dead letters; default ``"<queue>.dead-letter"``.
            backoff: Delays between retries of a push callback that raised.
            loop: The event loop a coroutine ``callback`` runs on, and that ``aget``/``apoll``/
                ``async for`` must be used from. Default: the loop running when ``subscribe``
                is called, if any.
        """
        checked_start, settings, loop, is_async = check_subscribe(
            queue, events, name, start, callback, ack, ack_timeout, max_deliveries, dead_letter, backoff, loop
        )
        self.queue(queue)
        target = self._engines[queue]
        if checked_start is None:
            checked_start = "earliest" if name is not None and target.config.retention == "workqueue" else "latest"
        start = checked_start
        off_loop = self._run_off_loop if self._engine.capabilities.blocking_io else None
        sub = Subscription(
            target, ident=next(self._ids), name=name, push=callback is not None, loop=loop, off_loop=off_loop
        )
        target.attach(sub, name, start, settings)
        try:
            if is_async:
                assert loop is not None
                coroutine_function: Any = callback  # checked: a coroutine function
                worker = AsyncPushWorker(
                    target, sub, coroutine_function, self._note_progress, self._count_handed, loop, off_loop
                )
                with self._lock:
                    # A worker whose subscription close() already closed ends by itself; untracked is fine.
                    self._async_workers = [w for w in self._async_workers if not w.finished.is_set()]
                    self._async_workers.append(worker)
                worker.start()
            elif callback is not None:
                push_worker = PushWorker(target, sub, callback, self._note_progress, self._count_handed)
                with self._lock:
                    self._push_workers = [w for w in self._push_workers if not w.consumer.closed]
                    self._push_workers.append(push_worker)
                self._dispatcher.start(push_worker)
        except BaseException:
            sub.close()  # all or nothing: no consumer stays attached with nothing to deliver to it
            raise
        return sub

    def declare_subscription(
        self,
        queue: str,
        name: str,
        events: str | Iterable[str] | None = None,
        start: Start | None = None,
        ack: Literal["auto", "manual"] = "auto",
        ack_timeout: float | None = None,
        max_deliveries: int | None = None,
        dead_letter: str | None = None,
        backoff: Backoff | None = None,
    ) -> SubscriptionInfo:
        """Make sure the durable subscription ``name`` exists, without consuming anything.

        The counterpart of :meth:`delete_subscription`, like declaring a queue in AMQP or
        ``XGROUP CREATE`` in Redis: it creates the named cursor at ``start`` (as :meth:`subscribe`
        would, with the same arguments and defaults) and detaches at once. From then on
        retention keeps, for that name, every matching message published, until a subscription
        with that name reads it. Declaring a name that exists changes nothing but its settings,
        which, as for :meth:`subscribe`, must agree with any subscription attached to it.

        Returns:
            The subscription as :meth:`info` reports it.

        Raises:
            ConfigConflict: subscriptions with that name are attached with other settings.
            InvalidArgument, InvalidName: an argument is wrong; nothing was created.
            BrokerClosed: the broker was closed.
        """
        check_name("subscription", name)
        with self.subscribe(
            queue,
            events,
            name=name,
            start=start,
            ack=ack,
            ack_timeout=ack_timeout,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter,
            backoff=backoff,
        ):
            pass
        for sub in self._engines[queue].snapshot().to_info(queue)[1]:
            if sub.name == name:
                return sub
        raise BrokerClosed(f"subscription {name!r} of {queue!r} was deleted while it was being declared")

    def delete_subscription(self, queue: str, name: str) -> bool:
        """Forget a durable subscription: its position, pending messages and counters.

        Like deleting a Kafka consumer group or ``XGROUP DESTROY`` in Redis. With the default
        retention, messages only it still needed are then dropped. Returns False if there was no
        such subscription.

        Raises:
            ConfigConflict: subscriptions with that name are still attached.
            BrokerClosed: the broker was closed.
        """
        check_name("queue", queue)
        check_name("subscription", name)
        if self.closed:
            raise BrokerClosed(f"cannot delete subscription {name!r} of {queue!r}: the broker is closed")
        target = self._engines.get(queue)
        return target is not None and target.delete_cursor(name)

    def pending_messages(self, queue: str, name: str) -> list[PendingMessage]:
        """The pending messages of the durable subscription ``name`` of ``queue``, attached or not:
        :meth:`Subscription.pending_messages` without subscribing (what ``mqlite pending`` shows).

        Raises:
            InvalidArgument: there is no such queue, or no such durable subscription on it.
            BrokerClosed: the broker was closed.
        """
        check_name("queue", queue)
        check_name("subscription", name)
        if self.closed:
            raise BrokerClosed(f"cannot list the pending messages of {name!r} of {queue!r}: the broker is closed")
        target = self._engines.get(queue)
        if target is None:
            raise InvalidArgument(f"no queue {queue!r}; the queues are {sorted(self._engines)!r}")
        names = sorted(figures.name for figures in target.snapshot().cursors if figures.name is not None)
        if name not in names:
            raise InvalidArgument(f"no subscription {name!r} on {queue!r}; its durable subscriptions are {names!r}")
        return target.pending_messages_of(name)

    def _send_dead_letters(self, dead: list[DeadLetter]) -> list[DeadLetter]:
        """Publish each dead letter to its queue; the ones that were published."""
        sent = []
        for letter in dead:
            message = letter.message
            try:
                self._queue(letter.queue, {}, DEAD_LETTER_CONFIG).publish(
                    message.event, message.payload, message.key, letter.headers
                )
            except MqliteError as error:
                _log.error(
                    "could not dead-letter %s offset %d to %r: %s", message.queue, message.offset, letter.queue, error
                )
            else:
                sent.append(letter)
        return sent

    # -- progress and draining -----------------------------------------------------------

    def _on_clock(self) -> None:
        for engine in list(self._engines.values()):
            engine.wake_all()
        self._note_progress()

    def _idle_report(self, push_only: bool = False) -> tuple[bool, float | None]:
        """Whether a push batch is in flight, and this broker's earliest timer (clock seconds).

        Pulled by an autojumping ``mqlite.testing.VirtualClock`` (which finds it through the
        listener this broker registered) and by ``run_until_idle``; never on a hot path.
        """
        inflight = False
        due: float | None = None
        # Push work and push timers are only where the queues said they may be (the busy and
        # the timed ones, and those whose engine cannot say); the autojumping clock asks all.
        engines = [*self._unsettled.busy_or_timed(), *self._unwatched] if push_only else list(self._engines.values())
        for engine in engines:
            report = getattr(engine, "next_due", None)  # engines outside engine/core.py may have none
            if report is None:
                continue
            busy, when = report(push_only=push_only)
            inflight = inflight or busy
            if when is not None and (due is None or when < due):
                due = when
        return inflight, due

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every push subscription has handled everything published before the call.

        "Handled" means its callback returned for each matching message, or the message was
        dead-lettered. Returns False if the broker is (or becomes) closed, since a closed
        broker's subscriptions handle nothing more, or if ``timeout`` seconds pass first. When
        the time runs out, drain looks once more: if everything was handled by the deadline,
        even with nothing to wake it, it returns True. Every look first runs what a
        :class:`~mqlite.ManualDispatcher` has ready, on the calling thread.
        """
        drain = self._begin_drain(timeout)
        if drain is None:
            return True
        done = drain.check()
        while done is None:
            self._progress.wait(drain.seen, drain.deadline)
            done = drain.look()
        return done

    async def adrain(self, timeout: float | None = None) -> bool:
        """:meth:`drain` for asyncio code: the same looks, waiting without blocking the event loop."""
        drain = self._begin_drain(timeout)
        if drain is None:
            return True
        done = drain.check()
        while done is None:
            await self._progress.await_(drain.seen, drain.deadline)
            done = drain.look()
        return done

    def _begin_drain(self, timeout: object) -> Drain | None:
        """Check drain's timeout and run its first look (see :func:`mqlite._draining.begin`)."""
        return begin(
            self._dispatcher.run_ready,
            self._progress,
            self._unsettled,
            self._unwatched,
            check_timeout(timeout),
            self._running_own_callback,
            self._engines,
        )

    def _running_own_callback(self) -> str | None:
        """The label of the push subscription of this broker whose callback the caller is in, if any."""
        me = threading.get_ident()
        with self._lock:
            push_workers = list(self._push_workers)
        for push_worker in push_workers:
            if push_worker.running_on == me:
                return push_worker.consumer._label
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return None  # no loop runs on this thread, so no coroutine callback either
        if task is None:
            return None
        with self._lock:
            workers = [*self._async_workers, *self._closing_workers]
        return next((w.consumer._label for w in workers if w.task is task), None)

    # -- introspection -------------------------------------------------------------------

    def info(self) -> BrokerInfo:
        """A frozen snapshot of every queue and subscription.

        On storage that other brokers share, it lists the queues they created too, and the
        positions, lag and pending counts are the storage's; the counters count this broker's work.
        """
        if self._engine.capabilities.shared:
            self._open_new_queues()
        queues = []
        subs: list[SubscriptionInfo] = []
        for name, engine in list(self._engines.items()):
            queue_info, sub_infos = engine.snapshot().to_info(name)
            queues.append(queue_info)
            subs.extend(sub_infos)
        return BrokerInfo(queues=tuple(queues), subscriptions=tuple(subs))

    def _open_new_queues(self) -> None:
        """Open the queues that other brokers sharing the storage created since this one opened."""
        if self.closed:
            return  # a closed broker reports what it had
        try:
            for name, config in self._engine.queues():
                if name not in self._engines:
                    self._queue(name, {}, config)
        except MqliteError:
            if not self.closed:
                raise
            # closed meanwhile (its queue refused to open, or its file is shut): report what it had

    async def _run_off_loop(self, step: Callable[[], _T]) -> _T:
        """Run one engine step in this broker's I/O thread (engines with blocking I/O)."""
        with self._io_lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqlite-io")
            io = self._io
        return await asyncio.get_running_loop().run_in_executor(io, step)

    # -- closing -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        with self._lock:
            return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Close every subscription, wake every blocked reader, stop push threads and tasks.

        Waits up to ``timeout`` seconds for running callbacks to finish. A coroutine callback
        still running then is cancelled, and the message it held goes back for redelivery.
        Called on an event loop's own thread, close cannot wait for that loop's coroutine
        callbacks (they finish by themselves when the loop runs again): use :meth:`aclose` or
        ``async with`` there. Idempotent; a close that raised part-way (say, the file could not
        be closed) is finished by calling it again. Afterwards publish and subscribe raise
        :class:`~mqlite.BrokerClosed`.

        Raises:
            InvalidArgument: ``timeout`` is not a non-negative number; nothing was closed.
        """
        deadline = close_deadline(timeout)
        if in_transaction():
            raise TransactionError("cannot close the broker inside a transaction's block; close it after the block")
        workers = self._begin_close()
        if workers is not None:
            self._finish_close(deadline, workers)

    async def aclose(self, timeout: float = 5.0) -> None:
        """:meth:`close` for asyncio code, without blocking the event loop.

        Awaits the coroutine callbacks of the running loop (cancelling those still running after
        ``timeout`` seconds) and does the blocking rest, such as joining push threads and closing
        the file, in a thread. Idempotent.
        """
        deadline = close_deadline(timeout)
        workers = self._begin_close()
        if workers is None:
            return
        loop = asyncio.get_running_loop()
        try:
            if not await astop_async_workers([w for w in workers if w.loop is loop], deadline):
                _log.warning("some coroutine callbacks ignored their cancellation by aclose()")
        finally:
            # Shielded: an aclose that is itself cancelled still finishes closing, in its thread.
            others = [w for w in workers if w.loop is not loop]
            await asyncio.shield(asyncio.to_thread(self._finish_close, deadline, others))

    def _begin_close(self) -> list[AsyncPushWorker] | None:
        """Refuse new work and close every subscription: waiting push tasks and threads wake and end.

        Returns the coroutine workers to wait for, or None if the broker was already closed.
        """
        with self._lock:
            if self._closed:
                # Already closed, unless a close failed part-way: then this one finishes it.
                return None if self._close_done else list(self._closing_workers)
            self._closed = True
            engines = list(self._engines.values())
            workers, self._async_workers = self._async_workers, []
            self._closing_workers = workers
        members = [member for engine in engines for member in engine.close()]
        for member in members:
            try:
                member.close()
            except StorageError as error:
                # The file could not take the detach (damaged, say): closing goes on, and closing
                # the file hands back whatever this broker held.
                _log.warning("closing subscription %s could not write to the file: %s", member._label, error)
        return workers

    def _finish_close(self, deadline: float, workers: list[AsyncPushWorker]) -> None:
        """Wait until ``deadline`` for push threads and ``workers``, then release the clock and the file."""
        if not self._dispatcher.close(max(deadline - time.monotonic(), 0.0)):
            _log.warning("some push callbacks were still running when close() timed out")
        if not stop_async_workers(workers, deadline):
            _log.warning("some coroutine callbacks ignored their cancellation by close()")
        self._clock.remove_listener(self._on_clock)
        with self._io_lock:
            io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=True)  # each step it runs is bounded
        self._engine.close()
        with self._lock:
            self._close_done = True
            self._closing_workers = []
        self._progress.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every publish, delivery and ack made before the call is committed to the file.

        Only a file-backed broker with ``commit="batch"`` ever has to wait; otherwise returns True
        at once. Returns False if ``timeout`` seconds passed first.

        Raises:
            StorageError: the background writer failed (for example, the disk is full).
        """
        timeout = check_timeout(timeout)
        return self._engine.flush(None if timeout is None else capped(timeout))

    @property
    def path(self) -> str | None:
        """The file this broker keeps its state in, or None for an in-memory broker."""
        return self._engine.path

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        where = "" if self._engine.path is None else f" {self._engine.path!r}"
        return f"<mqlite.Broker{where} {state} queues={sorted(self._queues)!r}>"


def _check_faults(faults: object) -> None:
    """Refuse a ``faults=`` that is not a :class:`mqlite.testing.Faults`."""
    from mqlite.testing.faults import Faults  # only a broker with faults loads the testing package

    if not isinstance(faults, Faults):
        raise InvalidArgument(f"faults must be a mqlite.testing.Faults or None, got {faults!r}")


def _open_engine(
    path: str | None,
    *,
    synchronous: Synchronous,
    commit: Commit,
    serializer: Serializer | None,
    namespace: str | None = None,
) -> StorageEngine:
    """The engine for ``path``: memory for None, a Redis server for a Redis URL, else the SQLite file.

    The broker is a face: it knows engines only through :mod:`mqlite.engine.base`, and imports a
    concrete one only when it opens one.
    """
    if namespace is not None and (path is None or not path.startswith(REDIS_SCHEMES)):
        raise InvalidArgument(f"namespace= is only for redis://, rediss:// and unix:// URLs, got path={path!r}")
    if path is None:
        from mqlite.engine.memory import MemoryEngine

        return MemoryEngine()
    if path.startswith(REDIS_SCHEMES):
        if commit != "each" or synchronous != "normal":
            raise InvalidArgument(
                "synchronous= and commit= are for files; a Redis server's durability is its appendfsync setting"
            )
        try:
            from mqlite.engine.redis.engine import RedisEngine
        except ImportError as error:
            raise InvalidArgument(f"{path!r} needs redis-py: pip install 'mqlite[redis]' ({error})") from None
        return RedisEngine(path, namespace="mq" if namespace is None else namespace, serializer=serializer)
    from mqlite.engine.sqlite.engine import SqliteEngine

    return SqliteEngine(path, synchronous=synchronous, commit=commit, serializer=serializer)
