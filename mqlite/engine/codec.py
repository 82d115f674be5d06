"""How a message is stored: the :class:`Serializer` protocol, JSON and pickle, and the row codec.

A stored message is the row ``(queue, event, offset, payload, key, headers, timestamp)``, its
payload, key and headers encoded by the broker's serializer. Any engine that stores bytes (the
SQLite file, later Redis) uses these functions, so this module knows no engine.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from mqlite.errors import SerializationError, StorageError
from mqlite.message import Message, make_meta, new_message

__all__ = ["JsonSerializer", "PickleSerializer", "Serializer", "decode_row", "encode_row"]


class Serializer(Protocol):
    """Turns payloads, keys and header mappings into bytes and back.

    ``name`` is stored in the file, so a file is never read with a serializer other than the one
    that wrote it.
    """

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_json_encoder() -> Callable[[Any, int], Any] | None:
    """The C encoder that ``json.JSONEncoder.encode`` builds anew on every call, built once (it
    saves about 2 µs per payload): the same settings and output, except that a circular value
    fails with RecursionError rather than ValueError. Stateless, so threads can share it. None
    where the C accelerator is missing."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    encoder: Callable[[Any, int], Any] = make(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    return encoder


_c_encode = _c_json_encoder()

_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in JSONDecoder.__init__, not declared in typeshed
"""The JSON value at an index of a text, and where it ends (C where CPython has it). Stateless
between calls, so threads can share it."""


class JsonSerializer:
    """The default: JSON, so opening a file never runs code. Thread-safe (stateless).

    Values come back as JSON types: tuples become lists, dict keys become str.
    """

    name = "json"
    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raises TypeError or ValueError when JSON cannot represent it."""
        if _c_encode is None:
            return self._encode(value).encode()
        return "".join(_c_encode(value, 0)).encode()

    def loads(self, data: bytes) -> Any:
        """Decode what :meth:`dumps` wrote.

        The scanner is called straight on the text :meth:`dumps` makes (no surrounding space):
        ``json.loads`` first guesses the encoding and matches whitespace twice with regexes,
        about 1 us of each message read. Anything else goes to ``json.loads``, which decodes
        it or raises as usual.
        """
        try:
            text = data.decode()
            value, end = _scan(text, 0)
        except (StopIteration, ValueError, AttributeError):
            return json.loads(data)
        if end != len(text):
            return json.loads(data)
        return value


class PickleSerializer:
    """Pickle: any picklable payload, exactly as it was. Thread-safe (stateless).

    UNSAFE for files you did not write yourself: unpickling runs code chosen by whoever wrote the
    file. Use it only for files that only your own program ever writes.
    """

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        """Pickle ``value`` with the highest protocol."""
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        """Unpickle; runs code from the file (see the class docstring)."""
        return pickle.loads(data)  # opt-in, documented as unsafe


Fields = tuple[bytes, bytes | None, bytes | None]
"""A message's encoded payload, key and headers: what a publish encodes before it takes a lock."""


def encode_fields(
    serializer: Serializer, queue: str, event: str, payload: Any, key: Any, headers: Mapping[str, Any]
) -> Fields:
    """The stored payload, key and headers of a message about to be published.

    Raises:
        SerializationError: the payload, key or headers cannot be encoded.
    """
    dumps = serializer.dumps
    try:
        return (
            dumps(payload),
            None if key is None else dumps(key),
            dumps(dict(headers)) if headers else None,
        )
    except Exception as error:  # any encoder failure is the user's value, reported as such
        raise SerializationError(
            f"cannot store the message {event!r} for queue {queue!r}: the "
            f"{serializer.name} serializer failed ({type(error).__name__}: {error}); publish "
            "JSON-compatible values or open the broker with another serializer. Nothing was written."
        ) from error


def encode_row(serializer: Serializer, message: Message) -> tuple[Any, ...]:
    """The stored row of ``message``: ``(queue, offset, event, payload, key, headers, timestamp)``.

    Raises:
        SerializationError: the payload, key or headers cannot be encoded.
    """
    fields = encode_fields(serializer, message.queue, message[0], message[1], message.key, message.headers)
    return (message.queue, message[2], message[0], *fields, message[3])


def decode_row(serializer: Serializer, cls: type[Message], row: Sequence[Any], where: str) -> Message:
    """The message stored as ``row``: ``(offset, event, payload, key, headers, timestamp)``.

    ``cls`` is the Message subclass of the queue it belongs to (``message_class``): the message
    is one, as if that queue had built it. ``where`` names the store the row came from (a file's
    path, say) in the error message.

    Raises:
        StorageError: the row cannot be decoded, whatever the decoder raised: the store is corrupt.
    """
    offset, event, payload, key, headers, timestamp = row
    loads = serializer.loads
    queue = cls._queue
    try:
        if key is None and headers is None:
            message: Message = tuple.__new__(cls, (event, loads(payload), offset, timestamp))
            return message
        meta = make_meta(queue, None if key is None else loads(key), None if headers is None else loads(headers))
        return new_message(cls, event, loads(payload), offset, timestamp, meta)
    except Exception as error:  # a bad row is a corrupt file, whatever the decoder raised
        raise StorageError(f"{where!r}: cannot decode message {offset} of {queue!r}: {error}") from error
