"""Shared fixtures: every broker a test makes comes from ``make_broker`` and is closed afterwards.

``make_broker`` is parametrized over the backends: ``memory`` (``Broker()``), ``file``
(``Broker(path)`` on SQLite) and ``redis`` (``Broker("redis://...", namespace=...)`` on one
redis-server per test session, a fresh namespace per broker), so every test that uses it runs
against all three. A test that only makes sense in memory marks itself
``@pytest.mark.memory_only``; one that Redis cannot run marks itself
``@pytest.mark.not_redis(reason)``. The ``redis`` backend skips, saying why, without
``redis-server`` or redis-py, and fails instead under ``CI=true`` (``tests/redis_server.py``).

Virtual time comes from mqlite's own pytest plugin (``mqlite.testing``): ``jumping_broker`` is a
``make_broker`` broker on the plugin's ``mqlite_clock``, an autojumping ``VirtualClock``, so it
too runs on both backends. The plugin's ``mqlite_broker`` is in memory only unless marked.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite.testing import VirtualClock
from tests.helpers import WAIT
from tests.redis_server import redis_server, require_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the whole session (a free loopback port, its own folder); its URL.

    Skips (fails under ``CI=true``) when ``redis-server`` or redis-py is missing.
    """
    require_redis()
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


REDIS_FILES = frozenset(
    {
        "test_acks.py",
        "test_asyncio.py",
        "test_closing.py",
        "test_dedup.py",
        "test_delivery.py",
        "test_fanout.py",
        "test_filters.py",
        "test_info.py",
        "test_message_attempt.py",
        "test_pending_messages.py",
        "test_publish.py",
        "test_push.py",
        "test_retention.py",
        "test_subscriptions.py",
    }
)
"""The files whose ``make_broker`` tests run on the ``redis`` backend: the delivery contract.

The others (hostile and bad input, engine internals, record() and Faults, stress) pay a round
trip per call for checks that the engine's own tests or the contract files already cover; CI's
time budget keeps them on memory and file (they are deselected). ``MQLITE_REDIS_BACKEND=all``
runs every file on Redis.
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``redis`` backend's runs outside :data:`REDIS_FILES` (one line in the summary)."""
    if os.environ.get("MQLITE_REDIS_BACKEND") == "all":
        return
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_redis = callspec is not None and callspec.params.get("backend") == "redis"
        (dropped if on_redis and item.path.name not in REDIS_FILES else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=["memory", "file", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which storage the brokers of this test use."""
    if request.param != "memory" and request.node.get_closest_marker("memory_only"):
        pytest.skip("in-memory behaviour only")
    if request.param == "redis":
        marker = request.node.get_closest_marker("not_redis")
        if marker is not None:
            pytest.skip(f"not on Redis: {marker.args[0] if marker.args else marker.kwargs['reason']}")
        request.getfixturevalue("redis_url")  # skips here, before the test, without a server
    return str(request.param)


@pytest.fixture
def make_broker(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., mqlite.Broker]]:
    """A factory: ``make_broker(clock=..., dispatcher=...)`` returns a broker closed at teardown.

    On the ``file`` backend each broker gets its own new file; on ``redis`` its own namespace.
    """
    brokers: list[mqlite.Broker] = []
    server = request.getfixturevalue("redis_url") if backend == "redis" else ""

    def factory(**kwargs: Any) -> mqlite.Broker:
        if backend == "file":
            broker = mqlite.Broker(tmp_path / f"broker{len(brokers)}.mqlite", **kwargs)
        elif backend == "redis":
            broker = mqlite.Broker(server, namespace=f"t{uuid.uuid4().hex[:12]}", **kwargs)
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
def children() -> Iterator[list[Any]]:
    """Processes a test starts: killed and joined at teardown whatever happened."""
    started: list[Any] = []
    yield started
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(WAIT)


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


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Open: push callbacks run through. Closed: they wait (at most WAIT) until it opens again."""
    event = threading.Event()
    event.set()
    try:
        yield event
    finally:
        event.set()  # no callback is left waiting at teardown


@pytest.fixture(params=["each", "batch"])
def make_each_or_batch(
    request: pytest.FixtureRequest, backend: str, make_broker: Callable[..., mqlite.Broker]
) -> Callable[..., mqlite.Broker]:
    """``make_broker``, and on a file also with ``commit="batch"`` (a file no other broker shares)."""
    if request.param == "batch":
        if backend != "file":
            pytest.skip("commit='batch' is a file's setting")
        return functools.partial(make_broker, commit="batch")
    return make_broker
