"""Damaged and unwritable files: a ``StorageError`` that says what is wrong, and nothing written.

Each case damages a copy of a real mqlite file (queues, a durable subscription with settings,
pending messages) and opens it. The broker must refuse it with a ``StorageError`` naming the
file and the problem, never call it "not an mqlite file", leave its bytes as they were, and
leave no thread, lock file or claim behind.

The permission cases need chmod to bind, which it does not for root: run as root (as in this
project's containers), they run their check in a forked child that drops to the ``nobody`` user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT

import mqlite
import mqlite.engine.sqlite.engine  # imported before a child process gives up the right to read it

if sys.platform != "win32":
    import fcntl
    import pwd

NOT_OURS = "not an mqlite file"
DB_TIMEOUT = 5.0  # for the sqlite3 connections that damage a file


# -- a real file, and copies of it ---------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed mqlite file: queue ``orders`` with 200 messages, subscription ``billing`` with 7 pending."""
    path = tmp_path_factory.mktemp("good") / "app.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("orders", retention="limits", max_messages=1000)
        sub = broker.subscribe(
            "orders",
            name="billing",
            events=["created"],
            ack="manual",
            max_deliveries=5,
            backoff=mqlite.Backoff(0.5, 2.0, 10.0),
        )
        broker.queue("orders").publish_many(
            [("created", {"marker": f"MARKER-{i:04d}", "pad": "x" * 200}) for i in range(200)]
        )
        taken = sub.poll(max_messages=10, timeout=WAIT)
        assert len(taken) == 10
        sub.ack(*taken[:3])
    return path


