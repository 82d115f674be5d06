"""Publishing: offsets, publish_many, and the Message value."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from helpers import offsets, pull_all

import mqlite


def test_offsets_start_at_zero_and_grow_by_one(broker: mqlite.Broker) -> None:
    queue = broker.queue("orders")
    published = [queue.publish("created", i) for i in range(5)]
    assert offsets(published) == [0, 1, 2, 3, 4]
    assert queue.end_offset == 5


def test_each_queue_numbers_its_own_offsets(broker: mqlite.Broker) -> None:
    broker.publish("a", "e", 1)
    broker.publish("a", "e", 2)
    assert broker.publish("b", "e", 3).offset == 0
    assert broker.publish("a", "e", 4).offset == 2


def test_offsets_are_never_reused_after_messages_are_dropped(broker: mqlite.Broker) -> None:
    # With interest retention and no subscriber, every message is dropped at once; the next
    # offset must still move on.
    queue = broker.queue("orders")
    for i in range(10):
        queue.publish("created", i)
    assert len(queue) == 0
    assert queue.publish("created", "next").offset == 10


def test_offsets_are_never_reused_after_a_rejected_publish(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=1, overflow="reject")
    queue.publish("e", 0)
    with pytest.raises(mqlite.QueueFull):
        queue.publish("e", 1)
    queue.configure(mqlite.QueueConfig(retention="limits"))
    assert queue.publish("e", 2).offset == 1


def test_broker_publish_is_the_same_as_queue_publish(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("orders", start="earliest", name="reader")
    via_broker = broker.publish("orders", "created", {"id": 1}, key="k", headers={"h": 1})
    via_queue = broker.queue("orders").publish("created", {"id": 2}, key="k", headers={"h": 1})
    assert (via_broker.queue, via_broker.event, via_broker.key, dict(via_broker.headers)) == (
        via_queue.queue,
        via_queue.event,
        via_queue.key,
        dict(via_queue.headers),
    )
    assert [m.payload for m in pull_all(sub)] == [{"id": 1}, {"id": 2}]


def test_broker_publish_creates_the_queue(broker: mqlite.Broker) -> None:
    broker.publish("fresh", "e")
    assert [q.name for q in broker.info().queues] == ["fresh"]


def test_queue_returns_the_same_queue_for_the_same_name(broker: mqlite.Broker) -> None:
    assert broker.queue("orders") is broker.queue("orders")


def test_message_has_every_documented_field(clock: mqlite.ManualClock, make_broker) -> None:
    broker = make_broker(clock=clock)
    message = broker.publish("orders", "created", {"id": 1}, key="customer-7", headers={"trace": "abc"})
    assert message.queue == "orders"
    assert message.event == "created"
    assert message.payload == {"id": 1}
    assert message.offset == 0
    assert message.timestamp == clock.time()
    assert message.key == "customer-7"
    assert dict(message.headers) == {"trace": "abc"}


def test_message_without_key_or_headers_has_none_and_empty_headers(broker: mqlite.Broker) -> None:
    message = broker.publish("orders", "created")
    assert message.key is None
    assert dict(message.headers) == {}
    assert message.payload is None


def test_message_timestamp_comes_from_the_broker_clock(clock: mqlite.ManualClock, make_broker) -> None:
    broker = make_broker(clock=clock)
    first = broker.publish("q", "e")
    clock.advance(2.5)
    second = broker.publish("q", "e")
    assert second.timestamp - first.timestamp == 2.5


@pytest.mark.parametrize("field", ["queue", "event", "payload", "offset", "timestamp", "key", "headers"])
def test_message_fields_cannot_be_reassigned(broker: mqlite.Broker, field: str) -> None:
    message = broker.publish("orders", "created", 1)
    with pytest.raises((AttributeError, TypeError, dataclasses.FrozenInstanceError)):
        setattr(message, field, "changed")


def test_message_headers_cannot_be_mutated(broker: mqlite.Broker) -> None:
    message = broker.publish("orders", "created", headers={"a": 1})
    with pytest.raises(TypeError):
        message.headers["a"] = 2  # type: ignore[index]


def test_message_headers_are_a_copy_of_what_was_published(broker: mqlite.Broker) -> None:
    headers = {"a": 1}
    message = broker.publish("orders", "created", headers=headers)
    headers["a"] = 2
    assert message.headers["a"] == 1


def test_message_round_trips_through_pickle(broker: mqlite.Broker) -> None:
    message = broker.publish("orders", "created", {"id": 1}, key="k", headers={"h": "v"})
    copy = pickle.loads(pickle.dumps(message))
    assert copy == message
    assert (copy.queue, copy.key, dict(copy.headers)) == ("orders", "k", {"h": "v"})


def test_publish_many_assigns_consecutive_offsets(broker: mqlite.Broker) -> None:
    queue = broker.queue("orders")
    queue.publish("created", 0)
    messages = queue.publish_many([("created", 1), ("updated", 2), ("deleted", 3)])
    assert offsets(messages) == [1, 2, 3]
    assert [(m.event, m.payload) for m in messages] == [("created", 1), ("updated", 2), ("deleted", 3)]


def test_publish_many_of_nothing_appends_nothing(broker: mqlite.Broker) -> None:
    queue = broker.queue("orders")
    assert queue.publish_many([]) == []
    assert queue.end_offset == 0


def test_publish_many_with_a_bad_event_appends_nothing(broker: mqlite.Broker) -> None:
    queue = broker.queue("orders")
    sub = broker.subscribe("orders", name="reader", start="earliest")
    with pytest.raises(mqlite.InvalidName):
        queue.publish_many([("created", 1), ("bad*event", 2), ("updated", 3)])
    assert queue.end_offset == 0
    assert pull_all(sub) == []
    assert queue.publish("created", "after").offset == 0


def test_publish_many_with_a_malformed_item_appends_nothing(broker: mqlite.Broker) -> None:
    queue = broker.queue("orders")
    with pytest.raises(mqlite.InvalidArgument):
        queue.publish_many([("created", 1), "not-a-pair"])  # type: ignore[list-item]
    assert queue.end_offset == 0


def test_publish_many_over_a_reject_limit_appends_nothing(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=3, overflow="reject")
    queue.publish("e", 0)
    with pytest.raises(mqlite.QueueFull):
        queue.publish_many([("e", 1), ("e", 2), ("e", 3)])
    assert queue.end_offset == 1
    assert len(queue) == 1


def test_publish_many_messages_reach_subscribers_in_order(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("orders")
    broker.queue("orders").publish_many([("e", i) for i in range(50)])
    assert [m.payload for m in pull_all(sub)] == list(range(50))
