"""Hostile input to every public entry point: a clear mqlite error, nothing changed, the broker still works.

The table below makes each bad call on memory and on a file. For each it checks three things:
the exception's exact class, that its message names the problem (the argument and the value),
and that the broker is as it was (``info()`` shows nothing new) and still works. The tests
after it cover what a table cannot: values that must now *work* (an infinite timeout, edge
datetimes, generators of events), a Message of another broker, calls after ``close()``, and,
in child processes, refused ``Broker(...)`` calls that must leave no thread, file or claim.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import processes
import pytest
from helpers import WAIT, Worker, payloads, pull_all, wait_until_blocked

import mqlite

INF = float("inf")
NAN = float("nan")
HUGE = threading.TIMEOUT_MAX * 4  # past what a lock's acquire accepts
SURROGATE = "w\ud800"  # a lone surrogate: UTF-8 cannot encode it, so no file can store it


# -- what every case checks afterwards ---------------------------------------------------------


def state(broker: mqlite.Broker) -> tuple[Any, ...]:
    """What ``info()`` shows: a refused call must not change it (no phantom queue or cursor)."""
    info = broker.info()
    return info.queues, info.subscriptions


def assert_broker_still_works(broker: mqlite.Broker) -> None:
    """A publish, a get and an ack round trip on a fresh queue and durable cursor."""
    sub = broker.subscribe("check", name="after-error", ack="manual")
    broker.publish("check", "ok", "still working", headers={"h": 1})
    message = sub.get(timeout=WAIT)
    assert message is not None
    assert message.payload == "still working"
    sub.ack(message)
    sub.close()
    assert broker.delete_subscription("check", "after-error")


# -- setups: what a case needs before its bad call ----------------------------------------------


def nothing(broker: mqlite.Broker) -> mqlite.Broker:
    return broker


def a_queue(broker: mqlite.Broker) -> mqlite.Queue:
    queue = broker.queue("q")
    broker.subscribe("q", name="keeper")  # so that "interest" retention keeps what is published
    return queue


def a_pull(broker: mqlite.Broker) -> mqlite.Subscription:
    return broker.subscribe("q", name="puller", events=["a", "b"])


def a_held_message(broker: mqlite.Broker) -> tuple[mqlite.Subscription, mqlite.Message]:
    sub = broker.subscribe("q", name="manual", ack="manual")
    broker.publish("q", "e", "x")
    message = sub.get(timeout=WAIT)
    assert message is not None
    return sub, message


Case = tuple[Callable[[mqlite.Broker], Any], Callable[[mqlite.Broker, Any], object], type[Exception], tuple[str, ...]]
"""(setup, the bad call given the broker and what setup returned, the exact exception class,
words its message must hold)."""

CASES: dict[str, Case] = {
    # -- names the file cannot store: refused on memory too, before anything changes --
    "queue name with a lone surrogate": (
        nothing,
        lambda b, _: b.queue(SURROGATE),
        mqlite.InvalidName,
        ("queue name", repr(SURROGATE)),
    ),
    "publish to a queue name with a lone surrogate": (
        nothing,
        lambda b, _: b.publish(SURROGATE, "e"),
        mqlite.InvalidName,
        ("queue name", repr(SURROGATE)),
    ),
    "subscription name with a lone surrogate": (
        a_queue,
        lambda b, q: b.subscribe("q", name=SURROGATE),
        mqlite.InvalidName,
        ("subscription name", repr(SURROGATE)),
    ),
    "dead_letter name with a lone surrogate": (
        nothing,
        lambda b, _: b.subscribe("q", name="w", dead_letter=SURROGATE),
        mqlite.InvalidName,
        ("dead_letter", repr(SURROGATE)),
    ),
    "event with a lone surrogate": (
        a_queue,
        lambda b, q: q.publish(SURROGATE),
        mqlite.InvalidName,
        ("event", repr(SURROGATE)),
    ),
    "event with a lone surrogate to a new queue": (
        nothing,
        lambda b, _: b.publish("new", SURROGATE),
        mqlite.InvalidName,
        ("event", repr(SURROGATE)),
    ),
    "empty event to a new queue": (nothing, lambda b, _: b.publish("new", ""), mqlite.InvalidName, ("event", "''")),
    "event filter with a lone surrogate": (
        nothing,
        lambda b, _: b.subscribe("q", events=["ok", SURROGATE]),
        mqlite.InvalidName,
        ("event filter", repr(SURROGATE)),
    ),
    "join of an event with a lone surrogate": (
        a_pull,
        lambda b, sub: sub.join(SURROGATE),
        mqlite.InvalidName,
        ("event filter", repr(SURROGATE)),
    ),
    "publish_many with a lone surrogate event": (
        a_queue,
        lambda b, q: q.publish_many([("e", 1), (SURROGATE, 2)]),
        mqlite.InvalidName,
        ("event", repr(SURROGATE)),
    ),
    "delete_subscription of a name with a lone surrogate": (
        nothing,
        lambda b, _: b.delete_subscription("q", SURROGATE),
        mqlite.InvalidName,
        ("subscription name", repr(SURROGATE)),
    ),
    # -- headers that are not a mapping with str names --
    "headers=0": (
        nothing,
        lambda b, _: b.publish("q", "e", headers=0),
        mqlite.InvalidArgument,
        ("headers", "int", "0"),
    ),
    "headers=[]": (nothing, lambda b, _: b.publish("q", "e", headers=[]), mqlite.InvalidArgument, ("headers", "list")),
    "headers as a str": (
        a_queue,
        lambda b, q: q.publish("e", headers="trace=1"),
        mqlite.InvalidArgument,
        ("headers", "'trace=1'"),
    ),
    "headers with an int name": (
        a_queue,
        lambda b, q: q.publish("e", headers={1: "one"}),
        mqlite.InvalidArgument,
        ("headers names must be str", "1"),
    ),
    "headers with an int name to a new queue": (
        nothing,
        lambda b, _: b.publish("new", "e", headers={1: "one"}),
        mqlite.InvalidArgument,
        ("headers names must be str", "1"),
    ),
    "publish_many tuple with headers=0": (
        a_queue,
        lambda b, q: q.publish_many([("e", 1), ("e", 2, None, 0)]),
        mqlite.InvalidArgument,
        ("headers", "0"),
    ),
    "publish_many mapping with headers=[]": (
        a_queue,
        lambda b, q: q.publish_many([{"event": "e", "headers": []}]),
        mqlite.InvalidArgument,
        ("headers", "list"),
    ),
    "publish_many of a non-iterable": (
        a_queue,
        lambda b, q: q.publish_many(5),
        mqlite.InvalidArgument,
        ("publish_many", "iterable", "5"),
    ),
    "a Message built with headers=0": (
        nothing,
        lambda b, _: mqlite.Message("q", "e", None, 0, 0.0, headers=0),
        mqlite.InvalidArgument,
        ("headers", "0"),
    ),
    # -- events: any iterable, checked as a whole before the filter changes --
    "events that are not iterable": (
        nothing,
        lambda b, _: b.subscribe("q", name="w", events=5),
        mqlite.InvalidName,
        ("events", "iterable", "5"),
    ),
    "join of a non-iterable": (a_pull, lambda b, sub: sub.join(5), mqlite.InvalidName, ("join() events", "5")),
    "leave of a non-iterable": (a_pull, lambda b, sub: sub.leave(5), mqlite.InvalidName, ("leave() events", "5")),
    "join of nothing": (a_pull, lambda b, sub: sub.join([]), mqlite.InvalidName, ("join() events", "at least one")),
    "leave of nothing": (a_pull, lambda b, sub: sub.leave([]), mqlite.InvalidName, ("leave() events", "at least one")),
    "join of a generator with a bad item": (
        a_pull,
        lambda b, sub: sub.join(e for e in ["c", 7]),
        mqlite.InvalidName,
        ("non-empty str", "7"),
    ),
    "leave of a generator with an unknown name": (
        a_pull,
        lambda b, sub: sub.leave(e for e in ["a", "zzz"]),
        mqlite.InvalidName,
        ("not in this subscription's filter", "zzz"),
    ),
    # -- start and seek --
    "start as a date, not a datetime": (
        nothing,
        lambda b, _: b.subscribe("q", name="w", start=date(2024, 1, 1)),
        mqlite.InvalidArgument,
        ("start=", "datetime.date(2024, 1, 1)"),
    ),
    "start=''": (  # None is the queue's default start; an empty str is no position
        nothing,
        lambda b, _: b.subscribe("q", name="w", start=""),
        mqlite.InvalidArgument,
        ("start=''",),
    ),
    "negative start on a new queue": (
        nothing,
        lambda b, _: b.subscribe("new", name="w", start=-1),
        mqlite.InvalidArgument,
        ("start=-1", "outside queue"),
    ),
    "start past the end": (
        a_queue,
        lambda b, q: b.subscribe("q", name="w", start=5),
        mqlite.InvalidArgument,
        ("offset 5", "outside queue"),
    ),
    "seek to None": (a_pull, lambda b, sub: sub.seek(None), mqlite.InvalidArgument, ("seek target=None",)),
    "seek to a float": (a_pull, lambda b, sub: sub.seek(1.5), mqlite.InvalidArgument, ("seek target=1.5",)),
    "seek to a negative offset": (a_pull, lambda b, sub: sub.seek(-3), mqlite.InvalidArgument, ("seek target=-3",)),
    # -- timeouts --
    "get with a NaN timeout": (a_pull, lambda b, sub: sub.get(timeout=NAN), mqlite.InvalidArgument, ("timeout", "nan")),
    "get with a bool timeout": (
        a_pull,
        lambda b, sub: sub.get(timeout=True),
        mqlite.InvalidArgument,
        ("timeout", "True"),
    ),
    "poll with a NaN timeout": (
        a_pull,
        lambda b, sub: sub.poll(timeout=NAN),
        mqlite.InvalidArgument,
        ("timeout", "nan"),
    ),
    "drain with a NaN timeout": (
        nothing,
        lambda b, _: b.drain(timeout=NAN),
        mqlite.InvalidArgument,
        ("timeout", "nan"),
    ),
    "flush with a negative timeout": (
        nothing,
        lambda b, _: b.flush(timeout=-1),
        mqlite.InvalidArgument,
        ("timeout", "-1"),
    ),
    "flush with a str timeout": (
        nothing,
        lambda b, _: b.flush(timeout="1"),
        mqlite.InvalidArgument,
        ("timeout", "'1'"),
    ),
    "close with a negative timeout": (
        nothing,
        lambda b, _: b.close(timeout=-1),
        mqlite.InvalidArgument,
        ("timeout", "-1"),
    ),
    "close with a NaN timeout": (
        nothing,
        lambda b, _: b.close(timeout=NAN),
        mqlite.InvalidArgument,
        ("timeout", "nan"),
    ),
    "close with timeout=None": (
        nothing,
        lambda b, _: b.close(timeout=None),
        mqlite.InvalidArgument,
        ("timeout", "None"),
    ),
    # -- delays and ack timeouts: finite, or refused --
    "nack with an infinite delay": (
        a_held_message,
        lambda b, held: held[0].nack(held[1], delay=INF),
        mqlite.InvalidArgument,
        ("delay", "inf"),
    ),
    "nack with a NaN delay": (
        a_held_message,
        lambda b, held: held[0].nack(held[1], delay=NAN),
        mqlite.InvalidArgument,
        ("delay", "nan"),
    ),
    "nack with a delay too large for a float": (
        a_held_message,
        lambda b, held: held[0].nack(held[1], delay=10**400),
        mqlite.InvalidArgument,
        ("delay", "finite"),
    ),
    "nack with a str delay": (
        a_held_message,
        lambda b, held: held[0].nack(held[1], delay="1"),
        mqlite.InvalidArgument,
        ("delay", "'1'"),
    ),
    "infinite ack_timeout": (
        nothing,
        lambda b, _: b.subscribe("q", name="w", ack="manual", ack_timeout=INF),
        mqlite.InvalidArgument,
        ("ack_timeout", "inf"),
    ),
    "NaN ack_timeout": (
        nothing,
        lambda b, _: b.subscribe("q", name="w", ack="manual", ack_timeout=NAN),
        mqlite.InvalidArgument,
        ("ack_timeout", "nan"),
    ),
    "max_age too large for a float": (
        a_queue,
        lambda b, q: b.queue("q", max_age=10**400),
        mqlite.InvalidArgument,
        ("max_age", "float"),
    ),
    # -- Backoff fields --
    "Backoff initial NaN": (
        nothing,
        lambda b, _: mqlite.Backoff(initial=NAN),
        mqlite.InvalidArgument,
        ("initial", "nan"),
    ),
    "Backoff initial infinite": (
        nothing,
        lambda b, _: mqlite.Backoff(initial=INF, maximum=INF),
        mqlite.InvalidArgument,
        ("initial", "inf"),
    ),
    "Backoff initial negative": (
        nothing,
        lambda b, _: mqlite.Backoff(initial=-1),
        mqlite.InvalidArgument,
        ("initial", "-1"),
    ),
    "Backoff initial a str": (
        nothing,
        lambda b, _: mqlite.Backoff(initial="1"),
        mqlite.InvalidArgument,
        ("initial", "'1'"),
    ),
    "Backoff initial a bool": (
        nothing,
        lambda b, _: mqlite.Backoff(initial=True),
        mqlite.InvalidArgument,
        ("initial", "True"),
    ),
    "Backoff factor below 1": (
        nothing,
        lambda b, _: mqlite.Backoff(factor=0.5),
        mqlite.InvalidArgument,
        ("factor", "0.5"),
    ),
    "Backoff factor NaN": (nothing, lambda b, _: mqlite.Backoff(factor=NAN), mqlite.InvalidArgument, ("factor", "nan")),
    "Backoff maximum infinite": (
        nothing,
        lambda b, _: mqlite.Backoff(maximum=INF),
        mqlite.InvalidArgument,
        ("maximum", "inf"),
    ),
    "Backoff maximum below initial": (
        nothing,
        lambda b, _: mqlite.Backoff(initial=5, maximum=1),
        mqlite.InvalidArgument,
        ("maximum >= initial",),
    ),
    # -- ManualClock --
    "advance by NaN": (
        nothing,
        lambda b, _: mqlite.ManualClock().advance(NAN),
        mqlite.InvalidArgument,
        ("advance", "nan"),
    ),
    "advance by infinity": (
        nothing,
        lambda b, _: mqlite.ManualClock().advance(INF),
        mqlite.InvalidArgument,
        ("advance", "inf"),
    ),
    "advance by a negative number": (
        nothing,
        lambda b, _: mqlite.ManualClock().advance(-1),
        mqlite.InvalidArgument,
        ("advance", "-1"),
    ),
    "advance by a bool": (nothing, lambda b, _: mqlite.ManualClock().advance(True), mqlite.InvalidArgument, ("True",)),
    "ManualClock starting at NaN": (
        nothing,
        lambda b, _: mqlite.ManualClock(start=NAN),
        mqlite.InvalidArgument,
        ("start", "nan"),
    ),
    # -- other arguments of public entry points --
    "poll with max_messages=0": (
        a_pull,
        lambda b, sub: sub.poll(max_messages=0),
        mqlite.InvalidArgument,
        ("max_messages", "0"),
    ),
    "configure with a dict": (
        a_queue,
        lambda b, q: q.configure({"max_messages": 1}),
        mqlite.InvalidArgument,
        ("QueueConfig", "max_messages"),
    ),
    "subscribe with loop=a str": (
        nothing,
        lambda b, _: b.subscribe("q", name="w", loop="loop"),
        mqlite.InvalidArgument,
        ("loop", "'loop'"),
    ),
    "ack of a str": (a_held_message, lambda b, held: held[0].ack("0"), mqlite.InvalidArgument, ("ack()", "str")),
    "ack of several with one not pending": (
        a_held_message,
        lambda b, held: held[0].ack(held[1], 99),
        mqlite.NotPending,
        ("offset 99", "not pending"),
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_hostile_call_raises_a_clear_mqlite_error_and_changes_nothing(broker: mqlite.Broker, case: str) -> None:
    setup, call, error, words = CASES[case]
    target = setup(broker)
    before = state(broker)
    with pytest.raises(mqlite.MqliteError) as raised:
        call(broker, target)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {str(raised.value)!r}"
    assert state(broker) == before, "the refused call changed what info() shows"
    assert_broker_still_works(broker)


# -- Broker(...) arguments: refused before anything opens ---------------------------------------


class _NoListeners:
    """Has a clock's time methods but no listener methods and no ``virtual``."""

    def time(self) -> float:
        return 0.0

    def monotonic(self) -> float:
        return 0.0


