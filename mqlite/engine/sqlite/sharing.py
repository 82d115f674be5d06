"""What lets several brokers share one file: the transaction as a queue's lock, claims and liveness.

A broker holds an ``flock`` on the database file (its claim: exclusive while it is alone, shared
once another broker opens the file) and one on its own lock file ``<path>-brokers/<id>.lock``
while it lives; a lock file nobody holds belongs to a dead broker, whose pending messages are
then redelivered. Each queue operation on a shared file is one SQLite write transaction
(:class:`FileLock`). The watcher thread
(:class:`~mqlite.engine.sqlite.watcher.Watcher`) paces itself by the constants here and
checkpoints through :class:`_Checkpointer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Any

from mqlite.errors import MqliteError, StorageError

if TYPE_CHECKING:
    from mqlite.engine.sqlite.store import SqliteStore

BUSY = -2
"""What ``SqliteStore.begin`` returns while another thread's transaction holds the file."""

__all__ = ["CHECKPOINT_EVERY", "LIVENESS_EVERY", "WATCH_MAX", "WATCH_MIN", "FileLock", "brokers_folder"]

_log = logging.getLogger("mqlite")

# How often the watcher looks at data_version: soon after a change, then less and less often.
WATCH_MIN = 0.001
WATCH_MAX = 0.025
# How often the watcher looks for dead brokers holding pending messages, and how long a broker
# seen alive is believed alive.
LIVENESS_EVERY = 0.5
# commit="each": the watcher checkpoints the WAL into the file this often, on its own connection,
# so that publishers, whose every commit would otherwise copy pages back and fsync once the WAL
# reaches SQLite's default 1,000 pages, never wait for it. A publisher checkpoints only when the
# WAL passes schema.WAL_AUTOCHECKPOINT pages (16 MiB of 4 KiB pages), that is, if the watcher falls behind.
CHECKPOINT_EVERY = 0.025


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _claim(path: str, liveness: _Liveness, *, exclusive: bool, wait: float) -> tuple[Any, bool]:
    """Claim ``path``; returns the claim (held until closed) and whether this broker is alone.

    The claim is an ``flock`` on the database file, which SQLite's own (POSIX) locks never touch;
    it lasts until the returned file is closed or the process dies. A batched broker (``exclusive``)
    must have the file to itself. Any other broker first tries to be alone (an exclusive claim);
    if another broker has the file, it waits up to ``wait`` seconds for a shared claim, which a
    broker that was alone gives once its watcher sees this one's lock file. Where ``flock`` does
    not exist (Windows), nothing is claimed and every broker shares.
    """
    if sys.platform == "win32":
        return None, False
    import fcntl

    handle = open(path, "rb")  # noqa: SIM115  # held open for the broker's lifetime, closed by close()
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle, True
        except OSError:
            if exclusive:
                raise StorageError(_batch_needs_the_file(path, "it is already open in another mqlite Broker")) from None
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            if liveness.batch_alive():
                raise StorageError(_batch_needs_the_file(path, "a Broker with commit='batch' has it open"))
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                return handle, False
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StorageError(
                    f"{path!r}: the broker that has it open did not make room for another within {wait:g} s"
                )
            time.sleep(pause)  # another process must act: nothing here to wait on but time
            pause = min(pause * 2, WATCH_MAX)
    except BaseException:
        handle.close()
        raise


def _batch_needs_the_file(path: str, why: str) -> str:
    return (
        f"{path!r}: {why} (this process or another one); a batched broker assigns offsets before it "
        "commits, so it needs the file to itself. Close that broker first, or open every broker with "
        "commit='each' to share the file"
    )


def brokers_folder(path: str) -> str:
    """The folder beside ``path`` where each broker that has it open keeps its lock file."""
    return f"{path}-brokers"


