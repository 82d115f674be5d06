"""Child-process bodies for the dedup tests (tests/test_dedup.py), on a file shared with the parent.

Kept apart from the test module so a child imports only mqlite, not pytest and hypothesis.
Every wait here is bounded, so a bug makes the parent's assertions fail instead of leaving a
process behind.

Run as a script (``python tests/dedup_processes.py retry PATH COUNT``) it is the SIGKILL test's
child: see :func:`publish_with_retries`.
"""

from __future__ import annotations

import sys
from typing import Any

import mqlite

# No child waits longer than this, whatever happens.
DEADLINE = 30.0


def publish_ids(path: str, count: int, ready: Any, results: Any) -> None:
    """Wait at ``ready`` with the other publishers, then publish ids ``id-0`` .. ``id-{count-1}``
    to queue ``q``, each with the pid as payload, alternating single publishes and pairs in one
    ``publish_many``. Puts ``[(id, offset), ...]`` of every returned message on ``results``."""
    import os

    got: list[tuple[str, int]] = []
    with mqlite.Broker(path) as broker:
        queue = broker.queue("q")
        ready.wait(DEADLINE)
        i = 0
        while i < count:
            if i % 3 == 2 and i + 1 < count:
                pair = [f"id-{i}", f"id-{i + 1}"]
                messages = queue.publish_many([("job", os.getpid(), None, None, dedup_id) for dedup_id in pair])
                got.extend(zip(pair, (m.offset for m in messages), strict=True))
                i += 2
            else:
                got.append((f"id-{i}", queue.publish("job", os.getpid(), dedup_id=f"id-{i}").offset))
                i += 1
    results.put(got)


def publish_with_retries(path: str, count: int) -> None:
    """Publish ``count`` messages ``i`` with dedup id ``m{i}`` to queue ``q``, each twice (a client
    retrying after a timeout), from the first each time it starts: in groups of 1, 2 and 3 in
    turn, a group of one with ``publish`` and a larger one with ``publish_many``, and each group
    retried whole. Writes on stdout ``ready`` once open, ``P i offset`` for each message of a
    group once its publish returned, ``R i offset`` once its retry returned, and ``done`` at the
    end. The parent kills it with SIGKILL at random lines."""
    out = sys.stdout
    broker = mqlite.Broker(path)
    queue = broker.queue("q")
    out.write("ready\n")
    out.flush()
    first = 0
    size = 1
    while first < count:
        group = range(first, min(first + size, count))
        for mark in "PR":
            if len(group) == 1:
                messages = [queue.publish("job", first, dedup_id=f"m{first}")]
            else:
                messages = queue.publish_many([("job", i, None, None, f"m{i}") for i in group])
            out.write("".join(f"{mark} {i} {m.offset}\n" for i, m in zip(group, messages, strict=True)))
            out.flush()
        first += len(group)
        size = size % 3 + 1
    broker.close()
    out.write("done\n")
    out.flush()


if __name__ == "__main__":
    if sys.argv[1:2] != ["retry"] or len(sys.argv) != 4:
        raise SystemExit("usage: dedup_processes.py retry PATH COUNT")
    publish_with_retries(sys.argv[2], int(sys.argv[3]))
