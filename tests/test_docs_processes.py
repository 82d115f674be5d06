"""durability.md's two-process example works whichever process starts first, on a fresh file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_BLOCKS = re.findall(r"^```py\n(# process [AB].*?)^```", (ROOT / "docs" / "durability.md").read_text(), re.S | re.M)
TIMEOUT = 60


def _program(name: str) -> str:
    return next(block for block in _BLOCKS if block.startswith(f"# process {name}"))


def test_the_page_has_both_processes() -> None:
    assert len(_BLOCKS) == 2


@pytest.mark.parametrize("first", ["A", "B"])
def test_the_driver_gets_the_job_whichever_process_starts_first(tmp_path: Path, first: str) -> None:
    driver = _program("B") + "\nprint('got', job.payload if job is not None else None)\n"
    vendor = _program("A")
    if first == "A":
        subprocess.run([sys.executable, "-c", vendor], cwd=tmp_path, check=True, timeout=TIMEOUT)
        result = subprocess.run(
            [sys.executable, "-c", driver], cwd=tmp_path, check=True, timeout=TIMEOUT, capture_output=True, text=True
        )
    else:
        with subprocess.Popen(
            [sys.executable, "-c", driver], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as process:
            # The driver may or may not have subscribed yet when the vendor publishes: both work.
            subprocess.run([sys.executable, "-c", vendor], cwd=tmp_path, check=True, timeout=TIMEOUT)
            out, err = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, err
        result = subprocess.CompletedProcess(process.args, 0, out, "")
    assert "got {'id': 7}" in result.stdout
