"""Key names of the Redis engine: every queue's keys share one hash tag, and names cannot collide.

A queue ``Q`` under namespace ``N`` keeps its keys at ``N:{<Q encoded>}:<part>``. Encoding
percent-escapes ``%``, ``{``, ``}`` and ``:``, so the hash tag always ends at the ``}`` we wrote
and distinct names always give distinct keys; any other character (unicode included) is kept as
its UTF-8 bytes. Cursor ids use the same encoding, after a one-letter kind (``n`` named, ``e``
ephemeral), so no user name can produce an ephemeral cursor's id.
"""

from __future__ import annotations

__all__ = ["QueueKeys", "encode_part", "ephemeral_cursor", "named_cursor"]

_ESCAPES = {"%": "%25", "{": "%7B", "}": "%7D", ":": "%3A"}


def encode_part(name: str) -> str:
    """``name`` with ``%``, ``{``, ``}`` and ``:`` percent-escaped: safe inside a key and a hash tag."""
    return "".join(_ESCAPES.get(char, char) for char in name)


class QueueKeys:
    """The keys of one queue. Immutable, so thread-safe."""

    __slots__ = ("all", "cursors", "events", "log", "meta", "prefix", "sig")

    def __init__(self, namespace: str, queue: str) -> None:
        self.prefix = f"{namespace}:{{{encode_part(queue)}}}:"
        self.meta = self.prefix + "meta"
        self.log = self.prefix + "log"
        self.cursors = self.prefix + "cursors"
        self.events = self.prefix + "events"
        self.sig = self.prefix + "sig"
        self.all = (self.meta, self.log, self.cursors, self.events, self.sig)
        """The KEYS of every script, in the order the scripts read them."""


def named_cursor(name: str) -> str:
    """The cursor id of a named subscription."""
    return "n" + encode_part(name)


def ephemeral_cursor(broker_id: str, subscription_id: int) -> str:
    """The cursor id of one ephemeral subscription of one broker."""
    return f"e{broker_id}.{subscription_id}"