def _copy(good_file: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "app.mqlite"
    shutil.copyfile(good_file, path)
    return path


@pytest.fixture
def copy(good_file: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good file, to damage."""
    return _copy(good_file, tmp_path / "case")


def _damage(path: Path, *statements: str) -> None:
    """Change ``path`` through SQLite, as a person with the sqlite3 tool (or a bug) might."""
    db = sqlite3.connect(path, timeout=DB_TIMEOUT)
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


def _overwrite(path: Path, at: int, size: int) -> None:
    """Overwrite ``size`` bytes of ``path`` from ``at`` with garbage (not random: the same every run)."""
    with path.open("r+b") as file:
        file.seek(at)
        file.write((b"\xde\xad\xbe\xef" * (size // 4 + 1))[:size])


def _page_size(path: Path) -> int:
    db = sqlite3.connect(path, timeout=DB_TIMEOUT)
    try:
        size: int = db.execute("PRAGMA page_size").fetchone()[0]
        return size
    finally:
        db.close()


# -- what a refusal must leave ---------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_files(path: Path) -> list[str]:
    brokers = Path(f"{path}-brokers")
    return sorted(os.listdir(brokers)) if brokers.is_dir() else []


def _claimed(path: Path) -> bool:
    """Whether some broker of this process still holds its claim (an ``flock``) on ``path``."""
    if sys.platform == "win32":
        return False
    with path.open("rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def _try_open(path: Path) -> dict[str, Any]:
    """Open ``path``: the refusal's message (None if it opened), and any thread the attempt left running."""
    before = set(threading.enumerate())
    try:
        broker = mqlite.Broker(path)
    except mqlite.StorageError as error:
        refused: str | None = str(error)
    else:
        broker.close()
        refused = None
    return {"refused": refused, "threads": sorted(t.name for t in set(threading.enumerate()) - before)}


def _assert_refused(path: Path, *expected: str, attempt: Callable[[Path], dict[str, Any]] = _try_open) -> str:
    """Open ``path``, which must be refused saying each of ``expected``; return the message.

    Also checks the rest of the promise: the path is named, a file is not called foreign, its
    bytes are unchanged, and no thread, lock file or claim is left behind.
    """
    digest = _digest(path)
    locks = _lock_files(path)
    outcome = attempt(path)
    message = outcome["refused"]
    assert message is not None, f"{path} was opened"
    assert str(path) in message
    for text in expected:
        assert text in message
    assert NOT_OURS not in message
    assert _digest(path) == digest, "a refused file was changed"
    assert _lock_files(path) == locks, "a refused open left a lock file"
    assert not _claimed(path)
    assert outcome["threads"] == []
    return message


# -- damaged pages -----------------------------------------------------------------------------


def test_garbage_over_a_page_of_messages_is_reported_as_a_damaged_page(copy: Path) -> None:
    page = _page_size(copy)
    at = copy.read_bytes().index(b"MARKER-0100")
    _overwrite(copy, at - at % page, page)
    _assert_refused(copy, "is corrupt", "a page of it is damaged", "SQLite says")


def test_garbage_over_the_schema_part_of_the_first_page_is_reported_as_damage(copy: Path) -> None:
    # SQLite's 100-byte header survives; the table of tables after it does not.
    _overwrite(copy, 100, _page_size(copy) - 100)
    _assert_refused(copy, "is corrupt", "a page of it is damaged")


def test_garbage_in_the_sqlite_header_is_reported_as_a_damaged_header(copy: Path) -> None:
    _overwrite(copy, 16, 84)  # the magic string "SQLite format 3" survives
    _assert_refused(copy, "is corrupt", "its SQLite header is damaged")


def test_a_whole_first_page_of_garbage_is_not_called_an_mqlite_file_but_may_be_a_damaged_one(copy: Path) -> None:
    _overwrite(copy, 0, _page_size(copy))
    digest = _digest(copy)
    outcome = _try_open(copy)
    # Without its header nothing tells this file from a foreign one; the message says both.
    assert outcome["refused"] is not None
    assert "is not an SQLite database" in outcome["refused"]
    assert "unless its first page was overwritten" in outcome["refused"]
    assert _digest(copy) == digest
    assert _lock_files(copy) == []
    assert outcome["threads"] == []


# -- rows that are not what mqlite writes ------------------------------------------------------

_GOOD_CONFIG = '{"retention": "limits", "max_messages": 1000, "max_age": null, "overflow": "drop_oldest"}'


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("nope{", "config is not valid JSON"),
        ("[1, 2]", "config is [1, 2], not a JSON object"),
        ('{"retention": "limits"}', "config lacks the keys 'max_age', 'max_messages', 'overflow'"),
        (_GOOD_CONFIG[:-1] + ', "color": "red"}', "config has the unknown key 'color'"),
        (_GOOD_CONFIG.replace("1000", '"1000"'), "max_messages must be None or a positive int, got '1000'"),
        (_GOOD_CONFIG.replace('"limits"', "5"), "retention must be 'interest', 'limits' or 'workqueue', got 5"),
    ],
    ids=["not-json", "not-an-object", "missing-keys", "unknown-key", "text-limit", "number-retention"],
)
def test_a_bad_queue_config_names_the_table_the_queue_and_the_problem(copy: Path, config: str, expected: str) -> None:
    _damage(copy, f"UPDATE queues SET config = '{config}'")
    _assert_refused(copy, "is corrupt: in table queues, the row of queue 'orders'", expected)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("'x'", "settings is not valid JSON"),
        ("'null'", "settings is None, not a JSON object"),
        ("""json_remove(settings, '$.manual_ack', '$.backoff')""", "settings lacks the keys 'backoff', 'manual_ack'"),
        ("""json_set(settings, '$.manual_ack', 'yes')""", "manual_ack must be true or false, got 'yes'"),
        ("""json_set(settings, '$.ack_timeout', '5')""", "ack_timeout must be a number or an integer or null, got '5'"),
        ("""json_set(settings, '$.max_deliveries', 2.5)""", "max_deliveries must be an integer or null, got 2.5"),
        ("""json_set(settings, '$.dead_letter', 7)""", "dead_letter must be a string, got 7"),
        ("""json_set(settings, '$.events', 5)""", "events must be a list or null, got 5"),
        ("""json_set(settings, '$.events', json('[5]'))""", "settings: each event filter must be"),
        ("""json_set(settings, '$.backoff', json('[1]'))""", "backoff must be [initial, factor, maximum]"),
        ("""json_set(settings, '$.backoff', 'abc')""", "backoff must be a list, got 'abc'"),
    ],
    ids=[
        "not-json",
        "null",
        "missing-keys",
        "text-ack",
        "text-timeout",
        "real-deliveries",
        "number-dead-letter",
        "number-events",
        "number-event",
        "short-backoff",
        "text-backoff",
    ],
)
def test_bad_cursor_settings_name_the_table_the_subscription_and_the_problem(
    copy: Path, change: str, expected: str
) -> None:
    _damage(copy, f"UPDATE cursors SET settings = {change}")
    _assert_refused(copy, "is corrupt: in table cursors, the row of subscription 'billing' of queue 'orders'", expected)


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE queues SET start_offset = 'abc'", "in table queues, the row of queue 'orders': start_offset is 'abc'"),
        (
            "UPDATE cursors SET position = 'abc'",
            "in table cursors, the row of subscription 'billing' of queue 'orders': position is 'abc', not an integer",
        ),
        (
            "UPDATE pending SET attempts = 'many' WHERE \"offset\" = 5",
            "in table pending, the row of offset 5 of subscription 'billing' of queue 'orders': attempts is 'many'",
        ),
        ("UPDATE pending SET due = 'soon' WHERE \"offset\" = 5", "due is 'soon', not a real or NULL"),
        ("UPDATE pending SET owner = x'00' WHERE \"offset\" = 5", "owner is b'\\x00', not a text or NULL"),
        (
            "UPDATE messages SET timestamp = 'noon' WHERE \"offset\" = 7",
            "in table messages, the row of offset 7 of queue 'orders': timestamp is 'noon', not a real",
        ),
        ("UPDATE messages SET event = x'00' WHERE \"offset\" = 7", "event is b'\\x00', not a text"),
    ],
    ids=["start-offset", "position", "attempts", "due", "owner", "timestamp", "event"],
)
def test_a_column_of_the_wrong_type_names_the_table_the_row_and_the_column(
    copy: Path, statement: str, expected: str
) -> None:
    _damage(copy, statement)
    _assert_refused(copy, "is corrupt", expected)


