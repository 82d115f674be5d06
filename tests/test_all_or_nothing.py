"""Every public operation is all or nothing: it completes, or it raises and leaves everything as it was.

On a file, a wrapper around the store's connection makes the Nth write statement or the Nth
COMMIT of one operation fail; each test then checks that the operation raised StorageError,
that ``info()`` and the file are exactly as before, and that the same call, made again, works
and neither loses nor doubles anything. A child process with a file-size limit runs into a real
full disk. In memory, a call refused half-way through its arguments changes nothing; and a
Broker that fails to open or close leaves nothing behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite import dispatch

WAIT = 5.0
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class FaultyConnection:
    """An sqlite3 connection that fails its Nth write statement, COMMIT or ROLLBACK; otherwise the real one."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        write: int | None = None,
        commit: int | None = None,
        rollback: int | None = None,
    ) -> None:
        self._db = db
        self._fail_write = write
        self._fail_commit = commit
        self._fail_rollback = rollback
        self.writes = 0
        self.commits = 0
        self.rollbacks = 0

    def _check(self, sql: str) -> None:
        word = sql.lstrip().split(None, 1)[0].upper()
        if word in _WRITES:
            self.writes += 1
            if self.writes == self._fail_write:
                raise sqlite3.OperationalError("disk I/O error")
        elif word == "COMMIT":
            self.commits += 1
            if self.commits == self._fail_commit:
                raise sqlite3.OperationalError("disk I/O error")
        elif word == "ROLLBACK":
            self.rollbacks += 1
            if self.rollbacks == self._fail_rollback:
                self._db.execute("ROLLBACK")  # as SQLite does after the errors that make ROLLBACK fail
                raise sqlite3.OperationalError("disk I/O error")

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@contextmanager
def faulty(broker: mqlite.Broker, **fault: int | None) -> Iterator[FaultyConnection]:
    """Run the block with the broker's connection wrapped (see :class:`FaultyConnection`)."""
    store = broker._engine.store  # type: ignore[attr-defined]  # the SQLite engine's open file
    real = store._db
    wrapper = FaultyConnection(real, **fault)
    store._db = wrapper
    try:
        yield wrapper
    finally:
        store._db = real


