"""The ``mqlite`` operating commands, each run in a subprocess, mostly on a file another process uses.

The other process (:func:`cli_processes.hold`) keeps a broker open on the file with a durable
subscription and messages it holds unacked, as a worker would. Read commands are also checked to
leave the file byte-identical, on a file nobody else writes to (else the check would mean nothing).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import select
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cli_processes
import pytest
from helpers import WAIT

import mqlite
from mqlite.cli import REQUEUE_CURSOR, REQUEUED_FROM

spawn = multiprocessing.get_context("spawn")

# A command gets this long before the test fails (the interpreter starts in well under a second).
RUN_TIMEOUT = 30.0


def mqlite_command(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mqlite ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "mqlite", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def ok(*args: str, stdin: str | None = None) -> str:
    """The stdout of a command that must succeed, quietly."""
    result = mqlite_command(*args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def ok_json(*args: str, stdin: str | None = None) -> Any:
    return json.loads(ok(*args, "--json", stdin=stdin))


def fails(*args: str, stdin: str | None = None) -> str:
    """The stderr of a command that must fail as a user error: status 1, one message, no traceback."""
    result = mqlite_command(*args, stdin=stdin)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("mqlite "), result.stderr
    assert result.stdout == ""
    return result.stderr


def fill(path: str) -> None:
    """Lay out the file the tests inspect: ``orders`` with five messages, two durable subscriptions."""
    with mqlite.Broker(path) as broker:
        broker.subscribe("orders", name="billing", ack="manual").close()
        broker.subscribe("orders", events="created", name="audit", ack="manual", max_deliveries=3).close()
        for i in range(5):
            broker.publish("orders", "created" if i % 2 == 0 else "paid", {"id": i}, key=f"k{i}" if i == 3 else None)


def make_dead_letters(path: str, count: int) -> None:
    """Dead-letter the first ``count`` messages of ``orders`` from subscription ``flaky``."""
    with mqlite.Broker(path) as broker:
        flaky = broker.subscribe("orders", name="flaky", start="earliest", ack="manual", max_deliveries=1)
        for _ in range(count):
            message = flaky.get(timeout=WAIT)
            assert message is not None
            flaky.nack(message)
        flaky.close()
        broker.delete_subscription("orders", "flaky")


class Holder:
    """A child process with a broker open on the file, holding messages of ``billing`` unacked."""

    def __init__(self, path: str, take: int) -> None:
        self.ready = spawn.Event()
        self.stop = spawn.Event()
        results = spawn.Queue()
        self.process = spawn.Process(
            target=cli_processes.hold, args=(path, take, self.ready, self.stop, results), daemon=True
        )
        self.process.start()
        try:
            assert self.ready.wait(RUN_TIMEOUT), "the holder did not start"
            self.pid, self.offsets = results.get(timeout=WAIT)
        except BaseException:
            self.end()
            raise

    def end(self) -> None:
        self.stop.set()
        self.process.join(WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(WAIT)


@pytest.fixture
def path(tmp_path: Path) -> str:
    where = str(tmp_path / "shop.mqlite")
    fill(where)
    return where


@pytest.fixture
def holder(path: str) -> Iterator[Holder]:
    """Another process using the file: it holds offsets 0 and 1 of ``billing``."""
    child = Holder(path, take=2)
    try:
        yield child
    finally:
        child.end()


def has_since_column(path: str) -> bool:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return "since" in [row[1] for row in db.execute("PRAGMA table_info(pending)")]


# -- info ----------------------------------------------------------------------------------------


def test_info_shows_queues_subscriptions_and_the_broker_that_has_the_file_open(path: str, holder: Holder) -> None:
    out = ok("info", path)
    assert out.startswith(f"{path} (1 broker open: pid {holder.pid})")
    assert "queue   start  end  retained  retention  dead letters" in out
    billing = next(line for line in out.splitlines() if line.startswith("orders  billing"))
    assert billing.split() == ["orders", "billing", "*", "manual", "2", "3", "2", "1", "2", "0", "0", "0"]  # 1 consumer
    audit = next(line for line in out.splitlines() if line.startswith("orders  audit"))
    assert audit.split()[:7] == ["orders", "audit", "created", "manual", "0", "3", "0"]


def test_info_json_is_one_document_with_every_figure(path: str, holder: Holder) -> None:
    document = ok_json("info", path)
    assert document["brokers"] == [{"instance": document["brokers"][0]["instance"], "pid": holder.pid}]
    (orders,) = document["queues"]
    assert (orders["name"], orders["start_offset"], orders["end_offset"], orders["retention"]) == (
        "orders",
        0,
        5,
        "interest",
    )
    subs = {sub["name"]: sub for sub in document["subscriptions"]}
    assert subs["billing"]["pending"] == 2
    assert subs["billing"]["held"] == 2
    assert subs["billing"]["lag"] == 3
    assert subs["audit"]["events"] == ["created"]
    assert subs["audit"]["lag"] == 3, "only the created events count"
    assert subs["audit"]["max_deliveries"] == 3


def test_info_watch_refreshes_count_times(path: str, holder: Holder) -> None:
    lines = ok("info", path, "--watch", "0.05", "--count", "3", "--json").splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["subscriptions"] for line in lines)
    text = ok("info", path, "--watch", "0.05", "--count", "2")
    assert text.count("mqlite info, every 0.05 s") == 2


def test_info_watch_ends_quietly_on_ctrl_c(path: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mqlite", "info", path, "--watch", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        readable, _, _ = select.select([process.stdout], [], [], RUN_TIMEOUT)
        assert readable, "no frame was printed"
        assert process.stdout is not None
        assert process.stdout.readline().startswith("mqlite info, every")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0
    assert "Traceback" not in err


# -- tail ----------------------------------------------------------------------------------------


def test_tail_prints_every_message_from_the_earliest_without_consuming(path: str, holder: Holder) -> None:
    before = ok_json("info", path)["subscriptions"]
    lines = ok("tail", path, "orders").splitlines()
    assert [line.split("  ")[0] for line in lines] == ["0", "1", "2", "3", "4"]
    assert lines[3].split("  ")[2:] == ["paid", '{"id": 3}', 'key="k3"']
    assert ok_json("info", path)["subscriptions"] == before, "no position or pending message moved"


def test_tail_json_lines_filter_and_from(path: str, holder: Holder) -> None:
    out = ok("tail", path, "orders", "--events", "pa*", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["offset"], r["event"], r["payload"], r["key"]) for r in rows] == [
        (1, "paid", {"id": 1}, None),
        (3, "paid", {"id": 3}, "k3"),
    ]
    from_3 = ok("tail", path, "orders", "--from", "3", "--json").splitlines()
    assert [json.loads(line)["offset"] for line in from_3] == [3, 4]
    assert ok("tail", path, "orders", "--from", "latest") == ""
    assert len(ok("tail", path, "orders", "--from", "2000-01-01T00:00:00Z").splitlines()) == 5
    assert len(ok("tail", path, "orders", "--count", "2").splitlines()) == 2


def test_tail_follow_prints_what_another_process_publishes(path: str, holder: Holder) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "mqlite", "tail", path, "orders", "--from", "5", "--follow", "--count", "2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ok("publish", path, "orders", "shipped", '{"id": 5}')
        ok("publish", path, "orders", "shipped", '{"id": 6}')
        out, err = follower.communicate(timeout=RUN_TIMEOUT)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate(timeout=RUN_TIMEOUT)
    assert follower.returncode == 0, err
    assert [json.loads(line)["payload"] for line in out.splitlines()] == [{"id": 5}, {"id": 6}]


def test_tail_follow_stops_at_its_timeout(path: str) -> None:
    assert ok("tail", path, "orders", "--from", "latest", "--follow", "--timeout", "0.2") == ""


# -- publish -------------------------------------------------------------------------------------


def test_publish_prints_the_offsets_and_the_holder_keeps_its_messages(path: str, holder: Holder) -> None:
    assert ok("publish", path, "orders", "created", '{"id": 5}') == "5\n"
    assert ok_json("publish", path, "orders", "paid", "-", stdin='1\n"two"\n\n{"x": [3]}\n') == {
        "queue": "orders",
        "offsets": [6, 7, 8],
    }
    assert ok("publish", path, "orders", "noted") == "9\n", "no payload: null"
    rows = [json.loads(line) for line in ok("tail", path, "orders", "--from", "5", "--json").splitlines()]
    assert [(r["event"], r["payload"]) for r in rows] == [
        ("created", {"id": 5}),
        ("paid", 1),
        ("paid", "two"),
        ("paid", {"x": [3]}),
        ("noted", None),
    ]
    assert ok_json("pending", path, "orders", "billing")["pending"][0]["owner_pid"] == holder.pid


def test_publish_refuses_bad_json_and_publishes_nothing(path: str, holder: Holder) -> None:
    assert "PAYLOAD is not valid JSON" in fails("publish", path, "orders", "created", "{oops")
    err = fails("publish", path, "orders", "created", "-", stdin="1\n2\nthree\n")
    assert "line 3 of stdin is not valid JSON" in err
    assert "nothing was published" in err
    assert "wildcard" in fails("publish", path, "orders", "creat*d", "1")
    assert ok_json("info", path)["queues"][0]["end_offset"] == 5


# -- pending -------------------------------------------------------------------------------------


def test_pending_shows_each_message_with_its_live_holder_and_attempts(path: str, holder: Holder) -> None:
    document = ok_json("pending", path, "orders", "billing")
    rows = document["pending"]
    assert [(r["offset"], r["event"], r["attempts"], r["state"]) for r in rows] == [
        (0, "created", 1, "held"),
        (1, "paid", 1, "held"),
    ]
    assert all(r["owner_pid"] == holder.pid and r["owner_alive"] is True for r in rows)
    if has_since_column(path):
        assert all(r["held_for"] >= 0 for r in rows)
    else:
        assert all(r["held_for"] is None for r in rows), "the file does not record since when"
    text = ok("pending", path, "orders", "billing")
    assert f"pid {holder.pid} (alive)" in text
    assert ok("pending", path, "orders", "audit") == "no pending messages on subscription 'audit' of 'orders'\n"


def test_pending_says_when_the_holder_died(path: str) -> None:
    child = Holder(path, take=1)
    child.process.kill()
    child.process.join(WAIT)
    (row,) = ok_json("pending", path, "orders", "billing")["pending"]
    assert (row["owner_pid"], row["owner_alive"], row["state"]) == (child.pid, False, "held")
    assert f"pid {child.pid} (dead)" in ok("pending", path, "orders", "billing")


def test_pending_shows_when_a_waiting_message_is_due(path: str) -> None:
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("orders", name="billing", ack="manual")
        message = sub.get(timeout=WAIT)
        assert message is not None
        sub.nack(message, delay=600)
    (row,) = ok_json("pending", path, "orders", "billing")["pending"]
    assert row["state"] == "waiting"
    assert 0 < row["due_in"] <= 600
    assert row["owner"] is None


# -- dead letters --------------------------------------------------------------------------------


def test_dead_letters_lists_each_letter_with_its_reason(path: str, holder: Holder) -> None:
    make_dead_letters(path, 2)
    document = ok_json("dead-letters", path, "orders")
    assert document["dead_letter_queue"] == "orders.dead-letter"
    letters = document["dead_letters"]
    assert [(d["source_queue"], d["source_offset"], d["subscription"], d["reason"]) for d in letters] == [
        ("orders", 0, "flaky", "nack"),
        ("orders", 1, "flaky", "nack"),
    ]
    text = ok("dead-letters", path, "orders")
    assert text.startswith("2 dead letters in 'orders.dead-letter'")
    assert "orders@1" in text
    assert ok("dead-letters", path, "orders.dead-letter") == "no dead letters in 'orders.dead-letter.dead-letter'\n"


def test_requeue_publishes_each_dead_letter_back_once(path: str, holder: Holder) -> None:
    make_dead_letters(path, 2)
    assert ok("dead-letters", path, "orders", "--requeue") == (
        "requeued orders.dead-letter@0 -> orders@5\nrequeued orders.dead-letter@1 -> orders@6\n"
    )
    assert ok_json("dead-letters", path, "orders", "--requeue")["requeued"] == [], "each is requeued once"
    assert ok("dead-letters", path, "orders").startswith("no dead letters in 'orders.dead-letter' (2 requeued")
    assert [d["requeued"] for d in ok_json("dead-letters", path, "orders", "--all")["dead_letters"]] == [True, True]
    copies = [json.loads(line) for line in ok("tail", path, "orders", "--from", "5", "--json").splitlines()]
    assert [(c["event"], c["payload"], c["headers"]) for c in copies] == [
        ("created", {"id": 0}, {REQUEUED_FROM: {"queue": "orders.dead-letter", "offset": 0}}),
        ("paid", {"id": 1}, {REQUEUED_FROM: {"queue": "orders.dead-letter", "offset": 1}}),
    ]


def test_requeue_after_a_crash_between_publish_and_ack_does_not_publish_twice(path: str) -> None:
    make_dead_letters(path, 1)
    done = spawn.Event()
    child = spawn.Process(
        target=cli_processes.requeue_and_die, args=(path, "orders.dead-letter", "orders", done), daemon=True
    )
    child.start()
    try:
        assert done.wait(RUN_TIMEOUT)
        child.join(WAIT)
    finally:
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    (pending,) = ok_json("pending", path, "orders.dead-letter", REQUEUE_CURSOR)["pending"]
    assert pending["owner_alive"] is False, "the crash left the letter pending"
    assert ok_json("dead-letters", path, "orders", "--requeue")["requeued"] == [
        {"offset": 0, "queue": "orders", "new_offset": 5}
    ]
    assert ok_json("info", path)["queues"][0]["end_offset"] == 6, "the copy the crashed run published, only"
    assert ok_json("dead-letters", path, "orders")["dead_letters"] == []


# -- seek, delete-subscription, compact ----------------------------------------------------------


def test_seek_moves_a_subscription_and_keeps_its_settings(path: str, holder: Holder) -> None:
    assert ok_json("seek", path, "orders", "audit", "latest") == {
        "queue": "orders",
        "subscription": "audit",
        "position": 5,
        "previous": 0,
    }
    assert ok("seek", path, "orders", "audit", "3") == "subscription 'audit' of 'orders' is now at offset 3 (was 5)\n"
    # Once audit left them, nobody needs offsets 0 and 1 (interest retention; billing reads from 2):
    # the oldest retained message, which a time before every message names, is 2.
    assert ok_json("seek", path, "orders", "audit", "2000-01-01T00:00:00+00:00")["position"] == 2
    ok("seek", path, "orders", "audit", "earliest")
    audit = next(s for s in ok_json("info", path)["subscriptions"] if s["name"] == "audit")
    assert (audit["events"], audit["ack"], audit["max_deliveries"], audit["position"]) == (["created"], "manual", 3, 2)


def test_seek_refuses_a_bad_position_or_an_unknown_subscription(path: str, holder: Holder) -> None:
    assert "bad position 'yesterday'" in fails("seek", path, "orders", "audit", "yesterday")
    assert "bad position '-1'" in fails("seek", path, "orders", "audit", "-1")
    assert "outside queue 'orders'" in fails("seek", path, "orders", "audit", "99")
    assert "has no subscription 'nobody'" in fails("seek", path, "orders", "nobody", "0")
    assert "has no queue 'nowhere'" in fails("seek", path, "nowhere", "audit", "0")


def test_delete_subscription_forgets_an_idle_one_and_refuses_one_in_use(path: str, holder: Holder) -> None:
    deleted = ok("delete-subscription", path, "orders", "audit")
    assert deleted == "deleted subscription 'audit' of 'orders' (0 pending)\n"
    assert [s["name"] for s in ok_json("info", path)["subscriptions"]] == ["billing"]
    assert "has no subscription 'audit'" in fails("delete-subscription", path, "orders", "audit")
    err = fails("delete-subscription", path, "orders", "billing")
    assert f"is in use: broker pid {holder.pid} holds" in err
    assert [s["name"] for s in ok_json("info", path)["subscriptions"]] == ["billing"]


def test_compact_reports_what_it_freed_and_keeps_everything(tmp_path: Path) -> None:
    where = str(tmp_path / "big.mqlite")
    with mqlite.Broker(where) as broker:
        broker.subscribe("logs", name="reader").close()
        broker.queue("logs").publish_many([("line", "x" * 1000)] * 6000)
        broker.delete_subscription("logs", "reader")  # nobody needs them: dropped, their pages free
        broker.subscribe("logs", name="reader").close()
        broker.publish("logs", "line", "kept")
    child = Holder(where, take=0)  # another process has it open meanwhile
    try:
        before = ok_json("info", where)
        document = ok_json("compact", where)
        assert document["freed"] == document["bytes_before"] - document["bytes_after"]
        assert document["bytes_after"] < document["bytes_before"]
        assert ok_json("info", where)["queues"] == before["queues"]
        assert "freed" in ok("compact", where)
        assert [json.loads(line)["payload"] for line in ok("tail", where, "logs", "--json").splitlines()] == ["kept"]
    finally:
        child.end()


# -- what every command refuses ------------------------------------------------------------------

COMMANDS = [
    ["info"],
    ["tail", "orders"],
    ["publish", "orders", "created", "1"],
    ["pending", "orders", "billing"],
    ["dead-letters", "orders"],
    ["dead-letters", "orders", "--requeue"],
    ["seek", "orders", "billing", "0"],
    ["delete-subscription", "orders", "billing"],
    ["compact"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:3]))
def test_every_command_refuses_a_missing_file_and_never_creates_it(tmp_path: Path, command: list[str]) -> None:
    missing = str(tmp_path / "missing.mqlite")
    err = fails(command[0], missing, *command[1:])
    assert "does not exist; the mqlite command never creates a file" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:3]))
def test_every_command_refuses_a_file_that_is_not_mqlite(tmp_path: Path, command: list[str]) -> None:
    other = tmp_path / "notes.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    before = other.read_bytes()
    assert "is an SQLite database, not an mqlite file" in fails(command[0], str(other), *command[1:])
    assert other.read_bytes() == before


def test_read_commands_refuse_an_unknown_queue_or_subscription(path: str) -> None:
    assert "has no queue 'nowhere'; its queues are 'orders'" in fails("tail", path, "nowhere")
    assert "has no queue 'nowhere'" in fails("pending", path, "nowhere", "billing")
    assert "its durable subscriptions are 'audit', 'billing'" in fails("pending", path, "orders", "nobody")
    assert "has no queue 'nowhere'" in fails("dead-letters", path, "nowhere")
    assert "event filter" in fails("tail", path, "orders", "--events", "")


def test_a_redis_url_nobody_answers_and_a_file_only_command_on_a_url_fail_clearly() -> None:
    assert "Connection refused" in fails("info", "redis://127.0.0.1:1/0")  # port 1: nobody listens
    assert "compact applies to files" in fails("compact", "redis://127.0.0.1:1/0")


def test_usage_says_mqlite_and_lists_the_commands() -> None:
    out = ok("--help")
    assert out.startswith("usage: mqlite ")
    for command in ("info", "tail", "publish", "pending", "dead-letters", "seek", "delete-subscription", "compact"):
        assert command in out
    result = mqlite_command("tail")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: mqlite tail")


# -- reading never writes ------------------------------------------------------------------------


def _fingerprint(path: str) -> tuple[str, str | None, list[str]]:
    """The file's content hash, its WAL's (None if absent or empty), and the broker lock files."""

    def digest(name: str) -> str | None:
        try:
            data = Path(name).read_bytes()
        except FileNotFoundError:
            return None
        return hashlib.sha256(data).hexdigest() if data else None

    folder = f"{path}-brokers"
    locks = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    database = digest(path)
    assert database is not None
    return database, digest(f"{path}-wal"), locks


@pytest.mark.parametrize("state", ["closed cleanly", "after a crash"])
def test_read_commands_leave_the_file_byte_identical(path: str, state: str) -> None:
    make_dead_letters(path, 1)
    if state == "after a crash":
        child = Holder(path, take=2)  # killed while holding: its WAL and lock file stay behind
        child.process.kill()
        child.process.join(WAIT)
    before = _fingerprint(path)
    reads = [
        ["info", path],
        ["info", path, "--json"],
        ["info", path, "--watch", "0.01", "--count", "2"],
        ["tail", path, "orders"],
        ["tail", path, "orders", "--json", "--events", "paid", "--from", "2"],
        ["tail", path, "orders", "--from", "latest", "--follow", "--timeout", "0.05"],
        ["pending", path, "orders", "billing"],
        ["pending", path, "orders", "billing", "--json"],
        ["dead-letters", path, "orders"],
        ["dead-letters", path, "orders", "--all", "--json"],
    ]
    for command in reads:
        ok(*command)
        assert _fingerprint(path) == before, command
