"""Reading an mqlite file: the queues it holds, what one queue holds, and single messages.

Plain functions over a connection; the store (:class:`~mqlite.engine.sqlite.store.SqliteStore`)
calls them with its lock held, so that what they read is one consistent state.

Every row is checked as it is read. A file damaged past what SQLite checks on open raises
:class:`~mqlite.errors.StorageError` naming the file, the table and the row, and what is wrong:
a page SQLite finds damaged, a table or column gone, a settings column whose JSON does not parse
or lacks a key or holds a value of the wrong type, a column of the wrong type, a gap in a
queue's offsets, a message the serializer cannot decode.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import attrs

from mqlite.config import QueueConfig, SubscriptionSettings
from mqlite.engine.codec import Serializer, decode_row
from mqlite.engine.sqlite.log import QueueState
from mqlite.errors import MqliteError, StorageError
from mqlite.message import Message

__all__ = ["read_changes", "read_message_rows", "read_queues"]

# The keys of the JSON objects in queues.config and cursors.settings: exactly those mqlite writes.
_CONFIG_KEYS = frozenset(attrs.fields_dict(QueueConfig))
# Settings added after schema version 1, which older files' configs lack (they take the defaults).
_CONFIG_ADDED = frozenset({"dedup_window", "dedup_max_ids"})
_SETTINGS_KEYS = frozenset(SubscriptionSettings().to_stored())

# The type SQLite returns for each column mqlite reads (None for NULL), where a row is checked.
_QUEUE_COLUMNS = (("name", (str,)), ("start_offset", (int,)))
_CURSOR_COLUMNS = (("name", (str,)), ("position", (int,)))
_DEDUP_COLUMNS = (("id", (str,)), ("offset", (int,)), ("at", (float,)))
_PENDING_COLUMNS = (
    ("name", (str,)),
    ("offset", (int,)),
    ("attempts", (int,)),
    ("owner", (str, type(None))),
    ("due", (float, type(None))),
)
_MESSAGE_COLUMNS = (("offset", (int,)), ("event", (str,)), ("timestamp", (float,)))  # row[0], row[1], row[5]
_TYPE_NAMES = {int: "an integer", float: "a real", str: "a text", bytes: "a blob", type(None): "NULL"}

_SELECT_FROM = 'SELECT "offset", event, payload, key, headers, timestamp FROM messages WHERE queue = ? AND "offset" '


def read_queues(db: sqlite3.Connection, path: str) -> list[tuple[str, QueueConfig]]:
    """Every stored queue with its retention settings, by name.

    Raises:
        StorageError: the file is damaged: the table cannot be read, or a row is not what mqlite writes.
    """
    try:
        rows = db.execute("SELECT name, start_offset, config FROM queues ORDER BY name").fetchall()
    except sqlite3.DatabaseError as error:
        raise _read_failed(path, "the queues table", error) from error
    return [(row[0], _queue_row(path, row)) for row in rows]


def read_changes(
    db: sqlite3.Connection, path: str, serializer: Serializer, cls: type[Message], end: int, dedup_from: int | None
) -> QueueState:
    """What the file holds for the queue whose Message class is ``cls``: its settings, messages
    from ``end`` on (as ``cls``), cursors, pending rows and the dedup ids of offsets from
    ``dedup_from`` on (none if it is None: an older file, read only, may lack the table).

    Raises:
        StorageError: the file is damaged: a row is not what mqlite writes, the stored offsets
            have a gap, or SQLite cannot read it.
    """
    queue = cls._queue
    try:
        queue_row = db.execute("SELECT name, start_offset, config FROM queues WHERE name = ?", (queue,)).fetchone()
        if queue_row is None:
            raise StorageError(_corrupt_row(path, "queues", f"queue {queue!r}", "it is gone"))
        config = _queue_row(path, queue_row)
        start = queue_row[1]
        first = max(start, end)
        rows = db.execute(_SELECT_FROM + '>= ? ORDER BY "offset"', (queue, first)).fetchall()
        cursor_rows = db.execute(
            "SELECT name, position, settings FROM cursors WHERE queue = ? ORDER BY name", (queue,)
        ).fetchall()
        pending = db.execute(
            'SELECT name, "offset", attempts, owner, due FROM pending WHERE queue = ? ORDER BY name, "offset"',
            (queue,),
        ).fetchall()
        dedup = (
            []
            if dedup_from is None
            else db.execute(
                'SELECT id, "offset", at FROM dedup WHERE queue = ? AND "offset" >= ? ORDER BY "offset"',
                (queue, dedup_from),
            ).fetchall()
        )
    except sqlite3.DatabaseError as error:
        raise _read_failed(path, f"queue {queue!r}", error) from error
    for row in dedup:
        problem = _wrong_column(row, _DEDUP_COLUMNS)
        if problem is not None:
            raise StorageError(_corrupt_row(path, "dedup", f"dedup id {row[0]!r} of queue {queue!r}", problem))
    cursors = [_cursor_row(path, queue, row) for row in cursor_rows]
    for row in pending:
        problem = _wrong_column(row, _PENDING_COLUMNS)
        if problem is not None:
            where = f"offset {row[1]!r} of subscription {row[0]!r} of queue {queue!r}"
            raise StorageError(_corrupt_row(path, "pending", where, problem))
    messages = []
    for expected, row in enumerate(rows, first):
        if row[0] != expected or type(row[1]) is not str or type(row[5]) is not float:
            _check_message_row(path, queue, row)  # a column of the wrong type; if not, a gap
            raise StorageError(f"{path!r} is corrupt: queue {queue!r} jumps from offset {expected - 1} to {row[0]}")
        messages.append(decode_row(serializer, cls, row, path))
    return QueueState(start, config, messages, cursors, pending, dedup)


def read_pending_rows(
    db: sqlite3.Connection, path: str, queue: str, name: str
) -> list[tuple[int, int, str | None, float | None, float | None]]:
    """``(offset, attempts, owner, due, since)`` of each pending row of cursor ``name`` of ``queue``.

    Raises:
        StorageError: a row is not what mqlite writes, or SQLite cannot read it.
    """
    try:
        rows = db.execute(
            'SELECT name, "offset", attempts, owner, due, since FROM pending WHERE queue = ? AND name = ? '
            'ORDER BY "offset"',
            (queue, name),
        ).fetchall()
    except sqlite3.DatabaseError as error:
        raise _read_failed(path, f"the pending messages of {name!r} of queue {queue!r}", error) from error
    out = []
    for row in rows:
        problem = _wrong_column(row, _PENDING_COLUMNS) or _wrong_column(row[5:], (("since", (float, type(None))),))
        if problem is not None:
            where = f"offset {row[1]!r} of subscription {row[0]!r} of queue {queue!r}"
            raise StorageError(_corrupt_row(path, "pending", where, problem))
        out.append((row[1], row[2], row[3], row[4], row[5]))
    return out


def read_message_rows(db: sqlite3.Connection, path: str, queue: str, offsets: Sequence[int]) -> list[Sequence[Any]]:
    """The stored rows of ``queue`` at ``offsets``, for :func:`decode_row`; offsets no longer stored are left out.

    Raises:
        StorageError: the file is damaged: a row is not what mqlite writes, or SQLite cannot read it.
    """
    try:
        rows = [db.execute(_SELECT_FROM + "= ?", (queue, offset)).fetchone() for offset in offsets]
    except sqlite3.DatabaseError as error:
        raise _read_failed(path, f"queue {queue!r}", error) from error
    found = [row for row in rows if row is not None]
    for row in found:
        _check_message_row(path, queue, row)
    return found


# -- checking rows -----------------------------------------------------------------------------


def _queue_row(path: str, row: Sequence[Any]) -> QueueConfig:
    """The retention settings of a ``queues`` row ``(name, start_offset, config)``, once the row is checked."""
    problem = _wrong_column(row, _QUEUE_COLUMNS)
    if problem is None:
        try:
            return _config(row[2]) if type(row[2]) is str else _queue_config(row[2])
        except _Bad as error:
            problem = str(error)
        except (MqliteError, TypeError, ValueError) as error:
            problem = f"config: {error}"
    raise StorageError(_corrupt_row(path, "queues", f"queue {row[0]!r}", problem))


def _cursor_row(path: str, queue: str, row: Sequence[Any]) -> tuple[str, int, SubscriptionSettings]:
    """A ``cursors`` row ``(name, position, settings)`` with its settings read, once the row is checked."""
    name, position, stored = row
    problem = _wrong_column(row, _CURSOR_COLUMNS)
    if problem is None:
        try:
            return name, position, _settings(stored) if type(stored) is str else _subscription_settings(stored)
        except _Bad as error:
            problem = str(error)
        except (MqliteError, KeyError, TypeError, ValueError) as error:
            problem = f"settings: {error}"
    raise StorageError(_corrupt_row(path, "cursors", f"subscription {name!r} of queue {queue!r}", problem))


def _check_message_row(path: str, queue: str, row: Sequence[Any]) -> None:
    """Raise if a ``messages`` row's offset, event or timestamp is not of the type mqlite writes."""
    problem = _wrong_column((row[0], row[1], row[5]), _MESSAGE_COLUMNS)
    if problem is not None:
        raise StorageError(_corrupt_row(path, "messages", f"offset {row[0]!r} of queue {queue!r}", problem))


