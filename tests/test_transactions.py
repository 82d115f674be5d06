"""Transactions (``broker.transaction()``) and ``mqlite.transform``: all or none, checked at each call.

Most tests run on three storages: ``memory``, ``file`` (a shared file, ``commit="each"``: one
SQLite transaction from the transaction's first call) and ``batch`` (``commit="batch"``: the
queues' locks, with the writer paused while the transaction applies). The crash tests run a
child (``tests/transaction_processes.py``) that the parent kills with SIGKILL.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import mqlite
from mqlite.testing.model import ReferenceModel
from tests import transaction_processes
from tests.helpers import WAIT, Worker, offsets, payloads, pull_all, run_machine_on_redis, wait_for

spawn = multiprocessing.get_context("spawn")

KINDS = ("memory", "file", "batch", "redis")
CHILD = Path(transaction_processes.__file__)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mqlite.__file__).parent.parent), *sys.path])}


class Boom(Exception):
    """What a test raises inside a transaction's block."""


class Storage:
    """Where a test's brokers live: memory, a shared file, a batched file or a Redis server (a
    namespace of its own). Closes them at teardown."""

    def __init__(self, kind: str, folder: Path, redis_url: str = "") -> None:
        self.kind = kind
        self.folder = folder
        self.redis_url = redis_url
        self.namespace = f"tx{uuid.uuid4().hex[:12]}"
        self.brokers: list[mqlite.Broker] = []

    @property
    def on_file(self) -> bool:
        """Whether what the brokers write outlives them (a file, or Redis)."""
        return self.kind != "memory"

    def path(self, name: str = "tx") -> Path:
        return self.folder / f"{name}.mqlite"

    def open(self, name: str = "tx", **kwargs: Any) -> mqlite.Broker:
        """A broker on this storage; on a file, ``name`` picks the file (the same name, the same file)."""
        if self.kind == "memory":
            broker = mqlite.Broker(**kwargs)
        elif self.kind == "redis":
            broker = mqlite.Broker(self.redis_url, namespace=f"{self.namespace}-{name}", **kwargs)
        else:
            broker = mqlite.Broker(self.path(name), commit="batch" if self.kind == "batch" else "each", **kwargs)
        self.brokers.append(broker)
        return broker

    def reopen(self, broker: mqlite.Broker, name: str = "tx") -> mqlite.Broker:
        """Close ``broker`` and open its file again (on a file only)."""
        assert self.on_file
        broker.close()
        return self.open(name)


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""  # skips without a server
    where = Storage(request.param, tmp_path, url)
    yield where
    for broker in where.brokers:
        broker.close()


ON_FILES = pytest.mark.parametrize("storage", ["file", "batch"], indirect=True)
MEMORY_AND_FILE = pytest.mark.parametrize("storage", ["memory", "file"], indirect=True)


@pytest.fixture
def workers() -> Iterator[Callable[[Callable[[], Any]], Worker]]:
    """``start(target)`` runs ``target`` on a :class:`Worker`; every one is joined at teardown."""
    started: list[Worker] = []

    def start(target: Callable[[], Any]) -> Worker:
        worker = Worker(target)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.thread.join(WAIT)
    assert not any(worker.thread.is_alive() for worker in started), "a thread of the test never ended"


