"""Command line: ``python -m mqlite demo`` tells the parcel-service story with the public API.

The demo is also a worked example: every broker call in it is one a user would write. It
synchronises only through ``Broker.drain`` and ``get``/``poll`` timeouts, never by sleeping.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

import mqlite

__all__ = ["main"]

QUEUE = "parcels"
VENDORS = ("acme-widgets", "1-800-flowers")
DRIVERS = ("Dana", "Lee")
# The demo gives up (and says so) if the broker has not settled within this many seconds.
SETTLE_TIMEOUT = 10.0


class _Narrator:
    """Prints the story. Thread-safe: drivers and billing print from their push threads."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        # _lock guards writes to out, so lines from different threads never interleave.
        self._lock = threading.Lock()

    def say(self, text: str = "") -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def act(self, title: str) -> None:
        self.say()
        self.say(f"== {title}")


class _NarratedLog(logging.Handler):
    """Shows records of the "mqlite" logger in the narration: the first one, then a note. Thread-safe."""

    def __init__(self, narrator: _Narrator, *, limit: int | None) -> None:
        super().__init__()
        self.narrator = narrator
        self.limit = limit
        self.shown = 0  # guarded by the handler's own lock, which logging holds around emit()

    def emit(self, record: logging.LogRecord) -> None:
        self.shown += 1
        if self.limit is None or self.shown <= self.limit:
            self.narrator.say(f"  [mqlite log] {record.levelname} {record.getMessage()}")
        elif self.shown == self.limit + 1:
            self.narrator.say("  [mqlite log] (further records hidden; run with --verbose to see them)")


