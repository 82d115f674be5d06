"""Bad input raises a clear ValueError subclass that names the problem, and the broker keeps working."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, payloads, pull_all

import mqlite


def assert_broker_still_works(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("check", name="after-error", ack="manual")
    broker.publish("check", "ok", "still working")
    message = sub.get(timeout=WAIT)
    assert message is not None
    assert message.payload == "still working"
    sub.ack(message)
    sub.close()


def manual_sub(broker: mqlite.Broker) -> mqlite.Subscription:
    sub = broker.subscribe("q", name="manual", ack="manual")
    broker.publish("q", "e", "x")
    return sub


BAD_CALLS: dict[str, tuple[Callable[[mqlite.Broker], Any], type[Exception], str]] = {
    # names
    "empty queue name": (lambda b: b.queue(""), mqlite.InvalidName, "queue name"),
    "non-str queue name": (lambda b: b.queue(7), mqlite.InvalidName, "queue name"),
    "None queue name": (lambda b: b.publish(None, "e"), mqlite.InvalidName, "queue name"),
    "padded queue name": (lambda b: b.queue(" q "), mqlite.InvalidName, "surrounding spaces"),
    "empty subscribe queue": (lambda b: b.subscribe(""), mqlite.InvalidName, "queue name"),
    "empty subscription name": (lambda b: b.subscribe("q", name=""), mqlite.InvalidName, "subscription name"),
    "non-str subscription name": (lambda b: b.subscribe("q", name=3), mqlite.InvalidName, "subscription name"),
    "empty dead_letter name": (lambda b: b.subscribe("q", dead_letter=""), mqlite.InvalidName, "dead_letter"),
    # events
    "empty event": (lambda b: b.publish("q", ""), mqlite.InvalidName, "event"),
    "non-str event": (lambda b: b.publish("q", 5), mqlite.InvalidName, "event"),
    "star in published event": (lambda b: b.publish("q", "order.*"), mqlite.InvalidName, "wildcard"),
    "question mark in published event": (lambda b: b.publish("q", "v?"), mqlite.InvalidName, "wildcard"),
    "bracket in published event": (lambda b: b.publish("q", "a[b]"), mqlite.InvalidName, "wildcard"),
    "wildcard in publish_many": (lambda b: b.queue("q").publish_many([("a*", 1)]), mqlite.InvalidName, "wildcard"),
    "empty event list": (lambda b: b.subscribe("q", events=[]), mqlite.InvalidName, "at least one"),
    "empty event filter": (lambda b: b.subscribe("q", events=[""]), mqlite.InvalidName, "non-empty str"),
    "non-str event filter": (lambda b: b.subscribe("q", events=[1]), mqlite.InvalidName, "non-empty str"),
    "non-iterable events": (lambda b: b.subscribe("q", events=5), mqlite.InvalidName, "iterable"),
    "join of an empty event": (lambda b: b.subscribe("q", events="a").join(""), mqlite.InvalidName, "non-empty"),
    "bad headers": (lambda b: b.publish("q", "e", headers=[1, 2]), mqlite.InvalidArgument, "headers"),
    # timeouts
    "negative get timeout": (lambda b: b.subscribe("q").get(timeout=-1), mqlite.InvalidArgument, "timeout"),
    "negative poll timeout": (lambda b: b.subscribe("q").poll(timeout=-0.5), mqlite.InvalidArgument, "timeout"),
    "non-number timeout": (lambda b: b.subscribe("q").get(timeout="1"), mqlite.InvalidArgument, "timeout"),
    "negative drain timeout": (lambda b: b.drain(timeout=-1), mqlite.InvalidArgument, "timeout"),
    "negative nack delay": (
        lambda b: manual_sub(b).nack(0, delay=-1),
        mqlite.InvalidArgument,
        "delay",
    ),
    "zero poll max_messages": (lambda b: b.subscribe("q").poll(max_messages=0), mqlite.InvalidArgument, "max_messages"),
    "bool poll max_messages": (
        lambda b: b.subscribe("q").poll(max_messages=True),
        mqlite.InvalidArgument,
        "max_messages",
    ),
    # acks
    "ack of an offset never delivered": (lambda b: manual_sub(b).ack(0), mqlite.NotPending, "not pending"),
    "ack of an unknown offset": (lambda b: manual_sub(b).ack(99), mqlite.NotPending, "not pending"),
    "ack of a non-message": (lambda b: manual_sub(b).ack("0"), mqlite.InvalidArgument, "Message or its int offset"),
    "ack of another queue's message": (
        lambda b: manual_sub(b).ack(b.publish("other", "e")),
        mqlite.NotPending,
        "queue 'other'",
    ),
    "ack on an auto subscription": (lambda b: b.subscribe("q").ack(0), mqlite.AckModeError, "ack='manual'"),
    "nack on an auto subscription": (lambda b: b.subscribe("q").nack(0), mqlite.AckModeError, "ack='manual'"),
    "unknown ack mode": (lambda b: b.subscribe("q", ack="sometimes"), mqlite.InvalidArgument, "ack must be"),
    "ack_timeout with auto acks": (
        lambda b: b.subscribe("q", ack_timeout=5),
        mqlite.InvalidArgument,
        "ack_timeout",
    ),
    "zero ack_timeout": (
        lambda b: b.subscribe("q", ack="manual", ack_timeout=0),
        mqlite.InvalidArgument,
        "ack_timeout",
    ),
    "negative ack_timeout": (
        lambda b: b.subscribe("q", ack="manual", ack_timeout=-1),
        mqlite.InvalidArgument,
        "ack_timeout",
    ),
    "zero max_deliveries": (lambda b: b.subscribe("q", max_deliveries=0), mqlite.InvalidArgument, "max_deliveries"),
    "float max_deliveries": (lambda b: b.subscribe("q", max_deliveries=2.5), mqlite.InvalidArgument, "max_deliveries"),
    "bool max_deliveries": (lambda b: b.subscribe("q", max_deliveries=True), mqlite.InvalidArgument, "max_deliveries"),
    "non-callable callback": (lambda b: b.subscribe("q", callback="print"), mqlite.InvalidArgument, "callable"),
    "bad backoff type": (lambda b: b.subscribe("q", backoff=1.0), mqlite.InvalidArgument, "Backoff"),
    "negative backoff": (lambda b: mqlite.Backoff(initial=-1), mqlite.InvalidArgument, "initial >= 0"),
    # start and seek
    "unknown start word": (lambda b: b.subscribe("q", start="middle"), mqlite.InvalidArgument, "start/seek"),
    "negative start offset": (lambda b: b.subscribe("q", start=-1), mqlite.InvalidArgument, "outside queue"),
    "start offset past the end": (lambda b: b.subscribe("q", start=1), mqlite.InvalidArgument, "outside queue"),
    "float start": (lambda b: b.subscribe("q", start=1.5), mqlite.InvalidArgument, "start/seek"),
    "bool start": (lambda b: b.subscribe("q", start=True), mqlite.InvalidArgument, "start/seek"),
    "seek past the end": (lambda b: b.subscribe("q", name="s").seek(10), mqlite.InvalidArgument, "outside queue"),
    "seek to a bad word": (lambda b: b.subscribe("q", name="s").seek("first"), mqlite.InvalidArgument, "start/seek"),
    # retention settings
    "unknown retention": (lambda b: b.queue("q", retention="forever"), mqlite.InvalidArgument, "retention"),
    "unknown overflow": (
        lambda b: b.queue("q", max_messages=1, overflow="block"),
        mqlite.InvalidArgument,
        "overflow",
    ),
    "zero max_messages": (lambda b: b.queue("q", max_messages=0), mqlite.InvalidArgument, "max_messages"),
    "negative max_age": (lambda b: b.queue("q", max_age=-1), mqlite.InvalidArgument, "max_age"),
    "reject without max_messages": (lambda b: b.queue("q", overflow="reject"), mqlite.InvalidArgument, "max_messages"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_input_raises_a_clear_value_error_and_the_broker_keeps_working(broker: mqlite.Broker, case: str) -> None:
    call, error, words = BAD_CALLS[case]
    with pytest.raises(error, match=words.replace("[", r"\[").replace("*", r"\*").replace("?", r"\?")) as raised:
        call(broker)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, mqlite.MqliteError)
    assert_broker_still_works(broker)


def test_a_rejected_queue_setting_leaves_the_old_one_in_force(broker: mqlite.Broker) -> None:
    queue = broker.queue("q", retention="limits", max_messages=5)
    with pytest.raises(mqlite.InvalidArgument):
        broker.queue("q", max_messages=-1)
    assert queue.config.max_messages == 5


def test_a_failed_subscribe_leaves_no_subscription_behind(broker: mqlite.Broker) -> None:
    broker.queue("q")
    with pytest.raises(mqlite.InvalidArgument):
        broker.subscribe("q", name="n", start="middle")
    assert broker.info().subscriptions == ()


def test_a_failed_subscribe_with_a_name_can_be_retried(broker: mqlite.Broker) -> None:
    with pytest.raises(mqlite.InvalidArgument):
        broker.subscribe("q", name="n", start=5)
    sub = broker.subscribe("q", name="n")
    broker.publish("q", "e", 1)
    assert payloads(pull_all(sub)) == [1]


def test_a_rejected_ack_leaves_pending_messages_alone(broker: mqlite.Broker) -> None:
    sub = manual_sub(broker)
    message = sub.get(timeout=WAIT)
    with pytest.raises(mqlite.NotPending):
        sub.ack(message.offset + 1)
    assert sub.pending == 1
    sub.ack(message)
    assert sub.pending == 0


def test_a_bad_leave_leaves_the_filter_alone(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=["a", "b"])
    with pytest.raises(mqlite.InvalidName):
        sub.leave(["a", "zzz"])
    assert sub.events == ("a", "b")


@pytest.mark.parametrize(("argument", "value"), [("synchronous", "sometimes"), ("commit", "never")])
def test_a_bad_storage_argument_raises_invalid_argument_before_the_file_is_created(
    tmp_path: Path, argument: str, value: str
) -> None:
    path = tmp_path / "app.mqlite"
    with pytest.raises(mqlite.InvalidArgument, match=f"{argument} must be .*, got '{value}'"):
        mqlite.Broker(path, **{argument: value})
    assert list(tmp_path.iterdir()) == []
