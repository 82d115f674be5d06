"""What mqlite's users, and its engines, import in their tests.

- :func:`check_engine`: the delivery contract as a conformance suite; an engine is done when a
  broker on it passes unchanged.
- :class:`ReferenceModel`: the expected behaviour of one queue, written from the documented
  semantics, to check a broker against (for example from a hypothesis state machine).
- :func:`wait_until_blocked`: wait until readers are blocked on a queue, without sleeping.
- :class:`History` of :class:`Op`: what was published, delivered and settled, in order; and
  :mod:`checkers`, which read one and name what went wrong, as Jepsen names its anomalies.

Importing this package needs only mqlite's own dependencies: no pytest, no hypothesis.
"""

from mqlite.testing import checkers
from mqlite.testing.conformance import WAIT, BrokerFactory, Check, check_engine
from mqlite.testing.history import History, Op
from mqlite.testing.model import Entry, ModelCursor, ModelSub, ReferenceModel
from mqlite.testing.waiting import wait_until_blocked

__all__ = [
    "WAIT",
    "BrokerFactory",
    "Check",
    "Entry",
    "History",
    "ModelCursor",
    "ModelSub",
    "Op",
    "ReferenceModel",
    "check_engine",
    "checkers",
    "wait_until_blocked",
]
