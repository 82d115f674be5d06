"""How writes reach the file: multi-row statements, coalescing, and the batched writer.

A write is a list of ops, each ``(sql, parameters, executemany?)``, run as one transaction by
:func:`execute`. With ``commit="each"`` the store runs them at once; with ``commit="batch"`` a
:class:`BatchWriter` queues them in order and its thread commits everything queued so far as one
transaction (group commit), after :func:`_coalesce` has reduced them to their net effect.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from mqlite.engine.sqlite.sharing import _transaction
from mqlite.errors import StorageError

__all__ = ["BACKPRESSURE_TIMEOUT", "CHUNKS", "MAX_BACKLOG", "BatchWriter", "execute"]

_log = logging.getLogger("mqlite")

# commit="batch": how many writes may wait for the writer before callers wait for it.
MAX_BACKLOG = 10_000

BACKPRESSURE_TIMEOUT = 30.0
"""Seconds a caller waits for a writer that is MAX_BACKLOG writes behind before it gives up with
StorageError (a disk that stopped answering): the wait holds the caller's queue lock."""

_Op = tuple[str, Any, bool]  # (sql, parameters, executemany?)
_UPSERT_PENDING = (
    'INSERT INTO pending (queue, name, "offset", attempts, owner, due, since) VALUES (?, ?, ?, ?, ?, ?, ?) '
    'ON CONFLICT (queue, name, "offset") DO UPDATE SET '
    "attempts = excluded.attempts, owner = excluded.owner, due = excluded.due, since = excluded.since"
)
_DELETE_PENDING = 'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" = ?'
_SET_POSITION = "UPDATE cursors SET position = ? WHERE queue = ? AND name = ?"
_DROP_MESSAGES = (
    'DELETE FROM messages WHERE queue = ? AND "offset" < ? AND "offset" NOT IN '
    '(SELECT "offset" FROM pending WHERE queue = ?)'
)
_INSERT_DEDUP = 'INSERT INTO dedup (queue, "offset", id, at) VALUES (?, ?, ?, ?)'
_PRUNE_DEDUP = 'DELETE FROM dedup WHERE queue = ? AND "offset" < ?'
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
        if len(rows) == 1:  # a take or an ack of one message, the usual write: one plain statement
            db.execute(self._one, prefix + tuple(rows[0]) if prefix else rows[0])
            return
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
_PENDING_ROW = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_ROWS = _Chunked(_INSERT, lambda n: _INSERT.replace(_MESSAGE_ROW, _values(_MESSAGE_ROW, n)), 7)
_UPSERT_ROWS = _Chunked(_UPSERT_PENDING, lambda n: _UPSERT_PENDING.replace(_PENDING_ROW, _values(_PENDING_ROW, n)), 7)
_DELETE_ROWS = _Chunked(
    _DELETE_PENDING,
    lambda n: f'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" IN ({_values("?", n)})',
    1,
)


def _delete_pending(db: sqlite3.Connection, rows: Sequence[tuple[str, str, int]]) -> None:
    """Delete ``(queue, name, offset)`` pending rows, one IN list per cursor and chunk (the key's index serves it)."""
    if len(rows) == 1:  # an ack of one message, the usual one
        db.execute(_DELETE_PENDING, rows[0])
        return
    by_cursor: dict[tuple[str, str], list[tuple[int]]] = {}
    for queue, name, offset in rows:
        by_cursor.setdefault((queue, name), []).append((offset,))
    for cursor, offsets in by_cursor.items():
        _DELETE_ROWS.run(db, offsets, cursor)


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
    # (attempts, owner, due, since), or None to delete
    pending: dict[tuple[str, str, int], tuple[int, str | None, float | None, float | None] | None] = {}

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
            for queue, name, offset, attempts, owner, due, since in params:
                pending[(queue, name, offset)] = (attempts, owner, due, since)
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


def execute(db: sqlite3.Connection, ops: list[_Op]) -> None:
    """Run ``ops``: inside an open transaction they join it; otherwise they are one of their own.

    The caller holds the store's lock (the connection is not shared otherwise).
    """
    if len(ops) == 1 and not db.in_transaction:
        sql, params, many = ops[0]
        if not many:
            db.execute(sql, params)  # autocommit: one statement, one transaction
            return
        if len(params) == 1:
            db.execute(sql, params[0])
            return
    # Inside begin() ... commit() the statements join that transaction (the usual case: every
    # queue operation on a file is one, and a context manager's frames would cost each of them);
    # otherwise they are one of their own.
    if db.in_transaction:
        _run_ops(db, ops)
        return
    with _transaction(db):
        _run_ops(db, ops)


