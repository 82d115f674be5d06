"""Where mqlite gets the time: an injectable clock, real or manual."""

from __future__ import annotations

import threading
import time as _time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from mqlite.config import is_finite_number
from mqlite.errors import InvalidArgument

__all__ = ["Clock", "ManualClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """What the broker needs from a clock.

    ``time()`` stamps messages (seconds since the epoch). ``monotonic()`` drives ack timeouts,
    nack delays, retry backoff and ``max_age``. A *virtual* clock's time moves only when the test
    says so; the broker then never waits on real time for a due redelivery, it waits to be told
    through the listener it registered with ``add_listener``.
    """

    virtual: bool

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def add_listener(self, listener: Callable[[], None]) -> None: ...

    def remove_listener(self, listener: Callable[[], None]) -> None: ...


class SystemClock:
    """The real clock: ``time.time`` and ``time.monotonic``. Thread-safe and stateless."""

    virtual = False
    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Real time needs no listeners; the broker waits on real deadlines instead."""

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Nothing to remove; see :meth:`add_listener`."""


class ManualClock:
    """A clock that moves only when :meth:`advance` is called. Thread-safe.

    Use it in tests: ack timeouts, nack delays, retry backoff and ``max_age`` then happen exactly
    when the test advances the clock, with no sleeping. Listeners run outside the clock's lock.
    """

    virtual = True

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        if not is_finite_number(start):
            raise InvalidArgument(f"ManualClock start must be a finite number of seconds, got {start!r}")
        # _lock guards _now and _listeners.
        self._lock = threading.Lock()
        self._now = float(start)
        self._listeners: list[Callable[[], None]] = []

    def time(self) -> float:
        """The current virtual time, in seconds since the epoch."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """The same virtual time: it never goes backwards."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and let every attached broker act on what became due.

        Raises:
            InvalidArgument: ``seconds`` is not a finite number >= 0 (NaN and infinity would
                stop time for good); the clock did not move.
        """
        if not is_finite_number(seconds) or seconds < 0:
            raise InvalidArgument(f"advance() takes a finite, non-negative number of seconds, got {seconds!r}")
        with self._lock:
            self._now += seconds
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every :meth:`advance`."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
