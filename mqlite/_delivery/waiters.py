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
    """The waiters of one queue. Not thread-safe: guarded by its engine's queue scope.

    Whoever wakes a waiter removes it; a waiter that stops waiting for another reason removes
    itself. A waiter whose names are a cursor's set of a few known names is *filed* under each
    of them (``_named``, and ``_filed`` in the order they came); the rest (any event, a wildcard
    that matched many names, several cursors' sets) are *asked* at every publish. So a publish
    looks at the waiters that may want its event, not at every waiter: a thousand filtered push
    subscriptions, one of which wants the message, cost it one look, not a thousand. A cursor's
    set grows when a new event that its filter matches is published: :meth:`new_event` files
    the waiters it concerns under that name.

    The dict itself holds the asked waiters, in the order they came, and while any waiter is
    filed one stand-in (``_FILED``, which wants nothing) for them all. So ``if waiters:`` on the
    publish path costs no Python call, and an asked waiter, the one every push round of an
    unfiltered subscription registers, costs one dict entry to add and to wake. (Counting and
    listing every waiter are :meth:`count` and :meth:`registered`: ``len()`` and iteration see
    the dict.)
    """

    __slots__ = ("_filed", "_named", "_seq")

    def __init__(self) -> None:
        super().__init__()
        self._filed: dict[Waiter, None] = {}
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
        if type(names) is set and len(names) <= _INDEXED:
            keys = waiter.keys = tuple(names)
            filed = self._filed
            if not filed:
                self[_FILED] = None
            filed[waiter] = None
            named = self._named
            for name in keys:
                under = named.get(name)
                if under is None:
                    named[name] = {waiter: None}
                else:
                    under[waiter] = None
        else:
            waiter.keys = None
            self[waiter] = None
        return waiter

    def registered(self) -> list[Waiter]:
        """Every registered waiter, in the order they came."""
        asked = [waiter for waiter in self if waiter is not _FILED]
        if not self._filed:
            return asked
        return sorted([*asked, *self._filed], key=_seq_of)

    def count(self) -> int:
        """How many waiters are registered."""
        filed = len(self._filed)
        return len(self) + filed - 1 if filed else len(self)

    def discard(self, waiter: Waiter) -> None:
        """Forget ``waiter`` if it is still registered (if it was woken meanwhile, the waker removed it)."""
        if waiter.keys is None:
            self.pop(waiter, None)
        elif waiter in self._filed:
            self._unfile(waiter)
            if not self._filed:
                del self[_FILED]

    def _unfile(self, waiter: Waiter) -> None:
        """Take a filed ``waiter`` out of ``_filed`` and from under each of its names."""
        del self._filed[waiter]
        named = self._named
        for name in waiter.keys:  # type: ignore[union-attr]  # a tuple, when filed
            under = named[name]
            del under[waiter]
            if not under:
                del named[name]

    def new_event(self, name: str) -> None:
        """A new event name is known, and the cursors' sets that match it hold it now: file the
        filed waiters of those sets under it too."""
        named = self._named
        for waiter in self._filed:
            keys = waiter.keys
            if name not in keys and name in waiter.names:  # type: ignore[operator]  # a tuple and a set, when filed
                waiter.keys = (*keys, name)  # type: ignore[misc]
                under = named.get(name)
                if under is None:
                    named[name] = {waiter: None}
                else:
                    under[waiter] = None

    def wake_event(self, event: str) -> None:
        """Wake and remove every waiter that wants ``event``, in the order they came."""
        woken: list[Waiter] = []
        for waiter in self:  # the asked waiters (and _FILED, which wants nothing)
            names = waiter.names
            if names is None or event in names:
                woken.append(waiter)
        named = self._named
        under = named.get(event) if named else None
        if under is None:  # the usual case: no filed waiter wants it
            for waiter in woken:
                del self[waiter]
                waiter.wake()  # (a loop over the list: a wake that registers again changes nothing here)
            return
        for waiter in woken:
            del self[waiter]
        # Some filed waiters want it too: they join the asked in the order they came.
        filed = list(under)
        every = self._filed
        for waiter in filed:  # _unfile, inlined: a frame per waiter is 1% of a filtered drain
            del every[waiter]
            for name in waiter.keys:  # type: ignore[union-attr]  # a tuple, when filed
                others = named[name]
                del others[waiter]
                if not others:
                    del named[name]
        if not every:
            del self[_FILED]
        if woken:
            woken.extend(filed)
            woken.sort(key=_seq_of)
        else:
            woken = filed
        for waiter in woken:
            waiter.wake()

    def wake_all(self) -> None:
        """Wake and remove every waiter (something changed that any of them may want)."""
        waiters = self.registered() if self._filed else list(self)
        self.clear()
        self._filed.clear()
        self._named.clear()
        for waiter in waiters:
            waiter.wake()


_new_waiter = object.__new__


def _seq_of(waiter: Waiter) -> int:
    return waiter.seq


_FILED = Waiter((), lambda: None)
"""The stand-in a :class:`Waiters` dict holds while any waiter is filed by name: it wants no event
(``event in ()`` is false), so the publish path's loop over the asked waiters passes it by."""
