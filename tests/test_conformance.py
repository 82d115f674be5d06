"""The delivery contract, ``mqlite.testing.check_engine``, on every backend; and proof that it can fail."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

import mqlite
from mqlite.testing import check_engine
from mqlite.testing.conformance import CHECKS


class FileEngine:
    """Factories for ``check_engine`` over SQLite files: each ``open`` makes a new file in
    ``directory``; ``reopen`` and ``shared`` open the latest one again."""

    def __init__(self, directory: Path, **options: Any) -> None:
        self.directory = directory
        self.options = options
        self.numbers = itertools.count()
        self.path: Path | None = None

    def open(self, **kwargs: Any) -> mqlite.Broker:
        self.path = self.directory / f"engine{next(self.numbers)}.mqlite"
        return mqlite.Broker(self.path, **self.options, **kwargs)

    def again(self, **kwargs: Any) -> mqlite.Broker:
        assert self.path is not None, "again() before open()"
        return mqlite.Broker(self.path, **self.options, **kwargs)


def names(needs: str | None = None) -> set[str]:
    return {check.name for check in CHECKS if check.needs in (None, needs)}


# -- the engines of today pass -------------------------------------------------------------------


def test_the_memory_engine_passes_the_contract() -> None:
    assert set(check_engine(mqlite.Broker)) == names()


def test_a_file_passes_the_contract_with_reopen_and_sharing(tmp_path: Path) -> None:
    engine = FileEngine(tmp_path)
    ran = check_engine(engine.open, reopen=engine.again, shared=engine.again)
    assert set(ran) == names() | names("reopen") | names("shared")


def test_a_batched_file_passes_the_contract_with_reopen(tmp_path: Path) -> None:
    # A batched broker needs the file to itself, so it cannot be shared.
    engine = FileEngine(tmp_path, commit="batch")
    assert set(check_engine(engine.open, reopen=engine.again)) == names() | names("reopen")


def test_every_check_has_a_unique_name() -> None:
    assert len({check.name for check in CHECKS}) == len(CHECKS)


# -- the contract can fail -----------------------------------------------------------------------


class DropsEveryThirdPublish(mqlite.Broker):
    """A broken broker: every third ``Broker.publish`` is lost, though it returns a message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def publish(self, queue: str, event: str, payload: Any = None, key: Any = None, headers: Any = None) -> Any:
        self.calls += 1
        if self.calls % 3 == 0:
            q = self.queue(queue)
            return mqlite.Message(queue, event, payload, q.end_offset, 0.0, key=key, headers=headers)
        return super().publish(queue, event, payload, key, headers)


class AckDoesNothing(mqlite.Broker):
    """A broken broker: ``sub.ack`` returns without settling anything."""

    def subscribe(self, *args: Any, **kwargs: Any) -> mqlite.Subscription:
        sub = super().subscribe(*args, **kwargs)
        sub.ack = lambda message, *more: None  # type: ignore[method-assign]
        return sub


def test_a_broker_that_loses_publishes_fails_the_contract() -> None:
    with pytest.raises(AssertionError, match="publish_assigns_contiguous_offsets_from_zero") as failed:
        check_engine(DropsEveryThirdPublish)
    assert "checks failed" in str(failed.value)


def test_a_broker_whose_ack_settles_nothing_fails_the_contract() -> None:
    with pytest.raises(AssertionError) as failed:
        check_engine(AckDoesNothing)
    report = str(failed.value)
    assert "manual_ack_keeps_a_message_pending_until_it_is_acked" in report
    assert "acking_what_is_not_pending_raises_and_acks_nothing" in report
    assert "publish_assigns_contiguous_offsets_from_zero" not in report, "only checks that ack fail"


def test_an_engine_that_keeps_nothing_across_a_reopen_fails_the_contract() -> None:
    with pytest.raises(AssertionError) as failed:
        check_engine(mqlite.Broker, reopen=mqlite.Broker)
    report = str(failed.value)
    for name in names("reopen") - names():
        assert name in report
    assert "3 of" in report.splitlines()[0], report


def test_brokers_that_share_nothing_fail_the_sharing_check() -> None:
    # One check only: each of them waits its full bound for a message that never comes.
    check = "brokers_sharing_storage_see_each_others_publishes"
    with pytest.raises(AssertionError, match=f"1 of 1 checks failed:\n  {check}: "):
        check_engine(mqlite.Broker, shared=mqlite.Broker, checks=[check])


def test_only_the_named_checks_run() -> None:
    assert check_engine(mqlite.Broker, checks=["start_at_a_datetime"]) == ["start_at_a_datetime"]


def test_an_unknown_check_name_is_refused() -> None:
    with pytest.raises(ValueError, match="no such checks: nope"):
        check_engine(mqlite.Broker, checks=["nope"])
