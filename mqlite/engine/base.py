"""The engine seam: what the faces (queue, subscription, dispatch, broker) ask of storage.

A :class:`StorageEngine` is one broker's storage: it lists and opens queues, flushes and closes.
Each queue it opens is a :class:`QueueEngine`, whose every method is one queue operation run
as one atomic step: it completes, or raises and changes nothing. A step never blocks without a
bound and never runs user code; waiting happens above it, in :mod:`mqlite._waiting`, through
the one-shot waiters a step registers.

In-memory and SQLite engines decide in Python with the pure rules of :mod:`mqlite._delivery`
(through :mod:`mqlite.engine.core`); a server-side engine (Redis Streams) may run each step as
one server script instead. Every engine proves the same behaviour by passing
:func:`mqlite.testing.check_engine`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, Protocol, TypeVar

import attrs

from mqlite._delivery.entries import DeadLetter
from mqlite._delivery.waiters import Waiter
from mqlite.clock import Clock
from mqlite.config import QueueConfig, Start, SubscriptionSettings
from mqlite.errors import InvalidArgument, NotPending
from mqlite.filters import EventFilter
from mqlite.info import PendingMessage, QueueInfo, SubscriptionInfo
from mqlite.message import Message

if TYPE_CHECKING:
    from mqlite._delivery.cursor import Cursor
    from mqlite.engine.locking import Scope

__all__ = [
    "Attempt",
    "Capabilities",
    "Consumer",
    "CursorFigures",
    "CursorStats",
    "DeadLetterSink",
    "QueueEngine",
    "QueueSnapshot",
    "StorageEngine",
    "UnsettledQueues",
]

_T = TypeVar("_T")

DeadLetterSink = Callable[[list[DeadLetter]], list[DeadLetter]]
"""Publishes dead letters (outside any queue scope); returns the ones it published."""


@attrs.frozen
class Capabilities:
    """What an engine can do, for the faces and the tests to ask rather than guess.

    Attributes:
        shared: Several brokers (processes, hosts) may open the same storage at once.
        persistent: Messages and durable cursors survive closing the broker.
        blocking_io: Operations do I/O that may block (a file, a network): async faces run them
            off the event loop.
        event_filter: Where event filters are applied: ``"client"`` (this process reads every
            message and filters) or ``"server"``.
        exact_counts: ``lag`` and ``missed`` are exact for filtered cursors.
        retentions: The ``QueueConfig.retention`` values it implements; a queue asking for
            another is refused.
        transactions: ``Broker.transaction()`` works (the engine has ``begin_transaction``).
    """

    shared: bool
    persistent: bool
    blocking_io: bool
    event_filter: Literal["client", "server"] = "client"
    exact_counts: bool = True
    retentions: tuple[str, ...] = ("interest", "limits")
    transactions: bool = True


class Consumer(Protocol):
    """What an engine needs of a subscription attached to one of its cursors."""

    id: int
    name: str | None
    _is_push: bool
    closed: bool
    _buffer: deque[Message]
    _cursor: Cursor
    _manual_read_ahead: bool
    """Whether it may read ahead with manual acks: it hands out what it read ahead itself, and
    counts it (the compat faces). See :func:`mqlite._delivery.policy.read_ahead_size`."""

    @property
    def _label(self) -> str: ...

    def _mark_closed(self, reason: str) -> None: ...

    def _reopen(self) -> None:
        """Undo :meth:`_mark_closed` of an operation that failed and was rolled back."""
        ...

    def close(self) -> None: ...

    def _closed_reason(self) -> str: ...


class Attempt(NamedTuple, Generic[_T]):
    """One try at a wait-able operation.

    ``done`` tells whether it got what it waited for; if not, ``waiter`` is registered (when a
    wake function was given) and ``wait_at_most`` bounds the wait (a timer of the cursor falls
    due then), or is None.
    """

    done: bool
    value: _T
    waiter: Waiter | None
    wait_at_most: float | None


class CursorStats(NamedTuple):
    """A cursor's place, read atomically."""

    position: int
    lag: int
    pending: int
    missed: int


