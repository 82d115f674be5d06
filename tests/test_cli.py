"""The command line: ``python -m mqlite demo`` tells its story, and ``--help`` works."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from mqlite.cli import main


def test_demo_tells_the_whole_story_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    caught_up = re.search(r"caught up on (\d+) updates it missed", out)
    assert caught_up is not None
    assert int(caught_up.group(1)) > 0
    assert "(a redelivery)" in out
    assert "ops reads a dead letter from 'parcels.dead-letter'" in out
    assert "dead_letter.reason = 'callback raised'" in out
    assert "[mqlite log] WARNING callback of subscription" in out
    # The info table: a header row and one row per subscription.
    assert re.search(r"^queue +subscription +events +mode +consumers +position +lag +pending", out, re.M)
    for name in ("vendor:acme-widgets", "vendor:1-800-flowers", "drivers", "billing", "ops"):
        assert re.search(rf"^parcels\S* +{re.escape(name)} ", out, re.M), name


def test_demo_restores_the_mqlite_logger() -> None:
    logger = logging.getLogger("mqlite")
    before = (logger.level, logger.propagate, list(logger.handlers))
    assert main(["demo"]) == 0
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_help_exits_0_and_lists_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_python_dash_m_mqlite_runs_the_demo() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mqlite", "demo"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "broker.info()" in result.stdout
