"""mqlite.testing.strategies draws what mqlite accepts, and BrokerMachine catches what goes wrong.

Each strategy is checked by using what it draws on a real broker: names publish, filters
receive their names, payloads and messages come back equal from a file. The machine runs as it
is on both backends, catches consumers that break the delivery contract, and fails when the
broker itself misbehaves.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.stateful import run_state_machine_as_test

import mqlite
from mqlite.filters import EventFilter
from mqlite.testing import strategies
from mqlite.testing.stateful import BrokerMachine, CheckedSubscription

FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A machine that should pass: a short run. One that should fail: the same examples every time
# (derandomize), so that it is found on every run, and no shrinking.
MACHINE = settings(max_examples=15, stateful_step_count=25, deadline=None, database=None)
FINDS_A_BUG = settings(
    max_examples=300, stateful_step_count=25, deadline=None, database=None, phases=[Phase.generate], derandomize=True
)


class FileBroker:
    """A broker on a new file in a temporary directory; ``reopen()`` reads the file afresh."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="mqlite-strategies-")
        self.path = Path(self._directory.name) / "s.mqlite"
        self.broker = mqlite.Broker(self.path)

    def reopen(self) -> mqlite.Broker:
        self.broker.close()
        self.broker = mqlite.Broker(self.path)
        return self.broker

    def close(self) -> None:
        self.broker.close()
        self._directory.cleanup()


def _file_broker() -> Iterator[FileBroker]:
    file = FileBroker()
    try:
        yield file
    finally:
        file.close()


def _read_back(file: FileBroker) -> list[mqlite.Message]:
    sub = file.reopen().subscribe("q", start="earliest")
    return sub.poll(max_messages=1000)


# -- strategies ---------------------------------------------------------------------------------


def test_importing_mqlite_testing_does_not_import_hypothesis() -> None:
    code = "import sys, mqlite.testing; assert 'hypothesis' not in sys.modules, 'hypothesis was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@FEW
@given(names=st.lists(strategies.event_names(), min_size=1, max_size=8))
def test_every_event_name_publishes_and_reads_back_from_a_file(names: list[str]) -> None:
    for file in _file_broker():
        file.broker.queue("q", retention="limits").publish_many([(name, None) for name in names])
        assert [m.event for m in _read_back(file)] == names


@settings(FEW, max_examples=100)
@given(pair=strategies.event_filters())
def test_a_filter_receives_every_name_drawn_with_it(pair: tuple[Any, list[str]]) -> None:
    events, names = pair
    assert names
    with mqlite.Broker() as broker:
        sub = broker.subscribe("q", events=events)
        for name in names:
            broker.publish("q", name)
        assert [m.event for m in sub.poll(max_messages=100)] == names


@FEW
@given(pair=strategies.event_filters(max_names=3))
def test_a_filter_receives_its_names_on_a_file(pair: tuple[Any, list[str]]) -> None:
    events, names = pair
    for file in _file_broker():
        sub = file.broker.subscribe("q", events=events)
        file.broker.queue("q").publish_many([(name, None) for name in names])
        assert [m.event for m in sub.poll(max_messages=100)] == names


def test_event_filters_draw_patterns_and_lists() -> None:
    seen: set[str] = set()

    # derandomize: the same 300 draws every run, so the test cannot pass or fail by luck.
    @settings(max_examples=300, database=None, derandomize=True)
    @given(pair=strategies.event_filters())
    def collect(pair: tuple[Any, list[str]]) -> None:
        events, _ = pair
        entries = [events] if isinstance(events, str) else events or []
        seen.add(type(events).__name__)
        seen.update(c for e in entries for c in "*?[" if c in e)

    collect()
    assert {"NoneType", "str", "list", "*", "?", "["} <= seen


@FEW
@given(values=st.lists(strategies.payloads(), min_size=1, max_size=10))
def test_payloads_come_back_equal_from_a_file(values: list[Any]) -> None:
    for file in _file_broker():
        file.broker.queue("q", retention="limits").publish_many([("p", value) for value in values])
        assert [m.payload for m in _read_back(file)] == values


@FEW
@given(drafts=st.lists(strategies.messages(), min_size=1, max_size=6), many=st.booleans())
def test_message_drafts_publish_and_come_back_equal_from_a_file(drafts: list[dict[str, Any]], many: bool) -> None:
    for file in _file_broker():
        queue = file.broker.queue("q", retention="limits")
        if many:
            queue.publish_many(drafts)
        else:
            for draft in drafts:
                file.broker.publish("q", **draft)
        got = [(m.event, m.payload, m.key, dict(m.headers)) for m in _read_back(file)]
        assert got == [(d["event"], d["payload"], d["key"], d["headers"] or {}) for d in drafts]


@settings(FEW, max_examples=60)
@given(spec=strategies.subscription_specs())
def test_subscription_specs_subscribe(spec: dict[str, Any]) -> None:
    with mqlite.Broker() as broker:
        sub = broker.subscribe("q", **spec)
        assert sub.events == EventFilter(spec["events"]).spec
        assert sub.position == 0


# What a program of operations may be refused with, by operation; a subscribe may meet a ConfigConflict.
_REFUSED = {
    "get": (mqlite.SubscriptionClosed,),
    "poll": (mqlite.SubscriptionClosed,),
    "ack": (mqlite.SubscriptionClosed, mqlite.AckModeError, mqlite.NotPending),
    "nack": (mqlite.SubscriptionClosed, mqlite.AckModeError, mqlite.NotPending),
    "seek": (mqlite.SubscriptionClosed, mqlite.InvalidArgument),
}


