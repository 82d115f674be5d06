"""The machinery of ``check_engine``: the brokers a check opens, the registry of checks, helpers.

The checks themselves live in ``checks_reading``, ``checks_delivery`` and ``checks_storage``;
``conformance.check_engine`` runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import mqlite

__all__ = ["CHECKS", "WAIT", "BrokerFactory", "Check"]

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
