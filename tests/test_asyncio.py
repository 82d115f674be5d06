"""asyncio: awaiting and async-iterating subscriptions, coroutine callbacks, and never blocking the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import WAIT, Worker, payloads
from hypothesis import given, settings
from hypothesis import strategies as st

import mqlite
from mqlite.testing import VirtualClock, checkers, record

T = TypeVar("T")
TIMEOUT = 10.0


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a test coroutine under a hard timeout."""

    async def guarded() -> T:
        return await asyncio.wait_for(coro_fn(), TIMEOUT)

    return asyncio.run(guarded())


def start_thread(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_aget_returns_published_message() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            broker.publish("orders", "created", {"id": 1})
            message = await sub.aget(timeout=1)
            assert message is not None
            assert (message.event, message.payload, message.offset) == ("created", {"id": 1}, 0)

    run(body)


def test_aget_and_apoll_return_nothing_when_the_timeout_passes() -> None:
    clock = VirtualClock(autojump=True)  # timeouts in virtual seconds, under a plain asyncio.run

    async def body() -> None:
        with mqlite.Broker(clock=clock) as broker:
            sub = broker.subscribe("orders")
            assert await sub.aget(timeout=0) is None
            began = clock.monotonic()
            assert await sub.aget(timeout=30) is None
            assert clock.monotonic() - began == 30.0, "aget returned before its timeout, or after it"
            assert await sub.apoll(max_messages=5, timeout=45) == []
            assert clock.monotonic() - began == 75.0

    run(body)


def test_apoll_returns_a_batch_in_order() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            for i in range(5):
                broker.publish("orders", "created", i)
            batch = await sub.apoll(max_messages=3)
            assert [m.payload for m in batch] == [0, 1, 2]
            assert [m.payload for m in await sub.apoll()] == [3, 4]
            assert await sub.apoll(timeout=0) == []

    run(body)


def test_aget_is_woken_by_a_publish_from_another_thread() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            waiting = asyncio.get_running_loop().create_future()
            thread = start_thread(lambda: broker.publish("orders", "created", "hello"))
            try:
                waiting.set_result(None)
                message = await sub.aget(timeout=5)
            finally:
                thread.join(TIMEOUT)
            assert message is not None
            assert message.payload == "hello"

    run(body)


def test_async_for_ends_when_the_subscription_closes() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            for i in range(3):
                broker.publish("orders", "created", i)
            seen = []
            async for message in sub:
                seen.append(message.payload)
                if len(seen) == 3:
                    sub.close()
            assert seen == [0, 1, 2]

    run(body)


def test_async_for_ends_when_the_broker_closes_from_another_thread() -> None:
    async def body() -> None:
        broker = mqlite.Broker()
        sub = broker.subscribe("orders")
        loop = asyncio.get_running_loop()
        first = loop.create_future()
        seen = []

        async def consume() -> None:
            async for message in sub:
                seen.append(message.payload)
                first.set_result(None)

        task = asyncio.create_task(consume())
        broker.publish("orders", "created", 1)
        await first
        thread = start_thread(broker.close)
        try:
            await task
        finally:
            thread.join(TIMEOUT)
        assert seen == [1]

    run(body)


def test_aget_raises_subscription_closed_when_closed_while_waiting() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            task = asyncio.create_task(sub.aget())
            await asyncio.sleep(0)  # let the task start waiting
            sub.close()
            with pytest.raises(mqlite.SubscriptionClosed):
                await task

    run(body)


def test_async_with_closes_the_subscription() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            async with broker.subscribe("orders", name="vendor") as sub:
                broker.publish("orders", "created", 1)
                assert (await sub.aget(timeout=1)) is not None
            assert sub.closed
            assert broker.info().subscription("orders", "vendor").mode == "detached"

    run(body)


def waiters(broker: mqlite.Broker) -> int:
    return broker.info().queue("orders").waiters


async def until_waiting(broker: mqlite.Broker) -> None:
    """Yield to the loop until the queue has a waiter; fail after TIMEOUT seconds."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not waiters(broker):
        assert asyncio.get_running_loop().time() < deadline, "no waiter registered"
        await asyncio.sleep(0)


def test_an_aget_that_times_out_leaves_no_waiter_behind() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            assert await sub.aget(timeout=0.01) is None
            assert waiters(broker) == 0

    run(body)


def test_an_aget_woken_by_a_publish_leaves_no_waiter_behind() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            task = asyncio.ensure_future(sub.aget(timeout=TIMEOUT))
            await until_waiting(broker)
            broker.publish("orders", "created", 1)
            message = await task
            assert message is not None
            assert message.payload == 1
            assert waiters(broker) == 0

    run(body)


def test_a_cancelled_aget_leaves_no_waiter_behind() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            task = asyncio.ensure_future(sub.aget(timeout=TIMEOUT))
            await until_waiting(broker)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert waiters(broker) == 0

    run(body)


def test_read_ahead_of_async_for_is_handed_back_on_close() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            first = broker.subscribe("orders", name="workers")
            for i in range(10):
                broker.publish("orders", "created", i)
            async for message in first:
                assert message.payload == 0
                break
            first.close()
            second = broker.subscribe("orders", name="workers")
            rest = await second.apoll(max_messages=100)
            assert [m.payload for m in rest] == list(range(1, 10))

    run(body)


def test_cancelling_aget_at_any_point_consumes_nothing() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders", name="workers", ack="manual")
            for yields in range(6):
                task = asyncio.create_task(sub.aget())
                for _ in range(yields):
                    await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert sub.pending == 0
            broker.publish("orders", "created", "kept")
            message = await sub.aget(timeout=1)
            assert message is not None
            assert message.payload == "kept"
            assert sub.pending == 1

    run(body)


def test_a_cancelled_aget_on_a_file_keeps_its_message_first_in_line(tmp_path: Path) -> None:
    """The cancelled read's step still runs in the I/O thread; the next read gets its message, in order."""

    async def body() -> None:
        with mqlite.Broker(tmp_path / "cancel.mqlite") as broker:
            sub = broker.subscribe("orders", name="workers", ack="manual")
            broker.queue("orders").publish_many([("created", i) for i in range(40)])
            received = []
            for _ in range(20):
                task = asyncio.create_task(sub.aget(timeout=5))
                await asyncio.sleep(0)  # let it hand its step to the I/O thread
                task.cancel()
                try:
                    message = await task
                    if message is not None:
                        received.append(message.payload)
                except asyncio.CancelledError:
                    pass
                message = await sub.aget(timeout=5)
                assert message is not None
                received.append(message.payload)
            assert received == list(range(len(received)))  # nothing lost, nothing out of order

    run(body)


def test_cancel_racing_a_publish_loses_nothing() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders", name="workers")
            received = []
            for i in range(50):
                task = asyncio.create_task(sub.aget())
                await asyncio.sleep(0)
                thread = start_thread(lambda i=i: broker.publish("orders", "created", i))
                task.cancel()
                try:
                    message = await task
                    if message is not None:
                        received.append(message.payload)
                except asyncio.CancelledError:
                    pass
                finally:
                    thread.join(TIMEOUT)
            while (message := await sub.aget(timeout=0)) is not None:
                received.append(message.payload)
            assert sorted(received) == list(range(50))

    run(body)


def test_ticker_keeps_ticking_while_consumers_wait_and_messages_flow() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            ticks = 0
            ticked_five = threading.Event()

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    if ticks == 5:
                        ticked_five.set()
                    await asyncio.sleep(0.001)

            count = 100_000

            def produce() -> None:
                # Publish only once the ticker proved the loop runs while the consumer waits.
                assert ticked_five.wait(TIMEOUT)
                for i in range(count):
                    broker.publish("orders", "tick", i)

            tick_task = asyncio.create_task(ticker())
            thread = start_thread(produce)
            try:
                received = 0
                ticks_at_first = None
                async for message in sub:
                    if ticks_at_first is None:
                        ticks_at_first = ticks
                    assert message.payload == received
                    received += 1
                    if received == count:
                        break
            finally:
                thread.join(TIMEOUT)
                tick_task.cancel()
            assert ticks_at_first is not None
            assert ticks_at_first >= 5
            assert ticks > ticks_at_first, "the ticker never ran while 100,000 messages flowed in"

    run(body)


def test_coroutine_callback_runs_on_the_loop_in_order_one_at_a_time() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            loop_thread = threading.get_ident()
            seen: list[int] = []
            threads: set[int] = set()
            running = 0
            most = 0

            async def handle(message: mqlite.Message) -> None:
                nonlocal running, most
                running += 1
                most = max(most, running)
                threads.add(threading.get_ident())
                await asyncio.sleep(0)
                seen.append(message.payload)
                running -= 1

            broker.subscribe("orders", callback=handle)
            thread = start_thread(lambda: [broker.publish("orders", "created", i) for i in range(200)])
            thread.join(TIMEOUT)
            assert await broker.adrain(timeout=5)
            assert seen == list(range(200))
            assert threads == {loop_thread}
            assert most == 1

    run(body)


def test_coroutine_callback_that_raises_is_retried_then_dead_lettered() -> None:
    clock = VirtualClock(autojump=True)  # the backoff passes in virtual time

    async def body() -> None:
        with mqlite.Broker(clock=clock) as broker:
            history = record(broker)
            calls: list[float] = []

            async def flaky(message: mqlite.Message) -> None:
                calls.append(clock.monotonic())
                raise RuntimeError("driver unreachable")

            broker.subscribe(
                "orders",
                name="drivers",
                callback=flaky,
                max_deliveries=2,
                backoff=mqlite.Backoff(initial=60, maximum=120),
            )
            dead = broker.subscribe("orders.dead-letter")
            broker.publish("orders", "pickup", "parcel-1")
            began = clock.monotonic()
            letter = await dead.aget(timeout=3600)
            assert letter is not None
            assert letter.payload == "parcel-1"
            assert letter.headers["dead_letter.deliveries"] == 2
            assert [when - began for when in calls] == [0.0, 60.0]
            info = broker.info().subscription("orders", "drivers")
            assert (info.dead_lettered, info.pending) == (1, 0)
            checkers.redelivery(history, "drivers").assert_valid()

    run(body)


def test_coroutine_callback_with_manual_ack_stays_pending_until_acked() -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            handled = asyncio.get_running_loop().create_future()
            box: list[mqlite.Subscription] = []

            async def handle(message: mqlite.Message) -> None:
                handled.set_result(message)

            box.append(broker.subscribe("orders", name="vendor", callback=handle, ack="manual"))
            broker.publish("orders", "delivered", 1)
            message = await handled
            assert await broker.adrain(timeout=5)
            assert box[0].pending == 1
            box[0].ack(message)
            assert box[0].pending == 0

    run(body)


def test_coroutine_callback_without_a_loop_is_refused_at_subscribe() -> None:
    async def handle(message: mqlite.Message) -> None:
        pass

    with mqlite.Broker() as broker, pytest.raises(mqlite.InvalidArgument, match="event loop"):
        broker.subscribe("orders", callback=handle)


def test_coroutine_callback_with_explicit_loop_from_another_thread() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        async def handle(message: mqlite.Message) -> None:
            if not got.done():
                got.set_result((message.payload, threading.get_ident()))

        with mqlite.Broker() as broker:

            def subscribe_and_publish() -> None:
                broker.subscribe("orders", callback=handle, loop=loop)
                broker.publish("orders", "created", "from-thread")

            thread = start_thread(subscribe_and_publish)
            try:
                payload, ident = await got
            finally:
                thread.join(TIMEOUT)
            assert payload == "from-thread"
            assert ident == threading.get_ident()

    run(body)


def test_two_loops_in_two_threads_work_independently() -> None:
    with mqlite.Broker() as broker:
        results: dict[str, list[int]] = {}
        errors: list[BaseException] = []

        def consumer(queue: str) -> None:
            sub = broker.subscribe(queue)  # bound to this thread's loop at its first await
            subscribed.release()

            async def body() -> None:
                assert ready.wait(TIMEOUT)
                results[queue] = [m.payload async for m in _take(sub, 20)]

            try:
                asyncio.run(asyncio.wait_for(body(), TIMEOUT))
            except BaseException as error:  # noqa: BLE001  # re-raised in the main thread below
                errors.append(error)

        subscribed = threading.Semaphore(0)
        ready = threading.Event()
        threads = [start_thread(lambda q=q: consumer(q)) for q in ("a", "b")]
        try:
            for _ in threads:
                assert subscribed.acquire(timeout=TIMEOUT)
            ready.set()
            for i in range(20):
                broker.publish("a", "e", i)
                broker.publish("b", "e", 100 + i)
        finally:
            for thread in threads:
                thread.join(TIMEOUT)
        assert not errors
        assert results == {"a": list(range(20)), "b": list(range(100, 120))}


async def _take(sub: mqlite.Subscription, count: int) -> Any:
    received = 0
    async for message in sub:
        yield message
        received += 1
        if received == count:
            return


def test_using_a_subscription_from_another_loop_raises() -> None:
    with mqlite.Broker() as broker:

        async def bind() -> mqlite.Subscription:
            sub = broker.subscribe("orders")
            await sub.aget(timeout=0)
            return sub

        sub = asyncio.run(bind())

        async def other() -> None:
            with pytest.raises(mqlite.WrongEventLoop):
                await sub.aget(timeout=0)

        run(other)


def test_async_for_lets_other_tasks_run_when_messages_are_always_waiting() -> None:
    from mqlite.subscription import READ_AHEAD, YIELD_EVERY

    per_yield = READ_AHEAD * YIELD_EVERY
    count = 5 * per_yield

    async def body() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("orders")
            for i in range(count):
                broker.publish("orders", "created", i)
            turns = 0

            async def other_task() -> None:
                nonlocal turns
                while True:
                    turns += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(other_task())
            await asyncio.sleep(0)  # the task starts
            started = turns
            received = 0
            try:
                async for message in sub:
                    assert message.payload == received
                    received += 1
                    if received == count:
                        break
            finally:
                task.cancel()
            # Every message was already there, so only async for's own yields let the task run.
            assert turns - started >= count // per_yield - 1

    run(body)


def test_messages_read_ahead_on_one_loop_are_not_taken_from_another() -> None:
    with mqlite.Broker() as broker:

        async def first() -> tuple[mqlite.Subscription, int]:
            sub = broker.subscribe("orders")
            for i in range(10):
                broker.publish("orders", "created", i)
            message = await anext(aiter(sub))  # reads ahead: the other nine wait in its buffer
            return sub, message.payload

        sub, payload = run(first)
        assert payload == 0

        async def next_payload() -> int:
            return (await anext(aiter(sub))).payload

        with pytest.raises(mqlite.WrongEventLoop):
            run(next_payload)  # a new loop on the same thread
        in_a_thread = Worker(lambda: run(next_payload))
        with pytest.raises(mqlite.WrongEventLoop):
            in_a_thread.join(TIMEOUT)
        assert payloads(sub.poll(max_messages=100)) == list(range(1, 10))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["sync-get", "sync-poll", "async-get", "async-poll"]), min_size=1, max_size=30))
