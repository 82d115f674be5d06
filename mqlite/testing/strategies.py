"""Hypothesis strategies for mqlite's inputs: event names, filters, payloads, messages and more.

Every strategy draws values that mqlite accepts on every engine, in memory and on a file, so a
property test spends its examples on behaviour rather than on refused input:

- :func:`event_names`: names that publish (non-empty, no ``*``, ``?`` or ``[``, valid Unicode);
- :func:`event_filters`: ``(filter, names)`` pairs where the filter matches every name;
- :func:`payloads`: JSON values that read back equal from a file broker;
- :func:`messages`: drafts for ``publish(**draft)`` and ``publish_many``;
- :func:`subscription_specs`: keyword arguments for ``Broker.subscribe``;
- :func:`operations`: a program of broker operations, as data;
- :func:`fault_plans`: keyword arguments for ``mqlite.testing.Faults``.

This module imports hypothesis; ``import mqlite.testing`` does not import it.
"""

from __future__ import annotations

import string
from typing import Any

import hypothesis.strategies as st
from hypothesis.strategies import SearchStrategy

import mqlite
from mqlite.filters import EventFilter

__all__ = [
    "FAULT_KINDS",
    "event_filters",
    "event_names",
    "fault_plans",
    "messages",
    "operations",
    "payloads",
    "subscription_specs",
]

FAULT_KINDS = ("duplicate", "delay", "drop_ack", "crash", "restart")
"""The rate keywords of ``Faults``, in the order the issue lists them."""

# Text a file can store: every code point except the lone surrogates UTF-8 cannot encode.
_TEXT_CHARACTERS = st.characters(codec="utf-8")
_EVENT_CHARACTERS = st.characters(codec="utf-8", exclude_characters="*?[")
_WORD = st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=8)
# Wildcard classes are built from these only, so that no ``!``, ``-`` or ``]`` changes their meaning.
_CLASS_CHARACTERS = frozenset(string.ascii_letters + string.digits)


def event_names(*, max_size: int = 20) -> SearchStrategy[str]:
    """Event names that ``publish`` accepts on every engine.

    Mostly names like ``"order.created"``; sometimes any Unicode text without wildcard
    characters or lone surrogates (spaces, control characters and NUL included).

    Args:
        max_size: the longest name drawn, in characters (at least 1).
    """
    if max_size < 1:
        raise mqlite.InvalidArgument(f"event_names needs max_size >= 1, got {max_size!r}")
    dotted = st.lists(_WORD, min_size=1, max_size=3).map(".".join).filter(lambda n: len(n) <= max_size)
    anything = st.text(_EVENT_CHARACTERS, min_size=1, max_size=max_size)
    return st.one_of(dotted, dotted, anything)


@st.composite
def _pattern_for(draw: st.DrawFn, name: str) -> str:
    """A wildcard pattern that matches ``name``: a ``?``, a ``*`` or a character class in it."""
    kind = draw(st.sampled_from(("?", "*", "class", "prefix")))
    at = draw(st.integers(0, len(name) - 1))
    if kind == "?":
        return name[:at] + "?" + name[at + 1 :]
    if kind == "*":
        end = draw(st.integers(at, len(name)))
        return name[:at] + "*" + name[end:]
    if kind == "prefix":
        return name[:at] + "*"
    if name[at] in _CLASS_CHARACTERS:
        others = draw(st.sets(st.sampled_from(sorted(_CLASS_CHARACTERS - {name[at]})), max_size=3))
        if draw(st.booleans()):
            members = "".join(sorted({name[at], *others}))
            return f"{name[:at]}[{members}]{name[at + 1 :]}"
        if others:  # a negated class of characters other than this one
            return f"{name[:at]}[!{''.join(sorted(others))}]{name[at + 1 :]}"
    return name[:at] + "?" + name[at + 1 :]


@st.composite
def event_filters(
    draw: st.DrawFn, names: SearchStrategy[str] | None = None, *, max_names: int = 5
) -> tuple[str | list[str] | None, list[str]]:
    """``(filter, names)``: an ``events=`` filter and event names it matches, at least one.

    The filter is ``None``, ``"*"``, one name or pattern, or a list of several; patterns use
    ``?``, ``*``, ``[abc]`` and ``[!abc]``. Each name is checked against the filter with
    :class:`mqlite.filters.EventFilter`, so every name returned is matched.

    Args:
        names: the strategy for event names; default :func:`event_names`.
        max_names: the most names drawn.
    """
    drawn = draw(st.lists(names if names is not None else event_names(), min_size=1, max_size=max_names))
    shape = draw(st.sampled_from(("all", "one", "one", "several", "several")))
    filter_: str | list[str] | None
    if shape == "all":
        filter_ = draw(st.sampled_from([None, "*"]))
    else:
        covered = drawn[:1] if shape == "one" else drawn
        entries = [draw(st.one_of(st.just(n), _pattern_for(n))) for n in covered]
        filter_ = entries[0] if shape == "one" and draw(st.booleans()) else entries
    matcher = EventFilter(filter_)
    return filter_, [n for n in drawn if matcher.matches(n)]


