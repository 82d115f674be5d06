"""Drop-in faces: ``queue.Queue`` and ``asyncio.Queue`` over a broker's queue and named subscription.

Change one import and a queue becomes durable, shared between processes and visible in
``broker.info()``::

    from mqlite.compat import Queue          # was: from queue import Queue
    jobs = Queue(broker=mqlite.Broker("jobs.mqlite"), name="jobs")

How the standard library's words map onto mqlite's (``docs/compat.md`` says it for users):

- ``put(item)`` publishes ``item`` as the payload of an ``"item"`` event on the queue ``name``.
- ``get()`` takes the next message as a competing consumer of the named subscription
  :data:`SUBSCRIPTION` (``ack="manual"``, ``start="earliest"``) and returns its payload. Every face
  of one ``name`` on one broker file, in any process, shares that cursor, so each item goes to
  one of them.
- ``task_done()`` acks an item this face handed out: the oldest one handed to the calling thread
  (or asyncio task), else the oldest handed out by the face. An item taken but never marked done
  is redelivered when its face closes or its process dies: at least once.
- ``qsize()`` counts the items waiting to be taken (the cursor's lag, plus items given back for
  redelivery); ``maxsize`` bounds it, as in the standard library, whose own tests
  (``tests/test_compat_cpython.py``) take an item out of the count when it is taken, not when
  it is done.
- ``join()`` waits until every item put is done, in every process: the cursor's lag plus its
  pending count, both read from the file.

Waiting: a face waits for items with the subscription's own wait. ``join`` and a full ``put``
wait for other faces' ``get``/``task_done``; those of this process wake them at once through
the queue's :class:`_Hub`. Nothing in mqlite signals another process's acks yet, so those waits
also look again every :data:`RECHECK` seconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from asyncio import QueueEmpty, QueueFull
from collections import deque
from collections.abc import Callable, Hashable
from queue import Empty, Full
from types import GenericAlias, TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from mqlite._waiting import capped, loop_waker
from mqlite.broker import Broker
from mqlite.errors import InvalidArgument
from mqlite.message import Message

if TYPE_CHECKING:
    from typing import Self

__all__ = ["EVENT", "RECHECK", "SUBSCRIPTION", "AsyncQueue", "Empty", "Full", "Queue", "QueueEmpty", "QueueFull"]

EVENT = "item"
"""The event name of every message a face's ``put`` publishes."""

SUBSCRIPTION = "compat"
"""The name of the durable subscription through which every face of a queue takes its items."""

RECHECK = 0.05
"""How often, in seconds, ``join`` and a full ``put`` look again at the queue while they wait.

Faces of this process wake them at once; this bound covers what other processes (and plain
subscriptions of :data:`SUBSCRIPTION`) do, which nothing signals here yet."""

Wake = Callable[[], object]
_T = TypeVar("_T")


class _Hub:
    """What every face of one queue of one broker shares in this process. Thread-safe.

    The wake functions it calls only release a lock or schedule a future on a loop: no user
    code runs under its locks, nor from them.
    """

    def __init__(self) -> None:
        # _lock guards held, _wakers and the _handed and _by_taker maps of every face of this hub.
        self._lock = threading.Lock()
        self.held = 0
        """Items the faces of this hub took and were not marked done yet."""
        self._wakers: set[Wake] = set()
        # _room_lock guards reserved, and serialises the look at qsize that a bounded put makes
        # before it publishes. Taken before _lock, never while holding it.
        self._room_lock = threading.Lock()
        self.reserved = 0
        """Puts that found room and have not published yet: the room they will fill."""

    def add_waker(self, wake: Wake) -> None:
        """Call ``wake`` once, at the next take or done (or failed put) of a face of this queue."""
        with self._lock:
            self._wakers.add(wake)

    def remove_waker(self, wake: Wake) -> None:
        with self._lock:
            self._wakers.discard(wake)

    def changed(self) -> None:
        """A face took an item, marked one done, or gave back room: wake every waiter once."""
        with self._lock:
            wakers = self._wakers
            if not wakers:  # the usual case: nobody waits, and nothing is allocated
                return
            self._wakers = set()
        for wake in wakers:
            wake()


# _hubs_lock guards _hubs: one hub per queue name of each live broker, shared by its faces.
_hubs_lock = threading.Lock()
_hubs: weakref.WeakKeyDictionary[Broker, dict[str, _Hub]] = weakref.WeakKeyDictionary()


