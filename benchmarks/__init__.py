"""mqlite's benchmark suite: mqlite against its in-process peers, as ratios from one run.

Run it with ``python -m benchmarks`` (``--quick`` for a short run, ``--help`` for options). Each
scenario module builds a :class:`~benchmarks.harness.Scenario` for a mode (``"full"``,
``"quick"`` or ``"smoke"``, the last one for the test suite); :mod:`benchmarks.harness` runs it.
See ``docs/benchmarks.md`` for what each scenario measures and the latest results.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.aio import asyncio_scenario
from benchmarks.compat import compat_scenario
from benchmarks.durable import durable_scenario
from benchmarks.fanout import fanout_scenario
from benchmarks.harness import Mode, Scenario
from benchmarks.memory import memory_scenario
from benchmarks.on_redis import redis_scenario
from benchmarks.once import once_scenario
from benchmarks.publish import publish_scenario, scaling_scenario
from benchmarks.selective import selective_scenario
from benchmarks.threads import competing_scenario, cross_thread_scenario, latency_scenario

__all__ = ["SCENARIOS"]

SCENARIOS: dict[str, Callable[[Mode], Scenario]] = {
    "publish": publish_scenario,
    "fanout": fanout_scenario,
    "cross_thread": cross_thread_scenario,
    "latency": latency_scenario,
    "competing": competing_scenario,
    "selective": selective_scenario,
    "scaling": scaling_scenario,
    "memory": memory_scenario,
    "asyncio": asyncio_scenario,
    "durable": durable_scenario,
    "redis": redis_scenario,
    "compat": compat_scenario,
    "once": once_scenario,
}
"""Every scenario, in the order of issue 3, then asyncio (issue 4), durable (issue 5), redis (issue 15),
the compat faces (issue 19) and one-time delivery (issue 17)."""
