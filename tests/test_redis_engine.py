"""The Redis Streams engine (issue #15) against redis-server processes that the tests start themselves.

Brokers open with ``mqlite.Broker(url, namespace=...)``, the URL carrying a short heartbeat
(``?heartbeat=0.5``). Each factory call uses a fresh key namespace, so tests share one server
without seeing each other's queues.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mqlite
import mqlite.testing
from mqlite.testing import check_engine
from mqlite.testing.conformance import CHECKS
from tests import redis_processes
from tests.redis_server import _free_port, redis_server, require_redis

WAIT = 10.0


@pytest.fixture
def server(redis_url: str) -> str:
    """The session's redis-server (``tests/conftest.py``); each test uses namespaces of its own."""
    return redis_url


class RedisBrokers:
    """Factories for brokers on one server: ``open`` uses a new namespace, ``again`` the latest one."""

    def __init__(self, server: str, query: str = "") -> None:
        self.server = server
        self.url = server + query  # what Broker and the child processes open
        self.namespace = ""
        self.opened: list[mqlite.Broker] = []

    def open(self, **kwargs: Any) -> mqlite.Broker:
        self.namespace = f"t{uuid.uuid4().hex[:8]}"
        return self.again(**kwargs)

    def again(self, **kwargs: Any) -> mqlite.Broker:
        broker = mqlite.Broker(self.url, namespace=self.namespace, **kwargs)
        self.opened.append(broker)
        return broker


@pytest.fixture
def brokers(server: str) -> Iterator[RedisBrokers]:
    """Brokers on the module's server (heartbeat 0.5 s), all closed at teardown."""
    factory = RedisBrokers(server, "?heartbeat=0.5")
    yield factory
    for broker in reversed(factory.opened):
        broker.close()


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5.0)


# -- the contract --------------------------------------------------------------------------------


def test_redis_passes_every_check_of_the_contract_with_reopen_and_sharing(brokers: RedisBrokers) -> None:
    ran = check_engine(brokers.open, reopen=brokers.again, shared=brokers.again)
    assert len(ran) == len(CHECKS)


# -- opening -------------------------------------------------------------------------------------


def test_a_server_that_may_evict_keys_is_refused_with_storage_error(brokers: RedisBrokers) -> None:
    client = redis_client(brokers.server)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(mqlite.StorageError, match=r"maxmemory-policy allkeys-lru.*noeviction"):
            brokers.open()
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_an_unreachable_server_raises_storage_error_at_open() -> None:
    require_redis()
    began = time.monotonic()
    with pytest.raises(mqlite.StorageError, match=r"Redis at redis://127\.0\.0\.1"):
        mqlite.Broker(f"redis://127.0.0.1:{_free_port()}/0", namespace="x")
    assert time.monotonic() - began < WAIT


def test_a_url_that_is_not_redis_is_refused() -> None:
    require_redis()
    from mqlite.engine.redis.engine import RedisEngine

    with pytest.raises(mqlite.InvalidArgument, match="redis://, rediss:// or unix://"):
        RedisEngine("http://localhost:6379")
    with pytest.raises(mqlite.InvalidArgument, match="namespace must be a non-empty str"):
        RedisEngine("redis://localhost:6379", namespace="")
    with pytest.raises(mqlite.InvalidArgument, match="heartbeat must be"):
        RedisEngine("redis://localhost:6379", heartbeat=0)
    with pytest.raises(mqlite.InvalidArgument, match="heartbeat must be"):
        RedisEngine("redis://localhost:6379?heartbeat=-1")
    with pytest.raises(mqlite.InvalidArgument, match="heartbeat in the Redis URL must be a number"):
        RedisEngine("redis://localhost:6379?heartbeat=soon")
    with pytest.raises(mqlite.InvalidArgument, match="given both as an argument and in the Redis URL"):
        RedisEngine("redis://localhost:6379?heartbeat=1", heartbeat=2)
    with pytest.raises(mqlite.InvalidArgument, match="gives heartbeat= twice"):
        RedisEngine("redis://localhost:6379?heartbeat=1&heartbeat=2")


