"""mqlite.compat: the queue.Queue and asyncio.Queue faces, beyond what CPython's own tests check.

CPython's tests (tests/test_compat_cpython.py) check the standard API; these check what mqlite
adds: durability, several faces and brokers on one queue, task_done's choice of item, join and
maxsize across brokers, redelivery, and the janus- and persist-queue-style scenarios.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite import compat
from mqlite.compat import AsyncQueue, Empty, Full, Queue

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["memory", "file"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[mqlite.Broker]:
    with mqlite.Broker(None if request.param == "memory" else tmp_path / "queues.mqlite") as broker:
        yield broker


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "queues.mqlite"


def _async_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, under a hard timeout (there is no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TIMEOUT * 3))

    return run


def _in_thread(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _pending_offsets(face: Queue[Any] | AsyncQueue[Any]) -> list[int]:
    return [p.offset for p in face._sub.pending_messages()]


# -- the names -----------------------------------------------------------------------------------


def test_the_exceptions_are_the_standard_librarys() -> None:
    assert compat.Empty is queue.Empty
    assert compat.Full is queue.Full
    assert compat.QueueEmpty is asyncio.QueueEmpty
    assert compat.QueueFull is asyncio.QueueFull


def test_without_a_broker_a_face_has_a_private_one_that_closing_closes() -> None:
    q: Queue[int] = Queue()
    other: Queue[int] = Queue()
    q.put(1)
    assert other.empty()  # two private brokers: two queues
    assert q.broker.path is None
    q.close()
    assert q.broker.closed
    assert q.closed


def test_a_given_broker_stays_open_when_the_face_closes(broker: mqlite.Broker) -> None:
    with Queue[int](broker=broker, name="jobs") as q:
        q.put(1)
    assert not broker.closed
    with Queue[int](broker=broker, name="jobs") as again:
        assert again.get(timeout=TIMEOUT) == 1


def test_bad_arguments_are_refused_naming_them() -> None:
    with pytest.raises(mqlite.InvalidArgument, match="maxsize"):
        Queue("10")  # type: ignore[arg-type]
    with pytest.raises(mqlite.InvalidArgument, match="broker"):
        Queue(broker="jobs.mqlite")  # type: ignore[arg-type]
    with pytest.raises(mqlite.InvalidName):
        AsyncQueue(name="")


# -- put and get ---------------------------------------------------------------------------------


def test_items_survive_a_restart_on_a_file(path: Path) -> None:
    with mqlite.Broker(path) as broker, Queue[Any](broker=broker, name="jobs") as q:
        q.put({"id": 1})
        q.put({"id": 2})
        assert q.get(timeout=TIMEOUT) == {"id": 1}
        q.task_done()
    with mqlite.Broker(path) as broker, Queue[Any](broker=broker, name="jobs") as q:
        assert q.qsize() == 1
        assert q.get(timeout=TIMEOUT) == {"id": 2}


def test_an_item_taken_and_not_done_comes_back_after_a_restart(path: Path) -> None:
    with mqlite.Broker(path) as broker, Queue[str](broker=broker, name="jobs") as q:
        q.put("a")
        assert q.get(timeout=TIMEOUT) == "a"  # never marked done
    with mqlite.Broker(path) as broker, Queue[str](broker=broker, name="jobs") as q:
        assert q.unfinished_tasks == 1
        assert q.get(timeout=TIMEOUT) == "a"
        q.task_done()
        assert q.unfinished_tasks == 0


def test_on_a_file_items_go_through_the_serializer(path: Path) -> None:
    with mqlite.Broker(path) as broker, Queue[Any](maxsize=2, broker=broker, name="jobs") as q:
        q.put((1, 2))
        with pytest.raises(mqlite.SerializationError):
            q.put(object())
        assert q.qsize() == 1
        q.put_nowait("fits")  # the refused put gave its room back
    with mqlite.Broker(path) as broker, Queue[Any](broker=broker, name="jobs") as q:
        assert q.get(timeout=TIMEOUT) == [1, 2]  # JSON, the default serializer, has no tuples


def test_in_memory_an_item_is_the_object_put(broker: mqlite.Broker) -> None:
    if broker.path is not None:
        pytest.skip("on a file an item is a copy, made by the serializer")
    item = object()
    q: Queue[object] = Queue(broker=broker, name="jobs")
    q.put(item)
    assert q.get_nowait() is item


def test_faces_of_one_name_compete_for_its_items(broker: mqlite.Broker) -> None:
    first: Queue[int] = Queue(broker=broker, name="jobs")
    second: Queue[int] = Queue(broker=broker, name="jobs")
    for i in range(4):
        first.put(i)
    got = [first.get_nowait(), second.get_nowait(), second.get_nowait(), first.get_nowait()]
    assert got == [0, 1, 2, 3]
    with pytest.raises(Empty):
        second.get_nowait()


def test_get_returns_the_payload_of_any_message_published_to_the_queue(broker: mqlite.Broker) -> None:
    q: Queue[Any] = Queue(broker=broker, name="orders")
    broker.publish("orders", "created", {"id": 7})
    assert q.get(timeout=TIMEOUT) == {"id": 7}


def test_the_queue_shows_in_info(broker: mqlite.Broker) -> None:
    q: Queue[int] = Queue(broker=broker, name="jobs")
    q.put(1)
    q.put(2)
    q.get_nowait()
    info = broker.info().subscription("jobs", compat.SUBSCRIPTION)
    assert (info.lag + info.pending, info.ack) == (2, "manual")


def test_on_a_file_a_take_takes_one_item(path: Path) -> None:
    with mqlite.Broker(path) as broker:
        q: Queue[int] = Queue(broker=broker, name="jobs")
        q.put(1)
        q.put(2)
        q.get_nowait()
        info = broker.info().subscription("jobs", compat.SUBSCRIPTION)
        assert (info.lag, info.pending) == (1, 1)


def test_in_memory_a_take_reads_ahead_and_counts_what_it_read_ahead_as_waiting() -> None:
    with mqlite.Broker() as broker:
        q: Queue[int] = Queue(broker=broker, name="jobs")
        for i in range(3):
            q.put(i)
        assert q.get_nowait() == 0
        info = broker.info().subscription("jobs", compat.SUBSCRIPTION)
        assert (info.lag, info.pending) == (0, 3)  # read ahead: pending, held by the face
        assert q.qsize() == 2
        assert [q.get_nowait(), q.get_nowait()] == [1, 2]
        assert q.empty()


def test_what_a_face_read_ahead_goes_to_another_consumer_of_the_name_that_finds_nothing_else() -> None:
    with mqlite.Broker() as broker:
        q: Queue[int] = Queue(broker=broker, name="jobs")
        for i in range(3):
            q.put(i)
        assert q.get_nowait() == 0  # and 1 and 2 read ahead
        plain = broker.subscribe("jobs", name=compat.SUBSCRIPTION, ack="manual")
        taken = plain.poll(10, timeout=0)
        assert [(m.payload, m.attempt) for m in taken] == [(1, 1), (2, 1)]
        with pytest.raises(Empty):
            q.get_nowait()


def test_closing_a_face_gives_back_what_it_read_ahead_as_never_delivered() -> None:
    with mqlite.Broker() as broker:
        q: Queue[int] = Queue(broker=broker, name="jobs")
        for i in range(3):
            q.put(i)
        assert q.get_nowait() == 0  # handed out; 1 and 2 read ahead
        q.close()
        plain = broker.subscribe("jobs", name=compat.SUBSCRIPTION, ack="manual")
        taken = plain.poll(10, timeout=0)
        assert sorted((m.payload, m.attempt) for m in taken) == [(0, 2), (1, 1), (2, 1)]


# -- task_done -----------------------------------------------------------------------------------


def test_task_done_acks_the_oldest_item_the_calling_thread_took(broker: mqlite.Broker) -> None:
    q: Queue[int] = Queue(broker=broker, name="jobs")
    q.put(0)
    q.put(1)
    assert q.get_nowait() == 0

    def take_and_finish() -> None:
        assert q.get_nowait() == 1
        q.task_done()

    worker = _in_thread(take_and_finish)
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert _pending_offsets(q) == [0]  # the worker's own item was acked, not the older one


def test_task_done_in_a_thread_that_took_nothing_acks_the_faces_oldest(broker: mqlite.Broker) -> None:
    q: Queue[int] = Queue(broker=broker, name="jobs")
    for i in range(2):
        q.put(i)
        q.get_nowait()
    worker = _in_thread(q.task_done)
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert _pending_offsets(q) == [1]


def test_task_done_counts_only_the_items_this_face_handed_out(broker: mqlite.Broker) -> None:
    taker: Queue[int] = Queue(broker=broker, name="jobs")
    other: Queue[int] = Queue(broker=broker, name="jobs")
    taker.put(1)
    taker.get_nowait()
    with pytest.raises(ValueError, match="too many times"):
        other.task_done()
    taker.task_done()
    with pytest.raises(ValueError, match="too many times"):
        taker.task_done()


def test_an_item_not_done_is_delivered_again_when_its_face_closes(broker: mqlite.Broker) -> None:
    first: Queue[str] = Queue(broker=broker, name="jobs")
    second: Queue[str] = Queue(broker=broker, name="jobs")
    first.put("a")
    assert first.get_nowait() == "a"
    with pytest.raises(Empty):
        second.get_nowait()
    first.close()
    assert second.qsize() == 1
    assert second.get(timeout=TIMEOUT) == "a"
    second.task_done()
    assert second.unfinished_tasks == 0


@_async_test
async def test_an_async_task_done_acks_the_calling_tasks_oldest_item(broker: mqlite.Broker) -> None:
    q: AsyncQueue[int] = AsyncQueue(broker=broker, name="jobs")
    q.put_nowait(0)
    q.put_nowait(1)
    assert await q.get() == 0

    async def take_and_finish() -> None:
        assert await q.get() == 1
        q.task_done()

    await asyncio.wait_for(asyncio.create_task(take_and_finish()), TIMEOUT)
    assert _pending_offsets(q) == [0]


# -- maxsize and join across faces and brokers ---------------------------------------------------


def test_maxsize_counts_the_items_waiting_in_every_face_of_the_queue(broker: mqlite.Broker) -> None:
    bounded: Queue[int] = Queue(2, broker=broker, name="jobs")
    other: Queue[int] = Queue(broker=broker, name="jobs")
    other.put(1)
    bounded.put(2)
    assert bounded.full()
    with pytest.raises(Full):
        bounded.put_nowait(3)
    other.get_nowait()  # taken, not done: no longer waiting, so there is room
    assert not bounded.full()
    bounded.put_nowait(3)


def test_a_full_put_waits_for_a_get_in_another_broker(path: Path) -> None:
    with mqlite.Broker(path) as here, mqlite.Broker(path) as there:
        bounded: Queue[int] = Queue(1, broker=here, name="jobs")
        taker: Queue[int] = Queue(broker=there, name="jobs")
        bounded.put(1)
        putter = _in_thread(bounded.put, 2, True, TIMEOUT)
        try:
            putter.join(0.2)
            assert putter.is_alive()
            assert taker.get(timeout=TIMEOUT) == 1
        finally:
            putter.join(TIMEOUT)
        assert not putter.is_alive()
        assert taker.get(timeout=TIMEOUT) == 2


def test_join_waits_for_the_items_another_broker_marks_done(path: Path) -> None:
    with mqlite.Broker(path) as here, mqlite.Broker(path) as there:
        producer: Queue[int] = Queue(broker=here, name="jobs")
        worker: Queue[int] = Queue(broker=there, name="jobs")
        producer.put(1)
        producer.put(2)
        assert [worker.get(timeout=TIMEOUT), worker.get(timeout=TIMEOUT)] == [1, 2]
        joiner = _in_thread(producer.join)
        try:
            worker.task_done()
            joiner.join(0.2)
            assert joiner.is_alive()
            assert producer.unfinished_tasks == 1
            worker.task_done()
        finally:
            joiner.join(TIMEOUT)
        assert not joiner.is_alive()


@_async_test
async def test_an_async_join_wakes_for_a_thread_faces_task_done(broker: mqlite.Broker) -> None:
    waiter: AsyncQueue[int] = AsyncQueue(broker=broker, name="jobs")
    worker: Queue[int] = Queue(broker=broker, name="jobs")
    waiter.put_nowait(1)
    assert worker.get(timeout=TIMEOUT) == 1
    joined = asyncio.create_task(waiter.join())
    await asyncio.sleep(0)
    assert not joined.done()
    done = await asyncio.to_thread(_in_thread, worker.task_done)
    await asyncio.wait_for(joined, TIMEOUT)
    done.join(TIMEOUT)


# -- janus style: threads and coroutines on one queue ----------------------------------------------


def _janus_count(broker: mqlite.Broker) -> int:
    return 10_000 if broker.path is None else 600


@_async_test
async def test_threads_put_and_coroutines_get_losing_and_duplicating_nothing(broker: mqlite.Broker) -> None:
    n = _janus_count(broker)
    producers, consumers = 2, 2
    sync_q: Queue[int] = Queue(maxsize=50, broker=broker, name="jobs")
    async_q: AsyncQueue[int] = AsyncQueue(broker=broker, name="jobs")
    got: list[int] = []

    def produce(first: int) -> None:
        for item in range(first, n, producers):
            sync_q.put(item, timeout=TIMEOUT)

    async def consume() -> None:
        while (item := await asyncio.wait_for(async_q.get(), TIMEOUT)) >= 0:
            got.append(item)
            async_q.task_done()
        async_q.task_done()

    threads = [_in_thread(produce, first) for first in range(producers)]
    try:
        tasks = [asyncio.create_task(consume()) for _ in range(consumers)]
        await asyncio.to_thread(lambda: [t.join(TIMEOUT) for t in threads])
        for _ in range(consumers):
            await async_q.put(-1)  # waits for room on the loop, without blocking the consumers
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    finally:
        for thread in threads:
            thread.join(TIMEOUT)
    assert sorted(got) == list(range(n))
    assert async_q.unfinished_tasks == 0
    await asyncio.wait_for(async_q.join(), TIMEOUT)


@_async_test
async def test_coroutines_put_and_threads_get_losing_and_duplicating_nothing(broker: mqlite.Broker) -> None:
    n = _janus_count(broker)
    producers, consumers = 2, 2
    async_q: AsyncQueue[int] = AsyncQueue(maxsize=50, broker=broker, name="jobs")
    sync_q: Queue[int] = Queue(broker=broker, name="jobs")
    got: list[list[int]] = [[] for _ in range(consumers)]

    def consume(mine: list[int]) -> None:
        while (item := sync_q.get(timeout=TIMEOUT)) >= 0:
            mine.append(item)
            sync_q.task_done()
        sync_q.task_done()

    async def produce(first: int) -> None:
        for item in range(first, n, producers):
            await asyncio.wait_for(async_q.put(item), TIMEOUT)  # waits for room, woken by the threads

    threads = [_in_thread(consume, mine) for mine in got]
    try:
        await asyncio.gather(*(produce(first) for first in range(producers)))
        for _ in range(consumers):
            await async_q.put(-1)
    finally:
        await asyncio.to_thread(lambda: [t.join(TIMEOUT) for t in threads])
    assert not any(t.is_alive() for t in threads)
    assert sorted(got[0] + got[1]) == list(range(n))
    assert sync_q.unfinished_tasks == 0


# -- persist-queue style: a consumer killed with SIGKILL, then restarted -----------------------------


class _Child:
    """A consumer process of tests/compat_processes.py, its lines read by a thread (never blocking the test)."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.compat_processes", "consume", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = _in_thread(self._read)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self) -> str | None:
        return self.lines.get(timeout=TIMEOUT * 3)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()


