"""Deduplicated publishes (issue 17): ``publish(..., dedup_id=...)`` within a per-queue window.

A second publish with an id seen within ``QueueConfig.dedup_window`` (counted from the id's
first publish) writes nothing and returns the first message. These tests run on memory and on a
file (Redis does not support dedup ids yet); the file-only ones cover restarts, other processes,
SIGKILL and the bound on the ``dedup`` table. A state machine checks the broker against a plain
model with a clock-driven window.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dedup_processes
import pytest
from helpers import WAIT, Worker, offsets, payloads, pull_all, run_machine_on_redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mqlite
from mqlite.testing import VirtualClock

spawn = multiprocessing.get_context("spawn")

START = 1_700_000_000.0  # VirtualClock's default start


@pytest.fixture
def vclock() -> VirtualClock:
    """A virtual clock that moves only on ``advance``."""
    return VirtualClock(START, autojump=False)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "dedup.mqlite")


def _duplicates(broker: mqlite.Broker, queue: str = "q") -> int:
    return next(info.duplicates for info in broker.info().queues if info.name == queue)


def _read_only(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _stored(path: str, queue: str = "q") -> tuple[list[tuple[int, bytes]], int]:
    """The ``(offset, payload)`` message rows of ``queue`` on the closed file, and its dedup row count."""
    db = _read_only(path)
    try:
        rows = db.execute(
            'SELECT "offset", payload FROM messages WHERE queue = ? ORDER BY "offset"', (queue,)
        ).fetchall()
        (count,) = db.execute("SELECT count(*) FROM dedup WHERE queue = ?", (queue,)).fetchone()
    finally:
        db.close()
    return rows, count


# -- a duplicate returns the original and writes nothing -------------------------------------


def test_a_duplicate_publish_returns_the_original_message_and_writes_nothing(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    reader = broker.subscribe("q", name="reader", start="earliest")
    first = queue.publish("created", {"n": 1}, dedup_id="order-1")
    again = queue.publish("created", {"n": 1}, dedup_id="order-1")
    assert again == first
    assert again.offset == first.offset == 0
    assert queue.end_offset == 1
    assert payloads(pull_all(reader)) == [{"n": 1}]
    assert _duplicates(broker) == 1


def test_broker_publish_and_queue_publish_share_one_window(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    first = broker.publish("q", "created", 1, dedup_id="x")
    assert queue.publish("created", 1, dedup_id="x") == first
    other = queue.publish("created", 2, dedup_id="y")
    assert broker.publish("q", "created", 2, dedup_id="y") == other
    assert (first.offset, other.offset, queue.end_offset) == (0, 1, 2)
    assert _duplicates(broker) == 2


def test_a_retry_with_another_payload_gets_the_first_message_back(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    first = queue.publish("created", "first", key="k", headers={"h": 1}, dedup_id="x")
    again = queue.publish("updated", "second", dedup_id="x")
    assert (again.event, again.payload, again.key, dict(again.headers)) == ("created", "first", "k", {"h": 1})
    assert again == first
    assert queue.end_offset == 1


def test_dedup_ids_are_per_queue(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    a = broker.queue("a", retention="limits")
    b = broker.queue("b", retention="limits")
    assert a.publish("e", 1, dedup_id="x").offset == 0
    assert b.publish("e", 2, dedup_id="x").offset == 0
    assert (a.end_offset, b.end_offset) == (1, 1)
    assert (_duplicates(broker, "a"), _duplicates(broker, "b")) == (0, 0)


def test_publishes_without_a_dedup_id_are_never_deduplicated(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", 1, dedup_id="x")
    assert offsets([queue.publish("e", 1), queue.publish("e", 1, dedup_id=None)]) == [1, 2]
    assert _duplicates(broker) == 0


def test_publish_many_writes_only_new_ids_at_contiguous_offsets(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    reader = broker.subscribe("q", name="reader", start="earliest")
    old = queue.publish("e", "old", dedup_id="old")
    got = queue.publish_many(
        [
            ("e", "a", None, None, "a"),
            ("e", "plain"),
            ("e", "a again", None, None, "a"),  # repeats an earlier item of this call
            ("e", "old again", None, None, "old"),  # published before the call
            ("e", "b", "key", {"h": 1}, "b"),
            ("e", "plain"),  # a plain item is never a duplicate
            ("e", "b again", None, None, "b"),
        ]
    )
    assert [(m.offset, m.payload) for m in got] == [
        (1, "a"),
        (2, "plain"),
        (1, "a"),
        (0, "old"),
        (3, "b"),
        (4, "plain"),
        (3, "b"),
    ]
    assert got[2] == got[0]
    assert got[3] == old
    assert got[6] == got[4]
    assert queue.end_offset == 5
    assert payloads(pull_all(reader)) == ["old", "a", "plain", "b", "plain"]
    assert _duplicates(broker) == 3
    # The ids written inside the call are remembered for later publishes too.
    assert queue.publish("e", "b later", dedup_id="b") == got[4]


def test_publish_many_takes_dedup_ids_in_mappings(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    got = queue.publish_many(
        [
            {"event": "e", "payload": 1, "dedup_id": "x"},
            {"event": "e", "payload": 2, "dedup_id": None},
            {"event": "e", "payload": 3, "dedup_id": "x"},
        ]
    )
    assert [(m.offset, m.payload) for m in got] == [(0, 1), (1, 2), (0, 1)]
    assert queue.publish("e", 4, dedup_id="x") == got[0]
    assert queue.end_offset == 2


def test_publish_many_of_only_duplicates_writes_nothing(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    first = queue.publish_many([("e", 1, None, None, "x"), ("e", 2, None, None, "y")])
    again = queue.publish_many([("e", 3, None, None, "y"), ("e", 4, None, None, "x"), ("e", 5, None, None, "y")])
    assert again == [first[1], first[0], first[1]]
    assert queue.end_offset == 2
    assert _duplicates(broker) == 3


def test_a_duplicate_of_a_message_retention_dropped_keeps_the_original_offset_and_time(
    make_broker: Callable[..., mqlite.Broker], vclock: VirtualClock, backend: str
) -> None:
    broker = make_broker(clock=vclock)
    queue = broker.queue("q", retention="limits", max_messages=1, dedup_window=3600)
    first = queue.publish("created", "first", dedup_id="x")
    vclock.advance(1)
    # Enough later messages that the queue frees the dropped ones, in memory and on the file
    # (it frees a dropped prefix in large batches).
    for _ in range(100):
        queue.publish_many([("filler", i) for i in range(200)])
    assert queue.start_offset > 0
    vclock.advance(1)
    end = queue.end_offset
    again = queue.publish("retried", "second", dedup_id="x")
    assert (again.offset, again.timestamp) == (first.offset, first.timestamp)
    if backend == "redis":  # the server keeps only the offset and time of an id
        assert (again.event, again.payload) == ("retried", "second"), "the retry's content, the original being gone"
    else:  # the broker that published it keeps the message itself in its window
        assert again == first
    assert queue.end_offset == end
    assert _duplicates(broker) == 1


def test_after_a_restart_a_duplicate_of_a_dropped_message_gets_the_retrys_content_at_the_original_offset(
    path: str, vclock: VirtualClock
) -> None:
    with mqlite.Broker(path, clock=vclock) as broker:
        queue = broker.queue("q", retention="limits", max_messages=1, dedup_window=3600)
        first = queue.publish("created", "first", dedup_id="x")
        for _ in range(100):
            queue.publish_many([("filler", i) for i in range(200)])
        assert queue.start_offset > 0
    with mqlite.Broker(path, clock=vclock) as broker:
        queue = broker.queue("q")
        end = queue.end_offset
        again = queue.publish("retried", "second", dedup_id="x")
        assert (again.offset, again.timestamp) == (first.offset, first.timestamp)
        assert (again.event, again.payload) == ("retried", "second"), "the retry's content, the original being gone"
        assert queue.end_offset == end


# -- the window ---------------------------------------------------------------------------------


def test_an_id_is_refused_for_the_window_after_its_first_publish_and_a_duplicate_does_not_extend_it(
    make_broker: Callable[..., mqlite.Broker], vclock: VirtualClock
) -> None:
    broker = make_broker(clock=vclock)
    queue = broker.queue("q", retention="limits", dedup_window=10)
    first = queue.publish("e", "first", dedup_id="x")
    vclock.advance(9)  # t = 9: a duplicate, which must not move the window's start
    assert queue.publish("e", "retry", dedup_id="x") == first
    vclock.advance(0.5)  # t = 9.5
    assert queue.publish("e", "retry", dedup_id="x") == first
    assert queue.end_offset == 1
    vclock.advance(0.5)  # t = 10: the window of the first publish ended
    second = queue.publish("e", "second", dedup_id="x")
    assert (second.offset, second.payload, second.timestamp) == (1, "second", START + 10)
    vclock.advance(9.75)  # t = 19.75: within the new window
    assert queue.publish("e", "retry", dedup_id="x") == second
    vclock.advance(0.25)  # t = 20
    assert queue.publish("e", "third", dedup_id="x").offset == 2
    assert queue.end_offset == 3
    assert _duplicates(broker) == 3


def test_publish_many_honours_the_window(make_broker: Callable[..., mqlite.Broker], vclock: VirtualClock) -> None:
    broker = make_broker(clock=vclock)
    queue = broker.queue("q", retention="limits", dedup_window=5)
    first = queue.publish_many([("e", 1, None, None, "x"), ("e", 2, None, None, "y")])
    vclock.advance(3)
    third = queue.publish("e", 3, dedup_id="z")  # t = 3
    vclock.advance(2)  # t = 5: x and y expired, z not
    got = queue.publish_many([("e", 4, None, None, "x"), ("e", 5, None, None, "z"), ("e", 6, None, None, "y")])
    assert [(m.offset, m.payload) for m in got] == [(3, 4), (2, 3), (4, 6)]
    assert got[1] == third
    assert first[0].offset == 0


def test_the_default_window_is_two_minutes(make_broker: Callable[..., mqlite.Broker], vclock: VirtualClock) -> None:
    broker = make_broker(clock=vclock)
    queue = broker.queue("q", retention="limits")
    assert queue.config.dedup_window == 120
    assert queue.config.dedup_max_ids == 100_000
    assert broker.info().queues[0].dedup_window == 120
    first = queue.publish("e", 1, dedup_id="x")
    vclock.advance(119.5)
    assert queue.publish("e", 2, dedup_id="x") == first
    vclock.advance(0.5)
    assert queue.publish("e", 3, dedup_id="x").offset == 1


def test_dedup_window_is_set_through_broker_queue_and_reported_by_info(
    make_broker: Callable[..., mqlite.Broker], vclock: VirtualClock
) -> None:
    broker = make_broker(clock=vclock)
    queue = broker.queue("q", retention="limits", dedup_window=30)
    assert (queue.config.dedup_window, broker.info().queues[0].dedup_window) == (30, 30)
    queue.publish("e", 1, dedup_id="x")
    broker.queue("q", dedup_window=2)  # an existing queue takes the new window
    assert broker.info().queues[0].dedup_window == 2
    assert queue.config.retention == "limits", "settings left out keep their values"
    vclock.advance(2)
    assert queue.publish("e", 2, dedup_id="x").offset == 1


@pytest.mark.parametrize(
    "setting",
    [
        {"dedup_window": 0},
        {"dedup_window": -1},
        {"dedup_window": float("nan")},
        {"dedup_window": float("inf")},
        {"dedup_window": "10"},
        {"dedup_max_ids": 0},
        {"dedup_max_ids": 1.5},
        {"dedup_max_ids": True},
    ],
    ids=repr,
)
def test_a_bad_window_setting_is_refused_and_changes_nothing(
    make_broker: Callable[..., mqlite.Broker], setting: dict[str, Any]
) -> None:
    broker = make_broker()
    queue = broker.queue("q", dedup_window=30, dedup_max_ids=10)
    with pytest.raises(mqlite.InvalidArgument, match=next(iter(setting))):
        broker.queue("q", **setting)
    assert (queue.config.dedup_window, queue.config.dedup_max_ids) == (30, 10)


# -- bounded -------------------------------------------------------------------------------------


def test_past_dedup_max_ids_the_oldest_ids_are_forgotten_first(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits", dedup_max_ids=3)
    firsts = [queue.publish("e", i, dedup_id=f"id{i}") for i in range(5)]  # id0 and id1 forgotten
    assert [queue.publish("e", "retry", dedup_id=f"id{i}") for i in (4, 3, 2)] == [firsts[4], firsts[3], firsts[2]]
    assert queue.end_offset == 5
    assert queue.publish("e", "again", dedup_id="id0").offset == 5, "the oldest id was forgotten"
    # Remembering id0 again forgot the oldest of the rest, id2; id3 and id4 are still known.
    assert queue.publish("e", "again", dedup_id="id2").offset == 6
    assert queue.publish("e", "retry", dedup_id="id4") == firsts[4]
    assert queue.end_offset == 7


def test_publish_many_keeps_the_newest_ids_within_dedup_max_ids(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits", dedup_max_ids=2)
    queue.publish_many([("e", i, None, None, f"id{i}") for i in range(4)])
    got = queue.publish_many([("e", "retry", None, None, f"id{i}") for i in (3, 2, 1)])
    assert [(m.offset, m.payload) for m in got] == [(3, 3), (2, 2), (4, "retry")]


def test_dedup_max_ids_holds_after_a_restart(path: str) -> None:
    with mqlite.Broker(path) as broker:
        queue = broker.queue("q", retention="limits", dedup_max_ids=3)
        for i in range(6):
            queue.publish("e", i, dedup_id=f"id{i}")
    with mqlite.Broker(path) as broker:
        queue = broker.queue("q")
        assert queue.config.dedup_max_ids == 3
        assert [queue.publish("e", "retry", dedup_id=f"id{i}").offset for i in (5, 4, 3)] == [5, 4, 3]
        assert queue.publish("e", "again", dedup_id="id2").offset == 6
        assert queue.end_offset == 7


def test_after_a_restart_an_id_published_again_in_a_new_window_counts_as_the_newest(
    path: str, vclock: VirtualClock
) -> None:
    with mqlite.Broker(path, clock=vclock) as broker:
        queue = broker.queue("q", retention="limits", dedup_window=10, dedup_max_ids=2)
        queue.publish("e", "a", dedup_id="a")
        vclock.advance(10)  # a's window ended: publishing it again starts a new one, after b's
        queue.publish("e", "b", dedup_id="b")
        second_a = queue.publish("e", "a again", dedup_id="a")
        assert second_a.offset == 2
    with mqlite.Broker(path, clock=vclock) as broker:
        queue = broker.queue("q")
        queue.publish("e", "c", dedup_id="c")  # a third id: the oldest, b, is forgotten
        assert queue.publish("e", "retry", dedup_id="a") == second_a
        assert queue.publish("e", "b again", dedup_id="b").offset == 4
        assert queue.end_offset == 5


def test_brokers_on_one_file_forget_the_same_ids_past_dedup_max_ids(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        a.queue("q", retention="limits", dedup_max_ids=2)
        a.publish("q", "e", "first", dedup_id="first")
        for dedup_id in ("x", "y", "z"):  # b's ids: with a's, the two newest are y and z
            b.publish("q", "e", dedup_id, dedup_id=dedup_id)
        assert a.publish("q", "e", "again", dedup_id="x").offset == 4, "x was forgotten"
        assert a.publish("q", "e", "again", dedup_id="first").offset == 5, "first was forgotten"


def test_the_dedup_table_stays_bounded_whatever_the_number_of_ids(path: str) -> None:
    max_ids = 100
    with mqlite.Broker(path) as broker:
        queue = broker.queue("q", retention="limits", max_messages=10, dedup_max_ids=max_ids)
        for chunk in range(40):
            queue.publish_many([("e", None, None, None, f"id-{chunk}-{i}") for i in range(250)])
        for i in range(3000):
            queue.publish("e", None, dedup_id=f"one-{i}")
        assert queue.end_offset == 13_000
    _, rows = _stored(path)
    # Rows are pruned at housekeeping, every 1024 or so publishes: at most that many beyond max_ids.
    assert rows <= max_ids + 1100, f"{rows} dedup rows for dedup_max_ids={max_ids}"


def test_rows_of_expired_ids_are_pruned_from_the_file(path: str, vclock: VirtualClock) -> None:
    with mqlite.Broker(path, clock=vclock) as broker:
        queue = broker.queue("q", retention="limits", max_messages=10, dedup_window=10)
        for i in range(3000):
            queue.publish("e", None, dedup_id=f"id-{i}")
        vclock.advance(10)
        for _ in range(2100):  # plain publishes: housekeeping runs at least twice
            queue.publish("e", None)
    _, rows = _stored(path)
    assert rows == 0, f"{rows} dedup rows left whose window ended"


# -- across restarts and processes (file) ------------------------------------------------------


@pytest.mark.parametrize("commit", ["each", "batch"])
def test_dedup_ids_are_refused_after_a_restart_with_their_original_offsets(path: str, commit: str) -> None:
    with mqlite.Broker(path, commit=commit) as broker:  # type: ignore[arg-type]  # a literal
        queue = broker.queue("q", retention="limits")
        firsts = [queue.publish("e", "single", dedup_id="single")]
        firsts += queue.publish_many([("e", "m1", None, None, "m1"), ("e", "plain"), ("e", "m2", None, None, "m2")])
        assert queue.publish("e", "retry", dedup_id="m1") == firsts[1]
    with mqlite.Broker(path, commit=commit) as broker:  # type: ignore[arg-type]  # a literal
        queue = broker.queue("q")
        assert queue.publish("e", "retry", dedup_id="single") == firsts[0]
        again = queue.publish_many([("e", "retry", None, None, "m2"), ("e", "retry", None, None, "m1")])
        assert again == [firsts[3], firsts[1]]
        assert queue.end_offset == 4
        assert _duplicates(broker) == 3, "counted by this broker since it opened"
        assert queue.publish("e", "new", dedup_id="new").offset == 4


def test_the_window_keeps_counting_from_the_first_publish_across_restarts(path: str, vclock: VirtualClock) -> None:
    with mqlite.Broker(path, clock=vclock) as broker:
        first = broker.queue("q", retention="limits", dedup_window=10).publish("e", 1, dedup_id="x")
    vclock.advance(9)
    with mqlite.Broker(path, clock=vclock) as broker:
        assert broker.publish("q", "e", 2, dedup_id="x") == first
    vclock.advance(1)
    with mqlite.Broker(path, clock=vclock) as broker:
        assert broker.publish("q", "e", 3, dedup_id="x").offset == 1


def test_two_brokers_on_one_file_refuse_each_others_ids(path: str) -> None:
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        a.queue("q", retention="limits")
        first = a.publish("q", "e", "from a", dedup_id="x")
        assert b.publish("q", "e", "from b", dedup_id="x") == first
        second = b.queue("q").publish_many([("e", "from b", None, None, "y")])[0]
        again = a.queue("q").publish_many([("e", "from a", None, None, "y"), ("e", "from a", None, None, "x")])
        assert again == [second, first]
        assert a.queue("q").end_offset == b.queue("q").end_offset == 2
        assert (_duplicates(a), _duplicates(b)) == (2, 1)


def test_a_broker_that_opens_a_file_in_use_refuses_the_ids_the_first_one_wrote(path: str) -> None:
    with mqlite.Broker(path) as a:
        queue = a.queue("q", retention="limits")
        first = queue.publish("e", "alone", dedup_id="x")  # while a is alone on the file
        with mqlite.Broker(path) as b:
            assert b.publish("q", "e", "from b", dedup_id="x") == first
            second = b.publish("q", "e", "from b", dedup_id="y")
            assert queue.publish("e", "from a", dedup_id="y") == second
            assert queue.end_offset == 2


def test_a_second_broker_on_a_shared_file_sets_dedup_window_through_broker_queue(
    path: str, vclock: VirtualClock
) -> None:
    with mqlite.Broker(path, clock=vclock) as a, mqlite.Broker(path, clock=vclock) as b:
        first = a.queue("q", retention="limits", dedup_window=100).publish("e", 1, dedup_id="x")
        assert b.queue("q", dedup_window=5).config.dedup_window == 5
        vclock.advance(5)
        assert a.publish("q", "e", 2, dedup_id="x").offset == first.offset + 1


def test_threads_publishing_the_same_ids_at_once_write_each_id_once(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits", dedup_window=3600)
    count, threads = 150, 4
    start = threading.Barrier(threads)

    def publish_all() -> list[int]:
        start.wait(WAIT)
        got = []
        for i in range(count):
            if i % 2:
                got.append(queue.publish("e", i, dedup_id=f"id{i}").offset)
            else:
                got.extend(m.offset for m in queue.publish_many([("e", i, None, None, f"id{i}")]))
        return got

    workers = [Worker(publish_all) for _ in range(threads)]
    try:
        results = [worker.join(WAIT * 4) for worker in workers]
    finally:
        for worker in workers:
            worker.thread.join(WAIT * 4)
    assert all(got == results[0] for got in results), "every thread got the same offset for each id"
    assert sorted(results[0]) == list(range(count))
    assert queue.end_offset == count
    assert _duplicates(broker) == count * (threads - 1)


def test_processes_publishing_the_same_ids_at_once_write_each_id_once(path: str, children: list[Any]) -> None:
    count, writers = 200, 3
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits", dedup_window=3600)
    ready = spawn.Barrier(writers)
    results = spawn.Queue()
    for _ in range(writers):
        process = spawn.Process(target=dedup_processes.publish_ids, args=(path, count, ready, results), daemon=True)
        process.start()
        children.append(process)
    reports = [results.get(timeout=dedup_processes.DEADLINE) for _ in range(writers)]
    for process in children:
        process.join(dedup_processes.DEADLINE)
        assert process.exitcode == 0
    expected = {f"id-{i}" for i in range(count)}
    for got in reports:
        assert {dedup_id for dedup_id, _ in got} == expected
    assert reports[0] == reports[1] == reports[2], "every process got the same offset for each id"
    assert sorted(offset for _, offset in reports[0]) == list(range(count))
    with mqlite.Broker(path) as broker:
        reader = broker.subscribe("q", name="audit", start="earliest")
        stored = pull_all(reader)
        assert broker.queue("q").end_offset == count
    assert offsets(stored) == list(range(count))


# -- SIGKILL (file) -----------------------------------------------------------------------------

KILLS = 12
RETRIED = 300


def test_retried_publishes_under_repeated_sigkill_store_each_id_exactly_once(path: str) -> None:
    """A child publishes RETRIED ids, each twice, from the first every time it starts; it is killed
    up to KILLS times (at least half as many: a child that got to the end before its kill landed
    is the last run), each near where the runs before it got to (in the retries of what is
    stored, or in new ids), then runs to the end. Each id must be stored exactly once, and every publish of
    an id, in every run, must have returned the offset it is stored at."""
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits", dedup_window=3600)
    rng = random.Random(0xDED0)
    script = str(Path(__file__).with_name("dedup_processes.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mqlite.__file__).parent.parent), *sys.path])}
    returned: dict[int, set[int]] = {}  # message i -> the offsets its publishes returned, over all runs
    stored_after: list[int] = [0]  # messages stored after each run
    kills = 0
    for round_ in range(KILLS + 1):
        last = round_ == KILLS
        proc = subprocess.Popen(
            [sys.executable, script, "retry", path, str(RETRIED)], stdout=subprocess.PIPE, text=True, env=env
        )
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n", "child failed to start"
            if last:
                rest, _ = proc.communicate(timeout=dedup_processes.DEADLINE)
            else:
                # Two lines per stored message come first (all duplicates now), then new ids.
                for _ in range(max(1, 2 * stored_after[-1] + rng.randint(-20, 60))):
                    line = proc.stdout.readline()
                    if not line:
                        break
                    lines.append(line)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=WAIT)
                rest = proc.stdout.read()  # the writer is gone, so this ends
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)
            if proc.stdout is not None:
                proc.stdout.close()
        # A child may finish before the kill lands (it runs ahead of the lines read so far, and
        # further when the parent is slow): that run is the last one, and it must have finished.
        finished = proc.returncode == 0
        if last or finished:
            assert proc.returncode == 0
        else:
            assert proc.returncode == -signal.SIGKILL, f"the child ended with {proc.returncode}"
            kills += 1
        report = "".join([*lines, rest]).splitlines()
        for line in report:
            if line != "done":
                _, i, offset = line.split()
                returned.setdefault(int(i), set()).add(int(offset))
        rows, _ = _stored(path)
        assert [offset for offset, _ in rows] == list(range(len(rows))), f"round {round_}: offsets not contiguous"
        stored = Counter(int(payload) for _, payload in rows)
        assert all(n == 1 for n in stored.values()), f"round {round_}: stored twice: {stored.most_common(3)}"
        stored_after.append(len(rows))
        if finished:
            break
    assert kills >= KILLS // 2, f"only {kills} of the children were killed before they finished"
    assert report[-1] == "done"
    assert sorted(returned) == list(range(RETRIED))
    multiple = {i: found for i, found in returned.items() if len(found) != 1}
    assert not multiple, f"publishes of one id returned different offsets: {multiple}"
    with mqlite.Broker(path) as broker:
        stored_messages = pull_all(broker.subscribe("q", name="audit", start="earliest"))
        assert broker.queue("q").end_offset == RETRIED
    assert sorted(payloads(stored_messages)) == list(range(RETRIED))
    assert {m.payload: m.offset for m in stored_messages} == {i: found.pop() for i, found in returned.items()}
    grew = sum(1 for before, after in itertools.pairwise(stored_after[:-1]) if before < after < RETRIED)
    assert grew >= KILLS // 2, f"too few kills landed among new ids: stored after each run {stored_after}"
    print(f"dedup crash test: {KILLS} kills, stored after each run {stored_after}")


# -- bad input ----------------------------------------------------------------------------------

BAD_IDS = [1, b"x", "", 1.5, ["x"], object()]


# Each way to publish one message with a bad dedup id.
_BAD_PUBLISHES: dict[str, Callable[[mqlite.Broker, mqlite.Queue, Any], object]] = {
    "Queue.publish": lambda broker, queue, bad: queue.publish("e", 1, dedup_id=bad),
    "a new event": lambda broker, queue, bad: queue.publish("new", 1, dedup_id=bad),
    "Broker.publish": lambda broker, queue, bad: broker.publish("q", "e", 1, dedup_id=bad),
    "a new queue": lambda broker, queue, bad: broker.publish("other", "e", 1, dedup_id=bad),
}


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda bad: type(bad).__name__ + repr(bad)[:8])
@pytest.mark.parametrize("face", list(_BAD_PUBLISHES))
def test_a_publish_with_a_bad_dedup_id_is_refused_and_writes_nothing(
    make_broker: Callable[..., mqlite.Broker], bad: object, face: str
) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", 0, dedup_id="ok")
    with pytest.raises(mqlite.InvalidArgument, match="dedup_id"):
        _BAD_PUBLISHES[face](broker, queue, bad)
    assert [info.name for info in broker.info().queues] == ["q"], "no queue was made"
    assert queue.end_offset == 1
    assert _duplicates(broker) == 0
    assert queue.publish("e", 2, dedup_id="ok").offset == 0, "the window is intact"
    assert queue.publish("e", 3, dedup_id="next").offset == 1, "the broker keeps working"


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda bad: type(bad).__name__ + repr(bad)[:8])
@pytest.mark.parametrize("form", ["tuple", "mapping"])
def test_publish_many_with_one_bad_dedup_id_writes_nothing_and_remembers_no_id(
    make_broker: Callable[..., mqlite.Broker], bad: object, form: str
) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    ids = ["good", None, bad]
    items: list[object] = (
        [("e", i, None, None, dedup_id) for i, dedup_id in enumerate(ids)]
        if form == "tuple"
        else [{"event": "e", "payload": i, "dedup_id": dedup_id} for i, dedup_id in enumerate(ids)]
    )
    with pytest.raises(mqlite.InvalidArgument, match="dedup_id"):
        queue.publish_many(items)
    assert queue.end_offset == 0
    assert queue.publish("e", "good", dedup_id="good").offset == 0, "the refused call remembered no id"
    assert queue.publish("e", "good", dedup_id="good").offset == 0
    assert queue.end_offset == 1


class _HostileStr(str):
    """A str subclass whose hash and equality are user code that must never run under a lock."""

    __slots__ = ()

    def __hash__(self) -> int:
        raise AssertionError("hashed a str subclass")

    def __eq__(self, other: object) -> bool:
        raise AssertionError("compared a str subclass")

    def __str__(self) -> str:
        return "x"


@pytest.mark.parametrize("form", ["publish", "publish_many"])
def test_a_str_subclass_dedup_id_behaves_as_the_plain_str(make_broker: Callable[..., mqlite.Broker], form: str) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")

    def publish(payload: int, dedup_id: str) -> mqlite.Message:
        if form == "publish":
            return queue.publish("e", payload, dedup_id=dedup_id)
        return queue.publish_many([("e", payload, None, None, dedup_id)])[0]

    first = publish(1, _HostileStr("x"))
    assert publish(2, "x") == first
    assert publish(3, _HostileStr("x")) == first
    second = publish(4, "y")
    assert publish(5, _HostileStr("y")) == second
    assert publish(6, _HostileStr("z")).offset == 2, "its text, not its __str__, is the id"
    assert queue.end_offset == 3


def test_a_str_subclass_dedup_id_is_stored_as_plain_text(path: str) -> None:
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits").publish("e", 1, dedup_id=_HostileStr("x"))
    db = _read_only(path)
    try:
        assert db.execute("SELECT id, typeof(id) FROM dedup").fetchall() == [("x", "text")]
    finally:
        db.close()
    with mqlite.Broker(path) as broker:
        assert broker.publish("q", "e", 2, dedup_id="x").offset == 0


def test_a_closed_broker_refuses_a_duplicate_instead_of_returning_the_original(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", 1, dedup_id="x")
    broker.close()
    with pytest.raises(mqlite.BrokerClosed):
        queue.publish("e", 1, dedup_id="x")
    with pytest.raises(mqlite.BrokerClosed):
        queue.publish_many([("e", 1, None, None, "x")])


# -- the state machine --------------------------------------------------------------------------

WINDOW = 10.0
MAX_IDS = 3
IDS = ["a", "b", "c", "d", "e"]


class DedupMachine(RuleBasedStateMachine):
    """Publishes with ids from a small set, moves the clock and (on a file) reopens the broker,
    against a model: ``seen`` maps each id to ``(offset, first published at)``, in the order
    ids were (re)remembered; an id counts as seen while ``now < first + WINDOW``, and only the
    newest ``MAX_IDS`` such ids are kept."""

    backend = "memory"
    redis_url = ""  # the server of the redis backend (set by its test, from the session's fixture)

    def __init__(self) -> None:
        super().__init__()
        self.clock = VirtualClock(START, autojump=False)
        self.namespace = f"dd{uuid.uuid4().hex[:12]}"
        self.folder = tempfile.mkdtemp(prefix="mqlite-dedup-") if self.backend == "file" else None
        self.path = None if self.folder is None else os.path.join(self.folder, "machine.mqlite")
        self.broker = self._open()
        self.queue = self.broker.queue("q", retention="limits", dedup_window=WINDOW, dedup_max_ids=MAX_IDS)
        self.seen: dict[str, tuple[int, float]] = {}
        self.log: list[tuple[str, Any, float]] = []  # (event, payload, timestamp) at each offset
        self.duplicates = 0  # refused by the open broker
        self.payload = 0

    def _open(self) -> mqlite.Broker:
        if self.backend == "redis":
            return mqlite.Broker(self.redis_url, namespace=self.namespace, clock=self.clock)
        return mqlite.Broker(self.path, clock=self.clock) if self.path else mqlite.Broker(clock=self.clock)

    def _next_payload(self) -> int:
        self.payload += 1
        return self.payload

    def _found(self, dedup_id: str, now: float) -> int | None:
        found = self.seen.get(dedup_id)
        return found[0] if found is not None and now < found[1] + WINDOW else None

    def _remember(self, dedup_id: str, offset: int, now: float) -> None:
        self.seen.pop(dedup_id, None)
        self.seen[dedup_id] = (offset, now)
        live = [key for key, (_, at) in self.seen.items() if now < at + WINDOW]
        for key in [key for key in self.seen if key not in live] + live[:-MAX_IDS]:
            del self.seen[key]

    def _check(self, message: mqlite.Message, offset: int) -> None:
        assert message.offset == offset
        assert (message.event, message.payload, message.timestamp) == self.log[offset]

    @rule(dedup_id=st.sampled_from([*IDS, None]), face=st.sampled_from(["queue", "broker"]))
    def publish(self, dedup_id: str | None, face: str) -> None:
        now = self.clock.time()
        payload = self._next_payload()
        if face == "queue":
            message = self.queue.publish("e", payload, dedup_id=dedup_id)
        else:
            message = self.broker.publish("q", "e", payload, dedup_id=dedup_id)
        original = None if dedup_id is None else self._found(dedup_id, now)
        if original is not None:
            self.duplicates += 1
            self._check(message, original)
            return
        self.log.append(("e", payload, now))
        self._check(message, len(self.log) - 1)
        if dedup_id is not None:
            self._remember(dedup_id, message.offset, now)

    @rule(ids=st.lists(st.sampled_from([*IDS, None]), max_size=6), mapping=st.booleans())
    def publish_many(self, ids: list[str | None], mapping: bool) -> None:
        now = self.clock.time()
        drafts = [(f"m{i}", self._next_payload(), dedup_id) for i, dedup_id in enumerate(ids)]
        items: list[object] = [
            {"event": event, "payload": payload, "dedup_id": dedup_id}
            if mapping
            else (event, payload, None, None, dedup_id)
            for event, payload, dedup_id in drafts
        ]
        got = self.queue.publish_many(items)
        assert len(got) == len(drafts)
        # Every item is judged against the window as it was before the call.
        expected: list[int] = []
        in_call: dict[str, int] = {}
        fresh: list[tuple[str, int]] = []
        for event, payload, dedup_id in drafts:
            if dedup_id is not None:
                offset = in_call.get(dedup_id, self._found(dedup_id, now))
                if offset is not None:
                    self.duplicates += 1
                    expected.append(offset)
                    continue
                in_call[dedup_id] = len(self.log)
                fresh.append((dedup_id, len(self.log)))
            expected.append(len(self.log))
            self.log.append((event, payload, now))
        for dedup_id, offset in fresh:
            self._remember(dedup_id, offset, now)
        for message, offset in zip(got, expected, strict=True):
            self._check(message, offset)

    @rule(seconds=st.one_of(st.sampled_from([0.0, 1.0, WINDOW - 1, WINDOW, WINDOW + 1]), st.floats(0, 2 * WINDOW)))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.backend != "memory")
    @rule()
    def reopen(self) -> None:
        self.broker.close()
        self.broker = self._open()
        self.queue = self.broker.queue("q")
        self.duplicates = 0

    @rule()
    def read_everything(self) -> None:
        reader = self.broker.subscribe("q", start="earliest")
        try:
            got = pull_all(reader)
        finally:
            reader.close()
        assert [(m.event, m.payload, m.timestamp) for m in got] == self.log
        assert offsets(got) == list(range(len(self.log)))

    @invariant()
    def end_offset_counts_what_was_written(self) -> None:
        assert self.queue.end_offset == len(self.log)

    @invariant()
    def info_counts_the_duplicates_refused(self) -> None:
        assert _duplicates(self.broker) == self.duplicates

    def teardown(self) -> None:
        self.broker.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class FileDedupMachine(DedupMachine):
    """The same machine on a new SQLite file per run, with reopens."""

    backend = "file"


DedupMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FileDedupMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_dedup_matches_the_model_in_memory = DedupMachine.TestCase
test_dedup_matches_the_model_on_a_file = FileDedupMachine.TestCase


class RedisDedupMachine(DedupMachine):
    """The same machine on a namespace of its own on the session's redis-server, with reopens."""

    backend = "redis"


def test_dedup_matches_the_model_on_redis(redis_url: str) -> None:
    run_machine_on_redis(RedisDedupMachine, redis_url, max_examples=30, steps=30)
