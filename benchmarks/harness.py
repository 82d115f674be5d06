"""The benchmark harness: scenarios made of cases, interleaved rounds, statistics, targets, tables.

A *scenario* (publish, fanout, ...) holds *cases*. A case is one system (``"mqlite"``, ``"pyee"``,
...) measured once per round; one run of it yields one or more *figures* (``"N=10"``,
``"get p99"``, ...) in the scenario's units. Every round runs every case once, in an order that
rotates from round to round, so that mqlite and its peers share the same noise. Only ratios
taken within one run mean anything on a shared machine.

Not thread-safe: one scenario runs at a time, on the calling thread (cases may start threads of
their own and always join them).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "LOWER_IS_BETTER",
    "Case",
    "Figures",
    "Mode",
    "Record",
    "Scenario",
    "Target",
    "TargetResult",
    "Timer",
    "Worker",
    "chunks",
    "evaluate_targets",
    "is_mqlite",
    "join_all",
    "run_scenario",
    "run_threads",
]

Mode = Literal["full", "quick", "smoke"]
Figures = Mapping[str, float]

# Units a figure may have, and which way is better.
LOWER_IS_BETTER: dict[str, bool] = {
    "µs/msg": True,
    "µs": True,
    "B/msg": True,
    "msgs/s": False,
    "switches/msg": True,
}


def is_mqlite(system: str) -> bool:
    """Whether ``system`` is mqlite (or a variant of it, such as ``"mqlite poll"``)."""
    return system == "mqlite" or system.startswith("mqlite ")


@dataclass(frozen=True)
class Case:
    """One system in one scenario: ``run()`` measures it once and returns figure -> value.

    A peer that is not installed gets ``run=None`` and says why in ``skip``.
    """

    system: str
    run: Callable[[], Figures] | None
    skip: str = ""


@dataclass(frozen=True)
class Target:
    """A goal from issue 3: ``figure`` of ``system``, divided by ``versus`` if given, ``op`` ``threshold``.

    ``versus`` is (figure, system); without it the target is an absolute bound (memory).
    """

    label: str
    figure: str
    op: Literal["<=", ">="]
    threshold: float
    versus: tuple[str, str] | None = None
    system: str = "mqlite"


@dataclass
class Scenario:
    """A numbered scenario of issue 3 (or 4): what it measures, its cases and its targets."""

    key: str
    number: int
    title: str
    about: str
    units: Mapping[str, str]  # figure -> unit, in display order
    cases: Sequence[Case]
    targets: Sequence[Target] = ()
    skip: str = ""  # the whole scenario is skipped (say, the async API is missing)
    params: Mapping[str, Any] = field(default_factory=dict)  # sizes, shown in the report


@dataclass
class Record:
    """Every value of one figure of one system in one scenario: the JSON record."""

    scenario: str
    figure: str
    system: str
    unit: str
    values: list[float] = field(default_factory=list)
    status: Literal["ok", "skipped", "error"] = "ok"
    reason: str = ""
    ratios: dict[str, float] = field(default_factory=dict)  # mqlite system -> mqlite ÷ this

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_json(self) -> dict[str, Any]:
        ok = bool(self.values)
        return {
            "scenario": self.scenario,
            "figure": self.figure,
            "system": self.system,
            "unit": self.unit,
            "better": "lower" if LOWER_IS_BETTER[self.unit] else "higher",
            "status": self.status,
            "reason": self.reason,
            "rounds": len(self.values),
            "median": self.median if ok else None,
            "min": min(self.values) if ok else None,
            "max": max(self.values) if ok else None,
            "values": self.values,
            "mqlite_ratio": self.ratios,
        }


@dataclass(frozen=True)
class TargetResult:
    """A target checked against one run's medians."""

    scenario: str
    target: Target
    measured: float | None  # the ratio (or absolute value); None when a side is missing

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "n/a"
        t = self.target
        ok = self.measured <= t.threshold if t.op == "<=" else self.measured >= t.threshold
        return "PASS" if ok else "MISS"


def _rotated(cases: Sequence[Case], by: int) -> list[Case]:
    if not cases:
        return []
    by %= len(cases)
    return [*cases[by:], *cases[:by]]


