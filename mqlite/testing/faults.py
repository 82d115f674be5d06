"""Seeded faults, injected into a real broker within its delivery contract.

``Broker(faults=Faults(seed=7, duplicate=0.1, crash=0.05))`` makes the broker suffer, at the
given rate per opportunity, the faults a real deployment suffers, so that a test finds the
consumer that only works when nothing goes wrong. Every fault keeps mqlite's at-least-once
contract: nothing acked is lost, and whatever a fault takes from a consumer comes back.

The faults, and their opportunities:

- ``duplicate``: a message that a subscription has dequeued (acked, returned under auto-ack, or
  its callback returned) is delivered to it once more, as a new first delivery: a replay, as
  Kafka replays from the last committed offset after a rebalance. At most once per message and
  subscription. Opportunity: each dequeue.
- ``delay``: a message is held back for up to ``max_delay`` seconds of broker clock before its
  first delivery, so that later messages overtake it. At most once per message and
  subscription. Opportunity: each first delivery.
- ``drop_ack``: an ack (manual, or the automatic one when a push callback returns) never
  reaches the broker. The message stays out: it comes back when its ``ack_timeout`` passes, or
  at once without one, as a redelivery that counts towards ``max_deliveries`` (reason
  ``"ack lost"``). Opportunity: each message acked.
- ``crash``: the consumer dies holding messages. A pull consumer dies in the ``get``, ``poll``,
  iteration step or ``ack`` that drew the fault, which raises :class:`SimulatedCrash` (a
  :class:`~mqlite.SubscriptionClosed`); a push consumer dies after its callback returned and
  before the batch was settled, and its callbacks stop. Either way it is closed, and what it
  held goes to the other consumers of its name (reason ``"consumer crashed"``): subscribe again
  to carry on, as a restarted worker would. Opportunity: each take that returns messages, and
  each ``ack`` call, of a pull consumer; each push batch.
- ``restart`` (on a file only): the broker restarts, as after its process was killed. Every
  subscription is closed (its calls raise ``SubscriptionClosed``, saying the broker
  restarted); ephemeral subscriptions are gone, durable ones keep their place in the file, and
  what was out with a consumer is delivered again, its attempts unchanged. The broker itself
  stays usable: subscribe again. Opportunity: each message published.

Whether a fault strikes is decided from the seed and the opportunity itself (the queue, the
subscription, the offset, the attempt), never from the order in which threads got there. So
the same seed with the same program injects the same faults, with threads too, as long as the
program publishes and consumes the same messages. :attr:`Faults.log` lists every fault
injected; a history from :func:`~mqlite.testing.record` has a ``fault`` op for each.

How it hooks in, at no cost to brokers without faults: like ``record()``, it swaps the class of
each queue engine the broker opens for a subclass with the fault sites. It needs engines built
on :class:`~mqlite.engine.delivery.DeliveryCore`, as memory and files are.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import attrs

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, READY, Pending
from mqlite.clock import Clock
from mqlite.config import QueueConfig
from mqlite.engine.base import Attempt, Consumer, DeadLetterSink, QueueEngine
from mqlite.engine.delivery import DeliveryCore
from mqlite.errors import InvalidArgument, SubscriptionClosed
from mqlite.message import Message, original

if TYPE_CHECKING:
    from mqlite.broker import Broker

__all__ = ["FAULT_KINDS", "FaultKind", "Faults", "InjectedFault", "SimulatedCrash"]

FaultKind = Literal["duplicate", "delay", "drop_ack", "crash", "restart"]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)


class SimulatedCrash(SubscriptionClosed):
    """Raised by the pull call in which :class:`Faults` made its consumer crash.

    The subscription is closed; what it held goes to the other consumers of its name. Later
    calls on it raise a plain :class:`~mqlite.SubscriptionClosed`.
    """


@attrs.frozen
class InjectedFault:
    """One fault that :class:`Faults` injected. Immutable."""

    index: int
    """Its position in :attr:`Faults.log`, from 0."""
    kind: FaultKind
    time: float
    """The broker clock's ``time()`` when it struck."""
    queue: str
    subscription: str | None = None
    """The durable name it struck, or None (an ephemeral subscription, or a restart)."""
    consumer: str | None = None
    """The label of the subscription object it struck, such as ``"#3"``."""
    offset: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = self.queue if self.offset is None else f"{self.queue}@{self.offset}"
        who = "" if self.consumer is None else f" {self.subscription or '(ephemeral)'}/{self.consumer}"
        return f"fault #{self.index} {self.kind} {where}{who}" + (f": {self.detail}" if self.detail else "")


