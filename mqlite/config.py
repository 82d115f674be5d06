"""Settings records: a queue's retention (``QueueConfig``), retry delays (``Backoff``), and what
every subscription sharing a cursor must agree on (``SubscriptionSettings``). All frozen."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal, TypeGuard

import attrs

from mqlite.errors import InvalidArgument
from mqlite.filters import EventFilter

__all__ = [
    "DEDUP_MAX_IDS",
    "DEDUP_WINDOW",
    "Backoff",
    "Overflow",
    "QueueConfig",
    "Retention",
    "Start",
    "SubscriptionSettings",
    "check_start",
    "dead_letter_queue_name",
]

Start = Literal["earliest", "latest"] | int | datetime
"""Where a cursor starts or seeks to: the oldest retained message, the end, an offset, or a time."""

Retention = Literal["interest", "limits", "workqueue"]

DEDUP_WINDOW = 120.0
"""The default ``QueueConfig.dedup_window``: two minutes, JetStream's default duplicate window."""
DEDUP_MAX_IDS = 100_000
"""The default ``QueueConfig.dedup_max_ids``."""
Overflow = Literal["drop_oldest", "reject"]


def dead_letter_queue_name(queue: str) -> str:
    """The default dead-letter queue of ``queue``: ``"<queue>.dead-letter"``."""
    return f"{queue}.dead-letter"


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """An int or a float that is neither NaN nor infinite, nor too large for a float.

    A bool is no number of seconds, so it is refused.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_start(start: object, *, verb: str = "start") -> Start:
    """``start`` (of ``subscribe`` or ``seek``) as a position an engine resolves without user code.

    ``"earliest"``, ``"latest"`` and int offsets pass as plain values (an offset is checked
    against the queue by the engine). A datetime is turned into a plain UTC datetime here, where
    its ``tzinfo`` (which may be user code) runs outside every lock. One too early or too late
    for the platform to convert (``datetime.min``, ``datetime.max``, naive or aware) lies before
    or after every message: it means ``"earliest"`` or ``"latest"``.

    Raises:
        InvalidArgument: ``start`` is none of those; the message names ``verb`` and the value.
    """
    if isinstance(start, str):
        if start == "earliest":
            return "earliest"
        if start == "latest":
            return "latest"
    elif isinstance(start, int) and not isinstance(start, bool):
        if start < 0:
            raise InvalidArgument(f"{verb}={start} is outside queue offsets, which start at 0")
        return int(start)
    elif isinstance(start, datetime):
        try:
            return datetime.fromtimestamp(start.timestamp(), UTC)
        except (OverflowError, OSError, ValueError):
            # Outside what time_t or datetime can hold: before or after every message.
            return "earliest" if start.year < 1970 else "latest"
    raise InvalidArgument(f"start/seek takes 'earliest', 'latest', an int offset or a datetime, got {verb}={start!r}")


def _check_limit(name: str, value: object, *, integer: bool) -> None:
    if value is None:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:  # type: ignore[operator]  # isinstance just proved a number
        kind = "a positive int" if integer else "a positive number of seconds"
        raise InvalidArgument(f"{name} must be None or {kind}, got {value!r}")
    if not integer and not (is_finite_number(value) or value == math.inf):
        # An int too large for a float would make every later publish raise OverflowError.
        raise InvalidArgument(f"{name} must be None or a number of seconds a float can hold, got {value!r}")


@attrs.frozen
class QueueConfig:
    """How much of its log a queue keeps, and what happens when it is full.

    Attributes:
        retention: ``"interest"`` (default) keeps a message while some subscription still has to
            read it: every named (durable) subscription, attached or not, and every open one.
            A message that no cursor will ever read is dropped (``QueueInfo.dropped`` counts them).
            ``"limits"`` keeps every message until a limit drops it, even when nobody subscribes;
            with no limits it keeps all. ``"workqueue"`` keeps each message (a job) until a
            durable subscription whose events match it has acked it, even while no subscription
            exists: see ``docs/concepts.md`` ("Work queues").
        max_messages: Keep at most this many messages; None for no count limit.
        max_age: Drop messages older than this many seconds (broker clock); None for no age limit.
        overflow: What a publish does when ``max_messages`` are retained. ``"drop_oldest"`` drops
            the oldest (subscriptions that had not read it count it as missed); ``"reject"`` raises
            :class:`~mqlite.QueueFull` and writes nothing.
        dedup_window: How long, in seconds of broker clock from its first publish, a
            ``publish(..., dedup_id=...)`` id is remembered: within it a second publish with the
            same id writes nothing and returns the first message. Two minutes by default, as in
            NATS JetStream. A duplicate does not extend the window.
        dedup_max_ids: At most this many ids are remembered per queue (the oldest are forgotten
            first), so the window stays bounded in memory and on disk at any publish rate.
    """

    retention: Retention = "interest"
    max_messages: int | None = None
    max_age: float | None = None
    overflow: Overflow = "drop_oldest"
    dedup_window: float = DEDUP_WINDOW
    dedup_max_ids: int = DEDUP_MAX_IDS

    def __attrs_post_init__(self) -> None:
        if self.retention not in ("interest", "limits", "workqueue"):
            raise InvalidArgument(f"retention must be 'interest', 'limits' or 'workqueue', got {self.retention!r}")
        if self.overflow not in ("drop_oldest", "reject"):
            raise InvalidArgument(f"overflow must be 'drop_oldest' or 'reject', got {self.overflow!r}")
        _check_limit("max_messages", self.max_messages, integer=True)
        _check_limit("max_age", self.max_age, integer=False)
        if self.overflow == "reject" and self.max_messages is None:
            raise InvalidArgument("overflow='reject' needs max_messages to say when the queue is full")
        if not is_finite_number(self.dedup_window) or not self.dedup_window > 0:
            raise InvalidArgument(
                f"dedup_window must be a positive, finite number of seconds, got {self.dedup_window!r}"
            )
        max_ids = self.dedup_max_ids
        if isinstance(max_ids, bool) or not isinstance(max_ids, int) or max_ids < 1:
            raise InvalidArgument(f"dedup_max_ids must be an int >= 1, got {max_ids!r}")


@attrs.frozen
class Backoff:
    """Delay before redelivering a message whose push callback raised.

    The n-th failure waits ``min(initial * factor ** (n - 1), maximum)`` seconds of broker clock.
    """

    initial: float = attrs.field(default=0.1)
    factor: float = attrs.field(default=2.0)
    maximum: float = attrs.field(default=30.0)

    def __attrs_post_init__(self) -> None:
        for field, least in (("initial", 0.0), ("factor", 1.0), ("maximum", 0.0)):
            value = getattr(self, field)
            if not is_finite_number(value) or not value >= least:
                raise InvalidArgument(f"Backoff needs {field} >= {least:g}, a finite number, got {field}={value!r}")
        if not self.maximum >= self.initial:
            raise InvalidArgument(f"Backoff needs maximum >= initial, got {self!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed delivery (1-based)."""
        try:
            grown = self.initial * self.factor ** max(failures - 1, 0)
        except OverflowError:  # float ** raises where * gives inf: the n-th failure of many
            return float(self.maximum)
        return float(grown if grown < self.maximum else self.maximum)