def test_a_message_that_cannot_be_decoded_is_reported_with_its_queue_and_offset(copy: Path) -> None:
    _damage(copy, "UPDATE messages SET payload = x'ff00' WHERE \"offset\" = 7")
    _assert_refused(copy, "cannot decode message 7 of 'orders'")


def test_a_gap_in_the_offsets_is_reported_with_the_offsets(copy: Path) -> None:
    _damage(copy, 'DELETE FROM messages WHERE "offset" = 7')
    _assert_refused(copy, "is corrupt: queue 'orders' jumps from offset 6 to 8")


# -- the layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["mqlite_schema", "queues", "messages", "cursors", "pending"])
def test_a_missing_table_is_named(copy: Path, table: str) -> None:
    _damage(copy, f"DROP TABLE {table}")
    _assert_refused(copy, f"is a corrupt mqlite file: it has no {table} table")


def test_a_missing_column_is_named(copy: Path) -> None:
    _damage(copy, "ALTER TABLE pending DROP COLUMN due")
    _assert_refused(
        copy, "its pending table has the columns ('queue', 'name', 'offset', 'attempts', 'owner', 'since'), not"
    )


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE mqlite_schema SET version = 'three'", "its schema version is 'three', not a positive integer"),
        ("UPDATE mqlite_schema SET version = 2.5", "its schema version is 2.5, not a positive integer"),
        ("UPDATE mqlite_schema SET version = 0", "its schema version is 0, not a positive integer"),
        ("UPDATE mqlite_schema SET serializer = x'00'", "its serializer name is b'\\x00', not a str"),
        ("DELETE FROM mqlite_schema", "its mqlite_schema table has 0 rows, not one"),
        ("INSERT INTO mqlite_schema SELECT * FROM mqlite_schema", "its mqlite_schema table has 2 rows, not one"),
    ],
    ids=["text-version", "real-version", "zero-version", "blob-serializer", "no-row", "two-rows"],
)
def test_a_bad_schema_row_is_reported_as_damage(copy: Path, statement: str, expected: str) -> None:
    _damage(copy, statement)
    _assert_refused(copy, "is a corrupt mqlite file", expected)


def test_sqlites_own_tables_beside_mqlites_are_fine(copy: Path) -> None:
    _damage(copy, "ANALYZE")  # adds sqlite_stat1
    with mqlite.Broker(copy) as broker:
        assert broker.info().queue("orders").end_offset == 200


