"""The session wire protocol, sans-IO: message layouts and per-direction state.

Nothing here performs I/O or imports asyncio. ``docs/protocol.md`` is the
specification; this module is its reference implementation.

A connection opens with a preface (``MAGIC`` and a version byte) from each
side, the server's followed by a 16-byte nonce; after that every message is
a frame of a 4-byte big-endian length followed by a body whose first byte is
the message type.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from streamkit._units import MiB
from streamkit.codecs import Buffer, Decoder
from streamkit.errors import FrameTooLarge, IncompleteFrame, ProtocolError

__all__ = [
    "DATA_HEADER",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_UNACKED_BYTES",
    "DEFAULT_MAX_UNACKED_FRAMES",
    "FRAMED_DATA_HEADER",
    "MAGIC",
    "MAX_FRAME_LIMIT",
    "MAX_HANDSHAKE_MESSAGE",
    "MAX_UNACKED_BYTES_LIMIT",
    "MAX_UNACKED_FRAMES_LIMIT",
    "NONCE_SIZE",
    "PREFACE_SIZE",
    "SESSION_ID_SIZE",
    "TOKEN_SIZE",
    "VERSION",
    "Ack",
    "Close",
    "CloseAck",
    "Data",
    "HelloNew",
    "HelloResume",
    "Message",
    "MessageDecoder",
    "MessageType",
    "Ping",
    "Pong",
    "ReceiveLimits",
    "Reject",
    "RejectReason",
    "Welcome",
    "check_partial_preface",
    "check_preface",
    "decode_message",
    "guess_protocol",
    "looks_like_http",
    "make_preface",
    "resume_proof",
]

MAGIC = b"SKSP"
#: Version 2 added each side's ``max_frame`` and receive window
#: (``max_unacked_frames``, ``max_unacked_bytes``) to the handshake.
VERSION = 2
PREFACE_SIZE = len(MAGIC) + 1
NONCE_SIZE = 16
SESSION_ID_SIZE = 16
TOKEN_SIZE = 32
_PROOF_SIZE = 32

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
#: What every hello and welcome announces: max_frame, max_unacked_frames, max_unacked_bytes.
_LIMITS = struct.Struct(">IIQ")
#: The largest ``max_frame`` a side can announce: a DATA body (9 bytes more)
#: must fit the ``u32`` length of its frame.
MAX_FRAME_LIMIT = 2**32 - 1 - 9
#: ``max_frame`` of the handshake messages when none is given.
DEFAULT_MAX_FRAME = 4 * MiB
#: The largest handshake message body (HELLO, WELCOME, REJECT) on the wire. A
#: hello is 73 bytes at most: a server closes a connection whose first
#: message's length header announces more, before reading any of its body,
#: so a connection costs little memory until its handshake completes.
MAX_HANDSHAKE_MESSAGE = 1024
#: The largest receive window a side can announce (``u32`` frames, ``u64`` bytes).
MAX_UNACKED_FRAMES_LIMIT = 2**32 - 1
MAX_UNACKED_BYTES_LIMIT = 2**64 - 1
#: The receive window of the handshake messages when none is given.
DEFAULT_MAX_UNACKED_FRAMES = 16384
DEFAULT_MAX_UNACKED_BYTES = 8 * MiB
#: The first bytes of a DATA body: type, then the offset (the payload follows).
DATA_HEADER = struct.Struct(">BQ")
#: A DATA message's frame header on the wire: the ``LengthPrefixed(4)``
#: length (9 + payload size), the type byte and the offset. The sender's hot
#: path packs all three in one call.
FRAMED_DATA_HEADER = struct.Struct(">IBQ")
_ACK = struct.Struct(">BQQ")
_LENGTH = struct.Struct(">I")
_DATA_BYTE = 0x10
#: Wire bytes of a DATA message before its payload: length, type, offset.
_DATA_PREFIX = FRAMED_DATA_HEADER.size
#: Stands in for the view of a bytes buffer, which needs none.
_NO_VIEW = memoryview(b"")


class MessageType(IntEnum):
    """The first byte of every message body."""

    HELLO_NEW = 0x01
    HELLO_RESUME = 0x02
    WELCOME = 0x03
    REJECT = 0x04
    DATA = 0x10
    ACK = 0x11
    PING = 0x12
    PONG = 0x13
    CLOSE = 0x14
    CLOSE_ACK = 0x15


class RejectReason(IntEnum):
    """Why a server refused a handshake (the byte after ``REJECT``)."""

    UNSUPPORTED_VERSION = 1
    MALFORMED = 2
    UNKNOWN_SESSION = 3
    BAD_TOKEN = 4
    EXPIRED = 5
    FINISHED = 6
    BAD_OFFSET = 7
    BUSY = 8


@dataclass(frozen=True, slots=True)
class ReceiveLimits:
    """What a side announces in every hello and welcome, about what it receives.

    ``max_frame`` is the largest payload it takes; ``max_unacked_frames`` /
    ``max_unacked_bytes`` its receive window (docs/protocol.md 2.3, 2.6).
    """

    max_frame: int = DEFAULT_MAX_FRAME
    max_unacked_frames: int = DEFAULT_MAX_UNACKED_FRAMES
    max_unacked_bytes: int = DEFAULT_MAX_UNACKED_BYTES

    def encode(self) -> bytes:
        """The 16 bytes of the three limits on the wire."""
        return _LIMITS.pack(self.max_frame, self.max_unacked_frames, self.max_unacked_bytes)

    @classmethod
    def decode(cls, body: bytes, at: int, what: str) -> ReceiveLimits:
        """The limits at ``body[at:]`` of a ``what`` message; :class:`ProtocolError` if invalid."""
        max_frame, max_unacked_frames, max_unacked_bytes = _LIMITS.unpack_from(body, at)
        if not 1 <= max_frame <= MAX_FRAME_LIMIT:
            raise ProtocolError(f"malformed {what} message: max_frame={max_frame}")
        if not max_unacked_frames or not max_unacked_bytes:
            raise ProtocolError(
                f"malformed {what} message: max_unacked_frames={max_unacked_frames}, "
                f"max_unacked_bytes={max_unacked_bytes} (a window must be at least 1)"
            )
        return cls(max_frame, max_unacked_frames, max_unacked_bytes)


@dataclass(frozen=True, slots=True)
class HelloNew:
    """Client: open a new session, announcing its :class:`ReceiveLimits`."""

    limits: ReceiveLimits = ReceiveLimits()

    def encode(self) -> bytes:
        return bytes([MessageType.HELLO_NEW]) + self.limits.encode()


@dataclass(frozen=True, slots=True)
class HelloResume:
    """Client: resume ``session_id``; ``received`` is the next offset it expects.

    ``proof`` is :func:`resume_proof` for this connection's nonce;
    ``limits`` what the client receives.
    """

    session_id: bytes
    proof: bytes
    received: int
    limits: ReceiveLimits = ReceiveLimits()

    def encode(self) -> bytes:
        return (
            bytes([MessageType.HELLO_RESUME])
            + self.session_id
            + self.proof
            + _U64.pack(self.received)
            + self.limits.encode()
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server: the handshake succeeded.

    ``present`` tells whether an existing session was found (a resume);
    ``received`` is the next offset the server expects; ``token`` is set for
    a new session only; ``limits`` what the server receives.
    """

    present: bool
    session_id: bytes
    received: int
    token: bytes = b""
    limits: ReceiveLimits = ReceiveLimits()

    def encode(self) -> bytes:
        return (
            bytes([MessageType.WELCOME, int(self.present)])
            + self.session_id
            + _U64.pack(self.received)
            + self.limits.encode()
            + self.token
        )


