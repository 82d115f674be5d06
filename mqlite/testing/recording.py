"""Recording what a real broker does into a :class:`~mqlite.testing.history.History`.

``record(broker)`` returns a history of the broker's publishes, subscriptions, deliveries,
acks, failures and dead letters from then on, for the checkers of
:mod:`mqlite.testing.checkers`. Each op carries the queue, the offset, the cursor (durable name,
or None), the consumer (``f"#{sub.id}"``), the attempt and the broker clock's ``time()``.

How it hooks in, at no cost to a broker that does not record: it swaps the class of each of the
broker's queue engines for a recording subclass (:class:`_RecordingQueue` mixed into the engine's
own class), and makes the storage open every later queue the same way. A broker that never
records runs exactly the code it ran before; nothing on its hot paths tests a flag. A recording
broker pays one call per op.

Where each op is taken, and why there:

- ``deliver`` of a pull is recorded under the queue's lock, when the engine hands messages to
  the subscription, so competing consumers' deliveries are in the order they were taken.
  Messages that iteration read ahead are recorded when they leave the subscription's buffer
  (under the lock, or in ``async for``'s lock-free fast path); what a close gives back unread
  is never recorded.
- ``deliver`` of a push batch is recorded under the lock when the batch is taken, in take order.
  The messages of a batch cut short (the subscription closed, or a ``BaseException`` stopped the
  worker) that no callback saw are withdrawn when the batch settles: the engine gave them back
  undelivered. ``done`` is recorded when the batch settles.
- ``nack`` (every failed delivery: nack, ack timeout, callback raised, subscription closed) and
  ``dead-letter`` are recorded under the lock where the engine decides them, so an ack timeout
  found by a read comes before the redelivery or the dead letter; the dead-letter queue's
  ``publish`` follows, once the letter is published.
- ``seek`` and ``refilter`` are recorded under the lock, through the engine's
  ``_moved_locked``/``_refiltered_locked`` hooks.
- ``publish``, ``publish-failed``, ``subscribe``, ``ack`` and ``close`` are recorded when the call
  returns (``close``: just before the detach). A delivery may then precede its publish in the
  history; the checkers look publishes up by offset, so they do not mind.

Limits: a history begins when ``record`` is called, so record before the workload (a message
published before and dequeued after shows up as ``unexpected``). On a file, an operation that
fails and is rolled back may leave ops it recorded. An async read on a file whose task is
cancelled while its step runs keeps what it took for the next read; that message is recorded
twice.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import SETTLED, DeadLetter, Pending
from mqlite.clock import Clock
from mqlite.config import QueueConfig, Start, SubscriptionSettings
from mqlite.engine.base import Consumer, DeadLetterSink, QueueEngine
from mqlite.engine.cursors import CursorCore
from mqlite.engine.delivery import DeliveryCore
from mqlite.engine.staging import Staged, TransactionalCore
from mqlite.message import Message, MessageMeta
from mqlite.testing.faults import lost_acks
from mqlite.testing.history import History, Op, OpType

if TYPE_CHECKING:
    from mqlite.broker import Broker

__all__ = ["Recorder", "record"]


def record(broker: Broker) -> History:
    """A :class:`History` of everything ``broker`` does from now on, on every queue, also later ones.

    Works on memory and on a file, for pull and push subscriptions. Each call returns a new
    history; all of them receive every op from the moment they were made.

    Raises:
        TypeError: an engine of the broker does not decide in Python (it is not built on
            ``DeliveryCore``), so there is nothing to hook.
    """
    history = History(clock=broker._clock)
    with broker._lock:
        recorder: Recorder | None = getattr(broker, "_recorder", None)
        if recorder is None:
            recorder = Recorder(broker._clock)
            _install(broker, recorder)
            broker._recorder = recorder  # type: ignore[attr-defined]  # only a recording broker has one
        recorder.add(history)
    return history


class Recorder:
    """Appends each op to every history it records into, with the broker clock's time. Thread-safe."""

    def __init__(self, clock: Clock) -> None:
        self._time = clock.time
        # _lock guards writes of _histories, which is copy-on-write: emit reads it without the lock.
        self._lock = threading.Lock()
        self._histories: tuple[History, ...] = ()

    def add(self, history: History) -> None:
        """Record into ``history`` too, from now on."""
        with self._lock:
            self._histories = (*self._histories, history)

    def emit(self, type: OpType, **fields: Any) -> tuple[Op, ...]:
        """Append one op to every history; the ops appended."""
        time = self._time()
        return tuple(history.append(type, time=time, **fields) for history in self._histories)

    def withdraw(self, ops: Sequence[Op]) -> None:
        """Take back ops emitted too early (see the module's docstring)."""
        if ops:
            for history in self._histories:
                history._withdraw(ops)


