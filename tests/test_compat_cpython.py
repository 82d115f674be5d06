"""CPython's own queue tests, unchanged, run against mqlite.compat's faces, in memory and on a file.

- ``test.test_queue.QueueTest`` (the FIFO ``queue.Queue`` mixin) with ``queue`` set to a module
  that exposes ``Queue``, ``Empty`` and ``Full`` from ``mqlite.compat``.
- ``test.test_asyncio.test_queues``: the basic, get, put and join tests of ``asyncio.Queue``,
  with ``asyncio.Queue`` replaced by ``mqlite.compat.AsyncQueue`` while each test runs.

In memory each queue the tests make has its private broker; on a file every queue of one test
lives in one broker file, under a name of its own. Every queue is closed after its test.

Left out, each skipped below with its reason, because they check CPython's internals rather than
the queue's behaviour: ``repr``/``str`` details, the private ``_getters``/``_putters`` deques and
``_format``/``_unfinished_tasks``. Not run at all, as not FIFO ``Queue`` tests: CPython's
``FailingQueueTest`` (subclasses overriding ``_put``/``_get``), and the ``LifoQueue``,
``PriorityQueue`` and ``SimpleQueue`` classes, which mqlite.compat does not offer.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import types
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import test.test_asyncio.test_queues as cpython_async
import test.test_queue as cpython_queue

import mqlite
from mqlite import compat

_names = itertools.count()


def _left_out(reason: str) -> Callable[..., None]:
    @unittest.skip(reason)
    def test(self: object) -> None:
        raise AssertionError("skipped")

    return test


class _Backend:
    """Makes the compat queues of one test, on memory or on a file, and closes them after it."""

    def __init__(self, case: unittest.TestCase, on_file: bool) -> None:
        self.faces: list[compat.Queue[Any] | compat.AsyncQueue[Any]] = []
        self.broker: mqlite.Broker | None = None
        if on_file:
            directory = tempfile.TemporaryDirectory(prefix="mqlite-compat-")
            case.addCleanup(directory.cleanup)
            self.broker = mqlite.Broker(Path(directory.name) / "queues.mqlite")
            case.addCleanup(self.broker.close)
        case.addCleanup(self.close_faces)  # cleanups run last-in first-out: faces before the broker

    def close_faces(self) -> None:
        for face in self.faces:
            face.close()

    def thread_class(self) -> type[compat.Queue[Any]]:
        backend = self

        class Queue(compat.Queue[Any]):  # named Queue: basic_queue_test looks its order up by class name
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize, broker=backend.broker, name=f"q{next(_names)}")
                backend.faces.append(self)

        return Queue

    def async_class(self) -> type[compat.AsyncQueue[Any]]:
        backend = self

        class Queue(compat.AsyncQueue[Any]):
            def __init__(self, maxsize: float = 0) -> None:
                super().__init__(maxsize, broker=backend.broker, name=f"q{next(_names)}")
                backend.faces.append(self)

        return Queue


# -- test.test_queue: the FIFO queue.Queue tests ----------------------------------------------


class _ThreadFace(cpython_queue.QueueTest):
    on_file = False

    def setUp(self) -> None:
        backend = _Backend(self, self.on_file)  # type: ignore[arg-type]  # mixed into a TestCase below
        self.queue = types.SimpleNamespace(Queue=backend.thread_class(), Empty=compat.Empty, Full=compat.Full)
        super().setUp()


class TestQueueOnMemory(_ThreadFace, unittest.TestCase):
    on_file = False


class TestQueueOnFile(_ThreadFace, unittest.TestCase):
    on_file = True


# -- test.test_asyncio.test_queues: asyncio.Queue's basic, get, put and join tests --------------


class _AsyncFace:
    on_file = False

    def setUp(self) -> None:
        backend = _Backend(self, self.on_file)  # type: ignore[arg-type]  # mixed into a TestCase below
        face = backend.async_class()
        self.q_class = face  # the join tests make their queues with self.q_class
        patcher = mock.patch.object(asyncio, "Queue", face)  # the other tests call asyncio.Queue()
        patcher.start()
        self.addCleanup(patcher.stop)  # type: ignore[attr-defined]
        super().setUp()  # type: ignore[misc]


_REPR = _left_out("checks CPython's repr/str text ('<Queue', '_getters[1]', '_queue=[1]')")
_PUTTERS = _left_out("appends to and counts CPython's private _putters deque of futures")
_GETTERS = _left_out("counts CPython's private _getters deque of futures")
_FORMAT = _left_out("calls CPython's private _format() and sets _unfinished_tasks")


class _Basic(_AsyncFace, cpython_async.QueueBasicTests):
    test_repr = _REPR
    test_str = _REPR


class _Get(_AsyncFace, cpython_async.QueueGetTests):
    test_get_with_putters = _PUTTERS
    test_cancelled_getters_not_being_held_in_self_getters = _GETTERS


class _Put(_AsyncFace, cpython_async.QueuePutTests):
    test_cancelled_puts_not_being_held_in_self_putters = _PUTTERS


class _Join(_AsyncFace, cpython_async.QueueJoinTests):
    test_format = _FORMAT


class TestAsyncQueueBasicOnMemory(_Basic):
    on_file = False


class TestAsyncQueueBasicOnFile(_Basic):
    on_file = True


class TestAsyncQueueGetOnMemory(_Get):
    on_file = False


class TestAsyncQueueGetOnFile(_Get):
    on_file = True


class TestAsyncQueuePutOnMemory(_Put):
    on_file = False


class TestAsyncQueuePutOnFile(_Put):
    on_file = True


class TestAsyncQueueJoinOnMemory(_Join):
    on_file = False


class TestAsyncQueueJoinOnFile(_Join):
    on_file = True


# The classes above are what pytest collects; these bases would run CPython's tests against
# asyncio.Queue itself (or fail, for the bare mixins).
del _Basic, _Get, _Put, _Join
