"""Shared fixtures: every broker a test makes comes from ``make_broker`` and is closed afterwards.

``make_broker`` is parametrized over the backends: ``memory`` (``Broker()``) and ``file``
(``Broker(path)`` on SQLite), so every test that uses it runs against both. A test that only
makes sense in memory marks itself ``@pytest.mark.memory_only``.

Virtual time comes from mqlite's own pytest plugin (``mqlite.testing``): ``jumping_broker`` is a
``make_broker`` broker on the plugin's ``mqlite_clock``, an autojumping ``VirtualClock``, so it
too runs on both backends. The plugin's ``mqlite_broker`` is in memory only unless marked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite.testing import VirtualClock


@pytest.fixture(params=["memory", "file"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which storage the brokers of this test use."""
    if request.param == "file" and request.node.get_closest_marker("memory_only"):
        pytest.skip("in-memory behaviour only")
    return str(request.param)


@pytest.fixture
def make_broker(backend: str, tmp_path: Path) -> Iterator[Callable[..., mqlite.Broker]]:
    """A factory: ``make_broker(clock=..., dispatcher=...)`` returns a broker closed at teardown.

    On the ``file`` backend each broker gets its own new file.
    """
    brokers: list[mqlite.Broker] = []

    def factory(**kwargs: Any) -> mqlite.Broker:
        if backend == "file":
            broker = mqlite.Broker(tmp_path / f"broker{len(brokers)}.mqlite", **kwargs)
        else:
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


@pytest.fixture
def jumping_broker(make_broker: Callable[..., mqlite.Broker], mqlite_clock: VirtualClock) -> mqlite.Broker:
    """A broker on the plugin's autojumping clock (``mqlite_clock``), with push threads.

    Call timeouts, nack delays, ack timeouts and backoff count in virtual seconds and take no
    real time: ``sub.get(timeout=3600)`` returns once the clock reaches what is due, or after
    exactly 3600 virtual seconds.
    """
    return make_broker(clock=mqlite_clock)
