"""Scenario 6: a subscriber that wants 1 event type of 100, against the floor and a reader that scans."""

from __future__ import annotations

import gc
import time

import mqlite
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, chunks

__all__ = ["selective_scenario"]

EVENTS = [f"e{i}" for i in range(100)]
WANTED = "e7"
PAYLOAD = {"id": 1}
BATCH = 1000  # what each poll asks for, and each floor slice takes

SELECTIVE = "poll, wants 1 of 100"


def selective_scenario(mode: Mode) -> Scenario:
    """6. Cost per delivered message: events="e7" in a queue of 100 interleaved types, against
    slicing a list of the same messages (the floor), a reader that scans every message, and
    events=None."""
    per_event = {"full": 5000, "quick": 1500, "smoke": 3}[mode]
    total = per_event * len(EVENTS)
    pairs = [(EVENTS[i % len(EVENTS)], PAYLOAD) for i in range(total)]

    def filled(events: str | None) -> tuple[mqlite.Broker, mqlite.Subscription]:
        """A broker whose queue holds every message, laid out in memory as every case has them."""
        broker = mqlite.Broker()
        sub = broker.subscribe("q", events=events)
        queue = broker.queue("q")
        for start, size in enumerate(chunks(total, 10_000)):
            queue.publish_many(pairs[start * 10_000 : start * 10_000 + size])
        return broker, sub

    def settled() -> None:
        # Pay the garbage collector's debt for the fill now, not inside the timed reads: a full
        # collection over the queue would otherwise land in the few reads of the selective case.
        # Every case collects just before its clock starts, so every case starts as cold.
        gc.collect()

    def drain(events: str | None, how: str) -> Figures:
        """Time reading every message the subscription wants, per message read."""
        broker, sub = filled(events)
        expected = per_event if events is not None else total
        got = 0
        with broker:
            settled()
            start = time.perf_counter()
            if how == "poll":
                poll = sub.poll
                while batch := poll(BATCH, 0):
                    got += len(batch)
            else:
                get = sub.get
                while get(0) is not None:
                    got += 1
            seconds = time.perf_counter() - start
        if got != expected:
            raise RuntimeError(f"read {got} messages, expected {expected}")
        label = "wants 1 of 100" if events is not None else "wants all"
        return {f"{how}, {label}": seconds / got * 1e6}

    def the_log() -> tuple[mqlite.Broker, list[mqlite.Message]]:
        """A filled broker and every message of its queue, the very objects its log holds."""
        broker, sub = filled(None)
        log = sub.poll(total, 0)
        if len(log) != total:
            raise RuntimeError(f"read {len(log)} messages, expected {total}")
        return broker, log

    def floor() -> Figures:
        """The floor: slicing a plain list that holds the same scattered messages, per message."""
        broker, log = the_log()
        with broker:
            wanted = [m for m in log if m.event == WANTED]
            del log
            settled()
            got = 0
            start = time.perf_counter()
            for i in range(0, len(wanted), BATCH):
                got += len(wanted[i : i + BATCH])
            seconds = time.perf_counter() - start
        return {SELECTIVE: seconds / got * 1e6}

    def scan() -> Figures:
        """A reader without an index: test every message's event name, per match."""
        broker, log = the_log()
        with broker:
            settled()
            start = time.perf_counter()
            matching = [m for m in log if m[0] == WANTED]
            seconds = time.perf_counter() - start
        return {SELECTIVE: seconds / len(matching) * 1e6}

    cases = []
    for how in ("poll", "get"):
        cases += [
            Case("mqlite", lambda how=how: drain(WANTED, how)),
            Case("mqlite", lambda how=how: drain(None, how)),
        ]
    cases += [
        Case("list slice (floor)", floor),
        Case("scan every message", scan),
    ]
    units = {
        SELECTIVE: "µs/msg",
        "poll, wants all": "µs/msg",
        "get, wants 1 of 100": "µs/msg",
        "get, wants all": "µs/msg",
    }
    return Scenario(
        key="selective",
        number=6,
        title="Selective filter",
        about=(
            f"A queue holds {total:,} messages of 100 event types, interleaved. One subscription wants "
            f'`events="{WANTED}"` (1 message in 100), another wants everything; each reads all it wants '
            f"with `poll({BATCH}, 0)` or `get(0)`. Figure: time per message delivered. The floor slices, "
            f"{BATCH} at a time, a plain list holding the same message objects the selective reader gets, "
            "scattered in memory as they are in the log (one cache miss each). The scanning reader is a "
            "list comprehension over every message of the log that keeps the wanted ones: time per match."
        ),
        units=units,
        cases=cases,
        targets=[
            Target(
                "selective poll: per match <= 1.5x slicing a list of the same messages",
                SELECTIVE,
                "<=",
                1.5,
                (SELECTIVE, "list slice (floor)"),
            ),
            Target(
                "selective poll: per match <= 0.1x scanning every message (10x faster)",
                SELECTIVE,
                "<=",
                0.1,
                (SELECTIVE, "scan every message"),
            ),
            Target(
                "selective get: per match <= 3x per message of wants-all",
                "get, wants 1 of 100",
                "<=",
                3,
                ("get, wants all", "mqlite"),
            ),
        ],
        params={"messages in the queue": total},
    )