def file_state(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What the file holds, read on a connection of its own (owners left out: closing changes them)."""
    db = sqlite3.connect(path)
    try:
        return {
            "queues": db.execute("SELECT name, start_offset FROM queues ORDER BY name").fetchall(),
            "messages": db.execute('SELECT queue, "offset", event, payload FROM messages ORDER BY 1, 2').fetchall(),
            "cursors": db.execute("SELECT queue, name, position, settings FROM cursors ORDER BY 1, 2").fetchall(),
            "pending": db.execute(
                'SELECT queue, name, "offset", attempts, owner IS NULL, due FROM pending ORDER BY 1, 2, 3'
            ).fetchall(),
        }
    finally:
        db.close()


def figures(broker: mqlite.Broker) -> Any:
    """``info()`` without the figures that say how a call waits (they are not state)."""
    info = broker.info()
    return (info.queues, info.subscriptions)


@dataclass
class Scenario:
    """A broker on a file, set up so that ``operation`` has something to do; ``check`` looks at its result."""

    broker: mqlite.Broker
    subs: dict[str, mqlite.Subscription]
    operation: Callable[[], Any]
    check: Callable[[Any], None]


def _set_up(path: Path) -> tuple[mqlite.Broker, dict[str, mqlite.Subscription]]:
    broker = mqlite.Broker(path)
    subs = {
        "manual": broker.subscribe("q", name="manual", ack="manual"),
        "auto": broker.subscribe("q", name="auto"),
        "odd": broker.subscribe("q", name="odd", ack="manual", events="odd"),
    }
    broker.queue("q").publish_many([("e", 0), ("odd", 1), ("e", 2), ("odd", 3)])
    return broker, subs


def _publish(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    return Scenario(broker, subs, lambda: broker.publish("q", "e", 4), lambda m: _expect(m.offset, 4))


def _publish_many(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    return Scenario(
        broker,
        subs,
        lambda: broker.queue("q").publish_many([("e", 4), ("new", 5)]),
        lambda ms: _expect([m.offset for m in ms], [4, 5]),
    )


def _get_manual(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    return Scenario(broker, subs, lambda: subs["manual"].get(timeout=WAIT), lambda m: _expect(m.offset, 0))


def _get_auto(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    return Scenario(broker, subs, lambda: subs["auto"].get(timeout=WAIT), lambda m: _expect(m.offset, 0))


def _poll_filtered(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    return Scenario(
        broker, subs, lambda: subs["odd"].poll(10, timeout=WAIT), lambda ms: _expect([m.offset for m in ms], [1, 3])
    )


def _redeliver(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    sub = subs["manual"]
    first = sub.get(timeout=WAIT)
    assert first is not None
    sub.nack(first)
    return Scenario(broker, subs, lambda: sub.poll(2, timeout=WAIT), lambda ms: _expect([m.offset for m in ms], [0, 1]))


def _ack(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    sub = subs["manual"]
    taken = sub.poll(3, timeout=WAIT)
    return Scenario(broker, subs, lambda: sub.ack(taken[0], taken[2]), lambda _: _expect(sub.pending, 1))


def _nack(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    sub = subs["manual"]
    taken = sub.poll(2, timeout=WAIT)
    return Scenario(broker, subs, lambda: sub.nack(taken[1], delay=30.0), lambda _: _expect(sub.pending, 2))


def _nack_now(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    sub = subs["manual"]
    taken = sub.poll(2, timeout=WAIT)

    def check(_: object) -> None:
        again = sub.get(timeout=WAIT)
        assert again is not None
        assert again.offset == taken[0].offset

    return Scenario(broker, subs, lambda: sub.nack(taken[0]), check)


def _seek(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    sub = subs["auto"]
    sub.poll(3, timeout=WAIT)
    return Scenario(broker, subs, lambda: sub.seek(1), lambda position: _expect(position, 1))


def _join(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    sub = subs["odd"]
    return Scenario(broker, subs, lambda: sub.join("e"), lambda _: _expect(sub.events, ("e", "odd")))


def _subscribe(path: Path) -> Scenario:
    broker, subs = _set_up(path)
    return Scenario(
        broker,
        subs,
        lambda: broker.subscribe("q", name="late", start="earliest"),
        lambda sub: _expect(sub.lag, 4),
    )


def _expect(got: object, wanted: object) -> None:
    assert got == wanted


SCENARIOS = {
    "publish": _publish,
    "publish_many": _publish_many,
    "get_manual": _get_manual,
    "get_auto": _get_auto,
    "poll_filtered": _poll_filtered,
    "poll_redelivery": _redeliver,
    "ack": _ack,
    "nack_delay": _nack,
    "nack_now": _nack_now,
    "seek": _seek,
    "join": _join,
    "subscribe": _subscribe,
}
FAULTS = [("write", 1), ("write", 2), ("write", 3), ("commit", 1), ("commit", 2)]


def _points(make: Callable[[Path], Scenario], path: Path) -> tuple[int, int]:
    """How many write statements and commits the scenario's operation makes, on a scratch copy."""
    scenario = make(path)
    try:
        with faulty(scenario.broker) as counter:
            scenario.operation()
        return counter.writes, counter.commits
    finally:
        scenario.broker.close()


@pytest.mark.parametrize(("kind", "n"), FAULTS, ids=[f"{kind}{n}" for kind, n in FAULTS])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_failed_write_changes_nothing_and_the_retry_works(tmp_path: Path, name: str, kind: str, n: int) -> None:
    make = SCENARIOS[name]
    writes, commits = _points(make, tmp_path / "count.mqlite")
    if n > (writes if kind == "write" else commits):
        pytest.skip(f"{name} makes {writes} writes and {commits} commits")
    path = tmp_path / "q.mqlite"
    scenario = make(path)
    broker = scenario.broker
    try:
        before_file = file_state(path)
        before = figures(broker)
        with faulty(broker, **{kind: n}), pytest.raises(mqlite.StorageError):
            scenario.operation()
        assert file_state(path) == before_file
        assert figures(broker) == before
        scenario.check(scenario.operation())
    finally:
        broker.close()
    _reopened_matches(path, name)


def _reopened_matches(path: Path, name: str) -> None:
    """After the retry, a fresh broker sees each message once per name, at its offset."""
    state = file_state(path)
    offsets = [offset for _, offset, _, _ in state["messages"]]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))  # contiguous, none doubled
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="manual", ack="manual")
        seen = [m.offset for m in sub.poll(100, timeout=0)]
        assert len(seen) == len(set(seen))
        if name not in ("ack", "nack_delay"):  # acked, or waiting out a delay: not due
            assert sorted(seen) == list(range(broker.info().queue("q").end_offset))


