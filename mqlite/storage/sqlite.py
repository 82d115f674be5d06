"""The durable log: one SQLite file (WAL mode) holds every queue, message and named cursor.

Layout of the file (schema version 1):

- ``mqlite_schema(version, serializer)``: one row. A file without it is not an mqlite file.
- ``queues(name, start_offset, config)``: every queue, the offset below which its messages were
  reclaimed, and its retention settings (JSON).
- ``messages(queue, offset, event, payload, key, headers, timestamp)``: the log. Payload, key and
  headers are encoded by the broker's serializer (JSON by default).
- ``cursors(queue, name, position, settings)``: every durable (named) cursor.
- ``pending(queue, name, offset, attempts)``: each durable cursor's delivered, unsettled messages
  and how many times each was delivered.

The retained part of each log is also held in memory (a :class:`MemoryLog`), so reads never touch
the disk; the file is written through on every change and read only when the broker opens.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from mqlite.errors import SerializationError, StorageError
from mqlite.message import EMPTY_HEADERS, Message, MessageMeta, make_meta, new_message
from mqlite.storage.memory import MemoryLog

__all__ = [
    "SCHEMA_VERSION",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "SqliteLog",
    "SqliteStore",
    "StoredCursor",
]

_log = logging.getLogger("mqlite")

SCHEMA_VERSION = 1
"""The layout this version of mqlite writes; files with a higher version are refused."""

# "mqlt": marks the file as mqlite's for tools such as `file` and for a quick check on open.
APPLICATION_ID = 0x6D716C74

_SCHEMA = """
CREATE TABLE mqlite_schema (version INTEGER NOT NULL, serializer TEXT NOT NULL);
CREATE TABLE queues (name TEXT PRIMARY KEY, start_offset INTEGER NOT NULL, config TEXT NOT NULL);
CREATE TABLE messages (
    queue TEXT NOT NULL, "offset" INTEGER NOT NULL, event TEXT NOT NULL, payload BLOB,
    key BLOB, headers BLOB, timestamp REAL NOT NULL, PRIMARY KEY (queue, "offset")
) WITHOUT ROWID;
CREATE TABLE cursors (
    queue TEXT NOT NULL, name TEXT NOT NULL, position INTEGER NOT NULL, settings TEXT NOT NULL,
    PRIMARY KEY (queue, name)
) WITHOUT ROWID;
CREATE TABLE pending (
    queue TEXT NOT NULL, name TEXT NOT NULL, "offset" INTEGER NOT NULL, attempts INTEGER NOT NULL,
    PRIMARY KEY (queue, name, "offset")
) WITHOUT ROWID;
"""

Synchronous = Literal["normal", "full"]
Commit = Literal["each", "batch"]


class Serializer(Protocol):
    """Turns payloads, keys and header mappings into bytes and back.

    ``name`` is stored in the file, so a file is never read with a serializer other than the one
    that wrote it.
    """

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """The default: JSON, so opening a file never runs code. Thread-safe (stateless).

    Values come back as JSON types: tuples become lists, dict keys become str.
    """

    name = "json"
    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raises TypeError or ValueError when JSON cannot represent it."""
        return self._encode(value).encode()

    def loads(self, data: bytes) -> Any:
        """Decode what :meth:`dumps` wrote."""
        return json.loads(data)


class PickleSerializer:
    """Pickle: any picklable payload, exactly as it was. Thread-safe (stateless).

    UNSAFE for files you did not write yourself: unpickling runs code chosen by whoever wrote the
    file. Use it only for files that only your own program ever writes.
    """

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        """Pickle ``value`` with the highest protocol."""
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        """Unpickle; runs code from the file (see the class docstring)."""
        return pickle.loads(data)  # opt-in, documented as unsafe


class StoredCursor:
    """A durable cursor as read back from the file. A plain record, not shared between threads."""

    __slots__ = ("name", "pending", "position", "settings")

    def __init__(self, name: str, position: int, settings: dict[str, Any]) -> None:
        self.name = name
        self.position = position
        self.settings = settings
        self.pending: list[tuple[Message, int]] = []  # (message, attempts), by offset