BAD_BROKERS: dict[str, tuple[Callable[[Path], Any], tuple[str, ...]]] = {
    "clock=object()": (lambda d: mqlite.Broker(d / "b.mqlite", clock=object()), ("clock", "add_listener")),
    "clock without listeners": (
        lambda d: mqlite.Broker(d / "b.mqlite", clock=_NoListeners()),
        ("clock", "add_listener", "virtual"),
    ),
    "memory clock=object()": (lambda d: mqlite.Broker(clock=object()), ("clock", "monotonic")),
    "dispatcher=object()": (lambda d: mqlite.Broker(d / "b.mqlite", dispatcher=object()), ("dispatcher", "run_ready")),
    "memory dispatcher=object()": (lambda d: mqlite.Broker(dispatcher=object()), ("dispatcher", "start")),
    "serializer=object()": (lambda d: mqlite.Broker(d / "b.mqlite", serializer=object()), ("serializer", "dumps")),
    "bad synchronous": (
        lambda d: mqlite.Broker(d / "b.mqlite", synchronous="sometimes"),
        ("synchronous", "'sometimes'"),
    ),
    "memory bad synchronous": (lambda d: mqlite.Broker(synchronous=1), ("synchronous", "1")),
    "bad commit": (lambda d: mqlite.Broker(d / "b.mqlite", commit="never"), ("commit", "'never'")),
    "memory bad commit": (lambda d: mqlite.Broker(commit=[]), ("commit", "[]")),
    "empty path": (lambda d: mqlite.Broker(""), ("path", "''")),
    "path ':memory:'": (lambda d: mqlite.Broker(":memory:"), ("path", "':memory:'", "None")),
    "path with a NUL": (lambda d: mqlite.Broker(str(d / "a\0b.mqlite")), ("path", "NUL")),
    "path with a lone surrogate": (lambda d: mqlite.Broker(str(d / "a\ud800.mqlite")), ("path", "encoded")),
    "path that is a directory": (lambda d: mqlite.Broker(d), ("path", "is a directory")),
    "path as bytes": (lambda d: mqlite.Broker(os.fsencode(d / "b.mqlite")), ("path", "b'")),
    "path as an int": (lambda d: mqlite.Broker(3), ("path", "3")),
}