def _settle(broker: mqlite.Broker, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until push subscriptions have handled everything, including what their callbacks published.

    One ``drain`` covers what was published before it was called; a driver's callback publishes
    more, so drain again until no queue grew meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        before = {q.name: q.end_offset for q in broker.info().queues}
        if not broker.drain(timeout=max(deadline - time.monotonic(), 0.0)):
            raise RuntimeError(f"the broker did not settle within {timeout} s")
        if {q.name: q.end_offset for q in broker.info().queues} == before:
            return


class _Driver:
    """A driver: a push callback on the shared "drivers" subscription."""

    def __init__(self, name: str, broker: mqlite.Broker, say: Callable[[str], None]) -> None:
        self.name = name
        self.broker = broker
        self.say = say
        self.delivered = 0

    def on_pickup(self, message: mqlite.Message) -> None:
        parcel = message.payload
        self.say(f"  {self.name:<4} picks up {parcel['parcel']} from {parcel['vendor']} -> {parcel['address']}")
        update = {"parcel": parcel["parcel"], "vendor": parcel["vendor"], "driver": self.name}
        self.broker.publish(QUEUE, "in-transit", update, key=parcel["parcel"])
        self.broker.publish(QUEUE, "delivered", update, key=parcel["parcel"])
        self.delivered += 1


class _Vendor:
    """A vendor: publishes pickups and follows its own parcels through a durable subscription."""

    def __init__(self, name: str, broker: mqlite.Broker, say: Callable[[str], None]) -> None:
        self.name = name
        self.broker = broker
        self.say = say
        self.tracking: mqlite.Subscription | None = None

    @property
    def subscription_name(self) -> str:
        return f"vendor:{self.name}"

    def connect(self) -> None:
        # The same name finds the same cursor: a vendor that reconnects resumes where it left off.
        self.tracking = self.broker.subscribe(QUEUE, events=["in-transit", "delivered"], name=self.subscription_name)

    def disconnect(self) -> None:
        assert self.tracking is not None
        self.tracking.close()
        self.tracking = None

    def request_pickup(self, parcel: str, address: str) -> None:
        self.say(f"{self.name} requests pickup of {parcel}")
        self.broker.publish(QUEUE, "pickup", {"parcel": parcel, "vendor": self.name, "address": address}, key=parcel)

    def read_updates(self) -> list[mqlite.Message]:
        """Every update waiting on the subscription that is about this vendor's own parcels.

        Both vendors read the same events of the same queue; each keeps its own parcels.
        """
        assert self.tracking is not None
        mine: list[mqlite.Message] = []
        while batch := self.tracking.poll(max_messages=100, timeout=0):
            mine.extend(m for m in batch if m.payload["vendor"] == self.name)
        return mine


class _Billing:
    """A flaky push handler: charges a vendor for each delivery; the card gateway misbehaves."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.attempts: Counter[str] = Counter()
        self.flaky_once = "P-008"  # the gateway times out once, then works
        self.always_declined = "P-009"  # the vendor's card is declined every time

    def on_delivered(self, message: mqlite.Message) -> None:
        parcel = message.payload["parcel"]
        self.attempts[parcel] += 1
        attempt = self.attempts[parcel]
        what = f"attempt {attempt}" + (" (a redelivery)" if attempt > 1 else "")
        if parcel == self.always_declined or (parcel == self.flaky_once and attempt == 1):
            reason = "card declined" if parcel == self.always_declined else "gateway timeout"
            self.say(f"  billing: charge {message.payload['vendor']} for {parcel}, {what}: {reason}!")
            raise RuntimeError(reason)
        self.say(f"  billing: charge {message.payload['vendor']} for {parcel}, {what}: ok")


def _show(updates: list[mqlite.Message]) -> str:
    return ", ".join(f"{m.payload['parcel']} {m.event}" for m in updates) or "nothing"


def demo(out: TextIO, *, verbose: bool = False) -> int:
    """Run the parcel-service story, narrating to ``out``."""
    narrator = _Narrator(out)
    say = narrator.say
    started = time.monotonic()

    # Callback failures are logged to the "mqlite" logger as warnings. Show them on the narration
    # stream, briefly, and keep them from the root logger's handlers while the demo runs.
    logger = logging.getLogger("mqlite")
    handler = _NarratedLog(narrator, limit=None if verbose else 1)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False
    try:
        with mqlite.Broker() as broker:
            _story(broker, narrator)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    say()
    say(f"The end ({time.monotonic() - started:.2f} s).")
    return 0


def _story(broker: mqlite.Broker, narrator: _Narrator) -> None:
    say = narrator.say
    acme, flowers = (_Vendor(name, broker, say) for name in VENDORS)
    drivers = [_Driver(name, broker, say) for name in DRIVERS]

    narrator.act("Morning: everyone connects")
    for vendor in (acme, flowers):
        vendor.connect()
        say(f"{vendor.name} follows its parcels: durable subscription {vendor.subscription_name!r}")
    for driver in drivers:
        # Two push subscriptions sharing one name compete: each pickup goes to exactly one driver.
        broker.subscribe(QUEUE, events="pickup", name="drivers", callback=driver.on_pickup)
    say(f"drivers {' and '.join(DRIVERS)} share the subscription 'drivers' and compete for pickups:")
    say("each pickup goes to exactly one of them, whichever is free first (run again for another split)")

    narrator.act("Pickups and deliveries")
    for vendor, parcel, address in (
        (acme, "P-001", "12 Elm St"),
        (flowers, "P-002", "3 Rose Ave"),
        (acme, "P-003", "99 Oak Rd"),
    ):
        vendor.request_pickup(parcel, address)
        _settle(broker)
    for vendor in (acme, flowers):
        say(f"{vendor.name} sees: {_show(vendor.read_updates())}")

    narrator.act("acme-widgets goes offline")
    acme.disconnect()
    say("acme-widgets closes its subscription; its cursor stays on the broker")
    missed: list[str] = []
    for vendor, parcel, address in (
        (acme, "P-004", "7 Pine Ct"),
        (flowers, "P-005", "18 Tulip Ln"),
        (acme, "P-006", "41 Birch Way"),
        (acme, "P-007", "5 Cedar Pl"),
    ):
        vendor.request_pickup(parcel, address)
        if vendor is acme:
            missed.append(parcel)
        _settle(broker)
    say(f"1-800-flowers, still online, sees: {_show(flowers.read_updates())}")
    lag = broker.info().subscription(QUEUE, acme.subscription_name).lag
    say(f"meanwhile {acme.subscription_name!r} is detached with lag {lag} (updates about both vendors' parcels)")

    narrator.act("acme-widgets comes back")
    acme.connect()
    caught_up = acme.read_updates()
    say(f"acme-widgets resubscribes as {acme.subscription_name!r} and reads, in order: {_show(caught_up)}")
    say(
        f"acme-widgets caught up on {len(caught_up)} updates it missed while offline "
        f"({len(missed)} parcels: {', '.join(missed)})"
    )
    expected = [(p, e) for p in missed for e in ("in-transit", "delivered")]
    if [(m.payload["parcel"], m.event) for m in caught_up] != expected:
        raise RuntimeError(f"catch-up mismatch: expected {expected}, got {_show(caught_up)}")

    narrator.act("A flaky billing handler")
    billing = _Billing(say)
    dead_letter_queue = mqlite.dead_letter_queue_name(QUEUE)
    broker.subscribe(
        QUEUE,
        events="delivered",
        name="billing",
        callback=billing.on_delivered,
        max_deliveries=3,
        backoff=mqlite.Backoff(initial=0.01, maximum=0.05),
    )
    say(f"billing charges each delivery; a callback that raises is retried, 3 tries, then {dead_letter_queue!r}")
    acme.request_pickup("P-008", "60 Maple Dr")
    _settle(broker)
    flowers.request_pickup("P-009", "2 Lily St")
    _settle(broker)
    # Manual acks: the dead letter stays pending until a person has dealt with it.
    ops = broker.subscribe(dead_letter_queue, name="ops", start="earliest", ack="manual")
    letter = ops.get(timeout=1.0)
    if letter is None:
        raise RuntimeError(f"no dead letter arrived on {dead_letter_queue!r}")
    say(f"ops reads a dead letter from {dead_letter_queue!r}: {letter.event} {letter.payload}")
    for header, value in letter.headers.items():
        say(f"    {header} = {value!r}")
    say("ops leaves it unacked (pending) until someone has called 1-800-flowers about their card")
    for vendor in (acme, flowers):
        vendor.read_updates()

    narrator.act("Evening")
    flowers.disconnect()
    say("1-800-flowers closes for the night; acme-widgets sends one more parcel")
    acme.request_pickup("P-010", "8 Willow Row")
    _settle(broker)
    acme.read_updates()
    tally = ", ".join(f"{d.name} {d.delivered}" for d in drivers)
    say(f"deliveries per driver: {tally}")

    narrator.act("broker.info(): who is subscribed to what")
    say(broker.info().format())
    say()
    say("lag: matching messages not yet read; pending: delivered, not yet acknowledged;")
    say("redelivered and dead: retries and dead letters; detached: a durable cursor with nobody attached.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mqlite",
        description="mqlite: an in-process message queue and pub/sub broker.",
    )
    parser.add_argument("--version", action="version", version=f"mqlite {mqlite.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="tell the parcel-service story: competing drivers, a vendor catching up, a dead letter",
        description="Run a narrated demo of mqlite's public API; takes about a second.",
    )
    demo_parser.add_argument("--verbose", action="store_true", help="show every log record of the 'mqlite' logger")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mqlite`` and the ``mqlite`` script. Returns the exit status."""
    parser = _parser()
    args: Any = parser.parse_args(argv)
    if args.command == "demo":
        try:
            return demo(sys.stdout, verbose=args.verbose)
        except BrokenPipeError:
            # The reader went away (``python -m mqlite demo | head``): stop quietly, and point
            # stdout at devnull so the interpreter's final flush does not complain again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    parser.print_help(sys.stderr)
    return 2
