"""The Redis Streams engine: queues on a Redis server (7.0 or later), shared by every broker that opens it.

Each queue is a stream of messages plus a few hashes and sorted sets per cursor (see
:mod:`~mqlite.engine.redis.scripts` for the layout). Every operation is one Lua script, so it is
atomic on the server: a broker that dies mid-operation leaves nothing half-applied. Python does
what Python must: it checks arguments, runs the serializer and the event filters' patterns, keeps
the in-process waiters and hands dead letters to the broker, outside any lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import attrs
import redis
import redis.exceptions

from mqlite._delivery import policy
from mqlite._delivery.cursor import Cursor
from mqlite._delivery.dedup import check_dedup_id
from mqlite._delivery.entries import DeadLetter
from mqlite._delivery.waiters import Waiter, Waiters
from mqlite.clock import Clock
from mqlite.config import DEDUP_MAX_IDS, DEDUP_WINDOW, QueueConfig, Start, SubscriptionSettings
from mqlite.engine.base import (
    Attempt,
    Capabilities,
    Consumer,
    CursorFigures,
    CursorStats,
    DeadLetterSink,
    QueueSnapshot,
    drain_buffer,
    offset_to_settle,
)
from mqlite.engine.codec import JsonSerializer, Serializer, decode_row, encode_fields
from mqlite.engine.locking import TransactionScope
from mqlite.engine.redis.keys import QueueKeys, encode_part, ephemeral_cursor, named_cursor
from mqlite.engine.redis.scripts import SCRIPTS
from mqlite.errors import (
    AckModeError,
    BrokerClosed,
    ConfigConflict,
    InvalidArgument,
    NotPending,
    QueueFull,
    StorageError,
    SubscriptionClosed,
    TransactionError,
)
from mqlite.filters import EventFilter, check_event_name
from mqlite.info import PendingMessage
from mqlite.message import Message, MessageMeta, check_header_names, make_meta, message_class, redelivery

__all__ = ["RedisEngine", "RedisQueue"]

_log = logging.getLogger("mqlite")

MIN_SERVER = (7, 0)
"""The oldest Redis server the scripts run on (``XADD`` with explicit ids, ``XTRIM MINID``)."""

_SAFE_POLICIES = frozenset({"noeviction"})
_CONFIG_FIELDS = [
    "retention",
    "max_messages",
    "overflow",
    "max_age",
    "dedup_window",
    "dedup_max_ids",
]  # in its meta hash
_SCAN_LIMIT = 4096  # entries a filtered take scans per script call, so one call stays short
_RELEARN_TRIES = 16  # a take that keeps meeting new event names gives up after this many rounds
_WATCH_BLOCK_MS = 500  # how long the watcher's XREAD blocks; bounds how late it sees a new queue


def _redis_error(where: str, error: redis.exceptions.RedisError) -> NoReturn:
    raise StorageError(f"Redis at {where}: {type(error).__name__}: {error}") from error


class RedisEngine:
    """Storage on a Redis server, for one broker. Thread-safe: redis-py's pool is, and ``_lock``
    guards ``_queues``, ``_watching`` and ``_closed``."""

    # Filters are applied in the scripts (Python classifies each event name once per filter).
    capabilities = Capabilities(
        shared=True, persistent=True, blocking_io=True, event_filter="server", transactions=False
    )

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "mq",
        serializer: Serializer | None = None,
        socket_timeout: float | None = None,
        heartbeat: float | None = None,
    ) -> None:
        """Connect to ``url`` (``redis://``, ``rediss://`` or ``unix://``) and check the server.

        Args:
            url: the server, as redis-py's ``Redis.from_url`` takes it, plus mqlite's own query
                parameters ``heartbeat`` and ``socket_timeout`` (``redis://h:6379/0?heartbeat=0.5``),
                which ``Broker(url)`` can pass no other way.
            namespace: the prefix of every key, so that several applications can share a server.
            serializer: how payloads, keys and headers are stored (default JSON).
            socket_timeout: bound, in seconds, of every call to the server (default 5).
            heartbeat: this broker's liveness TTL, in seconds (default 5): once it has not
                refreshed it for that long (it died, say), other brokers release what its
                consumers held.

        Raises:
            InvalidArgument: ``url``, ``namespace`` or a timeout is not usable.
            StorageError: the server is unreachable, older than 7.0, or may evict keys.
        """
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidArgument(f"a Redis URL starts with redis://, rediss:// or unix://, got {url!r}")
        if not isinstance(namespace, str) or not namespace:
            raise InvalidArgument(f"namespace must be a non-empty str, got {namespace!r}")
        server_url, options = _split_options(url)
        socket_timeout = _option("socket_timeout", socket_timeout, options, 5.0)
        heartbeat = _option("heartbeat", heartbeat, options, 5.0)
        for label, value in (("socket_timeout", socket_timeout), ("heartbeat", heartbeat)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
                raise InvalidArgument(f"{label} must be a number of seconds in (0, 86400), got {value!r}")
        self._url = url
        self._server_url = server_url
        self._namespace = encode_part(namespace)
        self._serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self.broker_id = uuid.uuid4().hex[:16]
        self.live_prefix = f"{self._namespace}:live:"
        self._heartbeat = float(heartbeat)
        # The watcher blocks at most a third of the heartbeat, so it refreshes the heartbeat in time.
        self._block_ms = max(10, min(_WATCH_BLOCK_MS, int(self._heartbeat * 1000 / 3)))
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                server_url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        except ValueError as error:
            raise InvalidArgument(f"cannot use the Redis URL {url!r}: {error}") from None
        self._socket_timeout = socket_timeout
        try:
            self._check_server()
            self._scripts = {name: self._client.register_script(body) for name, body in SCRIPTS.items()}
            self._beat()
        except BaseException:
            self._client.close()
            raise
        self._lock = threading.Lock()
        self._queues: dict[str, RedisQueue] = {}
        self._watching: frozenset[str] = frozenset()  # the queues the watcher's current read covers
        self._closed = False
        # The watcher's own stream: a waiter on a queue it does not read interrupts it there.
        # _wake_last is the watcher thread's alone.
        self._wake_key = f"{self._namespace}:wake:{self.broker_id}"
        self._wake_last = "0-0"
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="mqlite-redis-watcher", daemon=True)
        self._watcher.start()

    def _check_server(self) -> None:
        try:
            server = self._client.info("server")
            memory = self._client.info("memory")
        except redis.exceptions.RedisError as error:
            _redis_error(self._url, error)
        version = tuple(int(part) for part in str(server.get("redis_version", "0")).split(".")[:2])
        if version < MIN_SERVER:
            raise StorageError(
                f"Redis at {self._url} is version {server.get('redis_version')}; mqlite needs 7.0 or later"
            )
        eviction = str(memory.get("maxmemory_policy", "noeviction"))
        if eviction not in _SAFE_POLICIES:
            raise StorageError(
                f"Redis at {self._url} has maxmemory-policy {eviction}, which may evict mqlite's keys and "
                "lose messages or renumber offsets; set `maxmemory-policy noeviction` on the server"
            )

    def _beat(self) -> None:
        """Refresh this broker's liveness key, so that no other broker reaps its consumers."""
        try:
            self._client.set(self.live_prefix + self.broker_id, b"1", px=int(self._heartbeat * 1000))
        except redis.exceptions.RedisError as error:
            _redis_error(self._url, error)

    @property
    def path(self) -> str | None:
        """The URL of the server."""
        return self._url

    @property
    def _registry(self) -> str:
        return f"{self._namespace}:queues"

    def queues(self) -> list[tuple[str, QueueConfig]]:
        """The queues on the server under this namespace, with their settings."""
        try:
            names = sorted(_text(name) for name in self._client.hkeys(self._registry))
            configs = []
            for name in names:
                stored: Any = self._client.hmget(QueueKeys(self._namespace, name).meta, _CONFIG_FIELDS)
                configs.append((name, _config_from(stored)))
        except redis.exceptions.RedisError as error:
            _redis_error(self._url, error)
        return configs

    def open_queue(self, name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink) -> RedisQueue:
        """Open the queue ``name``, creating it with ``config`` if the server has none."""
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot open queue {name!r}: the broker is closed")
        queue = RedisQueue(self, name, config, clock, dead_letters)
        with self._lock:
            self._queues[name] = queue
        return queue

    def begin_transaction(self) -> TransactionScope:
        """Not offered yet (``capabilities.transactions`` is False): always raises.

        Raises:
            TransactionError: always.
        """
        raise TransactionError("the Redis engine does not offer transactions yet")

    def flush(self, timeout: float | None) -> bool:
        """Every script returned after the server applied it: nothing to wait for."""
        return True

    def close(self) -> None:
        """Stop the watcher, keep each queue's last figures for ``info()``, close the connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queues = list(self._queues.values())
        self._stop.set()
        try:  # interrupt the watcher's blocking read, so that closing does not wait it out
            self._client.xadd(self._wake_key, {"q": b""}, maxlen=16, approximate=True)
        except redis.exceptions.RedisError:
            pass  # the server is gone: the read ends with an error, or within its block time
        self._watcher.join(self._socket_timeout + self._block_ms / 1000)
        for queue in queues:
            queue._keep_last_snapshot()
        try:
            self._client.delete(self.live_prefix + self.broker_id, self._wake_key)
        except redis.exceptions.RedisError as error:
            _log.warning("closing a broker on %s could not remove its heartbeat: %s", self._url, error)
        self._client.close()

    # -- the scripts ---------------------------------------------------------------------

    def run(self, script: str, keys: QueueKeys, args: Sequence[Any]) -> Any:
        """Run one operation's script; server errors become mqlite's exceptions.

        Raises:
            StorageError: the server is unreachable, timed out, or refused the write (OOM, READONLY).
            NotPending, QueueFull, InvalidArgument: the script refused the operation (changing nothing).
        """
        try:
            return self._scripts[script](keys=keys.all, args=list(args))
        except redis.exceptions.ResponseError as error:
            code, _, detail = str(error).partition(" ")
            if code == "NOCURSOR":
                raise StorageError(
                    "the subscription's cursor is gone from the server (deleted by another broker?)"
                ) from None
            if code in {"NOTPENDING", "WAITING", "QUEUEFULL", "BADOFFSET", "CONFLICT"}:
                raise _ScriptRefusal(code, detail) from None
            _redis_error(self._url, error)
        except redis.exceptions.RedisError as error:
            _redis_error(self._url, error)

    # -- watching other brokers ------------------------------------------------------------

    def _watch(self) -> None:
        """Keep this broker alive on the server, reap dead ones, and wake waiters on foreign changes.

        One connection blocks in ``XREAD`` on every open queue's log and signal streams, from the
        last entry it saw, so nothing published after a queue opened goes unseen. Between reads
        it refreshes the heartbeat (every third of its TTL) and, once per TTL, releases what dead
        brokers' consumers held on the open queues.
        """
        reader = redis.Redis.from_url(self._server_url, socket_timeout=self._socket_timeout + self._block_ms / 1000)
        beat_every = self._heartbeat / 3
        last_beat = last_reap = time.monotonic()
        try:
            while not self._stop.is_set():
                with self._lock:
                    queues = list(self._queues.values())
                try:
                    now = time.monotonic()
                    if now - last_beat >= beat_every:
                        self._beat()
                        last_beat = now
                    if now - last_reap >= self._heartbeat:
                        for queue in queues:
                            try:
                                queue.reap()
                            except (StorageError, redis.exceptions.RedisError):
                                raise
                            except Exception:  # noqa: BLE001  # a failed dead-letter publish must not stop the heartbeat
                                _log.exception("releasing dead brokers' messages of %r failed", queue.name)
                        last_reap = now
                    self._read_changes(reader, queues)
                except (StorageError, redis.exceptions.RedisError) as error:
                    _log.warning("the Redis watcher of %s lost the server: %s", self._url, error)
                    for queue in queues:
                        queue.wake_all()  # they retry, and raise StorageError if the server is still gone
                    self._stop.wait(min(1.0, beat_every))
        finally:
            reader.close()

    def _read_changes(self, reader: redis.Redis, queues: list[RedisQueue]) -> None:
        """Block (bounded) until a watched stream has new entries; tell their queues.

        Only queues with waiters are watched, so a publish nobody waits for costs no read. Each
        stream is read from the last entry seen, one entry at a time, then skipped to its top
        *before* its queue counts the change: whatever came before the top is there for the
        retry the change causes, and whatever comes after wakes the next read.
        """
        with self._lock:
            watched = [queue for queue in queues if queue._has_waiters()]
            self._watching = frozenset(queue.name for queue in watched)
        streams: dict[Any, Any] = {self._wake_key: self._wake_last}
        owners: dict[str, RedisQueue] = {}
        for queue in watched:
            for key, last in queue._watch_from().items():
                streams[key] = last
                owners[key] = queue
        replies: Any = reader.xread(streams, count=1, block=self._block_ms)
        for stream, entries in replies or ():
            key = _text(stream)
            top: Any = reader.xrevrange(key, count=1)
            last = _text(top[0][0]) if top else _text(entries[-1][0])
            if key == self._wake_key:
                self._wake_last = last
                continue
            owner = owners.get(key)
            if owner is not None:
                owner._changed(key, last)

    def _watch_queue(self, name: str) -> None:
        """A waiter registered on queue ``name``: make the watcher read it, interrupting its read if need be."""
        with self._lock:
            if name in self._watching or self._closed:
                return
        try:
            self._client.xadd(self._wake_key, {"q": name.encode()}, maxlen=16, approximate=True)
        except redis.exceptions.RedisError as error:
            _redis_error(self._url, error)


_URL_OPTIONS = ("heartbeat", "socket_timeout")  # query parameters the engine reads, not redis-py


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without mqlite's own query parameters, and those parameters by name.

    Raises:
        InvalidArgument: one of them is given twice.
    """
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            kept.append((name, value))
        elif name in options:
            raise InvalidArgument(f"the Redis URL gives {name}= twice: {url!r}")
        else:
            options[name] = value
    if not options:
        return url, options
    return urlunsplit(parts._replace(query=urlencode(kept))), options


def _option(name: str, given: float | None, options: dict[str, str], default: float) -> float:
    """An engine option from its keyword argument or the URL's query (not both), else ``default``."""
    text = options.get(name)
    if text is None:
        return default if given is None else given
    if given is not None:
        raise InvalidArgument(f"{name} is given both as an argument and in the Redis URL; give it once")
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"{name} in the Redis URL must be a number of seconds, got {text!r}") from None


class _ScriptRefusal(Exception):
    """A script refused an operation before changing anything: ``code`` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code} {detail}")
        self.code = code
        self.detail = detail


def _config_from(stored: Sequence[bytes | None]) -> QueueConfig:
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


def _config_args(config: QueueConfig) -> list[str]:
    return [
        config.retention,
        "" if config.max_messages is None else str(config.max_messages),
        config.overflow,
        "" if config.max_age is None else repr(float(config.max_age)),
        repr(float(config.dedup_window)),
        str(config.dedup_max_ids),
    ]


def _settings_args(settings: SubscriptionSettings) -> list[str]:
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


def _start_args(target: Start) -> list[str]:
    if target == "latest" or target == "earliest":
        return [str(target), ""]
    if isinstance(target, datetime):
        return ["time", repr(target.timestamp())]
    if isinstance(target, int) and not isinstance(target, bool):
        return ["offset", str(target)]
    raise InvalidArgument(f"start/seek takes 'earliest', 'latest', an int offset or a datetime, got {target!r}")


def _optional(data: bytes | None) -> bytes:
    """A key or headers field for the publish script: empty for none, else ``=`` and the bytes."""
    return b"" if data is None else b"=" + data


class RedisQueue:
    """One queue on a Redis server. Thread-safe: the server serializes every script.

    ``_lock`` guards ``_cursors``, ``_cursor_ids``, ``_consumers``, the local cursors' members and
    ``inflight``, ``_waiters``, ``_changes``, ``_push_epoch``, ``_taking``, ``_watched``, ``_closed``,
    ``_config`` and ``_last``; ``_took`` (a condition on it) is notified when a push take ends.
    No script and no user code runs under it.
    """

    atomic = True

    def __init__(
        self, engine: RedisEngine, name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink
    ) -> None:
        self.name = name
        self.message_class = message_class(name)
        self._engine = engine
        self._keys = QueueKeys(engine._namespace, name)
        self._clock = clock
        self._dead_letters = dead_letters
        self._serializer = engine._serializer
        self._lock = threading.Lock()
        self._cursors: dict[str, Cursor] = {}
        self._cursor_ids: dict[int, str] = {}  # id(cursor) -> its cursor id on the server
        self._consumers: dict[int, Consumer] = {}  # id(consumer) -> every consumer attached here
        self._waiters = Waiters()
        self._changes = 0  # how many foreign changes the watcher has seen: the waiters' seen token
        self._push_epoch = 0  # push batches begun and settled here: what a drain's check must not straddle
        self._taking: dict[int, int] = {}  # id(cursor) -> push takes on their way to the server
        self._took = threading.Condition(self._lock)
        self._closed = False
        self.duplicates = 0  # publishes with a dedup id this broker saw refused (under _lock)
        self._last: QueueSnapshot | None = None
        stored = engine.run("open", self._keys, [*_config_args(config), f"{engine._namespace}:queues", name])
        self._config = _config_from(stored)
        self._watched = self._stream_tops()
        self.reap()

    def __repr__(self) -> str:
        return f"<RedisQueue {self.name!r}>"

    def _run(self, script: str, *args: Any) -> Any:
        return self._engine.run(script, self._keys, args)

    def _now(self) -> str:
        return repr(float(self._clock.time()))

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Append one message and return it with its offset."""
        return self.publish_many([(event, payload, key, headers)], None if dedup_id is None else [dedup_id])[0]

    def publish_many(
        self,
        drafts: Sequence[tuple[str, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[Message]:
        """Append ``(event, payload, key, headers)`` drafts at contiguous offsets, all or none.

        Raises:
            InvalidName, InvalidArgument, SerializationError: a draft is not publishable; nothing written.
            QueueFull: ``overflow="reject"`` and the queue holds ``max_messages``.
            BrokerClosed: the broker was closed.
            StorageError: the server could not be reached or refused the write.
        """
        ids: list[str | None] | None = None
        if dedup_ids is not None and any(dedup_id is not None for dedup_id in dedup_ids):
            ids = [None if dedup_id is None else check_dedup_id(dedup_id) for dedup_id in dedup_ids]
            if len(ids) != len(drafts):
                raise InvalidArgument(f"publish_many got {len(ids)} dedup ids for {len(drafts)} messages")
        checked: list[tuple[str, Any, MessageMeta | None]] = []
        args: list[Any] = []
        for event, payload, key, headers in drafts:
            name = str.__str__(check_event_name(event))
            meta = None if key is None and headers is None else make_meta(self.name, key, headers)
            if meta is not None and meta.headers:
                check_header_names(meta.headers)
            fields = encode_fields(
                self._serializer,
                self.name,
                name,
                payload,
                None if meta is None else meta.key,
                {} if meta is None else meta.headers,
            )
            checked.append((name, payload, meta))
            args += [name, fields[0], _optional(fields[1]), _optional(fields[2])]
        if not checked:
            return []
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        if ids is not None:
            return self._publish_once(checked, args, ids)
        try:
            first, stamp = self._run("publish", self._now(), len(checked), *args)
        except _ScriptRefusal as refusal:
            config = self.config
            raise QueueFull(
                f"queue {self.name!r} holds {refusal.detail} of max_messages={config.max_messages}; "
                f"overflow='reject' refuses {len(checked)} more"
            ) from None
        timestamp = float(stamp)
        cls = self.message_class
        messages: list[Message] = [
            tuple.__new__(cls, (event, payload, offset, timestamp))
            if meta is None
            else tuple.__new__(cls, (event, payload, offset, timestamp, meta))
            for offset, (event, payload, meta) in enumerate(checked, int(first))
        ]
        with self._lock:
            if self._waiters:
                for event in {m[0] for m in messages}:
                    self._waiters.wake_event(event)
        return messages

    def _publish_once(
        self, checked: list[tuple[str, Any, MessageMeta | None]], args: list[Any], ids: list[str | None]
    ) -> list[Message]:
        """:meth:`publish_many` of drafts with dedup ids: one script checks the duplicate window,
        appends the drafts whose ids are new and records their ids."""
        config = self.config
        with_ids: list[Any] = []
        for i, dedup_id in enumerate(ids):
            with_ids += [*args[i * 4 : i * 4 + 4], "" if dedup_id is None else dedup_id]
        try:
            first, stamp, places = self._run(
                "publish_once",
                self._now(),
                len(checked),
                repr(float(config.dedup_window)),
                config.dedup_max_ids,
                *with_ids,
            )
        except _ScriptRefusal as refusal:
            raise QueueFull(
                f"queue {self.name!r} holds {refusal.detail} of max_messages={config.max_messages}; "
                f"overflow='reject' refuses the new ones of {len(checked)}"
            ) from None
        cls = self.message_class
        messages: list[Message] = []
        built: dict[int, Message] = {}
        timestamp = float(stamp) if stamp else 0.0
        duplicates = 0
        for (event, payload, meta), place in zip(checked, places, strict=True):
            if isinstance(place, bytes):  # b"n<k>": the k-th new message
                offset = int(first) + int(place[1:])
                message = built.get(offset)
                if message is None:
                    message = built[offset] = (
                        tuple.__new__(cls, (event, payload, offset, timestamp))
                        if meta is None
                        else tuple.__new__(cls, (event, payload, offset, timestamp, meta))
                    )
                else:
                    duplicates += 1  # a repeat of an earlier draft of this call
                messages.append(message)
                continue
            duplicates += 1
            if place[1] is None:  # the original is trimmed: the retry's message, at its offset and time
                offset, at = int(place[0]), float(place[3])
                messages.append(
                    tuple.__new__(cls, (event, payload, offset, at))
                    if meta is None
                    else tuple.__new__(cls, (event, payload, offset, at, meta))
                )
            else:
                messages.append(self._message(place))
        with self._lock:
            self.duplicates += duplicates
            if built and self._waiters:
                for event in {m[0] for m in built.values()}:
                    self._waiters.wake_event(event)
        return messages

    # -- settings and bounds -----------------------------------------------------------------

    @property
    def config(self) -> QueueConfig:
        """The retention settings in force, as the server has them (another broker may have changed them)."""
        with self._lock:
            last = self._last
        if last is not None:
            return last.config
        try:
            stored: Any = self._engine._client.hmget(self._keys.meta, _CONFIG_FIELDS)
        except redis.exceptions.RedisError as error:
            _redis_error(self._engine._url, error)
        config = _config_from(stored)
        with self._lock:
            self._config = config
        return config

    def configure(self, config: QueueConfig) -> None:
        """Apply new retention settings, for every broker on the server."""
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot configure queue {self.name!r}: the broker is closed")
        self._run("configure", self._now(), *_config_args(config))
        with self._lock:
            self._config = config

    def bounds(self) -> tuple[int, int]:
        """``(start_offset, end_offset)``, after applying retention."""
        with self._lock:
            last = self._last
        if last is not None:
            return last.start_offset, last.end_offset
        start, end = self._run("bounds", self._now())
        return int(start), int(end)

    # -- attaching -------------------------------------------------------------------------

    def _consumer_id(self, consumer: Consumer) -> str:
        return f"{self._engine.broker_id}/{consumer.id}"

    def _cid(self, consumer: Consumer) -> str:
        """The server's id of the consumer's cursor.

        Raises:
            SubscriptionClosed: an ephemeral subscription that was closed (its cursor is gone).
        """
        with self._lock:
            cid = self._cursor_ids.get(id(consumer._cursor))
        if cid is None:
            raise SubscriptionClosed(consumer._closed_reason())
        return cid

    def attach(self, consumer: Consumer, name: str | None, start: Start, settings: SubscriptionSettings) -> Cursor:
        """Attach ``consumer`` to the named cursor (creating it at ``start``) or to a new ephemeral one.

        Raises:
            ConfigConflict: consumers of this broker are attached to the name with other settings.
            InvalidArgument: ``start`` is not a valid position.
        """
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot subscribe to {self.name!r}: the broker is closed")
            local = self._cursors.get(name) if name is not None else None
            if local is not None and local.members and local.settings != settings:
                raise ConfigConflict(
                    f"subscription {name!r} on {self.name!r} is attached with different settings "
                    f"({local.settings.describe()}); subscriptions sharing a name must agree"
                )
        cid = named_cursor(name) if name is not None else ephemeral_cursor(self._engine.broker_id, consumer.id)
        mode = "push" if consumer._is_push else "pull"
        try:
            _, position = self._run(
                "attach",
                cid,
                *_start_args(start),
                self._now(),
                self._consumer_id(consumer),
                mode,
                self._engine.live_prefix,
                *_settings_args(settings),
            )
        except _ScriptRefusal as refusal:
            if refusal.code == "CONFLICT":
                stored = SubscriptionSettings.from_stored(json.loads(refusal.detail))
                raise ConfigConflict(
                    f"subscription {name!r} on {self.name!r} is attached (by another broker) with different "
                    f"settings ({stored.describe()}); subscriptions sharing a name must agree"
                ) from None
            raise InvalidArgument(
                f"offset {start} is outside queue {self.name!r}, whose offsets run from 0 to {refusal.detail}"
            ) from None
        with self._lock:
            cursor = self._cursors.get(name) if name is not None else None
            if cursor is None:
                cursor = Cursor(queue=self.name, name=name, position=int(position), settings=settings)
                if name is not None:
                    self._cursors[name] = cursor
                self._cursor_ids[id(cursor)] = cid
            elif cursor.settings != settings:
                cursor.configure(settings)
                cursor.set_filter(settings.event_filter)
            cursor.members.append(consumer)
            consumer._cursor = cursor
            self._consumers[id(consumer)] = consumer
            return cursor

    def detach(self, consumer: Consumer) -> None:
        """Detach a closing consumer: what it read ahead goes back unread, what it held is retried."""
        cursor = consumer._cursor
        cid = self._cid(consumer)
        unread = drain_buffer(consumer)
        with self._lock:
            closing = self._closed
        try:
            dead = self._run(
                "detach",
                cid,
                self._consumer_id(consumer),
                "1" if closing else "0",
                "1" if cursor.name is None else "0",
                self._now(),
                *(m[2] for m in unread),
            )
        except BaseException:
            consumer._buffer.extendleft(reversed(unread))
            raise
        with self._lock:
            if consumer in cursor.members:
                cursor.members.remove(consumer)
            self._consumers.pop(id(consumer), None)
            if cursor.name is None:
                self._cursor_ids.pop(id(cursor), None)
            consumer._mark_closed("the subscription was closed")
            self._waiters.wake_all()
        self._send_dead(cursor, dead, cid, self._consumer_id(consumer))

    def delete_cursor(self, name: str) -> bool:
        """Forget the named cursor, its position and pending messages; False if there was none."""
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot delete subscription {name!r} of {self.name!r}: the broker is closed")
            cursor = self._cursors.get(name)
            if cursor is not None and cursor.members:
                raise ConfigConflict(
                    f"subscription {name!r} on {self.name!r} has {len(cursor.members)} attached; close them first"
                )
        deleted = bool(self._run("delete", named_cursor(name), self._now()))
        with self._lock:
            cursor = self._cursors.pop(name, None)
            if cursor is not None:
                self._cursor_ids.pop(id(cursor), None)
        return deleted

    # -- taking ----------------------------------------------------------------------------

    def _learn(self, cid: str) -> None:
        """Tell the server which of the queue's event names the cursor ``cid``'s filter matches.

        The filter is read from the server, the one source of truth for every broker; the
        patterns are matched here, by :class:`~mqlite.filters.EventFilter` itself.
        """
        client = self._engine._client
        for _ in range(_RELEARN_TRIES):
            try:
                stored = client.hget(f"{self._keys.prefix}c:{cid}", "settings")
                names = [_text(n) for n in client.hkeys(self._keys.events)]
            except redis.exceptions.RedisError as error:
                _redis_error(self._engine._url, error)
            if stored is None:
                raise StorageError(f"a subscription to {self.name!r} was deleted on the server meanwhile")
            event_filter = SubscriptionSettings.from_stored(json.loads(stored)).event_filter
            pairs: list[str] = []
            for event in names:
                pairs += [event, "1" if event_filter.matches(event) else "0"]
            done, _ = self._run("learn", cid, stored, len(names), *pairs)
            if done:
                return
        raise StorageError(f"the filter of a subscription to {self.name!r} kept changing; try again")

    def _relearning(self, script: str, *args: Any) -> Any:
        """Run ``script``, teaching the server new event names as often as it asks."""
        for _ in range(_RELEARN_TRIES):
            reply = self._run(script, *args)
            if isinstance(reply, list) and reply and reply[0] == b"relearn":
                self._learn(reply[1].decode())
                continue
            return reply
        raise StorageError(f"new event names kept arriving on {self.name!r} faster than they were learned; try again")

    def _take(self, consumer: Consumer, max_messages: int, push: bool) -> tuple[list[Message], float | None]:
        """Up to ``max_messages`` for ``consumer`` (due redeliveries first), and the cursor's next timer."""
        cursor = consumer._cursor
        cid = self._cid(consumer)
        settle = "1" if policy.settles_on_take(manual_ack=cursor.manual_ack, push=push) else "0"
        messages: list[Message] = []
        dead: list[Any] = []
        due: float | None = None
        while len(messages) < max_messages:
            reply = self._relearning(
                "take",
                cid,
                self._consumer_id(consumer),
                max_messages - len(messages),
                settle,
                self._now(),
                _SCAN_LIMIT,
            )
            _, entries, _redelivered, letters, next_due, _end, more = reply
            for entry in entries:
                message = self._message(entry)
                # A redelivery (first in the reply) carries its attempt as a seventh field.
                messages.append(redelivery(message, entry[6]) if len(entry) > 6 and entry[6] > 1 else message)
            dead += letters
            due = None if next_due is None else float(next_due)
            if not more:
                break
        self._send_dead(cursor, dead, cid, self._consumer_id(consumer))
        return messages, due

    def _message(self, entry: list[Any]) -> Message:
        offset, event, payload, stamp, key, headers = entry[:6]
        return decode_row(
            self._serializer,
            self.message_class,
            (int(offset), event.decode(), payload, key, headers, float(stamp)),
            self._engine._url,
        )

    def _send_dead(self, cursor: Cursor, letters: list[Any], cid: str, who: str) -> None:
        """Hand the dead letters a script returned to the broker, which publishes them (no lock held);
        then settle the published ones (one script). The others stay held until ``who`` goes."""
        if not letters:
            return
        out = []
        for offset, attempts, reason, error, event, payload, stamp, key, headers in letters:
            message = self._message([offset, event, payload, stamp, key, headers])
            heads = policy.dead_letter_headers(
                message,
                queue=self.name,
                subscription=cursor.name,
                deliveries=int(attempts),
                reason=reason.decode(),
                error=None,
            )
            if error is not None:
                heads["dead_letter.error"] = error.decode()
            out.append(DeadLetter(cursor.dead_letter, message, heads))
        sent = {id(letter) for letter in self._dead_letters(out)}
        published = [letter.message[2] for letter in out if id(letter) in sent]
        if published:
            self._run("dead_sent", cid, who, *published)

    def _bound(self, due: float | None) -> float | None:
        if due is None or self._clock.virtual:
            return None
        remaining = due - self._clock.time()
        return remaining if remaining > 0.0 else 0.0

    def _pull(self, consumer: Consumer, max_messages: int, read_ahead: int) -> tuple[list[Message], float | None]:
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        buffer = consumer._buffer
        if buffer:
            read: list[Message] = []
            while buffer and len(read) < max_messages:
                try:  # a racing detach may empty the buffer: each message goes to one of them
                    read.append(buffer.popleft())
                except IndexError:
                    break
            if read:
                return read, None
        cursor = consumer._cursor
        wanted = max_messages
        if read_ahead:
            wanted = policy.read_ahead_size(
                read_ahead, max_messages, manual_ack=cursor.manual_ack, durable_take=consumer.name is not None
            )
        messages, due = self._take(consumer, wanted, False)
        if len(messages) > max_messages:
            buffer.extend(messages[max_messages:])
            del messages[max_messages:]
        return messages, due

    def try_pull(self, consumer: Consumer, max_messages: int, read_ahead: int) -> list[Message]:
        """Up to ``max_messages`` for a pull consumer, without waiting."""
        return self._pull(consumer, max_messages, read_ahead)[0]

    def pull_or_wait(
        self, consumer: Consumer, max_messages: int, read_ahead: int, wake: Callable[[], object]
    ) -> Attempt[list[Message]]:
        """:meth:`try_pull`; if nothing came, register ``wake`` for when something may have."""
        with self._lock:
            seen = self._changes
        messages, due = self._pull(consumer, max_messages, read_ahead)
        if messages:
            return Attempt(True, messages, None, None)
        return Attempt(False, messages, self._add_waiter(consumer._cursor, wake, seen), self._bound(due))

    def _add_waiter(self, cursor: Cursor, wake: Callable[[], object], seen: int) -> Waiter | None:
        waiter = None
        with self._lock:
            if self._changes == seen and not self._closed:
                waiter = self._waiters.add(None, wake)  # the server filters: wake on any change
        if waiter is None:
            wake()  # another broker changed the queue since the try looked: try again at once
            return None
        try:
            self._engine._watch_queue(self.name)
        except BaseException:
            self.remove_waiter(waiter)
            raise
        return waiter

    def _has_waiters(self) -> bool:
        with self._lock:
            return bool(self._waiters)

    def try_push(self, consumer: Consumer, max_messages: int) -> list[Message] | None:
        """The next batch for a push consumer, possibly empty, without waiting; None once it is closed."""
        if consumer.closed:
            return None
        return self._push_batch(consumer, max_messages)[0]

    def _push_batch(self, consumer: Consumer, max_messages: int) -> tuple[list[Message], float | None]:
        cursor = consumer._cursor
        key = id(cursor)
        with self._lock:
            members = len(cursor.members)
            # Counted in flight before the take moves the position, so that a drain never sees
            # the messages neither unread nor in flight.
            cursor.inflight += 1
            self._taking[key] = self._taking.get(key, 0) + 1
        batch: list[Message] = []
        try:
            batch, due = self._take(consumer, policy.push_batch_size(max_messages, members), True)
        finally:
            with self._lock:
                if batch:
                    self._push_epoch += 1
                else:
                    cursor.inflight -= 1
                left = self._taking[key] - 1
                if left:
                    self._taking[key] = left
                else:
                    del self._taking[key]
                self._took.notify_all()
        return batch, due

    def _quiet_state_locked(self, cursor: Cursor) -> tuple[int, int] | None:
        """``(inflight, push epoch)`` once no push take of ``cursor`` is on its way (``_lock`` held).

        A take that comes back empty leaves both as they were, so a drain's check need not
        count it as a batch in flight; one that brings a batch bumps the epoch, and its
        settlement notes progress. None if a take is still out after a call's timeout.
        """
        if not self._took.wait_for(lambda: id(cursor) not in self._taking, self._engine._socket_timeout + 1.0):
            return None
        return cursor.inflight, self._push_epoch

    def push_or_wait(
        self, consumer: Consumer, max_messages: int, wake: Callable[[], object]
    ) -> Attempt[list[Message] | None]:
        """:meth:`try_push`; if the batch is empty, register ``wake`` for when it may not be."""
        if consumer.closed:
            return Attempt(True, None, None, None)
        with self._lock:
            seen = self._changes
        batch, due = self._push_batch(consumer, max_messages)
        if batch:
            return Attempt(True, batch, None, None)
        return Attempt(False, batch, self._add_waiter(consumer._cursor, wake, seen), self._bound(due))

    def push_and_watch(
        self, consumer: Consumer, max_messages: int, wake: Callable[[], object]
    ) -> Attempt[list[Message] | None]:
        """:meth:`push_or_wait` for a dispatcher that steps a worker only once it may have work.

        Registers ``wake`` whenever the batch holds all there is to take now, empty or not, so
        that whatever arrives or becomes ready while its callbacks run wakes it; a full batch
        registers nothing (there may be more). The value is None once the consumer is closed.
        """
        if consumer.closed:
            return Attempt(True, None, None, None)
        with self._lock:
            seen = self._changes
            members = len(consumer._cursor.members)
        batch, due = self._push_batch(consumer, max_messages)
        if len(batch) >= policy.push_batch_size(max_messages, members):
            return Attempt(True, batch, None, None)
        waiter = self._add_waiter(consumer._cursor, wake, seen)
        return Attempt(waiter is None, batch, waiter, self._bound(due))

    def push_done(
        self,
        consumer: Consumer,
        batch: list[Message],
        failures: list[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None:
        """Settle a push batch: successes acked (automatic acks), failures retried or dead-lettered,
        and what the callback never saw back to the front of the line."""
        cursor = consumer._cursor
        with self._lock:
            cid = self._cursor_ids.get(id(cursor))
        if cid is None:
            # An ephemeral subscription closed while its batch ran (its broker closing, say):
            # its cursor and what it held went with the detach, so there is nothing to settle.
            with self._lock:
                cursor.inflight -= 1
                self._push_epoch += 1
                self._waiters.wake_all()
            return
        errors = []
        for message, error in failures:
            errors += [message[2], repr(error)]
        try:
            dead = self._run(
                "push_done",
                cid,
                self._consumer_id(consumer),
                self._now(),
                len(batch) - len(unprocessed),
                len(batch),
                *(m[2] for m in batch),
                len(failures),
                *errors,
                *(m[2] for m in unprocessed),
            )
        finally:
            with self._lock:
                cursor.inflight -= 1
                self._push_epoch += 1
                if unprocessed or failures:
                    self._waiters.wake_all()
        self._send_dead(cursor, dead, cid, self._consumer_id(consumer))

    def give_back(self, consumer: Consumer) -> None:
        """Return what ``consumer`` read ahead and never handed to user code, to the front of the line."""
        messages = drain_buffer(consumer)
        if not messages:
            return
        try:
            self._run("give_back", self._cid(consumer), *(m[2] for m in messages))
        except BaseException:
            consumer._buffer.extendleft(reversed(messages))
            raise
        self.wake_all()

    # -- acks, seeks and filters -----------------------------------------------------------

    def _offset(self, message: Message | int, verb: str) -> int:
        return offset_to_settle(message, self.name, self.message_class, verb)

    def _check_manual(self, consumer: Consumer, verb: str) -> None:
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        if not consumer._cursor.manual_ack:
            raise AckModeError(
                f"{verb}() needs a subscription made with ack='manual'; this one acks automatically "
                "when a message is returned (pull) or its callback returns (push)"
            )

    def _not_pending(self, offset: str) -> NotPending:
        return NotPending(
            f"offset {offset} of {self.name!r} is not pending on this subscription "
            "(never delivered to it, already acked, or dead-lettered)"
        )

    def ack(self, consumer: Consumer, messages: tuple[Message | int, ...]) -> None:
        """Acknowledge pending messages, all or none, so they are never redelivered."""
        self._check_manual(consumer, "ack")
        offsets = [self._offset(message, "ack") for message in messages]
        if len(set(offsets)) < len(offsets):
            raise NotPending(f"ack() was given the same message of {self.name!r} twice; nothing was acked")
        try:
            self._run("ack", self._cid(consumer), *offsets)
        except _ScriptRefusal as refusal:
            raise self._not_pending(refusal.detail) from None

    def nack(self, consumer: Consumer, message: Message | int, delay: float) -> None:
        """Give a pending message back for redelivery after ``delay`` seconds of broker clock."""
        self._check_manual(consumer, "nack")
        offset = self._offset(message, "nack")
        try:
            who = self._consumer_id(consumer)
            dead = self._run("nack", self._cid(consumer), offset, repr(float(delay)), self._now(), "nack", who)
        except _ScriptRefusal as refusal:
            if refusal.code == "WAITING":
                raise NotPending(f"offset {offset} of {self.name!r} is already waiting for redelivery") from None
            raise self._not_pending(refusal.detail) from None
        self.wake_all()
        self._send_dead(consumer._cursor, dead, self._cid(consumer), self._consumer_id(consumer))

    def seek(self, consumer: Consumer, target: Start) -> int:
        """Move the consumer's cursor (shared by every subscription of its name) to ``target``."""
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        args = _start_args(target)
        try:
            position = int(self._run("seek", self._cid(consumer), *args, self._now()))
        except _ScriptRefusal as refusal:
            raise InvalidArgument(
                f"offset {target} is outside queue {self.name!r}, whose offsets run from 0 to {refusal.detail}"
            ) from None
        self.wake_all()
        return position

    def set_filter(self, consumer: Consumer, change: Callable[[EventFilter], EventFilter]) -> EventFilter:
        """Replace the cursor's event filter with ``change(current)``, for every broker.

        A compare-and-set on the server: if another broker changed the cursor's settings since
        this one read them, ``change`` is applied again to what it has now.
        """
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        cursor = consumer._cursor
        cid = self._cid(consumer)
        with self._lock:
            current = cursor.settings
        for _ in range(_RELEARN_TRIES):
            new = change(current.event_filter)
            settings = attrs.evolve(current, event_filter=new)
            done, stored = self._run("reconfigure", cid, _settings_args(current)[-2], *_settings_args(settings))
            if done:
                with self._lock:
                    cursor.set_filter(new)
                self.wake_all()
                return new
            current = SubscriptionSettings.from_stored(json.loads(stored))
            with self._lock:
                cursor.configure(current)
                cursor.set_filter(current.event_filter)
        raise StorageError(f"the filter of subscription {cursor.name!r} of {self.name!r} kept changing; try again")

    # -- waiting ---------------------------------------------------------------------------

    def remove_waiter(self, waiter: Waiter | None) -> None:
        """Forget a waiter that was not woken; a woken one is already gone."""
        if waiter is None:
            return
        with self._lock:
            self._waiters.discard(waiter)

    def wake_all(self) -> None:
        """Wake every waiter so it re-checks (the clock moved, or the broker is closing)."""
        with self._lock:
            self._waiters.wake_all()

    def _stream_tops(self) -> dict[str, str]:
        """The last id of the log and signal streams now: where the watcher starts reading."""
        client = self._engine._client
        tops = {}
        try:
            for key in (self._keys.log, self._keys.sig):
                last: Any = client.xrevrange(key, count=1)
                tops[key] = _text(last[0][0]) if last else "0-0"
        except redis.exceptions.RedisError as error:
            _redis_error(self._engine._url, error)
        if tops[self._keys.log] == "0-0":
            end = self._run("bounds", self._now())[1]
            tops[self._keys.log] = f"0-{int(end)}"
        return tops

    def reap(self) -> None:
        """Release what the consumers of dead brokers held on this queue (one script)."""
        reaper = f"{self._engine.broker_id}/reaper"
        for cid, letters in self._run("reap", self._now(), self._engine.live_prefix, reaper):
            name = _text(cid)
            stand_in = Cursor(
                queue=self.name, name=_decode_name(name), position=0, settings=self._stored_settings(name)
            )
            self._send_dead(stand_in, letters, name, reaper)

    def _stored_settings(self, cid: str) -> SubscriptionSettings:
        try:
            stored = self._engine._client.hget(f"{self._keys.prefix}c:{cid}", "settings")
        except redis.exceptions.RedisError as error:
            _redis_error(self._engine._url, error)
        return SubscriptionSettings() if stored is None else SubscriptionSettings.from_stored(json.loads(stored))

    def _watch_from(self) -> dict[str, str]:
        with self._lock:
            return dict(self._watched)

    def _changed(self, stream: str, last: str) -> None:
        """The watcher saw new entries on ``stream``, up to ``last``: wake every waiter."""
        with self._lock:
            self._watched[stream] = last
            self._changes += 1
            self._waiters.wake_all()

    def next_due(self, *, push_only: bool = False) -> tuple[bool, float | None]:
        """Whether a push batch is in flight, and the earliest timer of this queue (clock seconds)."""
        with self._lock:
            cursors = self._all_local()
            inflight = any(c.inflight for c in cursors)
            wanted = {
                self._cursor_ids[id(c)]
                for c in cursors
                if id(c) in self._cursor_ids and (not push_only or any(m._is_push for m in c.members))
            }
            closed = self._last is not None
        if closed:
            return inflight, None
        due = self._run("next_due", "0" if push_only else "1", *sorted(wanted))
        return inflight, None if due is None else float(due)

    def _members(self) -> list[Consumer]:
        """Every consumer attached through this broker (``_lock`` held)."""
        return list(self._consumers.values())

    # -- introspection ---------------------------------------------------------------------

    def cursor_stats(self, consumer: Consumer) -> CursorStats:
        """(position, lag, pending, missed) of a consumer's cursor, read atomically."""
        cid = self._cid(consumer)
        _, position, lag, pending, missed = self._relearning("stats", cid, self._now())
        return CursorStats(int(position), int(lag), int(pending), int(missed))

    def pending_messages(self, consumer: Consumer) -> list[PendingMessage]:
        """The pending messages of a consumer's cursor, by offset, with who holds each, read atomically."""
        return self._pending_listing(self._run("pending", self._cid(consumer)))

    def pending_messages_of(self, name: str) -> list[PendingMessage]:
        """:meth:`pending_messages` of the durable cursor ``name``, attached or not (none if it does not exist)."""
        return self._pending_listing(self._run("pending", named_cursor(name)))

    def _pending_listing(self, rows: Any) -> list[PendingMessage]:
        with self._lock:
            labels = {self._consumer_id(member): member._label for member in self._consumers.values()}
        listed = []
        for _offset, attempts, owner, since, due, entry in rows:
            message = self._message(entry)
            if owner is not None:
                who = _text(owner)
                holder = labels.get(who) or f"broker {who.partition('/')[0]}"
                held_since = None if since is None else float(since)
                listed.append(PendingMessage(message, int(attempts), "out", holder, held_since, None))
            elif due is not None:
                listed.append(PendingMessage(message, int(attempts), "waiting", None, None, float(due)))
            else:
                listed.append(PendingMessage(message, int(attempts), "ready", None, None, None))
        return listed

    def snapshot(self) -> QueueSnapshot:
        """The queue's figures and each cursor's, taken atomically on the server (for ``Broker.info``)."""
        with self._lock:
            last = self._last
        if last is not None:
            return last
        reply = self._relearning("snapshot", self._now())
        _, start, end, stored, rows = reply
        with self._lock:
            local = {cid: cursor for cursor in self._all_local() if (cid := self._cursor_ids.get(id(cursor)))}
            figures = []
            mine = {self._consumer_id(member): member for member in self._consumers.values()}
            for row in rows:
                cid_bytes, settings_json, position, lag, pending, delivered, acked, redelivered, dead, missed, mem = row
                cid = cid_bytes.decode()
                cursor = local.get(cid)
                settings = SubscriptionSettings.from_stored(json.loads(settings_json))
                if cid.startswith("e") and cursor is None:
                    continue  # another broker's ephemeral cursor: its own info() reports it
                figures.append(
                    CursorFigures(
                        name=None if cid.startswith("e") else _decode_name(cid),
                        events=settings.event_filter.spec,
                        manual_ack=settings.manual_ack,
                        members=_members_of(mem, mine),
                        position=int(position),
                        lag=int(lag),
                        pending=int(pending),
                        delivered=int(delivered),
                        acked=int(acked),
                        redelivered=int(redelivered),
                        dead_lettered=int(dead),
                        missed=int(missed),
                    )
                )
            waiters = len(self._waiters)
        with self._lock:
            duplicates = self.duplicates
        return QueueSnapshot(_config_from(stored), int(start), int(end), tuple(figures), waiters, 0, duplicates)

    def _all_local(self) -> list[Cursor]:
        """This broker's named cursors and its consumers' ephemeral ones (``_lock`` held)."""
        cursors = {id(c): c for c in self._cursors.values()}
        for member in self._consumers.values():
            cursors.setdefault(id(member._cursor), member._cursor)
        return list(cursors.values())

    def push_unsettled(self, offset: int, cursors: list[Cursor] | None = None) -> list[Cursor]:
        """The push cursors that have not yet handled every matching message below ``offset``."""
        with self._lock:
            candidates = self._all_local() if cursors is None else cursors
            pushed = [(self._cursor_ids.get(id(c)), any(member._is_push for member in c.members)) for c in candidates]
        for index, (cursor, (cid, push)) in enumerate(zip(candidates, pushed, strict=True)):
            if cid is None or not push:
                continue
            # The server's answer holds only if no push batch of this broker began or ended
            # around it: a take moves the position before its batch runs, a settlement makes
            # failures ready after it.
            with self._lock:
                before = self._quiet_state_locked(cursor)
            if before is None or before[0] or self._relearning("unsettled", cid, offset, self._now()):
                return candidates[index:]
            with self._lock:
                if self._quiet_state_locked(cursor) != before:
                    return candidates[index:]
        return []

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> list[Consumer]:
        """Refuse further publishes, close every consumer and wake every waiter; returns the consumers."""
        with self._lock:
            self._closed = True
            members = self._members()
            for member in members:
                member._mark_closed("the broker was closed")
            self._waiters.wake_all()
        return members

    def _keep_last_snapshot(self) -> None:
        """Keep the figures at close, so ``info()`` works on a closed broker."""
        try:
            last = self.snapshot()
        except StorageError:  # the server is gone: report what this broker last knew
            with self._lock:
                last = QueueSnapshot(self._config, 0, 0, (), 0)
        with self._lock:
            self._last = last


def _decode_name(cid: str) -> str:
    """The subscription name of a named cursor id (the inverse of :func:`named_cursor`)."""
    return unquote(cid[1:])  # every % in an id is one of encode_part's escapes


class _OtherBrokersConsumer:
    """A consumer attached through another broker, as ``info()`` counts it: its id and mode."""

    closed = False
    name = None

    def __init__(self, ident: int, push: bool) -> None:
        self.id = ident
        self._is_push = push


def _members_of(mem: list[bytes], mine: dict[str, Consumer]) -> tuple[Consumer, ...]:
    """The consumers of a cursor's membership hash: this broker's own objects, stand-ins for the others'."""
    members: list[Any] = []
    for i in range(0, len(mem), 2):
        who, mode = _text(mem[i]), mem[i + 1]
        local = mine.get(who)
        if local is not None:
            members.append(local)
        else:
            _, _, ident = who.rpartition("/")
            members.append(_OtherBrokersConsumer(int(ident) if ident.isdigit() else 0, mode == b"push"))
    members.sort(key=lambda member: member.id)
    return tuple(members)


def _text(value: Any) -> str:
    """A reply of redis-py (bytes: the engine never decodes responses) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
