"""A cursor: the shared state of every subscription with one name on one queue.

Kafka's words: ``position`` is the next offset the cursor reads; what lies in
``[position, end_offset)`` and passes its filter is its lag. Delivered, unsettled messages are
its pending entries, ordered for redelivery by its :class:`~mqlite._delivery.schedule.Schedule`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqlite._delivery import policy
from mqlite._delivery.entries import Pending
from mqlite._delivery.schedule import Schedule
from mqlite.config import SubscriptionSettings
from mqlite.filters import EventFilter

if TYPE_CHECKING:
    from mqlite.engine.base import Consumer

__all__ = ["Cursor"]


class Cursor:
    """Position, filter, settings, pending entries and counters of one cursor. Not thread-safe.

    Its engine's queue scope (a lock, a transaction) guards every field.
    """

    def __init__(self, *, queue: str, name: str | None, position: int, settings: SubscriptionSettings) -> None:
        self.queue = queue
        self.name = name
        self.filter = settings.event_filter
        # names: the known event names that pass the filter, or None for "every event".
        self.names: set[str] | None = None
        self.position = position
        # Where in its one event's index list the last filtered read ended: the next read's
        # first guess, which the index checks before it trusts it (see EventIndex.read).
        self.index_hint = 0
        self.configure(settings)
        self.members: list[Consumer] = []
        self.pending: dict[int, Pending] = {}
        self.schedule = Schedule(self.pending)
        # Files only: offsets dead-lettered whose pending row stays until the letter is published.
        self.dead_in_transit: set[int] = set()
        # Files only: offsets of auto-ack push batches whose callbacks run. Not pending in memory
        # (a returning callback settles them), but saved as pending rows held by this broker, so
        # that a crash redelivers them; a reload must not take them for a dead broker's.
        self.pushing: set[int] = set()
        # Shared storage only: how many of this cursor's pending messages other live brokers
        # hold (not in ``pending``, which has only what this broker may deliver).
        self.held_elsewhere = 0
        self.inflight = 0  # push batches taken and not yet reported done
        self.delivered = 0
        self.acked = 0
        self.redelivered = 0
        self.dead_lettered = 0
        self.missed = 0

    @property
    def durable(self) -> bool:
        """Named cursors outlive their subscriptions; ephemeral ones die with theirs."""
        return self.name is not None

    def configure(self, settings: SubscriptionSettings) -> None:
        """Take ``settings``, all but the filter (which also changes the event index: the engine's job)."""
        self.settings = settings
        self.manual_ack = settings.manual_ack
        self.ack_timeout = settings.ack_timeout
        self.max_deliveries = settings.max_deliveries
        self.dead_letter = settings.dead_letter
        self.backoff = settings.backoff
        # The ack-mode rule for pulls, decided once per settings change instead of once per take.
        self.pull_settles = policy.settles_on_take(manual_ack=settings.manual_ack, push=False)

    def set_filter(self, event_filter: EventFilter) -> None:
        """Record a new filter in the settings (the engine recomputes ``names``)."""
        self.filter = event_filter
        if self.settings.event_filter != event_filter:
            self.settings = SubscriptionSettings(
                event_filter,
                self.manual_ack,
                self.ack_timeout,
                self.max_deliveries,
                self.dead_letter,
                self.backoff,
            )

    def unsettled_before(self, offset: int) -> bool:
        """Whether a message below ``offset`` still waits for a retry or an in-flight push batch."""
        if self.inflight:
            return True
        # Its schedule holds every entry that waits (READY or WAITING): a look there costs what
        # is to be redelivered, not every message delivered and not yet acked.
        return self.schedule.due_before(offset)

    @property
    def pending_count(self) -> int:
        """How many messages are pending on this cursor, wherever they are held."""
        return len(self.pending) + self.held_elsewhere

    def __repr__(self) -> str:
        return f"<Cursor {self.queue}/{self.name or '~'} position={self.position} pending={len(self.pending)}>"
