"""Scenario 13 (issue 17): what one-time delivery costs, against the plain calls it replaces.

- A publish with a ``dedup_id`` against a plain publish, in memory and on a file (``commit="each"``).
  The ids are made before the timed loop: a user's id exists before the publish either way.
- On a file, a transaction of one publish and one ack against the same two calls made plainly
  (each one commit). The messages to ack are taken before the timed loop.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mqlite
from benchmarks.harness import Case, Figures, Mode, Scenario, Target

__all__ = ["once_scenario"]

MEMORY = "publish, memory"
FILE = "publish, file"
PIPELINE = "publish + ack, file"


def _in_folder(body: Callable[[Path], Figures]) -> Callable[[], Figures]:
    def run() -> Figures:
        folder = Path(tempfile.mkdtemp(prefix="mqlite-bench-once-"))
        try:
            return body(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return run


def _publishes(n: int, *, dedup: bool, on_file: bool) -> Callable[[], Figures]:
    def body(folder: Path) -> Figures:
        broker = mqlite.Broker(folder / "once.db") if on_file else mqlite.Broker()
        try:
            broker.subscribe("orders", name="billing")  # a reader, so that interest retention keeps them
            publish = broker.publish
            ids = [f"order-{i}" for i in range(n)]
            start = time.perf_counter()
            if dedup:
                for i in range(n):
                    publish("orders", "created", i, dedup_id=ids[i])
            else:
                for i in range(n):
                    publish("orders", "created", i)
            seconds = time.perf_counter() - start
        finally:
            broker.close()
        return {FILE if on_file else MEMORY: seconds / n * 1e6}

    return _in_folder(body)


def _pipeline(n: int, *, transaction: bool) -> Callable[[], Figures]:
    def body(folder: Path) -> Figures:
        broker = mqlite.Broker(folder / "once.db")
        try:
            orders = broker.subscribe("orders", name="billing", ack="manual")
            broker.subscribe("invoices", name="accounts")
            broker.queue("orders").publish_many([("created", i) for i in range(n)])
            taken = orders.poll(n, timeout=10)
            assert len(taken) == n, len(taken)
            start = time.perf_counter()
            if transaction:
                for order in taken:
                    with broker.transaction() as tx:
                        tx.publish("invoices", "issued", order.payload)
                        tx.ack(orders, order)
            else:
                for order in taken:
                    broker.publish("invoices", "issued", order.payload)
                    orders.ack(order)
            seconds = time.perf_counter() - start
            assert orders.pending == 0
        finally:
            broker.close()
        return {PIPELINE: seconds / n * 1e6}

    return _in_folder(body)


def once_scenario(mode: Mode) -> Scenario:
    """13. Deduplicated publishes and transactions against the plain calls."""
    n = {"full": 100_000, "quick": 20_000, "smoke": 100}[mode]
    n_file = {"full": 3_000, "quick": 1_000, "smoke": 30}[mode]
    return Scenario(
        key="once",
        number=13,
        title="One-time delivery (issue 17)",
        about=(
            "A publish with a `dedup_id` (ids made before the timed loop, all new) against a plain publish "
            'to the same queue, in memory and on a file with the default `commit="each"`; and on a file, '
            "`with broker.transaction() as tx: tx.publish(...); tx.ack(...)` against `broker.publish(...)` "
            "then `sub.ack(...)`, for messages taken before the timed loop."
        ),
        units={MEMORY: "µs/msg", FILE: "µs/msg", PIPELINE: "µs/msg"},
        cases=[
            Case("mqlite", _publishes(n, dedup=False, on_file=False)),
            Case("mqlite dedup_id", _publishes(n, dedup=True, on_file=False)),
            Case("mqlite", _publishes(n_file, dedup=False, on_file=True)),
            Case("mqlite dedup_id", _publishes(n_file, dedup=True, on_file=True)),
            Case("mqlite", _pipeline(n_file, transaction=False)),
            Case("mqlite transaction", _pipeline(n_file, transaction=True)),
        ],
        targets=[
            Target(
                "dedup publish, memory: <= 1.5x a plain publish",
                MEMORY,
                "<=",
                1.5,
                (MEMORY, "mqlite"),
                "mqlite dedup_id",
            ),
            Target(
                "dedup publish, file: <= 1.5x a plain publish", FILE, "<=", 1.5, (FILE, "mqlite"), "mqlite dedup_id"
            ),
            Target(
                "transaction of publish + ack, file: <= 1.2x the two calls",
                PIPELINE,
                "<=",
                1.2,
                (PIPELINE, "mqlite"),
                "mqlite transaction",
            ),
        ],
        params={"messages (memory)": n, "messages (file)": n_file},
    )
