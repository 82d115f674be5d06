"""The delivery contract as a conformance suite: ``check_engine(open_broker)``.

In the spirit of trio's ``check_two_way_stream``: a storage engine is done when a broker on it
passes this suite unchanged. Each check is a small function that tests one documented behaviour
(docs/concepts.md, docs/guarantees.md, docs/api.md) through the public API only, on brokers it
opens itself and closes in ``finally``.

Checks that involve time use a ``ManualClock`` and ``clock.advance``; push checks use a
``ManualDispatcher`` and ``broker.drain``. Every blocking call has a timeout; nothing sleeps.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import mqlite
from mqlite.testing.waiting import wait_until_blocked

__all__ = ["CHECKS", "WAIT", "BrokerFactory", "Check", "check_engine"]

# Bound for any single blocking call: long enough never to fire on a slow machine, short enough
# that a broken engine fails the check instead of hanging it. Reads that should find a message
# already there use timeout=0, so a broken engine fails fast.
WAIT = 5.0

BrokerFactory: TypeAlias = Callable[..., mqlite.Broker]
"""Opens a broker on the engine under test. Keyword arguments (``clock=``, ``dispatcher=``)
are passed through to the broker. ``mqlite.Broker`` itself is one, for the memory engine."""


class _Brokers:
    """The brokers one check opened, all closed by :meth:`close_all`. Not thread-safe."""

    def __init__(self, open_broker: BrokerFactory, reopen: BrokerFactory | None, shared: BrokerFactory | None) -> None:
        self._open_broker = open_broker
        self._reopen = reopen
        self._shared = shared
        self._opened: list[mqlite.Broker] = []

    def _keep(self, broker: mqlite.Broker) -> mqlite.Broker:
        self._opened.append(broker)
        return broker

    def open(self, **kwargs: Any) -> mqlite.Broker:
        """A fresh broker on new, empty storage."""
        return self._keep(self._open_broker(**kwargs))

    def manual(self) -> tuple[mqlite.Broker, mqlite.ManualClock]:
        """A fresh broker with a ``ManualClock`` and a ``ManualDispatcher``, and its clock."""
        clock = mqlite.ManualClock()
        return self.open(clock=clock, dispatcher=mqlite.ManualDispatcher()), clock

    def reopen(self, **kwargs: Any) -> mqlite.Broker:
        """A broker on the storage of the latest ``open``, once the brokers on it are closed."""
        assert self._reopen is not None, "this check needs reopen="
        return self._keep(self._reopen(**kwargs))

    def shared(self, **kwargs: Any) -> mqlite.Broker:
        """A second broker on the storage of the latest ``open``, while that one stays open."""
        assert self._shared is not None, "this check needs shared="
        return self._keep(self._shared(**kwargs))

    def close_all(self) -> None:
        """Close every broker, the last opened first; re-raise the first error once all are closed."""
        errors: list[Exception] = []
        for broker in reversed(self._opened):
            try:
                broker.close()
            except Exception as error:  # noqa: BLE001  # re-raised below, after closing the rest
                errors.append(error)
        self._opened.clear()
        if errors:
            raise errors[0]


_Needs: TypeAlias = Literal["reopen", "shared"] | None
_CheckFunction: TypeAlias = Callable[[_Brokers], None]


@dataclass(frozen=True)
class Check:
    """One named behaviour of the contract. ``needs`` names the factory it requires, if any."""

    name: str
    run: _CheckFunction
    needs: _Needs = None


CHECKS: list[Check] = []


def _check(needs: _Needs = None) -> Callable[[_CheckFunction], _CheckFunction]:
    """Register the decorated function as a check named after it."""

    def register(function: _CheckFunction) -> _CheckFunction:
        CHECKS.append(Check(function.__name__, function, needs))
        return function

    return register


def check_engine(
    open_broker: BrokerFactory,
    *,
    reopen: BrokerFactory | None = None,
    shared: BrokerFactory | None = None,
    checks: Collection[str] | None = None,
) -> list[str]:
    """Run every check of the delivery contract against brokers from ``open_broker``.

    Args:
        open_broker: ``open_broker(**kwargs)`` opens a broker on fresh, empty storage of the
            engine under test, passing ``kwargs`` (``clock=``, ``dispatcher=``) to the broker.
        reopen: for persistent engines: ``reopen(**kwargs)`` opens a broker again on the
            storage of the latest ``open_broker`` call, after the brokers on it were closed.
            The checks of what survives a restart run only when it is given.
        shared: for engines that several brokers can share: ``shared(**kwargs)`` opens a second
            broker on the storage of the latest ``open_broker`` call while that one is still
            open. The checks of sharing run only when it is given.
        checks: the names of the checks to run (to rerun one that failed); default: all.

    Returns:
        The names of the checks that ran, all of which passed.

    Raises:
        AssertionError: naming every check that failed, with what it raised and where.
        ValueError: ``checks`` names a check that does not exist.
    """
    if checks is not None:
        unknown = set(checks) - {check.name for check in CHECKS}
        if unknown:
            raise ValueError(f"no such checks: {', '.join(sorted(unknown))}")
    ran: list[str] = []
    failures: list[tuple[str, Exception]] = []
    for check in CHECKS:
        if checks is not None and check.name not in checks:
            continue
        if (check.needs == "reopen" and reopen is None) or (check.needs == "shared" and shared is None):
            continue
        ran.append(check.name)
        brokers = _Brokers(open_broker, reopen, shared)
        try:
            try:
                check.run(brokers)
            finally:
                brokers.close_all()
        except Exception as error:  # noqa: BLE001  # every failure is reported, named by its check
            failures.append((check.name, error))
    if failures:
        lines = [f"check_engine: {len(failures)} of {len(ran)} checks failed:"]
        lines += [f"  {name}: {_describe(name, error)}" for name, error in failures]
        raise AssertionError("\n".join(lines)) from failures[0][1]
    return ran


def _describe(name: str, error: Exception) -> str:
    """What ``error`` was and the line of check ``name`` it came from."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if frame.filename == __file__ and frame.name == name]
    if ours:
        text += f" (conformance.py:{ours[-1].lineno}: {ours[-1].line})"
    return text


