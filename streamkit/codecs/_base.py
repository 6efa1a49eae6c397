"""What every codec shares: the ``Codec`` protocol and the buffered decoder.

No asyncio import at module level: the codecs are sans-IO and may be used
from sync code or another event loop. ``read_frame`` implementations import
asyncio when called (their caller holds a ``StreamReader``: it is loaded).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from streamkit.errors import DecodeError, ProtocolError

if TYPE_CHECKING:
    from asyncio import StreamReader

__all__ = ["Buffer", "Codec", "Decoder", "EncodeMany", "FrameT", "check_max_frame"]

FrameT = TypeVar("FrameT")
FrameT_co = TypeVar("FrameT_co", covariant=True)
InT = TypeVar("InT")

#: What decoders accept: anything exporting bytes without a copy.
Buffer = bytes | bytearray | memoryview

#: For output buffers (FramedStream's and the session core's): a payload at
#: least this long is not copied into the buffer but kept apart, and joined
#: with the bytes around it in one copy when they are written. Copied into a
#: bytearray, a run of them grows it past what can grow in place once the
#: heap is busy, and each reallocation copies what it holds again (4 KiB
#: frames: 2-4 us each, against about 1 us joined).
APART_PAYLOAD = 1024


def check_max_frame(max_frame: int) -> None:
    """Raise ``ValueError`` for a codec's ``max_frame`` below 0 (0 allows empty frames only)."""
    if max_frame < 0:
        raise ValueError(f"max_frame must be >= 0, not {max_frame}")


class Codec(Protocol[FrameT]):
    """A framing codec: configured once, immutable; state lives in its decoders.

    ``encode(frame)`` returns the wire bytes of one frame; ``encode_into``
    appends them to a buffer and ``encode_many`` returns the bytes of many
    frames as one buffer, for one ``write``. ``decoder()`` returns a fresh
    incremental :class:`Decoder`; ``read_frame(reader)`` reads exactly one
    frame from an ``asyncio.StreamReader``.

    Optionally, a codec whose frames have a ``len()`` also offers
    ``encode_parts(frame) -> tuple[Buffer, ...]``: the wire bytes as pieces
    to write in order (header, payload, delimiter), the payload not copied,
    for ``writelines``-style output of large frames; the pieces never change
    later (a mutable payload is copied). ``FramedStream`` uses it when present.
    """

    @property
    def max_frame(self) -> int: ...

    def encode(self, frame: FrameT) -> bytes: ...

    def encode_into(self, out: bytearray, frame: FrameT) -> None: ...

    def encode_many(self, frames: Iterable[FrameT]) -> bytes: ...

    def decoder(self) -> Decoder[FrameT]: ...

    async def read_frame(self, reader: StreamReader) -> FrameT: ...


class EncodeMany(Generic[InT]):
    """``encode_many`` from a codec's ``encode_into``: every frame into one buffer."""

    __slots__ = ()

    def encode_into(self, out: bytearray, frame: InT) -> None:
        raise NotImplementedError

    def encode_many(self, frames: Iterable[InT]) -> bytes:
        """Return the wire bytes of all ``frames`` as one buffer."""
        out = bytearray()
        encode_into = self.encode_into
        for frame in frames:
            encode_into(out, frame)
        return bytes(out)