def _hub_for(broker: Broker, name: str) -> _Hub:
    with _hubs_lock:
        by_name = _hubs.setdefault(broker, {})
        hub = by_name.get(name)
        if hub is None:
            hub = by_name[name] = _Hub()
        return hub


def _check_maxsize(maxsize: object) -> None:
    if isinstance(maxsize, bool) or not isinstance(maxsize, (int, float)) or maxsize != maxsize:
        raise InvalidArgument(f"maxsize must be a number (0 or less: unbounded), got {maxsize!r}")


def _thread_taker() -> Hashable:
    return threading.get_ident()


def _task_or_thread_taker() -> Hashable:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no loop runs on this thread
        task = None
    return threading.get_ident() if task is None else task


class _Face:
    """What both faces share: the subscription, the items handed out, counting and waiting.

    Thread-safe: every method may be called from any thread (the async face's coroutines from
    the loop its subscription is bound to).
    """

    _taker: Callable[[], Hashable] = staticmethod(_thread_taker)

    def _bound(self) -> float:
        """The face's maxsize: ``put`` waits while this many items wait to be taken (if > 0)."""
        raise NotImplementedError

    def __init__(self, maxsize: float, broker: Broker | None, name: str) -> None:
        _check_maxsize(maxsize)
        if broker is not None and not isinstance(broker, Broker):
            raise InvalidArgument(f"broker must be an mqlite.Broker or None, got {type(broker).__name__}")
        own = broker is None
        the_broker = Broker() if broker is None else broker
        try:
            self._publish = the_broker.queue(name).publish
            self._sub = the_broker.subscribe(name, name=SUBSCRIPTION, ack="manual", start="earliest")
        except BaseException:
            if own:
                the_broker.close()
            raise
        self._broker = the_broker
        self._own_broker = own
        self._name = name
        self._hub = _hub_for(the_broker, name)
        # Guarded by the hub's _lock: the items this face handed out and not marked done. _live
        # maps each one's offset to who took it; _by_taker holds each taker's, oldest first;
        # _order their offsets in the order handed out, oldest first, where an offset no longer
        # in _live is left behind until it reaches the front (then dropped: see _trim_locked).
        # Deques, not a dict emptied from the front, whose next(iter()) would skip every deleted
        # slot: quadratic over a long run. (Measured, one thread, put+get+task_done: the two
        # OrderedDicts this replaces cost about 5,000 instructions an item more.)
        self._live: dict[int, Hashable] = {}
        self._by_taker: dict[Hashable, deque[Message]] = {}
        self._order: deque[int] = deque()

    # -- what users see besides the standard API ---------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker that holds the items (a private in-memory one if none was given)."""
        return self._broker

    @property
    def name(self) -> str:
        """The queue's name in the broker."""
        return self._name

    @property
    def closed(self) -> bool:
        return self._sub.closed

    def close(self) -> None:
        """Detach: items handed out and not marked done go back for redelivery. Idempotent.

        Closes the broker too when the face made it (``broker=None``).
        """
        self._sub.close()
        hub = self._hub
        with hub._lock:
            hub.held -= len(self._live)
            self._live.clear()
            self._by_taker.clear()
            self._order.clear()
        hub.changed()
        if self._own_broker:
            self._broker.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the standard API's figures ----------------------------------------------------------

    def qsize(self) -> int:
        """Items waiting to be taken, by any process: like ``queue.Queue.qsize``, a moment's figure."""
        hub = self._hub
        sub = self._sub
        # Read in this order, a take or a done that runs meanwhile can only make the figure too
        # high, never too low: a take lowers lag before the taker counts it held, and a done
        # lowers held before it acks.
        with hub._lock:
            held = hub.held
        lag = sub.lag
        given_back = sub.pending - held
        if given_back > 0:
            # Some pending items are not held here: held elsewhere, or given back for redelivery.
            given_back = sum(1 for p in sub.pending_messages() if p.state != "out")
        return lag + max(given_back, 0)

    def empty(self) -> bool:
        """Whether no item waits to be taken."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether ``maxsize`` items wait to be taken (never, with ``maxsize <= 0``)."""
        return (bound := self._bound()) > 0 and self.qsize() >= bound

    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked done, in every process: what :meth:`join` waits for."""
        return self._unfinished()

    def _unfinished(self) -> int:
        """Items put and not yet done, in every process: the cursor's lag plus its pending count."""
        sub = self._sub
        # lag first: a take that runs between the two reads is counted twice, never missed.
        lag = sub.lag
        return lag + sub.pending

    # -- handing out and marking done --------------------------------------------------------

    def _handed_out(self, message: Message, taker: Hashable) -> None:
        hub = self._hub
        with hub._lock:
            self._hold_locked(message, taker)
            waiting = bool(hub._wakers)
        if waiting:
            hub.changed()

    def _hold_locked(self, message: Message, taker: Hashable) -> None:
        """Count ``message`` handed out to ``taker``, as the newest. Under the hub's lock."""
        offset = message[2]
        self._live[offset] = taker
        self._order.append(offset)
        mine = self._by_taker.get(taker)
        if mine is None:
            self._by_taker[taker] = deque((message,))
        else:
            mine.append(message)
        self._hub.held += 1

    def _trim_locked(self) -> None:
        """Drop the offsets of items already done from the front of _order. Under the hub's lock."""
        order, live = self._order, self._live
        while order and order[0] not in live:
            order.popleft()

    def task_done(self) -> None:
        """Mark done (ack) an item this face handed out: the calling thread's (or task's) oldest,
        else the face's oldest.

        Raises:
            ValueError: more calls than items handed out, as ``queue.Queue`` raises.
        """
        taker = self._taker()
        hub = self._hub
        by_taker = self._by_taker
        with hub._lock:
            owner = taker
            mine = by_taker.get(taker)
            if mine is None:
                if not self._live:
                    raise ValueError("task_done() called too many times")
                owner = self._live[self._order[0]]  # the face's oldest (the front is live: trimmed)
                mine = by_taker[owner]
            message = mine.popleft()  # the owner's oldest: for the face's oldest, the same item
            if not mine:
                del by_taker[owner]
            del self._live[message[2]]
            self._trim_locked()
            hub.held -= 1  # before the ack: see qsize
        try:
            self._sub.ack(message)
        except BaseException:
            with hub._lock:  # all or nothing: it is still handed out (now the newest)
                self._hold_locked(message, owner)
            raise
        hub.changed()

    # -- room for a bounded put --------------------------------------------------------------

    def _try_reserve(self) -> bool:
        """Reserve room for one put if fewer than maxsize items wait (always, unbounded)."""
        bound = self._bound()
        if not bound > 0:
            return True
        hub = self._hub
        with hub._room_lock:
            if self.qsize() + hub.reserved >= bound:
                return False
            hub.reserved += 1
            return True

    def _put_reserved(self, item: object) -> None:
        """Publish into reserved room (or unbounded), then release the reservation."""
        if not self._bound() > 0:
            self._publish(EVENT, item)
            return
        hub = self._hub
        try:
            self._publish(EVENT, item)
        except BaseException:
            with hub._room_lock:
                hub.reserved -= 1
            hub.changed()  # the room is free again for another put
            raise
        with hub._room_lock:
            hub.reserved -= 1

    def __repr__(self) -> str:
        where = self._broker.path or "memory"
        return f"<mqlite.compat.{type(self).__name__} {self._name!r} in {where} maxsize={self._bound()!r}>"


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


