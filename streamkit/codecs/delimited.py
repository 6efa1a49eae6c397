"""Delimiter-terminated framing: raw delimited bytes, text lines, JSON lines."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from streamkit._units import KiB, MiB
from streamkit.codecs._base import Buffer, Decoder, EncodeMany, check_max_frame
from streamkit.errors import DecodeError, EndOfStream, FrameTooLarge, IncompleteFrame

if TYPE_CHECKING:
    from asyncio import StreamReader

__all__ = ["Delimited", "JsonLines", "Lines"]

FrameT = TypeVar("FrameT")

# Returned by a codec's _convert for a line that is no frame (a blank JSON line).
_SKIP: Any = object()

#: When a feed's first frame is shorter than this, the complete frames after
#: it are converted in bulk (one decode, one split) instead of one by one.
_BULK_LINE = 1024
#: Encodings in which decoding text lines together gives the same lines as
#: decoding them one by one (stateless, and no byte 0x0a inside a character).
_BULK_ENCODINGS = frozenset({"utf-8", "ascii", "iso8859-1"})
# json.loads(text) is this decoder's decode(): raw_decode() without the
# whitespace scans, for lines that need none.
_json_raw_decode = json.JSONDecoder().raw_decode


class _DelimitedBase(Generic[FrameT]):
    """The scanning, limits and ``read_frame`` shared by the delimited codecs.

    Subclasses set ``delimiter`` and ``max_frame`` and may convert each raw
    line with ``_convert`` (``_raw`` is then False); ``_slack`` extra bytes
    may precede the delimiter without counting towards ``max_frame`` (the
    ``\\r`` of a ``\\r\\n`` line ending).
    """

    __slots__ = ()
    delimiter: bytes
    max_frame: int
    _raw = False
    _slack = 0

    def _convert(self, line: Buffer, number: int | None) -> FrameT:
        raise NotImplementedError

    def _convert_many(self, data: memoryview) -> list[FrameT] | None:
        """Convert several complete frames at once, or return None.

        ``data`` holds frames, each followed by the (one-byte) delimiter.
        None means the result might differ from converting the frames one
        by one (an error or a limit to report, a blank line to skip): the
        decoder then does that.
        """
        return None

    def decoder(self) -> DelimitedDecoder[FrameT]:
        """Return a fresh incremental decoder."""
        return DelimitedDecoder(self)

    async def read_frame(self, reader: StreamReader) -> FrameT:
        """Read one frame with ``readuntil``.

        Raises :class:`EndOfStream` at a clean end of stream,
        :class:`IncompleteFrame` when it ends inside a frame and
        :class:`FrameTooLarge` for a frame over ``max_frame`` or over the
        reader's ``limit`` (make that at least ``max_frame`` plus the
        delimiter for the two to agree). Each call reads one frame and
        keeps no state, so its errors cannot name a line number, as the
        incremental decoder's do (``DecodeError.frame_number`` is None).
        """
        import asyncio  # only callers that hold a StreamReader get here

        delimiter = self.delimiter
        while True:
            try:
                line = await reader.readuntil(delimiter)
            except asyncio.IncompleteReadError as exc:
                partial = exc.partial
                if not partial:
                    raise EndOfStream("end of stream") from None
                if len(partial) >= self.max_frame + self._slack + len(delimiter):
                    # Too long already, as the incremental decoder would say.
                    raise FrameTooLarge(
                        f"no delimiter {delimiter!r} within max_frame={self.max_frame} "
                        "bytes of the frame"
                    ) from exc
                raise IncompleteFrame(
                    f"stream ended inside a frame: {len(partial)} bytes and no "
                    f"delimiter {delimiter!r}"
                ) from exc
            except asyncio.LimitOverrunError as exc:
                raise FrameTooLarge(
                    f"no delimiter {delimiter!r} in the frame within the reader's limit "
                    f"({exc.consumed} bytes scanned; max_frame={self.max_frame})"
                ) from exc
            content = memoryview(line)[: len(line) - len(delimiter)]
            if self._raw:
                if len(content) > self.max_frame:
                    raise FrameTooLarge.exceeds(len(content), self.max_frame)
                return content.tobytes()  # type: ignore[return-value]
            frame = self._convert(content, None)
            if frame is not _SKIP:
                return frame


class DelimitedDecoder(Decoder[FrameT]):
    """Incremental decoder of delimiter-terminated frames.

    The delimiter search resumes where the last one stopped, so a frame fed
    in many small chunks is scanned once (linear time), and at most
    ``max_frame`` plus the delimiter are buffered before a frame without a
    delimiter raises :class:`FrameTooLarge`.
    """

    __slots__ = ("_codec", "_count", "_scanned")

    def __init__(self, codec: _DelimitedBase[FrameT]) -> None:
        super().__init__()
        self._codec = codec
        self._scanned = 0  # bytes after _pos known to hold no delimiter start
        self._count = 0  # frames (lines) consumed so far, for error messages

    def _parse(self, frames: list[FrameT]) -> None:
        codec = self._codec
        buf = self._buf
        pos = self._pos
        delimiter = codec.delimiter
        dlen = len(delimiter)
        window = codec.max_frame + codec._slack + dlen
        raw = codec._raw
        append = frames.append
        count = self._count
        scan = pos + self._scanned
        bulk = dlen == 1
        view = memoryview(buf)
        try:
            while True:
                limit = pos + window
                index = buf.find(delimiter, scan, limit)
                if index < 0:
                    end = len(buf)
                    self._pos = pos
                    self._count = count
                    if end >= limit:
                        raise FrameTooLarge(
                            f"no delimiter {delimiter!r} within max_frame={codec.max_frame} "
                            f"bytes of frame {count + 1}"
                        )
                    self._scanned = max(0, end - dlen + 1 - pos)
                    return
                if bulk and index - pos < _BULK_LINE:
                    bulk = False  # once per feed: small frames, many of them
                    last = buf.rfind(delimiter, index + 1)
                    if last > 0:
                        with view[pos : last + 1] as data:
                            converted = codec._convert_many(data)
                        if converted is not None:
                            frames.extend(converted)
                            count += len(converted)
                            pos = scan = self._pos = last + 1
                            self._count = count
                            self._scanned = 0
                            continue
                count += 1
                if raw:
                    append(view[pos:index].tobytes())  # type: ignore[arg-type]
                else:
                    line_start, pos = pos, index + dlen
                    self._pos = pos
                    self._count = count
                    self._scanned = 0
                    try:
                        # Converted from a view, not a copy; released on the
                        # way out, so an error's traceback cannot pin the
                        # buffer (and block resizing it).
                        with view[line_start:index] as line:
                            frame = codec._convert(line, count)
                    except DecodeError:
                        self._failed_at = line_start
                        raise
                    if frame is not _SKIP:
                        append(frame)
                    scan = pos
                    continue
                pos = scan = index + dlen
                self._scanned = 0
        finally:
            view.release()
            self._count = count

    def _incomplete(self) -> IncompleteFrame:
        return IncompleteFrame(
            f"stream ended inside frame {self._count + 1}: {self.buffered} bytes and no "
            f"delimiter {self._codec.delimiter!r}"
        )

    def _fresh(self) -> DelimitedDecoder[FrameT]:
        return DelimitedDecoder(self._codec)

    def _reset_partial(self) -> None:
        self._scanned = 0


@dataclass(frozen=True, slots=True)
class Delimited(_DelimitedBase[bytes], EncodeMany[Buffer]):
    """Frames as raw bytes followed by a delimiter (default ``b"\\n"``).

    Any non-empty delimiter works; a frame never contains it, nor ends with
    bytes that make one with the delimiter's start, as ``b"a-"`` does with
    ``b"--"`` (``encode`` raises ``ValueError`` for such a frame).
    ``max_frame`` (default 64 KiB) bounds a frame without its delimiter:
    a delimiter that never comes raises :class:`FrameTooLarge` once
    ``max_frame`` plus the delimiter's length are buffered.
    """

    delimiter: bytes = b"\n"
    max_frame: int = 64 * KiB
    _raw = True

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, bytes) or not self.delimiter:
            raise ValueError(f"delimiter must be non-empty bytes, not {self.delimiter!r}")
        check_max_frame(self.max_frame)

    def _check(self, frame: Buffer) -> None:
        if len(frame) > self.max_frame:
            raise FrameTooLarge.exceeds(len(frame), self.max_frame)
        if isinstance(frame, memoryview):  # memoryview has no substring test
            frame = frame.tobytes()
        delimiter = self.delimiter
        if delimiter in frame:
            raise ValueError(f"frame contains the delimiter {delimiter!r}")
        # b"a-" before b"--" reads back as b"a": the end of the frame and the
        # start of the delimiter would make a delimiter too early.
        tail = frame[1 - len(delimiter) :] if len(delimiter) > 1 else b""
        if delimiter in tail + delimiter[:-1]:
            raise ValueError(
                f"frame ends with {bytes(tail)!r}, which would end it early before the "
                f"delimiter {delimiter!r}"
            )

    def encode(self, frame: Buffer) -> bytes:
        """Return ``frame`` followed by the delimiter.

        Raises :class:`FrameTooLarge` over ``max_frame`` and ``ValueError``
        for a frame that contains the delimiter.
        """
        self._check(frame)
        return bytes(frame) + self.delimiter

    def encode_into(self, out: bytearray, frame: Buffer) -> None:
        """Append the wire bytes of ``frame`` to ``out``."""
        self._check(frame)
        out += frame
        out += self.delimiter

    def encode_parts(self, frame: Buffer) -> tuple[Buffer, ...]:
        """Return the frame (uncopied if ``bytes``) and the delimiter; raises as :meth:`encode`."""
        payload = frame if type(frame) is bytes else bytes(frame)
        self._check(payload)
        return payload, self.delimiter

    def _convert_many(self, data: memoryview) -> list[bytes] | None:
        frames = data.tobytes().split(self.delimiter)
        frames.pop()  # the empty piece after the last delimiter
        if len(data) > self.max_frame + 1 and max(map(len, frames)) > self.max_frame:
            return None
        return frames


def _decode(line: Buffer, size: int, encoding: str) -> str:
    """``str(line[:size], encoding)``, releasing a view it makes even on error."""
    if size == len(line):
        return str(line, encoding)
    if isinstance(line, memoryview):
        with line[:size] as part:
            return str(part, encoding)
    return str(line[:size], encoding)


def _split_lines(data: memoryview, encoding: str, max_frame: int) -> list[str] | None:
    """Decode text lines (each ending in ``\n`` or ``\r\n``) at once, or return None.

    None if the bytes are not valid text or a line may be over ``max_frame``
    bytes: decoding line by line then finds and reports it.
    """
    try:
        text = str(data, encoding)
    except UnicodeDecodeError:
        return None
    if "\r" in text:
        # Every "\r\n" ends a line: this drops exactly one "\r" before each "\n".
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    lines.pop()  # the empty piece after the last "\n"
    if len(data) > max_frame + 1 and not (text.isascii() and max(map(len, lines)) <= max_frame):
        return None  # some line may be too long (or non-ASCII: its length in bytes unknown)
    return lines


def _check_newline(newline: str) -> None:
    """The line endings a line codec writes: ``"\\n"`` or ``"\\r\\n"``."""
    if newline not in ("\n", "\r\n"):
        raise ValueError(f"newline must be '\\n' or '\\r\\n', not {newline!r}")


@dataclass(frozen=True, slots=True)
class Lines(_DelimitedBase[str], EncodeMany[str]):
    """Text lines as ``str`` frames.

    Encodes each line followed by ``newline`` (``"\\n"``, or ``"\\r\\n"`` for
    telnet-style peers); decodes lines ending in ``\\n`` or ``\\r\\n``.
    ``max_frame`` (default 64 KiB) bounds the encoded bytes of a line without
    its line ending. Invalid text raises :class:`DecodeError` naming the line;
    that line is consumed and the decoder can go on with the next one.
    """

    encoding: str = "utf-8"
    max_frame: int = 64 * KiB
    newline: str = "\n"
    delimiter = b"\n"
    _slack = 1
    _newline_bytes: bytes = field(init=False, repr=False, compare=False)
    _bulk: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_newline(self.newline)
        check_max_frame(self.max_frame)
        # Unknown encodings fail here, not at the first frame; lines are split
        # on the byte 0x0a, so the encoding must write "\r\n" as ASCII does.
        if "\r\n".encode(self.encoding) != b"\r\n":
            raise ValueError(f"encoding {self.encoding!r} is not ASCII-compatible")
        object.__setattr__(self, "_newline_bytes", self.newline.encode(self.encoding))
        bulk = codecs.lookup(self.encoding).name in _BULK_ENCODINGS
        object.__setattr__(self, "_bulk", bulk)

    def _encode_line(self, frame: str) -> bytes:
        if "\n" in frame:
            raise ValueError("a line must not contain '\\n'")
        if frame.endswith("\r"):
            raise ValueError("a line must not end with '\\r' (it would read back without it)")
        data = frame.encode(self.encoding)
        if len(data) > self.max_frame:
            raise FrameTooLarge.exceeds(len(data), self.max_frame)
        return data

    def encode(self, frame: str) -> bytes:
        """Return the encoded line and its line ending.

        Raises ``ValueError`` for a line containing ``\\n`` or ending in
        ``\\r``, ``UnicodeEncodeError`` for text the encoding cannot hold and
        :class:`FrameTooLarge` over ``max_frame``.
        """
        return self._encode_line(frame) + self._newline_bytes

    def encode_into(self, out: bytearray, frame: str) -> None:
        """Append the wire bytes of ``frame`` to ``out``."""
        out += self._encode_line(frame)
        out += self._newline_bytes

    def encode_parts(self, frame: str) -> tuple[Buffer, ...]:
        """Return the encoded line and its line ending; raises like :meth:`encode`."""
        return self._encode_line(frame), self._newline_bytes

    def _convert_many(self, data: memoryview) -> list[str] | None:
        return _split_lines(data, self.encoding, self.max_frame) if self._bulk else None

    def _convert(self, line: Buffer, number: int | None) -> str:
        size = len(line)
        if size and line[-1] == 13:  # b"\r"
            size -= 1
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        try:
            return _decode(line, size, self.encoding)
        except UnicodeDecodeError as exc:
            where = f"line {number}" if number is not None else "line"
            raise DecodeError(
                f"invalid {self.encoding} in {where} at byte {exc.start}: {exc.reason}",
                frame_number=number,
            ) from exc


@dataclass(frozen=True, slots=True)
class JsonLines(_DelimitedBase[Any], EncodeMany[Any]):
    """One JSON value per line (NDJSON / JSON Lines), UTF-8.

    Encodes compactly (no spaces, non-ASCII kept as UTF-8) followed by
    ``newline`` (``"\\n"``, or ``"\\r\\n"`` for peers that expect it);
    decodes lines ending in ``\\n`` or ``\\r\\n`` and skips blank lines.
    ``max_frame`` (default 1 MiB) bounds the bytes of a line. Invalid UTF-8 or
    JSON raises :class:`DecodeError` naming the line number; that line is
    consumed and the decoder can go on with the next one.
    """

    max_frame: int = 1 * MiB
    newline: str = "\n"
    delimiter = b"\n"
    _slack = 1
    _newline_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_newline(self.newline)
        check_max_frame(self.max_frame)
        object.__setattr__(self, "_newline_bytes", self.newline.encode())

    def _encode_value(self, frame: Any) -> bytes:
        data = json.dumps(
            frame, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
        if len(data) > self.max_frame:
            raise FrameTooLarge.exceeds(len(data), self.max_frame)
        return data

    def encode(self, frame: Any) -> bytes:
        """Return ``frame`` as one compact JSON line.

        Raises ``TypeError``/``ValueError`` for a value JSON cannot hold and
        :class:`FrameTooLarge` over ``max_frame``.
        """
        return self._encode_value(frame) + self._newline_bytes

    def encode_into(self, out: bytearray, frame: Any) -> None:
        """Append the wire bytes of ``frame`` to ``out``."""
        out += self._encode_value(frame)
        out += self._newline_bytes

    def _convert_many(self, data: memoryview) -> list[Any] | None:
        lines = _split_lines(data, "utf-8", self.max_frame)
        if lines is None:
            return None
        values: list[Any] = []
        append = values.append
        for line in lines:
            # What json.loads(line) returns, for a line without surrounding
            # whitespace (else, and for errors, line by line decides).
            try:
                value, end = _json_raw_decode(line)
            except (ValueError, RecursionError):
                return None
            if end != len(line):
                return None
            append(value)
        return values

    def _convert(self, line: Buffer, number: int | None) -> Any:
        size = len(line)
        if size and line[-1] == 13:  # b"\r"
            size -= 1
        if size > self.max_frame:
            raise FrameTooLarge.exceeds(size, self.max_frame)
        where = f"line {number}" if number is not None else "line"
        try:
            text = _decode(line, size, "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(
                f"invalid UTF-8 in JSON {where} at byte {exc.start}: {exc.reason}",
                frame_number=number,
            ) from exc
        if not text.strip():
            return _SKIP
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DecodeError(f"invalid JSON on {where}: {exc}", frame_number=number) from exc