class Decoder(Generic[FrameT]):
    """Incremental decoder: bytes in, complete frames out.

    ``feed(data)`` returns every frame completed by ``data`` and keeps the
    rest buffered, so any split of the input into chunks gives the same
    frames. A bad frame raises a :class:`~streamkit.errors.ProtocolError`:

    - frames decoded before the bad bytes are never lost: if ``feed``
      already decoded some frames in that call, it returns them and raises
      the error from the next ``feed`` (``feed(b"")`` will do) or ``close``;
    - a :class:`~streamkit.errors.DecodeError` (a complete frame whose
      content is invalid) consumes only that frame: the next ``feed``
      continues with the frames after it, none dropped or repeated;
    - any other error (a frame over ``max_frame``, a malformed header) is
      fatal: once raised, the buffer is freed and every later call raises
      it again.

    While an error is pending (frames were returned before it), every byte
    from the bad frame on is kept, so ``take_buffered`` can still hand it
    to another codec.

    ``close()`` raises :class:`~streamkit.errors.IncompleteFrame` when bytes
    of a partial frame remain, and raises a pending error first.
    """

    __slots__ = ("_buf", "_error", "_failed_at", "_fatal", "_need", "_pos")

    def __init__(self) -> None:
        # A bytearray while input accumulates; the fed chunk itself (bytes)
        # when it could be parsed where it is (see feed).
        self._buf: bytes | bytearray = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None
        self._fatal = False
        self._failed_at = 0  # where the frame of a pending error starts
        # No frame can come out before this many bytes are buffered from
        # _pos: every complete frame was returned (0: parse at the next feed).
        # _parse sets it when it knows the size of the frame it waits for.
        self._need = 0

    def feed(self, data: Buffer) -> list[FrameT]:
        """Buffer ``data`` and return the frames it completes, in order."""
        if self._error is not None:
            if data and not self._fatal:
                # A pending DecodeError skips one frame only: keep what follows.
                self._buf += data
            self._raise_pending()
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if have + len(data) < self._need:
            # Nothing to parse yet (a large frame arriving in small pieces,
            # or a feed(b"") after a clean parse): keep the bytes only.
            if data:
                if type(buf) is not bytearray:
                    buf = self._buf = bytearray(memoryview(buf)[pos:])
                    self._pos = 0
                buf += data
            return []
        # Bytes of frames returned by the last feed stay until now, for
        # take_buffered(frames=...). The buffer is the chunk itself when
        # nothing was pending (no copy, and bytes frames are sliced out of
        # bytes without a view), the rest of a frame joined to the chunk
        # when that rest is shorter than it, else a growing bytearray.
        if not have:
            buf = data if type(data) is bytes else bytes(data)
        elif have <= len(data):
            buf = b"".join((memoryview(buf)[pos:], data))
        else:
            if type(buf) is not bytearray:
                buf = bytearray(memoryview(buf)[pos:])
            elif pos:
                del buf[:pos]  # bytearray drops a prefix in O(1)
            buf += data
        self._buf = buf
        self._pos = 0
        frames: list[FrameT] = []
        self._need = 0
        try:
            self._parse(frames)
        except ProtocolError as exc:
            fatal = not isinstance(exc, DecodeError)
            if frames:
                # Deferred: keep the bytes from the bad frame on, for take_buffered.
                self._failed_at = self._pos if fatal else self._failed_at
                self._error = exc
                self._fatal = fatal
                return frames
            if fatal:
                self._error = exc
                self._fatal = True
                self._free()
            raise
        if not self._need:
            self._need = len(self._buf) - self._pos + 1
        return frames

    def _free(self) -> None:
        self._buf = b""  # a bytearray again once input accumulates
        self._pos = 0
        self._failed_at = 0
        self._need = 0

    def close(self) -> None:
        """Check that the input ended on a frame boundary.

        Raises a pending error, or :class:`~streamkit.errors.IncompleteFrame`
        if bytes of a partial frame are buffered.
        """
        if self._error is not None:
            self._raise_pending()
        if len(self._buf) > self._pos:
            raise self._incomplete()

    def missing(self) -> int:
        """Bytes still needed to complete the frame being decoded, if known; else 0.

        A length-prefixed decoder knows once it has the header; the caller
        can then read exactly that many bytes and hand them to
        :meth:`complete`, which saves copying a large frame through the
        buffer.
        """
        return 0

    def header_missing(self) -> int:
        """Bytes still needed to complete the next frame's header, if known; else 0.

        With :meth:`missing`, lets a caller that expects large frames read
        each header, then each payload, in one piece.
        """
        return 0

    def complete(self, data: Buffer | list[Buffer]) -> FrameT:
        """Return the pending frame, completed by ``data`` (exactly ``missing()`` bytes).

        ``data`` may come in pieces (a list of buffers): they are joined
        with the bytes buffered into the frame in one copy. Only for
        decoders whose :meth:`missing` can be non-zero.
        """
        raise NotImplementedError

    @property
    def in_place(self) -> bool:
        """Whether ``feed`` parses a ``bytearray`` or ``memoryview`` where it is.

        True when it copies only the frames and the partial frame it keeps,
        not the whole input first: a caller reading into one reused buffer
        can then make it large without a large copy per read.
        """
        return False

    @property
    def buffered(self) -> int:
        """How many bytes are buffered that do not yet form a frame."""
        return len(self._buf) - self._pos

    @property
    def pending(self) -> bool:
        """Whether ``feed(b"")`` would return frames or raise, without new input.

        True while an error is held back for the frames returned before it,
        and after a :class:`~streamkit.errors.DecodeError` until the bytes
        after the bad frame are parsed. A reader about to wait for input
        calls ``feed(b"")`` first when this is true.
        """
        return self._error is not None or (not self._need and len(self._buf) > self._pos)

    def take_buffered(self, frames: int = 0) -> bytes:
        """Remove and return the raw bytes not yet consumed as frames.

        For switching framing mid-stream: the next codec's decoder gets these
        bytes first. With ``frames=k``, the last ``k`` frames that the last
        ``feed`` returned are given back as raw bytes too (a caller that
        decoded ahead hands back what it did not deliver). The decoder is
        left empty; a decoder with a fatal error has nothing buffered.
        """
        if frames < 0:
            raise ValueError(f"frames must be >= 0, not {frames}")
        start = self._pos
        if self._error is not None:
            # The error was never raised: its frame goes to the next codec.
            start = self._failed_at
            self._error = None
            self._fatal = False
        if frames:
            start = self._end_of_frame(self._count_frames(start) - frames, start)
        rest = bytes(self._buf[start:])
        self._free()
        self._reset_partial()
        return rest

    def _count_frames(self, size: int) -> int:
        """How many frames a fresh decoder finds in the first ``size`` buffered bytes."""
        try:
            return len(self._fresh().feed(self._buf[:size]))
        except ProtocolError:
            return 0

    def _end_of_frame(self, number: int, high: int) -> int:
        """The buffer position just past the ``number``-th frame, at most ``high``."""
        if number < 0:
            raise ValueError("cannot give back more frames than the last feed returned")
        # Binary search for the shortest prefix holding `number` frames: this
        # runs only when framing is switched, so the hot path keeps no
        # per-frame bookkeeping.
        low = 0
        while low < high:
            middle = (low + high) // 2
            if self._count_frames(middle) >= number:
                high = middle
            else:
                low = middle + 1
        return low

    def _raise_pending(self) -> None:
        error = self._error
        assert error is not None
        if self._fatal:
            self._free()  # raised now: nothing of this input is served any more
        else:
            self._error = None
        # A fresh traceback: re-raising one exception object chains every
        # earlier raise's frames, and with them every chunk fed since.
        raise error.with_traceback(None)

    def _parse(self, frames: list[FrameT]) -> None:
        """Append the complete frames at ``self._pos`` to ``frames``.

        Advance ``self._pos`` past each consumed frame before raising.
        """
        raise NotImplementedError

    def _incomplete(self) -> ProtocolError:
        """The error for a stream that ended inside a frame."""
        raise NotImplementedError

    def _fresh(self) -> Decoder[FrameT]:
        """A new decoder of the same codec."""
        raise NotImplementedError

    def _reset_partial(self) -> None:
        """Forget parse state about a partial frame (see ``take_buffered``)."""