def _check_rate(kind: str, rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise InvalidArgument(f"Faults({kind}=) is a probability per opportunity in [0, 1], got {rate!r}")
    return float(rate)


class Faults:
    """Seeded faults for ``Broker(faults=...)``; see this module's docstring for each kind.

    Args:
        seed: decides, with each opportunity, whether a fault strikes there.
        duplicate, delay, drop_ack, crash, restart: the rate of each fault, a probability in
            [0, 1] per opportunity (0, the default: never).
        max_delay: the longest hold of a ``delay`` fault, in seconds of broker clock.

    Thread-safe. One ``Faults`` serves one broker.

    Raises:
        InvalidArgument: a rate outside [0, 1], a seed that is not an int, or a ``max_delay``
            that is not a positive finite number.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        duplicate: float = 0.0,
        delay: float = 0.0,
        drop_ack: float = 0.0,
        crash: float = 0.0,
        restart: float = 0.0,
        max_delay: float = 5.0,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgument(f"Faults(seed=) must be an int, got {seed!r}")
        if isinstance(max_delay, bool) or not isinstance(max_delay, (int, float)) or not 0 < max_delay < math.inf:
            raise InvalidArgument(f"Faults(max_delay=) must be a positive number of seconds, got {max_delay!r}")
        self.seed = seed
        self.max_delay = float(max_delay)
        given = {"duplicate": duplicate, "delay": delay, "drop_ack": drop_ack, "crash": crash, "restart": restart}
        self.rates: Mapping[FaultKind, float] = {kind: _check_rate(kind, given[kind]) for kind in FAULT_KINDS}
        self.enabled = True
        """Set it False to inject nothing more (for example while a test looks at the outcome)."""
        # _lock guards _log and _broker.
        self._lock = threading.Lock()
        self._log: list[InjectedFault] = []
        self._broker: Broker | None = None

    def __repr__(self) -> str:
        rates = ", ".join(f"{kind}={rate}" for kind, rate in self.rates.items() if rate)
        return f"Faults(seed={self.seed}{', ' if rates else ''}{rates})"

    @property
    def log(self) -> list[InjectedFault]:
        """Every fault injected so far, in order (a copy)."""
        with self._lock:
            return list(self._log)

    def strikes(self, kind: FaultKind, *where: object) -> float | None:
        """Whether a ``kind`` fault strikes at the opportunity ``where``: a number in [0, 1)
        drawn from the seed and ``where`` if it does (for the fault to size itself), else None."""
        rate = self.rates[kind]
        if rate <= 0.0 or not self.enabled:
            return None
        digest = hashlib.blake2b(repr((self.seed, kind, where)).encode(), digest_size=8).digest()
        draw = int.from_bytes(digest, "big") / 2**64
        return draw / rate if draw < rate else None

    def _note(
        self,
        kind: FaultKind,
        time: float,
        queue: str,
        *,
        cursor: Cursor | None = None,
        consumer: Consumer | None = None,
        offset: int | None = None,
        detail: str = "",
    ) -> InjectedFault:
        with self._lock:
            fault = InjectedFault(
                len(self._log),
                kind,
                time,
                queue,
                None if cursor is None else cursor.name,
                None if consumer is None else f"#{consumer.id}",
                offset,
                detail,
            )
            self._log.append(fault)
        return fault

    def _attach(self, broker: Broker) -> None:
        """Serve ``broker`` (called by it, once, before it opens a queue)."""
        with self._lock:
            if self._broker is not None:
                raise InvalidArgument(f"{self!r} already serves another broker; make one Faults per broker")
            if self.rates["restart"] and not broker._engine.capabilities.persistent:
                raise InvalidArgument(
                    "Faults(restart=) needs a broker on a file: a broker in memory keeps nothing across a restart"
                )
            self._broker = broker
        storage = broker._engine
        open_queue = storage.open_queue

        def open_faulty_queue(
            name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink
        ) -> QueueEngine:
            engine = open_queue(name, config, clock, dead_letters)
            _make_faulty(engine, self)
            return engine

        storage.open_queue = open_faulty_queue  # type: ignore[method-assign]  # this broker's storage only

    def _restart(self, queue: str, offset: int) -> None:
        """Restart the broker: close every subscription of every queue, as a killed process would."""
        broker = self._broker
        if broker is None:
            return
        fault = self._note("restart", broker._clock.time(), queue, offset=offset, detail="after this publish")
        with broker._lock:
            engines = list(broker._engines.values())
        for engine in engines:
            if isinstance(engine, _FaultyQueue):
                engine._restart(fault)


# Per thread, the offsets whose ack (or push callback's automatic one) the last ack or push_done
# on this thread lost to a fault: a recording broker records no ack for them.
_lost = threading.local()


def lost_acks() -> tuple[int, ...]:
    """The offsets whose acks the last ``ack``/``push_done`` call on this thread lost (and forget them)."""
    offsets: tuple[int, ...] = getattr(_lost, "offsets", ())
    _lost.offsets = ()
    return offsets


def _cursor_key(cursor: Cursor, consumer: Consumer) -> str:
    """A cursor's name for deciding faults: its durable name, or its only consumer's id."""
    return cursor.name if cursor.name is not None else f"~{consumer.id}"


class _FaultyQueue(DeliveryCore):
    """Mixed into an engine's own class (before it): the fault sites. Never instantiated.

    Thread-safe as the engine is. What the sites keep (``_replayed``, ``_delayed``: the messages
    each cursor had a fault of that kind for, by cursor key and offset) is guarded by the
    queue's lock.
    """

    _faults: Faults
    _replayed: set[tuple[str, int]]
    _delayed: set[tuple[str, int]]

    def _fault_op(self, fault: InjectedFault) -> None:
        """Put ``fault`` into the histories of a recording broker."""
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            recorder.emit(
                "fault",
                queue=self.name,
                subscription=fault.subscription,
                consumer=fault.consumer,
                offset=fault.offset,
                fault=fault.kind,
            )

    def _inject_locked(
        self, kind: FaultKind, cursor: Cursor | None, consumer: Consumer | None, offset: int | None, detail: str = ""
    ) -> InjectedFault:
        fault = self._faults._note(
            kind, self._time(), self.name, cursor=cursor, consumer=consumer, offset=offset, detail=detail
        )
        self._fault_op(fault)
        return fault

    # -- publish: restart ---------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        message = super().publish(event, payload, key, headers, dedup_id)
        self._maybe_restart((message,))
        return message

    def publish_many(
        self,
        drafts: Sequence[tuple[str, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[Message]:
        messages = super().publish_many(drafts, dedup_ids)
        self._maybe_restart(messages)
        return messages

    def _maybe_restart(self, messages: Sequence[Message]) -> None:
        for message in messages:
            if self._faults.strikes("restart", self.name, message[2]) is not None:
                self._faults._restart(self.name, message[2])
                return

    def _restart(self, fault: InjectedFault) -> None:
        """Close every consumer as a restart would: ephemeral cursors go, held messages wait."""
        why = f"the broker restarted ({fault} by {self._faults!r})"
        with self._lock:
            for cursor in self._all_cursors_locked():
                for member in list(cursor.members):
                    held = [offset for offset, entry in cursor.pending.items() if entry.owner is member]
                    self._detach_locked(member, None, why)
                    if held and self.durable and cursor.name is not None:
                        self._journal_sync_locked(cursor, held)
            dead = self._take_outbox_locked()
        self._send_dead_letters(dead)

    # -- taking: delay, and duplicate under auto-ack pulls --------------------------------------

    def _take_locked(self, consumer: Consumer, cursor: Cursor, max_messages: int, push: bool) -> list[Message]:
        out = super()._take_locked(consumer, cursor, max_messages, push)
        if not out:
            return out
        faults = self._faults
        key = _cursor_key(cursor, consumer)
        pending = cursor.pending
        if faults.rates["delay"]:
            held = []
            for message in out:
                entry = pending.get(message[2])
                first = entry is None or entry.attempts <= 1
                if first and (key, message[2]) not in self._delayed:
                    draw = faults.strikes("delay", self.name, key, message[2])
                    if draw is not None:
                        held.append((message, draw * faults.max_delay))
            if held:
                out = self._hold_back_locked(consumer, cursor, out, held, push)
        if not push and cursor.pull_settles and faults.rates["duplicate"]:
            for message in out:
                self._replay_locked(consumer, cursor, key, message)
        return out

    def _hold_back_locked(
        self, consumer: Consumer, cursor: Cursor, out: list[Message], held: list[tuple[Message, float]], push: bool
    ) -> list[Message]:
        """Take ``held`` out of a take, each due again after its delay, as if never taken."""
        offsets = {message[2] for message, _ in held}
        self._give_back_locked(cursor, [message for message, _ in held], pulled=not push)
        now = self._monotonic()
        key = _cursor_key(cursor, consumer)
        for message, delay in held:
            self._delayed.add((key, message[2]))
            cursor.schedule.wait_until(cursor.pending[message[2]], now + delay)
            self._timer_set_locked(cursor)
            self._inject_locked("delay", cursor, consumer, message[2], f"held back {delay:.3f} s")
        if self.durable and cursor.name is not None:
            self._journal_sync_locked(cursor, sorted(offsets))
        kept = [message for message in out if message[2] not in offsets]
        if push and not kept:
            cursor.inflight -= 1  # the take counted a batch that is now empty
            self._push_out -= 1
        return kept

    def _replay_locked(self, consumer: Consumer, cursor: Cursor, key: str, message: Message) -> None:
        """Maybe deliver a just-dequeued ``message`` once more (a ``duplicate`` fault)."""
        if (key, message[2]) in self._replayed or message[2] in cursor.pending:
            return
        if self._faults.strikes("duplicate", self.name, key, message[2]) is None:
            return
        self._replayed.add((key, message[2]))
        entry = Pending(original(message), 0, None, READY)
        cursor.pending[message[2]] = entry
        cursor.schedule.make_ready(entry)
        self._unsettle_locked(cursor)  # work for the cursor that no publish brought: drains look at it
        self._inject_locked("duplicate", cursor, consumer, message[2], "delivered once more")
        if self.durable and cursor.name is not None:
            self._journal_sync_locked(cursor, (message[2],))
        self._waiters.wake_all()

    # -- pull consumers: crash on a take -------------------------------------------------------

    def try_pull(self, consumer: Consumer, max_messages: int, read_ahead: int) -> list[Message]:
        messages = super().try_pull(consumer, max_messages, read_ahead)
        if messages:
            self._maybe_crash(consumer, "take", messages[0])
        return messages

    def pull_or_wait(self, consumer: Consumer, max_messages: int, read_ahead: int, wake: Any) -> Attempt[list[Message]]:
        attempt = super().pull_or_wait(consumer, max_messages, read_ahead, wake)
        if attempt.value:
            try:
                self._maybe_crash(consumer, "take", attempt.value[0])
            except SimulatedCrash:
                self.remove_waiter(attempt.waiter)
                raise
        return attempt

    def _maybe_crash(self, consumer: Consumer, site: str, message: Message | int) -> None:
        offset = message if isinstance(message, int) else message[2]
        if self._faults.strikes("crash", self.name, consumer.id, site, offset) is None:
            return
        with self._lock:
            cursor = consumer._cursor
            entry = cursor.pending.get(offset)
            attempt = entry.attempts if entry is not None else 1
            if consumer.closed:
                return
            fault = self._inject_locked("crash", cursor, consumer, offset, f"in its {site} (delivery {attempt})")
            why = f"it crashed ({fault} by {self._faults!r})"
            self._detach_locked(consumer, "consumer crashed", why)
            dead = self._take_outbox_locked()
        self._send_dead_letters(dead)
        raise SimulatedCrash(consumer._closed_reason())

    # -- acks: crash, drop_ack, duplicate --------------------------------------------------------

    def ack(self, consumer: Consumer, messages: tuple[Message | int, ...]) -> None:
        faults = self._faults
        _lost.offsets = ()
        first = messages[0] if messages else None
        if (
            isinstance(first, (int, Message))
            and not isinstance(first, bool)
            and not consumer._is_push
            and consumer._cursor.manual_ack
        ):
            self._maybe_crash(consumer, "ack", first)
        dropped: list[int] = []
        if faults.rates["drop_ack"] and messages:
            with self._lock:
                cursor = self._check_manual_locked(consumer, "ack")
                entries = [self._pending_entry_locked(cursor, message, "ack") for message in messages]
                key = _cursor_key(cursor, consumer)
                for entry in entries:
                    if faults.strikes("drop_ack", self.name, key, entry.message[2], entry.attempts) is not None:
                        dropped.append(entry.message[2])
            if dropped:
                messages = tuple(m for m in messages if (m if isinstance(m, int) else m[2]) not in dropped)
        if messages:
            super().ack(consumer, messages)
        if dropped:
            self._drop_acks(consumer, dropped)
            _lost.offsets = tuple(dropped)
        if messages and faults.rates["duplicate"]:
            with self._lock:
                cursor = consumer._cursor
                key = _cursor_key(cursor, consumer)
                for message in messages:
                    if isinstance(message, Message):
                        self._replay_locked(consumer, cursor, key, message)

    def _drop_acks(self, consumer: Consumer, offsets: list[int]) -> None:
        """Lose the acks of ``offsets``: they stay out until their ack timeout, or fail now without one."""
        with self._lock:
            cursor = consumer._cursor
            for offset in offsets:
                entry = cursor.pending.get(offset)
                if entry is None or entry.state != OUT:
                    continue
                timed = cursor.ack_timeout is not None and cursor.manual_ack
                detail = "back after its ack timeout" if timed else "back at once (no ack timeout)"
                self._inject_locked("drop_ack", cursor, consumer, offset, detail)
                if not timed:
                    self._fail_locked(cursor, entry, "ack lost", 0.0, None)
            if self.durable and cursor.name is not None:
                self._journal_sync_locked(cursor, offsets)
            dead = self._take_outbox_locked()
        self._send_dead_letters(dead)

    # -- push batches: crash, drop_ack, duplicate ----------------------------------------------

    def push_done(
        self,
        consumer: Consumer,
        batch: list[Message],
        failures: list[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None:
        faults = self._faults
        _lost.offsets = ()
        handled = batch[: len(batch) - len(unprocessed)]
        if handled and faults.strikes("crash", self.name, consumer.id, "push", handled[0][2]) is not None:
            self._crash_push(consumer, batch, handled, unprocessed)
            _lost.offsets = tuple(message[2] for message in handled)
            return
        cursor = consumer._cursor
        failed = {message[2] for message, _ in failures}
        done = [m for m in handled if m[2] not in failed] if not cursor.manual_ack else []
        key = _cursor_key(cursor, consumer)
        dropped: list[Message] = []
        if done and faults.rates["drop_ack"]:
            # Failed before the batch settles, so that nobody sees them neither pending nor settled.
            with self._lock:
                pending = cursor.pending
                for message in done:
                    entry = pending.get(message[2])
                    attempt = entry.attempts if entry is not None else 1
                    if faults.strikes("drop_ack", self.name, key, message[2], attempt) is None:
                        continue
                    dropped.append(message)
                    if entry is None:  # auto-ack pushes keep no entry for a first delivery
                        entry = pending[message[2]] = Pending(message, 1, consumer, OUT)
                    self._inject_locked("drop_ack", cursor, consumer, message[2], "back at once")
                    self._fail_locked(cursor, entry, "ack lost", 0.0, None)
                if dropped and self.durable and cursor.name is not None:
                    self._journal_sync_locked(cursor, [message[2] for message in dropped])
        if dropped:
            lost = {message[2] for message in dropped}
            batch = [message for message in batch if message[2] not in lost]
            _lost.offsets = tuple(lost)
        super().push_done(consumer, batch, failures, unprocessed)
        if done and faults.rates["duplicate"]:
            with self._lock:
                for message in done:
                    if message not in dropped:
                        self._replay_locked(consumer, cursor, key, message)

    def _crash_push(
        self, consumer: Consumer, batch: list[Message], handled: list[Message], unprocessed: list[Message]
    ) -> None:
        """The push consumer dies after its callback, before the batch is settled."""
        with self._lock:
            cursor = consumer._cursor
            cursor.inflight -= 1
            self._push_out -= 1
            self._give_back_locked(cursor, unprocessed, pulled=False)
            pending = cursor.pending
            for message in handled:
                if message[2] not in pending:  # auto-ack pushes keep no entry for a first delivery
                    pending[message[2]] = Pending(message, 1, consumer, OUT)
            fault = self._inject_locked("crash", cursor, consumer, handled[0][2], "after its callback, before settling")
            self._detach_locked(consumer, "consumer crashed", f"it crashed ({fault} by {self._faults!r})")
            if self.durable and cursor.name is not None:
                self._journal_sync_locked(cursor, [m[2] for m in batch])
            dead = self._take_outbox_locked()
        self._send_dead_letters(dead)


# -- installing -----------------------------------------------------------------------------------

# _classes_lock guards _classes: each engine class, and its faulty subclass.
_classes_lock = threading.Lock()
_classes: dict[type[DeliveryCore], type[_FaultyQueue]] = {}


def _make_faulty(engine: QueueEngine, faults: Faults) -> None:
    """Give one newly opened queue engine the fault sites (before anyone uses it)."""
    if not isinstance(engine, DeliveryCore):
        raise TypeError(
            f"Faults hook into engines built on mqlite.engine.delivery.DeliveryCore; "
            f"{type(engine).__name__} of queue {engine.name!r} is not one"
        )
    cls = type(engine)
    with _classes_lock:
        faulty = _classes.get(cls)
        if faulty is None:
            faulty = type(f"Faulty{cls.__name__}", (_FaultyQueue, cls), {"__module__": __name__})
            _classes[cls] = faulty
    with engine._lock:
        engine._faults = faults  # type: ignore[attr-defined]  # the faulty class declares them
        engine._replayed = set()  # type: ignore[attr-defined]
        engine._delayed = set()  # type: ignore[attr-defined]
        engine.__class__ = faulty