def _label(consumer: object) -> str | None:
    ident = getattr(consumer, "id", None)
    return None if ident is None else f"#{ident}"


def _before_take(cursor: Cursor) -> dict[int, tuple[Pending, int]] | None:
    """What a take may redeliver: each pending entry with its attempts now (None: it can only read anew).

    Only entries that are ready, or that a timer makes ready, can be redelivered; without any, a
    take reads every message from the log.
    """
    schedule = cursor.schedule
    if not cursor.pending or not (schedule.ready or schedule.has_timers()):
        return None
    return {offset: (entry, entry.attempts) for offset, entry in cursor.pending.items()}


def _attempts(before: dict[int, tuple[Pending, int]] | None, taken: Sequence[Message]) -> list[int]:
    """Which delivery each message of a take is: a redelivery's new attempt, or 1 for a read from the log.

    A take counts up the attempts of the entries it redelivers; the same offset can come twice
    in one take (redelivered, then read again after a seek back), the second time anew.
    """
    if before is None:
        return [1] * len(taken)
    attempts = []
    seen: set[int] = set()
    for message in taken:
        offset = message[2]
        known = before.get(offset)
        if offset not in seen and known is not None and known[0].attempts != known[1]:
            attempts.append(known[0].attempts)
        else:
            attempts.append(1)
        seen.add(offset)
    return attempts


class _RecordingBuffer(deque[Message]):
    """A subscription's read-ahead buffer that records each message it hands to the user.

    ``attempts`` holds the attempt of each message read ahead, by offset. Thread-safe as a deque
    is: ``popleft`` is atomic, and the recording after it appends to a thread-safe history.
    """

    def __init__(self, engine: _RecordingQueue, consumer: Consumer, items: Iterable[Message] = ()) -> None:
        super().__init__(items)
        self._engine = engine
        self._consumer = consumer
        self.attempts: dict[int, int] = {}

    def popleft(self) -> Message:
        message = super().popleft()
        consumer = self._consumer
        cursor = consumer._cursor
        attempt = self.attempts.pop(message[2], 1)
        self._engine._record_delivery(consumer, cursor, message, attempt, settled=cursor.pull_settles)
        return message

    def take_back(self) -> list[Message]:
        """Empty the buffer without recording: what it held goes back to the cursor unread."""
        pop = super().popleft
        unread = []
        while self:  # one popleft at a time: a racing pop of async iteration gets each message at most once
            try:
                unread.append(pop())
            except IndexError:
                break
        for message in unread:
            self.attempts.pop(message[2], None)
        return unread


# Per thread, the offsets of the originals that the duplicate window returned during the
# publish call in progress (None between calls): those publishes wrote nothing.
_refused = threading.local()