def _mqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("mqlite")}


@pytest.mark.parametrize("case", list(BAD_BROKERS), ids=list(BAD_BROKERS))
def test_a_bad_broker_argument_is_refused_before_anything_opens(tmp_path: Path, case: str) -> None:
    make, words = BAD_BROKERS[case]
    folder = tmp_path / "d"
    folder.mkdir()
    threads = _mqlite_threads()
    with pytest.raises(mqlite.MqliteError) as raised:
        make(folder)
    assert type(raised.value) is mqlite.InvalidArgument, f"{type(raised.value).__name__}: {raised.value}"
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {str(raised.value)!r}"
    assert list(folder.iterdir()) == [], "a refused broker created a file"
    assert _mqlite_threads() == threads
    with mqlite.Broker(folder / "b.mqlite", commit="batch") as broker:  # a batched broker needs the file to itself
        broker.publish("q", "e", 1)


spawn = multiprocessing.get_context("spawn")


@pytest.mark.parametrize("case", list(processes.BAD_BROKERS))
def test_a_refused_broker_in_a_fresh_process_leaves_no_thread_file_or_claim(tmp_path: Path, case: str) -> None:
    path = str(tmp_path / "b.mqlite")
    results = spawn.Queue()
    child = spawn.Process(target=processes.refused_broker_leaves_nothing, args=(path, case, results), daemon=True)
    child.start()
    try:
        error, message, threads, exists, claims, opened = results.get(timeout=60)
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    assert error == "InvalidArgument", f"{error}: {message}"
    assert case.split()[0] in message
    assert threads == [], f"threads left behind: {threads}"
    assert claims == [], f"claims left behind: {claims}"
    assert exists == (case == "close timeout"), "a refused broker created its file"
    assert opened == "opened"
    assert child.exitcode == 0


