"""Session: the application's side of a resumable session, shared by client and server.

Asyncio glue around the sans-IO :class:`~streamkit.session.core.SessionCore`,
which makes every decision: this module moves bytes between the core and the
attached connection (the stream's ``deliver``, which hands each read's
messages to the core in the read callback, and its
:class:`~streamkit.stream.TurnWriter`), runs the core's one timer, and wakes
the application. Between connections, a client reconnects, a server waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

from streamkit.errors import (
    ConnectionLost,
    EndOfStream,
    IncompleteFrame,
    ProtocolError,
    SessionError,
    StreamkitError,
)
from streamkit.session.core import SessionCore, State
from streamkit.session.protocol import ReceiveLimits, Reject
from streamkit.session.settings import SessionSettings, SessionStats
from streamkit.stream import FramedStream, TurnWriter

__all__ = ["Session"]

logger = logging.getLogger("streamkit.session")


class Session:
    """A bidirectional stream of byte frames that survives dropped connections.

    Every frame is delivered exactly once and in order while the session
    lives. ``send`` waits while the send window is full (backpressure, never
    loss); ``flush`` waits until the peer has received everything sent;
    ``close`` ends the session gracefully and ``abort`` at once. ``core`` is
    its sans-IO state machine (:class:`~streamkit.session.core.SessionCore`).
    Once a session fails (it expired, could not reconnect, was rejected),
    every pending and later call raises that error. :meth:`attach`,
    :meth:`rejected` and :meth:`drop_connection` are for the connect and
    serve sides, which hand it connections.
    """

    __slots__ = (
        "_closed",
        "_conn",
        "_core",
        "_done",
        "_ended",
        "_lifetime",
        "_loop",
        "_on_detached",
        "_on_ended",
        "_progress",
        "_queue",
        "_readable",
        "_sender",
        "_timer",
        "_timer_at",
        "settings",
    )

    def __init__(
        self,
        core: SessionCore,
        *,
        on_detached: Callable[[], None] | None = None,
        on_ended: Callable[[], None] | None = None,
    ) -> None:
        self._core = core
        self.settings: SessionSettings = core.settings
        self._on_detached = on_detached
        self._on_ended = on_ended
        self._loop = asyncio.get_running_loop()
        self._queue = core.queue
        self._readable = _Wakeup(self._loop)  # data, end or failure: recv may proceed
        self._progress = _Wakeup(self._loop)  # acks, attach, end or failure: senders may proceed
        self._conn: FramedStream[Any] | None = None  # the attached connection
        self._closed: asyncio.Future[None] | None = None  # done once it is let go
        self._sender: TurnWriter | None = None  # the attached connection's
        self._timer: asyncio.Handle | None = None
        self._timer_at = math.inf
        self._ended = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        # _live ends with the session. The loop's shutdown (asyncio.run
        # returning with the session open) cancels every task: this one then
        # ends the session, rather than a reconnect start on a closing loop.
        self._lifetime = self._loop.create_task(self._live())

    # -- public API ---------------------------------------------------------

    @property
    def core(self) -> SessionCore:
        """The session's sans-IO state machine (its state, counters and decisions)."""
        return self._core

    @property
    def id(self) -> str:
        """The session id, as hex."""
        return self._core.id

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the session's counters."""
        return self._core.stats()

    @property
    def max_frame(self) -> int:
        """The largest payload ``send`` takes: our ``max_frame`` or, if smaller, the peer's."""
        return self._core.max_frame

    @property
    def connected(self) -> bool:
        """Whether a connection is attached right now."""
        return self._conn is not None

    @property
    def closed(self) -> bool:
        """Whether the session has ended (closed by either side, or failed)."""
        return self._core.ended

    async def send(self, payload: bytes) -> None:
        """Send one frame; it will reach the peer's ``recv`` exactly once, in order.

        Written as :class:`~streamkit.stream.TurnWriter` writes: a lone frame
        at once, a turn's frames together. Waits while the send window is
        full or the write buffer over its high-water mark. Raises
        :class:`FrameTooLarge` over ``max_frame`` or the peer's,
        :class:`SessionError` once the session is closing or closed, and the
        session's failure if it failed.
        """
        if type(payload) is not bytes:
            payload = bytes(payload)  # the replay buffer must not change under us
        core = self._core
        unsent = core.send(payload)
        if unsent < 0:
            await self._send_slowly(payload)
            unsent = core.unsent
        sender = self._sender
        if sender is not None:
            if sender.gathering and unsent < sender.flush_at:
                return  # goes out with the rest of this turn's writes
            if sender.wrote(unsent):
                with contextlib.suppress(ConnectionLost):
                    # A loss is the reader's to see; the frames stay in the replay buffer.
                    await sender.wait_drained()

    async def _send_slowly(self, payload: bytes) -> None:
        """Wait until ``payload`` fits the window and hold it; raise if it never can."""
        core = self._core
        while True:
            error = core.send_error(len(payload))
            if error is not None:
                raise error
            await self._progress.wait()
            if core.send(payload) >= 0:
                return

    def recv(self, timeout: float | None = None) -> Coroutine[Any, Any, bytes]:
        """Return the next frame (a coroutine: ``frame = await session.recv()``).

        Raises :class:`EndOfStream` once the peer closed the session and
        every frame was returned (or once this side's close completed),
        ``TimeoutError`` after ``timeout`` seconds (nothing is lost), and
        the session's failure if it failed.
        """
        return self._receive() if timeout is None else self._receive_within(timeout)

    async def _receive_within(self, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            return await self._receive()

    def __aiter__(self) -> Session:
        return self

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        return self._receive(StopAsyncIteration)

    async def _receive(self, end: type[Exception] = EndOfStream) -> bytes:
        queue = self._queue
        core = self._core
        while not queue:
            if core.ended:  # else frames may come
                error = core.receive_error()
                if isinstance(error, EndOfStream) and end is not EndOfStream:
                    raise end(*error.args)
                raise error or EndOfStream("the session ended")
            # Each read the connection delivers ends a turn (the next frame
            # sent is written at once), so waiting here need not.
            await self._readable.wait()
        payload = queue.popleft()
        if len(queue) <= core.ack_low_water:
            core.on_consumed()
            self._arm()
        return payload

    async def wait_connected(self, after: int = 0) -> None:
        """Wait until a connection is attached, the session's ``after + 1``-th or a later one.

        ``await session.wait_connected()`` returns at once while connected;
        ``wait_connected(session.stats.connections)`` waits for the next
        connection (after a drop, a resume). Raises the session's failure,
        or :class:`SessionError` if it ends first.
        """
        core = self._core
        await self._until(
            lambda: self._conn is not None and core.connections > after,
            lambda: SessionError(f"the session is {core.state.value}"),
        )

    async def flush(self) -> None:
        """Wait until the peer has received every frame sent so far."""
        core = self._core
        target = core.next_offset
        await self._until(
            lambda: core.acknowledged >= target,
            lambda: SessionError(
                f"the session ended before the peer received frames "
                f"{core.acknowledged}..{target - 1}"
            ),
        )

    async def close(self) -> None:
        """End the session gracefully.

        Waits until the peer has received everything sent and acknowledged
        the close (its ``recv`` then raises :class:`EndOfStream`; what it
        sends after that is discarded). On a server, a connection lost after
        the client acknowledged every frame also completes it (a resume is
        answered FINISHED). Bounded by ``close_timeout`` (then
        ``TimeoutError``, and the session is aborted).
        """
        core = self._core
        if core.state is State.CLOSED:
            return
        if core.failure is not None:
            raise core.failure
        try:
            async with asyncio.timeout(self.settings.close_timeout):
                core.close()
                self._update()
                await self._until(lambda: core.state is State.CLOSED, lambda: SessionError())
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """End the session at once, without telling the peer; pending calls fail."""
        self._core.abort()
        self._update()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} connected={self.connected}>"

    async def _until(self, done: Callable[[], bool], ended: Callable[[], StreamkitError]) -> None:
        """Wait until ``done()``; raise the session's failure, or ``ended()``, if it ends first."""
        core = self._core
        while not done():
            if core.failure is not None:
                raise core.failure
            if core.ended:
                raise ended()
            await self._progress.wait()

    # -- connections (for the connect and serve sides) ---------------------------

    def attach(
        self, stream: FramedStream[Any], peer_received: int, peer: ReceiveLimits, rest: bytes = b""
    ) -> asyncio.Future[None]:
        """Make ``stream``, whose handshake just completed, the session's connection.

        ``peer_received`` is the next offset the peer expects, ``peer`` what
        it announced, ``rest`` the bytes read after its hello or welcome; the
        replay follows what the stream had queued. Returns a future done once
        the session lets the connection go. Raises
        :class:`~streamkit.errors.ResumeRejected` (and fails) if the peer
        expects frames it cannot serve.
        """
        core = self._core
        try:
            core.attach(peer_received, peer, self._loop.time())
        except StreamkitError:
            stream.abort()
            self._update()
            raise
        self._let_go()
        self._conn = stream
        closed = self._closed = self._loop.create_future()
        sender = self._sender = stream.sender
        sender.source = core.data_to_send
        sender.flush()  # before any new frame can be sent on it
        stream.deliver(
            core.decoder,
            functools.partial(self._received, stream),  # a partial calls in C: no frame
            functools.partial(self._ended_input, stream),
            rest,
        )
        self._progress.set()
        self._arm()
        return closed

    def rejected(self, reject: Reject) -> None:
        """A resume was rejected: the session ends (see ``SessionCore.rejected``)."""
        self._core.rejected(reject)
        self._update()

    def drop_connection(self) -> None:
        """Drop the current connection, as a network failure would; nothing is lost.

        A client resumes, a server waits for it; ``connected`` stays true
        until the stream has reported the loss.
        """
        if self._conn is not None:
            self._conn.abort()  # the stream reports the loss: the session detaches

    # -- the core's decisions ---------------------------------------------------

    def _update(self) -> None:
        """After a core call: write what is due, drop a connection it detached, end, or arm."""
        core = self._core
        conn = self._conn
        if conn is not None:
            if not core.attached:
                self._connection_lost(conn, core.detach_reason)
                return
            if core.unsent:
                conn.sender.wrote(core.unsent)
        if core.ended:
            self._end()
        else:
            self._arm()

    def _arm(self) -> None:
        """Run ``_on_timer`` at the core's next deadline, unless armed for sooner."""
        deadline = self._core.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        loop = self._loop
        if deadline <= loop.time():
            # Due at once: after the input at hand (the application consumes
            # the batch in this turn, and one ack covers it all).
            self._timer = loop.call_soon(self._on_timer)
        else:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._core.on_deadline(self._loop.time())
        self._update()

    async def _live(self) -> None:
        try:
            await self._done
        except asyncio.CancelledError:
            self.abort()
            raise

    def _end(self) -> None:
        """The session ended: send what is due, close, stop the timer, wake everyone."""
        if self._ended:
            return
        self._ended = True
        if not self._done.done():  # cancelled with _live at the loop's shutdown
            self._done.set_result(None)
        self._let_go(graceful=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._readable.set()
        self._progress.set()
        if self._on_ended is not None:
            self._on_ended()

    def _let_go(self, graceful: bool = False) -> None:
        """Let the current connection go, if any: closed once what is due is sent, or aborted."""
        conn, self._conn = self._conn, None
        closed, self._closed = self._closed, None
        self._sender = None
        if conn is None or closed is None:
            return
        if graceful:
            conn.close()  # after what is due: the sender pulls it from the core
        else:
            conn.abort()
        conn.sender.source = None
        if not closed.done():  # cancelled with its waiter at the loop's shutdown
            closed.set_result(None)

    def _connection_lost(self, conn: FramedStream[Any], reason: BaseException | None) -> None:
        if conn is not self._conn:
            return
        self._let_go()
        core = self._core
        core.detach(self._loop.time(), reason)
        if core.ended:
            self._end()
            return
        # A silent peer (keepalive_timeout) is worth an info; a network loss is routine.
        level = logging.INFO if isinstance(reason, TimeoutError) else logging.DEBUG
        logger.log(level, "session %s lost its connection: %r", self.id, reason)
        if self._on_detached is not None:
            self._on_detached()
        self._arm()

    # -- the connection's input (the stream's deliver callbacks) ----------------

    def _received(self, conn: FramedStream[Any], batch: list[Any]) -> None:
        """A read's messages: to the core, then wake who can proceed and do what is due."""
        if conn is not self._conn:
            return
        core = self._core
        messages = core.messages_received
        if core.receive_messages(batch):  # raises ProtocolError: the stream ends the input
            self._readable.set()
        if core.messages_received != messages:
            self._progress.set()
            self._update()  # pongs and close acks out, the end, the timer
        else:
            self._arm()  # payloads only: at most an ack came due

    def _ended_input(self, conn: FramedStream[Any], reason: StreamkitError) -> None:
        """The connection's input ended: a drop, or a protocol error of the peer's."""
        if self._queue:
            self._readable.set()  # the payloads before an error
        if isinstance(reason, ProtocolError) and not isinstance(reason, IncompleteFrame):
            logger.warning("session %s: protocol error from %s: %s", self.id, conn.peername, reason)
        elif isinstance(reason, EndOfStream):
            reason = EndOfStream("the peer closed the connection")
        self._connection_lost(conn, reason)


class _Wakeup:
    """Tasks waiting for the next change, woken together by :meth:`set`.

    ``asyncio.Event`` without its flag: each waiter waits for the next
    ``set()``, as after ``clear()``, which every wait here came with.
    """

    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        waiter = self._loop.create_future()
        waiters = self._waiters
        waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters.remove(waiter)

    def set(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
