"""A drain with nothing to do looks at no cursor, and whatever gives one work makes it look again.

Each queue remembers that its push cursors had handled everything (the last drain found so, and
no push batch was out): an idle drain then checks no cursor, however many subscriptions there
are. The first tests count the cursor checks of idle drains after each way of reaching idle, and
check that an idle drain still runs a timer that fell due. The others do, while the push thread
is held up, what gives a push cursor work again without a publish (a seek, a join, a new
subscription, a nack, a close, read-ahead given back, a seek by another broker on the file), to
one queue beside idle ones (the queues a drain looks at, and on a file also with
``commit="batch"``): the next drain must see that work, and say False until the thread has done it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, fails_first, gated, idle_then, with_idle_queues

import mqlite
from mqlite.testing import Faults, run_until_idle

MakeBroker = Callable[..., mqlite.Broker]

pytestmark = pytest.mark.not_redis("the Redis engine asks the server at every drain; it keeps no such memory")


def _count_cursor_checks(broker: mqlite.Broker) -> list[int]:
    """Count the calls of each queue's push_unsettled, the check that looks at cursors."""
    calls = [0]
    for queue in broker._engines.values():
        check = queue.push_unsettled

        def counted(*args: Any, _check: Any = check) -> Any:
            calls[0] += 1
            return _check(*args)

        queue.push_unsettled = counted  # type: ignore[method-assign]  # an instance attribute, for this test
    return calls


def _assert_idle_drains_check_no_cursor(broker: mqlite.Broker) -> None:
    assert broker.drain(timeout=WAIT)  # the last look at the cursors, if one is still needed
    assert broker.drain(timeout=0)  # and at the queues made meanwhile (a dead-letter queue)
    calls = _count_cursor_checks(broker)
    for _ in range(3):
        assert broker.drain(timeout=0)
    assert calls == [0]


def _manual(make_broker: MakeBroker, **kwargs: Any) -> tuple[mqlite.Broker, mqlite.ManualClock]:
    clock = mqlite.ManualClock()
    return make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher(), **kwargs), clock


