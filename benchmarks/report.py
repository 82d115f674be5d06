"""Markdown tables and the JSON document for one run of the suite."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.harness import LOWER_IS_BETTER, Record, Scenario, TargetResult, is_mqlite

__all__ = ["machine", "markdown_scenario", "markdown_targets", "run_info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line describing the machine: cores, architecture, CPU model, OS."""
    return f"{os.cpu_count()} cores, {platform.machine()}, {_cpu_model()}, {platform.system()} {platform.release()}"


def run_info(mode: str, rounds: int) -> dict[str, Any]:
    """What the JSON document says about this run."""
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": machine(),
        "mode": mode,
        "rounds": rounds,
    }


def fmt(value: float, unit: str) -> str:
    """A value with about three significant digits, in the unit's usual style."""
    if unit == "msgs/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M"
        if value >= 1e3:
            return f"{value / 1e3:.0f}k"
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _ratios(record: Record) -> str:
    if not record.ratios:
        return ""
    if len(record.ratios) == 1:
        return _ratio(next(iter(record.ratios.values())))
    return "; ".join(f"{system}: {_ratio(value)}" for system, value in record.ratios.items())


def markdown_scenario(scenario: Scenario, records: Sequence[Record], results: Sequence[TargetResult]) -> str:
    """The scenario's heading, what it measures, its results table and its targets."""
    lines = [f"### {scenario.number}. {scenario.title}", "", scenario.about, ""]
    if scenario.params:
        lines += ["Sizes: " + ", ".join(f"{k} {v:,}" for k, v in scenario.params.items()) + ".", ""]
    if scenario.skip:
        return "\n".join([*lines, f"Skipped: {scenario.skip}", ""])
    lines += [
        "| figure | system | median | min - max | unit | mqlite ÷ system |",
        "|---|---|---:|---:|---|---:|",
    ]
    for rec in records:
        if not rec.values:
            lines.append(f"| {rec.figure} | {rec.system} | {rec.status}: {rec.reason} | | | |")
            continue
        better = "lower" if LOWER_IS_BETTER[rec.unit] else "higher"
        lo, hi = fmt(min(rec.values), rec.unit), fmt(max(rec.values), rec.unit)
        name = f"**{rec.system}**" if is_mqlite(rec.system) else rec.system
        lines.append(
            f"| {rec.figure} | {name} | {fmt(rec.median, rec.unit)} | {lo} - {hi} | {rec.unit} ({better} is better) "
            f"| {_ratios(rec)} |"
        )
    lines.append("")
    if results:
        lines += [markdown_targets(results), ""]
    return "\n".join(lines)


def markdown_targets(results: Sequence[TargetResult]) -> str:
    """A table of targets with the measured ratio and PASS/MISS."""
    lines = ["| target | measured | result |", "|---|---:|---|"]
    for result in results:
        measured = "—" if result.measured is None else _measured(result)
        lines.append(f"| {result.target.label} | {measured} | **{result.verdict}** |")
    return "\n".join(lines)


def _measured(result: TargetResult) -> str:
    assert result.measured is not None
    if result.target.versus is None:
        return f"{result.measured:.0f}"
    return _ratio(result.measured)