@dataclass(frozen=True, slots=True)
class Reject:
    """Server: the handshake failed, with a reason code and a message."""

    reason: RejectReason
    message: str

    def encode(self) -> bytes:
        return bytes([MessageType.REJECT, self.reason]) + self.message.encode()


@dataclass(frozen=True, slots=True)
class Data:
    """A data frame: its offset in its direction and its payload."""

    offset: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative acknowledgement: frames received and frames consumed by the application."""

    received: int
    consumed: int

    def encode(self) -> bytes:
        return _ACK.pack(MessageType.ACK, self.received, self.consumed)


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive probe; the peer answers :class:`Pong`."""

    def encode(self) -> bytes:
        return bytes([MessageType.PING])


@dataclass(frozen=True, slots=True)
class Pong:
    """Keepalive answer."""

    def encode(self) -> bytes:
        return bytes([MessageType.PONG])


@dataclass(frozen=True, slots=True)
class Close:
    """The sender closes the session; ``final`` is its next send offset (all acknowledged)."""

    final: int

    def encode(self) -> bytes:
        return bytes([MessageType.CLOSE]) + _U64.pack(self.final)


@dataclass(frozen=True, slots=True)
class CloseAck:
    """The peer acknowledges a :class:`Close`; the session is over."""

    def encode(self) -> bytes:
        return bytes([MessageType.CLOSE_ACK])


