"""The layout of an mqlite file, the checks made on opening one, its upgrades and its pragmas.

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
"""

from __future__ import annotations

import sqlite3
from typing import Literal

from mqlite.engine.sqlite.sharing import _transaction
from mqlite.errors import StorageError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "WAL_AUTOCHECKPOINT",
    "Synchronous",
    "check_or_create",
    "configure",
    "upgrade",
]

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
        StorageError: the file is not an mqlite file, is corrupt, was written by a newer mqlite,
            or with another serializer. The file is left untouched.
    """
    version = SCHEMA_VERSION
    # Read-only probes first: nothing is written until the file is known to be ours.
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise StorageError(f"{path!r} is not an mqlite file (SQLite says: {error}); it was left untouched") from error
    if tables or application_id:
        if "mqlite_schema" not in tables or application_id != APPLICATION_ID:
            raise StorageError(f"{path!r} is an SQLite database but not an mqlite file; it was left untouched")
        try:
            version, stored_serializer = db.execute("SELECT version, serializer FROM mqlite_schema").fetchone()
        except (sqlite3.DatabaseError, TypeError) as error:
            raise StorageError(f"{path!r} has a damaged mqlite_schema table: {error}") from error
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{path!r} has mqlite schema version {version}, newer than the {SCHEMA_VERSION} "
                "this mqlite understands; upgrade mqlite to open it (the file was left untouched)"
            )
        if stored_serializer != serializer:
            raise StorageError(
                f"{path!r} was written with the {stored_serializer!r} serializer; open it with "
                f"serializer={stored_serializer!r}-compatible settings, not {serializer!r}"
            )
    configure(db, path, synchronous, shared=shared)
    if tables and version < SCHEMA_VERSION:
        upgrade(db, version)
    if not tables:
        with _transaction(db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO mqlite_schema (version, serializer) VALUES (?, ?)",
                (SCHEMA_VERSION, serializer),
            )
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def upgrade(db: sqlite3.Connection, version: int) -> None:
    """Bring an older file up to :data:`SCHEMA_VERSION`, in one transaction."""
    with _transaction(db):
        if version < 2:
            db.execute("ALTER TABLE pending ADD COLUMN owner TEXT")
        if version < 3:
            db.execute("ALTER TABLE pending ADD COLUMN due REAL")
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
