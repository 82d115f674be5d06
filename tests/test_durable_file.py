"""Durable brokers: what a file keeps across restarts and crashes, and the files it refuses.

The core behaviour runs on the file backend through the parametrized ``make_broker`` fixture;
this file covers only what exists because there is a file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from helpers import WAIT, Worker, offsets, payloads, pull_all, stop_after_publishing_dead_letters
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mqlite
from mqlite.engine.sqlite import schema, sharing, writer
from mqlite.engine.sqlite import store as store_module
from mqlite.engine.sqlite.schema import SCHEMA_VERSION
from mqlite.engine.sqlite.sharing import _Checkpointer
from mqlite.engine.sqlite.store import SqliteStore
from mqlite.testing import VirtualClock, run_until_idle

# -- restarts ------------------------------------------------------------------------------


def test_a_durable_subscription_catches_up_on_what_it_missed_while_the_process_was_gone(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("orders", name="billing")
        broker.publish("orders", "created", {"id": 1})
        assert payloads(pull_all(sub)) == [{"id": 1}]
    with mqlite.Broker(path) as broker:
        broker.publish("orders", "created", {"id": 2})
    with mqlite.Broker(path) as broker:
        broker.publish("orders", "created", {"id": 3})
        sub = broker.subscribe("orders", name="billing")
        assert [(m.offset, m.payload) for m in pull_all(sub)] == [(1, {"id": 2}), (2, {"id": 3})]


def test_acked_messages_never_come_back_and_unacked_ones_do_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        broker.queue("q").publish_many([("e", i) for i in range(4)])
        first = sub.poll(max_messages=3)
        sub.ack(first[0])
        sub.ack(first[2])
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        again = pull_all(sub)
        assert offsets(again) == [1, 3]
        info = broker.info().subscription("q", "w")
        assert (info.pending, info.redelivered) == (2, 1)  # offset 1 is a redelivery, 3 is new


def test_delivery_counts_survive_a_restart_and_still_reach_max_deliveries(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    settings: dict[str, Any] = {"name": "w", "ack": "manual", "max_deliveries": 2}
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", **settings)
        broker.publish("q", "e", "poison")
        assert sub.get(timeout=WAIT) is not None  # delivery 1, never acked
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", **settings)
        message = sub.get(timeout=WAIT)  # delivery 2
        assert message is not None
        sub.nack(message)  # the second failure: dead-lettered
        dead = broker.subscribe("q.dead-letter", start="earliest")
        letter = dead.get(timeout=WAIT)
        assert letter is not None
        assert (letter.payload, letter.headers["dead_letter.deliveries"]) == ("poison", 2)
    with mqlite.Broker(path) as broker:
        assert pull_all(broker.subscribe("q", **settings)) == []


def _dead_letter_poison(broker: mqlite.Broker) -> None:
    """Publish one message to "q" and fail its only allowed delivery on durable "w"."""
    sub = broker.subscribe("q", name="w", ack="manual", max_deliveries=1)
    broker.publish("q", "e", "poison")
    message = sub.get(timeout=WAIT)
    assert message is not None
    sub.nack(message)


def test_a_dead_letter_that_cannot_be_published_keeps_its_message_for_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        # A full dead-letter queue that rejects: the dead letter cannot be published.
        broker.queue("q.dead-letter", retention="limits", max_messages=1, overflow="reject").publish("filler")
        _dead_letter_poison(broker)
        assert broker.info().subscription("q", "w").dead_lettered == 1
        assert broker.queue("q.dead-letter").end_offset == 1
    with mqlite.Broker(path) as broker:
        again = pull_all(broker.subscribe("q", name="w", ack="manual", max_deliveries=1))
        assert payloads(again) == ["poison"]


def test_a_crash_after_the_dead_letter_is_published_redelivers_rather_than_loses(tmp_path: Path) -> None:
    """The pending row goes only after the dead letter is on the file: a crash between the two
    gives the message again (at least once), it never loses it."""
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        stop_after_publishing_dead_letters(broker.queue("q"))
        _dead_letter_poison(broker)
    with mqlite.Broker(path) as broker:
        letters = pull_all(broker.subscribe("q.dead-letter", start="earliest"))
        assert payloads(letters) == ["poison"]
        again = pull_all(broker.subscribe("q", name="w", ack="manual", max_deliveries=1))
        assert payloads(again) == ["poison"]


def test_a_push_callback_dead_letter_keeps_its_row_until_the_letter_is_published(tmp_path: Path) -> None:
    """The same for a push callback that raised: settling its batch must not delete the row of
    a message whose dead letter is still on its way."""
    path = tmp_path / "app.mqlite"
    dispatcher = mqlite.ManualDispatcher()

    def poisoned(message: mqlite.Message) -> None:
        raise ValueError("poison")

    with mqlite.Broker(path, dispatcher=dispatcher) as broker:
        stop_after_publishing_dead_letters(broker.queue("q"))
        broker.subscribe("q", name="w", callback=poisoned, max_deliveries=1)
        broker.publish("q", "e", "poison")
        assert broker.drain(timeout=WAIT)
        with sqlite3.connect(path) as db:
            assert db.execute('SELECT name, "offset" FROM pending').fetchall() == [("w", 0)]
    with mqlite.Broker(path) as broker:
        again = pull_all(broker.subscribe("q", name="w", ack="manual", max_deliveries=1))
        assert payloads(again) == ["poison"]


def test_a_published_dead_letter_is_settled_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        _dead_letter_poison(broker)
        assert payloads(pull_all(broker.subscribe("q.dead-letter", start="earliest"))) == ["poison"]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM pending").fetchone() == (0,)
    with mqlite.Broker(path) as broker:
        assert pull_all(broker.subscribe("q", name="w", ack="manual", max_deliveries=1)) == []


def _nack_with_delay(path: Path, clock: mqlite.ManualClock, delay: float) -> None:
    with mqlite.Broker(path, clock=clock) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        broker.publish("q", "e", "later")
        message = sub.get(timeout=WAIT)
        assert message is not None
        sub.nack(message, delay=delay)


def test_a_nack_delay_still_holds_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    _nack_with_delay(path, mqlite.ManualClock(start=1_000.0), delay=60)
    clock = VirtualClock(start=1_030.0, autojump=True)  # the process comes back 30 s later
    with mqlite.Broker(path, clock=clock) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        assert sub.poll(max_messages=10) == []
        again = sub.poll(max_messages=10, timeout=3600)
        assert payloads(again) == ["later"]
        assert clock.time() == 1_060.0, "due when the delay given before the restart ends"
        assert broker.info().subscription("q", "w").redelivered == 1


def test_a_nack_delay_that_ended_while_the_process_was_gone_is_due_at_once(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    _nack_with_delay(path, mqlite.ManualClock(start=1_000.0), delay=60)
    with mqlite.Broker(path, clock=mqlite.ManualClock(start=1_100.0)) as broker:
        assert payloads(broker.subscribe("q", name="w", ack="manual").poll(max_messages=10)) == ["later"]


def test_a_push_retry_backoff_still_holds_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    calls: list[str] = []

    def fail(message: mqlite.Message) -> None:
        calls.append(message.payload)
        raise RuntimeError("not yet")

    settings: dict[str, Any] = {"name": "w", "backoff": mqlite.Backoff(initial=60, maximum=60)}
    dispatcher = mqlite.ManualDispatcher()
    with mqlite.Broker(path, clock=mqlite.ManualClock(start=1_000.0), dispatcher=dispatcher) as broker:
        broker.subscribe("q", callback=fail, **settings)
        broker.publish("q", "e", "flaky")
        assert dispatcher.run_ready()
        assert calls == ["flaky"]
    clock = mqlite.ManualClock(start=1_030.0)
    dispatcher = mqlite.ManualDispatcher()
    with mqlite.Broker(path, clock=clock, dispatcher=dispatcher) as broker:
        broker.subscribe("q", callback=lambda message: calls.append(message.payload), **settings)
        assert not dispatcher.run_ready()
        report = run_until_idle(broker)
        assert (report.idle, report.timers, report.advanced) == (True, 1, 30.0), "due 60 s after the failure"
        assert calls == ["flaky", "flaky"]


def test_auto_acked_pulls_are_not_redelivered_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w")
        broker.queue("q").publish_many([("e", i) for i in range(3)])
        assert sub.get(timeout=WAIT) is not None
    with mqlite.Broker(path) as broker:
        assert offsets(pull_all(broker.subscribe("q", name="w"))) == [1, 2]


def test_a_message_in_an_auto_ack_push_callback_is_saved_as_pending_until_the_callback_returns(
    tmp_path: Path,
) -> None:
    # So a crash while the callback runs delivers it again (at least once), as a manual ack would.
    path = tmp_path / "app.mqlite"
    entered = threading.Event()
    release = threading.Event()

    def callback(message: mqlite.Message) -> None:
        entered.set()
        assert release.wait(WAIT)

    def pending_rows() -> list[tuple[int, int]]:
        with sqlite3.connect(path) as db:
            rows = db.execute('SELECT "offset", attempts FROM pending').fetchall()
        db.close()
        return rows

    with mqlite.Broker(path) as broker:
        broker.subscribe("q", name="w", callback=callback)
        broker.publish("q", "e", 1)
        assert entered.wait(WAIT)
        assert pending_rows() == [(0, 1)]
        release.set()
        assert broker.drain(timeout=WAIT)
        assert pending_rows() == []


def test_iteration_on_a_file_reads_no_further_ahead_than_it_returns(tmp_path: Path) -> None:
    # A message read ahead counts as taken; on a file that would lose it in a crash.
    with mqlite.Broker(tmp_path / "app.mqlite") as broker:
        sub = broker.subscribe("q", name="w")
        broker.queue("q").publish_many([("e", i) for i in range(5)])
        assert next(iter(sub)).offset == 0
        assert sub.position == 1


def test_offsets_continue_after_a_restart_even_when_every_message_was_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("q").publish_many([("e", i) for i in range(10_000)])  # nobody reads: all dropped
    with mqlite.Broker(path) as broker:
        assert broker.publish("q", "e", "next").offset == 10_000


def test_event_filter_and_settings_of_a_detached_subscription_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", events=["a.*"], name="w", ack="manual", max_deliveries=3)
        sub.join("b")
        sub.close()
    with mqlite.Broker(path) as broker:
        info = broker.info().subscription("q", "w")
        assert (info.events, info.ack, info.mode) == (("b", "a.*"), "manual", "detached")
        broker.publish("q", "c", 0)
        broker.publish("q", "a.x", 1)
        sub = broker.subscribe("q", events=["a.*", "b"], name="w", ack="manual", max_deliveries=3)
        assert payloads(pull_all(sub)) == [1]


def test_ephemeral_subscriptions_are_never_written_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q")
        broker.publish("q", "e", 1)
        assert sub.get(timeout=WAIT) is not None
    with mqlite.Broker(path) as broker:
        assert broker.info().subscriptions == ()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM cursors").fetchone() == (0,)


def test_queue_settings_key_and_headers_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits", max_messages=50)
        broker.publish("q", "e", {"x": [1, 2]}, key="k1", headers={"trace": "abc"})
    with mqlite.Broker(path) as broker:
        assert broker.queue("q").config == mqlite.QueueConfig(retention="limits", max_messages=50)
        (message,) = pull_all(broker.subscribe("q", start="earliest"))
        assert (message.payload, message.key, dict(message.headers)) == ({"x": [1, 2]}, "k1", {"trace": "abc"})


def test_synchronous_full_is_accepted_and_a_bad_level_is_refused(tmp_path: Path) -> None:
    with mqlite.Broker(tmp_path / "full.mqlite", synchronous="full") as broker:
        assert broker.publish("q", "e", 1).offset == 0
    with pytest.raises(mqlite.InvalidArgument, match="synchronous"):
        mqlite.Broker(tmp_path / "x.mqlite", synchronous="sometimes")  # type: ignore[arg-type]  # the wrong value is the point


def test_batched_commits_from_many_threads_are_all_in_the_file_once_flush_returns(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path, commit="batch") as broker:
        queue = broker.queue("q", retention="limits")
        sub = broker.subscribe("q", name="w", ack="manual")

        def publish(thread: int) -> None:
            for i in range(500):
                queue.publish("e", [thread, i])

        workers = [Worker(lambda t=t: publish(t)) for t in range(4)]
        for worker in workers:
            worker.join()
        for message in sub.poll(max_messages=1500):
            sub.ack(message)
        assert broker.flush(timeout=WAIT)
        with sqlite3.connect(path) as db:  # a second reader sees what was committed
            assert db.execute("SELECT count(*) FROM messages").fetchone() == (2000,)
            assert db.execute("SELECT position FROM cursors").fetchone() == (1500,)
            assert db.execute("SELECT count(*) FROM pending").fetchone() == (0,)
        db.close()
    with mqlite.Broker(path) as broker:
        assert len(pull_all(broker.subscribe("q", name="w", ack="manual"))) == 500


def test_a_failed_batched_writer_is_reported_by_flush_and_by_every_later_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(store: SqliteStore, ops: list[Any]) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path, commit="batch") as broker:
        broker.queue("q", retention="limits")
        assert broker.flush(timeout=WAIT)
        monkeypatch.setattr(SqliteStore, "_execute_locked", full_disk)
        for i in range(3):
            broker.publish("q", "e", i)  # returns before the writer commits (and fails)
        with pytest.raises(mqlite.StorageError, match="background writer failed: database or disk is full"):
            broker.flush(timeout=WAIT)
        for _ in range(2):  # the failure is not forgotten after the first report
            with pytest.raises(mqlite.StorageError, match="background writer failed"):
                broker.publish("q", "e", "later")
        assert broker.queue("q").end_offset == 3, "a publish that raised used an offset"
    assert "background writer" in caplog.text


def test_flush_returns_at_once_when_nothing_is_batched(tmp_path: Path) -> None:
    with mqlite.Broker() as memory, mqlite.Broker(tmp_path / "app.mqlite") as each:
        memory.publish("q", "e", 1)
        each.publish("q", "e", 1)
        assert memory.flush(timeout=0)
        assert each.flush(timeout=0)


def test_an_in_memory_broker_has_no_file() -> None:
    with mqlite.Broker() as broker:
        assert broker.path is None


# -- payloads ------------------------------------------------------------------------------


def test_an_unencodable_payload_raises_at_publish_and_uses_no_offset(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        q = broker.queue("q", retention="limits")
        q.publish("e", 0)
        with pytest.raises(mqlite.SerializationError, match="json serializer failed"):
            q.publish("e", object())
        with pytest.raises(mqlite.SerializationError):
            q.publish_many([("e", 1), ("e", {1, 2})])
        circular: list[Any] = []
        circular.append(circular)
        with pytest.raises(mqlite.SerializationError, match="json serializer failed"):
            q.publish("e", {"loop": circular})
        assert q.end_offset == 1
        assert q.publish("e", 2).offset == 1
    with mqlite.Broker(path) as broker:
        assert payloads(pull_all(broker.subscribe("q", start="earliest"))) == [0, 2]


def test_pickle_is_opt_in_and_keeps_python_types(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path, serializer=mqlite.PickleSerializer()) as broker:
        broker.queue("q", retention="limits").publish("e", (1, {2, 3}))
    with mqlite.Broker(path, serializer=mqlite.PickleSerializer()) as broker:
        assert payloads(pull_all(broker.subscribe("q", start="earliest"))) == [(1, {2, 3})]


def test_a_file_is_only_read_with_the_serializer_that_wrote_it(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    mqlite.Broker(path, serializer=mqlite.PickleSerializer()).close()
    with pytest.raises(mqlite.StorageError, match="'pickle' serializer"):
        mqlite.Broker(path)


# -- files that are refused ----------------------------------------------------------------


def _fingerprint(path: Path) -> tuple[bytes, int, bool]:
    return path.read_bytes(), path.stat().st_mtime_ns, Path(f"{path}-wal").exists()


def test_a_path_in_a_missing_directory_raises_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(mqlite.StorageError, match="cannot open"):
        mqlite.Broker(tmp_path / "missing" / "app.mqlite")


def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text, not SQLite at all\n" * 200)
    before = _fingerprint(path)
    with pytest.raises(mqlite.StorageError, match="not an mqlite file"):
        mqlite.Broker(path)
    assert _fingerprint(path) == before


def test_another_applications_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    before = _fingerprint(path)
    with pytest.raises(mqlite.StorageError, match="not an mqlite file"):
        mqlite.Broker(path)
    assert _fingerprint(path) == before


def test_a_gap_in_a_queues_offsets_is_reported_as_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits").publish_many([("e", i) for i in range(5)])
    with sqlite3.connect(path) as db:
        db.execute('DELETE FROM messages WHERE "offset" = 2')
    db.close()
    with pytest.raises(mqlite.StorageError, match="corrupt: queue 'q' jumps from offset 1 to 3"):
        mqlite.Broker(path)
    with pytest.raises(mqlite.StorageError, match="corrupt"):
        mqlite.Broker(path)  # the failed open released the file: the same error again, not "already open"


def test_a_file_from_a_newer_mqlite_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    mqlite.Broker(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE mqlite_schema SET version = version + 1")
    db.close()
    before = _fingerprint(path)
    with pytest.raises(mqlite.StorageError, match=f"newer than the {SCHEMA_VERSION} this mqlite understands"):
        mqlite.Broker(path)
    assert _fingerprint(path) == before


def test_a_truncated_file_raises_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits").publish_many([("e", "x" * 100) for _ in range(500)])
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\xff" * 4096)
    with pytest.raises(mqlite.StorageError):
        mqlite.Broker(path)


# -- crashes -------------------------------------------------------------------------------

# The child publishes, consumes and acks in a loop, and reports each step on stdout: "p seq"
# before a publish and "P seq offset" once it returned; "D offset" for a delivery; "a offset"
# before an ack and "A offset" once it returned; with commit="batch", "F" once flush() returned
# (what came before it is then promised). The parent kills it with SIGKILL at a random line.
_CHILD = """
import random, sys
import mqlite

