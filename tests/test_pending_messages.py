"""Subscription.pending_messages(): each pending message with its holder, held-since time and attempts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import mqlite


def listed(sub: mqlite.Subscription) -> list[tuple[int, int, str, str | None, float | None, float | None]]:
    return [(p.offset, p.attempts, p.state, p.holder, p.held_since, p.due) for p in sub.pending_messages()]


def test_out_waiting_and_ready_messages_are_listed(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = mqlite.ManualClock(start=1000.0)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("q", name="w", ack="manual")
    label = f"q/w#{sub.id}"
    for i in range(4):
        broker.publish("q", "e", i)
    taken = sub.poll(3)
    clock.advance(5)
    sub.nack(taken[1], delay=30)
    sub.nack(taken[2])
    assert listed(sub) == [
        (0, 1, "out", label, 1000.0, None),
        (1, 1, "waiting", None, None, 1035.0),
        (2, 1, "ready", None, None, None),
    ]
    again = sub.get(timeout=0)  # the ready one comes first
    assert again is not None
    assert again.offset == 2
    assert listed(sub)[2] == (2, 2, "out", label, 1005.0, None)
    assert [p.message.payload for p in sub.pending_messages()] == [0, 1, 2]
    sub.ack(taken[0])
    assert [p.offset for p in sub.pending_messages()] == [1, 2]


def test_nothing_pending_under_auto_ack(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="w")
    broker.publish("q", "e", 1)
    assert sub.get(timeout=0) is not None
    assert sub.pending_messages() == []


def test_competing_consumers_each_show_as_holder(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    first = broker.subscribe("q", name="w", ack="manual")
    second = broker.subscribe("q", name="w", ack="manual")
    broker.publish("q", "e", 1)
    broker.publish("q", "e", 2)
    assert first.get(timeout=0) is not None
    assert second.get(timeout=0) is not None
    holders = [p.holder for p in first.pending_messages()]
    assert holders == [f"q/w#{first.id}", f"q/w#{second.id}"]
    assert second.pending_messages() == first.pending_messages()  # one cursor, one list


def test_another_broker_on_the_file_shows_as_holder(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    clock = mqlite.ManualClock(start=2000.0)
    with mqlite.Broker(path, clock=clock) as here, mqlite.Broker(path, clock=clock) as there:
        mine = here.subscribe("q", name="w", ack="manual")
        theirs = there.subscribe("q", name="w", ack="manual")
        here.publish("q", "e", "a")
        here.publish("q", "e", "b")
        assert mine.get(timeout=0) is not None
        clock.advance(7)
        taken = theirs.get(timeout=5)
        assert taken is not None
        [held_here, held_there] = mine.pending_messages()
        assert (held_here.offset, held_here.holder, held_here.held_since) == (0, f"q/w#{mine.id}", 2000.0)
        assert held_there.offset == 1
        assert held_there.holder is not None
        assert held_there.holder.startswith("broker ")
        assert (held_there.attempts, held_there.state, held_there.held_since) == (1, "out", 2007.0)
        assert held_there.message.payload == "b"


def test_the_broker_lists_a_subscription_that_is_not_attached(make_broker: Callable[..., mqlite.Broker]) -> None:
    clock = mqlite.ManualClock(start=500.0)
    broker = make_broker(clock=clock)
    sub = broker.subscribe("q", name="w", ack="manual")
    broker.publish("q", "e", 1)
    broker.publish("q", "e", 2)
    taken = sub.get(timeout=0)
    assert taken is not None
    sub.nack(taken, delay=10)
    assert [(p.offset, p.state, p.due) for p in broker.pending_messages("q", "w")] == [(0, "waiting", 510.0)]
    assert broker.pending_messages("q", "w") == sub.pending_messages()
    sub.close()
    [left] = broker.pending_messages("q", "w")  # nobody attached: it waits for the next consumer
    assert (left.offset, left.holder) == (0, None)
    with pytest.raises(mqlite.InvalidArgument, match="no subscription 'other' on 'q'"):
        broker.pending_messages("q", "other")
    with pytest.raises(mqlite.InvalidArgument, match="no queue 'nowhere'"):
        broker.pending_messages("nowhere", "w")
