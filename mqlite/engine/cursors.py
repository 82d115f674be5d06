"""Attaching and detaching consumers, and what happens to what they held: written once.

:class:`CursorCore` adds to :class:`~mqlite.engine.core.QueueCore` the operations that change
who reads a queue (attach, detach, delete a durable cursor), giving back what a consumer read
ahead, and the failure of a delivery (retry or dead letter), which a detach, a nack, an ack
timeout and a raising callback all end in.
"""

from __future__ import annotations

from mqlite._delivery import policy
from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, READY, SETTLED, DeadLetter, Pending
from mqlite.config import Start, SubscriptionSettings
from mqlite.engine.base import Consumer, drain_buffer
from mqlite.engine.core import QueueCore
from mqlite.errors import BrokerClosed, ConfigConflict
from mqlite.message import Message

__all__ = ["CursorCore"]


class CursorCore(QueueCore):
    """A queue with its consumers' attachments. Thread-safe; see :class:`QueueCore`."""

    # -- attaching and detaching ------------------------------------------------------------

    def attach(self, consumer: Consumer, name: str | None, start: Start, settings: SubscriptionSettings) -> Cursor:
        """Attach ``consumer`` to the named cursor (creating it at ``start``) or to a new ephemeral one.

        Raises:
            ConfigConflict: the named cursor has attached consumers with other settings.
            InvalidArgument: ``start`` is not a valid position.
        """
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot subscribe to {self.name!r}: the broker is closed")
            cursor = self._cursors.get(name) if name is not None else None
            if cursor is None:
                cursor = Cursor(queue=self.name, name=name, position=self._resolve_locked(start), settings=settings)
                self._index.apply_filter(cursor, settings.event_filter)
                if name is None:
                    self._ephemeral.append(cursor)
                else:
                    self._cursors[name] = cursor
                    self._adopt_cursor_locked(cursor)
                    self._journal_cursor_locked(cursor)
                self._refresh_unwanted_locked()
            elif cursor.settings != settings:
                if cursor.members:
                    raise ConfigConflict(
                        f"subscription {name!r} on {self.name!r} is attached with different settings "
                        f"({cursor.settings.describe()}); subscriptions sharing a name must agree"
                    )
                self._configure_cursor_locked(cursor, settings)
                self._journal_cursor_locked(cursor)
                self._refresh_unwanted_locked()
            cursor.members.append(consumer)
            consumer._cursor = cursor
            self._index.push.stale()  # a push member, maybe the cursor's first
            self._unsettle_locked(cursor)  # a new push cursor, or a push member for one that had none
            if cursor.pending:
                self._timer_set_locked(cursor)  # its timers are a push cursor's now
            self._journal_member_locked(cursor, consumer, attached=True)
            return cursor

    def _journal_member_locked(self, cursor: Cursor, consumer: Consumer, *, attached: bool) -> None:
        """A consumer attached to (or detached from) ``cursor`` (a shared file lists them for every broker)."""

    def _adopt_cursor_locked(self, cursor: Cursor) -> None:
        """A new durable cursor joins the queue (a shared file watches what it makes due)."""

    def _configure_cursor_locked(self, cursor: Cursor, settings: SubscriptionSettings) -> None:
        cursor.configure(settings)
        if cursor.filter != settings.event_filter:
            self._index.apply_filter(cursor, settings.event_filter)

    def delete_cursor(self, name: str) -> bool:
        """Forget the named cursor, its position and pending messages; False if there was none.

        Raises:
            ConfigConflict: subscriptions with that name are still attached.
        """
        with self._lock:
            if self._closed:
                raise BrokerClosed(f"cannot delete subscription {name!r} of {self.name!r}: the broker is closed")
            cursor = self._cursors.get(name)
            if cursor is None:
                return False
            if cursor.members:
                raise ConfigConflict(
                    f"subscription {name!r} on {self.name!r} has {len(cursor.members)} attached; close them first"
                )
            self._journal_forget_locked(name)
            del self._cursors[name]
            self._index.forget(cursor)
            self._refresh_unwanted_locked()
            self._housekeep_locked()
            return True

    def detach(self, consumer: Consumer) -> None:
        """Detach a closing consumer: what it read ahead goes back unread, what it held is retried."""
        with self._lock:
            self._detach_locked(consumer, "subscription closed", "the subscription was closed")
            dead = self._take_outbox_locked()
        self._send_dead_letters(dead)

    def _detach_locked(self, consumer: Consumer, failure: str | None, why: str) -> None:
        """:meth:`detach` under the lock; the consumer is marked closed because ``why``.

        What it held fails with reason ``failure``. With ``failure`` None, or when the broker is
        closing, that is no failed delivery: it waits, its attempt count unchanged, for the next
        consumer.
        """
        cursor = consumer._cursor
        unread = self._drain_buffer(consumer)
        try:
            self._give_back_locked(cursor, unread, pulled=True)
            if unread and self.durable and cursor.name is not None:
                self._journal_sync_locked(cursor, [m[2] for m in unread])
        except BaseException:
            consumer._buffer.extendleft(reversed(unread))  # the engine restores the rest; this is ours
            raise
        if consumer in cursor.members:
            cursor.members.remove(consumer)
            self._index.push.stale()
            self._journal_member_locked(cursor, consumer, attached=False)
        if self._closed:
            failure = None  # the consumer did not give up on what it held
        for entry in list(cursor.pending.values()):
            if entry.owner is consumer and entry.state == OUT:
                if failure is None:
                    cursor.schedule.make_ready(entry)
                else:
                    self._fail_locked(cursor, entry, failure, 0.0, None)
        if not cursor.members and not cursor.durable and cursor in self._ephemeral:
            self._ephemeral.remove(cursor)
            self._index.forget(cursor)
            self._refresh_unwanted_locked()
        # Closed only once nothing else can fail: a close that raised can be called again.
        consumer._mark_closed(why)
        self._waiters.wake_all()

    @staticmethod
    def _drain_buffer(consumer: Consumer) -> list[Message]:
        return drain_buffer(consumer)

    def give_back(self, consumer: Consumer) -> None:
        """Return what ``consumer`` read ahead and never handed to user code, to the front of the line."""
        messages = self._drain_buffer(consumer)
        if not messages:
            return
        with self._lock:
            cursor = consumer._cursor
            self._give_back_locked(cursor, messages, pulled=True)
            if self.durable and cursor.name is not None:
                self._journal_sync_locked(cursor, [m[2] for m in messages])
            self._waiters.wake_all()

    def _fail_locked(
        self, cursor: Cursor, entry: Pending, reason: str, delay: float, error: BaseException | None
    ) -> None:
        """A delivery failed: dead-letter the message if it used up its deliveries, else retry it."""
        message = entry.message
        self._unsettle_locked(cursor)
        decision = policy.on_failure(
            message,
            attempts=entry.attempts,
            max_deliveries=cursor.max_deliveries,
            delay=delay,
            queue=self.name,
            subscription=cursor.name,
            reason=reason,
            error=error,
        )
        if isinstance(decision, policy.Dead):
            del cursor.pending[message[2]]
            entry.state = SETTLED
            cursor.dead_lettered += 1
            # On a file the pending row stays until the dead letter is published (see
            # _send_dead_letters): a crash in between redelivers the message, never loses it.
            held = self._note_dead_in_transit_locked(cursor, message[2])
            self._outbox.append(
                DeadLetter(cursor.dead_letter, message, decision.headers, cursor.name if held else None)
            )
        elif decision.delay > 0:
            cursor.schedule.wait_until(entry, self._monotonic() + decision.delay)
            self._timer_set_locked(cursor)
        else:
            cursor.schedule.make_ready(entry)
        if self._waiters:
            self._waiters.wake_all()

    def _give_back_locked(self, cursor: Cursor, messages: list[Message], *, pulled: bool) -> None:
        """Undo the delivery of messages a consumer took but never handed to user code.

        They go back to the front of the cursor's line, in order, without counting an attempt.
        """
        if not messages:
            return
        self._unsettle_locked(cursor)
        pending = cursor.pending
        cursor.delivered -= len(messages)
        if pulled and not cursor.manual_ack:
            cursor.acked -= len(messages)  # a pull with automatic acks counted them acked when it took them
        schedule = cursor.schedule
        for i, message in enumerate(messages):
            entry = pending.get(message[2])
            if entry is None:
                entry = Pending(message, 0, None, READY)
                pending[message[2]] = entry
            else:
                entry.attempts -= 1
                if entry.attempts:
                    cursor.redelivered -= 1
            schedule.insert_ready(i, entry)