path, first_seq, seed, commit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
out = sys.stdout
broker = mqlite.Broker(path, commit=commit)
queue = broker.queue("q", retention="limits")
sub = broker.subscribe("q", name="c", ack="manual", start="earliest")
out.write("ready\\n")
out.flush()
seq = first_seq
while True:
    for _ in range(rng.randint(1, 3)):
        out.write(f"p {seq}\\n"); out.flush()
        message = queue.publish("e", {"seq": seq})
        out.write(f"P {seq} {message.offset}\\n"); out.flush()
        seq += 1
    for message in sub.poll(max_messages=rng.randint(1, 4), timeout=0):
        out.write(f"D {message.offset}\\n")
        if rng.random() < 0.7:
            out.write(f"a {message.offset}\\n"); out.flush()
            sub.ack(message)
            out.write(f"A {message.offset}\\n"); out.flush()
    if commit == "batch":
        assert broker.flush(timeout=10)
        out.write("F\\n"); out.flush()
"""

KILLS = 24


@pytest.mark.parametrize(("commit", "kills"), [("each", KILLS), ("batch", KILLS // 2)])
def test_sigkill_at_random_moments_loses_no_publish_and_no_ack(tmp_path: Path, commit: str, kills: int) -> None:
    path = tmp_path / "crash.mqlite"
    rng = random.Random(0xC0FFEE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mqlite.__file__).parent.parent), *sys.path])}
    published: dict[int, int] = {}  # seq -> offset, for every publish that returned (and was flushed)
    acked: set[int] = set()  # offsets whose ack returned (or was proved committed)
    attempted: set[int] = set()  # seq of every publish that was started
    checked = 0
    for round_ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(round_ * 1_000_000), str(rng.randrange(1 << 30)), commit],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        seen: list[str] = []
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n", "child failed to start"
            for _ in range(rng.randint(1, 400)):
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=WAIT)
            # The pipe has its writer gone, so this read ends; it also returns what readline buffered.
            rest = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)
            if proc.stdout is not None:
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, "the child died before it was killed"
        ack_intents: set[int] = set()
        returned: dict[int, int] = {}  # publishes and acks that returned, not yet promised (batch)
        returned_acks: set[int] = set()
        for line in "".join([*seen, rest]).splitlines():
            kind, *fields = line.split()
            if kind == "p":
                attempted.add(int(fields[0]))
            elif kind == "P":
                returned[int(fields[0])] = int(fields[1])
            elif kind == "a":
                ack_intents.add(int(fields[0]))
            elif kind == "A":
                returned_acks.add(int(fields[0]))
            if kind == "F" or commit == "each":
                published.update(returned)
                acked |= returned_acks
                returned.clear()
                returned_acks.clear()
        ack_unsure = ack_intents - acked
        checked += _check_file(path, published, attempted)
        # Reopen: the durable subscription must get back exactly what was never acked.
        with mqlite.Broker(path) as broker:
            sub = broker.subscribe("q", name="c", ack="manual", start="earliest")
            delivered = set(offsets(pull_all(sub)))
            end = broker.queue("q").end_offset
        assert not delivered & acked, f"round {round_}: acked messages delivered again"
        lost = set(range(end)) - acked - ack_unsure - delivered
        assert not lost, f"round {round_}: unacked messages {lost} lost; " + repr(
            [line for line in "".join([*seen, rest]).splitlines() if line.split()[-1] in {str(x) for x in lost}]
        )
        # Unsure acks of stored messages that did not come back did commit before the kill.
        acked |= {offset for offset in ack_unsure - delivered if offset < end}
    assert len(published) > kills
    assert checked >= len(published)
    print(
        f"crash test ({commit}): {kills} kills, {len(published)} promised publishes, {len(acked)} acks, "
        f"{checked} stored rows checked over all reopens"
    )


def _check_file(path: Path, published: dict[int, int], attempted: set[int]) -> int:
    """Every publish that returned is stored exactly once at its offset; offsets are contiguous."""
    with sqlite3.connect(path) as db:
        rows = db.execute('SELECT "offset", payload FROM messages WHERE queue = \'q\' ORDER BY "offset"').fetchall()
    db.close()
    assert [offset for offset, _ in rows] == list(range(len(rows))), "offsets are not contiguous"
    stored = {json.loads(payload)["seq"]: offset for offset, payload in rows}
    assert len(stored) == len(rows), "a publish is stored twice"
    for seq, offset in published.items():
        assert stored.get(seq) == offset, f"publish {seq} returned offset {offset} but is not stored there"
    assert set(stored) <= attempted, "a message was stored that nobody published"
    return len(rows)


def _checkpoint(path: Path) -> tuple[int, int] | None:
    """Run a checkpoint of our own (CHECKPOINT_EVERY patched to 0); None if it never got to run.

    The broker's watcher checkpoints too, and while it does ours does not run, so retry until WAIT.
    """
    checkpointer = _Checkpointer(str(path))
    try:
        deadline = time.monotonic() + WAIT
        result = checkpointer.maybe_run()
        while result is None and time.monotonic() < deadline:
            result = checkpointer.maybe_run()
        return result
    finally:
        checkpointer.close()


def test_a_steady_publish_and_consume_loop_reaches_a_steady_file_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "app.mqlite"
    monkeypatch.setattr(sharing, "CHECKPOINT_EVERY", 0.0)  # due at every call
    sizes = []
    with mqlite.Broker(path) as broker:
        queue = broker.queue("q")
        sub = broker.subscribe("q", name="w")
        for _ in range(5):
            for _ in range(10):
                queue.publish_many([("e", {"blob": "x" * 100})] * 1000)
                assert len(sub.poll(max_messages=1000)) == 1000
            # Measure the file only once the WAL is copied back into it: before that, its size
            # says when the watcher last checkpointed, not how much the queue keeps.
            result = _checkpoint(path)
            assert result is not None, "the checkpoint never ran"
            frames, copied = result
            assert copied == frames
            sizes.append(path.stat().st_size)
    assert sizes[-1] <= sizes[1] * 1.1, f"file kept growing: {sizes}"
    assert sizes[-1] < 10_000 * 100, "the file holds more than a round of messages"


def test_the_watchers_checkpointer_copies_the_wal_back_into_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "app.mqlite"
    monkeypatch.setattr(sharing, "CHECKPOINT_EVERY", 0.0)  # due at every call
    with mqlite.Broker(path) as broker:
        queue = broker.queue("q", retention="limits")
        for i in range(200):
            queue.publish("e", i)
        result = _checkpoint(path)
        assert result is not None, "the checkpoint never ran"
        frames, copied = result
        assert copied == frames
        # The file alone, WAL ignored, now holds every message.
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            assert db.execute("SELECT count(*) FROM messages").fetchone() == (200,)
        finally:
            db.close()


# -- a model of restarts -------------------------------------------------------------------


class RestartMachine(RuleBasedStateMachine):
    """A durable manual-ack subscription, restarted at random, against a plain model.

    The model: which offsets were published, acked, handed out in this session (``out``), owed
    again (``owed``: nacked, or unacked at a restart) and nacked with a delay that has not ended
    (``waiting``, with the time it ends). Time is a ManualClock that runs on across restarts.
    After any sequence, a restart changes nothing a subscriber can tell apart from a
    disconnection, and a nack delay ends when it would have without one.
    """

    commit: Literal["each", "batch"] = "each"

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="mqlite-restarts-")
        self.path = Path(self.directory) / "app.mqlite"
        self.published = 0
        self.next_fresh = 0
        self.acked: set[int] = set()
        self.out: dict[int, mqlite.Message] = {}
        self.owed: set[int] = set()
        self.waiting: dict[int, float] = {}
        self.now = 1_000.0
        self._open()

    def _open(self) -> None:
        self.clock = mqlite.ManualClock(start=self.now)
        self.broker = mqlite.Broker(self.path, commit=self.commit, clock=self.clock)
        self.sub = self.broker.subscribe("q", name="w", ack="manual")

    @rule(count=st.integers(1, 4))
    def publish(self, count: int) -> None:
        self.broker.queue("q").publish_many([("e", self.published + i) for i in range(count)])
        self.published += count

    @rule(count=st.integers(1, 5))
    def pull(self, count: int) -> None:
        for message in self.sub.poll(max_messages=count):
            offset = message.offset
            assert message.payload == offset
            assert offset not in self.acked, f"acked offset {offset} delivered again"
            assert offset not in self.out, f"offset {offset} delivered twice while out"
            assert offset not in self.waiting, f"offset {offset} delivered before its nack delay ended"
            if offset in self.owed:
                self.owed.remove(offset)
            else:
                assert offset == self.next_fresh, f"expected fresh offset {self.next_fresh}, got {offset}"
                self.next_fresh += 1
            self.out[offset] = message

    @precondition(lambda self: self.out)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.out)))
        self.sub.ack(self.out.pop(offset))
        self.acked.add(offset)

    @precondition(lambda self: self.out)
    @rule(data=st.data(), delay=st.sampled_from([0, 5, 20]))
    def nack(self, data: st.DataObject, delay: int) -> None:
        offset = data.draw(st.sampled_from(sorted(self.out)))
        self.sub.nack(self.out.pop(offset), delay=delay)
        if delay:
            self.waiting[offset] = self.now + delay
        else:
            self.owed.add(offset)

    @rule(seconds=st.sampled_from([1, 5, 20]))
    def advance(self, seconds: int) -> None:
        self.now += seconds
        self.clock.advance(seconds)
        for offset, due in list(self.waiting.items()):
            if due <= self.now:
                del self.waiting[offset]
                self.owed.add(offset)

    @rule()
    def restart(self) -> None:
        self.broker.close()
        self._open()
        self.owed |= set(self.out)
        self.out.clear()

    @invariant()
    def figures_match_the_model(self) -> None:
        assert self.sub.pending == len(self.out) + len(self.owed) + len(self.waiting)
        assert self.sub.position == self.next_fresh
        assert self.broker.queue("q").end_offset == self.published

    def teardown(self) -> None:
        try:
            self.restart()
            self.advance(20)  # every delay has ended
            self.pull(10_000)
            assert not self.owed, f"owed offsets never delivered again: {self.owed}"
            assert self.next_fresh == self.published
        finally:
            self.broker.close()
            shutil.rmtree(self.directory, ignore_errors=True)


class BatchedRestartMachine(RestartMachine):
    """The same model with ``commit="batch"``: a clean close commits everything."""

    commit = "batch"


RestartMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
BatchedRestartMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)
test_restarts_match_the_model = RestartMachine.TestCase
test_batched_restarts_match_the_model = BatchedRestartMachine.TestCase


@pytest.mark.parametrize("commit", ["each", "batch"])
def test_a_deleted_cursor_is_gone_from_the_file(tmp_path: Path, commit: Literal["each", "batch"]) -> None:
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        broker.publish("q", "e", 1)
        assert sub.get(timeout=WAIT) is not None
    store = SqliteStore(path, commit=commit)
    try:
        store.open_log("q", {}).delete_cursor("w")
        assert store.flush(timeout=WAIT)
    finally:
        store.close()
    with mqlite.Broker(path) as broker:
        assert broker.info().subscriptions == ()


def test_close_gives_up_on_a_stuck_watcher_after_close_timeout_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "app.mqlite"
    entered = threading.Event()
    release = threading.Event()

    def stuck_poke() -> None:
        entered.set()
        release.wait(WAIT)

    monkeypatch.setattr(store_module, "CLOSE_TIMEOUT", 0.05)
    store = SqliteStore(path)
    other = None
    try:
        store.watch(stuck_poke)
        other = SqliteStore(path)  # a second broker: the watcher now looks at data_version
        other.open_log("q", {})  # a change the watcher sees, so it pokes (and sticks)
        assert entered.wait(WAIT), "the watcher never poked"
        store.close()  # returns although the watcher is stuck
        assert "the mqlite-watcher thread did not end within 0.05 s" in caplog.text
    finally:
        release.set()
        if store._watcher is not None:
            store._watcher.thread.join(WAIT)
        store.close()
        if other is not None:
            other.close()


def test_a_batched_writer_that_falls_behind_holds_publishers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    coalesce = writer._coalesce

    def recording(ops: list[Any]) -> list[Any]:
        # Consecutive publishes share one insert op: count its rows.
        batches.append(sum(len(params) if many else 1 for _, params, many in ops))
        return coalesce(ops)

    monkeypatch.setattr(writer, "MAX_BACKLOG", 8)
    monkeypatch.setattr(writer, "_coalesce", recording)
    path = tmp_path / "app.mqlite"
    with mqlite.Broker(path, commit="batch") as broker:
        broker.queue("q", retention="limits")

        def publish(writer: int) -> None:
            for i in range(500):
                broker.publish("q", "e", [writer, i])

        workers = [Worker(lambda w=w: publish(w)) for w in range(2)]  # type: ignore[misc]
        for worker in workers:
            worker.join()
        assert broker.flush(timeout=WAIT)
    assert max(batches) <= 8, f"the writer was handed {max(batches)} writes at once"
    with mqlite.Broker(path) as broker:
        assert len(broker.queue("q")) == 1000


def test_a_publish_waits_for_a_stuck_batched_writer_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backpressure wait is bounded: a writer that never catches up makes the write fail."""
    stuck = threading.Event()
    release = threading.Event()
    monkeypatch.setattr(writer, "MAX_BACKLOG", 2)
    monkeypatch.setattr(writer, "BACKPRESSURE_TIMEOUT", 0.2)
    path = tmp_path / "app.mqlite"
    broker = mqlite.Broker(path, commit="batch")
    try:
        queue = broker.queue("q", retention="limits")
        store = broker._engine.store  # type: ignore[attr-defined]  # the file under test
        execute = store._execute_locked

        def blocked(ops: list[Any]) -> None:
            stuck.set()
            assert release.wait(WAIT), "the test never released the writer"
            execute(ops)

        monkeypatch.setattr(store, "_execute_locked", blocked)
        queue.publish("e", 0)
        assert stuck.wait(WAIT)

        def publish_more() -> None:
            for i in range(1, 10):
                queue.publish("e", i)

        with pytest.raises(mqlite.StorageError, match="behind"):
            publish_more()
    finally:
        release.set()
        broker.close()


