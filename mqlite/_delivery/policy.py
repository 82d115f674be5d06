"""The failure decision and the ack-mode rules: plain functions of plain values."""

from __future__ import annotations

from typing import Any, Final

import attrs

from mqlite.message import Message

__all__ = [
    "RETRY_NOW",
    "Dead",
    "Retry",
    "dead_letter_headers",
    "on_failure",
    "push_batch_size",
    "read_ahead_size",
    "settles_on_take",
]


@attrs.frozen
class Retry:
    """Deliver the message again: at once (``delay == 0``) or after ``delay`` seconds of broker clock."""

    delay: float = 0.0


RETRY_NOW: Final = Retry(0.0)


@attrs.frozen
class Dead:
    """The message used up its deliveries: send it to the dead-letter queue with ``headers``."""

    headers: dict[str, Any]


def on_failure(
    message: Message,
    *,
    attempts: int,
    max_deliveries: int | None,
    delay: float,
    queue: str,
    subscription: str | None,
    reason: str,
    error: BaseException | None = None,
) -> Retry | Dead:
    """What happens to a delivery that failed (a nack, a raising callback, an ack timeout, a close).

    ``attempts`` counts the deliveries made so far, this one included. A message that has had
    ``max_deliveries`` is dead; otherwise it is retried after ``delay`` (0: at once).
    """
    if max_deliveries is not None and attempts >= max_deliveries:
        return Dead(
            dead_letter_headers(
                message, queue=queue, subscription=subscription, deliveries=attempts, reason=reason, error=error
            )
        )
    return RETRY_NOW if delay <= 0 else Retry(delay)


def dead_letter_headers(
    message: Message,
    *,
    queue: str,
    subscription: str | None,
    deliveries: int,
    reason: str,
    error: BaseException | None,
) -> dict[str, Any]:
    """The message's own headers plus the ``dead_letter.*`` ones that say where it came from."""
    headers = dict(message.headers)
    headers.update(
        {
            "dead_letter.queue": queue,
            "dead_letter.offset": message[2],
            "dead_letter.subscription": subscription,
            "dead_letter.deliveries": deliveries,
            "dead_letter.reason": reason,
            "dead_letter.error": None if error is None else repr(error),
        }
    )
    return headers


def settles_on_take(*, manual_ack: bool, push: bool) -> bool:
    """Whether taking a message settles it: only a pull with automatic acks, when it is returned.

    A push delivery with automatic acks settles when its callback returns; a manual one on ack.
    """
    return not manual_ack and not push


def read_ahead_size(
    requested: int, max_messages: int, *, manual_ack: bool, durable_take: bool, ahead_with_manual: bool = False
) -> int:
    """How many messages a pull takes at once, of which ``max_messages`` are returned now.

    No read-ahead with manual acks (a message read ahead would start its ack timeout before
    anyone saw it), unless the consumer asks for it (``ahead_with_manual``: the compat faces, on
    a cursor with no ack timeout); nor where taking is durable (a named cursor on a file: a
    message read ahead counts as taken, so a crash would lose it, and other processes could not
    take it meanwhile).
    """
    if (manual_ack and not ahead_with_manual) or durable_take:
        return max_messages
    return requested if requested > max_messages else max_messages


def push_batch_size(batch: int, consumers: int) -> int:
    """How many messages a push worker takes at once.

    Competing consumers take one at a time, so a burst is shared by whoever is free instead of
    going whole to the first worker that wakes.
    """
    return 1 if consumers > 1 else batch
