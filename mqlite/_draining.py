"""Draining: :class:`Progress`, what a broker's push workers report, and :class:`Drain`, one call of drain.

``Broker.drain`` and ``Broker.adrain`` are one loop, which differs only in how it waits: look (run
what a manual dispatcher has ready, then check whether every push subscription has handled
everything published before the call), and if not, wait for progress, then look again. The first
look (:func:`begin`) ends at once when every queue knows, without looking at its cursors, that
nothing was left to handle.

A drain looks only at the queues that may have something left (:class:`Unsettled`, which the
queues keep up to date), and at those whose engine cannot say (a shared file, Redis): its cost
follows the queues that had work, not how many the broker has.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence

from mqlite._delivery.cursor import Cursor
from mqlite._waiting import LONGEST_WAIT, capped, jumping_clock, loop_waker
from mqlite.engine.base import QueueEngine
from mqlite.errors import WouldDeadlock

__all__ = ["Drain", "Progress", "Unsettled", "begin"]

_PASSED = -math.inf
"""The deadline of ``drain(timeout=0)``: already passed, whatever the clock says (one look, no clock read)."""


class Progress:
    """A count that push workers bump after every batch (a ``ManualDispatcher`` run after each
    queue's round), and the drains waiting for it. Thread-safe.

    ``_cond`` (over ``_lock``) guards ``count``, ``handed`` (how many messages the batches noted
    handed to push callbacks), ``stopped``, ``_drainers`` (threads waiting) and
    ``_async_drainers`` (how to wake the tasks waiting, and the threads waiting on an
    autojumping clock). Wakers run with no lock held.

    Deadlines are ``now()``: ``time.monotonic()``, or the clock's time when the clock jumps by
    itself (``mqlite.testing.VirtualClock(autojump=True)``), so that drain's timeout is clock seconds.
    """

    def __init__(self, clock: object = None) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.count = 0
        self.handed = 0
        self.stopped = False  # the broker closed: drains return False
        self._drainers = 0
        self._async_drainers: list[Callable[[], None]] = []
        self._jumping = jumping_clock(clock)
        self.now: Callable[[], float] = time.monotonic if self._jumping is None else self._virtual_now

    def _virtual_now(self) -> float:
        return self._jumping._now  # type: ignore[no-any-return]  # read without counting as activity

    def note(self, handed: int = 0) -> None:
        """Push workers settled batches (or the clock moved): wake every drain. ``handed`` is
        how many messages those batches handed to callbacks that :meth:`hand` did not count (a
        :class:`~mqlite.ManualDispatcher` round counts its own here: it runs on the drain's thread)."""
        # The condition's lock taken directly, and no new list when nobody waits: this runs after
        # every push batch (a drain with 10 push subscriptions calls it 10 times).
        lock = self._lock
        lock.acquire()
        try:
            self.count += 1
            self.handed += handed
            if self._drainers:
                self._cond.notify_all()
            wakers = self._async_drainers
            if wakers:
                self._async_drainers = []
        finally:
            lock.release()
        for wake in wakers:
            wake()

    def hand(self, handed: int) -> None:
        """A push worker handed ``handed`` messages to its callback, and is about to settle them:
        count them without waking anyone (:meth:`note` does, once they are settled). Counted
        first, so that whoever finds them settled finds them counted."""
        lock = self._lock
        lock.acquire()
        try:
            self.handed += handed
        finally:
            lock.release()

    def stop(self) -> None:
        """The broker closed: every drain returns False, now and from now on."""
        with self._cond:
            self.stopped = True
            self._cond.notify_all()
            wakers, self._async_drainers = self._async_drainers, []
        for wake in wakers:
            wake()

    def handed_so_far(self) -> int:
        """How many messages the batches noted so far handed to push callbacks."""
        with self._lock:
            return self.handed

    def look(self) -> tuple[int, bool]:
        """The count now, and whether the broker stopped."""
        lock = self._lock  # the condition's lock, taken directly: a ``with`` of the condition is two frames
        lock.acquire()
        try:
            return self.count, self.stopped
        finally:
            lock.release()

    def wait(self, seen: int, deadline: float | None) -> None:
        """Block until the count moves past ``seen``, the broker stops, or ``deadline`` (:attr:`now`)."""
        if self._jumping is not None:
            self._wait_virtual(seen, deadline)
            return
        with self._cond:
            self._drainers += 1
            try:
                while self.count == seen and not self.stopped:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    self._cond.wait(None if remaining is None else capped(remaining))
            finally:
                self._drainers -= 1

    def _wait_virtual(self, seen: int, deadline: float | None) -> None:
        """:meth:`wait` on an autojumping clock, blocked until woken or the clock reaches ``deadline``."""
        waiting = self._jumping._participant()
        try:
            signal = threading.Lock()
            signal.acquire()
            wake = waiting.arm(signal.release)
            with self._cond:
                if self.count != seen or self.stopped:
                    return
                self._async_drainers.append(wake)
            if deadline is not None and waiting.now() >= deadline:
                return
            if waiting.block(deadline):
                while not signal.acquire(True, LONGEST_WAIT):
                    pass  # the clock's deadline bounds this wait, not real time
            waiting.resume()
        finally:
            waiting.close()

    async def await_(self, seen: int, deadline: float | None) -> None:
        """:meth:`wait` on the running loop, without blocking it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._jumping is not None:
            waiting = self._jumping._participant()
            try:
                wake = waiting.arm(loop_waker(loop, future))
                with self._cond:
                    if self.count != seen or self.stopped:
                        return
                    self._async_drainers.append(wake)
                if (deadline is None or waiting.now() < deadline) and waiting.block(deadline):
                    await future
                waiting.resume()
            finally:
                waiting.close()
            return
        with self._cond:
            if self.count != seen or self.stopped:
                return
            self._async_drainers.append(loop_waker(loop, future))
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait_for(future, None if remaining is None else capped(remaining))
        except TimeoutError:
            pass  # the deadline: the caller looks once more


class Unsettled:
    """The queues of one broker whose push cursors may not have handled everything published to
    them: every queue whose ``drain_start`` would not say settled, and perhaps some that would.
    Also those whose push cursors may have a timer (an ack timeout, a retry delay): with the
    first, what ``run_until_idle`` looks at (:meth:`busy_or_timed`). Thread-safe.

    ``_lock`` guards ``_queues`` (each queue and its end offset when it joined; a dict, so that
    drains look in a repeatable order), ``_joins`` (how many joins there have been) and
    ``_timed``. The queues call :meth:`add`, :meth:`discard`, :meth:`add_timed` and
    :meth:`discard_timed` with their own lock held, so that the sets change in the same lock
    section as the state they mirror: the lock order is a queue's lock, then this one, and
    nothing is called under this lock.
    """

    __slots__ = ("_joins", "_lock", "_queues", "_timed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[QueueEngine, int] = {}
        self._joins = 0
        self._timed: dict[QueueEngine, None] = {}

    def add_timed(self, queue: QueueEngine) -> None:
        """A push cursor of ``queue`` may have a timer: ``run_until_idle`` looks at it."""
        with self._lock:
            self._timed[queue] = None

    def discard_timed(self, queue: QueueEngine) -> None:
        """``queue`` found no push cursor with a timer (it says so under its own lock, so that a
        timer set meanwhile, which adds it back after, is not lost)."""
        with self._lock:
            self._timed.pop(queue, None)

    def busy_or_timed(self) -> list[QueueEngine]:
        """The queues that may have push work or a push timer, in a repeatable order."""
        with self._lock:
            return list({**self._queues, **self._timed})

    def add(self, queue: QueueEngine, end: int) -> None:
        """``queue``, with end offset ``end``, may have push work not yet handled: drains look at it.

        A queue outside the set was settled up to its end, which no publish has moved since: a
        drain that began while it was outside looks at it up to ``end`` (see :class:`Drain`).
        """
        # The lock taken directly, here, in discard and where drains read the set (begin and
        # Drain._settled, which read it in place: a frame is about 2,000 instructions under
        # callgrind, and a ``with`` about twice the direct calls).
        lock = self._lock
        lock.acquire()
        try:
            queues = self._queues
            if queue not in queues:
                queues[queue] = end
                self._joins += 1
        finally:
            lock.release()

    def discard(self, queue: QueueEngine) -> None:
        """``queue`` found every push cursor settled up to its end: drains need not look at it."""
        lock = self._lock
        lock.acquire()
        try:
            self._queues.pop(queue, None)
        finally:
            lock.release()


class Drain:
    """One call of drain or adrain, past its first run: what must be handled, and by when.

    Not thread-safe: it belongs to the call that made it.
    """

    __slots__ = ("_joins", "_progress", "_run_ready", "_targets", "_unsettled", "deadline", "seen")

    def __init__(
        self,
        run_ready: Callable[[], object],
        progress: Progress,
        targets: list[tuple[QueueEngine, int, list[Cursor] | None]],
        deadline: float | None,
        unsettled: Unsettled,
        joins: int,
    ) -> None:
        self._run_ready = run_ready
        self._progress = progress
        # Each queue, its end when the drain began, and its push cursors still unsettled at the
        # last look (None: not looked at yet), so each settled cursor is checked once.
        self._targets = targets
        # The broker's unsettled queues, and the count of joins when the targets were taken from it.
        self._unsettled = unsettled
        self._joins = joins
        self.deadline = deadline
        self.seen = 0  # the progress count at the last look

    def look(self) -> bool | None:
        """Run what a manual dispatcher has ready, then :meth:`check`."""
        self._run_ready()
        return self.check()

    def check(self) -> bool | None:
        """The rest of a look: True once everything is handled, False if the broker is closed or
        the deadline has passed, None to wait for progress after :attr:`seen` (or the deadline)
        and look again."""
        self.seen, stopped = self._progress.look()
        if stopped:
            return False  # a closed broker's push subscriptions are gone, finished or not
        if self._settled():
            return True
        if self.deadline is not None and self._progress.now() >= self.deadline:
            return False
        return None

    def _settled(self) -> bool:
        targets = self._targets
        # Any queue that joined the set since the targets were taken, read under the set's lock.
        watch = self._unsettled
        lock = watch._lock
        lock.acquire()
        try:
            joined = None if watch._joins == self._joins else (watch._joins, list(watch._queues.items()))
        finally:
            lock.release()
        if joined is not None:
            # Queues settled as the drain began that something gave work since (a redelivery
            # when an ack timeout passed, say): looked at up to their end as it was then.
            self._joins, queues = joined
            known = {queue for queue, _, _ in targets}
            targets.extend((queue, end, None) for queue, end in queues if queue not in known)
        for i, (queue, end, cursors) in enumerate(targets):
            if cursors is not None and not cursors:
                continue
            unsettled = queue.push_unsettled(end, cursors)
            targets[i] = (queue, end, unsettled)
            if unsettled:
                return False
        return True


def begin(
    run_ready: Callable[[], object],
    progress: Progress,
    unsettled: Unsettled,
    unwatched: Sequence[QueueEngine],
    timeout: float | None,
    own_callback: Callable[[], str | None],
    queues: Collection[str],
) -> Drain | None:
    """Begin one call of drain or adrain, and run what a manual dispatcher has ready.

    Notes the end of each queue that may have work left: those in ``unsettled`` and those of
    ``unwatched`` (whose engine cannot keep ``unsettled`` up to date). A queue left out is settled
    up to its end, with no push batch out; one that joins ``unsettled`` later is looked at from
    then on (see :class:`Drain`). ``queues`` names the broker's queues (is it empty?).
    Refuses a call from inside a callback of the broker's (``own_callback`` names it) while a
    push batch is out: only then can one be running. Returns None if that was all: every queue
    knew that its push cursors had handled everything, and the run delivered nothing (it ran a
    timer that fell due, say, or nothing at all). Otherwise the :class:`Drain` whose
    :meth:`~Drain.check` ends this first look.

    Raises:
        WouldDeadlock: called inside a callback of the broker's own.
    """
    # The queues in the set and the count of joins, read under the set's lock.
    lock = unsettled._lock
    lock.acquire()
    try:
        joins = unsettled._joins
        engines = list(unsettled._queues)
    finally:
        lock.release()
    if unwatched:
        engines.extend(unwatched)
    targets: list[tuple[QueueEngine, int, list[Cursor] | None]] = []
    quiet = True
    out = False
    for engine in engines:
        end, settled, batch_out = engine.drain_start()
        targets.append((engine, end, None))
        if not settled:
            quiet = False
        if batch_out:
            out = True
    label = own_callback() if out else None
    if label is not None:
        raise WouldDeadlock(
            f"drain() called inside a callback of subscription {label} would wait for that callback "
            "to return: drain from outside the broker's push callbacks"
        )
    if timeout is None:
        deadline = None
    elif timeout:
        deadline = progress.now() + capped(timeout)
    else:
        deadline = _PASSED
    delivered = run_ready()
    if quiet and not delivered and (targets or queues):
        # Settled as the drain began (the broker open: its queues close before its progress
        # stops), and nothing the run did can have undone that.
        return None
    return Drain(run_ready, progress, targets, deadline, unsettled, joins)
