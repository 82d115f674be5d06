"""A ManualDispatcher steps the push subscriptions of one queue in turns (issue 14).

Each turn settles one subscription's batch and takes the next one's in one lock section, and one
waiter watches the whole queue. None of that may show: inside a callback of subscription A, every
other subscription B of the queue must look as if nothing of this run had touched it yet, so that
whatever A does to B (a seek, a close, a filter change) or reads of it (``info()``, ``position``)
comes out as it did when each subscription was stepped on its own. Each test below fails if B's
batch is taken before A's callbacks return (checked by taking every batch of a round first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import mqlite

MakeBroker = Callable[..., mqlite.Broker]


def _manual(make_broker: MakeBroker) -> mqlite.Broker:
    return make_broker(clock=mqlite.ManualClock(), dispatcher=mqlite.ManualDispatcher())


def test_a_seek_of_another_subscription_inside_a_callback_decides_what_it_gets(make_broker: MakeBroker) -> None:
    broker = _manual(make_broker)
    seen_b: list[int] = []
    subs: dict[str, mqlite.Subscription] = {}

    def a(message: mqlite.Message) -> None:
        if message.offset == 0:
            subs["b"].seek("latest")  # B has not been handed offset 0: it never will be

    broker.subscribe("q", callback=a)
    subs["b"] = broker.subscribe("q", name="b", callback=lambda m: seen_b.append(m.offset))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert seen_b == []
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=0)
    assert seen_b == [1]
    info = broker.info().subscription("q", "b")
    assert (info.position, info.delivered, info.redelivered, info.pending) == (2, 1, 0, 0)


def test_a_seek_back_of_another_subscription_inside_a_callback_reads_from_there_in_order(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    seen_b: list[int] = []
    subs: dict[str, mqlite.Subscription] = {}

    def a(message: mqlite.Message) -> None:
        if message.offset == 2:
            subs["b"].seek(0)  # B has not been handed offset 2: it reads 0, 1, 2 from here

    broker.queue("q", retention="limits")  # keeps what every subscription has read
    broker.subscribe("q", callback=a)
    subs["b"] = broker.subscribe("q", name="b", callback=lambda m: seen_b.append(m.offset))
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=0)
    broker.publish("q", "e", 2)
    assert broker.drain(timeout=0)
    assert seen_b == [0, 1, 0, 1, 2]
    info = broker.info().subscription("q", "b")
    assert (info.position, info.delivered, info.redelivered) == (3, 5, 0)


def test_a_seek_forward_of_another_subscription_inside_a_callback_skips_what_it_had_not_been_handed(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    seen_b: list[int] = []
    subs: dict[str, mqlite.Subscription] = {}

    def a(message: mqlite.Message) -> None:
        if message.offset == 0:
            subs["b"].seek(2)

    broker.subscribe("q", callback=a)
    subs["b"] = broker.subscribe("q", name="b", callback=lambda m: seen_b.append(m.offset))
    for i in range(3):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    assert seen_b == [2]


def test_closing_another_subscription_inside_a_callback_runs_none_of_its_callbacks(make_broker: MakeBroker) -> None:
    broker = _manual(make_broker)
    seen_b: list[int] = []
    subs: dict[str, mqlite.Subscription] = {}

    def a(message: mqlite.Message) -> None:
        subs["b"].close()

    broker.subscribe("q", callback=a)
    subs["b"] = broker.subscribe("q", name="b", callback=lambda m: seen_b.append(m.offset))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert seen_b == []
    info = broker.info().subscription("q", "b")
    assert (info.position, info.delivered, info.pending, info.redelivered) == (0, 0, 0, 0)
    # The named cursor kept its place: the next subscription of the name gets offset 0, first time.
    again: list[mqlite.Message] = []
    broker.subscribe("q", name="b", callback=again.append)
    assert broker.drain(timeout=0)
    assert [(m.offset, m.attempt) for m in again] == [(0, 1)]


def test_a_filter_change_of_another_subscription_inside_a_callback_applies_to_this_message(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    seen_b: list[int] = []
    subs: dict[str, mqlite.Subscription] = {}

    def a(message: mqlite.Message) -> None:
        if message.offset == 0:
            subs["b"].leave("e")

    broker.subscribe("q", callback=a)
    subs["b"] = broker.subscribe("q", events=["e", "f"], callback=lambda m: seen_b.append(m.offset))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    broker.publish("q", "f", 1)
    assert broker.drain(timeout=0)
    assert seen_b == [1]


def test_another_subscription_read_inside_a_callback_has_not_been_handed_the_message(make_broker: MakeBroker) -> None:
    broker = _manual(make_broker)
    subs: dict[str, mqlite.Subscription] = {}
    seen: list[tuple[int, int, int]] = []

    def a(message: mqlite.Message) -> None:
        info = broker.info().subscription("q", "b")
        seen.append((info.position, info.lag, info.delivered))

    broker.subscribe("q", callback=a)
    subs["b"] = broker.subscribe("q", name="b", callback=lambda m: None)
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert seen == [(0, 1, 0)]
    assert (subs["b"].position, subs["b"].lag) == (1, 0)


def test_each_subscription_gets_its_messages_in_order_when_callbacks_publish(make_broker: MakeBroker) -> None:
    # A callback that publishes to its own queue: the queue's one waiter, registered with the
    # round's first take, wakes for it, and the same drain delivers it to every subscription.
    broker = _manual(make_broker)
    seen: list[list[int]] = [[], [], []]

    def publishing(message: mqlite.Message) -> None:
        seen[0].append(message.payload)
        if message.payload < 3:
            broker.publish("q", "e", message.payload + 1)

    broker.subscribe("q", callback=publishing)
    broker.subscribe("q", callback=lambda m: seen[1].append(m.payload))
    broker.subscribe("q", callback=lambda m: seen[2].append(m.payload))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert seen == [[0, 1, 2, 3]] * 3


def _fails_first_delivery(calls: list[tuple[str, int, int]]) -> Callable[[mqlite.Message], None]:
    """A callback that notes each call in ``calls`` and raises on a message's first delivery."""

    def flaky(message: mqlite.Message) -> None:
        calls.append(("flaky", message.offset, message.attempt))
        if message.attempt == 1:
            raise RuntimeError("first delivery fails")

    return flaky


