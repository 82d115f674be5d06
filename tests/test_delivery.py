"""The delivery contract's pure rules, tested without a broker: entry states, the redelivery
schedule, the failure decision, the ack-mode rules, retention, waiters and stored settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from mqlite._delivery import entries, policy, retention
from mqlite._delivery.cursor import Cursor
from mqlite._delivery.entries import OUT, READY, SETTLED, WAITING, EntryState, Pending
from mqlite._delivery.schedule import Schedule
from mqlite._delivery.waiters import Waiters
from mqlite.config import Backoff, QueueConfig, SubscriptionSettings
from mqlite.errors import InvalidArgument
from mqlite.filters import EventFilter
from mqlite.message import Message, message_class

QMessage = message_class("q")


def msg(offset: int, event: str = "e", payload: Any = None, timestamp: float = 0.0) -> Message:
    """A four-field message of queue "q", built as the engines build them."""
    message: Message = tuple.__new__(QMessage, (event, payload, offset, timestamp))
    return message


def entry(offset: int, state: EntryState = OUT, attempts: int = 1, owner: object | None = "consumer") -> Pending:
    return Pending(msg(offset), attempts, owner, state)


def tracked(*offsets: int, state: EntryState = OUT) -> tuple[dict[int, Pending], Schedule, list[Pending]]:
    """A pending map holding one entry per offset, its schedule, and the entries."""
    made = [entry(o, state) for o in offsets]
    pending = {e.offset: e for e in made}
    return pending, Schedule(pending), made


def fail(message: Message, **overrides: Any) -> policy.Retry | policy.Dead:
    arguments: dict[str, Any] = {
        "attempts": 1,
        "max_deliveries": 3,
        "delay": 0.0,
        "queue": "q",
        "subscription": "workers",
        "reason": "nacked",
        "error": None,
    }
    arguments.update(overrides)
    return policy.on_failure(message, **arguments)


def config(**kwargs: Any) -> QueueConfig:
    return QueueConfig(**kwargs)


def timestamps(values: list[float]) -> Callable[[int], float]:
    return values.__getitem__


# -- entries ----------------------------------------------------------------------------------


def test_entry_states_have_their_documented_values_in_life_order() -> None:
    assert [(s.name, s.value) for s in EntryState] == [("OUT", 0), ("WAITING", 1), ("READY", 2), ("SETTLED", 3)]


def test_module_level_state_names_are_the_enum_members() -> None:
    module_names = (OUT, WAITING, READY, SETTLED)
    members = (EntryState.OUT, EntryState.WAITING, EntryState.READY, EntryState.SETTLED)
    assert all(name is member for name, member in zip(module_names, members, strict=True))


def test_every_state_is_reached_by_a_documented_transition() -> None:
    transitions = " ".join((entries.__doc__ or "").split("Transitions", 1)[1].split())
    for state in EntryState:
        assert f"--> {state.name}" in transitions, state


def test_pending_offset_is_its_message_offset() -> None:
    assert entry(42).offset == 42


def test_a_new_pending_entry_has_no_deadline() -> None:
    assert entry(0).deadline == 0.0


def test_pending_repr_names_offset_state_and_attempts() -> None:
    assert repr(entry(7, READY, attempts=2)) == "<Pending offset=7 READY attempts=2>"


# -- policy: the failure decision ---------------------------------------------------------------


def test_a_failure_without_delay_and_with_deliveries_left_retries_at_once() -> None:
    decision = fail(msg(0), attempts=2, max_deliveries=3, delay=0.0)
    assert decision == policy.Retry(0.0)
    assert decision is policy.RETRY_NOW


def test_a_failure_with_a_delay_retries_after_that_delay() -> None:
    assert fail(msg(0), attempts=1, max_deliveries=3, delay=2.5) == policy.Retry(2.5)


def test_a_failure_dead_letters_when_attempts_reach_max_deliveries() -> None:
    assert isinstance(fail(msg(0), attempts=3, max_deliveries=3), policy.Dead)


def test_a_failure_dead_letters_when_attempts_exceed_max_deliveries() -> None:
    assert isinstance(fail(msg(0), attempts=5, max_deliveries=3), policy.Dead)


def test_a_failure_one_short_of_max_deliveries_is_retried() -> None:
    assert isinstance(fail(msg(0), attempts=2, max_deliveries=3), policy.Retry)


def test_a_dead_message_is_not_delayed_even_when_a_delay_is_asked() -> None:
    assert isinstance(fail(msg(0), attempts=3, max_deliveries=3, delay=10.0), policy.Dead)


def test_without_max_deliveries_a_message_is_never_dead_lettered() -> None:
    assert fail(msg(0), attempts=10_000, max_deliveries=None) is policy.RETRY_NOW
    assert fail(msg(0), attempts=10_000, max_deliveries=None, delay=1.0) == policy.Retry(1.0)


def test_dead_letter_headers_say_where_the_message_came_from() -> None:
    error = ValueError("boom")
    decision = fail(msg(9), attempts=3, max_deliveries=3, reason="callback raised", error=error)
    assert isinstance(decision, policy.Dead)
    assert decision.headers == {
        "dead_letter.queue": "q",
        "dead_letter.offset": 9,
        "dead_letter.subscription": "workers",
        "dead_letter.deliveries": 3,
        "dead_letter.reason": "callback raised",
        "dead_letter.error": "ValueError('boom')",
    }


def test_dead_letter_error_header_is_none_without_an_error() -> None:
    decision = fail(msg(0), attempts=1, max_deliveries=1, reason="ack timeout", error=None)
    assert isinstance(decision, policy.Dead)
    assert decision.headers["dead_letter.error"] is None


def test_dead_letter_subscription_header_is_none_for_an_ephemeral_cursor() -> None:
    decision = fail(msg(0), attempts=1, max_deliveries=1, subscription=None)
    assert isinstance(decision, policy.Dead)
    assert decision.headers["dead_letter.subscription"] is None


def test_dead_letter_headers_keep_the_message_own_headers() -> None:
    message = Message("q", "e", None, 4, 0.0, key="k", headers={"trace": "abc", "n": 1})
    decision = fail(message, attempts=1, max_deliveries=1)
    assert isinstance(decision, policy.Dead)
    assert decision.headers["trace"] == "abc"
    assert decision.headers["n"] == 1
    assert decision.headers["dead_letter.offset"] == 4
    assert dict(message.headers) == {"trace": "abc", "n": 1}  # the message itself is untouched


def test_dead_letter_headers_replace_those_of_an_earlier_dead_lettering() -> None:
    message = Message("q", "e", None, 4, 0.0, headers={"dead_letter.queue": "older", "dead_letter.deliveries": 9})
    headers = policy.dead_letter_headers(
        message, queue="q", subscription="s", deliveries=2, reason="nacked", error=None
    )
    assert (headers["dead_letter.queue"], headers["dead_letter.deliveries"]) == ("q", 2)


# -- policy: the ack-mode rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manual_ack", "push", "settles"),
    [(False, False, True), (False, True, False), (True, False, False), (True, True, False)],
)
def test_only_an_auto_ack_pull_settles_on_take(manual_ack: bool, push: bool, settles: bool) -> None:
    assert policy.settles_on_take(manual_ack=manual_ack, push=push) is settles


def test_manual_ack_reads_no_more_than_it_returns() -> None:
    assert policy.read_ahead_size(100, 5, manual_ack=True, durable_take=False) == 5


def test_manual_ack_reads_ahead_for_a_consumer_that_asks_to() -> None:
    assert policy.read_ahead_size(100, 5, manual_ack=True, durable_take=False, ahead_with_manual=True) == 100


def test_a_durable_take_reads_no_more_than_it_returns() -> None:
    assert policy.read_ahead_size(100, 5, manual_ack=False, durable_take=True) == 5
    assert policy.read_ahead_size(100, 5, manual_ack=True, durable_take=True, ahead_with_manual=True) == 5


def test_auto_ack_reads_ahead_the_requested_size() -> None:
    assert policy.read_ahead_size(100, 5, manual_ack=False, durable_take=False) == 100


def test_read_ahead_is_never_less_than_max_messages() -> None:
    assert policy.read_ahead_size(3, 50, manual_ack=False, durable_take=False) == 50


def test_a_lone_push_consumer_takes_the_whole_batch() -> None:
    assert policy.push_batch_size(64, 1) == 64


def test_competing_push_consumers_take_one_at_a_time() -> None:
    assert policy.push_batch_size(64, 2) == 1
    assert policy.push_batch_size(64, 10) == 1


# -- config: Backoff, QueueConfig, SubscriptionSettings -------------------------------------------


def test_backoff_grows_by_its_factor_from_the_first_failure() -> None:
    backoff = Backoff(initial=1.0, factor=3.0, maximum=100.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 27.0]


def test_backoff_is_capped_at_its_maximum() -> None:
    backoff = Backoff(initial=1.0, factor=3.0, maximum=20.0)
    assert [backoff.delay(n) for n in (3, 4, 50)] == [9.0, 20.0, 20.0]


def test_backoff_before_any_failure_is_the_initial_delay() -> None:
    assert Backoff(initial=0.5, factor=2.0, maximum=10.0).delay(0) == 0.5


def test_backoff_delay_is_a_float() -> None:
    assert type(Backoff(initial=1, factor=2, maximum=5).delay(2)) is float


@pytest.mark.parametrize(
    ("initial", "factor", "maximum"),
    [(-0.1, 2.0, 30.0), (0.1, 0.5, 30.0), (5.0, 2.0, 1.0), (float("nan"), 2.0, 30.0), (0.1, float("nan"), 30.0)],
)
def test_backoff_rejects_bad_values(initial: float, factor: float, maximum: float) -> None:
    with pytest.raises(InvalidArgument, match="Backoff needs"):
        Backoff(initial=initial, factor=factor, maximum=maximum)


def test_backoff_accepts_zero_initial_and_unit_factor() -> None:
    assert Backoff(initial=0.0, factor=1.0, maximum=0.0).delay(5) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"retention": "forever"}, "retention"),
        ({"overflow": "block"}, "overflow"),
        ({"max_messages": 0}, "max_messages"),
        ({"max_messages": -1}, "max_messages"),
        ({"max_messages": 1.5}, "max_messages"),
        ({"max_messages": True}, "max_messages"),
        ({"max_age": 0}, "max_age"),
        ({"max_age": -1.0}, "max_age"),
        ({"max_age": "60"}, "max_age"),
        ({"max_age": True}, "max_age"),
        ({"overflow": "reject"}, "max_messages"),
    ],
)
def test_queue_config_rejects_bad_values(kwargs: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidArgument, match=names):
        QueueConfig(**kwargs)


def test_queue_config_accepts_positive_limits() -> None:
    queue_config = QueueConfig(retention="limits", max_messages=10, max_age=1.5, overflow="reject")
    assert (queue_config.max_messages, queue_config.max_age) == (10, 1.5)


def test_queue_config_defaults_to_interest_without_limits() -> None:
    assert QueueConfig() == QueueConfig("interest", None, None, "drop_oldest")


def full_settings() -> SubscriptionSettings:
    return SubscriptionSettings(
        EventFilter(["order.*", "created"]), True, 5.0, 3, "q.dead", Backoff(initial=0.2, factor=3.0, maximum=9.0)
    )


def test_subscription_settings_round_trip_through_their_stored_form() -> None:
    settings = full_settings()
    assert SubscriptionSettings.from_stored(settings.to_stored()) == settings


def test_default_subscription_settings_round_trip_through_their_stored_form() -> None:
    assert SubscriptionSettings.from_stored(SubscriptionSettings().to_stored()) == SubscriptionSettings()


def test_stored_subscription_settings_survive_json() -> None:
    settings = full_settings()
    stored = json.loads(json.dumps(settings.to_stored()))
    assert SubscriptionSettings.from_stored(stored) == settings


def test_stored_subscription_settings_have_their_documented_form() -> None:
    assert full_settings().to_stored() == {
        "events": ["created", "order.*"],
        "manual_ack": True,
        "ack_timeout": 5.0,
        "max_deliveries": 3,
        "dead_letter": "q.dead",
        "backoff": [0.2, 3.0, 9.0],
    }


def test_an_every_event_filter_is_stored_as_none() -> None:
    assert SubscriptionSettings(EventFilter("*")).to_stored()["events"] is None


def test_subscription_settings_are_equal_by_value() -> None:
    assert full_settings() == full_settings()
    assert hash(full_settings()) == hash(full_settings())


@pytest.mark.parametrize(
    "changed",
    [
        {"event_filter": EventFilter("other")},
        {"manual_ack": False},
        {"ack_timeout": 6.0},
        {"max_deliveries": 4},
        {"dead_letter": "elsewhere"},
        {"backoff": Backoff()},
    ],
)
def test_subscription_settings_differing_in_one_field_are_not_equal(changed: dict[str, Any]) -> None:
    base = full_settings()
    fields = {
        "event_filter": base.event_filter,
        "manual_ack": base.manual_ack,
        "ack_timeout": base.ack_timeout,
        "max_deliveries": base.max_deliveries,
        "dead_letter": base.dead_letter,
        "backoff": base.backoff,
    }
    fields.update(changed)
    assert SubscriptionSettings(**fields) != base


def test_describe_reads_the_settings_for_a_person() -> None:
    assert full_settings().describe() == (
        "events=('created', 'order.*'), ack=manual, ack_timeout=5.0, max_deliveries=3, dead_letter='q.dead'"
    )


def test_describe_default_settings() -> None:
    assert SubscriptionSettings().describe() == (
        "events=None, ack=auto, ack_timeout=None, max_deliveries=None, dead_letter=''"
    )


# -- retention ------------------------------------------------------------------------------------


def test_without_limits_the_floor_is_start() -> None:
    assert retention.limit_floor(3, 100, config(retention="limits"), 0.0, timestamps([])) == 3


def test_drop_oldest_keeps_only_the_newest_max_messages() -> None:
    assert retention.limit_floor(0, 10, config(max_messages=3), 0.0, timestamps([0.0] * 10)) == 7


def test_drop_oldest_floor_is_never_below_start() -> None:
    assert retention.limit_floor(0, 2, config(max_messages=3), 0.0, timestamps([0.0] * 2)) == 0
    assert retention.limit_floor(8, 10, config(max_messages=3), 0.0, timestamps([0.0] * 10)) == 8


def test_reject_overflow_sets_no_floor_from_the_count() -> None:
    reject = config(max_messages=3, overflow="reject")
    assert retention.limit_floor(0, 10, reject, 0.0, timestamps([0.0] * 10)) == 0


def test_max_age_drops_messages_older_than_the_cutoff() -> None:
    ages = config(max_age=3.0)
    # cutoff = 10 - 3 = 7: offsets 0..6 are older, offset 7 is exactly at the cutoff and stays.
    assert retention.limit_floor(0, 10, ages, 10.0, timestamps([float(i) for i in range(10)])) == 7


def test_max_age_can_drop_everything() -> None:
    ages = config(max_age=1.0)
    assert retention.limit_floor(0, 5, ages, 100.0, timestamps([0.0] * 5)) == 5


def test_max_age_floor_is_never_below_start() -> None:
    ages = config(max_age=1000.0)
    assert retention.limit_floor(4, 10, ages, 10.0, timestamps([0.0] * 10)) == 4


def test_max_age_reads_only_what_the_count_limit_keeps() -> None:
    read: list[int] = []

    def timestamp_at(offset: int) -> float:
        read.append(offset)
        return float(offset)

    both = config(max_messages=5, max_age=100.0)
    assert retention.limit_floor(0, 10, both, 0.0, timestamp_at) == 5
    assert read == [5]


def test_the_stricter_of_count_and_age_limits_wins() -> None:
    ts = timestamps([float(i) for i in range(10)])
    assert retention.limit_floor(0, 10, config(max_messages=5, max_age=2.0), 10.0, ts) == 8
    assert retention.limit_floor(0, 10, config(max_messages=2, max_age=5.0), 10.0, ts) == 8


def test_limits_retention_ignores_cursor_positions() -> None:
    assert retention.interest_floor(2, 10, config(retention="limits"), [5, 9]) == 2


def test_interest_floor_is_the_slowest_cursor() -> None:
    assert retention.interest_floor(0, 10, config(), [7, 4, 9]) == 4


def test_interest_floor_without_cursors_is_end() -> None:
    assert retention.interest_floor(0, 10, config(), []) == 10


def test_interest_floor_is_never_below_start() -> None:
    assert retention.interest_floor(6, 10, config(), [2, 8]) == 6


def test_interest_floor_accepts_a_one_shot_iterable() -> None:
    assert retention.interest_floor(0, 10, config(), iter([3, 5])) == 3


def test_a_short_dropped_prefix_is_not_reclaimed() -> None:
    assert not retention.should_reclaim(0, retention.MIN_RECLAIM - 1, retention.MIN_RECLAIM)


def test_a_dropped_prefix_of_min_reclaim_is_reclaimed_when_little_is_retained() -> None:
    assert retention.should_reclaim(0, retention.MIN_RECLAIM, retention.MIN_RECLAIM + 10)


def test_a_dropped_prefix_must_also_be_a_quarter_of_what_is_retained() -> None:
    retained = 8 * retention.MIN_RECLAIM
    quarter = retained // 4
    assert not retention.should_reclaim(0, quarter - 1, quarter - 1 + retained)
    assert retention.should_reclaim(0, quarter, quarter + retained)


def test_reclaim_counts_from_the_first_stored_offset() -> None:
    first = 1_000_000
    assert not retention.should_reclaim(first, first + retention.MIN_RECLAIM - 1, first + retention.MIN_RECLAIM)
    assert retention.should_reclaim(first, first + retention.MIN_RECLAIM, first + retention.MIN_RECLAIM)


def test_housekeeping_runs_every_housekeep_every_publishes_with_few_cursors() -> None:
    assert retention.next_check(0, 100, 3, config()) == 100 + retention.HOUSEKEEP_EVERY


def test_housekeeping_runs_every_four_publishes_per_cursor_with_many_cursors() -> None:
    cursors = retention.HOUSEKEEP_EVERY  # 4 per cursor is four times HOUSEKEEP_EVERY
    assert retention.next_check(0, 100, cursors, config()) == 100 + 4 * cursors


def test_a_reject_queue_checks_again_when_it_would_be_full() -> None:
    reject = config(max_messages=10, overflow="reject")
    assert retention.next_check(5, 12, 1, reject) == 15


def test_a_reject_limit_further_than_the_cadence_does_not_delay_housekeeping() -> None:
    reject = config(max_messages=100_000, overflow="reject")
    assert retention.next_check(0, 10, 1, reject) == 10 + retention.HOUSEKEEP_EVERY


def test_a_drop_oldest_count_limit_does_not_cap_the_cadence() -> None:
    assert retention.next_check(0, 5, 1, config(max_messages=10)) == 5 + retention.HOUSEKEEP_EVERY


def test_reject_accepts_up_to_the_limit() -> None:
    assert not retention.refuses(0, 7, 3, config(max_messages=10, overflow="reject"))


def test_reject_refuses_beyond_the_limit() -> None:
    assert retention.refuses(0, 7, 4, config(max_messages=10, overflow="reject"))


def test_reject_counts_from_start() -> None:
    assert not retention.refuses(5, 12, 3, config(max_messages=10, overflow="reject"))
    assert retention.refuses(5, 12, 4, config(max_messages=10, overflow="reject"))


def test_drop_oldest_never_refuses() -> None:
    assert not retention.refuses(0, 100, 50, config(max_messages=10))


# -- schedule -------------------------------------------------------------------------------------


def test_make_ready_queues_entries_in_order() -> None:
    _, schedule, (a, b, c) = tracked(0, 1, 2)
    for e in (a, b, c):
        schedule.make_ready(e)
    assert [schedule.pop_ready() for _ in range(3)] == [a, b, c]


def test_make_ready_front_goes_first() -> None:
    _, schedule, (a, b, c) = tracked(0, 1, 2)
    schedule.make_ready(a)
    schedule.make_ready(b)
    schedule.make_ready(c, front=True)
    assert [schedule.pop_ready() for _ in range(3)] == [c, a, b]


def test_make_ready_marks_the_entry_ready_and_unowned() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.make_ready(a)
    assert (a.state, a.owner) == (READY, None)


def test_pop_ready_on_an_empty_line_is_none() -> None:
    _, schedule, _ = tracked()
    assert schedule.pop_ready() is None


def test_wait_until_makes_the_entry_waiting_until_its_due_time() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.wait_until(a, 5.0)
    assert (a.state, a.owner, a.deadline) == (WAITING, None, 5.0)
    assert schedule.pop_ready() is None


def test_a_waiting_entry_is_not_ready_before_its_due_time() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.wait_until(a, 5.0)
    assert schedule.expire(4.999) == []
    assert a.state == WAITING
    assert schedule.pop_ready() is None


def test_a_waiting_entry_becomes_ready_at_its_due_time() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.wait_until(a, 5.0)
    assert schedule.expire(5.0) == []  # a delay ending is not a timeout
    assert a.state == READY
    assert schedule.pop_ready() is a


def test_a_waiting_entry_is_made_ready_only_once() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.wait_until(a, 5.0)
    schedule.expire(5.0)
    schedule.expire(6.0)
    assert list(schedule.ready) == [a]
    assert not schedule.has_timers()


def test_delays_end_in_due_time_order() -> None:
    _, schedule, (a, b, c) = tracked(0, 1, 2)
    schedule.wait_until(a, 3.0)
    schedule.wait_until(b, 1.0)
    schedule.wait_until(c, 2.0)
    schedule.expire(10.0)
    assert list(schedule.ready) == [b, c, a]


def test_equal_due_times_end_in_the_order_they_were_scheduled() -> None:
    _, schedule, (a, b, c) = tracked(0, 1, 2)
    for e in (c, a, b):
        schedule.wait_until(e, 1.0)
    schedule.expire(1.0)
    assert list(schedule.ready) == [c, a, b]


def test_a_delay_of_an_entry_no_longer_pending_is_skipped() -> None:
    pending, schedule, (a,) = tracked(0)
    schedule.wait_until(a, 1.0)
    del pending[0]
    schedule.expire(1.0)
    assert not schedule.ready


def test_a_delay_of_a_replaced_entry_is_skipped() -> None:
    pending, schedule, (a,) = tracked(0)
    schedule.wait_until(a, 1.0)
    pending[0] = entry(0, READY)
    schedule.expire(1.0)
    assert not schedule.ready


def test_an_ack_timeout_returns_the_entries_still_out() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.track_timeout(5.0, [a, b])
    assert (a.deadline, b.deadline) == (5.0, 5.0)
    assert schedule.expire(4.0) == []
    assert schedule.expire(5.0) == [a, b]


def test_an_ack_timeout_fires_once() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.track_timeout(5.0, [a])
    assert schedule.expire(5.0) == [a]
    assert schedule.expire(6.0) == []


def test_an_acked_entry_does_not_time_out() -> None:
    pending, schedule, (a, b) = tracked(0, 1)
    schedule.track_timeout(5.0, [a, b])
    del pending[0]
    a.state = SETTLED
    assert schedule.expire(5.0) == [b]


def test_an_entry_replaced_in_pending_does_not_time_out() -> None:
    pending, schedule, (a,) = tracked(0)
    schedule.track_timeout(5.0, [a])
    pending[0] = entry(0)
    assert schedule.expire(5.0) == []


def test_an_entry_no_longer_out_does_not_time_out() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.track_timeout(5.0, [a, b])
    schedule.make_ready(a)
    schedule.wait_until(b, 50.0)
    assert schedule.expire(5.0) == []


def test_a_retracked_entry_is_not_timed_out_by_its_old_deadline() -> None:
    _, schedule, (a,) = tracked(0)
    schedule.track_timeout(5.0, [a])
    schedule.track_timeout(10.0, [a])  # redelivered: a new ack timeout
    assert schedule.expire(5.0) == []
    assert schedule.expire(10.0) == [a]


def test_next_due_is_none_without_timers() -> None:
    _, schedule, _ = tracked()
    assert schedule.next_due() is None
    assert not schedule.has_timers()


def test_next_due_is_an_ack_timeout_when_it_comes_first() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.wait_until(a, 7.0)
    schedule.track_timeout(4.0, [b])
    assert schedule.next_due() == 4.0


def test_next_due_is_a_delay_when_it_comes_first() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.wait_until(a, 3.0)
    schedule.track_timeout(4.0, [b])
    assert schedule.next_due() == 3.0


def test_next_due_is_the_earliest_delay() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.wait_until(a, 9.0)
    schedule.wait_until(b, 2.0)
    assert schedule.next_due() == 2.0
    assert schedule.has_timers()


def test_next_due_moves_on_once_timers_fire() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.track_timeout(1.0, [a])
    schedule.wait_until(b, 6.0)
    schedule.expire(1.0)
    assert schedule.next_due() == 6.0


def test_clear_forgets_every_timer_and_redelivery() -> None:
    _, schedule, (a, b, c) = tracked(0, 1, 2)
    schedule.make_ready(a)
    schedule.wait_until(b, 1.0)
    schedule.track_timeout(2.0, [c])
    schedule.clear()
    assert schedule.pop_ready() is None
    assert not schedule.has_timers()
    assert schedule.next_due() is None
    assert schedule.expire(100.0) == []


def test_pop_ready_skips_settled_entries() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.make_ready(a)
    schedule.make_ready(b)
    a.state = SETTLED
    assert schedule.pop_ready() is b


def test_pop_ready_skips_entries_replaced_in_pending() -> None:
    pending, schedule, (a, b) = tracked(0, 1)
    schedule.make_ready(a)
    schedule.make_ready(b)
    pending[0] = entry(0, READY)
    assert schedule.pop_ready() is b
    assert schedule.pop_ready() is None


def test_pop_ready_skips_entries_no_longer_pending() -> None:
    pending, schedule, (a,) = tracked(0)
    schedule.make_ready(a)
    del pending[0]
    assert schedule.pop_ready() is None


def test_pop_ready_skips_entries_taken_again_meanwhile() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    schedule.make_ready(a)
    schedule.make_ready(b)
    a.state = OUT
    assert schedule.pop_ready() is b


def test_insert_ready_puts_the_entry_at_its_index_as_ready() -> None:
    _, schedule, (a, b, c) = tracked(0, 1, 2)
    schedule.make_ready(a)
    schedule.make_ready(b)
    schedule.insert_ready(1, c)
    assert (c.state, c.owner) == (READY, None)
    assert [schedule.pop_ready() for _ in range(3)] == [a, c, b]


def test_on_ready_is_told_of_entries_made_ready() -> None:
    _, schedule, (a, b) = tracked(0, 1)
    told: list[Pending] = []
    schedule.on_ready = told.append
    schedule.make_ready(a)
    schedule.make_ready(b, front=True)
    assert told == [a, b]


def test_on_ready_is_told_of_delays_that_ended() -> None:
    _, schedule, (a,) = tracked(0)
    told: list[Pending] = []
    schedule.on_ready = told.append
    schedule.wait_until(a, 1.0)
    assert told == []
    schedule.expire(1.0)
    assert told == [a]


def test_on_ready_is_not_told_of_insert_ready() -> None:
    _, schedule, (a,) = tracked(0)
    told: list[Pending] = []
    schedule.on_ready = told.append
    schedule.insert_ready(0, a)
    assert told == []


def test_on_ready_sees_the_entry_already_ready() -> None:
    _, schedule, (a,) = tracked(0)
    seen: list[tuple[EntryState, object]] = []
    schedule.on_ready = lambda e: seen.append((e.state, e.owner))
    schedule.make_ready(a)
    assert seen == [(READY, None)]


# -- cursor ---------------------------------------------------------------------------------------


def make_cursor(name: str | None = "workers", settings: SubscriptionSettings | None = None) -> Cursor:
    return Cursor(queue="q", name=name, position=0, settings=settings or SubscriptionSettings())


def test_a_named_cursor_is_durable() -> None:
    assert make_cursor("workers").durable


def test_an_unnamed_cursor_is_not_durable() -> None:
    assert not make_cursor(None).durable


def test_a_new_cursor_takes_its_settings() -> None:
    settings = full_settings()
    cursor = make_cursor(settings=settings)
    assert (cursor.filter, cursor.manual_ack, cursor.ack_timeout) == (settings.event_filter, True, 5.0)
    assert (cursor.max_deliveries, cursor.dead_letter, cursor.backoff) == (3, "q.dead", settings.backoff)
    assert cursor.settings is settings


def test_a_new_cursor_schedules_over_its_own_pending_map() -> None:
    cursor = make_cursor()
    assert cursor.schedule.pending is cursor.pending


def test_configure_takes_every_setting_but_the_filter() -> None:
    cursor = make_cursor(settings=SubscriptionSettings(EventFilter("a")))
    settings = full_settings()
    cursor.configure(settings)
    assert cursor.settings is settings
    assert (cursor.manual_ack, cursor.ack_timeout, cursor.max_deliveries) == (True, 5.0, 3)
    assert (cursor.dead_letter, cursor.backoff) == ("q.dead", settings.backoff)
    assert cursor.filter == EventFilter("a")


def test_set_filter_records_the_filter_in_the_settings() -> None:
    cursor = make_cursor(settings=full_settings())
    cursor.set_filter(EventFilter(["x", "y"]))
    assert cursor.filter == EventFilter(["x", "y"])
    assert cursor.settings.event_filter == EventFilter(["x", "y"])


def test_set_filter_keeps_the_other_settings() -> None:
    cursor = make_cursor(settings=full_settings())
    cursor.set_filter(EventFilter("x"))
    expected = full_settings()
    assert cursor.settings == SubscriptionSettings(
        EventFilter("x"),
        expected.manual_ack,
        expected.ack_timeout,
        expected.max_deliveries,
        expected.dead_letter,
        expected.backoff,
    )


def test_set_filter_with_the_same_filter_keeps_the_settings() -> None:
    settings = full_settings()
    cursor = make_cursor(settings=settings)
    cursor.set_filter(EventFilter(["created", "order.*"]))
    assert cursor.settings is settings


def test_an_inflight_push_batch_is_unsettled() -> None:
    cursor = make_cursor()
    cursor.inflight = 1
    assert cursor.unsettled_before(0)


def _schedule(cursor: Cursor, offset: int, state: EntryState) -> Pending:
    """A pending entry of ``cursor`` at ``offset``, put in its schedule as ``state`` (READY or WAITING)."""
    pending = cursor.pending[offset] = entry(offset, OUT)
    if state == READY:
        cursor.schedule.make_ready(pending)
    else:
        cursor.schedule.wait_until(pending, 10.0)
    return pending


@pytest.mark.parametrize("state", [READY, WAITING])
def test_a_retry_below_the_offset_is_unsettled(state: EntryState) -> None:
    cursor = make_cursor()
    _schedule(cursor, 3, state)
    assert cursor.unsettled_before(4)


def test_a_retry_at_or_above_the_offset_is_not_unsettled_before_it() -> None:
    cursor = make_cursor()
    _schedule(cursor, 3, READY)
    _schedule(cursor, 5, WAITING)
    assert not cursor.unsettled_before(3)


@pytest.mark.parametrize("state", [READY, WAITING])
def test_a_retry_settled_since_it_was_scheduled_is_not_unsettled(state: EntryState) -> None:
    # The schedule keeps an entry settled after it was scheduled (it skips it when it comes up).
    cursor = make_cursor()
    _schedule(cursor, 3, state)
    del cursor.pending[3]
    assert not cursor.unsettled_before(4)


def test_an_entry_out_below_the_offset_is_not_unsettled() -> None:
    cursor = make_cursor()
    cursor.pending[3] = entry(3, OUT)
    assert not cursor.unsettled_before(10)


def test_a_cursor_with_nothing_pending_has_nothing_unsettled() -> None:
    assert not make_cursor().unsettled_before(1_000)


def test_cursor_repr_names_queue_name_position_and_pending() -> None:
    cursor = make_cursor(None)
    cursor.position = 4
    cursor.pending[1] = entry(1)
    assert repr(cursor) == "<Cursor q/~ position=4 pending=1>"


# -- waiters --------------------------------------------------------------------------------------


class Woken:
    """Records which waiters were woken, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def waker(self, label: str) -> Callable[[], None]:
        return lambda: self.names.append(label)


