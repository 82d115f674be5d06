"""Introspection: broker.info() lists every queue and every subscription, frozen."""

from __future__ import annotations

import attrs
import pytest
from helpers import WAIT, pull_all

import mqlite


def test_info_of_an_empty_broker_is_empty(broker: mqlite.Broker) -> None:
    info = broker.info()
    assert (info.queues, info.subscriptions) == ((), ())


def test_info_lists_every_queue_with_its_offsets(broker: mqlite.Broker) -> None:
    broker.queue("a", retention="limits")
    broker.queue("b")
    for i in range(3):
        broker.publish("a", "e", i)
    broker.publish("b", "e")
    info = broker.info()
    assert [q.name for q in info.queues] == ["a", "b"]
    a = info.queue("a")
    assert (a.start_offset, a.end_offset, a.retained) == (0, 3, 3)
    b = info.queue("b")
    assert (b.start_offset, b.end_offset, b.retained) == (1, 1, 0)


def test_info_lists_a_pull_subscription(broker: mqlite.Broker) -> None:
    broker.subscribe("orders", name="billing", events=["created", "paid"])
    [sub] = broker.info().subscriptions
    assert (sub.queue, sub.name, sub.durable, sub.events, sub.mode, sub.consumers) == (
        "orders",
        "billing",
        True,
        ("created", "paid"),
        "pull",
        1,
    )


def test_info_lists_an_ephemeral_subscription_with_no_name(broker: mqlite.Broker) -> None:
    broker.subscribe("orders")
    [sub] = broker.info().subscriptions
    assert (sub.name, sub.durable, sub.events) == (None, False, None)


def test_info_reports_push_mode(manual_broker: mqlite.Broker) -> None:
    manual_broker.subscribe("q", name="n", callback=lambda m: None)
    assert manual_broker.info().subscription("q", "n").mode == "push"


def test_info_reports_push_and_pull_sharing_a_name(manual_broker: mqlite.Broker) -> None:
    manual_broker.subscribe("q", name="n", callback=lambda m: None)
    manual_broker.subscribe("q", name="n")
    info = manual_broker.info().subscription("q", "n")
    assert (info.mode, info.consumers) == ("push+pull", 2)


def test_info_reports_a_detached_durable_subscription(broker: mqlite.Broker) -> None:
    broker.subscribe("q", name="n").close()
    info = broker.info().subscription("q", "n")
    assert (info.mode, info.consumers) == ("detached", 0)


def test_info_reports_position_and_lag(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n")
    for i in range(10):
        broker.publish("q", "e", i)
    sub.poll(max_messages=4)
    info = broker.info().subscription("q", "n")
    assert (info.position, info.lag) == (4, 6)
    assert (sub.position, sub.lag) == (4, 6)


def test_lag_counts_only_matching_events(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", events="wanted")
    for i in range(10):
        broker.publish("q", "wanted" if i < 3 else "other", i)
    assert sub.lag == 3
    assert broker.info().subscription("q", "n").lag == 3


def test_info_counts_deliveries_acks_and_redeliveries(manual_broker: mqlite.Broker, clock) -> None:
    sub = manual_broker.subscribe("q", name="n", ack="manual", max_deliveries=2)
    for i in range(3):
        manual_broker.publish("q", "e", i)
    first, second, _third = pull_all(sub)
    sub.ack(first)
    sub.nack(second)
    sub.nack(pull_all(sub)[0])  # second delivery of offset 1: dead-lettered
    info = manual_broker.info().subscription("q", "n")
    assert (info.delivered, info.acked, info.redelivered, info.dead_lettered, info.pending) == (4, 1, 1, 1, 1)
    assert info.ack == "manual"


def test_info_counts_missed_messages(broker: mqlite.Broker) -> None:
    broker.queue("q", max_messages=2)
    broker.subscribe("q", name="n")
    for i in range(5):
        broker.publish("q", "e", i)
    assert broker.info().subscription("q", "n").missed == 3


def test_info_includes_dead_letter_queues(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual", max_deliveries=1)
    broker.publish("q", "e")
    sub.nack(sub.get(timeout=WAIT))
    dead = broker.info().queue("q.dead-letter")
    assert (dead.retained, dead.retention) == (1, "limits")


def test_info_is_a_frozen_snapshot(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n")
    info = broker.info()
    broker.publish("q", "e")
    pull_all(sub)
    assert info.subscription("q", "n").position == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        info.subscriptions[0].lag = 5  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        info.queues = ()  # type: ignore[misc]


def test_info_lookups_raise_key_error_for_unknown_names(broker: mqlite.Broker) -> None:
    info = broker.info()
    with pytest.raises(KeyError):
        info.queue("nope")
    with pytest.raises(KeyError):
        info.subscription("q", "nope")


def test_format_prints_a_table_of_queues_and_subscriptions(broker: mqlite.Broker) -> None:
    broker.subscribe("orders", name="billing", events="created")
    broker.subscribe("orders")
    broker.publish("orders", "created", 1)
    text = broker.info().format()
    queues, subs = text.split("\n\n")
    header, rule, row = queues.splitlines()
    assert header.split() == ["queue", "start", "end", "retained", "retention"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert row.split() == ["orders", "0", "1", "1", "interest"]
    sub_lines = subs.splitlines()
    assert sub_lines[0].split()[:8] == [
        "queue",
        "subscription",
        "events",
        "mode",
        "consumers",
        "position",
        "lag",
        "pending",
    ]
    assert sub_lines[2].split()[:7] == ["orders", "billing", "created", "pull", "1", "0", "1"]
    assert sub_lines[3].split()[:3] == ["orders", "(ephemeral)", "*"]
    assert str(broker.info()) == text


def test_format_of_an_empty_broker_prints_just_headers(broker: mqlite.Broker) -> None:
    queues, subs = broker.info().format().split("\n\n")
    assert len(queues.splitlines()) == 2
    assert len(subs.splitlines()) == 2
