"""Instruction counts per operation, from valgrind's callgrind: repeatable on a noisy machine.

Wall-clock figures on these machines spread by 50% and more; callgrind counts instructions,
which repeat exactly for the same interpreter, code and inputs. Each scenario runs twice, with
``SMALL`` and ``LARGE`` operations after the same set-up, and the difference divided by
``LARGE - SMALL`` is the cost of one operation, with start-up and set-up cancelled out.

Run: ``python -m benchmarks.instructions`` (needs ``valgrind`` on the PATH). One scenario:
``python -m benchmarks.instructions publish``. The child mode (``--run NAME COUNT``) is what
valgrind runs.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

SMALL = 2_000
LARGE = 12_000


def _publish(count: int) -> None:
    import mqlite

    broker = mqlite.Broker()
    broker.subscribe("q", name="idle")  # one idle subscriber, as the publish scenario has
    publish = broker.publish
    for i in range(count):
        publish("q", "e", i)
    broker.close()


def _get(count: int) -> None:
    import mqlite

    broker = mqlite.Broker()
    sub = broker.subscribe("q", name="s")
    for i in range(count):
        broker.publish("q", "e", i)
    get = sub.get
    for _ in range(count):
        get(timeout=0)
    broker.close()


def _get_ack(count: int) -> None:
    import mqlite

    broker = mqlite.Broker()
    sub = broker.subscribe("q", name="s", ack="manual")
    for i in range(count):
        broker.publish("q", "e", i)
    get = sub.get
    ack = sub.ack
    for _ in range(count):
        message = get(timeout=0)
        assert message is not None
        ack(message)
    broker.close()


def _publish_push10(count: int) -> None:
    import mqlite

    dispatcher = mqlite.ManualDispatcher()
    broker = mqlite.Broker(dispatcher=dispatcher)
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for _ in range(10):
        broker.subscribe("q", callback=callback)
    publish = broker.publish
    for i in range(count):
        publish("q", "e", i)
        if i % 100 == 99:
            dispatcher.run_ready()
    dispatcher.run_ready()
    assert seen[0] == 10 * count, seen[0]
    broker.close()


def _drain_push10(count: int) -> None:
    """A test that drains after every publish: one message, ten push subscriptions, one drain."""
    import mqlite

    broker = mqlite.Broker(dispatcher=mqlite.ManualDispatcher())
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for _ in range(10):
        broker.subscribe("q", callback=callback)
    publish = broker.publish
    drain = broker.drain
    for i in range(count):
        publish("q", "e", i)
        drain(timeout=0)
    assert seen[0] == 10 * count, seen[0]
    broker.close()


def _run_ready_push10(count: int) -> None:
    """The delivery a drain after every publish makes, without the drain: one message, ten push
    subscriptions, one ``run_ready`` of the ``ManualDispatcher``."""
    import mqlite

    dispatcher = mqlite.ManualDispatcher()
    broker = mqlite.Broker(dispatcher=dispatcher)
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for _ in range(10):
        broker.subscribe("q", callback=callback)
    publish = broker.publish
    run_ready = dispatcher.run_ready
    for i in range(count):
        publish("q", "e", i)
        run_ready()
    assert seen[0] == 10 * count, seen[0]
    broker.close()


def _drain_push10_idle(count: int) -> None:
    """A drain with nothing to do: ten push subscriptions that have handled everything."""
    import mqlite

    broker = mqlite.Broker(dispatcher=mqlite.ManualDispatcher())
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for _ in range(10):
        broker.subscribe("q", callback=callback)
    broker.publish("q", "e", 0)
    drain = broker.drain
    for _ in range(count):
        drain(timeout=0)
    assert seen[0] == 10, seen[0]
    broker.close()


def _drain_one_of_100_queues(count: int) -> None:
    """A drain after a publish to one of 100 queues, each with one push subscription."""
    import mqlite

    broker = mqlite.Broker(dispatcher=mqlite.ManualDispatcher())
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for i in range(100):
        broker.subscribe(f"q{i}", callback=callback)
    broker.drain(timeout=0)
    publish = broker.publish
    drain = broker.drain
    for i in range(count):
        publish("q0", "e", i)
        drain(timeout=0)
    assert seen[0] == count, seen[0]
    broker.close()


def _drain_one_of_100_filtered(count: int) -> None:
    """A drain after a publish that one of 100 filtered push subscriptions of one queue wants."""
    import mqlite

    broker = mqlite.Broker(dispatcher=mqlite.ManualDispatcher())
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for i in range(100):
        broker.subscribe("q", f"e{i}", callback=callback)
    publish = broker.publish
    drain = broker.drain
    for i in range(count):
        publish("q", "e0", i)
        drain(timeout=0)
    assert seen[0] == count, seen[0]
    broker.close()


def _drain_past_100_pulls(count: int) -> None:
    """A drain after a publish to a queue with one push subscription and 100 pull ones behind."""
    import mqlite

    broker = mqlite.Broker(dispatcher=mqlite.ManualDispatcher())
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    broker.subscribe("q", callback=callback)
    for i in range(100):
        broker.subscribe("q", name=f"puller{i}")
    publish = broker.publish
    drain = broker.drain
    for i in range(count):
        publish("q", "e", i)
        drain(timeout=0)
    assert seen[0] == count, seen[0]
    broker.close()


def _run_until_idle_one_of_100_queues(count: int) -> None:
    """``run_until_idle`` after a publish to one of 100 queues, each with one push subscription."""
    import mqlite
    from mqlite.testing import VirtualClock, run_until_idle

    broker = mqlite.Broker(clock=VirtualClock(), dispatcher=mqlite.ManualDispatcher())
    seen = [0]

    def callback(message: mqlite.Message) -> None:
        seen[0] += 1

    for i in range(100):
        broker.subscribe(f"q{i}", callback=callback)
    publish = broker.publish
    for i in range(count):
        publish("q0", "e", i)
        run_until_idle(broker)
    assert seen[0] == count, seen[0]
    broker.close()


class _Tally:
    """The fanout benchmark's callback: it counts (``benchmarks.fanout.Tally``, without importing it)."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def hit(self, *args: object, **kwargs: object) -> None:
        self.calls += 1