def test_add_registers_a_waiter() -> None:
    waiters = Waiters()
    woken = Woken()
    waiter = waiters.add({"a"}, woken.waker("w"))
    assert waiters.registered() == [waiter]
    assert waiter.names == {"a"}
    assert woken.names == []


def test_wake_event_wakes_only_the_waiters_that_want_it() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add({"a"}, woken.waker("a"))
    waiters.add({"b"}, woken.waker("b"))
    waiters.add({"a", "c"}, woken.waker("ac"))
    waiters.wake_event("a")
    assert woken.names == ["a", "ac"]


def test_wake_event_wakes_waiters_that_want_any_event() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add(None, woken.waker("any"))
    waiters.wake_event("whatever")
    assert woken.names == ["any"]


def test_wake_event_removes_the_woken_and_keeps_the_others_in_order() -> None:
    waiters = Waiters()
    woken = Woken()
    b1 = waiters.add({"b"}, woken.waker("b1"))
    waiters.add({"a"}, woken.waker("a"))
    b2 = waiters.add({"b"}, woken.waker("b2"))
    waiters.add(None, woken.waker("any"))
    waiters.wake_event("a")
    assert waiters.registered() == [b1, b2]


def test_a_waiter_is_woken_once() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add({"a"}, woken.waker("a"))
    waiters.wake_event("a")
    waiters.wake_event("a")
    waiters.wake_all()
    assert woken.names == ["a"]


