"""Fanout (every distinct name and every ephemeral subscription gets everything) and competing
consumers (subscriptions sharing a name split the messages, each exactly once)."""

from __future__ import annotations

import pytest
from helpers import WAIT, payloads, pull_all

import mqlite
from mqlite.testing import checkers, record


def test_every_distinct_name_receives_every_message(broker: mqlite.Broker) -> None:
    subs = [broker.subscribe("q", name=name) for name in ("billing", "shipping", "audit")]
    for i in range(20):
        broker.publish("q", "e", i)
    for sub in subs:
        assert payloads(pull_all(sub)) == list(range(20))


def test_every_ephemeral_subscription_receives_every_message(broker: mqlite.Broker) -> None:
    subs = [broker.subscribe("q") for _ in range(3)]
    for i in range(20):
        broker.publish("q", "e", i)
    for sub in subs:
        assert payloads(pull_all(sub)) == list(range(20))


def test_named_and_ephemeral_subscriptions_each_receive_every_message(broker: mqlite.Broker) -> None:
    named = broker.subscribe("q", name="n")
    ephemeral = broker.subscribe("q")
    for i in range(5):
        broker.publish("q", "e", i)
    assert payloads(pull_all(named)) == list(range(5))
    assert payloads(pull_all(ephemeral)) == list(range(5))


def test_fanout_respects_each_subscriptions_filter(broker: mqlite.Broker) -> None:
    created = broker.subscribe("q", events="created")
    everything = broker.subscribe("q")
    for event in ["created", "updated", "created"]:
        broker.publish("q", event)
    assert [m.event for m in pull_all(created)] == ["created", "created"]
    assert [m.event for m in pull_all(everything)] == ["created", "updated", "created"]


def test_consumers_sharing_a_name_split_the_messages(broker: mqlite.Broker) -> None:
    first = broker.subscribe("q", name="drivers")
    second = broker.subscribe("q", name="drivers")
    for i in range(10):
        broker.publish("q", "pickup", i)
    got_first = payloads(first.poll(max_messages=4))
    got_second = payloads(pull_all(second))
    assert got_first == [0, 1, 2, 3]
    assert got_second == [4, 5, 6, 7, 8, 9]
    assert pull_all(first) == []


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_consumers_sharing_a_name_get_each_message_exactly_once(broker: mqlite.Broker) -> None:
    history = record(broker)
    consumers = [broker.subscribe("q", name="drivers") for _ in range(3)]
    for i in range(99):
        broker.publish("q", "pickup", i)
    received: list[int] = []
    while got := [m.payload for sub in consumers for m in sub.poll(max_messages=7)]:
        received.extend(got)
    assert sorted(received) == list(range(99)), "what the consumers were handed"
    group = checkers.total_queue(history, "drivers", exactly_once=True)
    group.assert_valid()
    assert group.figures == {"expected": 99, "dequeued": 99}
    checkers.order(history, "drivers").assert_valid()  # the three split the log in take order


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_a_competing_group_and_a_distinct_name_each_get_everything(broker: mqlite.Broker) -> None:
    history = record(broker)
    group = [broker.subscribe("q", name="drivers") for _ in range(2)]
    audit = broker.subscribe("q", name="audit")
    for i in range(10):
        broker.publish("q", "e", i)
    split = [m.payload for sub in group for m in pull_all(sub)]
    assert sorted(split) == list(range(10))
    assert payloads(pull_all(audit)) == list(range(10))
    checkers.compose(
        checkers.total_queue(history, "drivers", exactly_once=True),
        checkers.total_queue(history, "audit", exactly_once=True),
        checkers.order(history, "audit"),
    ).assert_valid()


def test_pull_and_push_consumers_may_share_a_name(manual_broker: mqlite.Broker) -> None:
    pushed: list[int] = []
    pusher = manual_broker.subscribe("q", name="workers", callback=lambda m: pushed.append(m.payload))
    puller = manual_broker.subscribe("q", name="workers")
    for i in range(10):
        manual_broker.publish("q", "e", i)
    pulled = payloads(puller.poll(max_messages=3))
    assert manual_broker.drain(timeout=WAIT)
    assert pulled == [0, 1, 2]
    assert pushed == [3, 4, 5, 6, 7, 8, 9]
    assert manual_broker.info().subscription("q", "workers").mode == "push+pull"
    pusher.close()


@pytest.mark.not_redis("record() hooks engines that decide in Python (DeliveryCore); the Redis engine decides in Lua")
def test_pull_and_push_consumers_sharing_a_name_split_everything_exactly_once(broker: mqlite.Broker) -> None:
    history = record(broker)
    pushed: list[int] = []
    broker.subscribe("q", name="workers", callback=lambda m: pushed.append(m.payload))
    puller = broker.subscribe("q", name="workers")
    pulled: list[int] = []
    for i in range(500):
        broker.publish("q", "e", i)
        if i % 50 == 0:
            pulled.extend(payloads(puller.poll(max_messages=10)))
    assert broker.drain(timeout=WAIT)
    pulled.extend(payloads(pull_all(puller)))
    assert sorted(pushed + pulled) == list(range(500))
    both = checkers.total_queue(history, "workers", exactly_once=True)
    both.assert_valid()
    assert both.figures == {"expected": 500, "dequeued": 500}
    checkers.redelivery(history, "workers").assert_valid()


def test_a_consumer_that_joins_a_name_continues_from_its_shared_position(broker: mqlite.Broker) -> None:
    first = broker.subscribe("q", name="drivers")
    for i in range(4):
        broker.publish("q", "e", i)
    assert payloads(first.poll(max_messages=2)) == [0, 1]
    second = broker.subscribe("q", name="drivers", start="earliest")
    assert payloads(pull_all(second)) == [2, 3]


def test_info_counts_consumers_sharing_a_name(broker: mqlite.Broker) -> None:
    subs = [broker.subscribe("q", name="drivers") for _ in range(3)]
    assert broker.info().subscription("q", "drivers").consumers == 3
    subs[0].close()
    assert broker.info().subscription("q", "drivers").consumers == 2