def payloads(*, max_leaves: int = 10) -> SearchStrategy[Any]:
    """JSON values that come back equal from a file broker's default JSON serializer.

    None, bools, 64-bit ints, finite floats (no NaN, which is unequal to itself, and no
    infinity, which standard JSON lacks), text without lone surrogates, and lists and dicts with
    str keys of those. No tuples (they come back as lists) and no non-str keys (they come back as
    str).

    Args:
        max_leaves: about how many scalars one payload holds.
    """
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(_TEXT_CHARACTERS, max_size=20),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(_TEXT_CHARACTERS, max_size=8), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def messages(
    events: SearchStrategy[str] | None = None, payload: SearchStrategy[Any] | None = None
) -> SearchStrategy[dict[str, Any]]:
    """Message drafts: dicts with ``event``, ``payload``, ``key`` and ``headers``.

    A draft works as ``broker.publish(queue, **draft)``, ``queue.publish(**draft)`` and as an
    item of ``queue.publish_many``. ``key`` is None, a str or an int; ``headers`` is None or a
    dict with str names. What a file stores reads back equal.

    Args:
        events: the strategy for event names; default :func:`event_names`.
        payload: the strategy for payloads; default :func:`payloads` with few leaves.
    """
    header_values = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**31), 2**31), st.text(_TEXT_CHARACTERS, max_size=10)
    )
    return st.fixed_dictionaries(
        {
            "event": events if events is not None else event_names(),
            "payload": payload if payload is not None else payloads(max_leaves=4),
            "key": st.one_of(st.none(), st.text(_TEXT_CHARACTERS, max_size=10), st.integers(-(2**31), 2**31)),
            "headers": st.one_of(
                st.none(), st.dictionaries(st.text(_TEXT_CHARACTERS, min_size=1, max_size=8), header_values, max_size=3)
            ),
        }
    )


