"""Every Python block in the docs and the README runs, and prints what its comments say.

A page's fenced ``python`` blocks run in order as one program, the way a reader follows them
(the tutorial builds on its earlier blocks), in a temporary directory, with a timeout. Blocks
fenced ``py`` are fragments or signatures and are not run. Where a line reads
``print(...)  # text``, what the block printed must contain ``text`` up to its first ``": "``
or ``" ("``, the explanation that may follow it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_EXPECTED = re.compile(r"^\s*print\(.*\)\s+#\s(.+)$")
_MARK = "\x00mqlite-docs-block "


def _expected(code: str) -> list[str]:
    found = []
    for line in code.splitlines():
        match = _EXPECTED.match(line)
        if match:
            found.append(re.split(r": | \(", match.group(1).strip(), maxsplit=1)[0].strip())
    return found


PAGES_WITH_CODE = [page for page in PAGES if _BLOCK.search(page.read_text())]


def test_the_docs_have_python_blocks() -> None:
    assert sum(len(_BLOCK.findall(page.read_text())) for page in PAGES) > 20


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_every_block_of_a_page_runs_and_prints_what_it_says(page: Path, tmp_path: Path) -> None:
    blocks = _BLOCK.findall(page.read_text())
    program = "\n".join(f"print({_MARK + str(n)!r})\n{code}" for n, code in enumerate(blocks, 1))
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    outputs = result.stdout.split(_MARK)[1:]
    ran = len(outputs)
    assert result.returncode == 0, f"{page.name}: block {ran} of {len(blocks)} failed:\n{result.stderr[-3000:]}"
    for n, (code, output) in enumerate(zip(blocks, outputs, strict=True), 1):
        for text in _expected(code):
            assert text in output, f"{page.name} block {n}: expected {text!r} in what it printed:\n{output}"
