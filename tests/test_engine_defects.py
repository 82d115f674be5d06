"""Defects the engine restructure fixed, one test each; every one of them fails on the code before it.

Waking is checked from asyncio where a test must tell "woken" from "still blocked": a waker on
the loop's own thread resolves the reader's future at once and removes its waiter, and the
reader runs again only when the test yields, so ``waiting`` right after a publish says exactly
whom it woke. (A woken thread re-registers by itself, which a count can miss.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import WAIT, offsets, pull_all

import mqlite
from mqlite.engine.sqlite.store import SqliteStore

T = TypeVar("T")

BrokerFactory = Callable[..., mqlite.Broker]


def run(body: Callable[[], Awaitable[T]]) -> T:
    """Run a test coroutine under a hard timeout."""

    async def guarded() -> T:
        return await asyncio.wait_for(body(), 2 * WAIT)

    return asyncio.run(guarded())


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Let the loop run until ``condition`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition did not hold in time"
        await asyncio.sleep(0.001)


def engine_of(queue: mqlite.Queue) -> Any:
    """What holds the queue's state and lock: its engine (before the restructure, the Queue itself)."""
    return getattr(queue, "_engine", queue)


def waiting(queue: mqlite.Queue) -> int:
    """Readers blocked on ``queue`` (before the restructure only the private waiter list said)."""
    count = getattr(queue, "waiting", None)
    return int(count) if count is not None else len(queue._waiters)  # type: ignore[attr-defined]  # old code only


def lock_held(queue: mqlite.Queue) -> bool:
    """Whether the queue's lock (a threading.Lock, or a FileLock around one) is held by anyone."""
    lock = engine_of(queue)._lock
    return bool(getattr(lock, "plain", lock).locked())


def registered(queue: mqlite.Queue) -> set[str]:
    """The event names the queue's index knows."""
    return set(engine_of(queue)._events)


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold the file's SQLite write lock from another connection until the block ends (or commit)."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()


# -- B1: a StorageError re-taking the file lock after a wait ----------------------------------------


def test_storage_error_retaking_the_file_lock_after_a_wait_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        sub = broker.subscribe("q")
        begin = SqliteStore.begin
        calls = 0

        def failing_begin(store: SqliteStore) -> int | None:
            nonlocal calls
            calls += 1
            if calls >= 2:
                raise mqlite.StorageError("the file stayed locked (injected)")
            return begin(store)

        monkeypatch.setattr(SqliteStore, "begin", failing_begin)
        with pytest.raises(mqlite.StorageError, match="injected"):
            sub.get(timeout=0.05)
        assert calls >= 2, "the get never re-took the lock after waiting"
        monkeypatch.setattr(SqliteStore, "begin", begin)

        broker.publish("q", "e", 1)
        message = sub.get(timeout=WAIT)
        assert message is not None
        assert message.payload == 1


# -- B4: a refused publish of a new event -------------------------------------------------------------


async def blocked_reader(broker: mqlite.Broker, queue: mqlite.Queue, events: str) -> asyncio.Task[Any]:
    """A task awaiting ``aget`` on an ephemeral subscription to ``events``, once it is blocked."""
    sub = broker.subscribe(queue.name, events=events)
    before = waiting(queue)
    task = asyncio.ensure_future(sub.aget(timeout=WAIT))
    await until(lambda: waiting(queue) == before + 1)
    return task


async def turns(count: int = 5) -> None:
    """Let the loop run ``count`` turns: enough for an aget to hand its step to the I/O thread
    (the aget's task, then the broker's task that submits the step), with turns to spare."""
    for _ in range(count):
        await asyncio.sleep(0)


async def cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_a_publish_refused_as_full_neither_registers_its_new_event_nor_wakes_readers(
    make_broker: BrokerFactory,
) -> None:
    async def body() -> None:
        broker = make_broker()
        queue = broker.queue("q", retention="limits", max_messages=1, overflow="reject")
        queue.publish("y", 0)
        reader = await blocked_reader(broker, queue, "x*")
        try:
            with pytest.raises(mqlite.QueueFull):
                queue.publish("xa", 1)
            assert waiting(queue) == 1, "the refused publish woke the reader"
            assert "xa" not in registered(queue)
            queue.configure(mqlite.QueueConfig(retention="limits", max_messages=2, overflow="reject"))
            queue.publish("xa", 2)
            message = await asyncio.wait_for(reader, WAIT)
            assert message is not None
            assert (message.event, message.payload) == ("xa", 2)
        finally:
            await cancelled(reader)

    run(body)