@st.composite
def subscription_specs(
    draw: st.DrawFn,
    events: SearchStrategy[str | list[str] | None] | None = None,
    *,
    names: SearchStrategy[str | None] | None = None,
    max_offset: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``Broker.subscribe(queue, **spec)`` that it accepts.

    Keys: ``events``, ``name`` (None for an ephemeral subscription), ``start`` (``"earliest"``,
    ``"latest"`` or an offset up to ``max_offset``), ``ack``, ``ack_timeout`` (only with manual
    acks), ``max_deliveries`` and ``backoff`` (a :class:`mqlite.Backoff`). No ``callback``: a
    spec makes a pull subscription, and a test adds a callback if it wants push.

    Args:
        events: the strategy for ``events=``; default the filters of :func:`event_filters`.
        names: the strategy for ``name=``; default None or a short durable name.
        max_offset: the largest int ``start`` drawn. Keep it at most the queue's
            ``end_offset``, or subscribe raises ``InvalidArgument``.
    """
    ack = draw(st.sampled_from(["auto", "manual"]))
    initial = draw(st.floats(0, 5))
    factor = draw(st.floats(1, 4))
    backoff = mqlite.Backoff(initial=initial, factor=factor, maximum=initial + draw(st.floats(0, 60)))
    return {
        "events": draw(events if events is not None else event_filters().map(lambda pair: pair[0])),
        "name": draw(names if names is not None else st.one_of(st.none(), st.sampled_from(["alpha", "beta", "gamma"]))),
        "start": draw(st.one_of(st.sampled_from(["earliest", "latest"]), st.integers(0, max_offset))),
        "ack": ack,
        "ack_timeout": draw(st.one_of(st.none(), st.floats(0.001, 3600))) if ack == "manual" else None,
        "max_deliveries": draw(st.one_of(st.none(), st.integers(1, 10))),
        "backoff": draw(st.one_of(st.none(), st.just(backoff))),
    }


_OPERATION_NAMES = ("publish", "publish_many", "subscribe", "get", "poll", "ack", "nack", "seek", "close")


@st.composite
def operations(
    draw: st.DrawFn,
    *,
    events: SearchStrategy[str] | None = None,
    max_size: int = 30,
    max_subscriptions: int = 4,
) -> list[tuple[str, dict[str, Any]]]:
    """A program of broker operations on one queue, as data: a list of ``(name, kwargs)``.

    The program starts with a ``subscribe``. ``sub`` in kwargs is the index of a subscription
    the program opened before, in the order of its ``subscribe`` operations; ``message`` is a
    small offset that may or may not be pending. Run it with the calls below, expecting
    :class:`mqlite.MqliteError` subclasses such as ``NotPending`` or ``SubscriptionClosed``
    where the program asks for something the broker refuses:

    - ``("publish", draft)``: ``queue.publish(**draft)`` (a :func:`messages` draft);
    - ``("publish_many", {"items": [draft, ...]})``: ``queue.publish_many(items)``;
    - ``("subscribe", spec)``: ``broker.subscribe(queue, **spec)`` (a :func:`subscription_specs`
      spec with ``start`` ``"earliest"`` or ``"latest"``);
    - ``("get", {"sub", "timeout"})`` and ``("poll", {"sub", "max_messages", "timeout"})``,
      timeouts 0;
    - ``("ack", {"sub", "message"})``, ``("nack", {"sub", "message", "delay"})``: pass the
      rest of the kwargs to the subscription's method of that name, as for the reads;
    - ``("seek", {"sub", "target"})``: ``"earliest"``, ``"latest"`` or an offset;
    - ``("close", {"sub"})``.

    Args:
        events: the strategy for event names; default a handful of short names, so that
            filters and messages meet.
        max_size: the most operations drawn.
        max_subscriptions: the most ``subscribe`` operations in a program.
    """
    names = events if events is not None else st.sampled_from(["a", "b", "c", "order.created"])
    filters = st.one_of(st.none(), names, st.lists(names, min_size=1, max_size=2), st.sampled_from(["*", "order.*"]))
    drafts = messages(events=names, payload=payloads(max_leaves=2))
    spec = subscription_specs(events=filters)
    program: list[tuple[str, dict[str, Any]]] = [("subscribe", draw(spec))]
    subscribed = 1
    for _ in range(draw(st.integers(0, max_size - 1))):
        name = draw(st.sampled_from(_OPERATION_NAMES))
        sub = draw(st.integers(0, subscribed - 1))
        offset = draw(st.integers(0, 12))
        if name == "publish":
            program.append((name, draw(drafts)))
        elif name == "publish_many":
            program.append((name, {"items": draw(st.lists(drafts, min_size=1, max_size=3))}))
        elif name == "subscribe":
            if subscribed < max_subscriptions:
                program.append((name, draw(spec)))
                subscribed += 1
        elif name == "get":
            program.append((name, {"sub": sub, "timeout": 0}))
        elif name == "poll":
            program.append((name, {"sub": sub, "max_messages": draw(st.integers(1, 5)), "timeout": 0}))
        elif name == "ack":
            program.append((name, {"sub": sub, "message": offset}))
        elif name == "nack":
            program.append((name, {"sub": sub, "message": offset, "delay": draw(st.sampled_from([0, 0, 1.5]))}))
        elif name == "seek":
            target = draw(st.one_of(st.sampled_from(["earliest", "latest"]), st.just(offset)))
            program.append((name, {"sub": sub, "target": target}))
        else:
            program.append((name, {"sub": sub}))
    return program


def fault_plans(*, max_rate: float = 1.0, kinds: tuple[str, ...] = FAULT_KINDS) -> SearchStrategy[dict[str, Any]]:
    """Keyword arguments for ``Faults(**plan)``: a ``seed`` and a rate in [0, ``max_rate``] per fault.

    The keys are ``seed`` (an int) and each of ``kinds``, by default ``duplicate``, ``delay``,
    ``drop_ack``, ``crash`` and ``restart`` (``restart`` injects only on a file). Each rate is a
    probability per opportunity; about half of them are 0, so that plans often inject one or two
    kinds of fault rather than all at once.

    Args:
        max_rate: the highest rate drawn, in [0, 1]. Small rates keep runs long enough to finish.
        kinds: the fault keywords to draw a rate for.

    Raises:
        InvalidArgument: ``max_rate`` is outside [0, 1], or ``kinds`` names an unknown fault.
    """
    if not 0.0 <= max_rate <= 1.0:
        raise mqlite.InvalidArgument(f"fault_plans needs 0 <= max_rate <= 1, got {max_rate!r}")
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise mqlite.InvalidArgument(f"fault_plans knows the kinds {FAULT_KINDS}, got {sorted(unknown)!r}")
    rate = st.one_of(st.just(0.0), st.floats(0.0, max_rate))
    return st.fixed_dictionaries({"seed": st.integers(0, 2**32 - 1), **{kind: rate for kind in kinds}})
