"""The consumers' side of a Redis queue: take, pull, push, settle, seek, filter, wait.

:class:`Consuming` is the half of :class:`~mqlite.engine.redis.queue.RedisQueue` that delivers:
each call is one script (take, ack, nack, push_done, give_back, seek, reconfigure), plus the
in-process waiters that a take which found nothing leaves behind.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import redis.exceptions

from mqlite._delivery import policy
from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import DeadLetter
from mqlite._delivery.waiters import Waiter, Waiters
from mqlite.clock import Clock
from mqlite.config import Start, SubscriptionSettings
from mqlite.engine.base import Attempt, Consumer, DeadLetterSink, QueueSnapshot, drain_buffer, offset_to_settle
from mqlite.engine.codec import Serializer, decode_row
from mqlite.engine.redis.keys import QueueKeys
from mqlite.engine.redis.wire import ScriptRefusal, redis_error, settings_args, start_args, text
from mqlite.errors import AckModeError, InvalidArgument, NotPending, StorageError, SubscriptionClosed
from mqlite.filters import EventFilter
from mqlite.message import Message, redelivery

if TYPE_CHECKING:
    from mqlite.engine.redis.engine import RedisEngine

__all__ = ["Consuming"]

_SCAN_LIMIT = 4096  # entries a filtered take scans per script call, so one call stays short
_RELEARN_TRIES = 16  # a take that keeps meeting new event names gives up after this many rounds


class Consuming:
    """The delivering half of a Redis queue, mixed into ``RedisQueue``, which sets every attribute
    below in its ``__init__``. Thread-safe as ``RedisQueue`` is: ``_lock`` guards what it says there."""

    name: str
    message_class: type[Message]
    _engine: RedisEngine
    _keys: QueueKeys
    _clock: Clock
    _dead_letters: DeadLetterSink
    _serializer: Serializer
    _lock: threading.Lock
    _cursors: dict[str, Cursor]
    _cursor_ids: dict[int, str]
    _consumers: dict[int, Consumer]
    _waiters: Waiters
    _changes: int
    _push_epoch: int
    _taking: dict[int, int]
    _took: threading.Condition
    _closed: bool
    _last: QueueSnapshot | None
    _watched: dict[str, str]

    # -- calling the scripts -----------------------------------------------------------------------

    def _run(self, script: str, *args: Any) -> Any:
        return self._engine.run(script, self._keys, args)

    def _now(self) -> str:
        return repr(float(self._clock.time()))

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

    # -- taking ------------------------------------------------------------------------------------

    def _learn(self, cid: str) -> None:
        """Tell the server which of the queue's event names the cursor ``cid``'s filter matches.

        The filter is read from the server, the one source of truth for every broker; the
        patterns are matched here, by :class:`~mqlite.filters.EventFilter` itself.
        """
        client = self._engine._client
        for _ in range(_RELEARN_TRIES):
            try:
                stored = client.hget(f"{self._keys.prefix}c:{cid}", "settings")
                names = [text(n) for n in client.hkeys(self._keys.events)]
            except redis.exceptions.RedisError as error:
                redis_error(self._engine._url, error)
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
            self._decode_taken(entries, messages)
            dead += letters
            due = None if next_due is None else float(next_due)
            if not more:
                break
        self._send_dead(cursor, dead, cid, self._consumer_id(consumer))
        return messages, due

    def _decode_taken(self, entries: list[Any], messages: list[Message]) -> None:
        """Append the messages of a take's reply to ``messages``.

        A fresh entry without key or headers (``[offset, event, payload, time]``, the common
        case) is built here without :meth:`_message`'s general path: under cProfile, it cut
        the engine's own time per message of a ``poll(100)`` (``json.loads`` aside) by about a
        third. A redelivery (first in the reply) carries its attempt as a seventh field.
        """
        loads = self._serializer.loads
        cls = self.message_class
        append = messages.append
        for entry in entries:
            if len(entry) == 4:
                offset, event, payload, stamp = entry
                try:
                    message: Message = tuple.__new__(cls, (event.decode(), loads(payload), offset, float(stamp)))
                except Exception:  # noqa: BLE001  # decoded again the general way, which raises StorageError
                    message = self._message(entry)
                append(message)
            else:
                message = self._message(entry)
                append(redelivery(message, entry[6]) if len(entry) > 6 and entry[6] > 1 else message)

    def _message(self, entry: list[Any]) -> Message:
        # A take's fresh entries leave out key and headers when there are none.
        offset, event, payload, stamp, key, headers = entry[:6] if len(entry) > 4 else (*entry, None, None)
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

    def _push_batch_unless_closed(
        self, consumer: Consumer, max_messages: int
    ) -> tuple[list[Message], float | None] | None:
        """:meth:`_push_batch`, or None if the consumer was closed meanwhile: its detach may have
        deleted the cursor under the take, which then fails; that is no error of the server's."""
        try:
            return self._push_batch(consumer, max_messages)
        except StorageError:
            if consumer.closed:
                return None
            raise

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
        taken = self._push_batch_unless_closed(consumer, max_messages)
        if taken is None:
            return Attempt(True, None, None, None)
        batch, due = taken
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
        taken = self._push_batch_unless_closed(consumer, max_messages)
        if taken is None:
            return Attempt(True, None, None, None)
        batch, due = taken
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

    # -- acks, seeks and filters -------------------------------------------------------------------

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
        cls = self.message_class  # a Message of this queue is its offset; anything else is checked
        offsets = [message[2] if type(message) is cls else self._offset(message, "ack") for message in messages]
        if len(set(offsets)) < len(offsets):
            raise NotPending(f"ack() was given the same message of {self.name!r} twice; nothing was acked")
        try:
            self._run("ack", self._cid(consumer), *offsets)
        except ScriptRefusal as refusal:
            raise self._not_pending(refusal.detail) from None

    def nack(self, consumer: Consumer, message: Message | int, delay: float) -> None:
        """Give a pending message back for redelivery after ``delay`` seconds of broker clock."""
        self._check_manual(consumer, "nack")
        offset = self._offset(message, "nack")
        try:
            who = self._consumer_id(consumer)
            dead = self._run("nack", self._cid(consumer), offset, repr(float(delay)), self._now(), "nack", who)
        except ScriptRefusal as refusal:
            if refusal.code == "WAITING":
                raise NotPending(f"offset {offset} of {self.name!r} is already waiting for redelivery") from None
            raise self._not_pending(refusal.detail) from None
        self.wake_all()
        self._send_dead(consumer._cursor, dead, self._cid(consumer), self._consumer_id(consumer))

    def seek(self, consumer: Consumer, target: Start) -> int:
        """Move the consumer's cursor (shared by every subscription of its name) to ``target``."""
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        args = start_args(target)
        try:
            position = int(self._run("seek", self._cid(consumer), *args, self._now()))
        except ScriptRefusal as refusal:
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
            done, stored = self._run("reconfigure", cid, settings_args(current)[-2], *settings_args(settings))
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

    # -- waiting -----------------------------------------------------------------------------------

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

    def _all_local(self) -> list[Cursor]:
        """This broker's named cursors and its consumers' ephemeral ones (``_lock`` held)."""
        cursors = {id(c): c for c in self._cursors.values()}
        for member in self._consumers.values():
            cursors.setdefault(id(member._cursor), member._cursor)
        return list(cursors.values())