class Queue(_Face, Generic[_T]):
    """``queue.Queue`` over an mqlite queue: durable on a file, shared between processes. Thread-safe.

    Args:
        maxsize: ``put`` blocks while this many items wait to be taken; 0 or less: never.
        broker: where the items live. None: a private in-memory broker, closed by :meth:`close`.
        name: the queue's name; faces with the same broker (or file) and name are one queue.

    Raises ``queue.Empty`` and ``queue.Full`` (re-exported here as :class:`Empty` and :class:`Full`).
    """

    def __init__(self, maxsize: int = 0, *, broker: Broker | None = None, name: str = "queue") -> None:
        super().__init__(maxsize, broker, name)
        self.maxsize = maxsize  # a plain attribute, as in queue.Queue: assigning it resizes the queue

    def _bound(self) -> float:
        return self.maxsize

    def put(self, item: _T, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item``; with ``maxsize``, wait for room (up to ``timeout`` seconds) or raise Full."""
        if not self.maxsize > 0:
            self._publish(EVENT, item)
            return
        if block:
            _check_timeout(timeout)  # as queue.Queue does, whether there is room or not
        if self._try_reserve():
            self._put_reserved(item)
            return
        if not block:
            raise Full
        if not self._wait(self._try_reserve, timeout):
            raise Full
        self._put_reserved(item)

    def put_nowait(self, item: _T) -> None:
        """Put ``item`` if there is room, else raise Full."""
        self.put(item, block=False)

    def get(self, block: bool = True, timeout: float | None = None) -> _T:
        """Take the next item, waiting up to ``timeout`` seconds (None: until one comes), or raise Empty."""
        if not block:
            timeout = 0.0
        elif timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        message = self._sub.get(timeout)
        if message is None:
            raise Empty
        self._handed_out(message, threading.get_ident())
        item: _T = message.payload
        return item

    def get_nowait(self) -> _T:
        """Take the next item if one waits, else raise Empty."""
        return self.get(block=False)

    def join(self) -> None:
        """Wait until every item put to the queue, by any process, was marked done."""
        self._wait(lambda: self._unfinished() == 0, None)

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``ready()``, or ``timeout`` seconds; whether it became ready."""
        hub = self._hub
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            signal = threading.Lock()
            signal.acquire()
            wake = signal.release
            hub.add_waker(wake)  # before looking: a change made after the look still wakes us
            try:
                if ready():
                    return True
                bound = RECHECK
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    bound = min(bound, remaining)
                signal.acquire(True, capped(bound))
            finally:
                hub.remove_waker(wake)


class AsyncQueue(_Face, Generic[_T]):
    """``asyncio.Queue`` over an mqlite queue: durable on a file, shared with threads and processes.

    Thread-safe; its coroutines run on the loop its subscription binds to at the first ``get``.
    ``put``, ``put_nowait`` and ``get_nowait`` do not wait for the loop: on a file they commit
    before they return, as ``broker.publish`` does. Raises ``asyncio.QueueEmpty`` and
    ``asyncio.QueueFull``.

    Args: as :class:`Queue`'s.
    """

    # asyncio.Queue[int] is a types.GenericAlias; so is AsyncQueue[int] (CPython's test checks it).
    @classmethod
    def __class_getitem__(cls, item: object) -> GenericAlias:  # replaces Generic's, at run time only
        return GenericAlias(cls, item)

    _taker = staticmethod(_task_or_thread_taker)

    def __init__(self, maxsize: float = 0, *, broker: Broker | None = None, name: str = "queue") -> None:
        super().__init__(maxsize, broker, name)
        self._maxsize = maxsize

    def _bound(self) -> float:
        return self._maxsize

    @property
    def maxsize(self) -> float:
        """Number of items allowed to wait in the queue."""
        return self._maxsize

    async def put(self, item: _T) -> None:
        """Put ``item``, waiting for room while ``maxsize`` items wait to be taken."""
        if not self._try_reserve():
            await self._await(self._try_reserve)
        self._put_reserved(item)

    def put_nowait(self, item: _T) -> None:
        """Put ``item`` if there is room, else raise QueueFull."""
        if not self._try_reserve():
            raise QueueFull
        self._put_reserved(item)

    async def get(self) -> _T:
        """Take the next item, waiting until one comes. Cancelling it takes nothing."""
        message = await self._sub.aget()
        assert message is not None  # no timeout: aget returns a message or raises
        self._handed_out(message, _task_or_thread_taker())
        item: _T = message.payload
        return item

    def get_nowait(self) -> _T:
        """Take the next item if one waits, else raise QueueEmpty."""
        message = self._sub.get(0)
        if message is None:
            raise QueueEmpty
        self._handed_out(message, _task_or_thread_taker())
        item: _T = message.payload
        return item

    async def join(self) -> None:
        """Wait until every item put to the queue, by any process, was marked done."""
        await self._await(lambda: self._unfinished() == 0)

    async def _await(self, ready: Callable[[], bool]) -> None:
        """Wait on the loop until ``ready()``; cancelling the wait changes nothing."""
        hub = self._hub
        loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[None] = loop.create_future()
            wake = loop_waker(loop, future)
            hub.add_waker(wake)  # before looking, as in Queue._wait
            try:
                if ready():
                    return
                timer = loop.call_later(RECHECK, _resolve, future)
                try:
                    await future
                finally:
                    timer.cancel()
            finally:
                hub.remove_waker(wake)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
