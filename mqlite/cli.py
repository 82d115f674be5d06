"""The ``mqlite`` command: look into and operate mqlite files, and ``mqlite demo``.

``info``, ``tail``, ``pending`` and ``dead-letters`` read a file through the read-only
:class:`~mqlite.engine.sqlite.inspect.Inspector` and never change it; ``publish``, ``seek``,
``delete-subscription`` and ``dead-letters --requeue`` open a Broker, sharing the file with the
processes that use it; ``compact`` checkpoints and vacuums it. See ``docs/cli.md``.

``demo`` tells the parcel-service story with the public API. It is also a worked example: every
broker call in it is one a user would write. It synchronises only through ``Broker.drain`` and
``get``/``poll`` timeouts, never by sleeping.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import attrs

import mqlite
from mqlite.config import Start
from mqlite.engine.sqlite.inspect import Inspector, NotFound, compact
from mqlite.errors import MqliteError
from mqlite.filters import EventFilter, check_event_name, check_name

__all__ = ["REQUEUED_FROM", "REQUEUE_CURSOR", "CommandError", "main"]

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


# == The operating commands ===================================================================
#
# Reading commands (info, tail, pending, dead-letters without --requeue) go through the
# read-only Inspector: they never write the file and never register as a broker on it. Writing
# commands (publish, seek, delete-subscription, dead-letters --requeue) open a normal Broker,
# which shares the file with the brokers already on it; compact uses SQLite directly. A target
# that is a URL goes through mqlite.Broker(url) and its info() (see _open_broker).

# Set when mqlite.Broker routes URLs (redis://, rediss://, unix://) to the Redis engine: then
# info, publish, seek and delete-subscription work on a URL through the Broker API.
_BROKER_OPENS_URLS = True
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

REQUEUE_CURSOR = "mqlite.requeue"
"""The durable subscription of a dead-letter queue that ``dead-letters --requeue`` reads: a dead
letter it acked was requeued, so each is requeued once."""
REQUEUED_FROM = "requeued_from"
"""The header a requeued copy carries: ``{"queue": <dead-letter queue>, "offset": <its offset there>}``."""

# How often tail --follow and info --watch look at the file again. Another process writes it:
# there is nothing in this process to wait on but time.
FOLLOW_POLL = 0.1
# The most messages one read of tail takes from the file.
TAIL_PAGE = 256


class CommandError(Exception):
    """A user error: printed to stderr as one line, exit status 1, no traceback."""


def _is_url(target: str) -> bool:
    return _URL.match(target) is not None


def _check_file(target: str) -> str:
    """``target`` if it names an existing file; never creates it."""
    if not os.path.exists(target):
        raise CommandError(
            f"{target!r} does not exist; the mqlite command never creates a file "
            "(a program creates it by opening mqlite.Broker(path))"
        )
    if os.path.isdir(target):
        raise CommandError(f"{target!r} is a directory, not an mqlite file")
    return target


def _inspect(target: str, command: str) -> Inspector:
    """A read-only view of the file ``target``."""
    if _is_url(target):
        raise CommandError(
            f"{command} on {target!r}: reading a Redis target without consuming needs the Redis inspector, "
            "which is not built yet; only files are supported"
        )
    return Inspector(_check_file(target))


def _open_broker(target: str) -> mqlite.Broker:
    """A Broker on ``target``, for the writing commands: a checked mqlite file, or a URL."""
    if _is_url(target):
        if not _BROKER_OPENS_URLS:
            raise CommandError(f"{target!r}: Redis targets are not supported yet; mqlite.Broker opens only files")
        return mqlite.Broker(target)
    Inspector(_check_file(target)).close()  # an mqlite file: opening a Broker on anything else would lay it out
    return mqlite.Broker(target)


def _position(text: str) -> Start:
    """A POSITION argument: ``earliest``, ``latest``, an offset, or an ISO 8601 time (local if it has no zone)."""
    if text in ("earliest", "latest"):
        return "latest" if text == "latest" else "earliest"
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"bad position {text!r}: give earliest, latest, an offset (0, 1, ...) or an ISO time "
            "such as 2024-05-01T12:00:00Z"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def _json_argument(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise CommandError(
            f"{what} is not valid JSON ({error}): {text[:80]!r}; a string needs JSON quotes, e.g. '\"hello\"'"
        ) from None


def _events(patterns: list[str] | None) -> EventFilter | None:
    return None if not patterns else EventFilter(patterns)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _print_json(value: Any, out: TextIO) -> None:
    print(_dumps(value), file=out, flush=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(title)] + [len(row[i]) for row in cells]) for i, title in enumerate(header)]
    lines = ["  ".join(title.ljust(width) for title, width in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


# -- info ----------------------------------------------------------------------------------------


def _info_document(target: str) -> dict[str, Any]:
    """What ``mqlite info`` shows, as JSON-ready data."""
    if _is_url(target):
        with _open_broker(target) as broker:
            return _broker_info_document(target, broker.info())
    with _inspect(target, "info") as inspector:
        queues, cursors = inspector.snapshot()
        brokers = inspector.brokers()
    names = {queue.name: queue for queue in queues}
    return {
        "target": target,
        "brokers": [{"instance": b.instance, "pid": b.pid} for b in brokers],
        "queues": [
            {
                "name": q.name,
                "start_offset": q.start_offset,
                "end_offset": q.end_offset,
                "retained": q.retained,
                "retention": q.config.retention,
                "max_messages": q.config.max_messages,
                "max_age": q.config.max_age,
                "overflow": q.config.overflow,
                "dead_letters": names[dlq].retained if (dlq := mqlite.dead_letter_queue_name(q.name)) in names else 0,
            }
            for q in queues
        ],
        "subscriptions": [
            {
                "queue": c.queue,
                "name": c.name,
                "events": None if c.settings.event_filter.spec is None else list(c.settings.event_filter.spec),
                "ack": "manual" if c.settings.manual_ack else "auto",
                # Subscriptions attached in live brokers (None: a file older than schema 5).
                "consumers": c.consumers,
                "position": c.position,
                "lag": c.lag,
                "pending": c.pending,
                "held": c.held,
                "waiting": c.waiting,
                "ready": c.ready,
                "redelivering": c.redelivering,
                "max_deliveries": c.settings.max_deliveries,
                "dead_letter": c.settings.dead_letter,
            }
            for c in cursors
        ],
    }


def _broker_info_document(target: str, info: mqlite.BrokerInfo) -> dict[str, Any]:
    """:func:`_info_document` from ``Broker.info()`` (a URL target): its counters too."""
    return {
        "target": target,
        "brokers": None,
        "queues": [attrs.asdict(queue) for queue in info.queues],
        "subscriptions": [
            attrs.asdict(sub, value_serializer=lambda _, __, v: list(v) if isinstance(v, tuple) else v)
            for sub in info.subscriptions
        ],
    }


def _format_info(document: dict[str, Any]) -> str:
    brokers = document["brokers"]
    if brokers is None:
        opened = ""
    elif brokers:
        pids = ", ".join(f"pid {b['pid']}" if b["pid"] is not None else b["instance"] for b in brokers)
        opened = f" ({len(brokers)} broker{'s' if len(brokers) > 1 else ''} open: {pids})"
    else:
        opened = " (no broker has it open)"
    queue_rows = [
        [q["name"], q["start_offset"], q["end_offset"], q["retained"], q["retention"], q.get("dead_letters")]
        for q in document["queues"]
    ]
    columns = ["queue", "name", "events", "ack", "position", "lag", "pending"]
    extra = (
        ["consumers", "held", "waiting", "ready", "redelivering"]
        if brokers is not None
        else ["consumers", "delivered", "acked"]
    )
    sub_rows = [[s.get(column) for column in (*columns, *extra)] for s in document["subscriptions"]]
    for row in sub_rows:
        if row[2] is None:
            row[2] = "*"
    return "\n".join(
        [
            f"{document['target']}{opened}",
            "",
            _table(["queue", "start", "end", "retained", "retention", "dead letters"], queue_rows),
            "",
            _table(["queue", "subscription", "events", "ack", "position", "lag", "pending", *extra], sub_rows)
            if sub_rows
            else "no durable subscriptions",
        ]
    )


def _info(args: Any, out: TextIO) -> int:
    if args.watch is None:
        document = _info_document(args.target)
        if args.json:
            _print_json(document, out)
        else:
            print(_format_info(document), file=out, flush=True)
        return 0
    interval = args.watch
    if not interval > 0:
        raise CommandError(f"--watch takes a positive number of seconds, got {interval!r}")
    in_place = out.isatty() and not args.json
    frames = 0
    try:
        while args.count is None or frames < args.count:
            if frames:
                time.sleep(interval)  # the refresh period, like top's
            document = _info_document(args.target)
            frames += 1
            if args.json:
                document["time"] = _iso(time.time())
                _print_json(document, out)  # JSON Lines: one document per refresh
                continue
            header = f"mqlite info, every {interval:g} s (Ctrl-C to stop), {_iso(time.time())}"
            if in_place:
                out.write("\x1b[H\x1b[2J")  # home and clear, as top does
            elif frames > 1:
                out.write("\n")
            print(f"{header}\n{_format_info(document)}", file=out, flush=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    return 0


# -- tail ----------------------------------------------------------------------------------------


def _message_document(message: mqlite.Message) -> dict[str, Any]:
    return {
        "queue": message.queue,
        "offset": message.offset,
        "event": message.event,
        "payload": message.payload,
        "key": message.key,
        "headers": dict(message.headers),
        "timestamp": message.timestamp,
        "time": _iso(message.timestamp),
    }


def _message_line(message: mqlite.Message) -> str:
    line = f"{message.offset}  {_iso(message.timestamp)}  {message.event}  {_dumps(message.payload)}"
    if message.key is not None:
        line += f"  key={_dumps(message.key)}"
    if message.headers:
        line += f"  headers={_dumps(dict(message.headers))}"
    return line


def _show_message(message: mqlite.Message, as_json: bool, out: TextIO) -> None:
    if as_json:
        _print_json(_message_document(message), out)
    else:
        print(_message_line(message), file=out, flush=True)


def _tail_broker(args: Any, out: TextIO) -> int:
    """``tail`` on a URL: an ephemeral subscription of its own, which consumes for no named one."""
    start = _position(args.start) if args.start is not None else "earliest"
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    shown = 0
    with _open_broker(args.target) as broker:
        if args.queue not in {queue.name for queue in broker.info().queues}:
            raise CommandError(f"queue {args.queue!r} does not exist on {args.target!r}")
        with broker.subscribe(args.queue, events=args.events or None, start=start) as sub:
            try:
                while args.count is None or shown < args.count:
                    want = TAIL_PAGE if args.count is None else min(TAIL_PAGE, args.count - shown)
                    wait = 0.0
                    if args.follow:
                        wait = FOLLOW_POLL if deadline is None else max(deadline - time.monotonic(), 0.0)
                    messages = sub.poll(want, timeout=wait)  # waits on the broker, not on time
                    for message in messages:
                        _show_message(message, args.json, out)
                    shown += len(messages)
                    if len(messages) == want:
                        continue
                    if not args.follow or (deadline is not None and time.monotonic() >= deadline):
                        break
            except KeyboardInterrupt:
                pass  # Ctrl-C is how a follow ends
    return 0


def _tail(args: Any, out: TextIO) -> int:
    events = _events(args.events)
    if args.count is not None and args.count < 0:
        raise CommandError(f"--count takes a number >= 0, got {args.count}")
    if _is_url(args.target):
        return _tail_broker(args, out)
    with _inspect(args.target, "tail") as inspector:
        offset = inspector.resolve(args.queue, _position(args.start) if args.start is not None else "earliest")
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        shown = 0
        try:
            while args.count is None or shown < args.count:
                want = TAIL_PAGE if args.count is None else min(TAIL_PAGE, args.count - shown)
                messages, offset = inspector.messages(args.queue, offset, events=events, limit=want)
                for message in messages:
                    if args.json:
                        _print_json(_message_document(message), out)
                    else:
                        print(_message_line(message), file=out, flush=True)
                shown += len(messages)
                if len(messages) == want:
                    continue  # perhaps more already there
                if not args.follow or (deadline is not None and time.monotonic() >= deadline):
                    break
                pause = FOLLOW_POLL if deadline is None else min(FOLLOW_POLL, max(deadline - time.monotonic(), 0.0))
                time.sleep(pause)  # another process publishes: nothing here to wait on but time
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a follow ends
    return 0


# -- publish -------------------------------------------------------------------------------------


def _payloads(argument: str | None, stdin: TextIO) -> list[Any]:
    """The payloads to publish, all parsed before anything is published."""
    if argument is None:
        return [None]
    if argument != "-":
        return [_json_argument(argument, "PAYLOAD")]
    payloads = []
    for number, line in enumerate(stdin, 1):
        if line.strip():
            payloads.append(_json_argument(line.strip(), f"line {number} of stdin"))
    return payloads


def _publish(args: Any, out: TextIO, stdin: TextIO) -> int:
    check_name("queue", args.queue)
    check_event_name(args.event)
    key = None if args.key is None else _json_argument(args.key, "--key")
    try:
        payloads = _payloads(args.payload, stdin)
    except CommandError as error:
        raise CommandError(f"{error}; nothing was published") from None
    with _open_broker(args.target) as broker:
        # One publish_many: the messages get contiguous offsets, all or none.
        published = broker.queue(args.queue).publish_many([(args.event, payload, key) for payload in payloads])
    offsets = [message.offset for message in published]
    if args.json:
        _print_json({"queue": args.queue, "offsets": offsets}, out)
    else:
        for offset in offsets:
            print(offset, file=out)
    return 0


# -- pending -------------------------------------------------------------------------------------


def _pending_of_broker(args: Any) -> list[dict[str, Any]]:
    """``pending`` on a URL, through ``Broker.pending_messages``: holders are named as the broker names them."""
    with _open_broker(args.target) as broker:
        try:
            listed = broker.pending_messages(args.queue, args.subscription)
        except mqlite.InvalidArgument as error:
            raise CommandError(str(error)) from None
    now = time.time()
    return [
        {
            "offset": p.offset,
            "event": p.message.event,
            "attempts": p.attempts,
            "state": {"out": "held"}.get(p.state, p.state),
            "owner": p.holder,
            "owner_pid": None,
            "owner_alive": True if p.holder is not None else None,  # the server reaps dead brokers' holds
            "since": p.held_since,
            "held_for": None if p.held_since is None else max(now - p.held_since, 0.0),
            "due": p.due,
            "due_in": None if p.due is None else max(p.due - now, 0.0),
        }
        for p in listed
    ]


def _pending(args: Any, out: TextIO) -> int:
    document = _pending_of_broker(args) if _is_url(args.target) else _pending_of_file(args)
    _show_pending(args, document, out)
    return 0


def _pending_of_file(args: Any) -> list[dict[str, Any]]:
    with _inspect(args.target, "pending") as inspector:
        rows = inspector.pending(args.queue, args.subscription)
    now = time.time()
    return [
        {
            "offset": p.offset,
            "event": p.event,
            "attempts": p.attempts,
            "state": p.state,
            "owner": p.owner,
            "owner_pid": _pid(p.owner),
            "owner_alive": p.alive,
            "since": p.since,
            "held_for": None if p.since is None or p.owner is None else max(now - p.since, 0.0),
            "due": p.due,
            "due_in": None if p.due is None else max(p.due - now, 0.0),
        }
        for p in rows
    ]


def _show_pending(args: Any, document: list[dict[str, Any]], out: TextIO) -> None:
    if args.json:
        _print_json({"queue": args.queue, "subscription": args.subscription, "pending": document}, out)
        return
    if not document:
        print(f"no pending messages on subscription {args.subscription!r} of {args.queue!r}", file=out)
        return
    table = [
        [
            d["offset"],
            d["event"] if d["event"] is not None else "(not stored)",
            d["attempts"],
            d["state"],
            _holder(d),
            "-" if d["owner"] is None else ("?" if d["held_for"] is None else _seconds(d["held_for"])),
            "-" if d["due"] is None else f"in {_seconds(d['due_in'])}",
        ]
        for d in document
    ]
    print(_table(["offset", "event", "attempts", "state", "holder", "held for", "due"], table), file=out)


def _pid(owner: str | None) -> int | None:
    if owner is None:
        return None
    pid = owner.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _holder(row: dict[str, Any]) -> str:
    if row["owner"] is None:
        return "-"
    alive = {True: "alive", False: "dead", None: "?"}[row["owner_alive"]]
    name = f"pid {row['owner_pid']}" if row["owner_pid"] is not None else row["owner"]
    return f"{name} ({alive})"


# -- dead letters --------------------------------------------------------------------------------


def _dead_letter_queue(args: Any) -> str:
    return str(args.dead_letter_queue or mqlite.dead_letter_queue_name(args.queue))


def _letter_document(letter: mqlite.Message, requeued: bool) -> dict[str, Any]:
    headers = letter.headers
    return {
        "offset": letter.offset,
        "event": letter.event,
        "payload": letter.payload,
        "key": letter.key,
        "time": _iso(letter.timestamp),
        "source_queue": headers.get("dead_letter.queue"),
        "source_offset": headers.get("dead_letter.offset"),
        "subscription": headers.get("dead_letter.subscription"),
        "deliveries": headers.get("dead_letter.deliveries"),
        "reason": headers.get("dead_letter.reason"),
        "error": headers.get("dead_letter.error"),
        "headers": {name: value for name, value in headers.items() if not name.startswith("dead_letter.")},
        "requeued": requeued,
    }


def _read_all(broker: mqlite.Broker, queue: str, start: Start = "earliest") -> list[mqlite.Message]:
    """Every retained message of ``queue`` from ``start``, through an ephemeral subscription (consumes nothing)."""
    messages: list[mqlite.Message] = []
    with broker.subscribe(queue, start=start) as reader:
        while batch := reader.poll(TAIL_PAGE, timeout=0):
            messages.extend(batch)
    return messages


def _dead_letters_of_broker(args: Any, dead_letter_queue: str) -> list[dict[str, Any]]:
    """The letters of ``dead_letter_queue`` on a URL, each marked whether it was requeued."""
    with _open_broker(args.target) as broker:
        info = broker.info()
        names = {queue.name for queue in info.queues}
        if dead_letter_queue not in names:
            if args.queue not in names:
                raise CommandError(f"queue {args.queue!r} does not exist on {args.target!r}")
            return []
        requeue = [s for s in info.subscriptions if s.queue == dead_letter_queue and s.name == REQUEUE_CURSOR]
        position = requeue[0].position if requeue else 0
        held = {p.offset for p in broker.pending_messages(dead_letter_queue, REQUEUE_CURSOR)} if requeue else set()
        return [
            _letter_document(m, m.offset < position and m.offset not in held)
            for m in _read_all(broker, dead_letter_queue)
        ]


def _dead_letters(args: Any, out: TextIO) -> int:
    dead_letter_queue = _dead_letter_queue(args)
    if args.requeue:
        return _requeue(args, dead_letter_queue, out)
    if _is_url(args.target):
        return _show_dead_letters(args, dead_letter_queue, _dead_letters_of_broker(args, dead_letter_queue), out)
    letters: list[dict[str, Any]] = []
    with _inspect(args.target, "dead-letters") as inspector:
        names = {queue.name for queue in inspector.queues()}
        if dead_letter_queue in names:
            done = _requeued_offsets(inspector, dead_letter_queue)
            offset = 0
            while True:
                batch, offset = inspector.messages(dead_letter_queue, offset, limit=TAIL_PAGE)
                letters.extend(_letter_document(m, done(m.offset)) for m in batch)
                if len(batch) < TAIL_PAGE:
                    break
        elif args.queue not in names:
            inspector.queue(args.queue)  # raises NotFound, naming the queues there are
    return _show_dead_letters(args, dead_letter_queue, letters, out)


def _show_dead_letters(args: Any, dead_letter_queue: str, letters: list[dict[str, Any]], out: TextIO) -> int:
    shown = letters if args.all else [letter for letter in letters if not letter["requeued"]]
    if args.json:
        _print_json({"queue": args.queue, "dead_letter_queue": dead_letter_queue, "dead_letters": shown}, out)
        return 0
    requeued = sum(1 for letter in letters if letter["requeued"])
    note = f" ({requeued} requeued before, not shown: see --all)" if requeued and not args.all else ""
    if not shown:
        print(f"no dead letters in {dead_letter_queue!r}{note}", file=out)
        return 0
    rows = [
        [
            d["offset"],
            d["time"],
            d["event"],
            f"{d['source_queue']}@{d['source_offset']}",
            d["subscription"],
            d["deliveries"],
            d["reason"] + (f": {d['error']}" if d["error"] else ""),
            _dumps(d["payload"]),
            *(["yes" if d["requeued"] else "no"] if args.all else []),
        ]
        for d in shown
    ]
    header = ["offset", "time", "event", "from", "subscription", "deliveries", "reason", "payload"]
    print(f"{len(shown)} dead letters in {dead_letter_queue!r}{note}", file=out)
    print(_table([*header, *(["requeued"] if args.all else [])], rows), file=out)
    return 0


def _requeued_offsets(inspector: Inspector, dead_letter_queue: str) -> Callable[[int], bool]:
    """Whether the dead letter at an offset was requeued: the requeue cursor acked it."""
    try:
        cursor = inspector.cursor(dead_letter_queue, REQUEUE_CURSOR)
    except NotFound:
        return lambda offset: False
    held = {p.offset for p in inspector.pending(dead_letter_queue, REQUEUE_CURSOR)}
    return lambda offset: offset < cursor.position and offset not in held


def _requeue(args: Any, dead_letter_queue: str, out: TextIO) -> int:
    """Publish each dead letter back to its source queue, once.

    The durable subscription :data:`REQUEUE_CURSOR` of the dead-letter queue reads the letters,
    with manual acks: each is published back, then acked. A crash between the two leaves the
    letter pending; the next run gets it again as a redelivery (``attempt`` > 1) and first looks
    for the copy in the source queue (by its ``requeued_from`` header), so it is not published twice.
    """
    if _is_url(args.target):
        with _open_broker(args.target) as broker:
            names = {queue.name for queue in broker.info().queues}
            if dead_letter_queue not in names:
                if args.queue not in names:
                    raise CommandError(f"queue {args.queue!r} does not exist on {args.target!r}")
                return _requeued_report(args, dead_letter_queue, [], out)
            done = _requeue_letters(
                args,
                broker,
                dead_letter_queue,
                lambda source, letter, mark: _find_copy_in(broker, source, letter, mark),
            )
        return _requeued_report(args, dead_letter_queue, done, out)
    with _inspect(args.target, "dead-letters --requeue") as inspector:
        names = {queue.name for queue in inspector.queues()}
        if dead_letter_queue not in names:
            if args.queue not in names:
                inspector.queue(args.queue)  # raises NotFound
            return _requeued_report(args, dead_letter_queue, [], out)
        with _open_broker(args.target) as broker:
            done = _requeue_letters(
                args,
                broker,
                dead_letter_queue,
                lambda source, letter, mark: _find_copy(inspector, source, letter, mark),
            )
    return _requeued_report(args, dead_letter_queue, done, out)


_FindCopy = Callable[[str, mqlite.Message, dict[str, Any]], "int | None"]


def _requeue_letters(
    args: Any, broker: mqlite.Broker, dead_letter_queue: str, find_copy: _FindCopy
) -> list[dict[str, Any]]:
    """Publish each letter back through the requeue cursor (see :func:`_requeue`); what was requeued."""
    done: list[dict[str, Any]] = []
    sub = broker.subscribe(dead_letter_queue, name=REQUEUE_CURSOR, start="earliest", ack="manual", max_deliveries=None)
    try:
        while batch := sub.poll(max_messages=100, timeout=0):
            for letter in batch:
                source = letter.headers.get("dead_letter.queue", args.queue)
                if not isinstance(source, str):
                    source = args.queue
                mark = {"queue": dead_letter_queue, "offset": letter.offset}
                copy = find_copy(source, letter, mark) if letter.attempt > 1 else None
                if copy is None:
                    headers = {k: v for k, v in letter.headers.items() if not k.startswith("dead_letter.")}
                    headers[REQUEUED_FROM] = mark
                    copy = broker.publish(source, letter.event, letter.payload, letter.key, headers).offset
                sub.ack(letter)
                done.append({"offset": letter.offset, "queue": source, "new_offset": copy})
    finally:
        sub.close()
    return done


def _find_copy_in(broker: mqlite.Broker, source: str, letter: mqlite.Message, mark: dict[str, Any]) -> int | None:
    """:func:`_find_copy` through a broker: the copy's offset in ``source``, read from the letter's time on."""
    since = datetime.fromtimestamp(letter.timestamp, UTC)
    return next((m.offset for m in _read_all(broker, source, since) if m.headers.get(REQUEUED_FROM) == mark), None)


def _find_copy(inspector: Inspector, source: str, letter: mqlite.Message, mark: dict[str, Any]) -> int | None:
    """The offset in ``source`` of the copy an interrupted requeue published of ``letter``, if any."""
    try:
        offset = inspector.resolve(source, datetime.fromtimestamp(letter.timestamp, UTC))
    except NotFound:
        return None
    while True:
        batch, offset = inspector.messages(source, offset, limit=TAIL_PAGE)
        for message in batch:
            if message.headers.get(REQUEUED_FROM) == mark:
                return message.offset
        if len(batch) < TAIL_PAGE:
            return None


def _requeued_report(args: Any, dead_letter_queue: str, done: list[dict[str, Any]], out: TextIO) -> int:
    if args.json:
        _print_json({"queue": args.queue, "dead_letter_queue": dead_letter_queue, "requeued": done}, out)
    elif not done:
        print(f"no dead letters to requeue in {dead_letter_queue!r}", file=out)
    else:
        for row in done:
            print(f"requeued {dead_letter_queue}@{row['offset']} -> {row['queue']}@{row['new_offset']}", file=out)
    return 0


# -- seek, delete-subscription, compact ----------------------------------------------------------


def _seek(args: Any, out: TextIO) -> int:
    target = _position(args.position)
    if _is_url(args.target):
        settings = None
        before = None
    else:
        with _inspect(args.target, "seek") as inspector:
            cursor = inspector.cursor(args.queue, args.subscription)
            settings, before = cursor.settings, cursor.position
    with _open_broker(args.target) as broker:
        if settings is None:
            try:
                broker.info().subscription(args.queue, args.subscription)
            except KeyError:
                raise CommandError(
                    f"{args.target!r} has no subscription {args.subscription!r} on {args.queue!r}"
                ) from None
            # BrokerInfo lacks some settings (retries, backoff): until it has them, a URL target's
            # subscription must be detached, or attached with the default ones.
            sub = broker.subscribe(args.queue, name=args.subscription)
        else:
            # Attach with the settings it has: other ones would replace them.
            sub = broker.subscribe(
                args.queue,
                events=settings.event_filter.spec,
                name=args.subscription,
                ack="manual" if settings.manual_ack else "auto",
                ack_timeout=settings.ack_timeout,
                max_deliveries=settings.max_deliveries,
                dead_letter=settings.dead_letter,
                backoff=settings.backoff,
            )
        try:
            position = sub.seek(target)
        finally:
            sub.close()
    if args.json:
        _print_json(
            {"queue": args.queue, "subscription": args.subscription, "position": position, "previous": before}, out
        )
    else:
        was = "" if before is None else f" (was {before})"
        print(f"subscription {args.subscription!r} of {args.queue!r} is now at offset {position}{was}", file=out)
    return 0


def _delete_subscription(args: Any, out: TextIO) -> int:
    check_name("queue", args.queue)
    check_name("subscription", args.subscription)
    pending = 0
    if not _is_url(args.target):
        with _inspect(args.target, "delete-subscription") as inspector:
            inspector.cursor(args.queue, args.subscription)  # NotFound if there is none
            rows = inspector.pending(args.queue, args.subscription)
        pending = len(rows)
        holders = sorted({str(_pid(p.owner) or p.owner) for p in rows if p.owner is not None and p.alive})
        if holders and not args.force:
            raise CommandError(
                f"subscription {args.subscription!r} of {args.queue!r} is in use: broker pid "
                f"{', '.join(holders)} holds some of its messages; stop its consumers first, or pass --force"
            )
    with _open_broker(args.target) as broker:
        if not broker.delete_subscription(args.queue, args.subscription):
            raise CommandError(f"{args.target!r} has no subscription {args.subscription!r} on queue {args.queue!r}")
    if args.json:
        _print_json({"queue": args.queue, "subscription": args.subscription, "deleted": True, "pending": pending}, out)
    else:
        print(f"deleted subscription {args.subscription!r} of {args.queue!r} ({pending} pending)", file=out)
    return 0


def _compact(args: Any, out: TextIO) -> int:
    if _is_url(args.target):
        raise CommandError(f"compact applies to files, not to {args.target!r}: a Redis server reclaims its own memory")
    before, after = compact(_check_file(args.target))
    if args.json:
        _print_json({"target": args.target, "bytes_before": before, "bytes_after": after, "freed": before - after}, out)
        return 0
    print(f"{args.target}: {before:,} -> {after:,} bytes (freed {before - after:,})", file=out)
    if after > before:
        print(
            "(the WAL could not be truncated while other connections read it; it shrinks at a later checkpoint)",
            file=out,
        )
    return 0


# == Parsing and running ======================================================================


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqlite",
        description="mqlite: an in-process message queue and pub/sub broker. Inspect and operate mqlite files.",
        epilog="TARGET is an mqlite file (never created by these commands). See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"mqlite {mqlite.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="tell the parcel-service story: competing drivers, a vendor catching up, a dead letter",
        description="Run a narrated demo of mqlite's public API; takes about a second.",
    )
    demo_parser.add_argument("--verbose", action="store_true", help="show every log record of the 'mqlite' logger")

    def command(name: str, help: str, *arguments: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        sub.add_argument("target", metavar="TARGET", help="an mqlite file")
        for argument in arguments:
            sub.add_argument(argument.lower(), metavar=argument)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub

    info = command("info", "show queues, durable subscriptions, positions, lag and pending messages")
    info.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C; with --json, one document per line",
    )
    info.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")

    tail = command("tail", "print messages of a queue without consuming them", "QUEUE")
    tail.add_argument(
        "--events", action="append", metavar="PATTERN", help="only these events (a name or wildcard; repeatable)"
    )
    tail.add_argument(
        "--from",
        dest="start",
        metavar="POSITION",
        help="earliest (default), latest (the end: only new ones), an offset, or an ISO time",
    )
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new messages until Ctrl-C")
    tail.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    tail.add_argument("--timeout", type=float, metavar="SECONDS", help="with --follow: stop after SECONDS")

    publish = command("publish", "publish a message (or one per line of stdin)", "QUEUE", "EVENT")
    publish.add_argument("payload", nargs="?", metavar="PAYLOAD", help="JSON (default null), or - for stdin")
    publish.add_argument("--key", metavar="JSON", help="the messages' key, as JSON")

    command("pending", "list a subscription's pending messages: holder, held for, attempts", "QUEUE", "SUBSCRIPTION")

    dead = command("dead-letters", "list the dead letters of a queue, or requeue them", "QUEUE")
    dead.add_argument("--requeue", action="store_true", help="publish each back to its source queue, once")
    dead.add_argument("--all", action="store_true", help="also list the dead letters requeued before")
    dead.add_argument("--dead-letter-queue", metavar="NAME", help="default: QUEUE.dead-letter")

    command("seek", "move a durable subscription to a POSITION", "QUEUE", "SUBSCRIPTION", "POSITION")
    delete = command("delete-subscription", "forget a durable subscription", "QUEUE", "SUBSCRIPTION")
    delete.add_argument("--force", action="store_true", help="even while a live broker holds its messages")
    command("compact", "reclaim free space in the file and report how much")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mqlite`` and the ``mqlite`` script. Returns the exit status.

    0: done; 1: a user error (printed to stderr, no traceback); 2: bad usage.
    """
    parser = _parser()
    args: Any = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "demo":
            return demo(sys.stdout, verbose=args.verbose)
        return _run(args, sys.stdout, sys.stdin)
    except (CommandError, MqliteError) as error:
        print(f"mqlite {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``mqlite tail ... | head``): stop quietly, and point stdout at
        # devnull so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args: Any, out: TextIO, stdin: TextIO) -> int:
    if args.command == "publish":
        return _publish(args, out, stdin)
    handlers: dict[str, Callable[[Any, TextIO], int]] = {
        "info": _info,
        "tail": _tail,
        "pending": _pending,
        "dead-letters": _dead_letters,
        "seek": _seek,
        "delete-subscription": _delete_subscription,
        "compact": _compact,
    }
    return handlers[args.command](args, out)
