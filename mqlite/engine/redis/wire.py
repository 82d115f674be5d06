"""The wire between Python and the scripts: mqlite values as script arguments, replies as mqlite values.

Scripts take text (numbers as ``repr`` text, settings as JSON) and reply with bytes (redis-py
never decodes replies for this engine). Pure functions and values: thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import unquote

import redis.exceptions

from mqlite.config import DEDUP_MAX_IDS, DEDUP_WINDOW, QueueConfig, Start, SubscriptionSettings
from mqlite.engine.base import Consumer
from mqlite.errors import InvalidArgument, StorageError

__all__ = [
    "CONFIG_FIELDS",
    "ScriptRefusal",
    "config_args",
    "config_from",
    "decode_name",
    "members_of",
    "optional_field",
    "redis_error",
    "settings_args",
    "start_args",
    "text",
]

CONFIG_FIELDS = ["retention", "max_messages", "overflow", "max_age", "dedup_window", "dedup_max_ids"]
"""A queue's settings in its meta hash, in the order :func:`config_from` reads them."""


def redis_error(where: str, error: redis.exceptions.RedisError) -> NoReturn:
    raise StorageError(f"Redis at {where}: {type(error).__name__}: {error}") from error


class ScriptRefusal(Exception):
    """A script refused an operation before changing anything: ``code`` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code} {detail}")
        self.code = code
        self.detail = detail


def config_from(stored: Sequence[bytes | None]) -> QueueConfig:
    values = [None if v in (None, b"") else v.decode() for v in stored]
    retention, max_messages, overflow, max_age = values[:4]
    window, max_ids = (*values[4:6], None, None)[:2]  # a queue made before dedup was stored has none
    return QueueConfig(
        retention=retention or "interest",  # type: ignore[arg-type]  # written from a QueueConfig
        max_messages=None if max_messages is None else int(max_messages),
        overflow=overflow or "drop_oldest",  # type: ignore[arg-type]  # written from a QueueConfig
        max_age=None if max_age is None else float(max_age),
        dedup_window=DEDUP_WINDOW if window is None else float(window),
        dedup_max_ids=DEDUP_MAX_IDS if max_ids is None else int(max_ids),
    )


def config_args(config: QueueConfig) -> list[str]:
    return [
        config.retention,
        "" if config.max_messages is None else str(config.max_messages),
        config.overflow,
        "" if config.max_age is None else repr(float(config.max_age)),
        repr(float(config.dedup_window)),
        str(config.dedup_max_ids),
    ]


def settings_args(settings: SubscriptionSettings) -> list[str]:
    backoff = settings.backoff
    return [
        "1" if settings.manual_ack else "0",
        "" if settings.ack_timeout is None else repr(float(settings.ack_timeout)),
        "" if settings.max_deliveries is None else str(settings.max_deliveries),
        repr(float(backoff.initial)),
        repr(float(backoff.factor)),
        repr(float(backoff.maximum)),
        "0" if settings.event_filter.match_all else "1",
        json.dumps(settings.to_stored(), sort_keys=True, separators=(",", ":")),
        json.dumps(settings.event_filter.spec),
    ]


def start_args(target: Start) -> list[str]:
    if target == "latest" or target == "earliest":
        return [str(target), ""]
    if isinstance(target, datetime):
        return ["time", repr(target.timestamp())]
    if isinstance(target, int) and not isinstance(target, bool):
        return ["offset", str(target)]
    raise InvalidArgument(f"start/seek takes 'earliest', 'latest', an int offset or a datetime, got {target!r}")


def optional_field(data: bytes | None) -> bytes:
    """A key or headers field for the publish script: empty for none, else ``=`` and the bytes."""
    return b"" if data is None else b"=" + data


def decode_name(cid: str) -> str:
    """The subscription name of a named cursor id (the inverse of :func:`named_cursor`)."""
    return unquote(cid[1:])  # every % in an id is one of encode_part's escapes


class _OtherBrokersConsumer:
    """A consumer attached through another broker, as ``info()`` counts it: its id and mode."""

    closed = False
    name = None

    def __init__(self, ident: int, push: bool) -> None:
        self.id = ident
        self._is_push = push


def members_of(mem: list[bytes], mine: dict[str, Consumer]) -> tuple[Consumer, ...]:
    """The consumers of a cursor's membership hash: this broker's own objects, stand-ins for the others'."""
    members: list[Any] = []
    for i in range(0, len(mem), 2):
        who, mode = text(mem[i]), mem[i + 1]
        local = mine.get(who)
        if local is not None:
            members.append(local)
        else:
            _, _, ident = who.rpartition("/")
            members.append(_OtherBrokersConsumer(int(ident) if ident.isdigit() else 0, mode == b"push"))
    members.sort(key=lambda member: member.id)
    return tuple(members)


def text(value: Any) -> str:
    """A reply of redis-py (bytes: the engine never decodes responses) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
