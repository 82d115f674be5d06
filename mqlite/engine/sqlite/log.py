"""One queue's view of the open file: :class:`SqliteLog`, and :class:`QueueState`, what the file holds.

The store (:class:`~mqlite.engine.sqlite.store.SqliteStore`) owns the connection; a log only
calls it, with its queue's name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mqlite.engine.codec import Fields
from mqlite.engine.memory_log import MemoryLog
from mqlite.engine.sqlite.writer import (
    _DELETE_PENDING,
    _DROP_MESSAGES,
    _INSERT,
    _INSERT_DEDUP,
    _PRUNE_DEDUP,
    _SET_POSITION,
    _UPSERT_PENDING,
    _Op,
)
from mqlite.message import Message

if TYPE_CHECKING:
    from mqlite.config import QueueConfig, SubscriptionSettings
    from mqlite.engine.sqlite.store import SqliteStore

__all__ = ["QueueState", "SqliteLog"]


class QueueState:
    """One queue as stored: what :meth:`~mqlite.engine.sqlite.store.SqliteStore.changes` read. A plain record."""

    __slots__ = ("config", "cursors", "dedup", "messages", "pending", "start")

    def __init__(
        self,
        start: int,
        config: QueueConfig,
        messages: list[Message],
        cursors: list[tuple[str, int, SubscriptionSettings]],
        pending: list[tuple[str, int, int, str | None, float | None]],
        dedup: list[tuple[str, int, float]],
    ) -> None:
        self.start = start
        self.config = config
        self.messages = messages  # from the requested offset on, in order
        self.cursors = cursors  # (name, position, settings)
        self.pending = pending  # (cursor name, offset, attempts, owner or None, due or None), by name and offset
        self.dedup = dedup  # (id, offset, first published at) from the requested offset on, by offset


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

    def write(
        self,
        messages: Sequence[Message],
        fields: Sequence[Fields],
        dedup: Sequence[tuple[str, int, float]] | None = None,
    ) -> None:
        """Append messages whose payload, key and headers were encoded before the lock, with the
        ``(id, offset, at)`` of their dedup ids: all or none."""
        queue = self.queue
        if len(messages) == 1 and len(fields) == 1:  # a publish of one, the usual write: no comprehension's frame
            message = messages[0]
            rows = [(queue, message[2], message[0], *fields[0], message[3])]
        else:
            rows = [(queue, m[2], m[0], *encoded, m[3]) for m, encoded in zip(messages, fields, strict=True)]
        if dedup:
            ids = [(queue, offset, dedup_id, at) for dedup_id, offset, at in dedup]
            if len(rows) == 1:
                self.store.insert_row(rows[0], ids[0])
            else:
                self.store.submit([(_INSERT, rows, True), (_INSERT_DEDUP, ids, True)])
        elif len(rows) == 1:
            self.store.insert_row(rows[0])
        else:
            self.store.submit([(_INSERT, rows, True)])
        self._cache.extend(messages)

    def prune_dedup(self, below: int) -> None:
        """Forget the dedup rows of offsets below ``below`` (their window ended)."""
        self.store.submit([(_PRUNE_DEDUP, (self.queue, below), False)])

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
        self.store.submit([(_INSERT, [encode(message) for message in messages], True)])
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

    def reset(self, start: int, messages: Sequence[Message]) -> None:
        """Forget the memory log and hold ``messages`` (the file's, from its oldest offset ``start``) instead."""
        cache = MemoryLog(start)
        cache.extend(messages)
        self._cache = cache
        self._cache_append = cache.append

    def read(self, from_offset: int, to_offset: int) -> list[Message]:
        """Messages in ``[from_offset, to_offset)``, from memory."""
        return self._cache.read(from_offset, to_offset)

    def get(self, offset: int) -> Message:
        """The message at ``offset``, from memory."""
        return self._cache.get(offset)

    def drop_before(self, offset: int) -> None:
        """Forget every message below ``offset``, in memory and (unless still pending) on disk."""
        self._cache.drop_before(offset)
        store = self.store
        if store.closed:
            return
        ops: list[_Op] = [
            ("UPDATE queues SET start_offset = max(start_offset, ?) WHERE name = ?", (offset, self.queue), False),
            (_DROP_MESSAGES, (self.queue, offset, self.queue), False),
        ]
        store.submit(ops, vacuum=True)

    def __len__(self) -> int:
        return len(self._cache)

    # -- what the queue persists besides messages ----------------------------------------

    def save_config(self, config: dict[str, Any]) -> None:
        """Remember the queue's retention settings."""
        self.store.submit([("UPDATE queues SET config = ? WHERE name = ?", (json.dumps(config), self.queue), False)])

    def save_cursor(self, name: str, position: int, settings: dict[str, Any]) -> None:
        """Create or update a durable cursor's position and settings."""
        sql = (
            "INSERT INTO cursors (queue, name, position, settings) VALUES (?, ?, ?, ?) ON CONFLICT "
            "(queue, name) DO UPDATE SET position = excluded.position, settings = excluded.settings"
        )
        self.store.submit([(sql, (self.queue, name, position, json.dumps(settings)), False)])

    def delete_cursor(self, name: str) -> None:
        """Forget a durable cursor and its pending rows (messages only it kept go at the next reclaim)."""
        queue = self.queue
        self.store.submit(
            [
                ("DELETE FROM pending WHERE queue = ? AND name = ?", (queue, name), False),
                ("DELETE FROM cursors WHERE queue = ? AND name = ?", (queue, name), False),
            ]
        )

    def save_consumer(self, name: str, subscription: int, *, push: bool, since: float) -> None:
        """Record that subscription ``subscription`` of this broker is attached to cursor ``name``."""
        sql = (
            "INSERT OR REPLACE INTO consumers (queue, name, broker, subscription, push, since) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        self.store.submit([(sql, (self.queue, name, self.store.instance, subscription, int(push), since), False)])

    def delete_consumer(self, name: str, subscription: int) -> None:
        """Forget that subscription ``subscription`` of this broker is attached to cursor ``name``."""
        sql = "DELETE FROM consumers WHERE queue = ? AND name = ? AND broker = ? AND subscription = ?"
        self.store.submit([(sql, (self.queue, name, self.store.instance, subscription), False)])

    def sync_cursor(
        self,
        name: str,
        position: int | None,
        upserts: Sequence[tuple[int, int, bool, float | None, float | None]],
        deletes: Sequence[int],
    ) -> None:
        """In one transaction: set the position (unless None), record ``(offset, attempts, held, due,
        since)`` pending (held: by this broker; otherwise due for whoever reads next; due: the
        wall-clock time a nacked message waits for, or None; since: the wall-clock time the
        holder took it, or None), forget ``deletes``."""
        queue = self.queue
        ops: list[_Op] = []
        if position is not None:
            ops.append((_SET_POSITION, (position, queue, name), False))
        # One row, the usual take or ack, is built without a comprehension's frame.
        if upserts:
            me = self.store.instance
            if len(upserts) == 1:
                offset, attempts, held, due, since = upserts[0]
                rows = [(queue, name, offset, attempts, me if held else None, due, since if held else None)]
            else:
                rows = [
                    (queue, name, offset, attempts, me if held else None, due, since if held else None)
                    for offset, attempts, held, due, since in upserts
                ]
            ops.append((_UPSERT_PENDING, rows, True))
        if deletes:
            doomed = [(queue, name, deletes[0])] if len(deletes) == 1 else [(queue, name, offset) for offset in deletes]
            ops.append((_DELETE_PENDING, doomed, True))
        if ops:
            self.store.submit(ops)