@pytest.mark.parametrize("limit", [32766, 999, 100, 10])
def test_many_rows_go_in_multi_row_statements_within_the_connections_variable_limit(limit: int) -> None:
    # 345 rows: chunks of 256, 64 and 16 where the limit allows them, then the rest one by one.
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(schema._SCHEMA)
    db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
    messages = [("q", offset, f"e{offset % 3}", b"1", None, b"{}", 0.5) for offset in range(345)]
    writer._INSERT_ROWS.run(db, messages)
    assert db.execute('SELECT * FROM messages ORDER BY "offset"').fetchall() == messages
    pending = [(name, offset, 1, "me", None, 7.0) for name in ("a", "b") for offset in range(345)]
    writer._UPSERT_ROWS.run(db, [("q", *row) for row in pending])
    # An upsert of rows already there updates them.
    writer._UPSERT_ROWS.run(db, [("q", "a", offset, 2, None, 9.5, None) for offset in range(100, 300)])
    writer._delete_pending(db, [("q", name, offset) for name in ("a", "b") for offset in range(0, 345, 2)])
    updated = {("a", offset) for offset in range(100, 300)}
    expected = [
        ("q", name, offset, 2, None, 9.5, None)
        if (name, offset) in updated
        else ("q", name, offset, 1, "me", None, 7.0)
        for name in ("a", "b")
        for offset in range(1, 345, 2)  # the odd ones: the even ones were deleted
    ]
    assert db.execute('SELECT * FROM pending ORDER BY name, "offset"').fetchall() == expected
    db.close()


@pytest.mark.parametrize(
    "payload",
    [{"id": 1, "text": 'é\n"q"', "nested": [1, 2.5, None, True]}, "plain", 7, -0.5, [], {}, None, float("inf")],
)
def test_the_json_serializer_writes_what_the_standard_encoder_writes(payload: Any) -> None:
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    assert mqlite.JsonSerializer().dumps(payload) == encoder.encode(payload).encode()