class _Liveness:
    """Tells live brokers from dead ones through lock files in ``<path>-brokers/``.

    Each broker holds its ``<id>.lock`` while it lives, with an exclusive ``flock`` that the
    kernel drops when the process dies, however it dies. The file is made and locked under a
    temporary name, then renamed, so no one sees it unlocked while its broker lives. On Windows,
    where there is no ``flock``, the file is simply kept open: an open file cannot be deleted, so
    a lock file that can be deleted belongs to a dead broker.

    Raises:
        StorageError: the lock file cannot be made (the folder is not writable, say); nothing is left behind.
    """

    def __init__(self, path: str, instance: str) -> None:
        self._dir = brokers_folder(path)
        self._path = os.path.join(self._dir, f"{instance}.lock")
        self._handle: Any = None
        temporary = f"{self._path}.new"
        handle = None
        try:
            os.makedirs(self._dir, exist_ok=True)
            if sys.platform == "win32":
                self._handle = open(self._path, "wb")  # noqa: SIM115  # held for the broker's lifetime
                return
            import fcntl

            handle = open(temporary, "wb")  # noqa: SIM115  # held open for the broker's lifetime
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            os.replace(temporary, self._path)
        except OSError as error:
            if handle is not None:
                handle.close()
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            raise StorageError(
                f"{path!r}: cannot make this broker's lock file in {self._dir!r} ({error.strerror or error}); "
                "mqlite keeps one there for each broker that has the file open, so that folder must be "
                "writable; nothing was changed"
            ) from error
        self._handle = handle

    def alive(self, instance: str) -> bool:
        """Whether the broker ``instance`` still holds its lock file (a dead one's file is removed)."""
        path = os.path.join(self._dir, f"{instance}.lock")
        if sys.platform == "win32":
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            except PermissionError:
                return True
            return False
        import fcntl

        try:
            handle = open(path, "rb")  # noqa: SIM115  # closed below
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        with contextlib.suppress(OSError):
            os.unlink(path)  # dead: nobody will lock this file again
        return False

    def _others(self) -> list[str]:
        try:
            names = os.listdir(self._dir)
        except OSError:
            return []
        mine = os.path.basename(self._path)
        return [name[: -len(".lock")] for name in names if name.endswith(".lock") and name != mine]

    def others_alive(self) -> bool:
        """Whether another live broker has a lock file here (one that just opened the file, say)."""
        return any(self.alive(instance) for instance in self._others())

    def batch_alive(self) -> bool:
        """Whether a live batched broker (which needs the file to itself) has a lock file here."""
        return any(self.alive(instance) for instance in self._others() if instance.endswith("-batch"))

    def close(self) -> None:
        """Remove and release this broker's lock file."""
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        with contextlib.suppress(OSError):
            os.unlink(self._path)


