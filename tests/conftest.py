"""Shared fixtures: every broker a test makes comes from ``make_broker`` and is closed afterwards.

A later backend (a file-backed log) can parametrize ``make_broker`` and run the whole suite
against itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mqlite


@pytest.fixture
def make_broker() -> Iterator[Callable[..., mqlite.Broker]]:
    """A factory: ``make_broker(clock=..., dispatcher=...)`` returns a broker closed at teardown."""
    brokers: list[mqlite.Broker] = []

    def factory(**kwargs: Any) -> mqlite.Broker:
        broker = mqlite.Broker(**kwargs)
        brokers.append(broker)
        return broker

    yield factory
    for broker in brokers:
        broker.close()


@pytest.fixture
def broker(make_broker: Callable[..., mqlite.Broker]) -> mqlite.Broker:
    """A broker with the real clock and one thread per push subscription."""
    return make_broker()


@pytest.fixture
def clock() -> mqlite.ManualClock:
    """A clock that moves only when the test calls ``advance``."""
    return mqlite.ManualClock()


@pytest.fixture
def dispatcher() -> mqlite.ManualDispatcher:
    """Runs push callbacks only inside ``run_ready()``/``drain()``, on the calling thread."""
    return mqlite.ManualDispatcher()


@pytest.fixture
def manual_broker(
    make_broker: Callable[..., mqlite.Broker], clock: mqlite.ManualClock, dispatcher: mqlite.ManualDispatcher
) -> mqlite.Broker:
    """A fully deterministic broker: manual clock and manual dispatcher."""
    return make_broker(clock=clock, dispatcher=dispatcher)
