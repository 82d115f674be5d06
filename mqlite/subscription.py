"""Subscription: one consumer of a queue, by pull (get/poll/iteration) or push (a callback)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from threading import get_ident
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from mqlite._delivery.cursor import Cursor
from mqlite._waiting import OffLoop, await_, run_off_loop, wait
from mqlite.config import Start, check_start, is_finite_number
from mqlite.engine.base import Attempt, QueueEngine
from mqlite.errors import InvalidArgument, SubscriptionClosed, WrongEventLoop
from mqlite.filters import event_names
from mqlite.info import PendingMessage
from mqlite.message import Message

if TYPE_CHECKING:
    from typing import Self

_T = TypeVar("_T")

# _background_lock guards _background: wake-ups scheduled from loop callbacks (of any loop, on
# any thread), kept alive until they ran, since a loop keeps only a weak reference to a task.
_background_lock = threading.Lock()
_background: set[asyncio.Future[object]] = set()


def _keep_alive(task: asyncio.Future[object]) -> None:
    with _background_lock:
        _background.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[object]) -> None:
    with _background_lock:
        _background.discard(task)


__all__ = ["READ_AHEAD", "YIELD_EVERY", "Subscription", "check_timeout"]

READ_AHEAD = 64
"""How many messages iteration (sync or async) takes per lock acquisition and buffers."""

YIELD_EVERY = 16
"""``async for`` yields to the event loop once per this many read-ahead refills (1,024 messages)."""


def check_timeout(timeout: object, *, name: str = "timeout") -> float | None:
    """Return ``timeout`` if it is None or a non-negative number, else raise InvalidArgument.

    Infinity is a timeout too: it waits for ever, as None does (see ``_waiting.capped``).
    """
    if timeout is None:
        return None
    # Exactly an int or a float, the usual case, passes without the three isinstance calls:
    # every get, poll and drain begins here (they cost 600 instructions a call, callgrind).
    if (type(timeout) is float or type(timeout) is int) and timeout >= 0:
        pass
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InvalidArgument(f"{name} must be None or a non-negative number of seconds, got {timeout!r}")
    try:
        return float(timeout)
    except OverflowError:  # an int too large for a float: as good as for ever
        return float("inf")


def _check_max(max_messages: object) -> None:
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
        raise InvalidArgument(f"max_messages must be a positive int, got {max_messages!r}")


class Subscription:
    """A consumer attached to a cursor over one queue. Thread-safe.

    Every method may be called from any thread. Subscriptions that share a name share one
    cursor: they compete for its messages, and ``seek``, ``join`` and ``leave`` act on all of
    them. Closing one gives back what it held unacked, for redelivery to the others.
    """

    def __init__(
        self,
        engine: QueueEngine,
        *,
        ident: int,
        name: str | None,
        push: bool,
        loop: asyncio.AbstractEventLoop | None = None,
        off_loop: OffLoop[object] | None = None,
    ) -> None:
        self._engine = engine
        # How async faces run engine steps: None runs them inline (they never block); an engine
        # with blocking I/O gets a function that runs them in the broker's I/O thread.
        self._off_loop = off_loop
        self.id = ident
        self.name = name
        self._is_push = push
        # closed and _reason are written under the queue's lock; push workers read closed
        # without it as a hint between callbacks and re-check it under the lock per batch.
        self.closed = False
        self._reason = ""
        self._cursor: Cursor
        # _close_lock guards _detached (close() detaches exactly once) and binding _loop, which
        # is set at most once and read without the lock afterwards.
        self._close_lock = threading.Lock()
        self._detached = False
        self._loop: asyncio.AbstractEventLoop | None
        self._asyncio_loop: asyncio.BaseEventLoop | None
        self._set_loop(loop)
        # Messages iteration read ahead and has not returned yet. Filled under the queue's lock;
        # popped with deque's atomic popleft. Closing hands them back to the cursor.
        self._buffer: deque[Message] = deque()
        # Whether a take that reads ahead (_get_ahead, iteration) does so with manual acks too:
        # set by the compat faces, which hand out and count what they read ahead (see
        # policy.read_ahead_size).
        self._manual_read_ahead = False

    # -- what the queue needs from a consumer --------------------------------------------

    @property
    def _label(self) -> str:
        """How logs and thread names refer to this subscription."""
        return f"{self._engine.name}/{self.name or '~'}#{self.id}"

    def _mark_closed(self, reason: str) -> None:
        """Record that this consumer is closed (called by the queue, under its lock)."""
        if not self.closed:
            self.closed = True
            self._reason = reason

    def _reopen(self) -> None:
        """Undo a close that failed and was rolled back (called by the engine, under its lock)."""
        self.closed = False
        self._reason = ""

    def _closed_reason(self) -> str:
        """Why using this subscription raises SubscriptionClosed."""
        return f"subscription {self._label} is closed: {self._reason}"

    # -- pull ----------------------------------------------------------------------------

    def _check_pull(self) -> None:
        if self._is_push:
            raise InvalidArgument(
                f"subscription {self._label} delivers to its callback; get/poll/iteration are for "
                "subscriptions made without callback="
            )

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (None: until one arrives).

        Returns None when the timeout passes. Raises SubscriptionClosed if the subscription or
        its broker is (or becomes) closed.
        """
        # Each check is a plain test first, and a call only for what it might refuse (see poll).
        if self._is_push:
            self._check_pull()
        if timeout is not None and (type(timeout) is not int or timeout):
            timeout = check_timeout(timeout)
        messages = self._engine.try_pull(self, 1, 0)
        if not messages and timeout != 0:
            messages = self._wait(1, timeout, 0)
        return messages[0] if messages else None

    def _get_ahead(self, timeout: float | None, read_ahead: int) -> Message | None:
        """:meth:`get`, taking up to ``read_ahead`` messages at once and keeping the rest in
        ``_buffer``: the compat faces' take. They pop ``_buffer`` themselves before they call it,
        and set ``_manual_read_ahead`` so that a manual-ack cursor reads ahead too."""
        if self._is_push:
            self._check_pull()
        timeout = check_timeout(timeout)
        messages = self._engine.try_pull(self, 1, read_ahead)
        if not messages and timeout != 0:
            messages = self._wait(1, timeout, read_ahead)
        return messages[0] if messages else None

    def poll(self, max_messages: int = 100, timeout: float | None = 0) -> list[Message]:
        """Up to ``max_messages`` messages, in one lock acquisition.

        Waits up to ``timeout`` seconds for the first one (0, the default: do not wait; None:
        wait until one arrives). Returns an empty list when nothing came in time.
        """
        # Each check is a plain test first, and a call only for what it might refuse: a push
        # subscription, an argument that is not a positive int, a timeout other than 0 or None.
        # The three calls were about 4,200 instructions of each poll (and the two of get's about
        # 2,050 of each get(0): 12% of a publish and a get), measured with callgrind.
        if self._is_push:
            self._check_pull()
        if type(max_messages) is not int or max_messages < 1:
            _check_max(max_messages)
        if timeout is not None and (type(timeout) is not int or timeout):
            timeout = check_timeout(timeout)
        messages = self._engine.try_pull(self, max_messages, 0)
        if not messages and timeout != 0:
            messages = self._wait(max_messages, timeout, 0)
        return messages

    def _wait(self, max_messages: int, timeout: float | None, read_ahead: int) -> list[Message]:
        engine = self._engine
        return wait(
            lambda wake: engine.pull_or_wait(self, max_messages, read_ahead, wake), engine.remove_waiter, timeout
        ).value

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        """Block for the next message; iteration ends when the subscription or broker closes.

        Iteration reads up to ``READ_AHEAD`` messages at a time and returns them one by one.
        Messages read ahead are returned by the next get/poll/iteration on this subscription, or
        handed back to its cursor (for another consumer) when it closes.
        """
        self._check_pull()
        try:
            messages = self._engine.try_pull(self, 1, READ_AHEAD)
            if not messages:
                messages = self._wait(1, None, READ_AHEAD)
            return messages[0]
        except SubscriptionClosed:
            raise StopIteration from None

    # -- async pull: the same take logic, waiting on the event loop ----------------------

    def _set_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        # The bound loop again when it is an asyncio loop, whose ``_thread_id`` tells cheaply
        # whether it is the one running on the calling thread (see __anext__); else None.
        self._asyncio_loop = loop if isinstance(loop, asyncio.BaseEventLoop) else None

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        with self._close_lock:
            if self._loop is None:
                self._set_loop(loop)
                return
        raise WrongEventLoop(
            f"subscription {self._label} is bound to another event loop; use it from that loop, "
            "or subscribe again from this one"
        )

    async def aget(self, timeout: float | None = None) -> Message | None:
        """Await the next message; None when ``timeout`` seconds pass. Never blocks the loop.

        Cancelling the awaiting task consumes nothing. Raises SubscriptionClosed when the
        subscription or broker is (or becomes) closed.
        """
        messages = await self._apull(1, check_timeout(timeout))
        return messages[0] if messages else None

    async def apoll(self, max_messages: int = 100, timeout: float | None = 0) -> list[Message]:
        """Await up to ``max_messages`` messages; see :meth:`poll`."""
        _check_max(max_messages)
        return await self._apull(max_messages, check_timeout(timeout))

    async def _apull(self, max_messages: int, timeout: float | None, read_ahead: int = 0) -> list[Message]:
        self._check_pull()
        if self.closed:
            # Before binding: a closed subscription is never bound to the loop that asked.
            raise SubscriptionClosed(self._closed_reason())
        self._bind_loop()
        if self._off_loop is None:
            # The fast path takes what is there without creating a future.
            messages = self._engine.try_pull(self, max_messages, read_ahead)
            if messages or timeout == 0:
                return messages
        elif timeout == 0:
            engine = self._engine
            return await self._run_off_loop(lambda: engine.try_pull(self, max_messages, read_ahead))
        return await self._await_pull(max_messages, timeout, read_ahead)

    async def _await_pull(self, max_messages: int, timeout: float | None, read_ahead: int) -> list[Message]:
        """Wait on the loop until a pull gets something or ``timeout`` passes (from :meth:`_apull`,
        and from ``async for`` once it found nothing), taking in the I/O thread if there is one."""
        engine = self._engine
        run = None if self._off_loop is None else self._run_off_loop
        result = await await_(
            lambda wake: engine.pull_or_wait(self, max_messages, read_ahead, wake), engine.remove_waiter, timeout, run
        )
        return result.value

    async def _run_off_loop(self, step: Callable[[], _T]) -> _T:
        """Run an engine step in the broker's I/O thread, so that the loop never waits on a file.

        If the awaiting task is cancelled meanwhile, what the step took is kept for this
        subscription's next read (or given back when it closes): cancelling consumes nothing.
        """
        assert self._off_loop is not None
        return await run_off_loop(self._off_loop, step, self._keep_what_was_taken)  # type: ignore[arg-type]  # OffLoop is generic per call

    def _keep_what_was_taken(self, result: object, on_loop: bool) -> None:
        if isinstance(result, Attempt):
            self._engine.remove_waiter(result.waiter)
            result = result.value
        if isinstance(result, list) and result:
            self._buffer.extendleft(reversed(result))
            # A read of this subscription may already be waiting (its step was queued behind the
            # cancelled one): wake it, from the I/O thread, so that it finds the buffer.
            if not on_loop:
                self._engine.wake_all()  # in the I/O thread already
                return
            assert self._off_loop is not None
            _keep_alive(asyncio.ensure_future(self._off_loop(self._engine.wake_all)))

    def __aiter__(self) -> _AsyncIteration:
        return _AsyncIteration(self)

    def _give_back_read_ahead(self) -> None:
        """Return what iteration read ahead to the cursor, for whichever consumer reads next."""
        if not self.closed:  # closing gave it back already
            self._engine.give_back(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- acknowledgement -----------------------------------------------------------------

    def ack(self, message: Message | int, *more: Message | int) -> None:
        """Acknowledge one or more messages (or their offsets) delivered to this subscription's name.

        Several at once are acked together, all or none: on a file that is one commit, so
        ``sub.ack(*sub.poll(100))`` settles a whole batch for the price of one write.

        Raises:
            AckModeError: the subscription uses ``ack="auto"``.
            NotPending: a message is not pending (never delivered, already acked, dead-lettered,
                or given twice); then none of them was acked.
        """
        self._engine.ack(self, (message, *more) if more else (message,))

    def nack(self, message: Message | int, delay: float = 0.0) -> None:
        """Give a message back: it is redelivered after ``delay`` seconds of broker clock.

        A nack counts as a failed delivery, so a message nacked ``max_deliveries`` times goes to
        the dead-letter queue instead.

        Raises:
            InvalidArgument: ``delay`` is not a finite number >= 0 (an infinite delay would keep
                the message pending for ever); nothing changed.
            NotPending: as for :meth:`ack`.
        """
        if not is_finite_number(delay) or not delay >= 0:
            raise InvalidArgument(f"delay must be a finite, non-negative number of seconds, got {delay!r}")
        self._engine.nack(self, message, float(delay))

    # -- position and filter -------------------------------------------------------------

    def seek(self, target: Start) -> int:
        """Move the cursor to ``"earliest"``, ``"latest"``, an offset or a datetime; returns the new position.

        Pending (delivered, unacked) messages stay pending. ``datetime.min`` means
        ``"earliest"`` and ``datetime.max`` ``"latest"`` (see :func:`~mqlite.config.check_start`).
        """
        return self._engine.seek(self, check_start(target, verb="seek target"))

    def join(self, events: str | Iterable[str]) -> None:
        """Also receive ``events`` (names or wildcard patterns, a str or any iterable) from now on."""
        names = event_names(events, verb="join() events")  # read once: a generator is used up
        self._engine.set_filter(self, lambda current: current.union(names))

    def leave(self, events: str | Iterable[str]) -> None:
        """Stop receiving ``events`` (a str or any iterable), which must be names or patterns in the filter."""
        names = event_names(events, verb="leave() events")
        self._engine.set_filter(self, lambda current: current.without(names))

    @property
    def events(self) -> tuple[str, ...] | None:
        """The event filter: None for every event, else the names and patterns."""
        return self._cursor.filter.spec

    @property
    def queue(self) -> str:
        """The name of the queue this subscription reads."""
        return self._engine.name

    @property
    def position(self) -> int:
        """The offset the cursor reads next."""
        return self._engine.cursor_stats(self)[0]

    @property
    def lag(self) -> int:
        """How many messages that pass the filter lie between the position and the end."""
        return self._engine.cursor_stats(self)[1]

    @property
    def pending(self) -> int:
        """How many delivered messages await an ack (or a retry) on this subscription's cursor."""
        return self._engine.cursor_stats(self)[2]

    @property
    def missed(self) -> int:
        """How many matching messages retention dropped before this cursor read them."""
        return self._engine.cursor_stats(self)[3]

    def pending_messages(self) -> list[PendingMessage]:
        """Each pending message of this subscription's cursor, by offset: who holds it, since when,
        and how many deliveries it had (like Redis's ``XPENDING``). On a shared file this includes
        the messages other brokers hold. See :class:`~mqlite.PendingMessage`."""
        return self._engine.pending_messages(self)

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Detach: wake blocked readers (they raise SubscriptionClosed) and return unacked messages.

        A named cursor keeps its place for the next subscription with that name. Idempotent;
        a callback that is running finishes, and no new one starts.
        """
        with self._close_lock:
            if self._detached:
                return
            self._detached = True
        try:
            self._engine.detach(self)
        except BaseException:
            with self._close_lock:
                self._detached = False  # nothing was detached: the next close() tries again
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "push" if self._is_push else "pull"
        state = "closed" if self.closed else "open"
        return f"<mqlite.Subscription {self._label} {kind} events={self._cursor.filter.spec!r} {state}>"


class _AsyncIteration:
    """One ``async for`` over a subscription. Used from its subscription's loop only.

    If the loop is left without closing the subscription (a ``break``, an exception, a
    cancelled task), what it read ahead goes back to the cursor once the iteration is gone, so
    another consumer of the name gets it: nothing read ahead is lost.
    """

    __slots__ = ("_buffer", "_refills", "_sub")

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._buffer = sub._buffer
        # Refills since the iteration last yielded to the loop.
        self._refills = 0

    def __aiter__(self) -> _AsyncIteration:
        return self

    async def __anext__(self) -> Message:
        """Await the next message; ``async for`` ends when the subscription or broker closes."""
        sub = self._sub
        if self._buffer:  # the fast path: a message read ahead, no future, no take
            # Only the bound loop may take it. On Python 3.11 asyncio.get_running_loop() makes a
            # getpid() system call on every call (more than the rest of this path), so ask the
            # loop instead: an asyncio loop records the thread running it, and a thread runs one
            # loop at a time. Any other loop gets the full check.
            loop = sub._asyncio_loop
            if loop is None or loop._thread_id != get_ident():  # type: ignore[attr-defined]  # private but in every asyncio release
                sub._bind_loop()
            try:
                # deque.popleft is atomic (documented thread-safe, with or without the GIL), so
                # this pop and close()'s hand-back never both get one message.
                return self._buffer.popleft()
            except IndexError:
                pass
        # Yield to the loop now and then, so a consumer that always finds messages waiting still
        # lets the loop's other tasks run (asyncio does not switch on a ready await). Not on every
        # refill: a yield runs the loop's select, which releases the GIL, and while a producer
        # thread runs, taking it back can wait for the 5 ms switch interval.
        self._refills += 1
        if self._refills >= YIELD_EVERY:
            self._refills = 0
            await asyncio.sleep(0)
        try:
            loop = sub._asyncio_loop
            if (
                loop is not None
                and loop._thread_id == get_ident()  # type: ignore[attr-defined]  # as above
                and sub._off_loop is None
                and not sub._is_push
            ):
                # A refill on the bound loop, from an engine that never blocks: the take of
                # _apull without its coroutine and its checks, which the test above has made.
                # Only a take that finds nothing pays for the wait (a future, a waiter).
                messages = sub._engine.try_pull(sub, 1, READ_AHEAD)
                if messages:
                    return messages[0]
                return (await sub._await_pull(1, None, READ_AHEAD))[0]
            return (await sub._apull(1, None, READ_AHEAD))[0]
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __del__(self) -> None:
        sub = self._sub
        loop = sub._loop
        if self._buffer and not sub.closed and loop is not None and not loop.is_closed():
            # Not here and now: a finaliser may run on any thread, even one inside mqlite. The
            # loop runs the give-back soon, with no lock held.
            try:
                loop.call_soon_threadsafe(sub._give_back_read_ahead)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody is left to read them
