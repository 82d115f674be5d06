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
import threading
from collections.abc import Iterable, Sequence
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
    """One open mqlite file. Thread-safe: ``_lock`` guards the connection and ``_closed``.

    Every write is committed before the call returns (autocommit for single statements, an
    explicit transaction otherwise). With WAL and ``synchronous=NORMAL`` a commit survives the
    process being killed; with ``synchronous=FULL`` it also survives power loss.

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
        busy_timeout: float = 10.0,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise StorageError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.path = os.fspath(path)
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        except sqlite3.Error as error:
            raise StorageError(f"cannot open {self.path!r} as an mqlite file: {error}") from error
        try:
            self._check_or_create(synchronous)
        except BaseException:
            self._db.close()
            raise

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
        with self._lock:
            rows = self._db.execute("SELECT name, config FROM queues ORDER BY name").fetchall()
        return [(name, json.loads(config)) for name, config in rows]

    def open_log(self, queue: str, config: dict[str, Any]) -> SqliteLog:
        """The log of ``queue``, created with ``config`` if new, loaded into memory if it exists."""
        with self._lock:
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
        self._write("UPDATE queues SET config = ? WHERE name = ?", (json.dumps(config), queue))

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
        self._write(
            "INSERT INTO cursors (queue, name, position, settings) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (queue, name) DO UPDATE SET position = excluded.position, settings = excluded.settings",
            (queue, name, position, json.dumps(settings)),
        )

    def sync_cursor(
        self,
        queue: str,
        name: str,
        position: int,
        upserts: Sequence[tuple[int, int]],
        deletes: Sequence[int],
    ) -> None:
        """In one transaction: set the position, record ``(offset, attempts)`` pending, forget ``deletes``."""
        with self._lock:
            if self._closed:
                _log.warning("cursor %r of %r changed after its broker closed; the change is not saved", name, queue)
                return
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE cursors SET position = ? WHERE queue = ? AND name = ?", (position, queue, name))
                if upserts:
                    db.executemany(
                        'INSERT INTO pending (queue, name, "offset", attempts) VALUES (?, ?, ?, ?) '
                        'ON CONFLICT (queue, name, "offset") DO UPDATE SET attempts = excluded.attempts',
                        [(queue, name, offset, attempts) for offset, attempts in upserts],
                    )
                if deletes:
                    db.executemany(
                        'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" = ?',
                        [(queue, name, offset) for offset in deletes],
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # -- messages --------------------------------------------------------------------------

    def encode(self, message: Message) -> tuple[Any, ...]:
        """The ``messages`` row of ``message``.

        Raises:
            SerializationError: the payload, key or headers cannot be encoded.
        """
        dumps = self.serializer.dumps
        meta = message[4]
        try:
            payload = dumps(message[1])
            key = None if meta.key is None else dumps(meta.key)
            headers = dumps(dict(meta.headers)) if meta.headers else None
        except Exception as error:  # any encoder failure is the user's value, reported as such
            raise SerializationError(
                f"cannot store the message {message[0]!r} for queue {meta.queue!r}: the "
                f"{self.serializer.name} serializer failed ({type(error).__name__}: {error}); publish "
                "JSON-compatible values or open the broker with another serializer. Nothing was written."
            ) from error
        return (meta.queue, message[2], message[0], payload, key, headers, message[3])

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
        """Append one message, committed (autocommit) before returning. The durable publish path."""
        row = self.encode(message)
        with self._lock:
            if self._closed:
                self._check_open()
            self._db.execute(_INSERT, row)

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Append encoded messages in one transaction, committed before returning."""
        with self._lock:
            self._check_open()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT, rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def drop_before(self, queue: str, offset: int) -> None:
        """Delete the messages of ``queue`` below ``offset`` that no durable cursor still has pending."""
        with self._lock:
            if self._closed:
                return
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE queues SET start_offset = max(start_offset, ?) WHERE name = ?", (offset, queue))
                db.execute(
                    'DELETE FROM messages WHERE queue = ? AND "offset" < ? AND "offset" NOT IN '
                    '(SELECT "offset" FROM pending WHERE queue = ?)',
                    (queue, offset, queue),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            # Give freed pages back to the file system so a steady workload keeps a steady size.
            db.execute("PRAGMA incremental_vacuum")

    # -- plumbing --------------------------------------------------------------------------

    def _write(self, sql: str, params: Iterable[Any]) -> None:
        with self._lock:
            self._check_open()
            self._db.execute(sql, tuple(params))

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{self.path!r} is closed")

    def close(self) -> None:
        """Close the file. Idempotent; later writes are refused (cursor changes are dropped with a warning)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()


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

    def sync_cursor(self, name: str, position: int, upserts: Sequence[tuple[int, int]], deletes: Sequence[int]) -> None:
        """Record a durable cursor's position and changes to its pending set, atomically."""
        self._store.sync_cursor(self.queue, name, position, upserts, deletes)