def test_a_failing_callback_is_retried_and_the_others_of_its_queue_are_delivered_once(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    calls: list[tuple[str, int, int]] = []
    flaky = _fails_first_delivery(calls)
    broker.subscribe("q", callback=lambda m: calls.append(("before", m.offset, m.attempt)))
    broker.subscribe("q", callback=flaky, backoff=mqlite.Backoff(initial=0.0))
    broker.subscribe("q", callback=lambda m: calls.append(("after", m.offset, m.attempt)))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    assert sorted(calls) == [("after", 0, 1), ("before", 0, 1), ("flaky", 0, 1), ("flaky", 0, 2)]


def test_a_new_event_a_pattern_matches_wakes_the_queue_of_subscriptions_with_different_filters(
    make_broker: MakeBroker,
) -> None:
    # The queue's one waiter wants what any of its subscriptions wants, from their own name sets:
    # an event published for the first time joins the set of each pattern that matches it.
    broker = _manual(make_broker)
    orders: list[str] = []
    users: list[str] = []
    broker.subscribe("q", events="order.*", callback=lambda m: orders.append(m.event))
    broker.subscribe("q", events="user.*", callback=lambda m: users.append(m.event))
    assert broker.drain(timeout=0)
    broker.publish("q", "order.created", 0)
    assert broker.drain(timeout=0)
    broker.publish("q", "user.joined", 1)
    assert broker.drain(timeout=0)
    assert (orders, users) == (["order.created"], ["user.joined"])


@pytest.mark.parametrize("closing", ["first", "last"])
def test_closing_a_subscription_leaves_the_others_of_its_queue_delivered(make_broker: MakeBroker, closing: str) -> None:
    broker = _manual(make_broker)
    seen: list[list[Any]] = [[], [], []]
    subs = [broker.subscribe("q", callback=seen[i].append) for i in range(3)]
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=0)
    subs[0 if closing == "first" else 2].close()
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=0)
    counts = [len(s) for s in seen]
    assert counts == ([1, 2, 2] if closing == "first" else [2, 2, 1])


