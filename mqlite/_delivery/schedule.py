"""The redelivery schedule of one cursor: what is due now, what waits for a time, what times out.

All times are the broker clock's monotonic seconds, passed in: nothing here reads a clock.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from mqlite._delivery.entries import OUT, READY, WAITING, Pending

__all__ = ["Schedule"]


class Schedule:
    """Due redeliveries in order, delays waiting for their time, and ack timeouts. Not thread-safe.

    ``pending`` is the cursor's map of offset to entry; an entry found here but no longer in it
    (settled, or replaced) is stale and skipped, so settling never has to search the schedule.
    ``on_ready``, when set, is told of every entry made READY (a shared file saves them so that
    other brokers may take them).
    """

    __slots__ = ("_scheduled", "_seq", "_timeouts", "on_ready", "pending", "ready")

    def __init__(self, pending: dict[int, Pending]) -> None:
        self.pending = pending
        self.ready: deque[Pending] = deque()
        self._scheduled: list[tuple[float, int, Pending]] = []
        self._timeouts: deque[tuple[float, list[Pending]]] = deque()
        self._seq = 0
        self.on_ready: Callable[[Pending], object] | None = None

    def clear(self) -> None:
        """Forget every timer and redelivery; called when nothing is pending any more."""
        self.ready.clear()
        self._scheduled.clear()
        self._timeouts.clear()

    def has_timers(self) -> bool:
        """Whether anything is scheduled to happen at a future time."""
        return bool(self._scheduled or self._timeouts)

    def next_due(self) -> float | None:
        """The earliest time at which a timer fires, or None."""
        due: float | None = None
        if self._scheduled:
            due = self._scheduled[0][0]
        if self._timeouts:
            deadline = self._timeouts[0][0]
            due = deadline if due is None or deadline < due else due
        return due

    def track_timeout(self, deadline: float, entries: list[Pending]) -> None:
        """Remember that ``entries`` must be acked by ``deadline`` (deadlines only grow)."""
        for entry in entries:
            entry.deadline = deadline
        self._timeouts.append((deadline, entries))

    def wait_until(self, entry: Pending, due: float) -> None:
        """Redeliver ``entry`` once the clock reaches ``due``: it becomes WAITING."""
        entry.state = WAITING
        entry.owner = None
        entry.deadline = due
        self._seq += 1
        heapq.heappush(self._scheduled, (due, self._seq, entry))

    def make_ready(self, entry: Pending, *, front: bool = False) -> None:
        """Queue ``entry`` for the next read: it becomes READY."""
        entry.state = READY
        entry.owner = None
        if self.on_ready is not None:
            self.on_ready(entry)
        if front:
            self.ready.appendleft(entry)
        else:
            self.ready.append(entry)

    def insert_ready(self, index: int, entry: Pending) -> None:
        """Put ``entry`` back at ``index`` of the line, as READY, without telling ``on_ready``."""
        entry.state = READY
        entry.owner = None
        self.ready.insert(index, entry)

    def expire(self, now: float) -> list[Pending]:
        """Fire the timers due by ``now``.

        Delays that ended move their entries to the ready line. Returns the entries whose ack
        timeout passed: the caller treats each as a failed delivery.
        """
        pending = self.pending
        scheduled = self._scheduled
        while scheduled and scheduled[0][0] <= now:
            item = heapq.heappop(scheduled)
            due, _, entry = item
            if entry.state == WAITING and entry.deadline == due and pending.get(entry.message[2]) is entry:
                self.make_ready(entry)
        timed_out: list[Pending] = []
        timeouts = self._timeouts
        while timeouts and timeouts[0][0] <= now:
            deadline, entries = timeouts.popleft()
            for entry in entries:
                if entry.state == OUT and entry.deadline == deadline and pending.get(entry.message[2]) is entry:
                    timed_out.append(entry)
        return timed_out

    def due_before(self, offset: int) -> bool:
        """Whether an entry of a message below ``offset`` waits to be redelivered (READY or WAITING)."""
        pending = self.pending
        for entry in self.ready:
            at = entry.message[2]
            if at < offset and entry.state == READY and pending.get(at) is entry:
                return True
        for _, _, entry in self._scheduled:
            at = entry.message[2]
            if at < offset and entry.state == WAITING and pending.get(at) is entry:
                return True
        return False

    def pop_ready(self) -> Pending | None:
        """The next entry due for redelivery that is still pending, or None."""
        ready = self.ready
        pending = self.pending
        while ready:
            entry = ready.popleft()
            if entry.state == READY and pending.get(entry.message[2]) is entry:
                return entry
        return None
