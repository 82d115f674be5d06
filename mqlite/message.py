"""Message: the immutable value that flows through mqlite."""

from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple

from mqlite.errors import InvalidArgument

__all__ = [
    "EMPTY_HEADERS",
    "Message",
    "MessageMeta",
    "check_header_names",
    "make_meta",
    "message_class",
    "original",
    "redelivery",
]

EMPTY_HEADERS: Mapping[str, Any] = MappingProxyType({})


class MessageMeta(NamedTuple):
    """The rarely varying part of a message, shared by every message of a queue without key/headers."""

    queue: str
    key: Any
    headers: Mapping[str, Any]


_tuple_new = tuple.__new__


class Message(tuple):  # type: ignore[type-arg]  # a 4-, 5- or 6-tuple laid out as documented below
    """One message of a queue: immutable, compared by value, hashed by queue and offset. Thread-safe.

    A message is a tuple subclass, like ``os.stat_result``, because that is the fastest immutable
    record CPython can build and the smallest one it can keep (see ``docs/benchmarks.md``). Read
    it by attribute. Each queue stamps its messages with its own subclass that knows the queue's
    name, so a message with no key and no headers stores only four fields. The fifth holds the
    :class:`MessageMeta` (queue, key, headers) when needed; a redelivery's copy (see
    :func:`redelivery`) adds the attempt as a sixth, so retained messages never pay for it.

    Attributes:
        queue: The name of the queue it was published to.
        event: Its event type, such as ``"created"``.
        payload: Whatever was published; mqlite never copies or inspects it.
        offset: Its position in the queue's log, from 0, never reused.
        timestamp: When it was appended, in seconds since the epoch, from the broker's clock.
        key: An optional user key (not interpreted by the in-memory broker).
        headers: A read-only mapping of header names to values; empty when none were given.
        attempt: Which delivery of the message this is, to the subscription that received it: 1
            the first time, 2 for the first redelivery, and so on (counted across restarts and
            processes on a file). A message that was not delivered (returned by ``publish``)
            says 1. A redelivery hands out a new object, equal to the first one.
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
    def attempt(self) -> int:
        """Which delivery of the message this is: 1 the first time (see the class docstring)."""
        return self[5] if len(self) > 5 else 1

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
        if len(self) > 5:
            extra += f", attempt={self[5]}"
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


def redelivery(message: Message, attempt: int) -> Message:
    """``message`` as handed out for its ``attempt``-th delivery: a new object of its class, equal to it."""
    meta = message[4] if len(message) > 4 else MessageMeta(message._queue, None, EMPTY_HEADERS)
    copy: Message = _tuple_new(type(message), (message[0], message[1], message[2], message[3], meta, attempt))
    return copy


def original(message: Message) -> Message:
    """The message as retained, without the attempt a redelivery's copy carries."""
    if len(message) < 6:
        return message
    plain: Message = _tuple_new(type(message), tuple(message)[:5])
    return plain