def test_an_empty_name_set_is_woken_only_by_wake_all() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add(set(), woken.waker("none"))
    waiters.wake_event("a")
    assert woken.names == []
    waiters.wake_all()
    assert woken.names == ["none"]


def test_wake_all_wakes_and_removes_every_waiter() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add({"a"}, woken.waker("a"))
    waiters.add(None, woken.waker("any"))
    waiters.add(set(), woken.waker("none"))
    waiters.wake_all()
    assert woken.names == ["a", "any", "none"]
    assert not waiters


def test_a_waiter_added_while_wake_all_runs_stays_registered() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add(None, lambda: waiters.add(None, woken.waker("again")))
    waiters.wake_all()
    assert waiters.count() == 1
    assert woken.names == []


def test_discard_removes_a_registered_waiter() -> None:
    waiters = Waiters()
    woken = Woken()
    waiter = waiters.add({"a"}, woken.waker("a"))
    waiters.discard(waiter)
    assert not waiters
    waiters.wake_all()
    assert woken.names == []


def test_discard_of_an_already_woken_waiter_is_silent() -> None:
    waiters = Waiters()
    woken = Woken()
    waiter = waiters.add({"a"}, woken.waker("a"))
    other = waiters.add({"b"}, woken.waker("b"))
    waiters.wake_event("a")
    waiters.discard(waiter)
    assert waiters.registered() == [other]


