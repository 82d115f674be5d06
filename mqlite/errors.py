"""The exceptions mqlite raises: one hierarchy under :class:`MqliteError`."""

from __future__ import annotations

__all__ = [
    "AckModeError",
    "BrokerClosed",
    "ConfigConflict",
    "InvalidArgument",
    "InvalidName",
    "MqliteError",
    "NotPending",
    "QueueFull",
    "SerializationError",
    "StorageError",
    "SubscriptionClosed",
    "TransactionConflict",
    "TransactionError",
    "WouldDeadlock",
    "WrongEventLoop",
]


class MqliteError(Exception):
    """Base class of every error mqlite raises."""


class BrokerClosed(MqliteError):
    """The broker was closed; it accepts no more publishes or subscriptions."""


class SubscriptionClosed(MqliteError):
    """The subscription, or its broker, was closed while it was used."""


class QueueFull(MqliteError):
    """A queue with ``overflow="reject"`` is at ``max_messages``; the publish wrote nothing."""


class InvalidArgument(MqliteError, ValueError):
    """An argument had the wrong type or value; the message names it and what was expected."""


class InvalidName(InvalidArgument):
    """A queue, event or subscription name was empty, not a str, or otherwise malformed."""


class NotPending(InvalidArgument):
    """``ack``/``nack`` named a message that is not pending on that subscription."""


class AckModeError(InvalidArgument):
    """``ack``/``nack`` was called on a subscription whose ack mode does not allow it."""


class ConfigConflict(InvalidArgument):
    """A subscribe or queue call asked for settings that clash with ones already in force."""


class WrongEventLoop(MqliteError, RuntimeError):
    """An async call ran on an event loop other than the one its subscription is bound to."""


class WouldDeadlock(MqliteError, RuntimeError):
    """A call would wait for itself, such as ``drain()`` inside one of its broker's push callbacks.

    It is refused at once and does nothing.
    """


class TransactionError(MqliteError, RuntimeError):
    """A transaction was misused: nested in another, used after its block or from another thread,
    or a call inside its block that must go through it (``tx.publish``, ``tx.ack``, ``tx.nack``).

    The call that raises changed nothing.
    """


class TransactionConflict(TransactionError):
    """On Redis, a transaction needed a queue that an older transaction (of any broker) holds,
    while holding another queue itself: waiting could deadlock, so the younger one gives way.

    Raised by the ``tx.publish`` that needed the queue, which staged nothing; let it leave the
    block, so the transaction is discarded, and run it again. ``mqlite.transform`` does that itself.
    """


class SerializationError(InvalidArgument):
    """A payload, key or headers could not be encoded for a durable broker; nothing was written."""


class StorageError(MqliteError):
    """A broker file is not an mqlite file, is damaged, is too new, or could not be written."""
