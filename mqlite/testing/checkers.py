"""Checkers that read a delivery :class:`~mqlite.testing.history.History` and name what went wrong.

The anomalies keep Jepsen's names where Jepsen has them (``lost``, ``duplicated``,
``unexpected``, ``recovered``, ``nonmonotonic``, ``skip``); the rest are mqlite's own
(``acked-redelivered``, ``max-deliveries-exceeded``, ``dead-letter-missing``,
``dead-letter-unexpected``). Each checker looks at one cursor: a durable subscription, named by
``subscription=``, or an ephemeral one, named by its ``consumer=`` label. When the history has a
single cursor, neither is needed.

A subscription *dequeues* a message when a delivery of it is settled: acked, returned by a pull
with ``ack="auto"``, or handled by a push callback with ``ack="auto"`` that returned.

Every checker is a pure function of the ops: it reads a snapshot and keeps no state.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from mqlite.filters import EventFilter
from mqlite.testing.history import CursorId, History, Op

__all__ = ["CheckResult", "Witness", "compose", "order", "redelivery", "total_queue"]

_PUBLISHES = frozenset({"publish", "publish-failed"})
_SHOWN = 10  # witnesses shown per anomaly in an explanation


@attrs.frozen(kw_only=True)
class Witness:
    """One instance of an anomaly: the message it is about, what happened, and the ops that show it.

    Immutable, so thread-safe.
    """

    offset: int | None
    note: str
    ops: tuple[Op, ...] = ()


@attrs.frozen(kw_only=True, eq=False)
class CheckResult:
    """What a checker found. Immutable, so thread-safe.

    Attributes:
        checker: The checker's name, such as ``"total_queue"``.
        subject: The cursor it looked at, in words.
        anomalies: Every anomaly name the checker knows, each with its witnesses (none when it
            did not happen).
        fatal: The anomaly names that make the result invalid.
        figures: Totals that explain the result, such as how many messages were expected.
        parts: For a :func:`compose` result, the results it combines.
        origin: The time of the history's first op; the explanation shows times relative to it.
    """

    checker: str
    subject: str
    anomalies: Mapping[str, tuple[Witness, ...]]
    fatal: frozenset[str]
    figures: Mapping[str, int] = attrs.field(factory=dict)
    parts: tuple[CheckResult, ...] = ()
    origin: float = 0.0

    @property
    def valid(self) -> bool:
        """Whether no fatal anomaly happened, here and in every part."""
        return not any(self.anomalies.get(name) for name in self.fatal) and all(part.valid for part in self.parts)

    @property
    def counts(self) -> dict[str, int]:
        """How many witnesses each anomaly has."""
        return {name: len(witnesses) for name, witnesses in self.anomalies.items()}

    def offsets(self, anomaly: str) -> list[int]:
        """The offsets the witnesses of ``anomaly`` are about, in the order found."""
        return [w.offset for w in self.anomalies[anomaly] if w.offset is not None]

    def explain(self, shown: int = _SHOWN) -> str:
        """The verdict, every count, and up to ``shown`` witnesses of each anomaly with their ops."""
        verdict = "valid" if self.valid else "INVALID"
        if self.parts:
            lines = [f"{self.checker} of {len(self.parts)} checks: {verdict}"]
            lines += ["  " + line for part in self.parts for line in part.explain(shown).splitlines()]
            return "\n".join(lines)
        failed = [name for name in self.fatal if self.anomalies.get(name)]
        lines = [f"{self.checker} of {self.subject}: {verdict}" + (f" ({', '.join(sorted(failed))})" if failed else "")]
        counts = ", ".join(f"{name} {len(witnesses)}" for name, witnesses in self.anomalies.items())
        figures = ", ".join(f"{name} {value}" for name, value in self.figures.items())
        lines.append(f"  {counts}" + (f"  ({figures})" if figures else ""))
        for name, witnesses in self.anomalies.items():
            if not witnesses:
                continue
            allowed = "" if name in self.fatal else ", allowed"
            lines.append(f"  {name} ({len(witnesses)}{allowed}):")
            for witness in witnesses[:shown]:
                where = "" if witness.offset is None else f"offset {witness.offset}: "
                lines.append(f"    {where}{witness.note}")
                lines += [f"        {op.format(self.origin)}" for op in witness.ops]
            if len(witnesses) > shown:
                lines.append(f"    ... and {len(witnesses) - shown} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def assert_valid(self) -> None:
        """Raise AssertionError with the explanation unless the result is valid."""
        if not self.valid:
            raise AssertionError(self.explain())


def compose(*results: CheckResult) -> CheckResult:
    """One result for several: valid when each is, with their witnesses gathered by anomaly name."""
    merged: dict[str, tuple[Witness, ...]] = {}
    for result in results:
        for name, witnesses in result.anomalies.items():
            merged[name] = merged.get(name, ()) + witnesses
    subject = ", ".join(f"{r.checker} of {r.subject}" for r in results)
    return CheckResult(checker="compose", subject=subject, anomalies=merged, fatal=frozenset(), parts=results)


# -- which cursor, and what it should see -------------------------------------------------------


def _cursor_ops(ops: Iterable[Op]) -> Iterable[Op]:
    """The ops of cursors: no publishes, and no fault that struck no consumer (a restart)."""
    return (op for op in ops if op.type not in _PUBLISHES and not (op.type == "fault" and op.consumer is None))


def _select(ops: tuple[Op, ...], subscription: str | None, consumer: str | None, queue: str | None) -> CursorId:
    """The one cursor the arguments name, or the only cursor of the history when they name none."""
    found: dict[CursorId, None] = {}
    for op in _cursor_ops(ops):
        if queue is not None and op.queue != queue:
            continue
        if subscription is not None and op.subscription != subscription:
            continue
        if subscription is None and consumer is not None and (op.subscription is not None or op.consumer != consumer):
            continue
        found[op.cursor] = None
    if len(found) == 1:
        return next(iter(found))
    asked = ", ".join(
        f"{name}={value!r}"
        for name, value in (("subscription", subscription), ("consumer", consumer), ("queue", queue))
        if value is not None
    )
    if not found:
        raise ValueError(f"the history has no ops of a subscription with {asked or 'any name'}")
    names = ", ".join(_subject(cursor) for cursor in found)
    raise ValueError(
        f"{asked or 'no subscription named'}: several cursors match ({names}); name one with "
        "subscription= (a durable name), consumer= (an ephemeral subscription) and queue="
    )


def _subject(cursor: CursorId) -> str:
    queue, name, consumer = cursor
    if name is not None:
        return f"subscription {name!r} on {queue!r}"
    return f"ephemeral subscription {consumer!r} on {queue!r}"


@attrs.define
class _Pass:
    """One pass of a cursor over its queue's log: from where it started to where it stopped.

    ``filters`` holds ``(from_position, filter)`` in the order they took effect; the first
    entry's position is where the pass began. Not thread-safe: one checker's own.
    """

    filters: list[tuple[int, EventFilter]]
    stop: int | None = None  # where the cursor was when the pass ended; None while it goes on

    @property
    def start(self) -> int:
        return self.filters[0][0]

    @property
    def filter(self) -> EventFilter:
        return self.filters[-1][1]

    def wants(self, offset: int, event: str | None) -> bool:
        """Whether the cursor should have read the message at ``offset`` on this pass."""
        if offset < self.start or (self.stop is not None and offset >= self.stop):
            return False
        for since, event_filter in reversed(self.filters):
            if since <= offset:
                return event is not None and event_filter.matches(event)
        return False  # pragma: no cover  # offset >= start, so the first entry always matches


class _Passes:
    """The passes of one cursor, built op by op as a checker walks the history. Not thread-safe.

    A ``subscribe`` that creates the cursor begins a pass; a ``seek`` ends it and begins another
    at the target; a ``close`` of an ephemeral subscription ends it for good. A ``refilter``, or
    a later ``subscribe`` with another filter, changes the filter from its position on.
    """

    def __init__(self, cursor: CursorId) -> None:
        self.cursor = cursor
        self.all: list[_Pass] = []
        self.current: _Pass | None = None

    def feed(self, op: Op) -> None:
        if op.type in _PUBLISHES or op.cursor != self.cursor:
            return
        current = self.current
        if op.type == "subscribe" and op.position is not None:
            event_filter = EventFilter(op.events)
            if current is None:
                self._begin(op.position, event_filter)
            elif event_filter != current.filter:
                current.filters.append((op.position, event_filter))
        elif current is None:
            return
        elif op.type == "refilter" and op.position is not None:
            current.filters.append((op.position, EventFilter(op.events)))
        elif op.type == "seek" and op.offset is not None:
            current.stop = op.position
            self._begin(op.offset, current.filter)
        elif op.type == "close" and op.subscription is None:
            current.stop = op.position
            self.current = None

    def _begin(self, position: int, event_filter: EventFilter) -> None:
        self.current = _Pass([(position, event_filter)])
        self.all.append(self.current)

    def wanted(self, offset: int, event: str | None) -> bool:
        """Whether some pass should have read the message at ``offset``."""
        return any(one.wants(offset, event) for one in self.all)


def _published(ops: tuple[Op, ...], queue: str) -> dict[int, Op]:
    return {op.offset: op for op in ops if op.type == "publish" and op.queue == queue and op.offset is not None}


def _origin(ops: tuple[Op, ...]) -> float:
    return ops[0].time if ops else 0.0


def _no_subscribe(cursor: CursorId) -> ValueError:
    return ValueError(
        f"the history has no 'subscribe' op for {_subject(cursor)}, so it does not say where the "
        "cursor started or what it filters; record the subscribe, or build the history from it"
    )


# -- total_queue --------------------------------------------------------------------------------


def total_queue(
    history: History | Iterable[Op],
    subscription: str | None = None,
    *,
    consumer: str | None = None,
    queue: str | None = None,
    exactly_once: bool = False,
) -> CheckResult:
    """Jepsen's total-queue check for one cursor: was every message it should get dequeued once?

    - ``lost``: published to the queue, matching the filter, at or after the cursor's start (and
      before an ephemeral subscription closed), never dequeued. A message retention dropped
      before the cursor read it counts here, and so does one delivered but never settled:
      check a history that was drained. A dead-lettered message is not lost: it went where the
      contract sends it (:func:`redelivery` judges whether it should have).
    - ``duplicated``: dequeued more than once, for example again after a seek back.
    - ``unexpected``: dequeued, but never published.
    - ``recovered``: dequeued, though its publish raised (a ``publish-failed`` op at that offset,
      or with no offset and the same event, key and payload as the delivery).

    Valid when nothing is lost or unexpected; ``duplicated`` too when ``exactly_once``.

    Raises:
        ValueError: the arguments name no cursor, or several, or the cursor has no
            ``subscribe`` op.
    """
    ops = tuple(history)
    cursor = _select(ops, subscription, consumer, queue)
    published = _published(ops, cursor[0])
    passes = _Passes(cursor)
    delivered: dict[int, Op] = {}
    dequeued: dict[int, list[Op]] = {}
    dead: set[int] = set()
    for op in ops:
        passes.feed(op)
        if op.type in _PUBLISHES or op.cursor != cursor or op.offset is None:
            continue
        if op.type == "deliver":
            delivered.setdefault(op.offset, op)
        if op.dequeues:
            dequeued.setdefault(op.offset, []).append(op)
        elif op.type == "dead-letter":
            dead.add(op.offset)
    if not passes.all:
        raise _no_subscribe(cursor)

    expected = [offset for offset, op in sorted(published.items()) if passes.wanted(offset, op.event)]
    lost = []
    for offset in expected:
        if offset not in dequeued and offset not in dead:
            also = (delivered[offset],) if offset in delivered else ()
            note = "delivered, never settled" if also else "never dequeued"
            lost.append(
                Witness(
                    offset=offset,
                    note=f"published as {published[offset].event!r}, {note}",
                    ops=(published[offset], *also),
                )
            )
    duplicated = [
        Witness(offset=offset, note=f"dequeued {len(settles)} times", ops=tuple(settles))
        for offset, settles in sorted(dequeued.items())
        if len(settles) > 1
    ]
    failed = [op for op in ops if op.type == "publish-failed" and op.queue == cursor[0]]
    unexpected, recovered = [], []
    for offset, settles in sorted(dequeued.items()):
        if offset in published:
            continue
        shown = delivered.get(offset, settles[0])
        source = _failed_publish(failed, offset, shown)
        if source is None:
            unexpected.append(Witness(offset=offset, note="dequeued, never published", ops=(shown,)))
        else:
            failed.remove(source)
            note = f"dequeued, though its publish raised {source.error}"
            recovered.append(Witness(offset=offset, note=note, ops=(source, shown)))
    return CheckResult(
        checker="total_queue",
        subject=_subject(cursor),
        anomalies={
            "lost": tuple(lost),
            "duplicated": tuple(duplicated),
            "unexpected": tuple(unexpected),
            "recovered": tuple(recovered),
        },
        fatal=frozenset({"lost", "unexpected", "duplicated"} if exactly_once else {"lost", "unexpected"}),
        figures={"expected": len(expected), "dequeued": len(dequeued)},
        origin=_origin(ops),
    )


def _failed_publish(failed: list[Op], offset: int, delivery: Op) -> Op | None:
    """The failed publish a dequeue at ``offset`` came from: the one at that offset, else one
    with no offset whose event, key and payload are the delivery's."""
    for op in failed:
        if op.offset == offset:
            return op
    for op in failed:
        if op.offset is None and (op.event, op.key, op.payload) == (delivery.event, delivery.key, delivery.payload):
            return op
    return None