def run_scenario(
    scenario: Scenario,
    rounds: int,
    progress: Callable[[str], None] | None = None,
) -> list[Record]:
    """Run every case of ``scenario`` ``rounds`` times, interleaved, and return one record per figure/system."""
    records: dict[tuple[str, str], Record] = {}

    def record(figure: str, system: str) -> Record:
        unit = scenario.units.get(figure)
        if unit is None:
            raise KeyError(f"scenario {scenario.key!r} produced undeclared figure {figure!r}")
        key = (figure, system)
        if key not in records:
            records[key] = Record(scenario.key, figure, system, unit)
        return records[key]

    def whole_system(system: str, status: Literal["skipped", "error"], reason: str) -> Record:
        # One row standing for every figure of the system (or of the scenario, for system "*").
        unit = next(iter(scenario.units.values()), "µs")
        return records.setdefault(("*", system), Record(scenario.key, "*", system, unit, status=status, reason=reason))

    if scenario.skip:
        return [whole_system("*", "skipped", scenario.skip)]
    for case in scenario.cases:
        if case.run is None:
            whole_system(case.system, "skipped", case.skip)
    failed: set[str] = set()
    runnable = [c for c in scenario.cases if c.run is not None]
    for n in range(rounds):
        for case in _rotated(runnable, n):
            if case.system in failed:
                continue
            assert case.run is not None
            gc.collect()
            try:
                figures = case.run()
            except Exception as error:  # noqa: BLE001  # one broken system must not stop the suite
                failed.add(case.system)
                whole_system(case.system, "error", f"{type(error).__name__}: {error}")
                continue
            for figure, value in figures.items():
                record(figure, case.system).values.append(float(value))
        if progress is not None:
            progress(f"{scenario.key}: round {n + 1}/{rounds} done")
    result = list(records.values())
    _fill_ratios(result)
    order = {figure: i for i, figure in enumerate(scenario.units)}
    systems: dict[str, int] = {}
    for case in scenario.cases:
        systems.setdefault(case.system, len(systems))
    result.sort(key=lambda r: (order.get(r.figure, len(order)), systems.get(r.system, 0)))
    return result


def _fill_ratios(records: list[Record]) -> None:
    by_figure: dict[str, list[Record]] = {}
    for rec in records:
        if rec.values:
            by_figure.setdefault(rec.figure, []).append(rec)
    for group in by_figure.values():
        mine = [r for r in group if is_mqlite(r.system)]
        for rec in group:
            if is_mqlite(rec.system) or rec.median == 0:
                continue
            rec.ratios = {m.system: m.median / rec.median for m in mine}


def evaluate_targets(scenario: Scenario, records: Sequence[Record]) -> list[TargetResult]:
    """Check each target of ``scenario`` against the medians in ``records``."""
    medians = {(r.figure, r.system): r.median for r in records if r.values}
    results = []
    for target in scenario.targets:
        value = medians.get((target.figure, target.system))
        measured: float | None = value
        if value is not None and target.versus is not None:
            base = medians.get(target.versus)
            measured = value / base if base else None
        results.append(TargetResult(scenario.key, target, measured))
    return results


# -- helpers for cases that run threads ------------------------------------------------------


class Timer:
    """A perf_counter stopwatch: ``with Timer() as t: ...`` then ``t.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def join_all(threads: Sequence[threading.Thread], timeout: float) -> None:
    """Join ``threads`` within ``timeout`` seconds in all; raise TimeoutError if one is still alive."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        raise TimeoutError(f"benchmark threads still running after {timeout:.0f} s: {alive}")


class Worker(threading.Thread):
    """A daemon thread that keeps the exception its target raised, to re-raise on the caller's side."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._body = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._body()
        except BaseException as error:  # noqa: BLE001  # re-raised by check() on the main thread
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def run_threads(workers: Sequence[Worker], timeout: float) -> None:
    """Start ``workers``, join them within ``timeout`` and re-raise the first error one of them hit."""
    try:
        for worker in workers:
            worker.start()
    finally:
        join_all([w for w in workers if w.ident is not None], timeout)
    for worker in workers:
        worker.check()


def chunks(total: int, size: int) -> Iterator[int]:
    """Sizes of consecutive chunks of at most ``size`` adding up to ``total``."""
    while total > 0:
        step = min(size, total)
        yield step
        total -= step
