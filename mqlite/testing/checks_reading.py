"""Checks of publishing, filters, subscriptions, where a cursor starts, fanout and competing consumers."""

from __future__ import annotations

import mqlite
from mqlite.testing._suite import (
    _at,
    _Brokers,
    _check,
    _none,
    _offsets,
    _one,
    _payloads,
    _pull_all,
    _raises,
    _set_header,
)

# -- publishing ----------------------------------------------------------------------------------


@_check()
def publish_assigns_contiguous_offsets_from_zero(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    assert (queue.start_offset, queue.end_offset, len(queue)) == (0, 0, 0)
    got = [broker.publish("q", "e", i).offset for i in range(4)]
    got += _offsets(queue.publish_many([("e", 4), ("f", 5), ("e", 6)]))
    got += [queue.publish("e", 7).offset, broker.publish("q", "e", 8).offset]
    assert got == list(range(9)), f"offsets {got}"
    assert (queue.start_offset, queue.end_offset, len(queue)) == (0, 9, 9)
    reader = broker.subscribe("q", start="earliest")
    assert _offsets(_pull_all(reader)) == list(range(9))
    assert broker.publish("other", "e").offset == 0, "each queue numbers its own offsets"


@_check()
def publish_many_appends_all_or_none(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", 0)
    _raises(mqlite.InvalidName, lambda: queue.publish_many([("e", 1), ("bad*", 2)]))
    _raises(mqlite.InvalidArgument, lambda: queue.publish_many([("e", 1), "not a pair"]))
    assert queue.publish_many([]) == []
    assert queue.end_offset == 1
    assert _payloads(_pull_all(broker.subscribe("q", start="earliest"))) == [0]
    assert queue.publish("e", 1).offset == 1, "a refused publish_many used no offset"


@_check()
def a_message_carries_what_was_published(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    clock.advance(2.5)
    sub = broker.subscribe("orders")
    sent = broker.publish("orders", "created", {"id": 1, "tags": ["a", "b"]}, key="customer-7", headers={"trace": "t1"})
    plain = broker.publish("orders", "updated", "p")
    got, got_plain = _one(sub), _one(sub)
    assert got == sent
    assert (got.queue, got.event, got.payload, got.key, got.offset) == (
        "orders",
        "created",
        {"id": 1, "tags": ["a", "b"]},
        "customer-7",
        0,
    )
    assert dict(got.headers) == {"trace": "t1"}
    assert got.timestamp == clock.time(), f"timestamp {got.timestamp} is not the broker clock's {clock.time()}"
    assert got_plain == plain
    assert (got_plain.key, dict(got_plain.headers), got_plain.offset) == (None, {}, 1)
    _raises(TypeError, lambda: _set_header(got, "trace", "changed"))


# -- filters -------------------------------------------------------------------------------------


@_check()
def event_filters_match_names_and_wildcards(brokers: _Brokers) -> None:
    broker = brokers.open()
    names = broker.subscribe("shop", events=["order.*", "refund"])
    one_char = broker.subscribe("shop", events="v?")
    one_of = broker.subscribe("shop", events="[ab]x")
    every = broker.subscribe("shop", events="*")
    published = ["order.created", "order.a.b", "Order.created", "refund", "refunded", "v1", "v12", "ax", "bx", "cx"]
    for event in published:
        broker.publish("shop", event)
    assert [m.event for m in _pull_all(names)] == ["order.created", "order.a.b", "refund"]
    assert [m.event for m in _pull_all(one_char)] == ["v1"]
    assert [m.event for m in _pull_all(one_of)] == ["ax", "bx"]
    assert [m.event for m in _pull_all(every)] == published


@_check()
def join_and_leave_change_the_filter_from_now_on(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", events="a")
    broker.publish("q", "a", 0)
    broker.publish("q", "b", 1)
    assert _payloads(_pull_all(sub)) == [0]
    sub.join("b*")
    for i, event in enumerate(["a", "b", "bb", "c"], start=2):
        broker.publish("q", event, i)
    assert _payloads(_pull_all(sub)) == [2, 3, 4]
    sub.leave("a")
    assert sub.events == ("b*",)
    broker.publish("q", "a", 6)
    broker.publish("q", "b", 7)
    assert _payloads(_pull_all(sub)) == [7]
    _raises(mqlite.InvalidName, lambda: sub.leave("not-in-the-filter"))
    _raises(mqlite.InvalidName, lambda: sub.leave("b*"))  # the last entry


# -- ephemeral and named subscriptions -----------------------------------------------------------


@_check()
def an_ephemeral_subscription_sees_only_what_is_published_while_open(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", "before")
    sub = broker.subscribe("q")
    queue.publish("e", "during")
    assert _payloads(_pull_all(sub)) == ["during"]
    sub.close()
    queue.publish("e", "while closed")
    again = broker.subscribe("q")
    queue.publish("e", "live")
    assert _payloads(_pull_all(again)) == ["live"]
    again.close()
    assert [s for s in broker.info().subscriptions if s.name is None] == [], "a closed ephemeral cursor is forgotten"
    _raises(mqlite.SubscriptionClosed, lambda: again.get(timeout=0))


@_check()
def a_named_subscription_keeps_its_place_and_catches_up(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="billing")
    for i in range(4):
        broker.publish("q", "e", i)
    assert _payloads(sub.poll(max_messages=2)) == [0, 1]
    sub.close()
    broker.publish("q", "e", 4)
    info = broker.info().subscription("q", "billing")
    assert (info.mode, info.position, info.lag) == ("detached", 2, 3)
    again = broker.subscribe("q", name="billing", start="earliest")  # start: ignored for an existing name
    assert _payloads(_pull_all(again)) == [2, 3, 4]
    broker.publish("q", "e", 5)
    assert _payloads(_pull_all(again)) == [5]


# -- where a cursor starts, seek -----------------------------------------------------------------


@_check()
def start_earliest_latest_or_an_offset(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    for i in range(5):
        queue.publish("e", i)
    assert _offsets(_pull_all(broker.subscribe("q", start="earliest"))) == [0, 1, 2, 3, 4]
    assert _pull_all(broker.subscribe("q", start="latest")) == []
    assert _pull_all(broker.subscribe("q")) == [], "the default start is 'latest'"
    assert _offsets(_pull_all(broker.subscribe("q", start=2))) == [2, 3, 4]
    assert _pull_all(broker.subscribe("q", start=5)) == []
    _raises(mqlite.InvalidArgument, lambda: broker.subscribe("q", start=6))
    small = broker.queue("small", retention="limits", max_messages=2)
    for i in range(5):
        small.publish("e", i)
    assert _offsets(_pull_all(broker.subscribe("small", start=0))) == [3, 4], "an offset is clamped to start_offset"


@_check()
def start_at_a_datetime(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    queue = broker.queue("q", retention="limits")
    stamps = []
    for i in range(4):
        stamps.append(queue.publish("e", i).timestamp)
        clock.advance(10)
    assert _offsets(_pull_all(broker.subscribe("q", start=_at(stamps[2])))) == [2, 3]
    assert _offsets(_pull_all(broker.subscribe("q", start=_at(stamps[0] + 5)))) == [1, 2, 3]
    assert _pull_all(broker.subscribe("q", start=_at(clock.time() + 60))) == []


@_check()
def seek_moves_the_cursor_to_earliest_latest_or_an_offset(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    sub = broker.subscribe("q", name="n", start="earliest")
    for i in range(5):
        queue.publish("e", i)
    assert _offsets(_pull_all(sub)) == [0, 1, 2, 3, 4]
    assert sub.seek("earliest") == 0
    assert _offsets(_pull_all(sub)) == [0, 1, 2, 3, 4]
    assert sub.seek(3) == 3
    assert sub.position == 3
    assert _offsets(_pull_all(sub)) == [3, 4]
    assert sub.seek(1) == 1
    assert sub.seek("latest") == 5
    assert _pull_all(sub) == []
    _raises(mqlite.InvalidArgument, lambda: sub.seek(6))
    assert sub.position == 5


@_check()
def seek_to_a_datetime(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    queue = broker.queue("q", retention="limits")
    sub = broker.subscribe("q", name="n")
    stamps = []
    for i in range(4):
        stamps.append(queue.publish("e", i).timestamp)
        clock.advance(10)
    _pull_all(sub)
    assert sub.seek(_at(stamps[1])) == 1
    assert _offsets(_pull_all(sub)) == [1, 2, 3]
    assert sub.seek(_at(stamps[2] - 5)) == 2


# -- fanout and competing consumers --------------------------------------------------------------


@_check()
def consumers_sharing_a_name_split_the_messages(brokers: _Brokers) -> None:
    broker = brokers.open()
    a = broker.subscribe("jobs", name="workers")
    b = broker.subscribe("jobs", name="workers")
    for i in range(10):
        broker.publish("jobs", "run", i)
    got_a: list[int] = []
    got_b: list[int] = []
    for _ in range(5):
        got_a.append(_one(a).payload)
        got_b.append(_one(b).payload)
    _none(a)
    _none(b)
    assert not set(got_a) & set(got_b), f"both got {sorted(set(got_a) & set(got_b))}"
    assert sorted(got_a + got_b) == list(range(10))
    assert got_a == sorted(got_a), "each consumer sees its share in offset order"
    assert got_b == sorted(got_b), "each consumer sees its share in offset order"
    assert broker.info().subscription("jobs", "workers").consumers == 2


@_check()
def every_name_and_ephemeral_subscription_gets_every_message(brokers: _Brokers) -> None:
    broker = brokers.open()
    billing = broker.subscribe("orders", name="billing")
    shipping = broker.subscribe("orders", name="shipping")
    audit = broker.subscribe("orders")
    for i in range(4):
        broker.publish("orders", "created", i)
    for sub in (billing, shipping, audit):
        assert _payloads(_pull_all(sub)) == [0, 1, 2, 3]
