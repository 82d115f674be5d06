"""Transactions: publishes, acks and nacks on one queue or several, applied all or none.

``with broker.transaction() as tx:`` groups ``tx.publish``, ``tx.ack`` and ``tx.nack`` into one
unit. Each call checks everything at once, as the plain call does, and raises if the plain call
would; the changes are applied together when the block ends without an exception, and forgotten
if it raises. See ``docs/one-time-delivery.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mqlite.config import is_finite_number
from mqlite.errors import InvalidArgument, TransactionError
from mqlite.filters import check_name
from mqlite.message import Message
from mqlite.subscription import Subscription

if TYPE_CHECKING:
    from mqlite.broker import Broker
    from mqlite.engine.locking import Scope
    from mqlite.engine.staging import TransactionalCore

__all__ = ["Transaction", "in_transaction"]

# The transaction each thread is inside, if any: a second one in the same thread is refused.
_current = threading.local()


def in_transaction() -> bool:
    """Whether the calling thread is inside a transaction's block."""
    return getattr(_current, "transaction", None) is not None


class Transaction:
    """One all-or-nothing unit of publishes, acks and nacks. Use it in one thread, in a ``with`` block.

    While the block runs, the transaction holds every queue it has touched: other threads that
    use those queues wait until it ends, and on a file the whole file is held for writing (other
    processes wait for it, as for any write). So keep the block short: compute before it, and
    do no blocking call inside (``get`` with a timeout, ``drain``, joining a thread that uses
    the broker). Calls other than the transaction's own on the queues it touched raise
    :class:`~mqlite.errors.TransactionError` instead of waiting for the transaction itself.

    On Redis it holds only the queues it publishes to (other publishes there wait, a plain one
    of its own thread raises), and its commit checks its acks and nacks again, raising
    ``NotPending`` with nothing applied if another consumer settled one meanwhile; see
    :mod:`mqlite.engine.redis.transaction`.

    Raises (of every method):
        TransactionError: the transaction is used outside its block, or from another thread.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._scope: Scope | None = None
        self._state = "new"  # "new", then "open" inside the block, then "done"
        self._thread = 0

    def __repr__(self) -> str:
        return f"<mqlite.Transaction {self._state}>"

    def __enter__(self) -> Transaction:
        if self._state != "new":
            raise TransactionError("a transaction is used once, in one with block; begin a new one")
        if getattr(_current, "transaction", None) is not None:
            raise TransactionError(
                "transactions do not nest: this thread is already inside one; make these calls through that transaction"
            )
        self._broker._check_open("begin a transaction")
        self._scope = self._broker._engine.begin_transaction()
        self._thread = threading.get_ident()
        self._state = "open"
        _current.transaction = self
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        scope = self._scope
        self._state = "done"
        self._scope = None
        _current.transaction = None
        assert scope is not None
        if exc_type is not None:
            scope.rollback()
            return
        for queue, letters in scope.commit():  # no scope is held any more: dead letters publish as usual
            queue._send_dead_letters(letters)

    def _open_scope(self, verb: str) -> Scope:
        scope = self._scope
        if scope is not None and threading.get_ident() == self._thread:
            return scope
        if self._state != "open":
            when = "before its with block began" if self._state == "new" else "after its with block ended"
            raise TransactionError(
                f"cannot {verb} through a transaction {when}; its changes are applied at the end of the block"
            )
        if threading.get_ident() != self._thread:
            raise TransactionError(
                f"cannot {verb} through a transaction from another thread than the one that began it"
            )
        scope = self._scope
        assert scope is not None
        return scope

    def publish(
        self,
        queue: str,
        event: str,
        payload: Any = None,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
        dedup_id: str | None = None,
    ) -> Message:
        """Publish to ``queue`` when the transaction commits; returns the message it will commit.

        The offset is final: the transaction holds the queue, so nobody else publishes to it
        before the commit. A ``dedup_id`` seen within the queue's duplicate window (or earlier
        in this transaction) publishes nothing and returns the first message with it.

        Raises:
            As :meth:`Broker.publish`; nothing is staged.
        """
        scope = self._open_scope("publish")
        engine = self._queue(scope, queue)
        return engine._tx_publish_locked(scope.part(engine), event, payload, key, headers, dedup_id)

    def ack(self, subscription: Subscription, *messages: Message | int) -> None:
        """Acknowledge ``messages`` of ``subscription`` when the transaction commits.

        Raises:
            As :meth:`Subscription.ack`, checked now: a message that is not pending, or acked or
            nacked earlier in this transaction, raises ``NotPending``; nothing is staged.
        """
        scope = self._open_scope("ack")
        if not messages:
            raise InvalidArgument("tx.ack() takes a subscription and at least one message")
        engine = self._engine_of(subscription)
        engine._tx_ack_locked(scope.part(engine), subscription, messages)

    def nack(self, subscription: Subscription, message: Message | int, delay: float = 0.0) -> None:
        """Give ``message`` back to ``subscription`` when the transaction commits (see :meth:`Subscription.nack`).

        Raises:
            As :meth:`Subscription.nack`, checked now; nothing is staged.
        """
        scope = self._open_scope("nack")
        if not is_finite_number(delay) or not delay >= 0:
            raise InvalidArgument(f"delay must be a finite, non-negative number of seconds, got {delay!r}")
        engine = self._engine_of(subscription)
        engine._tx_nack_locked(scope.part(engine), subscription, message, float(delay))

    def _queue(self, scope: Scope, name: str) -> TransactionalCore:
        broker = self._broker
        engine = broker._engines.get(name) if isinstance(name, str) else None
        if engine is None:
            check_name("queue", name)
            with scope.opening():
                broker.queue(name)
            engine = broker._engines[name]
            scope.opened(name)
        return engine  # type: ignore[return-value]  # the engines that offer transactions stage

    def _engine_of(self, subscription: Subscription) -> TransactionalCore:
        if not isinstance(subscription, Subscription):
            raise InvalidArgument(
                f"expected a mqlite.Subscription, got {type(subscription).__name__}: {subscription!r}"
            )
        engine = subscription._engine
        if self._broker._engines.get(engine.name) is not engine:
            raise InvalidArgument(f"subscription {subscription!r} belongs to another broker than this transaction's")
        return engine  # type: ignore[return-value]  # the engines that offer transactions stage
