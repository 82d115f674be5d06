"""Child-process bodies (spawn) for the Redis tests: each opens ``mqlite.Broker(url, namespace=...)``.

The URL carries the engine's options as query parameters (``redis://host:port/0?heartbeat=0.5``).
Every loop in a child is bounded by a deadline, so a bug makes the parent's assertions fail
instead of leaving a process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import mqlite
from tests.processes import compete

DEADLINE = 30.0


def consume(url: str, namespace: str, acks: Any, ready: Any, stop: Any, nack_every: int) -> None:
    """Compete on subscription ``workers`` of ``q``: ack each message, nack every ``nack_every``-th once first.

    Waits at ``ready`` once subscribed. Puts ``(pid, offset)`` on ``acks`` for each message acked,
    and ``("done", count)`` once ``stop`` is set and nothing is left to read.
    """
    with mqlite.Broker(url, namespace=namespace) as broker:
        compete(broker, acks, ready, stop, nack_every, lambda message: message.offset, poll=0.1)


def wait_for_one(url: str, namespace: str, ready: Any, results: Any) -> None:
    """Subscribe to ``q`` as ``reader``, signal ``ready``, block for one message; report it and how long it took."""
    with mqlite.Broker(url, namespace=namespace) as broker:
        sub = broker.subscribe("q", name="reader")
        ready.set()
        began = time.monotonic()
        message = sub.get(timeout=10.0)
        results.put((time.monotonic() - began, None if message is None else message.payload))


def take_and_hang(url: str, namespace: str, count: int, results: Any) -> None:
    """Take ``count`` messages of ``workers`` without acking them, report them, then wait to be killed."""
    broker = mqlite.Broker(url, namespace=namespace)
    sub = broker.subscribe("q", name="workers", ack="manual")
    results.put([message.offset for message in sub.poll(max_messages=count, timeout=5.0)])
    threading.Event().wait(DEADLINE)  # the parent kills this process long before


def read_and_hang(url: str, namespace: str, results: Any) -> None:
    """Open an ephemeral reader of ``q`` (it pins interest retention), report, then wait to be killed."""
    broker = mqlite.Broker(url, namespace=namespace)
    broker.subscribe("q")
    results.put("reading")
    threading.Event().wait(DEADLINE)  # the parent kills this process long before
