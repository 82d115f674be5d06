"""Waiting in tests for a state of the broker, never for an amount of time."""

from __future__ import annotations

import threading
import time

import mqlite

__all__ = ["wait_until_blocked"]


def wait_until_blocked(queue: mqlite.Queue, waiters: int = 1, timeout: float = 5.0) -> None:
    """Wait until at least ``waiters`` readers are blocked on ``queue`` (``queue.waiting``).

    Use it before the step a blocked reader should wake for (a publish, a close), so the test
    exercises the wake-up rather than a reader that had not started waiting yet. It returns as
    soon as the readers are blocked; it polls every millisecond.

    Raises:
        AssertionError: fewer than ``waiters`` readers were blocked after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while queue.waiting < waiters:
        assert time.monotonic() < deadline, f"fewer than {waiters} readers blocked on {queue.name!r} after {timeout} s"
        pause.wait(0.001)