class SqliteStore:
    """One open mqlite file. Thread-safe.

    ``_db_lock`` guards the connection and ``_closed``; ``_cond`` guards the batched writer's
    buffer and counters. Lock order: ``_cond`` is never held while taking ``_db_lock``.

    With ``commit="each"`` every write is committed before the call returns (autocommit for
    single statements, an explicit transaction otherwise). With ``commit="batch"`` writes are
    queued in order and a writer thread commits everything queued so far as one transaction
    (group commit); :meth:`flush` waits for it. With WAL and ``synchronous=NORMAL`` a commit
    survives the process being killed; with ``synchronous=FULL`` it also survives power loss.

    Raises:
        StorageError: the file is not an mqlite file, is corrupt, was written by a newer mqlite,
            or with another serializer. The file is left untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        serializer: Serializer | None = None,
        synchronous: Synchronous = "normal",
        commit: Commit = "each",
        busy_timeout: float = 10.0,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise StorageError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if commit not in ("each", "batch"):
            raise StorageError(f"commit must be 'each' or 'batch', got {commit!r}")
        self.path = os.fspath(path)
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self._db_lock = threading.Lock()
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        # Batched mode only: ops waiting for the writer (None when every write commits at once),
        # how many writes were submitted and how many of them are committed.
        self._buffer: list[_Op] | None = [] if commit == "batch" else None
        self._vacuum = False
        self._submitted = 0
        self._committed = 0
        self._failure: BaseException | None = None
        self._stopping = False
        self._writer: threading.Thread | None = None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        except sqlite3.Error as error:
            raise StorageError(f"cannot open {self.path!r} as an mqlite file: {error}") from error
        self._owner: Any = None
        try:
            self._check_or_create(synchronous)
            self._owner = _claim(self.path)
        except BaseException:
            self._db.close()
            raise
        if self._buffer is not None:
            self._writer = threading.Thread(target=self._write_batches, name="mqlite-writer", daemon=True)
            self._writer.start()

    def _check_or_create(self, synchronous: Synchronous) -> None:
        db = self._db
        # Read-only probes first: nothing is written until the file is known to be ours.
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise StorageError(
                f"{self.path!r} is not an mqlite file (SQLite says: {error}); it was left untouched"
            ) from error
        if tables or application_id:
            if "mqlite_schema" not in tables or application_id != APPLICATION_ID:
                raise StorageError(f"{self.path!r} is an SQLite database but not an mqlite file; it was left untouched")
            try:
                version, serializer = db.execute("SELECT version, serializer FROM mqlite_schema").fetchone()
            except (sqlite3.DatabaseError, TypeError) as error:
                raise StorageError(f"{self.path!r} has a damaged mqlite_schema table: {error}") from error
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path!r} has mqlite schema version {version}, newer than the {SCHEMA_VERSION} "
                    "this mqlite understands; upgrade mqlite to open it (the file was left untouched)"
                )
            if serializer != self.serializer.name:
                raise StorageError(
                    f"{self.path!r} was written with the {serializer!r} serializer; open it with "
                    f"serializer={serializer!r}-compatible settings, not {self.serializer.name!r}"
                )
        self._configure(synchronous)
        if not tables:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO mqlite_schema (version, serializer) VALUES (?, ?)",
                    (SCHEMA_VERSION, self.serializer.name),
                )
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _configure(self, synchronous: Synchronous) -> None:
        db = self._db
        try:
            if not self._has_tables():
                # Only a new file may choose this: it must precede the first table.
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise StorageError(f"cannot open {self.path!r}: {error}") from error
        if str(mode).lower() != "wal":
            raise StorageError(f"{self.path!r}: SQLite refused WAL mode (got {mode!r}); is it on a network share?")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")

    def _has_tables(self) -> bool:
        return bool(self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])

    # -- queues ----------------------------------------------------------------------------

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """Every stored queue with its retention settings, by name."""
        with self._db_lock:
            rows = self._db.execute("SELECT name, config FROM queues ORDER BY name").fetchall()
        return [(name, json.loads(config)) for name, config in rows]

    def open_log(self, queue: str, config: dict[str, Any]) -> SqliteLog:
        """The log of ``queue``, created with ``config`` if new, loaded into memory if it exists."""
        self.flush()
        with self._db_lock:
            self._check_open()
            db = self._db
            db.execute(
                "INSERT OR IGNORE INTO queues (name, start_offset, config) VALUES (?, 0, ?)",
                (queue, json.dumps(config)),
            )
            start = db.execute("SELECT start_offset FROM queues WHERE name = ?", (queue,)).fetchone()[0]
            rows = db.execute(
                'SELECT "offset", event, payload, key, headers, timestamp FROM messages '
                'WHERE queue = ? AND "offset" >= ? ORDER BY "offset"',
                (queue, start),
            ).fetchall()
            cursors = self._load_cursors_locked(queue)
        cache = MemoryLog(start)
        expected = start
        for row in rows:
            if row[0] != expected:
                raise StorageError(
                    f"{self.path!r} is corrupt: queue {queue!r} jumps from offset {expected - 1} to {row[0]}"
                )
            cache.append(self._decode(queue, row))
            expected += 1
        return SqliteLog(self, queue, cache, cursors)

    def save_config(self, queue: str, config: dict[str, Any]) -> None:
        """Remember a queue's retention settings."""
        self._submit([("UPDATE queues SET config = ? WHERE name = ?", (json.dumps(config), queue), False)])

    # -- cursors ---------------------------------------------------------------------------

    def _load_cursors_locked(self, queue: str) -> list[StoredCursor]:
        db = self._db
        cursors = {
            name: StoredCursor(name, position, json.loads(settings))
            for name, position, settings in db.execute(
                "SELECT name, position, settings FROM cursors WHERE queue = ? ORDER BY name", (queue,)
            )
        }
        rows = db.execute(
            'SELECT p.name, p.attempts, m."offset", m.event, m.payload, m.key, m.headers, m.timestamp '
            'FROM pending p JOIN messages m ON m.queue = p.queue AND m."offset" = p."offset" '
            'WHERE p.queue = ? ORDER BY p.name, p."offset"',
            (queue,),
        ).fetchall()
        for row in rows:
            cursor = cursors.get(row[0])
            if cursor is not None:
                cursor.pending.append((self._decode(queue, row[2:]), row[1]))
        return list(cursors.values())

    def save_cursor(self, queue: str, name: str, position: int, settings: dict[str, Any]) -> None:
        """Create or update a durable cursor's position and settings."""
        sql = (
            "INSERT INTO cursors (queue, name, position, settings) VALUES (?, ?, ?, ?) ON CONFLICT "
            "(queue, name) DO UPDATE SET position = excluded.position, settings = excluded.settings"
        )
        self._submit([(sql, (queue, name, position, json.dumps(settings)), False)])

    def sync_cursor(
        self,
        queue: str,
        name: str,
        position: int | None,
        upserts: Sequence[tuple[int, int]],
        deletes: Sequence[int],
    ) -> None:
        """In one transaction: set the position (unless None), record ``(offset, attempts)`` pending,
        forget ``deletes``."""
        ops: list[_Op] = []
        if position is not None:
            ops.append((_SET_POSITION, (position, queue, name), False))
        if upserts:
            rows = [(queue, name, offset, attempts) for offset, attempts in upserts]
            ops.append((_UPSERT_PENDING, rows, True))
        if deletes:
            ops.append((_DELETE_PENDING, [(queue, name, offset) for offset in deletes], True))
        if not ops:
            return
        if self._closed or self._stopping:
            _log.warning("cursor %r of %r changed after its broker closed; the change is not saved", name, queue)
            return
        self._submit(ops)

    def delete_cursor(self, queue: str, name: str) -> None:
        """Forget a durable cursor and its pending rows (messages only it kept go at the next reclaim)."""
        self._submit(
            [
                ("DELETE FROM pending WHERE queue = ? AND name = ?", (queue, name), False),
                ("DELETE FROM cursors WHERE queue = ? AND name = ?", (queue, name), False),
            ]
        )

    # -- messages --------------------------------------------------------------------------

    def encode(self, message: Message) -> tuple[Any, ...]:
        """The ``messages`` row of ``message``.

        Raises:
            SerializationError: the payload, key or headers cannot be encoded.
        """
        dumps = self.serializer.dumps
        try:
            payload = dumps(message[1])
            key = None if message.key is None else dumps(message.key)
            headers = dumps(dict(message.headers)) if message.headers else None
        except Exception as error:  # any encoder failure is the user's value, reported as such
            raise SerializationError(
                f"cannot store the message {message[0]!r} for queue {message.queue!r}: the "
                f"{self.serializer.name} serializer failed ({type(error).__name__}: {error}); publish "
                "JSON-compatible values or open the broker with another serializer. Nothing was written."
            ) from error
        return (message.queue, message[2], message[0], payload, key, headers, message[3])

    def _decode(self, queue: str, row: Sequence[Any]) -> Message:
        offset, event, payload, key, headers, timestamp = row
        loads = self.serializer.loads
        try:
            if key is None and headers is None:
                meta = MessageMeta(queue, None, EMPTY_HEADERS)
            else:
                meta = make_meta(
                    queue, None if key is None else loads(key), None if headers is None else loads(headers)
                )
            return new_message(event, loads(payload), offset, timestamp, meta)
        except Exception as error:  # a bad row is a corrupt file, whatever the decoder raised
            raise StorageError(f"{self.path!r}: cannot decode message {offset} of {queue!r}: {error}") from error

    def insert_one(self, message: Message) -> None:
        """Append one message. The durable publish path."""
        row = self.encode(message)
        if self._buffer is not None:
            self._submit([(_INSERT, row, False)])
            return
        with self._db_lock:
            if self._closed:
                self._check_open()
            try:
                self._db.execute(_INSERT, row)
            except sqlite3.Error as error:
                raise StorageError(f"cannot write to {self.path!r}: {error}; nothing was published") from error

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Append encoded messages in one transaction."""
        self._submit([(_INSERT, rows, True)])

    def drop_before(self, queue: str, offset: int) -> None:
        """Delete the messages of ``queue`` below ``offset`` that no durable cursor still has pending."""
        if self._closed:
            return
        ops: list[_Op] = [
            ("UPDATE queues SET start_offset = max(start_offset, ?) WHERE name = ?", (offset, queue), False),
            (_DROP_MESSAGES, (queue, offset, queue), False),
        ]
        self._submit(ops, vacuum=True)

    # -- writing ---------------------------------------------------------------------------

    def _submit(self, ops: list[_Op], *, vacuum: bool = False) -> None:
        """Run ``ops`` as one transaction now, or (batched) hand them to the writer thread."""
        if self._buffer is None:
            with self._db_lock:
                self._check_open()
                try:
                    self._execute_locked(ops)
                    if vacuum:
                        # Give freed pages back to the file system: a steady workload keeps a steady size.
                        self._db.execute("PRAGMA incremental_vacuum")
                except sqlite3.Error as error:
                    raise StorageError(f"cannot write to {self.path!r}: {error}; the change was not saved") from error
            return
        with self._cond:
            if self._stopping:
                raise StorageError(f"{self.path!r} is closed")
            if self._failure is not None:
                raise StorageError(f"{self.path!r}: the background writer failed: {self._failure}")
            self._buffer.extend(ops)
            self._vacuum = self._vacuum or vacuum
            self._submitted += 1
            self._cond.notify_all()

    def _execute_locked(self, ops: list[_Op]) -> None:
        db = self._db
        if len(ops) == 1:
            sql, params, many = ops[0]
            if not many:
                db.execute(sql, params)  # autocommit: one statement, one transaction
                return
            if len(params) == 1:
                db.execute(sql, params[0])
                return
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params, many in ops:
                if many:
                    db.executemany(sql, params)
                else:
                    db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _write_batches(self) -> None:
        """The batched writer: commit everything submitted since its last commit as one transaction."""
        while True:
            with self._cond:
                while not self._buffer and not self._stopping:
                    self._cond.wait()
                if not self._buffer:
                    return  # stopping, and nothing left to write
                ops, self._buffer = self._buffer, []
                vacuum, self._vacuum = self._vacuum, False
                upto = self._submitted
            try:
                ops = _coalesce(ops)
                with self._db_lock:
                    self._execute_locked(ops)
                    if vacuum:
                        self._db.execute("PRAGMA incremental_vacuum")
            except Exception as error:  # noqa: BLE001  # kept and raised by every later flush() and write
                _log.exception("the background writer of %r failed; nothing more will be written", self.path)
                with self._cond:
                    self._failure = error
                    self._cond.notify_all()
                return
            with self._cond:
                self._committed = upto
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written before the call is committed; False if ``timeout`` passed first.

        Raises:
            StorageError: the background writer failed.
        """
        if self._buffer is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            while self._committed < target:
                if self._failure is not None:
                    raise StorageError(f"{self.path!r}: the background writer failed: {self._failure}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # -- plumbing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{self.path!r} is closed")

    def close(self) -> None:
        """Commit what is still buffered, then close the file. Idempotent; later writes are refused."""
        writer = self._writer
        if writer is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            writer.join()
        with self._db_lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            if self._owner is not None:
                self._owner.close()  # releases the claim


