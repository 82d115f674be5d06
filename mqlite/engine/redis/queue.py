"""One queue on a Redis server: opening, publishing, settings, attaching and introspection.

The consumers' side (take, settle, seek, wait) is :class:`~mqlite.engine.redis.consuming.Consuming`,
which :class:`RedisQueue` inherits.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis.exceptions

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.dedup import check_dedup_id
from mqlite._delivery.waiters import Waiters
from mqlite.clock import Clock
from mqlite.config import QueueConfig, Start, SubscriptionSettings
from mqlite.engine.base import (
    Consumer,
    CursorFigures,
    CursorStats,
    DeadLetterSink,
    QueueSnapshot,
    UnsettledQueues,
    drain_buffer,
)
from mqlite.engine.codec import encode_fields
from mqlite.engine.redis.keys import QueueKeys, ephemeral_cursor, named_cursor
from mqlite.engine.redis.transaction import Transacting
from mqlite.engine.redis.wire import (
    CONFIG_FIELDS,
    ScriptRefusal,
    config_args,
    config_from,
    decode_name,
    members_of,
    redis_error,
    settings_args,
    start_args,
    text,
)
from mqlite.errors import BrokerClosed, ConfigConflict, InvalidArgument, QueueFull, StorageError
from mqlite.filters import check_event_name
from mqlite.info import PendingMessage
from mqlite.message import Message, MessageMeta, message_class

if TYPE_CHECKING:
    from mqlite.engine.redis.engine import RedisEngine

__all__ = ["RedisQueue"]


class RedisQueue(Transacting):
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
        stored = engine.run("open", self._keys, [*config_args(config), f"{engine._namespace}:queues", name])
        self._config = config_from(stored)
        self._watched = self._stream_tops()
        self.reap()

    def __repr__(self) -> str:
        return f"<RedisQueue {self.name!r}>"

    # -- publishing --------------------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Append one message and return it with its offset.

        :meth:`publish_many` of one, written out for the common case (no key, no headers, no
        dedup id): a one-message publish is bound by the per-call cost, which this path keeps small.
        """
        if key is not None or headers is not None or dedup_id is not None:
            return self.publish_many([(event, payload, key, headers)], None if dedup_id is None else [dedup_id])[0]
        name = str.__str__(check_event_name(event))
        stored = encode_fields(self._serializer, self.name, name, payload, None, {})[0]
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        try:
            first, stamp = self._publishing("publish", 1, name, stored, b"", b"")
        except ScriptRefusal as refusal:
            raise self._queue_full(refusal, 1) from None
        message: Message = tuple.__new__(self.message_class, (name, payload, int(first), float(stamp)))
        with self._lock:
            if self._waiters:
                self._waiters.wake_event(name)
        return message

    def _queue_full(self, refusal: ScriptRefusal, count: int) -> QueueFull:
        return QueueFull(
            f"queue {self.name!r} holds {refusal.detail} of max_messages={self.config.max_messages}; "
            f"overflow='reject' refuses {count} more"
        )

    def publish_many(
        self,
        drafts: Sequence[tuple[str, Any, Any, Mapping[str, Any] | None]],
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[Message]:
        """Append ``(event, payload, key, headers)`` drafts at contiguous offsets, all or none;
        with ``dedup_ids``, only the drafts whose ids are not in the duplicate window.

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
            draft, fields = self._draft(event, payload, key, headers)
            checked.append(draft)
            args += fields
        if not checked:
            return []
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        if ids is not None:
            return self._publish_once(checked, args, ids)
        try:
            first, stamp = self._publishing("publish", len(checked), *args)
        except ScriptRefusal as refusal:
            raise self._queue_full(refusal, len(checked)) from None
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
            first, stamp, places = self._publishing(
                "publish_once",
                len(checked),
                repr(float(config.dedup_window)),
                config.dedup_max_ids,
                *with_ids,
            )
        except ScriptRefusal as refusal:
            raise QueueFull(
                f"queue {self.name!r} holds {refusal.detail} of max_messages={config.max_messages}; "
                f"overflow='reject' refuses the new ones of {len(checked)}"
            ) from None
        messages: list[Message] = []
        built: dict[int, Message] = {}
        timestamp = float(stamp) if stamp else 0.0
        duplicates = 0
        for (event, payload, meta), place in zip(checked, places, strict=True):
            if isinstance(place, bytes):  # b"n<k>": the k-th new message
                offset = int(first) + int(place[1:])
                message = built.get(offset)
                if message is None:
                    message = built[offset] = self._built((event, payload, meta), offset, timestamp)
                else:
                    duplicates += 1  # a repeat of an earlier draft of this call
                messages.append(message)
                continue
            duplicates += 1
            messages.append(self._original(place, (event, payload, meta)))
        with self._lock:
            self.duplicates += duplicates
            if built and self._waiters:
                for event in {m[0] for m in built.values()}:
                    self._waiters.wake_event(event)
        return messages

    # -- settings and bounds -----------------------------------------------------------------------

    @property
    def config(self) -> QueueConfig:
        """The retention settings in force, as the server has them (another broker may have changed them)."""
        with self._lock:
            last = self._last
        if last is not None:
            return last.config
        try:
            stored: Any = self._engine._client.hmget(self._keys.meta, CONFIG_FIELDS)
        except redis.exceptions.RedisError as error:
            redis_error(self._engine._url, error)
        config = config_from(stored)
        with self._lock:
            self._config = config
        return config

    def configure(self, config: QueueConfig) -> None:
        """Apply new retention settings, for every broker on the server."""
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot configure queue {self.name!r}: the broker is closed")
        self._run("configure", self._now(), *config_args(config))
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

    def drain_start(self) -> tuple[int, bool, bool]:
        """The end offset, as a drain begins; whether the push cursors are settled is the
        server's to say (:meth:`push_unsettled` asks), and a push batch may be out."""
        return self.bounds()[1], False, True

    def watch_settled(self, unsettled: UnsettledQueues) -> bool:
        """False: whether the push cursors are settled is the server's to say, at every drain."""
        return False

    # -- attaching ---------------------------------------------------------------------------------

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
                *start_args(start),
                self._now(),
                self._consumer_id(consumer),
                mode,
                self._engine.live_prefix,
                *settings_args(settings),
            )
        except ScriptRefusal as refusal:
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

    # -- watching and reaping ----------------------------------------------------------------------

    def _stream_tops(self) -> dict[str, str]:
        """The last id of the log and signal streams now: where the watcher starts reading."""
        client = self._engine._client
        tops = {}
        try:
            for key in (self._keys.log, self._keys.sig):
                last: Any = client.xrevrange(key, count=1)
                tops[key] = text(last[0][0]) if last else "0-0"
        except redis.exceptions.RedisError as error:
            redis_error(self._engine._url, error)
        if tops[self._keys.log] == "0-0":
            end = self._run("bounds", self._now())[1]
            tops[self._keys.log] = f"0-{int(end)}"
        return tops

    def reap(self) -> None:
        """Release what the consumers of dead brokers held on this queue (one script)."""
        reaper = f"{self._engine.broker_id}/reaper"
        for cid, letters in self._run("reap", self._now(), self._engine.live_prefix, reaper):
            name = text(cid)
            stand_in = Cursor(queue=self.name, name=decode_name(name), position=0, settings=self._stored_settings(name))
            self._send_dead(stand_in, letters, name, reaper)

    def _stored_settings(self, cid: str) -> SubscriptionSettings:
        try:
            stored = self._engine._client.hget(f"{self._keys.prefix}c:{cid}", "settings")
        except redis.exceptions.RedisError as error:
            redis_error(self._engine._url, error)
        return SubscriptionSettings() if stored is None else SubscriptionSettings.from_stored(json.loads(stored))

    # -- introspection -----------------------------------------------------------------------------

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
                who = text(owner)
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
                        name=None if cid.startswith("e") else decode_name(cid),
                        events=settings.event_filter.spec,
                        manual_ack=settings.manual_ack,
                        members=members_of(mem, mine),
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
            waiters = self._waiters.count()
        with self._lock:
            duplicates = self.duplicates
        return QueueSnapshot(config_from(stored), int(start), int(end), tuple(figures), waiters, 0, duplicates)

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

    # -- closing -----------------------------------------------------------------------------------

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