def test_idle_drains_after_deliveries_to_many_subscriptions_check_no_cursor(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    seen: list[int] = []
    for _ in range(10):
        broker.subscribe("q", callback=lambda m: seen.append(m.offset))
    broker.subscribe("q", name="puller")  # a pull cursor too, behind: drain does not wait for it
    for i in range(3):
        broker.publish("q", "e", i)
        assert broker.drain(timeout=0)
    assert len(seen) == 30
    _assert_idle_drains_check_no_cursor(broker)


def test_idle_drains_after_a_retried_callback_check_no_cursor(make_broker: MakeBroker) -> None:
    broker, clock = _manual(make_broker)
    calls: list[int] = []

    broker.subscribe("q", callback=fails_first(calls), backoff=mqlite.Backoff(initial=1.0))
    broker.publish("q", "e", 0)
    assert not broker.drain(timeout=0)
    clock.advance(1.0)
    _assert_idle_drains_check_no_cursor(broker)
    assert calls == [0, 0]


def test_idle_drains_after_a_dead_letter_check_no_cursor(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)

    def fail(message: mqlite.Message) -> None:
        raise RuntimeError("always")

    broker.subscribe("q", callback=fail, max_deliveries=1, dead_letter="dead")
    broker.publish("q", "e", 0)
    _assert_idle_drains_check_no_cursor(broker)
    assert broker.info().subscriptions[0].dead_lettered == 1


def test_idle_drains_after_manual_acks_and_a_competing_consumer_check_no_cursor(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    subs: list[mqlite.Subscription] = []
    for i in range(2):
        subs.append(broker.subscribe("q", name="shared", ack="manual", callback=lambda m, i=i: subs[i].ack(m)))
    for i in range(4):
        broker.publish("q", "e", i)
    _assert_idle_drains_check_no_cursor(broker)
    assert broker.info().subscriptions[0].acked == 4


def test_idle_drains_after_a_closed_subscription_check_no_cursor(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    closing = broker.subscribe("q", callback=lambda m: None)
    broker.subscribe("q", callback=lambda m: None)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    closing.close()
    broker.publish("q", "e", 1)
    _assert_idle_drains_check_no_cursor(broker)


def test_idle_drains_after_delayed_and_lost_acks_check_no_cursor(make_broker: MakeBroker) -> None:
    # The fault sites take part of a batch back, or lose its acks: the count of push batches
    # out must still come back to none.
    faults = Faults(seed=7, delay=0.5, drop_ack=0.3, max_delay=1.0)
    broker, _ = _manual(make_broker, faults=faults)
    seen: list[int] = []
    broker.subscribe("q", callback=lambda m: seen.append(m.offset))
    for i in range(20):
        broker.publish("q", "e", i)
        broker.drain(timeout=0)  # batches of one: a delay holds back a whole batch
    report = run_until_idle(broker, max_virtual=100.0)
    assert report.idle, report
    assert set(seen) == set(range(20))
    assert {fault.kind for fault in faults.log} == {"delay", "drop_ack"}
    _assert_idle_drains_check_no_cursor(broker)


def test_idle_drains_after_a_consumer_crashed_before_settling_check_no_cursor(make_broker: MakeBroker) -> None:
    faults = Faults(seed=3, crash=0.5)
    broker, _ = _manual(make_broker, faults=faults)
    for _ in range(4):
        broker.subscribe("q", callback=lambda m: None)
    for i in range(5):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    assert any(fault.kind == "crash" for fault in faults.log)
    _assert_idle_drains_check_no_cursor(broker)


def test_an_idle_drain_runs_a_timer_that_fell_due_and_sees_what_it_left(make_each_or_batch: MakeBroker) -> None:
    # The queue was out of the drains' set when the drain began: its own run puts it back.
    broker, clock = _manual(make_each_or_batch)
    with_idle_queues(broker)
    calls: list[int] = []

    def callback(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 2:
            raise RuntimeError("the redelivery fails, and waits for its retry")

    broker.subscribe("q", ack="manual", ack_timeout=3.0, backoff=mqlite.Backoff(initial=5.0), callback=callback)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)  # handled, though never acked: idle, as far as the queue knows
    clock.advance(3.0)  # the ack timeout passes
    assert not broker.drain(timeout=0), "the redelivery failed: its retry is still to come"
    assert calls == [0, 0]
    clock.advance(60.0)  # past the retry's backoff, jitter and all
    assert broker.drain(timeout=0)
    assert calls == [0, 0, 0]


# -- work without a publish ---------------------------------------------------------------------


def test_a_seek_back_gives_an_idle_subscription_work(make_each_or_batch: MakeBroker, gate: threading.Event) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)  # a drain must look past them
    seen: list[int] = []
    sub = broker.subscribe("q", name="s", callback=gated(gate, seen))
    broker.subscribe("q", name="keeper", start="earliest")  # keeps the messages retained
    for i in range(3):
        broker.publish("q", "e", i)
    idle_then(broker, gate, lambda: sub.seek(1))
    assert seen == [0, 1, 2, 1, 2]


def test_joining_an_event_gives_an_idle_subscription_work(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)  # a drain must look past them
    seen: list[int] = []
    sub = broker.subscribe("q", name="s", events="a", callback=gated(gate, seen))
    broker.subscribe("q", name="keeper", start="earliest")  # keeps what nobody else wants
    broker.publish("q", "a", 0)
    assert broker.drain(timeout=WAIT)  # delivered: the subscription has read up to the end
    broker.publish("q", "b", 1)  # not wanted yet, so not read: the subscription is idle, behind it
    idle_then(broker, gate, lambda: sub.join("b"))
    assert seen == [0, 1]


def test_a_new_subscription_from_the_earliest_has_work(make_each_or_batch: MakeBroker, gate: threading.Event) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)  # a drain must look past them
    seen: list[int] = []
    broker.subscribe("q", name="keeper", start="earliest")
    broker.subscribe("q", callback=lambda m: None)
    for i in range(3):
        broker.publish("q", "e", i)
    idle_then(broker, gate, lambda: broker.subscribe("q", start="earliest", callback=gated(gate, seen)))
    assert seen == [0, 1, 2]


def test_a_nack_outside_the_callback_gives_an_idle_subscription_work(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)  # a drain must look past them
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


def test_closing_a_consumer_that_held_a_message_gives_the_others_work(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)  # a drain must look past them
    seen: list[int] = []
    holder = broker.subscribe("q", name="shared", ack="manual", callback=lambda m: None)  # never acks
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=WAIT)
    broker.subscribe("q", name="shared", ack="manual", callback=gated(gate, seen))  # nothing for it: 0 is held
    idle_then(broker, gate, holder.close)
    assert seen == [0]


@pytest.mark.memory_only  # on a file a named subscription reads no further ahead than it is asked
def test_read_ahead_given_back_gives_a_push_subscription_of_its_cursor_work(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)  # a drain must look past them
    seen: list[int] = []
    reader = broker.subscribe("q", name="shared")
    for i in range(4):
        broker.publish("q", "e", i)
    assert next(reader).offset == 0  # and 1, 2, 3 read ahead, into its buffer
    broker.subscribe("q", name="shared", callback=gated(gate, seen))  # nothing for it: all read
    idle_then(broker, gate, reader.close)  # gives back what it read ahead, for the push one
    assert seen == [1, 2, 3]


def test_a_seek_by_another_broker_on_the_file_gives_an_idle_subscription_work(
    tmp_path: Path, gate: threading.Event
) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path) as here, mqlite.Broker(path) as there:
        seen: list[int] = []
        here.subscribe("q", name="s", callback=gated(gate, seen))
        here.subscribe("q", name="keeper", start="earliest")
        for i in range(3):
            here.publish("q", "e", i)
        elsewhere = there.subscribe("q", name="s")  # the same cursor, from the other broker
        idle_then(here, gate, lambda: elsewhere.seek(1))  # read back by this broker's next look
        assert seen == [0, 1, 2, 1, 2]
