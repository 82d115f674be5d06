"""Ephemeral and durable subscriptions, where new cursors start, and seek."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from helpers import WAIT, Worker, offsets, payloads, pull_all, wait_until_blocked

import mqlite
from mqlite.testing import VirtualClock

# -- ephemeral (real-time) subscriptions ---------------------------------------------------


def test_an_ephemeral_subscription_sees_only_what_is_published_while_open(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits")
    queue.publish("e", "before")
    sub = broker.subscribe("q")
    queue.publish("e", "during")
    assert payloads(pull_all(sub)) == ["during"]


def test_reopening_an_ephemeral_subscription_does_not_replay_what_was_published_in_between(
    broker: mqlite.Broker,
) -> None:
    queue = broker.queue("q", retention="limits")
    broker.subscribe("q").close()
    queue.publish("e", "while-closed")
    sub = broker.subscribe("q")
    queue.publish("e", "live")
    assert payloads(pull_all(sub)) == ["live"]


def test_a_closed_ephemeral_subscription_is_forgotten(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    assert len(broker.info().subscriptions) == 1
    sub.close()
    assert broker.info().subscriptions == ()


def test_a_closed_ephemeral_subscription_holds_no_messages_back(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    sub = broker.subscribe("q")
    queue.publish("e", 1)
    assert len(queue) == 1  # the open subscription still has to read it
    sub.close()
    assert len(queue) == 0


def test_get_on_a_closed_subscription_raises(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    sub.close()
    with pytest.raises(mqlite.SubscriptionClosed):
        sub.get(timeout=0)


def test_a_subscription_is_a_context_manager(broker: mqlite.Broker) -> None:
    with broker.subscribe("q") as sub:
        broker.publish("q", "e", 1)
        assert payloads(pull_all(sub)) == [1]
    assert sub.closed
    assert broker.info().subscriptions == ()


def test_close_is_idempotent(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n")
    sub.close()
    sub.close()
    assert broker.info().subscription("q", "n").consumers == 0


def test_get_and_poll_return_nothing_when_the_timeout_passes(
    jumping_broker: mqlite.Broker, mqlite_clock: VirtualClock
) -> None:
    sub = jumping_broker.subscribe("q")
    assert sub.get(timeout=0) is None
    began = mqlite_clock.monotonic()
    assert sub.get(timeout=30) is None
    assert mqlite_clock.monotonic() - began == 30.0, "get returned before its timeout, or after it"
    assert sub.poll(max_messages=5, timeout=45) == []
    assert mqlite_clock.monotonic() - began == 75.0


def test_a_get_that_times_out_or_is_woken_leaves_no_waiter_behind(broker: mqlite.Broker) -> None:
    # A waiter left behind would be woken, and
    # counted, by later publishes for nobody.
    sub = broker.subscribe("q")
    queue = broker.queue("q")
    for _ in range(3):
        assert sub.get(timeout=0.001) is None
    assert queue.waiting == 0
    worker = Worker(lambda: sub.get(timeout=WAIT))
    try:
        wait_until_blocked(queue)
        broker.publish("q", "e", "hello")
    finally:
        message = worker.join()
    assert message is not None
    assert queue.waiting == 0


def test_get_waits_for_a_message_published_from_another_thread(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    # The event is known before the reader blocks: the first publish of an event wakes every
    # waiter, which would hide a publish that fails to wake the reader.
    broker.publish("q", "e", "first")
    assert sub.get(timeout=0) is not None

    def timed_get() -> tuple[float, mqlite.Message | None]:
        began = time.monotonic()
        message = sub.get(timeout=WAIT)
        return time.monotonic() - began, message

    worker = Worker(timed_get)
    try:
        wait_until_blocked(broker.queue("q"))
        broker.publish("q", "e", "hello")
    finally:
        elapsed, message = worker.join()
    assert message is not None
    assert message.payload == "hello"
    assert elapsed < WAIT / 4, f"woke after {elapsed:.2f} s, not when the message was published"


def test_poll_returns_at_most_max_messages(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    for i in range(10):
        broker.publish("q", "e", i)
    assert payloads(sub.poll(max_messages=4)) == [0, 1, 2, 3]
    assert payloads(sub.poll(max_messages=100)) == [4, 5, 6, 7, 8, 9]
    assert sub.poll() == []


def test_iteration_yields_messages_in_order(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    for i in range(3):
        broker.publish("q", "e", i)
    iterator = iter(sub)
    assert [next(iterator).payload for _ in range(3)] == [0, 1, 2]


# -- durable (named) subscriptions ---------------------------------------------------------


def test_a_durable_subscription_catches_up_on_what_it_missed(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="vendor")
    queue.publish("e", 0)
    assert payloads(pull_all(sub)) == [0]
    sub.close()
    for i in range(1, 6):
        queue.publish("e", i)
    again = broker.subscribe("q", name="vendor")
    assert payloads(pull_all(again)) == [1, 2, 3, 4, 5]


def test_a_durable_subscription_receives_live_messages_after_catching_up(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    broker.subscribe("q", name="vendor").close()
    queue.publish("e", "missed")
    again = broker.subscribe("q", name="vendor")
    assert payloads(pull_all(again)) == ["missed"]
    queue.publish("e", "live")
    message = again.get(timeout=WAIT)
    assert message is not None
    assert message.payload == "live"


def test_a_durable_subscription_does_not_see_what_it_already_read(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="vendor")
    queue.publish("e", 0)
    queue.publish("e", 1)
    assert payloads(sub.poll(max_messages=1)) == [0]
    sub.close()
    again = broker.subscribe("q", name="vendor")
    assert payloads(pull_all(again)) == [1]


def test_a_durable_subscription_catches_up_on_filtered_events_only(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    broker.subscribe("q", name="vendor", events="delivered").close()
    for event in ["pickup", "delivered", "in-transit", "delivered"]:
        queue.publish(event, event)
    again = broker.subscribe("q", name="vendor", events="delivered")
    assert [m.event for m in pull_all(again)] == ["delivered", "delivered"]


def test_a_closed_durable_subscription_stays_in_info(broker: mqlite.Broker) -> None:
    broker.subscribe("q", name="vendor").close()
    broker.publish("q", "e")
    info = broker.info().subscription("q", "vendor")
    assert info.mode == "detached"
    assert info.consumers == 0
    assert info.lag == 1


def test_a_detached_durable_cursor_keeps_its_messages_retained(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    broker.subscribe("q", name="vendor").close()
    for i in range(3):
        queue.publish("e", i)
    assert len(queue) == 3


def test_different_names_on_one_queue_keep_separate_positions(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    a = broker.subscribe("q", name="a")
    b = broker.subscribe("q", name="b")
    queue.publish("e", 0)
    queue.publish("e", 1)
    assert payloads(pull_all(a)) == [0, 1]
    assert payloads(b.poll(max_messages=1)) == [0]
    assert (a.position, b.position) == (2, 1)


def test_the_same_name_on_different_queues_is_two_cursors(broker: mqlite.Broker) -> None:
    a = broker.subscribe("q1", name="n")
    b = broker.subscribe("q2", name="n")
    broker.publish("q1", "e", "one")
    assert payloads(pull_all(a)) == ["one"]
    assert pull_all(b) == []


def test_resubscribing_with_other_settings_reconfigures_a_detached_cursor(broker: mqlite.Broker) -> None:
    broker.subscribe("q", name="n", events="a").close()
    again = broker.subscribe("q", name="n", events="b")
    assert again.events == ("b",)


def test_subscribing_with_clashing_settings_to_an_attached_name_is_rejected(broker: mqlite.Broker) -> None:
    broker.subscribe("q", name="n", events="a")
    with pytest.raises(mqlite.ConfigConflict, match="must agree"):
        broker.subscribe("q", name="n", events="b")
    with pytest.raises(mqlite.ConfigConflict):
        broker.subscribe("q", name="n", events="a", ack="manual")


# -- where new cursors start -------------------------------------------------------------


def make_history(broker: mqlite.Broker, count: int = 5) -> mqlite.Queue:
    queue = broker.queue("q", retention="limits")
    for i in range(count):
        queue.publish("e", i)
    return queue


def test_start_latest_is_the_default(broker: mqlite.Broker) -> None:
    queue = make_history(broker)
    sub = broker.subscribe("q", name="n")
    assert sub.position == 5
    queue.publish("e", "new")
    assert payloads(pull_all(sub)) == ["new"]


def test_start_earliest_reads_every_retained_message(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", name="n", start="earliest")
    assert payloads(pull_all(sub)) == [0, 1, 2, 3, 4]


def test_start_at_an_offset_reads_from_it(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", name="n", start=3)
    assert payloads(pull_all(sub)) == [3, 4]


def test_start_at_the_end_offset_reads_only_new_messages(broker: mqlite.Broker) -> None:
    queue = make_history(broker)
    sub = broker.subscribe("q", name="n", start=5)
    queue.publish("e", "new")
    assert payloads(pull_all(sub)) == ["new"]


def test_start_at_a_datetime_reads_from_the_first_message_at_or_after_it(
    make_broker, clock: mqlite.ManualClock
) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", retention="limits")
    stamps = []
    for i in range(5):
        stamps.append(queue.publish("e", i).timestamp)
        clock.advance(10)
    when = datetime.fromtimestamp(stamps[2], tz=UTC)
    sub = broker.subscribe("q", name="n", start=when)
    assert payloads(pull_all(sub)) == [2, 3, 4]


def test_start_at_a_datetime_between_messages_reads_from_the_next_one(make_broker, clock: mqlite.ManualClock) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", retention="limits")
    first = queue.publish("e", 0).timestamp
    clock.advance(10)
    queue.publish("e", 1)
    sub = broker.subscribe("q", name="n", start=datetime.fromtimestamp(first + 5, tz=UTC))
    assert payloads(pull_all(sub)) == [1]


def test_start_at_a_datetime_after_the_last_message_reads_only_new_messages(
    make_broker, clock: mqlite.ManualClock
) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", retention="limits")
    queue.publish("e", "old")
    sub = broker.subscribe("q", name="n", start=datetime.fromtimestamp(clock.time() + 60, tz=UTC))
    assert sub.position == 1
    queue.publish("e", "new")
    assert payloads(pull_all(sub)) == ["new"]


def test_start_applies_only_to_a_new_cursor(broker: mqlite.Broker) -> None:
    queue = make_history(broker)
    sub = broker.subscribe("q", name="n", start="latest")
    sub.close()
    queue.publish("e", 5)
    again = broker.subscribe("q", name="n", start="earliest")
    assert payloads(pull_all(again)) == [5]


def test_start_on_an_ephemeral_subscription_is_honoured(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", start="earliest")
    assert payloads(pull_all(sub)) == [0, 1, 2, 3, 4]


# -- seek --------------------------------------------------------------------------------


def test_seek_earliest_rereads_retained_messages(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", name="n", start="earliest")
    pull_all(sub)
    assert sub.seek("earliest") == 0
    assert payloads(pull_all(sub)) == [0, 1, 2, 3, 4]


def test_seek_latest_skips_unread_messages(broker: mqlite.Broker) -> None:
    queue = make_history(broker)
    sub = broker.subscribe("q", name="n", start="earliest")
    assert sub.seek("latest") == 5
    assert pull_all(sub) == []
    queue.publish("e", "new")
    assert payloads(pull_all(sub)) == ["new"]


def test_seek_to_an_offset_moves_the_position_there(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", name="n", start="earliest")
    assert sub.seek(2) == 2
    assert sub.position == 2
    assert offsets(pull_all(sub)) == [2, 3, 4]


def test_seek_to_a_datetime(make_broker, clock: mqlite.ManualClock) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", retention="limits")
    stamps = []
    for i in range(4):
        stamps.append(queue.publish("e", i).timestamp)
        clock.advance(1)
    sub = broker.subscribe("q", name="n")
    sub.seek(datetime.fromtimestamp(stamps[1], tz=UTC))
    assert payloads(pull_all(sub)) == [1, 2, 3]


def test_seek_below_the_retained_range_moves_to_the_oldest_retained(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=3)
    for i in range(10):
        queue.publish("e", i)
    sub = broker.subscribe("q", name="n")
    assert sub.seek(0) == 7
    assert payloads(pull_all(sub)) == [7, 8, 9]


def test_seek_on_a_named_subscription_moves_every_consumer_of_the_name(broker: mqlite.Broker) -> None:
    make_history(broker)
    a = broker.subscribe("q", name="n")
    b = broker.subscribe("q", name="n")
    a.seek(1)
    assert b.position == 1


def test_seek_keeps_pending_messages_pending(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", name="n", start="earliest", ack="manual")
    pull_all(sub)
    sub.seek("latest")
    assert sub.pending == 5
    sub.ack(0)
    assert sub.pending == 4


def test_seek_wakes_a_blocked_get(broker: mqlite.Broker) -> None:
    make_history(broker)
    sub = broker.subscribe("q", name="n")
    worker = Worker(lambda: sub.get(timeout=WAIT))
    try:
        wait_until_blocked(broker.queue("q"))
        sub.seek("earliest")
    finally:
        message = worker.join()
    assert message is not None
    assert message.offset == 0
