"""Run a broker until nothing is left to deliver: push callbacks, and the timers that retry them."""

from __future__ import annotations

import threading
import time

import attrs

import mqlite
from mqlite import dispatch
from mqlite.engine.base import QueueEngine
from mqlite.errors import MqliteError

__all__ = ["CallbackErrors", "IdleReport", "run_until_idle"]


@attrs.frozen
class IdleReport:
    """What :func:`run_until_idle` did.

    Attributes:
        idle: True once nothing was left to deliver; False if ``max_virtual`` or ``max_steps``
            stopped it first.
        callbacks: Messages handed to push callbacks during the run.
        errors: ``(message, error)`` for every callback that raised, in order.
        timers: How many times the clock was advanced to a due timer.
        advanced: Virtual seconds the clock moved during the run (by this function or others).
    """

    idle: bool
    callbacks: int
    errors: tuple[tuple[mqlite.Message, Exception], ...]
    timers: int
    advanced: float

    def __str__(self) -> str:
        state = "idle" if self.idle else "stopped before idle"
        return (
            f"{state}: {self.callbacks} callbacks ({len(self.errors)} raised), "
            f"{self.timers} timers fired, {self.advanced:g} virtual seconds"
        )


class CallbackErrors(MqliteError, AssertionError):
    """Push callbacks raised during :func:`run_until_idle` with ``raise_errors=True``.

    ``errors`` holds each ``(message, error)``; the first error is also the ``__cause__``.
    """

    def __init__(self, report: IdleReport) -> None:
        self.report = report
        self.errors = report.errors
        lines = [f"{len(report.errors)} push callback(s) raised; {report}"]
        lines += [f"  {m.queue}@{m.offset} {m.event!r}: {e!r}" for m, e in report.errors[:20]]
        super().__init__("\n".join(lines))


def run_until_idle(
    broker: mqlite.Broker,
    *,
    max_virtual: float | None = None,
    max_steps: int = 10_000,
    real_timeout: float = 10.0,
    raise_errors: bool = False,
) -> IdleReport:
    """Run push callbacks and advance the clock to each due push timer, until nothing is left.

    Each round drains (with a :class:`~mqlite.ManualDispatcher` the callbacks run here, on the
    calling thread). When every push subscription has handled everything, and holds nothing that
    a timer delivers again (an unacked message of ``ack="manual"`` waiting for its ack timeout),
    it returns. Otherwise it advances the broker's virtual clock (a :class:`~mqlite.ManualClock` or a
    :class:`~mqlite.testing.VirtualClock`) to the next timer of a push subscription (a retry
    backoff, a nack delay, an ack timeout) and goes on. Timers of pull subscriptions do not move
    it: nobody is there to read what they make due.

    Args:
        broker: A broker whose clock is virtual.
        max_virtual: Stop (``idle=False``) rather than move the clock past this many virtual
            seconds from the start of the call.
        max_steps: Stop (``idle=False``) after advancing to this many timers.
        real_timeout: Real seconds the whole run may take (for push threads that never finish).
        raise_errors: Raise :class:`CallbackErrors` at the end if any callback raised.

    Raises:
        InvalidArgument: the broker's clock is not virtual.
        TimeoutError: ``real_timeout`` passed first.
        CallbackErrors: with ``raise_errors=True``, callbacks raised.
    """
    clock = broker._clock
    if not clock.virtual or not hasattr(clock, "advance"):
        raise mqlite.InvalidArgument(
            f"run_until_idle needs a broker with a virtual clock (ManualClock or VirtualClock), got {clock!r}"
        )
    give_up = time.monotonic() + real_timeout
    manual = isinstance(broker._dispatcher, mqlite.ManualDispatcher)
    started = clock.monotonic()
    before = _delivered(broker)
    timers = 0
    idle = False
    with _collect_errors(broker) as errors:
        while time.monotonic() < give_up:
            drained = broker.drain(timeout=0)
            inflight, due = broker._idle_report(push_only=True)
            now = clock.monotonic()
            if drained:
                if due is None or due <= now:
                    idle = True
                    break
                # Every callback returned, but a push subscription still holds messages that a
                # timer delivers again (an ack timeout): run on to it.
                if timers >= max_steps or (max_virtual is not None and due - started > max_virtual):
                    break
                clock.advance(due - now)
                timers += 1
                continue
            if inflight or due is None or due <= now:
                if manual and not inflight:
                    break  # nothing runs and no timer will: what is left cannot be delivered
                # Push threads at work: wait for their progress, not for time.
                _pause(min(0.001, max(give_up - time.monotonic(), 0.0)))
                continue
            if timers >= max_steps or (max_virtual is not None and due - started > max_virtual):
                break
            clock.advance(due - now)
            timers += 1
        else:
            raise TimeoutError(f"run_until_idle: push callbacks were still busy after {real_timeout:g} real seconds")
    report = IdleReport(
        idle=idle,
        callbacks=_delivered(broker) - before,
        errors=tuple(errors),
        timers=timers,
        advanced=clock.monotonic() - started,
    )
    if raise_errors and report.errors:
        raise CallbackErrors(report) from report.errors[0][1]
    return report


def _delivered(broker: mqlite.Broker) -> int:
    # What push workers report as they settle their batches: a count kept as they go, so that
    # a run's cost follows what it delivered, not how many subscriptions the broker has.
    return broker._progress.handed_so_far()


def _pause(seconds: float) -> None:
    threading.Event().wait(seconds)  # push threads are working; run_until_idle looks again soon


class _collect_errors:  # noqa: N801  # used as a context manager, like contextlib's
    """Collect (message, error) of the callbacks of ``broker`` that raise, while inside."""

    def __init__(self, broker: mqlite.Broker) -> None:
        self._broker = broker
        self._errors: list[tuple[mqlite.Message, Exception]] = []

    def _observe(self, queue: QueueEngine, message: mqlite.Message, error: Exception) -> None:
        if self._broker._engines.get(message.queue) is queue:  # one of this broker's queues
            self._errors.append((message, error))

    def __enter__(self) -> list[tuple[mqlite.Message, Exception]]:
        # Copy on write: workers iterate the list without a lock.
        dispatch.FAILURE_OBSERVERS = [*dispatch.FAILURE_OBSERVERS, self._observe]
        return self._errors

    def __exit__(self, *exc_info: object) -> None:
        dispatch.FAILURE_OBSERVERS = [o for o in dispatch.FAILURE_OBSERVERS if o != self._observe]
