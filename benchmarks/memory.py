"""Scenario 8: bytes per retained message beyond its payload, measured with tracemalloc."""

from __future__ import annotations

import gc
import queue
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from typing import Any

import mqlite
from benchmarks.harness import Case, Figures, Mode, Scenario, Target

__all__ = ["memory_scenario"]

# One payload object shared by every message, so its own size is not counted.
PAYLOAD = {"id": 1, "name": "widget"}


def _traced(n: int, build: Callable[[], Any]) -> Figures:
    """Bytes per message that ``build()`` allocated and still holds, per tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return {"bytes per message": (after - before) / n}


def memory_scenario(mode: Mode) -> Scenario:
    """8. Memory per retained message at n messages: mqlite against the plain containers."""
    n = {"full": 1_000_000, "quick": 100_000, "smoke": 500}[mode]

    def mqlite_queue() -> Any:
        broker = mqlite.Broker()
        publish = broker.queue("q", retention="limits").publish
        for _ in range(n):
            publish("e", PAYLOAD)
        return broker  # keeps the queue alive until measured

    def list_of_tuples() -> Any:
        clock = time.time
        return [("e", PAYLOAD, offset, clock()) for offset in range(n)]

    def deque_of_tuples() -> Any:
        clock = time.time
        return deque(("e", PAYLOAD, offset, clock()) for offset in range(n))

    def queue_of_tuples() -> Any:
        clock = time.time
        q: queue.Queue[tuple[str, Any, int, float]] = queue.Queue()
        put = q.put
        for offset in range(n):
            put(("e", PAYLOAD, offset, clock()))
        return q

    def measure(build: Callable[[], Any]) -> Figures:
        return _traced(n, build)

    return Scenario(
        key="memory",
        number=8,
        title="Memory per retained message",
        about=(
            f'Bytes that tracemalloc sees held per message after publishing {n:,} messages to a `retention="limits"` '
            "queue, every message carrying the same payload object (so the payload itself is not "
            "counted). The containers store the least a log needs, a tuple `(event, payload, offset, "
            "timestamp)` with its own int and float."
        ),
        units={"bytes per message": "B/msg"},
        cases=[
            Case("mqlite", lambda: measure(mqlite_queue)),
            Case("list of tuples", lambda: measure(list_of_tuples)),
            Case("deque of tuples", lambda: measure(deque_of_tuples)),
            Case("queue.Queue of tuples", lambda: measure(queue_of_tuples)),
        ],
        targets=[Target("memory: <= 150 bytes per retained message", "bytes per message", "<=", 150)],
        params={"messages": n},
    )
