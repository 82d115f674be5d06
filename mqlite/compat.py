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
  (or asyncio task), else the face's oldest (of each taker's oldest, the lowest offset). An item
  taken but never marked done is redelivered when its face closes or its process dies: at least
  once.
- ``get()`` reads ahead: in memory, a take takes up to :data:`READ_AHEAD` items at once and the
  face hands out the rest from its subscription's buffer, with no engine call. They count as
  pending (``broker.info()``) but not yet handed out, and stay within reach of every other
  consumer of the name: a take of another that finds nothing takes them back first. On a file
  a take takes one item, so that other processes can take the rest.
- ``qsize()`` counts the items waiting to be taken (the cursor's lag, plus items read ahead and
  not handed out, plus items given back for redelivery); ``maxsize`` bounds it, as in the
  standard library, whose own tests (``tests/test_compat_cpython.py``) take an item out of the
  count when it is taken, not when it is done.
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
from threading import get_ident
from types import GenericAlias, TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from mqlite._waiting import capped, loop_waker
from mqlite.broker import Broker
from mqlite.errors import InvalidArgument
from mqlite.message import Message

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "EVENT",
    "READ_AHEAD",
    "RECHECK",
    "SUBSCRIPTION",
    "AsyncQueue",
    "Empty",
    "Full",
    "Queue",
    "QueueEmpty",
    "QueueFull",
]

EVENT = "item"
"""The event name of every message a face's ``put`` publishes."""

SUBSCRIPTION = "compat"
"""The name of the durable subscription through which every face of a queue takes its items."""

READ_AHEAD = 64
"""How many items a face's take takes at once in memory; it hands out the rest one by one.

On a file a take takes one: an item read ahead would be out of other processes' reach."""

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
        # _lock guards faces, _wakers and the _by_taker map of every face of this hub.
        self._lock = threading.Lock()
        self.faces: list[_Face] = []
        """Every open face (``close`` removes it): what they read ahead counts waiting in
        ``qsize``, what they hand out does not."""
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
    return get_ident()


def _task_or_thread_taker() -> Hashable:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no loop runs on this thread
        task = None
    return get_ident() if task is None else task


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
        # The face hands out and counts what its takes read ahead (see get), so its cursor may
        # read ahead with manual acks. Set before the first take, on a subscription no one else has.
        self._sub._manual_read_ahead = True
        self._broker = the_broker
        self._own_broker = own
        self._name = name
        self._hub = hub = _hub_for(the_broker, name)
        with hub._lock:
            hub.faces.append(self)
        # Guarded by the hub's _lock: the items this face handed out and not marked done, each
        # taker's oldest first. The face's oldest is the front with the lowest offset. One deque
        # per taker and nothing else: a hand-out appends once and a done pops once from a front
        # (measured, one thread, put+get+task_done: the offset map and hand-out order deque this
        # replaces cost about 3,000 instructions an item more).
        self._by_taker: dict[Hashable, deque[Message]] = {}

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
            if self in hub.faces:
                hub.faces.remove(self)
            self._by_taker.clear()
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
        # high, never too low: a take lowers lag before the items it read ahead are in a buffer
        # (both in one lock section of the queue) and before the taker counts one held, and a
        # done lowers held before it acks.
        with hub._lock:
            faces = list(hub.faces)
            held = sum(len(mine) for face in faces for mine in face._by_taker.values())
        lag = sub.lag
        pending = sub.pending
        read_ahead = sum(len(face._sub._buffer) for face in faces)
        given_back = pending - held - read_ahead
        if given_back > 0:
            # Some pending items are neither handed out nor read ahead here: held elsewhere, or
            # given back for redelivery. (Those read ahead are "out", to the face that took them.)
            given_back = sum(1 for p in sub.pending_messages() if p.state != "out")
        return lag + read_ahead + max(given_back, 0)

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
        """Count ``message`` handed out to ``taker``, as its newest, and wake whoever waits for a take.

        Queue.get has its own copy of this body (see there); change both.
        """
        hub = self._hub
        with hub._lock:
            mine = self._by_taker.get(taker)
            if mine is None:
                self._by_taker[taker] = deque((message,))
            else:
                mine.append(message)
            waiting = bool(hub._wakers)
        if waiting:
            hub.changed()

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
                if not by_taker:
                    raise ValueError("task_done() called too many times")
                # The face's oldest: the lowest offset among the takers' oldest.
                owner = min(by_taker, key=lambda other: by_taker[other][0][2])
                mine = by_taker[owner]
            message = mine.popleft()  # before the ack: see qsize
            if not mine:
                del by_taker[owner]
        try:
            self._sub.ack(message)
        except BaseException:
            with hub._lock:  # all or nothing: it is handed out again, in its place
                mine = by_taker.get(owner)
                if mine is None:
                    by_taker[owner] = deque((message,))
                else:
                    mine.appendleft(message)
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
        try:
            # What a take read ahead, the usual case: no engine call. deque.popleft is atomic
            # (documented thread-safe), so this pop and a take-back by another consumer (or a
            # close) never both get one item.
            message = self._sub._buffer.popleft()
        except IndexError:
            taken = self._sub._get_ahead(timeout, READ_AHEAD)
            if taken is None:
                raise Empty from None
            message = taken
        # _handed_out's body, without its frame: this get is what issue 19 times against
        # queue.Queue (measured, one thread, put+get: 635 instructions an item, 3%).
        taker = get_ident()
        hub = self._hub
        with hub._lock:
            mine = self._by_taker.get(taker)
            if mine is None:
                self._by_taker[taker] = deque((message,))
            else:
                mine.append(message)
            waiting = bool(hub._wakers)
        if waiting:
            hub.changed()
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
        if not self._maxsize > 0:  # unbounded, as in Queue.put: a publish and nothing else
            self._publish(EVENT, item)
            return
        if not self._try_reserve():
            await self._await(self._try_reserve)
        self._put_reserved(item)

    def put_nowait(self, item: _T) -> None:
        """Put ``item`` if there is room, else raise QueueFull."""
        if not self._maxsize > 0:
            self._publish(EVENT, item)
            return
        if not self._try_reserve():
            raise QueueFull
        self._put_reserved(item)

    async def get(self) -> _T:
        """Take the next item, waiting until one comes. Cancelling it takes nothing."""
        sub = self._sub
        loop = sub._asyncio_loop
        message = None
        # The usual case: a message read ahead, popped as in Queue.get, without a coroutine or a
        # future. Only on the loop the subscription is bound to: an asyncio loop records the
        # thread running it, cheaper to ask than asyncio.get_running_loop() (a getpid() system
        # call on Python 3.11). Anything else takes the full path, which binds or refuses.
        if loop is not None and loop._thread_id == get_ident():  # type: ignore[attr-defined]  # private but in every asyncio release
            try:
                message = sub._buffer.popleft()
            except IndexError:
                pass
        if message is None:
            message = (await sub._apull(1, None, READ_AHEAD))[0]
        self._handed_out(message, _task_or_thread_taker())
        item: _T = message.payload
        return item

    def get_nowait(self) -> _T:
        """Take the next item if one waits, else raise QueueEmpty."""
        try:
            message = self._sub._buffer.popleft()  # as in Queue.get
        except IndexError:
            taken = self._sub._get_ahead(0, READ_AHEAD)
            if taken is None:
                raise QueueEmpty from None
            message = taken
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
