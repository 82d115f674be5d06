"""Message: the immutable value that flows through mqlite."""

from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple

from mqlite.errors import InvalidArgument

__all__ = ["EMPTY_HEADERS", "Message", "MessageMeta"]

EMPTY_HEADERS: Mapping[str, Any] = MappingProxyType({})


class MessageMeta(NamedTuple):
    """The rarely varying part of a message, shared by every message of a queue without key/headers."""

    queue: str
    key: Any
    headers: Mapping[str, Any]


_tuple_new = tuple.__new__


class Message(tuple):  # type: ignore[type-arg]  # a 5-tuple laid out as documented below
    """One message of a queue: immutable, compared by value, hashed by queue and offset. Thread-safe.

    A message is a tuple subclass, like ``os.stat_result``, because that is the fastest immutable
    record CPython can build and the smallest one it can keep: a retained message costs about
    140 bytes beyond its payload (see ``docs/benchmarks.md``). Read it by attribute.

    Attributes:
        queue: The name of the queue it was published to.
        event: Its event type, such as ``"created"``.
        payload: Whatever was published; mqlite never copies or inspects it.
        offset: Its position in the queue's log, from 0, never reused.
        timestamp: When it was appended, in seconds since the epoch, from the broker's clock.
        key: An optional user key (not interpreted by the in-memory broker).
        headers: A read-only mapping of header names to values; empty when none were given.
    """

    __slots__ = ()

    # C-level itemgetter properties: attribute reads cost no Python frame. mypy sees a property
    # assigned to a typed name, hence the ignores.
    event: str = property(itemgetter(0))  # type: ignore[assignment]
    payload: Any = property(itemgetter(1))
    offset: int = property(itemgetter(2))  # type: ignore[assignment]
    timestamp: float = property(itemgetter(3))  # type: ignore[assignment]
    _meta: MessageMeta = property(itemgetter(4))  # type: ignore[assignment]

    def __new__(
        cls,
        queue: str,
        event: str,
        payload: Any,
        offset: int,
        timestamp: float,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Message:
        frozen = EMPTY_HEADERS if not headers else MappingProxyType(dict(headers))
        return _tuple_new(cls, (event, payload, offset, timestamp, MessageMeta(queue, key, frozen)))

    @property
    def queue(self) -> str:
        """The name of the queue this message belongs to."""
        return self[4].queue  # type: ignore[no-any-return]  # self[4] is a MessageMeta

    @property
    def key(self) -> Any:
        """The key given at publish, or None."""
        return self[4].key

    @property
    def headers(self) -> Mapping[str, Any]:
        """The headers given at publish, as a read-only mapping (empty when none were given)."""
        return self[4].headers  # type: ignore[no-any-return]  # self[4] is a MessageMeta

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickle support
        return (self.queue, self.event, self.payload, self.offset, self.timestamp, self.key, dict(self.headers))

    def __repr__(self) -> str:
        extra = ""
        if self.key is not None:
            extra += f", key={self.key!r}"
        if self.headers:
            extra += f", headers={dict(self.headers)!r}"
        return (
            f"Message(queue={self.queue!r}, event={self.event!r}, offset={self.offset}, "
            f"payload={self.payload!r}, timestamp={self.timestamp!r}{extra})"
        )

    def __hash__(self) -> int:
        # Payloads are often dicts, so hash by identity of the log entry instead of the payload.
        return hash((self[4].queue, self[2], self[0]))


def make_meta(queue: str, key: Any, headers: Mapping[str, Any] | None) -> MessageMeta:
    """Build the meta part for a publish with a key or headers."""
    if headers is None or not headers:
        frozen: Mapping[str, Any] = EMPTY_HEADERS
    else:
        if not isinstance(headers, Mapping):
            raise InvalidArgument(f"headers must be a mapping or None, got {type(headers).__name__}")
        frozen = MappingProxyType(dict(headers))
    return MessageMeta(queue, key, frozen)


def new_message(event: str, payload: Any, offset: int, timestamp: float, meta: MessageMeta) -> Message:
    """The fast constructor used by the log: no validation, no copies."""
    return _tuple_new(Message, (event, payload, offset, timestamp, meta))