def _run_ops(db: sqlite3.Connection, ops: list[_Op]) -> None:
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


class BatchWriter:
    """``commit="batch"``: writes queued in order, and the thread that commits them. Thread-safe.

    ``_cond`` guards the buffer and counters. The thread calls ``write`` (which takes the store's
    lock) without holding ``_cond``; callers may hold the store's lock while they submit. Lock
    order: the store's lock, then ``_cond``; ``_cond`` is never held while taking the store's lock.
    """

    def __init__(self, path: str, write: Callable[[list[_Op], bool], None]) -> None:
        self._path = path
        # Runs ops as one transaction, then the incremental vacuum if asked; takes the store's lock.
        self._write = write
        self._cond = threading.Condition(threading.Lock())
        # Ops waiting for the writer, the rows of the insert op that ends the buffer (None if
        # another op ends it, or once the writer failed or is stopping, so that the next row is
        # checked), how many rows and ops wait, how many writes were submitted and how many of
        # them are committed.
        self._buffer: list[_Op] = []
        self._rows: list[tuple[Any, ...]] | None = None
        self._backlog = 0
        self._vacuum = False
        self._submitted = 0
        self._committed = 0
        self._failure: BaseException | None = None
        self._paused = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._write_batches, name="mqlite-writer", daemon=True)

    def pause(self) -> None:
        """Hold the next commit until :meth:`resume`, so that the writes between land in one
        transaction (a :class:`~mqlite.transaction.Transaction` applying). Bounded: no user code
        runs in between, and writes made meanwhile skip the backlog limit (the writer waits)."""
        with self._cond:
            self._paused += 1

    def resume(self) -> None:
        """End a :meth:`pause`."""
        with self._cond:
            self._paused -= 1
            self._cond.notify_all()

    def submit(self, ops: list[_Op], *, vacuum: bool = False) -> None:
        """Hand ``ops`` to the writer thread, to run as (part of) one transaction."""
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

    def submit_row(self, row: tuple[Any, ...]) -> None:
        """Hand one message row to the writer.

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

        Backpressure: a writer more than MAX_BACKLOG rows and ops behind makes callers wait for it,
        for at most BACKPRESSURE_TIMEOUT seconds.

        Raises:
            StorageError: the store is closing, the writer failed, or it did not catch up in time.
        """
        deadline = time.monotonic() + BACKPRESSURE_TIMEOUT
        while self._backlog >= MAX_BACKLOG and not self._paused and not self.stopping and self._failure is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StorageError(
                    f"{self._path!r}: the background writer stayed {self._backlog} writes behind for "
                    f"{BACKPRESSURE_TIMEOUT:g} s; this write was refused"
                )
            self._cond.wait(remaining)
        if self.stopping:
            raise StorageError(f"{self._path!r} is closed")
        if self._failure is not None:
            raise StorageError(f"{self._path!r}: the background writer failed: {self._failure}")
        return self._buffer

    def _write_batches(self) -> None:
        """The thread: commit everything submitted since its last commit as one transaction."""
        while True:
            with self._cond:
                while (not self._buffer or self._paused) and not self.stopping:
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
                self._write(_coalesce(ops), vacuum)
            except Exception as error:  # noqa: BLE001  # kept and raised by every later flush() and write
                _log.exception("the background writer of %r failed; nothing more will be written", self._path)
                with self._cond:
                    self._failure = error
                    self._rows = None  # later rows must go through _room_locked, which raises
                    self._cond.notify_all()
                return
            with self._cond:
                self._committed = upto
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted before the call is committed; False if ``timeout`` passed first.

        Raises:
            StorageError: the writer failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            while self._committed < target:
                if self._failure is not None:
                    raise StorageError(f"{self._path!r}: the background writer failed: {self._failure}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self) -> None:
        """Refuse later writes; the thread commits what is buffered, then ends (join :attr:`thread`)."""
        with self._cond:
            self.stopping = True
            self._rows = None
            self._cond.notify_all()