# -- helpers -------------------------------------------------------------------------------------


def _pull_all(sub: mqlite.Subscription) -> list[mqlite.Message]:
    """Everything the subscription can read right now, without waiting."""
    out: list[mqlite.Message] = []
    while batch := sub.poll(max_messages=1000, timeout=0):
        out.extend(batch)
    return out


def _payloads(messages: list[mqlite.Message]) -> list[Any]:
    return [m.payload for m in messages]


def _offsets(messages: list[mqlite.Message]) -> list[int]:
    return [m.offset for m in messages]


def _one(sub: mqlite.Subscription) -> mqlite.Message:
    """The message that should be there now."""
    message = sub.get(timeout=0)
    assert message is not None, f"expected a message on {sub.queue!r}, got none"
    return message


def _none(sub: mqlite.Subscription) -> None:
    message = sub.get(timeout=0)
    assert message is None, f"expected no message on {sub.queue!r}, got {message!r}"


def _raises(kind: type[Exception], call: Callable[[], object]) -> None:
    try:
        call()
    except kind:
        return
    except Exception as error:
        raise AssertionError(f"expected {kind.__name__}, got {type(error).__name__}: {error}") from error
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


@contextmanager
def _in_thread(target: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """Run ``target`` on a thread; the yielded function joins it and returns what it returned."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(target())
        except BaseException as error:  # noqa: BLE001  # handed back by join()
            errors.append(error)

    thread = threading.Thread(target=body, name="mqlite-check-engine", daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(2 * WAIT)
        assert not thread.is_alive(), "a reader thread did not finish in time"
        if errors:
            raise errors[0]
        return result[0]

    try:
        yield join
    finally:
        thread.join(2 * WAIT)


def _set_header(message: mqlite.Message, name: str, value: object) -> None:
    headers: Any = message.headers  # read-only by contract: this should raise TypeError
    headers[name] = value


def _at(stamp: float) -> datetime:
    return datetime.fromtimestamp(stamp, tz=UTC)


# -- publishing ----------------------------------------------------------------------------------


@_check()
def publish_assigns_contiguous_offsets_from_zero(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    assert (queue.start_offset, queue.end_offset, len(queue)) == (0, 0, 0)
    got = [broker.publish("q", "e", i).offset for i in range(4)]
    got += _offsets(queue.publish_many([("e", 4), ("f", 5), ("e", 6)]))
    got += [queue.publish("e", 7).offset, broker.publish("q", "e", 8).offset]
    assert got == list(range(9)), f"offsets {got}"
    assert (queue.start_offset, queue.end_offset, len(queue)) == (0, 9, 9)
    reader = broker.subscribe("q", start="earliest")
    assert _offsets(_pull_all(reader)) == list(range(9))
    assert broker.publish("other", "e").offset == 0, "each queue numbers its own offsets"


@_check()
def publish_many_appends_all_or_none(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", 0)
    _raises(mqlite.InvalidName, lambda: queue.publish_many([("e", 1), ("bad*", 2)]))
    _raises(mqlite.InvalidArgument, lambda: queue.publish_many([("e", 1), "not a pair"]))
    assert queue.publish_many([]) == []
    assert queue.end_offset == 1
    assert _payloads(_pull_all(broker.subscribe("q", start="earliest"))) == [0]
    assert queue.publish("e", 1).offset == 1, "a refused publish_many used no offset"


@_check()
def a_message_carries_what_was_published(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    clock.advance(2.5)
    sub = broker.subscribe("orders")
    sent = broker.publish("orders", "created", {"id": 1, "tags": ["a", "b"]}, key="customer-7", headers={"trace": "t1"})
    plain = broker.publish("orders", "updated", "p")
    got, got_plain = _one(sub), _one(sub)
    assert got == sent
    assert (got.queue, got.event, got.payload, got.key, got.offset) == (
        "orders",
        "created",
        {"id": 1, "tags": ["a", "b"]},
        "customer-7",
        0,
    )
    assert dict(got.headers) == {"trace": "t1"}
    assert got.timestamp == clock.time(), f"timestamp {got.timestamp} is not the broker clock's {clock.time()}"
    assert got_plain == plain
    assert (got_plain.key, dict(got_plain.headers), got_plain.offset) == (None, {}, 1)
    _raises(TypeError, lambda: _set_header(got, "trace", "changed"))


# -- filters -------------------------------------------------------------------------------------


@_check()
def event_filters_match_names_and_wildcards(brokers: _Brokers) -> None:
    broker = brokers.open()
    names = broker.subscribe("shop", events=["order.*", "refund"])
    one_char = broker.subscribe("shop", events="v?")
    one_of = broker.subscribe("shop", events="[ab]x")
    every = broker.subscribe("shop", events="*")
    published = ["order.created", "order.a.b", "Order.created", "refund", "refunded", "v1", "v12", "ax", "bx", "cx"]
    for event in published:
        broker.publish("shop", event)
    assert [m.event for m in _pull_all(names)] == ["order.created", "order.a.b", "refund"]
    assert [m.event for m in _pull_all(one_char)] == ["v1"]
    assert [m.event for m in _pull_all(one_of)] == ["ax", "bx"]
    assert [m.event for m in _pull_all(every)] == published


@_check()
def join_and_leave_change_the_filter_from_now_on(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", events="a")
    broker.publish("q", "a", 0)
    broker.publish("q", "b", 1)
    assert _payloads(_pull_all(sub)) == [0]
    sub.join("b*")
    for i, event in enumerate(["a", "b", "bb", "c"], start=2):
        broker.publish("q", event, i)
    assert _payloads(_pull_all(sub)) == [2, 3, 4]
    sub.leave("a")
    assert sub.events == ("b*",)
    broker.publish("q", "a", 6)
    broker.publish("q", "b", 7)
    assert _payloads(_pull_all(sub)) == [7]
    _raises(mqlite.InvalidName, lambda: sub.leave("not-in-the-filter"))
    _raises(mqlite.InvalidName, lambda: sub.leave("b*"))  # the last entry


# -- ephemeral and named subscriptions -----------------------------------------------------------


@_check()
def an_ephemeral_subscription_sees_only_what_is_published_while_open(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    queue.publish("e", "before")
    sub = broker.subscribe("q")
    queue.publish("e", "during")
    assert _payloads(_pull_all(sub)) == ["during"]
    sub.close()
    queue.publish("e", "while closed")
    again = broker.subscribe("q")
    queue.publish("e", "live")
    assert _payloads(_pull_all(again)) == ["live"]
    again.close()
    assert [s for s in broker.info().subscriptions if s.name is None] == [], "a closed ephemeral cursor is forgotten"
    _raises(mqlite.SubscriptionClosed, lambda: again.get(timeout=0))


@_check()
def a_named_subscription_keeps_its_place_and_catches_up(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="billing")
    for i in range(4):
        broker.publish("q", "e", i)
    assert _payloads(sub.poll(max_messages=2)) == [0, 1]
    sub.close()
    broker.publish("q", "e", 4)
    info = broker.info().subscription("q", "billing")
    assert (info.mode, info.position, info.lag) == ("detached", 2, 3)
    again = broker.subscribe("q", name="billing", start="earliest")  # start: ignored for an existing name
    assert _payloads(_pull_all(again)) == [2, 3, 4]
    broker.publish("q", "e", 5)
    assert _payloads(_pull_all(again)) == [5]


# -- where a cursor starts, seek -----------------------------------------------------------------


@_check()
def start_earliest_latest_or_an_offset(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    for i in range(5):
        queue.publish("e", i)
    assert _offsets(_pull_all(broker.subscribe("q", start="earliest"))) == [0, 1, 2, 3, 4]
    assert _pull_all(broker.subscribe("q", start="latest")) == []
    assert _pull_all(broker.subscribe("q")) == [], "the default start is 'latest'"
    assert _offsets(_pull_all(broker.subscribe("q", start=2))) == [2, 3, 4]
    assert _pull_all(broker.subscribe("q", start=5)) == []
    _raises(mqlite.InvalidArgument, lambda: broker.subscribe("q", start=6))
    small = broker.queue("small", retention="limits", max_messages=2)
    for i in range(5):
        small.publish("e", i)
    assert _offsets(_pull_all(broker.subscribe("small", start=0))) == [3, 4], "an offset is clamped to start_offset"


@_check()
def start_at_a_datetime(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    queue = broker.queue("q", retention="limits")
    stamps = []
    for i in range(4):
        stamps.append(queue.publish("e", i).timestamp)
        clock.advance(10)
    assert _offsets(_pull_all(broker.subscribe("q", start=_at(stamps[2])))) == [2, 3]
    assert _offsets(_pull_all(broker.subscribe("q", start=_at(stamps[0] + 5)))) == [1, 2, 3]
    assert _pull_all(broker.subscribe("q", start=_at(clock.time() + 60))) == []


@_check()
def seek_moves_the_cursor_to_earliest_latest_or_an_offset(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    sub = broker.subscribe("q", name="n", start="earliest")
    for i in range(5):
        queue.publish("e", i)
    assert _offsets(_pull_all(sub)) == [0, 1, 2, 3, 4]
    assert sub.seek("earliest") == 0
    assert _offsets(_pull_all(sub)) == [0, 1, 2, 3, 4]
    assert sub.seek(3) == 3
    assert sub.position == 3
    assert _offsets(_pull_all(sub)) == [3, 4]
    assert sub.seek(1) == 1
    assert sub.seek("latest") == 5
    assert _pull_all(sub) == []
    _raises(mqlite.InvalidArgument, lambda: sub.seek(6))
    assert sub.position == 5


@_check()
def seek_to_a_datetime(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    queue = broker.queue("q", retention="limits")
    sub = broker.subscribe("q", name="n")
    stamps = []
    for i in range(4):
        stamps.append(queue.publish("e", i).timestamp)
        clock.advance(10)
    _pull_all(sub)
    assert sub.seek(_at(stamps[1])) == 1
    assert _offsets(_pull_all(sub)) == [1, 2, 3]
    assert sub.seek(_at(stamps[2] - 5)) == 2


# -- fanout and competing consumers --------------------------------------------------------------


@_check()
def consumers_sharing_a_name_split_the_messages(brokers: _Brokers) -> None:
    broker = brokers.open()
    a = broker.subscribe("jobs", name="workers")
    b = broker.subscribe("jobs", name="workers")
    for i in range(10):
        broker.publish("jobs", "run", i)
    got_a: list[int] = []
    got_b: list[int] = []
    for _ in range(5):
        got_a.append(_one(a).payload)
        got_b.append(_one(b).payload)
    _none(a)
    _none(b)
    assert not set(got_a) & set(got_b), f"both got {sorted(set(got_a) & set(got_b))}"
    assert sorted(got_a + got_b) == list(range(10))
    assert got_a == sorted(got_a), "each consumer sees its share in offset order"
    assert got_b == sorted(got_b), "each consumer sees its share in offset order"
    assert broker.info().subscription("jobs", "workers").consumers == 2


@_check()
def every_name_and_ephemeral_subscription_gets_every_message(brokers: _Brokers) -> None:
    broker = brokers.open()
    billing = broker.subscribe("orders", name="billing")
    shipping = broker.subscribe("orders", name="shipping")
    audit = broker.subscribe("orders")
    for i in range(4):
        broker.publish("orders", "created", i)
    for sub in (billing, shipping, audit):
        assert _payloads(_pull_all(sub)) == [0, 1, 2, 3]


# -- acks ----------------------------------------------------------------------------------------


@_check()
def auto_ack_settles_a_message_when_it_is_returned(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n")
    broker.publish("q", "e", 1)
    message = _one(sub)
    assert sub.pending == 0
    info = broker.info().subscription("q", "n")
    assert (info.ack, info.delivered, info.acked, info.pending) == ("auto", 1, 1, 0)
    _raises(mqlite.AckModeError, lambda: sub.ack(message))
    _raises(mqlite.AckModeError, lambda: sub.nack(message))
    sub.close()
    assert _pull_all(broker.subscribe("q", name="n")) == [], "an auto-acked message came back"


@_check()
def manual_ack_keeps_a_message_pending_until_it_is_acked(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)
    first, second = sub.poll(max_messages=10)
    assert sub.pending == 2
    sub.ack(first)
    assert sub.pending == 1
    sub.ack(second.offset)  # by offset
    assert sub.pending == 0
    info = broker.info().subscription("q", "n")
    assert (info.ack, info.delivered, info.acked, info.pending) == ("manual", 2, 2, 0)
    sub.close()
    assert _pull_all(broker.subscribe("q", name="n", ack="manual")) == [], "an acked message came back"


@_check()
def acking_what_is_not_pending_raises_and_acks_nothing(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    m0, m1 = sub.poll(max_messages=2)
    _raises(mqlite.NotPending, lambda: sub.ack(m0, 2))  # offset 2 was never delivered
    assert sub.pending == 2, "a refused ack settled something"
    _raises(mqlite.NotPending, lambda: sub.ack(m0, m0))
    assert sub.pending == 2, "a refused ack settled something"
    sub.ack(m0, m1)
    assert sub.pending == 0
    _raises(mqlite.NotPending, lambda: sub.ack(m0))
    _raises(mqlite.NotPending, lambda: sub.nack(m1))
    assert broker.info().subscription("q", "n").acked == 2


@_check()
def a_nacked_message_is_redelivered_after_its_delay(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    sub = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "x")
    first = _one(sub)
    sub.nack(first, delay=10)
    _none(sub)
    clock.advance(9.5)
    _none(sub)
    clock.advance(0.5)
    assert _one(sub) == first
    assert broker.info().subscription("q", "n").redelivered == 1


@_check()
def due_redeliveries_come_before_new_messages(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="w", ack="manual")
    for i in range(3):
        broker.publish("q", "e", i)
    first = sub.poll(max_messages=10)
    sub.nack(first[0])
    sub.ack(*first[1:])
    broker.publish("q", "e", 3)
    assert _offsets(sub.poll(max_messages=10)) == [0, 3]


@_check()
def an_unacked_message_is_redelivered_after_ack_timeout(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    sub = broker.subscribe("q", name="n", ack="manual", ack_timeout=30)
    broker.publish("q", "e", "x")
    first = _one(sub)
    clock.advance(29)
    _none(sub)
    clock.advance(1)
    again = _one(sub)
    assert again == first
    sub.ack(again)
    clock.advance(60)
    _none(sub)


@_check()
def max_deliveries_sends_a_message_to_the_dead_letter_queue(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("orders", name="billing", ack="manual", max_deliveries=2)
    broker.publish("orders", "created", {"id": 7}, key="k", headers={"trace": "t1"})
    sub.nack(_one(sub))
    message = _one(sub)
    sub.nack(message)
    _none(sub)
    assert sub.pending == 0
    _raises(mqlite.NotPending, lambda: sub.ack(message))
    assert broker.info().subscription("orders", "billing").dead_lettered == 1
    dead = broker.subscribe(mqlite.dead_letter_queue_name("orders"), start="earliest")
    assert dead.queue == "orders.dead-letter"
    letters = _pull_all(dead)
    assert len(letters) == 1, f"{len(letters)} dead letters"
    letter = letters[0]
    assert (letter.event, letter.payload, letter.key) == ("created", {"id": 7}, "k")
    assert dict(letter.headers) == {
        "trace": "t1",
        "dead_letter.queue": "orders",
        "dead_letter.offset": 0,
        "dead_letter.subscription": "billing",
        "dead_letter.deliveries": 2,
        "dead_letter.reason": "nack",
        "dead_letter.error": None,
    }


# -- push ----------------------------------------------------------------------------------------


@_check()
def push_callbacks_run_in_order_when_the_broker_drains(brokers: _Brokers) -> None:
    broker, _clock = brokers.manual()
    seen: list[int] = []
    broker.subscribe("q", name="n", callback=lambda m: seen.append(m.payload))
    for i in range(3):
        broker.publish("q", "e", i)
    assert seen == [], "a ManualDispatcher ran a callback before drain"
    assert broker.drain(timeout=WAIT)
    assert seen == [0, 1, 2]
    info = broker.info().subscription("q", "n")
    assert (info.mode, info.acked, info.pending) == ("push", 3, 0)


@_check()
def a_raising_push_callback_is_retried_then_dead_lettered(brokers: _Brokers) -> None:
    broker, clock = brokers.manual()
    calls: list[int] = []

    def always_fails(message: mqlite.Message) -> None:
        calls.append(message.offset)
        raise ValueError("broken handler")

    broker.subscribe("q", name="n", callback=always_fails, max_deliveries=2, backoff=mqlite.Backoff(initial=1.0))
    broker.publish("q", "e", "x")
    assert not broker.drain(timeout=0), "drain returned True while a retry was waiting"
    assert calls == [0]
    clock.advance(0.5)
    broker.drain(timeout=0)
    assert calls == [0], "retried before the backoff passed"
    clock.advance(0.5)
    assert broker.drain(timeout=0), "a dead-lettered message counts as handled"
    assert calls == [0, 0]
    letter = _one(broker.subscribe("q.dead-letter", start="earliest"))
    assert (letter.payload, letter.headers["dead_letter.reason"]) == ("x", "callback raised")
    assert "broken handler" in str(letter.headers["dead_letter.error"])
    assert letter.headers["dead_letter.deliveries"] == 2
    info = broker.info().subscription("q", "n")
    assert (info.pending, info.redelivered, info.dead_lettered) == (0, 1, 1)


# -- retention -----------------------------------------------------------------------------------


@_check()
def interest_retention_drops_what_no_cursor_will_read(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q")
    assert queue.config.retention == "interest", "interest is the default retention"
    queue.publish("e", "nobody listening")
    assert (queue.start_offset, queue.end_offset, len(queue)) == (1, 1, 0)
    with broker.subscribe("q", start="earliest") as late:
        assert _pull_all(late) == []
    keeper = broker.subscribe("q", name="keeper")
    for i in range(3):
        queue.publish("e", i)
    assert len(queue) == 3
    assert _payloads(keeper.poll(max_messages=2)) == [0, 1]
    assert (queue.start_offset, len(queue)) == (3, 1)


@_check()
def drop_oldest_keeps_max_messages_and_counts_what_was_missed(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("metrics", retention="limits", max_messages=3)
    sub = broker.subscribe("metrics", name="dashboard", events="cpu")
    for i in range(6):
        queue.publish("cpu" if i != 1 else "disk", i)
    assert (queue.start_offset, queue.end_offset, len(queue)) == (3, 6, 3)
    assert sub.missed == 2, f"missed {sub.missed}: offsets 0 and 2 were dropped unread (1 is not wanted)"
    assert _payloads(_pull_all(sub)) == [3, 4, 5]
    assert broker.info().subscription("metrics", "dashboard").missed == 2


@_check()
def reject_overflow_raises_queue_full_and_writes_nothing(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits", max_messages=2, overflow="reject")
    sub = broker.subscribe("q", name="n", start="earliest")
    queue.publish("e", 0)
    queue.publish("e", 1)
    _raises(mqlite.QueueFull, lambda: queue.publish("e", "rejected"))
    _raises(mqlite.QueueFull, lambda: broker.publish("q", "e", "rejected"))
    _raises(mqlite.QueueFull, lambda: queue.publish_many([("e", "rejected")]))
    assert (queue.end_offset, len(queue)) == (2, 2)
    assert _payloads(_pull_all(sub)) == [0, 1]
    assert sub.missed == 0


# -- info ----------------------------------------------------------------------------------------


@_check()
def info_reports_the_figures_of_each_cursor(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual", max_deliveries=2, events="e")
    for i in range(4):
        broker.publish("q", "e", i)
    broker.publish("q", "other", 4)
    first, second, _third = sub.poll(max_messages=3)
    sub.ack(first)
    sub.nack(second)
    [again] = sub.poll(max_messages=1)  # the redelivery of offset 1 comes first
    assert again.offset == 1
    sub.nack(again)  # its second delivery failed: dead-lettered
    info = broker.info()
    row = info.subscription("q", "n")
    assert (row.position, row.lag, row.pending) == (3, 1, 1), (row.position, row.lag, row.pending)
    assert (row.delivered, row.acked, row.redelivered, row.dead_lettered, row.missed) == (4, 1, 1, 1, 0)
    assert (row.queue, row.durable, row.events, row.mode, row.consumers, row.ack) == (
        "q",
        True,
        ("e",),
        "pull",
        1,
        "manual",
    )
    assert row.subscription_ids == (sub.id,)
    assert (sub.position, sub.lag, sub.pending, sub.missed) == (3, 1, 1, 0)
    assert info.queue("q").end_offset == 5
    assert info.queue("q.dead-letter").retained == 1


# -- closing -------------------------------------------------------------------------------------


@_check()
def closing_a_subscription_gives_back_what_it_held(brokers: _Brokers) -> None:
    broker = brokers.open()
    leaving = broker.subscribe("q", name="n", ack="manual")
    staying = broker.subscribe("q", name="n", ack="manual")
    broker.publish("q", "e", "leaving's")
    broker.publish("q", "e", "staying's")
    assert _payloads(leaving.poll(max_messages=1)) == ["leaving's"]
    assert _payloads(staying.poll(max_messages=1)) == ["staying's"]
    leaving.close()
    assert _payloads(_pull_all(staying)) == ["leaving's"]
    assert staying.pending == 2
    assert broker.info().subscription("q", "n").redelivered == 1


@_check()
def a_closed_broker_refuses_publish_and_subscribe(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q")
    sub = broker.subscribe("q", name="n")
    broker.close()
    assert broker.closed
    _raises(mqlite.BrokerClosed, lambda: broker.publish("q", "e"))
    _raises(mqlite.BrokerClosed, lambda: queue.publish("e"))
    _raises(mqlite.BrokerClosed, lambda: queue.publish_many([("e", 1)]))
    _raises(mqlite.BrokerClosed, lambda: broker.subscribe("q", name="n"))
    _raises(mqlite.BrokerClosed, lambda: broker.queue("new"))
    _raises(mqlite.SubscriptionClosed, lambda: sub.get(timeout=0))
    assert sub.closed
    assert broker.info().queue("q").end_offset == 0, "info() works after close"
    broker.close()  # idempotent


@_check()
def a_blocked_get_wakes_when_a_message_is_published(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q")
    broker.publish("q", "e", "first")  # the event is known: no first-seen wake-up hides a missing one
    assert _one(sub).payload == "first"

    def timed_get() -> tuple[float, mqlite.Message | None]:
        began = time.monotonic()
        message = sub.get(timeout=WAIT)
        return time.monotonic() - began, message

    with _in_thread(timed_get) as join:
        wait_until_blocked(broker.queue("q"), timeout=WAIT)
        broker.publish("q", "e", "wake up")
        elapsed, message = join()
    assert message is not None
    assert message.payload == "wake up"
    assert elapsed < WAIT / 4, f"the blocked get returned after {elapsed:.2f} s, not when the message came"


# -- persistence (reopen) ------------------------------------------------------------------------


@_check(needs="reopen")
def messages_and_offsets_survive_a_reopen(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits", max_messages=100)
    sent = [queue.publish("e", {"n": i}, key=f"k{i}", headers={"h": i}) for i in range(3)]
    broker.close()
    broker = brokers.reopen()
    queue = broker.queue("q")
    assert (queue.config.retention, queue.config.max_messages) == ("limits", 100)
    assert (queue.start_offset, queue.end_offset) == (0, 3)
    assert _pull_all(broker.subscribe("q", start="earliest")) == sent
    assert queue.publish("e").offset == 3, "offsets continue after a reopen"


@_check(needs="reopen")
def a_named_cursors_position_survives_a_reopen(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="billing", events=["a", "b"])
    for i in range(4):
        broker.publish("q", "a", i)
    assert _payloads(sub.poll(max_messages=2)) == [0, 1]
    broker.close()
    broker = brokers.reopen()
    broker.publish("q", "c", "unwanted")
    broker.publish("q", "b", 5)
    info = broker.info().subscription("q", "billing")
    assert (info.mode, info.position, info.lag) == ("detached", 2, 3)
    again = broker.subscribe("q", name="billing", events=["a", "b"])
    assert _payloads(_pull_all(again)) == [2, 3, 5]


@_check(needs="reopen")
def pending_messages_survive_a_reopen(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="w", ack="manual")
    for i in range(4):
        broker.publish("q", "e", i)
    taken = sub.poll(max_messages=3)
    sub.ack(taken[1])
    broker.close()
    broker = brokers.reopen()
    assert broker.info().subscription("q", "w").pending == 2
    sub = broker.subscribe("q", name="w", ack="manual")
    again = _pull_all(sub)
    assert _offsets(again) == [0, 2, 3], "the unacked messages come back first, then the unread one"
    sub.ack(*again)
    assert sub.pending == 0


# -- sharing (shared) ----------------------------------------------------------------------------


@_check(needs="shared")
def brokers_sharing_storage_see_each_others_publishes(brokers: _Brokers) -> None:
    a = brokers.open()
    b = brokers.shared()
    in_a = a.subscribe("q", name="in-a")
    in_b = b.subscribe("q", name="in-b")
    a.publish("q", "e", "from a")
    b.publish("q", "e", "from b")
    for sub in (in_a, in_b):
        got = [sub.get(timeout=WAIT), sub.get(timeout=WAIT)]
        assert [(m.offset, m.payload) for m in got if m is not None] == [(0, "from a"), (1, "from b")]


@_check(needs="shared")
def brokers_sharing_storage_compete_for_a_name(brokers: _Brokers) -> None:
    a = brokers.open()
    b = brokers.shared()
    in_a = a.subscribe("q", name="workers", ack="manual")
    in_b = b.subscribe("q", name="workers", ack="manual")
    for i in range(10):
        a.publish("q", "job", i)
    first = in_a.poll(max_messages=4, timeout=WAIT)
    rest = in_b.poll(max_messages=100, timeout=WAIT)
    got_a, got_b = _payloads(first), _payloads(rest)
    assert not set(got_a) & set(got_b), f"both brokers got {sorted(set(got_a) & set(got_b))}"
    assert sorted(got_a + got_b) == list(range(10))
    in_a.ack(*first)
    in_b.ack(*rest)
    assert in_a.poll(max_messages=100, timeout=0) == []
    assert b.info().subscription("q", "workers").pending == 0
