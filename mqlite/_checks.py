"""Checks of the broker's arguments, made before anything opens or attaches.

Each raises :class:`~mqlite.errors.InvalidArgument` naming the argument and the value, so that a
refused call leaves nothing behind: no file, thread, claim or consumer.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Iterable

from mqlite._waiting import capped
from mqlite.config import Start, SubscriptionSettings, check_start, dead_letter_queue_name
from mqlite.errors import InvalidArgument
from mqlite.filters import EventFilter, check_name
from mqlite.subscription import check_timeout

__all__ = [
    "check_broker_arguments",
    "check_callback",
    "check_path",
    "check_subscribe",
    "close_deadline",
    "is_coroutine_function",
]


def check_path(path: object) -> str | None:
    """``path`` as a str that SQLite can open as a file, or None for memory.

    Raises:
        InvalidArgument: naming what is wrong with ``path``: its type, empty, a NUL character,
            text the file system cannot encode, SQLite's ``":memory:"``, or a directory.
    """
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"path must be None (in memory) or a file path, got {path!r}")
    where = os.fspath(path)
    if not isinstance(where, str):
        raise InvalidArgument(f"path must be a str or a path-like object giving a str, got {where!r}")
    if not where or where == ":memory:":
        raise InvalidArgument(f"path must name a file, got {where!r}; pass path=None for an in-memory broker")
    if "\0" in where:
        raise InvalidArgument(f"path must not contain a NUL character, got {where!r}")
    try:
        os.fsencode(where)
    except UnicodeEncodeError as error:
        raise InvalidArgument(f"path {where!r} cannot be encoded for the file system: {error.reason}") from None
    if os.path.isdir(where):
        raise InvalidArgument(f"path {where!r} is a directory; pass the path of an mqlite file (created if missing)")
    return where


def check_broker_arguments(
    clock: object, dispatcher: object, synchronous: object, commit: object, serializer: object
) -> None:
    """Check the broker's other arguments, all before anything is opened.

    Raises:
        InvalidArgument: naming the argument and the value.
    """
    for argument, value, protocol, members in (
        ("clock", clock, "mqlite.Clock", ("time", "monotonic", "add_listener", "remove_listener")),
        ("dispatcher", dispatcher, "mqlite.Dispatcher", ("start", "run_ready", "close")),
        ("serializer", serializer, "serializer", ("dumps", "loads")),
    ):
        if value is None:
            continue
        missing = [member for member in members if not callable(getattr(value, member, None))]
        if argument == "clock" and not isinstance(getattr(value, "virtual", None), bool):
            missing.append("virtual (a bool)")
        if argument == "serializer" and not (isinstance(getattr(value, "name", None), str) and value.name):  # type: ignore[attr-defined]  # just checked
            missing.append("name (a non-empty str)")
        if missing:
            raise InvalidArgument(
                f"{argument} must be a {protocol} or None, got {value!r}, which has no {', '.join(missing)}"
            )
    if synchronous not in ("normal", "full"):
        raise InvalidArgument(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
    if commit not in ("each", "batch"):
        raise InvalidArgument(f"commit must be 'each' or 'batch', got {commit!r}")


def check_callback(callback: object) -> None:
    """Refuse a callback that is not callable, or whose signature shows it cannot take one message.

    A callable whose signature cannot be read (some builtins) is taken on trust. Wrappers are
    judged by their own signature (``follow_wrapped=False``): a decorator may well change it.
    """
    if not callable(callback):
        raise InvalidArgument(f"callback must be callable or None, got {callback!r}")
    try:
        signature = inspect.signature(callback, follow_wrapped=False)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None)
    except TypeError:
        raise InvalidArgument(
            f"callback {callback!r} must accept one argument (the message), but its signature is {signature}"
        ) from None


def is_coroutine_function(callback: object) -> bool:
    """Whether calling ``callback`` returns a coroutine (plain, partial, or an object with async __call__)."""
    call = type(callback).__call__ if not inspect.isroutine(callback) else None
    return inspect.iscoroutinefunction(callback) or (call is not None and inspect.iscoroutinefunction(call))


def close_deadline(timeout: object) -> float:
    """When a close given ``timeout`` must be done, on ``time.monotonic()``; checks ``timeout`` first."""
    seconds = check_timeout(timeout)
    if seconds is None:
        raise InvalidArgument("close timeout must be a non-negative number of seconds, got None")
    return time.monotonic() + capped(seconds)  # infinity: as long as a wait can last


def check_subscribe(
    queue: str,
    events: str | Iterable[str] | None,
    name: str | None,
    start: object,
    callback: object,
    ack: object,
    ack_timeout: object,
    max_deliveries: object,
    dead_letter: str | None,
    backoff: object,
    loop: object,
) -> tuple[Start | None, SubscriptionSettings, asyncio.AbstractEventLoop | None, bool]:
    """Check the arguments of ``Broker.subscribe``, all before anything attaches.

    Returns the start (None: the queue's default), the cursor's settings, the event loop (the running one if none was
    given) and whether ``callback`` is a coroutine function.
    """
    check_name("queue", queue)
    event_filter = EventFilter(events)
    checked_start = None if start is None else check_start(start)
    if name is not None:
        check_name("subscription", name)
    if callback is not None:
        check_callback(callback)
    if dead_letter is not None:
        check_name("dead_letter queue", dead_letter)
        if dead_letter == queue:
            raise InvalidArgument(
                f"dead_letter must name another queue than {queue!r}: its dead letters would come "
                "back to it and fail again for ever"
            )
    settings = SubscriptionSettings.from_arguments(
        event_filter,
        ack=ack,
        ack_timeout=ack_timeout,
        max_deliveries=max_deliveries,
        dead_letter=dead_letter if dead_letter is not None else dead_letter_queue_name(queue),
        backoff=backoff,
    )
    if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
        raise InvalidArgument(f"loop must be an asyncio event loop or None, got {loop!r}")
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    is_async = callback is not None and is_coroutine_function(callback)
    if is_async and loop is None:
        raise InvalidArgument(
            "a coroutine callback needs an event loop: call subscribe() from a running loop, or pass loop="
        )
    if is_async and loop is not None and loop.is_closed():
        raise InvalidArgument(f"the event loop of coroutine callback {callback!r} is closed: pass an open loop")
    return checked_start, settings, loop, is_async