def test_an_empty_registry_is_falsy() -> None:
    assert not Waiters()


def test_wake_event_wakes_in_the_order_the_waiters_came_whether_filed_by_name_or_not() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add({"a"}, woken.waker("a1"))
    waiters.add(None, woken.waker("any"))
    waiters.add({"a", "b"}, woken.waker("a2"))
    waiters.add({"x" + str(i) for i in range(20)} | {"a"}, woken.waker("many"))  # too many names to file
    waiters.wake_event("a")
    assert woken.names == ["a1", "any", "a2", "many"]
    assert not waiters


def test_a_waiter_whose_set_grew_is_woken_by_the_new_name_once_new_event_files_it() -> None:
    # A cursor's set of names grows when a new event its filter matches is published; the
    # queue then calls new_event before it wakes anyone for that event.
    waiters = Waiters()
    woken = Woken()
    names = {"order.created"}
    waiters.add(names, woken.waker("orders"))
    other = waiters.add({"b"}, woken.waker("b"))
    names.add("order.paid")
    waiters.new_event("order.paid")
    waiters.wake_event("order.paid")
    assert woken.names == ["orders"]
    assert waiters.registered() == [other]


def test_new_event_leaves_the_waiters_whose_set_does_not_hold_it() -> None:
    waiters = Waiters()
    woken = Woken()
    waiter = waiters.add({"a"}, woken.waker("a"))
    waiters.new_event("b")
    waiters.wake_event("b")
    assert woken.names == []
    assert waiters.registered() == [waiter]


def test_a_woken_waiter_leaves_every_name_it_was_filed_under() -> None:
    waiters = Waiters()
    woken = Woken()
    waiters.add({"a", "b"}, woken.waker("ab"))
    waiters.wake_event("a")
    waiters.wake_event("b")
    assert woken.names == ["ab"]
    assert not waiters


def test_count_and_registered_see_filed_and_asked_waiters_in_the_order_they_came() -> None:
    waiters = Waiters()
    woken = Woken()
    a = waiters.add({"a"}, woken.waker("a"))
    anything = waiters.add(None, woken.waker("any"))
    b = waiters.add({"b"}, woken.waker("b"))
    assert waiters.count() == 3
    assert waiters.registered() == [a, anything, b]
    waiters.discard(anything)
    assert (waiters.count(), waiters.registered()) == (2, [a, b])
    waiters.wake_event("b")
    waiters.discard(a)
    assert (waiters.count(), waiters.registered()) == (0, [])
    assert not waiters
