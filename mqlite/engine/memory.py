"""The memory engine: every queue in this process's memory, gone when the broker closes."""

from __future__ import annotations

import threading

from mqlite.clock import Clock
from mqlite.config import QueueConfig
from mqlite.engine.base import Capabilities, DeadLetterSink
from mqlite.engine.locking import LockScope
from mqlite.engine.memory_log import MemoryLog
from mqlite.engine.staging import TransactionalCore

__all__ = ["MemoryEngine", "MemoryQueue"]


class MemoryQueue(TransactionalCore):
    """One queue in memory: a list of messages and the cursors reading it. Thread-safe.

    Its publish and take paths are :class:`~mqlite.engine.core.QueueCore`'s, which bind the
    list's ``append`` and take the lock with ``acquire()``/``release()``: the hot-path tricks
    live there, once.
    """


class MemoryEngine:
    """Storage for an in-memory broker. Thread-safe: its one lock, ``_transactions``, lets one
    transaction run at a time (see :mod:`mqlite.engine.locking`)."""

    capabilities = Capabilities(
        shared=False, persistent=False, blocking_io=False, retentions=("interest", "limits", "workqueue")
    )

    def __init__(self) -> None:
        self._transactions = threading.Lock()

    def begin_transaction(self) -> LockScope:
        """A transaction's scope: it takes each queue's lock on first use, until it ends."""
        return LockScope(self._transactions)

    @property
    def path(self) -> str | None:
        """None: nothing is stored outside this process."""
        return None

    def queues(self) -> list[tuple[str, QueueConfig]]:
        """An in-memory broker starts with no queues."""
        return []

    def open_queue(self, name: str, config: QueueConfig, clock: Clock, dead_letters: DeadLetterSink) -> MemoryQueue:
        """A new, empty queue."""
        queue = MemoryQueue(name, config, clock, dead_letters, MemoryLog())
        queue.open()
        return queue

    def flush(self, timeout: float | None) -> bool:
        """Nothing to write: True at once."""
        return True

    def close(self) -> None:
        """Nothing to release."""
