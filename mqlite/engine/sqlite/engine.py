"""The SQLite engine: queues in an mqlite file, with the memory engine's state as their cache.

:class:`SqliteQueue` runs every operation of :class:`~mqlite.engine.staging.TransactionalCore` and
journals each durable change through the core's ``_journal_*`` hooks. On a file that several
brokers share, its scope is a :class:`~mqlite.engine.sqlite.sharing.FileLock`: one write
transaction per operation, begun by reloading what other brokers changed (``_refresh_locked``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, READY, SETTLED, WAITING, Pending
from mqlite._delivery.waiters import Waiter
from mqlite.clock import Clock
from mqlite.config import QueueConfig
from mqlite.engine.base import Capabilities, Consumer, DeadLetterSink, UnsettledQueues
from mqlite.engine.codec import Fields, Serializer, encode_fields
from mqlite.engine.index import EventIndex
from mqlite.engine.locking import FileScope, LockScope, TransactionScope
from mqlite.engine.sqlite.log import QueueState, SqliteLog
from mqlite.engine.sqlite.sharing import FileLock
from mqlite.engine.sqlite.store import Commit, SqliteStore, Synchronous
from mqlite.engine.sqlite.undo import UndoLog
from mqlite.engine.staging import TransactionalCore
from mqlite.info import PendingMessage
from mqlite.message import EMPTY_HEADERS, Message, MessageMeta

__all__ = ["SqliteEngine", "SqliteQueue"]


class SqliteQueue(TransactionalCore):
    """One queue of an mqlite file. Thread-safe; on a shared file, each operation is one transaction."""

    durable = True

    def __init__(self, name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink, log: SqliteLog):
        super().__init__(name, config, clock, dead_letters, log)
        self._file = log
        store = log.store
        # Shared files only: the pending entries of durable cursors made due again, which other
        # brokers may now take (written when the transaction ends). None when no other broker
        # can share the file.
        self._released: list[tuple[Cursor, Pending]] | None = None
        # Shared files only: what the file cannot restore when an operation fails (see FileLock).
        self._undo = UndoLog()
        self._file_lock: FileLock | None = None
        # Whether memory holds the file's whole duplicate window yet (the first load reads it all;
        # later refreshes read only the ids of messages other brokers published since).
        self._dedup_loaded = False
        self.atomic = store.shared  # batched: writes fail after the step that made them returned
        if store.shared:
            self._released = []
            self._file_lock = FileLock(
                store,
                self._refresh_locked,
                self._on_commit,
                owed=self._released,
                on_begin=functools.partial(self._undo.begin, self),
                undo=self._undo_locked,
                reload=self._reload_all_locked,
            )
            self._lock = self._file_lock
            store.watch(self._on_foreign_change)

    def open(self) -> None:
        """Load the queue from the file (a shared file loads when the lock begins its transaction)."""
        with self._lock:
            if self._released is None:
                self._refresh_locked()
            self._refresh_unwanted_locked()
            self._housekeep_locked()

    def watch_settled(self, unsettled: UnsettledQueues) -> bool:
        """As :meth:`QueueCore.watch_settled`, but not on a shared file (False): what other
        brokers publish reaches this queue only through the reload that taking its lock makes,
        which a drain's look at it is. A drain looks at every such queue every time."""
        if self._released is not None:
            return False
        return super().watch_settled(unsettled)

    # -- publishing: encoded before the lock ------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Append one message (see :meth:`QueueCore.publish`); the serializer runs before the lock."""
        if (
            key is not None
            or headers is not None
            or type(event) is not str
            or (dedup_id is not None and type(dedup_id) is not str)  # refused (or made a plain str) there
            or (self._dropping and event in self._unwanted)  # a drop: counted and logged there
        ):
            return self._append_drafts([(event, payload, key, headers)], None if dedup_id is None else [dedup_id])[0]
        fields = encode_fields(self._file.store.serializer, self.name, event, payload, None, EMPTY_HEADERS)
        return self._publish_encoded(event, payload, fields, dedup_id)

    def _encode(self, checked: list[tuple[str, Any, MessageMeta | None]]) -> list[Fields] | None:
        serializer = self._file.store.serializer
        name = self.name
        return [
            encode_fields(serializer, name, event, payload, None, EMPTY_HEADERS)
            if meta is None
            else encode_fields(serializer, name, event, payload, meta.key, meta.headers)
            for event, payload, meta in checked
        ]

    def _write_locked(
        self, messages: list[Message], encoded: list[Fields] | None, dedup: list[tuple[str, int, float]] | None = None
    ) -> None:
        assert encoded is not None
        self._file.write(messages, encoded, dedup)

    def _stored_original_locked(self, offset: int) -> Message | None:
        if offset < self._end:
            found = self._file.store.load_messages(self.message_class, [offset])
            if found:
                return found[0]
        return None

    def _expire_dedup_locked(self) -> None:
        """Forget expired dedup ids, and their rows: those below the oldest id still remembered."""
        window = self._dedup
        window.expire(self._time())
        if window.forgot:
            window.forgot = False
            oldest = window.oldest_offset()
            self._file.prune_dedup(self._end if oldest is None else oldest)

    def _load_dedup_locked(self, rows: list[tuple[str, int, float]]) -> None:
        """Remember the dedup ids the file holds that memory does not have yet."""
        ids = self._dedup.ids
        cls = self.message_class
        for dedup_id, offset, at in rows:
            ids.pop(dedup_id, None)  # an older window of the same id, not pruned yet
            ids[dedup_id] = tuple.__new__(cls, (None, None, offset, at))  # a mark: see DedupWindow
        if len(ids) > self._dedup.max_ids:
            self._dedup.expire(self._time())
        self._dedup_loaded = True

    # -- journal hooks -------------------------------------------------------------------------

    def _journal_cursor_locked(self, cursor: Cursor) -> None:
        if cursor.name is not None:
            self._file.save_cursor(cursor.name, cursor.position, cursor.settings.to_stored())

    def _journal_forget_locked(self, name: str) -> None:
        self._file.delete_cursor(name)

    def _journal_config_locked(self, config: QueueConfig) -> None:
        self._file.save_config(attrs.asdict(config))

    def _journal_ack_locked(self, cursor: Cursor, offsets: list[int]) -> None:
        assert cursor.name is not None
        if self._released is not None:
            pending = cursor.pending
            for offset in offsets:
                self._undo.touch(cursor, pending[offset])
        self._file.sync_cursor(cursor.name, None, (), offsets)

    def _note_dead_in_transit_locked(self, cursor: Cursor, offset: int) -> bool:
        if cursor.name is None:
            return False
        cursor.dead_in_transit.add(offset)
        return True

    def _fail_locked(
        self, cursor: Cursor, entry: Pending, reason: str, delay: float, error: BaseException | None
    ) -> None:
        if self._released is not None:
            self._undo.touch(cursor, entry)
        super()._fail_locked(cursor, entry, reason, delay, error)

    def _journal_take_locked(
        self, cursor: Cursor, out: list[Message], redelivered: int, *, manual: bool, push: bool
    ) -> None:
        if self._released is not None:
            self._undo.took(cursor, out)
        super()._journal_take_locked(cursor, out, redelivered, manual=manual, push=push)

    def _adopt_cursor_locked(self, cursor: Cursor) -> None:
        if self._released is not None:
            released = self._released
            cursor.schedule.on_ready = lambda entry: released.append((cursor, entry))

    def _journal_sync_locked(
        self, cursor: Cursor, offsets: Sequence[int], inflight: Sequence[int] = (), *, moved: bool = False
    ) -> None:
        """Save, for ``offsets``, whether each is still pending on a durable cursor (and its position if ``moved``).

        ``inflight`` are offsets handed to a push callback with automatic acks: they are saved as
        pending (delivered once) until the callback returns, so a crash redelivers them. They are
        not pending in memory; ``cursor.pushing`` remembers them until the batch is settled (its
        offsets synced again), so that a reload knows their rows for this broker's own.
        """
        if cursor.name is None:
            return
        pending = cursor.pending
        upserts: list[tuple[int, int, bool, float | None, float | None]] = []
        deletes: list[int] = []
        in_transit = cursor.dead_in_transit
        for offset in offsets:
            entry = pending.get(offset)
            if entry is None:
                if offset not in in_transit:  # a dead letter's row stays until the letter is published
                    deletes.append(offset)
            elif entry.state == WAITING:
                # Waiting out a delay: held by nobody, so any broker sharing the file may take it
                # once the delay ends, and the wall-clock time it waits for survives a restart.
                upserts.append((offset, entry.attempts, False, self._wall_due_locked(entry), None))
            else:
                # Held by this broker unless it is due for redelivery to whoever reads next.
                upserts.append((offset, entry.attempts, entry.state != READY, None, entry.since or None))
        if inflight:
            now = self._time()
            upserts.extend((offset, 1, True, None, now) for offset in inflight)
        self._file.sync_cursor(cursor.name, cursor.position if moved else None, upserts, deletes)
        pushing = cursor.pushing
        if pushing and offsets:
            pushing.difference_update(offsets)
        if inflight:
            pushing.update(inflight)

    def _journal_member_locked(self, cursor: Cursor, consumer: Consumer, *, attached: bool) -> None:
        if cursor.name is None:
            return  # an ephemeral cursor lives in this broker only
        if attached:
            self._file.save_consumer(cursor.name, consumer.id, push=consumer._is_push, since=self._time())
        elif not self._file.store.closed:
            self._file.delete_consumer(cursor.name, consumer.id)

    def _consumers_elsewhere_locked(self) -> tuple[str | None, dict[str, list[tuple[str, int]]]]:
        store = self._file.store
        if not store.shared or store.closed:
            return None, {}
        return store.instance, store.consumers(self.name)

    def _pending_elsewhere_locked(self, cursor: Cursor) -> list[PendingMessage]:
        """The rows of ``cursor`` that another live broker on the file holds (memory has none of them)."""
        if cursor.name is None or not cursor.held_elsewhere:
            return []
        store = self._file.store
        held = [
            (offset, attempts, owner, since)
            for offset, attempts, owner, _, since in store.pending_rows(self.name, cursor.name)
            if owner is not None and owner != store.instance and offset not in cursor.pending and store.alive(owner)
        ]
        if not held:
            return []
        messages = {m[2]: m for m in store.load_messages(self.message_class, [offset for offset, *_ in held])}
        return [
            PendingMessage(messages[offset], attempts, "out", f"broker {owner}", since, None)
            for offset, attempts, owner, since in held
            if offset in messages
        ]

    def _wall_due_locked(self, entry: Pending) -> float:
        """When a WAITING entry's delay ends, in the clock's wall time (what a file can keep)."""
        until = entry.deadline - self._monotonic()
        return self._time() + (until if until > 0.0 else 0.0)

    # -- sharing the file ----------------------------------------------------------------------

    def close(self) -> list[Consumer]:
        """As :meth:`QueueCore.close`; on a shared file under the plain lock, with no transaction.

        Closing writes nothing, so it needs no reload either: a file that another connection
        damaged cannot stop the broker from closing.
        """
        if self._file_lock is None:
            return super().close()
        with self._file_lock.plain:
            return self._close_locked()

    def remove_waiter(self, waiter: Waiter | None) -> None:
        """Forget a waiter; the waiters need only the plain lock, not a transaction."""
        if waiter is None:
            return
        if self._file_lock is None:
            super().remove_waiter(waiter)
            return
        with self._file_lock.plain:
            self._waiters.discard(waiter)

    def _on_foreign_change(self) -> None:
        """Another broker changed the file: reload now if anyone waits here (the watcher calls this)."""
        lock = self._file_lock
        assert lock is not None
        with lock.plain:
            waiting = bool(self._waiters)
        if waiting:
            with lock:
                pass  # beginning the transaction reloads and wakes whoever now has something to read

    def _on_commit(self) -> None:
        """A transaction is about to commit (shared files): save entries made due for anyone."""
        released = self._released
        if not released:
            return
        offsets: dict[Cursor, list[int]] = {}
        for cursor, entry in released:
            if entry.state == READY and cursor.pending.get(entry.message[2]) is entry:
                offsets.setdefault(cursor, []).append(entry.message[2])
        released.clear()
        for cursor, due in offsets.items():
            if cursor.name is not None and self._cursors.get(cursor.name) is cursor:
                self._journal_sync_locked(cursor, due)

    # -- undoing a failed operation ------------------------------------------------------------

    def _undo_locked(self) -> None:
        """Put back what a failed operation changed that the file does not hold (counters, members)."""
        self._undo.undo(self._cursors, self._ephemeral, self._outbox)
        self._push_out = self._undo.push_out
        if self._released:
            self._released.clear()

    def _reload_all_locked(self) -> None:
        """Make memory what the file holds: messages, event index, bounds, cursors and pending entries.

        Attached consumers stay attached to their cursor objects. Entries a failed operation
        changed get back their state from before it; an entry the file says is due again that
        memory has out goes back to the front of the line.
        """
        store = self._file.store
        state = store.changes(self.message_class, -1)
        self._unsettle_locked()  # positions, filters and pending entries may all have changed
        self._config = state.config
        self._dedup.resize(state.config.dedup_window, state.config.dedup_max_ids)
        self._dedup.clear()
        self._load_dedup_locked(state.dedup)
        self._file.reset(state.start, state.messages)
        self._end = state.start + len(state.messages)
        self._start = state.start
        self._check_at = -1 if self._closed else 0  # the next publish runs housekeeping
        index = EventIndex(self._file)
        self._index = index
        self._events = index.events
        for message in state.messages:
            if message[0] not in index.events:
                index.add_event(message[0], ())
        for cursor in self._all_cursors_locked():
            cursor.names = None
            index.apply_filter(cursor, cursor.filter)
        self._load_cursors_locked(state)
        self._refresh_unwanted_locked()
        rows = {(name, offset): (attempts, owner) for name, offset, attempts, owner, _ in state.pending}
        self._undo.restore_pending(self._cursors, rows, store.instance)
        self._load_pending_locked(state)
        if self._waiters:
            self._waiters.wake_all()

    # -- reloading what other brokers wrote ----------------------------------------------------

    def _refresh_locked(self) -> None:
        """Bring memory up to the file: new messages, settings, cursors and who holds what."""
        state = self._file.store.changes(self.message_class, self._end, self._end if self._dedup_loaded else -1)
        config = state.config
        if config != self._config:
            self._config = config
            self._dedup.resize(config.dedup_window, config.dedup_max_ids)
            self._check_at = min(self._check_at, self._end)
        self._load_dedup_locked(state.dedup)
        woke = self._load_messages_locked(state)
        moved = self._load_cursors_locked(state)
        if moved:
            self._refresh_unwanted_locked()
        moved = self._load_pending_locked(state) or moved
        if moved:
            self._unsettle_locked()  # another broker moved, refiltered or gave back for a cursor
        if (woke or moved) and self._waiters:
            self._waiters.wake_all()

    def _load_messages_locked(self, state: QueueState) -> bool:
        if state.start > self._end:
            # Another broker dropped messages this one never loaded: start after them.
            self._index.trim(state.start)
            self._end = state.start
            self._start = max(self._start, state.start)
        messages = state.messages
        if not messages:
            return False
        self._file.load(state.start, messages)
        events = self._events
        for message in messages:
            if message[0] not in events:
                self._register_event_locked(message[0])
        self._index.add(messages)
        self._end = messages[-1][2] + 1
        return True

    def _load_cursors_locked(self, state: QueueState) -> bool:
        changed = False
        stored = set()
        for name, position, settings in state.cursors:
            stored.add(name)
            cursor = self._cursors.get(name)
            if cursor is None:
                cursor = Cursor(queue=self.name, name=name, position=position, settings=settings)
                self._index.apply_filter(cursor, settings.event_filter)
                self._cursors[name] = cursor
                self._adopt_cursor_locked(cursor)
                changed = True
                continue
            if cursor.settings != settings:
                self._configure_cursor_locked(cursor, settings)
                changed = True
            if cursor.position != position:
                cursor.position = position
                changed = True
        for name, cursor in list(self._cursors.items()):
            if name in stored:
                continue
            if cursor.members:
                self._journal_cursor_locked(cursor)  # deleted elsewhere while attached here: keep it
            else:
                del self._cursors[name]
                self._index.forget(cursor)
                changed = True
        return changed

    def _load_pending_locked(self, state: QueueState) -> bool:
        """Match each durable cursor's pending entries to the file's rows and their holders.

        Each row is held by another live broker (counted in ``held_elsewhere``, not loaded), is
        this broker's own in transit (an auto-ack push batch whose callback runs, a dead letter
        being published: left alone), or may be delivered here (loaded, if it is not already).
        """
        store = self._file.store
        me = store.instance
        rows: dict[str, dict[int, tuple[int, str | None, float | None]]] = {}
        for name, offset, attempts, owner, due in state.pending:
            rows.setdefault(name, {})[offset] = (attempts, owner, due)
        alive: dict[str, bool] = {}  # one liveness look per holder and reload

        def elsewhere(owner: str | None) -> bool:
            if owner is None or owner == me:
                return False
            if owner not in alive:
                alive[owner] = store.alive(owner)
            return alive[owner]

        changed = False
        log = self._file
        for name, cursor in self._cursors.items():
            stored = rows.get(name, {})
            held = [offset for offset, (_, owner, _) in stored.items() if elsewhere(owner)]
            cursor.held_elsewhere = len(held)
            for offset in held:
                del stored[offset]
            pending = cursor.pending
            for offset, entry in list(pending.items()):
                row = stored.pop(offset, None)
                if row is None:
                    del pending[offset]  # settled, or taken, by another broker
                    entry.state = SETTLED
                    changed = True
                elif entry.state != OUT and row[0] > entry.attempts:
                    entry.attempts = row[0]  # another broker delivered it meanwhile: the file counts
            in_transit = cursor.pushing | cursor.dead_in_transit
            adopt = [(o, attempts, due) for o, (attempts, _, due) in stored.items() if o not in in_transit]
            if not adopt:
                continue
            first = log.first_offset
            cached = {o: log.get(o) for o, _, _ in adopt if o >= first}
            missing = [o for o, _, _ in adopt if o < first]
            messages: dict[int, Any] = (
                {m[2]: m for m in store.load_messages(self.message_class, missing)} if missing else {}
            )
            messages.update(cached)
            now = self._time()
            for offset, attempts, due in adopt:
                message = messages.get(offset)
                if message is None:
                    continue  # its message is gone from the file: nothing left to redeliver
                if message[0] not in self._events:
                    self._register_event_locked(message[0])
                # Delivered before and never settled, by a broker that is gone: due again, in
                # order, unless it was nacked with a delay that has not ended yet.
                entry = Pending(message, attempts, None, READY)
                pending[offset] = entry
                if due is not None and due > now:
                    cursor.schedule.wait_until(entry, self._monotonic() + (due - now))
                else:
                    cursor.schedule.ready.append(entry)
                changed = True
        return changed


