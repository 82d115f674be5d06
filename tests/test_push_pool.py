"""The default ThreadDispatcher's shared pool: stalls taken over, order kept, timers, stopped workers."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from helpers import WAIT

import mqlite


class _Blocker:
    """A callback that blocks in its first call until released, and records every payload."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[int] = []

    def __call__(self, message: mqlite.Message) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(WAIT)
        self.seen.append(message.payload)


class _Recorder:
    """A callback that records payloads and how many of its calls overlap, and says when it saw ``last``."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.seen: list[int] = []
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._running = 0
        self.most = 0

    def __call__(self, message: mqlite.Message) -> None:
        with self._lock:
            self._running += 1
            self.most = max(self.most, self._running)
        self.seen.append(message.payload)
        with self._lock:
            self._running -= 1
        if message.payload == self.last:
            self.done.set()


def test_two_stuck_callbacks_hold_up_no_third_subscription(broker: mqlite.Broker) -> None:
    stuck = [_Blocker(), _Blocker()]
    fast = _Recorder(last=99)
    for index, blocker in enumerate(stuck):
        broker.subscribe("q", name=f"stuck{index}", callback=blocker)
    broker.subscribe("q", name="fast", callback=fast)
    try:
        for i in range(100):
            broker.publish("q", "e", i)
        assert all(blocker.entered.wait(WAIT) for blocker in stuck), "a stuck subscription never got its message"
        assert fast.done.wait(WAIT), "the fast subscription waited for the stuck ones"
        assert fast.seen == list(range(100))
    finally:
        for blocker in stuck:
            blocker.release.set()
    assert broker.drain(timeout=WAIT)
    assert [blocker.seen for blocker in stuck] == [list(range(100))] * 2


def test_subscriptions_stay_in_order_and_one_call_at_a_time_while_a_stall_is_taken_over(
    broker: mqlite.Broker,
) -> None:
    slow = _Blocker()
    recorders = [_Recorder(last=1999) for _ in range(5)]
    broker.subscribe("q", name="slow", callback=slow)
    for index, recorder in enumerate(recorders):
        broker.subscribe("q", name=f"r{index}", callback=recorder)
    try:
        broker.publish("q", "e", 0)
        assert slow.entered.wait(WAIT)
        for i in range(1, 2000):  # delivered while the slow callback holds one thread
            broker.publish("q", "e", i)
        assert all(recorder.done.wait(WAIT) for recorder in recorders)
    finally:
        slow.release.set()
    assert broker.drain(timeout=WAIT)
    assert slow.seen == list(range(2000))
    for recorder in recorders:
        assert recorder.seen == list(range(2000))
        assert recorder.most == 1


def test_a_retry_falls_due_on_the_real_clock_while_the_pool_sleeps(broker: mqlite.Broker) -> None:
    calls: list[int] = []
    second = threading.Event()

    def flaky(message: mqlite.Message) -> None:
        calls.append(message.payload)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        second.set()

    broker.subscribe("q", name="flaky", callback=flaky, backoff=mqlite.Backoff(initial=0.05))
    broker.subscribe("q", name="other", callback=lambda m: None)  # two subscriptions: a watcher sleeps too
    broker.publish("q", "e", 7)
    assert second.wait(WAIT), "the retry never came: nothing woke for its due time"
    assert calls == [7, 7]
    assert broker.drain(timeout=WAIT)


@pytest.mark.memory_only
# The pool thread re-raises the SystemExit, as a push thread always did; pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_callback_that_raises_system_exit_stops_only_its_own_subscription(
    make_broker: Callable[..., mqlite.Broker],
) -> None:
    broker = make_broker()
    raised = threading.Event()

    def exits(message: mqlite.Message) -> None:
        raised.set()
        raise SystemExit("a callback calling sys.exit")

    fast = _Recorder(last=49)
    broker.subscribe("q", name="exits", callback=exits)
    broker.subscribe("q", name="fast", callback=fast)
    for i in range(50):
        broker.publish("q", "e", i)
    assert raised.wait(WAIT)
    assert fast.done.wait(WAIT), "the other subscription lost its thread with the one that stopped"
    assert fast.seen == list(range(50))
    fast.last = 50
    fast.done.clear()
    broker.publish("q", "e", 50)  # still delivered after the stop: a thread took its place
    assert fast.done.wait(WAIT)
    assert fast.seen == list(range(51))


def test_closing_one_subscription_leaves_the_others_delivering(broker: mqlite.Broker) -> None:
    gone = broker.subscribe("q", name="gone", callback=lambda m: None)
    kept = _Recorder(last=9)
    broker.subscribe("q", name="kept", callback=kept)
    gone.close()
    for i in range(10):
        broker.publish("q", "e", i)
    assert kept.done.wait(WAIT)
    assert kept.seen == list(range(10))
    assert broker.drain(timeout=WAIT)
