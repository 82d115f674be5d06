"""Scenario 12 (issue 19): mqlite.compat's faces against queue.Queue, persist-queue, asyncio.Queue and janus."""

from __future__ import annotations

import asyncio
import queue
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import mqlite
from benchmarks import peers
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, Worker, join_all, run_threads
from mqlite import compat

__all__ = ["compat_scenario"]

persistqueue: Any = peers._optional("persistqueue")

THREADS = "threads, memory: put+get"
THREADS_DONE = "threads, memory: put+get+task_done"
FILE = "threads, file: put+get+ack"
SAME_LOOP = "asyncio, same loop: put+get"
CROSS = "asyncio, producer thread: put+get"

PAYLOAD = {"id": 1, "kind": "job"}
CHUNK = 100  # a producer task yields to the loop after this many puts
TIMEOUT = 120.0
GET_TIMEOUT = 10.0


def _pair(put: Callable[[], None], take: Callable[[], None], n: int, figure: str) -> Figures:
    """A producer thread runs ``put``, a consumer thread ``take``; msgs/s until the consumer has all n."""
    done = [0.0]

    def take_and_stop() -> None:
        take()
        done[0] = time.perf_counter()

    consumer = Worker(take_and_stop, "bench-consumer")
    consumer.start()
    start = time.perf_counter()
    try:
        run_threads([Worker(put, "bench-producer")], TIMEOUT)
    finally:
        join_all([consumer], TIMEOUT)
    consumer.check()
    return {figure: n / (done[0] - start)}


def _thread_face(n: int, figure: str, done: bool) -> Callable[[], Figures]:
    def run() -> Figures:
        with compat.Queue[int]() as q:

            def put() -> None:
                for i in range(n):
                    q.put(i)

            def take() -> None:
                get = q.get
                task_done = q.task_done
                for _ in range(n):
                    get(timeout=GET_TIMEOUT)
                    if done:
                        task_done()

            return _pair(put, take, n, figure)

    return run


def _stdlib(n: int, figure: str, done: bool) -> Callable[[], Figures]:
    def run() -> Figures:
        q: queue.Queue[int] = queue.Queue()

        def put() -> None:
            for i in range(n):
                q.put(i)

        def take() -> None:
            get = q.get
            task_done = q.task_done
            for _ in range(n):
                get(timeout=GET_TIMEOUT)
                if done:
                    task_done()

        return _pair(put, take, n, figure)

    return run


def _in_fresh_directory(run: Callable[[Path], Figures]) -> Callable[[], Figures]:
    def case() -> Figures:
        with tempfile.TemporaryDirectory(prefix="mqlite-bench-") as directory:
            return run(Path(directory))

    return case


def _thread_face_on_file(n: int, synchronous: Any) -> Callable[[], Figures]:
    def run(directory: Path) -> Figures:
        with (
            mqlite.Broker(directory / "q.mqlite", synchronous=synchronous) as broker,
            compat.Queue[Any](broker=broker, name="jobs") as q,
        ):

            def put() -> None:
                for _ in range(n):
                    q.put(PAYLOAD)

            def take() -> None:
                for _ in range(n):
                    q.get(timeout=GET_TIMEOUT)
                    q.task_done()

            return _pair(put, take, n, FILE)

    return _in_fresh_directory(run)


def _persist_queue(n: int) -> Callable[[], Figures]:
    def run(directory: Path) -> Figures:
        q = persistqueue.SQLiteAckQueue(str(directory / "pq"), multithreading=True)
        try:

            def put() -> None:
                for _ in range(n):
                    q.put(PAYLOAD)

            def take() -> None:
                for _ in range(n):
                    q.ack(q.get(timeout=GET_TIMEOUT))

            return _pair(put, take, n, FILE)
        finally:
            q.close()

    return _in_fresh_directory(run)


def _in_new_loop(main: Callable[[], Coroutine[Any, Any, Figures]]) -> Callable[[], Figures]:
    return lambda: asyncio.run(main())


def _async_face_same_loop(n: int) -> Callable[[], Figures]:
    async def main() -> Figures:
        with compat.AsyncQueue[int]() as q:
            return await _same_loop(q.put_nowait, q.get, n)

    return _in_new_loop(main)


def _asyncio_same_loop(n: int) -> Callable[[], Figures]:
    async def main() -> Figures:
        q: asyncio.Queue[int] = asyncio.Queue()
        return await _same_loop(q.put_nowait, q.get, n)

    return _in_new_loop(main)


