"""``python -m benchmarks``: run the suite, print Markdown tables, write the JSON results."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import SCENARIOS
from benchmarks.harness import Mode, TargetResult, evaluate_targets, run_scenario
from benchmarks.report import markdown_scenario, markdown_targets, run_info

DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: the whole suite in under 2 minutes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per scenario (default 5, min 1)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})"
    )
    parser.add_argument("--markdown", type=Path, help="also write the Markdown report to this file")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only these: {', '.join(SCENARIOS)}",
    )
    # Tiny sizes for the test suite, which checks that the code runs and never times it.
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode: Mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    rounds = max(args.rounds, 1)
    info = run_info(mode, rounds)
    header = (
        f"# mqlite benchmarks ({mode}, {rounds} rounds)\n\n"
        f"{info['date']} · Python {info['python']} ({info['implementation']}) · {info['machine']}\n"
    )
    print(header, flush=True)
    sections = [header]
    records = []
    all_results: list[TargetResult] = []
    began = time.perf_counter()
    for key in args.only or SCENARIOS:
        scenario = SCENARIOS[key](mode)
        started = time.perf_counter()
        scenario_records = run_scenario(
            scenario, rounds, lambda note: print(f"  … {note}", file=sys.stderr, flush=True)
        )
        results = evaluate_targets(scenario, scenario_records)
        section = markdown_scenario(scenario, scenario_records, results)
        print(section, flush=True)
        print(f"  ({key} took {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
        sections.append(section)
        records += scenario_records
        all_results += results
    summary = "## Targets\n\n" + markdown_targets(all_results) + "\n"
    print(summary)
    sections.append(summary)
    print(f"(whole run: {time.perf_counter() - began:.0f} s)", file=sys.stderr)
    document = {
        "run": info,
        "records": [r.as_json() for r in records],
        "targets": [
            {
                "scenario": r.scenario,
                "target": r.target.label,
                "measured": r.measured,
                "op": r.target.op,
                "threshold": r.target.threshold,
                "verdict": r.verdict,
            }
            for r in all_results
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown is not None:
        args.markdown.write_text("\n".join(sections), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
