"""A delivery history: what was published, delivered and settled, in order, for the checkers.

A :class:`History` is an append-only list of :class:`Op` records. A recorder wired into the
broker appends them as things happen; a test may also build one by hand. The checkers in
:mod:`mqlite.testing.checkers` then read it, as Jepsen's checkers read a Jepsen history.

Op types, and the fields each one sets beyond ``index``, ``time``, ``type`` and ``queue``:

- ``publish``: a publish returned. ``offset``, ``event``, ``key``, ``payload``.
- ``publish-failed``: a publish raised and whether it was written is unknown (Jepsen's
  ``info``). ``event``, ``key``, ``payload``, ``error``, and ``offset`` if the offset it would
  have taken is known.
- ``subscribe``: a consumer attached to a cursor. ``subscription``, ``consumer``, ``position``
  (the offset the cursor reads next: for a new cursor, its start), ``events`` (the filter as
  given, None for every event), ``max_deliveries``.
- ``refilter``: the cursor's filter changed (``join``/``leave``). ``events`` (the new filter)
  and ``position`` (it applies from there on).
- ``seek``: the cursor moved from ``position`` to ``offset``.
- ``close``: a consumer detached, its cursor at ``position``. It ends an ephemeral cursor; a
  durable one lives on.
- ``deliver``: a message was handed to ``consumer``. ``offset``, ``event``, ``key``,
  ``attempt`` (1 for the first delivery; a redelivery is a ``deliver`` with ``attempt > 1``)
  and ``settled``: True when the delivery settled it on the spot (a pull with ``ack="auto"``).
- ``ack``: a pending message was acknowledged. ``offset``.
- ``done``: a push callback with ``ack="auto"`` returned, which settles its message. ``offset``.
- ``nack``: a delivery failed and the message goes back. ``offset``, ``reason`` (``"nack"``,
  ``"ack timeout"``, ``"subscription closed"``, ``"callback raised"``, or, under injected
  faults, ``"consumer crashed"`` and ``"ack lost"``), ``error``, and
  ``delay`` (the seconds of broker clock it waits before its redelivery, when known).
- ``dead-letter``: the message used up its deliveries and went to ``dead_letter_queue``.
  ``offset`` (in ``queue``), ``attempt`` (the deliveries made), ``reason``, ``error``.
- ``fault``: :class:`~mqlite.testing.Faults` injected a fault. ``fault`` (its kind), and the
  ``subscription``, ``consumer`` and ``offset`` it struck, where it struck one.

A subscription *dequeues* a message when a delivery of it is settled: an ``ack``, a ``done``,
or a ``deliver`` with ``settled=True``.

Every op of a cursor names it by ``subscription``: the durable name, or None for an ephemeral
subscription, whose cursor is then named by its only ``consumer``. A consumer's label is any
str; the recorder uses ``f"#{sub.id}"``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Collection, Iterable, Iterator
from typing import IO, Any, Literal, get_args

import attrs

from mqlite.clock import Clock

__all__ = ["DEQUEUES", "OP_TYPES", "REASONS", "CursorId", "History", "Op", "OpType", "Reason"]

OpType = Literal[
    "publish",
    "publish-failed",
    "subscribe",
    "refilter",
    "seek",
    "close",
    "deliver",
    "ack",
    "done",
    "nack",
    "dead-letter",
    "fault",
]
OP_TYPES: frozenset[str] = frozenset(get_args(OpType))

Reason = Literal["nack", "ack timeout", "subscription closed", "callback raised", "consumer crashed", "ack lost"]
"""Why a delivery failed: the values of the ``dead_letter.reason`` header."""
REASONS: frozenset[str] = frozenset(get_args(Reason))

DEQUEUES: frozenset[str] = frozenset({"ack", "done"})
"""Op types that settle a delivery; a ``deliver`` with ``settled=True`` does too."""

CursorId = tuple[str, str | None, str | None]
"""``(queue, subscription, consumer)``: a durable cursor as ``(queue, name, None)``, an
ephemeral one as ``(queue, None, consumer)``."""


def _events(value: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """A filter as a tuple (a str is one entry), or None for every event."""
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen(kw_only=True)
class Op:
    """One event of a delivery history. Immutable, so thread-safe.

    The fields an op type sets are listed in this module's docstring; the others keep their
    defaults.
    """

    index: int
    """Its position in the history, from 0."""
    time: float
    """The broker clock's ``time()`` when it happened."""
    type: OpType
    queue: str
    subscription: str | None = None
    """The durable name of the cursor, or None for an ephemeral subscription (or a publish)."""
    consumer: str | None = None
    """The label of the subscription object that acted, such as ``"#3"``."""
    offset: int | None = None
    """The message's offset in ``queue``; for a ``seek``, where the cursor went."""
    position: int | None = None
    """The cursor's position: at ``subscribe``, ``refilter`` and ``close``, and before a ``seek``."""
    event: str | None = None
    key: Any = None
    payload: Any = None
    attempt: int | None = None
    """Which delivery of the message this is, from 1; for a dead letter, how many were made."""
    settled: bool = False
    """On a ``deliver``: the delivery itself settled the message (a pull with ``ack="auto"``)."""
    events: tuple[str, ...] | None = attrs.field(default=None, converter=_events)
    """On ``subscribe`` and ``refilter``: the filter as given, None for every event."""
    max_deliveries: int | None = None
    reason: Reason | None = None
    error: str | None = None
    """The exception of a failed publish or of a callback that raised, as ``repr()``."""
    dead_letter_queue: str | None = None
    delay: float | None = None
    """On a ``nack``: the seconds of broker clock before the message is due again, when known."""
    fault: str | None = None
    """On a ``fault``: which fault was injected (see :class:`~mqlite.testing.Faults`)."""

    @property
    def cursor(self) -> CursorId:
        """Which cursor the op belongs to (meaningless for publishes)."""
        return (self.queue, self.subscription, self.consumer if self.subscription is None else None)

    @property
    def redelivery(self) -> bool:
        """Whether this is a ``deliver`` that was not the message's first delivery."""
        return self.type == "deliver" and self.attempt is not None and self.attempt > 1

    @property
    def dequeues(self) -> bool:
        """Whether this op settles a delivery: an ``ack``, a ``done`` or a settling ``deliver``."""
        return self.type in DEQUEUES or (self.type == "deliver" and self.settled)

    def format(self, origin: float = 0.0) -> str:
        """One line: index, time since ``origin``, type, then the fields that are set."""
        where = self.queue if self.offset is None or self.type == "seek" else f"{self.queue}@{self.offset}"
        parts = [f"#{self.index:<4} {self.time - origin:+10.3f}s  {self.type:<14} {where}"]
        if self.subscription is not None or self.consumer is not None:
            parts.append(f"{self.subscription or '(ephemeral)'}/{self.consumer or '?'}")
        if self.event is not None:
            parts.append(repr(self.event))
        for name in ("key", "payload"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.type == "seek":
            parts.append(f"{self.position} -> {self.offset}")
        elif self.position is not None:
            parts.append(f"position={self.position}")
        if self.type in ("subscribe", "refilter"):
            parts.append(f"events={'*' if self.events is None else ','.join(self.events)}")
        for name in ("attempt", "max_deliveries", "reason", "error", "dead_letter_queue", "delay", "fault"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
        if self.settled:
            parts.append("settled")
        return "  ".join(parts)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults, for JSON (the filter as a list)."""
        out: dict[str, Any] = {}
        for field in attrs.fields(Op):
            value = getattr(self, field.name)
            if field.default is attrs.NOTHING or value != field.default:
                out[field.name] = list(value) if field.name == "events" else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Op:
        """The op that :meth:`to_dict` gave ``data`` for.

        Raises:
            ValueError: an unknown field or op type, a missing required field, or a bad reason.
        """
        names = {field.name for field in attrs.fields(Op)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Op fields {sorted(unknown)!r}; an Op has {sorted(names)!r}")
        if data.get("type") not in OP_TYPES:
            raise ValueError(f"op type must be one of {sorted(OP_TYPES)!r}, got {data.get('type')!r}")
        if data.get("reason") is not None and data["reason"] not in REASONS:
            raise ValueError(f"reason must be one of {sorted(REASONS)!r}, got {data['reason']!r}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"not an Op: {error}") from None


class History:
    """An append-only sequence of :class:`Op`, in the order things happened. Thread-safe.

    The recording methods (``publish``, ``deliver``, ``ack``, ...) each append one op with the
    next index and return it. ``time`` is the broker clock's ``time()``; when it is not given,
    the history reads its own ``clock``, or uses 0.0 if it has none (handy for a history built
    by hand). They check nothing: a history records what happened, right or wrong, and the
    checkers judge it.
    """

    def __init__(self, ops: Iterable[Op] = (), *, clock: Clock | None = None) -> None:
        self.clock = clock
        # _lock guards _ops and _next_index.
        self._lock = threading.Lock()
        self._ops: list[Op] = list(ops)
        self._next_index = self._ops[-1].index + 1 if self._ops else 0

    # -- recording ----------------------------------------------------------------------------

    def append(self, type: OpType, *, time: float | None = None, **fields: Any) -> Op:
        """Append an op of ``type`` with ``fields`` (as :class:`Op` names them) and return it."""
        if time is None:
            time = self.clock.time() if self.clock is not None else 0.0
        with self._lock:
            op = Op(index=self._next_index, time=time, type=type, **fields)
            self._ops.append(op)
            self._next_index += 1
        return op

    def publish(
        self,
        *,
        queue: str,
        offset: int,
        event: str,
        key: Any = None,
        payload: Any = None,
        time: float | None = None,
    ) -> Op:
        """A publish returned ``offset``."""
        return self.append("publish", time=time, queue=queue, offset=offset, event=event, key=key, payload=payload)

    def publish_failed(
        self,
        *,
        queue: str,
        event: str,
        error: str,
        key: Any = None,
        payload: Any = None,
        offset: int | None = None,
        time: float | None = None,
    ) -> Op:
        """A publish raised ``error`` (a ``repr()``); whether it was written is unknown."""
        return self.append(
            "publish-failed",
            time=time,
            queue=queue,
            offset=offset,
            event=event,
            key=key,
            payload=payload,
            error=error,
        )

    def subscribe(
        self,
        *,
        queue: str,
        subscription: str | None,
        consumer: str,
        position: int,
        events: Iterable[str] | str | None = None,
        max_deliveries: int | None = None,
        time: float | None = None,
    ) -> Op:
        """``consumer`` attached to the cursor, which reads ``position`` next."""
        return self.append(
            "subscribe",
            time=time,
            queue=queue,
            subscription=subscription,
            consumer=consumer,
            position=position,
            events=events,
            max_deliveries=max_deliveries,
        )

    def refilter(
        self,
        *,
        queue: str,
        subscription: str | None,
        consumer: str | None,
        position: int,
        events: Iterable[str] | str | None,
        time: float | None = None,
    ) -> Op:
        """The cursor's filter became ``events`` while it was at ``position``."""
        return self.append(
            "refilter",
            time=time,
            queue=queue,
            subscription=subscription,
            consumer=consumer,
            position=position,
            events=events,
        )

    def seek(
        self,
        *,
        queue: str,
        subscription: str | None,
        consumer: str | None,
        position: int,
        offset: int,
        time: float | None = None,
    ) -> Op:
        """The cursor moved from ``position`` to ``offset``."""
        return self.append(
            "seek",
            time=time,
            queue=queue,
            subscription=subscription,
            consumer=consumer,
            position=position,
            offset=offset,
        )

    def close(
        self,
        *,
        queue: str,
        subscription: str | None,
        consumer: str,
        position: int,
        time: float | None = None,
    ) -> Op:
        """``consumer`` detached while its cursor was at ``position``."""
        return self.append(
            "close", time=time, queue=queue, subscription=subscription, consumer=consumer, position=position
        )

    def deliver(
        self,
        *,
        queue: str,
        subscription: str | None,
        consumer: str,
        offset: int,
        event: str | None = None,
        attempt: int | None = 1,
        settled: bool = False,
        key: Any = None,
        payload: Any = None,
        time: float | None = None,
    ) -> Op:
        """The message at ``offset`` was handed to ``consumer``, for the ``attempt``-th time."""
        return self.append(
            "deliver",
            time=time,
            queue=queue,
            subscription=subscription,
            consumer=consumer,
            offset=offset,
            event=event,
            key=key,
            payload=payload,
            attempt=attempt,
            settled=settled,
        )

    def ack(
        self,
        *,
        queue: str,
        subscription: str | None,
        offset: int,
        consumer: str | None = None,
        time: float | None = None,
    ) -> Op:
        """The pending message at ``offset`` was acknowledged."""
        return self.append("ack", time=time, queue=queue, subscription=subscription, consumer=consumer, offset=offset)

    def done(
        self,
        *,
        queue: str,
        subscription: str | None,
        consumer: str,
        offset: int,
        time: float | None = None,
    ) -> Op:
        """A push callback with ``ack="auto"`` returned for the message at ``offset``."""
        return self.append("done", time=time, queue=queue, subscription=subscription, consumer=consumer, offset=offset)

    def nack(
        self,
        *,
        queue: str,
        subscription: str | None,
        offset: int,
        consumer: str | None = None,
        reason: Reason = "nack",
        error: str | None = None,
        delay: float | None = None,
        time: float | None = None,
    ) -> Op:
        """A delivery of the message at ``offset`` failed for ``reason``; it is due again after ``delay``."""
        return self.append(
            "nack",
            time=time,
            queue=queue,
            subscription=subscription,
            consumer=consumer,
            offset=offset,
            reason=reason,
            error=error,
            delay=delay,
        )

    def dead_letter(
        self,
        *,
        queue: str,
        subscription: str | None,
        offset: int,
        dead_letter_queue: str,
        attempt: int | None = None,
        consumer: str | None = None,
        reason: Reason | None = None,
        error: str | None = None,
        time: float | None = None,
    ) -> Op:
        """The message at ``offset`` went to ``dead_letter_queue`` after ``attempt`` deliveries."""
        return self.append(
            "dead-letter",
            time=time,
            queue=queue,
            subscription=subscription,
            consumer=consumer,
            offset=offset,
            attempt=attempt,
            reason=reason,
            error=error,
            dead_letter_queue=dead_letter_queue,
        )

    def fault(
        self,
        *,
        queue: str,
        fault: str,
        subscription: str | None = None,
        consumer: str | None = None,
        offset: int | None = None,
        time: float | None = None,
    ) -> Op:
        """An injected fault of kind ``fault`` struck (the message at ``offset`` of a cursor, if any)."""
        return self.append(
            "fault", time=time, queue=queue, subscription=subscription, consumer=consumer, offset=offset, fault=fault
        )

    def _withdraw(self, ops: Collection[Op]) -> None:
        """Take back ops recorded too early: the recorder's deliveries of a push batch that were
        given back before their callback ran. Their indexes stay unused."""
        withdrawn = {id(op) for op in ops}
        with self._lock:
            self._ops = [op for op in self._ops if id(op) not in withdrawn]

    # -- reading ------------------------------------------------------------------------------

    @property
    def ops(self) -> tuple[Op, ...]:
        """Every op so far, oldest first (a snapshot)."""
        with self._lock:
            return tuple(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def __getitem__(self, position: int) -> Op:
        with self._lock:
            return self._ops[position]

    def tail(self, n: int = 30) -> tuple[Op, ...]:
        """The last ``n`` ops, oldest first."""
        with self._lock:
            return tuple(self._ops[-n:]) if n > 0 else ()

    def filter(
        self,
        *,
        type: str | Collection[str] | None = None,
        queue: str | None = None,
        subscription: str | None = None,
        consumer: str | None = None,
        offset: int | None = None,
    ) -> tuple[Op, ...]:
        """The ops that match every criterion given, oldest first.

        ``type`` is an op type or a collection of them. ``subscription=None`` does not select
        ephemeral cursors; it means "any subscription", as for the other criteria.
        """
        types = {type} if isinstance(type, str) else set(type) if type is not None else None
        return tuple(
            op
            for op in self.ops
            if (types is None or op.type in types)
            and (queue is None or op.queue == queue)
            and (subscription is None or op.subscription == subscription)
            and (consumer is None or op.consumer == consumer)
            and (offset is None or op.offset == offset)
        )

    def format(self, last: int | None = 30) -> str:
        """The last ``last`` ops (every op if None), one per line, times relative to the first op."""
        ops = self.ops
        shown = ops if last is None else ops[-last:] if last > 0 else ()
        origin = ops[0].time if ops else 0.0
        head = f"History of {len(ops)} ops" + (f", last {len(shown)}:" if len(shown) < len(ops) else ":")
        return "\n".join([head, *(f"  {op.format(origin)}" for op in shown)])

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"<History of {len(self)} ops>"

    # -- JSON Lines ---------------------------------------------------------------------------

    def to_jsonl(self, target: str | os.PathLike[str] | IO[str]) -> None:
        """Write one JSON object per op to a path or a text file.

        Each object holds the fields that differ from their defaults. A key or payload JSON
        cannot encode is written as its ``repr()``, so it does not come back equal.
        """
        lines = [json.dumps(op.to_dict(), default=repr, ensure_ascii=False) + "\n" for op in self.ops]
        if isinstance(target, str | os.PathLike):
            with open(target, "w", encoding="utf-8") as file:
                file.writelines(lines)
        else:
            target.writelines(lines)

    @classmethod
    def from_jsonl(cls, source: str | os.PathLike[str] | IO[str], *, clock: Clock | None = None) -> History:
        """Read a history :meth:`to_jsonl` wrote (from a path or a text file).

        Raises:
            ValueError: a line is not JSON, or not an op; the message gives its line number.
        """
        if isinstance(source, str | os.PathLike):
            with open(source, encoding="utf-8") as file:
                text = file.read()
        else:
            text = source.read()
        ops = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                ops.append(Op.from_dict(data))
            except ValueError as error:
                raise ValueError(f"line {number} of the history is not an op: {error}") from None
        return cls(ops, clock=clock)