# -- order --------------------------------------------------------------------------------------


def _group_of(key: Any) -> Any:
    """``key`` as a dict key: itself when hashable, else its repr."""
    try:
        hash(key)
    except TypeError:
        return repr(key)
    return key


def order(
    history: History | Iterable[Op],
    subscription: str | None = None,
    *,
    consumer: str | None = None,
    queue: str | None = None,
    per: Literal["subscription", "key"] = "subscription",
) -> CheckResult:
    """Did one cursor's first deliveries go forward through the log, with no gaps?

    Only first deliveries count (``attempt == 1``, or the first delivery of an offset in a pass
    when the attempt is not recorded): a redelivery after a nack is not a reorder. The
    deliveries of every consumer of the cursor count together, since consumers of a shared name
    split it by design. A seek begins afresh at its target. With ``per="key"`` each key's
    messages are checked on their own. Messages that an injected ``delay`` or ``duplicate``
    fault struck (a ``fault`` op) are left out: that fault decided their order.

    - ``nonmonotonic``: a first delivery at or below an offset already first-delivered in the
      pass (or below where the pass began).
    - ``skip``: a message the cursor should have read between two successive first deliveries
      (of its key, with ``per="key"``) and did not; one witness per message passed over. A
      message retention dropped unread shows up here too.

    Raises:
        ValueError: a bad ``per``, the arguments name no cursor or several, or the cursor has
            no ``subscribe`` op.
    """
    if per not in ("subscription", "key"):
        raise ValueError(f"per must be 'subscription' or 'key', got {per!r}")
    ops = tuple(history)
    cursor = _select(ops, subscription, consumer, queue)
    published = _published(ops, cursor[0])
    by_key = per == "key"
    groups: dict[Any, list[int]] = {}
    for offset in sorted(published):
        groups.setdefault(_group_of(published[offset].key) if by_key else None, []).append(offset)
    passes = _Passes(cursor)
    current: _Pass | None = None
    last: dict[Any, tuple[int, Op]] = {}  # per group: the highest offset first-delivered, and by which op
    seen: set[int] = set()
    firsts = 0
    nonmonotonic: list[Witness] = []
    skipped: list[Witness] = []
    excused = {
        op.offset for op in ops if op.type == "fault" and op.cursor == cursor and op.fault in ("delay", "duplicate")
    }
    for op in ops:
        passes.feed(op)
        if passes.current is not current:
            current, last, seen = passes.current, {}, set()
        if op.type != "deliver" or op.cursor != cursor or op.offset is None or current is None:
            continue
        offset = op.offset
        if offset in excused:
            continue
        if not (op.attempt == 1 if op.attempt is not None else offset not in seen):
            continue
        source = published.get(offset)
        group = _group_of(source.key if source is not None else op.key) if by_key else None
        previous = last.get(group)
        floor = previous[0] if previous is not None else current.start - 1
        firsts += 1
        if offset <= floor:
            if previous is not None:
                witness = Witness(offset=offset, note=f"first delivered after {floor} was", ops=(previous[1], op))
            else:
                note = f"first delivered below {current.start}, where the pass began"
                witness = Witness(offset=offset, note=note, ops=(op,))
            nonmonotonic.append(witness)
        else:
            candidates = groups.get(group, [])
            low = bisect.bisect_right(candidates, floor)
            high = bisect.bisect_left(candidates, offset)
            for passed in candidates[low:high]:
                if passed not in seen and passed not in excused and current.wants(passed, published[passed].event):
                    note = f"passed over: {offset} was first delivered right after {floor}"
                    before = (previous[1],) if previous is not None else ()
                    skipped.append(Witness(offset=passed, note=note, ops=(published[passed], *before, op)))
            last[group] = (offset, op)
        seen.add(offset)
    if not passes.all:
        raise _no_subscribe(cursor)
    return CheckResult(
        checker="order" if not by_key else "order per key",
        subject=_subject(cursor),
        anomalies={"nonmonotonic": tuple(nonmonotonic), "skip": tuple(skipped)},
        fatal=frozenset({"nonmonotonic", "skip"}),
        figures={"first deliveries": firsts},
        origin=_origin(ops),
    )


