"""The delivery contract as a conformance suite: ``check_engine(open_broker)``.

In the spirit of trio's ``check_two_way_stream``: a storage engine is done when a broker on it
passes this suite unchanged. Each check is a small function that tests one documented behaviour
(docs/concepts.md, docs/guarantees.md, docs/api.md) through the public API only, on brokers it
opens itself and closes in ``finally``.

Checks that involve time use a ``ManualClock`` and ``clock.advance``; push checks use a
``ManualDispatcher`` and ``broker.drain``. Every blocking call has a timeout; nothing sleeps.
"""

from __future__ import annotations

import traceback
from collections.abc import Collection

# Importing the check modules registers their checks in CHECKS, in this order.
from mqlite.testing import checks_delivery, checks_reading, checks_storage
from mqlite.testing._suite import CHECKS, WAIT, BrokerFactory, Check, _Brokers

__all__ = ["CHECKS", "WAIT", "BrokerFactory", "Check", "check_engine"]

_CHECK_MODULES = (checks_reading, checks_delivery, checks_storage)
_CHECK_FILES = {module.__file__ for module in _CHECK_MODULES}


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
    ours = [frame for frame in frames if frame.filename in _CHECK_FILES and frame.name == name]
    if ours:
        text += f" ({ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}: {ours[-1].line})"
    return text
