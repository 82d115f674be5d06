"""``BrokerMachine``: a hypothesis state machine that drives a real broker against the reference model.

Run it as it is::

    TestBroker = BrokerMachine.TestCase

or subclass it and override :meth:`BrokerMachine.consume` to hand every delivered message to
your own consumer. The machine publishes, subscribes (durable and ephemeral, with filters,
manual and automatic acks), reads, acks, nacks, seeks and closes, in orders hypothesis chooses,
and after every step compares the broker with :class:`~mqlite.testing.ReferenceModel`.

This module imports hypothesis; ``import mqlite.testing`` does not import it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import hypothesis.strategies as st
from hypothesis import event
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import mqlite
from mqlite.testing.model import Entry, ReferenceModel
from mqlite.testing.strategies import payloads

__all__ = ["EVENTS", "FILTERS", "NAMES", "BrokerMachine", "CheckedSubscription"]

T = TypeVar("T")

EVENTS = ("a", "b", "c", "cc")
"""The events the machine publishes: few, so that filters and messages meet often."""

FILTERS: Mapping[str, tuple[list[str] | None, frozenset[str]]] = {
    "all": (None, frozenset(EVENTS)),
    "a": (["a"], frozenset({"a"})),
    "b+c": (["b", "c"], frozenset({"b", "c"})),
    "[ab]": (["[ab]"], frozenset({"a", "b"})),
    "c*": (["c*"], frozenset({"c", "cc"})),
}
"""The filters a subscription may ask for, each with the events it matches, spelled out by hand
so that the broker's matching is checked against an answer that does not use fnmatch."""

NAMES = ("alpha", "beta")
"""The durable names: two, so that competing consumers and comebacks are frequent."""

_REFUSALS = (mqlite.SubscriptionClosed, mqlite.AckModeError, mqlite.NotPending, mqlite.InvalidArgument)

# What a subscribe draws; weighted towards what makes messages pending: manual acks and wide filters.
_NAME = st.one_of(st.none(), st.sampled_from(NAMES))
_FILTER_KEY = st.sampled_from(["all", "all", *sorted(FILTERS)])
_MANUAL = st.sampled_from([True, True, False])


def _mirror(what: str, on_model: Callable[[], T], on_broker: Callable[[], object]) -> tuple[T, object]:
    """Do one operation on the model, then on the broker; both must succeed or refuse alike.

    Returns what the model and the broker returned. When both refuse, the broker's exception
    propagates.

    Raises:
        AssertionError: one refused and the other did not, or they raised different errors.
    """
    try:
        expected = on_model()
    except _REFUSALS as refusal:
        try:
            on_broker()
        except type(refusal):
            raise
        except Exception as other:
            raise AssertionError(f"{what}: the broker raised {other!r}, the model {refusal!r}") from other
        raise AssertionError(f"{what}: the broker accepted it, the model refused it with {refusal!r}") from None
    try:
        got = on_broker()
    except Exception as error:
        raise AssertionError(f"{what}: the broker raised {error!r}, the model accepted it") from error
    return expected, got


def _offset(message: mqlite.Message | int) -> int:
    return message if isinstance(message, int) else message.offset


