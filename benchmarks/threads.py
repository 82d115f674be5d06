"""Scenarios 3, 4 and 5: moving messages between threads (throughput, latency, competing consumers)."""

from __future__ import annotations

import asyncio
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial

import mqlite
from benchmarks import peers
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, Worker, run_threads

__all__ = ["competing_scenario", "cross_thread_scenario", "latency_scenario"]

# Generous bounds: a round that takes longer than this is broken, not slow.
JOIN_TIMEOUT = 300.0
GET_TIMEOUT = 10.0


def _drained(got: int, n: int, system: str) -> None:
    if got != n:
        raise RuntimeError(f"{system}: consumer got {got} of {n} messages")


# -- 3. cross-thread pull ---------------------------------------------------------------------


def _pair(produce: Callable[[], None], consume: Callable[[], None], n: int) -> Figures:
    """Start the consumer, then time from starting the producer until the consumer has everything."""
    done = [0.0]

    def consume_and_stop() -> None:
        consume()
        done[0] = time.perf_counter()

    consumer = Worker(consume_and_stop, "bench-consumer")
    producer = Worker(produce, "bench-producer")
    consumer.start()
    start = time.perf_counter()
    run_threads([producer], JOIN_TIMEOUT)
    consumer.join(JOIN_TIMEOUT)
    if consumer.is_alive():
        raise TimeoutError("consumer thread still running")
    consumer.check()
    return {"msgs/s": n / (done[0] - start)}


def cross_thread_scenario(mode: Mode) -> Scenario:
    """3. One producer thread, one consumer thread, n messages: msgs/s."""
    n = {"full": 1_000_000, "quick": 50_000, "smoke": 300}[mode]
    batch = 1000

    def mqlite_pair(reader: Callable[[mqlite.Subscription], Callable[[], None]]) -> Figures:
        """A producer thread publishing n messages, and ``reader(sub)`` reading them in another."""
        with mqlite.Broker() as broker:
            sub = broker.subscribe("q")
            publish = broker.publish

            def produce() -> None:
                for i in range(n):
                    publish("q", "e", i)

            return _pair(produce, reader(sub), n)

    def poll_reader(sub: mqlite.Subscription) -> Callable[[], None]:
        def consume() -> None:
            poll = sub.poll
            got = 0
            while got < n:
                messages = poll(batch, GET_TIMEOUT)
                if not messages:
                    break
                got += len(messages)
            _drained(got, n, "mqlite poll")

        return consume

    def get_reader(sub: mqlite.Subscription) -> Callable[[], None]:
        def consume() -> None:
            get = sub.get
            for got in range(n):
                if get(GET_TIMEOUT) is None:
                    _drained(got, n, "mqlite get")

        return consume

    def mqlite_poll() -> Figures:
        return mqlite_pair(poll_reader)

    def mqlite_get() -> Figures:
        return mqlite_pair(get_reader)

    def stdlib(make: Callable[[], queue.Queue[int] | queue.SimpleQueue[int]]) -> Figures:
        q = make()

        def produce() -> None:
            put = q.put
            for i in range(n):
                put(i)

        def consume() -> None:
            get = q.get
            for _ in range(n):
                get(timeout=GET_TIMEOUT)

        return _pair(produce, consume, n)

    def deque_condition() -> Figures:
        items: deque[int] = deque()
        ready = threading.Condition(threading.Lock())

        def produce() -> None:
            append = items.append
            for i in range(n):
                with ready:
                    append(i)
                    ready.notify()

        def consume() -> None:
            got = 0
            while got < n:
                with ready:
                    deadline = time.monotonic() + GET_TIMEOUT
                    while not items:
                        if not ready.wait(deadline - time.monotonic()):
                            _drained(got, n, "deque+Condition")
                    taken = len(items)
                    items.clear()  # takes everything there, as a batched consumer would
                got += taken

        return _pair(produce, consume, n)

    def janus_sync() -> Figures:
        assert peers.janus is not None
        janus = peers.janus

        async def main() -> Figures:
            q: janus.Queue[int] = janus.Queue()
            try:

                def produce() -> None:
                    put = q.sync_q.put
                    for i in range(n):
                        put(i)

                def consume() -> None:
                    get = q.sync_q.get
                    for _ in range(n):
                        get(timeout=GET_TIMEOUT)

                # The loop must keep running: janus's sync side notifies it on every put.
                return await asyncio.to_thread(_pair, produce, consume, n)
            finally:
                q.close()
                await q.wait_closed()

        return asyncio.run(main())

    cases = [
        Case("mqlite poll", mqlite_poll),
        Case("mqlite get", mqlite_get),
        Case("queue.Queue", partial(stdlib, queue.Queue)),
        Case("queue.SimpleQueue", partial(stdlib, queue.SimpleQueue)),
        Case("deque+Condition", deque_condition),
        Case("janus", janus_sync) if peers.janus is not None else Case("janus", None, peers.missing("janus")),
    ]
    return Scenario(
        key="cross_thread",
        number=3,
        title="Cross-thread pull",
        about=(
            "One producer thread calls `broker.publish` once per message; one consumer thread reads with "
            f"`sub.poll(max_messages={batch}, timeout=...)` (mqlite poll) or `sub.get(timeout=...)` "
            "(mqlite get). Peers: `queue.Queue` and `queue.SimpleQueue` put/get, janus's sync side, and a "
            "deque guarded by a Condition whose consumer takes everything present per wake-up. Clock: "
            "from starting the producer until the consumer holds every message."
        ),
        units={"msgs/s": "msgs/s"},
        cases=cases,
        targets=[
            Target(
                "cross-thread: mqlite poll >= 10x queue.Queue",
                "msgs/s",
                ">=",
                10,
                ("msgs/s", "queue.Queue"),
                "mqlite poll",
            ),
            Target(
                "cross-thread: mqlite poll >= 1x deque+Condition",
                "msgs/s",
                ">=",
                1,
                ("msgs/s", "deque+Condition"),
                "mqlite poll",
            ),
        ],
        params={"messages": n},
    )