_Op = tuple[str, Any, bool]  # (sql, parameters, executemany?)
_UPSERT_PENDING = (
    'INSERT INTO pending (queue, name, "offset", attempts) VALUES (?, ?, ?, ?) '
    'ON CONFLICT (queue, name, "offset") DO UPDATE SET attempts = excluded.attempts'
)
_DELETE_PENDING = 'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" = ?'
_SET_POSITION = "UPDATE cursors SET position = ? WHERE queue = ? AND name = ?"
_DROP_MESSAGES = (
    'DELETE FROM messages WHERE queue = ? AND "offset" < ? AND "offset" NOT IN '
    '(SELECT "offset" FROM pending WHERE queue = ?)'
)
_INSERT = 'INSERT INTO messages (queue, "offset", event, payload, key, headers, timestamp) VALUES (?, ?, ?, ?, ?, ?, ?)'


class SqliteLog:
    """One queue's log in an mqlite file, with its retained messages cached in memory.

    Not thread-safe: used only under its queue's lock (the store has its own lock for the file).
    Every append is encoded first and committed before it reaches the cache, so a message that
    cannot be stored never gets an offset.
    """

    __slots__ = ("_cache", "_cache_append", "_insert_one", "_store", "append", "cursors", "queue")

    def __init__(self, store: SqliteStore, queue: str, cache: MemoryLog, cursors: list[StoredCursor]) -> None:
        self._store = store
        self.queue = queue
        self._cache = cache
        self.cursors = cursors
        self.append = self._append
        self._insert_one = store.insert_one
        self._cache_append = cache.append

    def _append(self, message: Message) -> None:
        self._insert_one(message)
        self._cache_append(message)

    @property
    def first_offset(self) -> int:
        """The oldest offset still stored."""
        return self._cache.first_offset

    def extend(self, messages: Sequence[Message]) -> None:
        """Append several messages in one transaction: all are stored or none."""
        encode = self._store.encode
        self._store.insert([encode(message) for message in messages])
        self._cache.extend(messages)

    def read(self, from_offset: int, to_offset: int) -> list[Message]:
        """Messages in ``[from_offset, to_offset)``, from memory."""
        return self._cache.read(from_offset, to_offset)

    def get(self, offset: int) -> Message:
        """The message at ``offset``, from memory."""
        return self._cache.get(offset)

    def get_many(self, offsets: Sequence[int]) -> list[Message]:
        """The messages at ``offsets``, from memory."""
        return self._cache.get_many(offsets)

    def drop_before(self, offset: int) -> None:
        """Forget every message below ``offset``, in memory and (unless still pending) on disk."""
        self._cache.drop_before(offset)
        self._store.drop_before(self.queue, offset)

    def __len__(self) -> int:
        return len(self._cache)

    # -- what the queue persists besides messages ----------------------------------------

    def save_config(self, config: dict[str, Any]) -> None:
        """Remember the queue's retention settings."""
        self._store.save_config(self.queue, config)

    def save_cursor(self, name: str, position: int, settings: dict[str, Any]) -> None:
        """Create or update a durable cursor."""
        self._store.save_cursor(self.queue, name, position, settings)

    def delete_cursor(self, name: str) -> None:
        """Forget a durable cursor for good (``Broker.delete_subscription``)."""
        self._store.delete_cursor(self.queue, name)

    def sync_cursor(
        self, name: str, position: int | None, upserts: Sequence[tuple[int, int]], deletes: Sequence[int]
    ) -> None:
        """Record a durable cursor's position and changes to its pending set, atomically."""
        self._store.sync_cursor(self.queue, name, position, upserts, deletes)


