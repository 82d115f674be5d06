"""Checks of what survives a reopen, and of storage shared by several brokers."""

from __future__ import annotations

from mqlite.testing._suite import (
    WAIT,
    _Brokers,
    _check,
    _offsets,
    _payloads,
    _pull_all,
)

# -- persistence (reopen) ------------------------------------------------------------------------


@_check(needs="reopen")
def messages_and_offsets_survive_a_reopen(brokers: _Brokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits", max_messages=100)
    sent = [queue.publish("e", {"n": i}, key=f"k{i}", headers={"h": i}) for i in range(3)]
    broker.close()
    broker = brokers.reopen()
    queue = broker.queue("q")
    assert (queue.config.retention, queue.config.max_messages) == ("limits", 100)
    assert (queue.start_offset, queue.end_offset) == (0, 3)
    assert _pull_all(broker.subscribe("q", start="earliest")) == sent
    assert queue.publish("e").offset == 3, "offsets continue after a reopen"


@_check(needs="reopen")
def a_named_cursors_position_survives_a_reopen(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="billing", events=["a", "b"])
    for i in range(4):
        broker.publish("q", "a", i)
    assert _payloads(sub.poll(max_messages=2)) == [0, 1]
    broker.close()
    broker = brokers.reopen()
    broker.publish("q", "c", "unwanted")
    broker.publish("q", "b", 5)
    info = broker.info().subscription("q", "billing")
    assert (info.mode, info.position, info.lag) == ("detached", 2, 3)
    again = broker.subscribe("q", name="billing", events=["a", "b"])
    assert _payloads(_pull_all(again)) == [2, 3, 5]


@_check(needs="reopen")
def pending_messages_survive_a_reopen(brokers: _Brokers) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q", name="w", ack="manual")
    for i in range(4):
        broker.publish("q", "e", i)
    taken = sub.poll(max_messages=3)
    sub.ack(taken[1])
    broker.close()
    broker = brokers.reopen()
    assert broker.info().subscription("q", "w").pending == 2
    sub = broker.subscribe("q", name="w", ack="manual")
    again = _pull_all(sub)
    assert _offsets(again) == [0, 2, 3], "the unacked messages come back first, then the unread one"
    sub.ack(*again)
    assert sub.pending == 0


# -- sharing (shared) ----------------------------------------------------------------------------


@_check(needs="shared")
def brokers_sharing_storage_see_each_others_publishes(brokers: _Brokers) -> None:
    a = brokers.open()
    b = brokers.shared()
    in_a = a.subscribe("q", name="in-a")
    in_b = b.subscribe("q", name="in-b")
    a.publish("q", "e", "from a")
    b.publish("q", "e", "from b")
    for sub in (in_a, in_b):
        got = [sub.get(timeout=WAIT), sub.get(timeout=WAIT)]
        assert [(m.offset, m.payload) for m in got if m is not None] == [(0, "from a"), (1, "from b")]


@_check(needs="shared")
def brokers_sharing_storage_compete_for_a_name(brokers: _Brokers) -> None:
    a = brokers.open()
    b = brokers.shared()
    in_a = a.subscribe("q", name="workers", ack="manual")
    in_b = b.subscribe("q", name="workers", ack="manual")
    for i in range(10):
        a.publish("q", "job", i)
    first = in_a.poll(max_messages=4, timeout=WAIT)
    rest = in_b.poll(max_messages=100, timeout=WAIT)
    got_a, got_b = _payloads(first), _payloads(rest)
    assert not set(got_a) & set(got_b), f"both brokers got {sorted(set(got_a) & set(got_b))}"
    assert sorted(got_a + got_b) == list(range(10))
    in_a.ack(*first)
    in_b.ack(*rest)
    assert in_a.poll(max_messages=100, timeout=0) == []
    assert b.info().subscription("q", "workers").pending == 0
