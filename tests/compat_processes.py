"""Child processes for tests/test_compat.py: a persist-queue-style consumer of a compat Queue on a file.

Run as ``python -m tests.compat_processes consume PATH`` with the repository as working
directory. Kept apart from the test module so that a child imports only mqlite. Every loop is
bounded by a deadline, so a bug fails the parent's assertions instead of leaving a process behind.

It prints one line per step, flushed at once: ``ready``, then ``got N`` when it has item N and
``done N`` once ``task_done()`` for it returned (the ack is on the file), then ``finished``
when no item is unfinished. The parent kills it with SIGKILL at some line and starts another.
"""

from __future__ import annotations

import sys
import time

import mqlite
from mqlite.compat import Empty, Queue

DEADLINE = 60.0
"""No child runs longer than this, whatever happens."""


def consume(path: str) -> None:
    """Take, "process" and mark done every item of queue ``jobs``, until none is unfinished."""
    deadline = time.monotonic() + DEADLINE
    with mqlite.Broker(path) as broker, Queue(broker=broker, name="jobs") as jobs:
        print("ready", flush=True)
        while jobs.unfinished_tasks and time.monotonic() < deadline:
            try:
                # A killed consumer's items come back once its broker's lock is seen gone.
                item = jobs.get(timeout=0.2)
            except Empty:
                continue
            print("got", item, flush=True)
            jobs.task_done()
            print("done", item, flush=True)
        print("finished" if not jobs.unfinished_tasks else "deadline", flush=True)


if __name__ == "__main__":
    command, path = sys.argv[1:3]
    if command != "consume":
        raise SystemExit(f"unknown command {command!r}")
    consume(path)
