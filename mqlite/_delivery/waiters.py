"""Blocked readers: one-shot waiters, woken only when something they may want arrives."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

__all__ = ["AnyOf", "Waiter", "Waiters"]


class Waiter:
    """One blocked reader: the event names it wants (None: any) and how to wake it.

    ``wake`` only schedules (releases a lock, resolves a future through the loop); it never runs
    user code, so it may be called under a queue lock.
    """

    __slots__ = ("names", "wake")

    def __init__(self, names: Container[str] | None, wake: Callable[[], object]) -> None:
        self.names = names
        self.wake = wake


class AnyOf:
    """The event names that any of several cursors wants, for one waiter that wakes for them all.

    Holds their own name sets, not a copy: a set grows when a new event that its cursor's filter
    matches is published. Not thread-safe: read under the queue's scope, as the sets are.
    """

    __slots__ = ("_sets",)

    def __init__(self, sets: Iterable[set[str]]) -> None:
        self._sets = tuple(sets)

    def __contains__(self, event: object) -> bool:
        return any(event in names for names in self._sets)


class Waiters(list[Waiter]):
    """The waiters of one queue. Not thread-safe: guarded by its engine's queue scope.

    A list, so that ``if waiters:`` on the publish path costs no Python call. Whoever wakes a
    waiter removes it; a waiter that stops waiting for another reason removes itself.
    """

    def add(self, names: Container[str] | None, wake: Callable[[], object]) -> Waiter:
        """Register a one-shot waiter."""
        waiter = Waiter(names, wake)
        self.append(waiter)
        return waiter

    def discard(self, waiter: Waiter) -> None:
        """Forget ``waiter`` if it is still registered."""
        try:
            self.remove(waiter)
        except ValueError:
            pass  # woken meanwhile: the waker removed it

    def wake_event(self, event: str) -> None:
        """Wake and remove every waiter that wants ``event``."""
        keep = []
        for waiter in self:
            names = waiter.names
            if names is None or event in names:
                waiter.wake()
            else:
                keep.append(waiter)
        self[:] = keep

    def wake_all(self) -> None:
        """Wake and remove every waiter (something changed that any of them may want)."""
        waiters = self[:]
        self.clear()
        for waiter in waiters:
            waiter.wake()