class CheckedSubscription:
    """What :meth:`BrokerMachine.consume` gets: one subscription whose acks and nacks the machine
    does on the broker and on the model alike. Not thread-safe: use it from the machine's thread.

    ``ack`` and ``nack`` raise what the broker raises (``NotPending``, ``AckModeError``, ...),
    and an ``AssertionError`` when the broker and the model disagree.
    """

    def __init__(self, machine: BrokerMachine, sub_id: int) -> None:
        self._machine = machine
        self.id = sub_id
        self.subscription: mqlite.Subscription = machine.real[sub_id]
        """The real subscription, to read its properties. Reading or seeking it directly would
        leave the model behind."""

    @property
    def name(self) -> str | None:
        """The durable name, or None for an ephemeral subscription."""
        return self._machine.model.subs[self.id].name

    @property
    def manual(self) -> bool:
        """Whether messages stay pending until acked (``ack="manual"``)."""
        return self._machine.model.subs[self.id].cursor.manual

    @property
    def pending(self) -> int:
        """Messages of this subscription's cursor delivered and not yet acked."""
        return self.subscription.pending

    def ack(self, message: mqlite.Message | int, *more: mqlite.Message | int) -> None:
        """Ack messages (or offsets), all or none, on the broker and the model."""
        offsets = [_offset(m) for m in (message, *more)]
        _mirror(
            f"ack {offsets} by subscription {self.id}",
            lambda: self._machine.model.ack(self.id, *offsets),
            lambda: self.subscription.ack(message, *more),
        )

    def nack(self, message: mqlite.Message | int, delay: float = 0.0) -> None:
        """Give a message back for redelivery at once. The model has no time, so ``delay`` must be 0."""
        if delay != 0:
            raise ValueError(f"BrokerMachine models nacks without a delay; pass delay=0, got {delay!r}")
        offset = _offset(message)
        _mirror(
            f"nack {offset} by subscription {self.id}",
            lambda: self._machine.model.nack(self.id, offset),
            lambda: self.subscription.nack(message, delay=0),
        )

    def __repr__(self) -> str:
        return f"CheckedSubscription({self.id}, name={self.name!r}, manual={self.manual})"