def _items(lines: list[str], word: str) -> list[int]:
    return [int(parts[1]) for line in lines if len(parts := line.split()) == 2 and parts[0] == word]


def test_a_consumer_killed_mid_way_and_restarted_marks_every_item_done_exactly_once(path: Path) -> None:
    count = 1_000
    with mqlite.Broker(path) as broker, Queue[int](broker=broker, name="jobs") as jobs:
        for item in range(count):
            jobs.put(item)
    kill_after = random.Random(19).randrange(200, 800)  # "done" lines before the kill

    first = _Child(path)
    first_lines: list[str] = []
    try:
        while len(_items(first_lines, "done")) < kill_after:
            line = first.next_line()
            assert line is not None, f"the consumer ended early: {first_lines[-3:]}"
            first_lines.append(line)
        os.kill(first.process.pid, signal.SIGKILL)
    finally:
        first.stop()
    while (line := first.next_line()) is not None:  # what it printed before the kill struck
        first_lines.append(line)

    second = _Child(path)
    second_lines: list[str] = []
    try:
        while (line := second.next_line()) is not None:
            second_lines.append(line)
    finally:
        second.stop()
    assert second_lines[-1] == "finished"

    done_before, done_after = _items(first_lines, "done"), _items(second_lines, "done")
    in_flight = set(_items(first_lines, "got")) - set(done_before)
    assert len(in_flight) <= 1  # it holds one item at a time
    assert len(done_before) == len(set(done_before))
    assert len(done_after) == len(set(done_after))
    assert not set(done_before) & set(_items(second_lines, "got")), "an acked item was delivered again"
    # The item in flight at the kill was either acked before it (its "done" line lost) or is
    # delivered again; every other item was done exactly once, by one of the two.
    assert set(done_before) | set(done_after) | in_flight == set(range(count))
    assert len(done_before) + len(done_after) in (count, count - len(in_flight))
    with mqlite.Broker(path) as broker, Queue[int](broker=broker, name="jobs") as jobs:
        assert jobs.unfinished_tasks == 0
        assert broker.info().subscription("jobs", compat.SUBSCRIPTION).pending == 0


# -- the benchmark scenario runs (it is timed only by python -m benchmarks) --------------------------


@pytest.mark.parametrize("peers_installed", [True, False], ids=["with peers", "without peers"])
def test_the_compat_benchmark_runs_one_tiny_round(peers_installed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import compat as scenario_module
    from benchmarks import peers
    from benchmarks.harness import run_scenario

    if not peers_installed:
        monkeypatch.setattr(peers, "janus", None)
        monkeypatch.setattr(scenario_module, "persistqueue", None)
    records = run_scenario(scenario_module.compat_scenario("smoke"), rounds=1)
    assert [f"{r.system}: {r.reason}" for r in records if r.status == "error"] == []
    assert any(r.values for r in records if r.system == "mqlite")
    if not peers_installed:
        assert {r.system for r in records if r.status == "skipped"} == {"janus", "persist-queue"}
