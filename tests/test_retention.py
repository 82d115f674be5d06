"""Retention: interest (the default) versus limits, max_messages with both overflow policies,
max_age, missed counts, and bounded memory in a long run."""

from __future__ import annotations

import pytest
from helpers import payloads, pull_all

import mqlite


def stored(queue: mqlite.Queue) -> int:
    """How many messages the in-memory log physically holds (falls back to the retained count)."""
    log = getattr(queue, "_log", None)
    return len(log) if log is not None else len(queue)


# -- interest retention (the default) ------------------------------------------------------


def test_the_default_retention_is_interest(broker: mqlite.Broker) -> None:
    config = broker.queue("q").config
    assert (config.retention, config.max_messages, config.max_age) == ("interest", None, None)


def test_interest_drops_messages_no_cursor_will_read(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    for i in range(10):
        queue.publish("e", i)
    assert len(queue) == 0
    assert (queue.start_offset, queue.end_offset) == (10, 10)


def test_interest_keeps_messages_a_durable_cursor_has_not_read(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="n")
    for i in range(10):
        queue.publish("e", i)
    assert len(queue) == 10
    sub.poll(max_messages=4)
    assert queue.start_offset == 4
    assert len(queue) == 6


def test_interest_keeps_what_the_slowest_cursor_needs(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    fast = broker.subscribe("q", name="fast")
    slow = broker.subscribe("q", name="slow")
    for i in range(10):
        queue.publish("e", i)
    pull_all(fast)
    slow.poll(max_messages=3)
    assert queue.start_offset == 3


def test_a_new_earliest_cursor_on_an_interest_queue_gets_only_what_was_retained(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    queue.publish("e", "nobody-wanted-this")
    keeper = broker.subscribe("q", name="keeper")
    queue.publish("e", "kept")
    late = broker.subscribe("q", name="late", start="earliest")
    assert payloads(pull_all(late)) == ["kept"]
    assert payloads(pull_all(keeper)) == ["kept"]


def test_interest_keeps_unacked_messages_redeliverable(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="n", ack="manual")
    queue.publish("e", "x")
    message = sub.get(timeout=0)
    for i in range(5000):  # enough publishes to run housekeeping several times
        queue.publish("other", i)
    pull_all(sub)
    sub.nack(message)
    assert sub.get(timeout=0) == message


# -- limits retention ------------------------------------------------------------------


def test_limits_without_a_limit_keeps_every_message(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits")
    for i in range(10):
        queue.publish("e", i)
    assert len(queue) == 10
    sub = broker.subscribe("q", name="late", start="earliest")
    assert payloads(pull_all(sub)) == list(range(10))


def test_drop_oldest_keeps_the_newest_max_messages(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=3)
    for i in range(10):
        queue.publish("e", i)
    assert len(queue) == 3
    assert (queue.start_offset, queue.end_offset) == (7, 10)


def test_drop_oldest_is_the_default_overflow(broker: mqlite.Broker) -> None:
    assert broker.queue("q", max_messages=3).config.overflow == "drop_oldest"


def test_a_subscription_that_fell_behind_drop_oldest_reports_what_it_missed(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", max_messages=3)
    sub = broker.subscribe("q", name="n")
    for i in range(10):
        queue.publish("e", i)
    assert sub.missed == 7
    assert payloads(pull_all(sub)) == [7, 8, 9]
    assert sub.missed == 7
    assert broker.info().subscription("q", "n").missed == 7


def test_missed_counts_only_events_the_subscription_wanted(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", max_messages=2)
    sub = broker.subscribe("q", name="n", events="wanted")
    for i in range(6):
        queue.publish("wanted" if i % 2 == 0 else "other", i)
    # Offsets 0..3 were dropped; of those, 0 and 2 were "wanted".
    assert payloads(pull_all(sub)) == [4]
    assert sub.missed == 2


def test_an_ephemeral_subscription_that_fell_behind_reports_missed(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", max_messages=5)
    sub = broker.subscribe("q")
    for i in range(8):
        queue.publish("e", i)
    assert payloads(pull_all(sub)) == [3, 4, 5, 6, 7]
    assert sub.missed == 3


def test_reject_raises_queue_full_and_writes_nothing(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=3, overflow="reject")
    for i in range(3):
        queue.publish("e", i)
    with pytest.raises(mqlite.QueueFull, match="max_messages=3"):
        queue.publish("e", "too many")
    assert queue.end_offset == 3
    assert len(queue) == 3


def test_reject_uses_no_offset(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", max_messages=2, overflow="reject")
    sub = broker.subscribe("q", name="n")
    queue.publish("e", 0)
    queue.publish("e", 1)
    with pytest.raises(mqlite.QueueFull):
        queue.publish("e", "rejected")
    pull_all(sub)
    assert queue.publish("e", 2).offset == 2


def test_reject_accepts_again_once_a_subscriber_has_read(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", max_messages=2, overflow="reject")
    sub = broker.subscribe("q", name="n")
    queue.publish("e", 0)
    queue.publish("e", 1)
    with pytest.raises(mqlite.QueueFull):
        queue.publish("e", 2)
    sub.get(timeout=0)
    queue.publish("e", 2)
    assert payloads(pull_all(sub)) == [1, 2]
    assert sub.missed == 0


def test_a_rejected_subscriber_misses_nothing(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", max_messages=2, overflow="reject")
    sub = broker.subscribe("q", name="n")
    for i in range(5):
        try:
            queue.publish("e", i)
        except mqlite.QueueFull:
            pass
    assert payloads(pull_all(sub)) == [0, 1]
    assert sub.missed == 0


def test_max_age_drops_old_messages(make_broker, clock: mqlite.ManualClock) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", retention="limits", max_age=60)
    queue.publish("e", "old")
    clock.advance(30)
    queue.publish("e", "young")
    clock.advance(31)
    assert len(queue) == 1
    sub = broker.subscribe("q", name="n", start="earliest")
    assert payloads(pull_all(sub)) == ["young"]


def test_a_subscription_that_fell_behind_max_age_reports_missed(make_broker, clock: mqlite.ManualClock) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", max_age=10)
    sub = broker.subscribe("q", name="n")
    queue.publish("e", "expired")
    clock.advance(11)
    queue.publish("e", "fresh")
    assert payloads(pull_all(sub)) == ["fresh"]
    assert sub.missed == 1


def test_limits_can_be_changed_on_an_existing_queue(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits")
    for i in range(10):
        queue.publish("e", i)
    assert broker.queue("q", max_messages=4) is queue
    assert len(queue) == 4
    assert queue.config.retention == "limits"


def test_info_reports_retention_settings(broker: mqlite.Broker) -> None:
    broker.queue("q", retention="limits", max_messages=5, overflow="reject")
    info = broker.info().queue("q")
    assert (info.retention, info.max_messages, info.overflow, info.max_age) == ("limits", 5, "reject", None)


# -- bounded memory -------------------------------------------------------------------


@pytest.mark.not_redis("100,000 round trips; test_redis_engine.py checks the bound on the stream itself")
def test_a_long_run_with_limits_holds_bounded_memory(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=1000)
    broker.subscribe("q", name="never-reads")
    most = 0
    for i in range(100_000):
        queue.publish("e", i)
        if i % 1000 == 0:
            most = max(most, stored(queue))
    assert len(queue) == 1000
    # The log reclaims dropped messages in batches; what it physically holds stays bounded.
    assert most <= 10_000
    assert stored(queue) <= 10_000


@pytest.mark.not_redis("100,000 round trips; test_redis_engine.py checks the bound on the stream itself")
def test_a_long_run_with_an_up_to_date_reader_holds_bounded_memory(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="reader")
    most = 0
    for i in range(100_000):
        queue.publish("e", i)
        if i % 100 == 99:
            sub.poll(max_messages=100)
            most = max(most, stored(queue))
    assert most <= 10_000


@pytest.mark.not_redis("100,000 round trips; test_redis_engine.py checks the bound on the stream itself")
def test_a_long_run_with_max_age_holds_bounded_memory(make_broker, clock: mqlite.ManualClock) -> None:
    broker = make_broker(clock=clock)
    queue = broker.queue("q", retention="limits", max_age=1.0)
    most = 0
    for i in range(50_000):
        queue.publish("e", i)
        if i % 100 == 99:
            clock.advance(0.25)
            most = max(most, stored(queue))
    assert most <= 10_000
    assert len(queue) <= 500
