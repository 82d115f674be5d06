"""The in-memory log: a Python list and the offset of its first entry."""

from __future__ import annotations

from collections.abc import Sequence

from mqlite.message import Message

__all__ = ["MemoryLog"]


class MemoryLog:
    """Messages in a list, entry ``i`` holding offset ``first_offset + i``.

    Not thread-safe: used only under its queue's lock. Dropping a prefix costs a memmove of the
    rest, so the queue drops in large batches and the cost per message stays constant.
    """

    __slots__ = ("_entries", "_first", "append")

    def __init__(self, first_offset: int = 0) -> None:
        self._entries: list[Message] = []
        self._first = first_offset
        # Bound list.append: the publish hot path calls it with no Python frame in between.
        self.append = self._entries.append

    @property
    def first_offset(self) -> int:
        """The oldest offset still stored."""
        return self._first

    def extend(self, messages: Sequence[Message]) -> None:
        """Append messages whose offsets continue the log."""
        self._entries.extend(messages)

    def read(self, from_offset: int, to_offset: int) -> list[Message]:
        """Messages in ``[from_offset, to_offset)``; the caller keeps both inside the stored range."""
        first = self._first
        return self._entries[from_offset - first : to_offset - first]

    def get(self, offset: int) -> Message:
        """The message at ``offset``."""
        return self._entries[offset - self._first]

    def drop_before(self, offset: int) -> None:
        """Forget every message below ``offset``."""
        count = offset - self._first
        if count > 0:
            del self._entries[:count]
            self._first = offset

    def __len__(self) -> int:
        return len(self._entries)
