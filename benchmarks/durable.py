"""Durable scenarios: mqlite on a file against raw sqlite3, persist-queue and litequeue.

Run ``python benchmarks/durable.py [N]``. Standalone for now (no dependency on the benchmark
harness); every figure is operations per second, best of three runs, each in a fresh directory.
The targets are the ratios of issue 5, measured in one run:

- a publish that survives ``kill -9`` when it returns: at least 5x persist-queue's put;
- batched or group-committed publish: at least 0.5x raw sqlite3 ``executemany`` in batches of 1000;
- durable consume plus ack: at least 50x persist-queue's ``SQLiteAckQueue`` get + ack.
"""

from __future__ import annotations

import importlib
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mqlite
from mqlite.storage.sqlite import Commit


def _optional(module: str) -> Any:
    """The peer module, or None when it is not installed (pip install -e '.[bench]')."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


persistqueue = _optional("persistqueue")
litequeue = _optional("litequeue")


def best(run: Callable[[Path, int], float], n: int, repeat: int = 3) -> float:
    """Best ops/s of ``repeat`` runs of ``run(directory, n)``, which returns elapsed seconds."""
    rates = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as directory:
            rates.append(n / run(Path(directory), n))
    return max(rates)


def _raw(directory: Path) -> sqlite3.Connection:
    db = sqlite3.connect(directory / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE m (o INTEGER PRIMARY KEY, p BLOB)")
    return db


def raw_row_per_commit(directory: Path, n: int) -> float:
    db = _raw(directory)
    start = time.perf_counter()
    for i in range(n):
        db.execute("INSERT INTO m VALUES (?, ?)", (i, json.dumps({"i": i}).encode()))
    return time.perf_counter() - start


def raw_executemany_1000(directory: Path, n: int) -> float:
    db = _raw(directory)
    start = time.perf_counter()
    for first in range(0, n, 1000):
        rows = [(i, json.dumps({"i": i}).encode()) for i in range(first, min(first + 1000, n))]
        db.execute("BEGIN")
        db.executemany("INSERT INTO m VALUES (?, ?)", rows)
        db.execute("COMMIT")
    return time.perf_counter() - start


def mqlite_publish(commit: Commit) -> Callable[[Path, int], float]:
    def run(directory: Path, n: int) -> float:
        with mqlite.Broker(directory / "b.mqlite", commit=commit) as broker:
            queue = broker.queue("q", retention="limits")
            start = time.perf_counter()
            for i in range(n):
                queue.publish("e", {"i": i})
            broker.flush()
            return time.perf_counter() - start

    return run


def mqlite_publish_many_1000(directory: Path, n: int) -> float:
    with mqlite.Broker(directory / "b.mqlite") as broker:
        queue = broker.queue("q", retention="limits")
        start = time.perf_counter()
        for first in range(0, n, 1000):
            queue.publish_many([("e", {"i": i}) for i in range(first, min(first + 1000, n))])
        return time.perf_counter() - start


def mqlite_get_ack(commit: Commit) -> Callable[[Path, int], float]:
    def run(directory: Path, n: int) -> float:
        with mqlite.Broker(directory / "b.mqlite", commit=commit) as broker:
            queue = broker.queue("q")
            sub = broker.subscribe("q", name="w", ack="manual")
            queue.publish_many([("e", {"i": i}) for i in range(n)])
            broker.flush()
            start = time.perf_counter()
            for _ in range(n):
                message = sub.get(timeout=1)
                assert message is not None
                sub.ack(message)
            broker.flush()
            return time.perf_counter() - start

    return run


def persistqueue_put(directory: Path, n: int) -> float:
    queue: Any = persistqueue.SQLiteQueue(str(directory / "pq"), auto_commit=True)
    start = time.perf_counter()
    for i in range(n):
        queue.put({"i": i})
    return time.perf_counter() - start


def persistqueue_get_ack(directory: Path, n: int) -> float:
    queue: Any = persistqueue.SQLiteAckQueue(str(directory / "pq"), auto_commit=True)
    for i in range(n):
        queue.put({"i": i})
    start = time.perf_counter()
    for _ in range(n):
        queue.ack(queue.get())
    return time.perf_counter() - start


def litequeue_put(directory: Path, n: int) -> float:
    queue: Any = litequeue.LiteQueue(str(directory / "lq.db"))
    start = time.perf_counter()
    for i in range(n):
        queue.put(json.dumps({"i": i}))
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 5000
    rates: dict[str, float] = {}
    scenarios: list[tuple[str, Callable[[Path, int], float] | None]] = [
        ("raw sqlite3, one row per commit", raw_row_per_commit),
        ("raw sqlite3, executemany x1000", raw_executemany_1000),
        ("mqlite publish, commit='each'", mqlite_publish("each")),
        ("mqlite publish, commit='batch'", mqlite_publish("batch")),
        ("mqlite publish_many x1000", mqlite_publish_many_1000),
        ("mqlite get+ack, commit='each'", mqlite_get_ack("each")),
        ("mqlite get+ack, commit='batch'", mqlite_get_ack("batch")),
        ("persist-queue put", persistqueue_put if persistqueue else None),
        ("persist-queue ack queue get+ack", persistqueue_get_ack if persistqueue else None),
        ("litequeue put", litequeue_put if litequeue else None),
    ]
    for label, run in scenarios:
        if run is None:
            print(f"{label:40} (not installed)")
            continue
        rates[label] = best(run, n)
        print(f"{label:40} {rates[label]:>10,.0f} /s")
    print()

    def ratio(ours: str, theirs: str, target: float) -> None:
        if ours in rates and theirs in rates:
            value = rates[ours] / rates[theirs]
            verdict = "meets" if value >= target else "misses"
            print(f"{ours} / {theirs}: {value:.2f}x ({verdict} the {target}x target)")

    ratio("mqlite publish, commit='each'", "persist-queue put", 5)
    ratio("mqlite publish, commit='batch'", "raw sqlite3, executemany x1000", 0.5)
    ratio("mqlite publish_many x1000", "raw sqlite3, executemany x1000", 0.5)
    ratio("mqlite get+ack, commit='each'", "persist-queue ack queue get+ack", 50)
    ratio("mqlite get+ack, commit='batch'", "persist-queue ack queue get+ack", 50)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
