"""Queue: the public face of one named append-only log, over whichever engine stores it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mqlite.config import QueueConfig
from mqlite.engine.base import QueueEngine
from mqlite.errors import InvalidArgument
from mqlite.message import Message

__all__ = ["Queue"]


_KEYS = frozenset({"event", "payload", "key", "headers", "dedup_id"})


def _draft(item: object) -> tuple[tuple[Any, Any, Any, Mapping[str, Any] | None], Any]:
    """One ``publish_many`` item as ``(event, payload, key, headers)`` and its dedup id."""
    if isinstance(item, tuple) and 2 <= len(item) <= 5:
        event, payload, key, headers, dedup_id = (*item, None, None, None)[:5]
        return (event, payload, key, headers), dedup_id
    if isinstance(item, Mapping) and "event" in item and not set(item) - _KEYS:
        return (item["event"], item.get("payload"), item.get("key"), item.get("headers")), item.get("dedup_id")
    raise InvalidArgument(
        "publish_many takes (event, payload), (event, payload, key), (event, payload, key, headers) or "
        f"(event, payload, key, headers, dedup_id) tuples, or mappings with those keys, got {item!r}"
    )


class Queue:
    """A named append-only log of messages. Thread-safe.

    Publish appends a message and gives it the next offset. Get one with
    ``broker.queue(name)``; do not construct it yourself.
    """

    def __init__(self, engine: QueueEngine) -> None:
        self._engine = engine
        self.name = engine.name
        # Bound straight to the engine's publish: no frame between the caller and the append.
        self.publish = engine.publish  # type: ignore[method-assign]  # the method below documents it

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Append one message and return it with its offset.

        With a ``dedup_id``, a retry is safe: if a message with the same id was published to
        this queue within its duplicate window (``QueueConfig.dedup_window``, counted from that
        first publish), nothing is written and that first message is returned, with its offset.
        See ``docs/one-time-delivery.md``.

        Raises:
            InvalidName: ``event`` is not a non-empty str, or contains a wildcard character.
            InvalidArgument: ``headers`` is not a mapping, or ``dedup_id`` is not a non-empty str.
            QueueFull: the queue has ``overflow="reject"`` and holds ``max_messages``.
            BrokerClosed: the broker was closed.
        """
        if dedup_id is None:
            return self._engine.publish(event, payload, key, headers)
        return self._engine.publish(event, payload, key, headers, dedup_id)

    def publish_many(self, items: Iterable[object]) -> list[Message]:
        """Append several messages at contiguous offsets, all or none, with one timestamp.

        Each item is ``(event, payload)``, ``(event, payload, key)``, ``(event, payload, key,
        headers)``, ``(event, payload, key, headers, dedup_id)``, or a mapping with the key
        ``event`` and, optionally, ``payload``, ``key``, ``headers`` and ``dedup_id``. An item
        whose dedup id was published within the duplicate window, or repeats an earlier item's,
        is not written: its place in the result holds the first message with that id.

        Raises:
            InvalidArgument: an item is none of those, or its headers are not a mapping.
            InvalidName: an event name is invalid. Nothing was appended.
            QueueFull: they do not all fit. Nothing was appended.
            BrokerClosed: the broker was closed.
        """
        try:
            iterator = iter(items)
        except TypeError:
            raise InvalidArgument(
                f"publish_many takes an iterable of messages, got {type(items).__name__}: {items!r}"
            ) from None
        drafts = []
        dedup_ids = []
        for item in iterator:
            draft, dedup_id = _draft(item)
            drafts.append(draft)
            dedup_ids.append(dedup_id)
        if any(dedup_id is not None for dedup_id in dedup_ids):
            return self._engine.publish_many(drafts, dedup_ids)
        return self._engine.publish_many(drafts)

    @property
    def config(self) -> QueueConfig:
        """The retention settings in force."""
        return self._engine.config

    def configure(self, config: QueueConfig) -> None:
        """Apply new retention settings at once (``broker.queue(name, ...)`` does this too)."""
        if not isinstance(config, QueueConfig):
            raise InvalidArgument(f"configure() takes a mqlite.QueueConfig, got {config!r}")
        self._engine.configure(config)

    @property
    def waiting(self) -> int:
        """How many readers (threads, tasks, push workers) are blocked waiting on this queue now."""
        return self._engine.snapshot().waiters

    @property
    def start_offset(self) -> int:
        """The oldest retained offset (equal to ``end_offset`` when nothing is retained)."""
        return self._engine.bounds()[0]

    @property
    def end_offset(self) -> int:
        """The offset the next published message will get."""
        return self._engine.bounds()[1]

    def __len__(self) -> int:
        """How many messages are retained."""
        start, end = self._engine.bounds()
        return end - start

    def __repr__(self) -> str:
        start, end = self._engine.bounds()
        return f"<mqlite.Queue {self.name!r} offsets [{start}, {end})>"
