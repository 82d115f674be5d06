"""Scenarios 1 and 7: the cost of a publish, alone and as subscribers and retained messages grow."""

from __future__ import annotations

import gc
import time
from collections import deque
from functools import partial
from typing import Any

import mqlite
from benchmarks import peers
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, chunks

__all__ = ["publish_scenario", "scaling_scenario"]

PAYLOAD = {"id": 1, "name": "widget"}  # shared by every message: its size is not what we measure


def publish_scenario(mode: Mode) -> Scenario:
    """1. Publish with nobody listening, one at a time and in batches, against the floors."""
    n = {"full": 200_000, "quick": 50_000, "smoke": 200}[mode]
    pairs = [("e", PAYLOAD)] * n

    def per_msg(seconds: float) -> float:
        return seconds / n * 1e6

    def mqlite_one() -> Figures:
        with mqlite.Broker() as broker:
            publish = broker.publish
            start = time.perf_counter()
            for _ in range(n):
                publish("q", "e", PAYLOAD)
            return {"one at a time": per_msg(time.perf_counter() - start)}

    def mqlite_queue_one() -> Figures:
        with mqlite.Broker() as broker:
            publish = broker.queue("q").publish
            start = time.perf_counter()
            for _ in range(n):
                publish("e", PAYLOAD)
            return {"one at a time": per_msg(time.perf_counter() - start)}

    def mqlite_many() -> Figures:
        with mqlite.Broker() as broker:
            publish_many = broker.queue("q").publish_many
            start = time.perf_counter()
            for size in chunks(n, 1000):
                publish_many(pairs[:size])
            return {"publish_many (1000)": per_msg(time.perf_counter() - start)}

    def list_append() -> Figures:
        log: list[tuple[str, Any]] = []
        append = log.append
        start = time.perf_counter()
        for _ in range(n):
            append(("e", PAYLOAD))
        one = per_msg(time.perf_counter() - start)
        log = []
        start = time.perf_counter()
        for size in chunks(n, 1000):
            log.extend(pairs[:size])
        return {"one at a time": one, "publish_many (1000)": per_msg(time.perf_counter() - start)}

    def deque_append() -> Figures:
        log: deque[tuple[str, Any]] = deque()
        append = log.append
        start = time.perf_counter()
        for _ in range(n):
            append(("e", PAYLOAD))
        one = per_msg(time.perf_counter() - start)
        log = deque()
        start = time.perf_counter()
        for size in chunks(n, 1000):
            log.extend(pairs[:size])
        return {"one at a time": one, "publish_many (1000)": per_msg(time.perf_counter() - start)}

    cases = [
        Case("mqlite", mqlite_one),
        Case("mqlite Queue.publish", mqlite_queue_one),
        Case("mqlite publish_many", mqlite_many),
        Case("list.append (floor)", list_append),
        Case("deque.append (floor)", deque_append),
    ]
    if peers.blinker is not None:
        signal = peers.blinker.Signal()

        def blinker_send() -> Figures:
            send = signal.send
            start = time.perf_counter()
            for _ in range(n):
                send(PAYLOAD)
            return {"one at a time": per_msg(time.perf_counter() - start)}

        cases.append(Case("blinker", blinker_send))
    else:
        cases.append(Case("blinker", None, peers.missing("blinker")))
    if peers.pyee is not None:
        emitter = peers.pyee.EventEmitter()

        def pyee_emit() -> Figures:
            emit = emitter.emit
            start = time.perf_counter()
            for _ in range(n):
                emit("e", PAYLOAD)
            return {"one at a time": per_msg(time.perf_counter() - start)}

        cases.append(Case("pyee", pyee_emit))
    else:
        cases.append(Case("pyee", None, peers.missing("pyee")))
    return Scenario(
        key="publish",
        number=1,
        title="Publish with no subscriber",
        about=(
            "Time per message to publish to a queue nobody reads: `broker.publish` one at a time, "
            "`Queue.publish` on a held queue, and `Queue.publish_many` in batches of 1,000. Floors: "
            "appending a tuple to a list or deque. Peers: blinker `send` and pyee `emit` with no receivers."
        ),
        units={"one at a time": "µs/msg", "publish_many (1000)": "µs/msg"},
        cases=cases,
        params={"messages": n},
    )


def scaling_scenario(mode: Mode) -> Scenario:
    """7. Publish cost as idle pull subscribers go 1 -> 1,000, and as retained messages go 10k -> 1M."""
    n = {"full": 100_000, "quick": 30_000, "smoke": 100}[mode]
    sub_counts = (1, 10, 100, 1000) if mode != "smoke" else (1, 3)
    retained_counts = {
        "full": (10_000, 100_000, 1_000_000),
        "quick": (10_000, 100_000, 1_000_000),
        "smoke": (10, 100),
    }[mode]

    def timed_publishes(broker: mqlite.Broker) -> float:
        publish = broker.publish
        start = time.perf_counter()
        for _ in range(n):
            publish("q", "e", PAYLOAD)
        return (time.perf_counter() - start) / n * 1e6

    def with_subs(count: int) -> Figures:
        with mqlite.Broker() as broker:
            for _ in range(count):
                broker.subscribe("q")  # ephemeral pull subscriptions that never read
            return {_subs_label(count): timed_publishes(broker)}

    def with_retained(count: int) -> Figures:
        with mqlite.Broker() as broker:
            queue = broker.queue("q", retention="limits")
            batch = [("e", PAYLOAD)] * 10_000
            for size in chunks(count, len(batch)):
                queue.publish_many(batch[:size])
            gc.collect()  # the fill's collector debt is not part of the timed publishes
            return {f"{count:,} retained": timed_publishes(broker)}

    cases: list[Case] = []
    for count in sub_counts:
        cases.append(Case("mqlite", partial(with_subs, count)))
    for count in retained_counts:
        cases.append(Case("mqlite", partial(with_retained, count)))
    units = {_subs_label(c): "µs/msg" for c in sub_counts}
    units.update({f"{c:,} retained": "µs/msg" for c in retained_counts})
    low, high = sub_counts[0], sub_counts[-1]
    return Scenario(
        key="scaling",
        number=7,
        title="Scaling with subscribers and retained messages",
        about=(
            "Time per `broker.publish` while 1, 10, 100 or 1,000 ephemeral pull subscriptions sit idle "
            "(they never read, so every message stays retained for them), and while a "
            '`retention="limits"` queue already holds 10k, 100k or 1M messages.'
        ),
        units=units,
        cases=cases,
        targets=[
            Target(
                f"flat fanout: publish at {high} idle subs <= 1.2x at {low}",
                _subs_label(high),
                "<=",
                1.2,
                versus=(_subs_label(low), "mqlite"),
            ),
            Target(
                f"flat retention: publish at {retained_counts[-1]:,} retained <= 1.2x at {retained_counts[0]:,}",
                f"{retained_counts[-1]:,} retained",
                "<=",
                1.2,
                versus=(f"{retained_counts[0]:,} retained", "mqlite"),
            ),
        ],
        params={"publishes per round": n},
    )


def _subs_label(count: int) -> str:
    return f"{count:,} idle sub" + ("s" if count != 1 else "")