# -- infinite and huge timeouts wait; they never raise OverflowError ----------------------------


@pytest.mark.parametrize("timeout", [INF, HUGE, 10**400], ids=["inf", "4 x TIMEOUT_MAX", "10**400"])
def test_get_with_an_endless_timeout_waits_until_a_publish_from_another_thread(
    broker: mqlite.Broker, timeout: float
) -> None:
    sub = broker.subscribe("q")
    reader = Worker(lambda: sub.get(timeout=timeout))
    try:
        wait_until_blocked(broker.queue("q"))
        broker.publish("q", "e", "woken")
    finally:
        message = reader.join()
    assert message.payload == "woken"


def test_poll_with_an_infinite_timeout_waits_until_a_publish(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    reader = Worker(lambda: sub.poll(timeout=INF))
    try:
        wait_until_blocked(broker.queue("q"))
        broker.publish("q", "e", 1)
    finally:
        messages = reader.join()
    assert payloads(messages) == [1]


def test_aget_with_an_infinite_timeout_waits_until_a_publish(broker: mqlite.Broker) -> None:
    async def main() -> mqlite.Message | None:
        sub = broker.subscribe("q")
        publisher = threading.Thread(
            target=lambda: (wait_until_blocked(broker.queue("q")), broker.publish("q", "e", "woken"))
        )
        publisher.start()
        try:
            return await asyncio.wait_for(sub.aget(timeout=INF), WAIT)
        finally:
            publisher.join(WAIT)

    message = asyncio.run(main())
    assert message is not None
    assert message.payload == "woken"


def test_a_redelivery_due_in_a_very_long_time_keeps_a_blocked_get_waiting(broker: mqlite.Broker) -> None:
    # The wait is bounded by the due time (1e300 s away): a wait that long must not overflow.
    sub = broker.subscribe("q", name="w", ack="manual", ack_timeout=1e300)
    broker.publish("q", "e", 1)
    assert sub.get(timeout=WAIT) is not None
    reader = Worker(lambda: sub.get(timeout=INF))
    try:
        wait_until_blocked(broker.queue("q"))
        broker.publish("q", "e", 2)
    finally:
        message = reader.join()
    assert message.payload == 2


def test_drain_flush_and_close_take_an_infinite_timeout(make_broker: Callable[..., mqlite.Broker]) -> None:
    broker = make_broker()
    seen: list[int] = []
    broker.subscribe("q", name="w", callback=lambda m: seen.append(m.payload))
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=INF)
    assert broker.flush(timeout=INF)
    broker.close(timeout=INF)
    assert broker.closed
    assert seen == [1]
    assert not [t for t in _mqlite_threads() if t.name.startswith("mqlite-push-q/w")]


