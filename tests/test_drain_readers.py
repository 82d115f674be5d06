"""After a publish, a drain looks only at the push cursors that read what was published.

Each queue knows an offset below which every push cursor had handled everything (the last drain
found so), and which cursors something other than a publish gave work since (a failure, a
give-back, a seek, a filter change, a new subscription). After a publish, a drain looks at
those, at the cursors that read every event, and at the filtered ones that read an event
published since: not at pull cursors, nor at filtered push cursors whose events did not come.
The first test checks which cursors that is; the others check, each with many filtered push
subscriptions beside the one that gets work, that a drain still sees all the work there is: on a
``ManualDispatcher``, and on push threads held up while the drain looks (a drain that missed the
cursor would say done).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import fails_first, gated, idle_then, with_idle_queues

import mqlite

MakeBroker = Callable[..., mqlite.Broker]

pytestmark = pytest.mark.not_redis("the Redis engine asks the server at every drain")

FILTERED = 30
"""How many filtered push subscriptions the tests put on the queue, each on an event of its own."""


def _manual(make_broker: MakeBroker) -> tuple[mqlite.Broker, mqlite.ManualClock]:
    clock = mqlite.ManualClock()
    return make_broker(clock=clock, dispatcher=mqlite.ManualDispatcher()), clock


def _filtered(broker: mqlite.Broker, **kwargs: Any) -> tuple[list[mqlite.Subscription], list[list[int]]]:
    """FILTERED push subscriptions to ``q``, subscription i on event ``e<i>``, and what each got."""
    seen: list[list[int]] = [[] for _ in range(FILTERED)]
    subs = [
        broker.subscribe("q", f"e{i}", callback=lambda m, got=seen[i]: got.append(m.offset), **kwargs)
        for i in range(FILTERED)
    ]
    return subs, seen


def test_a_drain_after_a_publish_looks_only_at_the_push_cursors_that_read_it(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    subs, seen = _filtered(broker)
    everything: list[int] = []
    everyone = broker.subscribe("q", callback=lambda m: everything.append(m.offset))
    pullers = [broker.subscribe("q", name=f"puller{i}") for i in range(3)]  # behind, and never looked at
    for i in range(FILTERED):
        broker.publish("q", f"e{i}", i)
    assert broker.drain(timeout=0)
    message = broker.publish("q", "e3", "again")
    engine: Any = broker._engines["q"]
    with engine._lock:
        looked_at = engine._push_candidates_locked(message.offset + 1)
    assert looked_at == [everyone._cursor, subs[3]._cursor]
    assert not {p._cursor for p in pullers} & set(looked_at)
    assert broker.drain(timeout=0)
    assert seen[3] == [3, message.offset]
    assert everything == list(range(FILTERED + 1))


def test_filtered_push_subscriptions_each_get_their_events_with_a_drain_after_every_publish(
    make_broker: MakeBroker,
) -> None:
    broker, _ = _manual(make_broker)
    with_idle_queues(broker)
    _, seen = _filtered(broker)
    rng = random.Random(14)
    expected: list[list[int]] = [[] for _ in range(FILTERED)]
    for _ in range(200):
        i = rng.randrange(FILTERED)
        expected[i].append(broker.publish("q", f"e{i}", None).offset)
        assert broker.drain(timeout=0)
        assert seen == expected


def test_a_wildcard_subscription_gets_an_event_first_published_after_it_waited(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    _filtered(broker)
    got: list[str] = []
    broker.subscribe("q", "order.*", callback=lambda m: got.append(m.event))
    broker.publish("q", "order.created", 0)
    assert broker.drain(timeout=0)  # its waiter is filed under the one name it knows
    broker.publish("q", "order.paid", 1)  # a name no cursor knew: its set grows
    assert broker.drain(timeout=0)
    broker.publish("q", "order.paid", 2)
    assert broker.drain(timeout=0)
    assert got == ["order.created", "order.paid", "order.paid"]


def test_a_filtered_retry_keeps_drains_false_while_other_events_come(make_broker: MakeBroker) -> None:
    broker, clock = _manual(make_broker)
    _, seen = _filtered(broker)
    calls: list[int] = []

    broker.subscribe("q", "flaky", callback=fails_first(calls), backoff=mqlite.Backoff(initial=5.0))
    failing = broker.publish("q", "flaky", 0).offset
    assert not broker.drain(timeout=0)
    for i in range(5):
        broker.publish("q", f"e{i}", i)  # work for others, none for the retry
        assert not broker.drain(timeout=0), "the retry is still waiting: drain must not say done"
    clock.advance(5.0)
    assert broker.drain(timeout=0)
    assert calls == [failing, failing]
    assert [len(s) for s in seen[:5]] == [1] * 5


def test_a_filtered_seek_back_is_delivered_again_by_the_next_drain(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    broker.subscribe("q", name="keeper", start="earliest")  # a pull cursor that keeps the messages retained
    subs, seen = _filtered(broker)
    for _ in range(3):
        broker.publish("q", "e1", None)
    assert broker.drain(timeout=0)
    first = list(seen[1])
    subs[1].seek("earliest")
    broker.publish("q", "e2", None)  # a publish that does not concern it
    assert broker.drain(timeout=0)
    assert seen[1] == first + first


def test_a_filter_changed_to_take_in_an_event_gets_its_messages_from_there_on(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    subs, seen = _filtered(broker)
    broker.publish("q", "e5", None)
    assert broker.drain(timeout=0)
    subs[4].join("e5")
    later = broker.publish("q", "e5", None).offset
    assert broker.drain(timeout=0)
    assert seen[4] == [later]
    assert len(seen[5]) == 2


def test_a_new_filtered_subscription_from_the_earliest_gets_what_came_before(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    _filtered(broker)
    for i in range(4):
        broker.publish("q", f"e{i}", None)
        assert broker.drain(timeout=0)
    late: list[int] = []
    broker.subscribe("q", "e2", start="earliest", callback=lambda m: late.append(m.offset))
    assert broker.drain(timeout=0)
    assert late == [2]


def test_a_nack_of_a_filtered_manual_ack_subscription_is_redelivered(make_broker: MakeBroker) -> None:
    broker, _ = _manual(make_broker)
    _filtered(broker)
    held: list[mqlite.Message] = []
    sub = broker.subscribe("q", "held", ack="manual", callback=held.append)
    broker.publish("q", "held", 0)
    assert broker.drain(timeout=0)
    broker.publish("q", "e7", None)
    assert broker.drain(timeout=0)
    sub.nack(held[0])
    assert broker.drain(timeout=0)
    assert [m.offset for m in held] == [0, 0]
    sub.ack(held[1])


def test_a_publish_holds_the_drain_for_the_filtered_subscription_that_reads_it(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)
    _, seen = _filtered(broker)
    held: list[int] = []
    broker.subscribe("q", "wanted", callback=gated(gate, held))
    broker.publish("q", "wanted", None)
    broker.publish("q", "e1", None)
    idle_then(broker, gate, lambda: broker.publish("q", "wanted", None))
    assert held == [0, 2]
    assert seen[1] == [1]


def test_a_new_event_holds_the_drain_for_the_wildcard_subscription_that_reads_it(
    make_each_or_batch: MakeBroker, gate: threading.Event
) -> None:
    broker = make_each_or_batch()
    with_idle_queues(broker)
    _filtered(broker)
    held: list[int] = []
    broker.subscribe("q", "order.*", callback=gated(gate, held))
    broker.publish("q", "order.created", None)
    idle_then(broker, gate, lambda: broker.publish("q", "order.paid", None))  # a name no cursor knew
    assert held == [0, 1]
