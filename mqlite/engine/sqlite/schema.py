"""The layout of an mqlite file, the checks made on opening one, its upgrades and its pragmas.

Layout of the file (schema version 6):

- ``mqlite_schema(version, serializer)``: one row. A file without it is not an mqlite file.
- ``queues(name, start_offset, config)``: every queue, the offset below which its messages were
  reclaimed, and its retention settings (JSON).
- ``messages(queue, offset, event, payload, key, headers, timestamp)``: the log. Payload, key and
  headers are encoded by the broker's serializer (JSON by default).
- ``cursors(queue, name, position, settings)``: every durable (named) cursor.
- ``pending(queue, name, offset, attempts, owner, due)``: each durable cursor's delivered,
  unsettled messages, how many times each was delivered, which broker holds it (NULL: due for
  redelivery to whoever reads next), and for a nacked message waiting out its delay, the wall-clock
  time (seconds since the epoch) before which it is not redelivered, and since when its holder
  has it. Version 1 files lack ``owner`` and ``due``, version 2 files ``due``, version 3 files
  ``since``; all are upgraded on open.
- ``consumers(queue, name, broker, subscription, push, since)``: each subscription attached to a
  durable cursor, by the broker instance that has it (the ``owner`` of ``pending``), so that every
  broker's ``info()`` counts the consumers of all; rows of a dead broker are ignored, then deleted.
  Added in version 5 (older files get it, empty, on open).
- ``dedup(queue, offset, id, at)``: the duplicate window of each queue: the offset of each message
  published with a ``dedup_id`` within it, the id, and when it was published (the clock's wall
  time). Written in the transaction of the message itself; pruned past the window. Brokers look
  ids up in memory, where each keeps the window it loaded and the rows other brokers added
  since (read by offset, the key), so the table needs no second index. Added in version 6.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Literal

from mqlite.engine.sqlite.sharing import _transaction, brokers_folder
from mqlite.errors import StorageError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "WAL_AUTOCHECKPOINT",
    "Synchronous",
    "check_access",
    "check_layout",
    "check_or_create",
    "configure",
    "unreadable",
    "upgrade",
]

SCHEMA_VERSION = 6
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
    owner TEXT, due REAL, since REAL, PRIMARY KEY (queue, name, "offset")
) WITHOUT ROWID;
CREATE TABLE consumers (
    queue TEXT NOT NULL, name TEXT NOT NULL, broker TEXT NOT NULL, subscription INTEGER NOT NULL,
    push INTEGER NOT NULL, since REAL NOT NULL, PRIMARY KEY (queue, name, broker, subscription)
) WITHOUT ROWID;
CREATE TABLE dedup (
    queue TEXT NOT NULL, "offset" INTEGER NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (queue, "offset")
) WITHOUT ROWID;
"""
_CONSUMERS = _SCHEMA[_SCHEMA.index("CREATE TABLE consumers") : _SCHEMA.index("CREATE TABLE dedup")]
_DEDUP = _SCHEMA[_SCHEMA.index("CREATE TABLE dedup") :]

# The columns of each table, in order, as _SCHEMA makes them; and those an older version lacks
# (upgrades only add columns).
_COLUMNS = {
    "mqlite_schema": ("version", "serializer"),
    "queues": ("name", "start_offset", "config"),
    "messages": ("queue", "offset", "event", "payload", "key", "headers", "timestamp"),
    "cursors": ("queue", "name", "position", "settings"),
    "pending": ("queue", "name", "offset", "attempts", "owner", "due", "since"),
    "consumers": ("queue", "name", "broker", "subscription", "push", "since"),
    "dedup": ("queue", "offset", "id", "at"),
}
_ADDED_IN = {("pending", "owner"): 2, ("pending", "due"): 3, ("pending", "since"): 4}
_TABLE_ADDED_IN = {"consumers": 5, "dedup": 6}

# The first 16 bytes of every SQLite database.
_SQLITE_MAGIC = b"SQLite format 3\x00"

# commit="each": a publisher checkpoints the WAL itself only once it passes this many pages (16 MiB
# of 4 KiB pages); until then the watcher does it on its own connection (sharing.CHECKPOINT_EVERY).
WAL_AUTOCHECKPOINT = 4096

Synchronous = Literal["normal", "full"]


