"""Thread safety: many producers, competing pull consumers and a push subscriber, all at once."""

from __future__ import annotations

import threading
import time
from collections import Counter

from helpers import Worker

import mqlite
from mqlite.testing import checkers, record

PRODUCERS = 4
PER_PRODUCER = 10_000
TOTAL = PRODUCERS * PER_PRODUCER
DEADLINE = 30.0  # a safety net for the loops; the test takes about a second


def test_producers_competing_consumers_and_a_push_subscriber_lose_and_duplicate_nothing(
    broker: mqlite.Broker,
) -> None:
    # Checked by hand, not with record(): recording 160,000 ops would slow the producers
    # tenfold and serialise what this test means to race.
    pushed: list[mqlite.Message] = []
    broker.subscribe("jobs", name="audit", callback=pushed.append)
    consumers = [broker.subscribe("jobs", name="workers") for _ in range(3)]
    published: list[list[mqlite.Message]] = [[] for _ in range(PRODUCERS)]
    go = threading.Event()
    producers_done = threading.Event()
    stop_by = time.monotonic() + DEADLINE

    def produce(index: int) -> None:
        go.wait(5)
        out = published[index]
        for seq in range(PER_PRODUCER):
            if seq % 1000 == 999:
                out.extend(broker.queue("jobs").publish_many([("job", (index, seq))]))
            else:
                out.append(broker.publish("jobs", "job", (index, seq)))

    def consume(sub: mqlite.Subscription) -> list[mqlite.Message]:
        got: list[mqlite.Message] = []
        go.wait(5)
        while time.monotonic() < stop_by:
            # Read the flag before polling: an empty poll after every producer finished means
            # everything published has been handed out to this group.
            finished = producers_done.is_set()
            batch = sub.poll(max_messages=128, timeout=0.05)
            if batch:
                got.extend(batch)
            elif finished:
                break
        return got

    consumer_workers = [Worker(lambda sub=sub: consume(sub)) for sub in consumers]
    producer_workers = [Worker(lambda i=i: produce(i)) for i in range(PRODUCERS)]
    try:
        go.set()
        for worker in producer_workers:
            worker.join(timeout=DEADLINE)
        producers_done.set()
        received = [worker.join(timeout=DEADLINE) for worker in consumer_workers]
    finally:
        go.set()
        producers_done.set()
        for worker in producer_workers + consumer_workers:
            worker.thread.join(timeout=DEADLINE)
    assert broker.drain(timeout=DEADLINE)

    # Offsets: one per message, 0 to TOTAL - 1, none reused.
    all_published = [m for out in published for m in out]
    assert sorted(m.offset for m in all_published) == list(range(TOTAL))
    expected = Counter((i, seq) for i in range(PRODUCERS) for seq in range(PER_PRODUCER))

    # The competing group: every message exactly once across its three consumers.
    group = Counter(m.payload for got in received for m in got)
    assert group == expected
    # Each consumer saw its share in offset order.
    for got in received:
        assert [m.offset for m in got] == sorted(m.offset for m in got)

    # The push subscriber: every message exactly once, in offset order.
    assert [m.offset for m in pushed] == list(range(TOTAL))
    assert Counter(m.payload for m in pushed) == expected

    info = broker.info().subscription("jobs", "workers")
    assert (info.delivered, info.acked, info.lag, info.pending) == (TOTAL, TOTAL, 0, 0)


def test_competing_manual_consumers_that_nack_and_close_still_ack_each_message_once(broker: mqlite.Broker) -> None:
    """Redelivery under contention: every message is acked exactly once although consumers nack
    some and leave part-way with messages unacked."""
    total = 5_000
    history = record(broker)
    queue = broker.queue("jobs")
    subs = [broker.subscribe("jobs", name="workers", ack="manual") for _ in range(3)]
    acked: list[int] = []
    acked_lock = threading.Lock()
    stop_by = time.monotonic() + DEADLINE
    # The first consumer reads alone until it holds messages, then leaves with a batch unacked
    # while the other two are polling: events, not volume, decide when, so it always happens.
    leaver_holds_messages = threading.Event()
    others_polling = [threading.Event(), threading.Event()]

    def consume(index: int, sub: mqlite.Subscription) -> None:
        if index > 0:
            leaver_holds_messages.wait(DEADLINE)
        seen = 0
        while time.monotonic() < stop_by:
            with acked_lock:
                if len(acked) >= total:
                    return
            batch = sub.poll(max_messages=32, timeout=0.05)
            if index > 0:
                others_polling[index - 1].set()
            for message in batch:
                seen += 1
                if index == 0 and seen == 50:
                    # Leave with the rest of this batch unacked: the others must get it back.
                    leaver_holds_messages.set()
                    for polling in others_polling:
                        polling.wait(DEADLINE)
                    sub.close()
                    return
                if message.offset % 7 == 0 and seen % 2 == 0:
                    sub.nack(message)
                    continue
                sub.ack(message)
                with acked_lock:
                    acked.append(message.offset)

    workers = [Worker(lambda i=i, sub=sub: consume(i, sub)) for i, sub in enumerate(subs)]
    try:
        for start in range(0, total, 100):
            queue.publish_many([("job", n) for n in range(start, start + 100)])
    finally:
        for worker in workers:
            worker.join(timeout=DEADLINE)
    assert subs[0].closed, "the first consumer never left part-way; the test did not exercise close"
    assert sorted(acked) == list(range(total))
    # Acked once each, nothing delivered again after its ack, and every message's first delivery
    # in log order: what the close handed back is a redelivery, not a reorder.
    verdict = checkers.compose(
        checkers.total_queue(history, "workers", exactly_once=True),
        checkers.redelivery(history, "workers"),
        checkers.order(history, "workers"),
    )
    verdict.assert_valid()
    assert verdict.parts[1].figures["redeliveries"] > 0
    info = broker.info().subscription("jobs", "workers")
    assert info.pending == 0
    assert info.redelivered > 0
