"""Scenario 6: a subscriber that wants 1 event type of 100, against one that wants everything."""

from __future__ import annotations

import gc
import time

import mqlite
from benchmarks.harness import Case, Figures, Mode, Scenario, Target, chunks

__all__ = ["selective_scenario"]

EVENTS = [f"e{i}" for i in range(100)]
WANTED = "e7"
PAYLOAD = {"id": 1}


def selective_scenario(mode: Mode) -> Scenario:
    """6. Cost per delivered message: events="e7" in a queue of 100 interleaved types vs events=None."""
    per_event = {"full": 5000, "quick": 1500, "smoke": 3}[mode]
    total = per_event * len(EVENTS)
    pairs = [(EVENTS[i % len(EVENTS)], PAYLOAD) for i in range(total)]

    def filled(events: str | None) -> tuple[mqlite.Broker, mqlite.Subscription]:
        broker = mqlite.Broker()
        sub = broker.subscribe("q", events=events)
        queue = broker.queue("q")
        for start, size in enumerate(chunks(total, 10_000)):
            queue.publish_many(pairs[start * 10_000 : start * 10_000 + size])
        # Pay the garbage collector's debt for the fill now, not inside the timed reads: a full
        # collection over the queue would otherwise land in the few reads of the selective case.
        gc.collect()
        return broker, sub

    def drain(events: str | None, how: str) -> Figures:
        """Time reading every message the subscription wants, per message read."""
        broker, sub = filled(events)
        expected = per_event if events is not None else total
        got = 0
        with broker:
            start = time.perf_counter()
            if how == "poll":
                poll = sub.poll
                while batch := poll(1000, 0):
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

    def scan(how: str) -> Figures:
        """The floor a reader without an index pays: test every message's event name."""
        log = [(event, payload, offset) for offset, (event, payload) in enumerate(pairs)]
        start = time.perf_counter()
        matching = [m for m in log if m[0] == WANTED]
        seconds = time.perf_counter() - start
        return {f"{how}, wants 1 of 100": seconds / len(matching) * 1e6}

    cases = []
    for how in ("poll", "get"):
        cases += [
            Case("mqlite", lambda how=how: drain(WANTED, how)),
            Case("mqlite", lambda how=how: drain(None, how)),
        ]
    cases.append(Case("list scan (no index)", lambda: scan("poll")))
    units = {
        "poll, wants 1 of 100": "µs/msg",
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
            "with `poll(1000, 0)` or `get(0)`. Figure: time per message delivered. For comparison, a list "
            "comprehension that scans every entry for the wanted name, per match."
        ),
        units=units,
        cases=cases,
        targets=[
            Target(
                "selective poll: per match <= 3x per message of wants-all",
                "poll, wants 1 of 100",
                "<=",
                3,
                ("poll, wants all", "mqlite"),
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
