"""Job queues that keep their jobs: retention="workqueue", declare_subscription, drop counts,
and, on a shared file, the consumers of every broker in info()."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import WAIT, payloads, pull_all

import mqlite
from mqlite.engine.sqlite.inspect import Inspector

no_redis_workqueue = pytest.mark.not_redis("the Redis engine does not offer retention='workqueue' yet")
no_redis_drops = pytest.mark.not_redis("the Redis engine does not count drops yet")


def work_queue(broker: mqlite.Broker, **limits: object) -> mqlite.Queue:
    return broker.queue("jobs", retention="workqueue", **limits)  # type: ignore[arg-type]


# -- retention="workqueue" -------------------------------------------------------------------


@no_redis_workqueue
def test_jobs_published_before_any_worker_reach_the_first_worker(broker: mqlite.Broker) -> None:
    queue = work_queue(broker)
    for i in range(3):
        broker.publish("jobs", "job", i)
    assert len(queue) == 3
    assert payloads(pull_all(broker.subscribe("jobs", name="workers"))) == [0, 1, 2]


@no_redis_workqueue
def test_an_acked_job_is_removed_and_an_unacked_one_kept(broker: mqlite.Broker) -> None:
    queue = work_queue(broker)
    broker.publish("jobs", "job", "a")
    broker.publish("jobs", "job", "b")
    worker = broker.subscribe("jobs", name="workers", ack="manual")
    first, second = worker.poll(max_messages=2, timeout=WAIT)
    assert len(queue) == 2  # both delivered, neither acked
    worker.ack(first)
    assert (queue.start_offset, len(queue)) == (1, 1)
    worker.ack(second)
    assert len(queue) == 0


@no_redis_workqueue
def test_a_job_given_back_unacked_reaches_the_next_worker(broker: mqlite.Broker) -> None:
    work_queue(broker)
    broker.publish("jobs", "job", "x")
    with broker.subscribe("jobs", name="workers", ack="manual") as worker:
        assert worker.get(timeout=WAIT) is not None
    again = broker.subscribe("jobs", name="workers", ack="manual").get(timeout=WAIT)
    assert again is not None
    assert (again.payload, again.attempt) == ("x", 2)


@no_redis_workqueue
def test_workers_sharing_a_name_get_each_job_once(broker: mqlite.Broker) -> None:
    work_queue(broker)
    a = broker.subscribe("jobs", name="workers")
    b = broker.subscribe("jobs", name="workers")
    for i in range(6):
        broker.publish("jobs", "job", i)
    got = payloads(a.poll(max_messages=3, timeout=WAIT)) + payloads(pull_all(b)) + payloads(pull_all(a))
    assert sorted(got) == list(range(6))


@no_redis_workqueue
def test_each_durable_name_gets_every_job_and_the_job_stays_until_all_are_done(broker: mqlite.Broker) -> None:
    queue = work_queue(broker)
    broker.declare_subscription("jobs", "billing")
    broker.declare_subscription("jobs", "audit")
    broker.publish("jobs", "job", 1)
    assert payloads(pull_all(broker.subscribe("jobs", name="billing"))) == [1]
    assert len(queue) == 1  # audit has not read it
    assert payloads(pull_all(broker.subscribe("jobs", name="audit"))) == [1]
    assert len(queue) == 0


@no_redis_workqueue
def test_a_job_no_durable_filter_matches_waits_for_a_worker_that_wants_it(broker: mqlite.Broker) -> None:
    queue = work_queue(broker)
    broker.declare_subscription("jobs", "mailers", events="email")
    broker.publish("jobs", "email", "e")
    broker.publish("jobs", "resize", "r")
    assert payloads(pull_all(broker.subscribe("jobs", name="mailers", events="email"))) == ["e"]
    assert (queue.start_offset, len(queue)) == (1, 1)  # the resize job is kept
    assert payloads(pull_all(broker.subscribe("jobs", name="resizers", events="resize"))) == ["r"]
    assert len(queue) == 0


@no_redis_workqueue
def test_an_explicit_start_latest_skips_the_backlog_for_that_name(broker: mqlite.Broker) -> None:
    queue = work_queue(broker)
    broker.publish("jobs", "job", "old")
    worker = broker.subscribe("jobs", name="workers", start="latest")
    broker.publish("jobs", "job", "new")
    assert payloads(pull_all(worker)) == ["new"]
    assert len(queue) == 0  # the only name skipped "old": nobody is left to do it


@no_redis_workqueue
def test_an_ephemeral_subscription_reads_along_but_neither_keeps_nor_takes_jobs(broker: mqlite.Broker) -> None:
    queue = work_queue(broker)
    watcher = broker.subscribe("jobs")
    broker.publish("jobs", "job", 1)
    assert payloads(pull_all(watcher)) == [1]
    assert len(queue) == 1  # still waiting for its first worker
    watcher.close()
    assert payloads(pull_all(broker.subscribe("jobs", name="workers"))) == [1]


@no_redis_workqueue
def test_seeking_back_reaches_only_jobs_still_kept(broker: mqlite.Broker) -> None:
    work_queue(broker)
    worker = broker.subscribe("jobs", name="workers")
    for i in range(3):
        broker.publish("jobs", "job", i)
    assert len(pull_all(worker)) == 3
    broker.publish("jobs", "job", 3)
    assert worker.seek("earliest") == 3
    assert payloads(pull_all(worker)) == [3]


@no_redis_workqueue
def test_limits_still_drop_the_oldest_jobs(broker: mqlite.Broker) -> None:
    queue = work_queue(broker, max_messages=2)
    for i in range(3):
        broker.publish("jobs", "job", i)
    assert len(queue) == 2
    assert payloads(pull_all(broker.subscribe("jobs", name="workers"))) == [1, 2]


@no_redis_workqueue
def test_a_full_work_queue_with_reject_refuses_more_jobs(broker: mqlite.Broker) -> None:
    work_queue(broker, max_messages=1, overflow="reject")
    broker.publish("jobs", "job", 0)
    with pytest.raises(mqlite.QueueFull):
        broker.publish("jobs", "job", 1)


@pytest.mark.memory_only
def test_a_storage_without_work_queues_refuses_the_retention() -> None:
    class NoWorkQueues(mqlite.Broker):
        pass

    broker = NoWorkQueues()
    try:
        from mqlite.engine.base import Capabilities

        broker._engine.capabilities = Capabilities(shared=False, persistent=False, blocking_io=False)  # type: ignore[misc]  # a test double
        with pytest.raises(mqlite.InvalidArgument, match="not supported by this broker's storage"):
            broker.queue("jobs", retention="workqueue")
        with pytest.raises(mqlite.InvalidArgument, match="retention must be"):
            broker.queue("jobs", retention="nonsense")  # type: ignore[arg-type]
    finally:
        broker.close()


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.mqlite"
    with mqlite.Broker(path) as broker:
        work_queue(broker)
        broker.publish("jobs", "job", "kept")
    with mqlite.Broker(path) as broker:
        assert broker.queue("jobs").config.retention == "workqueue"
        assert payloads(pull_all(broker.subscribe("jobs", name="workers"))) == ["kept"]
    with mqlite.Broker(path) as broker:
        assert len(broker.queue("jobs")) == 0


def test_brokers_sharing_a_file_share_the_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.mqlite"
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        work_queue(a)
        for i in range(4):
            a.publish("jobs", "job", i)
        got = payloads(b.subscribe("jobs", name="w").poll(max_messages=2, timeout=WAIT))
        got += payloads(pull_all(a.subscribe("jobs", name="w")))
        assert sorted(got) == [0, 1, 2, 3]
        assert len(b.queue("jobs")) == 0


# -- declare_subscription --------------------------------------------------------------------


def test_a_declared_subscription_keeps_what_is_published_for_it(broker: mqlite.Broker) -> None:
    info = broker.declare_subscription("orders", "billing", events="order.*")
    assert (info.name, info.mode, info.consumers, info.events) == ("billing", "detached", 0, ("order.*",))
    broker.publish("orders", "order.created", 1)
    broker.publish("orders", "refund", 2)
    sub = broker.subscribe("orders", name="billing", events="order.*")
    assert payloads(pull_all(sub)) == [1]


def test_declaring_an_existing_name_keeps_its_place(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n")
    broker.publish("q", "e", 1)
    assert len(pull_all(sub)) == 1
    sub.close()
    assert broker.declare_subscription("q", "n").position == 1


def test_declaring_other_settings_than_an_attached_subscription_is_refused(broker: mqlite.Broker) -> None:
    broker.subscribe("q", name="n", ack="manual")
    with pytest.raises(mqlite.ConfigConflict):
        broker.declare_subscription("q", "n")


def test_declaring_needs_a_name(broker: mqlite.Broker) -> None:
    with pytest.raises(mqlite.InvalidName):
        broker.declare_subscription("q", "")


# -- drops under interest retention ----------------------------------------------------------


@no_redis_drops
def test_a_message_no_subscription_wants_is_counted_and_logged(
    broker: mqlite.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="mqlite"):
        broker.publish("q", "e", 1)
        broker.publish("q", "e", 2)
        broker.publish("q", "f", 3, key="k")
        broker.queue("q").publish_many([("g", 4), ("g", 5)])
    assert broker.info().queue("q").dropped == 5
    assert sum("no subscription wants" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 4


@no_redis_drops
def test_only_the_events_no_filter_matches_are_counted_as_dropped(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="wanted")
    broker.publish("q", "wanted", 1)
    broker.publish("q", "other", 2)
    broker.publish("q", "wanted", 3)
    assert broker.info().queue("q").dropped == 1
    assert payloads(pull_all(sub)) == [1, 3]
    sub.close()
    broker.publish("q", "wanted", 4)  # nobody wants it any more
    assert broker.info().queue("q").dropped == 2


@no_redis_drops
def test_a_declared_subscription_stops_the_drops(broker: mqlite.Broker) -> None:
    broker.publish("q", "e", 1)
    broker.declare_subscription("q", "n")
    broker.publish("q", "e", 2)
    assert broker.info().queue("q").dropped == 1


@no_redis_drops
@pytest.mark.parametrize("retention", ["limits", "workqueue"])
def test_retentions_that_keep_unwanted_messages_drop_nothing(broker: mqlite.Broker, retention: str) -> None:
    broker.queue("q", retention=retention)  # type: ignore[arg-type]
    broker.publish("q", "e", 1)
    assert broker.info().queue("q").dropped == 0
    assert len(broker.queue("q")) == 1


@no_redis_drops
def test_changing_a_filter_changes_what_is_dropped(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="a")
    broker.publish("q", "b", 1)
    sub.join("b")
    broker.publish("q", "b", 2)
    assert broker.info().queue("q").dropped == 1


# -- consumers of every broker on a shared file ----------------------------------------------


def test_info_counts_the_consumers_of_every_broker_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path) as a, mqlite.Broker(path) as b:
        mine = a.subscribe("q", name="w")
        theirs = [b.subscribe("q", name="w"), b.subscribe("q", name="w", callback=lambda m: None)]
        row = a.info().subscription("q", "w")
        assert row.consumers == 3
        assert row.subscription_ids == (mine.id,)
        instances = [instance for instance, _ in row.consumers_by_broker]
        assert [count for _, count in row.consumers_by_broker] == [1, 2]
        assert instances[0] == a._engine.store.instance  # type: ignore[attr-defined]  # the SQLite engine's
        for sub in theirs:
            sub.close()
        assert a.info().subscription("q", "w").consumers == 1


def test_rows_of_a_dead_broker_are_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path) as broker:
        broker.subscribe("q", name="w")
        with sqlite3.connect(path) as db:  # a broker that died without closing left its row
            db.execute("INSERT INTO consumers VALUES ('q', 'w', '999999-deadbeef0000', 1, 0, 0.0)")
        db.close()
        assert broker.info().subscription("q", "w").consumers == 1
        with Inspector(path) as inspector:
            (cursor,) = inspector.cursors("q")
            assert cursor.consumers == 1


def test_the_inspector_shows_the_consumers_of_live_brokers(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path) as broker:
        broker.subscribe("q", name="w")
        broker.subscribe("q", name="w")
        broker.declare_subscription("q", "idle")
        with Inspector(path) as inspector:
            counts = {c.name: c.consumers for c in inspector.cursors("q")}
        assert counts == {"idle": 0, "w": 2}
    with Inspector(path) as inspector:
        assert {c.name: c.consumers for c in inspector.cursors("q")} == {"idle": 0, "w": 0}


def test_on_memory_consumers_are_this_brokers_own(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    broker.subscribe("q", name="w")
    row = broker.info().subscription("q", "w")
    assert row.consumers == 1
