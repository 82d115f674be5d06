"""The duplicate window: which dedup ids a queue still remembers, and where each was published.

As in JetStream's duplicate window, an id is remembered for ``window`` seconds of broker clock
from its first publish; a duplicate refused within the window does not extend it. The window is
also bounded by a count: past ``max_ids`` ids the oldest are forgotten first, so a queue's memory
(and its file) stays bounded whatever the publish rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqlite.errors import InvalidArgument

if TYPE_CHECKING:
    from mqlite.message import Message

__all__ = ["DedupWindow", "check_dedup_id"]


def check_dedup_id(dedup_id: object) -> str:
    """``dedup_id`` as a plain str.

    Raises:
        InvalidArgument: it is not a non-empty str.
    """
    if type(dedup_id) is not str:
        if not isinstance(dedup_id, str):
            raise InvalidArgument(
                f"dedup_id must be a non-empty str or None, got {type(dedup_id).__name__}: {dedup_id!r}"
            )
        dedup_id = str.__str__(dedup_id)  # a plain str: a subclass's __hash__ and __eq__ are user code
    if not dedup_id:
        raise InvalidArgument("dedup_id must be a non-empty str or None, got ''")
    return dedup_id


class DedupWindow:
    """The dedup ids one queue remembers. Not thread-safe: used under its queue's lock.

    ``ids`` maps each id to the message first published with it, in the order they were first
    published: a dict keeps insertion order, so the oldest are at its front and forgetting the
    expired ones needs no second structure. A value is the message itself (no allocation per
    publish), or, for an id loaded from storage, a mark of the same shape whose event is None:
    ``value[2]`` is always the offset and ``value[3]`` the time of the first publish. The memory
    publish path adds to ``ids`` itself, as :meth:`add` does; an id is added only once
    :meth:`find` said it is not (or no longer) there.
    """

    __slots__ = ("forgot", "ids", "max_ids", "window")

    def __init__(self, window: float, max_ids: int) -> None:
        self.window = window
        self.max_ids = max_ids
        self.ids: dict[str, Message] = {}
        # Whether an id was forgotten since the owner last pruned its stored ids (it clears this).
        self.forgot = False

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, dedup_id: str, now: float) -> Message | None:
        """The first message (or mark) of ``dedup_id``, if it was published within the window before ``now``.

        An id whose window ended is forgotten here, so that adding it again puts it last.
        """
        ids = self.ids
        found = ids.get(dedup_id)
        if found is None:
            return None
        if found[3] + self.window <= now:
            del ids[dedup_id]
            self.forgot = True
            return None
        return found

    def add(self, dedup_id: str, first: Message) -> None:
        """Remember that ``dedup_id`` (not remembered now) was first published as ``first`` (a message or a mark)."""
        ids = self.ids
        ids[dedup_id] = first
        if len(ids) > self.max_ids:
            self.expire(first[3])

    def expire(self, now: float) -> None:
        """Forget the ids whose window ended by ``now``, and the oldest past ``max_ids``.

        Costs what it forgets, plus the holes earlier deletions left at the dict's front (which
        the dict drops when it next grows).
        """
        ids = self.ids
        cutoff = now - self.window
        excess = len(ids) - self.max_ids
        gone: list[str] = []
        for dedup_id, first in ids.items():
            if first[3] > cutoff and len(gone) >= excess:
                break
            gone.append(dedup_id)
        for dedup_id in gone:
            del ids[dedup_id]
        if gone:
            self.forgot = True

    def oldest_offset(self) -> int | None:
        """The offset of the oldest id still remembered (None if none is)."""
        for first in self.ids.values():
            offset: int = first[2]
            return offset
        return None

    def resize(self, window: float, max_ids: int) -> None:
        """Apply new bounds (the queue's settings changed)."""
        self.window = window
        self.max_ids = max_ids

    def clear(self) -> None:
        """Forget every id (the queue reloads them from its file)."""
        self.ids.clear()