class SqliteEngine:
    """Storage in one mqlite file. Thread-safe (see :class:`~mqlite.engine.sqlite.store.SqliteStore`).

    Raises:
        InvalidArgument: ``synchronous`` or ``commit`` is not one of its values.
        StorageError: the file cannot be opened as an mqlite file; nothing is left open.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "normal",
        commit: Commit = "each",
        serializer: Serializer | None = None,
    ) -> None:
        self._store = SqliteStore(path, synchronous=synchronous, commit=commit, serializer=serializer)
        self._transactions = threading.Lock()  # one transaction at a time (see mqlite.engine.locking)
        self.capabilities = Capabilities(
            shared=self._store.shared,
            persistent=True,
            blocking_io=True,
            retentions=("interest", "limits", "workqueue"),
        )

    @property
    def path(self) -> str | None:
        """The file."""
        return self._store.path

    @property
    def store(self) -> SqliteStore:
        """The open file (for tests and tools that look at it directly)."""
        return self._store

    def queues(self) -> list[tuple[str, QueueConfig]]:
        """Every queue the file holds, with its settings."""
        return self._store.queues()

    def open_queue(self, name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink) -> SqliteQueue:
        """Open ``name``, creating it in the file with ``config`` if it is new."""
        queue = SqliteQueue(name, config, clock, dead_letters, self._store.open_log(name, attrs.asdict(config)))
        queue.open()
        return queue

    def begin_transaction(self) -> TransactionScope:
        """A transaction's scope: one SQLite transaction on a shared file; on a batched one, the
        queues' locks, with the writer paused while it applies (see :mod:`mqlite.engine.locking`)."""
        store = self._store
        if store.shared:
            return FileScope(self._transactions, store)
        return LockScope(self._transactions, store.writer)

    def flush(self, timeout: float | None) -> bool:
        """Wait for the batched writer (``commit="batch"``); True at once otherwise."""
        return self._store.flush(timeout)

    def close(self) -> None:
        """Close the file and stop its threads (bounded)."""
        self._store.close()
