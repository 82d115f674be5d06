"""What mqlite's users, and its engines, import in their tests.

- :func:`check_engine`: the delivery contract as a conformance suite; an engine is done when a
  broker on it passes unchanged.
- :class:`ReferenceModel`: the expected behaviour of one queue, written from the documented
  semantics, to check a broker against (for example from a hypothesis state machine).
- :func:`wait_until_blocked`: wait until readers are blocked on a queue, without sleeping.
- :class:`VirtualClock`: virtual time, moved by hand or jumping by itself once every wait is
  blocked; :func:`run_until_idle` runs push callbacks and their timers until nothing is left.
- :class:`Faults`: seeded faults (duplicates, delays, lost acks, consumer crashes, restarts)
  that ``Broker(faults=...)`` injects within the delivery contract, with a log of each.
- :class:`History` of :class:`Op`: what was published, delivered and settled, in order; and
  :mod:`checkers`, which read one and name what went wrong, as Jepsen names its anomalies;
  :func:`record` gives the history of a real broker.
- :mod:`strategies` (hypothesis strategies for mqlite's inputs) and :class:`BrokerMachine` (a
  ready hypothesis state machine, in :mod:`stateful`): loaded on first use, as they import
  hypothesis.

Importing this package needs only mqlite's own dependencies: no pytest, no hypothesis.
"""

from typing import Any

from mqlite.testing import checkers
from mqlite.testing.clock import VirtualClock, VirtualEventLoop, VirtualTimeExceeded
from mqlite.testing.conformance import WAIT, BrokerFactory, Check, check_engine
from mqlite.testing.faults import Faults, InjectedFault, SimulatedCrash
from mqlite.testing.history import History, Op
from mqlite.testing.idle import CallbackErrors, IdleReport, run_until_idle
from mqlite.testing.model import Entry, ModelCursor, ModelSub, ReferenceModel
from mqlite.testing.recording import record
from mqlite.testing.waiting import wait_until_blocked

__all__ = [
    "WAIT",
    "BrokerFactory",
    "CallbackErrors",
    "Check",
    "Entry",
    "Faults",
    "History",
    "IdleReport",
    "InjectedFault",
    "ModelCursor",
    "ModelSub",
    "Op",
    "ReferenceModel",
    "SimulatedCrash",
    "VirtualClock",
    "VirtualEventLoop",
    "VirtualTimeExceeded",
    "check_engine",
    "checkers",
    "record",
    "run_until_idle",
    "wait_until_blocked",
]


# What needs hypothesis loads when first used, so that importing the package does not need it.
_LAZY = {"strategies": "mqlite.testing.strategies", "stateful": "mqlite.testing.stateful"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name == "BrokerMachine":
        return importlib.import_module("mqlite.testing.stateful").BrokerMachine
    raise AttributeError(f"module 'mqlite.testing' has no attribute {name!r}")