def test_a_failed_ack_leaves_the_message_pending(tmp_path: Path) -> None:
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        sub = broker.subscribe("q", name="s", ack="manual")
        broker.publish("q", "e", 0)
        message = sub.get(timeout=WAIT)
        assert message is not None
        with faulty(broker, commit=1), pytest.raises(mqlite.StorageError):
            sub.ack(message)
        assert sub.pending == 1
        sub.ack(message)
        assert sub.pending == 0
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        assert broker.subscribe("q", name="s", ack="manual").get(timeout=0) is None


@pytest.mark.parametrize("fault", [{"write": 1}, {"commit": 1}], ids=["write", "commit"])
def test_a_close_that_fails_leaves_the_subscription_open_and_can_be_called_again(
    tmp_path: Path, fault: dict[str, int]
) -> None:
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        sub = broker.subscribe("q", name="s", ack="manual")
        broker.publish("q", "e", 0)
        message = sub.get(timeout=WAIT)
        assert message is not None
        with faulty(broker, **fault), pytest.raises(mqlite.StorageError):
            sub.close()
        assert not sub.closed
        assert sub.pending == 1
        sub.ack(message)  # still open, still holding it
        sub.close()
        assert sub.closed
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        assert broker.subscribe("q", name="s", ack="manual").get(timeout=0) is None


def test_a_get_that_fails_takes_nothing_and_a_later_get_delivers_it(tmp_path: Path) -> None:
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        sub = broker.subscribe("q", name="s")
        broker.publish("q", "e", "hello")
        with faulty(broker, write=1), pytest.raises(mqlite.StorageError):
            sub.get(timeout=WAIT)
        assert sub.position == 0
        message = sub.get(timeout=WAIT)
        assert message is not None
        assert message.payload == "hello"


def test_a_user_exception_being_handled_does_not_count_as_a_failure(tmp_path: Path) -> None:
    with mqlite.Broker(tmp_path / "q.mqlite") as broker:
        sub = broker.subscribe("q", name="s", ack="manual")
        try:
            raise RuntimeError("the user's own")
        except RuntimeError:
            broker.publish("q", "e", 0)
            message = sub.get(timeout=WAIT)
            assert message is not None
            sub.ack(message)
    assert file_state(tmp_path / "q.mqlite")["pending"] == []


