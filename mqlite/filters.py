"""Event filters: exact names and shell-style wildcards."""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import translate

from mqlite.errors import InvalidName

__all__ = ["EventFilter", "check_event_name", "check_name", "event_names"]

_WILDCARD_CHARS = frozenset("*?[")


def _check_storable(what: str, name: str) -> None:
    """Refuse a name that UTF-8 cannot encode (a lone surrogate): a file could not store it.

    Memory refuses it too, so that a name works the same on every engine. ``isascii`` costs
    nothing for the usual ASCII name; only other names are encoded.
    """
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidName(
                f"{what} {name!r} has a character UTF-8 cannot encode ({error.reason} at position "
                f"{error.start}); names must be valid Unicode text"
            ) from None


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a usable queue or subscription name, else raise InvalidName."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise InvalidName(f"{kind} name must be a non-empty str without surrounding spaces, got {name!r}")
    _check_storable(f"{kind} name", name)
    return name


def check_event_name(event: object) -> str:
    """Return ``event`` if it can be published: a non-empty str with no wildcard characters."""
    if not isinstance(event, str) or not event:
        raise InvalidName(f"event must be a non-empty str, got {event!r}")
    if _WILDCARD_CHARS.intersection(event):
        raise InvalidName(f"event {event!r} contains a wildcard character (* ? [); those are only for filters")
    _check_storable("event", event)
    return event


def event_names(events: object, *, verb: str = "events") -> tuple[str, ...]:
    """``events`` (a str, or any iterable of str, generators included) as a tuple, each checked.

    It is read once, here, so that a generator is not used up before it is applied.

    Raises:
        InvalidName: ``events`` is not a str or an iterable, is empty, or holds something that
            is not a non-empty str (``verb`` names the argument in the message).
    """
    if isinstance(events, str):
        items: tuple[object, ...] = (events,)
    else:
        try:
            items = tuple(events)  # type: ignore[arg-type]  # any iterable; TypeError below if not
        except TypeError:
            raise InvalidName(
                f"{verb} must be a str or an iterable of str, got {type(events).__name__}: {events!r}"
            ) from None
    if not items:
        raise InvalidName(f"{verb} must name at least one event; pass None to receive every event")
    for item in items:
        if not isinstance(item, str) or not item:
            raise InvalidName(f"each event filter must be a non-empty str, got {item!r} in {verb}")
        _check_storable("event filter", item)
    return items  # type: ignore[return-value]  # every item was just checked to be a str


class EventFilter:
    """Which events a subscription wants: every event, or a set of names and wildcard patterns.

    Patterns use shell-style wildcards, matched case-sensitively against the whole event name:
    ``*`` matches any run of characters, ``?`` one character, ``[abc]`` one of a set. Immutable,
    so thread-safe.
    """

    __slots__ = ("_exact", "_patterns", "_regex", "match_all")

    def __init__(self, events: str | Iterable[str] | None) -> None:
        if events is None:
            self._exact: frozenset[str] = frozenset()
            self._patterns: tuple[str, ...] = ()
            self.match_all = True
            self._regex: re.Pattern[str] | None = None
            return
        items = event_names(events)
        self._exact = frozenset(i for i in items if not _WILDCARD_CHARS.intersection(i))
        self._patterns = tuple(sorted({i for i in items if _WILDCARD_CHARS.intersection(i)}))
        self.match_all = "*" in self._patterns
        self._regex = re.compile("|".join(translate(p) for p in self._patterns)) if self._patterns else None

    @property
    def spec(self) -> tuple[str, ...] | None:
        """The filter as given: None for every event, else the sorted names and patterns."""
        if self.match_all:
            return None
        return tuple(sorted(self._exact)) + self._patterns

    def matches(self, event: str) -> bool:
        """Whether ``event`` passes this filter."""
        if self.match_all or event in self._exact:
            return True
        return self._regex is not None and self._regex.match(event) is not None

    def union(self, events: str | Iterable[str]) -> EventFilter:
        """This filter widened by ``events`` (for ``Subscription.join``)."""
        added = event_names(events, verb="join() events")
        if self.match_all:
            return self
        return EventFilter([*self._exact, *self._patterns, *added])

    def without(self, events: str | Iterable[str]) -> EventFilter:
        """This filter with the exact names or patterns in ``events`` removed (for ``leave``)."""
        removed = set(event_names(events, verb="leave() events"))
        if self.match_all:
            raise InvalidName(
                "cannot leave an event on a subscription that receives every event; "
                "subscribe with an explicit events= list instead"
            )
        unknown = removed - self._exact - set(self._patterns)
        if unknown:
            raise InvalidName(f"not in this subscription's filter: {sorted(unknown)!r}")
        left = [*(self._exact - removed), *(p for p in self._patterns if p not in removed)]
        if not left:
            raise InvalidName("leave() would remove every event from the filter; close the subscription instead")
        return EventFilter(left)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventFilter):
            return NotImplemented
        return self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"EventFilter({self.spec!r})"
