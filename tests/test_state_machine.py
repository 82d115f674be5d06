"""The broker against the reference model, driven by ``mqlite.testing.BrokerMachine``.

The machine (mqlite/testing/stateful.py) publishes, subscribes, reads, acks, nacks, seeks and
closes on one queue, and after every step compares the broker with
``mqlite.testing.ReferenceModel``, which is written from the documented semantics, not from
mqlite's code. It runs here on both backends, with more examples than a user's copy would.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from mqlite.testing.stateful import BrokerMachine


class FileBrokerMachine(BrokerMachine):
    """The same machine on a broker backed by a new SQLite file per run."""

    backend = "file"


BrokerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Each step on a file commits; fewer examples keep the CI time modest.
FileBrokerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_broker_matches_the_reference_model = BrokerMachine.TestCase
test_file_broker_matches_the_reference_model = FileBrokerMachine.TestCase


class WorkQueueBrokerMachine(BrokerMachine):
    """The machine on a ``retention="workqueue"`` queue: the model also says what it keeps."""

    retention = "workqueue"


class FileWorkQueueBrokerMachine(WorkQueueBrokerMachine):
    backend = "file"


WorkQueueBrokerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FileWorkQueueBrokerMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_work_queue_matches_the_reference_model = WorkQueueBrokerMachine.TestCase
test_file_work_queue_matches_the_reference_model = FileWorkQueueBrokerMachine.TestCase