def _publish_push_tally(subscriptions: int, count: int) -> None:
    """The fanout benchmark's work on one thread: ``subscriptions`` push subscriptions whose
    callback is ``Tally.hit``, delivered by a ManualDispatcher every 1,000 publishes (batches
    the size the sustained shape's threads take)."""
    import mqlite

    dispatcher = mqlite.ManualDispatcher()
    broker = mqlite.Broker(dispatcher=dispatcher)
    tallies = [_Tally() for _ in range(subscriptions)]
    for tally in tallies:
        broker.subscribe("q", callback=tally.hit)
    payload = {"id": 1}
    publish = broker.publish
    for i in range(count):
        publish("q", "e", payload)
        if i % 1000 == 999:
            dispatcher.run_ready()
    dispatcher.run_ready()
    assert sum(t.calls for t in tallies) == subscriptions * count
    broker.close()


def _loop(callables: int, count: int) -> None:
    """The fanout floor: a loop over ``callables`` callables, per message (``loop over callables``)."""
    callbacks = [_Tally().hit for _ in range(callables)]
    payload = {"id": 1}
    for _ in range(count):
        for callback in callbacks:
            callback(payload)


def _pyee(receivers: int, count: int) -> None:
    """pyee's ``emit`` to ``receivers`` receivers, per message (the fanout peer)."""
    import pyee

    emitter = pyee.EventEmitter()
    for _ in range(receivers):
        emitter.on("e", _Tally().hit)
    payload = {"id": 1}
    emit = emitter.emit
    for _ in range(count):
        emit("e", payload)


def _same_loop_mqlite(count: int) -> None:
    """The asyncio scenario's same-loop case: a producer task publishes, yielding every 100; ``async for`` reads."""
    import asyncio

    import mqlite

    async def main() -> None:
        with mqlite.Broker() as broker:
            sub = broker.subscribe("q")
            publish = broker.publish

            async def consume() -> int:
                got = 0
                async for _ in sub:
                    got += 1
                    if got == count:
                        break
                return got

            consumer = asyncio.create_task(consume())
            for i in range(count):
                publish("q", "e", i)
                if i % 100 == 0:
                    await asyncio.sleep(0)
            assert await consumer == count

    asyncio.run(main())


def _put_get_on_one_loop(q: Any, count: int) -> None:
    """``q.put_nowait`` yielding to the loop every 100, and a task awaiting ``q.get()`` ``count`` times."""
    import asyncio

    async def main() -> None:
        async def consume() -> int:
            get = q.get
            for _ in range(count):
                await get()
            return count

        consumer = asyncio.create_task(consume())
        put = q.put_nowait
        for i in range(count):
            put(i)
            if i % 100 == 0:
                await asyncio.sleep(0)
        assert await consumer == count

    asyncio.run(main())