def _claim(path: str) -> Any:
    """Claim ``path`` for this broker, so a second broker on the same file fails clearly.

    Several brokers on one file (in this process or others) are not supported yet: each keeps
    its own view of the log in memory. The claim is an ``flock`` on the database file, which
    SQLite's own (POSIX) locks never touch; it lasts until the returned file is closed or the
    process dies. Where ``flock`` does not exist (Windows), nothing is claimed.
    """
    if sys.platform == "win32":
        return None
    import fcntl

    handle = open(path, "rb")  # noqa: SIM115  # held open for the broker's lifetime, closed by close()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StorageError(
            f"{path!r} is already open in another mqlite Broker (this process or another one); "
            "close that broker first: several brokers on one file are not supported yet"
        ) from None
    return handle


def _coalesce(ops: list[_Op]) -> list[_Op]:
    """The same final state in fewer statements: the batched writer's net cursor changes.

    Within each run of consecutive cursor changes (positions, pending rows), only the last
    position of each cursor and the last change of each pending row matter: a message taken and
    acked in one batch costs one DELETE instead of an INSERT and a DELETE. Consecutive message
    inserts become one ``executemany``. Other operations (settings, retention) keep their
    place, so runs never move across them.
    """
    out: list[_Op] = []
    positions: dict[tuple[str, str], int] = {}
    pending: dict[tuple[str, str, int], int | None] = {}  # attempts, or None to delete

    def end_run() -> None:
        if positions:
            out.append((_SET_POSITION, [(p, q, n) for (q, n), p in positions.items()], True))
            positions.clear()
        if pending:
            upserts = [(q, n, o, a) for (q, n, o), a in pending.items() if a is not None]
            deletes = [(q, n, o) for (q, n, o), a in pending.items() if a is None]
            if upserts:
                out.append((_UPSERT_PENDING, upserts, True))
            if deletes:
                out.append((_DELETE_PENDING, deletes, True))
            pending.clear()

    for op in ops:
        sql, params, _ = op
        if sql is _SET_POSITION:
            positions[(params[1], params[2])] = params[0]
        elif sql is _UPSERT_PENDING:
            for queue, name, offset, attempts in params:
                pending[(queue, name, offset)] = attempts
        elif sql is _DELETE_PENDING:
            for queue, name, offset in params:
                pending[(queue, name, offset)] = None
        elif sql is _INSERT:
            end_run()
            rows = params if op[2] else [params]
            if out and out[-1][0] is _INSERT:
                out[-1][1].extend(rows)
            else:
                out.append((_INSERT, list(rows), True))
        else:
            end_run()
            out.append(op)
    end_run()
    return out
