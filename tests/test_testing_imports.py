"""``mqlite.testing`` imports with only mqlite's runtime dependencies: its pytest and hypothesis
parts load only when used. Checked in a fresh interpreter in which neither package imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SAFETY = 60.0  # real seconds the child interpreter may take

_BLOCK = """
import sys

class NotInstalled:
    # Makes pytest and hypothesis look absent: any import of them fails as a missing package does.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "_pytest", "hypothesis"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def _run(body: str) -> str:
    code = _BLOCK + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SAFETY, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_toolkit_works_without_pytest_or_hypothesis() -> None:
    out = _run(
        """
        import mqlite
        from mqlite.testing import Faults, VirtualClock, checkers, record, run_until_idle

        clock = VirtualClock(autojump=True)
        with mqlite.Broker(clock=clock, faults=Faults(seed=1)) as broker:
            history = record(broker)
            sub = broker.subscribe("q", name="w")
            assert sub.get(timeout=30) is None  # 30 virtual seconds, at once
            broker.publish("q", "e", 1)
            assert sub.get(timeout=1).payload == 1
            checkers.total_queue(history, subscription="w").assert_valid()
        with mqlite.Broker(clock=VirtualClock(), dispatcher=mqlite.ManualDispatcher()) as broker:
            broker.subscribe("q", callback=lambda m: None)
            broker.publish("q", "e", 1)
            assert run_until_idle(broker).callbacks == 1
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pytest", "_pytest", "hypothesis"))
        print(loaded)
        """
    )
    assert out.strip() == "[]"


def test_the_hypothesis_parts_say_what_they_need_when_it_is_missing() -> None:
    out = _run(
        """
        import mqlite.testing

        for name in ("strategies", "BrokerMachine"):
            try:
                getattr(mqlite.testing, name)
            except ModuleNotFoundError as error:
                print(name, error.name)
        """
    )
    assert out.split("\n")[:2] == ["strategies hypothesis", "BrokerMachine hypothesis"]
