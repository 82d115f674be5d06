"""Broker: the facade that owns queues, subscriptions, the clock and the push dispatcher."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import attrs

from mqlite.aio import loop_waker
from mqlite.clock import Clock, SystemClock
from mqlite.cursor import Backoff, Cursor
from mqlite.dispatch import AsyncPushWorker, Dispatcher, PushWorker, ThreadDispatcher
from mqlite.engine.codec import Serializer
from mqlite.engine.sqlite.store import Commit, SqliteStore, Synchronous
from mqlite.errors import BrokerClosed, InvalidArgument, MqliteError
from mqlite.filters import EventFilter, check_name
from mqlite.info import BrokerInfo, QueueInfo, SubscriptionInfo
from mqlite.message import Message
from mqlite.queue import DeadLetter, Overflow, Queue, QueueConfig, Retention, Start
from mqlite.subscription import Subscription, check_timeout

if TYPE_CHECKING:
    from typing import Self

__all__ = ["DEAD_LETTER_CONFIG", "Broker", "dead_letter_queue_name"]

_log = logging.getLogger("mqlite")
_UNSET: Any = object()

DEAD_LETTER_CONFIG = QueueConfig(retention="limits", max_messages=10_000)
"""How a dead-letter queue that the broker creates by itself is configured: it keeps the last
10,000 dead letters whether or not anyone subscribes. Create the queue yourself to choose."""


def dead_letter_queue_name(queue: str) -> str:
    """The default dead-letter queue of ``queue``: ``"<queue>.dead-letter"``."""
    return f"{queue}.dead-letter"


class Broker:
    """Holds named queues and their subscriptions, in memory or in a file. Thread-safe.

    Every method may be called from any thread. Use it as a context manager, or call
    :meth:`close`, to stop its push threads (and close its file).

    Args:
        path: None (the default) keeps everything in memory. A file path opens that mqlite file,
            or creates it: queues, messages and durable subscriptions survive restarts and
            crashes (see ``docs/durability.md``).
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
        dispatcher: What runs push callbacks (default: one thread per push subscription). Pass a
            :class:`~mqlite.ManualDispatcher` in tests to run them when you choose.
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
    ) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument(f"path must be None (in memory) or a file path, got {path!r}")
        self._store = (
            None if path is None else SqliteStore(path, synchronous=synchronous, commit=commit, serializer=serializer)
        )
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._dispatcher: Dispatcher = dispatcher if dispatcher is not None else ThreadDispatcher()
        # _lock guards _closed and writes of _queues. _queues is copy-on-write: it is replaced,
        # never mutated, so publish can look a queue up without taking the lock.
        self._lock = threading.Lock()
        self._queues: dict[str, Queue] = {}
        self._closed = False
        self._ids = itertools.count(1)
        # _progress guards _progress_count, _drainers, _async_drainers and _stopped;
        # push workers bump the count after every batch.
        self._progress = threading.Condition(threading.Lock())
        self._progress_count = 0
        self._drainers = 0
        self._async_drainers: list[Callable[[], None]] = []
        self._stopped = False
        self._clock.add_listener(self._on_clock)
        if self._store is not None:
            try:
                for name, config in self._store.queues():
                    self._queue(name, {}, QueueConfig(**config))
            except BaseException:
                self._clock.remove_listener(self._on_clock)
                self._store.close()  # a damaged file must not stay claimed
                raise

    # -- queues and publishing -----------------------------------------------------------

    def queue(
        self,
        name: str,
        *,
        retention: Retention = _UNSET,
        max_messages: int | None = _UNSET,
        max_age: float | None = _UNSET,
        overflow: Overflow = _UNSET,
    ) -> Queue:
        """Get the queue called ``name``, creating it if needed.

        Retention arguments that are given configure the queue, new or existing; those left out
        keep their current (or default) values. See :class:`~mqlite.QueueConfig`.
        """
        changes = {
            key: value
            for key, value in (
                ("retention", retention),
                ("max_messages", max_messages),
                ("max_age", max_age),
                ("overflow", overflow),
            )
            if value is not _UNSET
        }
        return self._queue(name, changes, QueueConfig())

    def _queue(self, name: str, changes: Mapping[str, Any], default: QueueConfig) -> Queue:
        existing = self._queues.get(name) if isinstance(name, str) else None
        if existing is not None and not changes:
            return existing
        check_name("queue", name)
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot open queue {name!r}: the broker is closed")
            queue = self._queues.get(name)
            if queue is None:
                config = attrs.evolve(default, **changes)
                log = None if self._store is None else self._store.open_log(name, attrs.asdict(config))
                queue = Queue(name, config, self._clock, self._send_dead_letters, log)
                self._queues = {**self._queues, name: queue}
                return queue
        if changes:
            queue.configure(attrs.evolve(queue.config, **changes))
        return queue

    def publish(
        self,
        queue: str,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Message:
        """Publish to the queue called ``queue`` (created if needed); see :meth:`Queue.publish`."""
        try:
            target = self._queues[queue]
        except (KeyError, TypeError):
            target = self.queue(queue)
        return target.publish(event, payload, key, headers)

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(
        self,
        queue: str,
        events: str | Iterable[str] | None = None,
        name: str | None = None,
        start: Start = "latest",
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
                datetime. Ignored when the named cursor already exists.
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
        check_name("queue", queue)
        event_filter = EventFilter(events)
        if name is not None:
            check_name("subscription", name)
        if callback is not None and not callable(callback):
            raise InvalidArgument(f"callback must be callable or None, got {callback!r}")
        if ack not in ("auto", "manual"):
            raise InvalidArgument(f"ack must be 'auto' or 'manual', got {ack!r}")
        if ack_timeout is not None:
            if ack != "manual":
                raise InvalidArgument("ack_timeout applies only to ack='manual' subscriptions")
            if not check_timeout(ack_timeout, name="ack_timeout"):
                raise InvalidArgument(f"ack_timeout must be a positive number of seconds, got {ack_timeout!r}")
        if max_deliveries is not None and (
            isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) or max_deliveries < 1
        ):
            raise InvalidArgument(f"max_deliveries must be None or an int >= 1, got {max_deliveries!r}")
        if dead_letter is not None:
            check_name("dead_letter queue", dead_letter)
        if backoff is not None and not isinstance(backoff, Backoff):
            raise InvalidArgument(f"backoff must be a mqlite.Backoff, got {backoff!r}")
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise InvalidArgument(f"loop must be an asyncio event loop or None, got {loop!r}")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        is_async = callback is not None and _is_coroutine_function(callback)
        if is_async and loop is None:
            raise InvalidArgument(
                "a coroutine callback needs an event loop: call subscribe() from a running loop, or pass loop="
            )
        target = self.queue(queue)
        sub = Subscription(target, ident=next(self._ids), name=name, push=callback is not None, loop=loop)
        sub.cursor = target.attach(
            sub,
            name=name,
            event_filter=event_filter,
            start=start,
            manual_ack=ack == "manual",
            ack_timeout=ack_timeout,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter if dead_letter is not None else dead_letter_queue_name(queue),
            backoff=backoff if backoff is not None else Backoff(),
        )
        if is_async:
            assert loop is not None
            AsyncPushWorker(target, sub, callback, self._note_progress, loop).start()  # type: ignore[arg-type]  # checked coroutine function
        elif callback is not None:
            self._dispatcher.start(PushWorker(target, sub, callback, self._note_progress))
        return sub

    def delete_subscription(self, queue: str, name: str) -> bool:
        """Forget a durable subscription: its position, pending messages and counters.

        Like deleting a Kafka consumer group or ``XGROUP DESTROY`` in Redis. With the default
        retention, messages only it still needed are then dropped. Returns False if there was no
        such subscription.

        Raises:
            ConfigConflict: subscriptions with that name are still attached.
        """
        check_name("queue", queue)
        check_name("subscription", name)
        target = self._queues.get(queue)
        return target is not None and target.delete_cursor(name)

    def _send_dead_letters(self, dead: list[DeadLetter]) -> list[DeadLetter]:
        """Publish each dead letter to its queue; the ones that were published."""
        sent = []
        for letter in dead:
            message = letter.message
            try:
                target = self._queue(letter.queue, {}, DEAD_LETTER_CONFIG)
                target.publish(message.event, message.payload, message.key, letter.headers)
            except MqliteError as error:
                _log.error(
                    "could not dead-letter %s offset %d to %r: %s", message.queue, message.offset, letter.queue, error
                )
            else:
                sent.append(letter)
        return sent

    # -- progress and draining -----------------------------------------------------------

    def _note_progress(self) -> None:
        with self._progress:
            self._progress_count += 1
            if self._drainers:
                self._progress.notify_all()
            wakers, self._async_drainers = self._async_drainers, []
        for wake in wakers:
            wake()

    def _on_clock(self) -> None:
        for queue in list(self._queues.values()):
            queue.wake_all()
        self._note_progress()

    def _drain_targets(self) -> list[tuple[Queue, int, list[Cursor] | None]]:
        return [(queue, queue.end_offset, None) for queue in list(self._queues.values())]

    @staticmethod
    def _settle(targets: list[tuple[Queue, int, list[Cursor] | None]]) -> bool:
        """Re-check what is still unsettled, in place; True once everything is."""
        for i, (queue, end, cursors) in enumerate(targets):
            if cursors is not None and not cursors:
                continue
            targets[i] = (queue, end, queue.push_unsettled(end, cursors))
            if targets[i][2]:
                return False
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every push subscription has handled everything published before the call.

        "Handled" means its callback returned for each matching message, or the message was
        dead-lettered. Returns False if ``timeout`` seconds passed first, or if the broker is (or
        becomes) closed, since a closed broker's subscriptions handle nothing more.
        """
        timeout = check_timeout(timeout)
        targets = self._drain_targets()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatcher.run_ready()
            with self._progress:
                seen = self._progress_count
                if self._stopped:
                    return False  # a closed broker's push subscriptions are gone, finished or not
            if self._settle(targets):
                return True
            with self._progress:
                self._drainers += 1
                try:
                    while self._progress_count == seen and not self._stopped:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            return False
                        self._progress.wait(remaining)
                finally:
                    self._drainers -= 1

    async def adrain(self, timeout: float | None = None) -> bool:
        """:meth:`drain` for asyncio code: waits without blocking the event loop."""
        timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        targets = self._drain_targets()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            self._dispatcher.run_ready()
            future: asyncio.Future[None] = loop.create_future()
            with self._progress:
                self._async_drainers.append(loop_waker(loop, future))
                stopped = self._stopped
            if stopped:
                return False
            if self._settle(targets):
                return True
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                return self._settle(targets)

    # -- introspection -------------------------------------------------------------------

    def info(self) -> BrokerInfo:
        """A frozen snapshot of every queue and subscription."""
        queues = []
        subs = []
        for queue in list(self._queues.values()):
            (config, start, end), cursors = queue.snapshot()
            queues.append(
                QueueInfo(
                    name=queue.name,
                    start_offset=start,
                    end_offset=end,
                    retained=end - start,
                    retention=config.retention,
                    max_messages=config.max_messages,
                    max_age=config.max_age,
                    overflow=config.overflow,
                )
            )
            for cursor, figures in cursors:
                members = figures["members"]
                push = any(m.is_push for m in members)
                pull = any(not m.is_push for m in members)
                mode: Literal["push", "pull", "push+pull", "detached"] = (
                    "push+pull" if push and pull else "push" if push else "pull" if pull else "detached"
                )
                subs.append(
                    SubscriptionInfo(
                        queue=queue.name,
                        name=cursor.name,
                        durable=cursor.durable,
                        events=figures["events"],
                        mode=mode,
                        consumers=len(members),
                        subscription_ids=tuple(m.id for m in members),
                        ack="manual" if figures["manual_ack"] else "auto",
                        position=figures["position"],
                        lag=figures["lag"],
                        pending=figures["pending"],
                        delivered=figures["delivered"],
                        acked=figures["acked"],
                        redelivered=figures["redelivered"],
                        dead_lettered=figures["dead_lettered"],
                        missed=figures["missed"],
                    )
                )
        return BrokerInfo(queues=tuple(queues), subscriptions=tuple(subs))

    # -- closing -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        with self._lock:
            return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Close every subscription, wake every blocked reader, stop push threads.

        Waits up to ``timeout`` seconds for running callbacks to finish. Idempotent. Afterwards
        publish and subscribe raise :class:`~mqlite.BrokerClosed`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queues = list(self._queues.values())
        members = [member for queue in queues for member in queue.close()]
        for member in members:
            member.close()
        if not self._dispatcher.close(timeout):
            _log.warning("some push callbacks were still running %.1f s after close()", timeout)
        self._clock.remove_listener(self._on_clock)
        if self._store is not None:
            self._store.close()
        with self._progress:
            self._stopped = True
            self._progress.notify_all()
            wakers, self._async_drainers = self._async_drainers, []
        for wake in wakers:
            wake()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every publish, delivery and ack made before the call is committed to the file.

        Only a file-backed broker with ``commit="batch"`` ever has to wait; otherwise returns True
        at once. Returns False if ``timeout`` seconds passed first.

        Raises:
            StorageError: the background writer failed (for example, the disk is full).
        """
        timeout = check_timeout(timeout)
        return True if self._store is None else self._store.flush(timeout)

    @property
    def path(self) -> str | None:
        """The file this broker keeps its state in, or None for an in-memory broker."""
        return None if self._store is None else self._store.path

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        where = "" if self._store is None else f" {self._store.path!r}"
        return f"<mqlite.Broker{where} {state} queues={sorted(self._queues)!r}>"


def _is_coroutine_function(callback: object) -> bool:
    """Whether calling ``callback`` returns a coroutine (plain, partial, or an object with async __call__)."""
    call = type(callback).__call__ if not inspect.isroutine(callback) else None
    return inspect.iscoroutinefunction(callback) or (call is not None and inspect.iscoroutinefunction(call))