def test_an_older_layout_is_checked_against_its_own_version(copy: Path) -> None:
    _damage(
        copy,
        "ALTER TABLE pending DROP COLUMN since",
        "ALTER TABLE pending DROP COLUMN due",
        "UPDATE mqlite_schema SET version = 2",
    )
    with mqlite.Broker(copy) as broker:  # upgraded on open, as before
        assert broker.info().queue("orders").end_offset == 200


# -- damage found while the file is open -------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (
            "INSERT INTO messages VALUES ('orders', 200, 'created', x'ff00', NULL, NULL, 0.0)",
            "cannot decode message 200 of 'orders'",
        ),
        (
            "INSERT INTO messages VALUES ('orders', 201, 'created', x'7b7d', NULL, NULL, 0.0)",
            "jumps from offset 199 to 201",
        ),
        ("UPDATE cursors SET settings = '{'", "in table cursors, the row of subscription 'billing' of queue 'orders'"),
        ("UPDATE queues SET config = '{}'", "in table queues, the row of queue 'orders': config lacks"),
    ],
    ids=["undecodable", "gap", "settings", "config"],
)
def test_damage_written_by_another_connection_is_reported_by_the_next_operation(
    good_file: Path, copy: Path, statement: str, expected: str
) -> None:
    with mqlite.Broker(copy) as broker, mqlite.Broker(copy):  # two brokers: each operation reloads what changed
        _damage(copy, statement)
        with pytest.raises(mqlite.StorageError) as caught:
            broker.publish("orders", "created", {})
        assert str(copy) in str(caught.value)
        assert expected in str(caught.value)
        # Repaired, the file works again: the refused publish wrote nothing.
        _repair(copy, good_file)
        assert broker.publish("orders", "created", {}).offset == 200


def test_a_broker_whose_file_was_damaged_while_open_still_closes_at_once(copy: Path) -> None:
    broker = mqlite.Broker(copy)
    other = mqlite.Broker(copy)  # shared: every operation reloads what changed
    try:
        broker.subscribe("orders", name="billing")  # the queue is open in this broker
        _damage(copy, "UPDATE cursors SET settings = '{'")
        with pytest.raises(mqlite.StorageError):
            broker.publish("orders", "created", {})
        broker.close()  # closing writes nothing, so it needs no reload of the damaged rows
        assert broker.closed
        assert broker._engine.store.closed  # type: ignore[attr-defined]  # the file is let go, too
    finally:
        other.close()
    with pytest.raises(mqlite.StorageError):
        mqlite.Broker(copy)  # and the damage is still reported at the next open


def _repair(path: Path, good_file: Path) -> None:
    """Undo what the cases above damaged, from the good file's rows."""
    db = sqlite3.connect(path, timeout=DB_TIMEOUT)
    try:
        db.execute("ATTACH ? AS good", (str(good_file),))
        db.execute('DELETE FROM messages WHERE "offset" >= 200')
        db.execute("UPDATE queues SET config = (SELECT config FROM good.queues)")
        db.execute("UPDATE cursors SET settings = (SELECT settings FROM good.cursors)")
        db.commit()
    finally:
        db.close()


# -- permissions -------------------------------------------------------------------------------


