"""The per-event index over a queue's retained messages, and the reads and counts it serves."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import Protocol

from mqlite._delivery.cursor import Cursor
from mqlite.filters import EventFilter
from mqlite.message import Message

__all__ = ["EventIndex", "MessageLog", "PushReaders"]

_offset_of = itemgetter(2)  # a Message's offset: the key each event's list is sorted by


class MessageLog(Protocol):
    """The retained messages of one queue, entry ``i`` at offset ``first_offset + i``.

    Not thread-safe: used only inside its engine's queue scope. ``append`` is an attribute so
    that the publish path calls a bound ``list.append`` (or the file's insert) with no frame
    in between.
    """

    @property
    def append(self) -> Callable[[Message], None]: ...

    @property
    def first_offset(self) -> int: ...

    def extend(self, messages: Sequence[Message]) -> None: ...

    def read(self, from_offset: int, to_offset: int) -> list[Message]: ...

    def get(self, offset: int) -> Message: ...

    def drop_before(self, offset: int) -> None: ...

    def __len__(self) -> int: ...


def has_push_member(cursor: Cursor) -> bool:
    """Whether a push subscription reads ``cursor``: only those are what a drain waits for."""
    for member in cursor.members:  # noqa: SIM110  # a plain loop: any() of a generator is a frame more per cursor
        if member._is_push:
            return True
    return False


class PushReaders:
    """What a drain looks at once messages were published: which push cursors read each event,
    and how far every push cursor is known to have handled everything. Not thread-safe: used
    only inside its engine's queue scope, through the queue's :class:`EventIndex`.

    ``base`` is an offset below which every push cursor not in ``dirty`` has handled every
    message it wants, with nothing unsettled (-1: not known). Only a publish can give those
    cursors work without passing through ``dirty`` (a failure, a give-back, a seek, a filter
    change, an attach put the cursor there), so after a publish a drain looks at the cursors
    that read what was published since ``base``, and at ``dirty``: not at every cursor.
    ``cursors`` (every cursor with a push member, in the queue's order), ``unfiltered`` (those
    of them that read every event) and ``by_event`` (each event name: those of the filtered
    ones whose names hold it) are built when a drain needs them; ``cursors`` is None while
    they are stale (a cursor, filter or member changed). ``timed`` holds the cursors whose
    schedule may have a timer (None: not known, look at every push cursor), for
    ``run_until_idle``'s look for the next one.
    """

    __slots__ = ("base", "by_event", "cursors", "dirty", "timed", "unfiltered")

    def __init__(self) -> None:
        self.base = -1
        self.dirty: dict[Cursor, None] = {}  # insertion-ordered, so that drains look in a repeatable order
        self.cursors: list[Cursor] | None = None
        self.unfiltered: list[Cursor] = []
        self.by_event: dict[str, list[Cursor]] = {}
        self.timed: dict[Cursor, None] | None = None

    def build(self, cursors: Iterable[Cursor]) -> list[Cursor]:
        """Find the push cursors among ``cursors`` (all the queue's), and what each reads; return them."""
        push: list[Cursor] = []
        unfiltered: list[Cursor] = []
        by_event: dict[str, list[Cursor]] = {}
        for cursor in cursors:
            if not has_push_member(cursor):
                continue  # drain does not wait for it
            push.append(cursor)
            names = cursor.names
            if names is None:
                unfiltered.append(cursor)
            else:
                for name in names:
                    by_event.setdefault(name, []).append(cursor)
        self.cursors = push
        self.unfiltered = unfiltered
        self.by_event = by_event
        return push

    def stale(self) -> None:
        """A cursor, a filter or a member changed: build again when next needed."""
        self.cursors = None
        self.by_event = {}


class EventIndex:
    """Known event names, each with its retained messages in offset order. Not thread-safe.

    The lists are kept only while some cursor filters by event (``indexed > 0``); otherwise
    every value is None and a publish pays nothing for them. A filtered read slices one list:
    no lookup per message. ``push`` is which push cursors read each name (see :class:`PushReaders`),
    kept in step here, where the names change.
    """

    __slots__ = ("events", "indexed", "log", "push")

    def __init__(self, log: MessageLog) -> None:
        self.log = log
        self.events: dict[str, list[Message] | None] = {}
        self.indexed = 0
        self.push = PushReaders()

    def add_event(self, name: str, cursors: Iterable[Cursor]) -> list[Message] | None:
        """Register a new event name: cursors whose filter matches it start reading it."""
        postings: list[Message] | None = [] if self.indexed else None
        self.events[name] = postings
        push = self.push
        readers = push.cursors
        for cursor in cursors:
            if cursor.names is not None and cursor.filter.matches(name):
                cursor.names.add(name)
                if readers is not None and has_push_member(cursor):
                    push.by_event.setdefault(name, []).append(cursor)
        return postings

    def add(self, messages: Iterable[Message]) -> None:
        """Index appended messages (whose events are all registered)."""
        if not self.indexed:
            return
        events = self.events
        for message in messages:
            postings = events[message[0]]
            assert postings is not None  # indexing is on for every event while indexed
            postings.append(message)

    def apply_filter(self, cursor: Cursor, event_filter: EventFilter) -> None:
        """Give ``cursor`` a new filter, and the names it now reads."""
        was_indexed = cursor.names is not None
        cursor.set_filter(event_filter)
        if event_filter.match_all:
            cursor.names = None
        else:
            cursor.names = {name for name in self.events if event_filter.matches(name)}
        self.change(int(cursor.names is not None) - int(was_indexed))
        self.push.stale()

    def forget(self, cursor: Cursor) -> None:
        """A cursor is gone: it no longer needs the index."""
        self.change(-int(cursor.names is not None))
        push = self.push
        push.stale()
        push.dirty.pop(cursor, None)
        if push.timed is not None:
            push.timed.pop(cursor, None)

    def change(self, delta: int) -> None:
        """Count ``delta`` more (or fewer) cursors that filter; build or drop the lists as needed."""
        before = self.indexed
        self.indexed += delta
        events = self.events
        if before == 0 and self.indexed > 0:
            log = self.log
            index: dict[str, list[Message]] = {name: [] for name in events}
            for message in log.read(log.first_offset, log.first_offset + len(log)):
                index[message[0]].append(message)
            events.update(index)
        elif before > 0 and self.indexed == 0:
            for name in events:
                events[name] = None

    def trim(self, offset: int, cursors: Sequence[Cursor] | None = None) -> None:
        """Forget indexed messages below ``offset``, where the log now starts.

        Given every cursor of the queue, it also forgets the event names with no message left in
        the log, and takes them out of the cursors' ``names``: a queue whose every message has an
        event of its own keeps no more names than its retention keeps messages. A name comes back
        with its next message. While nothing filters, finding those names means reading the log,
        so it looks only when there are more names than messages.
        """
        events = self.events
        if self.indexed:
            gone = []
            for name, postings in events.items():
                if postings:
                    del postings[: bisect_left(postings, offset, key=_offset_of)]
                if not postings:
                    gone.append(name)
        elif cursors is not None and len(events) > len(self.log):
            log = self.log
            kept = {message[0] for message in log.read(log.first_offset, log.first_offset + len(log))}
            gone = [name for name in events if name not in kept]
        else:
            return
        if cursors is None or not gone:
            return
        by_event = self.push.by_event
        for name in gone:
            del events[name]
            by_event.pop(name, None)
        for cursor in cursors:
            if cursor.names is not None:
                cursor.names.difference_update(gone)

    def count(self, cursor: Cursor, from_offset: int, to_offset: int) -> int:
        """How many messages in ``[from_offset, to_offset)`` pass the cursor's filter."""
        if from_offset >= to_offset:
            return 0
        names = cursor.names
        if names is None:
            return to_offset - from_offset
        log = self.log
        first = log.first_offset
        if to_offset - from_offset < len(names) and first <= from_offset and to_offset <= first + len(log):
            # A short range and many names (every message with its own event, a cursor skipped
            # forward by one): reading the range is cheaper than a look in every name's list.
            return sum(1 for message in log.read(from_offset, to_offset) if message[0] in names)
        total = 0
        events = self.events
        for name in names:
            postings = events[name]
            if postings:
                total += bisect_left(postings, to_offset, key=_offset_of) - bisect_left(
                    postings, from_offset, key=_offset_of
                )
        return total

    def read(self, cursor: Cursor, position: int, end: int, max_messages: int) -> list[Message]:
        """Up to ``max_messages`` from ``position`` that pass the filter; moves the cursor past them."""
        names = cursor.names
        if names is None:
            stop = position + max_messages if position + max_messages < end else end
            cursor.position = stop
            return self.log.read(position, stop)
        if not names:
            cursor.position = end
            return []
        events = self.events
        if len(names) == 1:
            for name in names:
                postings = events[name]
                assert postings is not None
                # Start where the cursor's last read ended, if the list still lines up there (a
                # trim, a seek or a filter change moves it): a binary search costs 13 probes for
                # 5,000 entries, each a cache miss on a message and its offset: about 7 µs (and
                # 2,500 instructions) of a poll of 1,000 (docs/benchmarks.md, issue 18).
                i = cursor.index_hint
                if not (
                    i <= len(postings)
                    and (i == 0 or postings[i - 1][2] < position)
                    and (i == len(postings) or postings[i][2] >= position)
                ):
                    i = bisect_left(postings, position, key=_offset_of)
                out = postings[i : i + max_messages]
                cursor.index_hint = i + len(out)
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
