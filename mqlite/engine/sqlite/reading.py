"""Reading an mqlite file: the queues it holds, what one queue holds, and single messages.

Plain functions over a connection; the store (:class:`~mqlite.engine.sqlite.store.SqliteStore`)
calls them with its lock held, so that what they read is one consistent state.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from mqlite.engine.codec import Serializer, decode_row
from mqlite.engine.sqlite.log import QueueState
from mqlite.errors import StorageError

__all__ = ["read_changes", "read_message_rows", "read_queues"]

_SELECT_FROM = 'SELECT "offset", event, payload, key, headers, timestamp FROM messages WHERE queue = ? AND "offset" '


def read_queues(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Every stored queue with its retention settings, by name."""
    rows = db.execute("SELECT name, config FROM queues ORDER BY name").fetchall()
    return [(name, json.loads(config)) for name, config in rows]


def read_changes(db: sqlite3.Connection, path: str, serializer: Serializer, queue: str, end: int) -> QueueState:
    """What the file holds for ``queue``: its settings, messages from ``end`` on, cursors, pending rows.

    Raises:
        StorageError: the stored offsets have a gap.
    """
    start, config = db.execute("SELECT start_offset, config FROM queues WHERE name = ?", (queue,)).fetchone()
    first = max(start, end)
    rows = db.execute(_SELECT_FROM + '>= ? ORDER BY "offset"', (queue, first)).fetchall()
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
            raise StorageError(f"{path!r} is corrupt: queue {queue!r} jumps from offset {expected - 1} to {row[0]}")
        messages.append(decode_row(serializer, queue, row, path))
    return QueueState(start, json.loads(config), messages, cursors, pending)


def read_message_rows(db: sqlite3.Connection, queue: str, offsets: Sequence[int]) -> list[Sequence[Any]]:
    """The stored rows of ``queue`` at ``offsets``, for :func:`decode_row`; offsets no longer stored are left out."""
    rows = [db.execute(_SELECT_FROM + "= ?", (queue, offset)).fetchone() for offset in offsets]
    return [row for row in rows if row is not None]
