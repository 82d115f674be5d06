"""Transactions on Redis: staged at each call, checked again and applied by one script at commit.

No lock can be held across processes and machines the way a queue's lock is held in memory, so
a transaction here holds only what its promises need:

- **The queues it publishes to.** ``tx.publish`` hands out the message's final offset, so from
  its first publish to a queue until it ends, the transaction holds that queue (the queue's
  ``tx`` field names it): any other publish to the queue, by any broker, waits for it. A hold
  lapses if the holder's broker dies (its heartbeat key expires).
- **Nothing for acks and nacks.** Each is checked at the call, as the plain call checks, and the
  commit checks every one of them again before it changes anything: if another consumer settled
  one of those messages meanwhile, the commit raises ``NotPending`` and applies nothing.

The commit is one script over every queue the transaction touched (``tx_commit``), so it is
applied all or none. Two transactions that each hold a queue the other wants would wait for each
other for ever; the rule that prevents it is wait-die: a transaction that wants a queue an older
one holds, while itself holding another, gives way with :class:`~mqlite.errors.TransactionConflict`
(a younger one, or one holding nothing, simply waits).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.dedup import check_dedup_id
from mqlite._delivery.entries import DeadLetter
from mqlite.config import DEDUP_MAX_IDS, DEDUP_WINDOW
from mqlite.engine.base import Consumer
from mqlite.engine.codec import encode_fields
from mqlite.engine.redis.consuming import Consuming
from mqlite.engine.redis.wire import ScriptRefusal, optional_field, text
from mqlite.errors import BrokerClosed, NotPending, QueueFull, TransactionConflict, TransactionError
from mqlite.filters import check_event_name
from mqlite.message import Message, MessageMeta, check_header_names, make_meta

if TYPE_CHECKING:
    from mqlite.engine.redis.engine import RedisEngine
    from mqlite.engine.redis.queue import RedisQueue

__all__ = ["Part", "RedisScope", "Transacting"]

_SEQUENCE = itertools.count(1)  # tells apart the transactions of one broker begun at one instant
_FIRST_PAUSE = 0.0005  # a wait for a held queue polls it, doubling the pause up to _LAST_PAUSE
_LAST_PAUSE = 0.02

# The scope of the transaction the calling thread is inside, if any: a plain publish to a queue
# that this very transaction holds would wait for itself, and is refused instead.
_inside = threading.local()

Draft = tuple[str, Any, MessageMeta | None]
"""A checked draft: (event, payload, meta or None)."""


def _pause(queue: Transacting, pause: float) -> float:
    """Wait ``pause`` seconds for a transaction to let go of ``queue``; returns the next pause.

    It polls: the holder is another thread or process, and nothing here can wake us sooner.

    Raises:
        BrokerClosed: the broker was closed meanwhile.
    """
    queue._check_open("publish")
    time.sleep(pause)
    return min(pause * 2, _LAST_PAUSE)


class Part:
    """One queue's staged part of a transaction. Not thread-safe: its transaction's thread only."""

    __slots__ = (
        "acks",
        "args",
        "duplicates",
        "end",
        "held",
        "ids",
        "max_ids",
        "max_messages",
        "messages",
        "nacks",
        "reject",
        "scope",
        "settled",
        "stamp",
        "start",
        "window",
    )

    def __init__(self, scope: RedisScope) -> None:
        self.scope = scope
        self.held = False  # whether the transaction holds the queue (it has published to it)
        self.start = 0  # the queue's bounds when it was taken, for the overflow="reject" check
        self.end = 0
        self.stamp = ""  # the time of the staged messages, as the script takes it
        self.reject = False  # the queue's overflow is "reject", with at most max_messages
        self.max_messages = 0
        self.window = ""  # the duplicate window, as the script takes it
        self.max_ids = ""
        self.messages: list[Message] = []  # to append, from offset ``end`` on
        self.args: list[Any] = []  # five per message: event, payload, key, headers, dedup id or ""
        self.ids: dict[str, Message] = {}  # the dedup ids of staged messages
        self.duplicates = 0  # publishes the duplicate window refused
        self.acks: dict[str, tuple[Cursor, list[int]]] = {}  # cursor id -> (cursor, offsets)
        self.nacks: list[tuple[Cursor, str, int, float, str]] = []  # cursor, its id, offset, delay, consumer id
        self.settled: set[tuple[str, int]] = set()  # (cursor id, offset) acked or nacked here


class RedisScope:
    """The parts of one transaction on Redis, and the holds it has taken. Not thread-safe: its thread only."""

    def __init__(self, engine: RedisEngine) -> None:
        self._engine = engine
        # Wait-die orders transactions by age: the time they began, then their id.
        self._age = (time.time(), f"{engine.broker_id}.{next(_SEQUENCE)}")
        self.holder = f"{self._age[0]!r} {self._age[1]} {engine.live_prefix}{engine.broker_id}"
        """What the queues it holds name as their holder: age, id and its broker's heartbeat key."""
        self._parts: dict[RedisQueue, Part] = {}
        self._ended = False
        _inside.scope = self

    def part(self, queue: RedisQueue) -> Part:
        """``queue``'s part (nothing is taken yet: a publish takes the queue, see :meth:`hold`)."""
        part = self._parts.get(queue)
        if part is None:
            part = self._parts[queue] = Part(self)
        return part

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Around opening a queue inside the transaction: nothing to do, the server made it."""
        yield

    def opened(self, name: str) -> None:
        """The queue ``name`` was created inside the transaction: it stays, as on memory."""

    def hold(self, queue: RedisQueue, part: Part) -> None:
        """Take ``queue`` for this transaction, waiting while another transaction holds it.

        Raises:
            TransactionConflict: an older transaction holds it and this one holds another queue.
            BrokerClosed: the broker was closed meanwhile.
        """
        pause = _FIRST_PAUSE
        while True:
            reply = queue._run("tx_hold", self.holder, queue._now(), repr(DEDUP_WINDOW), str(DEDUP_MAX_IDS))
            if reply[0] == 1:
                break
            other = text(reply[1])
            age, ident, _ = other.split(" ", 2)
            if any(held.held for held in self._parts.values()) and (float(age), ident) < self._age:
                raise TransactionConflict(
                    f"queue {queue.name!r} is held by an older transaction while this one holds another queue; "
                    "nothing was staged: leave the block (discarding the transaction) and run it again"
                )
            pause = _pause(queue, pause)
        _, start, end, last, overflow, max_messages, window, max_ids = reply
        now = float(queue._clock.time())
        part.held = True
        part.start, part.end = int(start), int(end)
        part.stamp = last.decode() if last and float(last) > now else repr(now)  # time never runs back on a queue
        part.reject = overflow == b"reject" and bool(max_messages)
        part.max_messages = int(max_messages) if part.reject else 0
        part.window, part.max_ids = window.decode(), max_ids.decode()

    def commit(self) -> list[tuple[Any, list[DeadLetter]]]:
        """Check everything again and apply it all, in one script; returns no dead letters (it sends them).

        Raises:
            NotPending: a message acked or nacked here was settled by someone else since the call.
            QueueFull, TransactionError: a queue it publishes to filled up, or its hold was lost.
            StorageError: the server could not be reached (the holds are released if it can be).
            Nothing was applied in any of these cases.
        """
        parts = [(queue, part) for queue, part in self._parts.items() if part.held or part.acks or part.nacks]
        try:
            if not parts:
                return []
            replies = self._run_commit(parts)
        except BaseException:
            self._release()
            raise
        finally:
            self._end()
        for (queue, part), (_first, _stamp, letters) in zip(parts, replies, strict=True):
            queue._committed(part, letters)
        return []

    def _run_commit(self, parts: list[tuple[RedisQueue, Part]]) -> Any:
        keys: list[str] = []
        args: list[Any] = [parts[0][0]._now(), self.holder]
        for queue, part in parts:
            keys += queue._keys.all
            args += ["1" if part.held else "0", part.end, part.stamp, part.window, part.max_ids, len(part.messages)]
            args += part.args
            args.append(len(part.acks))
            for cid, (_cursor, offsets) in part.acks.items():
                args += [cid, len(offsets), *offsets]
            args.append(len(part.nacks))
            for _cursor, cid, offset, delay, who in part.nacks:
                args += [cid, offset, repr(delay), who]
        try:
            return self._engine.run_on("tx_commit", keys, args)
        except ScriptRefusal as refusal:
            index, _, detail = refusal.detail.partition(" ")
            name = parts[int(index)][0].name
            if refusal.code == "TXLOST":
                raise TransactionError(
                    f"the transaction lost its hold on queue {name!r} (its broker's heartbeat lapsed and another "
                    "broker published there); nothing was applied"
                ) from None
            if refusal.code == "QUEUEFULL":
                raise QueueFull(
                    f"queue {name!r} holds {detail} of its max_messages and overflow='reject' refuses the "
                    "transaction's publishes; nothing was applied"
                ) from None
            state = "waiting for redelivery" if refusal.code == "WAITING" else "no longer pending"
            raise NotPending(
                f"offset {detail} of {name!r} is {state} on its subscription: it was settled since the "
                "transaction's call (by another consumer, a timeout or a seek); nothing was applied"
            ) from None

    def rollback(self) -> None:
        """Forget every part and release the holds."""
        try:
            self._release()
        finally:
            self._end()

    def _release(self) -> None:
        """Release the holds; if the server cannot be reached, the watcher retries until it can
        (the holder's broker is alive, so the hold would never lapse by itself)."""
        held = [queue for queue, part in self._parts.items() if part.held]
        if held:
            self._engine.release_holds([key for queue in held for key in queue._keys.all], self.holder)

    def _end(self) -> None:
        self._ended = True
        self._parts.clear()
        if getattr(_inside, "scope", None) is self:
            _inside.scope = None


class Transacting(Consuming):
    """The transactional calls of a Redis queue, mixed into ``RedisQueue``; every ``_tx_*`` method
    runs on the transaction's thread and raises, staging nothing, or stages its change."""

    _closed: bool
    duplicates: int

    def _check_open(self, verb: str) -> None:
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot {verb} to {self.name!r}: the broker is closed")

    def _draft(self, event: str, payload: Any, key: Any, headers: Mapping[str, Any] | None) -> tuple[Draft, list[Any]]:
        """A draft checked and encoded: (event, payload, meta) and its four publish-script arguments.

        Raises:
            InvalidName, InvalidArgument, SerializationError: it is not publishable.
        """
        name = str.__str__(check_event_name(event))
        meta = None if key is None and headers is None else make_meta(self.name, key, headers)
        if meta is not None and meta.headers:
            check_header_names(meta.headers)
        fields = encode_fields(
            self._serializer,
            self.name,
            name,
            payload,
            None if meta is None else meta.key,
            {} if meta is None else meta.headers,
        )
        return (name, payload, meta), [name, fields[0], optional_field(fields[1]), optional_field(fields[2])]

    def _built(self, draft: Draft, offset: int, stamp: float) -> Message:
        event, payload, meta = draft
        return tuple.__new__(
            self.message_class,
            (event, payload, offset, stamp) if meta is None else (event, payload, offset, stamp, meta),
        )

    def _original(self, place: Any, draft: Draft) -> Message:
        """The message a refused duplicate returns, from the script's entry of the original; if the
        original is trimmed (a stub without event), the retry's message at the original's offset and time."""
        if place[1] is None:
            return self._built(draft, int(place[0]), float(place[3]))
        return self._message(place)

    def _publishing(self, script: str, *args: Any) -> Any:
        """Run a publish script (the time first, added here at each try), waiting while a
        transaction holds the queue.

        Raises:
            TransactionError: the calling thread's own transaction holds the queue.
        """
        try:
            return self._run(script, self._now(), *args)
        except ScriptRefusal as refusal:
            if refusal.code != "TXBUSY":
                raise
            holder = refusal.detail
        pause = _FIRST_PAUSE
        while True:
            scope = getattr(_inside, "scope", None)
            if scope is not None and scope.holder == holder:
                raise TransactionError(
                    f"inside a transaction, publish to {self.name!r} through the transaction (tx.publish): it "
                    "holds that queue, so a plain publish would wait for the transaction itself"
                )
            pause = _pause(self, pause)
            try:
                return self._run(script, self._now(), *args)
            except ScriptRefusal as refusal:
                if refusal.code != "TXBUSY":
                    raise
                holder = refusal.detail

    def _tx_publish_locked(
        self,
        part: Part,
        event: str,
        payload: Any,
        key: Any,
        headers: Mapping[str, Any] | None,
        dedup_id: object,
    ) -> Message:
        """Check one publish and stage it; returns the message the commit will append.

        The first publish to the queue takes it for the transaction (:meth:`RedisScope.hold`).
        A dedup id published within the window (or staged earlier in the transaction) stages
        nothing and returns the first message with that id.
        """
        draft, fields = self._draft(event, payload, key, headers)
        dedup = None if dedup_id is None else check_dedup_id(dedup_id)
        if dedup is not None and (staged := part.ids.get(dedup)) is not None:
            part.duplicates += 1
            return staged
        self._check_open("publish")
        if not part.held:
            part.scope.hold(self, part)  # type: ignore[arg-type]  # self is a RedisQueue
        if dedup is not None:
            found = self._run("tx_dedup", dedup, part.window, self._now())
            if found:
                part.duplicates += 1
                return self._original(found, draft)
        offset = part.end + len(part.messages)
        if part.reject and offset + 1 - part.start > part.max_messages:
            raise QueueFull(
                f"queue {self.name!r} holds {offset - part.start} of max_messages={part.max_messages}, "
                "counting this transaction's publishes; overflow='reject' refuses one more"
            )
        message = self._built(draft, offset, float(part.stamp))
        part.messages.append(message)
        part.args += [*fields, "" if dedup is None else dedup]
        if dedup is not None:
            part.ids[dedup] = message
        return message

    def _tx_ack_locked(self, part: Part, consumer: Consumer, messages: tuple[Message | int, ...]) -> None:
        """Check an ack as :meth:`ack` does (on the server, now), and stage it."""
        self._check_manual(consumer, "ack")
        offsets = [self._offset(message, "ack") for message in messages]
        if len(set(offsets)) < len(offsets):
            raise NotPending(f"ack() was given the same message of {self.name!r} twice; nothing was acked")
        cid = self._cid(consumer)
        self._check_settleable(part, cid, "ack", offsets)
        part.settled.update((cid, offset) for offset in offsets)
        cursor = consumer._cursor
        part.acks.setdefault(cid, (cursor, []))[1].extend(offsets)

    def _tx_nack_locked(self, part: Part, consumer: Consumer, message: Message | int, delay: float) -> None:
        """Check a nack as :meth:`nack` does (on the server, now), and stage it."""
        self._check_manual(consumer, "nack")
        offset = self._offset(message, "nack")
        cid = self._cid(consumer)
        self._check_settleable(part, cid, "nack", [offset])
        part.settled.add((cid, offset))
        part.nacks.append((consumer._cursor, cid, offset, delay, self._consumer_id(consumer)))

    def _check_settleable(self, part: Part, cid: str, verb: str, offsets: list[int]) -> None:
        for offset in offsets:
            if (cid, offset) in part.settled:
                raise NotPending(f"offset {offset} of {self.name!r} is already acked or nacked in this transaction")
        try:
            self._run("tx_check", cid, verb, *offsets)
        except ScriptRefusal as refusal:
            if refusal.code == "WAITING":
                raise NotPending(
                    f"offset {refusal.detail} of {self.name!r} is already waiting for redelivery"
                ) from None
            raise self._not_pending(refusal.detail) from None

    def _committed(self, part: Part, letters: list[Any]) -> None:
        """After the commit: count the duplicates, wake this broker's waiters, send the dead letters."""
        with self._lock:
            self.duplicates += part.duplicates
            if self._waiters:
                if part.nacks:
                    self._waiters.wake_all()
                else:
                    for event in {m[0] for m in part.messages}:
                        self._waiters.wake_event(event)
        cursors = {cid: cursor for cursor, cid, *_ in part.nacks}
        for cid, who, dead in letters:
            self._send_dead(cursors[text(cid)], dead, text(cid), text(who))