@settings(FEW, max_examples=60)
@given(program=strategies.operations())
def test_operations_run_on_a_broker(program: list[tuple[str, dict[str, Any]]]) -> None:
    assert program[0][0] == "subscribe"
    with mqlite.Broker() as broker:
        queue = broker.queue("q", retention="limits")
        subs: list[mqlite.Subscription | None] = []  # None where a subscribe was refused
        for name, kwargs in program:
            args = dict(kwargs)
            if name == "subscribe":
                try:
                    subs.append(broker.subscribe("q", **args))
                except mqlite.ConfigConflict:
                    subs.append(None)
                continue
            try:
                if name == "publish":
                    queue.publish(**args)
                elif name == "publish_many":
                    queue.publish_many(args["items"])
                elif (sub := subs[args.pop("sub")]) is not None:
                    getattr(sub, name)(**args)
            except _REFUSED.get(name, ()):
                pass
        assert subs[0] is not None  # the first subscribe of a program always succeeds


@FEW
@given(plan=strategies.fault_plans())
def test_fault_plans_give_a_seed_and_a_rate_per_fault(plan: dict[str, Any]) -> None:
    assert set(plan) == {"seed", *strategies.FAULT_KINDS}
    assert isinstance(plan["seed"], int)
    assert all(0.0 <= plan[kind] <= 1.0 for kind in strategies.FAULT_KINDS)


def test_fault_plans_refuse_a_rate_above_one_at_once() -> None:
    with pytest.raises(mqlite.InvalidArgument, match="max_rate"):
        strategies.fault_plans(max_rate=2.0)


# -- BrokerMachine as it is ----------------------------------------------------------------------


def test_broker_machine_runs_as_it_is() -> None:
    run_state_machine_as_test(BrokerMachine, settings=MACHINE)


def test_broker_machine_runs_on_a_file() -> None:
    class OnAFile(BrokerMachine):
        backend = "file"

    run_state_machine_as_test(OnAFile, settings=settings(MACHINE, max_examples=5))


def test_mqlite_testing_gives_the_machine_lazily() -> None:
    import mqlite.testing

    assert mqlite.testing.BrokerMachine is BrokerMachine
    assert mqlite.testing.strategies is strategies


# -- a user's consumer ---------------------------------------------------------------------------


class AcksAtOnce(BrokerMachine):
    """A correct consumer: it acks each message as it handles it."""

    machine_settles = False

    def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
        if sub.manual:
            try:
                sub.ack(message)
            except mqlite.NotPending:
                pass  # the same offset twice in one poll, after a seek back


def test_a_consumer_that_acks_each_message_passes() -> None:
    run_state_machine_as_test(AcksAtOnce, settings=MACHINE)


class AcksTwice(BrokerMachine):
    machine_settles = False

    def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
        if sub.manual:
            sub.ack(message)
            sub.ack(message)


class NeverAcks(BrokerMachine):
    machine_settles = False

    def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
        pass


class NacksForEver(BrokerMachine):
    machine_settles = False

    def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
        if sub.manual:
            sub.nack(message)


class SkipsOddOffsets(BrokerMachine):
    """Acks only even offsets: the odd ones stay pending and come back for ever."""

    machine_settles = False

    def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
        if sub.manual and message.offset % 2 == 0:
            try:
                sub.ack(message)
            except mqlite.NotPending:
                pass


def test_a_consumer_that_acks_twice_is_caught() -> None:
    with pytest.raises(mqlite.NotPending):
        run_state_machine_as_test(AcksTwice, settings=FINDS_A_BUG)


@pytest.mark.parametrize("machine", [NeverAcks, NacksForEver, SkipsOddOffsets], ids=lambda m: m.__name__)
def test_a_consumer_that_leaves_messages_unsettled_is_caught(machine: type[BrokerMachine]) -> None:
    with pytest.raises(AssertionError, match="never settled"):
        run_state_machine_as_test(machine, settings=FINDS_A_BUG)


def test_a_nack_with_a_delay_is_refused_by_the_checked_subscription() -> None:
    class NacksLater(BrokerMachine):
        def consume(self, sub: CheckedSubscription, message: mqlite.Message) -> None:
            if sub.manual:
                sub.nack(message, delay=5)

    with pytest.raises(ValueError, match="delay=0"):
        run_state_machine_as_test(NacksLater, settings=FINDS_A_BUG)


# -- a broker that misbehaves --------------------------------------------------------------------


def test_the_machine_catches_a_broker_that_loses_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ack = mqlite.Subscription.ack

    def ack_but_drop_offset_1(self: mqlite.Subscription, message: Any, *more: Any) -> None:
        kept = [m for m in (message, *more) if (m if isinstance(m, int) else m.offset) != 1]
        if kept:
            real_ack(self, *kept)

    monkeypatch.setattr(mqlite.Subscription, "ack", ack_but_drop_offset_1)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(BrokerMachine, settings=FINDS_A_BUG)


def test_the_machine_catches_a_broker_that_skips_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real_poll = mqlite.Subscription.poll

    def poll_but_lose_offset_2(self: mqlite.Subscription, *args: Any, **kwargs: Any) -> list[mqlite.Message]:
        return [m for m in real_poll(self, *args, **kwargs) if m.offset != 2]

    monkeypatch.setattr(mqlite.Subscription, "poll", poll_but_lose_offset_2)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(BrokerMachine, settings=FINDS_A_BUG)