def _same_loop_queue(count: int) -> None:
    """The same-loop peer: ``asyncio.Queue`` ``put_nowait`` and ``await get()``, yielding every 100."""
    import asyncio

    _put_get_on_one_loop(asyncio.Queue(), count)


def _put_then_get(q: Any, done: bool, count: int) -> None:
    """``count`` puts to ``q``, then as many ``get(timeout=0)`` (each with ``task_done`` if ``done``)."""
    put = q.put
    for i in range(count):
        put(i)
    get = q.get
    task_done = q.task_done
    for _ in range(count):
        get(timeout=0)
        if done:
            task_done()


def _compat_face(done: bool, count: int) -> None:
    """The compat scenario's thread face on one thread: ``count`` puts, then as many gets (and
    ``task_done`` calls), per item."""
    from mqlite import compat

    with compat.Queue[int]() as q:
        _put_then_get(q, done, count)


def _compat_stdlib(done: bool, count: int) -> None:
    """The thread face's peer, ``queue.Queue``, in the same shape as :func:`_compat_face`."""
    import queue

    _put_then_get(queue.Queue(), done, count)


def _quiet_watcher() -> None:
    """Let a file's watcher thread sleep through the run: it polls and checkpoints by the clock,
    and under valgrind, 50 times slower, its polls would count as the operations' own cost."""
    from mqlite.engine.sqlite import sharing, watcher

    sharing.CHECKPOINT_EVERY = 3600.0
    watcher.WATCH_MIN = watcher.WATCH_MAX = 3600.0


def _compat_file(count: int) -> None:
    """The thread face on a file (``synchronous="normal"``): put, get and ``task_done``, per item."""
    import tempfile
    from pathlib import Path

    import mqlite
    from mqlite import compat

    _quiet_watcher()
    with (
        tempfile.TemporaryDirectory(prefix="mqlite-instructions-") as directory,
        mqlite.Broker(Path(directory) / "q.mqlite") as broker,
        compat.Queue[int](broker=broker, name="jobs") as q,
    ):
        for i in range(count):
            q.put(i)
        for _ in range(count):
            q.get(timeout=0)
            q.task_done()


def _sqlite_floor(count: int) -> None:
    """The file face's floor: sqlite3 alone running the statements the face runs, in the same
    transactions (put: one insert; get: the cursor's position and a pending row; task_done: the
    row deleted), on the file the face makes, per item."""
    import sqlite3
    import tempfile
    from pathlib import Path

    import mqlite
    from mqlite import compat
    from mqlite.engine.sqlite.schema import WAL_AUTOCHECKPOINT
    from mqlite.engine.sqlite.writer import _INSERT

    with tempfile.TemporaryDirectory(prefix="mqlite-instructions-") as directory:
        path = Path(directory) / "q.mqlite"
        with mqlite.Broker(path) as broker, compat.Queue[int](broker=broker, name="jobs"):
            pass  # the schema, the queue and its cursor
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
        position = "UPDATE cursors SET position = ? WHERE queue = ? AND name = ?"
        take = 'INSERT INTO pending (queue, name, "offset", attempts, owner, due, since) VALUES (?, ?, ?, ?, ?, ?, ?)'
        done = 'DELETE FROM pending WHERE queue = ? AND name = ? AND "offset" = ?'
        execute = db.execute
        for i in range(count):
            execute("BEGIN")
            execute(_INSERT, ("jobs", i, "item", b"1", None, None, 1.0))
            execute("COMMIT")
        for i in range(count):
            execute("BEGIN")
            execute(position, (i + 1, "jobs", "compat"))
            execute(take, ("jobs", "compat", i, 1, "me", None, 1.0))
            execute("COMMIT")
            execute("BEGIN")
            execute(done, ("jobs", "compat", i))
            execute("COMMIT")
        db.close()


def _compat_same_loop(count: int) -> None:
    """The compat scenario's same-loop case: ``AsyncQueue.put_nowait`` yielding every 100, ``await get()``."""
    from mqlite import compat

    with compat.AsyncQueue[int]() as q:
        _put_get_on_one_loop(q, count)


