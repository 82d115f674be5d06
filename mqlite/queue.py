"""Queue: the public face of one named append-only log, over whichever engine stores it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mqlite.config import QueueConfig
from mqlite.engine.base import QueueEngine
from mqlite.errors import InvalidArgument
from mqlite.message import Message

__all__ = ["Queue"]


def _draft(item: object) -> tuple[Any, Any, Any, Mapping[str, Any] | None]:
    """One ``publish_many`` item as ``(event, payload, key, headers)``."""
    if isinstance(item, tuple) and 2 <= len(item) <= 4:
        event, payload, key, headers = (*item, None, None)[:4]
        return event, payload, key, headers
    if isinstance(item, Mapping) and "event" in item and not set(item) - {"event", "payload", "key", "headers"}:
        return item["event"], item.get("payload"), item.get("key"), item.get("headers")
    raise InvalidArgument(
        "publish_many takes (event, payload), (event, payload, key) or (event, payload, key, headers) "
        f"tuples, or mappings with those keys, got {item!r}"
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
    ) -> Message:
        """Append one message and return it with its offset.

        Raises:
            InvalidName: ``event`` is not a non-empty str, or contains a wildcard character.
            InvalidArgument: ``headers`` is not a mapping.
            QueueFull: the queue has ``overflow="reject"`` and holds ``max_messages``.
            BrokerClosed: the broker was closed.
        """
        return self._engine.publish(event, payload, key, headers)

    def publish_many(self, items: Iterable[object]) -> list[Message]:
        """Append several messages at contiguous offsets, all or none, with one timestamp.

        Each item is ``(event, payload)``, ``(event, payload, key)``, ``(event, payload, key,
        headers)``, or a mapping with the keys ``event`` and, optionally, ``payload``, ``key``
        and ``headers``.

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
        return self._engine.publish_many([_draft(item) for item in iterator])

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