# -- redelivery ---------------------------------------------------------------------------------


@attrs.define
class _Life:
    """One message's deliveries on a cursor, from its first to its settling or dead letter.

    Not thread-safe: one checker's own.
    """

    attempts: int = 0
    status: Literal["out", "failed", "settled", "dead"] = "out"
    last: tuple[Op, ...] = ()  # the ops that brought it to ``status``
    dead_letter_due: bool = False


def redelivery(
    history: History | Iterable[Op],
    subscription: str | None = None,
    *,
    consumer: str | None = None,
    queue: str | None = None,
    max_deliveries: int | None = None,
) -> CheckResult:
    """Were one cursor's redeliveries and dead letters those the contract allows?

    ``max_deliveries`` defaults to what the cursor's latest ``subscribe`` op says.

    - ``acked-redelivered``: delivered again after it was settled (a seek back to it, or an
      injected ``duplicate`` fault, excepted).
    - ``max-deliveries-exceeded``: a delivery beyond ``max_deliveries``, or after the message
      was dead-lettered.
    - ``dead-letter-missing``: a failure with the deliveries used up, and then no dead letter
      (before the next delivery, or by the end of the history).
    - ``dead-letter-unexpected``: a dead letter with deliveries left, after a settle, with no
      failure before it, or with no ``max_deliveries`` at all.

    Raises:
        ValueError: the arguments name no cursor, or several.
    """
    ops = tuple(history)
    cursor = _select(ops, subscription, consumer, queue)
    limit = max_deliveries
    lives: dict[int, _Life] = {}
    found: dict[str, list[Witness]] = {
        "acked-redelivered": [],
        "max-deliveries-exceeded": [],
        "dead-letter-missing": [],
        "dead-letter-unexpected": [],
    }
    replays: set[int] = set()
    for op in _cursor_ops(ops):
        if op.cursor != cursor:
            continue
        if op.type == "subscribe" and max_deliveries is None:
            limit = op.max_deliveries
        elif op.type == "seek" and op.offset is not None:
            target = op.offset
            for offset in [o for o, life in lives.items() if o >= target and life.status in ("settled", "dead")]:
                del lives[offset]  # read again from the log: a new life
        elif op.type == "fault" and op.fault == "duplicate" and op.offset is not None:
            replays.add(op.offset)  # delivered once more after its dequeue: that delivery begins a new life
        if op.offset is None or op.type not in ("deliver", "ack", "done", "nack", "dead-letter"):
            continue
        offset = op.offset
        life = lives.get(offset)
        if op.type == "deliver":
            if life is not None and life.status == "settled" and offset in replays:
                replays.discard(offset)
                life = None
            if life is None:
                life = lives[offset] = _Life()
            elif life.status == "settled":
                found["acked-redelivered"].append(
                    Witness(offset=offset, note="delivered again after it was settled", ops=(*life.last, op))
                )
            elif life.status == "dead":
                note = "delivered again after it was dead-lettered"
                found["max-deliveries-exceeded"].append(Witness(offset=offset, note=note, ops=(*life.last, op)))
            elif life.dead_letter_due:
                note = f"its {life.attempts} deliveries were used up at the failure, and it was delivered again instead"
                found["dead-letter-missing"].append(Witness(offset=offset, note=note, ops=(*life.last, op)))
            life.attempts = op.attempt if op.attempt is not None else life.attempts + 1
            if limit is not None and life.attempts > limit and life.status != "dead":
                note = f"delivery {life.attempts} with max_deliveries={limit}"
                found["max-deliveries-exceeded"].append(Witness(offset=offset, note=note, ops=(op,)))
            life.status, life.last, life.dead_letter_due = ("settled" if op.settled else "out"), (op,), False
        elif life is None:
            if op.type == "dead-letter":
                found["dead-letter-unexpected"].append(
                    Witness(offset=offset, note="dead-lettered, never delivered", ops=(op,))
                )
        elif op.type in ("ack", "done"):
            life.status, life.last = "settled", (*life.last[-1:], op)
        elif op.type == "nack":
            life.status, life.last = "failed", (*life.last[-1:], op)
            life.dead_letter_due = limit is not None and life.attempts >= limit
        else:  # dead-letter
            if not life.dead_letter_due:
                found["dead-letter-unexpected"].append(
                    Witness(offset=offset, note=_why_unexpected(life, limit), ops=(*life.last, op))
                )
            life.status, life.last, life.dead_letter_due = "dead", (op,), False
    for offset, life in sorted(lives.items()):
        if life.dead_letter_due:
            note = f"its {life.attempts} deliveries were used up at the failure, and no dead letter followed"
            found["dead-letter-missing"].append(Witness(offset=offset, note=note, ops=life.last))
    return CheckResult(
        checker="redelivery",
        subject=_subject(cursor) + ("" if limit is None else f" (max_deliveries={limit})"),
        anomalies={name: tuple(witnesses) for name, witnesses in found.items()},
        fatal=frozenset(found),
        figures={"redeliveries": sum(1 for op in ops if op.cursor == cursor and op.redelivery)},
        origin=_origin(ops),
    )


def _why_unexpected(life: _Life, limit: int | None) -> str:
    if life.status == "settled":
        return "dead-lettered after it was settled"
    if life.status == "dead":
        return "dead-lettered twice"
    if limit is None:
        return "dead-lettered, though the subscription has no max_deliveries"
    if life.status == "out":
        return (
            f"dead-lettered while out with a consumer, with no failure recorded ({life.attempts} of {limit} deliveries)"
        )
    return f"dead-lettered after {life.attempts} of {limit} deliveries"
