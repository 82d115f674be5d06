"""A drain looks only at the queues that may have work left, and never misses one that has.

A drain that finds, as it begins, that a queue's push cursors have handled everything takes it
out of the broker's set of queues its drains look at, and the queue joins it again on whatever
gives a push cursor work: a publish (plain, with headers, in a
transaction), a seek, a joined event, a new subscription, a nack, a give-back, a redelivery
when an ack timeout passes, a close. Every test here does one of those to one queue while other
queues sit idle, and checks that the next drain sees it (it says False while the work is held
up, or does it). A queue on storage that cannot keep the set up to
date (a shared file, Redis) is looked at by every drain. Speed is measured in benchmarks/, not here.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, gated, idle_then

import mqlite

MakeBroker = Callable[..., mqlite.Broker]

_IDLE = 5  # the queues that sit idle beside the one given work


@pytest.fixture(params=["each", "batch"])
def make(request: pytest.FixtureRequest, backend: str, make_broker: MakeBroker) -> MakeBroker:
    """``make_broker``, and on a file also with ``commit="batch"`` (a file no other broker shares)."""
    if request.param == "batch":
        if backend != "file":
            pytest.skip("commit='batch' is a file's setting")
        return functools.partial(make_broker, commit="batch")
    return make_broker


def _with_idle_queues(broker: mqlite.Broker) -> list[int]:
    """Give ``broker`` idle queues with a push subscription each, which handled one message."""
    handled: list[int] = []
    for i in range(_IDLE):
        broker.subscribe(f"idle{i}", callback=lambda m: handled.append(m.offset))
        broker.publish(f"idle{i}", "e", i)
    return handled


# -- publishes ------------------------------------------------------------------------------------


def test_a_publish_to_an_idle_queue_among_idle_queues_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    handled = _with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=gated(gate, seen))
    broker.publish("q", "e", 0)
    idle_then(broker, gate, lambda: broker.publish("q", "e", 1))
    assert seen == [0, 1]
    assert len(handled) == _IDLE


def test_a_publish_with_headers_to_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=gated(gate, seen))
    broker.publish("q", "e", 0)
    idle_then(broker, gate, lambda: broker.publish("q", "e", 1, headers={"h": "v"}))
    assert seen == [0, 1]


def test_a_transaction_publishing_to_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=gated(gate, seen))
    broker.publish("q", "e", 0)

    def publish_in_a_transaction() -> None:
        with broker.transaction() as tx:
            tx.publish("q", "e", 1)
            tx.publish("q", "e", 2)

    idle_then(broker, gate, publish_in_a_transaction)
    assert seen == [0, 1, 2]


def test_each_drain_after_a_publish_to_one_of_many_queues_delivers_it(make: MakeBroker) -> None:
    broker = make(dispatcher=mqlite.ManualDispatcher())
    handled = _with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=lambda m: seen.append(m.payload))
    for i in range(5):
        broker.publish("q", "e", i)
        assert broker.drain(timeout=0)
        assert seen == list(range(i + 1))
        broker.publish(f"idle{i}", "e", i)  # and one to another queue, every second drain
        assert broker.drain(timeout=0)
    assert len(handled) == 2 * _IDLE


# -- work without a publish -----------------------------------------------------------------------


def test_a_seek_back_on_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    sub = broker.subscribe("q", name="s", callback=gated(gate, seen))
    broker.subscribe("q", name="keeper", start="earliest")  # keeps the messages retained
    for i in range(3):
        broker.publish("q", "e", i)
    idle_then(broker, gate, lambda: sub.seek(1))
    assert seen == [0, 1, 2, 1, 2]


@pytest.mark.not_redis(
    "Redis keeps no memory of settled queues (every drain asks the server), and this case, like "
    "its twin in test_idle_drain.py, which is not run on Redis, fails there with or without it"
)
def test_joining_an_event_on_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    sub = broker.subscribe("q", name="s", events="a", callback=gated(gate, seen))
    broker.subscribe("q", name="keeper", start="earliest")  # keeps what nobody else wants
    broker.publish("q", "a", 0)
    assert broker.drain(timeout=WAIT)  # delivered: the subscription has read up to the end
    broker.publish("q", "b", 1)  # not wanted yet, so not read: the subscription is idle, behind it
    idle_then(broker, gate, lambda: sub.join("b"))
    assert seen == [0, 1]


def test_a_new_subscription_on_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", name="keeper", start="earliest")
    broker.subscribe("q", callback=lambda m: None)
    for i in range(3):
        broker.publish("q", "e", i)
    idle_then(broker, gate, lambda: broker.subscribe("q", start="earliest", callback=gated(gate, seen)))
    assert seen == [0, 1, 2]


def test_a_nack_outside_the_callback_on_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    held: list[mqlite.Message] = []

    def callback(message: mqlite.Message) -> None:
        if not held:
            held.append(message)  # left unacked: a handled message, waiting for its ack
            return
        gated(gate, seen)(message)

    sub = broker.subscribe("q", ack="manual", callback=callback)
    broker.publish("q", "e", 0)
    idle_then(broker, gate, lambda: sub.nack(held[0]))
    assert seen == [0]


def test_closing_a_consumer_that_held_a_message_on_an_idle_queue_is_waited_for(
    make: MakeBroker, gate: threading.Event
) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    holder = broker.subscribe("q", name="shared", ack="manual", callback=lambda m: None)  # never acks
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=WAIT)
    broker.subscribe("q", name="shared", ack="manual", callback=gated(gate, seen))  # nothing for it: 0 is held
    idle_then(broker, gate, holder.close)
    assert seen == [0]


@pytest.mark.memory_only  # on a file a named subscription reads no further ahead than it is asked
def test_read_ahead_given_back_on_an_idle_queue_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    reader = broker.subscribe("q", name="shared")
    for i in range(4):
        broker.publish("q", "e", i)
    assert next(reader).offset == 0  # and 1, 2, 3 read ahead, into its buffer
    broker.subscribe("q", name="shared", callback=gated(gate, seen))  # nothing for it: all read
    idle_then(broker, gate, reader.close)  # gives back what it read ahead, for the push one
    assert seen == [1, 2, 3]


def test_a_redelivery_when_an_ack_timeout_passes_is_waited_for(make: MakeBroker) -> None:
    clock = mqlite.ManualClock()
    broker = make(clock=clock, dispatcher=mqlite.ManualDispatcher())
    _with_idle_queues(broker)
    calls: list[int] = []

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 2:
            raise RuntimeError("the redelivery fails, and waits for its retry")

    broker.subscribe("q", ack="manual", ack_timeout=3.0, backoff=mqlite.Backoff(initial=5.0), callback=callback)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)  # handled, though never acked: idle, as far as the queue knows
    assert broker.drain(timeout=0)
    clock.advance(3.0)  # the ack timeout passes: this drain's own run redelivers, and the retry waits
    assert not broker.drain(timeout=0), "the redelivery failed: its retry is still to come"
    assert calls == [0, 0]
    clock.advance(60.0)  # past the retry's backoff, jitter and all
    assert broker.drain(timeout=0)
    assert calls == [0, 0, 0]


def test_a_redelivery_on_a_push_thread_when_an_ack_timeout_passes_is_waited_for(
    make: MakeBroker, gate: threading.Event
) -> None:
    clock = mqlite.ManualClock()
    broker = make(clock=clock)
    _with_idle_queues(broker)
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


# -- drains that must not say done, or must refuse ------------------------------------------------


def test_drain_inside_a_callback_refuses_while_other_queues_are_idle(make: MakeBroker) -> None:
    broker = make(dispatcher=mqlite.ManualDispatcher())
    _with_idle_queues(broker)
    assert broker.drain(timeout=0)
    errors: list[BaseException] = []

    def callback(message: mqlite.Message) -> None:
        try:
            broker.drain(timeout=0)
        except mqlite.WouldDeadlock as error:
            errors.append(error)

    broker.subscribe("q", callback=callback)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert len(errors) == 1


def test_a_drain_of_a_closed_broker_with_idle_queues_says_false(make: MakeBroker) -> None:
    broker = make(dispatcher=mqlite.ManualDispatcher())
    _with_idle_queues(broker)
    assert broker.drain(timeout=0)
    assert broker.drain(timeout=0)
    broker.close()
    assert not broker.drain(timeout=0)


def test_a_publish_by_another_broker_on_the_file_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path, dispatcher=mqlite.ManualDispatcher()) as here, mqlite.Broker(path) as there:
        _with_idle_queues(here)
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
    make: MakeBroker, backend: str, request: pytest.FixtureRequest
) -> None:
    broker = make(dispatcher=mqlite.ManualDispatcher())
    _with_idle_queues(broker)
    broker.subscribe("q", callback=lambda m: None)
    for _ in range(3):
        assert broker.drain(timeout=0)
    looked = _count_looks(broker)
    broker.publish("q", "e", 0)
    broker.publish("idle3", "e", 1)
    assert broker.drain(timeout=0)
    watched = backend == "memory" or request.node.callspec.params["make"] == "batch"
    if watched:
        assert looked == {"q", "idle3"}
    else:
        # A shared file, or Redis: what other brokers did shows only when a drain looks.
        assert looked == {"q", "idle3", *(f"idle{i}" for i in range(_IDLE))}
    looked.clear()
    assert broker.drain(timeout=0)  # finds them settled as it begins, and leaves them out from now on
    assert looked == {"q", "idle3"} if watched else len(looked) == _IDLE + 1
    looked.clear()
    for _ in range(3):
        assert broker.drain(timeout=0)
    assert (looked == set()) if watched else len(looked) == _IDLE + 1


def test_a_full_queue_still_refuses_a_publish_after_each_drain(make: MakeBroker) -> None:
    broker = make(dispatcher=mqlite.ManualDispatcher())
    _with_idle_queues(broker)
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


def test_a_publish_after_a_settled_queue_housekept_is_waited_for(make: MakeBroker, gate: threading.Event) -> None:
    broker = make()
    _with_idle_queues(broker)
    seen: list[int] = []
    broker.subscribe("q", callback=gated(gate, seen))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=WAIT)
    assert broker.drain(timeout=0)
    broker.queue("q", max_age=3600.0)  # configuring housekeeps the queue while it is settled
    idle_then(broker, gate, lambda: broker.publish("q", "e", 1))
    assert seen == [0, 1]
