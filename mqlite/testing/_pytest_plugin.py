"""mqlite's pytest plugin, registered as ``mqlite`` through the ``pytest11`` entry point.

Fixtures:
- ``mqlite_clock``: an autojumping :class:`~mqlite.testing.VirtualClock` (timeouts and retries
  take no real time);
- ``mqlite_broker``: a broker on that clock, in memory unless the test's ``mqlite`` marker says
  ``backend="file"`` (then in the test's ``tmp_path``); closed after the test;
- ``mqlite_history``: :func:`~mqlite.testing.record` of ``mqlite_broker``;
- ``mqlite_faults``: the :class:`~mqlite.testing.Faults` that ``mqlite_broker`` injects, seeded
  with ``mqlite_seed``; None (no faults) unless the marker's ``faults=`` or ``--mqlite-faults``
  asks for them;
- ``mqlite_seed``: the run's seed (``--mqlite-seed``, or drawn and shown when a test fails), for
  tests that draw their own randomness.

The marker ``@pytest.mark.mqlite(backend="memory" | "file", autojump=True, limit=DEFAULT_LIMIT,
faults=None)`` sets up those fixtures (``limit``: virtual seconds after the start that no wait may
cross, a year by default so that a forgotten timeout fails instead of hanging; None for none);
``faults`` is a dict of rates such as ``{"duplicate": 0.1, "crash": 0.05}``. The option
``--mqlite-faults=duplicate=0.1,crash=0.05`` gives those rates to every test whose marker sets no
``faults``. When a test that used the fixtures fails, its report gets an "mqlite" section: the
seed, the command that reruns it with that seed, the faults injected and the last 30 ops of the
history.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite.testing.clock import VirtualClock
from mqlite.testing.faults import FAULT_KINDS, Faults
from mqlite.testing.history import History
from mqlite.testing.recording import record

_SEED = pytest.StashKey[int]()
_HISTORY = pytest.StashKey[History]()
_FAULTS = pytest.StashKey[Faults]()
_OPTION_FAULTS = pytest.StashKey[dict[str, float]]()
_BACKENDS = ("memory", "file")
DEFAULT_LIMIT = 365 * 24 * 3600.0
"""How far ``mqlite_clock`` may go, in virtual seconds, unless the marker says otherwise."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mqlite")
    group.addoption(
        "--mqlite-seed",
        type=int,
        default=None,
        help="the seed of mqlite_seed (default: drawn per run, and shown when a test fails)",
    )
    group.addoption(
        "--mqlite-faults",
        default=None,
        metavar="KIND=RATE,...",
        help=f"inject faults into mqlite_broker, e.g. duplicate=0.1,crash=0.05 (kinds: {', '.join(FAULT_KINDS)})",
    )


def _parse_faults(spec: str) -> dict[str, float]:
    """``"duplicate=0.1,crash=0.05"`` as rates by kind."""
    rates: dict[str, float] = {}
    for part in spec.split(","):
        kind, _, rate = part.strip().partition("=")
        if kind not in FAULT_KINDS:
            raise pytest.UsageError(f"--mqlite-faults: unknown fault {kind!r}; the kinds are {', '.join(FAULT_KINDS)}")
        try:
            rates[kind] = float(rate)
        except ValueError:
            raise pytest.UsageError(f"--mqlite-faults: {kind}= needs a rate in [0, 1], got {rate!r}") from None
    return rates


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mqlite(backend='memory', autojump=True, limit=365 days, faults=None): how the mqlite_broker, mqlite_clock "
        "and mqlite_faults fixtures are made",
    )
    seed = config.getoption("--mqlite-seed")
    config.stash[_SEED] = seed if seed is not None else random.SystemRandom().randrange(2**32)
    spec = config.getoption("--mqlite-faults")
    config.stash[_OPTION_FAULTS] = _parse_faults(spec) if spec else {}


def _marker(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("mqlite")
    options: dict[str, Any] = {"backend": "memory", "autojump": True, "limit": DEFAULT_LIMIT, "faults": None}
    if marker is not None:
        unknown = set(marker.kwargs) - set(options)
        if marker.args or unknown:
            raise pytest.UsageError(
                f"@pytest.mark.mqlite takes only backend=, autojump=, limit= and faults=, "
                f"got {marker.args} {marker.kwargs}"
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
def mqlite_faults(request: pytest.FixtureRequest, mqlite_seed: int) -> Faults | None:
    """The faults ``mqlite_broker`` injects: the marker's ``faults=`` or ``--mqlite-faults``, else None."""
    rates = _marker(request)["faults"]
    if rates is None:
        rates = request.config.stash[_OPTION_FAULTS]
    if not rates:
        return None
    if not isinstance(rates, dict) or set(rates) - set(FAULT_KINDS):
        raise pytest.UsageError(
            f"@pytest.mark.mqlite faults= is a dict of rates by kind ({', '.join(FAULT_KINDS)}), got {rates!r}"
        )
    faults = Faults(seed=mqlite_seed, **rates)
    request.node.stash[_FAULTS] = faults
    return faults


@pytest.fixture
def mqlite_broker(
    request: pytest.FixtureRequest, mqlite_clock: VirtualClock, mqlite_faults: Faults | None, tmp_path: Path
) -> Iterator[mqlite.Broker]:
    """A broker on ``mqlite_clock``: in memory, or on a file with ``@pytest.mark.mqlite(backend="file")``;
    with ``mqlite_faults``, if any."""
    path = tmp_path / "mqlite_broker.mqlite" if _marker(request)["backend"] == "file" else None
    broker = mqlite.Broker(path, clock=mqlite_clock, faults=mqlite_faults)
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
        faults = item.stash.get(_FAULTS, None)
        if faults is not None:
            injected = faults.log
            lines.append(f"faults: {faults!r}, {len(injected)} injected" + (":" if injected else ""))
            lines += [f"  {fault}" for fault in injected[-30:]]
        history = item.stash.get(_HISTORY, None)
        if history is not None:
            lines += ["last history ops:", history.format(last=30)]
        report.sections.append(("mqlite", "\n".join(lines)))
    return report