Message = HelloNew | HelloResume | Welcome | Reject | Data | Ack | Ping | Pong | Close | CloseAck


def make_preface(nonce: bytes = b"") -> bytes:
    """The bytes that open a connection: magic, version and (server) nonce."""
    return MAGIC + bytes([VERSION]) + nonce


def looks_like_http(preface: bytes) -> bool:
    """Whether a peer's first bytes look like an HTTP request or response."""
    return preface[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"HTTP", b"OPTI", b"DELE", b"PATC")


def check_preface(preface: bytes, peer: str) -> int:
    """Check a peer's preface; return its version byte.

    Raises :class:`ProtocolError` naming what the peer seems to speak
    instead (TLS, HTTP, something else) when the magic does not match.
    """
    if preface[: len(MAGIC)] == MAGIC and len(preface) == PREFACE_SIZE:
        return preface[len(MAGIC)]
    guess = guess_protocol(preface) or "an unknown protocol"
    raise ProtocolError(
        f"the {peer} is not speaking the streamkit session protocol: got {preface!r}, "
        f"which looks like {guess}; expected {MAGIC!r} and a version byte"
    )


def guess_protocol(data: bytes) -> str | None:
    """What a peer whose first bytes are ``data`` seems to speak, for error messages.

    ``"a TLS alert (is TLS enabled on one side only?)"``, ``"HTTP"``, ...,
    or ``None`` when they look like nothing known. Used wherever a peer turns out to speak
    something else (the session handshake, ``python -m streamkit send``), so
    the diagnosis reads the same everywhere.
    """
    if data[:1] == b"\x16" and data[1:2] == b"\x03":
        return "a TLS handshake (is TLS enabled on one side only?)"
    if data[:1] == b"\x15" and data[1:2] == b"\x03":
        return "a TLS alert (is TLS enabled on one side only?)"
    if data[: len(MAGIC)] == MAGIC:
        return (
            "the streamkit session protocol (a session server or a hub: connect with "
            "connect_resumable or hub.connect)"
        )
    if looks_like_http(data):
        return "HTTP"
    if data[:2] == b"\0\0":
        # A big-endian length under 64 KiB, as streamkit's default framing
        # (LengthPrefixed, 4 bytes) starts a small frame.
        return (
            "a length-prefixed frame (a plain streamkit stream, or another framing, "
            "rather than a session?)"
        )
    return None


def check_partial_preface(partial: bytes, peer: str) -> None:
    """Check the first bytes of a preface cut short by the peer's close.

    Raises :class:`ProtocolError`, as :func:`check_preface`, if they
    cannot begin a preface; bytes that can are a connection lost early,
    for the caller to report.
    """
    if not MAGIC.startswith(partial[: len(MAGIC)]):
        check_preface(partial, peer)