class BrokerMachine(RuleBasedStateMachine):
    """Drives one queue of a real broker and checks it against :class:`ReferenceModel` after every step.

    The queue keeps every message (``retention="limits"``; :attr:`retention` may make it a work
    queue); subscriptions pull; nacks have no delay; the clock is a ``ManualClock`` that never
    moves. So nothing depends on threads or time, and a failure shrinks to a short program.

    Checks:
        - every ``get`` and ``poll`` returns the offsets the model expects, in its order, and each
          message has the event, payload, key and headers it was published with;
        - ``ack``, ``nack``, ``seek`` and ``subscribe`` succeed or raise exactly when the model
          says (``NotPending``, ``AckModeError``, ``SubscriptionClosed``, ``ConfigConflict``...);
        - after every step, each open subscription's position, pending count and lag, and
          ``broker.info()``'s durable cursors (position, pending, consumers, mode, ack), match;
        - the ``settle`` step: once ack timeouts have given every held message back and the
          consumers have read everything, no open subscription has a message pending or unread.
          A consumer that never acks, or nacks for ever, fails here.

    Override :meth:`consume` to drive your own consumer. Set ``backend = "file"`` (or override
    :meth:`open_broker`) to run on a file, and ``machine_settles = False`` so that only your
    consumer acks and nacks. Not thread-safe, as hypothesis runs it on one thread.
    """

    backend: ClassVar[Literal["memory", "file"]] = "memory"
    """Where the broker lives: ``"memory"``, or ``"file"`` for a new SQLite file per run."""

    retention: ClassVar[Literal["limits", "workqueue"]] = "limits"
    """The queue's retention; the model checks ``start_offset`` against it after every step."""

    machine_settles: ClassVar[bool] = True
    """Whether the machine's own ``ack`` and ``nack`` steps run, besides :meth:`consume`."""

    settle_rounds: ClassVar[int] = 3
    """How many times ``settle`` gives held messages back before it calls them never settled."""

    queue_name: ClassVar[str] = "q"

    subs = Bundle("subs")

    def __init__(self) -> None:
        super().__init__()
        self.settling = False
        """True while the ``settle`` step runs: every delivery then has to be settled."""
        self.clock = mqlite.ManualClock()
        self._directory: Path | None = None
        self.broker = self.open_broker()
        self.queue = self.broker.queue(self.queue_name, retention=self.retention)
        self.model = ReferenceModel(note=event, retention=self.retention)
        self.real: dict[int, mqlite.Subscription] = {}
        self.published: list[tuple[Any, Any, dict[str, Any]]] = []  # payload, key, headers by offset
        self._filter_keys: dict[str, str] = {}  # the FILTERS key each durable name was last opened with

    # -- what a subclass overrides ---------------------------------------------------------

    def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
        """Handle one delivered message; called for every message a ``get`` or ``poll`` returns.

        Override it to run your consumer. Settle through ``sub`` (``sub.ack(message)``,
        ``sub.nack(message)``) so that the model follows; what it raises fails the run. With
        ``ack="auto"`` (``not sub.manual``) the message is already settled.

        The default holds a manual message for the machine's own ``ack`` and ``nack`` steps,
        and acks it while :attr:`settling`.
        """
        if self.settling and sub.manual:
            try:
                sub.ack(message)
            except mqlite.NotPending:
                pass  # delivered twice in one poll (after a seek back) and acked the first time

    def open_broker(self) -> mqlite.Broker:
        """The broker under test, on :attr:`backend`, with :attr:`clock` and a ``ManualDispatcher``."""
        options: dict[str, Any] = {"clock": self.clock, "dispatcher": mqlite.ManualDispatcher()}
        if self.backend == "memory":
            return mqlite.Broker(**options)
        if self.backend == "file":
            self._directory = Path(tempfile.mkdtemp(prefix="mqlite-machine-"))
            return mqlite.Broker(self._directory / "machine.mqlite", **options)
        raise mqlite.InvalidArgument(f"BrokerMachine.backend must be 'memory' or 'file', got {self.backend!r}")

    def teardown(self) -> None:
        try:
            self.broker.close()
        finally:
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)

    # -- publishing and subscribing ----------------------------------------------------------

    @rule(
        event=st.sampled_from(EVENTS),
        contents=st.lists(
            st.tuples(payloads(max_leaves=3), st.one_of(st.none(), st.sampled_from(["k1", "k2"]))),
            min_size=1,
            max_size=3,
        ),
        many=st.booleans(),
    )
    def publish(self, event: str, contents: list[tuple[Any, Any]], many: bool) -> None:
        headers = [{"n": str(len(self.published) + i)} if key else {} for i, (_, key) in enumerate(contents)]
        if many:
            drafts = [(event, payload, key, h) for (payload, key), h in zip(contents, headers, strict=True)]
            messages = self.queue.publish_many(drafts)
        else:
            messages = [
                self.broker.publish(self.queue_name, event, payload, key, h or None)
                for (payload, key), h in zip(contents, headers, strict=True)
            ]
        assert [m.offset for m in messages] == self.model.publish([event] * len(contents))
        self.published.extend((payload, key, h) for (payload, key), h in zip(contents, headers, strict=True))

    def _subscribe(self, name: str | None, filter_key: str, manual: bool, compete: bool, data: st.DataObject) -> object:
        existing = self.model.named.get(name) if name is not None else None
        if compete and existing is not None and name is not None:
            # Another consumer of an existing name, with its settings: a competitor or a comeback.
            filter_key, manual = self._filter_keys[name], existing.manual
        end = self.model.end_offset
        start = data.draw(st.one_of(st.sampled_from([None, "earliest", "latest"]), st.integers(0, end)), label="start")
        events, matches = FILTERS[filter_key]
        kwargs: dict[str, Any] = {"events": events, "name": name, "start": start, "ack": "manual" if manual else "auto"}
        try:
            self.model.check_subscribe(name=name, events=events, manual=manual)
        except mqlite.ConfigConflict:
            try:
                self.broker.subscribe(self.queue_name, **kwargs).close()
            except mqlite.ConfigConflict:
                return multiple()
            raise AssertionError(
                f"subscribe {kwargs}: the broker accepted it, the model expected ConfigConflict"
            ) from None
        real = self.broker.subscribe(self.queue_name, **kwargs)
        self.model.subscribe(
            real.id, name=name, events=events, manual=manual, start=start, matcher=matches.__contains__
        )
        if name is not None:
            self._filter_keys[name] = filter_key
        self.real[real.id] = real
        return real.id

    @initialize(target=subs, name=_NAME, filter_key=_FILTER_KEY, manual=_MANUAL, compete=st.booleans(), data=st.data())
    def first_subscription(
        self, name: str | None, filter_key: str, manual: bool, compete: bool, data: st.DataObject
    ) -> object:
        return self._subscribe(name, filter_key, manual, compete, data)

    @rule(target=subs, name=_NAME, filter_key=_FILTER_KEY, manual=_MANUAL, compete=st.booleans(), data=st.data())
    def subscribe(self, name: str | None, filter_key: str, manual: bool, compete: bool, data: st.DataObject) -> object:
        return self._subscribe(name, filter_key, manual, compete, data)

    # -- reading -------------------------------------------------------------------------------

    def _read(self, sub_id: int, max_messages: int, single: bool) -> list[mqlite.Message]:
        """Read on the broker and the model alike, check what came, and hand it to :meth:`consume`."""
        real = self.real[sub_id]
        if not self.model.subs[sub_id].open:
            try:
                real.get(timeout=0) if single else real.poll(max_messages=max_messages)
            except mqlite.SubscriptionClosed:
                return []
            raise AssertionError(f"subscription {sub_id} is closed, yet the broker read from it")
        if single:
            one = real.get(timeout=0)
            got = [] if one is None else [one]
        else:
            got = real.poll(max_messages=max_messages, timeout=0)
        expected = self.model.take(sub_id, max_messages)
        assert [m.offset for m in got] == expected, f"subscription {sub_id} read {[m.offset for m in got]}"
        for message in got:
            payload, key, headers = self.published[message.offset]
            assert (message.queue, message.event) == (self.queue_name, self.model.log[message.offset])
            assert (message.payload, message.key, dict(message.headers)) == (payload, key, headers), message
        handle = CheckedSubscription(self, sub_id)
        for message in got:
            self.consume(handle, message)
        return got

    @rule(sub_id=subs, max_messages=st.integers(1, 5))
    def poll(self, sub_id: int, max_messages: int) -> None:
        self._read(sub_id, max_messages, single=False)

    @rule(sub_id=subs)
    def get(self, sub_id: int) -> None:
        self._read(sub_id, 1, single=True)

    # -- settling --------------------------------------------------------------------------------

    def _draw_offset(self, data: st.DataObject, pending: dict[int, Entry]) -> int:
        """An offset to ack or nack: often a pending one, otherwise any small offset."""
        if len(pending) > 0 and data.draw(st.booleans()):
            return data.draw(st.sampled_from(sorted(pending)))
        return data.draw(st.integers(0, 12))

    def _settle_quietly(self, what: str, on_model: Callable[[], object], on_broker: Callable[[], object]) -> None:
        try:
            _mirror(what, on_model, on_broker)
        except _REFUSALS:
            pass  # refused by both, as it should be

    @precondition(lambda self: self.machine_settles)
    @rule(sub_id=subs, data=st.data())
    def ack(self, sub_id: int, data: st.DataObject) -> None:
        offset = self._draw_offset(data, self.model.subs[sub_id].cursor.pending)
        self._settle_quietly(
            f"ack {offset} by subscription {sub_id}",
            lambda: self.model.ack(sub_id, offset),
            lambda: self.real[sub_id].ack(offset),
        )

    @precondition(lambda self: self.machine_settles)
    @rule(sub_id=subs, data=st.data())
    def nack(self, sub_id: int, data: st.DataObject) -> None:
        offset = self._draw_offset(data, self.model.subs[sub_id].cursor.pending)
        self._settle_quietly(
            f"nack {offset} by subscription {sub_id}",
            lambda: self.model.nack(sub_id, offset),
            lambda: self.real[sub_id].nack(offset, delay=0),
        )

    @precondition(lambda self: self.machine_settles)
    @rule(sub_id=subs, data=st.data())
    def nack_everything_held(self, sub_id: int, data: st.DataObject) -> None:
        """Nack every message this consumer holds, in a drawn order: redeliveries queue up."""
        sub = self.model.subs[sub_id]
        if not (sub.open and sub.cursor.manual):
            return
        for entry in data.draw(st.permutations(self.model.held(sub_id))):
            self.real[sub_id].nack(entry.offset)
            self.model.nack(sub_id, entry.offset)

    @rule()
    def settle(self) -> None:
        """Let ack timeouts give back what consumers hold and let them read everything, a few times.

        Afterwards no open subscription may have a message pending or unread: each delivery
        must have been settled by :meth:`consume` (or by the machine's steps).
        """
        open_ids = sorted(i for i, s in self.model.subs.items() if s.open)
        cursors = [self.model.subs[i].cursor for i in open_ids]
        self.settling = True
        try:
            for _ in range(self.settle_rounds):
                if not any(c.pending or self.model.lag(c) for c in cursors):
                    break
                for sub_id in open_ids:
                    for entry in self.model.held(sub_id):  # what an ack timeout would redeliver
                        self.real[sub_id].nack(entry.offset)
                        self.model.nack(sub_id, entry.offset)
                for sub_id in open_ids:
                    # Bounded: a consumer that nacks every message would be handed it for ever.
                    for _ in range(self.model.end_offset + 1):
                        if not self._read(sub_id, 100, single=False):
                            break
        finally:
            self.settling = False
        for sub_id in open_ids:
            cursor = self.model.subs[sub_id].cursor
            if cursor.pending:
                raise AssertionError(
                    f"subscription {sub_id} ({self.model.subs[sub_id].name or 'ephemeral'}) still has offsets "
                    f"{sorted(cursor.pending)} pending after {self.settle_rounds} rounds of redelivery: its "
                    "consumer never settled them"
                )
            assert self.model.lag(cursor) == 0, f"subscription {sub_id} left messages unread"

    # -- moving and closing -------------------------------------------------------------------

    @rule(sub_id=subs, to=st.one_of(st.sampled_from(["earliest", "latest"]), st.integers(0, 12)))
    def seek(self, sub_id: int, to: str | int) -> None:
        try:
            expected, got = _mirror(
                f"seek {to!r} by subscription {sub_id}",
                lambda: self.model.seek(sub_id, to),
                lambda: self.real[sub_id].seek(to),  # type: ignore[arg-type]  # a str is "earliest" or "latest"
            )
        except _REFUSALS:
            return  # refused by both, as it should be
        assert got == expected, f"seek {to!r} by subscription {sub_id}: position {got}, the model says {expected}"

    @rule(sub_id=consumes(subs))
    def close(self, sub_id: int) -> None:
        self.real[sub_id].close()
        self.model.close(sub_id)

    @rule(sub_id=subs)
    def close_keeping_the_handle(self, sub_id: int) -> None:
        """Close, but keep the subscription in play so later rules check SubscriptionClosed."""
        self.close(sub_id)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def cursors_match_the_model(self) -> None:
        assert self.queue.end_offset == self.model.end_offset
        assert self.queue.start_offset == self.model.start_offset(), "start_offset (what retention keeps)"
        for sub_id, sub in self.model.subs.items():
            if not sub.open:
                continue
            cursor = sub.cursor
            real = self.real[sub_id]
            assert (real.position, real.pending, real.lag) == (
                cursor.position,
                len(cursor.pending),
                self.model.lag(cursor),
            ), f"subscription {sub_id}: (position, pending, lag)"

    @invariant()
    def info_lists_the_models_subscriptions(self) -> None:
        info = self.broker.info()
        named = {s.name: s for s in info.subscriptions if s.name is not None}
        assert set(named) == set(self.model.named)
        for name, cursor in self.model.named.items():
            row = named[name]
            assert (row.position, row.pending, row.consumers) == (
                cursor.position,
                len(cursor.pending),
                len(cursor.members),
            ), f"info of {name!r}: (position, pending, consumers)"
            assert row.mode == ("pull" if cursor.members else "detached")
            assert row.ack == ("manual" if cursor.manual else "auto")
        open_ephemeral = sum(1 for s in self.model.subs.values() if s.open and s.name is None)
        assert sum(1 for s in info.subscriptions if s.name is None) == open_ephemeral
