"""The durable log: one SQLite file (WAL mode) holds every queue, message and named cursor.

Layout of the file (schema version 3):

- ``mqlite_schema(version, serializer)``: one row. A file without it is not an mqlite file.
- ``queues(name, start_offset, config)``: every queue, the offset below which its messages were
  reclaimed, and its retention settings (JSON).
- ``messages(queue, offset, event, payload, key, headers, timestamp)``: the log. Payload, key and
  headers are encoded by the broker's serializer (JSON by default).
- ``cursors(queue, name, position, settings)``: every durable (named) cursor.
- ``pending(queue, name, offset, attempts, owner, due)``: each durable cursor's delivered,
  unsettled messages, how many times each was delivered, which broker holds it (NULL: due for
  redelivery to whoever reads next), and for a nacked message waiting out its delay, the wall-clock
  time (seconds since the epoch) before which it is not redelivered. Version 1 files lack
  ``owner`` and ``due``, version 2 files ``due``; both are upgraded on open.

The retained part of each log is also held in memory (a :class:`MemoryLog`), so reads never touch
the disk. Several brokers, in one process or many, can share a file (``commit="each"``): every
operation on a queue runs as one SQLite write transaction, and when SQLite's ``data_version``
shows that another connection committed since, the queue first reloads what changed
(:meth:`SqliteStore.begin`). A watcher thread polls ``data_version`` so that waiting readers wake
when another process publishes, and hands back the pending messages of brokers that died.

Each broker holds an ``flock`` on its own file ``<path>-brokers/<id>.lock`` while it lives; a
lock file nobody holds belongs to a dead broker, whose pending messages are then redelivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any, Literal, Protocol

from mqlite.errors import SerializationError, StorageError
from mqlite.message import EMPTY_HEADERS, Message, MessageMeta, make_meta, new_message
from mqlite.storage.memory import MemoryLog

__all__ = [
    "SCHEMA_VERSION",
    "FileLock",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "SqliteLog",
    "SqliteStore",
]

_log = logging.getLogger("mqlite")

SCHEMA_VERSION = 3
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
    owner TEXT, due REAL, PRIMARY KEY (queue, name, "offset")
) WITHOUT ROWID;
"""

# commit="batch": how many writes may wait for the writer before callers wait for it.
MAX_BACKLOG = 10_000
# How often the watcher looks at data_version: soon after a change, then less and less often.
WATCH_MIN = 0.001
WATCH_MAX = 0.025
# How often the watcher looks for dead brokers holding pending messages, and how long a broker
# seen alive is believed alive.
LIVENESS_EVERY = 0.5
# commit="each": the watcher checkpoints the WAL into the file this often, on its own connection,
# so that publishers, whose every commit would otherwise copy pages back and fsync once the WAL
# reaches SQLite's default 1,000 pages, never wait for it. A publisher checkpoints only when the
# WAL passes WAL_AUTOCHECKPOINT pages (16 MiB of 4 KiB pages), that is, if the watcher falls behind.
CHECKPOINT_EVERY = 0.025
WAL_AUTOCHECKPOINT = 4096

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


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_json_encoder() -> Callable[[Any, int], Any] | None:
    """The C encoder that ``json.JSONEncoder.encode`` builds anew on every call, built once (it
    saves about 2 µs per payload): the same settings and output, except that a circular value
    fails with RecursionError rather than ValueError. Stateless, so threads can share it. None
    where the C accelerator is missing."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    encoder: Callable[[Any, int], Any] = make(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    return encoder


_c_encode = _c_json_encoder()


class JsonSerializer:
    """The default: JSON, so opening a file never runs code. Thread-safe (stateless).

    Values come back as JSON types: tuples become lists, dict keys become str.
    """

    name = "json"
    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raises TypeError or ValueError when JSON cannot represent it."""
        if _c_encode is None:
            return self._encode(value).encode()
        return "".join(_c_encode(value, 0)).encode()

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