def check_or_create(
    db: sqlite3.Connection, path: str, serializer: str, synchronous: Synchronous, *, shared: bool
) -> None:
    """Check that ``db`` is an mqlite file written with ``serializer``, or lay out an empty one.

    Also sets the pragmas (:func:`configure`) and upgrades an older layout (:func:`upgrade`).

    Raises:
        StorageError: the file is not an mqlite file, is corrupt (a damaged page, a missing table
            or column, a schema row of the wrong type), was written by a newer mqlite, or with
            another serializer. The file is left untouched.
    """
    version = SCHEMA_VERSION
    # Read-only probes first: nothing is written until the file is known to be ours.
    # One read transaction, so both probes see the same state even while another broker lays
    # out a new file: else the tables could appear between them, without the application id.
    try:
        db.execute("BEGIN")
        try:
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            columns: dict[str, tuple[str, ...]] = {}
            for table, column in db.execute(
                "SELECT m.name, c.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS c "
                "WHERE m.type = 'table' ORDER BY m.name, c.cid"
            ):
                columns[table] = (*columns.get(table, ()), column)
        finally:
            db.execute("COMMIT")  # it wrote nothing
    except sqlite3.DatabaseError as error:
        raise StorageError(unreadable(path, error)) from error
    if columns or application_id:
        if application_id != APPLICATION_ID:
            raise StorageError(f"{path!r} is an SQLite database but not an mqlite file; it was left untouched")
        version = check_layout(db, path, serializer, columns)
    configure(db, path, synchronous, shared=shared)
    if columns and version < SCHEMA_VERSION:
        try:
            upgrade(db, version)
        except sqlite3.Error as error:
            raise StorageError(f"cannot upgrade {path!r} from schema version {version}: {error}") from error
    if not columns:
        with _transaction(db):
            # Another broker may have laid the file out between the look above and this lock
            # (two processes opening a new file at once): then check what it wrote instead.
            laid_out = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
            if not laid_out:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO mqlite_schema (version, serializer) VALUES (?, ?)",
                    (SCHEMA_VERSION, serializer),
                )
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if laid_out:
            check_or_create(db, path, serializer, synchronous, shared=shared)


def check_layout(db: sqlite3.Connection, path: str, serializer: str, columns: dict[str, tuple[str, ...]]) -> int:
    """The schema version of the file mqlite's ``application_id`` marks, once its layout is checked.

    ``columns`` are those of each table of the file. Tables mqlite does not know (SQLite's own,
    such as ``sqlite_stat1`` after an ``ANALYZE``) are allowed.
    """
    if "mqlite_schema" not in columns:
        raise StorageError(_corrupt(path, "it has no mqlite_schema table"))
    try:
        rows = db.execute("SELECT version, serializer FROM mqlite_schema").fetchall()
    except sqlite3.DatabaseError as error:
        raise StorageError(unreadable(path, error)) from error
    if len(rows) != 1:
        raise StorageError(_corrupt(path, f"its mqlite_schema table has {len(rows)} rows, not one"))
    version, stored_serializer = rows[0]
    if type(version) is not int or version < 1:
        raise StorageError(_corrupt(path, f"its schema version is {version!r}, not a positive integer"))
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"{path!r} has mqlite schema version {version}, newer than the {SCHEMA_VERSION} "
            "this mqlite understands; upgrade mqlite to open it (the file was left untouched)"
        )
    if type(stored_serializer) is not str:
        raise StorageError(_corrupt(path, f"its serializer name is {stored_serializer!r}, not a str"))
    for table, expected in _COLUMNS.items():
        if _TABLE_ADDED_IN.get(table, 1) > version:
            continue
        found = columns.get(table)
        if found is None:
            raise StorageError(_corrupt(path, f"it has no {table} table"))
        expected = tuple(column for column in expected if _ADDED_IN.get((table, column), 1) <= version)
        if found != expected:
            raise StorageError(
                _corrupt(path, f"its {table} table has the columns {found}, not {expected} (schema version {version})")
            )
    if stored_serializer != serializer:
        raise StorageError(
            f"{path!r} was written with the {stored_serializer!r} serializer; open it with "
            f"serializer={stored_serializer!r}-compatible settings, not {serializer!r}"
        )
    return version


def _corrupt(path: str, problem: str) -> str:
    return f"{path!r} is a corrupt mqlite file: {problem}; it was left untouched"


