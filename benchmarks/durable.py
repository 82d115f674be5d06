"""Scenario 10 (issue 5): mqlite on a file against raw sqlite3, persist-queue and litequeue.

Every case runs in a fresh temporary directory (``TMPDIR``, so on the disk the suite runs on;
a tmpfs makes every fsync free) and reports messages per second. Only mqlite's public API is
used: ``Broker(path, commit=..., synchronous=...)``, ``publish``, ``Queue.publish_many``,
``flush``, ``subscribe(..., name=..., ack="manual")``, ``get``, ``poll`` and ``ack``.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import mqlite
from benchmarks import peers
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, chunks

__all__ = ["durable_scenario"]

# The peers of this scenario, each the module or None. They belong with the others in peers.py;
# they are here while that module is outside this change.
persistqueue: Any = peers._optional("persistqueue")
litequeue: Any = peers._optional("litequeue")

PAYLOAD = {"id": 1, "name": "widget"}  # every system encodes it again for every message
BATCH = 1000  # publish_many chunks and executemany batches
GET_TIMEOUT = 10.0  # a get that waits this long is a bug, not a slow system

PUBLISH = "publish, each survives kill -9"
BATCHED = "publish, batched"
CONSUME = "get + ack"

Commit = Literal["each", "batch"]
Synchronous = Literal["normal", "full"]


def _rate(count: int, seconds: float) -> float:
    return count / seconds


def _in_fresh_directory(run: Callable[[Path], Figures]) -> Callable[[], Figures]:
    """A case that calls ``run(directory)`` in a new temporary directory each round."""

    def case() -> Figures:
        with tempfile.TemporaryDirectory(prefix="mqlite-bench-") as directory:
            return run(Path(directory))

    return case


def _raw_sqlite(directory: Path) -> sqlite3.Connection:
    """The floor: a table of (offset, JSON payload) in WAL with synchronous=NORMAL, as mqlite's default."""
    db = sqlite3.connect(directory / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE messages (offset INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    return db


# What each peer does per message, on a queue opened in the round's directory.


def _persistqueue(directory: Path) -> Any:
    return persistqueue.SQLiteQueue(str(directory / "pq"), auto_commit=True)


def _persistqueue_ack_queue(directory: Path) -> Any:
    return persistqueue.SQLiteAckQueue(str(directory / "pq"))


def _persistqueue_put(queue: Any) -> None:
    queue.put(PAYLOAD)  # pickled by persist-queue


def _persistqueue_get_ack(queue: Any) -> None:
    queue.ack(queue.get(timeout=GET_TIMEOUT))


def _litequeue(directory: Path) -> Any:
    return litequeue.LiteQueue(str(directory / "lq.db"))


def _litequeue_put(queue: Any) -> None:
    queue.put(json.dumps(PAYLOAD))  # litequeue stores text


def _litequeue_pop_done(queue: Any) -> None:
    message = queue.pop()
    if message is None:
        raise RuntimeError("litequeue: the queue ran dry")
    queue.done(message.message_id)


def durable_scenario(mode: Mode) -> Scenario:
    """10. Durable publish, batched publish and durable get + ack, each system in a fresh directory."""
    n = {"full": 20_000, "quick": 5_000, "smoke": 50}[mode]  # mqlite and sqlite3, one at a time
    n_batched = {"full": 100_000, "quick": 20_000, "smoke": 200}[mode]
    n_slow = {"full": 2_000, "quick": 1_000, "smoke": 20}[mode]  # the peers, and every fsync per commit
    pairs = [("e", PAYLOAD)] * BATCH

    # -- publish ----------------------------------------------------------------------------

    def mqlite_publish(count: int, figure: str, commit: Commit, synchronous: Synchronous) -> Callable[[], Figures]:
        def run(directory: Path) -> Figures:
            with mqlite.Broker(directory / "mqlite.db", commit=commit, synchronous=synchronous) as broker:
                broker.queue("q", retention="limits")  # keep every message, as the peers do
                publish = broker.publish
                start = time.perf_counter()
                for _ in range(count):
                    publish("q", "e", PAYLOAD)
                broker.flush()  # commit="batch": the time until the last one is committed
                return {figure: _rate(count, time.perf_counter() - start)}

        return _in_fresh_directory(run)

    def mqlite_publish_many(directory: Path) -> Figures:
        with mqlite.Broker(directory / "mqlite.db") as broker:
            publish_many = broker.queue("q", retention="limits").publish_many
            start = time.perf_counter()
            for size in chunks(n_batched, BATCH):
                publish_many(pairs[:size])
            return {BATCHED: _rate(n_batched, time.perf_counter() - start)}

    def sqlite_row_per_commit(directory: Path) -> Figures:
        db = _raw_sqlite(directory)
        try:
            start = time.perf_counter()
            for offset in range(n):
                db.execute("INSERT INTO messages VALUES (?, ?)", (offset, json.dumps(PAYLOAD).encode()))
            return {PUBLISH: _rate(n, time.perf_counter() - start)}
        finally:
            db.close()

    def sqlite_executemany(directory: Path) -> Figures:
        db = _raw_sqlite(directory)
        try:
            start = time.perf_counter()
            first = 0
            for size in chunks(n_batched, BATCH):
                rows = [(offset, json.dumps(PAYLOAD).encode()) for offset in range(first, first + size)]
                db.execute("BEGIN")
                db.executemany("INSERT INTO messages VALUES (?, ?)", rows)
                db.execute("COMMIT")
                first += size
            return {BATCHED: _rate(n_batched, time.perf_counter() - start)}
        finally:
            db.close()

    # -- consume ----------------------------------------------------------------------------

    def mqlite_consume(commit: Commit, poll: int | None) -> Callable[[], Figures]:
        """get + ack (``poll=None``) or poll(poll) + one ack of the batch, over n messages published beforehand."""

        def run(directory: Path) -> Figures:
            with mqlite.Broker(directory / "mqlite.db", commit=commit) as broker:
                sub = broker.subscribe("q", name="workers", ack="manual")
                publish_many = broker.queue("q").publish_many
                for size in chunks(n, BATCH):
                    publish_many(pairs[:size])
                broker.flush()
                get, ack = sub.get, sub.ack
                start = time.perf_counter()
                if poll is None:
                    for got in range(n):
                        message = get(GET_TIMEOUT)
                        if message is None:
                            raise TimeoutError(f"mqlite get: got {got} of {n} messages")
                        ack(message)
                else:
                    got = 0
                    while got < n:
                        messages = sub.poll(poll, GET_TIMEOUT)
                        if not messages:
                            raise TimeoutError(f"mqlite poll: got {got} of {n} messages")
                        ack(*messages)  # one commit for the batch
                        got += len(messages)
                broker.flush()  # commit="batch": until the last ack is committed
                return {CONSUME: _rate(n, time.perf_counter() - start)}

        return _in_fresh_directory(run)

    # -- the peers ------------------------------------------------------------------------

    def peer(
        system: str,
        module: Any,
        open_queue: Callable[[Path], Any],
        put: Callable[[Any], object],
        take_and_ack: Callable[[Any], object] | None = None,
    ) -> Case:
        """Time n_slow ``put`` calls (publish), or n_slow ``take_and_ack`` calls after n_slow puts (consume)."""
        if module is None:
            return Case(system, None, peers.missing(system))

        def run(directory: Path) -> Figures:
            queue = open_queue(directory)
            try:
                start = time.perf_counter()
                for _ in range(n_slow):
                    put(queue)
                if take_and_ack is None:
                    return {PUBLISH: _rate(n_slow, time.perf_counter() - start)}
                start = time.perf_counter()
                for _ in range(n_slow):
                    take_and_ack(queue)
                return {CONSUME: _rate(n_slow, time.perf_counter() - start)}
            finally:
                queue.close()

        return Case(system, _in_fresh_directory(run))

    # mqlite's variants first, so that each figure's table lists them first; every round rotates the order.
    cases = [
        Case("mqlite", mqlite_publish(n, PUBLISH, "each", "normal")),
        Case('mqlite synchronous="full"', mqlite_publish(n_slow, PUBLISH, "each", "full")),
        Case('mqlite commit="batch"', mqlite_publish(n_batched, BATCHED, "batch", "normal")),
        Case(f"mqlite publish_many ({BATCH:,})", _in_fresh_directory(mqlite_publish_many)),
        Case("mqlite", mqlite_consume("each", None)),
        Case('mqlite commit="batch"', mqlite_consume("batch", None)),
        Case("mqlite poll(100) + ack(*batch)", mqlite_consume("each", 100)),
        Case("sqlite3, 1 row per commit", _in_fresh_directory(sqlite_row_per_commit)),
        Case(f"sqlite3 executemany ({BATCH:,})", _in_fresh_directory(sqlite_executemany)),
        peer("persist-queue", persistqueue, _persistqueue, _persistqueue_put),
        peer("persist-queue", persistqueue, _persistqueue_ack_queue, _persistqueue_put, _persistqueue_get_ack),
        peer("litequeue", litequeue, _litequeue, _litequeue_put),
        peer("litequeue", litequeue, _litequeue, _litequeue_put, _litequeue_pop_done),
    ]
    return Scenario(
        key="durable",
        number=10,
        title="Durable publish and consume (issue 5)",
        about=(
            "Messages per second on a file, each system in a fresh temporary directory every round. "
            f"**{PUBLISH}**: one message per call, committed before the call returns: mqlite "
            '`Broker(path)` (default `commit="each"`, `synchronous="normal"`, a `retention="limits"` '
            'queue that keeps every message) `publish`, and the same with `synchronous="full"`; '
            "persist-queue `SQLiteQueue(auto_commit=True).put`; litequeue `put`; raw sqlite3, one INSERT "
            "per autocommit (WAL, `synchronous=NORMAL`). persist-queue leaves SQLite's default "
            "`synchronous=FULL` (an fsync per commit, which also survives power loss); litequeue and raw "
            f"sqlite3 use WAL with NORMAL, as mqlite does by default. **{BATCHED}**: mqlite "
            f'`commit="batch"` `publish` one at a time then `flush()` (group commit by the writer thread); '
            f"mqlite `Queue.publish_many` in chunks of {BATCH:,} on a default broker; raw sqlite3 "
            f"`executemany` in transactions of {BATCH:,}. **{CONSUME}**: over messages published "
            'beforehand, a named `ack="manual"` subscription takes one message with `get` and acks it '
            '(default broker; and `commit="batch"` with `flush()` at the end), or takes up to 100 with '
            "`poll(100)` and acks them with one `ack(*batch)`, one commit; persist-queue "
            "`SQLiteAckQueue` `get` + `ack`; litequeue `pop` + `done`. The peers, "
            '`synchronous="full"` included, run fewer messages per round: the rate is per message either way.'
        ),
        units={PUBLISH: "msgs/s", BATCHED: "msgs/s", CONSUME: "msgs/s"},
        cases=cases,
        targets=[
            Target("durable publish: mqlite >= 5x persist-queue", PUBLISH, ">=", 5, (PUBLISH, "persist-queue")),
            Target(
                'batched publish: mqlite commit="batch" >= 0.5x sqlite3 executemany',
                BATCHED,
                ">=",
                0.5,
                (BATCHED, f"sqlite3 executemany ({BATCH:,})"),
                'mqlite commit="batch"',
            ),
            Target(
                'durable get + ack: mqlite (commit="each") >= 50x persist-queue',
                CONSUME,
                ">=",
                50,
                (CONSUME, "persist-queue"),
            ),
            Target(
                "durable consume + batch ack: mqlite poll(100) + ack(*batch) >= 50x persist-queue",
                CONSUME,
                ">=",
                50,
                (CONSUME, "persist-queue"),
                "mqlite poll(100) + ack(*batch)",
            ),
        ],
        params={
            "messages (mqlite, sqlite3)": n,
            "batched messages": n_batched,
            'messages (peers, mqlite synchronous="full")': n_slow,
        },
    )