# The JSON types of what SubscriptionSettings.to_stored writes, by key, for from_stored to check.
_STORED_TYPES: dict[str, tuple[type, ...]] = {
    "events": (list, type(None)),
    "manual_ack": (bool,),
    "ack_timeout": (float, int, type(None)),
    "max_deliveries": (int, type(None)),
    "dead_letter": (str,),
    "backoff": (list,),
}
_JSON_NAMES: dict[type, str] = {
    list: "a list",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}


@attrs.frozen
class SubscriptionSettings:
    """What every subscription attached to one cursor must agree on.

    The one form of a cursor's settings: compared on attach, applied on reload, and stored on a
    file through :meth:`to_stored` / :meth:`from_stored`.
    """

    event_filter: EventFilter = attrs.field(factory=lambda: EventFilter(None))
    manual_ack: bool = False
    ack_timeout: float | None = None
    max_deliveries: int | None = None
    dead_letter: str = ""
    backoff: Backoff = attrs.field(factory=Backoff)

    @classmethod
    def from_arguments(
        cls,
        event_filter: EventFilter,
        *,
        ack: object,
        ack_timeout: object,
        max_deliveries: object,
        dead_letter: str,
        backoff: object,
    ) -> SubscriptionSettings:
        """The settings ``Broker.subscribe`` was given, each checked.

        Raises:
            InvalidArgument: naming the argument that is wrong, and its value.
        """
        if ack not in ("auto", "manual"):
            raise InvalidArgument(f"ack must be 'auto' or 'manual', got {ack!r}")
        if ack_timeout is not None:
            if ack != "manual":
                raise InvalidArgument("ack_timeout applies only to ack='manual' subscriptions")
            if not is_finite_number(ack_timeout) or not ack_timeout > 0:
                raise InvalidArgument(
                    f"ack_timeout must be a positive, finite number of seconds (None: no timeout), got {ack_timeout!r}"
                )
        if max_deliveries is not None and (
            isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) or max_deliveries < 1
        ):
            raise InvalidArgument(f"max_deliveries must be None or an int >= 1, got {max_deliveries!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise InvalidArgument(f"backoff must be a mqlite.Backoff, got {backoff!r}")
        return cls(
            event_filter,
            ack == "manual",
            None if ack_timeout is None else float(ack_timeout),
            max_deliveries,
            dead_letter,
            backoff if backoff is not None else Backoff(),
        )

    def describe(self) -> str:
        """The settings as a person reads them, for conflict messages."""
        return (
            f"events={self.event_filter.spec!r}, ack={'manual' if self.manual_ack else 'auto'}, "
            f"ack_timeout={self.ack_timeout!r}, max_deliveries={self.max_deliveries!r}, "
            f"dead_letter={self.dead_letter!r}"
        )

    def to_stored(self) -> dict[str, Any]:
        """The JSON-ready form a file keeps."""
        spec = self.event_filter.spec
        backoff = self.backoff
        return {
            "events": None if spec is None else list(spec),
            "manual_ack": self.manual_ack,
            "ack_timeout": self.ack_timeout,
            "max_deliveries": self.max_deliveries,
            "dead_letter": self.dead_letter,
            "backoff": [backoff.initial, backoff.factor, backoff.maximum],
        }

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> SubscriptionSettings:
        """The settings a file keeps, as :meth:`to_stored` wrote them.

        Raises:
            InvalidArgument: a value is not of the type :meth:`to_stored` writes (naming its
                key), or the stored backoff is not one.
            InvalidName: the stored event filter is not one.
            KeyError: a key is missing.
        """
        for key, kinds in _STORED_TYPES.items():
            if type(stored[key]) not in kinds:  # exact types: what json.loads makes, where a bool is no int
                expected = " or ".join(_JSON_NAMES[kind] for kind in kinds)
                raise InvalidArgument(f"{key} must be {expected}, got {stored[key]!r}")
        backoff = stored["backoff"]
        if len(backoff) != 3 or any(type(n) not in (float, int) for n in backoff):
            raise InvalidArgument(f"backoff must be [initial, factor, maximum], three numbers, got {backoff!r}")
        return cls(
            EventFilter(stored["events"]),
            stored["manual_ack"],
            stored["ack_timeout"],
            stored["max_deliveries"],
            stored["dead_letter"],
            Backoff(*stored["backoff"]),
        )
