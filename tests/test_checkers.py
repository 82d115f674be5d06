"""The delivery history and its checkers: each checker catches what it names, and passes a clean run.

Histories are built by hand through the :class:`History` API, with one anomaly planted in each,
the way a recorder wired into the broker will build them.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mqlite
from mqlite.testing import History, Op, checkers

Q = "orders"
BILLING: dict[str, Any] = {"queue": Q, "subscription": "billing", "consumer": "#1"}


def published(events: list[str], *, start: int = 0) -> History:
    """A history where ``billing`` subscribed at ``start`` on every event, then ``events`` were published."""
    history = History()
    history.subscribe(**BILLING, position=start)
    for offset, event in enumerate(events):
        history.publish(queue=Q, offset=offset, event=event, payload=offset)
    return history


def pull(history: History, *offsets: int, consumer: str = "#1") -> None:
    """``billing`` pulled ``offsets`` with ``ack="auto"``: each delivery settles at once."""
    for offset in offsets:
        history.deliver(**{**BILLING, "consumer": consumer}, offset=offset, event="e", settled=True)


# -- History ------------------------------------------------------------------------------------


def test_each_recorded_op_gets_the_next_index() -> None:
    history = published(["a", "b"])
    pull(history, 0)
    assert [op.index for op in history] == [0, 1, 2, 3]
    assert [op.type for op in history] == ["subscribe", "publish", "publish", "deliver"]
    assert len(history) == 4
    assert history[-1].offset == 0


def test_an_op_without_a_time_takes_the_historys_clock() -> None:
    clock = mqlite.ManualClock(start=100.0)
    history = History(clock=clock)
    history.publish(queue=Q, offset=0, event="a")
    clock.advance(2.5)
    history.publish(queue=Q, offset=1, event="a")
    history.publish(queue=Q, offset=2, event="a", time=7.0)
    assert [op.time for op in history] == [100.0, 102.5, 7.0]


def test_ops_are_immutable() -> None:
    op = published(["a"])[1]
    with pytest.raises(AttributeError):
        op.offset = 5  # type: ignore[misc]  # the point: it is frozen


def test_appends_from_many_threads_get_distinct_consecutive_indexes() -> None:
    history = History()

    def publish_many(base: int) -> None:
        for i in range(200):
            history.publish(queue=Q, offset=base + i, event="e")

    threads = [threading.Thread(target=publish_many, args=(n * 1000,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
    finally:
        for thread in threads:
            thread.join(timeout=10)
    assert sorted(op.index for op in history) == list(range(800))
    assert [op.index for op in history] == list(range(800))  # in the order they were appended


def test_tail_and_filter_select_ops() -> None:
    history = published(["a", "b", "c"])
    pull(history, 0, 1)
    assert [op.offset for op in history.tail(2)] == [0, 1]
    assert history.tail(0) == ()
    assert [op.offset for op in history.filter(type="publish")] == [0, 1, 2]
    assert [op.type for op in history.filter(offset=1)] == ["publish", "deliver"]
    assert [op.index for op in history.filter(type={"subscribe", "deliver"}, subscription="billing")] == [0, 4, 5]


def test_format_shows_the_last_ops_one_per_line() -> None:
    history = published(["created"] * 40)
    text = history.format(last=3)
    assert text.splitlines()[0] == "History of 41 ops, last 3:"
    assert len(text.splitlines()) == 4
    assert "orders@39  'created'" in text
    assert "orders@36" not in text
    assert str(history).splitlines()[0] == "History of 41 ops, last 30:"


# -- JSON Lines ---------------------------------------------------------------------------------


def a_history_of_every_op_type() -> History:
    history = History()
    history.subscribe(**BILLING, position=0, events=["created", "order.*"], max_deliveries=2)
    history.publish(queue=Q, offset=0, event="created", key="k", payload={"id": 1, "tags": ["x"]}, time=1.5)
    history.publish_failed(queue=Q, event="created", error="StorageError('disk full')", payload=2)
    history.refilter(**BILLING, position=1, events="created")
    history.deliver(**BILLING, offset=0, event="created", key="k", attempt=1)
    history.nack(**BILLING, offset=0, reason="callback raised", error="ValueError('bad')")
    history.deliver(**BILLING, offset=0, event="created", attempt=2)
    history.nack(**BILLING, offset=0, reason="ack timeout")
    history.dead_letter(**BILLING, offset=0, attempt=2, reason="ack timeout", dead_letter_queue="orders.dead-letter")
    history.deliver(**BILLING, offset=1, settled=True)
    history.ack(**BILLING, offset=1)
    history.done(**BILLING, offset=1)
    history.seek(**BILLING, position=2, offset=0)
    history.fault(**BILLING, offset=1, fault="duplicate")
    history.close(**BILLING, position=2)
    return history


def test_a_history_round_trips_through_a_jsonl_file(tmp_path: Path) -> None:
    history = a_history_of_every_op_type()
    assert {op.type for op in history} == set(mqlite.testing.history.OP_TYPES)
    path = tmp_path / "history.jsonl"
    history.to_jsonl(path)
    assert len(path.read_text().splitlines()) == len(history)
    again = History.from_jsonl(path)
    assert again.ops == history.ops
    assert again[0].events == ("created", "order.*")


def test_a_history_round_trips_through_a_text_stream() -> None:
    history = a_history_of_every_op_type()
    stream = io.StringIO()
    history.to_jsonl(stream)
    stream.seek(0)
    assert History.from_jsonl(stream).ops == history.ops


def test_jsonl_writes_only_fields_that_differ_from_their_defaults() -> None:
    stream = io.StringIO()
    History([Op(index=0, time=0.0, type="ack", queue=Q, offset=3)]).to_jsonl(stream)
    assert stream.getvalue() == '{"index": 0, "time": 0.0, "type": "ack", "queue": "orders", "offset": 3}\n'


def test_a_payload_json_cannot_encode_is_written_as_its_repr() -> None:
    history = History()
    history.publish(queue=Q, offset=0, event="e", payload={1, 2})
    stream = io.StringIO()
    history.to_jsonl(stream)
    stream.seek(0)
    assert History.from_jsonl(stream)[0].payload == "{1, 2}"


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "line 2"),
        ("[1, 2]", "expected a JSON object"),
        ('{"index": 1, "time": 0, "type": "teleport", "queue": "q"}', "op type must be one of"),
        ('{"index": 1, "time": 0, "type": "ack", "queue": "q", "colour": 1}', "unknown Op fields ['colour']"),
        ('{"index": 1, "time": 0, "type": "nack", "queue": "q", "reason": "bored"}', "reason must be one of"),
        ('{"index": 1, "type": "ack", "queue": "q"}', "not an Op"),
    ],
)
def test_reading_a_bad_line_names_it(line: str, says: str) -> None:
    good = '{"index": 0, "time": 0, "type": "ack", "queue": "q"}'
    with pytest.raises(ValueError, match="line 2 of the history") as raised:
        History.from_jsonl(io.StringIO(f"{good}\n{line}\n"))
    assert says in str(raised.value)


# -- a clean history ----------------------------------------------------------------------------


def a_clean_history() -> History:
    """Every way of settling, a redelivery, a dead letter at the limit, two competing consumers."""
    history = History()
    history.subscribe(**BILLING, position=1, events=["created", "paid"], max_deliveries=2)
    history.subscribe(**{**BILLING, "consumer": "#2"}, position=1, events=["created", "paid"], max_deliveries=2)
    for offset, event in enumerate(["created", "created", "updated", "paid", "created", "created"]):
        history.publish(queue=Q, offset=offset, event=event)  # offset 0 predates the cursor
    history.deliver(**BILLING, offset=1, event="created", settled=True)  # pull, ack="auto"
    history.deliver(**{**BILLING, "consumer": "#2"}, offset=3, event="paid")  # skips 2: filtered out
    history.deliver(**BILLING, offset=4, event="created")
    history.ack(**BILLING, offset=3)  # any consumer of the name may ack
    history.nack(**BILLING, offset=4)
    history.deliver(**{**BILLING, "consumer": "#2"}, offset=4, event="created", attempt=2)  # not a reorder
    history.done(**{**BILLING, "consumer": "#2"}, offset=4)  # a push callback returned
    history.deliver(**BILLING, offset=5, event="created")
    history.nack(**BILLING, offset=5, reason="ack timeout")
    history.deliver(**BILLING, offset=5, event="created", attempt=2)
    history.nack(**BILLING, offset=5, reason="callback raised", error="ValueError('x')")
    history.dead_letter(
        **BILLING, offset=5, attempt=2, reason="callback raised", dead_letter_queue="orders.dead-letter"
    )
    history.publish(queue="orders.dead-letter", offset=0, event="created")  # 5 is handled, not lost
    return history


def test_a_clean_history_is_valid_for_every_checker() -> None:
    history = a_clean_history()
    results = [
        checkers.total_queue(history, "billing", exactly_once=True),
        checkers.order(history, "billing"),
        checkers.order(history, "billing", per="key"),
        checkers.redelivery(history, "billing"),
    ]
    combined = checkers.compose(*results)
    combined.assert_valid()
    assert all(result.valid for result in results)
    assert set(combined.counts.values()) == {0}
    assert "INVALID" not in str(combined)


def test_the_clean_history_turns_invalid_with_one_planted_delivery() -> None:
    history = a_clean_history()
    history.deliver(**BILLING, offset=5, event="created", attempt=3)  # after its dead letter
    result = checkers.redelivery(history, "billing")
    assert result.offsets("max-deliveries-exceeded") == [5]
    assert not result.valid


# -- total_queue --------------------------------------------------------------------------------


def test_total_queue_finds_a_lost_message() -> None:
    history = published(["a", "a", "a"])
    pull(history, 0, 2)
    result = checkers.total_queue(history, "billing")
    assert result.offsets("lost") == [1]
    assert result.counts == {"lost": 1, "duplicated": 0, "unexpected": 0, "recovered": 0}
    assert not result.valid
    with pytest.raises(AssertionError, match=r"INVALID \(lost\)") as raised:
        result.assert_valid()
    assert "offset 1: published as 'a', never dequeued" in str(raised.value)


def test_a_message_delivered_but_never_settled_is_lost() -> None:
    history = published(["a"])
    history.deliver(**BILLING, offset=0, event="a")
    result = checkers.total_queue(history, "billing")
    assert result.offsets("lost") == [0]
    assert "delivered, never settled" in str(result)


def test_messages_retention_dropped_before_the_cursor_read_them_are_lost() -> None:
    history = published(["a"] * 5)
    pull(history, 3, 4)  # the cursor jumped to start_offset 3
    assert checkers.total_queue(history, "billing").offsets("lost") == [0, 1, 2]


def test_messages_the_cursor_should_not_see_are_not_lost() -> None:
    history = History()
    history.publish(queue=Q, offset=0, event="a")  # before the cursor's start
    history.subscribe(**BILLING, position=1, events="a*")
    history.publish(queue=Q, offset=1, event="b")  # filtered out
    history.publish(queue="other", offset=2, event="a")  # another queue
    history.publish(queue=Q, offset=2, event="ab")
    history.seek(**BILLING, position=2, offset=4)  # skips 2 and 3 on purpose
    history.publish(queue=Q, offset=3, event="a")
    history.publish(queue=Q, offset=4, event="a")
    pull(history, 4)
    result = checkers.total_queue(history, "billing")
    assert result.valid, result
    assert result.figures["expected"] == 1


def test_an_ephemeral_subscription_expects_nothing_past_where_it_closed() -> None:
    history = History()
    me: dict[str, Any] = {"queue": Q, "subscription": None, "consumer": "#7"}
    history.subscribe(**me, position=0)
    for offset in range(3):
        history.publish(queue=Q, offset=offset, event="a")
    delivery = history.deliver(**me, offset=0, event="a", settled=True)
    history.deliver(**me, offset=1, event="a")  # ack="manual", never acked: forgotten at the close
    history.close(**me, position=2)  # it never read 2
    history.publish(queue=Q, offset=3, event="a")
    result = checkers.total_queue(history, consumer="#7")
    assert result.offsets("lost") == [1]
    assert result.subject == "ephemeral subscription '#7' on 'orders'"
    assert delivery.cursor == (Q, None, "#7")


def test_a_widened_filter_expects_the_new_events_from_its_position_on() -> None:
    history = History()
    history.subscribe(**BILLING, position=0, events="a")
    for offset, event in enumerate(["a", "b", "b"]):
        history.publish(queue=Q, offset=offset, event=event)
    pull(history, 0)
    history.refilter(**BILLING, position=2, events=["a", "b"])
    assert checkers.total_queue(history, "billing").offsets("lost") == [2]


def test_total_queue_finds_a_duplicate_and_allows_it_unless_exactly_once() -> None:
    history = published(["a", "a"])
    pull(history, 0, 1)
    history.seek(**BILLING, position=2, offset=0)
    pull(history, 0)
    result = checkers.total_queue(history, "billing")
    assert result.offsets("duplicated") == [0]
    assert result.valid
    assert "duplicated (1, allowed)" in str(result)
    strict = checkers.total_queue(history, "billing", exactly_once=True)
    assert not strict.valid
    assert "INVALID (duplicated)" in str(strict)


def test_total_queue_finds_an_unexpected_message() -> None:
    history = published(["a"])
    pull(history, 0, 7)
    result = checkers.total_queue(history, "billing")
    assert result.offsets("unexpected") == [7]
    assert not result.valid


def test_total_queue_finds_a_recovered_publish_by_its_offset() -> None:
    history = published(["a"])
    history.publish_failed(queue=Q, event="a", error="StorageError('commit failed')", offset=1)
    pull(history, 0, 1)
    result = checkers.total_queue(history, "billing")
    assert result.offsets("recovered") == [1]
    assert (result.counts["unexpected"], result.counts["lost"]) == (0, 0)
    assert result.valid  # as in Jepsen: a recovered publish is not an error


def test_total_queue_finds_a_recovered_publish_by_its_content() -> None:
    history = published(["a"])
    history.publish_failed(queue=Q, event="b", error="StorageError('?')", payload="x")
    history.deliver(**BILLING, offset=1, event="b", payload="y", settled=True)  # not that one
    history.deliver(**BILLING, offset=2, event="b", payload="x", settled=True)
    pull(history, 0)
    result = checkers.total_queue(history, "billing")
    assert result.offsets("recovered") == [2]
    assert result.offsets("unexpected") == [1]


def test_a_failed_publish_recovers_one_message_only() -> None:
    history = published([])
    history.publish_failed(queue=Q, event="b", error="StorageError('?')")
    history.deliver(**BILLING, offset=0, event="b", settled=True)
    history.deliver(**BILLING, offset=1, event="b", settled=True)
    result = checkers.total_queue(history, "billing")
    assert (result.offsets("recovered"), result.offsets("unexpected")) == ([0], [1])


# -- choosing the cursor ------------------------------------------------------------------------


def test_a_history_with_one_cursor_needs_no_name() -> None:
    history = published(["a"])
    pull(history, 0)
    assert checkers.total_queue(history).subject == "subscription 'billing' on 'orders'"


def test_several_cursors_must_be_named() -> None:
    history = published(["a"])
    history.subscribe(queue=Q, subscription="audit", consumer="#2", position=0)
    history.subscribe(queue="other", subscription="billing", consumer="#3", position=0)
    with pytest.raises(ValueError, match="several cursors match"):
        checkers.total_queue(history)
    with pytest.raises(ValueError, match="several cursors match"):
        checkers.order(history, "billing")
    assert checkers.redelivery(history, "billing", queue=Q).valid
    with pytest.raises(ValueError, match="no ops of a subscription with subscription='nobody'"):
        checkers.total_queue(history, "nobody")


def test_a_cursor_without_a_subscribe_op_is_refused() -> None:
    history = History()
    history.publish(queue=Q, offset=0, event="a")
    pull(history, 0)
    with pytest.raises(ValueError, match="no 'subscribe' op"):
        checkers.total_queue(history, "billing")
    with pytest.raises(ValueError, match="no 'subscribe' op"):
        checkers.order(history, "billing")


# -- order --------------------------------------------------------------------------------------


def test_order_finds_a_reorder() -> None:
    history = published(["a", "a", "a"])
    pull(history, 0, 2, 1)
    result = checkers.order(history, "billing")
    assert result.offsets("nonmonotonic") == [1]
    assert result.offsets("skip") == [1]  # when 2 came, 1 had been passed over
    assert "first delivered after 2 was" in str(result)
    assert not result.valid


def test_order_finds_a_first_delivery_repeated_by_another_consumer() -> None:
    history = published(["a", "a"])
    pull(history, 0, 1)
    pull(history, 1, consumer="#2")
    result = checkers.order(history, "billing")
    assert (result.offsets("nonmonotonic"), result.offsets("skip")) == ([1], [])


def test_order_finds_a_delivery_before_the_cursors_start() -> None:
    history = published(["a", "a", "a"], start=2)
    pull(history, 1)
    assert checkers.order(history, "billing").offsets("nonmonotonic") == [1]


def test_order_finds_a_skip() -> None:
    history = published(["a", "b", "a", "a"])
    pull(history, 0, 3)
    result = checkers.order(history, "billing")
    assert result.offsets("skip") == [1, 2]
    assert result.counts["nonmonotonic"] == 0
    assert "passed over: 3 was first delivered right after 0" in str(result)


def test_a_filtered_out_message_is_not_a_skip() -> None:
    history = History()
    history.subscribe(**BILLING, position=0, events="a")
    for offset, event in enumerate(["a", "b", "a"]):
        history.publish(queue=Q, offset=offset, event=event)
    pull(history, 0, 2)
    assert checkers.order(history, "billing").valid


def test_a_redelivery_after_a_nack_is_not_a_reorder() -> None:
    history = published(["a", "a"])
    history.deliver(**BILLING, offset=0, event="a")
    history.deliver(**BILLING, offset=1, event="a")
    history.nack(**BILLING, offset=0)
    history.deliver(**BILLING, offset=0, event="a", attempt=2)
    history.deliver(**BILLING, offset=0, event="a", attempt=None)  # unknown attempt, seen before: not first
    assert checkers.order(history, "billing").valid


def test_competing_consumers_are_checked_together() -> None:
    history = published(["a", "a", "a", "a"])
    pull(history, 0)
    pull(history, 1, consumer="#2")
    pull(history, 2)
    pull(history, 3, consumer="#2")
    assert checkers.order(history, "billing").valid  # each consumer alone skips, by design


def test_a_seek_begins_the_order_afresh() -> None:
    history = published(["a", "a", "a", "a"])
    pull(history, 0, 1)
    history.seek(**BILLING, position=2, offset=0)
    pull(history, 0, 1, 2)
    history.seek(**BILLING, position=3, offset=4)
    pull(history, 3)  # behind the seek target
    result = checkers.order(history, "billing")
    assert (result.offsets("nonmonotonic"), result.offsets("skip")) == ([3], [])


def test_order_per_key_allows_keys_to_interleave_but_not_to_reorder() -> None:
    history = published([])
    for offset, key in enumerate(["a", "b", "a", "b"]):
        history.publish(queue=Q, offset=offset, event="e", key=key)
    pull(history, 1, 0, 3, 2)
    assert not checkers.order(history, "billing").valid
    assert checkers.order(history, "billing", per="key").valid

    history = published([])
    for offset, key in enumerate(["a", "b", "a"]):
        history.publish(queue=Q, offset=offset, event="e", key=key)
    pull(history, 1, 2, 0)
    result = checkers.order(history, "billing", per="key")
    assert result.offsets("nonmonotonic") == [0]
    assert result.offsets("skip") == [0]  # 2 came first of key "a"


def test_order_per_key_groups_unhashable_keys_by_their_repr() -> None:
    history = published([])
    for offset in range(2):
        history.publish(queue=Q, offset=offset, event="e", key=["k"])
    pull(history, 1, 0)
    assert checkers.order(history, "billing", per="key").offsets("nonmonotonic") == [0]


def test_order_refuses_an_unknown_grouping() -> None:
    with pytest.raises(ValueError, match="per must be"):
        checkers.order(published(["a"]), per="queue")  # type: ignore[arg-type]  # the point


# -- redelivery ---------------------------------------------------------------------------------


def test_redelivery_finds_an_acked_message_delivered_again() -> None:
    history = published(["a"])
    history.deliver(**BILLING, offset=0, event="a")
    history.ack(**BILLING, offset=0)
    history.deliver(**BILLING, offset=0, event="a", attempt=2)
    result = checkers.redelivery(history, "billing")
    assert result.offsets("acked-redelivered") == [0]
    assert not result.valid


def test_a_message_pulled_with_auto_ack_is_settled_at_once() -> None:
    history = published(["a"])
    pull(history, 0, 0)
    assert checkers.redelivery(history, "billing").offsets("acked-redelivered") == [0]


def test_a_seek_back_may_deliver_a_settled_message_again() -> None:
    history = published(["a", "a"])
    pull(history, 0, 1)
    history.seek(**BILLING, position=2, offset=1)
    pull(history, 1)
    assert checkers.redelivery(history, "billing").valid
    pull(history, 0)  # 0 lies before the seek target
    assert checkers.redelivery(history, "billing").offsets("acked-redelivered") == [0]


def test_redelivery_finds_more_deliveries_than_allowed() -> None:
    history = published(["a"])
    history.deliver(**BILLING, offset=0, event="a")
    history.nack(**BILLING, offset=0)
    history.deliver(**BILLING, offset=0, event="a", attempt=3)
    result = checkers.redelivery(history, "billing", max_deliveries=2)
    assert result.offsets("max-deliveries-exceeded") == [0]
    assert result.counts["dead-letter-missing"] == 0  # the failure came at 1 of 2 deliveries
    assert "delivery 3 with max_deliveries=2" in str(result)


def test_a_redelivery_instead_of_a_dead_letter_is_both_exceeded_and_missing() -> None:
    history = published(["a"])
    for attempt in (1, 2, 3):
        history.deliver(**BILLING, offset=0, event="a", attempt=attempt)
        history.nack(**BILLING, offset=0)
    result = checkers.redelivery(history, "billing", max_deliveries=2)
    assert result.offsets("max-deliveries-exceeded") == [0]
    # once when it was delivered a third time, once for its third failure at the end
    assert result.offsets("dead-letter-missing") == [0, 0]


def test_redelivery_finds_a_missing_dead_letter() -> None:
    history = published(["a", "a"])
    for attempt in (1, 2):
        history.deliver(**BILLING, offset=0, event="a", attempt=attempt)
        history.nack(**BILLING, offset=0, reason="ack timeout")
    history.deliver(**BILLING, offset=1, event="a")
    history.nack(**BILLING, offset=1)  # 1 of 2: no dead letter due
    result = checkers.redelivery(history, "billing", max_deliveries=2)
    assert result.offsets("dead-letter-missing") == [0]
    assert "no dead letter followed" in str(result)


def test_max_deliveries_comes_from_the_subscribe_op_unless_given() -> None:
    history = History()
    history.subscribe(**BILLING, position=0, max_deliveries=1)
    history.publish(queue=Q, offset=0, event="a")
    history.deliver(**BILLING, offset=0, event="a")
    history.nack(**BILLING, offset=0)
    assert checkers.redelivery(history, "billing").offsets("dead-letter-missing") == [0]
    assert checkers.redelivery(history, "billing", max_deliveries=5).valid


def unexpected_dead_letters() -> dict[str, History]:
    cases = {}
    for case in ("with deliveries left", "after an ack", "with no limit", "never delivered", "with no failure"):
        history = published(["a"])
        if case != "never delivered":
            history.deliver(**BILLING, offset=0, event="a")
        if case == "after an ack":
            history.ack(**BILLING, offset=0)
        elif case in ("with deliveries left", "with no limit"):
            history.nack(**BILLING, offset=0)
        history.dead_letter(**BILLING, offset=0, attempt=1, dead_letter_queue="orders.dead-letter")
        cases[case] = history
    return cases


@pytest.mark.parametrize("case", list(unexpected_dead_letters()))
def test_redelivery_finds_an_unexpected_dead_letter(case: str) -> None:
    history = unexpected_dead_letters()[case]
    limit = None if case == "with no limit" else 2
    result = checkers.redelivery(history, "billing", max_deliveries=limit)
    assert result.offsets("dead-letter-unexpected") == [0]
    assert not result.valid


def test_a_dead_letter_at_the_limit_is_expected() -> None:
    history = published(["a"])
    history.deliver(**BILLING, offset=0, event="a")
    history.nack(**BILLING, offset=0)
    history.dead_letter(**BILLING, offset=0, attempt=1, dead_letter_queue="orders.dead-letter")
    assert checkers.redelivery(history, "billing", max_deliveries=1).valid


# -- compose ------------------------------------------------------------------------------------


def test_compose_is_valid_only_when_every_part_is() -> None:
    history = published(["a", "a"])
    pull(history, 0, 1, 1)
    lenient = checkers.total_queue(history)
    strict = checkers.total_queue(history, exactly_once=True)
    assert checkers.compose(lenient, checkers.order(published(["a"]))).valid
    combined = checkers.compose(lenient, strict)
    assert not combined.valid
    assert combined.counts["duplicated"] == 2
    assert combined.explain().splitlines()[0] == "compose of 2 checks: INVALID"
    with pytest.raises(AssertionError, match="INVALID"):
        combined.assert_valid()


def test_an_explanation_shows_a_bounded_number_of_witnesses() -> None:
    history = published(["a"] * 25)
    result = checkers.total_queue(history)
    text = result.explain(shown=3)
    assert "lost (25):" in text
    assert "... and 22 more" in text
    assert text.count("never dequeued") == 3


# -- properties ---------------------------------------------------------------------------------

EVENTS = ["a", "b", "c"]


@st.composite
def correct_runs(draw: st.DrawFn) -> History:
    """A history of a correct consumer group: every wanted message dequeued once, in order."""
    events = draw(st.lists(st.sampled_from(EVENTS), max_size=30))
    start = draw(st.integers(0, len(events)))
    wanted = draw(st.none() | st.lists(st.sampled_from(EVENTS), min_size=1, unique=True))
    limit = draw(st.none() | st.integers(1, 3))
    consumers = [f"#{n}" for n in range(draw(st.integers(1, 3)))]
    history = History()
    for offset in range(start):
        history.publish(queue=Q, offset=offset, event=events[offset], key=offset % 2)
    for consumer in consumers:
        history.subscribe(
            queue=Q, subscription="g", consumer=consumer, position=start, events=wanted, max_deliveries=limit
        )
    for offset in range(start, len(events)):
        history.publish(queue=Q, offset=offset, event=events[offset], key=offset % 2)
    for offset in range(start, len(events)):
        if wanted is not None and events[offset] not in wanted:
            continue
        me: dict[str, Any] = {"queue": Q, "subscription": "g", "consumer": draw(st.sampled_from(consumers))}
        failures = draw(st.integers(0, (limit or 3) - 1))
        for attempt in range(1, failures + 1):
            history.deliver(**me, offset=offset, event=events[offset], attempt=attempt)
            history.nack(**me, offset=offset, reason=draw(st.sampled_from(["nack", "ack timeout"])))
        style = draw(st.sampled_from(["pull-auto", "ack", "push"]))
        last = failures + 1
        history.deliver(**me, offset=offset, event=events[offset], attempt=last, settled=style == "pull-auto")
        if style == "ack":
            history.ack(**me, offset=offset)
        elif style == "push":
            history.done(**me, offset=offset)
    return history


@settings(max_examples=200, deadline=None)
@given(correct_runs())
def test_a_correct_consumer_group_passes_every_checker(history: History) -> None:
    checkers.compose(
        checkers.total_queue(history, "g", exactly_once=True),
        checkers.order(history, "g"),
        checkers.order(history, "g", per="key"),
        checkers.redelivery(history, "g"),
    ).assert_valid()


@settings(max_examples=200, deadline=None)
@given(correct_runs(), st.data())
def test_dropping_one_dequeue_loses_exactly_that_message(history: History, data: st.DataObject) -> None:
    dequeues = [op for op in history if op.dequeues]
    if not dequeues:
        return
    victim = data.draw(st.sampled_from(dequeues))
    result = checkers.total_queue(History(op for op in history if op is not victim), "g")
    assert result.offsets("lost") == [victim.offset]
    assert result.counts == {"lost": 1, "duplicated": 0, "unexpected": 0, "recovered": 0}
    assert not result.valid
