"""A plain reference model of one queue's delivery contract, for checking a broker against.

The model is written from the documented semantics (docs/concepts.md, docs/guarantees.md,
docs/api.md), not from mqlite's code: a list of published events, and per cursor a position,
an ack mode, a filter, and the pending (delivered, unacked) messages with the order in which
given-back messages are redelivered.

Its scope is what can be decided without threads or time: one queue without limits, that keeps
every message (``retention="limits"``, so ``"earliest"`` is offset 0) or keeps each until every
durable subscription that wants it is done with it (``retention="workqueue"``, see
:meth:`ReferenceModel.start_offset`), pull subscriptions, nacks without a delay, no
``max_deliveries``. Each operation either changes the model and returns
what the broker should return, or raises the exception the broker should raise and changes
nothing, so a caller can do the same operation on both and compare.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import mqlite

__all__ = ["Entry", "ModelCursor", "ModelSub", "ReferenceModel"]

_entry_ids = itertools.count()


def _nothing(label: str) -> None:
    """The default ``note``: the model's observations go nowhere."""


@dataclass
class Entry:
    """One pending message: out with a consumer, or given back and waiting to be read again."""

    offset: int
    owner: int | None  # the subscription holding it, None once given back
    ident: int = field(default_factory=lambda: next(_entry_ids))


@dataclass
class ModelCursor:
    """A cursor: a durable name's, or an ephemeral subscription's own. Not thread-safe."""

    events: frozenset[str] | None  # the filter as a set of its entries; None: every event
    manual: bool
    position: int
    matcher: Callable[[str], bool]
    members: set[int] = field(default_factory=set)
    # Insertion-ordered like the pending set of a real cursor: re-delivering an offset keeps its place.
    pending: dict[int, Entry] = field(default_factory=dict)
    # Given-back entries in the order they will be redelivered; stale ones are skipped.
    ready: list[Entry] = field(default_factory=list)

    def matches(self, event: str) -> bool:
        """Whether this cursor's filter receives ``event``."""
        return self.matcher(event)


@dataclass
class ModelSub:
    """One subscription attached to a cursor. Not thread-safe."""

    id: int
    cursor: ModelCursor
    name: str | None
    open: bool = True


def _filter_set(events: str | Iterable[str] | None) -> frozenset[str] | None:
    if events is None:
        return None
    entries = frozenset([events] if isinstance(events, str) else events)
    return None if entries == {"*"} else entries


def _pattern_matcher(entries: frozenset[str] | None) -> Callable[[str], bool]:
    """Shell-style, case-sensitive, whole-name matching, as docs/concepts.md#event-filters says."""
    if entries is None:
        return lambda event: True
    patterns = tuple(entries)
    return lambda event: any(fnmatchcase(event, pattern) for pattern in patterns)