class Unprivileged:
    """Where chmod binds: this process, or (as root, whom it does not bind) a child run as ``nobody``.

    Not thread-safe; one per test.
    """

    def __init__(self, folder: Path, user: Any) -> None:
        self.folder = folder
        self._user = user  # a pwd entry, or None to stay in this process

    def give(self, *paths: Path) -> None:
        """Make ``paths`` the unprivileged user's, as their own files would be."""
        if self._user is not None:
            for path in paths:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def run(self, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``check()`` as the unprivileged user; what it returns must be JSON."""
        if self._user is None:
            return check()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges, check, report, and leave without pytest's cleanup
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(self._user.pw_gid)
                os.setuid(self._user.pw_uid)
                report = json.dumps(check())
            except BaseException as error:  # noqa: BLE001  # reported to the parent, which fails the test
                report = json.dumps({"child failed": repr(error)})
            data = report.encode()
            with contextlib.suppress(BaseException):
                while data:
                    data = data[os.write(write, data) :]
            os._exit(0)
        os.close(write)
        try:
            data = _read_until_closed(read, time.monotonic() + 2 * WAIT, pid)
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        report: dict[str, Any] = json.loads(data)
        assert "child failed" not in report, report.get("child failed")
        return report


def _read_until_closed(fd: int, deadline: float, pid: int) -> bytes:
    """Everything the child writes to ``fd`` until it exits; kills it if it runs past ``deadline``."""
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the unprivileged child did not finish in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def unprivileged(tmp_path: Path) -> Iterator[Unprivileged]:
    if sys.platform == "win32":
        pytest.skip("POSIX file modes")
    if os.geteuid() != 0:
        yield Unprivileged(tmp_path, None)
        _restore_modes(tmp_path)
        return
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, whom chmod does not stop, and there is no 'nobody' user to run as")
    folder = Path(tempfile.mkdtemp(prefix="mqlite-damaged-"))  # pytest's tmp_path is root's alone
    try:
        if any(not parent.stat().st_mode & stat.S_IXOTH for parent in folder.parents):
            pytest.skip(f"running as root, and 'nobody' cannot reach the temporary folder {folder.parent}")
        os.chmod(folder, 0o755)
        yield Unprivileged(folder, user)
    finally:
        shutil.rmtree(folder)


def _restore_modes(folder: Path) -> None:
    """Let pytest delete what a test made read-only."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def _unprivileged_copy(good_file: Path, unprivileged: Unprivileged) -> Path:
    path = _copy(good_file, unprivileged.folder / "case")
    unprivileged.give(path.parent, path)
    return path


def test_the_good_file_opens_for_the_unprivileged_user(good_file: Path, unprivileged: Unprivileged) -> None:
    path = _unprivileged_copy(good_file, unprivileged)
    assert unprivileged.run(lambda: _try_open(path)) == {"refused": None, "threads": []}


def test_a_read_only_file_is_refused_as_read_only(good_file: Path, unprivileged: Unprivileged) -> None:
    path = _unprivileged_copy(good_file, unprivileged)
    path.chmod(0o444)
    _assert_refused(
        path,
        "is read-only",
        "mqlite writes to every file it opens",
        attempt=lambda p: unprivileged.run(lambda: _try_open(p)),
    )


def test_a_good_file_in_a_read_only_folder_is_refused_for_the_folder(
    good_file: Path, unprivileged: Unprivileged
) -> None:
    path = _unprivileged_copy(good_file, unprivileged)
    path.parent.chmod(0o555)
    message = _assert_refused(
        path,
        f"the folder {str(path.parent)!r} is not writable",
        attempt=lambda p: unprivileged.run(lambda: _try_open(p)),
    )
    assert "app.mqlite-wal, app.mqlite-shm, app.mqlite-brokers" in message
    assert not Path(f"{path}-brokers").exists()


def test_a_read_only_folder_is_fine_when_everything_mqlite_makes_there_exists(
    good_file: Path, unprivileged: Unprivileged
) -> None:
    path = _unprivileged_copy(good_file, unprivileged)
    brokers = Path(f"{path}-brokers")
    brokers.mkdir()
    holder = sqlite3.connect(path, timeout=DB_TIMEOUT)  # keeps app.mqlite-wal and -shm in place
    try:
        holder.execute("SELECT count(*) FROM queues").fetchone()
        unprivileged.give(brokers, Path(f"{path}-wal"), Path(f"{path}-shm"))
        path.parent.chmod(0o555)
        assert unprivileged.run(lambda: _try_open(path)) == {"refused": None, "threads": []}
    finally:
        holder.close()


def test_a_read_only_brokers_folder_is_refused_for_that_folder(good_file: Path, unprivileged: Unprivileged) -> None:
    path = _unprivileged_copy(good_file, unprivileged)
    brokers = Path(f"{path}-brokers")
    brokers.mkdir()
    unprivileged.give(brokers)
    brokers.chmod(0o555)
    _assert_refused(
        path,
        f"the folder {str(brokers)!r} is not writable",
        "a lock file there for each broker",
        attempt=lambda p: unprivileged.run(lambda: _try_open(p)),
    )


def test_a_brokers_folder_that_is_a_file_is_refused_for_the_lock_file(copy: Path) -> None:
    # Not a permission: this fails for root too, and reaches the lock file's own error.
    Path(f"{copy}-brokers").write_text("not a folder")
    _assert_refused(copy, "cannot make this broker's lock file in", "-brokers")