@attrs.frozen
class CursorFigures:
    """One cursor as ``info()`` reports it."""

    name: str | None
    events: tuple[str, ...] | None
    manual_ack: bool
    members: tuple[Consumer, ...]
    position: int
    lag: int
    pending: int
    delivered: int
    acked: int
    redelivered: int
    dead_lettered: int
    missed: int
    elsewhere: tuple[tuple[str, int], ...] = ()
    """Shared storage: ``(broker instance, consumers)`` attached in other live brokers."""
    here: str | None = None
    """Shared storage: this broker's instance name, for ``consumers_by_broker``."""

    def to_info(self, queue: str) -> SubscriptionInfo:
        """The public record of this cursor of ``queue``."""
        members = self.members
        by_broker = self.elsewhere
        if self.here is not None and members:
            by_broker = ((self.here, len(members)), *by_broker)
        push = any(m._is_push for m in members)
        pull = any(not m._is_push for m in members)
        mode: Literal["push", "pull", "push+pull", "detached"] = (
            "push+pull" if push and pull else "push" if push else "pull" if pull else "detached"
        )
        return SubscriptionInfo(
            queue=queue,
            name=self.name,
            durable=self.name is not None,
            events=self.events,
            mode=mode,
            consumers=len(members) + sum(count for _, count in self.elsewhere),
            subscription_ids=tuple(m.id for m in members),
            ack="manual" if self.manual_ack else "auto",
            position=self.position,
            lag=self.lag,
            pending=self.pending,
            delivered=self.delivered,
            acked=self.acked,
            redelivered=self.redelivered,
            dead_lettered=self.dead_lettered,
            missed=self.missed,
            consumers_by_broker=by_broker,
        )


@attrs.frozen
class QueueSnapshot:
    """A queue's figures and each cursor's, taken in one step."""

    config: QueueConfig
    start_offset: int
    end_offset: int
    cursors: tuple[CursorFigures, ...]
    waiters: int
    dropped: int = 0
    duplicates: int = 0

    def to_info(self, queue: str) -> tuple[QueueInfo, list[SubscriptionInfo]]:
        """The public records of this snapshot of ``queue``, as ``Broker.info()`` reports them."""
        config = self.config
        queue_info = QueueInfo(
            name=queue,
            start_offset=self.start_offset,
            end_offset=self.end_offset,
            retained=self.end_offset - self.start_offset,
            retention=config.retention,
            max_messages=config.max_messages,
            max_age=config.max_age,
            overflow=config.overflow,
            waiters=self.waiters,
            dropped=self.dropped,
            duplicates=self.duplicates,
            dedup_window=config.dedup_window,
        )
        return queue_info, [figures.to_info(queue) for figures in self.cursors]


class UnsettledQueues(Protocol):
    """Where a broker keeps the queues whose push cursors may not have handled everything, so
    that a drain looks at those alone (see :meth:`QueueEngine.watch_settled`).

    A queue calls both methods with its own lock held: the lock order is a queue's lock, then
    this set's.
    """

    def add(self, queue: QueueEngine, end: int) -> None:
        """``queue``, settled up to ``end`` until now, may have push work not yet handled: drains look at it."""
        ...

    def discard(self, queue: QueueEngine) -> None:
        """``queue`` found every push cursor settled up to its end: drains need not look at it."""
        ...

    def add_timed(self, queue: QueueEngine) -> None:
        """A push cursor of ``queue`` may have a timer (an ack timeout, a retry delay).

        ``run_until_idle`` looks at it then.
        """
        ...

    def discard_timed(self, queue: QueueEngine) -> None:
        """``queue`` found no push cursor with a timer."""
        ...


