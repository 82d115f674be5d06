"""Small helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import mqlite
from mqlite.testing import wait_until_blocked

__all__ = [
    "WAIT",
    "Worker",
    "offsets",
    "payloads",
    "pull_all",
    "stop_after_publishing_dead_letters",
    "wait_for",
    "wait_until_blocked",  # re-exported: the tests import it from here
]

# Generous bound for any single blocking call in a test: long enough never to fire on a slow
# CI machine, short enough that a bug fails the test instead of hanging it.
WAIT = 5.0


def pull_all(sub: mqlite.Subscription) -> list[mqlite.Message]:
    """Everything the subscription can read right now, without waiting."""
    out: list[mqlite.Message] = []
    while batch := sub.poll(max_messages=1000, timeout=0):
        out.extend(batch)
    return out


def stop_after_publishing_dead_letters(queue: mqlite.Queue) -> None:
    """Make ``queue`` publish its dead letters but never settle their pending rows on the file,
    as a process would that died right after the publish committed."""
    engine = queue._engine  # type: ignore[attr-defined]  # reaching into the engine is the point
    publish = engine._dead_letters

    def publish_only(dead: list[Any]) -> list[Any]:
        publish(dead)
        return []

    engine._dead_letters = publish_only


def payloads(messages: list[mqlite.Message]) -> list[Any]:
    return [m.payload for m in messages]


def offsets(messages: list[mqlite.Message]) -> list[int]:
    return [m.offset for m in messages]


class Worker:
    """Run ``target`` on a thread; ``join`` re-raises what it raised. Always join in ``finally``."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = threading.Event()

        def body() -> None:
            self.started.set()
            try:
                self.result = target()
            except BaseException as error:  # noqa: BLE001  # handed back to the test in join()
                self.error = error

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker thread did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout`` seconds.

    This waits for a state, not for time: it returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "condition did not hold in time"
        pause.wait(0.001)


def run_machine_on_redis(machine: Any, redis_url: str, *, max_examples: int, steps: int) -> None:
    """Run a state machine whose ``redis`` backend opens its brokers on ``redis_url`` (a class
    attribute it reads, set here: a machine cannot take pytest's session fixture itself)."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    machine.redis_url = redis_url
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def gated(gate: threading.Event, seen: list[int]) -> Callable[[mqlite.Message], None]:
    """A push callback that waits (at most WAIT) for ``gate`` to be open, then notes the offset in ``seen``."""

    def callback(message: mqlite.Message) -> None:
        assert gate.wait(WAIT)
        seen.append(message.offset)

    return callback


def fails_first(calls: list[int]) -> Callable[[mqlite.Message], None]:
    """A push callback that notes each offset it is called with in ``calls`` and raises on its first call."""

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 1:
            raise RuntimeError("first delivery fails")

    return callback


def idle_then(broker: mqlite.Broker, gate: threading.Event, give_work: Callable[[], object]) -> None:
    """Drain to idle, hold the push callbacks up at ``gate``, ``give_work``: the next drain must see
    that there is work to do, and the one after the gate opens must see it done."""
    assert broker.drain(timeout=WAIT)
    assert broker.drain(timeout=0)  # idle, as far as the queues know
    gate.clear()
    try:
        give_work()
        assert not broker.drain(timeout=0), "the work given is not done yet: drain must not say done"
    finally:
        gate.set()
    assert broker.drain(timeout=WAIT)


IDLE_QUEUES = 5
"""How many idle queues :func:`with_idle_queues` puts beside the one a drain test gives work."""


def with_idle_queues(broker: mqlite.Broker) -> list[int]:
    """Give ``broker`` IDLE_QUEUES idle queues with a push subscription each, which handled one
    message: a drain must look past them (the offsets they handled are returned)."""
    handled: list[int] = []
    for i in range(IDLE_QUEUES):
        broker.subscribe(f"idle{i}", callback=lambda m: handled.append(m.offset))
        broker.publish(f"idle{i}", "e", i)
    return handled