# -- 4. latency ---------------------------------------------------------------------------------


def _paced(n: int, send: Callable[[float], object], interval: float) -> None:
    """Call ``send(perf_counter())`` n times, about ``interval`` s apart.

    Waits with ``time.sleep(0)``, which releases the GIL, rather than a pure spin: a spinning
    producer would hold the GIL and make every consumer wait for the 5 ms switch interval.
    """
    clock = time.perf_counter
    pause = time.sleep
    due = clock()
    for _ in range(n):
        due += interval
        while clock() < due:
            pause(0)
        send(clock())


def _percentiles(samples: list[float], label: str) -> Figures:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {f"{label} p50": cuts[49] * 1e6, f"{label} p99": cuts[98] * 1e6}


def latency_scenario(mode: Mode) -> Scenario:
    """4. Publish -> get and publish -> callback latency, p50 and p99, producer paced at ~100 µs."""
    n = {"full": 5000, "quick": 2000, "smoke": 50}[mode]
    interval = 100e-6

    def pull(system: str, send_for: Callable[[], tuple[Callable[[float], object], Callable[[], float]]]) -> Figures:
        send, receive = send_for()
        samples: list[float] = []

        def consume() -> None:
            clock = time.perf_counter
            for _ in range(n):
                sent = receive()
                samples.append(clock() - sent)

        consumer = Worker(consume, "bench-consumer")
        consumer.start()
        try:
            _paced(n, send, interval)
        finally:
            consumer.join(JOIN_TIMEOUT)
        consumer.check()
        _drained(len(samples), n, system)
        return _percentiles(samples, "get")

    def mqlite_get() -> Figures:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("q")
            publish = broker.publish

            def receive() -> float:
                message = sub.get(GET_TIMEOUT)
                if message is None:
                    raise TimeoutError("mqlite get timed out")
                return message.payload  # type: ignore[no-any-return]

            return pull("mqlite", lambda: (partial(publish, "q", "e"), receive))

    def stdlib_get(make: Callable[[], queue.Queue[float] | queue.SimpleQueue[float]]) -> Figures:
        q = make()
        return pull("stdlib", lambda: (q.put, partial(q.get, timeout=GET_TIMEOUT)))

    def mqlite_callback() -> Figures:
        samples: list[float] = []
        clock = time.perf_counter

        def on_message(message: mqlite.Message) -> None:
            samples.append(clock() - message.payload)

        with mqlite.Broker() as broker:
            broker.subscribe("q", callback=on_message)
            _paced(n, partial(broker.publish, "q", "e"), interval)
            if not broker.drain(timeout=GET_TIMEOUT):
                raise TimeoutError("broker.drain timed out")
        _drained(len(samples), n, "mqlite callback")
        return _percentiles(samples, "callback")

    def queue_callback() -> Figures:
        """The hand-written equivalent of a push subscription: a thread that gets and calls."""
        q: queue.Queue[float] = queue.Queue()
        samples: list[float] = []
        clock = time.perf_counter

        def on_message(sent: float) -> None:
            samples.append(clock() - sent)

        def worker() -> None:
            get = q.get
            for _ in range(n):
                on_message(get(timeout=GET_TIMEOUT))

        thread = Worker(worker, "bench-callbacks")
        thread.start()
        try:
            _paced(n, q.put, interval)
        finally:
            thread.join(JOIN_TIMEOUT)
        thread.check()
        return _percentiles(samples, "callback")

    cases = [
        Case("mqlite", mqlite_get),
        Case("mqlite callback", mqlite_callback),
        Case("queue.Queue", partial(stdlib_get, queue.Queue)),
        Case("queue.Queue + thread", queue_callback),
        Case("queue.SimpleQueue", partial(stdlib_get, queue.SimpleQueue)),
    ]
    targets = [
        Target("latency get p50 <= 1.5x queue.Queue", "get p50", "<=", 1.5, ("get p50", "queue.Queue")),
        Target("latency get p99 <= 2x queue.Queue", "get p99", "<=", 2.0, ("get p99", "queue.Queue")),
        Target(
            "latency callback p50 <= 1.5x queue.Queue + thread",
            "callback p50",
            "<=",
            1.5,
            ("callback p50", "queue.Queue + thread"),
            "mqlite callback",
        ),
        Target(
            "latency callback p99 <= 2x queue.Queue + thread",
            "callback p99",
            "<=",
            2.0,
            ("callback p99", "queue.Queue + thread"),
            "mqlite callback",
        ),
    ]
    return Scenario(
        key="latency",
        number=4,
        title="Latency",
        about=(
            "A producer publishes `perf_counter()` as the payload about every 100 µs (pacing releases the "
            "GIL with `time.sleep(0)`); the consumer subtracts it from `perf_counter()` on receipt. "
            "publish -> get: a consumer thread blocked in `sub.get(timeout=...)` (peers: `queue.Queue` "
            "/ `SimpleQueue` `get`). publish -> callback: a push subscription (peer: a thread that calls "
            "the same callback after `queue.Queue.get`). p50 and p99 over every message of a round."
        ),
        units={"get p50": "µs", "get p99": "µs", "callback p50": "µs", "callback p99": "µs"},
        cases=cases,
        targets=targets,
        params={"messages per round": n},
    )


