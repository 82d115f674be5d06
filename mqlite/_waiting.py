"""One deadline loop for every face that waits: blocking calls, asyncio, push workers.

An engine's ``*_or_wait`` step either gets what the caller waits for, or registers a one-shot
waiter and says how long the wait may last at most (a retry or ack timeout falls due then).
:func:`wait` sleeps on a lock released by the waker; :func:`await_` awaits a future that the
waker resolves through the loop. The loop around them is the same: compute the deadline once,
try, wait for the remaining time, try again.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mqlite._delivery.waiters import Waiter
from mqlite.engine.base import Attempt

__all__ = ["LONGEST_WAIT", "OffLoop", "await_", "capped", "jumping_clock", "loop_waker", "run_off_loop", "wait"]

_T = TypeVar("_T")

Try = Callable[[Callable[[], object]], Attempt[_T]]
"""One step of an engine, given the wake function to register if it must wait."""


LONGEST_WAIT = threading.TIMEOUT_MAX / 2
"""The longest a single blocking wait lasts (about 146 years on Linux, 24 days on Windows).

A timeout or a due time further off, infinity included, waits this long and looks again: a
lock's ``acquire`` raises OverflowError beyond ``threading.TIMEOUT_MAX``. Half of it, so that a
deadline made from it minus a later clock reading stays below the limit despite rounding."""


def capped(seconds: float) -> float:
    """``seconds``, or :data:`LONGEST_WAIT` if longer: what a blocking wait may be given."""
    return seconds if seconds < LONGEST_WAIT else LONGEST_WAIT


def _bounded(wait_at_most: float | None, remaining: float | None) -> float | None:
    if remaining is None:
        return wait_at_most
    return remaining if wait_at_most is None or remaining < wait_at_most else wait_at_most


def jumping_clock(owner: object) -> Any:
    """The autojumping clock (``mqlite.testing.VirtualClock(autojump=True)``) ``owner`` waits on, or None.

    ``owner`` is an engine, or a bound method of one (``engine.remove_waiter``): its ``_clock``.
    Under such a clock a wait counts its timeout in clock seconds and tells the clock when it
    blocks and wakes, so that the clock can jump once every wait is blocked. Looked up only on
    the blocking path, never when a step gets what it wanted.
    """
    clock = getattr(getattr(owner, "__self__", owner), "_clock", owner)
    return clock if getattr(clock, "autojump", False) is True else None


def wait(attempt: Try[_T], remove: Callable[[Waiter | None], None], timeout: float | None) -> Attempt[_T]:
    """Try until ``attempt`` is done or ``timeout`` seconds pass; the last attempt is returned.

    Holds no lock while it waits, so a step that raises (a file that stayed locked) raises here
    with nothing half-done. Under an autojumping virtual clock the timeout is clock seconds.
    """
    clock = jumping_clock(remove)
    if clock is not None:
        return _wait_virtual(clock, attempt, remove, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        signal = threading.Lock()
        signal.acquire()
        result = attempt(signal.release)
        if result.done:
            return result
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                remove(result.waiter)
                return result
        bound = _bounded(result.wait_at_most, remaining)
        if not signal.acquire(True, -1 if bound is None else capped(bound)):
            remove(result.waiter)  # whoever wakes a waiter removes it; only a timed-out wait removes its own


def _wait_virtual(
    clock: Any, attempt: Try[_T], remove: Callable[[Waiter | None], None], timeout: float | None
) -> Attempt[_T]:
    """:func:`wait` on an autojumping clock: blocked until woken, or until the clock reaches the deadline."""
    waiting = clock._participant()
    try:
        deadline = None if timeout is None else waiting.now() + timeout
        while True:
            signal = threading.Lock()
            signal.acquire()
            result = attempt(waiting.arm(signal.release))
            if result.done:
                return result
            if deadline is not None and waiting.now() >= deadline:
                remove(result.waiter)
                return result
            try:
                if waiting.block(deadline):
                    while not signal.acquire(True, LONGEST_WAIT):
                        pass  # the clock's deadline bounds this wait, not real time
                waiting.resume()
            finally:
                remove(result.waiter)  # the clock may have woken it, not the engine
    finally:
        waiting.close()


def _resolve(future: asyncio.Future[Any], woken: bool = True) -> None:
    """Resolve a wait's future: True when its waiter's waker calls (which removed the waiter), False at its timer."""
    if not future.done():
        future.set_result(woken)


def loop_waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> Callable[[], None]:
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


Run = Callable[[Callable[[], Attempt[_T]]], Awaitable[Attempt[_T]]]
"""How an async face runs one engine step: inline, or in a thread for an engine that does I/O."""


async def await_(
    attempt: Try[_T],
    remove: Callable[[Waiter | None], None],
    timeout: float | None,
    run: Run[_T] | None = None,
) -> Attempt[_T]:
    """:func:`wait` for asyncio: the same loop, awaiting a future instead of blocking a thread.

    ``run`` runs a step off the event loop (for engines with blocking I/O); by default steps run
    inline, since they never block. Cancelling the awaiting task while it waits takes nothing:
    a step either completes, with no await inside it, or takes nothing at all.
    """
    clock = jumping_clock(remove)
    if clock is not None:
        return await _await_virtual(clock, attempt, remove, timeout, run)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        future: asyncio.Future[bool] = loop.create_future()
        wake = loop_waker(loop, future)
        if run is None:
            result = attempt(wake)
        else:
            result = await run(functools.partial(attempt, wake))
        if result.done:
            return result
        remaining = None
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                remove(result.waiter)
                return result
        bound = _bounded(result.wait_at_most, remaining)
        timer = loop.call_later(capped(bound), _resolve, future, False) if bound is not None else None
        woken = False
        try:
            woken = await future
        finally:
            if timer is not None:
                timer.cancel()
            if not woken:
                # Whoever wakes a waiter removes it; only a wait that timed out or was cancelled
                # removes its own (a removal costs a lock round trip).
                remove(result.waiter)


async def _await_virtual(
    clock: Any, attempt: Try[_T], remove: Callable[[Waiter | None], None], timeout: float | None, run: Run[_T] | None
) -> Attempt[_T]:
    """:func:`await_` on an autojumping clock: no loop timer, the clock wakes the future at the deadline."""
    loop = asyncio.get_running_loop()
    waiting = clock._participant()
    try:
        deadline = None if timeout is None else waiting.now() + timeout
        while True:
            future: asyncio.Future[bool] = loop.create_future()
            wake = waiting.arm(loop_waker(loop, future))
            result = attempt(wake) if run is None else await run(functools.partial(attempt, wake))
            if result.done:
                return result
            if deadline is not None and waiting.now() >= deadline:
                remove(result.waiter)
                return result
            try:
                if waiting.block(deadline):
                    await future
                waiting.resume()
            finally:
                remove(result.waiter)
    finally:
        waiting.close()


OffLoop = Callable[[Callable[[], _T]], Awaitable[_T]]
"""Runs one engine step in a thread, for an engine whose steps do blocking I/O."""


_NOT_YET: Any = object()


async def run_off_loop(off_loop: OffLoop[_T], step: Callable[[], _T], keep: Callable[[_T, bool], object]) -> _T:
    """Run ``step`` with ``off_loop`` (in the broker's I/O thread), so the loop never waits on I/O.

    A step cannot be stopped once it runs. If the awaiting task is cancelled meanwhile, the
    step's result goes to ``keep(result, on_loop)`` exactly once, so that what it took is kept
    or given back instead of lost: in the I/O thread as soon as the step ends (``on_loop``
    False), before that thread runs the next step, so the next read finds it in order; or on the
    loop (``on_loop`` True) if the step had ended before the cancel.
    """
    # lock guards state: [whether the awaiting task gave up, the step's result once it ended].
    lock = threading.Lock()
    state: list[Any] = [False, _NOT_YET]

    def guarded() -> _T:
        result = step()
        with lock:
            abandoned = state[0]
            state[1] = result
        if abandoned:
            keep(result, False)
        return result

    future: asyncio.Future[_T] = asyncio.ensure_future(off_loop(guarded))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with lock:
            state[0] = True
            result = state[1]
        if result is not _NOT_YET:
            keep(result, True)
        raise
