"""The session's state machine, sans-IO: bytes in, decisions and bytes out.

Nothing here performs I/O or imports asyncio (tests drive it with bytes and
a fake clock). ``docs/protocol.md`` section 2 is the specification; the
asyncio glue (:mod:`streamkit.session.session`, ``client``, ``server``)
only moves bytes, runs tasks and one timer, and wakes the application.

- :class:`SessionCore` is one side of one session, across connections:
  its :class:`State` (section 2.10), the replay buffer and the send window,
  the received frames and the receive window, when acks, pings and the
  close handshake go out, when a silent connection is dead and when a
  detached session gives up. Its interface is batch-shaped:
  ``receive_data(data)`` takes whatever a read returned and gives the new
  payloads, ``send(payload)`` takes one frame, ``data_to_send()`` returns
  the bytes of everything due for one ``writelines``, and
  ``next_deadline()`` / ``on_deadline(now)`` is its one timer.
- :class:`ClientHandshake` and :class:`ServerHandshake` turn the bytes of
  a connection's start (prefaces, hello, welcome or reject) into events,
  and :meth:`SessionCore.check_resume` decides a resume from the hello
  and the nonce its proof is bound to (an input: the nonce of the
  connection the client sent it on).
"""

from __future__ import annotations

import enum
import hmac
import struct
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable

from streamkit.codecs._base import APART_PAYLOAD
from streamkit.errors import (
    ConnectionLost,
    EndOfStream,
    FrameTooLarge,
    ProtocolError,
    ResumeRejected,
    SessionError,
    SessionExpired,
    StreamkitError,
)
from streamkit.session.protocol import (
    DATA_HEADER,
    FRAMED_DATA_HEADER,
    MAX_HANDSHAKE_MESSAGE,
    NONCE_SIZE,
    PREFACE_SIZE,
    VERSION,
    Ack,
    Close,
    CloseAck,
    Data,
    HelloNew,
    HelloResume,
    Message,
    MessageDecoder,
    MessageType,
    Ping,
    Pong,
    ReceiveLimits,
    Reject,
    RejectReason,
    Welcome,
    check_partial_preface,
    check_preface,
    decode_message,
    looks_like_http,
    make_preface,
    resume_proof,
)
from streamkit.session.settings import SessionSettings, SessionStats

__all__ = [
    "ClientHandshake",
    "ServerHandshake",
    "SessionCore",
    "SessionFinished",
    "State",
    "rejection_error",
]

_DATA = int(MessageType.DATA)
_DATA_SIZE = DATA_HEADER.size
_PACK_DATA = FRAMED_DATA_HEADER.pack
_LENGTH = FRAMED_DATA_HEADER.size - DATA_HEADER.size  # the u32 length of every frame
_PING = Ping().encode()
_PONG = Pong().encode()
_CLOSE_ACK = CloseAck().encode()
_ACK_TYPE = int(MessageType.ACK)
_PACK_ACK = struct.Struct(">IBQQ").pack
#: A payload at least this long is handed to ``writelines`` as it is
#: (header before it), never copied. Smaller ones are joined with the bytes
#: around them (from APART_PAYLOAD on) or copied into the output buffer, as
#: FramedStream does with an empty write buffer: one write per frame, where
#: header and payload apart cost a syscall and a segment each.
_LARGE_PAYLOAD = 256 * 1024


def _framed(body: bytes) -> bytes:
    """A message body with its ``u32`` length."""
    return len(body).to_bytes(_LENGTH, "big") + body


class State(enum.Enum):
    """Where one side of a session is (docs/protocol.md 2.10).

    ``ATTACHED`` and ``DETACHED``: open, with or without a connection;
    frames may be sent (they wait in the replay buffer while detached).
    ``CLOSING``: ``close()`` began; no new frames, ``CLOSE`` goes out once
    every frame is received by the peer; a connection may come and go.
    ``CLOSED`` (the close handshake completed, or the peer closed) and
    ``FAILED`` (expired, could not reconnect, rejected, aborted) are final.
    """

    ATTACHED = "attached"
    DETACHED = "detached"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class SessionFinished(SessionError):
    """The server answered a resume ``REJECT(FINISHED)``: it closed the session after
    the client had received all of it (the client's end of stream)."""


def rejection_error(reject: Reject) -> StreamkitError:
    """The error a client raises for a server's ``REJECT``."""
    message = f"server rejected the session: {reject.message}"
    if reject.reason == RejectReason.EXPIRED:
        return SessionExpired(message)
    if reject.reason == RejectReason.FINISHED:
        return SessionFinished(message)
    return ResumeRejected(message)