def test_a_publish_refused_by_a_closed_broker_does_not_register_its_new_event(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    queue = broker.queue("q")
    broker.close()
    with pytest.raises(mqlite.BrokerClosed):
        queue.publish("xa", 1)
    assert "xa" not in registered(queue)


def test_a_refused_publish_many_writes_nothing_and_wakes_nobody(make_broker: BrokerFactory) -> None:
    async def body() -> None:
        broker = make_broker()
        queue = broker.queue("q", retention="limits", max_messages=1, overflow="reject")
        queue.publish("y", 0)
        reader = await blocked_reader(broker, queue, "x*")
        try:
            with pytest.raises(mqlite.QueueFull):
                queue.publish_many([("xa", 1), ("xb", 2)])
            assert waiting(queue) == 1, "the refused publish_many woke the reader"
            assert queue.end_offset == 1
            assert not {"xa", "xb"} & registered(queue)
            queue.configure(mqlite.QueueConfig(retention="limits", max_messages=2, overflow="reject"))
            queue.publish("xc", 3)
            message = await asyncio.wait_for(reader, WAIT)
            assert message is not None
            assert (message.event, message.offset) == ("xc", 1)
        finally:
            await cancelled(reader)

    run(body)


# -- publish_many with keys and headers ---------------------------------------------------------------


def test_publish_many_gives_each_message_its_key_and_headers(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    queue = broker.queue("q")
    sub = broker.subscribe("q", start="earliest")
    queue.publish_many(
        [
            ("a", 1, "k1", {"h": 1}),
            ("b", 2, "k2"),
            {"event": "c", "payload": 3, "key": "k3", "headers": {"h": 3}},
            {"event": "d"},
            ("e", 5),
        ]
    )
    got = [(m.event, m.payload, m.key, dict(m.headers)) for m in pull_all(sub)]
    assert got == [
        ("a", 1, "k1", {"h": 1}),
        ("b", 2, "k2", {}),
        ("c", 3, "k3", {"h": 3}),
        ("d", None, None, {}),
        ("e", 5, None, {}),
    ]


def test_publish_many_with_headers_that_are_not_a_mapping_appends_nothing(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    queue = broker.queue("q")
    with pytest.raises(mqlite.InvalidArgument, match="headers"):
        queue.publish_many([("a", 1, "k", {"h": 1}), ("b", 2, None, [("h", 2)])])
    assert queue.end_offset == 0


def test_publish_many_keys_and_headers_survive_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("q", retention="limits").publish_many(
            [("a", 1, "k1", {"h": 1}), {"event": "b", "key": "k2", "headers": {"h": 2}}]
        )
    with mqlite.Broker(path) as broker:
        got = [(m.event, m.key, dict(m.headers)) for m in pull_all(broker.subscribe("q", start="earliest"))]
    assert got == [("a", "k1", {"h": 1}), ("b", "k2", {"h": 2})]


# -- publish_many wakes like publish ------------------------------------------------------------------


def test_publish_many_wakes_only_the_readers_of_its_events(make_broker: BrokerFactory) -> None:
    async def body() -> None:
        broker = make_broker()
        queue = broker.queue("q")
        on_b = await blocked_reader(broker, queue, "b")
        on_c = await blocked_reader(broker, queue, "c")
        try:
            queue.publish_many([("a", 1), ("b", 2)])
            assert waiting(queue) == 1, "publish_many did not wake exactly the reader of 'b'"
            message = await asyncio.wait_for(on_b, WAIT)
            assert message is not None
            assert (message.event, message.offset) == ("b", 1)
            assert not on_c.done()
        finally:
            await cancelled(on_b)
            await cancelled(on_c)

    run(body)


# -- async for gives its read-ahead back ----------------------------------------------------------------


@pytest.mark.memory_only  # a named cursor on a file does not read ahead
def test_a_cancelled_async_for_gives_its_read_ahead_back(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="workers")
    broker.queue("q").publish_many([("e", i) for i in range(100)])
    seen: list[int] = []

    async def consume() -> None:
        async for message in sub:
            seen.append(message.offset)
            await asyncio.Event().wait()

    async def body() -> None:
        task = asyncio.ensure_future(consume())
        await until(lambda: bool(seen))
        await cancelled(task)
        del task  # the iteration gives back when it is collected
        await turns()  # the loop runs the give-back its iteration scheduled

    run(body)
    assert seen == [0]
    other = broker.subscribe("q", name="workers")
    assert offsets(pull_all(other)) == list(range(1, 100))


@pytest.mark.memory_only  # a named cursor on a file does not read ahead
def test_breaking_out_of_async_for_then_closing_loses_nothing(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    sub = broker.subscribe("q", name="workers")
    broker.queue("q").publish_many([("e", i) for i in range(100)])

    async def body() -> list[int]:
        seen = []
        async for message in sub:
            seen.append(message.offset)
            break
        sub.close()
        return seen

    assert run(body) == [0]
    other = broker.subscribe("q", name="workers")
    assert offsets(pull_all(other)) == list(range(1, 100))


# -- B8: aget on a file never blocks the loop -----------------------------------------------------------


def test_aget_on_a_file_keeps_the_loop_running_while_sqlite_waits(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    # A second broker makes the file shared: every step then begins a write transaction.
    with mqlite.Broker(path) as broker, mqlite.Broker(path):
        sub = broker.subscribe("q", name="reader")
        broker.publish("q", "e", 1)

        async def body() -> None:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            with write_lock_held(path) as other:
                ticking = asyncio.ensure_future(ticker())
                get = asyncio.ensure_future(sub.aget(timeout=WAIT))
                try:
                    await until(lambda: ticks >= 20 or get.done())
                    assert not get.done(), f"aget finished while the file was locked: {get}"
                    assert ticks >= 20
                    other.execute("COMMIT")
                    message = await asyncio.wait_for(get, WAIT)
                    assert message is not None
                    assert message.payload == 1
                finally:
                    await cancelled(ticking)
                    await cancelled(get)

        run(body)


def test_a_coroutine_callback_on_a_file_takes_and_settles_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async push worker's engine steps (take, wait, settle) run in the broker's I/O thread:
    on a file each is a transaction that may wait on the busy timeout, which must not stall the loop."""
    path = tmp_path / "q.mqlite"
    with mqlite.Broker(path) as broker:
        engine = broker.queue("q")._engine  # type: ignore[attr-defined]  # the engine under test
        threads: list[str] = []
        for step in ("try_push", "push_or_wait", "push_done"):
            original = getattr(engine, step)

            def recorded(*args: Any, _original: Any = original) -> Any:
                threads.append(threading.current_thread().name)
                return _original(*args)

            monkeypatch.setattr(engine, step, recorded)
        seen: list[int] = []

        async def handle(message: mqlite.Message) -> None:
            seen.append(message.payload)

        async def body() -> None:
            loop_thread = threading.current_thread().name
            broker.subscribe("q", name="pusher", callback=handle)
            await until(lambda: len(threads) >= 2)  # it took nothing and is waiting
            broker.publish("q", "e", 1)
            await until(lambda: seen == [1])
            await broker.aclose()
            assert threads, "the worker made no engine step"
            assert loop_thread not in threads, f"engine steps ran on the loop's thread: {threads}"

        run(body)


def test_cancelling_an_aget_whose_step_runs_in_the_io_thread_consumes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    with mqlite.Broker(path) as broker, mqlite.Broker(path):  # shared: each step is a transaction
        sub = broker.subscribe("q", name="reader")
        broker.publish("q", "e", 1)

        async def body() -> None:
            with write_lock_held(path) as other:
                get = asyncio.ensure_future(sub.aget(timeout=WAIT))
                await turns()  # the task has handed its step to the I/O thread
                assert not get.done()
                await cancelled(get)
                assert get.cancelled()
                other.execute("COMMIT")
            message = await sub.aget(timeout=WAIT)
            assert message is not None
            assert (message.offset, message.payload) == (0, 1)

        run(body)


# -- B2: no user code under the queue lock ----------------------------------------------------------------


class SpyingSerializer:
    """JSON, recording whether the watched queue's lock was held at each ``dumps``."""

    name = "json"

    def __init__(self) -> None:
        self.queue: mqlite.Queue | None = None
        self.held: list[bool] = []

    def dumps(self, value: Any) -> bytes:
        if self.queue is not None:
            self.held.append(lock_held(self.queue))
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


def test_a_serializer_never_runs_under_the_queue_lock(tmp_path: Path) -> None:
    serializer = SpyingSerializer()
    with mqlite.Broker(tmp_path / "q.mqlite", serializer=serializer) as broker:
        queue = broker.queue("q")
        serializer.queue = queue
        queue.publish("e", 1)
        queue.publish("e", 2, key="k", headers={"h": 1})
        queue.publish_many([("e", 3), ("e", 4)])
        assert serializer.held, "the serializer was never called"
        assert not any(serializer.held), f"dumps ran under the queue lock: {serializer.held}"


class SpyingHeaders(Mapping[str, Any]):
    """A header mapping recording whether the watched queue's lock was held whenever it is read."""

    def __init__(self, queue: mqlite.Queue, data: dict[str, Any]) -> None:
        self._queue = queue
        self._data = data
        self.held: list[bool] = []

    def _note(self) -> None:
        self.held.append(lock_held(self._queue))

    def __getitem__(self, key: str) -> Any:
        self._note()
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        self._note()
        return iter(self._data)

    def __len__(self) -> int:
        self._note()
        return len(self._data)

    def keys(self) -> Any:
        self._note()
        return self._data.keys()

    def items(self) -> Any:
        self._note()
        return self._data.items()


def test_a_header_mapping_is_never_read_under_the_queue_lock() -> None:
    with mqlite.Broker() as broker:
        queue = broker.queue("q")
        single = SpyingHeaders(queue, {"h": 1})
        many = SpyingHeaders(queue, {"h": 2})
        queue.publish("e", 1, headers=single)
        try:
            queue.publish_many([("e", 2, None, many)])
        except mqlite.InvalidArgument:
            # Before the restructure publish_many took no headers; the publish above still counts.
            many.held.append(False)
        for headers in (single, many):
            assert headers.held, "the headers were never read"
            assert not any(headers.held), f"headers were read under the queue lock: {headers.held}"


# -- headers must be a mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [0, []], ids=["zero", "empty-list"])
def test_headers_that_are_not_a_mapping_are_refused(make_broker: BrokerFactory, headers: Any) -> None:
    queue = make_broker().queue("q")
    with pytest.raises(mqlite.InvalidArgument, match="headers"):
        queue.publish("e", 1, headers=headers)
    assert queue.end_offset == 0


def test_empty_headers_are_accepted(make_broker: BrokerFactory) -> None:
    queue = make_broker().queue("q")
    message = queue.publish("e", 1, headers={})
    assert (message.offset, dict(message.headers)) == (0, {})


def test_an_aget_waiting_when_a_cancelled_step_keeps_its_message_gets_it_at_once(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    with mqlite.Broker(path) as broker, mqlite.Broker(path):  # shared: each step is a transaction
        sub = broker.subscribe("q", name="reader")
        broker.publish("q", "e", 1)

        async def body() -> None:
            with write_lock_held(path) as other:
                first = asyncio.ensure_future(sub.aget(timeout=WAIT))
                await turns()  # its step is in the I/O thread, waiting for the file
                await cancelled(first)
                second = asyncio.ensure_future(sub.aget(timeout=WAIT))
                await turns()  # its step is queued behind the first
                other.execute("COMMIT")
            # The first step's message goes to the buffer in the I/O thread as soon as that step
            # ends, before the second step runs: the second gets it at once, or, if it was already
            # blocked, is woken for it.
            try:
                message = await asyncio.wait_for(asyncio.shield(second), WAIT / 5)
                assert message is not None
                assert message.offset == 0
            finally:
                await cancelled(second)

        run(body)
