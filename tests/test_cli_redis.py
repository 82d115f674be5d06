"""The mqlite command on a Redis URL: the commands that go through mqlite.Broker(url)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

import mqlite
from tests.redis_server import redis_server, require_redis

TIMEOUT = 60


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_redis()
    with redis_server(tmp_path_factory.mktemp("redis-cli")) as server:
        yield server


def mqlite_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqlite", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_publish_info_seek_and_delete_subscription_on_a_redis_url(url: str) -> None:
    with mqlite.Broker(url) as broker:
        broker.subscribe("orders", name="billing", ack="manual").close()
        published = mqlite_command("publish", url, "orders", "created", '{"id": 1}', "--json")
        assert published.returncode == 0, published.stderr
        worker = broker.subscribe("orders", name="billing", ack="manual")
        taken = worker.get(timeout=5)
        assert taken is not None
        assert taken.payload == {"id": 1}
        info = mqlite_command("info", url, "--json")
        assert info.returncode == 0, info.stderr
        [billing] = [s for s in json.loads(info.stdout)["subscriptions"] if s["name"] == "billing"]
        assert billing["pending"] == 1
        broker.subscribe("orders", name="audit", start="latest").close()
        broker.publish("orders", "created", {"id": 2})
        broker.publish("orders", "created", {"id": 3})
        for position, expected in (("latest", 3), ("1", 1)):
            seek = mqlite_command("seek", url, "orders", "audit", position)
            assert seek.returncode == 0, seek.stderr
            assert broker.info().subscription("orders", "audit").position == expected
        # On a URL, seek attaches with the settings info() shows: other settings are refused, clearly.
        refused = mqlite_command("seek", url, "orders", "billing", "earliest")
        assert refused.returncode == 1
        assert "different settings" in refused.stderr
        assert "Traceback" not in refused.stderr
    deleted = mqlite_command("delete-subscription", url, "orders", "billing")
    assert deleted.returncode == 0, deleted.stderr
    with mqlite.Broker(url) as broker:
        assert [s.name for s in broker.info().subscriptions] == ["audit"]


def test_tail_on_a_redis_url_prints_without_consuming_for_any_subscription(url: str) -> None:
    with mqlite.Broker(url, namespace="tail") as broker:
        worker = broker.subscribe("jobs", name="worker", ack="manual")
        for i in range(3):
            broker.publish("jobs", "resize" if i % 2 else "thumbnail", {"n": i})
        tailed = mqlite_command("tail", url, "jobs", "--json", "--events", "resize")
        # the namespace is the broker's: the command's default one has no queue "jobs"
        assert tailed.returncode == 1
        assert "does not exist" in tailed.stderr
        assert [m.payload for m in worker.poll(10)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    with mqlite.Broker(url) as broker:
        worker = broker.subscribe("jobs", name="worker", ack="manual")
        for i in range(3):
            broker.publish("jobs", "resize" if i % 2 else "thumbnail", {"n": i})
        everything = mqlite_command("tail", url, "jobs", "--json")
        assert everything.returncode == 0, everything.stderr
        assert [json.loads(line)["payload"] for line in everything.stdout.splitlines()] == [{"n": i} for i in range(3)]
        resized = mqlite_command("tail", url, "jobs", "--events", "resize", "--from", "1")
        assert resized.returncode == 0, resized.stderr
        assert [line.split("  ")[0] for line in resized.stdout.splitlines()] == ["1"]
        assert [m.payload for m in worker.poll(10)] == [{"n": 0}, {"n": 1}, {"n": 2}]  # nothing consumed


def test_pending_on_a_redis_url_lists_what_a_subscription_holds(url: str) -> None:
    with mqlite.Broker(url) as broker:
        worker = broker.subscribe("invoices", name="mailer", ack="manual")
        broker.publish("invoices", "issued", {"n": 1})
        broker.publish("invoices", "issued", {"n": 2})
        held = worker.get(timeout=5)
        assert held is not None
        listed = mqlite_command("pending", url, "invoices", "mailer", "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)["pending"]
        assert (row["offset"], row["attempts"], row["state"]) == (held.offset, 1, "held")
        assert row["owner"].startswith("broker ")  # the command is another broker than this one
        assert row["held_for"] is not None
        text = mqlite_command("pending", url, "invoices", "mailer")
        assert "held" in text.stdout
        unknown = mqlite_command("pending", url, "invoices", "nobody")
        assert unknown.returncode == 1
        assert "no subscription 'nobody'" in unknown.stderr


def test_dead_letters_on_a_redis_url_are_listed_and_requeued_once(url: str) -> None:
    with mqlite.Broker(url) as broker:
        billing = broker.subscribe("charges", name="billing", ack="manual", max_deliveries=1)
        broker.publish("charges", "charge", {"card": "expired"})
        failed = billing.get(timeout=5)
        assert failed is not None
        billing.nack(failed)  # its one delivery used up: dead-lettered
        listed = mqlite_command("dead-letters", url, "charges", "--json")
        assert listed.returncode == 0, listed.stderr
        [letter] = json.loads(listed.stdout)["dead_letters"]
        assert (letter["payload"], letter["reason"], letter["requeued"]) == ({"card": "expired"}, "nack", False)
        requeued = mqlite_command("dead-letters", url, "charges", "--requeue")
        assert requeued.returncode == 0, requeued.stderr
        assert "requeued charges.dead-letter@0 -> charges@1" in requeued.stdout
        again = billing.get(timeout=5)
        assert again is not None
        assert again.payload == {"card": "expired"}
        assert mqlite_command("dead-letters", url, "charges", "--requeue").stdout.startswith("no dead letters")
        everything = json.loads(mqlite_command("dead-letters", url, "charges", "--all", "--json").stdout)
        assert [letter["requeued"] for letter in everything["dead_letters"]] == [True]


def test_a_file_only_command_on_a_redis_url_says_so(url: str) -> None:
    result = mqlite_command("compact", url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "compact applies to files" in result.stderr
