"""Scenario 11 (issue 15): mqlite on Redis against raw redis-py and walrus, on one server in one run.

The scenario starts its own ``redis-server`` (from ``PATH``, a free loopback port, no
persistence), stopped by its PID when the process exits. Every case runs in a child process
(``python -m benchmarks.on_redis CASE URL COUNT PARSER``) that times its own loop and prints
the figures as JSON, so the parser is chosen per case: ``hiredis`` (redis-py's C parser, when
installed) or ``python`` (redis-py's own, hiredis made unimportable in the child). Each child
flushes the database before it exits, so rounds do not grow the server.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks import peers
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, chunks

__all__ = ["redis_scenario"]

PAYLOAD = {"id": 1, "name": "widget"}
BATCH = 100  # publish_many and pipeline size, and the poll / XREADGROUP count
TIMEOUT = 10.0  # a read that waits this long is a bug, not a slow system
CHILD_TIMEOUT = 300.0

PUBLISH = "publish, 1 per call"
BATCHED = f"publish, batches of {BATCH}"
CONSUME = f"take {BATCH} + ack them"
PUBLISH_ACK = "publish 1 + ack 1 (taken before)"

# -- the server, shared by every case of the run ----------------------------------------------

_server_lock = threading.Lock()  # guards _server
_server: dict[str, Any] = {}  # "url" and "process" once started


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _stop_server() -> None:
    with _server_lock:
        process = _server.pop("process", None)
        _server.clear()
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def server_url() -> str:
    """The URL of this run's redis-server, started on first use."""
    with _server_lock:
        if "url" in _server:
            return str(_server["url"])
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH")
        import redis

        port = _free_port()
        directory = tempfile.mkdtemp(prefix="mqlite-bench-redis-")
        process = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
             "--appendonly", "no", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10.0
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {port}") from None
                    try:
                        process.wait(timeout=0.05)  # bounded pause between PINGs; returns early if it died
                    except subprocess.TimeoutExpired:
                        pass
        except BaseException:
            process.kill()
            process.wait(timeout=10)
            raise
        finally:
            client.close()
        _server.update(url=f"redis://127.0.0.1:{port}/0", process=process)
        atexit.register(_stop_server)
        return str(_server["url"])


def _child(case: str, count: int, parser: str) -> Callable[[], Figures]:
    """A harness case that runs ``case`` in a fresh interpreter with the given parser."""

    def run() -> Figures:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.on_redis", case, server_url(), str(count), parser],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{case} ({parser}) failed: {done.stderr.strip().splitlines()[-1:]}")
        figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return figures

    return run


# -- what each child measures ----------------------------------------------------------------


def _rate(count: int, seconds: float) -> float:
    return count / seconds


def _mqlite_publish(url: str, count: int) -> Figures:
    import mqlite

    with mqlite.Broker(url, namespace="bench") as broker:
        broker.queue("q", retention="limits")  # keeps every message, as the raw stream does
        publish = broker.publish
        start = time.perf_counter()
        for _ in range(count):
            publish("q", "e", PAYLOAD)
        return {PUBLISH: _rate(count, time.perf_counter() - start)}


def _mqlite_publish_many(url: str, count: int) -> Figures:
    import mqlite

    pairs = [("e", PAYLOAD)] * BATCH
    with mqlite.Broker(url, namespace="bench") as broker:
        publish_many = broker.queue("q", retention="limits").publish_many
        start = time.perf_counter()
        for size in chunks(count, BATCH):
            publish_many(pairs[:size])
        return {BATCHED: _rate(count, time.perf_counter() - start)}


def _mqlite_consume(url: str, count: int) -> Figures:
    import mqlite

    pairs = [("e", PAYLOAD)] * BATCH
    with mqlite.Broker(url, namespace="bench") as broker:
        sub = broker.subscribe("q", name="workers", ack="manual")
        publish_many = broker.queue("q").publish_many
        for size in chunks(count, BATCH):
            publish_many(pairs[:size])
        poll, ack = sub.poll, sub.ack
        got = 0
        start = time.perf_counter()
        while got < count:
            messages = poll(BATCH, TIMEOUT)
            if not messages:
                raise TimeoutError(f"mqlite poll: got {got} of {count}")
            ack(*messages)
            got += len(messages)
        return {CONSUME: _rate(count, time.perf_counter() - start)}


