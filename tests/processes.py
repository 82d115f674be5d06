"""Child-process bodies for the shared-file tests (``multiprocessing``, spawn start method).

Kept apart from the test modules so a child imports only mqlite, not pytest and hypothesis.
Every loop here is bounded by a deadline, so a bug makes the parent's assertions fail instead
of leaving a process behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
    with mqlite.Broker(path) as broker:
        compete(broker, acks, ready, stop, nack_every, lambda message: message.payload, poll=0.05)


def compete(
    broker: mqlite.Broker,
    acks: Any,
    ready: Any,
    stop: Any,
    nack_every: int,
    report: Callable[[mqlite.Message], object],
    *,
    poll: float,
) -> None:
    """The body of every competing-consumer child, whatever its broker: see :func:`consume`.

    Puts ``(pid, report(message))`` on ``acks`` for each message acked; reads with ``get(timeout=poll)``.
    """
    count = 0
    nacked: set[int] = set()
    deadline = time.monotonic() + DEADLINE
    sub = broker.subscribe("q", name="workers", ack="manual")
    ready.wait(DEADLINE)
    while time.monotonic() < deadline:
        message = sub.get(timeout=poll)
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
        acks.put((os.getpid(), report(message)))
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


def _not_a_clock(path: str) -> mqlite.Broker:
    return mqlite.Broker(path, clock=object())  # type: ignore[arg-type]  # the point


def _not_a_dispatcher(path: str) -> mqlite.Broker:
    return mqlite.Broker(path, dispatcher=object())  # type: ignore[arg-type]  # the point


def _not_a_serializer(path: str) -> mqlite.Broker:
    return mqlite.Broker(path, serializer=object())  # type: ignore[arg-type]  # the point


def _bad_synchronous(path: str) -> mqlite.Broker:
    return mqlite.Broker(path, synchronous="sometimes")  # type: ignore[arg-type]  # the point


def _bad_commit(path: str) -> mqlite.Broker:
    return mqlite.Broker(path, commit="never")  # type: ignore[arg-type]  # the point


def _bad_close_timeout(path: str) -> mqlite.Broker:
    """Open fine, refuse ``close(timeout=-1)``, then close for ever: nothing may stay behind."""
    broker = mqlite.Broker(path)
    sub = broker.subscribe("q", callback=lambda message: None)
    try:
        broker.close(timeout=-1)
    except mqlite.InvalidArgument:
        pass
    else:
        raise AssertionError("close(timeout=-1) was accepted")
    if sub.closed or broker.closed:
        raise AssertionError("the refused close closed something")
    broker.publish("q", "e", 1)  # still open
    broker.close(timeout=float("inf"))
    raise mqlite.InvalidArgument("closed for ever: timeout=inf")  # reported like the refusals


BAD_BROKERS = {
    "clock": _not_a_clock,
    "dispatcher": _not_a_dispatcher,
    "serializer": _not_a_serializer,
    "synchronous": _bad_synchronous,
    "commit": _bad_commit,
    "close timeout": _bad_close_timeout,
}
"""Broker calls that must fail, and leave no thread, file or claim behind (by name, for a child)."""


def refused_broker_leaves_nothing(path: str, case: str, results: Any) -> None:
    """Make the bad call ``case`` of :data:`BAD_BROKERS`, then report what it left behind.

    Puts ``(error class, message, mqlite threads left, whether the file exists, claims left,
    what opening a batched broker on the path then said)`` on ``results``. A batched broker
    needs the file to itself, so it opens only if no claim was left.
    """
    import threading

    try:
        BAD_BROKERS[case](path)
    except Exception as error:  # noqa: BLE001  # reported to the parent, which judges it
        raised = (type(error).__name__, str(error))
    else:
        raised = ("nothing", "")
    threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("mqlite"))
    exists = os.path.exists(path)
    folder = f"{path}-brokers"
    claims = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    try:
        with mqlite.Broker(path, commit="batch") as broker:
            broker.publish("q", "e", "after")
        opened = "opened"
    except mqlite.MqliteError as error:
        opened = f"{type(error).__name__}: {error}"
    results.put((*raised, threads, exists, claims, opened))


def open_fresh(path: str, ready: Any, errors: Any) -> None:
    """Wait at ``ready`` with the other openers, then open ``path`` and publish once; report any error."""
    ready.wait(DEADLINE)
    try:
        with mqlite.Broker(path) as broker:
            broker.publish("q", "opened", os.getpid())
    except BaseException as error:  # noqa: BLE001  # reported to the parent, which fails the test
        errors.put(repr(error))
