"""Session: the application's side of a resumable session, shared by client and server.

A session outlives connections. It owns the sans-IO send and receive state
(:mod:`streamkit.session.protocol`); a connection is attached to it, carries
frames while it lives, and is replaced by the next one. What happens when a
connection is lost is the role's business: a client reconnects, a server
waits ``resume_timeout`` for the client to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from types import TracebackType
from typing import Any, cast

from streamkit.errors import (
    ConnectionLost,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    ProtocolError,
    SessionError,
    StreamkitError,
)
from streamkit.session.protocol import (
    DATA_HEADER,
    FRAMED_DATA_HEADER,
    Ack,
    Close,
    CloseAck,
    Data,
    Message,
    MessageDecoder,
    MessageType,
    Ping,
    Pong,
    ReceiveLimits,
    ReceiveState,
    SendState,
    SessionCodec,
)
from streamkit.session.settings import (
    Backoff,
    SessionOptions,
    SessionSettings,
    SessionStats,
)
from streamkit.stream import FramedStream

__all__ = ["Backoff", "Session", "SessionOptions", "SessionSettings", "SessionStats"]

logger = logging.getLogger("streamkit.session")

_DATA = int(MessageType.DATA)
_DATA_SIZE = DATA_HEADER.size
_FRAMED_DATA = FRAMED_DATA_HEADER
_PING = Ping().encode()
_PONG = Pong().encode()
_CLOSE_ACK = CloseAck().encode()
#: New frames written to the connection at once past this many bytes.
_WRITE_SIZE = 64 * 1024


class _Connection:
    """One attached connection: its stream, its decoder and the tasks that serve it."""

    __slots__ = ("alive", "closed", "decoder", "keepalive", "last_seen", "reader", "stream")

    def __init__(self, stream: FramedStream[Any], decoder: MessageDecoder) -> None:
        self.stream = stream
        self.decoder = decoder
        self.alive = True  # a message arrived since the last keepalive tick
        self.last_seen = 0.0
        self.reader: asyncio.Task[None] | None = None
        self.keepalive: asyncio.Task[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()


class Session:
    """A bidirectional stream of byte frames that survives dropped connections.

    Every frame is delivered exactly once and in order while the session
    lives. ``send`` waits while the send window is full (backpressure,
    never loss); ``recv`` returns frames in order; ``flush`` waits until the
    peer has received everything sent; ``close`` ends the session gracefully
    and ``abort`` at once. ``id`` is the session id (hex); ``stats`` counts
    connections, replays and duplicates.

    Once a session fails (it expired, could not reconnect, was rejected),
    every pending and later call raises that error.
    """

    #: Ping right after the replay on each new connection (the client does,
    #: to learn that the connection carries traffic both ways).
    _ping_on_attach = False

    def __init__(self, session_id: bytes, settings: SessionSettings) -> None:
        self._id = session_id
        self.settings = settings
        # The largest payload send() takes: our max_frame, and the peer's
        # once the handshake told it.
        self._max_frame = settings.max_frame
        self._ack_every = settings.ack_every
        self._connections = 0
        self._replayed = 0
        self._pongs = 0  # PONG messages received, on any connection
        self._send_state = SendState(settings.max_unacked_frames, settings.max_unacked_bytes)
        self._recv_state = ReceiveState(settings.max_unacked_frames, settings.max_unacked_bytes)
        self._queue: deque[bytes] = deque()
        # recv() looks at acks only once the queue is this short (see _ack_check).
        self._ack_low_water = -1
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()  # data, end or failure: recv may proceed
        self._progress = asyncio.Event()  # acks, credit, end or failure: senders may proceed
        self._conn: _Connection | None = None
        self._written = 0  # frames below this offset are written to the connection
        self._unwritten_bytes = 0  # payload bytes of frames not yet written
        self._write_handle: asyncio.Handle | None = None  # writes the frames of this turn
        # A frame was written at once since the application last waited
        # for the peer (or since the last end-of-turn write).
        self._wrote_at_once = False
        self._must_drain = False  # the connection's write buffer is over its high-water mark
        self._ack_timer: asyncio.TimerHandle | None = None  # ack_delay after a frame
        self._ack_handle: asyncio.Handle | None = None  # an ack due, sent as this turn ends
        self._closing = False  # close() was called: no more sends
        # The largest frame send() takes on its fast path: max_frame, or -1
        # once the session is closing, closed or failed.
        self._send_limit = settings.max_frame
        self._close_sent = False
        self._peer_closed = False  # the peer closed: recv ends after the queue
        self._finished = asyncio.Event()  # the close handshake completed
        self._failure: StreamkitError | None = None

    # -- public API ---------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id, as hex."""
        return self._id.hex()

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the session's counters."""
        sent, received = self._send_state, self._recv_state
        return SessionStats(
            connections=self._connections,
            reconnects=max(0, self._connections - 1),
            frames_sent=sent.next_offset,
            bytes_sent=sent.bytes_sent,
            frames_received=received.received,
            bytes_received=received.bytes_received,
            frames_replayed=self._replayed,
            duplicates_dropped=received.duplicates,
        )

    @property
    def max_frame(self) -> int:
        """The largest payload ``send`` takes: our ``max_frame`` or, if smaller, the peer's.

        The peer's comes with each handshake.
        """
        return self._max_frame

    @property
    def connected(self) -> bool:
        """Whether a connection is attached right now."""
        return self._conn is not None

    @property
    def closed(self) -> bool:
        """Whether the session has ended (closed by either side, or failed)."""
        return self._finished.is_set() or self._failure is not None

    async def send(self, payload: bytes) -> None:
        """Send one frame; it will reach the peer's ``recv`` exactly once, in order.

        A lone frame (the first since the application waited for the peer,
        or since the last end-of-turn write) is written at once; frames that
        follow it are gathered and written in one piece when the event-loop
        turn ends (or every 64 KiB). Waits while the send window is full, and
        while the connection's write buffer is over its high-water mark.
        Raises :class:`FrameTooLarge` over ``max_frame`` or the peer's
        ``max_frame`` (announced in the handshake),
        :class:`SessionError` once the session is closing or closed, and
        the session's failure if it failed.
        """
        size = len(payload)
        if type(payload) is not bytes:
            payload = bytes(payload)  # the replay buffer must not change under us
        if size > self._send_limit or not self._send_state.push(payload):
            await self._send_slowly(payload)
        if self._write_handle is None and not self._wrote_at_once:
            # A lone frame (request/response) goes out at once, and with no
            # callback, an extra loop iteration, unless another follows it.
            self._wrote_at_once = True
            self._write_frames()
        else:
            if self._write_handle is None:
                self._write_handle = self._loop.call_soon(self._on_write_due)
            self._unwritten_bytes += size
            if self._unwritten_bytes >= _WRITE_SIZE:
                self._write_frames()
        if self._must_drain:
            await self._drain()

    def _write_frames(self) -> None:
        """Write the frames sent since the last write to the connection, in one piece."""
        state = self._send_state
        start, stop = self._written, state.next_offset
        if start == stop:
            return
        self._unwritten_bytes = 0
        conn = self._conn
        if conn is None:
            return  # they stay in the replay buffer for the next connection
        self._written = stop
        pack = _FRAMED_DATA.pack
        frames = state.frames_from(start)
        if len(frames) == 1:
            payload = frames[0]  # a large frame, or one written at once: not joined
            header = pack(len(payload) + _DATA_SIZE, _DATA, start)
        else:
            parts: list[bytes] = []
            append = parts.append
            for offset, payload in enumerate(frames, start):
                append(pack(len(payload) + _DATA_SIZE, _DATA, offset))
                append(payload)
            header, payload = b"".join(parts), b""
        try:
            if conn.stream.send_encoded_nowait(header, payload):
                self._must_drain = True
        except ConnectionLost:
            pass  # the read loop sees the loss; the frames stay in the replay buffer

    def _on_write_due(self) -> None:
        self._write_handle = None
        self._wrote_at_once = False  # the turn ended
        self._write_frames()

    async def _drain(self) -> None:
        self._must_drain = False
        self._write_frames()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(ConnectionLost):
                await conn.stream.drain()

    async def _send_slowly(self, payload: bytes) -> None:
        """Wait until ``payload`` fits the window and hold it; raise if it never can."""
        size = len(payload)
        limit = self._max_frame
        if size > limit:
            whose = "the peer's " if limit < self.settings.max_frame else ""
            raise FrameTooLarge.exceeds(size, limit, whose)
        self._check_sendable()
        state = self._send_state
        while not state.push(payload):
            self._progress.clear()
            await self._progress.wait()
            self._check_sendable()

    async def recv(self, timeout: float | None = None) -> bytes:
        """Return the next frame.

        Raises :class:`EndOfStream` once the peer closed the session and
        every frame was returned, ``TimeoutError`` after ``timeout`` seconds
        (nothing is lost), and the session's failure if it failed.
        """
        queue = self._queue
        if not queue:
            if timeout is None:
                await self._wait_readable()
            else:
                async with asyncio.timeout(timeout):
                    await self._wait_readable()
        payload = queue.popleft()
        if len(queue) <= self._ack_low_water:
            self._ack_check()
        return payload

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> bytes:
        queue = self._queue
        if not queue:
            try:
                await self._wait_readable()
            except EndOfStream:
                raise StopAsyncIteration from None
        payload = queue.popleft()
        if len(queue) <= self._ack_low_water:
            self._ack_check()
        return payload

    async def flush(self) -> None:
        """Wait until the peer has received every frame sent so far."""
        state = self._send_state
        target = state.next_offset
        while state.acknowledged < target:
            self._check_failure()
            if self._finished.is_set():
                raise SessionError(
                    f"the session ended before the peer received frames "
                    f"{state.acknowledged}..{target - 1}"
                )
            self._progress.clear()
            await self._progress.wait()

    async def close(self) -> None:
        """End the session gracefully.

        Waits until the peer has received everything sent and acknowledged
        the close; the peer's ``recv`` then raises :class:`EndOfStream`.
        Frames the peer sends after that are discarded. On a server, once
        the client has acknowledged every frame, a connection lost before
        the CLOSE_ACK arrives also completes the close: the client has
        everything, and a resume is answered FINISHED, its end of stream.
        Bounded by ``close_timeout`` (then ``TimeoutError``, and the session
        is aborted).
        """
        if self._finished.is_set():
            return
        self._check_failure()
        self._closing = True
        self._send_limit = -1
        try:
            async with asyncio.timeout(self.settings.close_timeout):
                await self.flush()
                if not self._finished.is_set():
                    self._close_sent = True
                    # Acknowledge what we received first: the peer may be
                    # flushing frames we already consumed.
                    self._send_ack()
                    self._send_control(Close(self._send_state.next_offset).encode())
                    self._on_close_sent()
                    await self._wait_finished()
        except BaseException:
            self.abort()
            raise
        self._teardown()

    def abort(self) -> None:
        """End the session at once, without telling the peer; pending calls fail."""
        if not self.closed:
            self._fail(SessionError("the session was aborted"))
        self._teardown()

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

    # -- waiting ------------------------------------------------------------

    async def _wait_readable(self) -> None:
        while not self._queue:
            if self._peer_closed:
                raise EndOfStream("the peer closed the session")
            self._check_failure()
            self._wrote_at_once = False  # waiting for the peer ends a turn
            self._readable.clear()
            await self._readable.wait()

    async def _wait_finished(self) -> None:
        while not self._finished.is_set():
            self._check_failure()
            self._progress.clear()
            await self._progress.wait()

    def _check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _check_sendable(self) -> None:
        self._check_failure()
        if self._peer_closed:
            raise SessionError("cannot send: the peer closed the session")
        if self._closing:
            raise SessionError("cannot send: the session is closing")

    def _wake(self) -> None:
        self._readable.set()
        self._progress.set()

    def _fail(self, error: StreamkitError) -> None:
        """Fail the session: every pending and later call raises ``error``; free its buffers."""
        if self._failure is None and not self._finished.is_set():
            self._failure = error
            self._send_limit = -1
            self._queue.clear()
            self._send_state.release()
        self._wake()

    def _finish(self) -> None:
        """The close handshake completed (either side's close)."""
        self._send_limit = -1
        self._finished.set()
        self._wake()

    # -- connections ----------------------------------------------------------

    def _attach(
        self, stream: FramedStream[bytes], peer_received: int, peer: ReceiveLimits
    ) -> _Connection:
        """Make ``stream`` the session's connection and replay what the peer lacks.

        ``peer_received`` is the next offset the peer expects; ``peer`` is
        its hello or welcome, with the largest payload it takes and its
        receive window. Raises :class:`~streamkit.errors.ResumeRejected` if
        it cannot be served.
        """
        settings = self.settings
        send_state = self._send_state
        send_state.resume(peer_received)
        # Replayed: frames written to an earlier connection that the peer
        # lacks, so written again. Frames sent while no connection was
        # attached go out for the first time.
        replayed = max(0, self._written - peer_received)
        self._max_frame = min(settings.max_frame, peer.max_frame)
        send_state.max_frames = min(settings.max_unacked_frames, peer.max_unacked_frames)
        send_state.max_bytes = min(settings.max_unacked_bytes, peer.max_unacked_bytes)
        if self._send_limit >= 0:
            self._send_limit = self._max_frame
        limit = self.settings.framing_limit()
        decoder = MessageDecoder(self._recv_state.received, limit)
        with contextlib.suppress(ProtocolError):
            # What the peer sent after its handshake is decoded now; if it
            # is bad, the read loop meets the error at once and drops the
            # connection.
            stream.switch_codec(SessionCodec(decoder, limit))
        self._drop_connection()
        conn = _Connection(stream, decoder)
        conn.last_seen = self._loop.time()
        self._conn = conn
        self._connections += 1
        # Queued synchronously, before any new frame can be sent on it.
        self._written = peer_received
        self._must_drain = False
        self._write_frames()
        self._replayed += replayed
        state = self._recv_state
        state.consumed = state.received - len(self._queue)
        try:
            stream.send_nowait(state.make_ack().encode())
            if self._close_sent:
                stream.send_nowait(Close(self._send_state.next_offset).encode())
            if self._ping_on_attach:
                stream.send_nowait(_PING)
        except ConnectionLost:
            pass  # the read loop meets the loss and detaches the session
        self._set_ack_low_water()
        conn.reader = asyncio.create_task(self._read_loop(conn))
        conn.keepalive = asyncio.create_task(self._keepalive_loop(conn))
        self._progress.set()
        return conn

    def _drop_connection(self) -> None:
        """Detach the current connection, if any, and close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        current = asyncio.current_task()
        for task in (conn.reader, conn.keepalive):
            if task is not None and task is not current:
                task.cancel()
        conn.stream.abort()
        if not conn.closed.done():
            conn.closed.set_result(None)

    def _connection_lost(self, conn: _Connection, reason: BaseException | None) -> None:
        if conn is not self._conn:
            return
        self._drop_connection()
        if self._finished.is_set() or self._failure is not None:
            return
        logger.debug("session %s lost its connection: %r", self.id, reason)
        self._on_detached()

    def _on_detached(self) -> None:
        """What the role does when the connection is lost (reconnect, or wait)."""

    def _on_close_sent(self) -> None:
        """What the role does once ``close()`` has sent (or queued) its CLOSE."""

    def _teardown(self) -> None:
        """Release the connection and timers once the session is over."""
        for handle in (self._ack_timer, self._ack_handle, self._write_handle):
            if handle is not None:
                handle.cancel()
        self._ack_timer = self._ack_handle = self._write_handle = None
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(ConnectionLost):
                conn.stream.close()
            self._conn = None
            for task in (conn.reader, conn.keepalive):
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            if not conn.closed.done():
                conn.closed.set_result(None)

    def _send_control(self, message: bytes) -> None:
        conn = self._conn
        if conn is not None:
            if self._written != self._send_state.next_offset:
                self._write_frames()  # messages keep their order with frames
            try:
                conn.stream.send_nowait(message)
            except ConnectionLost as exc:
                self._connection_lost(conn, exc)

    # -- acks -----------------------------------------------------------------

    # Frames in the queue are received, not consumed: consumed is always
    # received - len(queue), so recv() counts nothing per frame. It calls
    # _ack_check only once the queue is down to _ack_low_water.

    def _ack_check(self) -> None:
        """Frames were received or consumed: ack if ``ack_every`` are due, else start the timer.

        A due ack goes out when the event loop's turn ends, so the frames
        the application consumes in this turn (it runs after the read loop)
        are acknowledged with the ones received: one ack, one write, per
        batch rather than one per ``ack_every`` frames.
        """
        if self._ack_handle is not None:
            return
        state = self._recv_state
        state.consumed = state.received - len(self._queue)
        if state.ack_due(self._ack_every):
            self._ack_handle = self._loop.call_soon(self._on_ack_due)
            self._ack_low_water = -1  # nothing more to check until it is sent
        else:
            if self._ack_timer is None and state.ack_lag():
                self._ack_timer = self._loop.call_later(self.settings.ack_delay, self._on_ack_timer)
            self._set_ack_low_water()

    def _set_ack_low_water(self) -> None:
        # While the ack timer runs, consumption matters once ack_every frames
        # are consumed since the last ack; otherwise the first frame
        # consumed starts the timer.
        state = self._recv_state
        step = self._ack_every if self._ack_timer is not None else 1
        self._ack_low_water = state.received - state.acked_consumed - step

    def _on_ack_timer(self) -> None:
        self._ack_timer = None
        self._send_ack()

    def _on_ack_due(self) -> None:
        self._ack_handle = None
        self._send_ack()

    def _send_ack(self) -> None:
        """Send an ack now if anything was received or consumed since the last one."""
        # A running ack timer is left to fire (it acks whatever came since,
        # if anything): stopping and starting one per ack costs more than
        # the ack.
        if self._ack_handle is not None:
            self._ack_handle.cancel()
            self._ack_handle = None
        state = self._recv_state
        state.consumed = state.received - len(self._queue)
        if state.ack_lag():
            self._send_control(state.make_ack().encode())
        self._set_ack_low_water()

    # -- the connection's tasks --------------------------------------------

    async def _read_loop(self, conn: _Connection) -> None:
        stream = conn.stream
        decoder = conn.decoder
        state = self._recv_state
        queue = self._queue
        # The receive window we announced, checked once per batch with a
        # compare or two (see ReceiveState). A peer that keeps to it never
        # trips it: acks lag, so it counts at least as many frames
        # unconsumed as we hold; duplicates are never queued.
        marks = state.marks
        max_frames, max_bytes = state.max_frames, state.max_bytes
        messages = 0  # decoder.messages as of the last batch
        payload_bytes = 0  # decoder.payload_bytes as of the last batch
        reason: BaseException | None = None
        try:
            while True:
                batch: list[bytes | Message] = await stream.recv_batch()
                conn.alive = True
                if decoder.messages == messages:
                    # Payloads only, all new and in order: the hot path.
                    queue.extend(cast("list[bytes]", batch))
                    received = state.received = state.received + len(batch)
                    bytes_received = state.bytes_received = (
                        state.bytes_received + decoder.payload_bytes - payload_bytes
                    )
                    marks.append((received, bytes_received))
                else:
                    messages = decoder.messages
                    try:
                        self._receive_mixed(batch)
                    finally:
                        if queue:
                            self._readable.set()
                    received, bytes_received = state.received, state.bytes_received
                    if marks[-1][0] != received:
                        marks.append((received, bytes_received))
                payload_bytes = decoder.payload_bytes
                if queue:
                    self._readable.set()
                unconsumed = len(queue)
                consumed = received - unconsumed
                while marks[0][0] < consumed:
                    marks.popleft()
                if unconsumed > max_frames or bytes_received - marks[0][1] > max_bytes:
                    state.check_window(queue)
                self._ack_check()
        except (EndOfStream, IncompleteFrame, ConnectionLost, OSError) as exc:
            reason = exc  # the connection ended or broke, possibly mid-frame
        except ProtocolError as exc:
            logger.warning("session %s: protocol error from %s: %s", self.id, stream.peername, exc)
            reason = exc
        except asyncio.CancelledError:
            if conn is self._conn:
                # Cancelled from outside, not by a drop of ours: the event
                # loop is shutting down (say, asyncio.run returned with the
                # session open). End the session rather than reconnect.
                self.abort()
            raise
        finally:
            self._connection_lost(conn, reason)

    def _receive_mixed(self, batch: list[bytes | Message]) -> None:
        """Deliver payloads and handle messages in order (``received`` exact for each)."""
        state = self._recv_state
        append = self._queue.append
        received = state.received
        delivered = 0
        try:
            for item in batch:
                if type(item) is bytes:
                    append(item)
                    received += 1
                    delivered += len(item)
                else:
                    state.received = received
                    self._on_message(cast(Message, item))
        finally:
            state.received = received
            state.bytes_received += delivered

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Ack):
            self._send_state.on_ack(message.received, message.consumed)
            self._progress.set()
        elif isinstance(message, Data):
            self._recv_state.duplicates += 1  # an offset already received
        elif isinstance(message, Ping):
            self._send_control(_PONG)
        elif isinstance(message, Pong):
            self._pongs += 1
        elif isinstance(message, Close):
            if message.final != self._recv_state.received:
                raise ProtocolError(
                    f"CLOSE at offset {message.final} but {self._recv_state.received} "
                    "frames were received"
                )
            self._peer_closed = True
            self._send_control(_CLOSE_ACK)
            self._finish()
            conn = self._conn
            if conn is not None:
                conn.stream.close()
        elif isinstance(message, CloseAck):
            if not self._close_sent:
                raise ProtocolError("CLOSE_ACK for a close that was never sent")
            self._finish()
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} message in a session")

    async def _keepalive_loop(self, conn: _Connection) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(settings.keepalive_interval)
            now = self._loop.time()
            if conn.alive:
                conn.alive = False
                conn.last_seen = now
            elif now - conn.last_seen >= settings.keepalive_timeout:
                logger.info(
                    "session %s: no traffic for %.1f s, dropping the connection",
                    self.id,
                    now - conn.last_seen,
                )
                self._connection_lost(conn, TimeoutError("keepalive timeout"))
                return
            self._send_control(_PING)
