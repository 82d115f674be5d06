"""Where a queue's log lives, behind one small protocol.

The in-memory broker keeps messages in :class:`~mqlite.storage.memory.MemoryLog`. A durable or
remote log implements the same protocol; the queue above it never knows which one it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from mqlite.message import Message

__all__ = ["LogStorage"]


class LogStorage(Protocol):
    """An append-only run of messages with contiguous offsets.

    Not thread-safe: its owner (a :class:`~mqlite.queue.Queue`) calls it only under its lock.
    ``first_offset`` is the oldest offset still physically stored; the queue decides what is
    logically retained and calls :meth:`drop_before` to reclaim the rest.
    """

    append: Callable[[Message], None]
    """Append one message whose offset is the current end. Hot path: an attribute, not a method."""

    @property
    def first_offset(self) -> int: ...

    def extend(self, messages: Sequence[Message]) -> None: ...

    def read(self, from_offset: int, to_offset: int) -> list[Message]: ...

    def get(self, offset: int) -> Message: ...

    def drop_before(self, offset: int) -> None: ...

    def __len__(self) -> int: ...