def test_sync_and_async_consumers_of_one_name_get_each_message_once(readers: list[str]) -> None:
    async def body() -> None:
        with mqlite.Broker() as broker:
            sync_sub = broker.subscribe("orders", name="workers")
            async_sub = broker.subscribe("orders", name="workers")
            total = 3 * len(readers)
            for i in range(total):
                broker.publish("orders", "created", i)
            received: list[int] = []
            for reader in readers:
                if reader == "sync-get":
                    message = sync_sub.get(timeout=0)
                    received += [] if message is None else [message.payload]
                elif reader == "sync-poll":
                    received += [m.payload for m in sync_sub.poll(max_messages=2)]
                elif reader == "async-get":
                    message = await async_sub.aget(timeout=0)
                    received += [] if message is None else [message.payload]
                else:
                    received += [m.payload for m in await async_sub.apoll(max_messages=2)]
            received += [m.payload for m in sync_sub.poll(max_messages=total)]
            assert sorted(received) == list(range(total))

    run(body)


# -- what a coroutine callback may raise -----------------------------------------------------


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
def test_a_coroutine_callback_that_raises_a_base_exception_stops_its_task_and_propagates(
    make_broker: Callable[..., mqlite.Broker], stop: type[BaseException]
) -> None:
    broker = make_broker()
    calls: list[int] = []

    async def body() -> None:
        async def handle(message: mqlite.Message) -> None:
            calls.append(message.payload)
            if message.payload == 1:
                raise stop

        broker.subscribe("q", name="n", callback=handle)
        for i in range(3):
            broker.publish("q", "e", i)
        await asyncio.get_running_loop().create_future()  # until the callback stops the loop

    with pytest.raises(stop):
        run(body)
    assert calls == [0, 1]


