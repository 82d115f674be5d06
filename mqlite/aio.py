"""asyncio adapters: the blocking calls' take logic, waiting on an event loop instead of a thread.

A waiting task costs a future and a waiter entry, never a thread. A publish wakes it with
``loop.call_soon_threadsafe`` from another thread, or directly from the loop's own thread, and
only when something is waiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mqlite.queue import Queue

__all__ = ["loop_waker", "until_done"]

_R = TypeVar("_R")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def loop_waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Callable[[], None]:
    """A wake function for ``future``; must be made on ``loop``'s thread.

    It may be called from any thread, under a queue lock: it only schedules, never runs user code.
    """
    loop_thread = threading.get_ident()

    def wake() -> None:
        if threading.get_ident() == loop_thread:
            _resolve(future)
            return
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to wake

    return wake


async def until_done(
    queue: Queue,
    consumer: Any,
    attempt: Callable[[], tuple[bool, _R]],
    timeout: float | None,
) -> tuple[bool, _R]:
    """Retry ``attempt`` (run under the queue lock) until it is done or ``timeout`` passes.

    Cancelling the awaiting task at any point takes nothing: an attempt either completes under
    the lock, with no await inside it, or takes nothing at all.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        if timeout == 0:
            done, value, _, _ = queue.attempt(consumer, attempt, None)
            return done, value
        future: asyncio.Future[None] = loop.create_future()
        done, value, waiter, bound = queue.attempt(consumer, attempt, loop_waker(loop, future))
        if done:
            return done, value
        assert waiter is not None
        wait = bound
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                queue.remove_waiter(waiter)
                return done, value
            wait = remaining if wait is None else min(wait, remaining)
        timer = loop.call_later(wait, _resolve, future) if wait is not None else None
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            queue.remove_waiter(waiter)
