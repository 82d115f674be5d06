"""Acknowledgements: auto and manual acks, nack, ack timeouts, redelivery on close, dead letters."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from helpers import WAIT, Worker, offsets, payloads, pull_all, wait_until_blocked

import mqlite
from mqlite.testing import VirtualClock, checkers, record, run_until_idle

# -- automatic acks ------------------------------------------------------------------------


def test_auto_ack_settles_a_pulled_message_when_it_is_returned(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n")
    broker.publish("q", "e", 1)
    assert sub.get(timeout=WAIT) is not None
    assert sub.pending == 0
    info = broker.info().subscription("q", "n")
    assert (info.delivered, info.acked, info.pending) == (1, 1, 0)


def test_auto_ack_never_redelivers_a_pulled_message_after_close(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n")
    broker.publish("q", "e", 1)
    sub.get(timeout=WAIT)
    sub.close()
    again = broker.subscribe("q", name="n")
    assert pull_all(again) == []


def test_auto_ack_settles_a_pushed_message_when_its_callback_returns(manual_broker: mqlite.Broker) -> None:
    seen_pending: list[int] = []

    def callback(message: mqlite.Message) -> None:
        seen_pending.append(manual_broker.info().subscription("q", "n").acked)

    manual_broker.subscribe("q", name="n", callback=callback)
    manual_broker.publish("q", "e", 1)
    assert manual_broker.drain(timeout=WAIT)
    assert seen_pending == [0]  # not yet acked while the callback ran
    info = manual_broker.info().subscription("q", "n")
    assert (info.delivered, info.acked, info.pending) == (1, 1, 0)


# -- manual acks ---------------------------------------------------------------------------


def test_several_messages_are_acked_in_one_call(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    for i in range(5):
        broker.publish("q", "e", i)
    batch = sub.poll(max_messages=5)
    sub.ack(*batch[:3], batch[3].offset)
    assert sub.pending == 1
    assert broker.info().subscription("q", "n").acked == 4
    sub.close()
    again = broker.subscribe("q", name="n", ack="manual")
    assert payloads(pull_all(again)) == [4], "only the unacked one comes back"


def test_acking_several_is_all_or_none(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    first, second, third = sub.poll(max_messages=3)
    sub.ack(third)
    with pytest.raises(mqlite.NotPending, match="offset 2"):
        sub.ack(first, second, third)
    with pytest.raises(mqlite.NotPending, match="twice"):
        sub.ack(first, first)
    assert sub.pending == 2, "a refused batch acked nothing"
    sub.ack(first, second)
    assert sub.pending == 0


def test_a_manual_message_stays_pending_until_acked(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 1)
    message = sub.get(timeout=WAIT)
    assert message is not None
    assert sub.pending == 1
    sub.ack(message)
    assert sub.pending == 0
    assert broker.info().subscription("q", "n").acked == 1


def test_ack_accepts_an_int_offset(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 1)
    broker.publish("q", "e", 2)
    pull_all(sub)
    sub.ack(1)
    sub.ack(0)
    assert sub.pending == 0


def test_acks_may_come_in_any_order(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    for i in range(5):
        broker.publish("q", "e", i)
    messages = pull_all(sub)
    for message in reversed(messages):
        sub.ack(message)
    assert sub.pending == 0


def test_an_unacked_message_is_not_redelivered_without_a_reason(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 1)
    pull_all(sub)
    broker.publish("q", "e", 2)
    assert payloads(pull_all(sub)) == [2]
    assert sub.pending == 2


def test_acking_twice_raises_not_pending(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 1)
    message = sub.get(timeout=WAIT)
    sub.ack(message)
    with pytest.raises(mqlite.NotPending, match="not pending"):
        sub.ack(message)


def test_a_consumer_may_ack_what_another_consumer_of_its_name_received(broker: mqlite.Broker) -> None:
    first = broker.subscribe("q", name="n", ack="manual")
    second = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 1)
    message = first.get(timeout=WAIT)
    second.ack(message)
    assert first.pending == 0


def test_a_manual_push_message_stays_pending_until_the_callback_acks(manual_broker: mqlite.Broker) -> None:
    received: list[mqlite.Message] = []
    sub = manual_broker.subscribe("q", name="n", ack="manual", callback=received.append)
    manual_broker.publish("q", "e", 1)
    assert manual_broker.drain(timeout=WAIT)
    assert sub.pending == 1
    sub.ack(received[0])
    assert sub.pending == 0


# -- nack ----------------------------------------------------------------------------------


def test_nack_without_delay_redelivers_at_once(manual_broker: mqlite.Broker) -> None:
    sub = manual_broker.subscribe("q", name="n", ack="manual")
    manual_broker.publish("q", "e", "x")
    message = sub.get(timeout=0)
    sub.nack(message)
    again = sub.get(timeout=0)
    assert again == message
    assert sub.pending == 1


def test_a_redelivery_comes_before_newer_messages(manual_broker: mqlite.Broker) -> None:
    sub = manual_broker.subscribe("q", name="n", ack="manual")
    manual_broker.publish("q", "e", 0)
    first = sub.get(timeout=0)
    manual_broker.publish("q", "e", 1)
    sub.nack(first)
    assert offsets(pull_all(sub)) == [0, 1]


def test_nack_with_delay_redelivers_only_after_the_delay(
    jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock
) -> None:
    sub = jumping_broker.subscribe("q", name="n", ack="manual")
    jumping_broker.publish("q", "e", "x")
    sub.nack(sub.get(timeout=0), delay=5.0)
    assert sub.get(timeout=0) is None
    nacked_at = mqlite_clock.monotonic()
    again = sub.get(timeout=60)
    assert again is not None
    assert again.payload == "x"
    assert mqlite_clock.monotonic() - nacked_at == 5.0, "redelivered before the delay, or long after it"


def test_a_nacked_message_stays_pending_while_it_waits(manual_broker: mqlite.Broker) -> None:
    sub = manual_broker.subscribe("q", name="n", ack="manual")
    manual_broker.publish("q", "e", "x")
    sub.nack(sub.get(timeout=0), delay=5.0)
    assert sub.pending == 1


def test_nack_counts_a_redelivery(manual_broker: mqlite.Broker) -> None:
    sub = manual_broker.subscribe("q", name="n", ack="manual")
    manual_broker.publish("q", "e", "x")
    sub.nack(sub.get(timeout=0))
    sub.get(timeout=0)
    info = manual_broker.info().subscription("q", "n")
    assert (info.delivered, info.redelivered) == (2, 1)


def test_nack_of_a_message_already_waiting_for_redelivery_raises(
    manual_broker: mqlite.Broker, clock: mqlite.ManualClock
) -> None:
    sub = manual_broker.subscribe("q", name="n", ack="manual")
    manual_broker.publish("q", "e", "x")
    message = sub.get(timeout=0)
    sub.nack(message, delay=5.0)
    with pytest.raises(mqlite.NotPending, match="already waiting"):
        sub.nack(message)


def test_a_waiting_message_can_still_be_acked(jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock) -> None:
    sub = jumping_broker.subscribe("q", name="n", ack="manual")
    jumping_broker.publish("q", "e", "x")
    message = sub.get(timeout=0)
    sub.nack(message, delay=5.0)
    sub.ack(message)
    began = mqlite_clock.monotonic()
    assert sub.get(timeout=10) is None, "an acked message came back when its nack delay passed"
    assert mqlite_clock.monotonic() - began == 10.0
    assert sub.pending == 0


def test_a_blocked_get_wakes_when_a_nack_delay_passes(broker: mqlite.Broker) -> None:
    # Real clock: the waiting reader must wake by itself when the delay is due, not find the
    # message only in its last attempt when its own timeout ends.
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "x")
    sub.nack(sub.get(timeout=WAIT), delay=0.05)
    began = time.monotonic()
    again = sub.get(timeout=WAIT)
    elapsed = time.monotonic() - began
    assert again is not None
    assert again.payload == "x"
    assert elapsed < WAIT / 4, f"woke after {elapsed:.2f} s, not when the delay passed"


# -- ack timeout ---------------------------------------------------------------------------


DAY = 24 * 3600.0


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_an_unacked_message_is_redelivered_after_a_24_hour_ack_timeout(
    jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock
) -> None:
    history = record(jumping_broker)
    sub = jumping_broker.subscribe("q", name="n", ack="manual", ack_timeout=DAY)
    jumping_broker.publish("q", "e", "x")
    first = sub.get(timeout=0)
    taken_at = mqlite_clock.monotonic()
    again = sub.get(timeout=2 * DAY)  # virtual seconds: the test takes no real time
    assert again == first
    assert mqlite_clock.monotonic() - taken_at == DAY, "redelivered before the ack timeout, or long after it"
    sub.ack(again)
    assert jumping_broker.info().subscription("q", "n").redelivered == 1
    [_, redelivered] = history.filter(type="deliver")
    assert redelivered.attempt == 2
    checkers.compose(
        checkers.total_queue(history, "n", exactly_once=True), checkers.redelivery(history, "n")
    ).assert_valid()


def test_an_acked_message_is_not_redelivered_after_ack_timeout(
    jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock
) -> None:
    sub = jumping_broker.subscribe("q", name="n", ack="manual", ack_timeout=30)
    jumping_broker.publish("q", "e", "x")
    sub.ack(sub.get(timeout=0))
    began = mqlite_clock.monotonic()
    assert sub.get(timeout=60) is None
    assert mqlite_clock.monotonic() - began == 60.0


def test_ack_timeout_restarts_at_each_redelivery(jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock) -> None:
    sub = jumping_broker.subscribe("q", name="n", ack="manual", ack_timeout=10)
    jumping_broker.publish("q", "e", "x")
    began = mqlite_clock.monotonic()
    sub.get(timeout=0)
    delivered_at = []
    for _ in range(2):
        assert sub.get(timeout=60) is not None
        delivered_at.append(mqlite_clock.monotonic() - began)
    assert delivered_at == [10.0, 20.0]


def test_a_timed_out_message_may_go_to_another_consumer_of_the_name(
    jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock
) -> None:
    slow = jumping_broker.subscribe("q", name="n", ack="manual", ack_timeout=5)
    fast = jumping_broker.subscribe("q", name="n", ack="manual", ack_timeout=5)
    jumping_broker.publish("q", "e", "x")
    message = slow.get(timeout=0)
    began = mqlite_clock.monotonic()
    assert fast.get(timeout=60) == message
    assert mqlite_clock.monotonic() - began == 5.0
    assert slow.get(timeout=0) is None


def test_a_blocked_get_wakes_when_an_ack_timeout_passes(broker: mqlite.Broker) -> None:
    # Real clock, as above: a correctness bound on when it wakes, not a speed test.
    sub = broker.subscribe("q", name="n", ack="manual", ack_timeout=0.05)
    broker.publish("q", "e", "x")
    first = sub.get(timeout=WAIT)
    began = time.monotonic()
    again = sub.get(timeout=WAIT)
    elapsed = time.monotonic() - began
    assert again == first
    assert elapsed < WAIT / 4, f"woke after {elapsed:.2f} s, not when the ack timeout passed"


# -- close without ack ---------------------------------------------------------------------


def test_closing_without_ack_redelivers_to_another_consumer_of_the_name(broker: mqlite.Broker) -> None:
    leaving = broker.subscribe("q", name="n", ack="manual")
    staying = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "x")
    message = leaving.get(timeout=WAIT)
    assert staying.get(timeout=0) is None
    leaving.close()
    assert staying.get(timeout=WAIT) == message


def test_closing_gives_back_only_what_that_consumer_held(broker: mqlite.Broker) -> None:
    leaving = broker.subscribe("q", name="n", ack="manual")
    staying = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "leaving's")
    broker.publish("q", "e", "staying's")
    assert payloads(leaving.poll(max_messages=1)) == ["leaving's"]
    assert payloads(staying.poll(max_messages=1)) == ["staying's"]
    leaving.close()
    assert payloads(pull_all(staying)) == ["leaving's"]
    assert staying.pending == 2


def test_closing_without_ack_redelivers_to_the_next_subscription_of_the_name(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    received = pull_all(sub)
    sub.ack(received[1])
    sub.close()
    again = broker.subscribe("q", name="n", ack="manual")
    assert payloads(pull_all(again)) == [0, 2]


def test_closing_wakes_another_consumer_blocked_on_the_name(broker: mqlite.Broker) -> None:
    leaving = broker.subscribe("q", name="n", ack="manual")
    staying = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "x")
    message = leaving.get(timeout=WAIT)
    worker = Worker(lambda: staying.get(timeout=WAIT))
    try:
        wait_until_blocked(broker.queue("q"))
        leaving.close()
    finally:
        assert worker.join() == message


def test_a_redelivery_after_close_counts_as_redelivered(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "x")
    sub.get(timeout=WAIT)
    sub.close()
    broker.subscribe("q", name="n", ack="manual").get(timeout=WAIT)
    assert broker.info().subscription("q", "n").redelivered == 1


# -- max_deliveries and dead letters -------------------------------------------------------


def test_a_message_nacked_max_deliveries_times_is_dead_lettered(broker: mqlite.Broker) -> None:
    dead = broker.subscribe("orders.dead-letter", start="earliest", name="inspector")
    sub = broker.subscribe("orders", name="n", ack="manual", max_deliveries=3)
    broker.publish("orders", "created", {"id": 7})
    for _ in range(3):
        message = sub.get(timeout=0)
        assert message is not None
        sub.nack(message)
    assert sub.get(timeout=0) is None
    assert sub.pending == 0
    letters = pull_all(dead)
    assert [(m.event, m.payload) for m in letters] == [("created", {"id": 7})]


def test_a_dead_letter_says_where_it_came_from(broker: mqlite.Broker) -> None:
    dead = broker.subscribe("orders.dead-letter", name="inspector")
    sub = broker.subscribe("orders", name="billing", ack="manual", max_deliveries=1)
    broker.publish("orders", "e")
    broker.publish("orders", "created", "p", key="k", headers={"trace": "t1"})
    sub.ack(sub.get(timeout=0))
    sub.nack(sub.get(timeout=0))
    [letter] = pull_all(dead)
    assert letter.key == "k"
    assert letter.headers["trace"] == "t1"
    assert letter.headers["dead_letter.queue"] == "orders"
    assert letter.headers["dead_letter.offset"] == 1
    assert letter.headers["dead_letter.subscription"] == "billing"
    assert letter.headers["dead_letter.deliveries"] == 1
    assert letter.headers["dead_letter.reason"] == "nack"


def test_dead_letter_names_the_queue_that_receives_dead_letters(broker: mqlite.Broker) -> None:
    parking = broker.subscribe("parking-lot", name="inspector")
    sub = broker.subscribe("orders", name="n", ack="manual", max_deliveries=1, dead_letter="parking-lot")
    broker.publish("orders", "created", 1)
    sub.nack(sub.get(timeout=0))
    assert payloads(pull_all(parking)) == [1]
    assert "orders.dead-letter" not in {q.name for q in broker.info().queues}


def test_dead_letters_are_kept_when_nobody_subscribes_to_the_dead_letter_queue(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("orders", name="n", ack="manual", max_deliveries=1)
    broker.publish("orders", "created", 1)
    sub.nack(sub.get(timeout=0))
    inspector = broker.subscribe("orders.dead-letter", name="later", start="earliest")
    assert payloads(pull_all(inspector)) == [1]


def test_dead_lettering_is_counted(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("orders", name="n", ack="manual", max_deliveries=2)
    broker.publish("orders", "created", 1)
    sub.nack(sub.get(timeout=0))
    sub.nack(sub.get(timeout=0))
    info = broker.info().subscription("orders", "n")
    assert (info.delivered, info.redelivered, info.dead_lettered, info.pending) == (2, 1, 1, 0)


def test_a_dead_lettered_message_can_no_longer_be_acked(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("orders", name="n", ack="manual", max_deliveries=1)
    broker.publish("orders", "created", 1)
    message = sub.get(timeout=0)
    sub.nack(message)
    with pytest.raises(mqlite.NotPending):
        sub.ack(message)


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_ack_timeouts_count_towards_max_deliveries(jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock) -> None:
    history = record(jumping_broker)
    dead = jumping_broker.subscribe("q.dead-letter", name="inspector")
    sub = jumping_broker.subscribe("q", name="n", ack="manual", ack_timeout=1, max_deliveries=2)
    jumping_broker.publish("q", "e", "x")
    assert sub.get(timeout=0) is not None
    assert sub.get(timeout=60) is not None
    assert sub.get(timeout=60) is None
    [letter] = pull_all(dead)
    assert letter.headers["dead_letter.reason"] == "ack timeout"
    assert sub.pending == 0
    [dead_letter] = history.filter(type="dead-letter")
    assert dead_letter.time - history.filter(type="publish", queue="q")[0].time == 2.0
    checkers.redelivery(history, "n").assert_valid()


def test_closing_without_ack_counts_towards_max_deliveries(broker: mqlite.Broker) -> None:
    dead = broker.subscribe("q.dead-letter", name="inspector")
    sub = broker.subscribe("q", name="n", ack="manual", max_deliveries=1)
    broker.publish("q", "e", "x")
    sub.get(timeout=0)
    sub.close()
    [letter] = pull_all(dead)
    assert letter.headers["dead_letter.reason"] == "subscription closed"
    assert broker.info().subscription("q", "n").pending == 0


# -- push callbacks that raise -------------------------------------------------------------


def test_a_raising_callback_is_retried_after_backoff(manual_broker: mqlite.Broker, clock: mqlite.ManualClock) -> None:
    calls: list[float] = []

    def flaky(message: mqlite.Message) -> None:
        calls.append(clock.monotonic())
        if len(calls) == 1:
            raise RuntimeError("first try fails")

    manual_broker.subscribe("q", name="n", callback=flaky, backoff=mqlite.Backoff(initial=2.0))
    manual_broker.publish("q", "e", "x")
    published_at = clock.monotonic()
    report = run_until_idle(manual_broker)
    assert [when - published_at for when in calls] == [0.0, 2.0]
    assert (report.idle, report.callbacks, report.timers, report.advanced) == (True, 2, 1, 2.0)
    [(_, error)] = report.errors
    assert str(error) == "first try fails"
    info = manual_broker.info().subscription("q", "n")
    assert (info.pending, info.redelivered, info.acked) == (0, 1, 1)


def test_backoff_grows_between_failed_tries(manual_broker: mqlite.Broker, clock: mqlite.ManualClock) -> None:
    calls: list[float] = []

    def always_fails(message: mqlite.Message) -> None:
        calls.append(clock.monotonic())
        raise ValueError("broken handler")

    manual_broker.subscribe(
        "q", name="n", callback=always_fails, backoff=mqlite.Backoff(initial=1.0, factor=2.0, maximum=3.0)
    )
    manual_broker.publish("q", "e", "x")
    report = run_until_idle(manual_broker, max_virtual=10)  # it never succeeds: stop after 10 s
    assert not report.idle
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps == [1.0, 2.0, 3.0, 3.0]


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_a_callback_that_always_raises_ends_in_the_dead_letter_queue(
    manual_broker: mqlite.Broker, clock: mqlite.ManualClock
) -> None:
    history = record(manual_broker)
    dead = manual_broker.subscribe("q.dead-letter", name="inspector")
    calls: list[int] = []

    def always_fails(message: mqlite.Message) -> None:
        calls.append(message.offset)
        raise ValueError("broken handler")

    manual_broker.subscribe(
        "q", name="n", callback=always_fails, max_deliveries=3, backoff=mqlite.Backoff(initial=1.0, factor=1.0)
    )
    manual_broker.publish("q", "e", "x")
    report = run_until_idle(manual_broker)
    assert (report.idle, report.timers, report.advanced, len(report.errors)) == (True, 2, 2.0, 3)
    assert calls == [0, 0, 0]
    [letter] = pull_all(dead)
    assert letter.payload == "x"
    assert letter.headers["dead_letter.reason"] == "callback raised"
    assert "broken handler" in letter.headers["dead_letter.error"]
    assert letter.headers["dead_letter.deliveries"] == 3
    info = manual_broker.info().subscription("q", "n")
    assert (info.pending, info.dead_lettered) == (0, 1)
    checkers.redelivery(history, "n").assert_valid()
    clock.advance(100)
    assert run_until_idle(manual_broker).callbacks == 0, "a dead-lettered message was pushed again"
    assert calls == [0, 0, 0]


def test_a_failing_message_does_not_stop_the_next_ones(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher
) -> None:
    handled: list[int] = []

    def fails_on_one(message: mqlite.Message) -> None:
        if message.payload == 1:
            raise RuntimeError("bad message")
        handled.append(message.payload)

    manual_broker.subscribe("q", name="n", callback=fails_on_one, max_deliveries=1)
    for i in range(4):
        manual_broker.publish("q", "e", i)
    assert manual_broker.drain(timeout=WAIT)
    assert handled == [0, 2, 3]


def test_the_push_thread_survives_a_raising_callback(broker: mqlite.Broker) -> None:
    handled: list[int] = []
    done = threading.Event()

    def fails_on_first(message: mqlite.Message) -> None:
        if message.payload == 0:
            raise RuntimeError("first message is poison")
        handled.append(message.payload)
        if message.payload == 9:
            done.set()

    broker.subscribe("q", name="n", callback=fails_on_first, max_deliveries=1)
    for i in range(10):
        broker.publish("q", "e", i)
    assert done.wait(WAIT)
    assert broker.drain(timeout=WAIT)
    assert handled == list(range(1, 10))
    assert broker.info().subscription("q", "n").dead_lettered == 1


def test_a_manual_push_callback_that_raises_is_retried_and_can_then_ack(manual_broker: mqlite.Broker) -> None:
    calls: list[int] = []
    holder: list[mqlite.Subscription] = []

    def fails_once_then_acks(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        holder[0].ack(message)

    holder.append(
        manual_broker.subscribe(
            "q", name="n", ack="manual", callback=fails_once_then_acks, backoff=mqlite.Backoff(initial=1.0)
        )
    )
    manual_broker.publish("q", "e")
    report = run_until_idle(manual_broker)
    assert (report.idle, report.timers, report.advanced) == (True, 1, 1.0)
    assert calls == [0, 0]
    info = manual_broker.info().subscription("q", "n")
    assert (info.pending, info.acked, info.redelivered) == (0, 1, 1)


def test_an_unacked_push_message_is_pushed_again_after_ack_timeout(
    manual_broker: mqlite.Broker, clock: mqlite.ManualClock, dispatcher: mqlite.ManualDispatcher
) -> None:
    calls: list[int] = []
    manual_broker.subscribe("q", name="n", ack="manual", ack_timeout=5, callback=lambda m: calls.append(m.offset))
    manual_broker.publish("q", "e")
    dispatcher.run_ready()
    clock.advance(4)
    dispatcher.run_ready()
    assert calls == [0]
    clock.advance(1)
    dispatcher.run_ready()
    assert calls == [0, 0]


def test_drain_waits_through_retries_until_the_message_is_dead_lettered(broker: mqlite.Broker) -> None:
    # Real clock and push threads: drain itself must wait out each backoff.
    calls: list[int] = []

    def always_fails(message: mqlite.Message) -> None:
        calls.append(message.offset)
        raise RuntimeError("broken handler")

    broker.subscribe("q", name="n", callback=always_fails, max_deliveries=3, backoff=mqlite.Backoff(initial=0.01))
    broker.publish("q", "e")
    assert broker.drain(timeout=WAIT)
    assert calls == [0, 0, 0]
    assert broker.info().subscription("q", "n").dead_lettered == 1


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_drain_on_a_jumping_clock_waits_out_an_hour_of_backoff_on_push_threads(
    jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock
) -> None:
    history = record(jumping_broker)
    calls: list[float] = []

    def always_fails(message: mqlite.Message) -> None:
        calls.append(mqlite_clock.monotonic())
        raise RuntimeError("broken handler")

    jumping_broker.subscribe(
        "q",
        name="n",
        callback=always_fails,
        max_deliveries=3,
        backoff=mqlite.Backoff(initial=600, factor=3, maximum=3600),
    )
    jumping_broker.publish("q", "e")
    began = mqlite_clock.monotonic()
    assert jumping_broker.drain(timeout=2 * 3600)
    assert [when - began for when in calls] == [0.0, 600.0, 2400.0]
    assert jumping_broker.info().subscription("q", "n").dead_lettered == 1
    checkers.redelivery(history, "n").assert_valid()
