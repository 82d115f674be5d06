"""Virtual time for tests: a clock that moves on ``advance()``, or by itself once everything waits.

:class:`VirtualClock` is a :class:`mqlite.Clock`. With ``autojump=False`` it is a
:class:`~mqlite.ManualClock` with more ways to move (``advance_to``, ``jump_to_next``). With
``autojump=True`` it moves by itself: mqlite owns every place where a broker waits (``get``,
``poll``, iteration, ``aget``, ``apoll``, ``async for``, push workers, ``drain``, ``adrain``), and
each of those waits tells the clock when it blocks, until when, and when it wakes. The clock jumps
to the next deadline once nothing can make progress.

The autojump rule. The clock jumps when all of these have held for ``autojump_threshold`` real
seconds in a row:

1. at least one mqlite wait (or a :meth:`VirtualClock.loop_factory` event loop) is blocked on
   this clock, and every wait that was woken has run again;
2. no thread is inside :meth:`VirtualClock.busy`;
3. no attached broker has a push batch in flight (a callback running, on any dispatcher);
4. nothing touched the clock: no ``time()`` or ``monotonic()`` read (every publish, take and
   settle with a timer reads it), no wake-up of a blocked wait by a publish, ack or close, no
   ``advance``.

Rule 4 stands for the threads and tasks mqlite cannot see: a thread that is working, not
waiting in mqlite, usually touches the broker within a few milliseconds. One that computes for
longer without touching it (or a task awaiting a real ``asyncio.sleep`` under a plain
``asyncio.run``) must say so with ``with clock.busy():``, or time may jump under it.

The jump goes to the earliest of: the deadlines of the blocked waits (their ``timeout=``, counted
in clock seconds), the timers of every attached broker (ack timeouts, nack delays, retry
backoff, ``max_age``), and the next timer of a blocked :meth:`~VirtualClock.loop_factory` loop.
Every broker is then told, as on ``advance()``, so its waiters look again. If nothing at all is
due, nothing can ever happen: with ``limit=`` every blocked wait raises
:class:`VirtualTimeExceeded`, without it they stay blocked (a deadlock, as in real time). A jump
that would go past ``limit`` raises :class:`VirtualTimeExceeded` from every blocked wait instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from mqlite.config import is_finite_number
from mqlite.errors import InvalidArgument, MqliteError

__all__ = ["VirtualClock", "VirtualEventLoop", "VirtualTimeExceeded"]

_T = TypeVar("_T")

_ACTIVE, _BLOCKED, _CLOSED = 0, 1, 2


class VirtualTimeExceeded(MqliteError, TimeoutError):
    """A wait on a :class:`VirtualClock` would have gone past its ``limit``, or could never end.

    Raised from the blocked call (``get``, ``drain``, ``aget``, an event loop of
    :meth:`VirtualClock.loop_factory`...) instead of letting the test hang.
    """


class _Participant:
    """One wait on the clock (or one running event loop): active, or blocked until a deadline.

    Made and used by one thread or task; its state is guarded by the clock's condition, so the
    clock's jumper and any waker may touch it from other threads.
    """

    __slots__ = ("_clock", "_fired", "_gen", "_wake", "deadline", "exceeded", "state")

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self.state = _ACTIVE
        self.deadline: float | None = None
        self.exceeded = False
        self._gen = 0
        self._fired = True
        self._wake: Callable[[], object] | None = None

    def now(self) -> float:
        """The clock's time, read without counting as activity (the waits' own bookkeeping)."""
        return self._clock._now

    def arm(self, wake: Callable[[], object]) -> Callable[[], None]:
        """A wake function for one round of the wait: it calls ``wake`` at most once.

        It may be called from any thread, under a queue lock: the clock's lock comes after every
        queue lock and nothing runs under it but bookkeeping.
        """
        with self._clock._cond:
            self._gen += 1
            gen = self._gen
            self._fired = False
            self._wake = wake

        def guarded() -> None:
            raw = self._fire(gen)
            if raw is not None:
                raw()

        return guarded

    def _fire(self, gen: int) -> Callable[[], object] | None:
        clock = self._clock
        with clock._cond:
            clock._epoch += 1  # someone else woke it: activity
            return self._fire_locked(gen)

    def _fire_locked(self, gen: int) -> Callable[[], object] | None:
        if gen != self._gen or self._fired:
            return None
        self._fired = True
        if self.state == _BLOCKED:
            self._clock._unblock_locked(self)
        return self._wake

    def block(self, deadline: float | None) -> bool:
        """Tell the clock this wait blocks until woken or ``deadline``; False if already woken."""
        clock = self._clock
        with clock._cond:
            if self._fired or self.state != _ACTIVE:
                return False
            self.deadline = deadline
            clock._block_locked(self)
            return True

    def resume(self) -> None:
        """The wait runs again (woken, or its select returned).

        Raises:
            VirtualTimeExceeded: the clock gave up on this wait (its ``limit``).
        """
        clock = self._clock
        with clock._cond:
            self._fired = True
            if self.state == _BLOCKED:
                clock._epoch += 1
                clock._unblock_locked(self)
            if self.exceeded:
                self.exceeded = False
                raise clock._exceeded_error()

    def close(self) -> None:
        """The wait is over."""
        clock = self._clock
        with clock._cond:
            if self.state == _BLOCKED:
                clock._unblock_locked(self)
            if self.state == _ACTIVE:
                clock._active -= 1
                self.state = _CLOSED
                clock._cond.notify_all()


class VirtualClock:
    """A virtual clock for tests, moved by :meth:`advance` or, with ``autojump=True``, by itself.

    Thread-safe. ``time()`` and ``monotonic()`` both return the virtual time, which starts at
    ``start`` (seconds since the epoch) and never goes backwards. Listeners (attached brokers)
    run outside the clock's lock.

    Args:
        start: The first time, in seconds since the epoch.
        autojump: Jump to the next deadline by itself once nothing can make progress (the rule
            is in the module docstring). Call timeouts (``get(timeout=30)``, ``drain(timeout=5)``)
            then count in clock seconds. Without it the clock moves only on :meth:`advance`, and
            call timeouts count in real seconds, as with :class:`~mqlite.ManualClock`.
        autojump_threshold: Real seconds that everything must stay idle before a jump.
        limit: Virtual seconds after ``start`` beyond which no wait may go: a blocked wait that
            would cross it raises :class:`VirtualTimeExceeded`. None: no limit.
    """

    virtual = True

    def __init__(
        self,
        start: float = 1_700_000_000.0,
        *,
        autojump: bool = False,
        autojump_threshold: float = 0.01,
        limit: float | None = None,
    ) -> None:
        if not is_finite_number(start):
            raise InvalidArgument(f"VirtualClock start must be a finite number of seconds, got {start!r}")
        if not isinstance(autojump, bool):
            raise InvalidArgument(f"VirtualClock autojump must be True or False, got {autojump!r}")
        if not is_finite_number(autojump_threshold) or autojump_threshold < 0:
            raise InvalidArgument(
                f"VirtualClock autojump_threshold must be a finite number of real seconds >= 0, "
                f"got {autojump_threshold!r}"
            )
        if limit is not None and (not is_finite_number(limit) or limit < 0):
            raise InvalidArgument(f"VirtualClock limit must be None or a finite number >= 0, got {limit!r}")
        # _cond guards every attribute below but _now and _epoch, which are also read and bumped
        # without it (a float read is atomic; see time()).
        self._cond = threading.Condition(threading.Lock())
        self._start = float(start)
        self._now = float(start)
        self._autojump = autojump
        self._threshold = float(autojump_threshold)
        self._limit = None if limit is None else float(limit)
        self._listeners: list[Callable[[], None]] = []
        self._blocked: set[_Participant] = set()
        self._active = 0  # participants registered and not blocked
        self._busy = 0  # threads inside busy()
        self._epoch = 0  # bumped by anything that shows activity (rule 4)
        self._jumper: threading.Thread | None = None
        self.jumps = 0
        """How many times the clock jumped by itself."""

    # -- reading -----------------------------------------------------------------------------

    def time(self) -> float:
        """The current virtual time, in seconds since the epoch."""
        # Counts as activity for autojump. Lock-free: a lost increment still changes the epoch.
        self._epoch += 1
        return self._now

    def monotonic(self) -> float:
        """The same virtual time: it never goes backwards."""
        self._epoch += 1
        return self._now

    @property
    def autojump(self) -> bool:
        """Whether the clock jumps by itself; mqlite's waits then count their timeouts on it."""
        return self._autojump

    @property
    def elapsed(self) -> float:
        """Virtual seconds since ``start``."""
        return self._now - self._start

    @property
    def limit(self) -> float | None:
        """The ``limit`` given, in virtual seconds after ``start``."""
        return self._limit

    # -- moving ------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move time forward and let every attached broker act on what became due.

        Raises:
            InvalidArgument: ``seconds`` is not a finite number >= 0; the clock did not move.
        """
        if not is_finite_number(seconds) or seconds < 0:
            raise InvalidArgument(f"advance() takes a finite, non-negative number of seconds, got {seconds!r}")
        with self._cond:
            target = self._now + seconds
        self._move_to(target)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (clock seconds); a time already passed changes nothing.

        Raises:
            InvalidArgument: ``when`` is not a finite number.
        """
        if not is_finite_number(when):
            raise InvalidArgument(f"advance_to() takes a finite number of seconds, got {when!r}")
        self._move_to(float(when))

    def next_deadline(self) -> float | None:
        """The earliest time after now at which something is due, or None.

        It looks at the blocked waits' timeouts, the blocked loops' timers and every attached
        broker's timers (ack timeouts, nack delays, retry backoff, ``max_age``).
        """
        sources = self._sources()
        reports = [source() for source in sources]
        with self._cond:
            return self._target_locked(reports)

    def jump_to_next(self) -> float | None:
        """Advance to :meth:`next_deadline`; returns the new time, or None if nothing is due."""
        target = self.next_deadline()
        if target is not None:
            self._move_to(target)
        return target

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Keep the clock from jumping while the block runs: work mqlite cannot see.

        Use it around what a test thread does between broker calls when it may take longer than
        ``autojump_threshold``, such as a slow computation or a real ``asyncio.sleep``.
        """
        with self._cond:
            self._busy += 1
            self._epoch += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._epoch += 1
                self._cond.notify_all()

    def _move_to(self, target: float) -> None:
        with self._cond:
            if target > self._now:
                self._now = target
            self._epoch += 1
            wakes = self._due_wakes_locked()
            listeners = list(self._listeners)
        for wake in wakes:
            wake()
        for listener in listeners:
            listener()

    # -- listeners: the attached brokers -----------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every move of the clock.

        A listener that is a bound method of an object with ``_idle_report()`` (a
        :class:`~mqlite.Broker`) also reports that object's timers and push batches in flight.
        """
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _sources(self) -> list[Callable[[], tuple[bool, float | None]]]:
        with self._cond:
            listeners = list(self._listeners)
        sources = []
        for listener in listeners:
            report = getattr(getattr(listener, "__self__", None), "_idle_report", None)
            if report is not None:
                sources.append(report)
        return sources

    # -- participants: mqlite's waits --------------------------------------------------------

    def _participant(self) -> _Participant:
        """Register a wait (or a running loop), active until it blocks."""
        with self._cond:
            self._active += 1
            return _Participant(self)

    def _block_locked(self, participant: _Participant) -> None:
        participant.state = _BLOCKED
        self._active -= 1
        self._blocked.add(participant)
        if self._autojump and self._jumper is None:
            self._jumper = threading.Thread(target=self._jump_when_idle, name="mqlite-virtual-clock", daemon=True)
            self._jumper.start()
        self._cond.notify_all()

    def _unblock_locked(self, participant: _Participant) -> None:
        participant.state = _ACTIVE
        self._active += 1
        self._blocked.discard(participant)
        self._cond.notify_all()

    def _due_wakes_locked(self) -> list[Callable[[], object]]:
        """Wake every blocked wait whose deadline has come."""
        now = self._now
        wakes = []
        for participant in [p for p in self._blocked if p.deadline is not None and p.deadline <= now]:
            wake = participant._fire_locked(participant._gen)
            if wake is not None:
                wakes.append(wake)
        return wakes

    def _target_locked(self, reports: list[tuple[bool, float | None]]) -> float | None:
        now = self._now
        target: float | None = None
        candidates = [p.deadline for p in self._blocked]
        candidates.extend(due for _, due in reports)
        for when in candidates:
            if when is not None and when > now and (target is None or when < target):
                target = when
        return target

    def _idle_locked(self) -> bool:
        return bool(self._blocked) and self._active == 0 and self._busy == 0

    def _exceeded_error(self) -> VirtualTimeExceeded:
        return VirtualTimeExceeded(
            f"a wait on the virtual clock would go past its limit of {self._limit:g} s after start "
            f"(or can never end: nothing is due); it is now {self.elapsed:g} s after start"
        )

    def _jump_when_idle(self) -> None:
        """The jumper thread: runs while waits are registered, jumps by the autojump rule."""
        cond = self._cond
        with cond:
            while True:
                if not self._blocked and not self._active:
                    self._jumper = None
                    return
                if not self._idle_locked():
                    cond.wait()
                    continue
                epoch = self._epoch
                cond.wait(self._threshold)
                if epoch != self._epoch or not self._idle_locked():
                    continue
                listeners = list(self._listeners)
                cond.release()
                try:
                    reports = [source() for source in self._sources()]
                finally:
                    cond.acquire()
                if epoch != self._epoch or not self._idle_locked():
                    continue
                if any(inflight for inflight, _ in reports):
                    continue  # a callback runs: look again after another quiet threshold
                jump = self._jump_locked(self._target_locked(reports))
                if jump is None:
                    cond.wait()  # nothing is due and no limit: wait for someone to act
                    continue
                wakes, moved = jump
                cond.release()
                try:
                    for wake in wakes:
                        wake()
                    for listener in listeners if moved else ():
                        listener()
                finally:
                    cond.acquire()

    def _jump_locked(self, target: float | None) -> tuple[list[Callable[[], object]], bool] | None:
        """Jump to ``target``: the wakes to call and whether time moved (then brokers are told).

        Past the limit, or with nothing due under a limit, every blocked wait is woken to raise
        VirtualTimeExceeded and time stays. None: nothing is due and there is no limit.
        """
        limit_at = None if self._limit is None else self._start + self._limit
        if target is not None and (limit_at is None or target <= limit_at):
            self._now = target
            self._epoch += 1
            self.jumps += 1
            return self._due_wakes_locked(), True
        if limit_at is None:
            return None
        wakes = []
        for participant in list(self._blocked):
            participant.exceeded = True
            wake = participant._fire_locked(participant._gen)
            if wake is not None:
                wakes.append(wake)
        return wakes, False

    # -- asyncio -----------------------------------------------------------------------------

    def loop_factory(self) -> VirtualEventLoop:
        """A new event loop whose time is this clock: ``asyncio.sleep`` and timers follow it.

        Use ``asyncio.run(main(), loop_factory=clock.loop_factory)`` (Python 3.12+), or
        ``asyncio.Runner(loop_factory=clock.loop_factory)``, or :meth:`run`. When the loop has
        nothing ready it counts as a blocked wait until its next timer, so with ``autojump=True``
        it jumps; with ``autojump=False`` its timers fire when :meth:`advance` reaches them.
        """
        return VirtualEventLoop(self)

    def run(self, main: Coroutine[Any, Any, _T]) -> _T:
        """Run ``main`` to completion in a new :meth:`loop_factory` loop, as ``asyncio.run`` does."""
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            return runner.run(main)

    def __repr__(self) -> str:
        mode = "autojump" if self._autojump else "manual"
        return f"<mqlite.testing.VirtualClock {mode} elapsed={self.elapsed:g}s>"