def test_a_batched_flush_takes_an_infinite_timeout(tmp_path: Path) -> None:
    with mqlite.Broker(tmp_path / "b.mqlite", commit="batch") as broker:
        broker.publish("q", "e", 1)
        assert broker.flush(timeout=INF)
        assert broker.flush(timeout=HUGE)


def test_a_push_callback_whose_infinite_nack_is_refused_is_retried_and_drain_finishes(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    calls: list[int] = []
    refused: list[BaseException] = []

    def handle(message: mqlite.Message) -> None:
        calls.append(message.offset)
        if len(calls) == 1:
            try:
                sub.nack(message, delay=INF)
            except mqlite.InvalidArgument as error:
                refused.append(error)
                raise
        sub.ack(message)

    sub = broker.subscribe("q", name="w", ack="manual", callback=handle, backoff=mqlite.Backoff(initial=0))
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=WAIT)
    assert calls == [0, 0]
    assert len(refused) == 1
    broker.publish("q", "e", 2)  # the push worker is alive and well
    assert broker.drain(timeout=WAIT)
    assert calls == [0, 0, 1]


def test_a_push_worker_survives_a_nack_delayed_far_beyond_timeout_max(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    second = threading.Event()

    def handle(message: mqlite.Message) -> None:
        if message.payload == 1:
            sub.nack(message, delay=1e300)  # allowed: finite, but a wait that long cannot be asked of a lock
        else:
            sub.ack(message)
            second.set()

    sub = broker.subscribe("q", name="w", ack="manual", callback=handle)
    broker.publish("q", "e", 1)
    wait_until_blocked(broker.queue("q"))  # the worker waits, bounded by the far-off due time
    broker.publish("q", "e", 2)
    assert second.wait(WAIT), "the push worker died"
    assert sub.pending == 1


def test_backoff_delay_after_very_many_failures_is_the_maximum() -> None:
    assert mqlite.Backoff().delay(5000) == 30.0  # 2.0 ** 4999 overflows a float
    assert mqlite.Backoff(initial=1, factor=1e300, maximum=7).delay(3) == 7.0


def test_manual_clock_refusing_an_advance_keeps_its_time() -> None:
    clock = mqlite.ManualClock(start=100)
    with pytest.raises(mqlite.InvalidArgument):
        clock.advance(NAN)
    clock.advance(1)
    assert clock.time() == 101


# -- a refused close changes nothing -------------------------------------------------------------


@pytest.mark.parametrize("timeout", [-1, NAN, None, "5", True])
def test_a_refused_close_leaves_everything_open(make_broker: Callable[..., mqlite.Broker], timeout: Any) -> None:
    broker = make_broker()
    seen: list[int] = []
    push = broker.subscribe("q", name="push", callback=lambda m: seen.append(m.payload))
    pull = broker.subscribe("q", name="pull")
    with pytest.raises(mqlite.InvalidArgument, match="timeout"):
        broker.close(timeout=timeout)
    assert not broker.closed
    assert not push.closed
    assert not pull.closed
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=WAIT)
    assert seen == [1]
    assert payloads(pull_all(pull)) == [1]
    broker.close(timeout=WAIT)
    assert broker.closed


