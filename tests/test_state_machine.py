"""A hypothesis state machine that drives one queue and checks it against a plain reference model.

The model is written from the documented semantics, not from mqlite's code: a list of published
events, and per cursor a position, an ack mode, a filter, and the pending (delivered, unacked)
messages with the order in which given-back messages are redelivered.

The queue keeps every message (retention="limits", no limits), so "earliest" is always offset 0.
Only pull subscriptions and zero nack delays are used, so nothing depends on threads or time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple, rule

import mqlite

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
_entry_ids = itertools.count()
SUBSCRIBE_ARGS = {
    "name": st.one_of(st.none(), st.sampled_from(NAMES)),
    # Weighted towards what makes messages pending: manual acks and wide filters.
    "filter_key": st.sampled_from(["all", "all", *sorted(FILTERS)]),
    "manual": st.sampled_from([True, True, False]),
    "compete": st.booleans(),
    "data": st.data(),
}


@dataclass
class Entry:
    """One pending message: out with a consumer, or given back and waiting to be read again."""

    offset: int
    owner: int | None  # the subscription holding it, None once given back
    ident: int = field(default_factory=lambda: next(_entry_ids))


@dataclass
class ModelCursor:
    filter_key: str
    manual: bool
    position: int
    members: set[int] = field(default_factory=set)
    # Insertion-ordered like the pending set of a real cursor: re-delivering an offset keeps its place.
    pending: dict[int, Entry] = field(default_factory=dict)
    # Given-back entries in the order they will be redelivered; stale ones are skipped.
    ready: list[Entry] = field(default_factory=list)

    @property
    def matches(self) -> frozenset[str]:
        return FILTERS[self.filter_key][1]


@dataclass
class ModelSub:
    real: mqlite.Subscription
    cursor: ModelCursor
    name: str | None
    open: bool = True


def _draw_offset(data: st.DataObject, pending: dict[int, Entry]) -> int:
    """An offset to ack or nack: often a pending one, otherwise any small offset."""
    if pending and data.draw(st.booleans()):
        return data.draw(st.sampled_from(sorted(pending)))
    return data.draw(st.integers(0, 12))


class BrokerMachine(RuleBasedStateMachine):
    subs = Bundle("subs")

    def __init__(self) -> None:
        super().__init__()
        self.broker = mqlite.Broker(clock=mqlite.ManualClock(), dispatcher=mqlite.ManualDispatcher())
        self.queue = self.broker.queue("q", retention="limits")
        self.log: list[str] = []  # event of each offset
        self.named: dict[str, ModelCursor] = {}
        self.model_subs: dict[int, ModelSub] = {}

    def teardown(self) -> None:
        self.broker.close()

    # -- the model's own reading rules ---------------------------------------------------

    def model_take(self, sub_id: int, cursor: ModelCursor, max_messages: int) -> list[int]:
        """What a poll should return: due redeliveries first, then new matching messages."""
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
            event("several redeliveries in one poll")
        wanted = max_messages - len(out)
        if wanted:
            fresh = [o for o in range(cursor.position, len(self.log)) if self.log[o] in cursor.matches][:wanted]
            cursor.position = fresh[-1] + 1 if len(fresh) == wanted else len(self.log)
            for offset in fresh:
                if cursor.manual:
                    cursor.pending[offset] = Entry(offset, sub_id)
            out.extend(fresh)
        return out

    def give_back(self, cursor: ModelCursor, entry: Entry) -> None:
        entry.owner = None
        cursor.ready.append(entry)

    # -- rules -----------------------------------------------------------------------------

    @rule(event=st.sampled_from(EVENTS), count=st.integers(1, 3), many=st.booleans())
    def publish(self, event: str, count: int, many: bool) -> None:
        if many:
            messages = self.queue.publish_many([(event, None)] * count)
        else:
            messages = [self.broker.publish("q", event) for _ in range(count)]
        assert [m.offset for m in messages] == list(range(len(self.log), len(self.log) + count))
        self.log.extend([event] * count)

    def _subscribe(self, name: str | None, filter_key: str, manual: bool, compete: bool, data: st.DataObject) -> object:
        end = len(self.log)
        existing = self.named.get(name) if name is not None else None
        if compete and existing is not None:
            # Another consumer of an existing name, with its settings: a competitor or a comeback.
            filter_key, manual = existing.filter_key, existing.manual
        start = data.draw(st.one_of(st.sampled_from(["earliest", "latest"]), st.integers(0, end)), label="start")
        kwargs = {"events": FILTERS[filter_key][0], "name": name, "start": start, "ack": "manual" if manual else "auto"}
        if existing is not None and existing.members and (existing.filter_key, existing.manual) != (filter_key, manual):
            with pytest.raises(mqlite.ConfigConflict):
                self.broker.subscribe("q", **kwargs)
            return multiple()
        real = self.broker.subscribe("q", **kwargs)
        if existing is None:
            position = {"earliest": 0, "latest": end}.get(start, start)  # type: ignore[arg-type]
            cursor = ModelCursor(filter_key, manual, position)  # type: ignore[arg-type]
            if name is not None:
                self.named[name] = cursor
        else:
            # start applies only to a new cursor; the settings of a detached one are replaced.
            cursor = existing
            cursor.filter_key, cursor.manual = filter_key, manual
        cursor.members.add(real.id)
        self.model_subs[real.id] = ModelSub(real, cursor, name)
        return real.id

    @initialize(target=subs, **SUBSCRIBE_ARGS)
    def first_subscription(self, **kwargs: object) -> object:
        return self._subscribe(**kwargs)  # type: ignore[arg-type]

    @rule(target=subs, **SUBSCRIBE_ARGS)
    def subscribe(self, **kwargs: object) -> object:
        return self._subscribe(**kwargs)  # type: ignore[arg-type]

    @rule(sub_id=subs, max_messages=st.integers(1, 5))
    def poll(self, sub_id: int, max_messages: int) -> None:
        sub = self.model_subs[sub_id]
        if not sub.open:
            with pytest.raises(mqlite.SubscriptionClosed):
                sub.real.poll(max_messages=max_messages)
            return
        got = [m.offset for m in sub.real.poll(max_messages=max_messages, timeout=0)]
        assert got == self.model_take(sub_id, sub.cursor, max_messages)

    @rule(sub_id=subs)
    def get(self, sub_id: int) -> None:
        sub = self.model_subs[sub_id]
        if not sub.open:
            with pytest.raises(mqlite.SubscriptionClosed):
                sub.real.get(timeout=0)
            return
        message = sub.real.get(timeout=0)
        assert ([] if message is None else [message.offset]) == self.model_take(sub_id, sub.cursor, 1)

    @rule(sub_id=subs, data=st.data())
    def ack(self, sub_id: int, data: st.DataObject) -> None:
        sub = self.model_subs[sub_id]
        cursor = sub.cursor
        offset = _draw_offset(data, cursor.pending)
        if not sub.open:
            with pytest.raises(mqlite.SubscriptionClosed):
                sub.real.ack(offset)
        elif not cursor.manual:
            with pytest.raises(mqlite.AckModeError):
                sub.real.ack(offset)
        elif offset not in cursor.pending:
            with pytest.raises(mqlite.NotPending):
                sub.real.ack(offset)
        else:
            sub.real.ack(offset)
            del cursor.pending[offset]

    @rule(sub_id=subs, data=st.data())
    def nack(self, sub_id: int, data: st.DataObject) -> None:
        sub = self.model_subs[sub_id]
        cursor = sub.cursor
        offset = _draw_offset(data, cursor.pending)
        entry = cursor.pending.get(offset)
        if not sub.open:
            with pytest.raises(mqlite.SubscriptionClosed):
                sub.real.nack(offset)
        elif not cursor.manual:
            with pytest.raises(mqlite.AckModeError):
                sub.real.nack(offset)
        elif entry is None or entry.owner is None:
            with pytest.raises(mqlite.NotPending):
                sub.real.nack(offset)
        else:
            sub.real.nack(offset, delay=0)
            self.give_back(cursor, entry)

    @rule(sub_id=subs, data=st.data())
    def nack_everything_held(self, sub_id: int, data: st.DataObject) -> None:
        """Nack every message this consumer holds, in a drawn order: redeliveries queue up."""
        sub = self.model_subs[sub_id]
        cursor = sub.cursor
        if not (sub.open and cursor.manual):
            return
        held = [e for e in cursor.pending.values() if e.owner == sub_id]
        for entry in data.draw(st.permutations(held)):
            sub.real.nack(entry.offset)
            self.give_back(cursor, entry)

    @rule(sub_id=subs, to=st.one_of(st.sampled_from(["earliest", "latest"]), st.integers(0, 12)))
    def seek(self, sub_id: int, to: str | int) -> None:
        sub = self.model_subs[sub_id]
        end = len(self.log)
        if not sub.open:
            with pytest.raises(mqlite.SubscriptionClosed):
                sub.real.seek(to)
            return
        if isinstance(to, int) and to > end:
            with pytest.raises(mqlite.InvalidArgument):
                sub.real.seek(to)
            return
        position = {"earliest": 0, "latest": end}.get(to, to)  # type: ignore[arg-type]
        assert sub.real.seek(to) == position
        sub.cursor.position = position  # type: ignore[assignment]

    @rule(sub_id=consumes(subs))
    def close(self, sub_id: int) -> None:
        sub = self.model_subs[sub_id]
        sub.real.close()
        if not sub.open:
            return
        sub.open = False
        cursor = sub.cursor
        cursor.members.discard(sub_id)
        for entry in list(cursor.pending.values()):
            if entry.owner == sub_id:
                self.give_back(cursor, entry)
            elif entry.owner is not None:
                event("closed while another consumer of the name held messages")

    @rule(sub_id=subs)
    def close_keeping_the_handle(self, sub_id: int) -> None:
        """Close, but keep the subscription in play so later rules check SubscriptionClosed."""
        self.close(sub_id)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def cursors_match_the_model(self) -> None:
        end = len(self.log)
        assert self.queue.end_offset == end
        for sub in self.model_subs.values():
            if not sub.open:
                continue
            cursor = sub.cursor
            lag = sum(1 for o in range(cursor.position, end) if self.log[o] in cursor.matches)
            assert (sub.real.position, sub.real.pending, sub.real.lag) == (cursor.position, len(cursor.pending), lag)

    @invariant()
    def info_lists_the_models_subscriptions(self) -> None:
        info = self.broker.info()
        named = {s.name: s for s in info.subscriptions if s.name is not None}
        assert set(named) == set(self.named)
        for name, cursor in self.named.items():
            row = named[name]
            assert (row.position, row.pending, row.consumers) == (
                cursor.position,
                len(cursor.pending),
                len(cursor.members),
            )
            assert row.mode == ("pull" if cursor.members else "detached")
            assert row.ack == ("manual" if cursor.manual else "auto")
        open_ephemeral = sum(1 for s in self.model_subs.values() if s.open and s.name is None)
        assert sum(1 for s in info.subscriptions if s.name is None) == open_ephemeral


BrokerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_broker_matches_the_reference_model = BrokerMachine.TestCase
