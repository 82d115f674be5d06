"""The open mqlite file: :class:`SqliteStore`, its connection, reads and writes, watcher and close.

The retained part of each log is also held in memory (a
:class:`~mqlite.engine.sqlite.log.SqliteLog` over a :class:`MemoryLog`), so reads never touch the
disk. Several brokers, in one process or many, can share a file (``commit="each"``): every
operation on a queue runs as one SQLite write transaction, and when SQLite's ``data_version``
shows that another connection committed since, the queue first reloads what changed
(:meth:`SqliteStore.begin`). A watcher thread polls ``data_version`` so that waiting readers wake
when another process publishes, and hands back the pending messages of brokers that died.

The file's layout is in :mod:`~mqlite.engine.sqlite.schema`, each queue's log in
:mod:`~mqlite.engine.sqlite.log`, the claims and lock files that let brokers share the file in
:mod:`~mqlite.engine.sqlite.sharing`, and the batched writer in :mod:`~mqlite.engine.sqlite.writer`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from mqlite.engine.codec import JsonSerializer, Serializer, decode_row, encode_row
from mqlite.engine.memory_log import MemoryLog
from mqlite.engine.sqlite.log import QueueState, SqliteLog
from mqlite.engine.sqlite.schema import Synchronous, check_or_create
from mqlite.engine.sqlite.sharing import LIVENESS_EVERY, WATCH_MAX, WATCH_MIN, _Checkpointer, _claim, _Liveness
from mqlite.engine.sqlite.writer import (
    _DELETE_PENDING,
    _DROP_MESSAGES,
    _INSERT,
    _SET_POSITION,
    _UPSERT_PENDING,
    BatchWriter,
    _Op,
    execute,
)
from mqlite.errors import InvalidArgument, StorageError
from mqlite.message import Message

__all__ = ["CLOSE_TIMEOUT", "Commit", "SqliteStore", "Synchronous"]

_log = logging.getLogger("mqlite")

# How long close() waits for the writer and the watcher thread to end. Both normally end within
# a commit or a poll; one still running past this is logged and left behind (it is a daemon).
CLOSE_TIMEOUT = 10.0

Commit = Literal["each", "batch"]


class SqliteStore:
    """One open mqlite file. Thread-safe.

    ``_db_lock`` (reentrant) guards the connection, ``_closed``, the data-version bookkeeping and
    the liveness cache; the batched writer (:class:`~mqlite.engine.sqlite.writer.BatchWriter`)
    guards its buffer and counters with its own ``_cond``, and ``_watched_lock`` guards
    ``_watched``, the watcher's list. Lock order: a queue's lock, then ``_db_lock``, then
    ``_cond``; ``_cond`` is never held while taking ``_db_lock``.

    With ``commit="each"`` every write is committed before the call returns, and the file can be
    shared with other brokers (:attr:`shared`): each queue operation is one transaction between
    :meth:`begin` and :meth:`commit`. With ``commit="batch"`` writes are queued in order and a
    writer thread commits everything queued so far as one transaction (group commit, see
    :mod:`~mqlite.engine.sqlite.writer`); :meth:`flush` waits for it. A batched broker assigns
    offsets before it commits, so it needs the file to itself. With WAL and ``synchronous=NORMAL``
    a commit survives the process being killed; with ``synchronous=FULL`` it also survives power
    loss.

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
            raise InvalidArgument(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if commit not in ("each", "batch"):
            raise InvalidArgument(f"commit must be 'each' or 'batch', got {commit!r}")
        self.path = os.fspath(path)
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self.shared = commit == "each"
        # This broker's name in the pending table's owner column.
        self.instance = f"{os.getpid()}-{secrets.token_hex(6)}{'' if self.shared else '-batch'}"
        # While no other broker has the file open (its claim is exclusive), every write simply
        # autocommits: there is nobody to reload from. The watcher ends this when one shows up.
        self._solo = False
        # Between begin() and commit() or rollback() (under _db_lock): an operation is running,
        # and whether it wrote. Its first write begins the transaction if begin() did not (alone
        # on the file), so that every operation is all or nothing on the file too.
        self._in_op = False
        self.wrote = False
        self._busy_timeout = busy_timeout
        self._db_lock = threading.RLock()
        self._closed = False
        # data_version as last seen, and how many times it was seen to change: a queue that
        # synced at an older generation reloads before its next operation.
        self._data_version = -1
        self.generation = 0
        self._alive_until: dict[str, float] = {}
        # Batched mode only: the writer that queues and commits every write (None when every
        # write commits at once).
        self._writer = None if self.shared else BatchWriter(self.path, self._write_batch)
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
            check_or_create(self._db, self.path, self.serializer.name, synchronous, shared=self.shared)
            self._liveness = _Liveness(self.path, self.instance)
            self._claim, self._solo = _claim(self.path, self._liveness, exclusive=not self.shared, wait=busy_timeout)
        except BaseException:
            if self._liveness is not None:
                self._liveness.close()
            self._db.close()
            raise
        if self._writer is not None:
            self._writer.thread.start()
        else:
            self._watcher = threading.Thread(target=self._watch, name="mqlite-watcher", daemon=True)
            self._watcher.start()

    # -- queues ----------------------------------------------------------------------------

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """Every stored queue with its retention settings, by name.

        Raises:
            StorageError: the store is closed.
        """
        with self._db_lock:
            self._check_open()
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
        if self._closed or (self._writer is not None and self._writer.stopping):
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
        self._in_op = True
        self.wrote = False
        if self._solo:
            return self.generation  # alone on the file: nothing to reload; the first write begins
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            self._note_version_locked()
        except BaseException as error:
            self._in_op = False
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
        self._in_op = False
        try:
            if db.in_transaction:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as error:
                    self._rollback_locked()
                    raise StorageError(f"cannot commit to {self.path!r}: {error}; nothing was changed") from error
        finally:
            self._db_lock.release()

    def rollback(self) -> None:
        """End the transaction :meth:`begin` started without keeping its writes; release the store's lock."""
        self._in_op = False
        try:
            self._rollback_locked()
        finally:
            self._db_lock.release()

    def _rollback_locked(self) -> None:
        db = self._db
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            # SQLite rolls a transaction back by itself after the errors that stop ROLLBACK.
            _log.warning("rolling back a transaction on %r failed", self.path, exc_info=True)

    def _begin_write_locked(self) -> None:
        """An operation writes: note it, and begin its transaction if :meth:`begin` did not (alone on the file)."""
        if self._in_op:
            self.wrote = True
            if not self._db.in_transaction:
                self._db.execute("BEGIN")

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
        return encode_row(self.serializer, message)

    def _decode(self, queue: str, row: Sequence[Any]) -> Message:
        return decode_row(self.serializer, queue, row, self.path)

    def insert_one(self, message: Message) -> None:
        """Append one message."""
        self.insert_row(self.encode(message))

    def insert_row(self, row: tuple[Any, ...]) -> None:
        """Append one encoded message. The durable publish path."""
        writer = self._writer
        if writer is not None:
            writer.submit_row(row)
            return
        with self._db_lock:
            if self._closed:
                self._check_open()
            try:
                if self._in_op:
                    self.wrote = True
                    if not self._db.in_transaction:
                        self._db.execute("BEGIN")  # as _begin_write_locked, inlined: the publish path
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
        writer = self._writer
        if writer is None:
            with self._db_lock:
                self._check_open()
                try:
                    self._begin_write_locked()
                    self._execute_locked(ops)
                    if vacuum:
                        # Give freed pages back to the file system: a steady workload keeps a steady size.
                        self._db.execute("PRAGMA incremental_vacuum")
                except sqlite3.Error as error:
                    raise StorageError(f"cannot write to {self.path!r}: {error}; the change was not saved") from error
            return
        writer.submit(ops, vacuum=vacuum)

    def _execute_locked(self, ops: list[_Op]) -> None:
        execute(self._db, ops)

    def _write_batch(self, ops: list[_Op], vacuum: bool) -> None:
        """The batched writer's commit (on its thread): ``ops`` as one transaction."""
        with self._db_lock:
            self._execute_locked(ops)
            if vacuum:
                self._db.execute("PRAGMA incremental_vacuum")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written before the call is committed; False if ``timeout`` passed first.

        Raises:
            StorageError: the background writer failed.
        """
        if self._writer is None:
            return True
        return self._writer.flush(timeout)

    # -- plumbing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{self.path!r} is closed")

    def close(self) -> None:
        """Commit what is still buffered, hand back what this broker held, close the file.

        Idempotent, and a close that raised part-way is finished by the next; later writes are refused.
        """
        writer = self._writer
        if writer is not None:
            writer.stop()
            self._join(writer.thread)
        self._stop_watching.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._join(self._watcher)
        with self._db_lock:
            if not self._closed:
                self._closed = True
                try:
                    # Unsettled messages this broker held are due again, for whoever reads next.
                    self._db.execute("UPDATE pending SET owner = NULL WHERE owner = ?", (self.instance,))
                except sqlite3.Error:
                    _log.warning(
                        "could not hand back the pending messages of %r; "
                        "they wait for this broker's death to be noticed",
                        self.path,
                        exc_info=True,
                    )
            # Each step may be repeated: a close that raised part-way is finished by the next one.
            self._db.close()
            if self._liveness is not None:
                self._liveness.close()
            if self._claim is not None:
                self._claim.close()  # releases the claim
                self._claim = None

    def _join(self, thread: threading.Thread) -> None:
        """Wait up to CLOSE_TIMEOUT for ``thread`` to end; if it does not, say so and go on."""
        thread.join(CLOSE_TIMEOUT)
        if thread.is_alive():
            _log.warning(
                "%r: the %s thread did not end within %g s of close(); closing without waiting for it",
                self.path,
                thread.name,
                CLOSE_TIMEOUT,
            )