def test_the_subscriptions_that_want_every_event_share_one_waiter_and_a_filtered_one_waits_alone(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    seen: dict[str, list[int]] = {"all 1": [], "all 2": [], "e1": [], "e2": []}
    for label in ("all 1", "all 2"):
        broker.subscribe("q", callback=lambda m, label=label: seen[label].append(m.offset))
    for event in ("e1", "e2"):
        broker.subscribe("q", events=event, callback=lambda m, event=event: seen[event].append(m.offset))
    broker.publish("q", "e1", None)
    broker.publish("q", "e2", None)
    assert broker.drain(timeout=0)
    # One waiter for both every-event subscriptions, one for each filtered one (docs/api.md).
    assert broker.info().queue("q").waiters == 3
    broker.publish("q", "e2", None)  # wakes the shared waiter and e2's, not e1's
    assert broker.info().queue("q").waiters == 1
    assert broker.drain(timeout=0)
    assert seen == {"all 1": [0, 1, 2], "all 2": [0, 1, 2], "e1": [0], "e2": [1, 2]}


# The turns after a round's first go by the engine's lean push_step, and the round calls the
# callbacks itself; these pin what that path must do as PushWorker.handle and push_turn do.


def test_a_callback_failing_mid_batch_after_the_first_turn_is_retried_and_its_batch_goes_on(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    calls: list[tuple[str, int, int]] = []

    def flaky(message: mqlite.Message) -> None:
        calls.append(("flaky", message.offset, message.attempt))
        if message.offset == 1 and message.attempt == 1:
            raise RuntimeError("the second message fails once")

    broker.subscribe("q", callback=lambda m: calls.append(("first", m.offset, m.attempt)))
    broker.subscribe("q", callback=flaky, backoff=mqlite.Backoff(initial=0.0))
    broker.subscribe("q", callback=lambda m: calls.append(("last", m.offset, m.attempt)))
    assert broker.drain(timeout=0)
    for i in range(3):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    assert [c for c in calls if c[0] == "flaky"] == [("flaky", 0, 1), ("flaky", 1, 1), ("flaky", 2, 1), ("flaky", 1, 2)]
    others = [("first", i, 1) for i in range(3)] + [("last", i, 1) for i in range(3)]
    assert [c for c in calls if c[0] != "flaky"] == others


def test_a_subscription_closing_itself_mid_batch_after_the_first_turn_gives_back_the_rest(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    seen: dict[str, list[int]] = {"first": [], "closing": [], "last": [], "again": []}
    subs: dict[str, mqlite.Subscription] = {}

    def closing(message: mqlite.Message) -> None:
        seen["closing"].append(message.offset)
        if message.offset == 1:
            subs["closing"].close()

    broker.subscribe("q", callback=lambda m: seen["first"].append(m.offset))
    subs["closing"] = broker.subscribe("q", name="c", callback=closing)
    broker.subscribe("q", callback=lambda m: seen["last"].append(m.offset))
    assert broker.drain(timeout=0)
    for i in range(4):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=0)
    assert seen == {"first": [0, 1, 2, 3], "closing": [0, 1], "last": [0, 1, 2, 3], "again": []}
    # Offset 1 was in hand, its callback returned after the close: it counts as handled, and
    # what was never handed over goes back to the name's line.
    broker.subscribe("q", name="c", callback=lambda m: seen["again"].append(m.offset))
    assert broker.drain(timeout=0)
    assert seen["again"] == [2, 3]


class _Stop(BaseException):
    """Not an Exception: like KeyboardInterrupt, it stops the run."""


def test_a_base_exception_from_a_callback_after_the_first_turn_gives_back_its_message_and_the_rest(
    make_broker: MakeBroker,
) -> None:
    broker = _manual(make_broker)
    calls: list[tuple[str, int, int]] = []
    stop = [True]

    def stopping(message: mqlite.Message) -> None:
        calls.append(("stopping", message.offset, message.attempt))
        if message.offset == 1 and stop[0]:
            stop[0] = False
            raise _Stop

    broker.subscribe("q", callback=lambda m: calls.append(("first", m.offset, m.attempt)))
    broker.subscribe("q", name="s", callback=stopping)
    assert broker.drain(timeout=0)
    for i in range(3):
        broker.publish("q", "e", i)
    with pytest.raises(_Stop):
        broker.drain(timeout=0)
    assert broker.drain(timeout=0)  # nothing left claimed or out: the next run delivers the rest
    assert [c for c in calls if c[0] == "first"] == [("first", i, 1) for i in range(3)]
    assert [c[1] for c in calls if c[0] == "stopping"] == [0, 1, 1, 2]


def test_a_subscription_after_one_handed_a_redelivery_gets_the_message_as_a_first_delivery(
    make_broker: MakeBroker,
) -> None:
    # The lean step hands the next subscription the batch just settled when it is the same run
    # of the log; a redelivery's copy (attempt 2) is not, though it has the same offset.
    broker = _manual(make_broker)
    calls: list[tuple[str, int, int]] = []
    flaky = _fails_first_delivery(calls)
    broker.subscribe("q", name="pin")  # a pull subscription that keeps offset 0 in the log
    broker.subscribe("q", callback=flaky, backoff=mqlite.Backoff(initial=1.0))
    broker.publish("q", "e", 0)
    assert not broker.drain(timeout=0)  # the retry waits for the clock
    broker.subscribe("q", callback=lambda m: calls.append(("late", m.offset, m.attempt)), start="earliest")
    broker._clock.advance(1.0)  # type: ignore[attr-defined]  # the broker's ManualClock
    assert broker.drain(timeout=0)
    assert calls == [("flaky", 0, 1), ("flaky", 0, 2), ("late", 0, 1)]


def test_an_engine_that_wraps_a_take_gets_no_lean_step_even_with_a_turn_of_its_own() -> None:
    # The lean step takes without _take_locked: a subclass that watches takes must not get it,
    # though it wrote a push_turn of its own (which then is the only way a round takes).
    from mqlite.engine.memory import MemoryQueue

    class Watching(MemoryQueue):
        def _take_locked(self, *args: Any, **kwargs: Any) -> Any:
            return super()._take_locked(*args, **kwargs)

        push_turn = MemoryQueue.push_turn

    assert Watching.push_step is None
    assert Watching.push_turn is MemoryQueue.push_turn
    assert MemoryQueue.push_step is not None
