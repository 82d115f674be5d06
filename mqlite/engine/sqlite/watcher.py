"""The watcher thread of a shared file: :class:`Watcher`.

It polls SQLite's ``data_version`` so that a broker notices what other connections committed:
waiting readers wake when another process publishes, and the pending messages of brokers that
died are handed back for redelivery. It also checkpoints the WAL (:class:`_Checkpointer`), so that
publishers never wait for a checkpoint. The store decides what changed
(:meth:`~mqlite.engine.sqlite.store.SqliteStore.poll_changes`); the watcher paces the polls and
pokes the queues.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from mqlite.engine.sqlite.sharing import WATCH_MAX, WATCH_MIN, _Checkpointer

if TYPE_CHECKING:
    from mqlite.engine.sqlite.store import SqliteStore

__all__ = ["Watcher"]

_log = logging.getLogger("mqlite")


class Watcher:
    """One store's watcher thread. Thread-safe.

    ``_lock`` guards ``_pokes``, the callbacks of the queues to wake (each reloads its queue);
    they run on the watcher's thread with no lock held.
    """

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pokes: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._run, name="mqlite-watcher", daemon=True)

    def add(self, poke: Callable[[], None]) -> None:
        """Call ``poke`` (from the watcher thread) whenever another connection changed the file."""
        with self._lock:
            self._pokes.append(poke)

    def stop(self) -> None:
        """Ask the thread to end (it ends within one poll); join :attr:`thread` to wait for it."""
        self._stop.set()

    def _run(self) -> None:
        delay = WATCH_MIN
        store = self._store
        checkpointer = _Checkpointer(store.path)
        try:
            while not self._stop.wait(delay):
                checkpointer.maybe_run()
                try:
                    changed = store.poll_changes()
                except sqlite3.Error:
                    _log.warning("the watcher of %r could not read the file; retrying", store.path, exc_info=True)
                    changed = False
                if changed is None:
                    break  # the store is closed
                if not changed:
                    delay = min(delay * 2, WATCH_MAX)
                    continue
                delay = WATCH_MIN
                with self._lock:
                    pokes = list(self._pokes)
                for poke in pokes:
                    try:
                        poke()
                    except Exception:  # noqa: BLE001  # a queue that fails to reload must not stop the watcher
                        _log.exception("reloading a queue of %r failed", store.path)
        finally:
            checkpointer.close()
