"""Pending entries: one delivered, unsettled message of one cursor, and the states it moves through.

Transitions (every other one is a bug)::

    (new)   --take, manual ack or push-->        OUT
    OUT     --ack / push callback returned-->    SETTLED
    OUT     --failure, no delay-->               READY
    OUT     --failure with a delay-->            WAITING
    OUT     --failure, deliveries used up-->     SETTLED (dead-lettered)
    WAITING --its due time passed-->             READY
    READY   --take-->                            OUT
    READY   --ack (after a give-back)-->         SETTLED
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

from mqlite.message import Message

__all__ = ["OUT", "READY", "SETTLED", "WAITING", "DeadLetter", "EntryState", "Pending"]


class EntryState(enum.IntEnum):
    """Where a pending entry is in its life."""

    OUT = 0
    """Handed to a consumer; waiting for its ack (or for its callback to return)."""
    WAITING = 1
    """Failed; scheduled for redelivery at a due time."""
    READY = 2
    """Due for redelivery to the next consumer that reads."""
    SETTLED = 3
    """Acked or dead-lettered: no longer pending. Stale references see this and skip it."""


# Module-level names: the hot paths compare against a global, not an attribute of the enum.
OUT = EntryState.OUT
WAITING = EntryState.WAITING
READY = EntryState.READY
SETTLED = EntryState.SETTLED


class Pending:
    """One delivered, unsettled message. Not thread-safe: guarded by its engine's queue scope.

    ``deadline`` is the monotonic time its ack timeout fires (state OUT) or its delay ends
    (state WAITING); ``owner`` is the consumer holding it while OUT, since ``since`` (the clock's
    wall time of the take; 0.0 when unknown).
    """

    __slots__ = ("attempts", "deadline", "message", "owner", "since", "state")

    def __init__(
        self, message: Message, attempts: int, owner: object | None, state: EntryState, since: float = 0.0
    ) -> None:
        self.message = message
        self.attempts = attempts
        self.owner = owner
        self.state = state
        self.deadline = 0.0
        self.since = since

    @property
    def offset(self) -> int:
        """The offset of its message."""
        offset: int = self.message[2]
        return offset

    def __repr__(self) -> str:
        return f"<Pending offset={self.message[2]} {self.state.name} attempts={self.attempts}>"


@attrs.frozen
class DeadLetter:
    """A message on its way to a dead-letter queue, with the headers that say where it came from."""

    queue: str
    message: Message
    headers: Mapping[str, Any]
    # The durable cursor whose pending row on the file stays until the letter is published.
    subscription: str | None = None