def _queue_config(stored: object) -> QueueConfig:
    return QueueConfig(**_json_object(stored, "config", _CONFIG_KEYS, _CONFIG_ADDED))


def _subscription_settings(stored: object) -> SubscriptionSettings:
    return SubscriptionSettings.from_stored(_json_object(stored, "settings", _SETTINGS_KEYS))


# Cached by the stored text (the records are immutable): on a shared file, each operation after
# another broker's commit re-reads every row of the queue and its cursors, and checking and
# parsing a cursor's settings costs about 20 us (a queue's config 8 us); an unchanged row costs a
# dict lookup (measured: a refresh of one queue with two cursors, 107 us -> 51 us). A row that
# fails raises, and is not cached.
_config = functools.lru_cache(maxsize=1024)(_queue_config)
_settings = functools.lru_cache(maxsize=1024)(_subscription_settings)


class _Bad(Exception):
    """What is wrong with a stored JSON object; the caller says which row holds it."""


def _json_object(
    stored: object, column: str, keys: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The JSON object ``stored``, which must have exactly ``keys`` (those in ``optional`` may be missing).

    Raises:
        _Bad: saying what is wrong with it.
    """
    if type(stored) is not str:
        raise _Bad(f"{column} is {stored!r}, not a text")
    try:
        value = json.loads(stored)
    except ValueError as error:
        raise _Bad(f"{column} is not valid JSON ({error}): {stored[:80]!r}") from error
    if type(value) is not dict:
        raise _Bad(f"{column} is {value!r}, not a JSON object")
    if value.keys() != keys and not (value.keys() <= keys and keys - value.keys() <= optional):
        missing = _keys(keys - value.keys() - optional)
        unknown = _keys(value.keys() - keys, "unknown ")
        parts = [f"lacks {missing}" if missing else "", f"has {unknown}" if unknown else ""]
        raise _Bad(f"{column} {' and '.join(part for part in parts if part)}")
    return value


def _keys(keys: set[str] | frozenset[str], kind: str = "") -> str:
    """``keys`` as a person reads them: "the key 'a'", "the unknown keys 'a', 'b'"; empty if none."""
    if not keys:
        return ""
    return f"the {kind}key{'s' if len(keys) > 1 else ''} {', '.join(repr(key) for key in sorted(keys))}"


def _wrong_column(row: Sequence[Any], columns: Sequence[tuple[str, tuple[type, ...]]]) -> str | None:
    """What is wrong with the types of the first columns of ``row``, if anything."""
    for value, (column, kinds) in zip(row, columns, strict=False):
        if type(value) not in kinds:
            return f"{column} is {value!r}, not {' or '.join(_TYPE_NAMES[kind] for kind in kinds)}"
    return None


def _corrupt_row(path: str, table: str, row: str, problem: str) -> str:
    return f"{path!r} is corrupt: in table {table}, the row of {row}: {problem}"


def _read_failed(path: str, what: str, error: sqlite3.DatabaseError) -> StorageError:
    """The error to raise when SQLite fails reading ``what``: damage, or (say) an I/O error."""
    code = getattr(error, "sqlite_errorname", "")
    if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StorageError(
            f"{path!r} is corrupt: a page of it is damaged (SQLite says: {error}), found reading {what}"
        )
    if str(error).startswith("no such"):  # a table or column dropped since the file was opened
        return StorageError(f"{path!r} is corrupt: reading {what} failed (SQLite says: {error})")
    return StorageError(f"cannot read {what} from {path!r} (SQLite says: {error})")
