"""Scenario 2: push fanout, from the first publish until every callback has run."""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import mqlite
from benchmarks import peers
from benchmarks.harness import Case, Figures, Mode, Scenario, Target

__all__ = ["fanout_scenario"]

PAYLOAD = {"id": 1}
_topics = itertools.count()


class Tally:
    """The trivial callback every system calls: it counts. One per subscriber."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def hit(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1


def _check(tallies: list[Tally], expected: int, system: str) -> None:
    total = sum(t.calls for t in tallies)
    if total != expected * len(tallies):
        raise RuntimeError(f"{system}: {total} callback calls, expected {expected * len(tallies)}")


def fanout_scenario(mode: Mode) -> Scenario:
    """2. Fanout to N = 1, 10, 100 trivial callbacks: time per publish until all have run."""
    fanouts = (1, 10, 100) if mode != "smoke" else (1, 3)
    calls = {"full": 200_000, "quick": 50_000, "smoke": 60}[mode]  # callback calls per round and N

    def messages(n: int) -> int:
        return max(calls // n, 20)

    sustained = {"full": 20_000, "quick": 20_000, "smoke": 60}[mode]  # publishes per sustained round, at every N

    def per_publish(seconds: float, n: int) -> Figures:
        return {f"N={n}": seconds / messages(n) * 1e6}

    def run_mqlite(n: int) -> Figures:
        m = messages(n)
        tallies = [Tally() for _ in range(n)]
        with mqlite.Broker() as broker:
            for tally in tallies:
                broker.subscribe("q", callback=tally.hit)
            publish = broker.publish
            start = time.perf_counter()
            for _ in range(m):
                publish("q", "e", PAYLOAD)
            if not broker.drain(timeout=120):
                raise TimeoutError("broker.drain timed out")
            seconds = time.perf_counter() - start
        _check(tallies, m, "mqlite")
        return per_publish(seconds, n)

    def run_sustained(n: int) -> Figures:
        """The shape users run: a steady stream of publishes while the callbacks already run.

        ``sustained`` messages at every N (not ``calls // N``), so at N = 100 the push threads
        wake while the publisher is still publishing. Also counts context switches per publish
        (voluntary and involuntary, of the whole process).
        """
        tallies = [Tally() for _ in range(n)]
        with mqlite.Broker() as broker:
            for tally in tallies:
                broker.subscribe("q", callback=tally.hit)
            publish = broker.publish
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            for _ in range(sustained):
                publish("q", "e", PAYLOAD)
            if not broker.drain(timeout=300):
                raise TimeoutError("broker.drain timed out")
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
        _check(tallies, sustained, "mqlite sustained")
        switches = (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw)
        return {f"N={n} sustained": seconds / sustained * 1e6, f"switches N={n}": switches / sustained}

    def run_loop(n: int) -> Figures:
        m = messages(n)
        tallies = [Tally() for _ in range(n)]
        callbacks: list[Callable[[Any], None]] = [t.hit for t in tallies]
        start = time.perf_counter()
        for _ in range(m):
            for callback in callbacks:
                callback(PAYLOAD)
        seconds = time.perf_counter() - start
        _check(tallies, m, "loop")
        return per_publish(seconds, n)

    def run_blinker(n: int) -> Figures:
        assert peers.blinker is not None
        m = messages(n)
        tallies = [Tally() for _ in range(n)]
        signal = peers.blinker.Signal()
        for tally in tallies:
            signal.connect(tally.hit, weak=False)
        send = signal.send
        start = time.perf_counter()
        for _ in range(m):
            send(PAYLOAD)
        seconds = time.perf_counter() - start
        _check(tallies, m, "blinker")
        return per_publish(seconds, n)

    def run_pyee(n: int) -> Figures:
        assert peers.pyee is not None
        m = messages(n)
        tallies = [Tally() for _ in range(n)]
        emitter = peers.pyee.EventEmitter()
        for tally in tallies:
            emitter.on("e", tally.hit)
        emit = emitter.emit
        start = time.perf_counter()
        for _ in range(m):
            emit("e", PAYLOAD)
        seconds = time.perf_counter() - start
        _check(tallies, m, "pyee")
        return per_publish(seconds, n)

    def run_pypubsub(n: int) -> Figures:
        pub = peers.pubsub
        assert pub is not None
        m = messages(n)
        tallies = [Tally() for _ in range(n)]
        topic = f"bench_fanout_{next(_topics)}"
        listeners = [lambda msg, t=tally: t.hit(msg) for tally in tallies]  # pypubsub needs named args
        for listener in listeners:
            pub.subscribe(listener, topic)
        send = pub.sendMessage
        try:
            start = time.perf_counter()
            for _ in range(m):
                send(topic, msg=PAYLOAD)
            seconds = time.perf_counter() - start
        finally:
            pub.unsubAll(topicName=topic)
        _check(tallies, m, "pypubsub")
        return per_publish(seconds, n)

    cases: list[Case] = []
    optional = {
        "blinker": (peers.blinker, run_blinker),
        "pypubsub": (peers.pubsub, run_pypubsub),
        "pyee": (peers.pyee, run_pyee),
    }
    for n in fanouts:
        cases.append(Case("mqlite", partial(run_mqlite, n)))
        cases.append(Case("mqlite sustained", partial(run_sustained, n)))
        for system, (module, runner) in optional.items():
            if module is not None:
                cases.append(Case(system, partial(runner, n)))
        cases.append(Case("loop over callables (floor)", partial(run_loop, n)))
    for system, (module, _) in optional.items():
        if module is None:
            cases.append(Case(system, None, peers.missing(system)))
    # Issue 18: the targets hold for sustained publishing, and replace issue 3's, which were set on
    # the burst shape (the burst ratios are still in the figures table). pyee and the loop call
    # inline, so their per-publish cost has one shape; mqlite's sustained figure is set against it.
    targets = [
        Target(
            f"fanout N={n} sustained: mqlite <= {limit}x pyee",
            f"N={n} sustained",
            "<=",
            limit,
            versus=(f"N={n}", "pyee"),
            system="mqlite sustained",
        )
        for n, limit in ((n, 1.0 if n == 1 else 0.5) for n in fanouts)
    ]
    targets += [
        Target(
            f"fanout N={n} sustained: mqlite <= 2.5x loop",
            f"N={n} sustained",
            "<=",
            2.5,
            versus=(f"N={n}", "loop over callables (floor)"),
            system="mqlite sustained",
        )
        for n in fanouts[1:]
    ]
    units = {f"N={n}": "µs/msg" for n in fanouts}
    units.update({f"N={n} sustained": "µs/msg" for n in fanouts})
    units.update({f"switches N={n}": "switches/msg" for n in fanouts})
    return Scenario(
        key="fanout",
        number=2,
        title="Push fanout",
        about=(
            "Time per publish until every one of N callbacks (each bumps a counter) has run. mqlite: N "
            "push subscriptions on the default thread dispatcher (a pool of delivery threads shared by "
            "the subscriptions); publish M messages, then "
            "`broker.drain()`; the clock stops when drain returns. Peers call their receivers "
            "synchronously inside `send`/`emit`/`sendMessage`; the floor is a Python loop over a list "
            "of callables. Two shapes for mqlite: burst (M = calls // N messages, so at N = 100 the "
            "publisher finishes before the push threads wake) and sustained (20,000 publishes at every "
            "N, callbacks running while publishing goes on), with the process's context switches per "
            "publish."
        ),
        units=units,
        cases=cases,
        targets=targets,
        params={"callback calls per round": calls, "sustained publishes per round": sustained},
    )