class QueueEngine(Protocol):
    """One queue of an engine. Thread-safe: every method is one atomic step.

    Raises, of every method: ``BrokerClosed``, ``SubscriptionClosed``, ``StorageError`` as the
    public API documents them; a step that raises changed nothing.
    """

    name: str
    message_class: type[Message]
    """This queue's own Message subclass, unique to this engine instance. Every message it hands
    out is one, also those read back from storage. ``ack``/``nack`` refuse a Message of any other
    class with ``NotPending``: it came from another queue or another broker, or was built by hand."""
    atomic: bool
    """Whether every step that raises changed nothing, so that it can simply be made again. True
    for memory and a ``commit="each"`` file; a ``commit="batch"`` file returns before its writes
    commit, and once its writer failed a step may raise after changing memory."""

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message: ...

    def publish_many(
        self,
        drafts: Sequence[tuple[str, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[Message]:
        """Publish drafts, all or none; ``dedup_ids`` (one per draft, or None) as for ``publish``."""
        ...

    @property
    def config(self) -> QueueConfig: ...

    def configure(self, config: QueueConfig) -> None: ...

    def bounds(self) -> tuple[int, int]:
        """``(start_offset, end_offset)``: the oldest retained offset and the next to assign."""
        ...

    def attach(self, consumer: Consumer, name: str | None, start: Start, settings: SubscriptionSettings) -> Cursor: ...

    def detach(self, consumer: Consumer) -> None: ...

    def delete_cursor(self, name: str) -> bool: ...

    def try_pull(self, consumer: Consumer, max_messages: int, read_ahead: int) -> list[Message]: ...

    def pull_or_wait(
        self, consumer: Consumer, max_messages: int, read_ahead: int, wake: Callable[[], object]
    ) -> Attempt[list[Message]]: ...

    def try_push(self, consumer: Consumer, max_messages: int) -> list[Message] | None: ...

    def push_or_wait(
        self, consumer: Consumer, max_messages: int, wake: Callable[[], object]
    ) -> Attempt[list[Message] | None]: ...

    def push_done(
        self,
        consumer: Consumer,
        batch: list[Message],
        failures: list[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None: ...

    def ack(self, consumer: Consumer, messages: tuple[Message | int, ...]) -> None: ...

    def nack(self, consumer: Consumer, message: Message | int, delay: float) -> None: ...

    def seek(self, consumer: Consumer, target: Start) -> int: ...

    def set_filter(self, consumer: Consumer, change: Callable[[EventFilter], EventFilter]) -> EventFilter: ...

    def remove_waiter(self, waiter: Waiter | None) -> None: ...

    def give_back(self, consumer: Consumer) -> None:
        """Return what ``consumer`` read ahead to the front of its cursor's line, unread."""
        ...

    def wake_all(self) -> None: ...

    def cursor_stats(self, consumer: Consumer) -> CursorStats: ...

    def pending_messages(self, consumer: Consumer) -> list[PendingMessage]:
        """The consumer's cursor's pending messages by offset, held here or by other brokers."""
        ...

    def pending_messages_of(self, name: str) -> list[PendingMessage]:
        """:meth:`pending_messages` of the durable cursor ``name`` (none if it does not exist)."""
        ...

    def snapshot(self) -> QueueSnapshot: ...

    def drain_start(self) -> tuple[int, bool, bool]:
        """``(end_offset, settled, out)`` as a drain begins: ``settled`` if every push cursor is
        known to have handled everything below the end, ``out`` if a push batch may be out."""
        ...

    def push_unsettled(self, offset: int, cursors: list[Cursor] | None = None) -> list[Cursor]: ...

    def watch_settled(self, unsettled: UnsettledQueues) -> bool:
        """Keep ``unsettled`` up to date from now on, if this queue can: it is in the set whenever
        ``drain_start`` would not say settled (it adds itself now if so). False if it cannot; a
        drain then looks at it every time."""
        ...

    def close(self) -> list[Consumer]: ...


class StorageEngine(Protocol):
    """One broker's storage: where its queues live. Thread-safe."""

    capabilities: Capabilities

    @property
    def path(self) -> str | None:
        """The file or URL the engine keeps its state in; None in memory."""
        ...

    def queues(self) -> list[tuple[str, QueueConfig]]:
        """The queues the storage already holds, with their settings."""
        ...

    def open_queue(self, name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink) -> QueueEngine:
        """Open (creating if new, with ``config``) the queue ``name``."""
        ...

    def begin_transaction(self) -> Scope:
        """The scope of a new transaction (see :mod:`mqlite.engine.locking`); only if
        ``capabilities.transactions``."""
        ...

    def flush(self, timeout: float | None) -> bool:
        """Wait until every write made so far is durable; False if ``timeout`` passed first."""
        ...

    def close(self) -> None:
        """Release the storage; bounded. Idempotent."""
        ...


# -- helpers every engine's consumer side shares --------------------------------------------------


def offset_to_settle(message: object, queue: str, message_class: type[Message], verb: str) -> int:
    """The offset that ``ack``/``nack`` of ``message`` on ``queue`` means.

    Raises:
        NotPending: a Message of another queue, or built elsewhere than this queue.
        InvalidArgument: neither a Message nor an int offset.
    """
    if type(message) is message_class:
        offset: int = message[2]  # a Message of this queue
        return offset
    if isinstance(message, Message):
        if message.queue != queue:
            raise NotPending(f"cannot {verb} a message of queue {message.queue!r} on a subscription to {queue!r}")
        # Equal to one of this queue's, perhaps, but built elsewhere: not the one delivered here.
        raise NotPending(
            f"cannot {verb} offset {message.offset} of {message.queue!r}: that Message came from another "
            f"broker (or was built by hand); {verb} the one this subscription delivered"
        )
    if isinstance(message, int) and not isinstance(message, bool):
        return message
    raise InvalidArgument(f"{verb}() takes a Message or its int offset, got {type(message).__name__}")


def drain_buffer(consumer: Consumer) -> list[Message]:
    """Empty what ``consumer`` read ahead and never handed out, in order."""
    buffer = consumer._buffer
    unread = []
    while buffer:  # popleft, not list()+clear(): a racing lock-free pop gets each message at most once
        try:
            unread.append(buffer.popleft())
        except IndexError:
            break
    return unread