def _mqlite_settle_loop(url: str, count: int, transaction: bool) -> Figures:
    """Per message taken beforehand: publish its result to ``out`` and ack it, by two calls or in
    one transaction (taking the queue, checking the ack, one commit script: three round trips)."""
    import mqlite

    with mqlite.Broker(url, namespace="bench") as broker:
        broker.queue("out", retention="limits")
        sub = broker.subscribe("q", name="workers", ack="manual")
        publish_many = broker.queue("q").publish_many
        for size in chunks(count, BATCH):
            publish_many([("e", PAYLOAD)] * size)
        taken: list[mqlite.Message] = []
        while len(taken) < count:
            taken += sub.poll(BATCH, TIMEOUT)
        publish, ack = broker.publish, sub.ack
        start = time.perf_counter()
        if transaction:
            for message in taken:
                with broker.transaction() as tx:
                    tx.publish("out", "e", PAYLOAD)
                    tx.ack(sub, message)
        else:
            for message in taken:
                publish("out", "e", PAYLOAD)
                ack(message)
        return {PUBLISH_ACK: _rate(count, time.perf_counter() - start)}


def _fields(offset: int) -> dict[str, Any]:
    """What mqlite stores per message (event, payload, time), so both sides write the same bytes."""
    return {"e": "e", "p": json.dumps(PAYLOAD), "t": repr(time.time())}


def _raw_publish(url: str, count: int) -> Figures:
    import redis

    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    for offset in range(count):
        client.xadd("raw", _fields(offset))
    return {PUBLISH: _rate(count, time.perf_counter() - start)}


def _raw_publish_many(url: str, count: int) -> Figures:
    import redis

    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    offset = 0
    for size in chunks(count, BATCH):
        pipe = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.xadd("raw", _fields(offset))
            offset += 1
        pipe.execute()
    return {BATCHED: _rate(count, time.perf_counter() - start)}


def _raw_consume(url: str, count: int) -> Figures:
    import redis

    client = redis.Redis.from_url(url)
    client.xgroup_create("raw", "workers", id="0", mkstream=True)
    for size in chunks(count, BATCH):
        pipe = client.pipeline(transaction=False)
        for offset in range(size):
            pipe.xadd("raw", _fields(offset))
        pipe.execute()
    got = 0
    start = time.perf_counter()
    while got < count:
        reply = client.xreadgroup("workers", "c", {"raw": ">"}, count=BATCH, block=int(TIMEOUT * 1000))
        if not reply:
            raise TimeoutError(f"XREADGROUP: got {got} of {count}")
        entries = reply[0][1]
        for _id, fields in entries:
            json.loads(fields[b"p"])  # mqlite decodes every payload: so does the floor
        client.xack("raw", "workers", *(entry_id for entry_id, _ in entries))
        got += len(entries)
    return {CONSUME: _rate(count, time.perf_counter() - start)}


def _walrus_publish(url: str, count: int) -> Figures:
    import walrus

    db = walrus.Database.from_url(url)
    stream = db.Stream("walrus")
    start = time.perf_counter()
    for offset in range(count):
        stream.add(_fields(offset))
    return {PUBLISH: _rate(count, time.perf_counter() - start)}


def _walrus_consume(url: str, count: int) -> Figures:
    import walrus

    db = walrus.Database.from_url(url)
    group = db.consumer_group("workers", ["walrus"], consumer="c")
    group.create()
    stream = group.walrus
    for size in chunks(count, BATCH):
        pipe = db.pipeline(transaction=False)
        for offset in range(size):
            pipe.xadd("walrus", _fields(offset))
        pipe.execute()
    got = 0
    start = time.perf_counter()
    while got < count:
        entries = stream.read(count=BATCH, block=int(TIMEOUT * 1000))
        if not entries:
            raise TimeoutError(f"walrus read: got {got} of {count}")
        for _id, fields in entries:
            json.loads(fields[b"p"])
        stream.ack(*(entry_id for entry_id, _ in entries))
        got += len(entries)
    return {CONSUME: _rate(count, time.perf_counter() - start)}


CHILD_CASES: dict[str, Callable[[str, int], Figures]] = {
    "mqlite_publish": _mqlite_publish,
    "mqlite_publish_many": _mqlite_publish_many,
    "mqlite_consume": _mqlite_consume,
    "raw_publish": _raw_publish,
    "raw_publish_many": _raw_publish_many,
    "raw_consume": _raw_consume,
    "walrus_publish": _walrus_publish,
    "walrus_consume": _walrus_consume,
    "mqlite_publish_ack": functools.partial(_mqlite_settle_loop, transaction=False),
    "mqlite_transaction": functools.partial(_mqlite_settle_loop, transaction=True),
}


def _hiredis_installed() -> bool:
    try:
        import hiredis  # noqa: F401  # only checking that it is installed
    except ImportError:
        return False
    return True


