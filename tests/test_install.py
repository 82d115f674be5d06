"""After the README's install, mypy finds mqlite's types, and ``python -m mqlite`` runs from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def test_mypy_finds_the_installed_package_and_its_types(tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text("import mqlite\n\nbroker: mqlite.Broker = mqlite.Broker()\nreveal_type(broker.publish)\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", str(user)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "import-not-found" not in result.stdout, result.stdout
    assert "-> mqlite.message.Message" in result.stdout, result.stdout


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_python_m_mqlite_runs_from_the_folder_that_holds_a_clone_named_mqlite(tmp_path: Path) -> None:
    (tmp_path / "mqlite").symlink_to(ROOT, target_is_directory=True)  # as if cloned into ./mqlite
    result = subprocess.run(
        [sys.executable, "-m", "mqlite", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
