"""Child-process bodies for the command-line tests (``multiprocessing``, spawn start method).

Kept apart from the test module so a child imports only mqlite, not pytest. Every wait here is
bounded, so a bug makes the parent's assertions fail instead of leaving a process behind.
"""

from __future__ import annotations

import os
from typing import Any

import mqlite
from mqlite.cli import REQUEUE_CURSOR, REQUEUED_FROM

# No child runs longer than this, whatever happens.
DEADLINE = 30.0


def hold(path: str, take: int, ready: Any, stop: Any, results: Any) -> None:
    """Take ``take`` messages of subscription ``billing`` of ``orders`` without acking them, and hold them.

    Puts ``(pid, offsets taken)`` on ``results`` and sets ``ready``; closes once ``stop`` is set.
    """
    with mqlite.Broker(path) as broker:
        sub = broker.subscribe("orders", name="billing", ack="manual")
        taken = sub.poll(max_messages=take, timeout=DEADLINE) if take else []
        results.put((os.getpid(), [message.offset for message in taken]))
        ready.set()
        stop.wait(DEADLINE)


def requeue_and_die(path: str, dead_letter_queue: str, source: str, done: Any) -> None:
    """Do what ``dead-letters --requeue`` does for the first letter, up to the ack, then die.

    Sets ``done`` once the copy is published; the parent kills this process, so the letter stays
    pending on the requeue subscription, held by a dead broker.
    """
    broker = mqlite.Broker(path)
    sub = broker.subscribe(dead_letter_queue, name=REQUEUE_CURSOR, start="earliest", ack="manual")
    letter = sub.get(timeout=DEADLINE)
    assert letter is not None
    headers = {k: v for k, v in letter.headers.items() if not k.startswith("dead_letter.")}
    headers[REQUEUED_FROM] = {"queue": dead_letter_queue, "offset": letter.offset}
    broker.publish(source, letter.event, letter.payload, letter.key, headers)
    done.set()
    os._exit(0)  # a crash: no ack, no close