def redis_scenario(mode: Mode) -> Scenario:
    """11. mqlite on Redis against raw redis-py (hiredis on and off) and walrus, in child processes."""
    n = {"full": 10_000, "quick": 3_000, "smoke": 30}[mode]
    n_batched = {"full": 50_000, "quick": 10_000, "smoke": 200}[mode]
    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt-get install redis-server)")
    try:
        import redis  # noqa: F401  # only checking that it is installed
    except ImportError:
        missing.append("redis-py (pip install -e '.[redis]')")
    hiredis = _hiredis_installed()

    def variants(system: str, prefix: str) -> list[Case]:
        """The system's three cases with each parser (hiredis ones skipped when it is missing)."""
        cases = []
        for parser, label in (("hiredis", f"{system} + hiredis"), ("python", system)):
            for case, count in (("publish", n), ("publish_many", n_batched), ("consume", n)):
                if parser == "hiredis" and not hiredis:
                    cases.append(Case(label, None, "hiredis is not installed (pip install hiredis)"))
                else:
                    cases.append(Case(label, _child(f"{prefix}_{case}", count, parser)))
        return cases

    cases = [*variants("mqlite", "mqlite"), *variants("redis-py", "raw")]
    for system, case in (("mqlite", "mqlite_publish_ack"), ("mqlite transaction", "mqlite_transaction")):
        cases.append(Case(system, _child(case, n, "hiredis" if hiredis else "python")))
    if peers._optional("walrus") is None:
        cases.append(Case("walrus", None, peers.missing("walrus")))
    else:
        parser = "hiredis" if hiredis else "python"
        cases += [
            Case("walrus", _child("walrus_publish", n, parser)),
            Case("walrus", _child("walrus_consume", n, parser)),
        ]

    def ratio(label: str, figure: str, threshold: float, hiredis_on: bool) -> Target:
        suffix = " + hiredis" if hiredis_on else ""
        return Target(
            f"{label}: mqlite{suffix} >= {threshold}x redis-py{suffix}",
            figure,
            ">=",
            threshold,
            (figure, f"redis-py{suffix}"),
            f"mqlite{suffix}",
        )

    targets = []
    for on in (False, True):
        targets += [
            ratio("one publish per call vs XADD", PUBLISH, 0.7, on),
            ratio(f"publish_many({BATCH}) vs pipelined XADD", BATCHED, 0.7, on),
            ratio(f"poll({BATCH}) + ack(*batch) vs XREADGROUP + XACK", CONSUME, 0.5, on),
        ]
    return Scenario(
        key="redis",
        number=11,
        title="On Redis (issue 15)",
        about=(
            "Messages per second against one redis-server (no persistence) that the run starts, every "
            "case in a child process. **mqlite**: `Broker('redis://…', namespace=…)`, a "
            '`retention="limits"` queue; `publish` one per call, `Queue.publish_many` in batches of '
            f'{BATCH}, a named `ack="manual"` subscription taking `poll({BATCH})` and acking with one '
            f"`ack(*batch)` over messages published beforehand. **redis-py**, the same work by hand: "
            f"`XADD` of the same fields (event, JSON payload, time) one per round trip, {BATCH} `XADD` "
            f"in one non-transactional pipeline, `XREADGROUP COUNT {BATCH}` + `json.loads` of each "
            "payload + one `XACK`. **walrus** (consumer groups): `Stream.add`, and "
            f"`ConsumerGroupStream.read(count={BATCH})` + `ack(*ids)`. `+ hiredis`: the same with "
            "redis-py's C parser; without it, hiredis is unimportable in the child. "
            f"`{PUBLISH_ACK}`: per message taken beforehand, `broker.publish` to another queue and "
            "`sub.ack`, against the same in one `broker.transaction()` (issue 17), with hiredis if "
            "installed; no target, a transaction takes three round trips where the calls take two."
        ),
        units={PUBLISH: "msgs/s", BATCHED: "msgs/s", CONSUME: "msgs/s", PUBLISH_ACK: "msgs/s"},
        cases=cases,
        targets=targets,
        skip="needs " + " and ".join(missing) if missing else "",
        params={"messages": n, "batched messages": n_batched, "batch": BATCH},
    )


def _main(argv: list[str]) -> int:
    case, url, count, parser = argv
    if parser == "python":
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # redis-py then uses its own parser
    import redis
    import redis.utils

    if (parser == "hiredis") != redis.utils.HIREDIS_AVAILABLE:
        raise RuntimeError(f"asked for the {parser} parser, but redis-py's HIREDIS_AVAILABLE is the other way")
    figures = CHILD_CASES[case](url, int(count))
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
