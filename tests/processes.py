"""Child-process bodies for the shared-file tests (``multiprocessing``, spawn start method).

Kept apart from the test modules so a child imports only mqlite, not pytest and hypothesis.
Every loop here is bounded by a deadline, so a bug makes the parent's assertions fail instead
of leaving a process behind.
"""

from __future__ import annotations

import os
import time
from typing import Any

import mqlite

# No child runs longer than this, whatever happens.
DEADLINE = 30.0


def publish(path: str, writer: int, count: int) -> None:
    """Publish ``count`` messages ``[writer, i]`` to queue ``q``, one at a time."""
    with mqlite.Broker(path) as broker:
        for i in range(count):
            broker.publish("q", "job", [writer, i])


def consume(path: str, acks: Any, ready: Any, stop: Any, nack_every: int) -> None:
    """Compete on subscription ``workers`` of ``q``: ack each message, nack every ``nack_every``-th first.

    Waits at the ``ready`` barrier once subscribed. Puts ``(pid, payload)`` on ``acks`` for each
    message acked, and ``("done", count)`` once ``stop`` is set and nothing is left to read.
    """
    count = 0
    nacked: set[int] = set()
    deadline = time.monotonic() + DEADLINE
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="workers", ack="manual")
        ready.wait(DEADLINE)
        while time.monotonic() < deadline:
            message = sub.get(timeout=0.05)
            if message is None:
                if stop.is_set():
                    break
                continue
            if nack_every and message.offset % nack_every == 0 and message.offset not in nacked:
                nacked.add(message.offset)
                sub.nack(message)
                continue
            sub.ack(message)
            count += 1
            acks.put((os.getpid(), message.payload))
    acks.put(("done", count))


def take_and_hang(path: str, count: int, took: Any, results: Any) -> None:
    """Take ``count`` messages of ``workers`` without acking them, report them, then wait to be killed."""
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="workers", ack="manual")
        payloads = [message.payload for message in sub.poll(max_messages=count, timeout=5.0)]
        results.put(payloads)
        took.set()
        time.sleep(DEADLINE)  # the parent kills this process long before


def wait_for_one(path: str, ready: Any, results: Any) -> None:
    """Block on ``get`` of subscription ``reader`` until a message arrives; report it and the time."""
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="reader")
        ready.set()
        message = sub.get(timeout=DEADLINE)
        results.put((None if message is None else message.payload, time.time()))