def _fill_the_disk(path: str, limit: int, done: Any) -> None:
    """Child: publish until the file-size limit stops a write; report the offsets that returned."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    broker = mqlite.Broker(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    published = []
    error = ""
    try:
        for i in range(100_000):
            published.append(broker.publish("q", "e", "x" * 200 + str(i)).offset)
    except mqlite.StorageError as caught:
        error = str(caught)
    try:
        broker.publish("q", "e", "after")  # the next call fails cleanly too
    except mqlite.StorageError:
        pass
    done.put((published, error))
    try:
        broker.close()
    except mqlite.StorageError:
        pass


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_a_full_disk_keeps_exactly_the_publishes_that_returned(tmp_path: Path) -> None:
    path = tmp_path / "full.mqlite"
    with mqlite.Broker(path) as broker:
        broker.subscribe("q", name="check")  # keeps every message (retention="interest")
        broker.publish("q", "e", "first")
    limit = max(p.stat().st_size for p in tmp_path.iterdir() if p.is_file()) + 64 * 1024
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    child = context.Process(target=_fill_the_disk, args=(str(path), limit, done))
    child.start()
    try:
        published, error = done.get(timeout=60)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    assert error, "the child never filled the disk"
    assert published
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="check")
        offsets = [m.offset for m in sub.poll(200_000, timeout=0)]
    assert offsets == [0, *published]


# -- in memory: a call refused half-way through its arguments changes nothing -----------------


def test_an_ack_with_one_bad_message_acks_none() -> None:
    with mqlite.Broker() as broker:
        sub = broker.subscribe("q", ack="manual")
        broker.queue("q").publish_many([("e", 0), ("e", 1)])
        taken = sub.poll(2, timeout=0)
        with pytest.raises(mqlite.NotPending):
            sub.ack(taken[0], 99, taken[1])
        with pytest.raises(mqlite.InvalidArgument):
            sub.ack(taken[0], "x")  # type: ignore[arg-type]  # the refused argument
        assert sub.pending == 2
        sub.ack(*taken)
        assert sub.pending == 0


def test_publish_many_with_one_bad_item_publishes_none() -> None:
    with mqlite.Broker() as broker:
        queue = broker.queue("q")
        sub = broker.subscribe("q", name="s")
        with pytest.raises(mqlite.InvalidName):
            queue.publish_many([("e", 0), ("", 1), ("e", 2)])
        with pytest.raises(mqlite.InvalidArgument):
            queue.publish_many([("e", 0), ("e", 1, None, 5)])
        assert queue.end_offset == 0
        assert sub.lag == 0
        assert broker.info().queue("q").end_offset == 0
        assert [m.offset for m in queue.publish_many([("e", 0)])] == [0]


def test_a_join_with_a_bad_event_name_changes_nothing() -> None:
    with mqlite.Broker() as broker:
        sub = broker.subscribe("q", events="a")
        with pytest.raises(mqlite.InvalidName):
            sub.join(["b", ""])
        assert sub.events == ("a",)


# -- opening and closing the broker ---------------------------------------------------------


def _mqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("mqlite")}


def test_a_broker_that_fails_to_open_leaves_no_thread_and_no_claim(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    before = _mqlite_threads()

    class BrokenClock(mqlite.SystemClock):
        def add_listener(self, listener: object) -> None:
            raise RuntimeError("this clock fails once the file is open")

    with pytest.raises(RuntimeError, match="once the file is open"):
        mqlite.Broker(path, clock=BrokenClock())
    for thread in _mqlite_threads() - before:
        thread.join(WAIT)
    assert _mqlite_threads() - before == set()
    with mqlite.Broker(path, commit="batch") as broker:  # needs the file to itself
        broker.publish("q", "e", 0)


def test_a_broker_on_a_damaged_file_leaves_no_claim(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    with mqlite.Broker(path) as broker:
        broker.queue("q").publish_many([("e", 0), ("e", 1)])
    db = sqlite3.connect(path)
    db.execute('DELETE FROM messages WHERE "offset" = 0')  # a gap: offsets jump
    db.execute("UPDATE queues SET start_offset = -1")
    db.commit()
    db.close()
    with pytest.raises(mqlite.StorageError):
        mqlite.Broker(path)
    db = sqlite3.connect(path)
    db.execute("UPDATE queues SET start_offset = 1")
    db.commit()
    db.close()
    with mqlite.Broker(path, commit="batch") as broker:
        assert broker.info().queue("q").end_offset == 2


@pytest.mark.parametrize("timeout", [-1, "x", None])
def test_close_with_a_bad_timeout_leaves_the_broker_open(timeout: object) -> None:
    broker = mqlite.Broker()
    try:
        sub = broker.subscribe("q")
        with pytest.raises(mqlite.InvalidArgument):
            broker.close(timeout=timeout)  # type: ignore[arg-type]  # the refused argument
        assert not broker.closed
        broker.publish("q", "e", 0)
        assert sub.get(timeout=WAIT) is not None
    finally:
        broker.close()


def test_a_close_that_fails_part_way_is_finished_by_the_next(tmp_path: Path) -> None:
    path = tmp_path / "q.mqlite"
    broker = mqlite.Broker(path)
    broker.publish("q", "e", 0)
    store = broker._engine.store  # type: ignore[attr-defined]  # the SQLite engine's open file
    real = store._db

    class FailsToClose(FaultyConnection):
        def close(self) -> None:
            store._db = real  # once
            raise sqlite3.OperationalError("disk I/O error")

    store._db = FailsToClose(real)
    with pytest.raises(sqlite3.OperationalError):
        broker.close()
    broker.close()
    with mqlite.Broker(path, commit="batch") as again:  # the claim was released
        assert again.info().queue("q").end_offset == 1


class _LockWatchingHandler(logging.Handler):
    """Records, for each record, whether the queue's lock was free when the handler ran."""

    def __init__(self, lock: Any) -> None:
        super().__init__(logging.WARNING)
        self._lock = lock
        self.seen: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        free = self._lock.acquire(blocking=False)
        if free:
            self._lock.release()
        self.seen.append((record.getMessage(), free))


