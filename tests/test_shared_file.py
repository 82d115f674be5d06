"""Several brokers on one file: in one process (threads) and in several (multiprocessing)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import processes
import pytest
from helpers import WAIT, Worker, payloads, pull_all, stop_after_publishing_dead_letters
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import mqlite
from mqlite.engine.sqlite.schema import SCHEMA_VERSION

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "shared.mqlite")


def _start(children: list[Any], target: Any, *args: Any) -> Any:
    process = spawn.Process(target=target, args=args, daemon=True)
    process.start()
    children.append(process)
    return process


# -- two brokers in one process ----------------------------------------------------------


def test_a_message_published_by_one_broker_is_read_by_another(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        reader = b.subscribe("q", name="reader")
        a.publish("q", "created", 1)
        b.publish("q", "created", 2)
        a.publish("q", "created", 3)
        got = [reader.get(timeout=WAIT) for _ in range(3)]
        assert [(m.offset, m.payload) for m in got if m is not None] == [(0, 1), (1, 2), (2, 3)]


def test_a_broker_alone_on_its_file_lets_another_in_without_losing_its_state(path: str) -> None:
    with mqlite.Broker(path) as a:
        sub_a = a.subscribe("q", name="workers", ack="manual")
        for i in range(4):
            a.publish("q", "job", i)
        held = sub_a.poll(max_messages=2)  # taken while a was alone on the file
        with mqlite.Broker(path) as b:  # a makes room: b opens instead of failing
            sub_b = b.subscribe("q", name="workers", ack="manual")
            assert payloads(sub_b.poll(max_messages=10)) == [2, 3], "not the ones a holds"
            a.publish("q", "job", 4)
            assert payloads(sub_b.poll(max_messages=10, timeout=WAIT)) == [4]
            sub_a.ack(*held)
            assert sub_b.pending == 3
        assert a.info().subscriptions[0].pending == 3, "b's unacked messages came back to the file"
        assert payloads(sub_a.poll(max_messages=10, timeout=WAIT)) == [2, 3, 4]


def test_competing_brokers_share_a_name_and_never_both_get_a_message(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        sub_a = a.subscribe("q", name="workers", ack="manual")
        sub_b = b.subscribe("q", name="workers", ack="manual")
        for i in range(10):
            a.publish("q", "job", i)
        first = sub_a.poll(max_messages=4)
        rest = sub_b.poll(max_messages=100)
        assert payloads(first) == [0, 1, 2, 3]
        assert payloads(rest) == [4, 5, 6, 7, 8, 9]
        for message in first:
            sub_a.ack(message)
        assert sub_a.poll(max_messages=100) == []
        assert (sub_a.pending, sub_b.pending) == (6, 6), "the file's pending messages, whoever holds them"


def test_acks_in_one_broker_are_seen_by_the_other(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        sub_a = a.subscribe("q", name="workers", ack="manual")
        a.publish("q", "job", "x")
        message = sub_a.get(timeout=WAIT)
        assert message is not None
        sub_a.ack(message)
        sub_a.close()
        sub_b = b.subscribe("q", name="workers", ack="manual")
        assert sub_b.poll(max_messages=10) == []
        assert sub_b.position == 1


def test_a_closing_broker_hands_its_unacked_messages_to_the_other(path: str) -> None:
    with mqlite.Broker(path) as a:
        b = mqlite.Broker(path)
        sub_b = b.subscribe("q", name="workers", ack="manual")
        sub_a = a.subscribe("q", name="workers", ack="manual")
        for i in range(3):
            a.publish("q", "job", i)
        assert payloads(sub_b.poll(max_messages=10)) == [0, 1, 2]
        b.close()
        again = sub_a.poll(max_messages=10, timeout=WAIT)
        assert payloads(again) == [0, 1, 2]
        assert a.info().subscriptions[0].redelivered == 3


def test_a_nack_makes_the_message_due_for_the_other_broker(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        sub_a = a.subscribe("q", name="workers", ack="manual")
        sub_b = b.subscribe("q", name="workers", ack="manual")
        a.publish("q", "job", "retry me")
        message = sub_a.get(timeout=WAIT)
        assert message is not None
        sub_a.nack(message)
        again = sub_b.get(timeout=WAIT)
        assert again is not None
        assert again.payload == "retry me"
        assert sub_a.poll(max_messages=10) == []


def test_a_dead_letter_in_transit_stays_held_and_comes_back_only_when_its_broker_goes(path: str) -> None:
    settings: dict[str, Any] = {"name": "workers", "ack": "manual", "max_deliveries": 1}
    with mqlite.Broker(path) as b:
        a = mqlite.Broker(path)
        stop_after_publishing_dead_letters(a.queue("q"))
        sub_a = a.subscribe("q", **settings)
        sub_b = b.subscribe("q", **settings)
        a.publish("q", "job", "poison")
        message = sub_a.get(timeout=WAIT)
        assert message is not None
        sub_a.nack(message)  # dead-lettered; its pending row on the file is still a's
        b.publish("q", "job", "next")  # makes a reload the file's pending rows
        taken = sub_a.poll(max_messages=10, timeout=WAIT)
        assert payloads(taken) == ["next"]
        sub_a.ack(*taken)
        assert sub_b.poll(max_messages=10) == []
        a.close()
        assert payloads(sub_b.poll(max_messages=10, timeout=WAIT)) == ["poison"]
        assert payloads(pull_all(b.subscribe("q.dead-letter", start="earliest"))) == ["poison"]


@pytest.mark.parametrize("nacker_leaves", [False, True])
def test_a_retry_waiting_on_its_delay_is_due_for_the_other_broker_when_the_delay_ends(
    path: str, nacker_leaves: bool
) -> None:
    clocks = [mqlite.ManualClock(start=1_000.0), mqlite.ManualClock(start=1_000.0)]
    with mqlite.Broker(path, clock=clocks[0]) as a, mqlite.Broker(path, clock=clocks[1]) as b:
        sub_a = a.subscribe("q", name="workers", ack="manual")
        sub_b = b.subscribe("q", name="workers", ack="manual")
        a.publish("q", "job", "retry in a minute")
        message = sub_a.get(timeout=WAIT)
        assert message is not None
        sub_a.nack(message, delay=60)  # held by neither broker while it waits
        if nacker_leaves:
            sub_a.close()
        assert sub_b.poll(max_messages=10) == []
        for clock in clocks:
            clock.advance(59)
        assert sub_b.poll(max_messages=10) == []
        for clock in clocks:
            clock.advance(2)
        assert payloads(sub_b.poll(max_messages=10)) == ["retry in a minute"]
        if not nacker_leaves:
            assert sub_a.poll(max_messages=10) == []  # b holds it now


def test_a_publish_in_one_broker_wakes_a_blocked_reader_of_the_other(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        reader = b.subscribe("q", name="reader")
        worker = Worker(lambda: reader.get(timeout=WAIT))
        assert worker.started.wait(WAIT)
        try:
            a.publish("q", "created", "hello")
        finally:
            message = worker.join()
        assert message is not None
        assert message.payload == "hello"


def test_a_push_callback_in_one_broker_runs_for_a_publish_in_the_other(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        seen: list[Any] = []
        both = threading.Event()

        def record(message: mqlite.Message) -> None:
            seen.append(message.payload)
            if len(seen) == 2:
                both.set()

        b.subscribe("q", name="pusher", callback=record)
        a.publish("q", "created", 1)
        a.publish("q", "created", 2)
        assert both.wait(WAIT)
        assert seen == [1, 2]


def test_a_push_batch_is_not_delivered_again_when_another_broker_commits_during_its_callback(path: str) -> None:
    inside = threading.Event()
    release = threading.Event()
    seen: list[int] = []

    def handle(message: mqlite.Message) -> None:
        seen.append(message.offset)
        if message.offset == 0:
            inside.set()
            release.wait(WAIT)

    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        b.subscribe("q", name="pusher", callback=handle)
        try:
            a.publish("q", "created", 0)
            assert inside.wait(WAIT)
            a.publish("q", "created", 1)  # b reloads the file when its callback returns
        finally:
            release.set()
        assert b.drain(timeout=WAIT)
        assert seen == [0, 1]


def test_a_push_batch_run_by_a_manual_dispatcher_is_not_delivered_again_after_another_broker_commits(
    path: str,
) -> None:
    seen: list[int] = []
    with mqlite.Broker(path) as a, mqlite.Broker(path, dispatcher=mqlite.ManualDispatcher()) as b:

        def handle(message: mqlite.Message) -> None:
            seen.append(message.offset)
            if message.offset == 0:
                a.publish("q", "created", 1)

        b.subscribe("q", name="pusher", callback=handle)
        a.publish("q", "created", 0)
        assert b.drain(timeout=WAIT)
        assert seen == [0, 1]


def test_competing_push_brokers_never_both_handle_a_message(path: str) -> None:
    dispatchers = [mqlite.ManualDispatcher(), mqlite.ManualDispatcher()]
    seen: list[tuple[str, int]] = []
    with mqlite.Broker(path, dispatcher=dispatchers[0]) as a, mqlite.Broker(path, dispatcher=dispatchers[1]) as b:

        def in_a(message: mqlite.Message) -> None:
            seen.append(("a", message.offset))
            if message.offset == 0:  # while a's batch is in flight, b takes and handles the next
                b.publish("q", "job", 1)
                dispatchers[1].run_ready()

        a.subscribe("q", name="workers", callback=in_a)
        b.subscribe("q", name="workers", callback=lambda message: seen.append(("b", message.offset)))
        a.publish("q", "job", 0)
        assert a.drain(timeout=WAIT)
        assert b.drain(timeout=WAIT)
        assert a.drain(timeout=WAIT)
        assert seen == [("a", 0), ("b", 1)]


def test_every_broker_on_a_file_counts_a_message_another_holds_as_pending(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        sub_a = a.subscribe("q", name="workers", ack="manual")
        sub_b = b.subscribe("q", name="workers", ack="manual")
        a.publish("q", "job", "held by a")
        assert sub_a.get(timeout=WAIT) is not None
        reported = [broker.info().subscription("q", "workers").pending for broker in (a, b)]
        assert (reported, sub_a.pending, sub_b.pending) == ([1, 1], 1, 1)


def test_info_lists_the_queues_another_broker_created_after_this_one_opened(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        a.subscribe("late", name="reader")
        a.publish("late", "created", 1)
        info = b.info()
        assert [q.name for q in info.queues] == ["late"]
        assert info.queue("late").end_offset == 1
        assert [(s.queue, s.name, s.lag) for s in info.subscriptions] == [("late", "reader", 1)]


def test_different_names_in_different_brokers_each_get_everything(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        vendor = a.subscribe("q", name="vendor")
        billing = b.subscribe("q", name="billing")
        for i in range(5):
            (a if i % 2 else b).publish("q", "delivered", i)
        assert payloads(pull_all(vendor)) == [0, 1, 2, 3, 4]
        assert payloads(pull_all(billing)) == [0, 1, 2, 3, 4]


def test_a_subscription_deleted_in_one_broker_is_gone_from_the_other(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        a.subscribe("q", name="old").close()
        b.publish("q", "e", 1)
        assert [s.name for s in b.info().subscriptions] == ["old"]
        assert a.delete_subscription("q", "old")
        b.publish("q", "e", 2)
        assert b.info().subscriptions == ()


def test_a_batched_broker_needs_the_file_to_itself(path: str) -> None:
    with mqlite.Broker(path, commit="batch"):
        with pytest.raises(mqlite.StorageError, match="needs the file to itself"):
            mqlite.Broker(path)
        with pytest.raises(mqlite.StorageError, match="already open in another mqlite Broker"):
            mqlite.Broker(path, commit="batch")
    with mqlite.Broker(path), pytest.raises(mqlite.StorageError, match="commit='each' to share the file"):
        mqlite.Broker(path, commit="batch")
    mqlite.Broker(path, commit="batch").close()  # free again once the others closed


@pytest.mark.parametrize(
    ("version", "added_since"), [(1, ["owner", "due", "since"]), (2, ["due", "since"]), (3, ["since"]), (4, [])]
)
def test_an_older_file_is_upgraded_and_keeps_its_pending_messages(
    path: str, version: int, added_since: list[str]
) -> None:
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        broker.publish("q", "e", "unacked")
        assert sub.get(timeout=WAIT) is not None
    with sqlite3.connect(path) as db:  # forge the older layout
        for column in added_since:
            db.execute(f"ALTER TABLE pending DROP COLUMN {column}")
        db.execute("DROP TABLE consumers")  # added in version 5
        db.execute("UPDATE mqlite_schema SET version = ?", (version,))
    db.close()
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        message = sub.get(timeout=WAIT)
        assert message is not None
        assert message.payload == "unacked"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM mqlite_schema").fetchone() == (SCHEMA_VERSION,)
        columns = [row[1] for row in db.execute("PRAGMA table_info(pending)")]
        assert columns[-3:] == ["owner", "due", "since"]
        assert db.execute("SELECT count(*) FROM consumers").fetchone() == (0,)  # the broker closed
    db.close()


# -- several processes -------------------------------------------------------------------


def test_processes_publishing_at_once_get_contiguous_offsets_and_lose_nothing(path: str, children: list[Any]) -> None:
    with mqlite.Broker(path) as broker:
        audit = broker.subscribe("q", name="audit")  # keeps every message (interest retention)
        writers = [_start(children, processes.publish, path, writer, 300) for writer in range(3)]
        for process in writers:
            process.join(processes.DEADLINE)
            assert process.exitcode == 0
        got = pull_all(audit)
    assert [m.offset for m in got] == list(range(900))
    assert Counter(tuple(m.payload) for m in got) == Counter((w, i) for w in range(3) for i in range(300))
    for writer in range(3):
        mine = [m.payload[1] for m in got if m.payload[0] == writer]
        assert mine == sorted(mine), "one writer's messages kept their order"


def test_competing_consumer_processes_ack_each_message_exactly_once(path: str, children: list[Any]) -> None:
    acks = spawn.Queue()
    ready = spawn.Barrier(4)
    stop = spawn.Event()
    total = 600
    with mqlite.Broker(path) as broker:
        broker.subscribe("q", name="workers", ack="manual").close()
        consumers = [_start(children, processes.consume, path, acks, ready, stop, 7) for _ in range(3)]
        ready.wait(processes.DEADLINE)  # every consumer subscribed before the first publish
        writer = _start(children, processes.publish, path, 9, total // 2)
        for i in range(total // 2):
            broker.publish("q", "job", [0, i])
        writer.join(processes.DEADLINE)
        assert writer.exitcode == 0
        acked = [acks.get(timeout=processes.DEADLINE) for _ in range(total)]
        stop.set()
        reports = [acks.get(timeout=processes.DEADLINE) for _ in consumers]
        for process in consumers:
            process.join(processes.DEADLINE)
            assert process.exitcode == 0
        info = broker.info().subscriptions[0]
    assert Counter(tuple(payload) for _, payload in acked) == Counter(
        [(0, i) for i in range(total // 2)] + [(9, i) for i in range(total // 2)]
    )
    assert [kind for kind, _ in reports] == ["done"] * 3, "no message was acked twice"
    assert sorted(count for _, count in reports if count) == sorted(Counter(pid for pid, _ in acked).values())
    assert len({pid for pid, _ in acked}) >= 2, "the work was shared between processes"
    assert (info.pending, info.lag) == (0, 0)


def test_a_killed_consumer_process_messages_are_redelivered_to_another(path: str, children: list[Any]) -> None:
    results = spawn.Queue()
    took = spawn.Event()
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="workers", ack="manual")
        for i in range(5):
            broker.publish("q", "job", i)
        victim = _start(children, processes.take_and_hang, path, 5, took, results)
        assert took.wait(processes.DEADLINE)
        assert results.get(timeout=WAIT) == [0, 1, 2, 3, 4]
        assert sub.poll(max_messages=10) == [], "the other process holds them while it lives"
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT)
        again = sub.poll(max_messages=10, timeout=WAIT)
        while len(again) < 5:
            more = sub.poll(max_messages=10, timeout=WAIT)
            assert more, f"only {payloads(again)} came back"
            again += more
        assert payloads(again) == [0, 1, 2, 3, 4]
        for message in again:
            sub.ack(message)
        assert broker.info().subscriptions[0].redelivered == 5


def test_a_publish_in_one_process_wakes_a_reader_blocked_in_another(path: str, children: list[Any]) -> None:
    results = spawn.Queue()
    ready = spawn.Event()
    with mqlite.Broker(path) as broker:
        _start(children, processes.wait_for_one, path, ready, results)
        assert ready.wait(processes.DEADLINE)
        broker.publish("q", "created", "wake up")
        payload, _ = results.get(timeout=processes.DEADLINE)
    assert payload == "wake up"


# -- a model of two brokers competing on one file ----------------------------------------


class SharedFileMachine(RuleBasedStateMachine):
    """Two brokers on one file compete on one manual-ack name, checked against a plain model.

    The model: every published offset is unread, held by one broker, waiting out a nack delay,
    due again (nacked, its delay over, or given back by a closing broker, for whichever broker
    reads next), or acked. A take may return only unread or due messages, exactly as many as it
    asked for while there are any, and never one that the other broker holds. Each broker has a
    ManualClock; both advance together.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.directory.name, "shared.mqlite")
        self.now = 1_000.0
        self.clocks = [mqlite.ManualClock(start=self.now), mqlite.ManualClock(start=self.now)]
        self.brokers = [mqlite.Broker(self.path, clock=clock) for clock in self.clocks]
        self.subs = [broker.subscribe("q", name="w", ack="manual") for broker in self.brokers]
        self.published = 0
        self.held: list[dict[int, mqlite.Message]] = [{}, {}]
        self.due: set[int] = set()
        self.waiting: dict[int, float] = {}
        self.acked: set[int] = set()

    @rule(who=st.sampled_from([0, 1]), count=st.integers(1, 3))
    def publish(self, who: int, count: int) -> None:
        for _ in range(count):
            message = self.brokers[who].publish("q", "job", self.published)
            assert message.offset == self.published
            self.published += 1

    @rule(who=st.sampled_from([0, 1]), count=st.integers(1, 4))
    def take(self, who: int, count: int) -> None:
        unread = self.published - len(self.due) - len(self.waiting) - len(self.acked) - sum(len(h) for h in self.held)
        got = self.subs[who].poll(max_messages=count)
        assert len(got) == min(count, unread + len(self.due)), "took as many as there were"
        for message in got:
            offset = message.offset
            assert offset not in self.acked, f"acked message {offset} delivered again"
            assert offset not in self.held[1 - who], f"message {offset} held by the other broker too"
            assert offset not in self.held[who], f"message {offset} delivered twice to one broker"
            assert offset not in self.waiting, f"message {offset} delivered before its nack delay ended"
            self.due.discard(offset)
            self.held[who][offset] = message

    @rule(who=st.sampled_from([0, 1]), data=st.data())
    def ack(self, who: int, data: st.DataObject) -> None:
        if not self.held[who]:
            return
        offset = data.draw(st.sampled_from(sorted(self.held[who])))
        self.subs[who].ack(self.held[who].pop(offset))
        self.acked.add(offset)

    @rule(who=st.sampled_from([0, 1]), data=st.data(), delay=st.sampled_from([0, 5]))
    def nack(self, who: int, data: st.DataObject, delay: int) -> None:
        if not self.held[who]:
            return
        offset = data.draw(st.sampled_from(sorted(self.held[who])))
        self.subs[who].nack(self.held[who].pop(offset), delay=delay)
        if delay:
            self.waiting[offset] = self.now + delay
        else:
            self.due.add(offset)

    @rule(seconds=st.sampled_from([1, 5]))
    def advance(self, seconds: int) -> None:
        self.now += seconds
        for clock in self.clocks:
            clock.advance(seconds)
        for offset, due in list(self.waiting.items()):
            if due <= self.now:
                del self.waiting[offset]
                self.due.add(offset)

    @rule(who=st.sampled_from([0, 1]))
    def restart(self, who: int) -> None:
        self.brokers[who].close()
        self.due.update(self.held[who])
        self.held[who].clear()
        self.clocks[who] = mqlite.ManualClock(start=self.now)
        self.brokers[who] = mqlite.Broker(self.path, clock=self.clocks[who])
        self.subs[who] = self.brokers[who].subscribe("q", name="w", ack="manual")

    @invariant()
    def each_broker_counts_what_either_holds_and_what_is_due(self) -> None:
        for who in (0, 1):
            assert self.subs[who].pending == sum(len(h) for h in self.held) + len(self.due) + len(self.waiting)

    def teardown(self) -> None:
        for broker in self.brokers:
            broker.close()
        self.directory.cleanup()


SharedFileMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
test_two_brokers_on_one_file_match_the_model = SharedFileMachine.TestCase


def test_processes_opening_a_new_file_at_the_same_moment_all_open_it(tmp_path: Path) -> None:
    path = str(tmp_path / "new.mqlite")
    openers = 4
    ready = spawn.Barrier(openers)
    errors = spawn.Queue()
    children = [spawn.Process(target=processes.open_fresh, args=(path, ready, errors)) for _ in range(openers)]
    for child in children:
        child.start()
    for child in children:
        child.join(WAIT * 6)
    assert [child.exitcode for child in children] == [0] * openers
    assert errors.empty(), errors.get(timeout=WAIT)
    with mqlite.Broker(path) as broker:
        assert broker.info().queue("q").end_offset == openers