def _blocked_on_a_held_queue(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits in mqlite for a queue (or file) that a transaction holds.

    A queue a transaction holds has a guard as its lock (``locking._Held.acquire``); on a shared
    file another thread's operation backs off and waits in ``SqliteStore.wait_owned``; on Redis a
    publish polls the held queue in ``Transacting._publishing``, a transaction's in ``RedisScope.hold``.
    """
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        code = frame.f_code
        waiting = code.co_name in ("acquire", "wait_owned", "_publishing", "hold")
        if waiting and f"{os.sep}mqlite{os.sep}engine" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def _invoices(broker: mqlite.Broker, queue: str = "invoices") -> list[tuple[int, Any]]:
    """(offset, payload) of every message ``queue`` keeps, read by a subscription of its own."""
    with broker.subscribe(queue, start="earliest") as reader:
        return [(m.offset, m.payload) for m in pull_all(reader)]


def _pending(broker: mqlite.Broker, queue: str, name: str) -> list[tuple[int, str, int]]:
    """(offset, state, attempts) of each pending message of the durable subscription ``name``."""
    return [(p.message.offset, p.state, p.attempts) for p in broker.pending_messages(queue, name)]


def _queue_info(broker: mqlite.Broker, name: str) -> mqlite.QueueInfo:
    return next(q for q in broker.info().queues if q.name == name)


def _sub_info(broker: mqlite.Broker, queue: str, name: str) -> mqlite.SubscriptionInfo:
    return next(s for s in broker.info().subscriptions if (s.queue, s.name) == (queue, name))


def _limits(broker: mqlite.Broker, *queues: str) -> None:
    """Make ``queues`` keep every message, so that a test can read them all back."""
    for queue in queues:
        broker.queue(queue, retention="limits")


def _discard(broker: mqlite.Broker, body: Callable[[mqlite.Transaction], object]) -> None:
    """Run ``body`` in a transaction whose block then raises: the transaction is discarded."""

    def run() -> None:
        with broker.transaction() as tx:
            body(tx)
            raise Boom

    with pytest.raises(Boom):
        run()


class Scene:
    """Orders taken by a manual subscription, ready to be settled by a transaction.

    ``orders`` (subscription ``workers``, manual) has 4 orders, of which ``taken`` are the
    first 3 (delivered, pending, out); ``others`` is another manual subscription of ``orders``
    that took nothing; ``auto`` an auto-ack one that took order 0; ``invoice`` a message of
    ``invoices`` taken by ``billing``; ``full`` a queue of at most one message, which it holds,
    that refuses more (``overflow="reject"``).
    """

    def __init__(self, broker: mqlite.Broker) -> None:
        self.broker = broker
        _limits(broker, "orders", "invoices", "receipts")
        self.orders = broker.subscribe("orders", name="workers", ack="manual")
        self.others = broker.subscribe("orders", name="others", ack="manual")
        self.auto = broker.subscribe("orders", name="auto")
        self.billing = broker.subscribe("invoices", name="billing", ack="manual")
        for order in range(4):
            broker.publish("orders", "order", order)
        self.taken = self.orders.poll(3, timeout=0)
        assert payloads(self.taken) == [0, 1, 2]
        auto = self.auto.get(timeout=0)
        assert auto is not None
        self.auto_taken = auto
        broker.publish("invoices", "invoice", "old")
        invoice = self.billing.get(timeout=0)
        assert invoice is not None
        self.invoice = invoice
        self.full = broker.queue("full", retention="limits", max_messages=1, overflow="reject")
        self.full.publish("e", "only")

    def state(self) -> tuple[object, ...]:
        """What a transaction may change, without timestamps."""
        broker = self.broker
        return (
            _invoices(broker, "invoices"),
            _invoices(broker, "receipts"),
            self.full.end_offset,
            _pending(broker, "orders", "workers"),
            _pending(broker, "orders", "others"),
            _pending(broker, "invoices", "billing"),
        )


# -- 1. a commit applies everything ----------------------------------------------------------------


def test_a_committed_transaction_applies_its_publishes_acks_and_nacks_on_every_queue(storage: Storage) -> None:
    broker = storage.open()
    scene = Scene(broker)
    taken = scene.taken
    invoices = broker.subscribe("invoices", name="audit", ack="manual")
    receipts = broker.subscribe("receipts", name="audit", ack="manual")
    with broker.transaction() as tx:
        first = tx.publish("invoices", "invoice", {"order": 0}, key="k0", headers={"trace": "t0"})
        receipt = tx.publish("receipts", "receipt", 0)
        second = tx.publish("invoices", "invoice", {"order": 1})
        tx.ack(scene.orders, taken[0])
        tx.nack(scene.orders, taken[1])
        tx.ack(scene.billing, scene.invoice)
    # The offsets handed out inside the block are the ones the messages got.
    assert (first.queue, first.offset, second.offset, receipt.queue, receipt.offset) == (
        "invoices",
        1,
        2,
        "receipts",
        0,
    )
    assert (first.key, dict(first.headers), first.event) == ("k0", {"trace": "t0"}, "invoice")
    assert invoices.poll(10, timeout=0) == [first, second]
    assert receipts.poll(10, timeout=0) == [receipt]
    assert _pending(broker, "orders", "workers") == [(1, "ready", 1), (2, "out", 1)]
    assert _pending(broker, "invoices", "billing") == []
    workers = _sub_info(broker, "orders", "workers")
    assert (workers.acked, workers.pending, workers.redelivered) == (1, 2, 0)
    assert [(q.name, q.end_offset) for q in broker.info().queues if q.name in ("invoices", "receipts")] == [
        ("invoices", 3),
        ("receipts", 1),
    ]
    again = scene.orders.poll(10, timeout=0)
    assert offsets(again) == [1, 3], "the nacked order comes again, then the unread one; the acked one never"
    with pytest.raises(mqlite.NotPending):
        scene.orders.ack(taken[0])
    assert _sub_info(broker, "orders", "workers").redelivered == 1


@ON_FILES
def test_a_committed_transaction_is_on_the_file_after_reopening(storage: Storage) -> None:
    broker = storage.open()
    scene = Scene(broker)
    with broker.transaction() as tx:
        invoice = tx.publish("invoices", "invoice", "new")
        receipt = tx.publish("receipts", "receipt", "new")
        tx.ack(scene.orders, scene.taken[0])
        tx.nack(scene.orders, scene.taken[1], delay=3600)
    broker = storage.reopen(broker)
    assert _invoices(broker, "invoices") == [(0, "old"), (invoice.offset, "new")]
    assert _invoices(broker, "receipts") == [(receipt.offset, "new")]
    # Order 1 waits out its nack delay; 2 was out with the closed broker and is ready again.
    assert [(offset, state) for offset, state, _ in _pending(broker, "orders", "workers")] == [
        (1, "waiting"),
        (2, "ready"),
    ]


def test_a_transactional_nack_past_max_deliveries_dead_letters_only_once_committed(storage: Storage) -> None:
    broker = storage.open()
    sub = broker.subscribe("orders", name="workers", ack="manual", max_deliveries=1)
    dead = broker.subscribe("orders.dead-letter", name="dead")
    broker.publish("orders", "order", "poison")
    message = sub.get(timeout=0)
    assert message is not None
    _discard(broker, lambda tx: tx.nack(sub, message))
    assert dead.poll(10, timeout=0) == []
    assert sub.pending == 1
    with broker.transaction() as tx:
        tx.nack(sub, message)
        tx.publish("audit", "nacked", message.offset)
    assert payloads(dead.poll(10, timeout=0)) == ["poison"]
    assert sub.pending == 0
    assert _sub_info(broker, "orders", "workers").dead_lettered == 1


# -- 2. an exception applies nothing --------------------------------------------------------------


def test_an_exception_in_the_block_applies_nothing_and_the_broker_goes_on(storage: Storage) -> None:
    broker = storage.open()
    scene = Scene(broker)
    before = scene.state()

    def everything(tx: mqlite.Transaction) -> None:
        tx.publish("invoices", "invoice", "lost")
        tx.publish("receipts", "receipt", "lost")
        tx.publish("brand-new", "e", "lost")
        tx.ack(scene.orders, scene.taken[0])
        tx.nack(scene.orders, scene.taken[1])
        tx.ack(scene.billing, scene.invoice)

    _discard(broker, everything)
    assert scene.state() == before
    assert offsets(scene.orders.poll(10, timeout=0)) == [3], "the nacked order is still out, not redelivered"
    if storage.on_file:
        broker = storage.reopen(broker)
        assert _invoices(broker, "invoices") == [(0, "old")]
        assert _invoices(broker, "receipts") == []
        assert [o for o, _, _ in _pending(broker, "orders", "workers")] == [0, 1, 2, 3], "none acked on the file"
        workers = broker.subscribe("orders", name="workers", ack="manual")
        billing = broker.subscribe("invoices", name="billing", ack="manual")
    else:
        workers, billing = scene.orders, scene.billing
    # The broker goes on: the offsets the discarded publishes would have had are free again.
    assert broker.publish("invoices", "invoice", "plain").offset == 1
    assert broker.publish("brand-new", "e", "plain").offset == 0
    with broker.transaction() as tx:
        assert tx.publish("receipts", "receipt", "kept").offset == 0
        tx.ack(workers, 0)
        tx.ack(billing, 0)
    assert _invoices(broker, "receipts") == [(0, "kept")]
    assert [o for o, _, _ in _pending(broker, "orders", "workers")] == [1, 2, 3]


def test_a_discarded_transaction_that_created_a_queue_leaves_it_usable(storage: Storage) -> None:
    broker = storage.open()
    _discard(broker, lambda tx: tx.publish("fresh", "e", "lost"))
    broker.queue("fresh", retention="limits")
    assert broker.publish("fresh", "e", "kept").offset == 0
    if storage.on_file:
        broker = storage.reopen(broker)
    assert _invoices(broker, "fresh") == [(0, "kept")]


# -- 3. checks at the call --------------------------------------------------------------------------


def _raise_at(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as error:  # noqa: BLE001  # the test compares it with the plain call's
        return error
    raise AssertionError("the call was accepted")


# name -> (the call through tx, the same plain call): each must raise, the same way.
REFUSED: dict[str, tuple[Callable[[mqlite.Transaction, Scene], object], Callable[[Scene], object]]] = {
    "ack of a message never delivered": (
        lambda tx, s: tx.ack(s.orders, 3),
        lambda s: s.orders.ack(3),
    ),
    "ack of a message another subscription took": (
        lambda tx, s: tx.ack(s.others, s.taken[0]),
        lambda s: s.others.ack(s.taken[0]),
    ),
    "ack of a message of another queue": (
        lambda tx, s: tx.ack(s.orders, s.invoice),
        lambda s: s.orders.ack(s.invoice),
    ),
    "ack of pending and not pending together": (
        lambda tx, s: tx.ack(s.orders, s.taken[1], 3),
        lambda s: s.orders.ack(s.taken[1], 3),
    ),
    "ack of one message twice in one call": (
        lambda tx, s: tx.ack(s.orders, s.taken[1], s.taken[1]),
        lambda s: s.orders.ack(s.taken[1], s.taken[1]),
    ),
    "ack on an auto-ack subscription": (
        lambda tx, s: tx.ack(s.auto, s.auto_taken),
        lambda s: s.auto.ack(s.auto_taken),
    ),
    "nack on an auto-ack subscription": (
        lambda tx, s: tx.nack(s.auto, s.auto_taken),
        lambda s: s.auto.nack(s.auto_taken),
    ),
    "nack of a message never delivered": (
        lambda tx, s: tx.nack(s.orders, 3),
        lambda s: s.orders.nack(3),
    ),
    "nack with a negative delay": (
        lambda tx, s: tx.nack(s.orders, s.taken[1], delay=-1),
        lambda s: s.orders.nack(s.taken[1], delay=-1),
    ),
    "nack with a NaN delay": (
        lambda tx, s: tx.nack(s.orders, s.taken[1], delay=float("nan")),
        lambda s: s.orders.nack(s.taken[1], delay=float("nan")),
    ),
    "nack with a delay that is no number": (
        lambda tx, s: tx.nack(s.orders, s.taken[1], delay="1"),  # type: ignore[arg-type]  # the point
        lambda s: s.orders.nack(s.taken[1], delay="1"),  # type: ignore[arg-type]  # the point
    ),
    "publish with an empty event name": (
        lambda tx, s: tx.publish("invoices", "", 1),
        lambda s: s.broker.publish("invoices", "", 1),
    ),
    "publish with an event that is no str": (
        lambda tx, s: tx.publish("invoices", 7, 1),  # type: ignore[arg-type]  # the point
        lambda s: s.broker.publish("invoices", 7, 1),  # type: ignore[arg-type]  # the point
    ),
    "publish to a queue with a bad name": (
        lambda tx, s: tx.publish("", "invoice", 1),
        lambda s: s.broker.publish("", "invoice", 1),
    ),
    "publish with headers that are no mapping": (
        lambda tx, s: tx.publish("invoices", "invoice", 1, headers=[("a", "1")]),  # type: ignore[arg-type]  # the point
        lambda s: s.broker.publish("invoices", "invoice", 1, headers=[("a", "1")]),  # type: ignore[arg-type]  # the point
    ),
    "publish with a header name that is no str": (
        lambda tx, s: tx.publish("invoices", "invoice", 1, headers={1: "a"}),  # type: ignore[dict-item]  # the point
        lambda s: s.broker.publish("invoices", "invoice", 1, headers={1: "a"}),  # type: ignore[dict-item]  # the point
    ),
    "publish with a dedup id that is no str": (
        lambda tx, s: tx.publish("invoices", "invoice", 1, dedup_id=5),  # type: ignore[arg-type]  # the point
        lambda s: s.broker.publish("invoices", "invoice", 1, dedup_id=5),  # type: ignore[arg-type]  # the point
    ),
    "publish with an empty dedup id": (
        lambda tx, s: tx.publish("invoices", "invoice", 1, dedup_id=""),
        lambda s: s.broker.publish("invoices", "invoice", 1, dedup_id=""),
    ),
    "publish to a full queue that rejects": (
        lambda tx, s: tx.publish("full", "e", "more"),
        lambda s: s.full.publish("e", "more"),
    ),
}


def _good_calls(tx: mqlite.Transaction, scene: Scene) -> None:
    """The rest of the transaction, around the refused call."""
    tx.ack(scene.orders, scene.taken[0])
    tx.publish("receipts", "receipt", "after")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_call_refused_in_a_transaction_raises_as_the_plain_call_stages_nothing_and_the_rest_commits(
    storage: Storage, case: str
) -> None:
    in_tx, plain = REFUSED[case]
    broker = storage.open()
    scene = Scene(broker)
    with broker.transaction() as tx:
        before = tx.publish("invoices", "invoice", "before")
        refused = _raise_at(lambda: in_tx(tx, scene))
        _good_calls(tx, scene)
        after = tx.publish("invoices", "invoice", "after")
    assert isinstance(refused, mqlite.MqliteError), refused
    assert after.offset == before.offset + 1, "the refused call took no offset"
    got = scene.state()
    # The same transaction without the refused call, on a broker of its own.
    twin = Scene(storage.open("twin"))
    with twin.broker.transaction() as tx:
        tx.publish("invoices", "invoice", "before")
        _good_calls(tx, twin)
        tx.publish("invoices", "invoice", "after")
    assert got == twin.state()
    plain_error = _raise_at(lambda: plain(scene))
    assert type(refused) is type(plain_error), (refused, plain_error)


@ON_FILES
def test_an_unencodable_payload_raises_in_the_transaction_on_a_file(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    with broker.transaction() as tx:
        with pytest.raises(mqlite.SerializationError):
            tx.publish("invoices", "invoice", object())
        kept = tx.publish("invoices", "invoice", "kept")
    assert kept.offset == 0
    broker = storage.reopen(broker)
    assert _invoices(broker) == [(0, "kept")]


@pytest.mark.parametrize(("first", "second"), [("ack", "ack"), ("ack", "nack"), ("nack", "ack"), ("nack", "nack")])
@pytest.mark.parametrize("by", ["message", "offset"])
def test_settling_one_message_twice_in_a_transaction_raises_not_pending_and_keeps_the_first(
    storage: Storage, first: str, second: str, by: str
) -> None:
    broker = storage.open()
    scene = Scene(broker)
    message = scene.taken[0]

    def settle(tx: mqlite.Transaction, verb: str, what: mqlite.Message | int) -> None:
        (tx.ack if verb == "ack" else tx.nack)(scene.orders, what)

    with broker.transaction() as tx:
        settle(tx, first, message)
        with pytest.raises(mqlite.NotPending):
            settle(tx, second, message if by == "message" else message.offset)
    pending = [offset for offset, _, _ in _pending(broker, "orders", "workers")]
    if first == "ack":
        assert pending == [1, 2]
    else:
        assert pending == [0, 1, 2]
        assert offsets(scene.orders.poll(10, timeout=0)) == [0, 3], "nacked once, delivered again once"
        assert _pending(broker, "orders", "workers")[0] == (0, "out", 2)


def test_a_dedup_id_published_before_or_staged_earlier_returns_the_first_and_stages_nothing(
    storage: Storage,
) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    original = broker.publish("invoices", "invoice", "first", dedup_id="inv-1")
    with broker.transaction() as tx:
        again = tx.publish("invoices", "invoice", "retry", dedup_id="inv-1")
        staged = tx.publish("invoices", "invoice", "second", dedup_id="inv-2")
        staged_again = tx.publish("invoices", "invoice", "second retry", dedup_id="inv-2")
        plain = tx.publish("invoices", "invoice", "third")
    assert again == original
    assert staged_again == staged
    assert (staged.offset, plain.offset) == (1, 2)
    assert _invoices(broker) == [(0, "first"), (1, "second"), (2, "third")]
    assert _queue_info(broker, "invoices").duplicates == 2
    # The id staged in the transaction is in the window once it committed, on the file too.
    if storage.on_file:
        broker = storage.reopen(broker)
    assert broker.publish("invoices", "invoice", "late retry", dedup_id="inv-2").offset == 1
    assert broker.queue("invoices").end_offset == 3


def test_a_dedup_id_staged_in_a_discarded_transaction_is_not_remembered(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    _discard(broker, lambda tx: tx.publish("invoices", "invoice", "lost", dedup_id="inv-1"))
    assert broker.publish("invoices", "invoice", "kept", dedup_id="inv-1").offset == 0
    assert _invoices(broker) == [(0, "kept")]
    assert _queue_info(broker, "invoices").duplicates == 0


def test_a_transaction_refuses_what_is_no_subscription_and_an_ack_of_nothing(storage: Storage) -> None:
    broker = storage.open()
    scene = Scene(broker)
    other = storage.open("other")
    elsewhere = other.subscribe("orders", name="workers", ack="manual")
    before = scene.state()
    with broker.transaction() as tx:
        with pytest.raises(mqlite.InvalidArgument):
            tx.ack("workers", scene.taken[0])  # type: ignore[arg-type]  # the point
        with pytest.raises(mqlite.InvalidArgument):
            tx.ack(scene.orders)
        with pytest.raises(mqlite.InvalidArgument):
            tx.ack(elsewhere, scene.taken[0])  # a subscription of another broker
    assert scene.state() == before


# -- 4. misuse ---------------------------------------------------------------------------------------


def test_a_transaction_inside_another_in_one_thread_is_refused_and_the_outer_one_goes_on(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    other = storage.open("other")
    with broker.transaction() as tx:
        tx.publish("invoices", "invoice", "outer")
        with pytest.raises(mqlite.TransactionError, match="nest"), broker.transaction() as inner:
            inner.publish("invoices", "invoice", "inner")
        with pytest.raises(mqlite.TransactionError, match="nest"), other.transaction() as inner:
            inner.publish("invoices", "invoice", "inner, another broker")
        tx.publish("invoices", "invoice", "outer again")
    assert _invoices(broker) == [(0, "outer"), (1, "outer again")]
    assert other.queue("invoices").end_offset == 0


def test_a_transaction_used_after_its_block_is_refused_and_changes_nothing(storage: Storage) -> None:
    broker = storage.open()
    scene = Scene(broker)
    with broker.transaction() as tx:
        tx.publish("receipts", "receipt", "inside")
    before = scene.state()
    with pytest.raises(mqlite.TransactionError, match="after its with block"):
        tx.publish("invoices", "invoice", "late")
    with pytest.raises(mqlite.TransactionError, match="after its with block"):
        tx.ack(scene.orders, scene.taken[0])
    with pytest.raises(mqlite.TransactionError, match="after its with block"):
        tx.nack(scene.orders, scene.taken[0])
    assert scene.state() == before
    # ... also after a block that raised.
    with pytest.raises(Boom), broker.transaction() as failed:
        raise Boom
    with pytest.raises(mqlite.TransactionError, match="after its with block"):
        failed.publish("invoices", "invoice", "late")
    assert scene.state() == before


def test_a_transaction_used_before_its_block_or_entered_twice_is_refused(storage: Storage) -> None:
    broker = storage.open()
    scene = Scene(broker)
    before = scene.state()
    tx = broker.transaction()
    with pytest.raises(mqlite.TransactionError, match="before its with block"):
        tx.publish("invoices", "invoice", "early")
    with pytest.raises(mqlite.TransactionError, match="before its with block"):
        tx.ack(scene.orders, scene.taken[0])
    assert scene.state() == before
    with tx:
        tx.publish("receipts", "receipt", "once")
    with pytest.raises(mqlite.TransactionError, match="used once"), tx:
        tx.publish("receipts", "receipt", "twice")
    assert _invoices(broker, "receipts") == [(0, "once")]
    # Entering it inside its own block is refused too, and the block goes on.
    tx = broker.transaction()
    with tx:
        with pytest.raises(mqlite.TransactionError), tx:
            pass
        tx.publish("receipts", "receipt", "still open")
    assert _invoices(broker, "receipts") == [(0, "once"), (1, "still open")]


def test_a_transaction_used_from_another_thread_is_refused_and_changes_nothing(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    broker = storage.open()
    scene = Scene(broker)
    before = scene.state()
    with broker.transaction() as tx:
        tx.publish("receipts", "receipt", "mine")
        for call in (
            lambda: tx.publish("invoices", "invoice", "from elsewhere"),
            lambda: tx.ack(scene.orders, scene.taken[0]),
            lambda: tx.nack(scene.orders, scene.taken[0]),
        ):
            with pytest.raises(mqlite.TransactionError, match="another thread"):
                workers(call).join(WAIT)
    invoices, receipts, *rest = scene.state()
    assert (invoices, rest) == (before[0], list(before[2:]))
    assert receipts == [(0, "mine")]


def _plain_calls(scene: Scene) -> dict[str, Callable[[], object]]:
    """Plain calls on the queues a transaction touched (orders and invoices), by name."""
    broker = scene.broker
    return {
        "broker.publish": lambda: broker.publish("invoices", "invoice", "plain"),
        "queue.publish": lambda: broker.queue("invoices").publish("invoice", "plain"),
        "queue.publish_many": lambda: broker.queue("invoices").publish_many([("invoice", "plain")]),
        "sub.get": lambda: scene.orders.get(timeout=WAIT),
        "sub.poll": lambda: scene.orders.poll(10, timeout=WAIT),
        "sub.ack": lambda: scene.orders.ack(scene.taken[1]),
        "sub.nack": lambda: scene.orders.nack(scene.taken[1]),
        "another sub.get on the queue": lambda: scene.others.get(timeout=WAIT),
    }


PLAIN_PUBLISHES = ["broker.publish", "queue.publish", "queue.publish_many"]
PLAIN_CONSUMING = ["sub.get", "sub.poll", "sub.ack", "sub.nack", "another sub.get on the queue"]


@pytest.mark.parametrize("call", PLAIN_PUBLISHES + PLAIN_CONSUMING)
def test_a_plain_call_on_a_queue_the_transaction_touched_raises_at_once_and_changes_nothing(
    storage: Storage, call: str
) -> None:
    if storage.kind == "redis" and call in PLAIN_CONSUMING:
        pytest.skip("on Redis a transaction holds only the queues it publishes to (the next test)")
    broker = storage.open()
    scene = Scene(broker)
    plain = _plain_calls(scene)[call]
    started = time.monotonic()
    with broker.transaction() as tx:
        tx.publish("invoices", "invoice", "staged")
        tx.ack(scene.orders, scene.taken[0])
        with pytest.raises(mqlite.TransactionError, match="through the transaction"):
            plain()
        tx.publish("receipts", "receipt", "after")
    assert time.monotonic() - started < WAIT, "the plain call waited instead of raising"
    assert _invoices(broker, "invoices") == [(0, "old"), (1, "staged")]
    assert _invoices(broker, "receipts") == [(0, "after")]
    assert [(o, state) for o, state, _ in _pending(broker, "orders", "workers")] == [(1, "out"), (2, "out")]
    assert _pending(broker, "orders", "others") == []


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
def test_in_memory_a_plain_call_on_a_queue_the_transaction_did_not_touch_works_at_once(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices", "elsewhere")

    def with_a_plain_publish(tx: mqlite.Transaction) -> None:
        tx.publish("invoices", "invoice", "staged")
        assert broker.publish("elsewhere", "e", "plain").offset == 0
        assert _invoices(broker, "elsewhere") == [(0, "plain")], "not part of the transaction"

    _discard(broker, with_a_plain_publish)
    assert _invoices(broker, "elsewhere") == [(0, "plain")], "kept: it was no part of the transaction"
    assert _invoices(broker, "invoices") == []


@pytest.mark.parametrize("storage", ["file"], indirect=True)
def test_on_a_shared_file_any_queue_operation_of_the_thread_inside_the_block_raises(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices", "elsewhere")
    elsewhere = broker.subscribe("elsewhere", name="reader")
    with broker.transaction() as tx:
        # Before its first call the transaction holds nothing: plain calls still work.
        assert broker.publish("elsewhere", "e", "before").offset == 0
        tx.publish("invoices", "invoice", "staged")
        with pytest.raises(mqlite.TransactionError):
            broker.publish("elsewhere", "e", "plain")
        with pytest.raises(mqlite.TransactionError):
            elsewhere.get(timeout=WAIT)
    assert _invoices(broker, "elsewhere") == [(0, "before")]
    assert _invoices(broker, "invoices") == [(0, "staged")]
    assert payloads(elsewhere.poll(10, timeout=0)) == ["before"]


def test_closing_the_broker_inside_the_block_is_refused_and_the_transaction_commits(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    with broker.transaction() as tx:
        tx.publish("invoices", "invoice", "staged")
        with pytest.raises(mqlite.TransactionError, match="close"):
            broker.close()
        assert not broker.closed
        tx.publish("invoices", "invoice", "after")
    assert _invoices(broker) == [(0, "staged"), (1, "after")]
    broker.close()
    with pytest.raises(mqlite.BrokerClosed), broker.transaction():
        pass


@pytest.mark.parametrize("storage", ["redis"], indirect=True)
def test_on_redis_consuming_calls_inside_the_block_work_and_the_commit_checks_the_acks_again(
    storage: Storage,
) -> None:
    broker = storage.open()
    scene = Scene(broker)
    with broker.transaction() as tx:
        tx.publish("invoices", "invoice", "staged")
        tx.ack(scene.orders, scene.taken[0])
        # Nothing waits: a transaction on Redis holds only the queues it publishes to.
        assert payloads(scene.orders.poll(10, timeout=0)) == [3]
        scene.orders.ack(scene.taken[1])
        assert scene.others.get(timeout=0) is not None
    assert _invoices(broker, "invoices") == [(0, "old"), (1, "staged")]
    assert [o for o, _, _ in _pending(broker, "orders", "workers")] == [2, 3]

    # A plain ack of a message the transaction acks, in the block, is seen by the commit's checks.
    def with_a_plain_ack_of_the_same_message() -> None:
        with broker.transaction() as tx:
            tx.publish("invoices", "invoice", "lost")
            tx.ack(scene.orders, scene.taken[2])
            scene.orders.ack(scene.taken[2])

    with pytest.raises(mqlite.NotPending, match="nothing was applied"):
        with_a_plain_ack_of_the_same_message()
    assert _invoices(broker, "invoices") == [(0, "old"), (1, "staged")], "the commit applied nothing"
    assert broker.publish("invoices", "invoice", "plain").offset == 2, "and let go of the queue"


def test_every_engine_says_it_has_transactions(storage: Storage) -> None:
    assert storage.open()._engine.capabilities.transactions is True


# -- 5. isolation ----------------------------------------------------------------------------------


def test_another_thread_reading_a_held_queue_waits_for_the_commit_and_then_sees_all_of_it(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    if storage.kind == "redis":
        pytest.skip("on Redis a reader does not wait; it sees none of the block until the commit (the next test)")
    broker = storage.open()
    scene = Scene(broker)
    audit = broker.subscribe("invoices", name="audit")
    with broker.transaction() as tx:
        first = tx.publish("invoices", "invoice", "first")
        tx.ack(scene.orders, scene.taken[0])
        reader = workers(lambda: (payloads(audit.poll(10, timeout=0)), scene.orders.pending))
        assert reader.started.wait(WAIT)
        wait_for(lambda: _blocked_on_a_held_queue(reader.thread))
        # Still inside: the reader has seen nothing, and what is staged after it began is in too.
        second = tx.publish("invoices", "invoice", "second")
        tx.nack(scene.orders, scene.taken[1])
    assert reader.join(WAIT) == (["first", "second"], 2)
    assert (first.offset, second.offset) == (1, 2)


@pytest.mark.parametrize("storage", ["redis"], indirect=True)
def test_on_redis_another_thread_reading_sees_none_of_the_block_and_then_all_of_it(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    broker = storage.open()
    scene = Scene(broker)
    audit = broker.subscribe("invoices", name="audit")
    with broker.transaction() as tx:
        tx.publish("invoices", "invoice", "first")
        tx.ack(scene.orders, scene.taken[0])
        during = workers(lambda: (payloads(audit.poll(10, timeout=0)), scene.orders.pending))
        assert during.join(WAIT) == ([], 3)
        tx.publish("invoices", "invoice", "second")
        tx.nack(scene.orders, scene.taken[1])
    after = workers(lambda: (payloads(audit.poll(10, timeout=0)), scene.orders.pending))
    assert after.join(WAIT) == (["first", "second"], 2)


def test_another_thread_publishing_to_a_held_queue_waits_and_gets_the_offset_after_the_transaction(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    broker.publish("invoices", "invoice", "before")
    with broker.transaction() as tx:
        first = tx.publish("invoices", "invoice", "tx 1")
        publisher = workers(lambda: broker.publish("invoices", "invoice", "other"))
        assert publisher.started.wait(WAIT)
        wait_for(lambda: _blocked_on_a_held_queue(publisher.thread))
        second = tx.publish("invoices", "invoice", "tx 2")
    other = publisher.join(WAIT)
    assert (first.offset, second.offset, other.offset) == (1, 2, 3)
    assert _invoices(broker) == [(0, "before"), (1, "tx 1"), (2, "tx 2"), (3, "other")]


def test_offsets_from_transactions_stay_right_while_other_threads_publish_to_the_same_queue(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    broker = storage.open()
    _limits(broker, "invoices", "receipts")
    stop = threading.Event()

    def publish_until_stopped(who: int) -> int:
        count = 0
        deadline = time.monotonic() + WAIT * 4
        while not stop.is_set() and time.monotonic() < deadline:
            broker.publish("invoices", "invoice", ["plain", who, count])
            count += 1
        return count

    publishers = [workers(lambda who=who: publish_until_stopped(who)) for who in range(3)]  # type: ignore[misc]  # a default binds the loop variable
    returned: list[mqlite.Message] = []
    try:
        for number in range(60):
            with broker.transaction() as tx:
                returned.extend(tx.publish("invoices", "invoice", ["tx", number, part]) for part in range(3))
                tx.publish("receipts", "receipt", number)
    finally:
        stop.set()
    counts = [publisher.join(WAIT * 5) for publisher in publishers]
    stored = dict(_invoices(broker))
    assert len(stored) == 180 + sum(counts)
    for message in returned:
        assert stored[message.offset] == message.payload, f"a transaction's message is not at its offset {message}"
    for number in range(60):
        at = [m.offset for m in returned if m.payload[1] == number]
        assert at == [at[0], at[0] + 1, at[0] + 2], "a transaction's publishes are appended together"
    assert sum(counts) > 0, "the publishers ran"


@pytest.mark.parametrize("storage", ["redis"], indirect=True)
def test_on_redis_a_younger_transaction_holding_nothing_waits_for_the_older_one_and_publishes_after_it(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    younger_began = threading.Event()

    def younger() -> list[int]:
        with broker.transaction() as tx:
            younger_began.set()
            return [tx.publish("invoices", "invoice", "younger").offset]

    with broker.transaction() as tx:  # older: begun first
        first = tx.publish("invoices", "invoice", "older")
        waiter = workers(younger)
        assert younger_began.wait(WAIT)
        wait_for(lambda: _blocked_on_a_held_queue(waiter.thread))
        second = tx.publish("invoices", "invoice", "older again")
    assert waiter.join(WAIT) == [2]
    assert (first.offset, second.offset) == (0, 1)
    assert _invoices(broker) == [(0, "older"), (1, "older again"), (2, "younger")]


@pytest.mark.parametrize("storage", ["redis"], indirect=True)
def test_on_redis_two_transactions_wanting_each_others_queue_do_not_deadlock_the_younger_gives_way(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    broker = storage.open()
    other = storage.open()  # another broker on the same queues: another process, as it were
    _limits(broker, "A", "B")
    older_holds_a, younger_holds_b = threading.Event(), threading.Event()

    def older_transaction() -> list[int]:
        with broker.transaction() as tx:
            a = tx.publish("A", "e", "older")
            older_holds_a.set()
            assert younger_holds_b.wait(WAIT)
            b = tx.publish("B", "e", "older")  # waits: the younger one holds B
            return [a.offset, b.offset]

    older = workers(older_transaction)
    assert older_holds_a.wait(WAIT)

    def younger_transaction() -> None:
        with other.transaction() as tx:  # begun after the older one
            tx.publish("B", "e", "younger")
            younger_holds_b.set()
            wait_for(lambda: _blocked_on_a_held_queue(older.thread))
            tx.publish("A", "e", "younger")  # the older one holds A: waiting could deadlock

    with pytest.raises(mqlite.TransactionConflict, match="older transaction"):
        younger_transaction()
    assert older.join(WAIT) == [0, 0], "the older one went on once the younger one gave way"
    assert _invoices(broker, "A") == [(0, "older")]
    assert _invoices(broker, "B") == [(0, "older")], "nothing of the younger transaction was applied"
    with other.transaction() as tx:  # run again, it commits
        assert (tx.publish("B", "e", "younger").offset, tx.publish("A", "e", "younger").offset) == (1, 1)


@pytest.mark.parametrize("storage", ["redis"], indirect=True)
def test_on_redis_a_hold_whose_release_failed_is_released_by_the_retry(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = storage.open()
    engine = broker._engine
    real = engine.run_on

    def release_fails(script: str, keys: Any, args: Any) -> Any:
        if script == "tx_release":
            raise mqlite.StorageError("the server is gone (planted)")
        return real(script, keys, args)

    monkeypatch.setattr(engine, "run_on", release_fails)
    with pytest.raises(mqlite.StorageError, match="planted"):
        _discard(broker, lambda tx: tx.publish("invoices", "invoice", "lost"))
    meta = broker.queue("invoices")._engine._keys.meta  # type: ignore[attr-defined]  # a RedisQueue's
    assert engine._client.hget(meta, "tx") is not None, "the hold is still there"
    monkeypatch.undo()
    engine.retry_releases()  # what the watcher does once per heartbeat TTL
    assert engine._client.hget(meta, "tx") is None
    assert broker.publish("invoices", "invoice", "plain").offset == 0


# -- transform --------------------------------------------------------------------------------------


def _invoice(tx: mqlite.Transaction, message: mqlite.Message) -> None:
    tx.publish("invoices", "invoice", message.payload)


def test_transform_handles_up_to_max_messages_in_one_transaction_and_returns_how_many(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    sub = broker.subscribe("orders", name="workers", ack="manual")
    assert mqlite.transform(broker, sub, _invoice, timeout=0) == 0
    for order in range(5):
        broker.publish("orders", "order", order)
    assert mqlite.transform(broker, sub, _invoice, timeout=0, max_messages=3) == 3
    assert mqlite.transform(broker, sub, _invoice, timeout=0, max_messages=3) == 2
    assert mqlite.transform(broker, sub, _invoice, timeout=0, max_messages=3) == 0
    assert [payload for _, payload in _invoices(broker)] == [0, 1, 2, 3, 4]
    assert (sub.pending, sub.lag) == (0, 0)


def test_transform_waits_up_to_its_timeout_for_a_message(storage: Storage) -> None:
    broker = storage.open()
    sub = broker.subscribe("orders", name="workers", ack="manual")
    started = time.monotonic()
    assert mqlite.transform(broker, sub, _invoice, timeout=0.05) == 0
    assert time.monotonic() - started >= 0.05


def test_transform_whose_handler_raises_keeps_nothing_nacks_the_batch_and_raises(storage: Storage) -> None:
    broker = storage.open()
    _limits(broker, "invoices")
    sub = broker.subscribe("orders", name="workers", ack="manual")
    for order in range(3):
        broker.publish("orders", "order", order)

    def fail_on_the_second(tx: mqlite.Transaction, message: mqlite.Message) -> None:
        tx.publish("invoices", "invoice", message.payload)
        if message.payload == 1:
            raise Boom

    with pytest.raises(Boom):
        mqlite.transform(broker, sub, fail_on_the_second, timeout=0, max_messages=2)
    assert _invoices(broker) == []
    assert [(o, state, attempts) for o, state, attempts in _pending(broker, "orders", "workers")] == [
        (0, "ready", 1),
        (1, "ready", 1),
    ]
    assert mqlite.transform(broker, sub, _invoice, timeout=0, max_messages=3) == 3
    assert [payload for _, payload in _invoices(broker)] == [0, 1, 2]
    assert (sub.pending, _sub_info(broker, "orders", "workers").redelivered) == (0, 2)


def test_transform_whose_handler_keeps_raising_sends_the_message_to_the_dead_letters(storage: Storage) -> None:
    broker = storage.open()
    sub = broker.subscribe("orders", name="workers", ack="manual", max_deliveries=2)
    dead = broker.subscribe("orders.dead-letter", name="dead")
    broker.publish("orders", "order", "poison")

    def fail(tx: mqlite.Transaction, message: mqlite.Message) -> None:
        tx.publish("invoices", "invoice", message.payload)
        raise Boom

    for _ in range(2):
        with pytest.raises(Boom):
            mqlite.transform(broker, sub, fail, timeout=0)
    assert payloads(dead.poll(10, timeout=0)) == ["poison"]
    assert mqlite.transform(broker, sub, fail, timeout=0) == 0
    assert broker.queue("invoices").end_offset == 0


def test_transform_refuses_an_auto_ack_subscription_and_a_bad_max_messages(storage: Storage) -> None:
    broker = storage.open()
    auto = broker.subscribe("orders", name="auto")
    manual = broker.subscribe("orders", name="workers", ack="manual")
    broker.publish("orders", "order", 0)
    with pytest.raises(mqlite.AckModeError):
        mqlite.transform(broker, auto, _invoice, timeout=0)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(mqlite.InvalidArgument):
            mqlite.transform(broker, manual, _invoice, timeout=0, max_messages=bad)  # type: ignore[arg-type]  # the point
    assert (auto.lag, manual.lag, manual.pending) == (1, 1, 0), "nothing was taken"


# -- 6. concurrency ----------------------------------------------------------------------------------


def _collect(sub: mqlite.Subscription, count: int, timeout: float) -> list[mqlite.Message]:
    """Read ``sub`` until ``count`` messages came, failing after ``timeout`` seconds."""
    got: list[mqlite.Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} of {count} messages came"
        got.extend(sub.poll(count - len(got), timeout=min(remaining, 0.1)))
    return got


def test_transform_threads_on_a_two_stage_pipeline_while_others_publish_make_one_invoice_and_receipt_per_order(
    storage: Storage, workers: Callable[[Callable[[], Any]], Worker]
) -> None:
    orders = 240
    broker = storage.open()
    _limits(broker, "orders", "invoices", "receipts")
    invoice_audit = broker.subscribe("invoices", name="audit")
    receipt_audit = broker.subscribe("receipts", name="audit")
    billing = [broker.subscribe("orders", name="billing", ack="manual") for _ in range(3)]
    shipping = [broker.subscribe("invoices", name="shipping", ack="manual") for _ in range(2)]
    stop = threading.Event()

    def to_invoice(tx: mqlite.Transaction, message: mqlite.Message) -> None:
        tx.publish("invoices", "invoice", message.payload)

    def to_receipt(tx: mqlite.Transaction, message: mqlite.Message) -> None:
        tx.publish("receipts", "receipt", message.payload)

    def run(sub: mqlite.Subscription, handle: Callable[[mqlite.Transaction, mqlite.Message], None]) -> int:
        # invoices -> receipts takes the queues' locks in the other order than orders -> invoices.
        handled = 0
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            handled += mqlite.transform(broker, sub, handle, timeout=0.01, max_messages=2)
        return handled

    def publish(first: int, count: int, in_transactions: bool) -> None:
        for order in range(first, first + count, 2):
            if in_transactions:
                with broker.transaction() as tx:
                    tx.publish("orders", "order", order)
                    tx.publish("orders", "order", order + 1)
            else:
                broker.publish("orders", "order", order)
                broker.publish("orders", "order", order + 1)

    try:
        stages = [workers(lambda sub=sub: run(sub, to_invoice)) for sub in billing]  # type: ignore[misc]  # binds the loop variable
        stages += [workers(lambda sub=sub: run(sub, to_receipt)) for sub in shipping]  # type: ignore[misc]  # binds the loop variable
        publishers = [
            workers(lambda: publish(0, orders // 3, False)),
            workers(lambda: publish(orders // 3, orders // 3, False)),
            workers(lambda: publish(2 * orders // 3, orders // 3, True)),
        ]
        receipts = _collect(receipt_audit, orders, timeout=20)
    finally:
        stop.set()
    for publisher in publishers:
        publisher.join(WAIT)
    handled = [stage.join(WAIT) for stage in stages]
    invoices = pull_all(invoice_audit)
    receipts += pull_all(receipt_audit)
    assert Counter(payloads(invoices)) == Counter(range(orders)), "one invoice per order"
    assert Counter(payloads(receipts)) == Counter(range(orders)), "one receipt per invoice"
    assert sum(handled[:3]) == sum(handled[3:]) == orders
    assert all(sub.pending == 0 for sub in billing + shipping)


def test_transform_processes_sharing_a_file_with_a_publisher_process_make_one_invoice_per_order(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "shared.mqlite")
    orders = 300
    ready = spawn.Barrier(3)
    stop = spawn.Event()
    results = spawn.Queue()
    children: list[Any] = []
    try:
        with mqlite.Broker(path) as broker:
            _limits(broker, "orders", "invoices")
            broker.subscribe("orders", name="workers", ack="manual").close()
            audit = broker.subscribe("invoices", name="audit")
            for _ in range(2):
                children.append(
                    spawn.Process(target=transaction_processes.transform_loop, args=(path, ready, stop, results))
                )
                children[-1].start()
            ready.wait(transaction_processes.DEADLINE)
            publisher = spawn.Process(target=transaction_processes.publish_orders, args=(path, 0, orders // 2))
            publisher.start()
            children.append(publisher)
            with broker.transaction() as tx:  # and the parent publishes half in one transaction
                for order in range(orders // 2, orders):
                    tx.publish("orders", "order", order)
            invoices = _collect(audit, orders, timeout=transaction_processes.DEADLINE)
            stop.set()
            reports = [results.get(timeout=transaction_processes.DEADLINE) for _ in range(2)]
            for child in children:
                child.join(transaction_processes.DEADLINE)
                assert child.exitcode == 0
            invoices += pull_all(audit)
            workers = _sub_info(broker, "orders", "workers")
    finally:
        stop.set()
        for child in children:
            if child.is_alive():
                child.kill()
            child.join(WAIT)
    assert [kind for kind, _ in reports] == ["done", "done"], reports
    assert Counter(payloads(invoices)) == Counter(range(orders)), "one invoice per order"
    assert sum(count for _, count in reports) == orders
    assert (workers.pending, workers.lag) == (0, 0)


# -- 7. exactly once under SIGKILL ------------------------------------------------------------------


class Child:
    """A child script of ``transaction_processes.py``, reporting its steps on stdout, killed by the test."""

    def __init__(self, *arguments: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *arguments], stdout=subprocess.PIPE, text=True, env=ENV
        )
        assert self.read() == "ready", "the child failed to start"

    def read(self) -> str:
        """The next line (the child's own deadline bounds this wait); '' once it ended."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().rstrip("\n")
        if line:
            self.lines.append(line)
        return line

    def read_until(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; it is returned."""
        while True:
            line = self.read()
            assert line, f"the child ended before writing {prefix!r}: {self.lines[-5:]}"
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        """SIGKILL it and read what it wrote before it died."""
        self.proc.send_signal(signal.SIGKILL)
        self.finish()
        assert self.proc.returncode == -signal.SIGKILL, f"the child died before it was killed: {self.lines[-5:]}"

    def finish(self) -> None:
        self.proc.wait(timeout=WAIT * 2)
        assert self.proc.stdout is not None
        self.lines.extend(self.proc.stdout.read().splitlines())  # its writer gone, this read ends

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _killed_pipeline(
    path: Path | str, mode: str, orders: int, rounds: list[int | None]
) -> tuple[Counter[Any], list[Any], int]:
    """Run the ``pipeline`` child in ``mode`` once per round and SIGKILL it: a round ``k`` kills it
    right after the invoice of its ``k``-th order is published (it says ``inside``); a round None
    after a random number of its lines. Then a last child drains what is left.

    Returns the invoices per order, the orders whose child was killed right there, and how many
    orders the killed children acked.
    """
    rng = random.Random(0x7A5)
    with transaction_processes.open_broker(str(path)) as broker:
        _limits(broker, "orders", "invoices")
        broker.subscribe("orders", name="workers", ack="manual").close()
        broker.subscribe("invoices", name="audit").close()
        for order in range(orders):
            broker.publish("orders", "order", order)
    killed_inside: list[Any] = []
    acked = 0
    for hang_at in rounds:
        child = Child("pipeline", str(path), mode, str(-1 if hang_at is None else hang_at), "run")
        try:
            if hang_at is None:
                for _ in range(rng.randint(0, 20)):  # at most 10 orders: enough are left for the rounds after
                    assert child.read(), "the child ended on its own"
            else:
                killed_inside.append(int(child.read_until("inside").split()[1]))
            child.kill()
        finally:
            child.close()
        acked += sum(1 for line in child.lines if line.startswith("done"))
    drainer = Child("pipeline", str(path), mode, "-1", "drain")
    try:
        drainer.read_until("idle")
        drainer.finish()
        assert drainer.proc.returncode == 0
    finally:
        drainer.close()
    with transaction_processes.open_broker(str(path)) as broker:
        invoices = Counter(payloads(pull_all(broker.subscribe("invoices", name="audit"))))
        workers = _sub_info(broker, "orders", "workers")
        assert (workers.pending, workers.lag) == (0, 0), "every order was handled"
    return invoices, killed_inside, acked


@pytest.fixture(params=["file", "redis"])
def pipeline_at(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the SIGKILL pipeline runs: a file, or a Redis namespace (``URL|NAMESPACE``) whose
    brokers' heartbeat is short, so that a killed worker's hold and messages are let go soon."""
    if request.param == "file":
        return str(tmp_path / "pipeline.mqlite")
    url = request.getfixturevalue("redis_url")
    return f"{url}?heartbeat=0.3|pipe{uuid.uuid4().hex[:12]}"


def test_a_transform_pipeline_killed_at_random_and_inside_its_transaction_makes_exactly_one_invoice_per_order(
    pipeline_at: str,
) -> None:
    rng = random.Random(0xFEED)
    rounds: list[int | None] = [None] * 16 + [rng.randint(0, 4) for _ in range(8)]
    rng.shuffle(rounds)
    invoices, killed_inside, acked = _killed_pipeline(pipeline_at, "tx", 300, rounds)
    assert len(killed_inside) == 8
    assert acked >= 60, f"the killed workers handled only {acked} orders: the kills came too early"
    duplicated = {order: count for order, count in invoices.items() if count != 1}
    assert not duplicated, f"orders with more than one invoice: {duplicated}"
    assert set(invoices) == set(range(300)), f"orders without an invoice: {set(range(300)) - set(invoices)}"


def test_without_the_transaction_the_same_pipeline_killed_between_publish_and_ack_makes_duplicates(
    pipeline_at: str,
) -> None:
    # The control: it proves the test above would see duplicates if the transaction let them be.
    rounds: list[int | None] = [0, 2, None, 1, None, 3]
    invoices, killed_inside, _ = _killed_pipeline(pipeline_at, "plain", 100, rounds)
    assert set(invoices) == set(range(100)), "at least once: no order is lost"
    assert len(killed_inside) == 4
    for order in killed_inside:
        assert invoices[order] >= 2, f"order {order} was killed between its publish and its ack, yet invoiced once"


# -- 8. all or none under SIGKILL --------------------------------------------------------------------


def _check_all_or_none(path: Path) -> tuple[set[int], dict[int, int]]:
    """For every transaction of the ``triples`` child: its publish to A, its publish to B and its
    ack on C are all on the file, or none is. Returns the transaction numbers on the file and
    the C offset each one acked."""
    with mqlite.Broker(path) as broker:
        a = [m.payload for m in pull_all(broker.subscribe("A", start="earliest"))]
        b = [m.payload for m in pull_all(broker.subscribe("B", start="earliest"))]
        c = _sub_info(broker, "C", "c")
        pending = {offset for offset, _, _ in _pending(broker, "C", "c")}
    numbers = [p["n"] for p in a]
    assert len(set(numbers)) == len(numbers), "a transaction's publish to A is there twice"
    assert a == b, "A and B hold different transactions"
    acked = set(range(c.position)) - pending
    consumed = {p["c"]: p["n"] for p in a}
    assert len(consumed) == len(a), "two transactions acked the same message of C"
    assert set(consumed) == acked, (
        f"acked on C but in no transaction: {sorted(acked - set(consumed))}; "
        f"in a transaction but not acked: {sorted(set(consumed) - acked)}"
    )
    return set(numbers), {n: offset for offset, n in consumed.items()}


@pytest.mark.parametrize("commit", ["each", "batch"])
def test_a_child_killed_at_any_moment_leaves_each_transaction_all_on_the_file_or_none_of_it(
    tmp_path: Path, commit: str
) -> None:
    path = tmp_path / "triples.mqlite"
    rng = random.Random(0xA11 if commit == "each" else 0xB47)
    with mqlite.Broker(path) as broker:
        _limits(broker, "A", "B", "C")
        broker.subscribe("C", name="c", ack="manual").close()
        broker.queue("C").publish_many([("job", i) for i in range(2000)])
    committed: set[int] = set()  # reported committed (and, with commit="batch", flushed)
    hung: set[int] = set()
    rounds = 14
    for round_ in range(rounds):
        first = round_ * 1_000_000
        hang_at = rng.randint(0, 6) if round_ % 3 == 2 else -1
        child = Child("triples", str(path), str(first), str(hang_at), commit)
        try:
            if hang_at >= 0:
                hung.add(int(child.read_until("inside").split()[1]))
            else:
                for _ in range(rng.randint(0, 40)):
                    assert child.read(), "the child ended on its own"
            child.kill()
        finally:
            child.close()
        reported = [int(line.split()[1]) for line in child.lines if line.startswith("C ")]
        if commit == "each":
            committed.update(reported)
        else:
            flushed = [int(line.split()[1]) for line in child.lines if line.startswith("F ")]
            committed.update(n for n in reported if flushed and n <= max(flushed))
        on_file, _ = _check_all_or_none(path)
        assert committed <= on_file, f"round {round_}: committed transactions lost {sorted(committed - on_file)}"
        assert not hung & on_file, f"round {round_}: a transaction killed before its commit is on the file"
    assert len(hung) == rounds // 3
    assert len(committed) >= 40, f"only {len(committed)} transactions committed: the kills came too early"


# -- 9. against the reference model -----------------------------------------------------------------

_STEP = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 1), st.just(0)),
    st.tuples(st.sampled_from(["ack", "nack"]), st.integers(0, 2), st.integers(0, 9)),
)


