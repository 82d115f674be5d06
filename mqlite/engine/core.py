"""Every queue operation written once, for the engines that decide in Python (memory, SQLite).

:class:`QueueCore` holds one queue's state: its log and event index, its cursors, its waiters.
Each public method is one operation of :class:`~mqlite.engine.base.QueueEngine`: it takes the
queue's scope (``_lock``: a lock in memory, a lock plus a write transaction on a shared file),
decides with the pure rules of :mod:`mqlite._delivery`, changes state, and lets go. Nothing in
it blocks without a bound or runs user code: messages arrive built, callbacks and serializers
run outside, and dead letters are published after the scope ends.

A persistent engine subclasses it, sets ``durable = True`` and overrides the ``_journal_*``
hooks, which every operation calls at the point where a durable change is made.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from mqlite._delivery import retention
from mqlite._delivery.cursor import Cursor
from mqlite._delivery.dedup import DedupWindow, check_dedup_id
from mqlite._delivery.entries import DeadLetter
from mqlite._delivery.waiters import Waiter, Waiters
from mqlite.clock import Clock
from mqlite.config import QueueConfig, Start
from mqlite.engine.base import Consumer, DeadLetterSink, UnsettledQueues
from mqlite.engine.codec import Fields
from mqlite.engine.index import EventIndex, MessageLog, has_push_member
from mqlite.errors import BrokerClosed, InvalidArgument, QueueFull
from mqlite.filters import check_event_name
from mqlite.message import Message, MessageMeta, check_header_names, make_meta, message_class

__all__ = ["QueueCore", "QueueLock"]

_tuple_new = tuple.__new__
_log = logging.getLogger("mqlite")


class _Unwanted(Exception):
    """Raised inside a fast-path publish whose new event no subscription wants: it is redone on
    the path that counts and logs the drop (the fast path itself has no room for either)."""


class QueueLock(Protocol):
    """The queue's scope: a ``threading.Lock``, or a file lock that is also a transaction."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, *exc_info: object) -> None: ...