def test_url_options_reach_the_engine_and_the_rest_of_the_query_reaches_redis_py(server: str) -> None:
    with mqlite.Broker(f"{server[:-2]}/3?heartbeat=0.25&socket_timeout=2&client_name=mq-test", namespace="o") as broker:
        engine: Any = broker._engine
        assert (engine._heartbeat, engine._socket_timeout) == (0.25, 2.0)
        broker.publish("q", "e", 1)
        client = redis_client(server[:-2] + "/3")
        try:
            assert client.exists("o:{q}:meta") == 1, "db 3 of the URL is the one written"
            names = {row.get("name") for row in client.client_list()}
            assert "mq-test" in names, "redis-py's own query parameters still apply"
            ttl = client.pttl(f"o:live:{engine.broker_id}")
            assert 0 < ttl <= 250, "the heartbeat key lives as long as the URL's heartbeat"
        finally:
            client.close()


# -- keys ----------------------------------------------------------------------------------------

AWKWARD = ["a", "a:b", "a%3Ab", "{a}", "a}:{b", "}", "%", "ü{ß}:\u2603", "a:log"]


def test_queue_names_with_braces_colons_and_unicode_keep_apart(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    subs = {name: broker.subscribe(name, name="n") for name in AWKWARD}
    for name in AWKWARD:
        broker.publish(name, "e", name)
    for name, sub in subs.items():
        assert [m.payload for m in sub.poll(max_messages=10, timeout=0)] == [name]
    assert {info.name for info in broker.info().queues} == set(AWKWARD)
    client = redis_client(brokers.server)
    try:
        keys = [key.decode() for key in client.scan_iter(match=f"{brokers.namespace}:*")]
    finally:
        client.close()
    tags = {key.split("{", 1)[1].split("}", 1)[0] for key in keys if "{" in key}
    assert len(tags) == len(AWKWARD), "each queue has exactly one hash tag, shared by all its keys"
    for key in keys:
        assert key.count("{") <= 1, key
        assert key.count("}") <= 1, key


def test_subscription_names_with_colons_keep_apart(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    plain = broker.subscribe("q", name="x", start="earliest")
    suffixed = broker.subscribe("q", name="x:held", start="earliest")
    broker.publish("q", "e", 0)
    broker.publish("q", "e", 1)
    assert [m.payload for m in plain.poll(max_messages=1, timeout=0)] == [0]
    assert [m.payload for m in suffixed.poll(max_messages=10, timeout=0)] == [0, 1]
    assert (plain.position, suffixed.position) == (1, 2)
    assert {s.name for s in broker.info().subscriptions} == {"x", "x:held"}


# -- publishing ----------------------------------------------------------------------------------


def test_concurrent_publishers_on_two_brokers_get_contiguous_offsets(brokers: RedisBrokers) -> None:
    first = brokers.open()
    second = brokers.again()
    first.queue("q", retention="limits")
    got: list[list[int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()  # guards got and errors

    def publish(broker: mqlite.Broker, writer: int) -> None:
        try:
            mine = [broker.publish("q", "e", [writer, i]).offset for i in range(50)]
            mine += [m.offset for m in broker.queue("q").publish_many([("e", [writer, i]) for i in range(50)])]
        except BaseException as error:  # noqa: BLE001  # reported by the test thread
            with lock:
                errors.append(error)
            return
        with lock:
            got.append(mine)

    threads = [threading.Thread(target=publish, args=(b, w)) for w, b in enumerate([first, second] * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sorted(offset for mine in got for offset in mine) == list(range(400))
    for mine in got:
        assert mine == sorted(mine), "each publisher's offsets grow"
        assert mine[50:] == list(range(mine[50], mine[50] + 50)), "a publish_many is contiguous"
    assert first.queue("q").end_offset == 400


def test_a_publish_many_that_cannot_be_serialized_writes_nothing(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    with pytest.raises(mqlite.SerializationError):
        queue.publish_many([("e", 1), ("e", object())])
    assert queue.end_offset == 0
    assert queue.publish("e", 1).offset == 0


# -- several processes ---------------------------------------------------------------------------


def spawn() -> Any:
    return multiprocessing.get_context("spawn")


def test_competing_consumer_processes_each_get_every_message_once(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    broker.subscribe("q", name="workers", ack="manual").close()  # the name exists before publishing
    context = spawn()
    acks, ready, stop = context.Queue(), context.Barrier(4), context.Event()
    arguments = (brokers.url, brokers.namespace, acks, ready, stop, 10)
    children = [context.Process(target=redis_processes.consume, args=arguments) for _ in range(3)]
    for child in children:
        child.start()
    try:
        ready.wait(WAIT)
        broker.queue("q").publish_many([("job", i) for i in range(300)])
        acked: list[int] = []
        pids = set()
        deadline = time.monotonic() + 3 * WAIT
        while len(acked) < 300 and time.monotonic() < deadline:
            pid, offset = acks.get(timeout=WAIT)
            acked.append(offset)
            pids.add(pid)
        stop.set()
        done = [acks.get(timeout=WAIT) for _ in children]
    finally:
        stop.set()
        for child in children:
            child.join(WAIT)
            if child.is_alive():
                child.kill()
                child.join(WAIT)
    assert sorted(acked) == list(range(300)), "every message acked exactly once"
    assert sum(count for _, count in done) == 300
    assert len(pids) > 1, "the processes competed"
    info = broker.info().subscription("q", "workers")
    assert (info.pending, info.acked, info.position) == (0, 300, 300)


def test_a_publish_in_one_process_wakes_a_reader_in_another(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    context = spawn()
    ready, results = context.Event(), context.Queue()
    child = context.Process(target=redis_processes.wait_for_one, args=(brokers.url, brokers.namespace, ready, results))
    child.start()
    try:
        assert ready.wait(WAIT)
        broker.publish("q", "e", "wake up")
        elapsed, payload = results.get(timeout=WAIT)
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    assert payload == "wake up"
    assert elapsed < WAIT / 4, f"woke after {elapsed:.2f} s"


def test_a_killed_consumers_messages_go_to_the_others_after_its_heartbeat(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    survivor = broker.subscribe("q", name="workers", ack="manual")
    broker.queue("q").publish_many([("job", i) for i in range(5)])
    context = spawn()
    results = context.Queue()
    child = context.Process(target=redis_processes.take_and_hang, args=(brokers.url, brokers.namespace, 5, results))
    child.start()
    try:
        taken = results.get(timeout=WAIT)
        assert taken == [0, 1, 2, 3, 4]
        assert broker.info().subscription("q", "workers").consumers == 2, "info() counts the other process's"
        assert survivor.poll(max_messages=10, timeout=0) == []
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(WAIT)
        began = time.monotonic()
        got: list[int] = []
        while len(got) < 5 and time.monotonic() - began < WAIT:
            got += [m.offset for m in survivor.poll(max_messages=10, timeout=WAIT)]
        elapsed = time.monotonic() - began
    finally:
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    assert got == [0, 1, 2, 3, 4]
    # heartbeat 0.5 s: its key expires within 0.5 s, and the survivor's watcher reaps every 0.5 s
    assert elapsed < 3.0, f"redelivered after {elapsed:.2f} s"
    survivor.ack(*got)
    info = broker.info().subscription("q", "workers")
    assert (info.consumers, info.pending, info.redelivered) == (1, 0, 5)


def test_a_name_attached_in_another_broker_refuses_other_settings(brokers: RedisBrokers) -> None:
    first = brokers.open()
    second = brokers.again()
    first.subscribe("q", name="n", ack="manual")
    with pytest.raises(mqlite.ConfigConflict, match="another broker"):
        second.subscribe("q", name="n")
    first.close()
    assert second.subscribe("q", name="n").pending == 0, "with nobody attached, new settings apply"


def test_an_ephemeral_reader_of_a_killed_broker_stops_pinning_retention(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q")  # interest retention: kept while some cursor will read it
    context = spawn()
    results = context.Queue()
    child = context.Process(target=redis_processes.read_and_hang, args=(brokers.url, brokers.namespace, results))
    child.start()
    try:
        assert results.get(timeout=WAIT) == "reading"
        queue.publish("e", 0)
        assert (queue.start_offset, len(queue)) == (0, 1), "the other process's reader keeps the message"
        client = redis_client(brokers.server)
        signals = f"{brokers.namespace}:{{q}}:sig"  # reaping appends to the queue's signal stream
        last = client.xrevrange(signals, count=1)
        seen = last[0][0] if last else b"0-0"
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(WAIT)
        deadline = time.monotonic() + WAIT
        while len(queue) and time.monotonic() < deadline:
            for _, entries in client.xread({signals: seen}, block=int(WAIT * 1000)) or ():
                seen = entries[-1][0]
        client.close()
    finally:
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    assert len(queue) == 0, "the dead reader's cursor was reaped"


# -- the server going away -----------------------------------------------------------------------


def test_a_server_that_stops_raises_storage_error_and_the_broker_recovers(tmp_path: Path) -> None:
    require_redis()
    port = _free_port()
    options = ("--appendonly", "yes", "--appendfsync", "always")
    with redis_server(tmp_path, *options, port=port) as url:
        broker = mqlite.Broker(f"{url}?heartbeat=0.5&socket_timeout=1", namespace="x")
        sub = broker.subscribe("q", name="n", ack="manual")
        broker.publish("q", "e", 0)
    try:
        with pytest.raises(mqlite.StorageError):
            broker.publish("q", "e", "lost")
        with pytest.raises(mqlite.StorageError):
            sub.poll(max_messages=1, timeout=0)
        with redis_server(tmp_path, *options, port=port):
            assert broker.publish("q", "e", 1).offset == 1, "the refused publish used no offset"
            got = sub.poll(max_messages=10, timeout=0)
            assert [m.payload for m in got] == [0, 1]
            sub.ack(*got)
            broker.close()
    finally:
        broker.close()


def test_a_killed_server_with_aof_always_keeps_everything_acknowledged(tmp_path: Path) -> None:
    require_redis()
    port = _free_port()
    options = ("--appendonly", "yes", "--appendfsync", "always")
    with redis_server(tmp_path, *options, port=port) as url, mqlite.Broker(url, namespace="x") as broker:
        sub = broker.subscribe("q", name="n", ack="manual")
        broker.queue("q").publish_many([("e", i) for i in range(100)])
        taken = sub.poll(max_messages=10, timeout=0)
        sub.ack(*taken[:5])
        client = redis_client(url)
        pid = client.info("server")["process_id"]
        client.close()
        os.kill(pid, signal.SIGKILL)
    with redis_server(tmp_path, *options, port=port) as url, mqlite.Broker(url, namespace="x") as broker:
        info = broker.info()
        assert info.queue("q").end_offset == 100
        row = info.subscription("q", "n")
        assert (row.position, row.pending, row.acked) == (10, 5, 5)
        again = broker.subscribe("q", name="n", ack="manual")
        assert [m.payload for m in again.poll(max_messages=3, timeout=0)] == [10, 11, 12]


# -- asyncio -------------------------------------------------------------------------------------


def test_asyncio_faces_run_on_redis(brokers: RedisBrokers) -> None:
    import asyncio

    broker = brokers.open()
    sub = broker.subscribe("q", name="n", ack="manual")

    async def main() -> list[Any]:
        waiting = asyncio.ensure_future(sub.aget(timeout=WAIT))
        await asyncio.sleep(0)  # let the get start; it blocks in the I/O thread, not the loop
        broker.publish("q", "e", "x")
        message = await waiting
        assert message is not None
        sub.ack(message)
        return [message.payload, sub.pending]

    assert asyncio.run(main()) == ["x", 0]


# -- filters across brokers, URLs ----------------------------------------------------------------


def test_joins_made_through_two_brokers_both_apply(brokers: RedisBrokers) -> None:
    first = brokers.open()
    second = brokers.again()
    a = first.subscribe("q", name="n", events="a")
    b = second.subscribe("q", name="n", events="a")
    a.join("b")
    b.join("c")  # computed from the settings b had: the compare-and-set makes it retry on a's
    for event in ["a", "b", "c", "d"]:
        first.publish("q", event, event)
    got = a.poll(max_messages=10, timeout=0) + b.poll(max_messages=10, timeout=0)
    assert sorted(m.payload for m in got) == ["a", "b", "c"]
    assert first.info().subscription("q", "n").events == ("a", "b", "c")


def test_a_unix_socket_url_opens(tmp_path: Path) -> None:
    require_redis()
    from mqlite.engine.redis.engine import RedisEngine

    socket_path = tmp_path / "redis.sock"
    with redis_server(tmp_path, "--unixsocket", str(socket_path), "--unixsocketperm", "700"):
        engine = RedisEngine(f"unix://{socket_path}", namespace="sock")
        try:
            assert engine.queues() == []
        finally:
            engine.close()


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl (skips without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for a TLS redis-server")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_a_rediss_url_opens_a_tls_connection_and_the_broker_works_over_it(tmp_path: Path) -> None:
    require_redis()
    cert, key = _self_signed_certificate(tmp_path)
    tls_port = _free_port()
    options = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    options += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    with redis_server(tmp_path, *options) as plain_url:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        with mqlite.Broker(url, namespace="tls") as broker:
            sub = broker.subscribe("q", name="n", ack="manual")
            first = broker.publish("q", "e", {"over": "tls"}, dedup_id="once")
            assert broker.publish("q", "e", {"over": "tls"}, dedup_id="once") == first
            message = sub.get(timeout=5)
            assert message == first
            sub.ack(message)
            assert broker.info().subscription("q", "n").acked == 1
        # The same data, read back over the plain port: the TLS broker talked to this server.
        with mqlite.Broker(plain_url, namespace="tls") as plain:
            assert plain.queue("q").end_offset == 1
        # A client that does not trust the certificate is refused, as a StorageError.
        with pytest.raises(mqlite.StorageError):
            mqlite.Broker(f"rediss://127.0.0.1:{tls_port}/0", namespace="tls")


# -- dead letters --------------------------------------------------------------------------------


def test_a_dead_letter_that_cannot_be_published_stays_held_until_its_consumer_goes(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    full = broker.queue("q.dead-letter", retention="limits", max_messages=1, overflow="reject")
    full.publish("e", "filler")
    sub = broker.subscribe("q", name="n", ack="manual", max_deliveries=1)
    broker.publish("q", "e", "poison")
    message = sub.get(timeout=0)
    assert message is not None
    sub.nack(message)  # dead, but its queue refuses it: the letter stays in transit, held
    assert sub.get(timeout=0) is None
    with pytest.raises(mqlite.NotPending):
        sub.ack(message)
    sub.close()  # its consumer goes: the message comes back to the line
    full.configure(mqlite.QueueConfig(retention="limits"))
    again = broker.subscribe("q", name="n", ack="manual", max_deliveries=1)
    returned = again.get(timeout=0)
    assert returned is not None
    assert returned.payload == "poison"
    again.nack(returned)
    assert again.pending == 0
    letters = broker.subscribe("q.dead-letter", start="earliest").poll(10, timeout=0)
    assert [m.payload for m in letters] == ["filler", "poison"]
    assert broker.info().subscription("q", "n").dead_lettered == 1


# -- the reference model -------------------------------------------------------------------------


def test_redis_matches_the_reference_model(brokers: RedisBrokers) -> None:
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    from mqlite.testing.stateful import BrokerMachine

    class RedisBrokerMachine(BrokerMachine):
        """The machine on a broker with a new namespace of the module's server per run."""

        def open_broker(self) -> mqlite.Broker:
            return brokers.open(clock=self.clock, dispatcher=mqlite.ManualDispatcher())

    # Every step is a round trip or more: fewer examples than memory's 300 keep the run well under the timeout
    # (150 examples of 50 steps passed once, in 87 s).
    run_state_machine_as_test(
        RedisBrokerMachine,
        settings=settings(
            max_examples=25, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        ),
    )


def test_pending_messages_name_the_other_broker_that_holds_one(brokers: RedisBrokers) -> None:
    clock = mqlite.ManualClock()
    first = brokers.open(clock=clock)
    second = brokers.again(clock=clock)
    in_first = first.subscribe("q", name="n", ack="manual")
    in_second = second.subscribe("q", name="n", ack="manual")
    first.queue("q").publish_many([("e", 0), ("e", 1)])
    held = in_first.get(timeout=0)
    assert held is not None
    in_first.nack(held, delay=30)
    taken = in_first.get(timeout=0)
    assert taken is not None
    listed = in_second.pending_messages()
    assert [(p.offset, p.state, p.attempts) for p in listed] == [(0, "waiting", 1), (1, "out", 1)]
    assert listed[0].due == clock.time() + 30
    assert listed[1].holder is not None
    assert listed[1].holder.startswith("broker "), listed[1].holder
    assert listed[1].held_since == clock.time()
    assert [p.holder for p in in_first.pending_messages()] == [None, in_first._label]


# -- what Redis does differently ------------------------------------------------------------------


def test_record_and_faults_refuse_a_redis_broker_with_a_type_error_naming_the_engine(
    brokers: RedisBrokers,
) -> None:
    broker = brokers.open()
    broker.queue("q")
    with pytest.raises(TypeError, match=r"DeliveryCore; RedisQueue of queue 'q' is not one"):
        mqlite.testing.record(broker)
    with pytest.raises(TypeError, match=r"DeliveryCore; RedisQueue of queue 'q' is not one"):
        brokers.open(faults=mqlite.testing.Faults(seed=1, duplicate=0.5)).queue("q")


def test_a_long_run_with_limits_keeps_the_stream_itself_bounded(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits", max_messages=100)
    broker.subscribe("q", name="never-reads")
    client = redis_client(brokers.server)
    longest = 0
    try:
        for i in range(30):
            queue.publish_many([("e", j) for j in range(i * 100, i * 100 + 100)])
            longest = max(longest, client.xlen(f"{brokers.namespace}:{{q}}:log"))
    finally:
        client.close()
    assert len(queue) == 100
    assert longest <= 100 + 100 + 64, "the trim runs every 64 offsets: at most a batch and 64 over the limit"


# -- the fast paths: scripts that define only the helpers they use, bulk calls, the script caller ----


def test_each_script_defines_every_prelude_helper_it_calls() -> None:
    import re

    from mqlite.engine.redis import scripts

    helpers = set().union(*(defined for defined, _, _ in scripts._HELPERS))
    for name, script in scripts.SCRIPTS.items():
        code = re.sub(r"--.*$", "", script, flags=re.MULTILINE)
        defined = {
            found[0] or found[1] for found in re.findall(r"^local (?:function (\w+)|(\w+) =)", code, re.MULTILINE)
        }
        defined |= {"meta", "log", "cursors", "events", "sig"}
        missing = (set(re.findall(r"[A-Za-z_]\w*", code)) & helpers) - defined
        assert not missing, f"script {name!r} uses helpers it does not define: {sorted(missing)}"


def test_a_batch_larger_than_one_bulk_slice_is_taken_acked_and_redelivered_whole(brokers: RedisBrokers) -> None:
    # The scripts pass offsets to variadic commands in slices of 4,000 arguments (2,000 pairs).
    broker = brokers.open()
    sub = broker.subscribe("q", name="w", ack="manual", start="earliest")
    broker.queue("q").publish_many([("e", i) for i in range(4500)])
    taken = sub.poll(4500, WAIT)
    assert [m.payload for m in taken] == list(range(4500))
    assert sub.pending == 4500
    sub.ack(*taken[:4200])
    assert sub.pending == 300
    with pytest.raises(mqlite.NotPending):
        sub.ack(*taken[4100:4300])  # 100 of them were acked already: nothing changes
    assert sub.pending == 300
    sub.nack(taken[4200], delay=0)
    again = sub.poll(1, WAIT)
    assert [(m.offset, m.attempt) for m in again] == [(4200, 2)]


def test_a_script_cache_flushed_on_the_server_is_loaded_again(brokers: RedisBrokers) -> None:
    broker = brokers.open()
    queue = broker.queue("q", retention="limits")
    assert queue.publish("e", 1).offset == 0
    client = redis_client(brokers.server)
    try:
        client.script_flush()
    finally:
        client.close()
    assert queue.publish("e", 2).offset == 1
    assert [m.payload for m in broker.subscribe("q", start="earliest").poll(2, WAIT)] == [1, 2]


def test_an_ack_of_a_run_with_a_gap_in_the_middle_refuses_all_of_it(brokers: RedisBrokers) -> None:
    # A run of consecutive offsets is checked with one ZCOUNT; a run that is not all pending
    # falls back to checking each offset, and names the first one that is not.
    broker = brokers.open()
    sub = broker.subscribe("q", name="w", ack="manual", start="earliest")
    broker.queue("q").publish_many([("e", i) for i in range(5)])
    taken = sub.poll(5, WAIT)
    sub.ack(taken[2])
    with pytest.raises(mqlite.NotPending, match="offset 2 "):
        sub.ack(*taken)
    assert sub.pending == 4
    sub.ack(*taken[:2], *taken[3:])
    assert sub.pending == 0


@pytest.mark.parametrize("step", ["push_and_watch", "push_or_wait"])
def test_a_push_take_that_loses_its_cursor_to_a_close_reports_the_subscription_closed(
    brokers: RedisBrokers, step: str
) -> None:
    broker = brokers.open()
    sub = broker.subscribe("q")
    engine: Any = broker._engines["q"]

    def take_as_the_close_deletes_the_cursor(consumer: Any, max_messages: int) -> Any:
        consumer._mark_closed("closed meanwhile")
        raise mqlite.StorageError("the subscription's cursor is gone from the server")

    engine._push_batch = take_as_the_close_deletes_the_cursor
    attempt = getattr(engine, step)(sub, 10, lambda: None)
    assert attempt.value is None  # closed: the worker stops quietly, no thread dies of it
    sub._reopen()

    def take_that_fails(consumer: Any, max_messages: int) -> Any:
        raise mqlite.StorageError("the server went away")

    engine._push_batch = take_that_fails
    with pytest.raises(mqlite.StorageError, match="went away"):
        getattr(engine, step)(sub, 10, lambda: None)  # an open subscription's failure is raised