def unreadable(path: str, error: sqlite3.DatabaseError) -> str:
    """What to say when SQLite cannot read ``path``: a file it could not read is never called foreign."""
    code = getattr(error, "sqlite_errorname", "")
    if code == "SQLITE_NOTADB":
        try:
            with open(path, "rb") as file:
                magic = file.read(len(_SQLITE_MAGIC))
        except OSError:
            magic = b""
        if magic == _SQLITE_MAGIC:
            return f"{path!r} is corrupt: its SQLite header is damaged (SQLite says: {error}); it was left untouched"
        return (
            f"{path!r} is not an SQLite database (SQLite says: {error}), so not an mqlite file, unless "
            "its first page was overwritten; it was left untouched"
        )
    if code.startswith("SQLITE_CORRUPT"):
        return f"{path!r} is corrupt: a page of it is damaged (SQLite says: {error}); it was left untouched"
    return f"cannot read {path!r} (SQLite says: {error}); it was left untouched"


def check_access(path: str) -> None:
    """Refuse, before SQLite opens it, a file that mqlite could read but not write.

    mqlite writes to every file it opens; in WAL mode SQLite keeps ``<path>-wal`` and
    ``<path>-shm`` beside it, and each broker keeps a lock file in ``<path>-brokers/``. Left to
    SQLite, a read-only file would fail at its first write, and a read-only folder would make a
    good file look unreadable.

    Raises:
        StorageError: saying what is not writable and why mqlite needs it; nothing was changed.
    """
    if os.path.isfile(path):
        if not _may(path, os.R_OK):
            raise StorageError(f"{path!r} cannot be read: permission denied; it was left untouched")
        if not _may(path, os.W_OK):
            raise StorageError(
                f"{path!r} is read-only: mqlite writes to every file it opens (offsets, deliveries, acks), "
                "so it cannot open it; make it writable, or open a writable copy. It was left untouched"
            )
    folder = os.path.dirname(os.path.abspath(path))
    brokers = brokers_folder(path)
    made = [path, f"{path}-wal", f"{path}-shm", brokers]
    to_make = [os.path.basename(name) for name in made if not os.path.exists(name)]
    if to_make and os.path.isdir(folder) and not _may(folder, os.W_OK | os.X_OK):
        raise StorageError(
            f"the folder {folder!r} is not writable, and opening {path!r} creates {', '.join(to_make)} in it "
            "(SQLite's WAL files beside the file, and mqlite's folder of broker lock files); make the "
            "folder writable. Nothing was changed"
        )
    if os.path.isdir(brokers) and not _may(brokers, os.W_OK | os.X_OK):
        raise StorageError(
            f"the folder {brokers!r} is not writable: mqlite keeps a lock file there for each broker "
            f"that has {path!r} open; make it writable. Nothing was changed"
        )


def _may(path: str, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def upgrade(db: sqlite3.Connection, version: int) -> None:
    """Bring an older file up to :data:`SCHEMA_VERSION`, in one transaction."""
    with _transaction(db):
        if version < 2:
            db.execute("ALTER TABLE pending ADD COLUMN owner TEXT")
        if version < 3:
            db.execute("ALTER TABLE pending ADD COLUMN due REAL")
        if version < 4:
            db.execute("ALTER TABLE pending ADD COLUMN since REAL")
        if version < 5:
            db.execute(_CONSUMERS.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1).rstrip().rstrip(";"))
        if version < 6:
            db.execute(_DEDUP.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1).rstrip().rstrip(";"))
        db.execute("UPDATE mqlite_schema SET version = ?", (SCHEMA_VERSION,))


def configure(db: sqlite3.Connection, path: str, synchronous: Synchronous, *, shared: bool) -> None:
    """Set the pragmas: WAL, ``synchronous``, and for a new file incremental auto-vacuum.

    A ``shared`` (``commit="each"``) file also gets a larger autocheckpoint threshold.
    """
    try:
        if not _has_tables(db):
            # Only a new file may choose this: it must precede the first table.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise StorageError(f"cannot open {path!r}: {error}") from error
    if str(mode).lower() != "wal":
        raise StorageError(f"{path!r}: SQLite refused WAL mode (got {mode!r}); is it on a network share?")
    db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    if shared:
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")


def _has_tables(db: sqlite3.Connection) -> bool:
    return bool(db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
