"""Undoing a failed operation on a shared file: :class:`UndoLog`.

When an operation fails, its transaction is rolled back and the queue reloads what the file
holds (see :class:`~mqlite.engine.sqlite.sharing.FileLock`). What the file does not hold is put
back from here: each cursor's counters, members and in-transit sets, the cursors themselves, the
dead-letter outbox, the messages read ahead into consumers' buffers, and the state of every
pending entry the operation changed.
"""

from __future__ import annotations

from typing import Any

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, WAITING, DeadLetter, Pending
from mqlite.engine.base import Consumer
from mqlite.message import Message

__all__ = ["UndoLog"]


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

    def begin(
        self, cursors: dict[str, Cursor], ephemeral: list[Cursor], outbox: list[DeadLetter], push_out: int
    ) -> None:
        """An operation begins: remember what the file cannot restore if it fails."""
        self.push_out = push_out
        self._saved = [
            (
                cursor,
                (
                    cursor.delivered,
                    cursor.acked,
                    cursor.redelivered,
                    cursor.dead_lettered,
                    cursor.missed,
                    cursor.inflight,
                    list(cursor.members),
                    set(cursor.dead_in_transit) if cursor.dead_in_transit else None,
                    set(cursor.pushing) if cursor.pushing else None,
                ),
            )
            for cursor in [*cursors.values(), *ephemeral]
        ]
        self._cursors = dict(cursors)
        self._ephemeral = list(ephemeral)
        self._open = [member for cursor, _ in self._saved for member in cursor.members if not member.closed]
        self._outbox = len(outbox)
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
            (
                cursor.delivered,
                cursor.acked,
                cursor.redelivered,
                cursor.dead_lettered,
                cursor.missed,
                cursor.inflight,
                members,
                in_transit,
                pushing,
            ) = saved
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
