"""Regressions for behaviours found in review: read-ahead with manual acks, closing, deletion."""

from __future__ import annotations

from pathlib import Path

import pytest

import mqlite


def test_iteration_does_not_read_ahead_under_manual_ack() -> None:
    clock = mqlite.ManualClock()
    with mqlite.Broker(clock=clock) as broker:
        first = broker.subscribe("jobs", name="w", ack="manual", ack_timeout=5)
        second = broker.subscribe("jobs", name="w", ack="manual", ack_timeout=5)
        for i in range(10):
            broker.publish("jobs", "run", i)
        taken = next(iter(first))
        assert taken.payload == 0
        clock.advance(6)
        # Only the one message `first` really saw timed out; the rest were never taken by it.
        assert [m.payload for m in second.poll(max_messages=20)] == list(range(10))
        assert first.poll(timeout=0) == []


def test_broker_close_does_not_count_unacked_messages_as_failures(caplog: pytest.LogCaptureFixture) -> None:
    broker = mqlite.Broker()
    sub = broker.subscribe("jobs", name="w", ack="manual", max_deliveries=1)
    broker.publish("jobs", "run", 1)
    assert sub.get(timeout=1) is not None
    broker.close()
    assert "could not dead-letter" not in caplog.text
    assert broker.info().subscription("jobs", "w").dead_lettered == 0


def test_publish_many_with_an_unhashable_event_raises_invalid_name() -> None:
    with mqlite.Broker() as broker:
        queue = broker.queue("jobs", retention="limits")
        with pytest.raises(mqlite.InvalidName):
            queue.publish_many([(["not", "a", "name"], 1)])  # type: ignore[list-item]
        assert queue.end_offset == 0


def test_delete_subscription_forgets_a_detached_durable_name() -> None:
    with mqlite.Broker() as broker:
        sub = broker.subscribe("jobs", name="vendor")
        broker.publish("jobs", "run", 1)
        sub.close()
        assert broker.queue("jobs").start_offset == 0  # kept for the detached name
        assert broker.delete_subscription("jobs", "vendor")
        assert broker.queue("jobs").start_offset == 1  # nothing needs it any more
        assert not broker.delete_subscription("jobs", "vendor")
        again = broker.subscribe("jobs", name="vendor")
        assert again.position == 1


def test_delete_subscription_refuses_while_attached() -> None:
    with mqlite.Broker() as broker:
        broker.subscribe("jobs", name="vendor")
        with pytest.raises(mqlite.ConfigConflict, match="close them first"):
            broker.delete_subscription("jobs", "vendor")


def test_drain_returns_false_when_the_broker_closes_before_callbacks_finish() -> None:
    import threading

    broker = mqlite.Broker()
    release = threading.Event()
    started = threading.Event()

    def slow(message: mqlite.Message) -> None:
        started.set()
        release.wait(10)

    broker.subscribe("jobs", callback=slow)
    broker.publish("jobs", "run", 1)
    broker.publish("jobs", "run", 2)
    assert started.wait(10)
    result: list[bool] = []
    drainer = threading.Thread(target=lambda: result.append(broker.drain(timeout=10)))
    drainer.start()
    try:
        broker.close(timeout=0.05)
    finally:
        release.set()
        drainer.join(10)
    assert result == [False]


def test_delete_subscription_on_a_file_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "app.mqlite")
    with mqlite.Broker(path) as broker:
        broker.subscribe("jobs", name="vendor").close()
        broker.publish("jobs", "run", 1)
        assert broker.delete_subscription("jobs", "vendor")
    with mqlite.Broker(path) as broker:
        names = [s.name for s in broker.info().subscriptions]
        assert "vendor" not in names