class QueueCore:
    """One queue: its log, cursors and waiters. Thread-safe; no user code runs under its lock.

    ``_lock`` guards every attribute and every cursor of this queue. The hot paths (publish,
    pull, push batches, ack) take it with ``acquire()`` and ``try/finally: release()`` instead
    of ``with``: on CPython 3.11 ``with`` binds ``__enter__`` and ``__exit__`` on every entry
    (docs/benchmarks.md has the figures).
    """

    durable = False
    """Whether this engine journals cursors and pending entries (the ``_journal_*`` hooks)."""
    atomic = True
    """Whether a step that raises changed nothing (see :class:`~mqlite.engine.base.QueueEngine`)."""

    def __init__(
        self,
        name: str,
        config: QueueConfig,
        clock: Clock,
        dead_letters: DeadLetterSink,
        log: MessageLog,
        lock: QueueLock | None = None,
    ) -> None:
        self.name = name
        self._lock: QueueLock = lock if lock is not None else threading.Lock()  # type: ignore[assignment]  # a Lock is a QueueLock
        self._config = config
        self._log = log
        self._append = log.append
        self._index = EventIndex(log)
        self._events = self._index.events  # the same dict, bound for the publish path
        self._end = log.first_offset + len(log)
        # _start: the oldest retained offset. Entries in [log.first_offset, _start) are dropped
        # logically and reclaimed in batches.
        self._start = log.first_offset
        self._cursors: dict[str, Cursor] = {}
        self._ephemeral: list[Cursor] = []
        self._waiters = Waiters()
        # Interest retention only: the known events no cursor wants, whose messages are dropped
        # as they are published (counted in dropped). Kept up to date where cursors, filters,
        # events and the retention change; empty while some cursor reads every event.
        self._unwanted: set[str] = set()
        # bool(_unwanted), kept beside it: a bool is what the publish fast path can afford to test
        # (a set's truth costs that path about 1.5% more instructions).
        self._dropping = False
        self.dropped = 0
        # The dedup ids published within the duplicate window, and how many publishes they refused.
        self._dedup = DedupWindow(config.dedup_window, config.dedup_max_ids)
        self._dedup_ids = self._dedup.ids  # the same dict, bound for the publish paths
        self.duplicates = 0
        # A publish at an offset >= _check_at takes the slow path: housekeeping is due, the
        # queue may be full, or the broker is closed (then it is -1).
        self._check_at = 0
        self._closed = False
        self._outbox: list[DeadLetter] = []
        # What lets a drain with nothing to do look at no cursor (see push_unsettled). _push_out
        # counts the push batches taken and not yet settled, of every cursor, attached or not.
        # _push_settled_to is an offset below which every push cursor was found to have handled
        # everything, with nothing since that could give one work again; -1: not known. Whatever
        # can (a push take, a failed delivery, a give-back, a seek, a filter, an attach, a reload)
        # sets it to -1 (through _unsettle_locked); a publish need not, as what it adds lies above.
        self._push_out = 0
        self._push_settled_to = -1
        # The broker's set of queues its drains look at (see watch_settled), or None. The queue
        # is in it unless a drain's first look (drain_start) found it settled, and took it out;
        # then _check_at is its end, so that the first publish after takes the slow path, which
        # puts it back (_make_room_locked), and _push_settled_to keeps the offset of the next
        # housekeeping meanwhile (>= the end: the queue still reads as settled). Whatever else
        # unsettles it puts it back too (_unsettle_locked). So a drain after every publish to a
        # queue costs the queue nothing more (it stays in the set), and the publish fast path
        # makes no test of its own (one cost `publish` 125 instructions, 1.75%). Set once, under _lock.
        self._unsettled: UnsettledQueues | None = None
        # This queue's own Message subclass: every message it builds is one, which is how ack
        # and nack tell a message of this broker from an equal-looking one of another. (One
        # attribute, read by the hot paths too, not a private alias beside it: that made a 30th,
        # and the 30th costs every publish about 9%, CPython 3.11 keeping no more inline.)
        self.message_class = message_class(name)
        self._clock = clock
        self._time = clock.time
        self._monotonic = clock.monotonic
        self._dead_letters = dead_letters

    def open(self) -> None:
        """Finish opening: apply retention once. Engines call it when the queue is set up."""
        with self._lock:
            self._refresh_unwanted_locked()
            self._housekeep_locked()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- journal hooks: no-ops in memory ----------------------------------------------------

    def _journal_cursor_locked(self, cursor: Cursor) -> None:
        """A durable cursor was created or its settings changed."""

    def _journal_sync_locked(
        self, cursor: Cursor, offsets: Sequence[int], inflight: Sequence[int] = (), *, moved: bool = False
    ) -> None:
        """Whether each of ``offsets`` is still pending changed (and the position, if ``moved``)."""

    def _journal_forget_locked(self, name: str) -> None:
        """A durable cursor was deleted."""

    def _journal_config_locked(self, config: QueueConfig) -> None:
        """The queue's settings changed."""

    def _note_dead_in_transit_locked(self, cursor: Cursor, offset: int) -> bool:
        """Whether a dead letter's pending row must stay until the letter is published."""
        return False

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Append one message and return it with its offset.

        With a ``dedup_id`` that was published within the queue's duplicate window, nothing is
        written: the first message with that id is returned (see :meth:`_original_locked`).

        Raises:
            InvalidName: ``event`` is not a non-empty str, or contains a wildcard character.
            InvalidArgument: ``headers`` is not a mapping with str keys, or ``dedup_id`` is not
                a non-empty str.
            QueueFull: the queue has ``overflow="reject"`` and holds ``max_messages``.
            BrokerClosed: the broker was closed.
        """
        if (
            key is not None
            or headers is not None
            or type(event) is not str
            or (dedup_id is not None and type(dedup_id) is not str)  # refused (or made a plain str) there
            or (self._dropping and event in self._unwanted)  # a drop: counted and logged there
        ):
            return self._append_drafts([(event, payload, key, headers)], None if dedup_id is None else [dedup_id])[0]
        lock = self._lock
        try:
            lock.acquire()
            try:
                if dedup_id is not None:
                    found = self._dedup_ids.get(dedup_id)
                    if found is not None or not dedup_id:
                        original = self._duplicate_locked(dedup_id, event, payload, found)
                        if original is not None:
                            return original
                try:
                    postings = self._events[event]
                except KeyError:
                    postings = self._new_event_locked(event)
                offset = self._end
                # Housekeeping due, the queue full, the broker closed, or a drain found the queue
                # settled: the slow path. If it housekept, it may have forgotten the event.
                if offset >= self._check_at and self._make_room_locked(1):
                    postings = self._postings_locked(event)
                message: Message = _tuple_new(self.message_class, (event, payload, offset, self._time()))
                self._append(message)
                self._end = offset + 1
                if postings is not None:
                    postings.append(message)
                if dedup_id is not None:  # DedupWindow.add, inlined: a frame is 10% of a dedup publish
                    ids = self._dedup_ids
                    ids[dedup_id] = message
                    if len(ids) > self._config.dedup_max_ids:
                        self._dedup.expire(message[3])
                if self._waiters:
                    self._waiters.wake_event(event)
            finally:
                lock.release()
        except _Unwanted:  # zero cost until raised (CPython 3.11 exception tables)
            return self._append_drafts([(event, payload, None, None)], None if dedup_id is None else [dedup_id])[0]
        return message

    def _publish_encoded(self, event: str, payload: Any, fields: Fields, dedup_id: str | None = None) -> Message:
        """:meth:`publish` of a plain message whose payload an engine encoded before the lock.

        The same steps as the memory fast path above, which cannot afford the frame that sharing
        this body would cost it (each frame is about 4% of a memory publish).
        """
        lock = self._lock
        try:
            lock.acquire()
            try:
                if dedup_id is not None:
                    found = self._dedup_ids.get(dedup_id)
                    if found is not None or not dedup_id:
                        original = self._duplicate_locked(dedup_id, event, payload, found)
                        if original is not None:
                            return original
                try:
                    postings = self._events[event]
                except KeyError:
                    postings = self._new_event_locked(event)
                offset = self._end
                if offset >= self._check_at and self._make_room_locked(1):
                    postings = self._postings_locked(event)
                message: Message = _tuple_new(self.message_class, (event, payload, offset, self._time()))
                if dedup_id is None:
                    self._write_locked([message], [fields])
                else:
                    self._write_locked([message], [fields], [(dedup_id, offset, message[3])])
                    self._dedup.add(dedup_id, message)  # a frame is little beside the write
                self._end = offset + 1
                if postings is not None:
                    postings.append(message)
                if self._waiters:
                    self._waiters.wake_event(event)
            finally:
                lock.release()
        except _Unwanted:
            return self._append_drafts([(event, payload, None, None)], None if dedup_id is None else [dedup_id])[0]
        return message

    def _duplicate_locked(self, dedup_id: str, event: str, payload: Any, found: Message | None) -> Message | None:
        """The first message published with ``dedup_id`` within the window, if there was one.

        The fast paths come here with a str id that is empty or that the window holds (``found``:
        its offset and time), before they write anything.

        Raises:
            InvalidArgument: ``dedup_id`` is empty.
            InvalidName: ``event`` is new and not a valid name.
            BrokerClosed: the broker was closed.
        """
        if not dedup_id:
            check_dedup_id(dedup_id)
        if self._closed:
            raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        if event not in self._events:
            check_event_name(event)
        found = self._dedup.find(dedup_id, self._time())
        if found is None:
            return None
        self.duplicates += 1
        return self._original_locked(found, (event, payload, None))

    def publish_many(
        self,
        drafts: Sequence[tuple[str, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[Message]:
        """Append ``(event, payload, key, headers)`` drafts at contiguous offsets, all or none.

        ``dedup_ids``, if given, has one id (or None) per draft: a draft whose id is in the
        duplicate window, or repeats an earlier draft's, is not written, and its place in the
        result holds the first message with that id.
        """
        return self._append_drafts(drafts, dedup_ids)

    def _postings_locked(self, event: str) -> list[Message] | None:
        """The index list of a checked ``event``, registering it again if housekeeping forgot it.

        Raises:
            _Unwanted: no subscription wants the event (the event is registered).
        """
        try:
            return self._events[event]
        except KeyError:
            postings = self._register_event_locked(event)
            if event in self._unwanted:
                raise _Unwanted from None
            return postings

    def _new_event_locked(self, event: str) -> list[Message] | None:
        """The fast path met an event it does not know: check the publish may go ahead, then register it.

        Raises:
            _Unwanted: no subscription wants the event (the event is registered).
        """
        check_event_name(event)
        self._make_room_locked(1)  # a refused publish must not register its event
        postings = self._register_event_locked(event)
        if event in self._unwanted:
            raise _Unwanted
        return postings

    def _register_event_locked(self, event: str) -> list[Message] | None:
        """Add a new event name to the index (and, if no cursor wants it, to the unwanted ones)."""
        cursors = self._all_cursors_locked()
        postings = self._index.add_event(event, cursors)
        if self._waiters:
            self._waiters.new_event(event)  # the cursors' sets that match it grew
        if self._config.retention == "interest" and not any(c.names is None or event in c.names for c in cursors):
            self._unwanted.add(event)
        else:
            self._unwanted.discard(event)
        self._dropping = bool(self._unwanted)
        return postings

    def _refresh_unwanted_locked(self) -> None:
        """Work out again which known events no cursor wants (cursors, filters or retention changed)."""
        self._unwanted = self._find_unwanted_locked()
        self._dropping = bool(self._unwanted)

    def _find_unwanted_locked(self) -> set[str]:
        if self._config.retention != "interest":
            return set()
        return self._unwanted_by_locked(self._all_cursors_locked())

    def _unwanted_by_locked(self, cursors: list[Cursor]) -> set[str]:
        """The known events that none of ``cursors`` wants (none, if one of them reads every event)."""
        wanted: set[str] = set()
        for cursor in cursors:
            if cursor.names is None:
                return set()
            wanted |= cursor.names
        return {event for event in self._events if event not in wanted}

    def _check_drafts(
        self, drafts: Sequence[tuple[Any, Any, Any, Mapping[str, Any] | None]], dedup_ids: Sequence[object] | None
    ) -> tuple[list[tuple[str, Any, MessageMeta | None]], list[str | None] | None]:
        """Drafts and their dedup ids checked, before any lock: everything that can fail, and every
        piece of user code (a header mapping's items, a str subclass's hash), runs here."""
        checked: list[tuple[str, Any, MessageMeta | None]] = []
        for event, payload, key, headers in drafts:
            name = str.__str__(check_event_name(event))  # a plain str, whatever subclass came in
            meta = None if key is None and headers is None else make_meta(self.name, key, headers)
            if meta is not None and meta.headers:
                check_header_names(meta.headers)
            checked.append((name, payload, meta))
        if dedup_ids is None:
            return checked, None
        ids = [None if dedup_id is None else check_dedup_id(dedup_id) for dedup_id in dedup_ids]
        if len(ids) != len(checked):
            raise InvalidArgument(f"publish_many got {len(ids)} dedup ids for {len(checked)} messages")
        return checked, ids

    def _append_drafts(
        self,
        drafts: Sequence[tuple[Any, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[object] | None = None,
    ) -> list[Message]:
        checked, ids = self._check_drafts(drafts, dedup_ids)
        if not checked:
            return []
        encoded = self._encode(checked)
        lock = self._lock
        lock.acquire()
        try:
            before = self.dropped
            messages = (
                self._append_locked(checked, encoded)
                if ids is None
                else self._append_once_locked(checked, encoded, ids)
            )
            dropped = self.dropped - before
        finally:
            lock.release()
        if dropped:
            # Logged here, outside the lock: logging handlers are user code.
            _log.debug(
                "queue %r: dropped %d message(s) (event %r) that no subscription wants; retention='interest' "
                "keeps only what a subscription will read (declare one, or use retention='workqueue')",
                self.name,
                dropped,
                messages[-1][0],
            )
        return messages

    def _encode(self, checked: list[tuple[str, Any, MessageMeta | None]]) -> list[Fields] | None:
        """Encode drafts for storage, before the lock (a serializer is user code); None in memory."""
        return None

    def _write_locked(
        self, messages: list[Message], encoded: list[Fields] | None, dedup: list[tuple[str, int, float]] | None = None
    ) -> None:
        """Store appended messages, and the ``(id, offset, at)`` of their dedup ids: all or none,
        raising before anything changed."""
        if len(messages) == 1:
            self._append(messages[0])
        else:
            self._log.extend(messages)

    def _append_once_locked(
        self, checked: list[tuple[str, Any, MessageMeta | None]], encoded: list[Fields] | None, ids: list[str | None]
    ) -> list[Message]:
        """:meth:`_append_locked` of drafts with dedup ids: only those not seen within the window are written."""
        if self._closed:
            raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        now = self._time()
        window = self._dedup
        places: list[int | Message] = []  # for each draft: its index among the fresh, or the original
        fresh: list[int] = []
        first_in_call: dict[str, int] = {}
        for i, dedup_id in enumerate(ids):
            if dedup_id is not None:
                earlier = first_in_call.get(dedup_id)
                if earlier is not None:
                    places.append(earlier)
                    continue
                found = window.find(dedup_id, now)
                if found is not None:
                    places.append(self._original_locked(found, checked[i]))
                    continue
                first_in_call[dedup_id] = len(fresh)
            places.append(len(fresh))
            fresh.append(i)
        duplicates = len(ids) - len(fresh)
        if len(fresh) < len(ids):
            checked = [checked[i] for i in fresh]
            encoded = None if encoded is None else [encoded[i] for i in fresh]
            ids = [ids[i] for i in fresh]
        messages = self._append_locked(checked, encoded, ids) if checked else []
        self.duplicates += duplicates
        return [messages[place] if type(place) is int else place for place in places]  # type: ignore[misc]  # an int indexes, a Message is itself

    def _original_locked(self, found: Message, draft: tuple[str, Any, MessageMeta | None]) -> Message:
        """The message first published with a dedup id seen again (``found``, from the window).

        The window holds the message itself, unless the id was loaded from storage: then the
        retained message, or the stored one; else, retention having dropped it, the retry's own
        event and payload at the original offset and time (a retry carries the same message).
        """
        if found[0] is not None:
            return found
        offset, at = found[2], found[3]
        log = self._log
        if log.first_offset <= offset < self._end:
            return log.get(offset)
        stored = self._stored_original_locked(offset)
        if stored is not None:
            return stored
        event, payload, meta = draft
        cls = self.message_class
        return (
            _tuple_new(cls, (event, payload, offset, at))
            if meta is None
            else _tuple_new(cls, (event, payload, offset, at, meta))
        )

    def _stored_original_locked(self, offset: int) -> Message | None:
        """A message memory no longer holds, from storage, if storage still has it."""
        return None

    def _append_locked(
        self,
        checked: list[tuple[str, Any, MessageMeta | None]],
        encoded: list[Fields] | None,
        ids: list[str | None] | None = None,
    ) -> list[Message]:
        start = self._end
        if start + len(checked) > self._check_at:  # housekeeping due, queue full, or broker closed
            self._make_room_locked(len(checked))
        messages = self._build_locked(checked, start, self._time())
        now = messages[0][3]
        dedup = None if ids is None else [(i, m[2], now) for i, m in zip(ids, messages, strict=True) if i is not None]
        self._store_built_locked(messages, encoded, dedup)
        return messages

    def _build_locked(
        self, checked: Sequence[tuple[str, Any, MessageMeta | None]], start: int, now: float
    ) -> list[Message]:
        """This queue's messages for checked drafts, at offsets from ``start``, stamped ``now``."""
        cls = self.message_class
        return [
            _tuple_new(cls, (event, payload, offset, now))
            if meta is None
            else _tuple_new(cls, (event, payload, offset, now, meta))
            for offset, (event, payload, meta) in enumerate(checked, start)
        ]

    def _store_built_locked(
        self, messages: list[Message], encoded: list[Fields] | None, dedup: list[tuple[str, int, float]] | None
    ) -> None:
        """Append built messages (at the end offset on), with their dedup ids: stored, indexed, readers woken."""
        self._write_locked(messages, encoded, dedup)
        if messages[0][2] <= self._push_settled_to:  # the first publish since a drain found it settled
            self._published_locked()  # (a transaction's publishes come here without _make_room_locked)
        if dedup:
            add = self._dedup.add
            first = messages[0][2]
            for dedup_id, offset, _ in dedup:
                add(dedup_id, messages[offset - first])
        self._end = messages[-1][2] + 1
        events = self._events
        wanted = {message[0] for message in messages}
        for event in wanted:
            if event not in events:
                self._register_event_locked(event)
        self._index.add(messages)
        unwanted = self._unwanted
        if unwanted:
            self.dropped += sum(1 for message in messages if message[0] in unwanted)
        if self._waiters:
            for event in wanted:
                self._waiters.wake_event(event)

    # -- retention --------------------------------------------------------------------------

    def _make_room_locked(self, count: int) -> bool:
        """Before a publish of ``count`` at an offset >= ``_check_at``: whether it housekept.

        Raises:
            BrokerClosed: the broker was closed.
            QueueFull: the queue has ``overflow="reject"`` and no room for ``count`` more.
        """
        if self._closed:
            raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        end = self._end
        if self._check_at == end and end <= self._push_settled_to:
            # The first publish since a drain took the settled queue out of the broker's set.
            self._published_locked()
            if end + count <= self._check_at:
                return False  # no housekeeping due, and not full (_check_at is at most where it would be)
        self._housekeep_locked()
        config = self._config
        if retention.refuses(self._start, self._end, count, config):
            raise QueueFull(
                f"queue {self.name!r} holds {self._end - self._start} of max_messages="
                f"{config.max_messages}; overflow='reject' refuses {count} more"
            )
        return True

    def _limit_floor_locked(self) -> int:
        """The oldest offset the count and age limits allow; moves ``_start`` up to it."""
        log = self._log
        self._start = retention.limit_floor(
            self._start, self._end, self._config, self._time(), lambda offset: log.get(offset)[3]
        )
        return self._start

    def _housekeep_locked(self) -> None:
        end = self._end
        out_of_set = self._check_at == end and end <= self._push_settled_to and self._unsettled is not None
        start = self._limit_floor_locked()
        cursors = self._all_cursors_locked()
        for cursor in cursors:
            if cursor.position < start:
                self._skip_locked(cursor, start)
        end = self._end
        config = self._config
        if config.retention == "workqueue":
            start = self._start = retention.workqueue_floor(start, end, config, self._work_marks_locked(cursors))
        else:
            start = self._start = retention.interest_floor(start, end, config, (c.position for c in cursors))
        if retention.should_reclaim(self._log.first_offset, start, end):
            self._log.drop_before(start)
            self._index.trim(start, cursors)
        if self._dedup or self._dedup.forgot:
            self._expire_dedup_locked()
        check_at = -1 if self._closed else retention.next_check(start, end, len(cursors), self._config)
        if out_of_set:  # the next publish must still take the slow path back in (see __init__)
            self._push_settled_to = check_at if check_at > end else end
            check_at = end
        self._check_at = check_at

    def _expire_dedup_locked(self) -> None:
        """Forget the dedup ids whose window ended (a persistent engine also prunes its rows)."""
        self._dedup.expire(self._time())

    def _work_marks_locked(self, cursors: list[Cursor]) -> list[int]:
        """What a work queue must keep (see :func:`retention.workqueue_floor`): each cursor's
        position and lowest pending offset, and the oldest message no durable cursor wants."""
        marks = [c.position for c in cursors]
        marks.extend(min(c.pending) for c in cursors if c.pending)
        durable = [c for c in cursors if c.name is not None]
        if not durable:
            if self._start < self._end:
                marks.append(self._start)  # no worker yet: every job waits for the first
            return marks
        start = self._start
        unwanted = self._unwanted_by_locked(durable)
        if unwanted:
            # Some cursor filters, so the index keeps every event's messages (see EventIndex).
            for event in unwanted:
                postings = self._events[event]
                if postings:
                    i = bisect_left(postings, start, key=lambda m: m[2])
                    if i < len(postings):
                        marks.append(postings[i][2])
        return marks

    def _skip_locked(self, cursor: Cursor, to: int) -> None:
        """Move a cursor that fell behind the retained range up to ``to``, counting what it missed."""
        cursor.missed += self._index.count(cursor, cursor.position, to)
        cursor.position = to
        if self.durable and cursor.name is not None:
            self._journal_sync_locked(cursor, (), moved=True)

    def _all_cursors_locked(self) -> list[Cursor]:
        return [*self._cursors.values(), *self._ephemeral]

    @property
    def config(self) -> QueueConfig:
        """The retention settings in force."""
        with self._lock:
            return self._config

    def configure(self, config: QueueConfig) -> None:
        """Apply new retention settings; they take effect at once.

        Raises:
            BrokerClosed: the broker was closed; nothing changed.
        """
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot configure queue {self.name!r}: the broker is closed")
            self._journal_config_locked(config)
            self._config = config
            self._dedup.resize(config.dedup_window, config.dedup_max_ids)
            self._refresh_unwanted_locked()
            self._housekeep_locked()

    def bounds(self) -> tuple[int, int]:
        """``(start_offset, end_offset)``, after applying retention."""
        with self._lock:
            self._housekeep_locked()
            return self._start, self._end

    def drain_start(self) -> tuple[int, bool, bool]:
        """What a drain needs as it begins, in one lock section (on a shared file the queue's
        scope reloads first): the end offset (``bounds()[1]``, without the retention pass
        ``bounds`` makes); whether every push cursor is known to have handled everything below
        it, without looking at each (see :meth:`push_unsettled`); and whether a push batch is
        out, so that one of this queue's callbacks may be running.
        """
        lock = self._lock
        lock.acquire()
        try:
            end = self._end
            if end <= self._push_settled_to and not self._closed:
                unsettled = self._unsettled
                if unsettled is not None:
                    # Settled: out of the broker's set until the next publish or whatever else
                    # gives a push cursor work (see __init__).
                    check_at = self._check_at
                    if check_at > end:
                        self._push_settled_to = check_at
                        self._check_at = end
                    unsettled.discard(self)  # type: ignore[arg-type]  # as in watch_settled
                return end, True, False  # settled: no push batch is out
            return end, False, self._push_out > 0
        finally:
            lock.release()

    def watch_settled(self, unsettled: UnsettledQueues) -> bool:
        """Keep ``unsettled`` holding this queue whenever a drain must look at it; True."""
        with self._lock:
            self._unsettle_locked()  # not settled before a drain says so
            self._unsettled = unsettled
            # Every queue made is a DeliveryCore, which is a QueueEngine (this mixin alone is not).
            unsettled.add(self, self._end)  # type: ignore[arg-type]
        return True

    def _published_locked(self) -> None:
        """A publish is about to add messages: forget that every push cursor was settled, and if
        they were, join the broker's set of queues its drains look at again, and give
        ``_check_at`` back the offset ``_push_settled_to`` kept for it. What the cursors had
        handled they still have: a drain looks at those that read what is published (see
        :meth:`push_unsettled`)."""
        settled_to = self._push_settled_to
        end = self._end
        if self._check_at == end and end <= settled_to:  # settled, and out of the broker's set
            unsettled = self._unsettled
            if unsettled is not None:
                self._check_at = settled_to
                unsettled.add(self, end)  # type: ignore[arg-type]  # as in watch_settled
        self._push_settled_to = -1

    def _unsettle_locked(self, cursor: Cursor | None = None) -> None:
        """Something may have given ``cursor`` work (None: any cursor): as :meth:`_published_locked`,
        and the next drain looks at ``cursor`` (None: at every push cursor)."""
        self._published_locked()
        push = self._index.push
        if cursor is None:
            push.base = -1
            push.dirty.clear()
            self._timer_set_locked(None)  # a reload or a close may bring timers: look, to be sure
        else:
            push.dirty[cursor] = None

    def _resolve_locked(self, target: Start) -> int:
        """The offset ``target`` names: ``"earliest"``, ``"latest"``, an offset or a datetime."""
        if target == "latest":
            return self._end
        self._housekeep_locked()
        start = self._start
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
            return target if target > start else start
        raise InvalidArgument(f"start/seek takes 'earliest', 'latest', an int offset or a datetime, got {target!r}")

    # -- waiting ------------------------------------------------------------------------------

    def _register_waiter_locked(self, cursor: Cursor, wake: Callable[[], object]) -> tuple[Waiter, float | None]:
        """A one-shot waiter for what ``cursor`` wants, and how long it may sleep at most."""
        return self._waiters.add(cursor.names, wake), self._due_bound_locked(cursor)

    def _due_bound_locked(self, cursor: Cursor) -> float | None:
        """How long a waiter may sleep before a timer of ``cursor`` falls due (None: no bound).

        A virtual clock wakes every waiter itself when it moves, so it needs no bound.
        """
        if cursor.pending and not self._clock.virtual:
            due = cursor.schedule.next_due()
            if due is not None:
                until_due = due - self._monotonic()
                return until_due if until_due > 0.0 else 0.0
        return None

    def next_due(self, *, push_only: bool = False) -> tuple[bool, float | None]:
        """Whether a push batch is in flight, and the earliest timer of this queue (clock seconds).

        The timers are the cursors' redelivery schedules (ack timeouts, nack delays, retry
        backoff) and, with ``max_age``, when the oldest message ages out; ``push_only`` looks
        only at push cursors' schedules (and, finding none, takes the queue out of the broker's
        timed queues: see :meth:`_timer_set_locked`). Pulled by an autojumping virtual clock
        when everything waits (and by ``run_until_idle``); nothing on the hot paths feeds it.
        Reads no clock.
        """
        inflight = False
        due: float | None = None
        with self._lock:
            if push_only:
                return self._push_due_locked()
            for cursor in self._all_cursors_locked():
                if cursor.inflight:
                    inflight = True
                if not cursor.pending:
                    continue
                when = cursor.schedule.next_due()
                if when is not None and (due is None or when < due):
                    due = when
            max_age = self._config.max_age
            if max_age is not None and self._start < self._end:
                when = self._log.get(self._start)[3] + max_age
                if due is None or when < due:
                    due = when
        return inflight, due

    def _push_due_locked(self) -> tuple[bool, float | None]:
        """:meth:`next_due` of the push cursors: it looks only at those whose schedule may have a
        timer (``PushReaders.timed``), forgets those that have none, and takes the queue out of
        the broker's timed queues when none is left."""
        push = self._index.push
        timed = push.timed
        if timed is None:  # not known: every push cursor with something pending
            cursors = push.cursors if push.cursors is not None else push.build(self._all_cursors_locked())
            timed = push.timed = dict.fromkeys(cursor for cursor in cursors if cursor.pending)
        due: float | None = None
        for cursor in list(timed):
            when = cursor.schedule.next_due() if cursor.pending and has_push_member(cursor) else None
            if when is None:
                del timed[cursor]
            elif due is None or when < due:
                due = when
        if not timed and self._unsettled is not None:
            self._unsettled.discard_timed(self)  # type: ignore[arg-type]  # as in watch_settled
        return self._push_out > 0, due

    def _timer_set_locked(self, cursor: Cursor | None) -> None:
        """``cursor``'s schedule got a timer (an ack timeout, a retry delay; None: any cursor's
        may have): ``run_until_idle`` looks at it until :meth:`next_due` finds it has none."""
        push = self._index.push
        if cursor is None:
            push.timed = None
        elif push.timed is not None:
            push.timed[cursor] = None
        unsettled = self._unsettled
        if unsettled is not None:
            unsettled.add_timed(self)  # type: ignore[arg-type]  # as in watch_settled

    def remove_waiter(self, waiter: Waiter | None) -> None:
        """Forget a waiter that was not woken; a woken one is already gone."""
        if waiter is None:
            return
        lock = self._lock
        lock.acquire()
        try:
            self._waiters.discard(waiter)
        finally:
            lock.release()

    def wake_all(self) -> None:
        """Wake every waiter so it re-checks (the clock moved, or the broker is closing)."""
        with self._lock:
            self._waiters.wake_all()

    # -- dead letters -------------------------------------------------------------------------

    def _take_outbox_locked(self) -> list[DeadLetter]:
        outbox = self._outbox
        if outbox:
            self._outbox = []
        return outbox

    def _send_dead_letters(self, dead: list[DeadLetter]) -> None:
        """Publish dead letters to their queues, then settle them. Called with no lock held.

        On a file, a dead letter's pending row is deleted only once its publish has committed.
        One that could not be published keeps its row: it is delivered again after a restart.
        """
        if not dead:
            return
        settle = [(letter.subscription, letter.message[2]) for letter in self._dead_letters(dead)]
        if not any(name is not None for name, _ in settle):
            return
        with self._lock:
            for name, offset in settle:
                cursor = self._cursors.get(name) if name is not None else None
                if cursor is not None and offset in cursor.dead_in_transit:
                    cursor.dead_in_transit.discard(offset)
                    self._journal_sync_locked(cursor, (offset,))

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> list[Consumer]:
        """Refuse further publishes, close every consumer and wake every waiter; returns the consumers."""
        with self._lock:
            return self._close_locked()

    def _close_locked(self) -> list[Consumer]:
        self._closed = True
        self._unsettle_locked()  # a closed queue is never settled (drain_start): drains look at it
        self._check_at = -1  # every publish now takes the slow path, which refuses it
        members = [member for cursor in self._all_cursors_locked() for member in cursor.members]
        for member in members:
            member._mark_closed("the broker was closed")
        self._waiters.wake_all()
        return members