class SessionCore:
    """One side of one session, across its connections; no I/O.

    The glue creates it after the handshake that opened the session and
    calls :meth:`attach` with each connection's handshake (the first one
    included) and :meth:`detach` when a connection ends. In between:

    - ``send(payload)`` holds a frame for replay and queues its bytes, or
      returns -1 (window full, over ``max_frame``, or no longer sending:
      :meth:`send_error` says which);
    - ``receive_data(data)`` takes bytes read from the connection, appends
      new payloads to :attr:`queue` (the application pops them from the
      left; it calls :meth:`on_consumed` whenever ``len(queue)`` is at or
      below :attr:`ack_low_water`) and returns them; a
      :class:`ProtocolError` means the connection must be dropped (frames
      before the bad bytes are delivered);
    - ``data_to_send()`` returns the wire bytes due (frames, acks, pings,
      close), in order, for one ``writelines``;
    - ``next_deadline()`` is when ``on_deadline(now)`` must run next: acks
      due (a deadline of 0: as soon as the input at hand is handled),
      keepalive, expiry or giving up reconnecting.

    After a call that may change it, the glue looks at :attr:`state` (and
    :attr:`attached`: the core detaches itself from a connection that went
    silent for ``keepalive_timeout``). ``clock`` (seconds, monotonic) starts
    the ``ack_delay`` timer; every other time is passed in. The glue and its
    users read the public attributes; only the core's methods change them.
    """

    __slots__ = (
        "_ack_at",
        "_ack_bytes",
        "_ack_frames",
        "_acked_bytes_consumed",
        "_acked_bytes_received",
        "_acked_consumed",
        "_acked_received",
        "_apart",
        "_byte_target",
        "_clock",
        "_connections",
        "_consumed",
        "_credit_bytes",
        "_credit_frames",
        "_decoder",
        "_expire_at",
        "_frame_target",
        "_frames",
        "_head",
        "_heard",
        "_last_heard",
        "_mark_bytes",
        "_mark_offsets",
        "_messages_seen",
        "_out",
        "_parts",
        "_parts_bytes",
        "_payload_bytes_seen",
        "_ping_at",
        "_progress_marks",
        "_recv_bytes",
        "_recv_frames",
        "_released_bytes",
        "_replayed",
        "_retry_at",
        "_send_limit",
        "_small_limit",
        "_window_bytes",
        "_window_frames",
        "_written",
        "ack_low_water",
        "acknowledged",
        "attached",
        "bytes_received",
        "client",
        "close_sent",
        "detach_reason",
        "dropped",
        "duplicates",
        "ended",
        "failure",
        "last_dropped",
        "max_frame",
        "messages_received",
        "next_offset",
        "peer_closed",
        "pongs",
        "queue",
        "received",
        "reconnect_at_once",
        "session_id",
        "settings",
        "state",
        "token",
    )

    def __init__(
        self,
        session_id: bytes,
        token: bytes,
        settings: SessionSettings,
        *,
        client: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_id = session_id
        self.token = token
        self.settings = settings
        self.client = client
        self._clock = clock
        self.state = State.DETACHED
        #: Whether the session is over (closed by either side, or failed).
        self.ended = False
        self.attached = False
        #: Why the session failed (raised by every call from then on), else None.
        self.failure: StreamkitError | None = None
        #: Why the last connection was detached (for the log and the client's errors).
        self.detach_reason: BaseException | None = None
        self.peer_closed = False  # the peer closed: the application reads the queue, then the end
        self.close_sent = False
        self._connections = 0
        self._replayed = 0
        self.pongs = 0  # PONG messages received, on any connection
        #: Messages other than new frames received (acks, pings, closes...):
        #: when it moves, the glue wakes senders and looks at the state.
        self.messages_received = 0

        # -- sending: the replay buffer is _frames[_head:], frames _consumed.. --
        self.max_frame = settings.max_frame  # ours, then the smaller of ours and the peer's
        # The largest payload send() takes: max_frame, or -1 once not sending;
        # frames under _small_limit take the hot path (-1 too once not sending).
        self._send_limit = settings.max_frame
        self._small_limit = min(settings.max_frame + 1, _LARGE_PAYLOAD)
        self._window_frames = settings.max_unacked_frames
        self._window_bytes = settings.max_unacked_bytes
        # Room left in the window: the window less the frames and bytes held
        # (the bytes' may go below 0: one frame of any size fits an empty window).
        self._credit_frames = self._window_frames
        self._credit_bytes = self._window_bytes
        self.next_offset = 0
        self.acknowledged = 0  # the peer received every frame below this
        self._consumed = 0  # the peer consumed every frame below this: the first held
        self._frames: list[bytes] = []
        self._head = 0
        self._released_bytes = 0
        self._written = 0  # frames below this were handed to a connection
        # What data_to_send() returns next: the bytes in _parts (counted in
        # _parts_bytes), then those in _out. Small frames are copied into
        # _out; a larger payload goes to _parts as it is (_apart counts those
        # of _LARGE_PAYLOAD or more), after _out so far, and a new _out starts.
        # No output while detached (_out is None).
        self._out: bytearray | None = None
        self._parts: list[bytes | bytearray | memoryview] = []
        self._parts_bytes = 0
        self._apart = 0

        # -- receiving ----------------------------------------------------------
        #: Payloads received and not yet consumed by the application.
        self.queue: deque[bytes] = deque()
        self.received = 0  # next offset expected
        self.bytes_received = 0
        self.duplicates = 0
        self._recv_frames = settings.max_unacked_frames
        self._recv_bytes = settings.max_unacked_bytes
        self._decoder: MessageDecoder | None = None
        self._messages_seen = 0  # decoder.messages as of the last batch
        self._payload_bytes_seen = 0  # decoder.payload_bytes as of the last batch
        # At the end of each batch: the offset received and the payload bytes
        # below it, from the last batch boundary the last ack had consumed.
        self._mark_offsets: list[int] = [0]
        self._mark_bytes: list[int] = [0]
        # Acks: what the last one said, and what makes the next one due.
        self._acked_received = 0
        self._acked_consumed = 0
        self._acked_bytes_received = 0
        self._acked_bytes_consumed = 0
        self._ack_frames = settings.ack_every
        self._ack_bytes = max(1, settings.max_unacked_bytes // 4)
        self._frame_target = self._ack_frames  # see on_consumed
        self._byte_target: int | None = None
        #: The application calls on_consumed() once len(queue) is at most this.
        self.ack_low_water = -1
        self._ack_at: float | None = None  # when an ack is due (0: at once)

        # -- timers -------------------------------------------------------------
        self._heard = False  # a message arrived since the last keepalive tick
        self._last_heard = 0.0
        self._ping_at: float | None = None
        self._expire_at: float | None = None  # server: detached, waiting for a resume
        # Client: a run of reconnects without progress gives up at _retry_at.
        self._retry_at: float | None = None
        self._progress_marks = (0, 0, 0)
        self.dropped = 0  # connections in a row that ended without progress
        self.last_dropped = False  # the last failure was such a connection
        #: Whether the client should reconnect at once (the last connection made progress).
        self.reconnect_at_once = True

    # -- reading the state ----------------------------------------------------

    @property
    def id(self) -> str:
        """The session id, as hex."""
        return self.session_id.hex()

    @property
    def connections(self) -> int:
        """Connections attached so far (the first one included)."""
        return self._connections

    @property
    def unacked(self) -> int:
        """Frames sent and not yet reported received by the peer."""
        return self.next_offset - self.acknowledged

    @property
    def held_bytes(self) -> int:
        """Payload bytes held for replay (sent, not yet consumed by the peer)."""
        return self._window_bytes - self._credit_bytes

    @property
    def send_window(self) -> tuple[int, int]:
        """The send window in frames and bytes: ours, or the peer's if smaller."""
        return self._window_frames, self._window_bytes

    def stats(self) -> SessionStats:
        """A snapshot of the session's counters."""
        return SessionStats(
            connections=self._connections,
            reconnects=max(0, self._connections - 1),
            frames_sent=self.next_offset,
            bytes_sent=self._released_bytes + self.held_bytes,
            frames_received=self.received,
            bytes_received=self.bytes_received,
            frames_replayed=self._replayed,
            duplicates_dropped=self.duplicates,
        )

    # -- handshakes -------------------------------------------------------------

    def resume_hello(self, nonce: bytes) -> HelloResume:
        """The client's hello to resume on a connection whose server preface had ``nonce``."""
        proof = resume_proof(self.token, nonce, self.session_id, self.received)
        return HelloResume(self.session_id, proof, self.received, self.settings.announced())

    def check_resume(self, hello: HelloResume, nonce: bytes) -> Reject | None:
        """The server's decision on ``hello``, a resume of this session: None to accept.

        ``nonce`` is the one the client's proof is bound to: the nonce of
        the server preface on the connection the hello came on (a wrong
        proof is ``BAD_TOKEN``, compared in constant time). A ``received``
        this side cannot serve is ``BAD_OFFSET``. A session that ended is
        the caller's to answer (it may be forgotten already).
        """
        expected = resume_proof(self.token, nonce, self.session_id, hello.received)
        if not hmac.compare_digest(expected, hello.proof):
            return Reject(RejectReason.BAD_TOKEN, f"wrong token for session {self.id}")
        problem = self._replay_problem(hello.received)
        if problem is not None:
            return Reject(RejectReason.BAD_OFFSET, problem)
        return None

    def welcome(self) -> Welcome:
        """The server's welcome to a new session (with its token) or a resume of it."""
        if self._connections:
            return Welcome(True, self.session_id, self.received, b"", self.settings.announced())
        return Welcome(False, self.session_id, 0, self.token, self.settings.announced())

    def _replay_problem(self, offset: int) -> str | None:
        """Why a peer expecting ``offset`` cannot be served, or None."""
        if offset > self.next_offset:
            return f"peer expects offset {offset} but only {self.next_offset} frames were sent"
        if offset < self._consumed:
            return (
                f"peer expects offset {offset} but frames below {self._consumed} were "
                "consumed and are no longer held"
            )
        return None

    # -- connections --------------------------------------------------------------

    def attach(self, peer_received: int, peer: ReceiveLimits, now: float) -> None:
        """A connection completed its handshake: replay what the peer lacks, then go on.

        ``peer_received`` is the next offset the peer expects; ``peer`` what
        it announced. Queues the replay, an ACK, a CLOSE sent before (the
        peer may be waiting for it) and, on a client, a PING (its PONG tells
        that the connection carries traffic both ways). Raises
        :class:`ResumeRejected` (and fails the session) for an offset this
        side cannot serve.
        """
        if self.ended:
            raise RuntimeError(f"cannot attach a session that is {self.state.value}")
        problem = self._replay_problem(peer_received)
        if problem is not None:
            error = ResumeRejected(problem)
            self.fail(error)
            raise error
        settings = self.settings
        self.acknowledged = max(self.acknowledged, peer_received)
        self.max_frame = min(settings.max_frame, peer.max_frame)
        if self._send_limit >= 0:
            self._send_limit = self.max_frame
            self._small_limit = min(self.max_frame + 1, _LARGE_PAYLOAD)
        frames = min(settings.max_unacked_frames, peer.max_unacked_frames)
        size = min(settings.max_unacked_bytes, peer.max_unacked_bytes)
        self._credit_frames += frames - self._window_frames
        self._credit_bytes += size - self._window_bytes
        self._window_frames, self._window_bytes = frames, size
        # The peer's send window is at most ours and its own: ack every
        # quarter of it, so a sender never waits on ack_delay with room to go.
        self._ack_frames = max(
            1, min(settings.ack_every, min(self._recv_frames, peer.max_unacked_frames) // 4)
        )
        self._ack_bytes = max(1, min(self._recv_bytes, peer.max_unacked_bytes) // 4)
        self._decoder = MessageDecoder(self.received, settings.framing_limit())
        self._messages_seen = self._payload_bytes_seen = 0
        self._connections += 1
        self.attached = True
        self.detach_reason = None
        if self.state is State.DETACHED:
            self.state = State.ATTACHED
        self._expire_at = None
        self._out = bytearray()
        self._parts = []
        self._parts_bytes = self._apart = 0
        # Replayed: frames handed to an earlier connection that the peer
        # lacks. Frames sent while detached go out for the first time.
        self._replayed += max(0, self._written - peer_received)
        self._queue_frames(peer_received)
        self._ack_at = None
        self._queue(self._make_ack())
        if self.close_sent:
            self._queue(_framed(Close(self.next_offset).encode()))
        if self.client:
            self._queue(_framed(_PING))
        self._heard = False
        self._last_heard = now
        self._ping_at = now + settings.keepalive_interval
        self._progress_marks = self._progress()
        self._set_ack_low_water()
        if self.state is State.CLOSING:
            self._maybe_send_close()

    def detach(self, now: float, reason: BaseException | None = None) -> None:
        """The connection ended (``reason``: why); queued bytes for it are dropped.

        A server then waits ``resume_timeout`` for a resume (or, closing
        with every frame acknowledged, is closed at once: docs/protocol.md
        2.8); a client decides whether to reconnect at once or back off
        (:attr:`reconnect_at_once`) and when it gives up.
        """
        if not self.attached:
            return
        self.attached = False
        self.detach_reason = reason
        self._decoder = None
        self._out = None
        self._parts = []
        self._parts_bytes = self._apart = 0
        self._ping_at = None
        self._ack_at = None
        self.ack_low_water = -1
        if self.state is State.ATTACHED:
            self.state = State.DETACHED
        if self.ended:
            return
        if not self.client:
            if self.close_sent and self.unacked == 0:
                # The client has every frame: whether or not it saw the CLOSE,
                # it needs nothing more (its resume is answered FINISHED).
                self._end(State.CLOSED)
            else:
                self._expire_at = now + self.settings.resume_timeout
            return
        progressed = self._progress() != self._progress_marks
        if progressed or self._retry_at is None:
            # A new run of reconnects: its own deadline, the first try at once.
            self._retry_at = now + self.settings.max_reconnect_time
            self.dropped = 0
        if not progressed:
            self.dropped += 1
        self.last_dropped = not progressed
        self.reconnect_at_once = progressed

    def resume_failed(self, error: BaseException) -> None:
        """A client's attempt to resume failed before attaching (it could not connect,
        or the handshake failed): the error its give-up reports."""
        self.detach_reason = error
        self.last_dropped = False

    def _progress(self) -> tuple[int, int, int]:
        return (self.acknowledged, self.received, self.pongs)

    # -- sending -------------------------------------------------------------------

    def send(self, payload: bytes) -> int:
        """Hold ``payload`` (immutable ``bytes``) as the next frame and queue it.

        Returns about how many bytes ``data_to_send()`` has now, for the
        glue's write-size decisions (0 while detached; a small frame after a
        payload of 1 KiB or more counts only from that payload on). Returns
        -1, holding nothing, when it cannot be sent now: over
        :attr:`max_frame`, the send window full (one frame of any size fits
        an empty window), or the session not sending; :meth:`send_error`
        tells those apart.
        """
        size = len(payload)
        credit = self._credit_bytes - size
        # One compare or three on the hot path (a small frame in the window).
        if not (size < self._small_limit and credit >= 0 and self._credit_frames > 0):
            if size > self._send_limit:
                return -1  # over max_frame, or not sending
            if (credit < 0 or self._credit_frames <= 0) and self._head != len(self._frames):
                return -1  # full (an empty window takes one frame of any size)
        self._credit_bytes = credit
        self._credit_frames -= 1
        self._frames.append(payload)
        offset = self.next_offset
        self.next_offset = offset + 1
        out = self._out
        if out is None:
            return 0
        if size < APART_PAYLOAD:
            out += _PACK_DATA(size + 9, _DATA, offset)
            out += payload
            return len(out)
        if size < _LARGE_PAYLOAD and not out:  # a run of them
            self._parts += (_PACK_DATA(size + 9, _DATA, offset), payload)
            self._parts_bytes = unsent = self._parts_bytes + size + 13
            return unsent
        return self._queue_apart(offset, payload)

    @property
    def unsent(self) -> int:
        """How many bytes ``data_to_send()`` has now."""
        out = self._out
        return 0 if out is None else len(out) + self._parts_bytes

    def send_error(self, size: int) -> StreamkitError | None:
        """Why a frame of ``size`` bytes cannot be sent, or None if it waits for the window."""
        if size > self.max_frame:
            whose = "the peer's " if self.max_frame < self.settings.max_frame else ""
            return FrameTooLarge.exceeds(size, self.max_frame, whose)
        if self.failure is not None:
            return self.failure
        if self.peer_closed:
            return SessionError("cannot send: the peer closed the session")
        if self.state is State.CLOSED:
            return SessionError("cannot send: the session is closed")
        if self.state is State.CLOSING:
            return SessionError("cannot send: the session is closing")
        return None

    def receive_error(self) -> StreamkitError | None:
        """What a receive raises once the queue is empty, or None while frames may come."""
        if self.peer_closed:
            return EndOfStream("the peer closed the session")
        if self.failure is not None:
            return self.failure
        if self.state is State.CLOSED:
            return EndOfStream("the session is closed")
        return None

    def _queue_apart(self, offset: int, payload: bytes) -> int:
        out = self._out
        assert out is not None
        header = _PACK_DATA(len(payload) + 9, _DATA, offset)
        if out:
            out += header
            self._parts += (out, payload)
            self._parts_bytes += len(out) + len(payload)
            self._out = bytearray()
        else:
            self._parts += (header, payload)
            self._parts_bytes += len(header) + len(payload)
        self._apart += len(payload) >= _LARGE_PAYLOAD
        return self._parts_bytes

    def _queue_frames(self, start: int) -> None:
        """Queue the held frames from offset ``start`` on (a replay)."""
        offset = start
        for payload in self._frames[self._head + start - self._consumed :]:
            size = len(payload)
            if size < APART_PAYLOAD:
                out = self._out
                assert out is not None
                out += _PACK_DATA(size + 9, _DATA, offset)
                out += payload
            else:
                self._queue_apart(offset, payload)
            offset += 1

    def _queue(self, message: bytes) -> None:
        """Queue a framed control message (after every frame queued before it)."""
        out = self._out
        if out is not None:
            out += message

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """The bytes due on the connection, in order: for one ``writelines``.

        Large payloads come as they are (never copied), the rest joined.
        Empty when nothing is due or no connection is attached.
        """
        out = self._out
        parts = self._parts
        if parts:
            if out:
                parts.append(out)
                self._out = bytearray()
            parts = self._joined(parts)
        elif out:
            parts = [out]
            self._out = bytearray()
        else:
            return parts
        self._written = self.next_offset
        return parts

    def _joined(
        self, parts: list[bytes | bytearray | memoryview]
    ) -> list[bytes | bytearray | memoryview]:
        """``parts`` (now out of _parts) with each run of pieces under _LARGE_PAYLOAD joined:
        one copy of each byte, where a growing bytearray copies them again at each
        reallocation (the memory after it taken, in a busy process)."""
        self._parts = []
        self._parts_bytes = 0
        if not self._apart:
            return [b"".join(parts)]
        self._apart = 0
        joined: list[bytes | bytearray | memoryview] = []
        run: list[bytes | bytearray | memoryview] = []
        for part in parts:
            if len(part) < _LARGE_PAYLOAD:
                run.append(part)
                continue
            if run:
                joined.append(b"".join(run))
                run = []
            joined.append(part)
        if run:
            joined.append(b"".join(run))
        return joined

    # -- receiving -----------------------------------------------------------------

    @property
    def decoder(self) -> MessageDecoder:
        """The attached connection's message decoder: for a glue that feeds it the bytes as
        they arrive (in place, and a large payload's rest in one piece) and hands each batch
        it returns to :meth:`receive_messages`. Raises ``RuntimeError`` while detached."""
        decoder = self._decoder
        if decoder is None:
            raise RuntimeError("no connection is attached")
        return decoder

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take bytes read from the connection; return the new payloads (also in :attr:`queue`).

        Handles every message in order (acks release held frames, a ping
        queues its pong, a close ends the session), checks the receive
        window and decides on acks. Raises :class:`ProtocolError` for bad
        input, after delivering the payloads before it: the glue drops
        the connection (and calls :meth:`detach`).
        """
        decoder = self.decoder
        new = self.receive_messages(decoder.feed(data))
        while decoder.pending:
            # An error held back for the payloads before it, or input after
            # a message that changed the state: no new input is needed.
            more = self.receive_messages(decoder.feed(b""))
            new = new + more if new else more
        return new

    def receive_messages(self, batch: list[bytes | Message]) -> list[bytes]:
        """Take what one ``feed`` of :attr:`decoder` returned; as :meth:`receive_data`."""
        self._heard = True
        decoder = self.decoder
        if decoder.messages == self._messages_seen:
            # Payloads only, all new and in order: the hot path.
            self.queue.extend(batch)  # type: ignore[arg-type]
            self.received += len(batch)
            self.bytes_received += decoder.payload_bytes - self._payload_bytes_seen
            self._payload_bytes_seen = decoder.payload_bytes
            self._after_batch()
            return batch  # type: ignore[return-value]
        new = self._take(batch, decoder)
        self._after_batch()
        return new

    def _take(self, batch: list[bytes | Message], decoder: MessageDecoder) -> list[bytes]:
        """Payloads and messages in order, ``received`` exact for each message."""
        self.messages_received += decoder.messages - self._messages_seen
        self._messages_seen = decoder.messages
        self._payload_bytes_seen = decoder.payload_bytes
        new: list[bytes] = []
        append = new.append
        deliver = self.queue.append
        received = self.received
        delivered = 0
        try:
            for item in batch:
                if type(item) is bytes:
                    deliver(item)
                    append(item)
                    received += 1
                    delivered += len(item)
                else:
                    self.received = received
                    self._on_message(item)  # type: ignore[arg-type]
        finally:
            self.received = received
            self.bytes_received += delivered
        return new

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Ack):
            self._on_ack(message.received, message.consumed)
        elif isinstance(message, Data):
            self.duplicates += 1  # an offset already received
        elif isinstance(message, Ping):
            self._queue(_framed(_PONG))
        elif isinstance(message, Pong):
            self.pongs += 1
        elif isinstance(message, Close):
            if message.final != self.received:
                raise ProtocolError(
                    f"CLOSE at offset {message.final} but {self.received} frames were received"
                )
            self._queue(_framed(_CLOSE_ACK))
            self.peer_closed = True
            self._end(State.CLOSED)
        elif isinstance(message, CloseAck):
            if not self.close_sent:
                raise ProtocolError("CLOSE_ACK for a close that was never sent")
            self._end(State.CLOSED)
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} message in a session")

    def _on_ack(self, received: int, consumed: int) -> None:
        """Apply the peer's cumulative acknowledgement (docs/protocol.md 2.6)."""
        if received > self.next_offset:
            raise ProtocolError(
                f"ack for offset {received} but only {self.next_offset} frames were sent"
            )
        if received < self.acknowledged or consumed < self._consumed:
            raise ProtocolError(
                f"ack went backwards: received {received} (was {self.acknowledged}), "
                f"consumed {consumed} (was {self._consumed})"
            )
        if consumed > received:
            raise ProtocolError(f"ack says consumed {consumed} > received {received}")
        self.acknowledged = received
        if consumed != self._consumed:
            frames, head = self._frames, self._head
            stop = head + consumed - self._consumed
            released = sum(map(len, frames[head:stop]))
            if stop * 2 >= len(frames):
                # Compacted once half is released: each frame moves at most once.
                del frames[:stop]
                stop = 0
            self._head = stop
            self._credit_bytes += released
            self._credit_frames += consumed - self._consumed
            self._released_bytes += released
            self._consumed = consumed
        if self.state is State.CLOSING:
            self._maybe_send_close()

    def _after_batch(self) -> None:
        """Check the receive window and decide on acks after a batch (a read's worth).

        A few compares when nothing is due: the marks, the consumed-bytes
        lower bound and the exact count are looked at only near a limit.
        """
        received = self.received
        bytes_received = self.bytes_received
        offsets = self._mark_offsets
        if offsets[-1] != received:
            offsets.append(received)
            self._mark_bytes.append(bytes_received)
        unconsumed = len(self.queue)
        # The receive window we announced. A peer that keeps to it never
        # trips it: acks lag, so it counts at least as many frames
        # unconsumed as we hold; duplicates are never queued. The bytes
        # consumed as of the last ack are a lower bound of those consumed.
        if (
            unconsumed > self._recv_frames
            or bytes_received - self._acked_bytes_consumed > self._recv_bytes
        ):
            self._check_window(received - unconsumed)
        if self._ack_at == 0.0 or self.ended:
            return  # due already, or nothing more to acknowledge
        if (
            received - self._acked_received >= self._ack_frames
            or bytes_received - self._acked_bytes_received >= self._ack_bytes
        ):
            self._ack_due()
            return
        if (
            self._byte_target is None
            and bytes_received - self._acked_bytes_consumed >= self._ack_bytes
        ):
            self._byte_target = received  # consuming this batch makes an ack due
        if self._ack_at is None and (
            received != self._acked_received or unconsumed != received - self._acked_consumed
        ):
            self._ack_at = self._clock() + self.settings.ack_delay
        self._set_ack_low_water()

    def _check_window(self, consumed: int) -> None:
        """Raise :class:`ProtocolError` if what is held overflows the receive window.

        First on the marks (the bytes of the batches not wholly consumed: a
        lower bound), then exactly, on the frames held: more than
        ``max_unacked_frames``, or more than ``max_unacked_bytes`` in more
        than one frame (a peer that keeps to the window sends a frame over
        it only into an empty window). The exact count may leave out the
        unconsumed rest of a batch the application is part way through.
        """
        queue = self.queue
        frames = len(queue)
        if frames <= self._recv_frames:
            first = bisect_left(self._mark_offsets, consumed)
            if self.bytes_received - self._mark_bytes[first] <= self._recv_bytes:
                return
        held = sum(map(len, queue))
        if frames > self._recv_frames:
            over = f"max_unacked_frames={self._recv_frames}"
        elif held > self._recv_bytes and frames > 1:
            over = f"max_unacked_bytes={self._recv_bytes}"
        else:
            return
        raise ProtocolError(
            f"the peer sent past the receive window: {frames} frames ({held} bytes) received "
            f"and not yet consumed, over {over} announced in the handshake"
        )

    # -- acks ------------------------------------------------------------------------

    # The queue holds frames received, not consumed: consumed is always
    # received - len(queue), so the application counts nothing per frame; it
    # calls on_consumed() only once the queue is down to ack_low_water. An
    # ack is due at once when ack_every frames, or a quarter of the byte
    # window, were received or consumed since the last; else ack_delay after
    # the first such frame. Consumed bytes are counted at batch boundaries
    # (marks): an ack is due once the consumption reaches _frame_target or
    # _byte_target (an offset).

    def on_consumed(self) -> None:
        """The application consumed down to :attr:`ack_low_water`: an ack may be due."""
        if not self.attached or self._ack_at == 0.0 or self.ended:
            return
        received = self.received
        consumed = received - len(self.queue)
        byte_target = self._byte_target
        if consumed >= self._frame_target or (byte_target is not None and consumed >= byte_target):
            self._ack_due()
            return
        if self._ack_at is None and consumed != self._acked_consumed:
            self._ack_at = self._clock() + self.settings.ack_delay
        self._set_ack_low_water()

    def _ack_due(self) -> None:
        # Sent once the input at hand is handled: the frames the application
        # consumes meanwhile share it.
        self._ack_at = 0.0
        self.ack_low_water = -1

    def _set_ack_low_water(self) -> None:
        # While an ack waits for its timer, consumption matters once it
        # reaches a target; otherwise the first frame consumed starts the timer.
        if self._ack_at is None:
            self.ack_low_water = self.received - self._acked_consumed - 1
        else:
            target = self._frame_target
            byte_target = self._byte_target
            if byte_target is not None and byte_target < target:
                target = byte_target
            self.ack_low_water = self.received - target

    def _make_ack(self) -> bytes:
        """A framed ACK with the counts now; they are acknowledged from here on."""
        received = self.received
        consumed = received - len(self.queue)
        self._acked_received = received
        self._acked_consumed = consumed
        self._acked_bytes_received = self.bytes_received
        # The bytes consumed: counted at the last batch wholly consumed.
        offsets, sizes = self._mark_offsets, self._mark_bytes
        last = bisect_right(offsets, consumed) - 1
        if last:
            del offsets[:last]  # marks below it are of no more use
            del sizes[:last]
        consumed_bytes = self._acked_bytes_consumed = sizes[0]
        self._frame_target = consumed + self._ack_frames
        first = bisect_left(sizes, consumed_bytes + self._ack_bytes, 1)
        self._byte_target = offsets[first] if first < len(offsets) else None
        return _PACK_ACK(17, _ACK_TYPE, received, consumed)

    def _send_ack(self) -> None:
        """Queue an ack if anything was received or consumed since the last one."""
        self._ack_at = None
        received = self.received
        if received != self._acked_received or received - len(self.queue) != self._acked_consumed:
            self._queue(self._make_ack())
        self._set_ack_low_water()

    # -- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`on_deadline` must run next (0: as soon as the input at hand is
        handled), or None."""
        ack_at = self._ack_at
        if ack_at == 0.0:
            return ack_at
        if self.attached:
            other = self._ping_at
        else:
            other = self._retry_at if self.client else self._expire_at
        if ack_at is None:
            return other
        return ack_at if other is None or ack_at < other else other

    def on_deadline(self, now: float) -> None:
        """Do what is due at ``now``: acks, keepalive, expiry, giving up reconnecting.

        A connection silent for ``keepalive_timeout`` is detached (the glue
        sees :attr:`attached` false and drops it).
        """
        if self.ended:
            return
        if self._ack_at is not None and self._ack_at <= now and self.attached:
            self._send_ack()
        if self.attached:
            if self._ping_at is not None and now >= self._ping_at:
                settings = self.settings
                if self._heard:
                    self._heard = False
                    self._last_heard = now
                elif now - self._last_heard >= settings.keepalive_timeout:
                    silent = now - self._last_heard
                    self.detach(
                        now, TimeoutError(f"keepalive timeout: no traffic for {silent:.1f} s")
                    )
                    return
                self._queue(_framed(_PING))
                self._ping_at = now + settings.keepalive_interval
        elif self.client:
            if self._retry_at is not None and now >= self._retry_at:
                self._give_up()
        elif self._expire_at is not None and now >= self._expire_at:
            self.fail(
                SessionExpired(
                    f"session {self.id} expired: its client did not resume within "
                    f"resume_timeout={self.settings.resume_timeout} s"
                )
            )

    def _give_up(self) -> None:
        """Fail the client's session: ``max_reconnect_time`` passed without progress."""
        limit = self.settings.max_reconnect_time
        error: StreamkitError
        if self.last_dropped:
            error = ProtocolError(
                f"session {self.id} made no progress within max_reconnect_time={limit} s: "
                f"{self.dropped} connections in a row were resumed and lost before "
                "anything got through (the server may be refusing a frame we replay; "
                f"see its log); last error: {self.detach_reason!r}"
            )
        else:
            error = ConnectionLost(
                f"could not resume session {self.id} within max_reconnect_time={limit} s: "
                f"{self.detach_reason!r}"
            )
        self.fail(error)

    # -- closing and failing -------------------------------------------------------------

    def close(self) -> None:
        """Begin a graceful close: no new frames; ``CLOSE`` once the peer received them all.

        The session is ``CLOSED`` when the peer answers ``CLOSE_ACK`` (or
        closes too). A server with every frame acknowledged and no
        connection (its ``CLOSE`` sent, or due on the next one) is
        ``CLOSED`` at once: the client has everything, and a resume is
        answered ``FINISHED`` (2.8).
        """
        if self.ended or self.state is State.CLOSING:
            return
        self.state = State.CLOSING
        self._send_limit = self._small_limit = -1
        self._maybe_send_close()

    def _maybe_send_close(self) -> None:
        if self.close_sent or self.acknowledged < self.next_offset:
            return
        self.close_sent = True
        if self.attached:
            # Acknowledge what we received first: the peer may be flushing
            # frames we already consumed.
            self._send_ack()
            self._queue(_framed(Close(self.next_offset).encode()))
        elif not self.client:
            self._end(State.CLOSED)

    def rejected(self, reject: Reject) -> None:
        """A client's resume was rejected: the session ends.

        ``FINISHED``: the server closed the session after every frame
        reached us; the application reads the queue, then the end (2.8).
        Anything else fails it with :func:`rejection_error`'s error.
        """
        if reject.reason == RejectReason.FINISHED:
            self.peer_closed = True
            self._end(State.CLOSED)
        else:
            self.fail(rejection_error(reject))

    def fail(self, error: StreamkitError) -> None:
        """End the session with ``error`` (every later call raises it); free its buffers."""
        if self.ended:
            return
        self.failure = error
        self.queue.clear()
        self._released_bytes += self.held_bytes
        self._frames = []
        self._head = 0
        self._credit_frames, self._credit_bytes = self._window_frames, self._window_bytes
        self._end(State.FAILED)

    def abort(self) -> None:
        """End the session at once, without telling the peer."""
        self.fail(SessionError("the session was aborted"))

    def _end(self, state: State) -> None:
        self.state = state
        self.ended = True
        self._send_limit = self._small_limit = -1
        self._expire_at = self._retry_at = None
        self._ack_at = None


class _Handshake:
    """What both sides' handshakes share: a buffer and the output."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._out: list[bytes] = []
        #: Bytes received after the handshake (the peer's first frames).
        self.rest = b""

    def data_to_send(self) -> list[bytes]:
        """The bytes to write now."""
        out, self._out = self._out, []
        return out

    def _message(self, start: int, peer: str) -> tuple[Message, int] | None:
        """The handshake message at ``start`` in the buffer and where it ends, if complete.

        Raises :class:`ProtocolError` for one announcing more than a
        handshake message can be, before reading it.
        """
        buf = self._buf
        if len(buf) < start + _LENGTH:
            return None
        size = int.from_bytes(buf[start : start + _LENGTH], "big")
        if size > MAX_HANDSHAKE_MESSAGE:
            raise ProtocolError(
                f"the {peer}'s first message is over the {MAX_HANDSHAKE_MESSAGE} bytes a "
                "connection may send before its handshake completes "
                f"({FrameTooLarge.exceeds(size, MAX_HANDSHAKE_MESSAGE)}); closed before reading it"
            )
        end = start + _LENGTH + size
        if len(buf) < end:
            return None
        return decode_message(bytes(buf[start + _LENGTH : end])), end


#: Why a server may drop a connection in the middle of the handshake.
_HANDSHAKE_HINT = (
    "is it a streamkit session server, does it use TLS exactly when this client does "
    "(a TLS server drops a plain client), and is it below its max_connections?"
)


class ClientHandshake(_Handshake):
    """The client's side of a connection's handshake (docs/protocol.md 2.2-2.4), sans-IO.

    ``data_to_send()`` starts with the client's preface; ``receive_data``
    takes what the server sent and returns its :class:`Welcome` or
    :class:`Reject` once complete (the bytes after it are in :attr:`rest`),
    after sending ``hello(nonce)`` once the server's nonce is in (a reject
    becomes an error with :func:`rejection_error`, or ends a session with
    :meth:`SessionCore.rejected`). Anything wrong raises
    :class:`ProtocolError` (another protocol, another version, a welcome
    of another session). ``resuming`` is the id of the session the hello
    resumes, None for a new one.
    """

    def __init__(
        self, hello: Callable[[bytes], HelloNew | HelloResume], resuming: bytes | None = None
    ) -> None:
        super().__init__()
        self._hello = hello
        self._resuming = resuming
        self._preface_checked = False
        self.nonce: bytes | None = None
        self._out.append(make_preface())

    def receive_data(self, data: bytes | bytearray | memoryview) -> Welcome | Reject | None:
        """Take bytes from the server; its answer once complete, else None."""
        buf = self._buf
        buf += data
        if not self._preface_checked:
            if len(buf) < PREFACE_SIZE:
                return None
            version = check_preface(bytes(buf[:PREFACE_SIZE]), "server")
            if version != VERSION:
                raise ProtocolError(
                    f"the server speaks session protocol version {version}; "
                    f"this client speaks {VERSION}"
                )
            self._preface_checked = True
        if self.nonce is None:
            if len(buf) < PREFACE_SIZE + NONCE_SIZE:
                return None
            self.nonce = bytes(buf[PREFACE_SIZE : PREFACE_SIZE + NONCE_SIZE])
            self._out.append(_framed(self._hello(self.nonce).encode()))
        found = self._message(PREFACE_SIZE + NONCE_SIZE, "server")
        if found is None:
            return None
        reply, end = found
        self.rest = bytes(buf[end:])
        self._buf = bytearray()
        if isinstance(reply, Reject):
            return reply
        if not isinstance(reply, Welcome):
            raise ProtocolError(f"expected WELCOME or REJECT, got {type(reply).__name__}")
        if self._resuming is None:
            if reply.present:  # (decode_message checked the sizes)
                raise ProtocolError("malformed WELCOME for a new session")
        elif not reply.present or reply.session_id != self._resuming:
            raise ProtocolError("the server answered a resume with another session")
        return reply

    def receive_eof(self) -> ProtocolError | ConnectionLost:
        """The error for a server that closed the connection during the handshake."""
        if not self._preface_checked:
            try:
                check_partial_preface(bytes(self._buf), "server")
            except ProtocolError as exc:
                return exc
        return ConnectionLost(
            f"the server closed the connection during the handshake: {_HANDSHAKE_HINT}"
        )

    @staticmethod
    def connection_lost(error: BaseException) -> ConnectionLost:
        """The error for a connection that broke during the handshake (``error``: how)."""
        return ConnectionLost(f"connection lost during the handshake: {error!r}; {_HANDSHAKE_HINT}")


_HTTP_BODY = b"This port speaks the streamkit session protocol, not HTTP.\n"
_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_HTTP_BODY), _HTTP_BODY)
)
#: The most of an HTTP request head read before answering it anyway.
_HTTP_HEAD_LIMIT = 16 * 1024


class ServerHandshake(_Handshake):
    """The server's side of a connection's handshake (docs/protocol.md 2.2-2.4), sans-IO.

    ``receive_data`` takes what the client sent: once its preface is in,
    the server's preface with ``nonce`` is queued; it returns the client's
    hello once complete (the bytes after it are in :attr:`rest`), or a
    :class:`Reject` it queued itself (``UNSUPPORTED_VERSION``). The caller
    answers a hello with :meth:`accept` or :meth:`reject`. Bad input raises
    :class:`ProtocolError`; an HTTP client is answered in HTTP first, once
    its request head is in (or at :meth:`receive_eof`): :attr:`http` says
    that one is being read.

    ``nonce`` is an input: the one the client's resume proof is bound to.
    """

    def __init__(self, nonce: bytes) -> None:
        super().__init__()
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        self.nonce = nonce
        self._prefaced = False
        self._http_error: ProtocolError | None = None

    @property
    def http(self) -> bool:
        """Whether the peer is an HTTP client whose request head is being read."""
        return self._http_error is not None

    def receive_data(
        self, data: bytes | bytearray | memoryview
    ) -> HelloNew | HelloResume | Reject | None:
        """Take bytes from the client; its hello once complete, else None."""
        buf = self._buf
        buf += data
        if self._http_error is not None:
            if b"\r\n\r\n" in buf or len(buf) >= _HTTP_HEAD_LIMIT:
                self._answer_http()
            return None
        if not self._prefaced:
            if len(buf) < PREFACE_SIZE:
                return None
            preface = bytes(buf[:PREFACE_SIZE])
            try:
                version = check_preface(preface, "client")
            except ProtocolError as exc:
                if not looks_like_http(preface):
                    raise
                # Answered once the request head is read: closing with it
                # unread would reset the connection, and the answer be lost.
                self._http_error = exc
                return self.receive_data(b"")
            self._prefaced = True
            self._out.append(make_preface(self.nonce))
            if version != VERSION:
                return self.reject(
                    RejectReason.UNSUPPORTED_VERSION,
                    f"client speaks session protocol version {version}; "
                    f"this server speaks {VERSION}",
                )
        found = self._message(PREFACE_SIZE, "client")
        if found is None:
            return None
        hello, end = found
        self.rest = bytes(buf[end:])
        self._buf = bytearray()
        if isinstance(hello, HelloNew | HelloResume):
            return hello
        return self.reject(RejectReason.MALFORMED, f"expected a HELLO, got {type(hello).__name__}")

    def _answer_http(self) -> None:
        error = self._http_error
        assert error is not None
        self._out.append(_HTTP_REPLY)
        self._buf = bytearray()
        raise error

    def receive_eof(self) -> ProtocolError | ConnectionLost:
        """The error for a client that closed the connection (or went silent) during the
        handshake; an HTTP client's answer is queued first."""
        if self._http_error is not None:
            try:
                self._answer_http()
            except ProtocolError as exc:
                return exc
        if not self._prefaced:
            try:
                check_partial_preface(bytes(self._buf), "client")
            except ProtocolError as exc:
                return exc
        return ConnectionLost("the client closed the connection during the handshake")

    def accept(self, welcome: Welcome) -> None:
        """Queue the welcome that answers the hello."""
        self._out.append(_framed(welcome.encode()))

    def reject(self, reason: RejectReason, message: str) -> Reject:
        """Queue a ``REJECT`` (the caller then closes the connection); return it."""
        reject = Reject(reason, message)
        self._out.append(_framed(reject.encode()))
        return reject
