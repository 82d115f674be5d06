"""The Redis Streams engine: queues on a Redis server (7.0 or later), shared by every broker that opens it.

Each queue is a stream of messages plus a few hashes and sorted sets per cursor (see
:mod:`~mqlite.engine.redis.scripts` for the layout). Every operation is one Lua script, so it is
atomic on the server: a broker that dies mid-operation leaves nothing half-applied. Python does
what Python must: it checks arguments, runs the serializer and the event filters' patterns, keeps
the in-process waiters and hands dead letters to the broker, outside any lock.

The rooms: this module opens the server and runs the scripts; :mod:`.connection` calls them,
:mod:`.watcher` keeps the broker alive and notices other brokers, :mod:`.queue` is a queue's
publishing, settings and introspection side and :mod:`.consuming` its consumers' side,
:mod:`.wire` converts values to script arguments and back, :mod:`.keys` names the keys.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions

from mqlite.clock import Clock
from mqlite.config import QueueConfig
from mqlite.engine.base import Capabilities, DeadLetterSink
from mqlite.engine.codec import JsonSerializer, Serializer
from mqlite.engine.redis.connection import ScriptCaller
from mqlite.engine.redis.keys import QueueKeys, encode_part
from mqlite.engine.redis.queue import RedisQueue
from mqlite.engine.redis.transaction import RedisScope
from mqlite.engine.redis.watcher import Watcher
from mqlite.engine.redis.wire import CONFIG_FIELDS, ScriptRefusal, config_from, redis_error, text
from mqlite.errors import BrokerClosed, InvalidArgument, StorageError

__all__ = ["RedisEngine", "RedisQueue"]

_log = logging.getLogger("mqlite")

MIN_SERVER = (7, 0)
"""The oldest Redis server the scripts run on (``XADD`` with explicit ids, ``XTRIM MINID``)."""

_SAFE_POLICIES = frozenset({"noeviction"})


class RedisEngine:
    """Storage on a Redis server, for one broker. Thread-safe: redis-py's pool is, and ``_lock``
    guards ``_queues``, ``_unreleased``, ``_closed`` and the watcher's ``_watching``."""

    # Filters are applied in the scripts (Python classifies each event name once per filter).
    capabilities = Capabilities(shared=True, persistent=True, blocking_io=True, event_filter="server")

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
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                server_url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        except ValueError as error:
            raise InvalidArgument(f"cannot use the Redis URL {url!r}: {error}") from None
        self._socket_timeout = socket_timeout
        try:
            self._check_server()
            self._call = ScriptCaller(self._client)
            self._beat()
        except BaseException:
            self._client.close()
            raise
        self._lock = threading.Lock()
        self._queues: dict[str, RedisQueue] = {}
        self._unreleased: list[tuple[list[str], str]] = []  # transactions' holds a release failed to end
        self._closed = False
        self._watcher = Watcher(self)
        self._watcher.start()

    def _check_server(self) -> None:
        try:
            server = self._client.info("server")
            memory = self._client.info("memory")
        except redis.exceptions.RedisError as error:
            redis_error(self._url, error)
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
            redis_error(self._url, error)

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
            names = sorted(text(name) for name in self._client.hkeys(self._registry))
            configs = []
            for name in names:
                stored: Any = self._client.hmget(QueueKeys(self._namespace, name).meta, CONFIG_FIELDS)
                configs.append((name, config_from(stored)))
        except redis.exceptions.RedisError as error:
            redis_error(self._url, error)
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

    def begin_transaction(self) -> RedisScope:
        """The scope of a new transaction: it holds the queues it publishes to, and commits in one script."""
        return RedisScope(self)

    def release_holds(self, keys: list[str], holder: str) -> None:
        """End the holds of transaction ``holder`` on the queues of ``keys``.

        If the server cannot be reached, they are kept and :meth:`retry_releases` (the watcher,
        once per heartbeat TTL) tries again: while this broker lives, nothing else would end them.

        Raises:
            StorageError: the server could not be reached (the release will be retried).
        """
        try:
            self.run_on("tx_release", keys, [holder])
        except StorageError:
            with self._lock:
                self._unreleased.append((keys, holder))
            raise

    def retry_releases(self) -> None:
        """Retry the releases that failed (see :meth:`release_holds`); those that fail again stay."""
        with self._lock:
            pending, self._unreleased = self._unreleased, []
        for index, (keys, holder) in enumerate(pending):
            try:
                self.run_on("tx_release", keys, [holder])
            except StorageError:
                with self._lock:
                    self._unreleased.extend(pending[index:])
                raise

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
        self._watcher.stop()
        for queue in queues:
            queue._keep_last_snapshot()
        try:
            self._client.delete(self.live_prefix + self.broker_id, self._watcher.wake_key)
        except redis.exceptions.RedisError as error:
            _log.warning("closing a broker on %s could not remove its heartbeat: %s", self._url, error)
        self._call.close()
        self._client.close()

    def run(self, script: str, keys: QueueKeys, args: Sequence[Any]) -> Any:
        """Run one operation's script on one queue; server errors become mqlite's exceptions.

        Raises:
            StorageError: the server is unreachable, timed out, or refused the write (OOM, READONLY).
            ScriptRefusal: the script refused the operation (changing nothing).
        """
        return self.run_on(script, keys.all, args)

    def run_on(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """:meth:`run` on the keys of any number of queues (``QueueKeys.all`` of each, in a row)."""
        try:
            return self._call(script, keys, args)
        except redis.exceptions.ResponseError as error:
            code, _, detail = str(error).partition(" ")
            if code == "NOCURSOR":
                raise StorageError(
                    "the subscription's cursor is gone from the server (deleted by another broker?)"
                ) from None
            if code in _REFUSALS:
                raise ScriptRefusal(code, detail) from None
            redis_error(self._url, error)
        except redis.exceptions.RedisError as error:
            redis_error(self._url, error)

    def _open_queues(self) -> list[RedisQueue]:
        with self._lock:
            return list(self._queues.values())

    def _watch_queue(self, name: str) -> None:
        """A waiter registered on queue ``name``: make the watcher read it."""
        self._watcher.watch_queue(name)


_REFUSALS = frozenset({"NOTPENDING", "WAITING", "QUEUEFULL", "BADOFFSET", "CONFLICT", "TXBUSY", "TXLOST"})
"""The error codes by which a script refuses an operation, having changed nothing (``ScriptRefusal``)."""

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
    value = options.get(name)
    if value is None:
        return default if given is None else given
    if given is not None:
        raise InvalidArgument(f"{name} is given both as an argument and in the Redis URL; give it once")
    try:
        return float(value)
    except ValueError:
        raise InvalidArgument(f"{name} in the Redis URL must be a number of seconds, got {value!r}") from None
