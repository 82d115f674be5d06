"""Checks of acks, redelivery, dead letters, push, retention, info and closing."""

from __future__ import annotations

import time

import mqlite
from mqlite.testing._suite import (
    WAIT,
    _Brokers,
    _check,
    _in_thread,
    _none,
    _offsets,
    _one,
    _payloads,
    _pull_all,
    _raises,
)
from mqlite.testing.waiting import wait_until_blocked

# -- acks ----------------------------------------------------------------------------------------


@_check()
def auto_ack_settles_a_message_when_it_is_returned(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n")
    broker.publish("q", "e", 1)
    message = _one(sub)
    assert sub.pending == 0
    info = broker.info().subscription("q", "n")
    assert (info.ack, info.delivered, info.acked, info.pending) == ("auto", 1, 1, 0)
    _raises(mqlite.AckModeError, lambda: sub.ack(message))
    _raises(mqlite.AckModeError, lambda: sub.nack(message))
    sub.close()
    assert _pull_all(broker.subscribe("q", name="n")) == [], "an auto-acked message came back"


@_check()
def manual_ack_keeps_a_message_pending_until_it_is_acked(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)
    first, second = sub.poll(max_messages=10)
    assert sub.pending == 2
    sub.ack(first)
    assert sub.pending == 1
    sub.ack(second.offset)  # by offset
    assert sub.pending == 0
    info = broker.info().subscription("q", "n")
    assert (info.ack, info.delivered, info.acked, info.pending) == ("manual", 2, 2, 0)
    sub.close()
    assert _pull_all(broker.subscribe("q", name="n", ack="manual")) == [], "an acked message came back"


@_check()
def acking_what_is_not_pending_raises_and_acks_nothing(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    m0, m1 = sub.poll(max_messages=2)
    _raises(mqlite.NotPending, lambda: sub.ack(m0, 2))  # offset 2 was never delivered
    assert sub.pending == 2, "a refused ack settled something"
    _raises(mqlite.NotPending, lambda: sub.ack(m0, m0))
    assert sub.pending == 2, "a refused ack settled something"
    sub.ack(m0, m1)
    assert sub.pending == 0
    _raises(mqlite.NotPending, lambda: sub.ack(m0))
    _raises(mqlite.NotPending, lambda: sub.nack(m1))
    assert broker.info().subscription("q", "n").acked == 2


@_check()
def a_nacked_message_is_redelivered_after_its_delay(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "x")
    first = _one(sub)
    sub.nack(first, delay=10)
    _none(sub)
    clock.advance(9.5)
    _none(sub)
    clock.advance(0.5)
    assert _one(sub) == first
    assert broker.info().subscription("q", "n").redelivered == 1


@_check()
def due_redeliveries_come_before_new_messages(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="w", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    first = sub.poll(max_messages=10)
    sub.nack(first[0])
    sub.ack(*first[1:])
    broker.publish("q", "e", 3)
    assert _offsets(sub.poll(max_messages=10)) == [0, 3]


@_check()
def an_unacked_message_is_redelivered_after_ack_timeout(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    sub = broker.subscribe("q", name="n", ack="manual", ack_timeout=30)
    broker.publish("q", "e", "x")
    first = _one(sub)
    clock.advance(29)
    _none(sub)
    clock.advance(1)
    again = _one(sub)
    assert again == first
    sub.ack(again)
    clock.advance(60)
    _none(sub)


@_check()
def max_deliveries_sends_a_message_to_the_dead_letter_queue(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("orders", name="billing", ack="manual", max_deliveries=2)
    broker.publish("orders", "created", {"id": 7}, key="k", headers={"trace": "t1"})
    sub.nack(_one(sub))
    message = _one(sub)
    sub.nack(message)
    _none(sub)
    assert sub.pending == 0
    _raises(mqlite.NotPending, lambda: sub.ack(message))
    assert broker.info().subscription("orders", "billing").dead_lettered == 1
    dead = broker.subscribe(mqlite.dead_letter_queue_name("orders"), start="earliest")
    assert dead.queue == "orders.dead-letter"
    letters = _pull_all(dead)
    assert len(letters) == 1, f"{len(letters)} dead letters"
    letter = letters[0]
    assert (letter.event, letter.payload, letter.key) == ("created", {"id": 7}, "k")
    assert dict(letter.headers) == {
        "trace": "t1",
        "dead_letter.queue": "orders",
        "dead_letter.offset": 0,
        "dead_letter.subscription": "billing",
        "dead_letter.deliveries": 2,
        "dead_letter.reason": "nack",
        "dead_letter.error": None,
    }


# -- push ----------------------------------------------------------------------------------------


@_check()
def push_callbacks_run_in_order_when_the_broker_drains(brokers: _Brokers) -> None:
    broker, _clock = brokers.manual()
    seen: list[int] = []
    broker.subscribe("q", name="n", callback=lambda m: seen.append(m.payload))
    for i in range(3):
        broker.publish("q", "e", i)
    assert seen == [], "a ManualDispatcher ran a callback before drain"
    assert broker.drain(timeout=WAIT)
    assert seen == [0, 1, 2]
    info = broker.info().subscription("q", "n")
    assert (info.mode, info.acked, info.pending) == ("push", 3, 0)


@_check()
def a_raising_push_callback_is_retried_then_dead_lettered(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    calls: list[int] = []

    def always_fails(message: mqlite.Message) -> None:
        calls.append(message.offset)
        raise ValueError("broken handler")

    broker.subscribe("q", name="n", callback=always_fails, max_deliveries=2, backoff=mqlite.Backoff(initial=1.0))
    broker.publish("q", "e", "x")
    assert not broker.drain(timeout=0), "drain returned True while a retry was waiting"
    assert calls == [0]
    clock.advance(0.5)
    broker.drain(timeout=0)
    assert calls == [0], "retried before the backoff passed"
    clock.advance(0.5)
    assert broker.drain(timeout=0), "a dead-lettered message counts as handled"
    assert calls == [0, 0]
    letter = _one(broker.subscribe("q.dead-letter", start="earliest"))
    assert (letter.payload, letter.headers["dead_letter.reason"]) == ("x", "callback raised")
    assert "broken handler" in str(letter.headers["dead_letter.error"])
    assert letter.headers["dead_letter.deliveries"] == 2
    info = broker.info().subscription("q", "n")
    assert (info.pending, info.redelivered, info.dead_lettered) == (0, 1, 1)


# -- retention -----------------------------------------------------------------------------------


@_check()
def interest_retention_drops_what_no_cursor_will_read(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q")
    assert queue.config.retention == "interest", "interest is the default retention"
    queue.publish("e", "nobody listening")
    assert (queue.start_offset, queue.end_offset, len(queue)) == (1, 1, 0)
    with broker.subscribe("q", start="earliest") as late:
        assert _pull_all(late) == []
    keeper = broker.subscribe("q", name="keeper")
    for i in range(3):
        queue.publish("e", i)
    assert len(queue) == 3
    assert _payloads(keeper.poll(max_messages=2)) == [0, 1]
    assert (queue.start_offset, len(queue)) == (3, 1)


@_check()
def a_declared_subscription_keeps_what_is_published_for_it(brokers: _Brokers) -> None:
    broker = brokers.open()
    declared = broker.declare_subscription("q", "later", events="wanted")
    assert (declared.name, declared.mode, declared.consumers, declared.position) == ("later", "detached", 0, 0)
    broker.publish("q", "wanted", 1)
    broker.publish("q", "other", 2)
    assert _payloads(_pull_all(broker.subscribe("q", name="later", events="wanted"))) == [1]


@_check()
def a_work_queue_keeps_each_job_until_a_durable_subscription_acks_it(brokers: _Brokers) -> None:
    broker = brokers.open()
    if "workqueue" not in broker._engine.capabilities.retentions:
        return  # the engine refuses the retention (tested by the broker); nothing more to check
    queue = broker.queue("jobs", retention="workqueue")
    queue.publish("job", 0)
    queue.publish("job", 1)
    assert len(queue) == 2, "jobs published before any worker are kept"
    worker = broker.subscribe("jobs", name="workers", ack="manual")
    first, second = worker.poll(max_messages=2, timeout=WAIT)
    assert (first.payload, second.payload) == (0, 1), "a new name on a work queue starts at the oldest job"
    assert len(queue) == 2, "delivered but unacked jobs are kept"
    worker.ack(first)
    assert (queue.start_offset, len(queue)) == (1, 1)
    worker.close()
    again = _one(broker.subscribe("jobs", name="workers", ack="manual"))
    assert (again.payload, again.attempt) == (1, 2)


@_check()
def drop_oldest_keeps_max_messages_and_counts_what_was_missed(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("metrics", retention="limits", max_messages=3)
    sub = broker.subscribe("metrics", name="dashboard", events="cpu")
    for i in range(6):
        queue.publish("cpu" if i != 1 else "disk", i)
    assert (queue.start_offset, queue.end_offset, len(queue)) == (3, 6, 3)
    assert sub.missed == 2, f"missed {sub.missed}: offsets 0 and 2 were dropped unread (1 is not wanted)"
    assert _payloads(_pull_all(sub)) == [3, 4, 5]
    assert broker.info().subscription("metrics", "dashboard").missed == 2


@_check()
def reject_overflow_raises_queue_full_and_writes_nothing(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits", max_messages=2, overflow="reject")
    sub = broker.subscribe("q", name="n", start="earliest")
    queue.publish("e", 0)
    queue.publish("e", 1)
    _raises(mqlite.QueueFull, lambda: queue.publish("e", "rejected"))
    _raises(mqlite.QueueFull, lambda: broker.publish("q", "e", "rejected"))
    _raises(mqlite.QueueFull, lambda: queue.publish_many([("e", "rejected")]))
    assert (queue.end_offset, len(queue)) == (2, 2)
    assert _payloads(_pull_all(sub)) == [0, 1]
    assert sub.missed == 0


# -- info ----------------------------------------------------------------------------------------


@_check()
def info_reports_the_figures_of_each_cursor(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual", max_deliveries=2, events="e")
    for i in range(4):
        broker.publish("q", "e", i)
    broker.publish("q", "other", 4)
    first, second, _third = sub.poll(max_messages=3)
    sub.ack(first)
    sub.nack(second)
    [again] = sub.poll(max_messages=1)  # the redelivery of offset 1 comes first
    assert again.offset == 1
    sub.nack(again)  # its second delivery failed: dead-lettered
    info = broker.info()
    row = info.subscription("q", "n")
    assert (row.position, row.lag, row.pending) == (3, 1, 1), (row.position, row.lag, row.pending)
    assert (row.delivered, row.acked, row.redelivered, row.dead_lettered, row.missed) == (4, 1, 1, 1, 0)
    assert (row.queue, row.durable, row.events, row.mode, row.consumers, row.ack) == (
        "q",
        True,
        ("e",),
        "pull",
        1,
        "manual",
    )
    assert row.subscription_ids == (sub.id,)
    assert (sub.position, sub.lag, sub.pending, sub.missed) == (3, 1, 1, 0)
    assert info.queue("q").end_offset == 5
    assert info.queue("q.dead-letter").retained == 1


# -- closing -------------------------------------------------------------------------------------


@_check()
def closing_a_subscription_gives_back_what_it_held(brokers: _Brokers) -> None:
    broker = brokers.open()
    leaving = broker.subscribe("q", name="n", ack="manual")
    staying = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "leaving's")
    broker.publish("q", "e", "staying's")
    assert _payloads(leaving.poll(max_messages=1)) == ["leaving's"]
    assert _payloads(staying.poll(max_messages=1)) == ["staying's"]
    leaving.close()
    assert _payloads(_pull_all(staying)) == ["leaving's"]
    assert staying.pending == 2
    assert broker.info().subscription("q", "n").redelivered == 1


@_check()
def a_closed_broker_refuses_publish_and_subscribe(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="n")
    broker.close()
    assert broker.closed
    _raises(mqlite.BrokerClosed, lambda: broker.publish("q", "e"))
    _raises(mqlite.BrokerClosed, lambda: queue.publish("e"))
    _raises(mqlite.BrokerClosed, lambda: queue.publish_many([("e", 1)]))
    _raises(mqlite.BrokerClosed, lambda: broker.subscribe("q", name="n"))
    _raises(mqlite.BrokerClosed, lambda: broker.queue("new"))
    _raises(mqlite.SubscriptionClosed, lambda: sub.get(timeout=0))
    assert sub.closed
    assert broker.info().queue("q").end_offset == 0, "info() works after close"
    broker.close()  # idempotent


@_check()
def a_blocked_get_wakes_when_a_message_is_published(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q")
    broker.publish("q", "e", "first")  # the event is known: no first-seen wake-up hides a missing one
    assert _one(sub).payload == "first"

    def timed_get() -> tuple[float, mqlite.Message | None]:
        began = time.monotonic()
        message = sub.get(timeout=WAIT)
        return time.monotonic() - began, message

    with _in_thread(timed_get) as join:
        wait_until_blocked(broker.queue("q"), timeout=WAIT)
        broker.publish("q", "e", "wake up")
        elapsed, message = join()
    assert message is not None
    assert message.payload == "wake up"
    assert elapsed < WAIT / 4, f"the blocked get returned after {elapsed:.2f} s, not when the message came"
