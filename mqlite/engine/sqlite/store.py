"""The open mqlite file: :class:`SqliteStore`, its connection, transactions, writes and close.

The retained part of each log is also held in memory (a
:class:`~mqlite.engine.sqlite.log.SqliteLog` over a :class:`MemoryLog`), so reads never touch the
disk. Several brokers, in one process or many, can share a file (``commit="each"``): every
operation on a queue runs as one SQLite write transaction, and when SQLite's ``data_version``
shows that another connection committed since, the queue first reloads what changed
(:meth:`SqliteStore.begin`). A watcher thread polls ``data_version`` so that waiting readers wake
when another process publishes, and hands back the pending messages of brokers that died.

The file's layout is in :mod:`~mqlite.engine.sqlite.schema`, each queue's log in
:mod:`~mqlite.engine.sqlite.log`, the reads in :mod:`~mqlite.engine.sqlite.reading`, the claims
and lock files that let brokers share the file in :mod:`~mqlite.engine.sqlite.sharing`, the watcher
thread in :mod:`~mqlite.engine.sqlite.watcher`, and the batched writer in
:mod:`~mqlite.engine.sqlite.writer`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from mqlite.config import QueueConfig
from mqlite.engine.codec import JsonSerializer, Serializer, decode_row, encode_row
from mqlite.engine.memory_log import MemoryLog
from mqlite.engine.sqlite.log import QueueState, SqliteLog
from mqlite.engine.sqlite.reading import read_changes, read_message_rows, read_pending_rows, read_queues
from mqlite.engine.sqlite.schema import Synchronous, check_access, check_or_create
from mqlite.engine.sqlite.sharing import BUSY, LIVENESS_EVERY, _claim, _Liveness, _transaction
from mqlite.engine.sqlite.watcher import Watcher
from mqlite.engine.sqlite.writer import (
    _INSERT,
    _INSERT_DEDUP,
    BatchWriter,
    _Op,
    execute,
)
from mqlite.errors import InvalidArgument, StorageError, TransactionError
from mqlite.message import Message

__all__ = ["BUSY", "CLOSE_TIMEOUT", "Commit", "SqliteStore", "Synchronous"]

_log = logging.getLogger("mqlite")

# How long close() waits for the writer and the watcher thread to end. Both normally end within
# a commit or a poll; one still running past this is logged and left behind (it is a daemon).
CLOSE_TIMEOUT = 10.0

Commit = Literal["each", "batch"]


class SqliteStore:
    """One open mqlite file. Thread-safe.

    ``_db_lock`` (reentrant) guards the connection, ``_closed``, the data-version bookkeeping and
    the liveness cache; the batched writer (:class:`~mqlite.engine.sqlite.writer.BatchWriter`)
    guards its buffer and counters with its own ``_cond``, and the watcher
    (:class:`~mqlite.engine.sqlite.watcher.Watcher`) its list of queues. Lock order: a queue's
    lock, then ``_db_lock``, then ``_cond``; ``_cond`` is never held while taking ``_db_lock``.

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
            or with another serializer; it, its folder or its ``-brokers`` folder is not
            writable; or a batched broker has it (or wants it) to itself. The file is left
            untouched.
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
        # A transaction across queue operations (begin_owned): the thread that owns it, how many
        # operations joined it and are still open, whether one of them failed, and whether its
        # thread may join operations to it now (opening a queue). _gate guards _owner with the
        # taking of _db_lock in begin(); _owned (on the same lock) is waited on for its end.
        self._gate = threading.Lock()
        self._owned = threading.Condition(self._gate)
        self._owner: int | None = None
        self._joined = 0
        self._doomed = False
        self._waiting = 0  # threads waiting on _owned
        self.joinable = False
        self._closed = False
        # data_version as last seen, and how many times it was seen to change: a queue that
        # synced at an older generation reloads before its next operation.
        self._data_version = -1
        self.generation = 0
        self._alive_until: dict[str, float] = {}
        # Batched mode only: the writer that queues and commits every write (None when every
        # write commits at once).
        self._writer = None if self.shared else BatchWriter(self.path, self._write_batch)
        self._check_liveness_at = 0.0  # when poll_changes next looks for dead brokers
        # Shared mode only: the thread that notices other connections' commits.
        self._watcher = Watcher(self) if self.shared else None
        check_access(self.path)
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
        if self._watcher is not None:
            self._watcher.thread.start()

    # -- queues ----------------------------------------------------------------------------

    def queues(self) -> list[tuple[str, QueueConfig]]:
        """Every stored queue with its retention settings, by name.

        Raises:
            StorageError: the store is closed, or the file is damaged.
        """
        with self._db_lock:
            self._check_open()
            return read_queues(self._db, self.path)

    def open_log(self, queue: str, config: dict[str, Any]) -> SqliteLog:
        """The log of ``queue``, created with ``config`` if new. Its queue loads it with :meth:`changes`."""
        self.flush()
        with self._db_lock:
            self.ensure_queue(queue, config)
            start = self._db.execute("SELECT start_offset FROM queues WHERE name = ?", (queue,)).fetchone()[0]
        return SqliteLog(self, queue, MemoryLog(start))

    def ensure_queue(self, queue: str, config: dict[str, Any]) -> None:
        """Make ``queue``'s row if it is missing (it is new, or a transaction that created it rolled back)."""
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

    def changes(self, cls: type[Message], end: int, dedup_from: int = -1) -> QueueState:
        """What the file holds for the queue whose Message class is ``cls``: see :func:`read_changes`.

        Called with the queue's lock held, inside :meth:`begin` for a shared file, so what it
        reads is one consistent state.
        """
        with self._db_lock:
            return read_changes(self._db, self.path, self.serializer, cls, end, dedup_from)

    def pending_rows(self, queue: str, name: str) -> list[tuple[int, int, str | None, float | None, float | None]]:
        """``(offset, attempts, owner, due, since)`` of each pending row of cursor ``name`` of ``queue``."""
        with self._db_lock:
            return read_pending_rows(self._db, self.path, queue, name)

    def consumers(self, queue: str) -> dict[str, list[tuple[str, int]]]:
        """``{cursor name: [(broker instance, consumers), ...]}`` of ``queue``'s rows of other live brokers."""
        with self._db_lock:
            try:
                rows = self._db.execute(
                    "SELECT name, broker, count(*) FROM consumers WHERE queue = ? AND broker != ? "
                    "GROUP BY name, broker ORDER BY name, broker",
                    (queue, self.instance),
                ).fetchall()
            except sqlite3.DatabaseError as error:
                raise StorageError(f"cannot read the consumers of {queue!r} in {self.path!r}: {error}") from error
        listed: dict[str, list[tuple[str, int]]] = {}
        for name, broker, count in rows:
            if type(name) is str and type(broker) is str and self.alive(broker):
                listed.setdefault(name, []).append((broker, count))
        return listed

    def load_messages(self, cls: type[Message], offsets: Sequence[int]) -> list[Message]:
        """The stored messages at ``offsets`` of the queue whose class is ``cls`` (pending ones memory dropped)."""
        with self._db_lock:
            rows = read_message_rows(self._db, self.path, cls._queue, offsets)
        return [decode_row(self.serializer, cls, row, self.path) for row in rows]

    # -- sharing the file ------------------------------------------------------------------

    def begin(self) -> int | None:
        """Start a write transaction and return the generation; None (no transaction) once closed.

        Holds the store's lock until :meth:`commit`. The generation grows when another connection
        committed since it was last looked at: whoever synced at an older one must reload.

        While a :meth:`begin_owned` transaction holds the file, another thread gets :data:`BUSY`
        at once, without waiting: it must let go of its queue's lock (which the transaction may
        want next) and :meth:`wait_owned` before it tries again. The owner's own thread joins
        the transaction where it allows that (opening a queue), and is refused otherwise.

        Raises:
            StorageError: another connection held the file's write lock past the busy timeout.
            TransactionError: the thread that owns the transaction began a queue operation of
                its own inside it.
        """
        gate = self._gate
        gate.acquire()
        try:
            owner = self._owner
            if owner is not None:
                if owner != threading.get_ident():
                    return BUSY
                if not self.joinable:
                    raise TransactionError(
                        "inside a transaction, publish, ack and nack through the transaction (tx.publish, tx.ack, "
                        "tx.nack); other calls on this broker's queues wait until the block ends"
                    )
                self._db_lock.acquire()
                self._joined += 1
                return self.generation
            self._db_lock.acquire()
        finally:
            gate.release()
        if self._solo and not self._closed:  # _begin_locked's usual case, without its frame
            self._in_op = True
            self.wrote = False
            return self.generation
        return self._begin_locked()

    def begin_owned(self) -> int | None:
        """Begin a write transaction that this thread owns until :meth:`end_owned`, across many
        queue operations (a :class:`~mqlite.transaction.Transaction`); None once closed.

        Raises:
            StorageError: another connection held the file's write lock past the busy timeout.
        """
        me = threading.get_ident()
        gate = self._gate
        gate.acquire()
        try:
            while self._owner is not None:  # another transaction of this store, in another thread
                self._waiting += 1
                try:
                    self._owned.wait()
                finally:
                    self._waiting -= 1
            self._owner = me
        finally:
            gate.release()
        try:
            self._db_lock.acquire()
            generation = self._begin_locked()
        except BaseException:
            self._release_owner()
            raise
        if generation is None:
            self._release_owner()
        return generation

    def end_owned(self, *, commit: bool) -> sqlite3.Error | None:
        """Commit (or roll back) the :meth:`begin_owned` transaction, and let other threads in.

        Returns what ROLLBACK raised, if it did (see :meth:`rollback`).

        Raises:
            StorageError: the commit failed, or an operation that joined the transaction failed
                and rolled back; nothing was changed.
        """
        doomed, self._doomed = self._doomed, False
        try:
            if commit and not doomed:
                self.commit()
                return None
            failed = self.rollback()
            if commit:
                raise StorageError(f"a step of a transaction on {self.path!r} failed; nothing was changed")
            return failed
        finally:
            self._release_owner()

    def _release_owner(self) -> None:
        gate = self._gate
        gate.acquire()
        try:
            self._owner = None
            self._joined = 0
            if self._waiting:
                self._owned.notify_all()
        finally:
            gate.release()

    def wait_owned(self) -> None:
        """Wait until no other thread's transaction holds the file (after :meth:`begin` said BUSY)."""
        me = threading.get_ident()
        with self._owned:
            while self._owner is not None and self._owner != me:
                self._waiting += 1
                try:
                    self._owned.wait()
                finally:
                    self._waiting -= 1

    def _begin_locked(self) -> int | None:
        """:meth:`begin` once the store's lock is held."""
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
        if self._joined:  # an operation inside a transaction: the transaction commits
            self._joined -= 1
            self._db_lock.release()
            return
        db = self._db
        self._in_op = False
        try:
            if db.in_transaction:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as error:
                    failed = self._rollback_locked()
                    also = f" (and ROLLBACK said: {failed}, so SQLite rolled back itself)" if failed else ""
                    raise StorageError(f"cannot commit to {self.path!r}: {error}; nothing was changed{also}") from error
        finally:
            self._db_lock.release()

    def rollback(self) -> sqlite3.Error | None:
        """End the transaction :meth:`begin` started without keeping its writes; release the store's lock.

        Returns the error ROLLBACK raised, if it did, for the caller to report once it holds no
        lock. SQLite rolls a transaction back by itself after the errors that stop ROLLBACK, so
        nothing is kept either way.
        """
        if self._joined:  # an operation inside a transaction failed: so does the transaction
            self._joined -= 1
            self._doomed = True
            self._db_lock.release()
            return None
        self._in_op = False
        try:
            return self._rollback_locked()
        finally:
            self._db_lock.release()

    def _rollback_locked(self) -> sqlite3.Error | None:
        db = self._db
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error as error:
            return error
        return None

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
        if self._watcher is not None:
            self._watcher.add(poke)

    def poll_changes(self) -> bool | None:
        """The watcher's look at the file: whether another connection changed it; None once closed.

        Alone on the file, it only looks for another broker wanting in, and then shares the file.
        Otherwise it notes a new data_version and, every LIVENESS_EVERY, hands back the pending
        messages of brokers that died.
        """
        with self._db_lock:
            if self._closed:
                return None
            if self._solo:
                if self._liveness is not None and self._liveness.others_alive():
                    self._share_locked()
                return False
            changed = self._note_version_locked()
            now = time.monotonic()
            if now >= self._check_liveness_at:
                self._check_liveness_at = now + LIVENESS_EVERY
                if self._release_dead_locked():
                    self.generation += 1
                    changed = True
            return changed

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
        # A dead broker's consumers are ignored by every reader; their rows go too, unannounced.
        brokers = [row[0] for row in self._db.execute("SELECT DISTINCT broker FROM consumers")]
        for broker in brokers:
            if not self.alive(broker):
                self._db.execute("DELETE FROM consumers WHERE broker = ?", (broker,))
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

    # -- messages --------------------------------------------------------------------------

    def encode(self, message: Message) -> tuple[Any, ...]:
        """The ``messages`` row of ``message``.

        Raises:
            SerializationError: the payload, key or headers cannot be encoded.
        """
        return encode_row(self.serializer, message)

    def insert_one(self, message: Message) -> None:
        """Append one message."""
        self.insert_row(self.encode(message))

    def insert_row(self, row: tuple[Any, ...], dedup: tuple[Any, ...] | None = None) -> None:
        """Append one encoded message (and its ``dedup`` row, in the same transaction). The durable publish path."""
        writer = self._writer
        if writer is not None:
            if dedup is None:
                writer.submit_row(row)
            else:
                writer.submit([(_INSERT, [row], True), (_INSERT_DEDUP, [dedup], True)])
            return
        with self._db_lock:
            if self._closed:
                self._check_open()
            try:
                if self._in_op:
                    self.wrote = True
                    if not self._db.in_transaction:
                        self._db.execute("BEGIN")  # as _begin_write_locked, inlined: the publish path
                if dedup is None:
                    self._db.execute(_INSERT, row)
                else:
                    with contextlib.nullcontext() if self._db.in_transaction else _transaction(self._db):
                        self._db.execute(_INSERT, row)
                        self._db.execute(_INSERT_DEDUP, dedup)
            except sqlite3.Error as error:
                raise StorageError(f"cannot write to {self.path!r}: {error}; nothing was published") from error

    # -- writing ---------------------------------------------------------------------------

    def submit(self, ops: list[_Op], *, vacuum: bool = False) -> None:
        """Run ``ops`` as one transaction now, or (batched) hand them to the writer thread."""
        writer = self._writer
        if writer is None:
            with self._db_lock:
                if self._closed:
                    self._check_open()
                try:
                    if self._in_op:  # _begin_write_locked, inlined: every take and ack on a file comes here
                        self.wrote = True
                        if not self._db.in_transaction:
                            self._db.execute("BEGIN")
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

    @property
    def writer(self) -> BatchWriter | None:
        """The batched writer (``commit="batch"``), or None."""
        return self._writer

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written before the call is committed; False if ``timeout`` passed first.

        Raises:
            StorageError: the background writer failed.
        """
        if self._writer is None:
            return True
        return self._writer.flush(timeout)

    # -- plumbing --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` began. Read without the lock: a write that races close is refused by :meth:`submit`."""
        return self._closed

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
        watcher = self._watcher
        if watcher is not None:
            watcher.stop()
            if watcher.thread is not threading.current_thread():
                self._join(watcher.thread)
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
