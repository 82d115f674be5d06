"""mqlite's pytest plugin, registered as ``mqlite`` through the ``pytest11`` entry point.

Fixtures:
- ``mqlite_clock``: an autojumping :class:`~mqlite.testing.VirtualClock` (timeouts and retries
  take no real time);
- ``mqlite_broker``: a broker on that clock, in memory unless the test's ``mqlite`` marker says
  ``backend="file"`` (then in the test's ``tmp_path``); closed after the test;
- ``mqlite_history``: :func:`~mqlite.testing.record` of ``mqlite_broker``;
- ``mqlite_seed``: the run's seed (``--mqlite-seed``, or drawn and shown when a test fails), for
  tests that draw their own randomness.

The marker ``@pytest.mark.mqlite(backend="memory" | "file", autojump=True, limit=None)`` sets up
those fixtures. When a test that used them fails, its report gets an "mqlite" section: the seed,
the command that reruns it with that seed, and the last 30 ops of the history.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite.testing.clock import VirtualClock
from mqlite.testing.history import History
from mqlite.testing.recording import record

_SEED = pytest.StashKey[int]()
_HISTORY = pytest.StashKey[History]()
_BACKENDS = ("memory", "file")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mqlite")
    group.addoption(
        "--mqlite-seed",
        type=int,
        default=None,
        help="the seed of mqlite_seed (default: drawn per run, and shown when a test fails)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mqlite(backend='memory', autojump=True, limit=None): how the mqlite_broker and mqlite_clock fixtures are made",
    )
    seed = config.getoption("--mqlite-seed")
    config.stash[_SEED] = seed if seed is not None else random.SystemRandom().randrange(2**32)


def _marker(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("mqlite")
    options: dict[str, Any] = {"backend": "memory", "autojump": True, "limit": None}
    if marker is not None:
        unknown = set(marker.kwargs) - set(options)
        if marker.args or unknown:
            raise pytest.UsageError(
                f"@pytest.mark.mqlite takes only backend=, autojump= and limit=, got {marker.args} {marker.kwargs}"
            )
        options.update(marker.kwargs)
    if options["backend"] not in _BACKENDS:
        raise pytest.UsageError(f"@pytest.mark.mqlite backend must be 'memory' or 'file', got {options['backend']!r}")
    return options


@pytest.fixture
def mqlite_seed(request: pytest.FixtureRequest) -> int:
    """The run's seed: ``--mqlite-seed``, or drawn once per run."""
    seed = request.config.stash[_SEED]
    request.node.stash[_SEED] = seed
    return seed


@pytest.fixture
def mqlite_clock(request: pytest.FixtureRequest, mqlite_seed: int) -> VirtualClock:
    """An autojumping virtual clock (``autojump`` and ``limit`` from the ``mqlite`` marker)."""
    options = _marker(request)
    return VirtualClock(autojump=options["autojump"], limit=options["limit"])


@pytest.fixture
def mqlite_broker(
    request: pytest.FixtureRequest, mqlite_clock: VirtualClock, tmp_path: Path
) -> Iterator[mqlite.Broker]:
    """A broker on ``mqlite_clock``: in memory, or on a file with ``@pytest.mark.mqlite(backend="file")``."""
    path = tmp_path / "mqlite_broker.mqlite" if _marker(request)["backend"] == "file" else None
    broker = mqlite.Broker(path, clock=mqlite_clock)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mqlite_history(request: pytest.FixtureRequest, mqlite_broker: mqlite.Broker) -> History:
    """What ``mqlite_broker`` publishes, delivers and settles during the test."""
    history = record(mqlite_broker)
    request.node.stash[_HISTORY] = history
    return history


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _SEED in item.stash:
        seed = item.stash[_SEED]
        lines = [f"seed: {seed}", f"rerun: pytest {item.nodeid!r} --mqlite-seed={seed}"]
        history = item.stash.get(_HISTORY, None)
        if history is not None:
            lines += ["last history ops:", history.format(last=30)]
        report.sections.append(("mqlite", "\n".join(lines)))
    return report
