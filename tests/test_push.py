"""Push delivery: which thread runs callbacks, order, isolation of slow callbacks, drain."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from helpers import WAIT, payloads, pull_all

import mqlite


def test_callbacks_never_run_on_the_publishers_thread(broker: mqlite.Broker) -> None:
    threads: list[int] = []
    broker.subscribe("q", callback=lambda m: threads.append(threading.get_ident()))
    for i in range(10):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert len(threads) == 10
    assert threading.get_ident() not in threads


def test_a_subscriptions_callbacks_run_in_order(broker: mqlite.Broker) -> None:
    received: list[int] = []
    broker.subscribe("q", callback=lambda m: received.append(m.payload))
    for i in range(2000):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert received == list(range(2000))


def test_a_subscriptions_callbacks_run_one_at_a_time(broker: mqlite.Broker) -> None:
    lock = threading.Lock()
    running = 0
    most = 0

    def callback(message: mqlite.Message) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        # Yield the GIL mid-callback so an overlapping call would show.
        threading.Event().wait(0.0001)
        with lock:
            running -= 1

    broker.subscribe("q", callback=callback)
    for i in range(200):
        broker.publish("q", "e", i)
    assert broker.drain(timeout=WAIT)
    assert most == 1


def test_a_slow_callback_does_not_hold_up_the_publisher(broker: mqlite.Broker) -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)

    broker.subscribe("q", callback=slow)
    try:
        broker.publish("q", "e", 0)
        assert entered.wait(WAIT)
        # The callback is blocked; publishing must still complete, many times over.
        published = [broker.publish("q", "e", i) for i in range(1, 1001)]
        assert published[-1].offset == 1000
    finally:
        release.set()
    assert broker.drain(timeout=WAIT)


def test_a_slow_callback_does_not_hold_up_another_subscription(broker: mqlite.Broker) -> None:
    release = threading.Event()
    entered = threading.Event()
    fast_done = threading.Event()
    fast_seen: list[int] = []

    def slow(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)

    def fast(message: mqlite.Message) -> None:
        fast_seen.append(message.payload)
        if message.payload == 99:
            fast_done.set()

    broker.subscribe("q", name="slow", callback=slow)
    broker.subscribe("q", name="fast", callback=fast)
    try:
        for i in range(100):
            broker.publish("q", "e", i)
        assert entered.wait(WAIT)
        assert fast_done.wait(WAIT), "the fast subscription waited for the slow one"
        assert not release.is_set()
        assert fast_seen == list(range(100))
    finally:
        release.set()
    assert broker.drain(timeout=WAIT)


def test_a_slow_callback_does_not_hold_up_a_pull_subscription(broker: mqlite.Broker) -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow(message: mqlite.Message) -> None:
        entered.set()
        release.wait(WAIT)

    broker.subscribe("q", name="slow", callback=slow)
    puller = broker.subscribe("q", name="puller")
    try:
        broker.publish("q", "e", 0)
        assert entered.wait(WAIT)
        broker.publish("q", "e", 1)
        assert payloads(pull_all(puller)) == [0, 1]
    finally:
        release.set()


def test_drain_returns_true_once_every_callback_has_returned(broker: mqlite.Broker) -> None:
    handled: list[int] = []
    broker.subscribe("a", callback=lambda m: handled.append(m.payload))
    broker.subscribe("b", callback=lambda m: handled.append(m.payload))
    for i in range(100):
        broker.publish("a", "e", i)
        broker.publish("b", "e", i)
    assert broker.drain(timeout=WAIT)
    assert len(handled) == 200


def test_drain_returns_false_when_a_callback_is_still_running_at_the_timeout(broker: mqlite.Broker) -> None:
    release = threading.Event()
    broker.subscribe("q", callback=lambda m: release.wait(WAIT))
    try:
        broker.publish("q", "e")
        assert broker.drain(timeout=0.05) is False
    finally:
        release.set()
    assert broker.drain(timeout=WAIT)


def test_drain_with_no_push_subscriptions_returns_true_at_once(broker: mqlite.Broker) -> None:
    broker.subscribe("q", name="puller")
    broker.publish("q", "e")
    assert broker.drain(timeout=0)


def test_drain_ignores_events_a_push_subscription_does_not_want(broker: mqlite.Broker) -> None:
    broker.subscribe("q", events="wanted", callback=lambda m: None)
    broker.publish("q", "unwanted")
    assert broker.drain(timeout=WAIT)


def test_a_callback_may_call_back_into_the_broker(broker: mqlite.Broker) -> None:
    # Callbacks never run under a library lock, so publishing, acking and introspecting from
    # inside one must not deadlock.
    forwarded = broker.subscribe("out", name="reader")
    sub_holder: list[mqlite.Subscription] = []

    def relay(message: mqlite.Message) -> None:
        broker.publish("out", "relayed", message.payload)
        broker.info()
        sub_holder[0].ack(message)

    sub_holder.append(broker.subscribe("in", name="relay", ack="manual", callback=relay))
    for i in range(5):
        broker.publish("in", "e", i)
    assert broker.drain(timeout=WAIT)
    assert payloads(pull_all(forwarded)) == [0, 1, 2, 3, 4]
    assert sub_holder[0].pending == 0


def test_closing_a_push_subscription_stops_its_callbacks(broker: mqlite.Broker) -> None:
    received: list[int] = []
    sub = broker.subscribe("q", callback=lambda m: received.append(m.payload))
    broker.publish("q", "e", 0)
    assert broker.drain(timeout=WAIT)
    sub.close()
    broker.publish("q", "e", 1)
    assert broker.drain(timeout=WAIT)
    assert received == [0]


def test_a_callback_may_close_its_own_subscription(broker: mqlite.Broker) -> None:
    received: list[int] = []
    holder: list[mqlite.Subscription] = []
    closed = threading.Event()

    def once(message: mqlite.Message) -> None:
        received.append(message.payload)
        holder[0].close()
        closed.set()

    holder.append(broker.subscribe("q", callback=once))
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)
    assert closed.wait(WAIT)
    assert broker.drain(timeout=WAIT)
    assert received == [0]


def test_pull_calls_on_a_push_subscription_are_rejected(broker: mqlite.Broker) -> None:
    sub = broker.subscribe("q", callback=lambda m: None)
    with pytest.raises(mqlite.InvalidArgument, match="callback"):
        sub.get(timeout=0)
    with pytest.raises(mqlite.InvalidArgument):
        sub.poll()


# -- the manual dispatcher -----------------------------------------------------------------


def test_manual_dispatcher_runs_callbacks_only_when_asked(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher
) -> None:
    received: list[int] = []
    manual_broker.subscribe("q", callback=lambda m: received.append(m.payload))
    manual_broker.publish("q", "e", 0)
    assert received == []
    assert dispatcher.run_ready() is True
    assert received == [0]
    assert dispatcher.run_ready() is False


def test_manual_dispatcher_runs_callbacks_on_the_calling_thread(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher
) -> None:
    threads: list[int] = []
    manual_broker.subscribe("q", callback=lambda m: threads.append(threading.get_ident()))
    manual_broker.publish("q", "e")
    dispatcher.run_ready()
    assert threads == [threading.get_ident()]


def test_drain_runs_a_manual_dispatcher(manual_broker: mqlite.Broker) -> None:
    received: list[int] = []
    manual_broker.subscribe("q", callback=lambda m: received.append(m.payload))
    for i in range(3):
        manual_broker.publish("q", "e", i)
    assert manual_broker.drain(timeout=WAIT)
    assert received == [0, 1, 2]


def test_manual_dispatcher_delivers_what_callbacks_publish(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher
) -> None:
    chain: list[str] = []
    manual_broker.subscribe("a", callback=lambda m: manual_broker.publish("b", "e", m.payload + "!"))
    manual_broker.subscribe("b", callback=lambda m: chain.append(m.payload))
    manual_broker.publish("a", "e", "hi")
    dispatcher.run_ready()
    assert chain == ["hi!"]


# -- what a callback may raise ---------------------------------------------------------------

STOPPING = [KeyboardInterrupt, SystemExit, GeneratorExit]


@pytest.mark.parametrize("stop", STOPPING, ids=lambda e: e.__name__)
def test_a_callback_that_raises_a_base_exception_stops_the_work_and_propagates(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher, stop: type[BaseException]
) -> None:
    calls: list[int] = []

    def callback(message: mqlite.Message) -> None:
        calls.append(message.payload)
        if message.payload == 1:
            raise stop

    manual_broker.subscribe("q", name="n", callback=callback)
    for i in range(3):
        manual_broker.publish("q", "e", i)
    with pytest.raises(stop):
        dispatcher.run_ready()
    # Neither retried nor carried on past: the rest of the batch was never handed over.
    assert calls == [0, 1]


@pytest.mark.parametrize("stop", STOPPING, ids=lambda e: e.__name__)
def test_a_base_exception_in_a_callback_is_neither_acked_nor_a_failure(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher, stop: type[BaseException]
) -> None:
    def callback(message: mqlite.Message) -> None:
        if message.payload == 1:
            raise stop

    manual_broker.subscribe("q", name="n", callback=callback, max_deliveries=1)
    for i in range(3):
        manual_broker.publish("q", "e", i)
    with pytest.raises(stop):
        dispatcher.run_ready()
    info = manual_broker.info().subscription("q", "n")
    assert (info.delivered, info.acked, info.redelivered, info.dead_lettered) == (1, 1, 0, 0)


@pytest.mark.parametrize("stop", STOPPING, ids=lambda e: e.__name__)
def test_messages_a_base_exception_stopped_are_delivered_again_later(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher, stop: type[BaseException]
) -> None:
    calls: list[int] = []

    def stops_once(message: mqlite.Message) -> None:
        calls.append(message.payload)
        if len(calls) == 2:
            raise stop

    manual_broker.subscribe("q", name="n", callback=stops_once)
    for i in range(3):
        manual_broker.publish("q", "e", i)
    with pytest.raises(stop):
        manual_broker.drain(timeout=WAIT)
    assert manual_broker.drain(timeout=WAIT)
    assert calls == [0, 1, 1, 2]
    info = manual_broker.info().subscription("q", "n")
    assert (info.acked, info.redelivered, info.pending, info.lag) == (3, 0, 0, 0)


def test_messages_a_base_exception_stopped_go_to_the_next_subscription_of_the_name(
    manual_broker: mqlite.Broker, dispatcher: mqlite.ManualDispatcher
) -> None:
    def interrupted(message: mqlite.Message) -> None:
        raise KeyboardInterrupt

    first = manual_broker.subscribe("q", name="n", callback=interrupted)
    for i in range(3):
        manual_broker.publish("q", "e", i)
    with pytest.raises(KeyboardInterrupt):
        dispatcher.run_ready()
    first.close()
    received: list[int] = []
    manual_broker.subscribe("q", name="n", callback=lambda m: received.append(m.payload))
    assert manual_broker.drain(timeout=WAIT)
    assert received == [0, 1, 2]


def test_an_exception_in_a_callback_is_logged_retried_and_the_batch_goes_on(
    manual_broker: mqlite.Broker,
    clock: mqlite.ManualClock,
    dispatcher: mqlite.ManualDispatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def fails_once(message: mqlite.Message) -> None:
        calls.append(message.payload)
        if calls.count(message.payload) == 1 and message.payload == 0:
            raise RuntimeError("first try fails")

    manual_broker.subscribe("q", name="n", callback=fails_once, backoff=mqlite.Backoff(initial=1.0))
    for i in range(3):
        manual_broker.publish("q", "e", i)
    with caplog.at_level("WARNING", logger="mqlite"):
        dispatcher.run_ready()
    assert calls == [0, 1, 2]
    assert "first try fails" in caplog.text
    clock.advance(1)
    assert manual_broker.drain(timeout=WAIT)
    assert calls == [0, 1, 2, 0]
    info = manual_broker.info().subscription("q", "n")
    assert (info.acked, info.redelivered, info.pending) == (3, 1, 0)


# The worker re-raises on its thread, as it should; pytest reports every exception a thread raises.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_push_thread_whose_callback_raises_system_exit_logs_that_it_stopped(
    make_broker: Callable[..., mqlite.Broker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_broker()
    raised = threading.Event()

    def exits(message: mqlite.Message) -> None:
        raised.set()
        raise SystemExit("a callback calling sys.exit")

    with caplog.at_level("ERROR", logger="mqlite"):
        broker.subscribe("q", name="n", callback=exits)
        broker.publish("q", "e")
        assert raised.wait(WAIT)
        broker.close(timeout=WAIT)  # joins the push thread
    assert "stopped" in caplog.text
    assert broker.info().subscription("q", "n").acked == 0


# -- drain at its deadline -----------------------------------------------------------------


class _ClosesOnSecondLook:
    """A dispatcher that runs nothing, and closes ``subscription`` the second time drain looks.

    That settles everything without the progress signal a drain waits for, as a subscription
    closed by another thread while a drain waits does.
    """

    def __init__(self) -> None:
        self.subscription: mqlite.Subscription | None = None
        self.looks = 0

    def start(self, worker: object) -> None:
        pass

    def run_ready(self) -> bool:
        self.looks += 1
        if self.looks == 2 and self.subscription is not None:
            self.subscription.close()
        return False

    def close(self, timeout: float) -> bool:
        return True


@pytest.mark.parametrize("how", ["drain", "adrain"])
def test_drain_and_adrain_look_once_more_at_their_deadline(make_broker: Callable[..., mqlite.Broker], how: str) -> None:
    dispatcher = _ClosesOnSecondLook()
    broker = make_broker(dispatcher=dispatcher)
    dispatcher.subscription = broker.subscribe("q", callback=lambda m: None)
    broker.publish("q", "e")
    drained = broker.drain(timeout=0.05) if how == "drain" else asyncio.run(broker.adrain(timeout=0.05))
    assert drained is True
    assert dispatcher.looks == 2


@pytest.mark.parametrize("how", ["drain", "adrain"])
def test_drain_and_adrain_return_false_when_unsettled_at_their_deadline(
    make_broker: Callable[..., mqlite.Broker], how: str
) -> None:
    dispatcher = _ClosesOnSecondLook()  # never given a subscription: nothing ever settles
    broker = make_broker(dispatcher=dispatcher)
    broker.subscribe("q", callback=lambda m: None)
    broker.publish("q", "e")
    drained = broker.drain(timeout=0.05) if how == "drain" else asyncio.run(broker.adrain(timeout=0.05))
    assert drained is False
    assert dispatcher.looks == 2