# -- events: any iterable, generators included ---------------------------------------------------


def test_join_and_leave_take_generators(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events=(e for e in ["a"]))
    assert sub.events == ("a",)
    sub.join(e for e in ["b", "c*"])
    assert sub.events == ("a", "b", "c*")
    sub.leave(e for e in ["a"])
    assert sub.events == ("b", "c*")
    for event in ["a", "b", "cx"]:
        broker.publish("q", event, event)
    assert payloads(pull_all(sub)) == ["b", "cx"]


def test_join_and_leave_take_what_subscribe_takes(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", events="a")
    sub.join({"b": 1, "c": 2}.keys())
    sub.join(frozenset({"d"}))
    sub.join("e")
    assert sub.events == ("a", "b", "c", "d", "e")
    sub.leave({"b", "c"})
    sub.leave(iter(["d"]))
    assert sub.events == ("a", "e")


# -- edge datetimes ------------------------------------------------------------------------------

EARLIEST = {
    "naive datetime.min": datetime.min,
    "aware datetime.min": datetime.min.replace(tzinfo=UTC),
    "datetime.min east of UTC": datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
    "year 1900": datetime(1900, 1, 1),
}
LATEST = {
    "naive datetime.max": datetime.max,
    "aware datetime.max": datetime.max.replace(tzinfo=UTC),
    "datetime.max west of UTC": datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
}


def _two_messages(broker: mqlite.Broker) -> None:
    broker.queue("q", retention="limits")
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)


