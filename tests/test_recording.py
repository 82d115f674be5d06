"""record(broker): the history of a real broker, and the checkers' verdicts on it.

Correct runs must come out valid; a buggy consumer (or a test that skips messages) must show
the anomaly the checker names. Every test runs on memory and on a file unless marked.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from typing import Any

import pytest

import mqlite
from mqlite.testing import History, Op, checkers, record
from tests.helpers import WAIT

MakeBroker = Callable[..., mqlite.Broker]


def kinds(history: History, offset: int, queue: str = "q") -> list[str]:
    """The op types of one offset of ``queue``, in order, with the reason of each nack."""
    return [
        op.type if op.reason is None else f"{op.type}:{op.reason}" for op in history.filter(queue=queue, offset=offset)
    ]


def all_valid(history: History, subscription: str | None = None, **cursor: Any) -> None:
    checkers.compose(
        checkers.total_queue(history, subscription, **cursor),
        checkers.order(history, subscription, **cursor),
        checkers.redelivery(history, subscription, **cursor),
    ).assert_valid()


# -- what is recorded ---------------------------------------------------------------------------


def test_a_pull_with_auto_acks_records_publish_subscribe_and_settling_deliveries(make_broker: MakeBroker) -> None:
    clock = mqlite.ManualClock(start=50.0)
    broker = make_broker(clock=clock)
    history = record(broker)
    sub = broker.subscribe("q", name="billing", events="created")
    broker.publish("q", "created", {"id": 1}, key="k")
    clock.advance(2)
    broker.publish("q", "updated", 2)
    assert sub.get(timeout=WAIT) is not None
    subscribe, publish, _, deliver = history.ops
    assert (subscribe.type, subscribe.subscription, subscribe.consumer) == ("subscribe", "billing", f"#{sub.id}")
    assert (subscribe.position, subscribe.events) == (0, ("created",))
    assert (publish.offset, publish.event, publish.key, publish.payload) == (0, "created", "k", {"id": 1})
    assert publish.time == 50.0
    assert (deliver.type, deliver.offset, deliver.attempt, deliver.settled) == ("deliver", 0, 1, True)
    assert deliver.time == 52.0
    all_valid(history, "billing")


def test_a_broker_that_does_not_record_keeps_its_own_engine_class(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.publish("q", "e")
    plain = type(broker._engines["q"])
    record(broker)
    assert type(broker._engines["q"]) is not plain
    assert issubclass(type(broker._engines["q"]), plain)
    other = make_broker()
    other.publish("q", "e")
    assert type(other._engines["q"]) is plain  # recording one broker changes no other


def test_a_recorder_covers_queues_and_subscriptions_made_before_and_after_it(make_broker: MakeBroker) -> None:
    broker = make_broker()
    early = broker.subscribe("old", name="s")
    history = record(broker)
    late = broker.subscribe("new", name="s")
    broker.publish("old", "e", 1)
    broker.queue("new").publish("e", 2)
    assert early.get(timeout=WAIT) is not None
    assert late.get(timeout=WAIT) is not None
    assert [(op.type, op.queue) for op in history if op.type in ("publish", "deliver")] == [
        ("publish", "old"),
        ("publish", "new"),
        ("deliver", "old"),
        ("deliver", "new"),
    ]


def test_two_recorders_each_get_what_happens_after_they_began(make_broker: MakeBroker) -> None:
    broker = make_broker()
    first = record(broker)
    broker.publish("q", "e")
    second = record(broker)
    broker.publish("q", "e")
    assert [op.offset for op in first] == [0, 1]
    assert [op.offset for op in second] == [1]


def test_a_failed_publish_is_recorded_with_its_error(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.queue("q", retention="limits", max_messages=1, overflow="reject")
    history = record(broker)
    broker.publish("q", "e", 1)
    with pytest.raises(mqlite.QueueFull):
        broker.publish("q", "e", 2)
    failed = history.filter(type="publish-failed")
    assert [op.payload for op in failed] == [2]
    assert "QueueFull" in (failed[0].error or "")


def test_a_publish_that_the_duplicate_window_refuses_is_no_publish_op(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.queue("q", retention="limits")
    history = record(broker)
    sub = broker.subscribe("q", name="s", start="earliest")
    broker.publish("q", "e", "first", dedup_id="a")
    broker.publish("q", "e", "retry", dedup_id="a")  # refused: returns offset 0
    broker.queue("q").publish("e", "retry again", dedup_id="a")
    batch = broker.queue("q").publish_many(
        [("e", "b", None, None, "b"), ("e", "b again", None, None, "b"), ("e", "c", None, None, "a")]
    )
    assert [m.offset for m in batch] == [1, 1, 0]
    with broker.transaction() as tx:
        tx.publish("q", "e", "in tx", dedup_id="a")
        tx.publish("q", "e", "d", dedup_id="d")
    assert [(op.offset, op.payload) for op in history.filter(type="publish")] == [(0, "first"), (1, "b"), (2, "d")]
    assert len(sub.poll(10, timeout=0)) == 3
    checkers.total_queue(history, "s", exactly_once=True).assert_valid()


def test_join_and_leave_record_the_new_filter_from_the_position(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s", events="a")
    broker.publish("q", "a")
    assert sub.get(timeout=WAIT) is not None
    sub.join("b")
    broker.publish("q", "b")
    assert sub.get(timeout=WAIT) is not None
    sub.leave("a")
    broker.publish("q", "a")
    assert [(op.position, op.events) for op in history.filter(type="refilter")] == [(1, ("a", "b")), (2, ("b",))]
    all_valid(history, "s")


# -- manual acks, nacks, timeouts, dead letters ---------------------------------------------------


def test_a_nack_is_recorded_before_the_redelivery_and_its_attempt(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual")
    broker.publish("q", "e")
    first = sub.get(timeout=WAIT)
    assert first is not None
    sub.nack(first, delay=0)
    again = sub.get(timeout=WAIT)
    assert again is not None
    sub.ack(again)
    assert kinds(history, 0) == ["publish", "deliver", "nack:nack", "deliver", "ack"]
    assert [op.attempt for op in history.filter(type="deliver")] == [1, 2]
    assert history.filter(type="nack")[0].delay == 0.0
    all_valid(history, "s")


def test_a_redelivery_and_a_reread_of_one_offset_in_one_take_get_their_own_attempts(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    queue = broker.queue("q", retention="limits", max_messages=100)  # keeps what was read, for the seek back
    sub = broker.subscribe("q", name="n", ack="manual", start="earliest")
    queue.publish_many([("e", i) for i in range(3)])
    assert [m.offset for m in sub.poll(3)] == [0, 1, 2]
    assert sub.seek(2) == 2
    sub.nack(2)
    assert [m.offset for m in sub.poll(2)] == [2, 2]  # redelivered, then read again after the seek back
    delivered = [(op.offset, op.attempt) for op in history if op.type == "deliver"]
    assert delivered == [(0, 1), (1, 1), (2, 1), (2, 2), (2, 1)]
    checkers.order(history, "n").assert_valid()


def test_an_ack_timeout_is_a_nack_before_the_redelivery(make_broker: MakeBroker) -> None:
    clock = mqlite.ManualClock()
    broker = make_broker(clock=clock)
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual", ack_timeout=10)
    broker.publish("q", "e")
    assert sub.get(timeout=WAIT) is not None
    clock.advance(11)
    again = sub.get(timeout=WAIT)
    assert again is not None
    assert again.offset == 0
    sub.ack(again)
    assert kinds(history, 0) == ["publish", "deliver", "nack:ack timeout", "deliver", "ack"]
    all_valid(history, "s")


def test_max_deliveries_records_nack_then_dead_letter_then_its_publish(make_broker: MakeBroker) -> None:
    clock = mqlite.ManualClock()
    broker = make_broker(clock=clock)
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual", ack_timeout=5, max_deliveries=2)
    broker.publish("q", "e", "poison")
    for _ in range(2):
        assert sub.get(timeout=WAIT) is not None
        clock.advance(6)
    assert sub.get(timeout=0) is None  # the read finds the timeout and dead-letters it
    ops = [op for op in history if op.type not in ("subscribe",)]
    assert [op.type for op in ops][-3:] == ["nack", "dead-letter", "publish"]
    dead, dlq_publish = ops[-2], ops[-1]
    assert (dead.attempt, dead.reason, dead.dead_letter_queue) == (2, "ack timeout", "q.dead-letter")
    assert (dlq_publish.queue, dlq_publish.payload) == ("q.dead-letter", "poison")
    all_valid(history, "s")


def test_a_checker_finds_a_dead_letter_given_too_early(make_broker: MakeBroker) -> None:
    """The recorded max_deliveries is the broker's: claiming a lower one shows the dead letter as early."""
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual", max_deliveries=1)
    broker.publish("q", "e")
    message = sub.get(timeout=WAIT)
    assert message is not None
    sub.nack(message)
    assert checkers.redelivery(history, "s").valid
    assert checkers.redelivery(history, "s", max_deliveries=2).counts["dead-letter-unexpected"] == 1