class _Checkpointer:
    """The watcher's own connection, which copies the WAL back into the file every CHECKPOINT_EVERY s.

    A passive checkpoint waits for nobody and blocks no writer; it runs with the GIL released, so
    publishers keep going on the other core while it copies pages and syncs the file.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._next = 0.0

    def maybe_run(self) -> tuple[int, int] | None:
        """Checkpoint if CHECKPOINT_EVERY has passed since the last time.

        Returns the WAL's frames and how many of them are now in the file, or None if it did not
        run (not due yet, or another connection was checkpointing: SQLite then reports -1, -1).
        """
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + CHECKPOINT_EVERY
        try:
            if self._db is None:
                self._db = sqlite3.connect(self._path, isolation_level=None, timeout=0)
            _, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            # Not fatal: a publisher checkpoints once the WAL reaches WAL_AUTOCHECKPOINT pages.
            _log.debug("checkpointing %r failed; retrying", self._path, exc_info=True)
            return None
        return None if frames < 0 else (frames, copied)

    def close(self) -> None:
        """Close the connection (the watcher's last act)."""
        if self._db is not None:
            self._db.close()
            self._db = None


def _rolled_back(failure: sqlite3.Error | None) -> tuple[str, BaseException] | None:
    """What to log about a ROLLBACK that raised (SQLite had rolled back by itself), if it did."""
    return None if failure is None else ("rolling back a transaction failed (SQLite rolled it back itself)", failure)


class FileLock:
    """A queue's lock on a shared file: holding it also holds one SQLite write transaction.

    ``acquire`` takes the queue's own lock, begins the transaction and lets the queue reload what
    other connections changed; ``release`` lets the queue write what it still owes, commits and
    releases. Everything a queue does under its lock is therefore one atomic step across every
    process sharing the file. Once the store is closed it is a plain lock.

    All or nothing: when the body raises (an exception other than the one, if any, being handled
    when it began) after writing, or when the writes at release fail, the transaction is rolled
    back and the queue undoes its memory changes (``undo``) and reloads its state from the file
    (``reload``), the file being the truth. A body refused before it wrote changed nothing (the
    core checks before it changes), so it is only rolled back. A reload that fails leaves the
    queue ``stale``: the next acquire reloads before anything else.
    """

    __slots__ = (
        "_began",
        "_entry_error",
        "_on_begin",
        "_on_commit",
        "_owed",
        "_refresh",
        "_reload",
        "_store",
        "_undo",
        "plain",
        "stale",
        "synced",
    )

    def __init__(
        self,
        store: SqliteStore,
        refresh: Callable[[], None],
        on_commit: Callable[[], None],
        *,
        owed: Sized | None = None,
        on_begin: Callable[[], None] = lambda: None,
        undo: Callable[[], None] = lambda: None,
        reload: Callable[[], None] | None = None,
    ) -> None:
        self.plain = threading.Lock()
        self._store = store
        self._refresh = refresh  # reload the queue from the file: what changed since it last looked
        self._reload = reload if reload is not None else refresh  # reload all of it
        self._on_commit = on_commit  # write what the queue still owes the file
        # What on_commit writes, if the queue says: while it is empty, on_commit is not called
        # (the usual operation owes nothing, and the call would cost each one a frame).
        self._owed = owed
        self._on_begin = on_begin  # remember what undo needs
        self._undo = undo  # undo the memory changes of a failed operation that the file cannot restore
        # Guarded by plain: whether a transaction is open, the exception being handled when it
        # began, the store generation the queue last reloaded at (-1: never, so the first acquire
        # loads it), and whether memory must be reloaded in full before the next operation.
        self._began = False
        self._entry_error: BaseException | None = None
        self.synced = -1
        self.stale = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock and begin the transaction (``blocking`` and ``timeout`` as for a Lock).

        While another thread's transaction (:class:`~mqlite.transaction.Transaction`) holds the
        file, the lock is let go and taken again once it ends: that transaction may want this
        queue's lock next, and it holds the file, so holding one while waiting for the other
        would deadlock.
        """
        store = self._store
        while True:
            if not self.plain.acquire(blocking, timeout):
                return False
            try:
                generation = store.begin()
            except BaseException:
                self.plain.release()
                raise
            if generation != BUSY:
                break
            self.plain.release()
            if not blocking:
                return False
            store.wait_owned()
        try:
            if generation is None:
                return True  # the store is closed: a plain lock from now on
            if self.stale or generation != self.synced:
                try:
                    (self._reload if self.stale else self._refresh)()
                except BaseException:
                    self.stale = True  # a reload that stopped half-way: the next one starts afresh
                    store.rollback()  # its failure is not news: SQLite rolled back itself; the reload's error is raised
                    raise
                self.stale = False
                self.synced = generation
            self._on_begin()
            self._began = True
            self._entry_error = sys.exc_info()[1]
        except BaseException:
            self.plain.release()
            raise
        return True

    def join(self, generation: int) -> None:
        """Bring the queue into a transaction its caller owns (it holds ``plain`` and began the
        store's transaction at ``generation``): reload what other brokers changed, and remember
        what :meth:`restore` needs. The caller writes what the queue owes (:meth:`finish`) and
        commits, or rolls back and calls :meth:`restore`.
        """
        if self.stale or generation != self.synced:
            try:
                (self._reload if self.stale else self._refresh)()
            except BaseException:
                self.stale = True  # a reload that stopped half-way: the next one starts afresh
                raise
            self.stale = False
            self.synced = generation
        self._on_begin()

    def finish(self) -> None:
        """Write what the queue still owes the file, before its owner's transaction commits."""
        self._on_commit()

    def restore(self) -> None:
        """After its owner's transaction rolled back: undo memory and reload it from the file.

        What goes wrong is logged: the transaction's own error is the one raised.
        """
        trouble = self._restore()
        if trouble is not None:
            what, failure = trouble
            _log.warning("%r: %s", self._store.path, what, exc_info=failure)

    def release(self) -> None:
        """Commit the transaction and release the lock (roll back and restore if the body failed).

        What goes wrong while cleaning up after a failed body is logged once the lock is
        released (no logging handler runs under a queue's lock); the body's own error is the
        one raised.
        """
        trouble: tuple[str, BaseException] | None = None
        try:
            if self._began:
                self._began = False
                store = self._store
                error = sys.exc_info()[1]
                if error is not None and error is not self._entry_error:
                    wrote = store.wrote
                    trouble = _rolled_back(store.rollback())
                    if wrote or not isinstance(error, MqliteError):
                        trouble = self._restore() or trouble
                    return
                owed = self._owed
                try:
                    if owed is None or owed:
                        self._on_commit()
                except BaseException:
                    trouble = _rolled_back(store.rollback())
                    trouble = self._restore() or trouble
                    raise
                try:
                    store.commit()
                except BaseException:
                    trouble = self._restore()
                    raise
        finally:
            self._entry_error = None
            self.plain.release()
            if trouble is not None:
                what, failure = trouble
                _log.warning("%r: %s", self._store.path, what, exc_info=failure)

    def _restore(self) -> tuple[str, BaseException] | None:
        """After a rollback: undo what the file cannot tell, then reload the rest from the file.

        Returns what went wrong, if the reload failed: the queue then reloads before its next
        operation.
        """
        self.stale = True
        try:
            self._undo()
            generation = self._store.begin()
            if generation is None:
                return None
            try:
                self._reload()
            except BaseException:
                self._store.rollback()
                raise
            self._store.commit()
        except Exception as error:  # noqa: BLE001  # the operation's own error is the one to raise
            return "reloading a queue after a failed operation failed; it reloads before the next one", error
        self.synced = generation
        self.stale = False
        return None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