def resume_proof(token: bytes, nonce: bytes, session_id: bytes, received: int) -> bytes:
    """HMAC-SHA256 proof that a resuming client holds the session's token.

    Bound to the server's fresh ``nonce``, so a recorded handshake cannot be
    replayed, and the token itself never crosses the wire again.
    """
    message = b"streamkit-resume" + nonce + session_id + _U64.pack(received)
    return hmac.new(token, message, hashlib.sha256).digest()


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise ProtocolError(f"malformed {what} message: {len(body)} bytes, expected {size}")


def decode_message(body: bytes) -> Message:
    """Parse one message body; raises :class:`ProtocolError` for anything malformed."""
    if not body:
        raise ProtocolError("empty session message")
    kind = body[0]
    if kind == MessageType.DATA:
        if len(body) < DATA_HEADER.size:
            raise ProtocolError(
                f"malformed DATA message: {len(body)} bytes, expected at least {DATA_HEADER.size}"
            )
        return Data(_U64.unpack_from(body, 1)[0], body[DATA_HEADER.size :])
    if kind == MessageType.ACK:
        _need(body, _ACK.size, "ACK")
        _, received, consumed = _ACK.unpack(body)
        return Ack(received, consumed)
    if kind == MessageType.PING:
        _need(body, 1, "PING")
        return Ping()
    if kind == MessageType.PONG:
        _need(body, 1, "PONG")
        return Pong()
    if kind == MessageType.CLOSE:
        _need(body, 9, "CLOSE")
        return Close(_U64.unpack_from(body, 1)[0])
    if kind == MessageType.CLOSE_ACK:
        _need(body, 1, "CLOSE_ACK")
        return CloseAck()
    if kind == MessageType.HELLO_NEW:
        _need(body, 1 + _LIMITS.size, "HELLO_NEW")
        return HelloNew(ReceiveLimits.decode(body, 1, "HELLO_NEW"))
    if kind == MessageType.HELLO_RESUME:
        _need(body, 1 + SESSION_ID_SIZE + _PROOF_SIZE + 8 + _LIMITS.size, "HELLO_RESUME")
        session_id = body[1 : 1 + SESSION_ID_SIZE]
        proof = body[1 + SESSION_ID_SIZE : 1 + SESSION_ID_SIZE + _PROOF_SIZE]
        received = _U64.unpack_from(body, 1 + SESSION_ID_SIZE + _PROOF_SIZE)[0]
        limits = ReceiveLimits.decode(body, len(body) - _LIMITS.size, "HELLO_RESUME")
        return HelloResume(session_id, proof, received, limits)
    if kind == MessageType.WELCOME:
        base = 2 + SESSION_ID_SIZE + 8 + _LIMITS.size
        if len(body) not in (base, base + TOKEN_SIZE) or body[1] not in (0, 1):
            raise ProtocolError(
                f"malformed WELCOME message: {len(body)} bytes (expected {base} or "
                f"{base + TOKEN_SIZE}) and session-present flag {body[1:2].hex() or 'missing'}"
            )
        session_id = body[2 : 2 + SESSION_ID_SIZE]
        return Welcome(
            bool(body[1]),
            session_id,
            _U64.unpack_from(body, 2 + SESSION_ID_SIZE)[0],
            body[base:],
            ReceiveLimits.decode(body, base - _LIMITS.size, "WELCOME"),
        )
    if kind == MessageType.REJECT:
        if len(body) < 2:
            raise ProtocolError(f"malformed REJECT message: {len(body)} bytes, expected at least 2")
        try:
            reason = RejectReason(body[1])
        except ValueError:
            reason = RejectReason.MALFORMED
        return Reject(reason, body[2:].decode("utf-8", "replace"))
    raise ProtocolError(f"unknown session message type 0x{kind:02x}")


