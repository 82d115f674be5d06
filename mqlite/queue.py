"""Queue: one named append-only log, the cursors reading it, and the waiters blocked on it."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import attrs

from mqlite.clock import Clock
from mqlite.cursor import OUT, READY, WAITING, Backoff, Cursor, Pending
from mqlite.engine.memory_log import MemoryLog
from mqlite.engine.sqlite.sharing import FileLock
from mqlite.errors import (
    AckModeError,
    BrokerClosed,
    ConfigConflict,
    InvalidArgument,
    NotPending,
    QueueFull,
    SubscriptionClosed,
)
from mqlite.filters import EventFilter, check_event_name
from mqlite.message import Message, make_meta, message_class

if TYPE_CHECKING:
    from mqlite.engine.sqlite.log import QueueState, SqliteLog

__all__ = ["DeadLetter", "Queue", "QueueConfig", "Start"]

Start = Literal["earliest", "latest"] | int | datetime
"""Where a cursor starts or seeks to: the oldest retained message, the end, an offset, or a time."""

Retention = Literal["interest", "limits"]
Overflow = Literal["drop_oldest", "reject"]

# Housekeeping (retention, reclaiming memory) runs every this many publishes, or every 4 per
# cursor if that is more, so its O(cursors) cost stays O(1) per publish.
_HOUSEKEEP_EVERY = 1024
# Reclaim a dropped prefix once it is this long and a quarter of what is retained: each reclaim
# moves the retained pointers once, so the amortised cost per message is constant.
_MIN_RECLAIM = 4096
_NO_LIMIT = 1 << 62
_MISSING: Any = object()
_tuple_new = tuple.__new__
_offset_of = itemgetter(2)  # a Message's offset: the key the per-event index is sorted by
_allocate_lock = threading.Lock
_R = TypeVar("_R")


def _check_limit(name: str, value: object, *, integer: bool) -> None:
    if value is None:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:  # type: ignore[operator]  # isinstance just proved a number
        kind = "a positive int" if integer else "a positive number of seconds"
        raise InvalidArgument(f"{name} must be None or {kind}, got {value!r}")


@attrs.frozen
class QueueConfig:
    """How much of its log a queue keeps, and what happens when it is full.

    Attributes:
        retention: ``"interest"`` (default) keeps a message while some subscription still has to
            read it: every named (durable) subscription, attached or not, and every open one.
            A message that no cursor will ever read is dropped. ``"limits"`` keeps every message
            until a limit drops it, even when nobody subscribes; with no limits it keeps all.
        max_messages: Keep at most this many messages; None for no count limit.
        max_age: Drop messages older than this many seconds (broker clock); None for no age limit.
        overflow: What a publish does when ``max_messages`` are retained. ``"drop_oldest"`` drops
            the oldest (subscriptions that had not read it count it as missed); ``"reject"`` raises
            :class:`~mqlite.QueueFull` and writes nothing.
    """

    retention: Retention = "interest"
    max_messages: int | None = None
    max_age: float | None = None
    overflow: Overflow = "drop_oldest"

    def __attrs_post_init__(self) -> None:
        if self.retention not in ("interest", "limits"):
            raise InvalidArgument(f"retention must be 'interest' or 'limits', got {self.retention!r}")
        if self.overflow not in ("drop_oldest", "reject"):
            raise InvalidArgument(f"overflow must be 'drop_oldest' or 'reject', got {self.overflow!r}")
        _check_limit("max_messages", self.max_messages, integer=True)
        _check_limit("max_age", self.max_age, integer=False)
        if self.overflow == "reject" and self.max_messages is None:
            raise InvalidArgument("overflow='reject' needs max_messages to say when the queue is full")


@attrs.frozen
class DeadLetter:
    """A message on its way to a dead-letter queue, with the headers that say where it came from."""

    queue: str
    message: Message
    headers: Mapping[str, Any]
    # The durable cursor whose pending row on the file stays until the letter is published.
    subscription: str | None = None


class Queue:
    """A named append-only log of messages, with the cursors that read it. Thread-safe.

    Publish appends a message and gives it the next offset. Every subscription reads through a
    cursor kept here. One lock guards the log and all of its cursors; no user code ever runs
    under it, and blocked readers wait on their own one-shot waiters, woken only when something
    they want arrives.
    """

    def __init__(
        self,
        name: str,
        config: QueueConfig,
        clock: Clock,
        dead_letter_sink: Callable[[list[DeadLetter]], list[DeadLetter]],
        durable_log: SqliteLog | None = None,
    ) -> None:
        self.name = name
        # _lock guards every attribute below and every cursor of this queue. On a file that
        # several brokers may share it is a FileLock: holding it also holds a write transaction,
        # begun after reloading whatever other brokers changed.
        self._lock: threading.Lock | FileLock = threading.Lock()
        # The hot paths (publish, pull, push batches, ack, async attempts) take it with acquire()
        # and try/finally release() instead of ``with``: on CPython 3.11 ``with`` binds
        # __enter__ and __exit__ anew on every entry, 0.22 µs against 0.11 µs here, and publish
        # is the floor of every throughput figure.
        self._config = config
        self._log: MemoryLog | SqliteLog = MemoryLog() if durable_log is None else durable_log
        self._append = self._log.append
        # _journal: where durable cursors are saved; None in memory, where nothing is saved and
        # no code path pays for the check except on cursor changes.
        self._journal = durable_log
        self._end = self._log.first_offset + len(self._log)
        # _start: the oldest retained offset. Entries in [log.first_offset, _start) are dropped
        # logically and reclaimed in batches.
        self._start = self._log.first_offset
        # Known event names -> the retained messages of that event in offset order, kept only
        # while some cursor filters by event (_indexed > 0); None values otherwise. A filtered
        # read slices one of these lists: no lookup per message.
        self._events: dict[str, list[Message] | None] = {}
        self._indexed = 0
        self._cursors: dict[str, Cursor] = {}
        self._ephemeral: list[Cursor] = []
        # One-shot waiters: (event names wanted or None for any, wake function).
        self._waiters: list[tuple[set[str] | None, Callable[[], object]]] = []
        self._check_at = 0
        self._closed = False
        self._outbox: list[DeadLetter] = []
        self._message_class = message_class(name)
        self._clock = clock
        self._time = clock.time
        self._monotonic = clock.monotonic
        self._dead_letter_sink = dead_letter_sink
        # Shared files only: the pending entries of durable cursors made due again, which other
        # brokers may now take (written when the transaction ends). None when no other broker
        # can share the file.
        self._released: list[tuple[Cursor, Pending]] | None = None
        if durable_log is not None and durable_log.store.shared:
            self._released = []
            self._lock = FileLock(durable_log.store, self._refresh_locked, self._on_commit)
            durable_log.store.watch(self.poke)
        with self._lock:
            if durable_log is not None and self._released is None:
                self._refresh_locked()  # a shared file reloaded when the lock began its transaction
            self._housekeep_locked()

    # -- durability (file-backed brokers only) ---------------------------------------------

    def _on_commit(self) -> None:
        """A transaction is about to commit (shared files): save entries made due for anyone."""
        released = self._released
        if not released:
            return
        offsets: dict[Cursor, list[int]] = {}
        for cursor, entry in released:
            if entry.state == READY and cursor.pending.get(entry.message[2]) is entry:
                offsets.setdefault(cursor, []).append(entry.message[2])
        released.clear()
        for cursor, due in offsets.items():
            if cursor.name is not None and self._cursors.get(cursor.name) is cursor:
                self._sync_locked(cursor, due)

    def poke(self) -> None:
        """Another broker changed the file: reload now if anyone waits here (the watcher calls this)."""
        lock = self._lock
        if not isinstance(lock, FileLock):
            return
        with lock.plain:
            waiting = bool(self._waiters)
        if waiting:
            with lock:
                pass  # beginning the transaction reloads and wakes whoever now has something to read

    def _refresh_locked(self) -> None:
        """Bring memory up to the file: new messages, settings, cursors and who holds what."""
        log = self._journal
        assert log is not None  # only file-backed queues reload
        state = log.store.changes(self.name, self._end)
        config = QueueConfig(**state.config)
        if config != self._config:
            self._config = config
            self._check_at = min(self._check_at, self._end)
        woke = self._load_messages_locked(log, state)
        woke = self._load_cursors_locked(state) or woke
        woke = self._load_pending_locked(log, state) or woke
        if woke and self._waiters:
            self._wake_all_locked()

    def _load_messages_locked(self, log: SqliteLog, state: QueueState) -> bool:
        if state.start > self._end:
            # Another broker dropped messages this one never loaded: start after them.
            self._trim_postings_locked(state.start)
            self._end = state.start
            self._start = max(self._start, state.start)
        messages = state.messages
        if not messages:
            return False
        log.load(state.start, messages)
        events = self._events
        for message in messages:
            event = message[0]
            if event not in events:
                self._new_event_locked(event)
            postings = events[event]
            if postings is not None:
                postings.append(message)
        self._end = messages[-1][2] + 1
        return True

    def _load_cursors_locked(self, state: QueueState) -> bool:
        changed = False
        stored = set()
        for name, position, settings in state.cursors:
            stored.add(name)
            cursor = self._cursors.get(name)
            if cursor is None:
                cursor = Cursor(
                    queue=self.name,
                    name=name,
                    event_filter=EventFilter(None),
                    position=position,
                    manual_ack=False,
                    ack_timeout=None,
                    max_deliveries=None,
                    dead_letter="",
                    backoff=Backoff(),
                )
                cursor.released = self._released
                self._cursors[name] = cursor
                self._apply_settings_locked(cursor, settings)
                changed = True
                continue
            if self._settings_locked(cursor) != settings:
                self._apply_settings_locked(cursor, settings)
                changed = True
            if cursor.position != position:
                cursor.position = position
                changed = True
        for name, cursor in list(self._cursors.items()):
            if name in stored:
                continue
            if cursor.members:
                self._save_cursor_locked(cursor)  # deleted elsewhere while attached here: keep it
            else:
                del self._cursors[name]
                self._change_index_locked(-int(cursor.names is not None))
                changed = True
        return changed

    def _load_pending_locked(self, log: SqliteLog, state: QueueState) -> bool:
        """Match each durable cursor's pending entries to the file's rows and their holders."""
        store = log.store
        me = store.instance
        rows: dict[str, dict[int, tuple[int, str | None, float | None]]] = {}
        for name, offset, attempts, owner, due in state.pending:
            rows.setdefault(name, {})[offset] = (attempts, owner, due)
        changed = False
        for name, cursor in self._cursors.items():
            stored = rows.get(name, {})
            pending = cursor.pending
            for offset, entry in list(pending.items()):
                row = stored.pop(offset, None)
                if row is None or (row[1] is not None and row[1] != me):
                    del pending[offset]  # settled, or taken, by another broker
                    entry.state = -1
                    changed = True
            adopt = [
                (offset, attempts, due)
                for offset, (attempts, owner, due) in stored.items()
                if (owner is None or owner == me or not store.alive(owner)) and offset not in cursor.dead_in_transit
            ]
            if not adopt:
                continue
            first = self._log.first_offset
            cached = {o: self._log.get(o) for o, _, _ in adopt if o >= first}
            missing = [o for o, _, _ in adopt if o < first]
            messages = {m[2]: m for m in store.load_messages(self.name, missing)} if missing else {}
            messages.update(cached)
            now = self._time()
            for offset, attempts, due in adopt:
                message = messages.get(offset)
                if message is None:
                    continue  # its message is gone from the file: nothing left to redeliver
                self._events.setdefault(message[0], None)
                # Delivered before and never settled, by a broker that is gone: due again, in
                # order, unless it was nacked with a delay that has not ended yet.
                entry = Pending(message, attempts, None, READY)
                pending[offset] = entry
                if due is not None and due > now:
                    cursor.schedule_locked(entry, self._monotonic() + (due - now))
                else:
                    cursor.ready.append(entry)
                changed = True
        return changed

    @staticmethod
    def _settings_locked(cursor: Cursor) -> dict[str, Any]:
        """A durable cursor's settings as the file stores them."""
        backoff = cursor.backoff
        spec = cursor.filter.spec
        return {
            "events": None if spec is None else list(spec),
            "manual_ack": cursor.manual_ack,
            "ack_timeout": cursor.ack_timeout,
            "max_deliveries": cursor.max_deliveries,
            "dead_letter": cursor.dead_letter,
            "backoff": [backoff.initial, backoff.factor, backoff.maximum],
        }

    def _apply_settings_locked(self, cursor: Cursor, settings: dict[str, Any]) -> None:
        """Give a cursor the settings the file stores for it."""
        self._configure_cursor_locked(
            cursor,
            EventFilter(settings["events"]),
            settings["manual_ack"],
            settings["ack_timeout"],
            settings["max_deliveries"],
            settings["dead_letter"],
            Backoff(*settings["backoff"]),
        )

    def _configure_cursor_locked(
        self,
        cursor: Cursor,
        event_filter: EventFilter,
        manual_ack: bool,
        ack_timeout: float | None,
        max_deliveries: int | None,
        dead_letter: str,
        backoff: Backoff,
    ) -> None:
        cursor.manual_ack = manual_ack
        cursor.ack_timeout = ack_timeout
        cursor.max_deliveries = max_deliveries
        cursor.dead_letter = dead_letter
        cursor.backoff = backoff
        if cursor.filter != event_filter:
            self._apply_filter_locked(cursor, event_filter)

    def _save_cursor_locked(self, cursor: Cursor) -> None:
        """Write a durable cursor's settings and position (file-backed brokers only)."""
        if self._journal is None or cursor.name is None:
            return
        self._journal.save_cursor(cursor.name, cursor.position, self._settings_locked(cursor))

    def _sync_locked(
        self, cursor: Cursor, offsets: Iterable[int], inflight: Iterable[int] = (), *, moved: bool = False
    ) -> None:
        """Save, for ``offsets``, whether each is still pending on a durable cursor (and its position if ``moved``).

        ``inflight`` are offsets handed to a push callback with automatic acks: they are saved as
        pending (delivered once) until the callback returns, so a crash redelivers them.
        """
        journal = self._journal
        if journal is None or cursor.name is None:
            return
        pending = cursor.pending
        upserts: list[tuple[int, int, bool, float | None]] = []
        deletes: list[int] = []
        for offset in offsets:
            entry = pending.get(offset)
            if entry is None:
                deletes.append(offset)
            elif entry.state == WAITING:
                # Waiting out a delay: held by nobody, so any broker sharing the file may take it
                # once the delay ends, and the wall-clock time it waits for survives a restart.
                upserts.append((offset, entry.attempts, False, self._wall_due_locked(entry)))
            else:
                # Held by this broker unless it is due for redelivery to whoever reads next.
                upserts.append((offset, entry.attempts, entry.state != READY, None))
        upserts.extend((offset, 1, True, None) for offset in inflight)
        journal.sync_cursor(cursor.name, cursor.position if moved else None, upserts, deletes)

    def _wall_due_locked(self, entry: Pending) -> float:
        """When a WAITING entry's delay ends, in the clock's wall time (what a file can keep)."""
        return self._time() + max(entry.deadline - self._monotonic(), 0.0)

    def __repr__(self) -> str:
        return f"<mqlite.Queue {self.name!r} offsets [{self.start_offset}, {self.end_offset})>"

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Message:
        """Append one message and return it with its offset.

        Raises:
            InvalidName: ``event`` is not a non-empty str, or contains a wildcard character.
            QueueFull: the queue has ``overflow="reject"`` and holds ``max_messages``.
            BrokerClosed: the broker was closed.
        """
        lock = self._lock
        lock.acquire()
        try:
            try:
                postings = self._events[event]
            except (KeyError, TypeError):
                postings = self._new_event_locked(event)
            offset = self._end
            if offset >= self._check_at:  # housekeeping due, queue full, or broker closed
                self._make_room_locked(1)
            if key is None and headers is None:
                message: Message = _tuple_new(self._message_class, (event, payload, offset, self._time()))
            else:
                meta = make_meta(self.name, key, headers)
                message = _tuple_new(Message, (event, payload, offset, self._time(), meta))
            self._append(message)
            self._end = offset + 1
            if postings is not None:
                postings.append(message)
            if self._waiters:
                self._wake_locked(event)
        finally:
            lock.release()
        return message

    def publish_many(self, items: Iterable[tuple[str, Any]]) -> list[Message]:
        """Append several ``(event, payload)`` pairs at once, all or none, with one timestamp.

        Raises:
            InvalidArgument: an item is not an ``(event, payload)`` pair.
            InvalidName: an event name is invalid; nothing was appended.
        """
        pairs = list(items)
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidArgument(f"publish_many takes (event, payload) pairs, got {pair!r}")
        cls = self._message_class
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
            events = self._events
            for event, _ in pairs:
                if type(event) is not str or event not in events:
                    check_event_name(event)
            if not pairs:
                return []
            start = self._end
            if start + len(pairs) > self._check_at:
                self._make_room_locked(len(pairs))
            now = self._time()
            messages: list[Message] = [
                _tuple_new(cls, (event, payload, offset, now)) for offset, (event, payload) in enumerate(pairs, start)
            ]
            for event, _ in pairs:
                if event not in events:
                    self._new_event_locked(event)
            self._log.extend(messages)
            self._end = start + len(messages)
            if self._indexed:
                for message in messages:
                    postings = events[message[0]]
                    assert postings is not None  # indexing is on for every event while _indexed
                    postings.append(message)
            if self._waiters:
                self._wake_all_locked()
        return messages

    def _new_event_locked(self, event: object) -> list[Message] | None:
        name = check_event_name(event)
        postings: list[Message] | None = [] if self._indexed else None
        self._events[name] = postings
        for cursor in self._all_cursors_locked():
            if cursor.names is not None and cursor.filter.matches(name):
                cursor.names.add(name)
        self._wake_all_locked()
        return postings

    # -- retention -------------------------------------------------------------------------

    def _make_room_locked(self, count: int) -> None:
        if self._closed:
            raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        self._housekeep_locked()
        config = self._config
        limit = config.max_messages
        if config.overflow == "reject" and limit is not None and self._end + count - self._start > limit:
            raise QueueFull(
                f"queue {self.name!r} holds {self._end - self._start} of max_messages="
                f"{config.max_messages}; overflow='reject' refuses {count} more"
            )

    def _limit_floor_locked(self) -> int:
        """The oldest offset the count and age limits allow; moves ``_start`` up to it."""
        start = self._start
        config = self._config
        if config.max_messages is not None and config.overflow == "drop_oldest":
            start = max(start, self._end - config.max_messages)
        if config.max_age is not None:
            cutoff = self._time() - config.max_age
            end = self._end
            log = self._log
            while start < end and log.get(start)[3] < cutoff:
                start += 1
        self._start = start
        return start

    def _housekeep_locked(self) -> None:
        start = self._limit_floor_locked()
        cursors = self._all_cursors_locked()
        for cursor in cursors:
            if cursor.position < start:
                self._skip_locked(cursor, start)
        end = self._end
        if self._config.retention == "interest":
            start = max(start, min((c.position for c in cursors), default=end))
            self._start = start
        first = self._log.first_offset
        if start - first >= max(_MIN_RECLAIM, (end - start) // 4):
            self._reclaim_locked(start)
        check_at = end + max(_HOUSEKEEP_EVERY, 4 * len(cursors))
        config = self._config
        if config.overflow == "reject" and config.max_messages is not None:
            check_at = min(check_at, start + config.max_messages)
        self._check_at = -1 if self._closed else check_at

    def _reclaim_locked(self, offset: int) -> None:
        self._log.drop_before(offset)
        self._trim_postings_locked(offset)

    def _trim_postings_locked(self, offset: int) -> None:
        if self._indexed:
            for postings in self._events.values():
                if postings:
                    del postings[: bisect_left(postings, offset, key=_offset_of)]

    def _skip_locked(self, cursor: Cursor, to: int) -> None:
        """Move a cursor that fell behind the retained range up to ``to``, counting what it missed."""
        cursor.missed += self._count_locked(cursor, cursor.position, to)
        cursor.position = to
        if self._journal is not None and cursor.name is not None:
            self._sync_locked(cursor, (), moved=True)

    def _count_locked(self, cursor: Cursor, from_offset: int, to_offset: int) -> int:
        """How many messages in ``[from_offset, to_offset)`` pass the cursor's filter."""
        if from_offset >= to_offset:
            return 0
        if cursor.names is None:
            return to_offset - from_offset
        total = 0
        for name in cursor.names:
            postings = self._events[name]
            if postings:
                total += bisect_left(postings, to_offset, key=_offset_of) - bisect_left(
                    postings, from_offset, key=_offset_of
                )
        return total

    def _all_cursors_locked(self) -> list[Cursor]:
        return [*self._cursors.values(), *self._ephemeral]

    # -- the per-event index -------------------------------------------------------------

    def _apply_filter_locked(self, cursor: Cursor, event_filter: EventFilter) -> None:
        was_indexed = cursor.names is not None
        cursor.filter = event_filter
        if event_filter.match_all:
            cursor.names = None
        else:
            cursor.names = {name for name in self._events if event_filter.matches(name)}
        self._change_index_locked(int(cursor.names is not None) - int(was_indexed))

    def _change_index_locked(self, delta: int) -> None:
        before = self._indexed
        self._indexed += delta
        events = self._events
        if before == 0 and self._indexed > 0:
            index: dict[str, list[Message]] = {name: [] for name in events}
            log = self._log
            for message in log.read(log.first_offset, self._end):
                index[message[0]].append(message)
            events.update(index)
        elif before > 0 and self._indexed == 0:
            for name in events:
                events[name] = None

    # -- waiting -------------------------------------------------------------------------

    def _wake_locked(self, event: str) -> None:
        keep = []
        for waiter in self._waiters:
            names = waiter[0]
            if names is None or event in names:
                waiter[1]()
            else:
                keep.append(waiter)
        self._waiters = keep

    def _wake_all_locked(self) -> None:
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            waiter[1]()

    def _bounded_by_due_locked(self, cursor: Cursor, timeout: float | None) -> float | None:
        """``timeout`` shortened so a waiter wakes when a retry or ack timeout of ``cursor`` is due."""
        if cursor.pending and not self._clock.virtual:
            due = cursor.next_due()
            if due is not None:
                until_due = max(due - self._monotonic(), 0.0)
                return until_due if timeout is None else min(timeout, until_due)
        return timeout

    def _wait_locked(self, cursor: Cursor, timeout: float | None) -> None:
        """Release the lock until something this cursor may want arrives, or ``timeout`` passes."""
        timeout = self._bounded_by_due_locked(cursor, timeout)
        signal = _allocate_lock()
        signal.acquire()
        waiter = (cursor.names, signal.release)
        self._waiters.append(waiter)
        self._lock.release()
        woken = False
        try:
            woken = signal.acquire(True, -1 if timeout is None else timeout)
        finally:
            self._lock.acquire()
            if not woken:  # whoever wakes a waiter removes it; raising ValueError costs 0.3 µs
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass  # woken just after the timeout: the waker removed it

    def attempt(
        self,
        consumer: Any,
        attempt: Callable[[], tuple[bool, _R]],
        wake: Callable[[], object] | None,
    ) -> tuple[bool, _R, tuple[Any, ...] | None, float | None]:
        """Run ``attempt`` under the lock; if it is not done, register ``wake`` (if any) as a one-shot waiter.

        This is how the asyncio adapters wait without a thread: the same take logic as the
        blocking calls, only the waiting differs. Returns ``(done, value, waiter, wait_at_most)``;
        the caller removes the waiter with :meth:`remove_waiter` once it stops waiting.
        """
        waiter = None
        bound = None
        lock = self._lock
        lock.acquire()
        try:
            done, value = attempt()
            if not done and wake is not None:
                cursor: Cursor = consumer.cursor
                waiter = (cursor.names, wake)
                self._waiters.append(waiter)
                bound = self._bounded_by_due_locked(cursor, None)
            dead = self._take_outbox_locked()
        finally:
            lock.release()
        if dead:
            self.send_dead_letters(dead)
        return done, value, waiter, bound

    def remove_waiter(self, waiter: tuple[Any, ...]) -> None:
        """Forget a waiter that was not woken; a woken one is already gone."""
        lock = self._lock
        lock.acquire()
        try:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        finally:
            lock.release()

    def wake_all(self) -> None:
        """Wake every waiter so it re-checks (the clock moved, or the broker is closing)."""
        with self._lock:
            self._wake_all_locked()

    # -- attaching and detaching subscriptions -------------------------------------------

    def attach(
        self,
        consumer: Any,
        *,
        name: str | None,
        event_filter: EventFilter,
        start: Start,
        manual_ack: bool,
        ack_timeout: float | None,
        max_deliveries: int | None,
        dead_letter: str,
        backoff: Backoff,
    ) -> Cursor:
        """Attach a consumer to the named cursor (creating it at ``start``) or to a new ephemeral one."""
        settings = (event_filter, manual_ack, ack_timeout, max_deliveries, dead_letter, backoff)
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot subscribe to {self.name!r}: the broker is closed")
            cursor = self._cursors.get(name) if name is not None else None
            if cursor is None:
                cursor = Cursor(
                    queue=self.name,
                    name=name,
                    event_filter=EventFilter(None),
                    position=self._resolve_locked(start),
                    manual_ack=manual_ack,
                    ack_timeout=ack_timeout,
                    max_deliveries=max_deliveries,
                    dead_letter=dead_letter,
                    backoff=backoff,
                )
                self._apply_filter_locked(cursor, event_filter)
                if name is None:
                    self._ephemeral.append(cursor)
                else:
                    cursor.released = self._released
                    self._cursors[name] = cursor
                    self._save_cursor_locked(cursor)
            elif cursor.settings() != settings:
                if cursor.members:
                    raise ConfigConflict(
                        f"subscription {name!r} on {self.name!r} is attached with different settings "
                        f"(events={cursor.filter.spec!r}, ack={'manual' if cursor.manual_ack else 'auto'}, "
                        f"ack_timeout={cursor.ack_timeout!r}, max_deliveries={cursor.max_deliveries!r}, "
                        f"dead_letter={cursor.dead_letter!r}); subscriptions sharing a name must agree"
                    )
                self._configure_cursor_locked(cursor, *settings)
                self._save_cursor_locked(cursor)
            cursor.members.append(consumer)
            return cursor

    def delete_cursor(self, name: str) -> bool:
        """Forget the named cursor, its position and pending messages; False if there was none.

        Raises:
            ConfigConflict: subscriptions with that name are still attached.
        """
        with self._lock:
            cursor = self._cursors.get(name)
            if cursor is None:
                return False
            if cursor.members:
                raise ConfigConflict(
                    f"subscription {name!r} on {self.name!r} has {len(cursor.members)} attached; close them first"
                )
            del self._cursors[name]
            if self._journal is not None:
                self._journal.delete_cursor(name)
            self._change_index_locked(-int(cursor.names is not None))
            self._housekeep_locked()
            return True

    def detach(self, consumer: Any, cursor: Cursor) -> None:
        """Detach a closing consumer: what it held unacked goes back for redelivery."""
        with self._lock:
            consumer.mark_closed("the subscription was closed")
            buffer = consumer.buffer
            unread = []
            while buffer:  # popleft, not list()+clear(): a racing lock-free pop gets each message at most once
                try:
                    unread.append(buffer.popleft())
                except IndexError:
                    break
            self._give_back_locked(cursor, unread, pulled=True)
            if unread and self._journal is not None:
                self._sync_locked(cursor, [m[2] for m in unread])
            if consumer in cursor.members:
                cursor.members.remove(consumer)
            closing_broker = self._closed
            for entry in list(cursor.pending.values()):
                if entry.owner is consumer and entry.state == OUT:
                    if closing_broker:
                        # Not a failed delivery: the consumer did not give up on it. It waits,
                        # with its attempt count unchanged, for the next consumer of the name.
                        cursor.make_ready_locked(entry)
                    else:
                        self._fail_locked(cursor, entry, "subscription closed", 0.0, None)
            if not cursor.members and not cursor.durable and cursor in self._ephemeral:
                self._ephemeral.remove(cursor)
                self._change_index_locked(-int(cursor.names is not None))
            self._wake_all_locked()
            dead = self._take_outbox_locked()
        self.send_dead_letters(dead)

    # -- reading -------------------------------------------------------------------------

    def take_locked(self, consumer: Any, cursor: Cursor, max_messages: int, push: bool) -> tuple[list[Message], int]:
        """Hand up to ``max_messages`` to a consumer: due redeliveries first, then new messages.

        Returns the messages and how many at the front are redeliveries. Pull consumers with
        automatic acks settle their messages here; everyone else gets them as pending entries.
        """
        out: list[Message] = []
        manual = cursor.manual_ack
        if cursor.pending:
            if cursor.has_timers():
                self._fire_timers_locked(cursor)
            entries: list[Pending] = []
            while len(out) < max_messages:
                entry = cursor.pop_ready_locked()
                if entry is None:
                    break
                entry.attempts += 1
                if entry.attempts > 1:
                    cursor.redelivered += 1
                if manual or push:
                    entry.state = OUT
                    entry.owner = consumer
                    entries.append(entry)
                else:
                    del cursor.pending[entry.message[2]]
                out.append(entry.message)
            if manual and entries and cursor.ack_timeout is not None:
                cursor.track_timeout_locked(self._monotonic() + cursor.ack_timeout, entries)
        redelivered = len(out)
        if redelivered < max_messages:
            fresh = self._read_new_locked(cursor, max_messages - redelivered)
            if fresh:
                if manual:
                    self._track_locked(consumer, cursor, fresh)
                if out:
                    out.extend(fresh)
                else:
                    out = fresh
        if out:
            cursor.delivered += len(out)
            if not manual and not push:
                cursor.acked += len(out)
            if push:
                cursor.inflight += 1
            if self._journal is not None and cursor.name is not None:
                fresh_offsets = [m[2] for m in out[redelivered:]]
                if manual:
                    self._sync_locked(cursor, [m[2] for m in out], moved=True)
                elif push:
                    self._sync_locked(cursor, [m[2] for m in out[:redelivered]], fresh_offsets, moved=True)
                else:
                    self._sync_locked(cursor, [m[2] for m in out[:redelivered]], moved=bool(fresh_offsets))
        return out, redelivered

    def _track_locked(self, consumer: Any, cursor: Cursor, messages: list[Message]) -> None:
        pending = cursor.pending
        entries = []
        for message in messages:
            entry = Pending(message, 1, consumer, OUT)
            pending[message[2]] = entry
            entries.append(entry)
        if cursor.ack_timeout is not None:
            cursor.track_timeout_locked(self._monotonic() + cursor.ack_timeout, entries)

    def _read_new_locked(self, cursor: Cursor, max_messages: int) -> list[Message]:
        position = cursor.position
        start = self._limit_floor_locked() if self._config.max_messages or self._config.max_age else self._start
        if position < start:
            self._skip_locked(cursor, start)
            position = start
        end = self._end
        if position >= end:
            return []
        names = cursor.names
        if names is None:
            stop = position + max_messages if position + max_messages < end else end
            cursor.position = stop
            return self._log.read(position, stop)
        if not names:
            cursor.position = end
            return []
        events = self._events
        if len(names) == 1:
            for name in names:
                postings = events[name]
                assert postings is not None
                i = bisect_left(postings, position, key=_offset_of)
                out = postings[i : i + max_messages]
        else:
            gathered: list[Message] = []
            for name in names:
                postings = events[name]
                assert postings is not None
                i = bisect_left(postings, position, key=_offset_of)
                gathered.extend(postings[i : i + max_messages])
            gathered.sort(key=_offset_of)
            out = gathered[:max_messages]
        cursor.position = out[-1][2] + 1 if len(out) == max_messages else end
        return out

    def _fire_timers_locked(self, cursor: Cursor) -> None:
        for entry in cursor.expired_locked(self._monotonic()):
            self._fail_locked(cursor, entry, "ack timeout", 0.0, None)

    def _fail_locked(
        self, cursor: Cursor, entry: Pending, reason: str, delay: float, error: BaseException | None
    ) -> None:
        """A delivery failed: dead-letter the message if it used up its deliveries, else retry it."""
        if cursor.max_deliveries is not None and entry.attempts >= cursor.max_deliveries:
            message = entry.message
            del cursor.pending[message[2]]
            cursor.dead_lettered += 1
            held_on_file = self._journal is not None and cursor.name is not None
            if held_on_file:
                # The pending row stays until the dead letter is published (see
                # send_dead_letters): a crash in between redelivers the message, never loses it.
                cursor.dead_in_transit.add(message[2])
            headers = dict(message.headers)
            headers.update(
                {
                    "dead_letter.queue": self.name,
                    "dead_letter.offset": message[2],
                    "dead_letter.subscription": cursor.name,
                    "dead_letter.deliveries": entry.attempts,
                    "dead_letter.reason": reason,
                    "dead_letter.error": None if error is None else repr(error),
                }
            )
            self._outbox.append(DeadLetter(cursor.dead_letter, message, headers, cursor.name if held_on_file else None))
        elif delay > 0:
            cursor.schedule_locked(entry, self._monotonic() + delay)
        else:
            cursor.make_ready_locked(entry)
        if self._waiters:
            self._wake_all_locked()

    def _take_outbox_locked(self) -> list[DeadLetter]:
        outbox = self._outbox
        if outbox:
            self._outbox = []
        return outbox

    def send_dead_letters(self, dead: list[DeadLetter]) -> None:
        """Publish dead letters to their queues, then settle them. Called with no lock held.

        On a file, a dead letter's pending row is deleted only once its publish has committed.
        One that could not be published keeps its row: it is delivered again after a restart.
        """
        if not dead:
            return
        settle = [(letter.subscription, letter.message[2]) for letter in self._dead_letter_sink(dead)]
        if not any(name is not None for name, _ in settle):
            return
        with self._lock:
            for name, offset in settle:
                cursor = self._cursors.get(name) if name is not None else None
                if cursor is not None and offset in cursor.dead_in_transit:
                    cursor.dead_in_transit.discard(offset)
                    self._sync_locked(cursor, (offset,))

    def pull_attempt_locked(self, consumer: Any, max_messages: int, read_ahead: int = 0) -> tuple[bool, list[Message]]:
        """One try at reading for a pull consumer: (got something, messages).

        Messages the consumer read ahead come first. With ``read_ahead``, up to that many are
        taken and the ones beyond ``max_messages`` kept in the consumer's buffer.
        """
        if consumer.closed:
            raise SubscriptionClosed(consumer.closed_reason())
        buffer = consumer.buffer
        if buffer:
            # No min() or max() on hot paths: on CPython 3.11 each call costs ten times a
            # conditional expression (0.26 µs against 0.03 µs here).
            count = len(buffer) if len(buffer) < max_messages else max_messages
            if count == 1:  # each step of sync iteration: skip the comprehension's frame
                return True, [buffer.popleft()]
            return True, [buffer.popleft() for _ in range(count)]
        cursor: Cursor = consumer.cursor
        if cursor.manual_ack:
            read_ahead = 0  # a message read ahead would start its ack timeout before anyone saw it
        elif read_ahead and self._journal is not None and consumer.name is not None:
            # A message read ahead counts as taken; on a file that would make a crash lose it.
            read_ahead = 0
        wanted = read_ahead if read_ahead > max_messages else max_messages
        messages = self.take_locked(consumer, cursor, wanted, False)[0]
        if len(messages) > max_messages:
            buffer.extend(messages[max_messages:])
            del messages[max_messages:]
        return bool(messages), messages

    def push_attempt_locked(self, consumer: Any, max_messages: int) -> tuple[bool, tuple[list[Message], int] | None]:
        """One try at a batch for a push consumer: (done, batch); the batch is None once closed."""
        if consumer.closed:
            return True, None
        cursor: Cursor = consumer.cursor
        if len(cursor.members) > 1:
            # Competing consumers: take one at a time, so a burst is shared by whoever is free
            # instead of going whole to the first worker that wakes.
            max_messages = 1
        taken = self.take_locked(consumer, cursor, max_messages, True)
        return bool(taken[0]), taken

    def pull(self, consumer: Any, max_messages: int, timeout: float | None, read_ahead: int = 0) -> list[Message]:
        """Block until the consumer gets at least one message, ``timeout`` passes, or it is closed."""
        deadline = None
        lock = self._lock
        lock.acquire()
        try:
            while True:
                got, messages = self.pull_attempt_locked(consumer, max_messages, read_ahead)
                if got or timeout == 0:
                    break
                remaining = None
                if timeout is not None:
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                self._wait_locked(consumer.cursor, remaining)
            dead = self._take_outbox_locked()
        finally:
            lock.release()
        if dead:
            self.send_dead_letters(dead)
        return messages

    def take_push(self, consumer: Any, max_messages: int, block: bool) -> tuple[list[Message], int] | None:
        """The next batch for a push consumer; None once it is closed."""
        lock = self._lock
        lock.acquire()
        try:
            while True:
                done, taken = self.push_attempt_locked(consumer, max_messages)
                if done or not block:
                    break
                self._wait_locked(consumer.cursor, None)
            dead = self._take_outbox_locked()
        finally:
            lock.release()
        if dead:
            self.send_dead_letters(dead)
        return taken

    def push_done(
        self,
        consumer: Any,
        cursor: Cursor,
        batch: list[Message],
        redelivered: int,
        failures: list[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None:
        """Settle a push batch: successes are acked (auto mode), failures retried or dead-lettered,
        and what was never handed to the callback goes back to the front of the line."""
        lock = self._lock
        lock.acquire()
        try:
            cursor.inflight -= 1
            pending = cursor.pending
            manual = cursor.manual_ack
            failed_offsets = {m[2] for m, _ in failures}
            done = len(batch) - len(unprocessed)
            if not manual:
                for message in batch[: redelivered if redelivered < done else done]:
                    if message[2] not in failed_offsets:
                        pending.pop(message[2], None)
                cursor.acked += done - len(failures)
            for message, error in failures:
                entry = pending.get(message[2])
                if entry is None:
                    if manual:
                        continue  # acked inside the callback before it raised
                    entry = Pending(message, 1, consumer, OUT)
                    pending[message[2]] = entry
                elif entry.state != OUT:
                    continue
                self._fail_locked(cursor, entry, "callback raised", cursor.backoff.delay(entry.attempts), error)
            self._give_back_locked(cursor, unprocessed, pulled=False)
            if self._journal is not None:
                self._sync_locked(cursor, [m[2] for m in batch])
            if unprocessed or failures:
                self._wake_all_locked()
            dead = self._take_outbox_locked()
        finally:
            lock.release()
        self.send_dead_letters(dead)

    def _give_back_locked(self, cursor: Cursor, messages: list[Message], *, pulled: bool) -> None:
        """Undo the delivery of messages a consumer took but never handed to user code.

        They go back to the front of the cursor's line, in order, without counting an attempt.
        """
        if not messages:
            return
        pending = cursor.pending
        cursor.delivered -= len(messages)
        if pulled and not cursor.manual_ack:
            cursor.acked -= len(messages)  # take_locked counted them acked when it returned them
        for i, message in enumerate(messages):
            entry = pending.get(message[2])
            if entry is None:
                entry = Pending(message, 0, None, READY)
                pending[message[2]] = entry
            else:
                entry.attempts -= 1
                if entry.attempts:
                    cursor.redelivered -= 1
            entry.state = READY
            entry.owner = None
            cursor.ready.insert(i, entry)

    # -- acks, seeks and filters ---------------------------------------------------------

    def _pending_entry_locked(self, cursor: Cursor, message: Message | int, verb: str) -> Pending:
        if isinstance(message, Message):
            if message.queue != self.name:
                raise NotPending(
                    f"cannot {verb} a message of queue {message.queue!r} on a subscription to {self.name!r}"
                )
            offset = message[2]
        elif isinstance(message, int) and not isinstance(message, bool):
            offset = message
        else:
            raise InvalidArgument(f"{verb}() takes a Message or its int offset, got {type(message).__name__}")
        entry = cursor.pending.get(offset)
        if entry is None:
            raise NotPending(
                f"offset {offset} of {self.name!r} is not pending on this subscription "
                "(never delivered to it, already acked, or dead-lettered)"
            )
        return entry

    def ack(self, consumer: Any, messages: tuple[Message | int, ...]) -> None:
        """Acknowledge pending messages, all or none, so they are never redelivered."""
        lock = self._lock
        lock.acquire()
        try:
            cursor = self._check_manual_locked(consumer, "ack")
            entries = [self._pending_entry_locked(cursor, message, "ack") for message in messages]
            if len(entries) > 1 and len({id(entry) for entry in entries}) < len(entries):
                raise NotPending(f"ack() was given the same message of {self.name!r} twice; nothing was acked")
            pending = cursor.pending
            for entry in entries:
                del pending[entry.message[2]]
                entry.state = -1
            cursor.acked += len(entries)
            if self._journal is not None:
                self._sync_locked(cursor, [entry.message[2] for entry in entries])
            if not pending:
                cursor.clear_timers_locked()
        finally:
            lock.release()

    def nack(self, consumer: Any, message: Message | int, delay: float) -> None:
        """Give a pending message back for redelivery after ``delay`` seconds of broker clock."""
        with self._lock:
            cursor = self._check_manual_locked(consumer, "nack")
            entry = self._pending_entry_locked(cursor, message, "nack")
            if entry.state != OUT:
                raise NotPending(f"offset {entry.message[2]} of {self.name!r} is already waiting for redelivery")
            self._fail_locked(cursor, entry, "nack", delay, None)
            if entry.state == WAITING:
                self._sync_locked(cursor, (entry.message[2],))
            self._wake_all_locked()
            dead = self._take_outbox_locked()
        self.send_dead_letters(dead)

    def _check_manual_locked(self, consumer: Any, verb: str) -> Cursor:
        if consumer.closed:
            raise SubscriptionClosed(consumer.closed_reason())
        cursor: Cursor = consumer.cursor
        if not cursor.manual_ack:
            raise AckModeError(
                f"{verb}() needs a subscription made with ack='manual'; this one acks automatically "
                "when a message is returned (pull) or its callback returns (push)"
            )
        return cursor

    def _resolve_locked(self, target: Start) -> int:
        if target == "latest":
            return self._end
        start = self._retained_start_locked()
        if target == "earliest":
            return start
        if isinstance(target, datetime):
            stamp = target.timestamp()
            log = self._log
            return bisect_left(range(start, self._end), stamp, key=lambda offset: log.get(offset)[3]) + start
        if isinstance(target, int) and not isinstance(target, bool):
            if target < 0 or target > self._end:
                raise InvalidArgument(
                    f"offset {target} is outside queue {self.name!r}, whose offsets run from 0 to {self._end}"
                )
            return max(target, start)
        raise InvalidArgument(f"start/seek takes 'earliest', 'latest', an int offset or a datetime, got {target!r}")

    def _retained_start_locked(self) -> int:
        self._housekeep_locked()
        return self._start

    def seek(self, consumer: Any, target: Start) -> int:
        """Move the consumer's cursor (shared by every subscription of its name) to ``target``."""
        with self._lock:
            if consumer.closed:
                raise SubscriptionClosed(consumer.closed_reason())
            cursor: Cursor = consumer.cursor
            cursor.position = self._resolve_locked(target)
            if self._journal is not None:
                self._sync_locked(cursor, (), moved=True)
            self._wake_all_locked()
            return cursor.position

    def set_filter(self, consumer: Any, change: Callable[[EventFilter], EventFilter]) -> EventFilter:
        """Replace the cursor's event filter with ``change(current)``."""
        with self._lock:
            if consumer.closed:
                raise SubscriptionClosed(consumer.closed_reason())
            cursor: Cursor = consumer.cursor
            self._apply_filter_locked(cursor, change(cursor.filter))
            self._save_cursor_locked(cursor)
            self._wake_all_locked()
            return cursor.filter

    # -- introspection -------------------------------------------------------------------

    @property
    def config(self) -> QueueConfig:
        """The retention settings in force."""
        with self._lock:
            return self._config

    def configure(self, config: QueueConfig) -> None:
        """Apply new retention settings; they take effect at once."""
        with self._lock:
            self._config = config
            if self._journal is not None:
                self._journal.save_config(attrs.asdict(config))
            self._housekeep_locked()

    @property
    def start_offset(self) -> int:
        """The oldest retained offset (equal to ``end_offset`` when nothing is retained)."""
        with self._lock:
            return self._retained_start_locked()

    @property
    def end_offset(self) -> int:
        """The offset the next published message will get."""
        with self._lock:
            return self._end

    def __len__(self) -> int:
        """How many messages are retained."""
        with self._lock:
            return self._end - self._retained_start_locked()

    def cursor_stats(self, consumer: Any) -> tuple[int, int, int, int]:
        """(position, lag, pending, missed) of a consumer's cursor, read atomically."""
        with self._lock:
            cursor: Cursor = consumer.cursor
            start = self._limit_floor_locked()
            position = cursor.position
            missed = cursor.missed + self._count_locked(cursor, position, start)
            position = max(position, start)
            lag = self._count_locked(cursor, position, self._end)
            return position, lag, len(cursor.pending), missed

    def snapshot(self) -> tuple[Any, list[tuple[Cursor, dict[str, Any]]]]:
        """The queue's figures and each cursor's, taken atomically (used by ``Broker.info``)."""
        with self._lock:
            start = self._retained_start_locked()
            cursors = []
            for cursor in self._all_cursors_locked():
                figures = {
                    "position": cursor.position,
                    "lag": self._count_locked(cursor, cursor.position, self._end),
                    "pending": len(cursor.pending),
                    "delivered": cursor.delivered,
                    "acked": cursor.acked,
                    "redelivered": cursor.redelivered,
                    "dead_lettered": cursor.dead_lettered,
                    "missed": cursor.missed,
                    "events": cursor.filter.spec,
                    "members": list(cursor.members),
                    "manual_ack": cursor.manual_ack,
                }
                cursors.append((cursor, figures))
            return (self._config, start, self._end), cursors

    def push_unsettled(self, offset: int, cursors: list[Cursor] | None = None) -> list[Cursor]:
        """The push cursors that have not yet handled every matching message below ``offset``.

        Checks ``cursors`` (all of this queue's when None) in order and stops at the first one
        still busy, returning it and the unchecked rest: a drain that calls again with the result
        looks at each settled cursor once, not once per wake-up.
        """
        with self._lock:
            candidates = self._all_cursors_locked() if cursors is None else cursors
            start = self._limit_floor_locked()
            for index, cursor in enumerate(candidates):
                if not any(member.is_push for member in cursor.members):
                    continue
                if cursor.unsettled_before_locked(offset) or self._count_locked(
                    cursor, max(cursor.position, start), offset
                ):
                    return candidates[index:]
            return []

    def close(self) -> list[Any]:
        """Refuse further publishes, close every consumer and wake every waiter; returns the consumers."""
        with self._lock:
            self._closed = True
            self._check_at = -1  # every publish now takes the slow path, which refuses it
            members = [member for cursor in self._all_cursors_locked() for member in cursor.members]
            for member in members:
                member.mark_closed("the broker was closed")
            self._wake_all_locked()
        return members