def test_a_coroutine_push_task_stopped_by_system_exit_logs_that_it_stopped(
    make_broker: Callable[..., mqlite.Broker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_broker()

    async def body() -> None:
        async def handle(message: mqlite.Message) -> None:
            raise SystemExit

        broker.subscribe("q", name="n", callback=handle)
        broker.publish("q", "e")
        await asyncio.get_running_loop().create_future()

    with caplog.at_level("ERROR", logger="mqlite"), pytest.raises(SystemExit):
        run(body)
    assert "push task for q/n#1 stopped" in caplog.text


def test_a_coroutine_callback_that_raises_system_exit_hands_back_the_rest_of_its_batch(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    first: list[mqlite.Subscription] = []

    async def stopped() -> None:
        async def handle(message: mqlite.Message) -> None:
            if message.payload == 1:
                raise SystemExit

        first.append(broker.subscribe("q", name="n", callback=handle))
        for i in range(3):
            broker.publish("q", "e", i)
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SystemExit):
        run(stopped)
    assert broker.info().subscription("q", "n").acked == 1  # only the message handled before it
    first[0].close()
    received: list[int] = []

    async def again() -> None:
        async def handle(message: mqlite.Message) -> None:
            received.append(message.payload)

        broker.subscribe("q", name="n", callback=handle)
        assert await broker.adrain(timeout=WAIT)

    run(again)
    assert received == [1, 2]


def test_a_coroutine_callback_that_raises_an_exception_is_logged_and_its_task_goes_on(
    make_broker: Callable[..., mqlite.Broker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_broker(clock=mqlite.ManualClock())
    calls: list[int] = []

    async def body() -> None:
        async def handle(message: mqlite.Message) -> None:
            calls.append(message.payload)
            if message.payload == 0:
                raise RuntimeError("driver unreachable")

        broker.subscribe("q", name="n", callback=handle)
        for i in range(3):
            broker.publish("q", "e", i)
        assert not await broker.adrain(timeout=0.05)  # 0 waits for its retry on the manual clock

    with caplog.at_level("WARNING", logger="mqlite"):
        run(body)
    assert calls == [0, 1, 2]
    assert "driver unreachable" in caplog.text
    info = broker.info().subscription("q", "n")
    assert (info.acked, info.pending) == (2, 1)


# -- closing a broker with coroutine callbacks -------------------------------------------------


def _push_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("mqlite-push-")]


def test_aclose_ends_coroutine_push_tasks_waiting_for_messages(make_broker: Callable[..., mqlite.Broker]) -> None:
    async def body() -> None:
        broker = make_broker()

        async def handle(message: mqlite.Message) -> None:
            pass

        broker.subscribe("q", callback=handle)
        broker.subscribe("q", name="n", callback=handle)
        await asyncio.sleep(0)  # the tasks start and wait for messages
        tasks = _push_tasks()
        assert len(tasks) == 2
        await broker.aclose(timeout=WAIT)
        assert all(t.done() for t in tasks)

    run(body)


def test_aclose_waits_for_a_running_coroutine_callback(make_broker: Callable[..., mqlite.Broker]) -> None:
    async def body() -> None:
        broker = make_broker()
        entered = asyncio.Event()
        release = asyncio.Event()
        finished: list[int] = []

        async def slow(message: mqlite.Message) -> None:
            entered.set()
            await release.wait()
            finished.append(message.payload)

        broker.subscribe("q", name="n", callback=slow)
        broker.publish("q", "e", 0)
        broker.publish("q", "e", 1)
        await entered.wait()
        closing = asyncio.create_task(broker.aclose(timeout=WAIT))
        await asyncio.sleep(0)
        assert not closing.done()
        release.set()
        await closing
        assert finished == [0]  # it finished; the next one never started
        assert broker.info().subscription("q", "n").acked == 1

    run(body)


def test_aclose_cancels_a_coroutine_callback_that_outlasts_its_timeout(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    async def body() -> None:
        broker = make_broker()
        entered = asyncio.Event()
        cancelled = asyncio.Event()

        async def hangs(message: mqlite.Message) -> None:
            entered.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        broker.subscribe("q", name="n", callback=hangs)
        broker.publish("q", "e")
        await entered.wait()
        await broker.aclose(timeout=0.05)
        assert cancelled.is_set()
        assert all(t.done() for t in _push_tasks())
        info = broker.info().subscription("q", "n")
        assert (info.acked, info.delivered) == (0, 0)  # handed back, not counted

    run(body)


def test_broker_close_from_another_thread_waits_for_a_running_coroutine_callback(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    async def body() -> None:
        broker = make_broker()
        entered = asyncio.Event()
        release = asyncio.Event()
        finished: list[int] = []

        async def slow(message: mqlite.Message) -> None:
            entered.set()
            await release.wait()
            finished.append(message.payload)

        broker.subscribe("q", callback=slow)
        broker.publish("q", "e", 0)
        await entered.wait()
        seen_by_close: list[list[int]] = []

        def close() -> None:
            broker.close(timeout=WAIT)
            seen_by_close.append(list(finished))

        thread = start_thread(close)
        try:
            await asyncio.to_thread(thread.join, 0.2)
            assert thread.is_alive(), "close() returned while a coroutine callback was still running"
            release.set()
            await asyncio.to_thread(thread.join, WAIT)
        finally:
            release.set()
            thread.join(TIMEOUT)
        assert seen_by_close == [[0]]

    run(body)


def test_broker_close_from_another_thread_cancels_a_coroutine_callback_that_outlasts_its_timeout(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    async def body() -> None:
        broker = make_broker()
        entered = asyncio.Event()
        cancelled = asyncio.Event()

        async def hangs(message: mqlite.Message) -> None:
            entered.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        broker.subscribe("q", name="n", callback=hangs)
        broker.publish("q", "e")
        await entered.wait()
        await asyncio.to_thread(broker.close, 0.05)
        await asyncio.wait_for(cancelled.wait(), WAIT)
        info = broker.info().subscription("q", "n")
        assert (info.acked, info.delivered) == (0, 0)

    run(body)


def test_aclose_does_not_block_the_loop_while_it_joins_push_threads(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    async def body() -> None:
        broker = make_broker()
        entered = threading.Event()
        release = threading.Event()

        def slow(message: mqlite.Message) -> None:
            entered.set()
            release.wait(WAIT)

        broker.subscribe("q", callback=slow)
        broker.publish("q", "e")
        try:
            assert await asyncio.to_thread(entered.wait, WAIT)
            closing = asyncio.create_task(broker.aclose(timeout=WAIT))
            await asyncio.sleep(0)  # aclose runs up to its first await
            assert not closing.done()  # the loop runs this while aclose waits for the push thread
        finally:
            release.set()
        await closing
        assert broker.closed

    run(body)


def test_a_coroutine_callback_may_aclose_its_own_broker(make_broker: Callable[..., mqlite.Broker]) -> None:
    async def body() -> None:
        broker = make_broker()
        closed = asyncio.Event()

        async def closes(message: mqlite.Message) -> None:
            await broker.aclose(timeout=WAIT)
            closed.set()

        broker.subscribe("q", callback=closes)
        broker.publish("q", "e")
        await asyncio.wait_for(closed.wait(), WAIT / 2)  # not held up by waiting for itself
        assert broker.closed

    run(body)