async def _same_loop(put: Callable[[int], None], get: Callable[[], Coroutine[Any, Any, int]], n: int) -> Figures:
    async def produce() -> None:
        for i in range(n):
            put(i)
            if i % CHUNK == 0:
                await asyncio.sleep(0)

    async def consume() -> None:
        for _ in range(n):
            await get()

    start = time.perf_counter()
    consumer = asyncio.create_task(consume())
    await produce()
    await asyncio.wait_for(consumer, TIMEOUT)
    return {SAME_LOOP: n / (time.perf_counter() - start)}


def _faces_cross_thread(n: int) -> Callable[[], Figures]:
    async def main() -> Figures:
        with mqlite.Broker() as broker:
            thread_q: compat.Queue[int] = compat.Queue(broker=broker, name="jobs")
            async_q: compat.AsyncQueue[int] = compat.AsyncQueue(broker=broker, name="jobs")
            return await _cross_thread(thread_q.put, async_q.get, n)

    return _in_new_loop(main)


def _janus_cross_thread(n: int) -> Callable[[], Figures]:
    async def main() -> Figures:
        q: Any = peers.janus.Queue()  # type: ignore[union-attr]  # only built when janus is installed
        try:
            return await _cross_thread(q.sync_q.put, q.async_q.get, n)
        finally:
            q.close()
            await q.wait_closed()

    return _in_new_loop(main)


async def _cross_thread(put: Callable[[int], None], get: Callable[[], Coroutine[Any, Any, int]], n: int) -> Figures:
    def produce() -> None:
        for i in range(n):
            put(i)

    async def consume() -> None:
        for _ in range(n):
            await get()

    producer = Worker(produce, "bench-producer")
    start = time.perf_counter()
    producer.start()
    try:
        await asyncio.wait_for(consume(), TIMEOUT)
        seconds = time.perf_counter() - start
    finally:
        await asyncio.to_thread(join_all, [producer], TIMEOUT)
    producer.check()
    return {CROSS: n / seconds}


def compat_scenario(mode: Mode) -> Scenario:
    """12. The compat faces against the libraries their users come from."""
    n = {"full": 200_000, "quick": 30_000, "smoke": 200}[mode]
    n_file = {"full": 3_000, "quick": 1_000, "smoke": 50}[mode]
    missing_pq = peers.missing("persist-queue")
    cases = [
        Case("mqlite", _thread_face(n, THREADS, done=False)),
        Case("queue.Queue", _stdlib(n, THREADS, done=False)),
        Case("mqlite", _thread_face(n, THREADS_DONE, done=True)),
        Case("queue.Queue", _stdlib(n, THREADS_DONE, done=True)),
        Case("mqlite", _thread_face_on_file(n_file, "normal")),
        Case('mqlite synchronous="full"', _thread_face_on_file(n_file, "full")),
        Case("persist-queue", _persist_queue(n_file))
        if persistqueue is not None
        else Case("persist-queue", None, missing_pq),
        Case("mqlite", _async_face_same_loop(n)),
        Case("asyncio.Queue", _asyncio_same_loop(n)),
        Case("mqlite", _faces_cross_thread(n)),
        Case("janus", _janus_cross_thread(n))
        if peers.janus is not None
        else Case("janus", None, peers.missing("janus")),
    ]
    return Scenario(
        key="compat",
        number=12,
        title="Drop-in faces (issue 19)",
        about=(
            "`mqlite.compat.Queue` and `AsyncQueue` against what their users replace. One producer thread "
            "puts, one consumer thread gets (and calls `task_done`), against `queue.Queue`, each face on a "
            "private in-memory broker. On a file, put + get + ack: the thread face on "
            '`Broker(path)` (default `synchronous="normal"`, and `"full"`, which fsyncs every commit as '
            "persist-queue does) against persist-queue's `SQLiteAckQueue(multithreading=True)` `put` / "
            f"`get` + `ack`. asyncio: a producer task `put_nowait`s, yielding every {CHUNK}, a consumer "
            "task awaits `get()`, against `asyncio.Queue`; and a producer thread puts through the thread "
            "face while a coroutine awaits the async face of the same queue, against janus's "
            "`sync_q.put` / `await async_q.get()`."
        ),
        units={THREADS: "msgs/s", THREADS_DONE: "msgs/s", FILE: "msgs/s", SAME_LOOP: "msgs/s", CROSS: "msgs/s"},
        cases=cases,
        targets=[
            Target("compat threads, memory: mqlite >= 1x queue.Queue", THREADS, ">=", 1, (THREADS, "queue.Queue")),
            Target("compat on a file: mqlite >= 5x persist-queue", FILE, ">=", 5, (FILE, "persist-queue")),
        ],
        params={"messages (memory)": n, "messages (file)": n_file},
    )