# -- 5. competing consumers -----------------------------------------------------------------


def competing_scenario(mode: Mode) -> Scenario:
    """5. Four consumer threads share one name with manual acks; one producer thread."""
    n = {"full": 200_000, "quick": 40_000, "smoke": 200}[mode]
    consumers = 4

    def race(
        make_consumer: Callable[[list[int], list[float]], Callable[[], None]], produce: Callable[[], None], system: str
    ) -> Figures:
        counts = [0] * consumers
        finished = [0.0] * consumers
        workers = [Worker(make_consumer(counts, finished), f"bench-consumer-{i}") for i in range(consumers)]
        # Each consumer learns its index from its position; make_consumer hands out closures in order.
        start = time.perf_counter()
        run_threads([Worker(produce, "bench-producer"), *workers], JOIN_TIMEOUT)
        _drained(sum(counts), n, system)
        return {"msgs/s": n / (max(finished) - start)}

    def mqlite_manual(batch: int) -> Figures:
        with mqlite.Broker() as broker:
            subs = [broker.subscribe("q", name="workers", ack="manual") for _ in range(consumers)]
            produced = threading.Event()
            index = iter(range(consumers))

            def make_consumer(counts: list[int], finished: list[float]) -> Callable[[], None]:
                i = next(index)
                sub = subs[i]

                def consume() -> None:
                    poll, ack = sub.poll, sub.ack
                    got = 0
                    while True:
                        messages = poll(batch, 0.05)
                        if not messages:
                            if produced.is_set() and sub.lag == 0:
                                break
                            continue
                        for message in messages:
                            ack(message)
                        got += len(messages)
                        finished[i] = time.perf_counter()
                    counts[i] = got

                return consume

            def produce() -> None:
                publish = broker.publish
                for i in range(n):
                    publish("q", "e", i)
                produced.set()

            return race(make_consumer, produce, "mqlite")

    def queue_task_done() -> Figures:
        q: queue.Queue[int | None] = queue.Queue()
        index = iter(range(consumers))

        def make_consumer(counts: list[int], finished: list[float]) -> Callable[[], None]:
            i = next(index)

            def consume() -> None:
                get, done = q.get, q.task_done
                got = 0
                while get(timeout=GET_TIMEOUT) is not None:
                    done()
                    got += 1
                    finished[i] = time.perf_counter()
                done()
                counts[i] = got

            return consume

        def produce() -> None:
            put = q.put
            for i in range(n):
                put(i)
            for _ in range(consumers):
                put(None)

        return race(make_consumer, produce, "queue.Queue")

    return Scenario(
        key="competing",
        number=5,
        title="Competing consumers",
        about=(
            f'{consumers} consumer threads subscribe with one name and `ack="manual"`; each reads with '
            "`poll` (1 or 100 messages at a time) and acks every message it gets, while a producer thread "
            "publishes. Peer: `queue.Queue` with `get` + `task_done` per message. Clock: from starting "
            "the threads until the last message is acked."
        ),
        units={"msgs/s": "msgs/s"},
        cases=[
            Case("mqlite poll(100)", partial(mqlite_manual, 100)),
            Case("mqlite poll(1)", partial(mqlite_manual, 1)),
            Case("queue.Queue", queue_task_done),
        ],
        params={"messages": n},
    )
