"""Closing: broker.close() and sub.close() wake blocked readers, stop push threads, refuse more work."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from helpers import WAIT, Worker, payloads, wait_until_blocked

import mqlite


def test_broker_close_wakes_a_blocked_get_in_another_thread(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    worker = Worker(lambda: sub.get(timeout=WAIT))
    try:
        wait_until_blocked(broker.queue("q"))
        broker.close()
    finally:
        with pytest.raises(mqlite.SubscriptionClosed, match="broker was closed"):
            worker.join()


def test_broker_close_wakes_a_blocked_get_without_timeout(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    worker = Worker(lambda: sub.get(timeout=None))
    try:
        wait_until_blocked(broker.queue("q"))
    finally:
        broker.close()
        with pytest.raises(mqlite.SubscriptionClosed):
            worker.join()


def test_broker_close_ends_iteration_in_another_thread(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    broker.publish("q", "e", 0)
    worker = Worker(lambda: [m.payload for m in sub])
    try:
        wait_until_blocked(broker.queue("q"))
    finally:
        broker.close()
        assert worker.join() == [0]


def test_broker_close_wakes_every_blocked_reader(broker: mqlite.Broker) -> None:
    subs = [broker.subscribe("q1"), broker.subscribe("q1", name="n"), broker.subscribe("q2")]
    workers = [Worker(lambda sub=sub: list(sub)) for sub in subs]
    try:
        wait_until_blocked(broker.queue("q1"), waiters=2)
        wait_until_blocked(broker.queue("q2"))
    finally:
        broker.close()
        assert [worker.join() for worker in workers] == [[], [], []]


def test_broker_close_stops_push_threads(broker: mqlite.Broker) -> None:
    threads: list[threading.Thread] = []
    broker.subscribe("q", callback=lambda m: threads.append(threading.current_thread()))
    broker.publish("q", "e")
    assert broker.drain(timeout=WAIT)
    broker.close()
    assert len(threads) == 1
    assert not threads[0].is_alive()


def test_broker_close_lets_a_running_callback_finish(broker: mqlite.Broker) -> None:
    entered = threading.Event()
    release = threading.Event()
    finished: list[int] = []

    def slow(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)
        finished.append(message.payload)

    broker.subscribe("q", callback=slow)
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)
    assert entered.wait(WAIT)
    releaser = threading.Timer(0.05, release.set)
    releaser.start()
    try:
        broker.close(timeout=WAIT)
    finally:
        release.set()
        releaser.join(WAIT)
    # The running callback finished; the next one never started.
    assert finished == [0]


def test_broker_close_returns_in_bounded_time_when_a_callback_hangs(broker: mqlite.Broker) -> None:
    entered = threading.Event()
    release = threading.Event()

    def hangs(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)

    broker.subscribe("q", callback=hangs)
    broker.publish("q", "e")
    assert entered.wait(WAIT)
    try:
        began = time.monotonic()
        broker.close(timeout=0.1)
        assert time.monotonic() - began < 2.0
    finally:
        release.set()


def test_publish_after_broker_close_raises(broker: mqlite.Broker) -> None:
    queue = broker.queue("q")
    broker.close()
    with pytest.raises(mqlite.BrokerClosed, match="closed"):
        broker.publish("q", "e")
    with pytest.raises(mqlite.BrokerClosed):
        queue.publish("e")
    with pytest.raises(mqlite.BrokerClosed):
        queue.publish_many([("e", 1)])
    with pytest.raises(mqlite.BrokerClosed):
        broker.publish("new-queue", "e")


def test_subscribe_after_broker_close_raises(broker: mqlite.Broker) -> None:
    broker.queue("q")
    broker.close()
    with pytest.raises(mqlite.BrokerClosed):
        broker.subscribe("q")
    with pytest.raises(mqlite.BrokerClosed):
        broker.subscribe("other")


def test_using_a_subscription_after_broker_close_raises_subscription_closed(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e")
    message = sub.get(timeout=WAIT)
    broker.close()
    with pytest.raises(mqlite.SubscriptionClosed):
        sub.get(timeout=0)
    with pytest.raises(mqlite.SubscriptionClosed):
        sub.ack(message)
    assert list(sub) == []
    assert sub.closed


def test_broker_errors_share_one_base_class() -> None:
    assert issubclass(mqlite.BrokerClosed, mqlite.MqliteError)
    assert issubclass(mqlite.SubscriptionClosed, mqlite.MqliteError)


def test_broker_close_is_idempotent(broker: mqlite.Broker) -> None:
    broker.close()
    broker.close()
    assert broker.closed


def test_a_broker_is_a_context_manager(make_broker) -> None:
    with make_broker() as broker:
        sub = broker.subscribe("q")
    assert broker.closed
    assert sub.closed


def test_drain_after_close_does_not_wait(broker: mqlite.Broker) -> None:
    broker.subscribe("q", callback=lambda m: None)
    broker.close()
    began = time.monotonic()
    broker.drain(timeout=WAIT)
    assert time.monotonic() - began < WAIT / 2


def test_sub_close_wakes_its_own_blocked_get(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    worker = Worker(lambda: sub.get(timeout=WAIT))
    try:
        wait_until_blocked(broker.queue("q"))
        sub.close()
    finally:
        with pytest.raises(mqlite.SubscriptionClosed, match="subscription was closed"):
            worker.join()


def test_sub_close_ends_its_own_iteration(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    worker = Worker(lambda: list(sub))
    try:
        wait_until_blocked(broker.queue("q"))
        sub.close()
    finally:
        assert worker.join() == []


def test_sub_close_leaves_other_readers_blocked(broker: mqlite.Broker) -> None:
    closing = broker.subscribe("q")
    other = broker.subscribe("q")
    worker = Worker(lambda: other.get(timeout=WAIT))
    try:
        wait_until_blocked(broker.queue("q"))
        closing.close()
        broker.publish("q", "e", "for-other")
    finally:
        message = worker.join()
    assert message is not None
    assert message.payload == "for-other"


def test_the_broker_works_after_a_subscription_closes(broker: mqlite.Broker) -> None:
    broker.subscribe("q").close()
    sub = broker.subscribe("q")
    broker.publish("q", "e", 1)
    assert payloads(sub.poll()) == [1]


def test_an_async_with_broker_is_closed_on_exit(make_broker: Callable[..., mqlite.Broker]) -> None:
    async def body() -> mqlite.Broker:
        async with make_broker() as broker:
            sub = broker.subscribe("q")
        assert sub.closed
        return broker

    assert asyncio.run(asyncio.wait_for(body(), WAIT)).closed


def test_aclose_closes_the_broker(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    sub = broker.subscribe("q")
    asyncio.run(asyncio.wait_for(broker.aclose(), WAIT))
    assert broker.closed
    assert sub.closed
    with pytest.raises(mqlite.BrokerClosed):
        broker.publish("q", "e")


def test_aclose_is_idempotent(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()

    async def body() -> None:
        await broker.aclose()
        await broker.aclose()

    asyncio.run(asyncio.wait_for(body(), WAIT))
    broker.close()
    assert broker.closed


def test_aclose_after_close_returns_at_once(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    broker.close()
    asyncio.run(asyncio.wait_for(broker.aclose(), WAIT))
    assert broker.closed


def test_aclose_lets_a_running_push_thread_callback_finish(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    entered = threading.Event()
    release = threading.Event()
    finished: list[int] = []

    def slow(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)
        finished.append(message.payload)

    broker.subscribe("q", callback=slow)
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)

    async def body() -> None:
        assert await asyncio.to_thread(entered.wait, WAIT)
        closing = asyncio.create_task(broker.aclose(timeout=WAIT))
        await asyncio.sleep(0)  # aclose closes the subscription and starts waiting for the thread
        release.set()
        await closing

    try:
        asyncio.run(asyncio.wait_for(body(), WAIT))
    finally:
        release.set()
    # The running callback finished; the next one never started.
    assert finished == [0]