@pytest.mark.parametrize("start", list(EARLIEST.values()), ids=list(EARLIEST))
def test_a_start_before_every_message_reads_from_the_earliest(broker: mqlite.Broker, start: datetime) -> None:
    _two_messages(broker)
    sub = broker.subscribe("q", name="w", start=start)
    assert payloads(pull_all(sub)) == [0, 1]


@pytest.mark.parametrize("start", list(LATEST.values()), ids=list(LATEST))
def test_a_start_after_every_message_reads_only_new_ones(broker: mqlite.Broker, start: datetime) -> None:
    _two_messages(broker)
    sub = broker.subscribe("q", name="w", start=start)
    broker.publish("q", "e", 2)
    assert payloads(pull_all(sub)) == [2]


@pytest.mark.parametrize("target", [*EARLIEST.values(), *LATEST.values()], ids=[*EARLIEST, *LATEST])
def test_seek_to_an_edge_datetime_goes_to_an_end_of_the_log(broker: mqlite.Broker, target: datetime) -> None:
    _two_messages(broker)
    sub = broker.subscribe("q", name="w", start="earliest")
    expected = 0 if target in EARLIEST.values() else 2
    assert sub.seek(target) == expected
    assert sub.position == expected


# -- a Message of another broker -----------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"h": 1}], ids=["plain", "with headers"])
def test_ack_and_nack_refuse_an_equal_looking_message_of_another_broker(
    make_broker: Callable[..., mqlite.Broker], headers: dict[str, int] | None
) -> None:
    here, there = make_broker(), make_broker()
    sub = here.subscribe("q", name="w", ack="manual")
    here.publish("q", "e", "here", headers=headers)
    foreign = there.publish("q", "e", "there", headers=headers)
    mine = sub.get(timeout=WAIT)
    assert mine is not None
    assert (mine.queue, mine.offset) == (foreign.queue, foreign.offset)
    for refused in (lambda: sub.ack(foreign), lambda: sub.nack(foreign), lambda: sub.ack(mine, foreign)):
        with pytest.raises(mqlite.NotPending, match="another broker"):
            refused()
        assert sub.pending == 1
    sub.ack(mine)
    assert sub.pending == 0


def test_a_message_of_another_queue_is_refused_even_at_a_pending_offset(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="w", ack="manual")
    broker.publish("q", "e", 1)
    other = broker.publish("other", "e", 2)
    assert sub.get(timeout=WAIT) is not None
    with pytest.raises(mqlite.NotPending, match="queue 'other'"):
        sub.ack(other)
    assert sub.pending == 1