class TransactionMachine(RuleBasedStateMachine):
    """Two queues and three manual subscriptions (two competing for ``w`` of ``q0``, ``v`` of ``q1``),
    driven by plain publishes and gets and by transactions of drawn steps, against one
    :class:`~mqlite.testing.ReferenceModel` per queue. A committed transaction is one step of
    the model; one that raises in its block is none. Not thread-safe (hypothesis runs it on one thread).
    """

    backend = "memory"
    redis_url = ""  # the server of the redis backend (set by its test, from the session's fixture)
    QUEUES = ("q0", "q1")
    SUBSCRIPTIONS = (("q0", "w"), ("q0", "w"), ("q1", "v"))

    def __init__(self) -> None:
        super().__init__()
        self.folder: Path | None = None
        options: dict[str, Any] = {"clock": mqlite.ManualClock(), "dispatcher": mqlite.ManualDispatcher()}
        if self.backend == "memory":
            self.broker = mqlite.Broker(**options)
        elif self.backend == "redis":
            self.broker = mqlite.Broker(self.redis_url, namespace=f"txm{uuid.uuid4().hex[:12]}", **options)
        else:
            import tempfile

            self.folder = Path(tempfile.mkdtemp(prefix="mqlite-tx-machine-"))
            self.broker = mqlite.Broker(self.folder / "machine.mqlite", **options)
        self.models = {queue: ReferenceModel(retention="limits") for queue in self.QUEUES}
        self.sent: dict[str, list[Any]] = {queue: [] for queue in self.QUEUES}  # payload by offset
        self.subs: list[tuple[str, mqlite.Subscription]] = []
        for queue in self.QUEUES:
            self.broker.queue(queue, retention="limits")
        for queue, name in self.SUBSCRIPTIONS:
            real = self.broker.subscribe(queue, name=name, ack="manual", start="earliest")
            self.models[queue].subscribe(real.id, name=name, events=None, manual=True, start="earliest")
            self.subs.append((queue, real))
        self.payloads = itertools.count()

    def teardown(self) -> None:
        try:
            self.broker.close()
        finally:
            if self.folder is not None:
                import shutil

                shutil.rmtree(self.folder, ignore_errors=True)

    @initialize()
    def nothing_yet(self) -> None:
        pass

    @rule(queue=st.sampled_from(QUEUES), event=st.sampled_from(["a", "b"]))
    def publish(self, queue: str, event: str) -> None:
        payload = next(self.payloads)
        message = self.broker.publish(queue, event, payload)
        assert [message.offset] == self.models[queue].publish([event])
        self.sent[queue].append(payload)

    @rule(which=st.integers(0, 2), many=st.integers(1, 3))
    def poll(self, which: int, many: int) -> None:
        queue, real = self.subs[which]
        got = real.poll(many, timeout=0)
        assert offsets(got) == self.models[queue].take(real.id, many), f"{queue} {real.name} read"
        assert payloads(got) == [self.sent[queue][m.offset] for m in got]

    def _settle_offset(self, model: ReferenceModel, sub_id: int, pick: int, settled: list[int]) -> int:
        """An offset to ack or nack: mostly one the subscription holds; at times one this
        transaction settled already, or any small offset (pending with the other consumer, or not)."""
        held = model.held(sub_id)
        if held and pick < 6:
            return held[pick % len(held)].offset
        if settled and pick >= 8:
            return settled[-1]
        return pick

    @rule(steps=st.lists(_STEP, max_size=6), commit=st.booleans())
    def transaction(self, steps: list[tuple[str, int, int]], commit: bool) -> None:
        staged = copy.deepcopy(self.models)
        sent: dict[str, list[Any]] = {queue: [] for queue in self.QUEUES}
        settled: list[tuple[str, str | None, int]] = []  # what this transaction acked or nacked
        try:
            with self.broker.transaction() as tx:
                for verb, which, pick in steps:
                    if verb == "publish":
                        queue = self.QUEUES[which]
                        payload = next(self.payloads)
                        message = tx.publish(queue, "t", payload)
                        assert [message.offset] == staged[queue].publish(["t"]), "the offset tx.publish returned"
                        sent[queue].append(payload)
                        continue
                    queue, real = self.subs[which]
                    model = staged[queue]
                    offset = self._settle_offset(
                        model, real.id, pick, [o for q, name, o in settled if (q, name) == (queue, real.name)]
                    )
                    key = (queue, real.name, offset)
                    refusal: mqlite.NotPending | None = None
                    if key in settled:
                        refusal = mqlite.NotPending("already settled in this transaction")
                    else:
                        try:
                            (model.ack if verb == "ack" else model.nack)(real.id, offset)
                        except mqlite.NotPending as error:
                            refusal = error
                    call = tx.ack if verb == "ack" else tx.nack
                    if refusal is None:
                        call(real, offset)
                        settled.append(key)
                    else:
                        with pytest.raises(mqlite.NotPending):
                            call(real, offset)
                if not commit:
                    raise Boom
        except Boom:
            pass
        if commit:
            self.models = staged
            for queue, more in sent.items():
                self.sent[queue].extend(more)

    @invariant()
    def queues_and_subscriptions_match_the_model(self) -> None:
        for queue in self.QUEUES:
            assert self.broker.queue(queue).end_offset == self.models[queue].end_offset, f"end_offset of {queue}"
        for queue, real in self.subs:
            cursor = self.models[queue].subs[real.id].cursor
            assert (real.position, real.pending, real.lag) == (
                cursor.position,
                len(cursor.pending),
                self.models[queue].lag(cursor),
            ), f"{queue} {real.name}: (position, pending, lag)"
            pending = {p.message.offset: p.state for p in real.pending_messages()}
            expected = {offset: "out" if e.owner is not None else "ready" for offset, e in cursor.pending.items()}
            assert pending == expected, f"{queue} {real.name}: pending messages and their states"


class FileTransactionMachine(TransactionMachine):
    backend = "file"


class RedisTransactionMachine(TransactionMachine):
    backend = "redis"


TransactionMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FileTransactionMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_transactions_match_the_reference_model = TransactionMachine.TestCase
test_transactions_on_a_file_match_the_reference_model = FileTransactionMachine.TestCase


def test_transactions_on_redis_match_the_reference_model(redis_url: str) -> None:
    run_machine_on_redis(RedisTransactionMachine, redis_url, max_examples=30, steps=25)