class SqliteStore:
    """One open mqlite file. Thread-safe.

    ``_db_lock`` (reentrant) guards the connection, ``_closed``, the data-version bookkeeping and
    the liveness cache; ``_cond`` guards the batched writer's buffer and counters, and
    ``_watched`` the watcher's list. Lock order: a queue's lock, then ``_db_lock``, then
    ``_cond``; ``_cond`` is never held while taking ``_db_lock``.

    With ``commit="each"`` every write is committed before the call returns, and the file can be
    shared with other brokers (:attr:`shared`): each queue operation is one transaction between
    :meth:`begin` and :meth:`commit`. With ``commit="batch"`` writes are queued in order and a
    writer thread commits everything queued so far as one transaction (group commit); :meth:`flush`
    waits for it. A batched broker assigns offsets before it commits, so it needs the file to
    itself. With WAL and ``synchronous=NORMAL`` a commit survives the process being killed; with
    ``synchronous=FULL`` it also survives power loss.

    Raises:
        StorageError: the file is not an mqlite file, is corrupt, was written by a newer mqlite,
            or with another serializer, or a batched broker has it (or wants it) to itself. The
            file is left untouched.
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
        self.shared = commit == "each"
        # This broker's name in the pending table's owner column.
        self.instance = f"{os.getpid()}-{secrets.token_hex(6)}{'' if self.shared else '-batch'}"
        # While no other broker has the file open (its claim is exclusive), every write simply
        # autocommits: there is nobody to reload from. The watcher ends this when one shows up.
        self._solo = False
        self._busy_timeout = busy_timeout
        self._db_lock = threading.RLock()
        self._closed = False
        # data_version as last seen, and how many times it was seen to change: a queue that
        # synced at an older generation reloads before its next operation.
        self._data_version = -1
        self.generation = 0
        self._alive_until: dict[str, float] = {}
        self._cond = threading.Condition(threading.Lock())
        # Batched mode only: ops waiting for the writer (None when every write commits at once),
        # the rows of the insert op that ends the buffer (None if another op ends it, or once
        # the writer failed or the store is closing, so that the next row is checked), how many
        # rows and ops wait, how many writes were submitted and how many of them are committed.
        self._buffer: list[_Op] | None = None if self.shared else []
        self._rows: list[tuple[Any, ...]] | None = None
        self._backlog = 0
        self._vacuum = False
        self._submitted = 0
        self._committed = 0
        self._failure: BaseException | None = None
        self._stopping = False
        self._writer: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self._watched_lock = threading.Lock()
        self._watched: list[Callable[[], None]] = []
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        except sqlite3.Error as error:
            raise StorageError(f"cannot open {self.path!r} as an mqlite file: {error}") from error
        self._claim: Any = None
        self._liveness: Any = None
        try:
            self._check_or_create(synchronous)
            self._liveness = _Liveness(self.path, self.instance)
            self._claim, self._solo = _claim(self.path, self._liveness, exclusive=not self.shared, wait=busy_timeout)
        except BaseException:
            if self._liveness is not None:
                self._liveness.close()
            self._db.close()
            raise
        if self._buffer is not None:
            self._writer = threading.Thread(target=self._write_batches, name="mqlite-writer", daemon=True)
            self._writer.start()
        else:
            self._watcher = threading.Thread(target=self._watch, name="mqlite-watcher", daemon=True)
            self._watcher.start()

    def _check_or_create(self, synchronous: Synchronous) -> None:
        db = self._db
        version = SCHEMA_VERSION
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
        if tables and version < SCHEMA_VERSION:
            self._upgrade(version)
        if not tables:
            with _transaction(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO mqlite_schema (version, serializer) VALUES (?, ?)",
                    (SCHEMA_VERSION, self.serializer.name),
                )
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _upgrade(self, version: int) -> None:
        """Bring an older file up to :data:`SCHEMA_VERSION`, in one transaction."""
        db = self._db
        with _transaction(db):
            if version < 2:
                db.execute("ALTER TABLE pending ADD COLUMN owner TEXT")
            if version < 3:
                db.execute("ALTER TABLE pending ADD COLUMN due REAL")
            db.execute("UPDATE mqlite_schema SET version = ?", (SCHEMA_VERSION,))

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
        if self.shared:
            db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")

    def _has_tables(self) -> bool:
        return bool(self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])

    # -- queues ----------------------------------------------------------------------------

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """Every stored queue with its retention settings, by name."""
        with self._db_lock:
            rows = self._db.execute("SELECT name, config FROM queues ORDER BY name").fetchall()
        return [(name, json.loads(config)) for name, config in rows]

    def open_log(self, queue: str, config: dict[str, Any]) -> SqliteLog:
        """The log of ``queue``, created with ``config`` if new. Its queue loads it with :meth:`changes`."""
        self.flush()
        with self._db_lock:
            self._check_open()
            self._execute_locked(
                [
                    (
                        "INSERT OR IGNORE INTO queues (name, start_offset, config) VALUES (?, 0, ?)",
                        (queue, json.dumps(config)),
                        False,
                    )
                ]
            )
            start = self._db.execute("SELECT start_offset FROM queues WHERE name = ?", (queue,)).fetchone()[0]
        return SqliteLog(self, queue, MemoryLog(start))

    def changes(self, queue: str, end: int) -> QueueState:
        """What the file holds for ``queue``: its settings, messages from ``end`` on, cursors, pending rows.

        Called with the queue's lock held, inside :meth:`begin` for a shared file, so what it
        reads is one consistent state.
        """
        with self._db_lock:
            db = self._db
            start, config = db.execute("SELECT start_offset, config FROM queues WHERE name = ?", (queue,)).fetchone()
            first = max(start, end)
            rows = db.execute(
                'SELECT "offset", event, payload, key, headers, timestamp FROM messages '
                'WHERE queue = ? AND "offset" >= ? ORDER BY "offset"',
                (queue, first),
            ).fetchall()
            cursors = [
                (name, position, json.loads(settings))
                for name, position, settings in db.execute(
                    "SELECT name, position, settings FROM cursors WHERE queue = ? ORDER BY name", (queue,)
                )
            ]
            pending = db.execute(
                'SELECT name, "offset", attempts, owner, due FROM pending WHERE queue = ? ORDER BY name, "offset"',
                (queue,),
            ).fetchall()
        messages = []
        for expected, row in enumerate(rows, first):
            if row[0] != expected:
                raise StorageError(
                    f"{self.path!r} is corrupt: queue {queue!r} jumps from offset {expected - 1} to {row[0]}"
                )
            messages.append(self._decode(queue, row))
        return QueueState(start, json.loads(config), messages, cursors, pending)

    def load_messages(self, queue: str, offsets: Sequence[int]) -> list[Message]:
        """The stored messages of ``queue`` at ``offsets`` (pending ones the memory log already dropped)."""
        with self._db_lock:
            rows = [
                self._db.execute(
                    'SELECT "offset", event, payload, key, headers, timestamp FROM messages '
                    'WHERE queue = ? AND "offset" = ?',
                    (queue, offset),
                ).fetchone()
                for offset in offsets
            ]
        return [self._decode(queue, row) for row in rows if row is not None]

    def save_config(self, queue: str, config: dict[str, Any]) -> None:
        """Remember a queue's retention settings."""
        self._submit([("UPDATE queues SET config = ? WHERE name = ?", (json.dumps(config), queue), False)])

    # -- cursors ---------------------------------------------------------------------------

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
        upserts: Sequence[tuple[int, int, bool, float | None]],
        deletes: Sequence[int],
    ) -> None:
        """In one transaction: set the position (unless None), record ``(offset, attempts, held, due)``
        pending (held: by this broker; otherwise due for whoever reads next; due: the wall-clock
        time a nacked message waits for, or None), forget ``deletes``."""
        ops: list[_Op] = []
        if position is not None:
            ops.append((_SET_POSITION, (position, queue, name), False))
        if upserts:
            me = self.instance
            rows = [
                (queue, name, offset, attempts, me if held else None, due) for offset, attempts, held, due in upserts
            ]
            ops.append((_UPSERT_PENDING, rows, True))
        if deletes:
            ops.append((_DELETE_PENDING, [(queue, name, offset) for offset in deletes], True))
        if not ops:
            return
        if self._closed or self._stopping:
            _log.warning("cursor %r of %r changed after its broker closed; the change is not saved", name, queue)
            return
        self._submit(ops)

    # -- sharing the file ------------------------------------------------------------------

    def begin(self) -> int | None:
        """Start a write transaction and return the generation; None (no transaction) once closed.

        Holds the store's lock until :meth:`commit`. The generation grows when another connection
        committed since it was last looked at: whoever synced at an older one must reload.

        Raises:
            StorageError: another connection held the file's write lock past the busy timeout.
        """
        self._db_lock.acquire()
        if self._closed:
            self._db_lock.release()
            return None
        if self._solo:
            return self.generation  # alone on the file: writes autocommit, nothing to reload
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            self._note_version_locked()
        except BaseException as error:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            finally:
                self._db_lock.release()
            if isinstance(error, sqlite3.Error):
                raise StorageError(
                    f"{self.path!r} stayed locked by another connection for over {self._busy_timeout:g} s "
                    f"(SQLite says: {error}); nothing was changed"
                ) from error
            raise
        return self.generation

    def commit(self) -> None:
        """End the transaction :meth:`begin` started, and release the store's lock.

        Raises:
            StorageError: the commit failed; the transaction was rolled back.
        """
        db = self._db
        try:
            if db.in_transaction:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as error:
                    db.execute("ROLLBACK")
                    self.generation += 1  # memory may now be ahead of the file: reload everything
                    raise StorageError(f"cannot commit to {self.path!r}: {error}") from error
        finally:
            self._db_lock.release()

    def _note_version_locked(self) -> bool:
        """Whether another connection committed since the last look; if so the generation grows."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        self._data_version = version
        self.generation += 1
        return True

    def watch(self, poke: Callable[[], None]) -> None:
        """Call ``poke`` (from the watcher thread) whenever another connection changed the file."""
        with self._watched_lock:
            self._watched.append(poke)

    def _watch(self) -> None:
        """The watcher: poll data_version, poke every queue when it moved, reclaim dead brokers' messages."""
        delay = WATCH_MIN
        check_liveness_at = 0.0
        checkpointer = _Checkpointer(self.path)
        try:
            while not self._stop_watching.wait(delay):
                checkpointer.maybe_run()
                try:
                    with self._db_lock:
                        if self._closed:
                            break
                        if self._solo:
                            if self._liveness is not None and self._liveness.others_alive():
                                self._share_locked()
                            delay = WATCH_MAX
                            continue
                        changed = self._note_version_locked()
                        if time.monotonic() >= check_liveness_at:
                            check_liveness_at = time.monotonic() + LIVENESS_EVERY
                            if self._release_dead_locked():
                                self.generation += 1
                                changed = True
                except sqlite3.Error:
                    _log.warning("the watcher of %r could not read the file; retrying", self.path, exc_info=True)
                    changed = False
                if changed:
                    delay = WATCH_MIN
                    with self._watched_lock:
                        pokes = list(self._watched)
                    for poke in pokes:
                        try:
                            poke()
                        except Exception:  # noqa: BLE001  # a queue that fails to reload must not stop the watcher
                            _log.exception("reloading a queue of %r failed", self.path)
                else:
                    delay = min(delay * 2, WATCH_MAX)
        finally:
            checkpointer.close()

    def _share_locked(self) -> None:
        """Another broker waits to open the file: from now on every operation is a transaction.

        Holding the store's lock means no operation is between :meth:`begin` and :meth:`commit`,
        so the switch falls between two operations. Then the claim becomes shared, which lets the
        other broker in.
        """
        import fcntl  # only reached where flock exists: a solo claim needs it

        self._solo = False
        fcntl.flock(self._claim.fileno(), fcntl.LOCK_SH)
        _log.debug("%r: another broker opened the file; sharing it", self.path)

    def _release_dead_locked(self) -> bool:
        """Hand back, for redelivery, the pending messages of brokers that died; whether there were any."""
        owners = [row[0] for row in self._db.execute("SELECT DISTINCT owner FROM pending WHERE owner IS NOT NULL")]
        dead = [owner for owner in owners if not self.alive(owner)]
        for owner in dead:
            self._db.execute("UPDATE pending SET owner = NULL WHERE owner = ?", (owner,))
        return bool(dead)

    def alive(self, owner: str) -> bool:
        """Whether the broker named ``owner`` still runs (brokers seen alive are believed for a while)."""
        if owner == self.instance:
            return True
        now = time.monotonic()
        with self._db_lock:
            if self._alive_until.get(owner, 0.0) > now:
                return True
            alive = self._liveness is None or self._liveness.alive(owner)
            if alive:
                self._alive_until[owner] = now + LIVENESS_EVERY
            else:
                self._alive_until.pop(owner, None)
            return alive

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
            self._submit_row(row)
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
            buffer = self._room_locked()
            idle = not buffer  # the writer waits only while the buffer is empty
            buffer.extend(ops)
            self._rows = None
            self._backlog += len(ops)
            self._vacuum = self._vacuum or vacuum
            self._submitted += 1
            if idle:
                self._cond.notify_all()

    def _submit_row(self, row: tuple[Any, ...]) -> None:
        """Batched mode: hand one message row to the writer.

        Consecutive rows share one insert op, so a publish allocates no op of its own and the
        writer has one op to run per run of publishes, not one per message.
        """
        with self._cond:
            rows = self._rows
            if rows is None or self._backlog >= MAX_BACKLOG:
                buffer = self._room_locked()
                idle = not buffer
                rows = self._rows = []
                buffer.append((_INSERT, rows, True))
                if idle:
                    self._cond.notify_all()
            rows.append(row)
            self._backlog += 1
            self._submitted += 1

    def _room_locked(self) -> list[_Op]:
        """The writer's buffer, once it has room (waiting for the writer if need be); under ``_cond``.

        Backpressure: a writer more than MAX_BACKLOG rows and ops behind makes callers wait for it.
        """
        buffer = self._buffer
        assert buffer is not None  # batched mode only
        while self._backlog >= MAX_BACKLOG and not self._stopping and self._failure is None:
            self._cond.wait()
            buffer = self._buffer
            assert buffer is not None
        if self._stopping:
            raise StorageError(f"{self.path!r} is closed")
        if self._failure is not None:
            raise StorageError(f"{self.path!r}: the background writer failed: {self._failure}")
        return buffer

    def _execute_locked(self, ops: list[_Op]) -> None:
        db = self._db
        if len(ops) == 1 and not db.in_transaction:
            sql, params, many = ops[0]
            if not many:
                db.execute(sql, params)  # autocommit: one statement, one transaction
                return
            if len(params) == 1:
                db.execute(sql, params[0])
                return
        # Inside begin() ... commit() the statements join that transaction; otherwise one of their own.
        with contextlib.nullcontext() if db.in_transaction else _transaction(db):
            for sql, params, many in ops:
                if not many:
                    db.execute(sql, params)
                elif sql is _INSERT:
                    _INSERT_ROWS.run(db, params)
                elif sql is _UPSERT_PENDING:
                    _UPSERT_ROWS.run(db, params)
                elif sql is _DELETE_PENDING:
                    _delete_pending(db, params)
                else:
                    db.executemany(sql, params)

    def _write_batches(self) -> None:
        """The batched writer: commit everything submitted since its last commit as one transaction."""
        while True:
            with self._cond:
                while not self._buffer and not self._stopping:
                    self._cond.wait()
                if not self._buffer:
                    return  # stopping, and nothing left to write
                ops, self._buffer = self._buffer, []
                self._rows = None
                self._backlog = 0
                vacuum, self._vacuum = self._vacuum, False
                upto = self._submitted
                self._cond.notify_all()  # callers held back by MAX_BACKLOG may go on
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
                    self._rows = None  # later rows must go through _room_locked, which raises
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
        """Commit what is still buffered, hand back what this broker held, close the file.

        Idempotent; later writes are refused.
        """
        writer = self._writer
        if writer is not None:
            with self._cond:
                self._stopping = True
                self._rows = None
                self._cond.notify_all()
            writer.join()
        self._stop_watching.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        with self._db_lock:
            if self._closed:
                return
            self._closed = True
            try:
                # Unsettled messages this broker held are due again, for whoever reads next.
                self._db.execute("UPDATE pending SET owner = NULL WHERE owner = ?", (self.instance,))
            except sqlite3.Error:
                _log.warning(
                    "could not hand back the pending messages of %r; they wait for this broker's death to be noticed",
                    self.path,
                    exc_info=True,
                )
            self._db.close()
            if self._liveness is not None:
                self._liveness.close()
            if self._claim is not None:
                self._claim.close()  # releases the claim


