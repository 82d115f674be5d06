"""Message: the immutable value that flows through mqlite."""

from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple

from mqlite.errors import InvalidArgument

__all__ = ["EMPTY_HEADERS", "Message", "MessageMeta", "check_header_names", "make_meta", "message_class"]

EMPTY_HEADERS: Mapping[str, Any] = MappingProxyType({})


class MessageMeta(NamedTuple):
    """The rarely varying part of a message, shared by every message of a queue without key/headers."""

    queue: str
    key: Any
    headers: Mapping[str, Any]


_tuple_new = tuple.__new__


class Message(tuple):  # type: ignore[type-arg]  # a 4- or 5-tuple laid out as documented below
    """One message of a queue: immutable, compared by value, hashed by queue and offset. Thread-safe.

    A message is a tuple subclass, like ``os.stat_result``, because that is the fastest immutable
    record CPython can build and the smallest one it can keep (see ``docs/benchmarks.md``). Read
    it by attribute. Each queue stamps its messages with its own subclass that knows the queue's
    name, so a message with no key and no headers stores only four fields.

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
    _queue: str = ""  # set by each queue's subclass

    # C-level itemgetter properties: attribute reads cost no Python frame. mypy sees a property
    # assigned to a typed name, hence the ignores.
    event: str = property(itemgetter(0))  # type: ignore[assignment]
    payload: Any = property(itemgetter(1))
    offset: int = property(itemgetter(2))  # type: ignore[assignment]
    timestamp: float = property(itemgetter(3))  # type: ignore[assignment]

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
        return _tuple_new(cls, (event, payload, offset, timestamp, make_meta(queue, key, headers)))

    @property
    def queue(self) -> str:
        """The name of the queue this message belongs to."""
        return self[4].queue if len(self) > 4 else self._queue

    @property
    def key(self) -> Any:
        """The key given at publish, or None."""
        return self[4].key if len(self) > 4 else None

    @property
    def headers(self) -> Mapping[str, Any]:
        """The headers given at publish, as a read-only mapping (empty when none were given)."""
        return self[4].headers if len(self) > 4 else EMPTY_HEADERS

    def _fields(self) -> tuple[Any, ...]:
        return (self.queue, self[0], self[1], self[2], self[3], self.key, dict(self.headers))

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickles as a plain Message: a queue's own subclass exists only in its process.
        return (Message, self._fields())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._fields() == other._fields()

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._fields() != other._fields()

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
        # Payloads are often dicts, so hash by where the message sits in the log, not its payload.
        return hash((self.queue, self[2], self[0]))


def message_class(queue: str) -> type[Message]:
    """The Message subclass whose four-field instances belong to ``queue``."""
    return type("Message", (Message,), {"__slots__": (), "_queue": queue, "__module__": __name__})


def make_meta(queue: str, key: Any, headers: Mapping[str, Any] | None) -> MessageMeta:
    """Build the meta part for a publish with a key or headers."""
    if headers is None:
        frozen: Mapping[str, Any] = EMPTY_HEADERS
    elif not isinstance(headers, Mapping):
        raise InvalidArgument(f"headers must be a mapping or None, got {type(headers).__name__}: {headers!r}")
    else:
        frozen = MappingProxyType(dict(headers)) if headers else EMPTY_HEADERS
    return MessageMeta(queue, key, frozen)


def check_header_names(headers: Mapping[str, Any]) -> None:
    """Refuse headers whose names are not str, for a publish.

    A file stores headers with its serializer, and a JSON key can only be a str (``1`` would
    read back as ``"1"``): memory refuses them too, so that headers read back the same on every
    engine. Loading a stored message does not check, so an old file always opens.
    """
    for name in headers:
        if type(name) is not str:
            raise InvalidArgument(f"headers names must be str, got {type(name).__name__}: {name!r}")


def new_message(
    cls: type[Message], event: str, payload: Any, offset: int, timestamp: float, meta: MessageMeta
) -> Message:
    """Build a message of the queue whose class is ``cls``, with an explicit meta part (loading one from storage)."""
    message: Message = _tuple_new(cls, (event, payload, offset, timestamp, meta))
    return message