# The selective scenario's reads, on a queue of 10 interleaved event types rather than 100: a
# read's instructions do not depend on how far apart its matches lie (its time does, through the
# cache), and filling a queue ten times the size would take minutes under valgrind. Every run
# fills the queue with LARGE matches, so that the set-up is the same at SMALL and LARGE, and
# reads ``count`` of them, 1,000 at a time.
def _selective(events: str | None) -> Any:
    import mqlite

    broker = mqlite.Broker()
    sub = broker.subscribe("q", events=events)
    queue = broker.queue("q")
    pairs = [(f"e{i % 10}", None) for i in range(10_000)]
    for _ in range(LARGE * 10 // 10_000):
        queue.publish_many(pairs)
    return broker, sub


def _poll_selective(count: int) -> None:
    """``poll(1000, 0)`` of a subscription to 1 event type of the queue's 10, per matching message."""
    broker, sub = _selective("e7")
    poll = sub.poll
    got = 0
    while got < count:
        got += len(poll(1000 if count - got > 1000 else count - got, 0))
    broker.close()


def _slice_selective(count: int) -> None:
    """The selective floor: slicing a plain list of the same messages, 1,000 at a time, per message."""
    broker, sub = _selective(None)
    wanted = [m for m in sub.poll(LARGE * 10, 0) if m[0] == "e7"]
    got = 0
    while got < count:
        got += len(wanted[got : got + (1000 if count - got > 1000 else count - got)])
    broker.close()


SCENARIOS: dict[str, Callable[[int], None]] = {
    "publish": _publish,
    "get": _get,
    "get+ack": _get_ack,
    "publish+10 push": _publish_push10,
    "drain 10 push, 1 msg": _drain_push10,
    "run_ready 10 push, 1 msg": _run_ready_push10,
    "drain 10 push, idle": _drain_push10_idle,
    "drain 1 of 100 queues": _drain_one_of_100_queues,
    "drain 1 of 100 filtered push": _drain_one_of_100_filtered,
    "drain past 100 pull subs": _drain_past_100_pulls,
    "run_until_idle 1 of 100 queues": _run_until_idle_one_of_100_queues,
    # The fanout scenario's three systems, per publish, at N = 1, 10 and 100: the floor, the peer,
    # and mqlite's own work on one thread. (Not the thread dispatcher: valgrind runs one thread at
    # a time on its own schedule, so its batch sizes, and the count, differ from run to run.)
    # The asyncio scenario's same-loop case and its peer, per message.
    "same loop": _same_loop_mqlite,
    "asyncio.Queue same loop": _same_loop_queue,
    # The compat scenario on one thread, per item: the thread face and queue.Queue (put+get, and
    # put+get+task_done), the face on a file, and the async face on one loop.
    "compat put+get": functools.partial(_compat_face, False),
    "queue.Queue put+get": functools.partial(_compat_stdlib, False),
    "compat put+get+task_done": functools.partial(_compat_face, True),
    "queue.Queue put+get+task_done": functools.partial(_compat_stdlib, True),
    "compat file put+get+task_done": _compat_file,
    "sqlite3 floor put+get+task_done": _sqlite_floor,
    "compat same loop": _compat_same_loop,
    # The selective scenario, per matching message: mqlite and the floor.
    "poll 1 of 10": _poll_selective,
    "slice 1 of 10": _slice_selective,
    "pyee 1": functools.partial(_pyee, 1),
    "publish+1 push tally": functools.partial(_publish_push_tally, 1),
    "loop 10": functools.partial(_loop, 10),
    "pyee 10": functools.partial(_pyee, 10),
    "publish+10 push tally": functools.partial(_publish_push_tally, 10),
    "loop 100": functools.partial(_loop, 100),
    "pyee 100": functools.partial(_pyee, 100),
    "publish+100 push tally": functools.partial(_publish_push_tally, 100),
}

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _instructions(name: str, count: int) -> int:
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--run",
            name,
            str(count),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        # A fixed hash seed: str hashes, and so dict and set probing, are the same in every run.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    match = _COLLECTED.search(result.stderr)
    if match is None:
        raise RuntimeError(f"callgrind printed no instruction count:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def per_operation(name: str) -> float:
    """Instructions one operation of scenario ``name`` costs."""
    return (_instructions(name, LARGE) - _instructions(name, SMALL)) / (LARGE - SMALL)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--run"]:
        gc.disable()  # the collector's cadence would add noise that has nothing to do with the code
        SCENARIOS[argv[1]](int(argv[2]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    for name in argv or list(SCENARIOS):
        if name.startswith("pyee") and importlib.util.find_spec("pyee") is None:
            print(f"{name:<30} skipped: pyee is not installed (pip install -e '.[bench]')", flush=True)
            continue
        print(f"{name:<30} {per_operation(name):>10,.0f} instructions per operation", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
