"""Length-prefixed framing: a fixed-size length header, or a varint length."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from streamkit._units import MiB
from streamkit.codecs._base import Buffer, Decoder, EncodeMany, check_max_frame
from streamkit.codecs.varint import MAX_VARINT_BYTES, decode_varint, encode_varint
from streamkit.errors import EndOfStream, FrameTooLarge, IncompleteFrame, ProtocolError

if TYPE_CHECKING:
    from asyncio import StreamReader

__all__ = ["LengthPrefixed", "VarintPrefixed"]

_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
#: Stands in for the view of a bytes buffer, which needs none (never released).
_NO_VIEW = memoryview(b"")


async def _read_exactly(reader: StreamReader, n: int, what: str, at_boundary: bool) -> bytes:
    """``reader.readexactly(n)`` with streamkit errors.

    At a frame boundary (``at_boundary``), an end of stream before any byte
    raises :class:`EndOfStream`; otherwise it raises :class:`IncompleteFrame`.
    """
    import asyncio  # only callers that hold a StreamReader get here

    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        partial = len(exc.partial)
        if at_boundary and partial == 0:
            raise EndOfStream("end of stream") from None
        raise IncompleteFrame.short(what, partial, n) from exc


def _inside_varint(have: int) -> IncompleteFrame:
    """The end of stream after ``have`` bytes of a varint: how many are missing is unknown."""
    return IncompleteFrame(
        f"stream ended inside a varint length ({have} of up to {MAX_VARINT_BYTES} bytes)"
    )


@dataclass(frozen=True, slots=True)
class LengthPrefixed(EncodeMany[Buffer]):
    """Frames as an unsigned length header followed by the payload.

    ``header`` is 1, 2, 3, 4 or 8 bytes, ``byteorder`` ``"big"`` (network
    order) or ``"little"``. With the defaults this is byte for byte the format
    of Twisted's Int32StringReceiver, Netty's LengthFieldPrepender(4),
    Erlang's ``{packet, 4}`` and node's frame-stream.

    For wire formats in Netty's length-field model:

    - ``adjustment`` is added to the length value to get the payload size
      (``-header`` when the length counts the header itself);
    - ``offset`` leading bytes sit before the length field; they are kept
      with the frame: a decoded frame is those bytes followed by the payload,
      and ``encode`` takes its first ``offset`` bytes as them.

    ``max_frame`` (default 16 MiB) bounds the payload; a larger length is
    rejected with :class:`FrameTooLarge` as soon as the header is read,
    before any payload is buffered.
    """

    header: int = 4
    byteorder: Literal["big", "little"] = "big"
    max_frame: int = 16 * MiB
    adjustment: int = 0
    offset: int = 0
    _pack: Callable[[int], bytes] = field(init=False, repr=False, compare=False)
    _unpack_from: Callable[[Buffer, int], tuple[int]] = field(init=False, repr=False, compare=False)
    _max_value: int = field(init=False, repr=False, compare=False)
    # Frames up to this size encode without checks; -1 turns the fast path off.
    _fast_limit: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.header not in (1, 2, 3, 4, 8):
            raise ValueError(f"header must be 1, 2, 3, 4 or 8 bytes, not {self.header!r}")
        if self.byteorder not in ("big", "little"):
            raise ValueError(f"byteorder must be 'big' or 'little', not {self.byteorder!r}")
        check_max_frame(self.max_frame)
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, not {self.offset}")
        order = ">" if self.byteorder == "big" else "<"
        if self.header == 3:
            byteorder = self.byteorder

            def pack(value: int) -> bytes:
                return value.to_bytes(3, byteorder)

            def unpack_from(data: Buffer, pos: int) -> tuple[int]:
                return (int.from_bytes(data[pos : pos + 3], byteorder),)

            setter: tuple[Any, Any] = (pack, unpack_from)
        else:
            fmt = struct.Struct(order + _STRUCT_CODES[self.header])
            setter = (fmt.pack, fmt.unpack_from)
        object.__setattr__(self, "_pack", setter[0])
        object.__setattr__(self, "_unpack_from", setter[1])
        object.__setattr__(self, "_max_value", (1 << (8 * self.header)) - 1)
        fast = -1 if self.offset or self.adjustment > 0 else self._max_value + self.adjustment
        object.__setattr__(self, "_fast_limit", min(self.max_frame, fast))

    def _header_for(self, size: int) -> bytes:
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        value = size - self.adjustment
        if not 0 <= value <= self._max_value:
            raise FrameTooLarge(
                f"frame of {size} bytes does not fit a {self.header}-byte length header "
                f"(length value {value}, adjustment={self.adjustment})"
            )
        return self._pack(value)

    def encode(self, frame: Buffer) -> bytes:
        """Return the wire bytes of ``frame``; raises :class:`FrameTooLarge` over the limit."""
        off = self.offset
        if off:
            self._check_prefix(frame)
            return bytes(frame[:off]) + self._header_for(len(frame) - off) + bytes(frame[off:])
        return self._header_for(len(frame)) + frame

    def encode_into(self, out: bytearray, frame: Buffer) -> None:
        """Append the wire bytes of ``frame`` to ``out``."""
        size = len(frame)
        if size <= self._fast_limit:  # the hot path: no offset, fits, in range
            out += self._pack(size - self.adjustment)
            out += frame
            return
        off = self.offset
        if off:
            self._check_prefix(frame)
            header = self._header_for(len(frame) - off)  # may raise: leave out as it was
            out += frame[:off]
            out += header
            out += frame[off:]
        else:
            out += self._header_for(len(frame))
            out += frame

    def encode_parts(self, frame: Buffer) -> tuple[Buffer, ...]:
        """Return the wire bytes of ``frame`` as pieces to write in order, the payload uncopied.

        A ``bytes`` frame is used as it is; a mutable one is copied first, so
        the pieces never change. Raises like :meth:`encode`.
        """
        payload = frame if type(frame) is bytes else bytes(frame)
        off = self.offset
        if off:
            self._check_prefix(payload)
            header = self._header_for(len(payload) - off)
            return payload[:off], header, memoryview(payload)[off:]
        return self._header_for(len(payload)), payload

    def _check_prefix(self, frame: Buffer) -> None:
        if len(frame) < self.offset:
            raise ValueError(
                f"frame of {len(frame)} bytes is shorter than offset={self.offset} leading bytes"
            )

    def decoder(self) -> LengthPrefixedDecoder:
        """Return a fresh incremental decoder."""
        return LengthPrefixedDecoder(self)

    def _payload_size(self, value: int) -> int:
        size = value + self.adjustment
        if size > self.max_frame:
            error = FrameTooLarge.exceeds(size, self.max_frame)
            raw = value.to_bytes(self.header, self.byteorder)
            if self.header > 1 and all(32 <= byte < 127 for byte in raw):
                # "GET ", "SSH-", a session's "SKSP": say what it likely is.
                error = FrameTooLarge(
                    f"{error}; its length header {raw!r} looks like text: "
                    "is the peer speaking another protocol?"
                )
            raise error
        if size < 0:
            raise ProtocolError(
                f"length value {value} with adjustment={self.adjustment} gives a negative size"
            )
        return size

    async def read_frame(self, reader: StreamReader) -> bytes:
        """Read one frame with ``readexactly``.

        Raises :class:`EndOfStream` at a clean end of stream (between frames),
        :class:`IncompleteFrame` when the stream ends inside a frame and
        :class:`FrameTooLarge` right after a header over ``max_frame``.
        """
        prefix_size = self.offset + self.header
        prefix = await _read_exactly(reader, prefix_size, "length header", at_boundary=True)
        size = self._payload_size(self._unpack_from(prefix, self.offset)[0])
        payload = await _read_exactly(reader, size, "payload", at_boundary=False) if size else b""
        if self.offset:
            return prefix[: self.offset] + payload
        return payload


class LengthPrefixedDecoder(Decoder[bytes]):
    """Incremental decoder of :class:`LengthPrefixed` frames.

    With the plain layout (no ``offset``, no ``adjustment``) its fast path
    copies each byte once: a frame pending from the last feed is completed
    by joining it to the start of the new input, and frames are cut
    straight out of the input, a ``bytearray`` or ``memoryview`` included,
    of which only the partial frame at its end is kept (copied). Such a
    frame's wire bytes are its length and itself, so ``take_buffered``
    rebuilds them exactly rather than keeping the input.
    """

    __slots__ = ("_codec", "_layout", "_plain", "_returned")

    def __init__(self, codec: LengthPrefixed) -> None:
        super().__init__()
        self._codec = codec
        # What _parse needs of the codec, in one attribute load.
        self._layout = (
            codec.offset,
            codec.offset + codec.header,
            codec._unpack_from,
            codec.adjustment,
            codec.max_frame,
        )
        # No leading bytes, no adjustment: feed's fast path applies.
        self._plain = not codec.offset and not codec.adjustment
        # The frames the fast path returned last (their bytes are not kept).
        self._returned: tuple[bytes, ...] | None = None

    def feed(self, data: Buffer) -> list[bytes]:
        """Buffer ``data`` and return the frames it completes, in order."""
        # (A frame still incomplete after data is left to the general path.)
        if (
            self._plain
            and self._error is None
            and data
            and len(self._buf) - self._pos + len(data) >= self._need
        ):
            frames = self._feed_plain(data)
            if frames is not None:
                return frames
        self._returned = None
        return super().feed(data)

    def _feed_plain(self, data: Buffer) -> list[bytes] | None:
        """The fast path; ``None`` leaves the input to the general one (nothing taken).

        It ends as the general path would; a bad header is left to that (see
        _parse), and so are a split header and a frame still incomplete.
        """
        _, prefix, unpack_from, _, max_frame = self._layout
        frames: list[bytes] = []
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        end = len(data)
        start = 0
        if have:
            if have < prefix:
                return None
            need = prefix + unpack_from(buf, pos)[0] - have  # checked when it was buffered
            if need > end:
                return None
            with memoryview(buf) as pending, memoryview(data) as came:
                frames.append(b"".join((pending[pos + prefix :], came[:need])))
            start = need
        whole = data if type(data) is bytes else None
        view = _NO_VIEW if whole is not None else memoryview(data)
        pos = start
        need = 0
        error = False
        try:
            while end - pos >= prefix:
                size = unpack_from(data, pos)[0]
                if size > max_frame:
                    error = True
                    break
                stop = pos + prefix + size
                if stop > end:
                    need = stop - pos
                    break
                frames.append(
                    whole[pos + prefix : stop]
                    if whole is not None
                    else view[pos + prefix : stop].tobytes()
                )
                pos = stop
            if error and not frames:
                return None  # the general path raises the precise error
            # Keep the rest: the input itself if it is bytes, else a copy.
            if whole is not None:
                self._buf, self._pos = whole, pos
            else:
                self._buf, self._pos = view[pos:].tobytes(), 0
        finally:
            if whole is None:
                view.release()
        # 0: the error is raised by the next feed (general path).
        self._need = 0 if error else need or end - pos + 1
        self._returned = tuple(frames)
        return frames

    @property
    def in_place(self) -> bool:
        return self._plain

    def take_buffered(self, frames: int = 0) -> bytes:
        returned = self._returned
        if returned is None or self._error is not None:
            return super().take_buffered(frames)
        if frames < 0:
            raise ValueError(f"frames must be >= 0, not {frames}")
        if frames > len(returned):
            raise ValueError("cannot give back more frames than the last feed returned")
        pack = self._codec._pack
        parts: list[Buffer] = []
        for frame in returned[len(returned) - frames :]:
            parts += (pack(len(frame)), frame)
        parts.append(self._buf[self._pos :])
        rest = b"".join(parts)
        self._free()
        self._reset_partial()
        return rest

    def _free(self) -> None:
        super()._free()
        self._returned = None

    def _parse(self, frames: list[bytes]) -> None:
        offset, prefix, unpack_from, adjustment, max_frame = self._layout
        buf = self._buf
        pos = self._pos
        end = len(buf)
        append = frames.append
        # Frames are sliced out of a bytes buffer directly, else out of a view.
        whole = buf if type(buf) is bytes else None
        view = _NO_VIEW if whole is not None else memoryview(buf)
        try:
            while end - pos >= prefix:
                size = unpack_from(buf, pos + offset)[0] + adjustment
                if size > max_frame or size < 0:
                    self._pos = pos
                    self._codec._payload_size(size - adjustment)  # raises the precise error
                stop = pos + prefix + size
                if stop > end:
                    self._need = stop - pos
                    break
                if whole is not None:
                    frame = whole[pos + prefix : stop]
                    append(whole[pos : pos + offset] + frame if offset else frame)
                elif offset:
                    append(view[pos : pos + offset].tobytes() + view[pos + prefix : stop].tobytes())
                else:
                    append(view[pos + prefix : stop].tobytes())
                pos = stop
        finally:
            if whole is None:
                view.release()
        self._pos = pos

    def missing(self) -> int:
        offset, prefix, unpack_from, adjustment, max_frame = self._layout
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if have < prefix or self._error is not None:
            return 0
        size = unpack_from(buf, pos + offset)[0] + adjustment
        if size > max_frame or size < 0:
            return 0  # feed raises the error
        rest: int = prefix + size - have
        return rest if rest > 0 else 0

    def header_missing(self) -> int:
        if self._error is not None:
            return 0
        rest: int = self._layout[1] - (len(self._buf) - self._pos)
        return rest if rest > 0 else 0

    def complete(self, data: Buffer | list[Buffer]) -> bytes:
        parts = data if isinstance(data, list) else [data]
        missing = self.missing()
        if not missing or sum(map(len, parts)) != missing:
            raise ValueError(f"complete() needs exactly the {missing} missing bytes")
        offset, prefix = self._layout[0], self._layout[1]
        buf, start = self._buf, self._pos
        if not offset and len(buf) - start == prefix and type(data) is bytes:
            self._free()
            return data  # the payload as read: no copy
        with memoryview(buf) as pending:
            frame = b"".join((pending[start : start + offset], pending[start + prefix :], *parts))
        self._free()
        return frame

    def _fresh(self) -> LengthPrefixedDecoder:
        return LengthPrefixedDecoder(self._codec)

    def _incomplete(self) -> IncompleteFrame:
        codec = self._codec
        have = self.buffered
        prefix = codec.offset + codec.header
        if have < prefix:
            return IncompleteFrame.short("length header", have, prefix)
        size = codec._unpack_from(self._buf, self._pos + codec.offset)[0] + codec.adjustment
        return IncompleteFrame.short("payload", have - prefix, size)


@dataclass(frozen=True, slots=True)
class VarintPrefixed(EncodeMany[Buffer]):
    """Frames as an unsigned LEB128 varint length followed by the payload.

    This is protobuf's delimited format (``writeDelimitedTo`` /
    ``parseDelimitedFrom``) and it-length-prefixed's. ``max_frame`` (default
    16 MiB) is checked as soon as the varint is complete; a varint longer than
    10 bytes is a :class:`ProtocolError`.
    """

    max_frame: int = 16 * MiB

    def __post_init__(self) -> None:
        check_max_frame(self.max_frame)

    def encode(self, frame: Buffer) -> bytes:
        """Return the wire bytes of ``frame``; raises :class:`FrameTooLarge` over the limit."""
        size = len(frame)
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        return encode_varint(size) + frame

    def encode_into(self, out: bytearray, frame: Buffer) -> None:
        """Append the wire bytes of ``frame`` to ``out``."""
        size = len(frame)
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        out += encode_varint(size)
        out += frame

    def encode_parts(self, frame: Buffer) -> tuple[Buffer, ...]:
        """Return the varint header and the payload (see :meth:`LengthPrefixed.encode_parts`)."""
        payload = frame if type(frame) is bytes else bytes(frame)
        size = len(payload)
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        return encode_varint(size), payload

    def decoder(self) -> VarintPrefixedDecoder:
        """Return a fresh incremental decoder."""
        return VarintPrefixedDecoder(self.max_frame)

    async def read_frame(self, reader: StreamReader) -> bytes:
        """Read one frame: the varint a byte at a time, then ``readexactly``.

        Raises :class:`EndOfStream` at a clean end of stream,
        :class:`IncompleteFrame` inside a frame, :class:`FrameTooLarge` right
        after a varint over ``max_frame`` and :class:`ProtocolError` for a
        varint over 10 bytes.
        """
        import asyncio  # only callers that hold a StreamReader get here

        header = bytearray()
        while True:
            try:
                header += await reader.readexactly(1)
            except asyncio.IncompleteReadError:
                if not header:
                    raise EndOfStream("end of stream") from None
                raise _inside_varint(len(header)) from None
            decoded = decode_varint(header)
            if decoded is not None:
                break
        size = decoded[0]
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        return await _read_exactly(reader, size, "payload", at_boundary=False) if size else b""


class VarintPrefixedDecoder(Decoder[bytes]):
    """Incremental decoder of :class:`VarintPrefixed` frames."""

    __slots__ = ("_max_frame",)

    def __init__(self, max_frame: int) -> None:
        super().__init__()
        self._max_frame = max_frame

    def _parse(self, frames: list[bytes]) -> None:
        buf = self._buf
        pos = self._pos
        end = len(buf)
        max_frame = self._max_frame
        append = frames.append
        whole = buf if type(buf) is bytes else None
        view = _NO_VIEW if whole is not None else memoryview(buf)
        try:
            while pos < end:
                size = buf[pos]
                if size < 0x80:  # one-byte varint: the common case, no call
                    start = pos + 1
                elif pos + 1 < end and buf[pos + 1] < 0x80:  # two bytes: frames up to 16 KiB
                    size = (size & 0x7F) | (buf[pos + 1] << 7)
                    start = pos + 2
                else:
                    self._pos = pos
                    decoded = decode_varint(buf, pos)
                    if decoded is None:
                        break
                    size, start = decoded
                if size > max_frame:
                    self._pos = pos
                    raise FrameTooLarge.exceeds(size, max_frame)
                stop = start + size
                if stop > end:
                    self._need = stop - pos
                    break
                append(whole[start:stop] if whole is not None else view[start:stop].tobytes())
                pos = stop
        finally:
            if whole is None:
                view.release()
        self._pos = pos

    def _fresh(self) -> VarintPrefixedDecoder:
        return VarintPrefixedDecoder(self._max_frame)

    def _incomplete(self) -> IncompleteFrame:
        have = self.buffered
        decoded = decode_varint(self._buf, self._pos)
        if decoded is None:
            return _inside_varint(have)
        size, start = decoded
        return IncompleteFrame.short("payload", have - (start - self._pos), size)
