"""Waiting in tests for a state of the broker, never for an amount of time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import mqlite

__all__ = ["wait_until_blocked"]


def _blocked_count(queue: mqlite.Queue) -> Callable[[], int] | None:
    """How to read the number of readers blocked on ``queue``, or None if it cannot be read.

    Public data first: a ``waiting`` count on the queue, if this version has one (an int, or a
    method returning one). Otherwise the length of today's private waiter list, ``_waiters``,
    the only place the in-memory and file-backed queues of this version keep it.
    """
    if getattr(queue, "waiting", None) is not None:

        def public() -> int:
            waiting = getattr(queue, "waiting", 0)
            return int(waiting() if callable(waiting) else waiting)

        return public
    if getattr(queue, "_waiters", None) is not None:
        return lambda: len(queue._waiters)
    return None


def wait_until_blocked(queue: mqlite.Queue, waiters: int = 1, timeout: float = 5.0) -> None:
    """Wait until at least ``waiters`` readers are blocked on ``queue``.

    Use it before the step a blocked reader should wake for (a publish, a close), so the test
    exercises the wake-up rather than a reader that had not started waiting yet. It returns as
    soon as the readers are blocked; it polls every millisecond.

    If this version of the queue exposes no waiter count, it returns at once: the test then
    still passes or fails on what the reader receives, only without the guarantee that the
    reader was blocked first.

    Raises:
        AssertionError: fewer than ``waiters`` readers were blocked after ``timeout`` seconds.
    """
    count = _blocked_count(queue)
    if count is None:
        return
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while count() < waiters:
        assert time.monotonic() < deadline, f"fewer than {waiters} readers blocked on {queue.name!r} after {timeout} s"
        pause.wait(0.001)