class ReferenceModel:
    """The expected behaviour of one queue and its cursors. Not thread-safe; use from one thread.

    Args:
        note: called with a short label when the model passes through an interesting state
            (for example ``hypothesis.event``, to see what a run covered). Default: ignored.
        retention: ``"limits"`` (keep everything) or ``"workqueue"``.
    """

    def __init__(self, note: Callable[[str], None] = _nothing, retention: str = "limits") -> None:
        if retention not in ("limits", "workqueue"):
            raise mqlite.InvalidArgument(f"the model knows retention 'limits' and 'workqueue', got {retention!r}")
        self.retention = retention
        self.log: list[str] = []  # event of each offset
        self.named: dict[str, ModelCursor] = {}
        self.subs: dict[int, ModelSub] = {}
        self._note = note
        self._start = 0

    def start_offset(self) -> int:
        """The oldest retained offset, as it is now (it never moves back).

        ``"limits"`` keeps everything: 0. ``"workqueue"`` keeps a message while a cursor (durable,
        or an open ephemeral one) has not read it or holds it pending, and while no durable
        cursor's filter matches it (it waits for the first that will); with no cursor at all,
        everything.
        """
        if self.retention == "workqueue":
            cursors = [*self.named.values(), *(s.cursor for s in self.subs.values() if s.open and s.name is None)]
            marks = [c.position for c in cursors]
            marks.extend(min(c.pending) for c in cursors if c.pending)
            durable = list(self.named.values())
            marks.extend(
                offset
                for offset in range(self._start, len(self.log))
                if not any(c.matches(self.log[offset]) for c in durable)
            )
            self._start = max(self._start, min(marks, default=self._start))
        return self._start

    # -- the log -----------------------------------------------------------------------------

    @property
    def end_offset(self) -> int:
        """The offset the next message will get."""
        return len(self.log)

    def publish(self, events: Iterable[str]) -> list[int]:
        """Append one message per event; returns their offsets, contiguous from ``end_offset``."""
        start = len(self.log)
        self.log.extend(events)
        return list(range(start, len(self.log)))

    def resolve(self, target: str | int) -> int:
        """Where ``start=`` or ``seek()`` puts a cursor: ``"earliest"``, ``"latest"`` or an offset.

        Raises:
            InvalidArgument: an offset above ``end_offset``, or an unknown target.
        """
        end = len(self.log)
        if target == "earliest":
            return self.start_offset()
        if target == "latest":
            return end
        if isinstance(target, int) and not isinstance(target, bool):
            if target > end:
                raise mqlite.InvalidArgument(f"offset {target} is above end_offset {end}")
            return max(target, self.start_offset())
        raise mqlite.InvalidArgument(f"the model takes 'earliest', 'latest' or an int offset, got {target!r}")

    # -- cursors and subscriptions -----------------------------------------------------------

    def check_subscribe(self, *, name: str | None, events: str | Iterable[str] | None, manual: bool) -> None:
        """Raise what ``subscribe`` would for these settings, changing nothing.

        Raises:
            ConfigConflict: ``name`` is open with other settings.
        """
        existing = self.named.get(name) if name is not None else None
        if (
            existing is not None
            and existing.members
            and (existing.events, existing.manual)
            != (
                _filter_set(events),
                manual,
            )
        ):
            raise mqlite.ConfigConflict(f"subscription {name!r} is open with other settings")

    def subscribe(
        self,
        sub_id: int,
        *,
        name: str | None,
        events: str | Iterable[str] | None,
        manual: bool,
        start: str | int | None = None,
        matcher: Callable[[str], bool] | None = None,
    ) -> ModelSub:
        """Attach subscription ``sub_id``: create the cursor at ``start``, or join the named one.

        ``start`` None is ``"earliest"`` for a name on a work queue, ``"latest"`` otherwise.

        ``matcher`` says which events the filter receives; by default the shell-style patterns
        of ``events``. Pass one to check the broker's matching against a hand-written answer.

        Raises:
            ConfigConflict: ``name`` is open with other settings.
            InvalidArgument: a bad ``start``, for a new cursor.
        """
        self.check_subscribe(name=name, events=events, manual=manual)
        entries = _filter_set(events)
        existing = self.named.get(name) if name is not None else None
        match = matcher if matcher is not None else _pattern_matcher(entries)
        if start is None:
            start = "earliest" if name is not None and self.retention == "workqueue" else "latest"
        if existing is None:
            cursor = ModelCursor(entries, manual, self.resolve(start), match)
            if name is not None:
                self.named[name] = cursor
        else:
            # start applies only to a new cursor; the settings of a detached one are replaced.
            cursor = existing
            cursor.events, cursor.manual, cursor.matcher = entries, manual, match
        cursor.members.add(sub_id)
        sub = self.subs[sub_id] = ModelSub(sub_id, cursor, name)
        return sub

    def _open(self, sub_id: int) -> ModelSub:
        sub = self.subs[sub_id]
        if not sub.open:
            raise mqlite.SubscriptionClosed(f"subscription {sub_id} is closed")
        return sub

    def _manual(self, sub_id: int) -> ModelCursor:
        cursor = self._open(sub_id).cursor
        if not cursor.manual:
            raise mqlite.AckModeError(f"subscription {sub_id} acks automatically")
        return cursor

    def close(self, sub_id: int) -> None:
        """Detach ``sub_id``: what it held goes back for redelivery to the name. Idempotent."""
        sub = self.subs[sub_id]
        if not sub.open:
            return
        sub.open = False
        cursor = sub.cursor
        cursor.members.discard(sub_id)
        for entry in list(cursor.pending.values()):
            if entry.owner == sub_id:
                self.give_back(cursor, entry)
            elif entry.owner is not None:
                self._note("closed while another consumer of the name held messages")

    # -- reading -------------------------------------------------------------------------------

    def take(self, sub_id: int, max_messages: int) -> list[int]:
        """What a poll should return: due redeliveries first, then new matching messages.

        Raises:
            SubscriptionClosed: ``sub_id`` is closed.
        """
        cursor = self._open(sub_id).cursor
        out: list[int] = []
        while cursor.ready and len(out) < max_messages:
            entry = cursor.ready.pop(0)
            if cursor.pending.get(entry.offset) is not entry or entry.owner is not None:
                continue  # acked, or superseded by a later delivery of the same offset
            if cursor.manual:
                entry.owner = sub_id
            else:
                del cursor.pending[entry.offset]
            out.append(entry.offset)
        if len(out) > 1:
            self._note("several redeliveries in one poll")
        wanted = max_messages - len(out)
        if wanted:
            log = self.log
            fresh = [o for o in range(cursor.position, len(log)) if cursor.matches(log[o])][:wanted]
            cursor.position = fresh[-1] + 1 if len(fresh) == wanted else len(log)
            for offset in fresh:
                if cursor.manual:
                    cursor.pending[offset] = Entry(offset, sub_id)
            out.extend(fresh)
        return out

    def give_back(self, cursor: ModelCursor, entry: Entry) -> None:
        """Make a pending entry ready for redelivery, after those given back before it."""
        entry.owner = None
        cursor.ready.append(entry)

    def held(self, sub_id: int) -> list[Entry]:
        """The pending entries ``sub_id`` holds now, in delivery order."""
        return [e for e in self.subs[sub_id].cursor.pending.values() if e.owner == sub_id]

    def lag(self, cursor: ModelCursor) -> int:
        """Matching messages between the cursor's position and ``end_offset``."""
        return sum(1 for o in range(cursor.position, len(self.log)) if cursor.matches(self.log[o]))

    # -- settling ------------------------------------------------------------------------------

    def ack(self, sub_id: int, *offsets: int) -> None:
        """Settle pending offsets of ``sub_id``'s cursor, all or none.

        Raises:
            SubscriptionClosed, AckModeError: as the broker does.
            NotPending: an offset is not pending, or appears twice; nothing is acked.
        """
        cursor = self._manual(sub_id)
        if len(set(offsets)) != len(offsets):
            raise mqlite.NotPending(f"an offset appears twice in {offsets}")
        for offset in offsets:
            if offset not in cursor.pending:
                raise mqlite.NotPending(f"offset {offset} is not pending")
        for offset in offsets:
            del cursor.pending[offset]

    def nack(self, sub_id: int, offset: int) -> None:
        """Give a message out with a consumer back for redelivery at once.

        Raises:
            SubscriptionClosed, AckModeError: as the broker does.
            NotPending: not pending, or already given back.
        """
        cursor = self._manual(sub_id)
        entry = cursor.pending.get(offset)
        if entry is None or entry.owner is None:
            raise mqlite.NotPending(f"offset {offset} is not out with a consumer")
        self.give_back(cursor, entry)

    def seek(self, sub_id: int, target: str | int) -> int:
        """Move ``sub_id``'s cursor (shared by its name); pending entries stay pending.

        Raises:
            SubscriptionClosed: ``sub_id`` is closed.
            InvalidArgument: an offset above ``end_offset``.
        """
        cursor = self._open(sub_id).cursor
        cursor.position = self.resolve(target)
        return cursor.position