# -- buggy consumers, and tests that skip -------------------------------------------------------------


def test_a_consumer_that_swallows_errors_without_acking_loses_messages(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual")
    for i in range(4):
        broker.publish("q", "e", i)
    for message in sub.poll(10):
        try:
            if message.payload == 2:
                raise ValueError("bad payload")
            sub.ack(message)
        except ValueError:
            pass  # the bug: neither acked nor nacked
    result = checkers.total_queue(history, "s")
    assert not result.valid
    assert result.offsets("lost") == [2]
    assert "delivered, never settled" in result.explain()


def test_a_seek_forward_is_recorded_as_a_new_pass_not_as_a_loss(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s")
    for i in range(6):
        broker.publish("q", "e", i)
    assert sub.get(timeout=WAIT) is not None
    sub.seek(4)  # skipping on purpose: the checkers take a seek as the test's decision
    assert [m.offset for m in sub.poll(10)] == [4, 5]
    seek = history.filter(type="seek")[0]
    assert (seek.position, seek.offset) == (1, 4)
    all_valid(history, "s")
    without_the_seek = History(op for op in history if op.type != "seek")
    assert checkers.total_queue(without_the_seek, "s").offsets("lost") == [1, 2, 3]
    assert checkers.order(without_the_seek, "s").offsets("skip") == [1, 2, 3]


def test_resubscribing_at_latest_after_deleting_loses_what_was_published_meanwhile(make_broker: MakeBroker) -> None:
    """The "restart at latest" bug: a service that recreates its subscription on start-up."""
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s")
    broker.publish("q", "e", 0)
    assert sub.get(timeout=WAIT) is not None
    sub.close()
    broker.publish("q", "e", 1)  # while the service is down
    broker.delete_subscription("q", "s")
    sub = broker.subscribe("q", name="s", start="latest")
    broker.publish("q", "e", 2)
    assert [m.offset for m in sub.poll(10)] == [2]
    assert checkers.total_queue(history, "s").offsets("lost") == [1]
    assert checkers.order(history, "s").offsets("skip") == [1]


def test_a_consumer_too_slow_for_retention_loses_what_was_dropped(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.queue("q", retention="limits", max_messages=2)
    history = record(broker)
    sub = broker.subscribe("q", name="s")
    for i in range(5):
        broker.publish("q", "e", i)
    assert [m.offset for m in sub.poll(10)] == [3, 4]
    assert checkers.total_queue(history, "s").offsets("lost") == [0, 1, 2]


def test_seeking_back_is_a_duplicate_and_still_valid(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s", start="earliest")
    broker.queue("q", retention="limits", max_messages=100)  # keep what was read, so a seek back finds it
    for i in range(3):
        broker.publish("q", "e", i)
    assert len(sub.poll(10)) == 3
    assert sub.seek(0) == 0
    assert len(sub.poll(10)) == 3
    result = checkers.total_queue(history, "s")
    assert result.valid
    assert result.offsets("duplicated") == [0, 1, 2]
    assert not checkers.total_queue(history, "s", exactly_once=True).valid
    all_valid(history, "s")


def test_a_consumer_that_reads_out_of_order_is_nonmonotonic() -> None:
    """Planted in a recorded history: the same deliveries, with two swapped."""
    with mqlite.Broker() as broker:
        history = record(broker)
        sub = broker.subscribe("q", name="s")
        for i in range(3):
            broker.publish("q", "e", i)
        assert len(sub.poll(10)) == 3
    ops = list(history)
    first, second = (i for i, op in enumerate(ops) if op.type == "deliver" and op.offset in (0, 1))
    ops[first], ops[second] = ops[second], ops[first]
    assert checkers.order(History(ops), "s").counts["nonmonotonic"] == 1


# -- competing consumers ----------------------------------------------------------------------------


def test_competing_pull_consumers_record_in_take_order(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    subs = [broker.subscribe("q", name="pool", ack="manual") for _ in range(3)]
    total = 300
    for i in range(total):
        broker.publish("q", "e", i)
    errors: list[BaseException] = []

    def consume(sub: mqlite.Subscription) -> None:
        try:
            while (message := sub.get(timeout=0)) is not None:
                sub.ack(message)
        except BaseException as error:  # noqa: BLE001  # reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=consume, args=(sub,)) for sub in subs]
    try:
        for thread in threads:
            thread.start()
    finally:
        for thread in threads:
            thread.join(WAIT)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    assert len(history.filter(type="ack")) == total
    all_valid(history, "pool")


def test_competing_push_consumers_on_threads_are_valid(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    for _ in range(2):
        broker.subscribe("q", name="pool", callback=lambda message: None)
    for i in range(100):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert len(history.filter(type="done")) == 100
    all_valid(history, "pool")


# -- push -------------------------------------------------------------------------------------------


def test_a_push_callback_that_raises_is_a_nack_with_its_error(make_broker: MakeBroker) -> None:
    dispatcher = mqlite.ManualDispatcher()
    broker = make_broker(dispatcher=dispatcher)
    history = record(broker)
    failed = []

    def callback(message: mqlite.Message) -> None:
        if message.offset == 1 and not failed:
            failed.append(message)
            raise RuntimeError("flaky")

    broker.subscribe("q", name="s", callback=callback)
    for i in range(3):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert kinds(history, 1) == ["publish", "deliver", "nack:callback raised", "deliver", "done"]
    nack = history.filter(type="nack")[0]
    assert nack.error == "RuntimeError('flaky')"
    all_valid(history, "s")


def test_push_deliveries_the_callback_never_saw_are_not_recorded(make_broker: MakeBroker) -> None:
    dispatcher = mqlite.ManualDispatcher()
    broker = make_broker(dispatcher=dispatcher)
    history = record(broker)
    seen: list[int] = []
    sub: mqlite.Subscription | None = None

    def callback(message: mqlite.Message) -> None:
        seen.append(message.offset)
        if message.offset == 1:
            assert sub is not None
            sub.close()  # mid-batch: 2..4 go back to the cursor unseen

    sub = broker.subscribe("q", name="s", callback=callback)
    for i in range(5):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert seen == [0, 1]
    assert [op.offset for op in history.filter(type="deliver")] == [0, 1]
    reader = broker.subscribe("q", name="s")
    assert [m.offset for m in reader.poll(10)] == [2, 3, 4]
    all_valid(history, "s")


def test_a_manual_push_subscription_acks_and_redelivers(make_broker: MakeBroker) -> None:
    dispatcher = mqlite.ManualDispatcher()
    broker = make_broker(dispatcher=dispatcher)
    history = record(broker)
    tries: dict[int, int] = {}
    sub: mqlite.Subscription | None = None

    def callback(message: mqlite.Message) -> None:
        assert sub is not None
        tries[message.offset] = tries.get(message.offset, 0) + 1
        if message.offset == 0 and tries[0] == 1:
            sub.nack(message)
        else:
            sub.ack(message)

    sub = broker.subscribe("q", name="s", callback=callback, ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert kinds(history, 0) == ["publish", "deliver", "nack:nack", "deliver", "ack"]
    all_valid(history, "s")


def test_a_coroutine_callback_is_recorded(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)

    async def main() -> None:
        async def callback(message: mqlite.Message) -> None:
            await asyncio.sleep(0)

        broker.subscribe("q", name="s", callback=callback)
        for i in range(5):
            broker.publish("q", "e", i)
        assert await broker.adrain(timeout=WAIT)

    asyncio.run(main())
    assert len(history.filter(type="done")) == 5
    all_valid(history, "s")


# -- read-ahead and closing ---------------------------------------------------------------------------


def test_iteration_records_what_it_returns_not_what_it_read_ahead(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    first = broker.subscribe("q", name="pool")
    second = broker.subscribe("q", name="pool")
    for i in range(10):
        broker.publish("q", "e", i)
    assert [next(first).offset for _ in range(3)] == [0, 1, 2]
    assert [op.offset for op in history.filter(type="deliver")] == [0, 1, 2]
    first.close()  # gives back what it read ahead, unrecorded
    assert [m.offset for m in second.poll(100)] == list(range(3, 10))
    assert [op.offset for op in history.filter(type="deliver")] == list(range(10))
    all_valid(history, "pool")


def test_closing_with_pending_messages_nacks_them_after_the_close(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    held = sub.poll(2)
    sub.ack(held[0])
    sub.close()
    tail = [op.type if op.reason is None else f"{op.type}:{op.reason}" for op in history][-2:]
    assert tail == ["close", "nack:subscription closed"]
    reader = broker.subscribe("q", name="s", ack="manual")
    again = reader.poll(10)
    assert [(m.offset) for m in again] == [1, 2]
    reader.ack(*again)
    assert [op.attempt for op in history.filter(type="deliver", offset=1)] == [1, 2]
    all_valid(history, "s")


def test_an_ephemeral_subscription_closed_after_reading_ahead_loses_nothing_it_returned(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()
    history = record(broker)
    sub = broker.subscribe("q")
    for i in range(10):
        broker.publish("q", "e", i)
    assert [next(sub).offset for _ in range(4)] == [0, 1, 2, 3]
    sub.close()
    assert history.filter(type="close")[0].position == 4  # where it stopped handing out
    all_valid(history, consumer=f"#{sub.id}")


def test_async_reads_and_async_for_are_recorded(make_broker: MakeBroker) -> None:
    broker = make_broker()
    history = record(broker)

    async def main() -> None:
        sub = broker.subscribe("q", name="s")
        for i in range(8):
            broker.publish("q", "e", i)
        assert (await sub.aget(timeout=WAIT)) is not None
        assert len(await sub.apoll(2)) == 2
        got = []
        async for message in sub:  # reads ahead; the buffer's fast path hands them out
            got.append(message.offset)
            if len(got) == 3:
                break
        sub.close()
        assert got == [3, 4, 5]

    asyncio.run(main())
    assert [op.offset for op in history.filter(type="deliver")] == [0, 1, 2, 3, 4, 5]
    lost = checkers.total_queue(history, "s")
    assert lost.offsets("lost") == [6, 7]  # a durable cursor keeps them for the next subscriber
    assert checkers.order(history, "s").valid


# -- JSON Lines ---------------------------------------------------------------------------------------


def test_a_recorded_history_round_trips_through_json_lines(make_broker: MakeBroker) -> None:
    clock = mqlite.ManualClock()
    broker = make_broker(clock=clock)
    history = record(broker)
    sub = broker.subscribe("q", name="s", ack="manual", ack_timeout=1, max_deliveries=2)
    broker.publish("q", "e", {"n": [1, 2]}, key="k")
    for _ in range(2):
        assert sub.get(timeout=WAIT) is not None
        clock.advance(2)
    assert sub.get(timeout=0) is None
    buffer = io.StringIO()
    history.to_jsonl(buffer)
    buffer.seek(0)
    again = History.from_jsonl(buffer)
    assert again.ops == history.ops
    assert {op.type for op in again} >= {"subscribe", "publish", "deliver", "nack", "dead-letter"}
    assert checkers.redelivery(again, "s").valid
    assert all(isinstance(op, Op) for op in again)
