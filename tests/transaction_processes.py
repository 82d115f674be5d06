"""Child-process bodies for the transaction tests (tests/test_transactions.py), on a file (or a Redis
namespace) shared with the parent.

Kept apart from the test module so a child imports only mqlite, not pytest and hypothesis.
Every wait here is bounded, so a bug makes the parent's assertions fail instead of leaving a
process behind.

Run as a script it is a SIGKILL test's child, which reports its steps on stdout:

- ``python tests/transaction_processes.py pipeline WHERE MODE HANG_AT DRAIN``: see :func:`pipeline`
  (WHERE as :func:`open_broker` takes it);
- ``python tests/transaction_processes.py triples PATH FIRST HANG_AT COMMIT``: see :func:`triples`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import mqlite

# No child runs longer than this, whatever happens.
DEADLINE = 30.0


def open_broker(where: str, **kwargs: Any) -> mqlite.Broker:
    """A broker on ``where``: a file's path, or ``URL|NAMESPACE`` for a Redis server."""
    url, bar, namespace = where.partition("|")
    return mqlite.Broker(url, namespace=namespace, **kwargs) if bar else mqlite.Broker(where, **kwargs)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wait_to_be_killed() -> None:
    """The parent kills this process now; if it never does, end with an error it will see."""
    threading.Event().wait(DEADLINE)
    raise SystemExit("the parent never killed this child")


# -- spawned children (multiprocessing) ------------------------------------------------------


def publish_orders(path: str, first: int, count: int) -> None:
    """Publish orders ``first`` .. ``first + count - 1`` to ``orders``, one at a time."""
    with mqlite.Broker(path) as broker:
        for order in range(first, first + count):
            broker.publish("orders", "order", order)


def transform_loop(path: str, ready: Any, stop: Any, results: Any) -> None:
    """Compete on ``workers`` of ``orders``: turn each order into an invoice with ``mqlite.transform``.

    Waits at the ``ready`` barrier once subscribed; stops once ``stop`` is set and nothing is
    left to read. Puts ``("done", how many orders it handled)`` on ``results`` (or
    ``("error", repr)``).
    """
    handled = 0
    try:
        with mqlite.Broker(path) as broker:
            sub = broker.subscribe("orders", name="workers", ack="manual")
            ready.wait(DEADLINE)
            deadline = time.monotonic() + DEADLINE

            def handle(tx: mqlite.Transaction, message: mqlite.Message) -> None:
                tx.publish("invoices", "invoice", message.payload)

            while time.monotonic() < deadline:
                count = mqlite.transform(broker, sub, handle, timeout=0.02, max_messages=3)
                handled += count
                if not count and stop.is_set():
                    break
        results.put(("done", handled))
    except BaseException as error:  # noqa: BLE001  # reported to the parent, which fails the test
        results.put(("error", repr(error)))


# -- SIGKILL children (subprocess, reporting on stdout) --------------------------------------


def pipeline(path: str, mode: str, hang_at: int, drain: bool) -> None:
    """Turn each order of ``orders`` (subscription ``workers``) into one invoice on ``invoices``.

    ``mode`` ``"tx"`` does it with ``mqlite.transform`` (publish and ack in one transaction);
    ``"plain"`` publishes, then acks with a separate call. Writes ``ready`` once subscribed,
    ``in ORDER`` once the invoice is published (inside the transaction, or before the ack) and
    ``done ORDER`` once the order is acked. At the ``hang_at``-th order (0 first; -1 never) it
    writes ``inside ORDER`` instead of ``in ORDER`` and waits to be killed, right there. With
    ``drain``, it writes ``idle`` and exits once no order is left unread or pending.
    """
    broker = open_broker(path)
    sub = broker.subscribe("orders", name="workers", ack="manual")
    _say("ready")
    seen = 0

    def announce(order: object) -> None:
        nonlocal seen
        if seen == hang_at:
            _say(f"inside {order}")
            _wait_to_be_killed()
        seen += 1
        _say(f"in {order}")

    def handle(tx: mqlite.Transaction, message: mqlite.Message) -> None:
        tx.publish("invoices", "invoice", message.payload)
        announce(message.payload)

    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if mode == "tx":
            batch = [None] * mqlite.transform(broker, sub, handle, timeout=0.05)
        else:
            message = sub.get(timeout=0.05)
            batch = [] if message is None else [message]
            if message is not None:
                broker.publish("invoices", "invoice", message.payload)
                announce(message.payload)
                sub.ack(message)
                _say(f"done {message.payload}")
        if mode == "tx" and batch:
            _say("done")
        if drain and not batch and sub.lag == 0 and sub.pending == 0:
            broker.close()
            _say("idle")
            return
    raise SystemExit("pipeline child ran out of time")


def triples(path: str, first: int, hang_at: int, commit: str) -> None:
    """Transactions ``first``, ``first + 1``, ...: each takes one message of ``C`` (subscription
    ``c``) and, in one transaction, publishes ``{"n": n, "c": offset}`` to ``A`` and to ``B`` and
    acks the message.

    Writes ``ready`` once subscribed, ``in N`` inside transaction N (after its publishes, before
    its ack), ``C N`` once it committed and, with ``commit="batch"``, ``F N`` once every
    transaction up to N is flushed. At transaction ``first + hang_at`` (-1: never) it writes
    ``inside N`` once all three calls are staged and waits to be killed.
    """
    broker = mqlite.Broker(path, commit=commit)  # type: ignore[arg-type]  # "each" or "batch" from the parent
    sub = broker.subscribe("C", name="c", ack="manual")
    _say("ready")
    n = first
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        message = sub.get(timeout=0.05)
        if message is None:
            continue
        with broker.transaction() as tx:
            tx.publish("A", "a", {"n": n, "c": message.offset})
            tx.publish("B", "b", {"n": n, "c": message.offset})
            _say(f"in {n}")
            tx.ack(sub, message)
            if n == first + hang_at:
                _say(f"inside {n}")
                _wait_to_be_killed()
        _say(f"C {n}")
        if commit == "batch" and n % 4 == 0:
            if not broker.flush(timeout=10):
                raise SystemExit("flush timed out")
            _say(f"F {n}")
        n += 1
    raise SystemExit("triples child ran out of time")


if __name__ == "__main__":
    command, arguments = sys.argv[1:2], sys.argv[2:]
    if command == ["pipeline"] and len(arguments) == 4:
        pipeline(arguments[0], arguments[1], int(arguments[2]), arguments[3] == "drain")
    elif command == ["triples"] and len(arguments) == 4:
        triples(arguments[0], int(arguments[1]), int(arguments[2]), arguments[3])
    else:
        raise SystemExit(
            "usage: transaction_processes.py pipeline PATH tx|plain HANG_AT drain|run\n"
            "       transaction_processes.py triples PATH FIRST HANG_AT each|batch"
        )
