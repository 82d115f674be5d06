"""Looking into an mqlite file without changing it: :class:`Inspector`, for the ``mqlite`` command.

An inspector reads through a read-only SQLite connection (``mode=ro``): it never writes the
database, never registers itself as a broker (no lock file, no claim), and never hands back or
takes a pending message, so another process may use the file meanwhile. It checks the file as a
broker does on open (:func:`~mqlite.engine.sqlite.schema.check_layout`, read-only) and every row
it reads (:mod:`~mqlite.engine.sqlite.reading`), and decodes messages with the engine's codec.

Like any SQLite reader of a WAL-mode file, its connection needs ``<path>-wal`` and ``<path>-shm``
beside the file: SQLite makes them, empty, if no broker has the file open. The database itself is
left byte for byte as it was.

It reports what the file holds, which is what every broker on it sees once it has synced: the
counters of ``Broker.info()`` (delivered, acked, ...) live in each broker's memory and are not in
the file. The consumers attached to each durable subscription are (schema 5 on): every broker
lists its own, and those of brokers that are no longer alive are not counted.

:func:`compact` is the one writer here: a checkpoint and ``VACUUM``, which change how the file
is laid out but nothing it holds, so brokers that have it open need not know.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import attrs

from mqlite._delivery import retention
from mqlite.config import QueueConfig, SubscriptionSettings
from mqlite.engine.codec import JsonSerializer, Serializer, decode_row
from mqlite.engine.sqlite.reading import read_changes, read_message_rows, read_queues
from mqlite.engine.sqlite.schema import APPLICATION_ID, check_layout, unreadable
from mqlite.engine.sqlite.sharing import brokers_folder
from mqlite.errors import MqliteError, StorageError
from mqlite.filters import EventFilter
from mqlite.message import Message, message_class

__all__ = [
    "BrokerView",
    "CursorView",
    "Inspector",
    "NotFound",
    "PendingView",
    "QueueView",
    "broker_alive",
    "compact",
]

# An offset past every queue's end: read_changes reads no message from it, only cursors and pending rows.
_NO_MESSAGES = 2**62
# How many offsets one page of messages covers (messages() reads a page per query round).
_PAGE = 256


class NotFound(MqliteError, LookupError):
    """The file has no such queue or subscription; the message names what it has."""


@attrs.frozen
class QueueView:
    """One queue as the file holds it."""

    name: str
    start_offset: int
    end_offset: int
    config: QueueConfig

    @property
    def retained(self) -> int:
        return self.end_offset - self.start_offset


@attrs.frozen
class CursorView:
    """One durable subscription as the file holds it.

    ``held``: pending messages a broker holds now; ``waiting``: nacked or failed ones waiting out
    a delay; ``ready``: due again, for whoever reads next (their holder closed or died).
    ``redelivering``: pending messages delivered more than once.
    """

    queue: str
    name: str
    settings: SubscriptionSettings
    position: int
    lag: int
    pending: int
    held: int
    waiting: int
    ready: int
    redelivering: int
    consumers: int | None = None
    """Subscriptions attached to it in live brokers; None for a file older than schema 5."""


@attrs.frozen
class PendingView:
    """One pending message of a durable subscription.

    Attributes:
        offset: Its offset in the queue.
        event: Its event, or None if its message is no longer stored.
        attempts: How many times it was delivered (the last delivery is attempt ``attempts``).
        owner: The broker instance that holds it (``<pid>-<hex>``), or None: due for whoever reads next.
        alive: Whether that broker still runs (None: no owner, or it cannot be told on this platform).
        due: For a message waiting out a retry delay: when it is due again (seconds since the epoch).
        since: When its holder took it (seconds since the epoch), if the file records it.
    """

    offset: int
    event: str | None
    attempts: int
    owner: str | None
    alive: bool | None
    due: float | None
    since: float | None

    @property
    def state(self) -> Literal["held", "waiting", "ready"]:
        if self.due is not None:
            return "waiting"
        return "held" if self.owner is not None else "ready"


@attrs.frozen
class BrokerView:
    """A broker that has the file open: its instance id (``<pid>-<hex>``, ``-batch`` if batched)."""

    instance: str
    pid: int | None


def broker_alive(path: str, instance: str) -> bool | None:
    """Whether the broker ``instance`` of the file ``path`` still runs, without changing anything.

    A live broker holds an exclusive ``flock`` on ``<path>-brokers/<instance>.lock`` (see
    :class:`~mqlite.engine.sqlite.sharing._Liveness`); unlike a broker, the inspector leaves a
    dead one's lock file where it is. None on Windows, where telling would mean deleting it.
    """
    if sys.platform == "win32":
        return None
    import fcntl

    lock_file = os.path.join(brokers_folder(path), f"{instance}.lock")
    try:
        handle = open(lock_file, "rb")  # noqa: SIM115  # closed below
    except FileNotFoundError:
        return False
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
    return False


class Inspector:
    """A read-only view of one mqlite file. Not thread-safe: one connection, used by one thread.

    Each method reads in one read transaction, so what it returns is one consistent state of the
    file, whatever other processes write meanwhile.

    Args:
        path: The file. It must exist; it is never created.
        serializer: How to decode payloads, keys and headers. Default: JSON if the file was
            written with JSON; a file written with another serializer can still be inspected,
            but its messages not decoded unless that serializer is given.
        busy_timeout: Seconds to wait for a connection that holds the file locked (a reader
            rarely waits: only while SQLite rebuilds the WAL index).

    Raises:
        StorageError: the file does not exist, is not an mqlite file, is corrupt, or was written
            by a newer mqlite.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, serializer: Serializer | None = None, busy_timeout: float = 5.0
    ) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise StorageError(f"{self.path!r} does not exist (inspecting a file never creates it)")
        if os.path.isdir(self.path):
            raise StorageError(f"{self.path!r} is a directory, not an mqlite file")
        uri = Path(self.path).absolute().as_uri() + "?mode=ro"
        try:
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout)
        except sqlite3.Error as error:
            raise StorageError(f"cannot open {self.path!r} read-only (SQLite says: {error})") from error
        try:
            self.stored_serializer, self.version, self._pending_columns = self._check()
        except BaseException:
            self._db.close()
            raise
        if serializer is None and self.stored_serializer == JsonSerializer.name:
            serializer = JsonSerializer()
        self.serializer = serializer

    def _check(self) -> tuple[str, int, tuple[str, ...]]:
        """The file's serializer name, schema version and pending columns, once it is known to be mqlite's."""
        try:
            with self._reading():
                application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
                columns: dict[str, tuple[str, ...]] = {}
                for table, column in self._db.execute(
                    "SELECT m.name, c.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS c "
                    "WHERE m.type = 'table' ORDER BY m.name, c.cid"
                ):
                    columns[table] = (*columns.get(table, ()), column)
                if application_id != APPLICATION_ID:
                    what = "an empty SQLite database" if not columns else "an SQLite database"
                    raise StorageError(f"{self.path!r} is {what}, not an mqlite file")
                stored = "json"
                if "mqlite_schema" in columns:
                    rows = self._db.execute("SELECT serializer FROM mqlite_schema").fetchall()
                    if len(rows) == 1 and type(rows[0][0]) is str:
                        stored = rows[0][0]
                version = check_layout(self._db, self.path, stored, columns)
        except sqlite3.DatabaseError as error:
            raise StorageError(unreadable(self.path, error)) from error
        return stored, version, columns["pending"]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: everything read inside it is one state of the file."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")  # it wrote nothing

    # -- queues ------------------------------------------------------------------------------

    def queues(self) -> list[QueueView]:
        """Every queue, by name."""
        with self._reading() as db:
            return [self._queue_view(db, name, config) for name, config in read_queues(db, self.path)]

    def queue(self, name: str) -> QueueView:
        """The queue called ``name``.

        Raises:
            NotFound: there is none; the message lists the queues there are.
        """
        with self._reading() as db:
            return self._queue_locked(db, name)

    def _queue_locked(self, db: sqlite3.Connection, name: str) -> QueueView:
        for stored, config in read_queues(db, self.path):
            if stored == name:
                return self._queue_view(db, name, config)
        names = [stored for stored, _ in read_queues(db, self.path)]
        have = f"its queues are {', '.join(repr(n) for n in names)}" if names else "it has no queue yet"
        raise NotFound(f"{self.path!r} has no queue {name!r}; {have}")

    def _queue_view(self, db: sqlite3.Connection, name: str, config: QueueConfig) -> QueueView:
        """The queue as its brokers see it: the file drops a queue's oldest messages in batches
        (``retention.should_reclaim``), so its start is worked out by the retention rules, as a
        broker's housekeeping does, from the stored start, the limits and the durable cursors."""
        what = f"queue {name!r}"
        start = self._int(db, "SELECT start_offset FROM queues WHERE name = ?", (name,), what)
        last = self._int(db, 'SELECT max("offset") FROM messages WHERE queue = ?', (name,), what)
        end = start if last is None or last + 1 < start else last + 1
        if config.max_age is not None:
            # limit_floor walks the timestamps up from start; one query finds the same offset.
            young = self._int(
                db,
                'SELECT min("offset") FROM messages WHERE queue = ? AND "offset" >= ? AND timestamp >= ?',
                (name, start, time.time() - config.max_age),
                what,
            )
            start = end if young is None else max(start, young)
        start = retention.limit_floor(start, end, config, time.time(), lambda offset: float("inf"))
        positions = [row[0] for row in db.execute("SELECT position FROM cursors WHERE queue = ?", (name,))]
        start = retention.interest_floor(start, end, config, (p for p in positions if type(p) is int))
        return QueueView(name, start, end, config)

    def _int(self, db: sqlite3.Connection, sql: str, args: Sequence[Any], what: str) -> Any:
        try:
            value = db.execute(sql, args).fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise StorageError(f"{self.path!r}: cannot read {what} (SQLite says: {error})") from error
        if value is not None and type(value) is not int:
            raise StorageError(f"{self.path!r} is corrupt: {what} has the offset {value!r}, not an integer")
        return value

    # -- subscriptions -----------------------------------------------------------------------

    def snapshot(self) -> tuple[list[QueueView], list[CursorView]]:
        """Every queue and every durable subscription, read in one transaction (for ``mqlite info``)."""
        with self._reading() as db:
            views = [self._queue_view(db, name, config) for name, config in read_queues(db, self.path)]
            return views, [cursor for view in views for cursor in self._cursors_locked(db, view)]

    def cursors(self, queue: str | None = None) -> list[CursorView]:
        """The durable subscriptions of ``queue`` (of every queue if None), by queue and name.

        Raises:
            NotFound: there is no queue ``queue``.
        """
        with self._reading() as db:
            if queue is None:
                views = [self._queue_view(db, name, config) for name, config in read_queues(db, self.path)]
            else:
                views = [self._queue_locked(db, queue)]
            return [cursor for view in views for cursor in self._cursors_locked(db, view)]

    def cursor(self, queue: str, name: str) -> CursorView:
        """The durable subscription ``name`` of ``queue``.

        Raises:
            NotFound: there is no such queue or subscription; the message lists those there are.
        """
        with self._reading() as db:
            view = self._queue_locked(db, queue)
            return self._cursor_locked(db, view, name)

    def _cursor_locked(self, db: sqlite3.Connection, view: QueueView, name: str) -> CursorView:
        cursors = self._cursors_locked(db, view)
        for cursor in cursors:
            if cursor.name == name:
                return cursor
        names = ", ".join(repr(c.name) for c in cursors)
        have = f"its durable subscriptions are {names}" if names else "it has no durable subscription"
        raise NotFound(f"queue {view.name!r} of {self.path!r} has no subscription {name!r}; {have}")

    def _cursors_locked(self, db: sqlite3.Connection, view: QueueView) -> list[CursorView]:
        state = read_changes(
            db, self.path, self.serializer or JsonSerializer(), message_class(view.name), _NO_MESSAGES, None
        )
        by_cursor: dict[str, list[tuple[str, int, int, str | None, float | None]]] = {}
        for row in state.pending:
            by_cursor.setdefault(row[0], []).append(row)
        events = None
        views = []
        consumers = self._consumers(db, view.name)
        for name, position, settings in state.cursors:
            rows = by_cursor.get(name, [])
            read_from = max(position, view.start_offset)
            if settings.event_filter.match_all:
                lag = view.end_offset - read_from
            else:
                if events is None:
                    events = self._event_counts(db, view)
                lag = sum(1 for event, offset in events if offset >= read_from and settings.event_filter.matches(event))
            views.append(
                CursorView(
                    queue=view.name,
                    name=name,
                    settings=settings,
                    position=position,
                    lag=lag,
                    pending=len(rows),
                    held=sum(1 for r in rows if r[3] is not None and r[4] is None),
                    waiting=sum(1 for r in rows if r[4] is not None),
                    ready=sum(1 for r in rows if r[3] is None and r[4] is None),
                    redelivering=sum(1 for r in rows if r[2] > 1),
                    consumers=None if consumers is None else consumers.get(name, 0),
                )
            )
        return views

    def _consumers(self, db: sqlite3.Connection, queue: str) -> dict[str, int] | None:
        """Consumers attached in live brokers, by durable subscription of ``queue`` (None before schema 5)."""
        if self.version < 5:
            return None
        try:
            rows = db.execute(
                "SELECT name, broker, count(*) FROM consumers WHERE queue = ? GROUP BY name, broker", (queue,)
            ).fetchall()
        except sqlite3.DatabaseError as error:
            what = f"the consumers of {queue!r}"
            raise StorageError(f"{self.path!r}: cannot read {what} (SQLite says: {error})") from error
        counts: dict[str, int] = {}
        alive: dict[str, bool | None] = {}
        for name, broker, count in rows:
            if type(name) is not str or type(broker) is not str:
                continue
            if broker not in alive:
                alive[broker] = broker_alive(self.path, broker)
            if alive[broker] is not False:  # alive, or cannot be told (Windows): counted
                counts[name] = counts.get(name, 0) + count
        return counts

    def _event_counts(self, db: sqlite3.Connection, view: QueueView) -> list[tuple[str, int]]:
        """``(event, offset)`` of each retained message: what a filtered cursor's lag counts from its position."""
        try:
            rows = db.execute(
                'SELECT event, "offset" FROM messages WHERE queue = ? AND "offset" >= ?',
                (view.name, view.start_offset),
            ).fetchall()
        except sqlite3.DatabaseError as error:
            raise StorageError(f"{self.path!r}: cannot read queue {view.name!r} (SQLite says: {error})") from error
        return [(event, offset) for event, offset in rows if type(event) is str and type(offset) is int]

    def pending(self, queue: str, name: str) -> list[PendingView]:
        """Each pending message of the durable subscription ``name`` of ``queue``, by offset.

        Raises:
            NotFound: there is no such queue or subscription.
        """
        with self._reading() as db:
            view = self._queue_locked(db, queue)
            self._cursor_locked(db, view, name)
            state = read_changes(
                db, self.path, self.serializer or JsonSerializer(), message_class(queue), _NO_MESSAGES, None
            )
            rows = [row for row in state.pending if row[0] == name]
            since: dict[int, float | None] = {}
            if "since" in self._pending_columns:
                for offset, taken in db.execute(
                    'SELECT "offset", since FROM pending WHERE queue = ? AND name = ?', (queue, name)
                ):
                    since[offset] = float(taken) if type(taken) in (int, float) else None
            events = {row[0]: row[1] for row in read_message_rows(db, self.path, queue, [row[1] for row in rows])}
        alive: dict[str, bool | None] = {}
        views = []
        for _, offset, attempts, owner, due in rows:
            if owner is not None and owner not in alive:
                alive[owner] = broker_alive(self.path, owner)
            views.append(
                PendingView(
                    offset=offset,
                    event=events.get(offset),
                    attempts=attempts,
                    owner=owner,
                    alive=None if owner is None else alive[owner],
                    due=due,
                    since=since.get(offset),
                )
            )
        return views

    # -- messages ----------------------------------------------------------------------------

    def messages(
        self, queue: str, from_offset: int, *, events: EventFilter | None = None, limit: int = _PAGE
    ) -> tuple[list[Message], int]:
        """Up to ``limit`` messages of ``queue`` from ``from_offset`` on that ``events`` matches.

        Returns them and the offset to read from next (past every offset looked at). Offsets
        below the queue's start are skipped: retention dropped them.

        Raises:
            NotFound: there is no queue ``queue``.
            StorageError: a message cannot be decoded, or no serializer is known for the file.
        """
        serializer = self._decoder()
        cls = message_class(queue)
        found: list[Message] = []
        with self._reading() as db:
            view = self._queue_locked(db, queue)
            offset = max(from_offset, view.start_offset)
            while offset < view.end_offset and len(found) < limit:
                stop = min(offset + _PAGE, view.end_offset)
                for row in read_message_rows(db, self.path, queue, range(offset, stop)):
                    if events is None or events.matches(row[1]):
                        found.append(decode_row(serializer, cls, row, self.path))
                        if len(found) == limit:
                            return found, row[0] + 1
                offset = stop
        return found, offset

    def resolve(self, queue: str, target: Literal["earliest", "latest"] | int | datetime) -> int:
        """The offset ``target`` names in ``queue``, as a subscription's ``start`` would.

        Raises:
            NotFound: there is no queue ``queue``.
            StorageError: an offset past the queue's end.
        """
        with self._reading() as db:
            view = self._queue_locked(db, queue)
            if target == "earliest":
                return view.start_offset
            if target == "latest":
                return view.end_offset
            if isinstance(target, datetime):
                first = self._int(
                    db,
                    'SELECT min("offset") FROM messages WHERE queue = ? AND "offset" >= ? AND timestamp >= ?',
                    (queue, view.start_offset, target.timestamp()),
                    f"queue {queue!r}",
                )
                return view.end_offset if first is None else int(first)
            if not isinstance(target, int) or target < 0 or target > view.end_offset:
                raise NotFound(
                    f"offset {target!r} is outside queue {queue!r}, whose offsets run from 0 to {view.end_offset}"
                )
            return max(target, view.start_offset)

    def _decoder(self) -> Serializer:
        if self.serializer is None:
            raise StorageError(
                f"{self.path!r} was written with the {self.stored_serializer!r} serializer, which this "
                "inspector was not given, so its messages cannot be decoded"
            )
        return self.serializer

    # -- brokers -----------------------------------------------------------------------------

    def brokers(self) -> list[BrokerView]:
        """The live brokers that have the file open (from their lock files), by instance id."""
        try:
            names = os.listdir(brokers_folder(self.path))
        except OSError:
            return []
        live = []
        for name in sorted(names):
            if not name.endswith(".lock"):
                continue  # a lock file being made (.lock.new), or not mqlite's
            instance = name[: -len(".lock")]
            if broker_alive(self.path, instance) is False:
                continue
            pid = instance.split("-", 1)[0]
            live.append(BrokerView(instance, int(pid) if pid.isdigit() else None))
        return live

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._db.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def compact(path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> tuple[int, int]:
    """Reclaim the free space of the mqlite file ``path``: checkpoint the WAL, ``VACUUM``, truncate the WAL.

    Brokers may have the file open: ``VACUUM`` rewrites pages, not what they hold (every table
    is ``WITHOUT ROWID`` or keyed by its columns), and waits up to ``busy_timeout`` for the write
    lock like any writer. Returns the bytes of the file and its WAL before and after.

    Raises:
        StorageError: the file is not an mqlite file (checked read-only first), or SQLite failed;
            a failed ``VACUUM`` changes nothing.
    """
    where = os.fspath(path)
    Inspector(where).close()  # the same checks as every read command, before anything is written
    before = _size(where)
    try:
        db = sqlite3.connect(where, isolation_level=None, timeout=busy_timeout)
    except sqlite3.Error as error:
        raise StorageError(f"cannot open {where!r} (SQLite says: {error})") from error
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        # Readers of other brokers may keep part of the WAL in use; then it is truncated later.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:
        raise StorageError(f"cannot compact {where!r} (SQLite says: {error}); nothing was changed") from error
    finally:
        db.close()
    return before, _size(where)


def _size(path: str) -> int:
    total = 0
    for name in (path, f"{path}-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(name)
    return total
