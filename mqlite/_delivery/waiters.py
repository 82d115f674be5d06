"""Blocked readers: one-shot waiters, woken only when something they may want arrives."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

__all__ = ["AnyOf", "Waiter", "Waiters"]


class Waiter:
    """One blocked reader: the event names it wants (None: any) and how to wake it.

    ``wake`` only schedules (releases a lock, resolves a future through the loop); it never runs
    user code, so it may be called under a queue lock. ``keys`` are the names :class:`Waiters`
    indexes it under (None: it is asked at every publish), ``seq`` its place in the order the
    waiters came.
    """

    __slots__ = ("keys", "names", "seq", "wake")

    def __init__(self, names: Container[str] | None, wake: Callable[[], object]) -> None:
        self.names = names
        self.wake = wake
        self.keys: tuple[str, ...] | None = None
        self.seq = 0


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


_INDEXED = 8
"""A waiter that wants at most this many known names (a set) is indexed by each of them."""


class Waiters(dict[Waiter, None]):
    """The waiters of one queue, in the order they came. Not thread-safe: guarded by its engine's
    queue scope.

    A dict, so that ``if waiters:`` on the publish path costs no Python call and a waiter leaves
    in one step. Whoever wakes a waiter removes it; a waiter that stops waiting for another
    reason removes itself. A waiter whose names are a cursor's set of a few known names is also
    filed under each of them (``_named``); the rest (any event, a wildcard that matched many
    names, several cursors' sets) are asked at every publish (``_asked``). So a publish looks at
    the waiters that may want its event, not at every waiter: a thousand filtered push
    subscriptions, one of which wants the message, cost it one look, not a thousand. A cursor's
    set grows when a new event that its filter matches is published: :meth:`new_event` files
    the waiters it concerns under that name.
    """

    __slots__ = ("_asked", "_named", "_seq")

    def __init__(self) -> None:
        super().__init__()
        self._asked: dict[Waiter, None] = {}
        self._named: dict[str, dict[Waiter, None]] = {}
        self._seq = 0

    def add(self, names: Container[str] | None, wake: Callable[[], object]) -> Waiter:
        """Register a one-shot waiter for ``names`` (None: any event), woken by calling ``wake``."""
        # Every push round registers one, so the waiter is made here without its __init__ frame.
        waiter: Waiter = _new_waiter(Waiter)
        waiter.names = names
        waiter.wake = wake
        self._seq = seq = self._seq + 1
        waiter.seq = seq
        self[waiter] = None
        if type(names) is set and len(names) <= _INDEXED:
            keys = waiter.keys = tuple(names)
            named = self._named
            for name in keys:
                filed = named.get(name)
                if filed is None:
                    named[name] = {waiter: None}
                else:
                    filed[waiter] = None
        else:
            waiter.keys = None
            self._asked[waiter] = None
        return waiter

    def discard(self, waiter: Waiter) -> None:
        """Forget ``waiter`` if it is still registered (if it was woken meanwhile, the waker removed it)."""
        if waiter in self:
            self._remove(waiter)

    def _remove(self, waiter: Waiter) -> None:
        del self[waiter]
        keys = waiter.keys
        if keys is None:
            del self._asked[waiter]
            return
        named = self._named
        for name in keys:
            filed = named[name]
            del filed[waiter]
            if not filed:
                del named[name]

    def new_event(self, name: str) -> None:
        """A new event name is known, and the cursors' sets that match it hold it now: file the
        indexed waiters of those sets under it too."""
        named = self._named
        for waiter in self:
            keys = waiter.keys
            if keys is not None and name not in keys and name in waiter.names:  # type: ignore[operator]  # a set, when keyed
                waiter.keys = (*keys, name)
                filed = named.get(name)
                if filed is None:
                    named[name] = {waiter: None}
                else:
                    filed[waiter] = None

    def wake_event(self, event: str) -> None:
        """Wake and remove every waiter that wants ``event``, in the order they came."""
        named = self._named
        filed = named.get(event) if named else None
        asked = self._asked
        woken: list[Waiter] = []
        for waiter in asked:
            names = waiter.names
            if names is None or event in names:
                woken.append(waiter)
        if filed is None:
            # The usual case, and every publish pays for it: only waiters that were asked.
            for waiter in woken:
                del self[waiter]
                del asked[waiter]
        else:
            if woken:
                woken.extend(filed)
                woken.sort(key=_seq_of)
            else:
                woken = list(filed)
            for waiter in woken:
                del self[waiter]
                keys = waiter.keys
                if keys is None:
                    del asked[waiter]
                else:
                    for name in keys:
                        others = named[name]
                        del others[waiter]
                        if not others:
                            del named[name]
        for waiter in woken:
            waiter.wake()

    def wake_all(self) -> None:
        """Wake and remove every waiter (something changed that any of them may want)."""
        waiters = list(self)
        self.clear()
        self._asked.clear()
        self._named.clear()
        for waiter in waiters:
            waiter.wake()


_new_waiter = object.__new__


def _seq_of(waiter: Waiter) -> int:
    return waiter.seq
