"""A queue's part in a transaction: what it checked at each call and applies at commit.

A transaction (:mod:`mqlite.transaction`) holds the scope of every queue it touches from its
first call on that queue until it ends (see :mod:`mqlite.engine.locking`), so nothing another
thread does can change what a call checked. Each call checks everything at once and stages its
change in the queue's :class:`Staged` part; nothing changes until commit, when every part is
applied under the scopes still held. A call that raises stages nothing; a transaction that ends
with an exception simply forgets its parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import DeadLetter, Pending
from mqlite.engine.base import Consumer
from mqlite.engine.codec import Fields
from mqlite.engine.delivery import DeliveryCore
from mqlite.errors import BrokerClosed, NotPending
from mqlite.message import Message, MessageMeta

__all__ = ["Staged", "TransactionalCore"]


class Staged:
    """One queue's staged publishes, acks and nacks. Not thread-safe: its transaction's thread only."""

    __slots__ = ("acks", "duplicates", "encoded", "ids", "messages", "nacks", "queue", "settled")

    def __init__(self, queue: TransactionalCore) -> None:
        self.queue = queue
        self.messages: list[Message] = []  # to append, at offsets from the queue's end on
        self.encoded: list[Fields] | None = None  # their stored form, for a persistent queue
        self.ids: dict[str, Message] = {}  # the dedup ids of staged messages
        self.duplicates = 0  # publishes the duplicate window refused
        self.acks: dict[Cursor, list[Pending]] = {}
        self.nacks: list[tuple[Cursor, Pending, float]] = []
        self.settled: set[tuple[int, int]] = set()  # (id of cursor, offset) acked or nacked here


class TransactionalCore(DeliveryCore):
    """Queue operations staged in a transaction. Every ``_tx_*`` method runs with the queue's scope
    held by the transaction; it raises, staging nothing, or stages its change."""

    def _tx_publish_locked(
        self,
        part: Staged,
        event: str,
        payload: Any,
        key: Any,
        headers: Mapping[str, Any] | None,
        dedup_id: object,
    ) -> Message:
        """Check one publish and stage it; returns the message the commit will append.

        A dedup id published within the window (or staged earlier in the transaction) stages
        nothing and returns the first message with that id.
        """
        if key is None and headers is None and dedup_id is None and type(event) is str and event in self._events:
            checked: list[tuple[str, Any, MessageMeta | None]] = [(event, payload, None)]  # known: checked before
            ids = None
        else:
            checked, ids = self._check_drafts(
                [(event, payload, key, headers)], None if dedup_id is None else [dedup_id]
            )
        if self._closed:
            raise BrokerClosed(f"cannot publish to {self.name!r}: the broker is closed")
        draft = checked[0]
        now = self._time()
        dedup = ids[0] if ids is not None else None
        if dedup is not None:
            staged = part.ids.get(dedup)
            if staged is not None:
                part.duplicates += 1
                return staged
            found = self._dedup.find(dedup, now)
            if found is not None:
                part.duplicates += 1
                return self._original_locked(found, draft)
        encoded = self._encode(checked)  # a serializer that raises stages nothing
        count = len(part.messages) + 1
        end = self._end
        if end + count > self._check_at:  # housekeeping due, queue full, or broker closed
            self._make_room_locked(count)  # housekeeping never moves the end: staged offsets stay right
        message = self._build_locked(checked, end + len(part.messages), now)[0]
        part.messages.append(message)
        if encoded is not None:
            if part.encoded is None:
                part.encoded = []
            part.encoded.extend(encoded)
        if dedup is not None:
            part.ids[dedup] = message
        return message

    def _tx_ack_locked(self, part: Staged, consumer: Consumer, messages: tuple[Message | int, ...]) -> None:
        """Check an ack as :meth:`ack` does, and stage it."""
        cursor = self._check_manual_locked(consumer, "ack")
        entries = [self._pending_entry_locked(cursor, message, "ack") for message in messages]
        settled = part.settled
        keys = [(id(cursor), entry.message[2]) for entry in entries]
        if len(keys) > 1 and len(set(keys)) < len(keys):
            raise NotPending(f"ack() was given the same message of {self.name!r} twice; nothing was acked")
        if settled:
            for key, entry in zip(keys, entries, strict=True):
                if key in settled:
                    raise NotPending(
                        f"offset {entry.message[2]} of {self.name!r} is already acked or nacked in this transaction"
                    )
        settled.update(keys)
        acks = part.acks.get(cursor)
        if acks is None:
            part.acks[cursor] = entries
        else:
            acks.extend(entries)

    def _tx_nack_locked(self, part: Staged, consumer: Consumer, message: Message | int, delay: float) -> None:
        """Check a nack as :meth:`nack` does, and stage it."""
        cursor, entry = self._nack_entry_locked(consumer, message)
        key = (id(cursor), entry.message[2])
        if key in part.settled:
            raise NotPending(
                f"offset {entry.message[2]} of {self.name!r} is already acked or nacked in this transaction"
            )
        part.settled.add(key)
        part.nacks.append((cursor, entry, delay))

    def _tx_apply_locked(self, part: Staged) -> list[DeadLetter]:
        """Apply what ``part`` staged; returns the dead letters to publish once no scope is held.

        Everything was checked when staged and nothing else could change the queue since, so
        in memory this cannot fail; on a file a write that fails raises, and the transaction
        rolls back (memory is then reloaded from the file).
        """
        messages = part.messages
        if messages:
            dedup = [(dedup_id, message[2], message[3]) for dedup_id, message in part.ids.items()]
            self._store_built_locked(messages, part.encoded, dedup or None)
        for cursor, entries in part.acks.items():
            self._ack_entries_locked(cursor, entries)
        for cursor, entry, delay in part.nacks:
            self._nack_locked(cursor, entry, delay)
        self.duplicates += part.duplicates
        return self._take_outbox_locked()