class _RecordingQueue(TransactionalCore):
    """Mixed into an engine's own class (before it) to record what the queue does.

    Never instantiated: :func:`_start_recording` swaps an open engine's class for one with this
    mixin. Thread-safe as the engine is; the methods that end in ``_locked`` run under its lock.
    """

    _recorder: Recorder
    # Per push consumer (by id), the deliver ops of its batch in flight, by offset: withdrawn if
    # the batch gives them back. Written under the lock, read after it by the same worker.
    _pushed: dict[int, dict[int, tuple[Op, ...]]]

    def _record_delivery(
        self, consumer: Consumer, cursor: Cursor, message: Message, attempt: int, *, settled: bool
    ) -> tuple[Op, ...]:
        return self._recorder.emit(
            "deliver",
            queue=self.name,
            subscription=cursor.name,
            consumer=_label(consumer),
            offset=message[2],
            event=message[0],
            key=message.key,
            payload=message[1],
            attempt=attempt,
            settled=settled,
        )

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        _refused.offsets = set()
        try:
            message = super().publish(event, payload, key, headers, dedup_id)
        except Exception as error:
            _refused.offsets = None
            self._publish_failed(event, payload, key, error)
            raise
        self._published((message,))
        return message

    def publish_many(
        self,
        drafts: Sequence[tuple[str, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[Message]:
        _refused.offsets = set()
        try:
            messages = super().publish_many(drafts, dedup_ids)
        except Exception as error:
            _refused.offsets = None
            for event, payload, key, _ in drafts:
                self._publish_failed(event, payload, key, error)
            raise
        self._published(messages)
        return messages

    def _original_locked(self, found: Message, draft: tuple[str, Any, MessageMeta | None]) -> Message:
        # A duplicate the window refused: its publish wrote nothing, so it is no publish op.
        message = super()._original_locked(found, draft)
        offsets: set[int] | None = getattr(_refused, "offsets", None)
        if offsets is not None:
            offsets.add(message[2])
        return message

    def _published(self, messages: Iterable[Message]) -> None:
        """Record the publish of each message appended: not a duplicate the window refused (the
        original's offset), nor a repeat of an id earlier in the same call (the same offset)."""
        refused: set[int] = getattr(_refused, "offsets", None) or set()
        _refused.offsets = None
        seen: set[int] = set()
        for message in messages:
            offset = message[2]
            if offset in refused or offset in seen:
                continue
            seen.add(offset)
            self._recorder.emit(
                "publish",
                queue=self.name,
                offset=message[2],
                event=message[0],
                key=message.key,
                payload=message[1],
            )

    def _publish_failed(self, event: Any, payload: Any, key: Any, error: Exception) -> None:
        self._recorder.emit(
            "publish-failed",
            queue=self.name,
            event=event if isinstance(event, str) else repr(event),
            key=key,
            payload=payload,
            error=repr(error),
        )

    # -- attaching and detaching --------------------------------------------------------------

    def attach(self, consumer: Consumer, name: str | None, start: Start, settings: SubscriptionSettings) -> Cursor:
        if not isinstance(consumer._buffer, _RecordingBuffer):
            consumer._buffer = _RecordingBuffer(self, consumer, consumer._buffer)
        cursor = super().attach(consumer, name, start, settings)
        self._recorder.emit(
            "subscribe",
            queue=self.name,
            subscription=cursor.name,
            consumer=_label(consumer),
            position=cursor.position,
            events=cursor.filter.spec,
            max_deliveries=cursor.max_deliveries,
        )
        return cursor

    def detach(self, consumer: Consumer) -> None:
        cursor = consumer._cursor
        position = cursor.position
        # What read-ahead gives back unread was never handed out: the subscription stopped before it.
        for message in list(consumer._buffer):
            position = message[2] if message[2] < position else position
        self._recorder.emit(
            "close", queue=self.name, subscription=cursor.name, consumer=_label(consumer), position=position
        )
        super().detach(consumer)

    @staticmethod
    def _drain_buffer(consumer: Consumer) -> list[Message]:
        buffer = consumer._buffer
        if isinstance(buffer, _RecordingBuffer):
            return buffer.take_back()
        return CursorCore._drain_buffer(consumer)

    # -- taking -------------------------------------------------------------------------------

    def _pull_locked(self, consumer: Consumer, max_messages: int, read_ahead: int) -> list[Message]:
        buffer = consumer._buffer
        if buffer:  # served from the read-ahead: the buffer records each message it hands out
            return super()._pull_locked(consumer, max_messages, read_ahead)
        cursor = consumer._cursor
        settles = cursor.pull_settles
        before = _before_take(cursor)
        messages = super()._pull_locked(consumer, max_messages, read_ahead)
        if messages:
            read_ahead_now = list(buffer)
            attempts = _attempts(before, messages + read_ahead_now)
            for message, attempt in zip(messages, attempts[: len(messages)], strict=True):
                self._record_delivery(consumer, cursor, message, attempt, settled=settles)
            if read_ahead_now and isinstance(buffer, _RecordingBuffer):
                ahead = zip(read_ahead_now, attempts[len(messages) :], strict=True)
                buffer.attempts.update((message[2], attempt) for message, attempt in ahead)
        return messages

    def _push_batch_locked(self, consumer: Consumer, size: int) -> list[Message]:
        cursor = consumer._cursor
        before = _before_take(cursor)
        batch = super()._push_batch_locked(consumer, size)
        if batch:
            ops = self._pushed.setdefault(consumer.id, {})
            for message, attempt in zip(batch, _attempts(before, batch), strict=True):
                ops[message[2]] = self._record_delivery(consumer, cursor, message, attempt, settled=False)
        return batch

    # -- settling -----------------------------------------------------------------------------

    def push_done(
        self,
        consumer: Consumer,
        batch: list[Message],
        failures: list[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None:
        # The "done" ops go in before the batch settles, so that whoever sees it settled (drain)
        # finds them in the history; they are taken back if settling raises.
        handled = len(batch) - len(unprocessed)
        cursor = consumer._cursor
        done: list[Op] = []
        if not cursor.manual_ack:
            failed = {message[2] for message, _ in failures}
            for message in batch[:handled]:
                if message[2] not in failed:
                    done.extend(
                        self._recorder.emit(
                            "done",
                            queue=self.name,
                            subscription=cursor.name,
                            consumer=_label(consumer),
                            offset=message[2],
                        )
                    )
        lost_acks()  # forget what another broker's faults lost on this thread: only this call's count
        try:
            super().push_done(consumer, batch, failures, unprocessed)
        except BaseException:
            self._recorder.withdraw(done)
            raise
        lost = lost_acks()
        if lost:  # injected faults lost these settles: the broker never took them
            self._recorder.withdraw([op for op in done if op.offset in lost])
        pushed = self._pushed.get(consumer.id, {})
        ops = [pushed.pop(message[2], ()) for message in batch]
        self._recorder.withdraw([op for given_back in ops[handled:] for op in given_back])

    def ack(self, consumer: Consumer, messages: tuple[Message | int, ...]) -> None:
        lost_acks()  # forget what another broker's faults lost on this thread: only this call's count
        super().ack(consumer, messages)
        lost = lost_acks()
        cursor = consumer._cursor
        for message in messages:
            offset = message if isinstance(message, int) else message[2]
            if offset in lost:
                continue  # an injected fault lost this ack: the broker never took it
            self._recorder.emit(
                "ack", queue=self.name, subscription=cursor.name, consumer=_label(consumer), offset=offset
            )

    def _tx_apply_locked(self, part: Staged) -> list[DeadLetter]:
        # A transaction's publishes and acks are recorded as it applies them, under the lock;
        # its nacks through _fail_locked, as every failed delivery is.
        acked = [(cursor, entry.owner, entry.message[2]) for cursor, entries in part.acks.items() for entry in entries]
        dead = super()._tx_apply_locked(part)
        self._published(part.messages)
        for cursor, owner, offset in acked:
            self._recorder.emit("ack", queue=self.name, subscription=cursor.name, consumer=_label(owner), offset=offset)
        return dead

    def _fail_locked(
        self, cursor: Cursor, entry: Pending, reason: str, delay: float, error: BaseException | None
    ) -> None:
        owner = entry.owner
        super()._fail_locked(cursor, entry, reason, delay, error)
        consumer = _label(owner) if owner is not None else _label(cursor.members[0]) if cursor.members else None
        offset = entry.message[2]
        shown = None if error is None else repr(error)
        dead = entry.state == SETTLED  # only a dead letter settles a failed entry
        self._recorder.emit(
            "nack",
            queue=self.name,
            subscription=cursor.name,
            consumer=consumer,
            offset=offset,
            reason=reason,
            error=shown,
            delay=None if dead else delay,
        )
        if dead:
            self._recorder.emit(
                "dead-letter",
                queue=self.name,
                subscription=cursor.name,
                consumer=consumer,
                offset=offset,
                attempt=entry.attempts,
                reason=reason,
                error=shown,
                dead_letter_queue=cursor.dead_letter,
            )

    # -- position and filter ------------------------------------------------------------------

    def _moved_locked(self, consumer: Consumer, cursor: Cursor, before: int) -> None:
        self._recorder.emit(
            "seek",
            queue=self.name,
            subscription=cursor.name,
            consumer=_label(consumer),
            position=before,
            offset=cursor.position,
        )

    def _refiltered_locked(self, consumer: Consumer, cursor: Cursor) -> None:
        self._recorder.emit(
            "refilter",
            queue=self.name,
            subscription=cursor.name,
            consumer=_label(consumer),
            position=cursor.position,
            events=cursor.filter.spec,
        )


# -- installing -----------------------------------------------------------------------------------

# _classes_lock guards _classes: each engine class, and its recording subclass.
_classes_lock = threading.Lock()
_classes: dict[type[DeliveryCore], type[_RecordingQueue]] = {}


def _recording_class(cls: type[DeliveryCore]) -> type[_RecordingQueue]:
    with _classes_lock:
        recording = _classes.get(cls)
        if recording is None:
            recording = type(f"Recording{cls.__name__}", (_RecordingQueue, cls), {"__module__": __name__})
            _classes[cls] = recording
        return recording


def _start_recording(engine: QueueEngine, recorder: Recorder) -> None:
    """Make one open queue engine record into ``recorder``, with what its consumers read ahead."""
    if isinstance(engine, _RecordingQueue):
        return
    if not isinstance(engine, DeliveryCore):
        raise TypeError(
            f"record() hooks into engines built on mqlite.engine.delivery.DeliveryCore; "
            f"{type(engine).__name__} of queue {engine.name!r} is not one"
        )
    with engine._lock:
        recording = _recording_class(type(engine))
        engine._recorder = recorder  # type: ignore[attr-defined]  # the recording class declares it
        engine._pushed = {}  # type: ignore[attr-defined]
        engine.__class__ = recording
        assert isinstance(engine, _RecordingQueue)
        for cursor in engine._all_cursors_locked():
            for member in cursor.members:
                old = member._buffer
                if isinstance(old, _RecordingBuffer):
                    continue
                buffer = _RecordingBuffer(engine, member)
                while old:  # moved one at a time: async iteration may pop from the old buffer meanwhile
                    try:
                        buffer.append(old.popleft())
                    except IndexError:
                        break
                member._buffer = buffer


def _install(broker: Broker, recorder: Recorder) -> None:
    """Make every queue of ``broker`` record, those it opens later too (called under its lock)."""
    storage = broker._engine
    open_queue = storage.open_queue

    def open_recording_queue(name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink) -> QueueEngine:
        engine = open_queue(name, config, clock, dead_letters)
        _start_recording(engine, recorder)
        return engine

    storage.open_queue = open_recording_queue  # type: ignore[method-assign]  # this broker's storage only
    for name, engine in broker._engines.items():
        _start_recording(engine, recorder)
        # Queue binds its engine's publish at construction: bind the recording one.
        broker._queues[name].publish = engine.publish  # type: ignore[method-assign]
