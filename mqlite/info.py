"""Frozen snapshots returned by ``Broker.info()``: who reads what, and how far behind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from mqlite.message import Message

__all__ = ["BrokerInfo", "PendingMessage", "QueueInfo", "SubscriptionInfo"]


@attrs.frozen
class PendingMessage:
    """One pending message of a subscription, as :meth:`Subscription.pending_messages` lists it."""

    message: Message
    """The message as retained (its ``attempt`` says 1; see :attr:`attempts`)."""
    attempts: int
    """Deliveries made so far: 1 while its first delivery is out, 0 if it was given back unread."""
    state: Literal["out", "waiting", "ready"]
    """``out``: a consumer holds it; ``waiting``: its nack delay or backoff has not ended;
    ``ready``: due for the next consumer that reads."""
    holder: str | None
    """Who holds it while ``out``: a subscription of this broker (``"queue/name#id"``), or
    ``"broker <instance>"`` for another broker on the same file. None otherwise."""
    held_since: float | None
    """When the holder took it, in the broker clock's wall time (None when not out, or unknown)."""
    due: float | None
    """When a ``waiting`` message is due again, in the broker clock's wall time."""

    @property
    def offset(self) -> int:
        """The message's offset."""
        return self.message.offset


@attrs.frozen
class QueueInfo:
    """One queue at the moment of the snapshot."""

    name: str
    start_offset: int
    """The oldest retained offset."""
    end_offset: int
    """The offset the next message will get."""
    retained: int
    retention: str
    max_messages: int | None
    max_age: float | None
    overflow: str
    waiters: int = 0
    """How many readers (threads, tasks, push workers) are blocked waiting on this queue. A
    ``ManualDispatcher`` waits with one for all the push subscriptions of a queue that want every
    event, and one for each filtered one."""
    dropped: int = 0
    """Messages this broker published that no subscription wanted, so that ``retention="interest"``
    dropped them at once (``publish`` still returned them). Always 0 for the other retentions,
    which keep such messages. Each drop is also logged at debug level on the ``"mqlite"`` logger."""
    duplicates: int = 0
    """Publishes this broker refused as duplicates: their ``dedup_id`` had been published within
    the duplicate window, so nothing was written and the first message was returned."""
    dedup_window: float = 120.0
    """Seconds a ``dedup_id`` is remembered from its first publish (``QueueConfig.dedup_window``)."""


@attrs.frozen
class SubscriptionInfo:
    """One cursor: a named subscription (attached or not) or an open ephemeral one."""

    queue: str
    name: str | None
    """None for an ephemeral subscription."""
    durable: bool
    events: tuple[str, ...] | None
    """The event filter; None means every event."""
    mode: Literal["push", "pull", "push+pull", "detached"]
    consumers: int
    """How many subscriptions are attached (competing) right now: on a file that several brokers
    share, in every live broker on the file, not only this one."""
    subscription_ids: tuple[int, ...]
    ack: Literal["auto", "manual"]
    position: int
    lag: int
    """Matching messages between the position and the end of the queue."""
    pending: int
    """Delivered but not yet acknowledged (including those waiting for a retry)."""
    delivered: int
    acked: int
    redelivered: int
    dead_lettered: int
    missed: int
    """Matching messages retention dropped before this cursor read them."""
    consumers_by_broker: tuple[tuple[str, int], ...] = ()
    """On a file that several brokers share: ``(broker instance, consumers)`` for each live broker
    with consumers attached to this named subscription, this broker first. Empty otherwise."""


_COLUMNS = (
    ("queue", "queue"),
    ("subscription", "name"),
    ("events", "events"),
    ("mode", "mode"),
    ("consumers", "consumers"),
    ("position", "position"),
    ("lag", "lag"),
    ("pending", "pending"),
    ("delivered", "delivered"),
    ("acked", "acked"),
    ("redelivered", "redelivered"),
    ("dead", "dead_lettered"),
    ("missed", "missed"),
)


def _cell(value: object) -> str:
    if value is None:
        return "*"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


@attrs.frozen
class BrokerInfo:
    """Every queue and every cursor. Each queue's figures are consistent with each other."""

    queues: tuple[QueueInfo, ...]
    subscriptions: tuple[SubscriptionInfo, ...]

    def queue(self, name: str) -> QueueInfo:
        """The queue called ``name``; KeyError if there is none."""
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def subscription(self, queue: str, name: str) -> SubscriptionInfo:
        """The named subscription on ``queue``; KeyError if there is none."""
        for sub in self.subscriptions:
            if sub.queue == queue and sub.name == name:
                return sub
        raise KeyError((queue, name))

    def format(self) -> str:
        """Two plain-text tables: queues, then subscriptions with their lag and pending counts."""
        queue_rows = [
            [q.name, str(q.start_offset), str(q.end_offset), str(q.retained), q.retention] for q in self.queues
        ]
        sub_rows = []
        for sub in self.subscriptions:
            row = []
            for _, field in _COLUMNS:
                value = getattr(sub, field)
                row.append("(ephemeral)" if field == "name" and value is None else _cell(value))
            sub_rows.append(row)
        return (
            _table(["queue", "start", "end", "retained", "retention"], queue_rows)
            + "\n\n"
            + _table([title for title, _ in _COLUMNS], sub_rows)
        )

    def __str__(self) -> str:
        return self.format()
