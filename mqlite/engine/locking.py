"""The scope of a transaction: the locks of the queues it touches, held until it ends.

A transaction takes its engine's transaction mutex first (one transaction of a broker at a
time, so two transactions never take queue locks in opposite orders), then each queue's scope
on its first call there, and holds them all until it commits or rolls back. While it holds a
queue, the queue's ``_lock`` is a :class:`_Held` guard: other threads wait for the real lock as
before, and the transaction's own thread, which would otherwise deadlock on itself, gets a clear
:class:`~mqlite.errors.TransactionError`.

- :class:`LockScope`: memory, and a file with ``commit="batch"`` (whose writer is paused while
  the transaction applies, so its writes land in one SQLite transaction).
- :class:`FileScope`: a shared file (``commit="each"``), where the transaction is also one SQLite
  write transaction, begun with the first call, so that offsets handed out inside are final
  and a ``kill -9`` at any moment keeps all of it or none.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from mqlite._delivery.entries import DeadLetter
from mqlite.config import QueueConfig
from mqlite.engine.staging import Staged, TransactionalCore
from mqlite.errors import BrokerClosed, TransactionError

if TYPE_CHECKING:
    from mqlite.engine.sqlite.sharing import FileLock
    from mqlite.engine.sqlite.store import SqliteStore

__all__ = ["FileScope", "LockScope", "Scope", "TransactionScope"]

_INSIDE = (
    "inside a transaction, publish, ack and nack through the transaction (tx.publish, tx.ack, tx.nack); "
    "other calls on the queues it touched would wait for the transaction itself"
)


class Scope(Protocol):
    """What a transaction needs of its engine's scope: :class:`TransactionScope` here, or the
    Redis engine's ``RedisScope``. Each ``part`` is what the queue's ``_tx_*`` methods stage into."""

    def part(self, queue: Any) -> Any: ...

    def opening(self) -> contextlib.AbstractContextManager[None]: ...

    def opened(self, name: str) -> None: ...

    def commit(self) -> list[tuple[Any, list[DeadLetter]]]: ...

    def rollback(self) -> None: ...


class _Held:
    """A queue's lock while a transaction holds it. Thread-safe (it only delegates)."""

    __slots__ = ("_lock", "_owner")

    def __init__(self, lock: Any, owner: int) -> None:
        self._lock = lock
        self._owner = owner

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.get_ident() == self._owner:
            raise TransactionError(_INSIDE)
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class TransactionScope:
    """The queues one transaction holds, and their staged parts. Not thread-safe: its thread only.

    Subclasses say how a queue is taken (:meth:`_take`) and how the whole is committed.
    """

    def __init__(self, mutex: threading.Lock) -> None:
        self._mutex = mutex
        self._owner = threading.get_ident()
        self._parts: dict[TransactionalCore, Staged] = {}
        self._locks: list[tuple[TransactionalCore, Any]] = []  # (queue, its real lock), in taking order
        self._ended = False
        mutex.acquire()  # held until the scope ends: the only wait is for another transaction to end

    def part(self, queue: TransactionalCore) -> Staged:
        """``queue``'s part, taking its scope on first use.

        Raises:
            BrokerClosed: the queue's broker was closed.
        """
        part = self._parts.get(queue)
        if part is None:
            self._take(queue)
            part = self._parts[queue] = Staged(queue)
        return part

    def _take(self, queue: TransactionalCore) -> None:
        lock = queue._lock
        lock.acquire()
        self._hold(queue, lock)

    def _hold(self, queue: TransactionalCore, lock: Any) -> None:
        self._locks.append((queue, lock))
        queue._lock = _Held(lock, self._owner)
        if queue._closed:
            raise BrokerClosed(f"cannot use queue {queue.name!r} in a transaction: the broker is closed")

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Around opening a queue inside the transaction (a publish to a new queue)."""
        yield

    def opened(self, name: str) -> None:
        """The queue ``name`` was created inside the transaction."""

    def commit(self) -> list[tuple[TransactionalCore, list[DeadLetter]]]:
        """Apply every part and end the scope; returns the dead letters to publish now."""
        try:
            return self._apply()
        finally:
            self._end()

    def rollback(self) -> None:
        """Forget every part and end the scope."""
        self._end()

    def _apply(self) -> list[tuple[TransactionalCore, list[DeadLetter]]]:
        dead = []
        for queue, part in self._parts.items():
            letters = queue._tx_apply_locked(part)
            if letters:
                dead.append((queue, letters))
        return dead

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            for queue, lock in reversed(self._locks):
                queue._lock = lock
                lock.release()
        finally:
            self._locks.clear()
            self._parts.clear()
            self._mutex.release()


class LockScope(TransactionScope):
    """Memory, or a file with ``commit="batch"``: each queue's lock, held until the end.

    ``writer`` (a batched file's) is paused while the parts are applied, so that their writes
    are committed as one SQLite transaction.
    """

    def __init__(self, mutex: threading.Lock, writer: Any = None) -> None:
        super().__init__(mutex)
        self._writer = writer

    def _apply(self) -> list[tuple[TransactionalCore, list[DeadLetter]]]:
        writer = self._writer
        if writer is None:
            return super()._apply()
        writer.pause()
        try:
            return super()._apply()
        finally:
            writer.resume()


class FileScope(TransactionScope):
    """A shared file: one SQLite write transaction, owned by this scope from its first queue on.

    Lock order as everywhere: a queue's lock, then the file. The file is taken first here, then
    each queue's lock; a thread that holds a queue's lock and wants the file while this scope
    owns it lets go of its lock and waits (see ``FileLock.acquire``), so this scope's wait for a
    queue's lock always ends.
    """

    def __init__(self, mutex: threading.Lock, store: SqliteStore) -> None:
        super().__init__(mutex)
        self._store = store
        self._generation: int | None = None
        self._began = False
        self._opened: list[tuple[str, dict[str, Any]]] = []

    def _take(self, queue: TransactionalCore) -> None:
        file_lock: FileLock | None = getattr(queue, "_file_lock", None)
        if file_lock is None or isinstance(queue._lock, _Held):
            raise TransactionError(_INSIDE)
        store = self._store
        if not self._began:
            generation = store.begin_owned()
            if generation is None:
                raise BrokerClosed(f"cannot use queue {queue.name!r} in a transaction: the broker is closed")
            self._generation = generation
            self._began = True
        file_lock.plain.acquire()
        try:
            assert self._generation is not None
            file_lock.join(self._generation)
        except BaseException:
            file_lock.plain.release()
            raise
        self._hold(queue, file_lock)

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        store = self._store
        store.joinable = True
        try:
            yield
        finally:
            store.joinable = False

    def opened(self, name: str) -> None:
        """If the transaction rolls back, the queue's row (made inside it) is made again."""
        self._opened.append((name, attrs.asdict(QueueConfig())))

    def commit(self) -> list[tuple[TransactionalCore, list[DeadLetter]]]:
        try:
            dead = self._apply()
            for queue, _ in self._locks:
                queue._file_lock.finish()  # type: ignore[attr-defined]  # a SqliteQueue's
        except BaseException:
            self._roll_back(restore=True)
            raise
        try:
            if self._began:
                self._began = False
                self._store.end_owned(commit=True)
        except BaseException:
            self._restore()
            raise
        finally:
            self._end()
        return dead

    def rollback(self) -> None:
        self._roll_back()

    def _roll_back(self, *, restore: bool = False) -> None:
        """Roll the file back; restore memory from it if it was changed (an apply that failed,
        or housekeeping that wrote inside the transaction)."""
        try:
            wrote = self._store.wrote
            if self._began:
                self._began = False
                self._store.end_owned(commit=False)
            if restore or wrote:
                self._restore()
        finally:
            self._end()

    def _restore(self) -> None:
        store = self._store
        for name, config in self._opened:
            store.ensure_queue(name, config)
        for queue, _ in self._locks:
            queue._file_lock.restore()  # type: ignore[attr-defined]  # a SqliteQueue's