class _Checkpointer:
    """The watcher's own connection, which copies the WAL back into the file every CHECKPOINT_EVERY s.

    A passive checkpoint waits for nobody and blocks no writer; it runs with the GIL released, so
    publishers keep going on the other core while it copies pages and syncs the file.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._next = 0.0

    def maybe_run(self) -> tuple[int, int] | None:
        """Checkpoint if CHECKPOINT_EVERY has passed since the last time.

        Returns the WAL's frames and how many of them are now in the file, or None if it did not
        run (not due yet, or another connection was checkpointing: SQLite then reports -1, -1).
        """
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + CHECKPOINT_EVERY
        try:
            if self._db is None:
                self._db = sqlite3.connect(self._path, isolation_level=None, timeout=0)
            _, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            # Not fatal: a publisher checkpoints once the WAL reaches WAL_AUTOCHECKPOINT pages.
            _log.debug("checkpointing %r failed; retrying", self._path, exc_info=True)
            return None
        return None if frames < 0 else (frames, copied)

    def close(self) -> None:
        """Close the connection (the watcher's last act)."""
        if self._db is not None:
            self._db.close()
            self._db = None


class QueueState:
    """One queue as stored: what :meth:`SqliteStore.changes` read. A plain record."""

    __slots__ = ("config", "cursors", "messages", "pending", "start")

    def __init__(
        self,
        start: int,
        config: dict[str, Any],
        messages: list[Message],
        cursors: list[tuple[str, int, dict[str, Any]]],
        pending: list[tuple[str, int, int, str | None, float | None]],
    ) -> None:
        self.start = start
        self.config = config
        self.messages = messages  # from the requested offset on, in order
        self.cursors = cursors  # (name, position, settings)
        self.pending = pending  # (cursor name, offset, attempts, owner or None, due or None), by name and offset


class FileLock:
    """A queue's lock on a shared file: holding it also holds one SQLite write transaction.

    ``acquire`` takes the queue's own lock, begins the transaction and lets the queue reload what
    other connections changed; ``release`` lets the queue write what it still owes, commits and
    releases. Everything a queue does under its lock is therefore one atomic step across every
    process sharing the file. Once the store is closed it is a plain lock.
    """

    __slots__ = ("_began", "_on_commit", "_refresh", "_store", "plain", "synced")

    def __init__(self, store: SqliteStore, refresh: Callable[[], None], on_commit: Callable[[], None]) -> None:
        self.plain = threading.Lock()
        self._store = store
        self._refresh = refresh  # reload the queue from the file
        self._on_commit = on_commit  # write what the queue still owes the file
        # Guarded by plain: whether a transaction is open, and the store generation the queue
        # last reloaded at (-1: never, so the first acquire loads it).
        self._began = False
        self.synced = -1

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock and begin the transaction (``blocking`` and ``timeout`` as for a Lock)."""
        if not self.plain.acquire(blocking, timeout):
            return False
        try:
            generation = self._store.begin()
            if generation is None:
                return True  # the store is closed: a plain lock from now on
            self._began = True
            if generation != self.synced:
                try:
                    self._refresh()
                except BaseException:
                    self._began = False
                    self._store.commit()
                    raise
                self.synced = generation
        except BaseException:
            self.plain.release()
            raise
        return True

    def release(self) -> None:
        """Commit the transaction and release the lock."""
        try:
            if self._began:
                self._began = False
                try:
                    self._on_commit()
                finally:
                    self._store.commit()
        finally:
            self.plain.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


_Op = tuple[str, Any, bool]  # (sql, parameters, executemany?)
_UPSERT_PENDING = (
    'INSERT INTO pending (queue, name, "offset", attempts, owner, due) VALUES (?, ?, ?, ?, ?, ?) '
    'ON CONFLICT (queue, name, "offset") DO UPDATE SET '
    "attempts = excluded.attempts, owner = excluded.owner, due = excluded.due"
)
_DELETE_PENDING = 'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" = ?'
_SET_POSITION = "UPDATE cursors SET position = ? WHERE queue = ? AND name = ?"
_DROP_MESSAGES = (
    'DELETE FROM messages WHERE queue = ? AND "offset" < ? AND "offset" NOT IN '
    '(SELECT "offset" FROM pending WHERE queue = ?)'
)
_INSERT = 'INSERT INTO messages (queue, "offset", event, payload, key, headers, timestamp) VALUES (?, ?, ?, ?, ?, ?, ?)'
# Many rows go to SQLite as few statements, each with one VALUES list (or IN list) for a chunk of
# rows: that binds them in C and runs them in one step with the GIL released once, where
# executemany releases and retakes it for every row (and, with another thread running, waits
# for it each time). About half the time per row of executemany. The rest go by executemany.
CHUNKS = (256, 64, 16)


class _Chunked:
    """One statement over many rows, run as multi-row statements of ``CHUNKS`` rows and the rest one by one.

    ``many(n)`` is the statement for ``n`` rows: its parameters are ``prefix`` (the same for
    every row) followed by each row's own, in order; ``one`` takes ``prefix + row`` for one row.
    """

    __slots__ = ("_many", "_one", "_width")

    def __init__(self, one: str, many: Callable[[int], str], width: int) -> None:
        self._one = one
        self._width = width  # parameters per row, besides the prefix
        self._many = {size: many(size) for size in CHUNKS}

    def run(self, db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], prefix: tuple[Any, ...] = ()) -> None:
        """Run over ``rows``, within the connection's limit of parameters per statement
        (999 in SQLite before 3.32, 32766 since)."""
        max_variables = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        done = 0
        flat = chain.from_iterable
        for size in CHUNKS:
            if size * self._width + len(prefix) > max_variables:
                continue
            sql = self._many[size]
            while len(rows) - done >= size:
                db.execute(sql, [*prefix, *flat(rows[done : done + size])])
                done += size
        if done < len(rows):
            rest = rows[done:]
            db.executemany(self._one, [prefix + row for row in rest] if prefix else rest)


def _values(row: str, size: int) -> str:
    return ", ".join([row] * size)


_MESSAGE_ROW = "(?, ?, ?, ?, ?, ?, ?)"
_PENDING_ROW = "(?, ?, ?, ?, ?, ?)"
_INSERT_ROWS = _Chunked(_INSERT, lambda n: _INSERT.replace(_MESSAGE_ROW, _values(_MESSAGE_ROW, n)), 7)
_UPSERT_ROWS = _Chunked(_UPSERT_PENDING, lambda n: _UPSERT_PENDING.replace(_PENDING_ROW, _values(_PENDING_ROW, n)), 6)
_DELETE_ROWS = _Chunked(
    _DELETE_PENDING,
    lambda n: f'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" IN ({_values("?", n)})',
    1,
)


def _delete_pending(db: sqlite3.Connection, rows: Sequence[tuple[str, str, int]]) -> None:
    """Delete ``(queue, name, offset)`` pending rows, one IN list per cursor and chunk (the key's index serves it)."""
    by_cursor: dict[tuple[str, str], list[tuple[int]]] = {}
    for queue, name, offset in rows:
        by_cursor.setdefault((queue, name), []).append((offset,))
    for cursor, offsets in by_cursor.items():
        _DELETE_ROWS.run(db, offsets, cursor)


class SqliteLog:
    """One queue's log in an mqlite file, with its retained messages cached in memory.

    Not thread-safe: used only under its queue's lock (the store has its own lock for the file).
    Every append is encoded first and committed before it reaches the cache, so a message that
    cannot be stored never gets an offset.
    """

    __slots__ = ("_cache", "_cache_append", "_insert_one", "append", "queue", "store")

    def __init__(self, store: SqliteStore, queue: str, cache: MemoryLog) -> None:
        self.store = store
        self.queue = queue
        self._cache = cache
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
        encode = self.store.encode
        self.store.insert([encode(message) for message in messages])
        self._cache.extend(messages)

    def load(self, start: int, messages: Sequence[Message]) -> None:
        """Add messages another broker stored (they are in the file already) to the memory log.

        ``start`` is the file's oldest offset: when it is past the end of the memory log, what
        the memory log holds is forgotten and it continues from there.
        """
        cache = self._cache
        if start > cache.first_offset + len(cache):
            cache.drop_before(start)
        cache.extend(messages)

    def read(self, from_offset: int, to_offset: int) -> list[Message]:
        """Messages in ``[from_offset, to_offset)``, from memory."""
        return self._cache.read(from_offset, to_offset)

    def get(self, offset: int) -> Message:
        """The message at ``offset``, from memory."""
        return self._cache.get(offset)

    def drop_before(self, offset: int) -> None:
        """Forget every message below ``offset``, in memory and (unless still pending) on disk."""
        self._cache.drop_before(offset)
        self.store.drop_before(self.queue, offset)

    def __len__(self) -> int:
        return len(self._cache)

    # -- what the queue persists besides messages ----------------------------------------

    def save_config(self, config: dict[str, Any]) -> None:
        """Remember the queue's retention settings."""
        self.store.save_config(self.queue, config)

    def save_cursor(self, name: str, position: int, settings: dict[str, Any]) -> None:
        """Create or update a durable cursor."""
        self.store.save_cursor(self.queue, name, position, settings)

    def delete_cursor(self, name: str) -> None:
        """Forget a durable cursor for good (``Broker.delete_subscription``)."""
        self.store.delete_cursor(self.queue, name)

    def sync_cursor(
        self,
        name: str,
        position: int | None,
        upserts: Sequence[tuple[int, int, bool, float | None]],
        deletes: Sequence[int],
    ) -> None:
        """Record a durable cursor's position and changes to its pending set, atomically."""
        self.store.sync_cursor(self.queue, name, position, upserts, deletes)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _claim(path: str, liveness: _Liveness, *, exclusive: bool, wait: float) -> tuple[Any, bool]:
    """Claim ``path``; returns the claim (held until closed) and whether this broker is alone.

    The claim is an ``flock`` on the database file, which SQLite's own (POSIX) locks never touch;
    it lasts until the returned file is closed or the process dies. A batched broker (``exclusive``)
    must have the file to itself. Any other broker first tries to be alone (an exclusive claim);
    if another broker has the file, it waits up to ``wait`` seconds for a shared claim, which a
    broker that was alone gives once its watcher sees this one's lock file. Where ``flock`` does
    not exist (Windows), nothing is claimed and every broker shares.
    """
    if sys.platform == "win32":
        return None, False
    import fcntl

    handle = open(path, "rb")  # noqa: SIM115  # held open for the broker's lifetime, closed by close()
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle, True
        except OSError:
            if exclusive:
                raise StorageError(_batch_needs_the_file(path, "it is already open in another mqlite Broker")) from None
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            if liveness.batch_alive():
                raise StorageError(_batch_needs_the_file(path, "a Broker with commit='batch' has it open"))
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                return handle, False
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StorageError(
                    f"{path!r}: the broker that has it open did not make room for another within {wait:g} s"
                )
            time.sleep(pause)  # another process must act: nothing here to wait on but time
            pause = min(pause * 2, WATCH_MAX)
    except BaseException:
        handle.close()
        raise


def _batch_needs_the_file(path: str, why: str) -> str:
    return (
        f"{path!r}: {why} (this process or another one); a batched broker assigns offsets before it "
        "commits, so it needs the file to itself. Close that broker first, or open every broker with "
        "commit='each' to share the file"
    )


class _Liveness:
    """Tells live brokers from dead ones through lock files in ``<path>-brokers/``.

    Each broker holds its ``<id>.lock`` while it lives, with an exclusive ``flock`` that the
    kernel drops when the process dies, however it dies. The file is made and locked under a
    temporary name, then renamed, so no one sees it unlocked while its broker lives. On Windows,
    where there is no ``flock``, the file is simply kept open: an open file cannot be deleted, so
    a lock file that can be deleted belongs to a dead broker.
    """

    def __init__(self, path: str, instance: str) -> None:
        self._dir = f"{path}-brokers"
        self._path = os.path.join(self._dir, f"{instance}.lock")
        self._handle: Any = None
        os.makedirs(self._dir, exist_ok=True)
        if sys.platform == "win32":
            self._handle = open(self._path, "wb")  # noqa: SIM115  # held for the broker's lifetime
            return
        import fcntl

        temporary = f"{self._path}.new"
        handle = open(temporary, "wb")  # noqa: SIM115  # held open for the broker's lifetime
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        os.replace(temporary, self._path)
        self._handle = handle

    def alive(self, instance: str) -> bool:
        """Whether the broker ``instance`` still holds its lock file (a dead one's file is removed)."""
        path = os.path.join(self._dir, f"{instance}.lock")
        if sys.platform == "win32":
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            except PermissionError:
                return True
            return False
        import fcntl

        try:
            handle = open(path, "rb")  # noqa: SIM115  # closed below
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        with contextlib.suppress(OSError):
            os.unlink(path)  # dead: nobody will lock this file again
        return False

    def _others(self) -> list[str]:
        try:
            names = os.listdir(self._dir)
        except OSError:
            return []
        mine = os.path.basename(self._path)
        return [name[: -len(".lock")] for name in names if name.endswith(".lock") and name != mine]

    def others_alive(self) -> bool:
        """Whether another live broker has a lock file here (one that just opened the file, say)."""
        return any(self.alive(instance) for instance in self._others())

    def batch_alive(self) -> bool:
        """Whether a live batched broker (which needs the file to itself) has a lock file here."""
        return any(self.alive(instance) for instance in self._others() if instance.endswith("-batch"))

    def close(self) -> None:
        """Remove and release this broker's lock file."""
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        with contextlib.suppress(OSError):
            os.unlink(self._path)


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
    # (attempts, owner, due), or None to delete
    pending: dict[tuple[str, str, int], tuple[int, str | None, float | None] | None] = {}

    def end_run() -> None:
        if positions:
            out.append((_SET_POSITION, [(p, q, n) for (q, n), p in positions.items()], True))
            positions.clear()
        if pending:
            upserts = [(q, n, o, *a) for (q, n, o), a in pending.items() if a is not None]
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
            for queue, name, offset, attempts, owner, due in params:
                pending[(queue, name, offset)] = (attempts, owner, due)
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
