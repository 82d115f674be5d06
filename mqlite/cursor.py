"""A subscription's cursor: its position, event filter, pending set and redelivery schedule."""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

import attrs

from mqlite.errors import InvalidArgument
from mqlite.filters import EventFilter
from mqlite.message import Message

__all__ = ["Backoff", "Cursor", "Pending"]

# Pending.state values.
OUT = 0  # handed to a consumer; waiting for its ack (or for its callback to return)
WAITING = 1  # failed; scheduled for redelivery at a due time
READY = 2  # due for redelivery to the next consumer that reads


@attrs.frozen
class Backoff:
    """Delay before redelivering a message whose push callback raised.

    The n-th failure waits ``min(initial * factor ** (n - 1), maximum)`` seconds of broker clock.
    """

    initial: float = attrs.field(default=0.1)
    factor: float = attrs.field(default=2.0)
    maximum: float = attrs.field(default=30.0)

    def __attrs_post_init__(self) -> None:
        if not self.initial >= 0 or not self.factor >= 1 or not self.maximum >= self.initial:
            raise InvalidArgument(f"Backoff needs initial >= 0, factor >= 1 and maximum >= initial, got {self!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed delivery (1-based)."""
        return float(min(self.initial * self.factor ** max(failures - 1, 0), self.maximum))


class Pending:
    """One delivered, unacknowledged message. Guarded by its queue's lock."""

    __slots__ = ("attempts", "deadline", "message", "owner", "state")

    def __init__(self, message: Message, attempts: int, owner: object | None, state: int) -> None:
        self.message = message
        self.attempts = attempts
        self.owner = owner
        self.state = state
        self.deadline = 0.0


class Cursor:
    """The shared state of every subscription with one name on one queue (or of one ephemeral one).

    Not thread-safe on its own: its queue's lock guards every field, and the queue calls the
    ``*_locked`` methods only while holding it.
    """

    def __init__(
        self,
        *,
        queue: str,
        name: str | None,
        event_filter: EventFilter,
        position: int,
        manual_ack: bool,
        ack_timeout: float | None,
        max_deliveries: int | None,
        dead_letter: str,
        backoff: Backoff,
    ) -> None:
        self.queue = queue
        self.name = name
        self.filter = event_filter
        # names: the known event names that pass the filter, or None for "every event".
        self.names: set[str] | None = None
        self.position = position
        self.manual_ack = manual_ack
        self.ack_timeout = ack_timeout
        self.max_deliveries = max_deliveries
        self.dead_letter = dead_letter
        self.backoff = backoff
        self.members: list[Any] = []
        self.pending: dict[int, Pending] = {}
        self.ready: deque[Pending] = deque()
        self._scheduled: list[tuple[float, int, Pending]] = []
        self._timeouts: deque[tuple[float, list[Pending]]] = deque()
        self._seq = 0
        # Shared files only: where entries made due again are noted, so other brokers can take them.
        self.released: list[tuple[Cursor, Pending]] | None = None
        # Files only: offsets dead-lettered whose pending row stays until the letter is published.
        self.dead_in_transit: set[int] = set()
        self.inflight = 0  # push batches taken and not yet reported done
        self.delivered = 0
        self.acked = 0
        self.redelivered = 0
        self.dead_lettered = 0
        self.missed = 0

    @property
    def durable(self) -> bool:
        """Named cursors outlive their subscriptions; ephemeral ones die with theirs."""
        return self.name is not None

    def settings(self) -> tuple[Any, ...]:
        """What every subscription attached to this cursor must agree on."""
        return (self.filter, self.manual_ack, self.ack_timeout, self.max_deliveries, self.dead_letter, self.backoff)

    # -- redelivery schedule -------------------------------------------------------------

    def clear_timers_locked(self) -> None:
        """Forget every timer and redelivery; called when nothing is pending any more."""
        self.ready.clear()
        self._scheduled.clear()
        self._timeouts.clear()

    def has_timers(self) -> bool:
        """Whether anything is scheduled to happen at a future time."""
        return bool(self._scheduled or self._timeouts)

    def next_due(self) -> float | None:
        """The earliest monotonic time at which a timer fires, or None."""
        due: float | None = None
        if self._scheduled:
            due = self._scheduled[0][0]
        if self._timeouts:
            deadline = self._timeouts[0][0]
            due = deadline if due is None else min(due, deadline)
        return due

    def track_timeout_locked(self, deadline: float, entries: list[Pending]) -> None:
        """Remember that ``entries`` must be acked by ``deadline`` (deadlines only grow)."""
        for entry in entries:
            entry.deadline = deadline
        self._timeouts.append((deadline, entries))

    def schedule_locked(self, entry: Pending, due: float) -> None:
        """Redeliver ``entry`` once the clock reaches ``due``."""
        entry.state = WAITING
        entry.owner = None
        entry.deadline = due
        self._seq += 1
        heapq.heappush(self._scheduled, (due, self._seq, entry))

    def make_ready_locked(self, entry: Pending, *, front: bool = False) -> None:
        """Queue ``entry`` for the next read."""
        entry.state = READY
        entry.owner = None
        if self.released is not None:
            self.released.append((self, entry))
        if front:
            self.ready.appendleft(entry)
        else:
            self.ready.append(entry)

    def expired_locked(self, now: float) -> list[Pending]:
        """Pop the timers that fired by ``now``.

        Returns the entries whose ack timeout passed; nack delays and backoffs that ended move to
        the ready queue here.
        """
        pending = self.pending
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, entry = heapq.heappop(self._scheduled)
            if entry.state == WAITING and pending.get(entry.message[2]) is entry:
                self.make_ready_locked(entry)
        timed_out: list[Pending] = []
        while self._timeouts and self._timeouts[0][0] <= now:
            deadline, entries = self._timeouts.popleft()
            for entry in entries:
                if entry.state == OUT and entry.deadline == deadline and pending.get(entry.message[2]) is entry:
                    timed_out.append(entry)
        return timed_out

    def pop_ready_locked(self) -> Pending | None:
        """The next entry due for redelivery that is still pending, or None."""
        ready = self.ready
        pending = self.pending
        while ready:
            entry = ready.popleft()
            if entry.state == READY and pending.get(entry.message[2]) is entry:
                return entry
        return None

    def unsettled_before_locked(self, offset: int) -> bool:
        """Whether a message below ``offset`` still waits for a retry or an in-flight push batch."""
        if self.inflight:
            return True
        return any(e.state != OUT and e.message[2] < offset for e in self.pending.values())