def test_a_message_built_by_hand_is_refused_even_at_a_pending_offset(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", name="w", ack="manual")
    mine = broker.publish("q", "e", 1)
    assert sub.get(timeout=WAIT) is not None
    forged = mqlite.Message("q", "e", 1, mine.offset, mine.timestamp)
    assert forged == mine
    for refused in (lambda: sub.ack(forged), lambda: sub.nack(forged)):
        with pytest.raises(mqlite.NotPending, match="another broker"):
            refused()
        assert sub.pending == 1


def test_a_message_of_another_broker_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shared.mqlite"
    with mqlite.Broker(path) as here, mqlite.Broker(path) as there:
        sub = here.subscribe("q", name="w", ack="manual")
        there_sub = there.subscribe("q", name="w2", ack="manual")
        there.publish("q", "e", 1)
        mine = sub.get(timeout=WAIT)
        theirs = there_sub.get(timeout=WAIT)
        assert mine is not None
        assert theirs is not None
        assert mine == theirs
        with pytest.raises(mqlite.NotPending, match="another broker"):
            sub.ack(theirs)
        sub.ack(mine)
        assert sub.pending == 0


def test_a_message_read_back_after_a_restart_can_be_acked(tmp_path: Path) -> None:
    path = tmp_path / "b.mqlite"
    with mqlite.Broker(path) as broker:
        broker.subscribe("q", name="w", ack="manual")
        broker.publish("q", "e", 1, headers={"h": 1})
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("q", name="w", ack="manual")
        message = sub.get(timeout=WAIT)
        assert message is not None
        sub.ack(message)
        assert sub.pending == 0


# -- after close: BrokerClosed or SubscriptionClosed, on every backend -----------------------------

AFTER_CLOSE: dict[str, tuple[Callable[[mqlite.Broker, mqlite.Queue, mqlite.Subscription], object], type[Exception]]] = {
    "publish": (lambda b, q, s: b.publish("q", "e"), mqlite.BrokerClosed),
    "publish to a new queue": (lambda b, q, s: b.publish("new", "e"), mqlite.BrokerClosed),
    "Queue.publish": (lambda b, q, s: q.publish("e"), mqlite.BrokerClosed),
    "publish_many": (lambda b, q, s: q.publish_many([("e", 1)]), mqlite.BrokerClosed),
    "queue() of an existing queue": (lambda b, q, s: b.queue("q"), mqlite.BrokerClosed),
    "queue() with a setting": (lambda b, q, s: b.queue("q", max_messages=5), mqlite.BrokerClosed),
    "configure": (lambda b, q, s: q.configure(mqlite.QueueConfig(retention="limits")), mqlite.BrokerClosed),
    "subscribe": (lambda b, q, s: b.subscribe("q", name="late"), mqlite.BrokerClosed),
    "delete_subscription of a known name": (lambda b, q, s: b.delete_subscription("q", "w"), mqlite.BrokerClosed),
    "delete_subscription of an unknown queue": (lambda b, q, s: b.delete_subscription("zz", "w"), mqlite.BrokerClosed),
    "get": (lambda b, q, s: s.get(timeout=0), mqlite.SubscriptionClosed),
    "poll": (lambda b, q, s: s.poll(), mqlite.SubscriptionClosed),
    "ack": (lambda b, q, s: s.ack(0), mqlite.SubscriptionClosed),
    "nack": (lambda b, q, s: s.nack(0), mqlite.SubscriptionClosed),
    "seek": (lambda b, q, s: s.seek("earliest"), mqlite.SubscriptionClosed),
    "join": (lambda b, q, s: s.join("x"), mqlite.SubscriptionClosed),
    "leave": (lambda b, q, s: s.leave("a"), mqlite.SubscriptionClosed),
    "aget": (lambda b, q, s: asyncio.run(s.aget(timeout=0)), mqlite.SubscriptionClosed),
    "apoll": (lambda b, q, s: asyncio.run(s.apoll()), mqlite.SubscriptionClosed),
}


@pytest.mark.parametrize("case", list(AFTER_CLOSE), ids=list(AFTER_CLOSE))
def test_after_close_every_call_raises_closed(make_broker: Callable[..., mqlite.Broker], case: str) -> None:
    broker = make_broker()
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="w", events=["a", "b"], ack="manual")
    broker.publish("q", "a", 1)
    broker.close()
    before = state(broker)
    call, error = AFTER_CLOSE[case]
    with pytest.raises(mqlite.MqliteError) as raised:
        call(broker, queue, sub)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert "closed" in str(raised.value)
    assert state(broker) == before


def test_aget_on_a_closed_subscription_does_not_bind_it_to_the_loop(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q")
    sub.close()
    with pytest.raises(mqlite.SubscriptionClosed):
        asyncio.run(sub.aget(timeout=0))
    assert sub._loop is None  # type: ignore[attr-defined]  # the binding is the point
