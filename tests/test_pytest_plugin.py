"""mqlite's pytest plugin, run with pytester: its fixtures, its marker, its option and its failure report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def test_the_fixtures_give_a_broker_on_an_autojumping_clock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import mqlite
        from mqlite.testing import VirtualClock

        def test_it(mqlite_broker, mqlite_clock, mqlite_history):
            assert isinstance(mqlite_clock, VirtualClock)
            sub = mqlite_broker.subscribe("q", name="w", ack="manual", ack_timeout=3600)
            mqlite_broker.publish("q", "e", 1)
            assert sub.get(timeout=1).offset == 0
            before = mqlite_clock.time()
            again = sub.get(timeout=7200)  # an hour of virtual time, at once
            assert again is not None and again.offset == 0
            assert mqlite_clock.time() - before >= 3600
            assert [op.type for op in mqlite_history][:3] == ["subscribe", "publish", "deliver"]
            assert mqlite_broker.path is None
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_marker_asks_for_a_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.mqlite(backend="file")
        def test_it(mqlite_broker):
            assert mqlite_broker.path is not None and mqlite_broker.path.endswith(".mqlite")

        @pytest.mark.mqlite(backend="redis-someday")
        def test_bad(mqlite_broker):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*backend must be 'memory' or 'file'*"])


def test_a_failure_report_shows_the_seed_the_rerun_command_and_the_history(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_it(mqlite_broker, mqlite_history, mqlite_seed):
            mqlite_broker.publish("orders", "created", {"id": 1})
            assert False, "the consumer lost it"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--mqlite-seed=1234")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*mqlite*", "seed: 1234", "rerun: pytest *--mqlite-seed=1234", "*publish*orders*"])


def test_the_seed_is_the_option_or_drawn_once_per_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        seen = []

        def test_one(mqlite_seed):
            seen.append(mqlite_seed)

        def test_two(mqlite_seed):
            assert seen == [mqlite_seed]
            assert mqlite_seed == 99
        """
    )
    pytester.runpytest("-p", "no:cacheprovider", "--mqlite-seed=99").assert_outcomes(passed=2)


def test_a_wait_without_a_timeout_fails_at_the_default_limit_instead_of_hanging(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from mqlite.testing import VirtualTimeExceeded

        def test_default(mqlite_broker, mqlite_clock):
            assert mqlite_clock.limit == 365 * 24 * 3600  # checked first: without a limit the get would hang
            sub = mqlite_broker.subscribe("q")
            with pytest.raises(VirtualTimeExceeded):
                sub.get()  # no timeout, nothing coming

        @pytest.mark.mqlite(limit=60)
        def test_marker(mqlite_clock):
            assert mqlite_clock.limit == 60

        @pytest.mark.mqlite(limit=None)
        def test_none(mqlite_clock):
            assert mqlite_clock.limit is None
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_faults_come_from_the_marker_or_the_option_seeded_by_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from mqlite.testing import Faults

        def test_none_by_default(mqlite_broker, mqlite_faults):
            assert mqlite_faults is None

        @pytest.mark.mqlite(faults={"duplicate": 1.0})
        def test_marker(mqlite_broker, mqlite_faults, mqlite_seed):
            assert isinstance(mqlite_faults, Faults) and mqlite_faults.seed == mqlite_seed
            sub = mqlite_broker.subscribe("q")
            mqlite_broker.publish("q", "e", 1)
            assert [m.payload for m in sub.poll(10)] == [1]
            assert [m.payload for m in sub.poll(10)] == [1]  # duplicated
            assert [f.kind for f in mqlite_faults.log] == ["duplicate"]

        @pytest.mark.mqlite(faults={"sometimes": 0.5})
        def test_bad_kind(mqlite_broker):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--mqlite-seed=5")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*faults= is a dict of rates by kind*"])


def test_the_option_gives_faults_to_every_test_and_the_report_lists_them(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_it(mqlite_broker, mqlite_faults):
            assert mqlite_faults.rates["crash"] == 0.25 and mqlite_faults.rates["duplicate"] == 1.0
            sub = mqlite_broker.subscribe("q")
            mqlite_broker.publish("q", "e", 1)
            sub.poll(10)
            assert False, "look at the faults"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--mqlite-faults=duplicate=1,crash=0.25", "--mqlite-seed=5")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*faults: Faults(seed=5, duplicate=1.0, crash=0.25), 1 injected:*", "*fault #0 duplicate q@0*"]
    )
    bad = pytester.runpytest("-p", "no:cacheprovider", "--mqlite-faults=crash=often")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--mqlite-faults: crash= needs a rate in [[]0, 1[]], got 'often'*"])


def test_the_example_in_testing_md_passes(pytester: pytest.Pytester) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    section = page.split("### The plugin", 1)[1].split("### ", 1)[0]
    example = re.search(r"^```py\n(.*?)^```", section, re.S | re.M)
    assert example is not None
    pytester.makepyfile(example.group(1))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