class MessageDecoder(Decoder["bytes | Message"]):
    """Incremental decoder of a session connection's messages after the handshake.

    The receiver's hot path: a new ``DATA`` message (its offset is
    ``expected``) comes out as its payload, ``bytes``, copied once out of
    the buffer, and ``expected`` moves on. Anything else comes out as its
    :class:`Message`, a duplicate ``DATA`` (an offset below ``expected``) as
    :class:`Data`. ``messages`` counts those, so a caller that sees it
    unchanged after a feed knows it got payloads only; ``payload_bytes``
    counts the payload bytes returned.

    A ``DATA`` offset above ``expected`` (a gap), a body over ``max_body``
    bytes (:class:`FrameTooLarge`) or a malformed message raises
    :class:`ProtocolError` after the messages before it are returned (see
    :class:`~streamkit.codecs.Decoder`); such errors are fatal.

    With :meth:`missing`, :meth:`header_missing` and :meth:`complete`, a
    caller reading a large ``DATA`` message reads the 13 bytes before its
    payload, then the payload in one piece, which comes out as read.
    """

    __slots__ = ("_max_body", "_start_offset", "expected", "messages", "payload_bytes")

    def __init__(self, expected: int, max_body: int) -> None:
        super().__init__()
        self._max_body = max_body
        self.expected = expected
        self._start_offset = expected  # ``expected`` when the first buffered byte was fed
        self.messages = 0
        self.payload_bytes = 0

    @property
    def in_place(self) -> bool:
        return True

    def feed(self, data: Buffer) -> list[bytes | Message]:
        """Buffer ``data`` and return the messages it completes, in order.

        A ``bytearray`` or ``memoryview`` (a reused receive buffer) is parsed
        where it is: a message pending from the last feed is completed from
        its start (joined to just its missing bytes), and only the partial
        message at its end is kept, copied. Payloads are copied once either way.
        """
        if type(data) is bytes or self._error is not None or not data:
            return super().feed(data)
        with memoryview(data) as view:
            start = 0
            frames: list[bytes | Message] = []
            have = len(self._buf) - self._pos
            if have:
                start = 4 + self._size() - have if have >= 4 else 0
                if not 0 < start <= len(view):
                    return super().feed(view)  # a split length, or a message still incomplete
                if self.missing() == start:  # its header is in: joined to its rest, once
                    frames = [self.complete(view[:start])]
                else:
                    frames = super().feed(view[:start].tobytes())
                if self._error is not None:
                    return frames  # raised next (fatal: nothing after it is served)
            # Parsed where it is; the buffer is never left pointing into it.
            self._buf, self._pos, self._need = view, start, 0  # type: ignore[assignment]
            try:
                self._parse(frames)
            except ProtocolError as exc:
                self._error, self._fatal = exc, True  # every error here is fatal
                if not frames:
                    raise
                self._failed_at = 0  # deferred: the bytes from the bad message on are kept
            finally:
                if self._error is not None and not frames:
                    self._free()
                else:
                    self._buf, self._pos = view[self._pos :].tobytes(), 0
        if not self._need and self._error is None:
            self._need = len(self._buf) + 1
        return frames

    def _parse(self, frames: list[bytes | Message]) -> None:
        buf = self._buf
        pos = self._pos
        end = len(buf)
        start, expected = pos, self.expected
        self._start_offset = expected
        other_bytes = 0  # wire bytes of everything but new DATA
        max_body = self._max_body
        append = frames.append
        unpack_data = FRAMED_DATA_HEADER.unpack_from
        # Locals, not globals, in the loop that runs once per frame.
        data_byte, data_prefix, min_data = _DATA_BYTE, _DATA_PREFIX, DATA_HEADER.size
        # Payloads are sliced out of a bytes buffer (the fed chunk itself)
        # directly, else out of a view: one copy either way.
        whole = buf if type(buf) is bytes else None
        view = memoryview(buf) if whole is None else _NO_VIEW
        try:
            while True:
                if end - pos >= data_prefix:
                    size, kind, offset = unpack_data(buf, pos)
                elif end - pos >= 4:
                    # Too short for a DATA message: a control message (or junk).
                    size, kind, offset = _LENGTH.unpack_from(buf, pos)[0], -1, -1
                else:
                    break
                if size > max_body:
                    raise FrameTooLarge.exceeds(size, max_body)
                stop = pos + 4 + size
                if stop > end:
                    break
                if kind == data_byte and offset == expected and size >= min_data:
                    if whole is not None:
                        append(whole[pos + data_prefix : stop])
                    else:
                        append(view[pos + data_prefix : stop].tobytes())
                    expected += 1
                else:
                    append(self._message(bytes(buf[pos + 4 : stop]), expected))
                    self.messages += 1
                    other_bytes += stop - pos
                pos = stop
        finally:
            if whole is None:
                view.release()
            self._pos = pos
            self.payload_bytes += (
                pos - start - other_bytes - data_prefix * (expected - self.expected)
            )
            self.expected = expected

    @staticmethod
    def _message(body: bytes, expected: int) -> Message:
        message = decode_message(body)
        if isinstance(message, Data) and message.offset > expected:
            raise ProtocolError(
                f"data frame at offset {message.offset} but offset {expected} was expected"
            )
        return message

    def _size(self) -> int:
        """Body size of the message at the read position (4 length bytes buffered)."""
        size: int = _LENGTH.unpack_from(self._buf, self._pos)[0]
        return size

    def missing(self) -> int:
        have = len(self._buf) - self._pos
        if self._error is not None or have < 4:
            return 0
        size = self._size()
        if size > self._max_body or (have < _DATA_PREFIX and size >= DATA_HEADER.size):
            return 0  # feed raises the error; or the DATA header is not buffered yet
        return max(0, 4 + size - have)

    def header_missing(self) -> int:
        have = len(self._buf) - self._pos
        if self._error is not None:
            return 0
        if have < 4:
            # Up to a DATA header: after a shorter message, the next one's
            # first bytes come with it, parsed as any read.
            return _DATA_PREFIX - have
        if self._size() >= DATA_HEADER.size:
            # At least 13 bytes on the wire whatever the type: safe to wait for.
            return max(0, _DATA_PREFIX - have)
        return 0

    def complete(self, data: Buffer | list[Buffer]) -> bytes | Message:
        parts = data if isinstance(data, list) else [data]
        missing = self.missing()
        if not missing or sum(map(len, parts)) != missing:
            raise ValueError(f"complete() needs exactly the {missing} missing bytes")
        buf, start = self._buf, self._pos
        size = self._size()
        try:
            if len(buf) - start >= _DATA_PREFIX and buf[start + 4] == _DATA_BYTE:
                offset: int = _U64.unpack_from(buf, start + 5)[0]
                if offset == self.expected:
                    if len(buf) - start == _DATA_PREFIX and len(parts) == 1 and type(data) is bytes:
                        payload = data  # as read: no copy
                    else:
                        with memoryview(buf) as pending:
                            payload = b"".join((pending[start + _DATA_PREFIX :], *parts))
                    self._free()
                    self.expected += 1
                    self.payload_bytes += size - DATA_HEADER.size
                    return payload
            with memoryview(buf) as pending:
                body = b"".join((pending[start + 4 :], *parts))
            self._free()
            self.messages += 1
            return self._message(body, self.expected)
        except ProtocolError as exc:
            self._error = exc
            self._fatal = True
            self._free()
            raise

    def _incomplete(self) -> IncompleteFrame:
        have = self.buffered
        if have < 4:
            return IncompleteFrame.short("length header", have, 4, "message")
        return IncompleteFrame.short("body", have - 4, self._size(), "message")

    def _fresh(self) -> MessageDecoder:
        return MessageDecoder(self._start_offset, self._max_body)
