"""The watcher: one thread per broker that keeps it alive on the server and notices other brokers' work.

It refreshes the broker's heartbeat, releases what dead brokers' consumers held, and wakes this
broker's waiters when another broker publishes to, or gives back messages of, a queue they wait on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions

from mqlite.engine.redis.wire import redis_error, text
from mqlite.errors import StorageError

if TYPE_CHECKING:
    from mqlite.engine.redis.engine import RedisEngine
    from mqlite.engine.redis.queue import RedisQueue

__all__ = ["Watcher"]

_log = logging.getLogger("mqlite")

_WATCH_BLOCK_MS = 500  # how long the watcher's XREAD blocks; bounds how late it sees a new queue


class Watcher:
    """The watcher thread of one engine. Thread-safe: the engine's ``_lock`` guards ``_watching``;
    ``_wake_last`` is the thread's alone."""

    def __init__(self, engine: RedisEngine) -> None:
        self._engine = engine
        # It blocks at most a third of the heartbeat, so it refreshes the heartbeat in time.
        self._block_ms = max(10, min(_WATCH_BLOCK_MS, int(engine._heartbeat * 1000 / 3)))
        self._watching: frozenset[str] = frozenset()  # the queues the current read covers
        # The watcher's own stream: a waiter on a queue it does not read interrupts it there.
        self.wake_key = f"{engine._namespace}:wake:{engine.broker_id}"
        self._wake_last = "0-0"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqlite-redis-watcher", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def _run(self) -> None:
        """Keep this broker alive on the server, reap dead ones, and wake waiters on foreign changes.

        One connection blocks in ``XREAD`` on every open queue's log and signal streams, from the
        last entry it saw, so nothing published after a queue opened goes unseen. Between reads
        it refreshes the heartbeat (every third of its TTL) and, once per TTL, releases what dead
        brokers' consumers held on the open queues, and the transactions' holds whose release
        failed.
        """
        engine = self._engine
        reader = redis.Redis.from_url(engine._server_url, socket_timeout=engine._socket_timeout + self._block_ms / 1000)
        beat_every = engine._heartbeat / 3
        last_beat = last_reap = time.monotonic()
        try:
            while not self._stop.is_set():
                queues = engine._open_queues()
                try:
                    now = time.monotonic()
                    if now - last_beat >= beat_every:
                        engine._beat()
                        last_beat = now
                    if now - last_reap >= engine._heartbeat:
                        engine.retry_releases()
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
                    _log.warning("the Redis watcher of %s lost the server: %s", engine._url, error)
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
        with self._engine._lock:
            watched = [queue for queue in queues if queue._has_waiters()]
            self._watching = frozenset(queue.name for queue in watched)
        streams: dict[Any, Any] = {self.wake_key: self._wake_last}
        owners: dict[str, RedisQueue] = {}
        for queue in watched:
            for key, last in queue._watch_from().items():
                streams[key] = last
                owners[key] = queue
        replies: Any = reader.xread(streams, count=1, block=self._block_ms)
        for stream, entries in replies or ():
            key = text(stream)
            top: Any = reader.xrevrange(key, count=1)
            last = text(top[0][0]) if top else text(entries[-1][0])
            if key == self.wake_key:
                self._wake_last = last
                continue
            owner = owners.get(key)
            if owner is not None:
                owner._changed(key, last)

    def watch_queue(self, name: str) -> None:
        """A waiter registered on queue ``name``: make the watcher read it, interrupting its read if need be."""
        engine = self._engine
        with engine._lock:
            if name in self._watching or engine._closed:
                return
        try:
            engine._client.xadd(self.wake_key, {"q": name.encode()}, maxlen=16, approximate=True)
        except redis.exceptions.RedisError as error:
            redis_error(engine._url, error)

    def stop(self) -> None:
        """Stop the thread: interrupt its blocking read, and wait for it (bounded by one read's timeout)."""
        engine = self._engine
        self._stop.set()
        try:  # interrupt the watcher's blocking read, so that closing does not wait it out
            engine._client.xadd(self.wake_key, {"q": b""}, maxlen=16, approximate=True)
        except redis.exceptions.RedisError:
            pass  # the server is gone: the read ends with an error, or within its block time
        self._thread.join(engine._socket_timeout + self._block_ms / 1000)