def test_a_failed_rollback_is_logged_after_the_queue_lock_is_released(tmp_path: Path) -> None:
    broker = mqlite.Broker(tmp_path / "app.mqlite")
    try:
        sub = broker.subscribe("q", name="w", ack="manual")
        broker.publish("q", "e", 0)
        queue_lock = broker._engines["q"]._file_lock.plain  # type: ignore[attr-defined]
        handler = _LockWatchingHandler(queue_lock)
        logger = logging.getLogger("mqlite")
        logger.addHandler(handler)
        try:
            with faulty(broker, write=1, rollback=1), pytest.raises(mqlite.StorageError):
                sub.get(timeout=0)
        finally:
            logger.removeHandler(handler)
        assert [free for message, free in handler.seen if "rolling back" in message] == [True]
        message = sub.get(timeout=WAIT)  # and the failed get took nothing
        assert message is not None
        assert message.offset == 0
    finally:
        broker.close()


def test_a_push_batch_whose_settling_fails_is_settled_again_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "SETTLE_RETRY_FIRST", 0.001)
    path = tmp_path / "push.mqlite"
    seen: list[int] = []
    in_callback = threading.Event()
    go_on = threading.Event()

    def callback(message: mqlite.Message) -> None:
        seen.append(message.offset)
        if message.offset == 0:
            in_callback.set()
            assert go_on.wait(WAIT)

    broker = mqlite.Broker(path)
    try:
        broker.subscribe("q", name="w", callback=callback)
        broker.publish("q", "e", 0)
        assert in_callback.wait(WAIT)
        with faulty(broker, commit=1) as connection:
            go_on.set()  # the callback returns; settling its batch fails once, then is made again
            assert broker.drain(timeout=WAIT)
        assert connection.commits >= 2
        broker.publish("q", "e", 1)  # the worker is still alive
        assert broker.drain(timeout=WAIT)
        assert seen == [0, 1]
    finally:
        go_on.set()
        broker.close()
    with mqlite.Broker(path) as again:  # both settled in the file: nothing comes back
        assert again.subscribe("q", name="w", ack="manual").get(timeout=0) is None