class _VirtualSelector(selectors.DefaultSelector):
    """The loop's selector: a select that would wait counts as a blocked wait on the clock."""

    clock: VirtualClock
    loop: VirtualEventLoop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(0)
        participant = self.loop._participant
        if participant is None:  # not inside run_forever: wait as a plain loop would
            return super().select(timeout)
        clock = self.clock
        deadline = None if timeout is None else clock._now + timeout
        participant.arm(self.loop._wake_up)
        if not participant.block(deadline):
            return super().select(0)
        try:
            events: list[tuple[selectors.SelectorKey, int]] = super().select(None)
        finally:
            participant.resume()
        return events


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is a :class:`VirtualClock`'s; made by :meth:`VirtualClock.loop_factory`.

    Thread-safe as any asyncio loop: use it from its own thread, wake it with
    ``call_soon_threadsafe``.
    """

    def __init__(self, clock: VirtualClock) -> None:
        selector = _VirtualSelector()
        selector.clock = clock
        selector.loop = self
        self._virtual_clock = clock
        self._participant: _Participant | None = None
        super().__init__(selector)
        # Virtual times are large (1.7e9 by default), where a float's step is about 2.4e-7 s: a
        # resolution below it would leave a timer due "now" never ready, and the loop spinning.
        self._clock_resolution: float = max(self._clock_resolution, 1e-6)

    def time(self) -> float:
        """The clock's virtual time (read without counting as activity)."""
        return self._virtual_clock._now

    def _wake_up(self) -> None:
        try:
            self.call_soon_threadsafe(_nothing)
        except RuntimeError:
            pass  # closed: nothing to wake

    def run_forever(self) -> None:
        """Run as ``asyncio`` does, counting as a participant of the clock meanwhile."""
        self._participant = self._virtual_clock._participant()
        try:
            super().run_forever()
        finally:
            participant, self._participant = self._participant, None
            participant.close()


def _nothing() -> None:
    """A callback that only wakes the loop."""
