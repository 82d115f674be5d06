"""The benchmark code runs: one tiny round of every scenario. Nothing here is timed or compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import SCENARIOS, durable, peers
from benchmarks.__main__ import main
from benchmarks.harness import Record, Scenario, evaluate_targets, is_mqlite, run_scenario
from benchmarks.report import markdown_scenario


def _run_once(key: str) -> tuple[Scenario, list[Record]]:
    scenario = SCENARIOS[key]("smoke")
    return scenario, run_scenario(scenario, rounds=1)


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_scenario_runs_one_tiny_round(key: str) -> None:
    scenario, records = _run_once(key)
    errors = [f"{r.system}: {r.reason}" for r in records if r.status == "error"]
    assert errors == []
    if not scenario.skip:
        assert any(r.values for r in records if r.system.startswith("mqlite"))
    # The report renders, and every target names figures the scenario declares.
    assert scenario.title in markdown_scenario(scenario, records, evaluate_targets(scenario, records))
    for target in scenario.targets:
        assert target.figure in scenario.units
        assert target.versus is None or target.versus[0] in scenario.units


@pytest.mark.parametrize("key", ["publish", "fanout", "cross_thread", "asyncio", "durable"])
def test_missing_peers_are_skipped_not_fatal(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("blinker", "pyee", "janus", "pubsub"):
        monkeypatch.setattr(peers, module, None)
    for module in ("persistqueue", "litequeue"):  # the durable scenario's own peers
        monkeypatch.setattr(durable, module, None)
    scenario, records = _run_once(key)
    assert [r for r in records if r.status == "error"] == []
    skipped = {r.system for r in records if r.status == "skipped"}
    assert skipped, "a scenario with peers should report the missing ones as skipped"
    if not scenario.skip:
        assert any(r.values for r in records if is_mqlite(r.system)), "mqlite still runs without the peers"


def test_command_line_writes_json_records(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert main(["--smoke", "--rounds", "1", "--only", "publish", "memory", "--json", str(out)]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["run"]["mode"] == "smoke"
    systems = {(r["scenario"], r["system"]) for r in document["records"]}
    assert ("publish", "mqlite") in systems
    assert ("memory", "mqlite") in systems
    assert all(t["verdict"] in ("PASS", "MISS", "n/a") for t in document["targets"])
