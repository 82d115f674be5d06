"""A hypothesis state machine that drives one queue and checks it against a plain reference model.

The model, ``mqlite.testing.ReferenceModel``, is written from the documented semantics, not from
mqlite's code: a list of published events, and per cursor a position, an ack mode, a filter, and
the pending (delivered, unacked) messages with the order in which given-back messages are
redelivered. The machine runs on both backends: in memory and on a file.

The queue keeps every message (retention="limits", no limits), so "earliest" is always offset 0.
Only pull subscriptions and zero nack delays are used, so nothing depends on threads or time.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple, rule

import mqlite
from mqlite.testing import Entry, ReferenceModel

EVENTS = ("a", "b", "c", "cc")

# The filters a subscription may ask for, each with the events it matches, spelled out by hand.
FILTERS: dict[str, tuple[list[str] | None, frozenset[str]]] = {
    "all": (None, frozenset(EVENTS)),
    "a": (["a"], frozenset({"a"})),
    "b+c": (["b", "c"], frozenset({"b", "c"})),
    "[ab]": (["[ab]"], frozenset({"a", "b"})),
    "c*": (["c*"], frozenset({"c", "cc"})),
}
NAMES = ("alpha", "beta")
SUBSCRIBE_ARGS = {
    "name": st.one_of(st.none(), st.sampled_from(NAMES)),
    # Weighted towards what makes messages pending: manual acks and wide filters.
    "filter_key": st.sampled_from(["all", "all", *sorted(FILTERS)]),
    "manual": st.sampled_from([True, True, False]),
    "compete": st.booleans(),
    "data": st.data(),
}


def _draw_offset(data: st.DataObject, pending: dict[int, Entry]) -> int:
    """An offset to ack or nack: often a pending one, otherwise any small offset."""
    if pending and data.draw(st.booleans()):
        return data.draw(st.sampled_from(sorted(pending)))
    return data.draw(st.integers(0, 12))


class BrokerMachine(RuleBasedStateMachine):
    """Drives an in-memory broker; ``FileBrokerMachine`` drives one on a file."""

    subs = Bundle("subs")

    def __init__(self) -> None:
        super().__init__()
        self.broker = self.open_broker(clock=mqlite.ManualClock(), dispatcher=mqlite.ManualDispatcher())
        self.queue = self.broker.queue("q", retention="limits")
        self.model = ReferenceModel(note=event)
        self.real: dict[int, mqlite.Subscription] = {}
        self.filter_keys: dict[str, str] = {}  # the FILTERS key each durable name was last opened with

    def open_broker(self, **kwargs: object) -> mqlite.Broker:
        return mqlite.Broker(**kwargs)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.broker.close()

    # -- rules -----------------------------------------------------------------------------

    @rule(event=st.sampled_from(EVENTS), count=st.integers(1, 3), many=st.booleans())
    def publish(self, event: str, count: int, many: bool) -> None:
        if many:
            messages = self.queue.publish_many([(event, None)] * count)
        else:
            messages = [self.broker.publish("q", event) for _ in range(count)]
        assert [m.offset for m in messages] == self.model.publish([event] * count)

    def _subscribe(self, name: str | None, filter_key: str, manual: bool, compete: bool, data: st.DataObject) -> object:
        end = self.model.end_offset
        existing = self.model.named.get(name) if name is not None else None
        if compete and existing is not None:
            # Another consumer of an existing name, with its settings: a competitor or a comeback.
            assert name is not None
            filter_key, manual = self.filter_keys[name], existing.manual
        start = data.draw(st.one_of(st.sampled_from(["earliest", "latest"]), st.integers(0, end)), label="start")
        events, matches = FILTERS[filter_key]
        kwargs = {"events": events, "name": name, "start": start, "ack": "manual" if manual else "auto"}
        try:
            self.model.check_subscribe(name=name, events=events, manual=manual)
        except mqlite.ConfigConflict:
            with pytest.raises(mqlite.ConfigConflict):
                self.broker.subscribe("q", **kwargs)
            return multiple()
        real = self.broker.subscribe("q", **kwargs)
        self.model.subscribe(
            real.id, name=name, events=events, manual=manual, start=start, matcher=matches.__contains__
        )
        if name is not None:
            self.filter_keys[name] = filter_key
        self.real[real.id] = real
        return real.id

    @initialize(target=subs, **SUBSCRIBE_ARGS)
    def first_subscription(self, **kwargs: object) -> object:
        return self._subscribe(**kwargs)  # type: ignore[arg-type]

    @rule(target=subs, **SUBSCRIBE_ARGS)
    def subscribe(self, **kwargs: object) -> object:
        return self._subscribe(**kwargs)  # type: ignore[arg-type]

    @rule(sub_id=subs, max_messages=st.integers(1, 5))
    def poll(self, sub_id: int, max_messages: int) -> None:
        real = self.real[sub_id]
        if not self.model.subs[sub_id].open:
            with pytest.raises(mqlite.SubscriptionClosed):
                real.poll(max_messages=max_messages)
            return
        got = [m.offset for m in real.poll(max_messages=max_messages, timeout=0)]
        assert got == self.model.take(sub_id, max_messages)

    @rule(sub_id=subs)
    def get(self, sub_id: int) -> None:
        real = self.real[sub_id]
        if not self.model.subs[sub_id].open:
            with pytest.raises(mqlite.SubscriptionClosed):
                real.get(timeout=0)
            return
        message = real.get(timeout=0)
        assert ([] if message is None else [message.offset]) == self.model.take(sub_id, 1)

    @rule(sub_id=subs, data=st.data())
    def ack(self, sub_id: int, data: st.DataObject) -> None:
        offset = _draw_offset(data, self.model.subs[sub_id].cursor.pending)
        try:
            self.model.ack(sub_id, offset)
        except (mqlite.SubscriptionClosed, mqlite.AckModeError, mqlite.NotPending) as expected:
            with pytest.raises(type(expected)):
                self.real[sub_id].ack(offset)
        else:
            self.real[sub_id].ack(offset)

    @rule(sub_id=subs, data=st.data())
    def nack(self, sub_id: int, data: st.DataObject) -> None:
        offset = _draw_offset(data, self.model.subs[sub_id].cursor.pending)
        try:
            self.model.nack(sub_id, offset)
        except (mqlite.SubscriptionClosed, mqlite.AckModeError, mqlite.NotPending) as expected:
            with pytest.raises(type(expected)):
                self.real[sub_id].nack(offset)
        else:
            self.real[sub_id].nack(offset, delay=0)

    @rule(sub_id=subs, data=st.data())
    def nack_everything_held(self, sub_id: int, data: st.DataObject) -> None:
        """Nack every message this consumer holds, in a drawn order: redeliveries queue up."""
        sub = self.model.subs[sub_id]
        if not (sub.open and sub.cursor.manual):
            return
        for entry in data.draw(st.permutations(self.model.held(sub_id))):
            self.real[sub_id].nack(entry.offset)
            self.model.nack(sub_id, entry.offset)

    @rule(sub_id=subs, to=st.one_of(st.sampled_from(["earliest", "latest"]), st.integers(0, 12)))
    def seek(self, sub_id: int, to: str | int) -> None:
        try:
            position = self.model.seek(sub_id, to)
        except (mqlite.SubscriptionClosed, mqlite.InvalidArgument) as expected:
            with pytest.raises(type(expected)):
                self.real[sub_id].seek(to)
        else:
            assert self.real[sub_id].seek(to) == position

    @rule(sub_id=consumes(subs))
    def close(self, sub_id: int) -> None:
        self.real[sub_id].close()
        self.model.close(sub_id)

    @rule(sub_id=subs)
    def close_keeping_the_handle(self, sub_id: int) -> None:
        """Close, but keep the subscription in play so later rules check SubscriptionClosed."""
        self.close(sub_id)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def cursors_match_the_model(self) -> None:
        assert self.queue.end_offset == self.model.end_offset
        for sub_id, sub in self.model.subs.items():
            if not sub.open:
                continue
            cursor = sub.cursor
            real = self.real[sub_id]
            assert (real.position, real.pending, real.lag) == (
                cursor.position,
                len(cursor.pending),
                self.model.lag(cursor),
            )

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
            )
            assert row.mode == ("pull" if cursor.members else "detached")
            assert row.ack == ("manual" if cursor.manual else "auto")
        open_ephemeral = sum(1 for s in self.model.subs.values() if s.open and s.name is None)
        assert sum(1 for s in info.subscriptions if s.name is None) == open_ephemeral


class FileBrokerMachine(BrokerMachine):
    """The same machine on a broker backed by a new SQLite file per run."""

    def open_broker(self, **kwargs: object) -> mqlite.Broker:
        self.directory = Path(tempfile.mkdtemp(prefix="mqlite-machine-"))
        return mqlite.Broker(self.directory / "machine.mqlite", **kwargs)  # type: ignore[arg-type]

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


BrokerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Each step on a file commits; fewer examples keep the CI time modest.
FileBrokerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_broker_matches_the_reference_model = BrokerMachine.TestCase
test_file_broker_matches_the_reference_model = FileBrokerMachine.TestCase
