"""message.attempt: which delivery a message is, for every way a message comes back."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

import mqlite
from mqlite.testing import VirtualClock, run_until_idle


def test_a_first_delivery_says_1_and_is_the_retained_object(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="w", ack="manual")
    published = broker.publish("q", "e", 1)
    assert published.attempt == 1
    message = sub.get(timeout=0)
    assert message is not None
    assert message.attempt == 1
    assert "attempt" not in repr(message)


def test_each_nack_counts_one_more_attempt(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="w", ack="manual")
    first = broker.publish("q", "e", {"id": 1}, key="k", headers={"h": "v"})
    seen = []
    for _ in range(3):
        message = sub.get(timeout=0)
        assert message is not None
        seen.append(message.attempt)
        sub.nack(message)
    assert seen == [1, 2, 3]
    again = sub.get(timeout=0)
    assert again is not None
    assert again == first  # a redelivery is a new object, equal to the first
    assert (again.attempt, again.key, dict(again.headers), again.queue) == (4, "k", {"h": "v"}, "q")
    assert "attempt=4" in repr(again)
    sub.ack(again)  # the copy acks like the original
    assert sub.pending == 0


def test_an_ack_timeout_counts_an_attempt(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker(clock=VirtualClock(autojump=True))
    sub = broker.subscribe("q", name="w", ack="manual", ack_timeout=60)
    broker.publish("q", "e", 1)
    assert [sub.get(timeout=120).attempt for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]


def test_a_push_callback_sees_its_attempt(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker(clock=VirtualClock(), dispatcher=mqlite.ManualDispatcher())
    attempts: list[int] = []

    def flaky(message: mqlite.Message) -> None:
        attempts.append(message.attempt)
        if message.attempt < 3:
            raise RuntimeError("not yet")

    broker.subscribe("q", name="w", callback=flaky, backoff=mqlite.Backoff(initial=1))
    broker.publish("q", "e", 1)
    assert run_until_idle(broker).idle
    assert attempts == [1, 2, 3]


def test_the_other_subscriptions_still_see_attempt_1(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    retrying = broker.subscribe("q", name="a", ack="manual")
    other = broker.subscribe("q", name="b", ack="manual")
    broker.publish("q", "e", 1)
    retrying.nack(retrying.get(timeout=0))  # type: ignore[arg-type]
    assert retrying.get(timeout=0).attempt == 2  # type: ignore[union-attr]
    assert other.get(timeout=0).attempt == 1  # type: ignore[union-attr]


def test_attempts_count_across_a_restart_and_another_broker_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "attempts.mqlite"
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        broker.publish("q", "e", 1)
        sub.nack(sub.get(timeout=0))  # type: ignore[arg-type]
        assert sub.get(timeout=0).attempt == 2  # type: ignore[union-attr]
        # closing the broker with the message out: it waits, its attempts kept, for the next broker
    with mqlite.Broker(path) as first, mqlite.Broker(path) as second:
        taken = first.subscribe("q", name="w", ack="manual").get(timeout=0)
        assert taken is not None
        assert taken.attempt == 3
        first.close()  # held by a broker that is gone: the other one may deliver it
        again = second.subscribe("q", name="w", ack="manual").get(timeout=5)
        assert again is not None
        assert again.attempt == 4


def test_a_dead_letter_after_the_last_attempt(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="w", ack="manual", max_deliveries=2)
    dead = broker.subscribe("q.dead-letter")
    broker.publish("q", "e", 1)
    for attempt in (1, 2):
        message = sub.get(timeout=0)
        assert message is not None
        assert message.attempt == attempt
        sub.nack(message)
    letter = dead.get(timeout=1)
    assert letter is not None
    assert letter.attempt == 1  # a new message in the dead-letter queue
    assert letter.headers["dead_letter.deliveries"] == 2


@pytest.mark.memory_only
def test_a_redelivery_pickles_as_an_equal_message(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="w", ack="manual")
    broker.publish("q", "e", 1)
    sub.nack(sub.get(timeout=0))  # type: ignore[arg-type]
    again = sub.get(timeout=0)
    assert again is not None
    assert pickle.loads(pickle.dumps(again)) == again
