"""Order and event filters: exact names, shell-style wildcards, several events, join/leave."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import WAIT, Worker, offsets, pull_all, wait_until_blocked

import mqlite


def publish_events(broker: mqlite.Broker, *events: str) -> None:
    for event in events:
        broker.publish("q", event, event)


def test_a_subscription_sees_messages_in_offset_order(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    for i in range(300):
        broker.publish("q", f"e{i % 3}", i)
    received = pull_all(sub)
    assert offsets(received) == list(range(300))
    assert [m.payload for m in received] == list(range(300))


def test_a_filtered_subscription_sees_its_messages_in_offset_order(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["e0", "e2"])
    for i in range(300):
        broker.publish("q", f"e{i % 3}", i)
    received = pull_all(sub)
    assert [m.payload for m in received] == [i for i in range(300) if i % 3 != 1]


def test_no_filter_receives_every_event(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=None)
    publish_events(broker, "created", "updated", "x.y")
    assert [m.event for m in pull_all(sub)] == ["created", "updated", "x.y"]


def test_an_exact_name_receives_only_that_event(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="created")
    publish_events(broker, "created", "updated", "created.v2", "Created")
    assert [m.event for m in pull_all(sub)] == ["created"]


def test_several_event_names_receive_each_of_them(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["created", "deleted"])
    publish_events(broker, "created", "updated", "deleted")
    assert [m.event for m in pull_all(sub)] == ["created", "deleted"]


def test_star_matches_any_run_of_characters(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="order.*")
    publish_events(broker, "order.created", "order.", "order.line.added", "orders.created", "order")
    assert [m.event for m in pull_all(sub)] == ["order.created", "order.", "order.line.added"]


def test_question_mark_matches_exactly_one_character(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="v?")
    publish_events(broker, "v1", "v22", "v", "w1")
    assert [m.event for m in pull_all(sub)] == ["v1"]


def test_brackets_match_one_character_of_a_set(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="level[123]")
    publish_events(broker, "level1", "level3", "level4", "level12")
    assert [m.event for m in pull_all(sub)] == ["level1", "level3"]


def test_wildcards_match_case_sensitively(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="order*")
    publish_events(broker, "Order.created", "order.created")
    assert [m.event for m in pull_all(sub)] == ["order.created"]


def test_a_wildcard_matches_events_first_published_after_subscribing(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="new.*")
    publish_events(broker, "other")
    publish_events(broker, "new.one", "new.two")
    assert [m.event for m in pull_all(sub)] == ["new.one", "new.two"]


def test_names_and_patterns_combine(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["exact", "pre.*"])
    publish_events(broker, "exact", "pre.x", "exactly", "other")
    assert [m.event for m in pull_all(sub)] == ["exact", "pre.x"]


def test_a_lone_star_receives_every_event(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="*")
    publish_events(broker, "a", "b.c")
    assert [m.event for m in pull_all(sub)] == ["a", "b.c"]
    assert sub.events is None


def test_events_reports_the_filter(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["b", "a", "x.*"])
    assert sub.events == ("a", "b", "x.*")


def test_join_adds_an_event_from_the_current_position_on(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="created")
    publish_events(broker, "created", "updated")
    assert [m.event for m in pull_all(sub)] == ["created"]
    sub.join("updated")
    publish_events(broker, "created", "updated")
    assert [m.event for m in pull_all(sub)] == ["created", "updated"]


def test_join_accepts_a_pattern(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="a")
    sub.join(["b.*"])
    publish_events(broker, "a", "b.1", "c")
    assert [m.event for m in pull_all(sub)] == ["a", "b.1"]


def test_leave_removes_an_event(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["created", "updated"])
    sub.leave("created")
    publish_events(broker, "created", "updated")
    assert [m.event for m in pull_all(sub)] == ["updated"]
    assert sub.events == ("updated",)


def test_leave_wakes_nobody_into_receiving_the_left_event(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["created", "updated"])
    publish_events(broker, "created")
    sub.leave("created")
    # "created" at offset 0 was published before the leave but not yet read; the filter applies
    # to reads, so it is skipped.
    publish_events(broker, "updated")
    assert [m.event for m in pull_all(sub)] == ["updated"]


def test_leave_of_an_event_not_in_the_filter_is_rejected(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["created"])
    with pytest.raises(mqlite.InvalidName, match="not in this subscription's filter"):
        sub.leave("updated")
    assert sub.events == ("created",)


def test_leave_of_the_last_event_is_rejected(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["created"])
    with pytest.raises(mqlite.InvalidName, match="close the subscription"):
        sub.leave("created")
    publish_events(broker, "created")
    assert [m.event for m in pull_all(sub)] == ["created"]


def test_leave_on_an_unfiltered_subscription_is_rejected(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    with pytest.raises(mqlite.InvalidName):
        sub.leave("created")


def test_join_on_a_named_subscription_applies_to_every_consumer_of_the_name(broker: mqlite.Broker) -> None:
    first = broker.subscribe("q", events="a", name="workers")
    second = broker.subscribe("q", events="a", name="workers")
    first.join("b")
    assert second.events == ("a", "b")


def test_a_filter_change_is_seen_by_a_blocked_get(broker: mqlite.Broker) -> None:
    # A get blocked on event "a" must notice that the filter now includes "b" as well.
    sub = broker.subscribe("q", events="a")
    worker = Worker(lambda: sub.get(timeout=WAIT))
    try:
        wait_until_blocked(broker.queue("q"))
        sub.join("b")
        publish_events(broker, "b")
    finally:
        message = worker.join()
    assert message is not None
    assert message.event == "b"


# -- a filtered read starts where the last one ended, unless the index moved under it -----------------


def test_a_filtered_read_after_a_seek_back_starts_at_the_seek(broker: mqlite.Broker) -> None:
    broker.queue("q", retention="limits")  # keeps what was read, for the seek back
    sub = broker.subscribe("q", events="a")
    for _ in range(10):
        publish_events(broker, "a", "b")
    assert offsets(sub.poll(max_messages=3)) == [0, 2, 4]
    sub.seek("earliest")
    assert offsets(sub.poll(max_messages=100)) == list(range(0, 20, 2))


def test_a_filtered_read_after_a_filter_change_reads_the_new_events_from_the_position(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="a")
    for _ in range(10):
        publish_events(broker, "a", "b")
    assert offsets(sub.poll(max_messages=3)) == [0, 2, 4]
    sub.join("b")
    sub.leave("a")
    assert offsets(sub.poll(max_messages=100)) == list(range(5, 20, 2))


def test_a_filtered_reader_keeping_up_gets_every_match_while_retention_trims_the_index(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    broker.queue("q", retention="limits", max_messages=1000)
    sub = broker.subscribe("q", events="a")
    queue = broker.queue("q")
    received = []
    for round_ in range(12):  # 12,000 messages: the log, and each event's index list, are trimmed twice
        queue.publish_many([("a" if i % 2 == 0 else "b", round_ * 1000 + i) for i in range(1000)])
        while batch := sub.poll(max_messages=200):
            received += batch
    assert [m.payload for m in received] == list(range(0, 12_000, 2))
    assert sub.missed == 0
