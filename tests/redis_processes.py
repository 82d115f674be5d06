"""Opening brokers on the Redis engine in tests, and child-process bodies (spawn) for the Redis tests.

``open_broker(url)`` opens ``mqlite.Broker`` on :class:`~mqlite.engine.redis.engine.RedisEngine`
until ``Broker`` routes ``redis://`` URLs itself: the URL's fragment carries the namespace and
the engine's options, ``redis://host:port/0#namespace;heartbeat=0.5``. Every loop in a child is
bounded by a deadline, so a bug makes the parent's assertions fail instead of leaving a process.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import mqlite
from mqlite import broker as broker_module

DEADLINE = 30.0

_original_open_engine = broker_module._open_engine
_patch_lock = threading.Lock()  # guards the one-time patch of mqlite.broker._open_engine


def open_engine(path: str | None, **options: Any) -> Any:
    """``mqlite.broker._open_engine``, taught ``redis://`` URLs with a ``#namespace;option=value`` fragment."""
    if path is None or not path.startswith("redis://"):
        return _original_open_engine(path, **options)
    from mqlite.engine.redis.engine import RedisEngine

    url, _, fragment = path.partition("#")
    namespace, *pairs = fragment.split(";")
    settings = {key: float(value) for key, _, value in (pair.partition("=") for pair in pairs)}
    return RedisEngine(url, namespace=namespace or "mq", **settings)


def patch_broker() -> None:
    """Route ``redis://`` paths of ``mqlite.Broker`` to the Redis engine, in a child process."""
    with _patch_lock:
        broker_module._open_engine = open_engine


def consume(url: str, acks: Any, ready: Any, stop: Any, nack_every: int) -> None:
    """Compete on subscription ``workers`` of ``q``: ack each message, nack every ``nack_every``-th once first.

    Waits at ``ready`` once subscribed. Puts ``(pid, offset)`` on ``acks`` for each message acked,
    and ``("done", count)`` once ``stop`` is set and nothing is left to read.
    """
    patch_broker()
    count = 0
    nacked: set[int] = set()
    deadline = time.monotonic() + DEADLINE
    with mqlite.Broker(url) as broker:
        sub = broker.subscribe("q", name="workers", ack="manual")
        ready.wait(DEADLINE)
        while time.monotonic() < deadline:
            message = sub.get(timeout=0.1)
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
            acks.put((os.getpid(), message.offset))
    acks.put(("done", count))


def wait_for_one(url: str, ready: Any, results: Any) -> None:
    """Subscribe to ``q`` as ``reader``, signal ``ready``, block for one message; report it and how long it took."""
    patch_broker()
    with mqlite.Broker(url) as broker:
        sub = broker.subscribe("q", name="reader")
        ready.set()
        began = time.monotonic()
        message = sub.get(timeout=10.0)
        results.put((time.monotonic() - began, None if message is None else message.payload))


def take_and_hang(url: str, count: int, results: Any) -> None:
    """Take ``count`` messages of ``workers`` without acking them, report them, then wait to be killed."""
    patch_broker()
    broker = mqlite.Broker(url)
    sub = broker.subscribe("q", name="workers", ack="manual")
    results.put([message.offset for message in sub.poll(max_messages=count, timeout=5.0)])
    threading.Event().wait(DEADLINE)  # the parent kills this process long before


def read_and_hang(url: str, results: Any) -> None:
    """Open an ephemeral reader of ``q`` (it pins interest retention), report, then wait to be killed."""
    patch_broker()
    broker = mqlite.Broker(url)
    broker.subscribe("q")
    results.put("reading")
    threading.Event().wait(DEADLINE)  # the parent kills this process long before
