"""A drain looks only at the queues that may have work left, and never misses one that has.

A drain that finds, as it begins, that a queue's push cursors have handled everything takes it
out of the broker's set of queues its drains look at, and the queue joins it again on whatever
gives a push cursor work: a publish (plain, with headers, in a transaction), a redelivery on a
push thread when an ack timeout passes, a close (test_idle_drain.py has the seek, join, new
subscription, nack, give-back and a manual dispatcher's redelivery, each beside idle queues
too). Every test here does one of those to one queue while other queues sit idle, and checks
that the next drain sees it (it says False while the work is held up, or does it). A queue on
storage that cannot keep the set up to date (a shared file, Redis) is looked at by every drain.
Speed is measured in benchmarks/, not here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import IDLE_QUEUES, WAIT, gated, idle_then, with_idle_queues

import mqlite

MakeBroker = Callable[..., mqlite.Broker]

# -- publishes ------------------------------------------------------------------------------------


def _publish_plain(broker: mqlite.Broker) -> None:
    broker.publish("q", "e", 1)


def _publish_with_headers(broker: mqlite.Broker) -> None:
    broker.publish("q", "e", 1, headers={"h": "v"})  # the drafts path, not the plain fast path


def _publish_in_a_transaction(broker: mqlite.Broker) -> None:
    with broker.transaction() as tx:
        tx.publish("q", "e", 1)


@pytest.mark.parametrize("publish", [_publish_plain, _publish_with_headers, _publish_in_a_transaction])
def test_a_publish_to_an_idle_queue_among_idle_queues_is_waited_for(
    make_each_or_batch: MakeBroker, gate: threading.Event, publish: Callable[[mqlite.Broker], None]
) -> None:
    broker = make_each_or_batch()
    handled = with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=gated(gate, seen))
    broker.publish("q", "e", 0)
    idle_then(broker, gate, lambda: publish(broker))
    assert seen == [0, 1]
    assert len(handled) == IDLE_QUEUES


def test_each_drain_after_a_publish_to_one_of_many_queues_delivers_it(make_each_or_batch: MakeBroker) -> None:
    broker = make_each_or_batch(dispatcher=mqlite.ManualDispatcher())
    handled = with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=lambda m: seen.append(m.payload))
    for i in range(5):
        broker.publish("q", "e", i)
        assert broker.drain(timeout=0)
        assert seen == list(range(i + 1))
        broker.publish(f"idle{i}", "e", i)  # and one to another queue, every second drain
        assert broker.drain(timeout=0)
    assert len(handled) == 2 * IDLE_QUEUES


def test_a_redelivery_on_a_push_thread_when_an_ack_timeout_passes_is_waited_for(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    clock = mqlite.ManualClock()
    broker = make_each_or_batch(clock=clock)
    with_idle_queues(broker)
    seen: list[int] = []
    calls: list[int] = []
    redelivered = threading.Event()

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 1:
            return  # handled, never acked
        redelivered.set()
        gated(gate, seen)(message)

    broker.subscribe("q", ack="manual", ack_timeout=3.0, callback=callback)
    broker.publish("q", "e", 0)

    def pass_the_ack_timeout() -> None:
        clock.advance(3.0)
        assert redelivered.wait(WAIT)  # the thread took the redelivery, and is held up in its callback

    idle_then(broker, gate, pass_the_ack_timeout)
    assert seen == [0]


# -- drains that must not say done ----------------------------------------------------------------


def test_a_drain_of_a_closed_broker_with_idle_queues_says_false(make_each_or_batch: MakeBroker) -> None:
    broker = make_each_or_batch(dispatcher=mqlite.ManualDispatcher())
    with_idle_queues(broker)
    assert broker.drain(timeout=0)
    assert broker.drain(timeout=0)
    broker.close()
    assert not broker.drain(timeout=0)


def test_a_publish_by_another_broker_on_the_file_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path, dispatcher=mqlite.ManualDispatcher()) as here, mqlite.Broker(path) as there:
        with_idle_queues(here)
        seen: list[int] = []
        here.subscribe("q", callback=lambda m: seen.append(m.payload))
        here.publish("q", "e", 0)
        assert here.drain(timeout=0)
        assert here.drain(timeout=0)
        there.publish("q", "e", 1)  # reaches this broker when it next looks at the queue
        assert here.drain(timeout=WAIT)
        assert seen == [0, 1]


# -- which queues a drain looks at ----------------------------------------------------------------


def _count_looks(broker: mqlite.Broker) -> set[str]:
    """Record the names of the queues whose drain_start a drain calls (its first look at each)."""
    looked: set[str] = set()
    for name, queue in broker._engines.items():
        start = queue.drain_start

        def counted(_start: Any = start, _name: str = name) -> Any:
            looked.add(_name)
            return _start()

        queue.drain_start = counted  # type: ignore[method-assign]  # an instance attribute, for this test
    return looked


def test_a_drain_looks_only_at_the_queues_given_work(
    make_each_or_batch: MakeBroker, backend: str, request: pytest.FixtureRequest
) -> None:
    broker = make_each_or_batch(dispatcher=mqlite.ManualDispatcher())
    with_idle_queues(broker)
    broker.subscribe("q", callback=lambda m: None)
    for _ in range(3):
        assert broker.drain(timeout=0)
    looked = _count_looks(broker)
    broker.publish("q", "e", 0)
    broker.publish("idle3", "e", 1)
    assert broker.drain(timeout=0)
    watched = backend == "memory" or request.node.callspec.params["make_each_or_batch"] == "batch"
    if watched:
        assert looked == {"q", "idle3"}
    else:
        # A shared file, or Redis: what other brokers did shows only when a drain looks.
        assert looked == {"q", "idle3", *(f"idle{i}" for i in range(IDLE_QUEUES))}
    looked.clear()
    assert broker.drain(timeout=0)  # finds them settled as it begins, and leaves them out from now on
    assert looked == {"q", "idle3"} if watched else len(looked) == IDLE_QUEUES + 1
    looked.clear()
    for _ in range(3):
        assert broker.drain(timeout=0)
    assert (looked == set()) if watched else len(looked) == IDLE_QUEUES + 1


def test_a_full_queue_still_refuses_a_publish_after_each_drain(make_each_or_batch: MakeBroker) -> None:
    broker = make_each_or_batch(dispatcher=mqlite.ManualDispatcher())
    with_idle_queues(broker)
    broker.queue("q", max_messages=3, overflow="reject")
    broker.subscribe("q", name="slow", start="earliest")  # a pull cursor that never reads: keeps all
    seen: list[int] = []
    broker.subscribe("q", callback=lambda m: seen.append(m.payload))
    for i in range(3):
        broker.publish("q", "e", i)
        assert broker.drain(timeout=0)  # settled: the next publish is the first since
    with pytest.raises(mqlite.QueueFull):
        broker.publish("q", "e", 3)
    assert seen == [0, 1, 2]


def test_a_publish_after_a_settled_queue_housekept_is_waited_for(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=gated(gate, seen))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=WAIT)
    assert broker.drain(timeout=0)
    broker.queue("q", max_age=3600.0)  # configuring housekeeps the queue while it is settled
    idle_then(broker, gate, lambda: broker.publish("q", "e", 1))
    assert seen == [0, 1]
