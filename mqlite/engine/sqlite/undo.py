"""Undoing a failed operation on a shared file: :class:`UndoLog`.

When an operation fails, its transaction is rolled back and the queue reloads what the file
holds (see :class:`~mqlite.engine.sqlite.sharing.FileLock`). What the file does not hold is put
back from here: each cursor's counters, members and in-transit sets, the cursors themselves, the
dead-letter outbox, the messages read ahead into consumers' buffers, and the state of every
pending entry the operation changed.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, WAITING, DeadLetter, Pending
from mqlite.engine.base import Consumer
from mqlite.message import Message

__all__ = ["UndoLog"]

_counters = attrgetter("delivered", "acked", "redelivered", "dead_lettered", "missed", "inflight")
"""A cursor's counters, in the order :meth:`UndoLog.undo` puts them back."""


class UndoLog:
    """What one operation changed that the file cannot restore. Used only under its queue's lock."""

    def __init__(self) -> None:
        # Each cursor's counters, members and in-transit sets when the operation began, and which
        # members were open; the cursors by name, and the ephemeral ones; the outbox's length.
        self._saved: list[tuple[Cursor, tuple[Any, ...]]] = []
        self._open: list[Consumer] = []
        self._cursors: dict[str, Cursor] = {}
        self._ephemeral: list[Cursor] = []
        self._outbox = 0
        # The entries it changed, with their state before (first change only), and the messages
        # it read ahead into consumers' buffers.
        self.touched: dict[Pending, tuple[Cursor, Any, object | None, int, float]] = {}
        self._buffered: list[tuple[Cursor, list[Message]]] = []
        # The queue's count of push batches out when the operation began (its _push_out).
        self.push_out = 0

    def begin(self, queue: Any) -> None:
        """An operation of ``queue`` (a SqliteQueue) begins: remember what the file cannot
        restore if it fails (its cursors, ephemeral cursors, outbox and push batches out)."""
        # Every operation on a file comes here, straight from its FileLock, so the snapshot is
        # one loop, the counters read in C by one attrgetter, the sets copied only when they
        # hold something.
        cursors: dict[str, Cursor] = queue._cursors
        ephemeral: list[Cursor] = queue._ephemeral
        self.push_out = queue._push_out
        saved: list[tuple[Cursor, tuple[Any, ...]]] = []
        opened: list[Consumer] = []
        for group in (cursors.values(), ephemeral) if ephemeral else (cursors.values(),):
            for cursor in group:
                members = cursor.members
                saved.append(
                    (
                        cursor,
                        (
                            _counters(cursor),
                            members[:],
                            set(cursor.dead_in_transit) if cursor.dead_in_transit else None,
                            set(cursor.pushing) if cursor.pushing else None,
                        ),
                    )
                )
                for member in members:
                    if not member.closed:
                        opened.append(member)
        self._saved = saved
        self._open = opened
        self._cursors = dict(cursors)
        self._ephemeral = ephemeral[:]
        self._outbox = len(queue._outbox)
        if self.touched:
            self.touched.clear()
        if self._buffered:
            self._buffered.clear()

    def touch(self, cursor: Cursor, entry: Pending) -> None:
        """Remember an entry's state before the running operation changes it (first change only)."""
        if entry not in self.touched:
            self.touched[entry] = (cursor, entry.state, entry.owner, entry.attempts, entry.deadline)

    def took(self, cursor: Cursor, out: list[Message]) -> None:
        """The operation read ``out`` ahead into the buffers of ``cursor``'s members."""
        self._buffered.append((cursor, out))

    def undo(self, cursors: dict[str, Cursor], ephemeral: list[Cursor], outbox: list[DeadLetter]) -> None:
        """Put back the counters, members, cursors, outbox and buffers a failed operation changed."""
        for cursor, saved in self._saved:
            counters, members, in_transit, pushing = saved
            (
                cursor.delivered,
                cursor.acked,
                cursor.redelivered,
                cursor.dead_lettered,
                cursor.missed,
                cursor.inflight,
            ) = counters
            cursor.members[:] = members
            cursor.dead_in_transit = in_transit if in_transit is not None else set()
            cursor.pushing = pushing if pushing is not None else set()
        for member in self._open:
            if member.closed:
                member._reopen()  # closed by the operation that failed: a close can be called again
        cursors.clear()
        cursors.update(self._cursors)
        ephemeral[:] = self._ephemeral
        del outbox[self._outbox :]
        for cursor, out in self._buffered:
            taken = {id(message) for message in out}
            for member in cursor.members:
                buffer = member._buffer
                for message in [m for m in buffer if id(m) in taken]:
                    buffer.remove(message)
        self._buffered.clear()

    def restore_pending(
        self, cursors: dict[str, Cursor], rows: dict[tuple[str, int], tuple[int, str | None]], me: str
    ) -> None:
        """After a reload, before loading pending rows: undo the failed operation's changes to entries.

        ``rows`` are the file's pending rows, ``(attempts, owner)`` by cursor name and offset, and
        ``me`` this broker's name in the owner column. An entry that memory has out but the file
        says is due again goes back to the front of the line, in order.
        """
        front: dict[Cursor, list[Pending]] = {}
        for entry, (cursor, entry_state, owner, attempts, deadline) in self.touched.items():
            if cursor.name is None or (cursor.name, entry.message[2]) not in rows:
                continue
            cursor.pending[entry.message[2]] = entry
            entry.attempts = attempts
            if entry_state == OUT:
                entry.state = OUT
                entry.owner = owner
                entry.deadline = deadline
                if cursor.ack_timeout is not None:
                    cursor.schedule.track_timeout(deadline, [entry])
            elif entry_state == WAITING:
                cursor.schedule.wait_until(entry, deadline)
            else:
                front.setdefault(cursor, []).append(entry)
        touched = self.touched
        for name, cursor in cursors.items():
            for offset, entry in cursor.pending.items():
                row = rows.get((name, offset))
                if row is None or entry in touched:
                    continue
                entry.attempts = row[0]
                if entry.state == OUT and row[1] != me:
                    front.setdefault(cursor, []).append(entry)  # the failed operation took it
        for cursor, entries in front.items():
            entries.sort(key=lambda entry: entry.message[2])
            for i, entry in enumerate(entries):
                cursor.schedule.insert_ready(i, entry)
        touched.clear()
