"""The reading side of a queue, written once: take, settle, seek, and the figures of ``info()``.

:class:`DeliveryCore` adds to :class:`~mqlite.engine.cursors.CursorCore` the operations consumers
call. The memory engine is exactly this class; the SQLite engine subclasses it with a journal.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Any

from mqlite._delivery import policy
from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, SETTLED, WAITING, Pending
from mqlite._delivery.waiters import AnyOf, Waiter
from mqlite.config import Start
from mqlite.engine.base import Attempt, Consumer, CursorFigures, CursorStats, QueueSnapshot, offset_to_settle
from mqlite.engine.cursors import CursorCore
from mqlite.engine.index import has_push_member
from mqlite.errors import AckModeError, NotPending, SubscriptionClosed
from mqlite.filters import EventFilter
from mqlite.info import PendingMessage
from mqlite.message import Message, redelivery

__all__ = ["DeliveryCore"]

# tuple.__new__ builds the NamedTuple records of the take paths without the Python-level __new__
# each NamedTuple has: one frame less per take.
_tuple_new = tuple.__new__
_object_new = object.__new__


class DeliveryCore(CursorCore):
    """A queue with its consumers' operations. Thread-safe; see :class:`QueueCore`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hooked = {"push_done", "_push_done_locked", "_push_batch_locked", "_take_locked"} & set(vars(cls))
        # A subclass that wraps a push take or settlement (mqlite.testing's recorder and faults)
        # must see each one, which push_turn and push_step make in their own way: a dispatcher
        # steps its consumers one at a time instead (or, if it wrote its own push_turn, by that).
        if hooked and "push_turn" not in vars(cls):
            cls.push_turn = None  # type: ignore[assignment]  # what ManualDispatcher looks for
        if hooked and "push_step" not in vars(cls):
            cls.push_step = None  # type: ignore[assignment]

    # -- pulling ------------------------------------------------------------------------------

    def try_pull(self, consumer: Consumer, max_messages: int, read_ahead: int) -> list[Message]:
        """Up to ``max_messages`` for a pull consumer, without waiting (what it read ahead first)."""
        lock = self._lock
        lock.acquire()
        try:
            messages = self._pull_locked(consumer, max_messages, read_ahead)
            dead = self._outbox
            if dead:
                self._outbox = []
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)
        return messages

    def pull_or_wait(
        self, consumer: Consumer, max_messages: int, read_ahead: int, wake: Callable[[], object]
    ) -> Attempt[list[Message]]:
        """:meth:`try_pull`; if nothing came, register ``wake`` for when something may have."""
        waiter = None
        bound = None
        lock = self._lock
        lock.acquire()
        try:
            messages = self._pull_locked(consumer, max_messages, read_ahead)
            if not messages:
                waiter, bound = self._register_waiter_locked(consumer._cursor, wake)
            dead = self._take_outbox_locked()
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)
        attempt: Attempt[list[Message]] = _tuple_new(Attempt, (bool(messages), messages, waiter, bound))
        return attempt

    def _pull_locked(self, consumer: Consumer, max_messages: int, read_ahead: int) -> list[Message]:
        """One try at reading for a pull consumer.

        Messages the consumer read ahead come first. With ``read_ahead``, up to that many are
        taken and the ones beyond ``max_messages`` kept in the consumer's buffer.
        """
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        buffer = consumer._buffer
        if buffer:
            # No min() or max() on hot paths: on CPython 3.11 each call costs ten times a
            # conditional expression.
            count = len(buffer) if len(buffer) < max_messages else max_messages
            if count == 1:  # each step of sync iteration: skip the comprehension's frame
                return [buffer.popleft()]
            return [buffer.popleft() for _ in range(count)]
        cursor = consumer._cursor
        wanted = max_messages
        if read_ahead:
            wanted = policy.read_ahead_size(
                read_ahead,
                max_messages,
                manual_ack=cursor.manual_ack,
                durable_take=self.durable and consumer.name is not None,
                ahead_with_manual=consumer._manual_read_ahead and cursor.ack_timeout is None,
            )
        messages = self._take_locked(consumer, cursor, wanted, False)
        if len(messages) != max_messages:  # one test on the usual path: a get that found one
            if not messages and len(cursor.members) > 1 and self._take_back_read_ahead_locked(consumer, cursor):
                messages = self._take_locked(consumer, cursor, wanted, False)
            if len(messages) > max_messages:
                buffer.extend(messages[max_messages:])
                del messages[max_messages:]
        return messages

    def _take_back_read_ahead_locked(self, consumer: Consumer, cursor: Cursor) -> bool:
        """Give back to the line what the cursor's other members read ahead and have not handed
        out, for ``consumer``, whose take found nothing; whether there was any.

        So a message read ahead by one competing consumer is never out of another's reach: the
        others' next take finds it. Not on a file: there a named cursor never reads ahead (see
        :func:`policy.read_ahead_size`), and an unnamed one has one member.
        """
        if self.durable:
            return False
        found = False
        for member in cursor.members:
            if member is not consumer and member._buffer:
                unread = self._drain_buffer(member)
                if unread:
                    self._give_back_locked(cursor, unread, pulled=True)
                    found = True
        return found

    # -- pushing ------------------------------------------------------------------------------

    def try_push(self, consumer: Consumer, max_messages: int) -> list[Message] | None:
        """The next batch for a push consumer, possibly empty, without waiting; None once it is closed."""
        lock = self._lock
        lock.acquire()
        try:
            if consumer.closed:
                batch = None
            else:
                size = policy.push_batch_size(max_messages, len(consumer._cursor.members))
                batch = self._push_batch_locked(consumer, size)
            dead = self._outbox
            if dead:
                self._outbox = []
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)
        return batch

    def push_or_wait(
        self, consumer: Consumer, max_messages: int, wake: Callable[[], object]
    ) -> Attempt[list[Message] | None]:
        """:meth:`try_push`; if the batch is empty, register ``wake`` for when it may not be."""
        waiter = None
        bound = None
        batch: list[Message] | None = None
        lock = self._lock
        lock.acquire()
        try:
            if consumer.closed:
                done = True
            else:
                size = policy.push_batch_size(max_messages, len(consumer._cursor.members))
                batch = self._push_batch_locked(consumer, size)
                done = bool(batch)
                if not done:
                    waiter, bound = self._register_waiter_locked(consumer._cursor, wake)
            dead = self._take_outbox_locked()
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)
        attempt: Attempt[list[Message] | None] = _tuple_new(Attempt, (done, batch, waiter, bound))
        return attempt

    def push_and_watch(
        self, consumer: Consumer, max_messages: int, wake: Callable[[], object]
    ) -> Attempt[list[Message] | None]:
        """:meth:`push_or_wait` for a dispatcher that steps a worker only once it may have work.

        Registers ``wake`` whenever the batch holds all there is to take now, empty or not, in
        the same lock section as the take: whatever arrives or becomes ready while the batch's
        callbacks run wakes it. A full batch registers nothing (``waiter`` None): there may be
        more. The value is None once the consumer is closed.
        """
        # A dispatcher steps every push subscription this way, once per batch: the batch size is
        # found once, the waiter made (and its bound found) here rather than in
        # _register_waiter_locked, and the outbox looked at in place, four calls fewer a step.
        waiter = None
        bound = None
        batch: list[Message] | None = None
        lock = self._lock
        lock.acquire()
        try:
            if not consumer.closed:
                cursor = consumer._cursor
                size = policy.push_batch_size(max_messages, len(cursor.members))
                batch = self._push_batch_locked(consumer, size)  # what recorders and faults hook
                if len(batch) < size:
                    waiter = self._waiters.add(cursor.names, wake)
                    if cursor.pending:
                        bound = self._due_bound_locked(cursor)
            dead = self._outbox
            if dead:
                self._outbox = []
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)
        attempt: Attempt[list[Message] | None] = _tuple_new(Attempt, (waiter is None, batch, waiter, bound))
        return attempt

    def push_turn(
        self,
        handled: Consumer | None,
        batch: list[Message],
        consumer: Consumer | None,
        max_messages: int,
        wake: Callable[[], object] | None,
        watched: Sequence[Consumer],
    ) -> tuple[bool, list[Message] | None, Waiter | None, float | None]:
        """One turn of a dispatcher that steps a queue's push consumers one after another, in one
        lock section: settle the batch the previous turn took, and take the next consumer's.

        ``batch`` of ``handled``, if one is given, had every callback return: it is settled as
        ``push_done(handled, batch, [], [])`` would. Then ``consumer``, if given, gets its next
        batch. With ``wake``, one waiter is registered for whatever any of ``watched`` may want,
        before the take: whatever arrives or becomes ready from now on, during the callbacks of
        this turn's batch and of the turns after it, wakes it.

        Returns ``(full, batch, waiter, wait_at_most)``, an :class:`Attempt`'s fields as a plain
        tuple: whether the batch is full (there may be more) or the consumer closed (then the
        batch is None; without a consumer it is empty), the waiter registered, and how long
        ``consumer`` may wait for a timer, as for :meth:`push_and_watch`. A step that raises
        changed nothing on an atomic engine, the settlement included.
        """
        # Settling one subscription's batch and taking the next one's in one section changes
        # nothing anyone can see: no user code runs between the two. A drain that delivers one
        # message to each of ten push subscriptions makes ten of these turns and one settlement.
        waiter = None
        bound = None
        taken: list[Message] | None = []
        full = False
        lock = self._lock
        lock.acquire()
        try:
            if handled is not None:
                cursor = handled._cursor
                if cursor.pending or cursor.manual_ack or (cursor.name is not None and self.durable):
                    self._push_done_locked(handled, batch, (), [])
                else:  # what _push_done_locked does with such a batch, without its frame
                    cursor.inflight -= 1
                    self._push_out -= 1
                    cursor.acked += len(batch)
            if wake is not None:
                waiter = self._waiters.add(self._wanted_locked(watched), wake)
            if consumer is not None:
                cursor = consumer._cursor
                position = cursor.position
                config = self._config
                if consumer.closed:
                    taken = None
                    full = True
                elif (
                    cursor.pending
                    or cursor.names is not None
                    or cursor.manual_ack
                    or len(cursor.members) > 1
                    or position < self._start
                    or config.max_messages
                    or config.max_age
                    or (cursor.name is not None and self.durable)  # a class attribute: read last
                ):
                    if cursor.pending or position < self._end:  # else nothing to take: no call
                        size = policy.push_batch_size(max_messages, len(cursor.members))
                        taken = self._push_batch_locked(consumer, size)
                        full = len(taken) >= size
                        if cursor.pending:
                            bound = self._due_bound_locked(cursor)
                elif position < self._end:
                    # What _take_locked does for a sole auto-ack consumer of every event with
                    # nothing pending or journaled, on a queue without count or age limits,
                    # without the frames of _push_batch_locked and _take_locked. (No attribute
                    # on the queue says all that at once: a 30th would cost every publish and
                    # get about 5%, CPython 3.11 keeping no more in an instance's inline values.)
                    stop = position + max_messages
                    if stop < self._end:
                        full = True
                    else:
                        stop = self._end
                    cursor.position = stop
                    taken = self._log.read(position, stop)
                    cursor.delivered += len(taken)
                    cursor.inflight += 1
                    self._push_out += 1
                    # A batch out is unsettled, whatever its offsets. The queue is in the broker's set already:
                    # what this take found was put there by a publish, a failure or a give-back, which put it back.
                    self._push_settled_to = -1
            dead = self._outbox
            if dead:
                self._outbox = []
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)
        return full, taken, waiter, bound

    def push_step(
        self, handled: Consumer | None, batch: list[Message], consumer: Consumer, max_messages: int
    ) -> list[Message] | None:
        """:meth:`push_turn` for the usual consumer and its usual batch, in fewer steps, or nothing.

        ``batch`` of ``handled``, if given, had every callback return. If ``consumer`` is
        a plain one (open, acking automatically, wanting every event, with nothing pending or
        journaled, on a queue without count or age limits, and the sole member of its cursor)
        and what it has to take fits in less than ``max_messages``, settles ``batch`` as
        :meth:`push_turn` would and returns ``consumer``'s next batch (maybe empty). Otherwise
        returns None, having changed nothing: the caller makes a :meth:`push_turn` instead.
        It registers no waiter and sets no timer (a plain consumer has none to set): the
        dispatcher's first turn of a round registers the group's waiter. A step that raises
        changed nothing on an atomic engine, the settlement included.
        """
        # A drain after each publish with ten push subscriptions makes nine of these and one
        # turn a publish: about half push_turn's bytecodes each, in the ways marked below.
        lock = self._lock
        lock.acquire()
        try:
            cursor = consumer._cursor
            position = cursor.position
            end = self._end
            config = self._config
            if (
                consumer.closed
                or cursor.pending
                or cursor.names is not None
                or cursor.manual_ack
                or position < self._start
                or end - position >= max_messages  # a full batch: push_turn says so
                or config.max_messages
                or config.max_age
                # An unnamed cursor has one member for good: no len() for it.
                or (cursor.name is not None and (self.durable or len(cursor.members) > 1))
            ):
                return None
            if handled is not None:
                held = handled._cursor
                if held.pending or held.manual_ack or (held.name is not None and self.durable):
                    self._push_done_locked(handled, batch, (), [])
                    handled = None  # settled apart: the take below counts its batch out itself
                else:
                    held.inflight -= 1
                    held.acked += len(batch)
            if position == end:
                if handled is not None:
                    self._push_out -= 1
                return []
            if (
                handled is not None
                and batch[0][2] == position
                and position + len(batch) == end
                and len(batch[0]) < 6  # no redelivery's copy (message.redelivery), which come first
            ):
                # The batch just settled is this same run of the log, [position, end), as the log
                # holds it, so it is handed on instead of a new slice (the usual case: every
                # subscription of the group had caught up, and one publish since): new messages
                # in offset order, starting at ``position``, ``end - position`` of them. (A batch
                # with a redelivery is usually settled by _push_done_locked above, its cursor
                # having the entry pending, but not if closing dead-lettered it meanwhile.)
                taken = batch
            else:
                taken = self._log.read(position, end)
            cursor.position = end
            cursor.delivered += end - position
            cursor.inflight += 1
            if handled is None:
                self._push_out += 1
                # A batch out is unsettled, whatever its offsets. The queue is in the broker's set already:
                # what this take found was put there by a publish, a failure or a give-back, which put it back.
                self._push_settled_to = -1
            # else one batch settled and one taken: the count out, and the -1 it keeps, stand.
            return taken
        finally:
            lock.release()

    @staticmethod
    def _wanted_locked(consumers: Sequence[Consumer]) -> Container[str] | None:
        """The event names a waiter for any of ``consumers`` wants (None: any): their cursors'
        own sets, which grow as new matching events are published, never a copy."""
        sets: list[set[str]] = []
        for consumer in consumers:
            names = consumer._cursor.names
            if names is None:
                return None
            if not any(names is known for known in sets):
                sets.append(names)
        return sets[0] if len(sets) == 1 else AnyOf(sets)

    def _push_batch_locked(self, consumer: Consumer, size: int) -> list[Message]:
        """Up to ``size`` messages (the push batch size) for a push consumer."""
        return self._take_locked(consumer, consumer._cursor, size, True)

    def push_done(
        self,
        consumer: Consumer,
        batch: list[Message],
        failures: list[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None:
        """Settle a push batch: successes are acked (auto mode), failures retried or dead-lettered,
        and what was never handed to the callback goes back to the front of the line."""
        lock = self._lock
        lock.acquire()
        try:
            self._push_done_locked(consumer, batch, failures, unprocessed)
            dead = self._outbox
            if dead:
                self._outbox = []
        finally:
            lock.release()
        if dead:
            self._send_dead_letters(dead)

    def _push_done_locked(
        self,
        consumer: Consumer,
        batch: list[Message],
        failures: Sequence[tuple[Message, BaseException]],
        unprocessed: list[Message],
    ) -> None:
        """:meth:`push_done` under the lock, but for the dead letters it leaves in the outbox."""
        # Every push batch ends here: a batch that every callback handled, the usual case, makes
        # no set of failed offsets, no give-back call and no outbox call.
        cursor = consumer._cursor
        cursor.inflight -= 1
        self._push_out -= 1
        pending = cursor.pending
        manual = cursor.manual_ack
        done = len(batch) - len(unprocessed)
        if not manual:
            # Redeliveries are pending entries; a new message taken for a push is not (it
            # becomes one only if it fails), so only a cursor with pending entries looks.
            if pending:
                failed_offsets = {m[2] for m, _ in failures}
                for message in batch[:done]:
                    if message[2] not in failed_offsets:
                        entry = pending.pop(message[2], None)
                        if entry is not None:
                            entry.state = SETTLED
            cursor.acked += done - len(failures)
        for message, error in failures:
            entry = pending.get(message[2])
            if entry is None:
                if manual:
                    continue  # acked inside the callback before it raised
                entry = Pending(message, 1, consumer, OUT)
                pending[message[2]] = entry
            elif entry.state != OUT:
                continue
            self._fail_locked(cursor, entry, "callback raised", cursor.backoff.delay(entry.attempts), error)
        if unprocessed:
            self._give_back_locked(cursor, unprocessed, pulled=False)
        if self.durable and cursor.name is not None:
            self._journal_sync_locked(cursor, [m[2] for m in batch])
        if unprocessed or failures:
            self._waiters.wake_all()

    # -- taking -------------------------------------------------------------------------------

    def _take_locked(self, consumer: Consumer, cursor: Cursor, max_messages: int, push: bool) -> list[Message]:
        """Hand up to ``max_messages`` to a consumer: due redeliveries first, then new messages.

        Pull consumers with automatic acks settle their messages here; everyone else gets them
        as pending entries.
        """
        manual = cursor.manual_ack
        settles = False if push else cursor.pull_settles  # policy.settles_on_take, decided per cursor
        out = self._take_due_locked(consumer, cursor, max_messages, settles) if cursor.pending else []
        redelivered = len(out)
        if redelivered < max_messages:
            # New messages from the position on, read here rather than in a helper of their own:
            # every get, poll and refill comes this way, and a frame is about 4% of a get(0).
            position = cursor.position
            config = self._config
            start = self._limit_floor_locked() if config.max_messages or config.max_age else self._start
            if position < start:
                self._skip_locked(cursor, start)
                position = start
            end = self._end
            if position < end:
                wanted = max_messages - redelivered
                if cursor.names is None:  # every event: one slice of the log, without the index's frame
                    stop = position + wanted if position + wanted < end else end
                    cursor.position = stop
                    fresh = self._log.read(position, stop)
                else:
                    fresh = self._index.read(cursor, position, end, wanted)
                if fresh:
                    if manual:
                        self._track_locked(consumer, cursor, fresh)
                    if out:
                        out.extend(fresh)
                    else:
                        out = fresh
        if out:
            cursor.delivered += len(out)
            if settles:
                cursor.acked += len(out)
            if push:
                cursor.inflight += 1
                self._push_out += 1
                # A batch out is unsettled, whatever its offsets. The queue is in the broker's set already:
                # what this take found was put there by a publish, a failure or a give-back, which put it back.
                self._push_settled_to = -1
            if self.durable and cursor.name is not None:
                self._journal_take_locked(cursor, out, redelivered, manual=manual, push=push)
        return out

    def _take_due_locked(self, consumer: Consumer, cursor: Cursor, max_messages: int, settles: bool) -> list[Message]:
        """Up to ``max_messages`` of the cursor's pending messages that are due for redelivery
        (expiring the ack timeouts that ran out first), each counted as one more attempt."""
        out: list[Message] = []
        schedule = cursor.schedule
        if schedule.has_timers():
            for expired in schedule.expire(self._monotonic()):
                self._fail_locked(cursor, expired, "ack timeout", 0.0, None)
        entries: list[Pending] = []
        now = 0.0
        while len(out) < max_messages:
            entry = schedule.pop_ready()
            if entry is None:
                break
            if not now:
                now = self._time()
            entry.attempts += 1
            message = entry.message
            if entry.attempts > 1:
                cursor.redelivered += 1
                message = redelivery(message, entry.attempts)  # says which attempt; the entry keeps the original
            if settles:
                del cursor.pending[entry.message[2]]
                entry.state = SETTLED
            else:
                entry.state = OUT
                entry.owner = consumer
                entry.since = now
                entries.append(entry)
            out.append(message)
        if cursor.manual_ack and entries and cursor.ack_timeout is not None:
            schedule.track_timeout(self._monotonic() + cursor.ack_timeout, entries)
        return out

    def _journal_take_locked(
        self, cursor: Cursor, out: list[Message], redelivered: int, *, manual: bool, push: bool
    ) -> None:
        """Save what a take changed on a durable cursor."""
        if manual:
            # A get of one message on a file, the usual take, without a comprehension's frame.
            self._journal_sync_locked(cursor, [out[0][2]] if len(out) == 1 else [m[2] for m in out], moved=True)
            return
        fresh = [m[2] for m in out[redelivered:]]
        if push:
            # Handed to a callback with automatic acks: saved as pending until it returns, so a
            # crash redelivers them.
            self._journal_sync_locked(cursor, [m[2] for m in out[:redelivered]], fresh, moved=True)
        else:
            self._journal_sync_locked(cursor, [m[2] for m in out[:redelivered]], moved=bool(fresh))

    def _track_locked(self, consumer: Consumer, cursor: Cursor, messages: list[Message]) -> None:
        pending = cursor.pending
        now = self._time()
        for message in messages:
            # Pending(message, 1, consumer, OUT, now) without its __init__ frame: every message a
            # manual-ack take hands out comes here (callgrind: about 700 instructions less per
            # message, 2,300 -> 1,600 for the entry).
            entry = _object_new(Pending)
            entry.message = message
            entry.attempts = 1
            entry.owner = consumer
            entry.state = OUT
            entry.deadline = 0.0
            entry.since = now
            pending[message[2]] = entry
        if cursor.ack_timeout is not None:  # the entries listed again only when they need it
            entries = [pending[message[2]] for message in messages]
            cursor.schedule.track_timeout(self._monotonic() + cursor.ack_timeout, entries)
            self._timer_set_locked(cursor)

    # -- acks, seeks and filters --------------------------------------------------------------

    def ack(self, consumer: Consumer, messages: tuple[Message | int, ...]) -> None:
        """Acknowledge pending messages, all or none, so they are never redelivered."""
        lock = self._lock
        lock.acquire()
        try:
            cursor = consumer._cursor
            if consumer.closed or not cursor.manual_ack:
                self._check_manual_locked(consumer, "ack")  # raises
            if len(messages) == 1:
                # The usual ack: one message this queue built, found by its offset without the
                # comprehension's frame or the helpers' (callgrind: about 2,700 instructions,
                # 9% of a get+ack).
                message = messages[0]
                entry = cursor.pending.get(message[2]) if type(message) is self.message_class else None
                entries = [entry if entry is not None else self._pending_entry_locked(cursor, message, "ack")]
            else:
                entries = [self._pending_entry_locked(cursor, message, "ack") for message in messages]
                if len({id(entry) for entry in entries}) < len(entries):
                    raise NotPending(f"ack() was given the same message of {self.name!r} twice; nothing was acked")
            self._ack_entries_locked(cursor, entries)
        finally:
            lock.release()

    def _ack_entries_locked(self, cursor: Cursor, entries: list[Pending]) -> None:
        """Settle checked pending entries of ``cursor`` as acked."""
        if self.durable and cursor.name is not None:
            # Journal first: a write that fails leaves every message pending, so the ack can be retried.
            self._journal_ack_locked(
                cursor, [entries[0].message[2]] if len(entries) == 1 else [entry.message[2] for entry in entries]
            )
        pending = cursor.pending
        for entry in entries:
            del pending[entry.message[2]]
            entry.state = SETTLED
        cursor.acked += len(entries)
        if not pending:
            cursor.schedule.clear()

    def _journal_ack_locked(self, cursor: Cursor, offsets: list[int]) -> None:
        """Forget the pending rows of acked offsets (a persistent engine writes them first)."""

    def nack(self, consumer: Consumer, message: Message | int, delay: float) -> None:
        """Give a pending message back for redelivery after ``delay`` seconds of broker clock."""
        with self._lock:
            cursor, entry = self._nack_entry_locked(consumer, message)
            self._nack_locked(cursor, entry, delay)
            dead = self._take_outbox_locked()
        self._send_dead_letters(dead)

    def _nack_entry_locked(self, consumer: Consumer, message: Message | int) -> tuple[Cursor, Pending]:
        """The consumer's cursor and the pending entry of ``message``, which a nack may give back."""
        cursor = self._check_manual_locked(consumer, "nack")
        entry = self._pending_entry_locked(cursor, message, "nack")
        if entry.state != OUT:
            raise NotPending(f"offset {entry.message[2]} of {self.name!r} is already waiting for redelivery")
        return cursor, entry

    def _nack_locked(self, cursor: Cursor, entry: Pending, delay: float) -> None:
        """Give a checked pending entry back, after ``delay`` (to the dead letters, past max_deliveries)."""
        self._fail_locked(cursor, entry, "nack", delay, None)
        if entry.state == WAITING and self.durable and cursor.name is not None:
            self._journal_sync_locked(cursor, (entry.message[2],))
        self._waiters.wake_all()

    def _pending_entry_locked(self, cursor: Cursor, message: Message | int, verb: str) -> Pending:
        if type(message) is self.message_class:  # this queue built it: the one compare of the usual case
            offset = message[2]
        else:
            offset = offset_to_settle(message, self.name, self.message_class, verb)
        entry = cursor.pending.get(offset)
        if entry is None:
            raise NotPending(
                f"offset {offset} of {self.name!r} is not pending on this subscription "
                "(never delivered to it, already acked, or dead-lettered)"
            )
        return entry

    def _check_manual_locked(self, consumer: Consumer, verb: str) -> Cursor:
        if consumer.closed:
            raise SubscriptionClosed(consumer._closed_reason())
        cursor = consumer._cursor
        if not cursor.manual_ack:
            raise AckModeError(
                f"{verb}() needs a subscription made with ack='manual'; this one acks automatically "
                "when a message is returned (pull) or its callback returns (push)"
            )
        return cursor

    def seek(self, consumer: Consumer, target: Start) -> int:
        """Move the consumer's cursor (shared by every subscription of its name) to ``target``."""
        with self._lock:
            if consumer.closed:
                raise SubscriptionClosed(consumer._closed_reason())
            cursor = consumer._cursor
            before = cursor.position
            cursor.position = self._resolve_locked(target)
            self._unsettle_locked(cursor)
            if self.durable and cursor.name is not None:
                self._journal_sync_locked(cursor, (), moved=True)
            self._moved_locked(consumer, cursor, before)
            self._waiters.wake_all()
            return cursor.position

    def _moved_locked(self, consumer: Consumer, cursor: Cursor, before: int) -> None:
        """``consumer`` moved ``cursor`` from ``before`` with a seek. A no-op; the recorder of
        :mod:`mqlite.testing.recording` overrides it, so that its op keeps its place among deliveries."""

    def set_filter(self, consumer: Consumer, change: Callable[[EventFilter], EventFilter]) -> EventFilter:
        """Replace the cursor's event filter with ``change(current)``."""
        with self._lock:
            if consumer.closed:
                raise SubscriptionClosed(consumer._closed_reason())
            cursor = consumer._cursor
            self._index.apply_filter(cursor, change(cursor.filter))
            self._unsettle_locked(cursor)
            self._refresh_unwanted_locked()
            if self.durable and cursor.name is not None:
                self._journal_cursor_locked(cursor)
            self._refiltered_locked(consumer, cursor)
            self._waiters.wake_all()
            return cursor.filter

    def _refiltered_locked(self, consumer: Consumer, cursor: Cursor) -> None:
        """``consumer`` changed the filter of ``cursor`` (join/leave). A no-op, overridden as
        :meth:`_moved_locked` is."""

    # -- introspection ------------------------------------------------------------------------

    def cursor_stats(self, consumer: Consumer) -> CursorStats:
        """(position, lag, pending, missed) of a consumer's cursor, read atomically."""
        with self._lock:
            cursor = consumer._cursor
            start = self._limit_floor_locked()
            position = cursor.position
            count = self._index.count
            missed = cursor.missed + count(cursor, position, start)
            position = position if position > start else start
            return CursorStats(position, count(cursor, position, self._end), cursor.pending_count, missed)

    def pending_messages(self, consumer: Consumer) -> list[PendingMessage]:
        """The pending messages of a consumer's cursor, by offset, with who holds each (see
        :class:`~mqlite.PendingMessage`), read atomically."""
        with self._lock:
            listed = self._pending_listing_locked(consumer._cursor)
        listed.sort(key=lambda pending: pending.message[2])
        return listed

    def pending_messages_of(self, name: str) -> list[PendingMessage]:
        """:meth:`pending_messages` of the durable cursor ``name``, attached or not (none if it does not exist)."""
        with self._lock:
            cursor = self._cursors.get(name)
            listed = [] if cursor is None else self._pending_listing_locked(cursor)
        listed.sort(key=lambda pending: pending.message[2])
        return listed

    def _pending_listing_locked(self, cursor: Cursor) -> list[PendingMessage]:
        now = self._time()
        monotonic = self._monotonic()
        listed = []
        for offset in sorted(cursor.pending):
            entry = cursor.pending[offset]
            state = entry.state
            if state == OUT:
                holder: str | None = getattr(entry.owner, "_label", None)
                listed.append(PendingMessage(entry.message, entry.attempts, "out", holder, entry.since or None, None))
            elif state == WAITING:
                due = now + (entry.deadline - monotonic)
                listed.append(PendingMessage(entry.message, entry.attempts, "waiting", None, None, due))
            else:
                listed.append(PendingMessage(entry.message, entry.attempts, "ready", None, None, None))
        listed.extend(self._pending_elsewhere_locked(cursor))
        return listed

    def _pending_elsewhere_locked(self, cursor: Cursor) -> list[PendingMessage]:
        """The cursor's pending messages that other brokers hold (none, but on a shared file)."""
        return []

    def _consumers_elsewhere_locked(self) -> tuple[str | None, dict[str, list[tuple[str, int]]]]:
        """This broker's name and, by cursor name, the consumers other live brokers attached
        (``(broker, count)`` each); ``(None, {})`` but on a shared file."""
        return None, {}

    def snapshot(self) -> QueueSnapshot:
        """The queue's figures and each cursor's, taken atomically (for ``Broker.info``)."""
        with self._lock:
            self._housekeep_locked()
            here, elsewhere = self._consumers_elsewhere_locked()
            count = self._index.count
            cursors = tuple(
                CursorFigures(
                    name=cursor.name,
                    events=cursor.filter.spec,
                    manual_ack=cursor.manual_ack,
                    members=tuple(cursor.members),
                    position=cursor.position,
                    lag=count(cursor, cursor.position, self._end),
                    pending=cursor.pending_count,
                    delivered=cursor.delivered,
                    acked=cursor.acked,
                    redelivered=cursor.redelivered,
                    dead_lettered=cursor.dead_lettered,
                    missed=cursor.missed,
                    elsewhere=tuple(elsewhere.get(cursor.name, ())) if cursor.name is not None else (),
                    here=here,
                )
                for cursor in self._all_cursors_locked()
            )
            return QueueSnapshot(
                self._config, self._start, self._end, cursors, self._waiters.count(), self.dropped, self.duplicates
            )

    def push_unsettled(self, offset: int, cursors: list[Cursor] | None = None) -> list[Cursor]:
        """The push cursors that have not yet handled every matching message below ``offset``.

        Checks ``cursors`` (when None: this queue's push cursors that may not have) in order and
        stops at the first one still busy, returning it and the unchecked rest: a drain that
        calls again with the result looks at each settled cursor once, not once per wake-up.
        A check of the queue's own choice that finds none busy is remembered
        (``PushReaders.base``; and when it reaches the end offset with no push batch out,
        ``_push_settled_to``): until something gives a push cursor work again, a drain looks at
        none, and after a publish only at those that read what was published (see
        :meth:`_push_candidates_locked`).
        """
        # Every drain calls it once per queue with work: plain loops, no generators, and the
        # count limits looked at only when set (as a take does).
        lock = self._lock
        lock.acquire()
        try:
            if offset <= self._push_settled_to:
                return []
            if cursors is not None:
                candidates = cursors
            else:
                push = self._index.push
                base = push.base
                if push.by_event or push.dirty or base < 0 or push.cursors is None or offset > self._end:
                    candidates = self._push_candidates_locked(offset)
                elif offset <= base:
                    candidates = []
                elif offset - base <= len(push.cursors):
                    # _push_candidates_locked's usual case, without its frame: nothing filters,
                    # nothing gave a cursor work but publishes, so those that read every event.
                    candidates = push.unfiltered
                else:
                    candidates = push.cursors
            for cursor in candidates:
                if cursor.position < offset or cursor.inflight or cursor.pending:
                    break  # this one needs the closer look below
            else:
                # The usual case after a run: every cursor read up to the offset, with nothing
                # out or pending (a loop of three reads a cursor, a third of the closer look's).
                candidates = []
            if candidates:
                config = self._config
                start = self._limit_floor_locked() if config.max_messages or config.max_age else self._start
                count = self._index.count
                for index, cursor in enumerate(candidates):
                    if cursor.position >= offset and not cursor.inflight and not cursor.pending:
                        continue  # the usual case: read up to the offset, nothing out or pending
                    if not has_push_member(cursor):
                        continue  # drain does not wait for it
                    if cursor.inflight:
                        return candidates[index:]
                    if cursor.pending and cursor.unsettled_before(offset):
                        return candidates[index:]
                    position = cursor.position if cursor.position > start else start
                    if position < offset and count(cursor, position, offset):
                        return candidates[index:]
            if cursors is None:
                # Every push cursor is settled below offset: those looked at, and (see
                # _push_candidates_locked) the others.
                if offset > push.base:
                    push.base = offset
                if push.dirty:
                    push.dirty.clear()
                if offset == self._end and not self._push_out and not self._closed:
                    self._push_settled_to = offset
            return []
        finally:
            lock.release()

    def _push_candidates_locked(self, offset: int) -> list[Cursor]:
        """The push cursors that may not have handled everything below ``offset``.

        Every push cursor outside ``PushReaders.dirty`` handled everything below its ``base``,
        so of those only the ones that read a message published in ``[base, offset)`` can have
        work: the cursors that read every event, and the filtered ones whose names hold the
        event of such a message. When that range holds more messages than there are push
        cursors, or ``base`` is not known or not retained, all of them.
        """
        push = self._index.push
        cursors = push.cursors
        if cursors is None:
            cursors = push.build(self._all_cursors_locked())
        base = push.base
        if base < 0 or offset > self._end or offset - base > len(cursors):
            return cursors
        dirty = push.dirty
        if offset <= base:
            return list(dirty)
        by_event = push.by_event
        if not by_event and not dirty:
            return push.unfiltered  # nothing filters: those that read every event
        found = dict.fromkeys(push.unfiltered)
        if by_event:
            log = self._log
            if base < log.first_offset:
                return cursors  # what was published since is gone
            seen: set[str] = set()
            for message in log.read(base, offset):
                event = message[0]
                if event not in seen:
                    seen.add(event)
                    readers = by_event.get(event)
                    if readers is not None:
                        found.update(dict.fromkeys(readers))
        found.update(dirty)
        return list(found)
