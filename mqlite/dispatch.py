"""Push delivery: workers that run callbacks, and the dispatchers that give them threads."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mqlite.aio import until_done
from mqlite.message import Message
from mqlite.queue import Queue

__all__ = ["AsyncPushWorker", "Dispatcher", "ManualDispatcher", "PushWorker", "ThreadDispatcher"]

_log = logging.getLogger("mqlite")

# How many messages a worker takes per lock acquisition. Large enough to amortise the lock,
# small enough that closing a subscription stops its callbacks promptly.
PUSH_BATCH = 1024


class PushWorker:
    """Delivers one push subscription's messages to its callback, one at a time and in order.

    A worker is run by exactly one thread at a time (its dispatcher's choice). It takes batches
    under the queue's lock and calls the callback with no lock held. A callback that raises is
    logged to the ``mqlite`` logger and counts as a failed delivery; the worker carries on.
    """

    def __init__(
        self,
        queue: Queue,
        consumer: Any,
        callback: Callable[[Message], object],
        on_progress: Callable[[], None],
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.callback = callback
        self._on_progress = on_progress

    def step(self, *, block: bool) -> bool | None:
        """Deliver one batch. Returns whether anything was delivered, or None once closed."""
        taken = self.queue.take_push(self.consumer, PUSH_BATCH, block)
        if taken is None:
            return None
        batch, redelivered = taken
        if not batch:
            return False
        failures, unprocessed = self._run(batch)
        self.queue.push_done(self.consumer, self.consumer.cursor, batch, redelivered, failures, unprocessed)
        self._on_progress()
        return True

    def run(self) -> None:
        """Deliver until the subscription closes (the body of a dispatcher thread)."""
        try:
            while self.step(block=True) is not None:
                pass
        except BaseException:  # a bug in mqlite itself: say so loudly rather than die silently
            _log.exception("push worker for %r stopped unexpectedly", self.consumer)
            raise

    def _run(self, batch: list[Message]) -> tuple[list[tuple[Message, BaseException]], list[Message]]:
        callback = self.callback
        consumer = self.consumer
        failures: list[tuple[Message, BaseException]] = []
        remaining = iter(batch)
        message = batch[0]
        while True:
            try:
                for message in remaining:
                    if consumer.closed:
                        return failures, batch[batch.index(message) :]
                    callback(message)
                return failures, []
            except BaseException as error:  # noqa: BLE001  # a callback must never kill its worker
                _log_failure(consumer, message, error)
                failures.append((message, error))


def _log_failure(consumer: Any, message: Message, error: BaseException) -> None:
    _log.warning(
        "callback of subscription %s failed on %s offset %d (%s): %r",
        consumer.label,
        message.queue,
        message.offset,
        message.event,
        error,
        exc_info=_log.isEnabledFor(logging.DEBUG),
    )


class AsyncPushWorker:
    """Delivers one push subscription's messages to a coroutine callback, as a task on its loop.

    Calls go one at a time and in order; acks and retries apply when each coroutine finishes.
    The task waits for messages without a thread. Cancelling it (for example when the loop shuts
    down) hands back the message being handled and the rest of its batch for redelivery.
    """

    def __init__(
        self,
        queue: Queue,
        consumer: Any,
        callback: Callable[[Message], Awaitable[object]],
        on_progress: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.callback = callback
        self._on_progress = on_progress
        self.loop = loop
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Create the task on the worker's loop, from that loop's thread or any other."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._spawn()
        else:
            self.loop.call_soon_threadsafe(self._spawn)

    def _spawn(self) -> None:
        self.task = self.loop.create_task(self.run(), name=f"mqlite-push-{self.consumer.label}")

    async def run(self) -> None:
        """Deliver until the subscription closes."""
        queue = self.queue
        consumer = self.consumer
        while True:
            _, taken = await until_done(queue, consumer, lambda: queue.push_attempt_locked(consumer, PUSH_BATCH), None)
            if taken is None:
                return
            batch, redelivered = taken
            failures: list[tuple[Message, BaseException]] = []
            unprocessed: list[Message] = []
            try:
                for index, message in enumerate(batch):
                    if consumer.closed:
                        unprocessed = batch[index:]
                        break
                    try:
                        await self.callback(message)
                    except asyncio.CancelledError:
                        unprocessed = batch[index:]
                        raise
                    except Exception as error:  # noqa: BLE001  # a callback must never kill its worker
                        _log_failure(consumer, message, error)
                        failures.append((message, error))
            finally:
                queue.push_done(consumer, consumer.cursor, batch, redelivered, failures, unprocessed)
                self._on_progress()


class Dispatcher(Protocol):
    """Runs push workers. Replace it to choose which thread delivers."""

    def start(self, worker: PushWorker) -> None:
        """Begin delivering for ``worker``'s subscription."""

    def run_ready(self) -> bool:
        """Deliver what is ready on the calling thread, if this dispatcher does that.

        Returns whether anything was delivered. ``Broker.drain`` calls it while it waits.
        """

    def close(self, timeout: float) -> bool:
        """Stop every worker (their subscriptions are already closed); True if all stopped in time."""


class ThreadDispatcher:
    """One daemon thread per push subscription: a slow callback holds up nobody else. Thread-safe."""

    def __init__(self) -> None:
        # _lock guards _threads.
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, worker: PushWorker) -> None:
        """Start a thread that runs ``worker`` until its subscription closes."""
        thread = threading.Thread(target=worker.run, name=f"mqlite-push-{worker.consumer.label}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def run_ready(self) -> bool:
        """Threads deliver on their own; nothing to do on the caller's thread."""
        return False

    def close(self, timeout: float) -> bool:
        """Join every worker thread, waiting at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads, self._threads = self._threads, []
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(t.is_alive() for t in threads if t is not current)


class ManualDispatcher:
    """Runs no threads: callbacks run when the test calls :meth:`run_ready` (or ``Broker.drain``).

    Use it for deterministic tests of push subscriptions. Thread-safe; callbacks run on the thread
    that calls :meth:`run_ready`.
    """

    def __init__(self) -> None:
        # _lock guards _workers.
        self._lock = threading.Lock()
        self._workers: list[PushWorker] = []

    def start(self, worker: PushWorker) -> None:
        """Remember ``worker``; it delivers only inside :meth:`run_ready`."""
        with self._lock:
            self._workers.append(worker)

    def run_ready(self) -> bool:
        """Deliver everything that is ready, round-robin, until no worker has anything left."""
        did_any = False
        while True:
            with self._lock:
                workers = list(self._workers)
            progressed = False
            for worker in workers:
                result = worker.step(block=False)
                if result is None:
                    with self._lock:
                        if worker in self._workers:
                            self._workers.remove(worker)
                elif result:
                    progressed = True
            if not progressed:
                return did_any
            did_any = True

    def close(self, timeout: float) -> bool:
        """Forget every worker; there are no threads to stop."""
        with self._lock:
            self._workers.clear()
        return True
