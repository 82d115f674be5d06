"""Exactly-once pipeline steps: consume, transform and produce in one transaction.

A step that takes from one queue and publishes to another can crash between its publish and its
ack; the next run then publishes again. :func:`transform` makes the step's publishes and its ack
one transaction (Kafka's consume-transform-produce), so a crash at any moment leaves either
both or neither: the message is delivered again and handled again, and what it produced exists
once. See ``docs/one-time-delivery.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mqlite.errors import AckModeError, InvalidArgument, TransactionConflict
from mqlite.message import Message
from mqlite.subscription import Subscription
from mqlite.transaction import Transaction

if TYPE_CHECKING:
    from mqlite.broker import Broker

__all__ = ["transform"]


def transform(
    broker: Broker,
    subscription: Subscription,
    handle: Callable[[Transaction, Message], object],
    *,
    timeout: float | None = None,
    max_messages: int = 1,
) -> int:
    """Take up to ``max_messages`` from ``subscription`` (of ``broker``) and handle them in one transaction.

    ``handle(tx, message)`` is called for each message; it publishes what the message produces
    through ``tx.publish``. The publishes of the whole batch and the ack of its messages are
    then committed together. If ``handle`` raises, nothing it published is kept: the
    transaction is discarded, the batch's messages are nacked (each counts a failed delivery,
    so ``max_deliveries`` still sends a poison message to the dead letters), and the error is
    raised.

    ``handle`` runs inside the transaction's block, which holds the queues it touches: keep it
    quick, and make every broker call in it through ``tx``.

    On Redis, a transaction that gives way to an older one (``TransactionConflict``) is discarded
    and run again, ``handle`` included, without nacking: so ``handle`` must do nothing but
    compute and call ``tx``.

    Returns how many messages were handled: 0 if none came within ``timeout`` seconds (None
    waits for ever, 0 does not wait).

    Raises:
        AckModeError: ``subscription`` does not use ``ack="manual"``.
        InvalidArgument: ``max_messages`` is not a positive int.
        Whatever ``handle`` raised, once the batch is nacked.
    """
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
        raise InvalidArgument(f"max_messages must be an int >= 1, got {max_messages!r}")
    if not subscription._cursor.manual_ack:
        raise AckModeError(
            "transform() needs a subscription made with ack='manual': the ack is part of its transaction"
        )
    batch = subscription.poll(max_messages, timeout=timeout)
    if not batch:
        return 0
    try:
        while True:
            try:
                with broker.transaction() as tx:
                    for message in batch:
                        handle(tx, message)
                    tx.ack(subscription, *batch)
            except TransactionConflict:
                continue  # on Redis an older transaction holds a queue this one needs: it was discarded, run it again
            return len(batch)
    except BaseException:
        for message in batch:
            subscription.nack(message)
        raise
