"""The retention floor: which offsets a queue must still keep, and when to look again."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mqlite.config import QueueConfig

__all__ = [
    "HOUSEKEEP_EVERY",
    "MIN_RECLAIM",
    "interest_floor",
    "limit_floor",
    "next_check",
    "refuses",
    "should_reclaim",
    "workqueue_floor",
]

HOUSEKEEP_EVERY = 1024
"""Housekeeping runs every this many publishes, or every 4 per cursor if that is more, so its
O(cursors) cost stays O(1) per publish."""

MIN_RECLAIM = 4096
"""Reclaim a dropped prefix once it is this long and a quarter of what is retained: each reclaim
moves the retained entries once, so the amortised cost per message is constant."""


def limit_floor(start: int, end: int, config: QueueConfig, now: float, timestamp_at: Callable[[int], float]) -> int:
    """The oldest offset the count and age limits allow, never below ``start``.

    ``timestamp_at(offset)`` gives a retained message's timestamp; ``now`` is the broker clock's
    wall time.
    """
    if config.max_messages is not None and config.overflow == "drop_oldest" and end - config.max_messages > start:
        start = end - config.max_messages
    if config.max_age is not None:
        cutoff = now - config.max_age
        while start < end and timestamp_at(start) < cutoff:
            start += 1
    return start


def interest_floor(start: int, end: int, config: QueueConfig, positions: Iterable[int]) -> int:
    """With ``retention="interest"``, nothing below the slowest cursor is kept (all of it if none)."""
    if config.retention != "interest":
        return start
    slowest = min(positions, default=end)
    return slowest if slowest > start else start


def workqueue_floor(start: int, end: int, config: QueueConfig, marks: Iterable[int]) -> int:
    """With ``retention="workqueue"``, nothing below the lowest of ``marks`` is kept.

    ``marks`` are, for each cursor, its position and its lowest pending offset, and the oldest
    retained message that no durable cursor's filter matches (kept for the first that will).
    With no mark (no cursor at all) everything is kept: jobs wait for their first worker.
    """
    if config.retention != "workqueue":
        return start
    lowest = min(marks, default=start)
    return lowest if lowest > start else start


def should_reclaim(first: int, start: int, end: int) -> bool:
    """Whether the dropped prefix ``[first, start)`` is worth freeing now."""
    return start - first >= max(MIN_RECLAIM, (end - start) // 4)


def next_check(start: int, end: int, cursors: int, config: QueueConfig) -> int:
    """The end offset at which a publish must housekeep again (or find the queue full)."""
    check_at = end + max(HOUSEKEEP_EVERY, 4 * cursors)
    if config.overflow == "reject" and config.max_messages is not None:
        check_at = min(check_at, start + config.max_messages)
    return check_at


def refuses(start: int, end: int, count: int, config: QueueConfig) -> bool:
    """Whether ``overflow="reject"`` refuses ``count`` more messages."""
    limit = config.max_messages
    return config.overflow == "reject" and limit is not None and end + count - start > limit
