"""FramedStream: frames over an asyncio StreamReader/StreamWriter pair.

The send path writes a lone frame at once (no latency added, no callback),
coalesces the frames that follow it in the same event-loop turn into one
``write``, hands a large frame's payload to the transport as it is (no copy
into the send buffer), and waits on ``drain()`` only when the transport's
buffer is over its high-water mark. The receive path reads large chunks and
parses frames out of them with the codec's incremental decoder, and reads a
large frame's payload in one piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

from streamkit._lifecycle import Closable
from streamkit.codecs import Buffer, Codec, Decoder
from streamkit.errors import ConnectionLost, EndOfStream

__all__ = ["FramedStream"]

logger = logging.getLogger("streamkit")

FrameT = TypeVar("FrameT")

#: Default seconds ``wait_closed()`` waits after ``close()`` before aborting the connection.
DEFAULT_CLOSE_TIMEOUT = 10.0

#: Bytes asked of the reader per read: the reader returns what it has, up to
#: this; 64 KiB measured best of 64 KiB..1 MiB (benchmarks/bench_streams.py).
_READ_SIZE = 64 * 1024
#: Read size while a long frame of unknown size (a delimited one) is pending:
#: fewer, larger reads for the rest of it (a 64 KiB line: 27 -> 21 us a line
#: on the receiver, 1 MiB: 420 -> 340 us; benchmarks/bench_streams.py).
_LONG_READ_SIZE = 256 * 1024
#: A frame at least this long (once its header is in) is completed with one
#: ``readexactly`` (two copies in all, instead of three through the buffer).
_LARGE_REST = 16 * 1024
#: Frames buffered in one turn are written at once past this many bytes.
_FLUSH_SIZE = 64 * 1024
#: A frame at least this long is not copied into the send buffer: its payload
#: goes to the transport as it is, which copies only what the socket does not
#: take at once (benchmarks/bench_streams.py, 64 KiB and 1 MiB rows).
_LARGE_SEND = 16 * 1024
#: Below this, a large frame meeting an empty transport buffer is joined
#: after all: one send() instead of two (the header's would go alone).
_HUGE_SEND = 256 * 1024


class FramedStream(Closable, Generic[FrameT]):
    """Frames in both directions over a ``StreamReader`` / ``StreamWriter`` pair.

    - ``await send(frame)`` / ``await send_many(frames)``: frames from
      concurrent senders are never interleaved. Frames sent in one event-loop
      turn go out in one ``write``. A sender waits (``drain()``) while the
      transport's write buffer is over ``write_buffer_high``, so a slow
      reader makes the writer wait and memory stays bounded.
    - ``await recv(timeout=None)`` returns the next frame; ``async for``
      iterates until the peer ends the stream. At a clean end ``recv`` raises
      :class:`EndOfStream`; a stream that ends inside a frame raises
      :class:`~streamkit.errors.IncompleteFrame`; a reset connection raises
      :class:`ConnectionLost` with the OS error as ``__cause__``; a timeout
      raises ``TimeoutError`` and leaves the stream usable.
    - ``write_eof()`` half-closes (the peer sees the end of stream and can
      still send back), ``close()`` / ``await wait_closed()`` or
      ``async with`` close it.

    ``write_buffer_high`` / ``write_buffer_low`` set the transport's write
    buffer limits (asyncio's defaults, 64 KiB / 16 KiB, when ``None``); the
    reader's ``limit`` bounds what it buffers on the receive side.
    ``close_timeout`` (seconds, default 10; ``None``: no bound) bounds
    ``wait_closed()`` after ``close()``: a peer that never takes the last
    bytes, or never answers TLS's close_notify, has the connection aborted.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: Codec[FrameT],
        *,
        write_buffer_high: int | None = None,
        write_buffer_low: int | None = None,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if close_timeout is not None and not close_timeout > 0:
            raise ValueError(f"close_timeout must be > 0 or None, not {close_timeout}")
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._codec = codec
        self._encode_into = codec.encode_into
        self._encode_parts = _parts_encoder(codec)
        self._decoder: Decoder[FrameT] = codec.decoder()
        # Frames decoded but not yet returned, last first (pop() is the next
        # one): a list costs 56 bytes a connection where a deque costs 760.
        self._frames: list[FrameT] = []
        self._receiving = False  # a recv() is running (one at a time, as StreamReader's reads)
        self._out = bytearray()
        self._flush_handle: asyncio.Handle | None = None
        # A frame went out at once and no end of turn was seen since: the
        # next frame starts gathering (see _written).
        self._wrote_at_once = False
        self._loop = asyncio.get_running_loop()
        self._eof_received = False
        self._close_timeout = close_timeout
        self._close_deadline: float | None = None  # when close() gives up and aborts
        self._large_frames = False  # the last frame was read in one piece
        if write_buffer_high is not None or write_buffer_low is not None:
            self._transport.set_write_buffer_limits(write_buffer_high, write_buffer_low)
        self._high_water = self._transport.get_write_buffer_limits()[1]
        #: Gathered bytes are written once they reach this: at most _FLUSH_SIZE,
        #: and no more than the room left under the high-water mark.
        self._flush_at = _FLUSH_SIZE
        self._flush_most = min(_FLUSH_SIZE, self._high_water)  # _flush_at when nothing is buffered

    # -- properties ---------------------------------------------------------

    @property
    def codec(self) -> Codec[FrameT]:
        """The codec frames are encoded and decoded with."""
        return self._codec

    @property
    def reader(self) -> asyncio.StreamReader:
        """The underlying ``StreamReader`` (bytes still buffered in the decoder are not in it)."""
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The underlying ``StreamWriter``."""
        return self._writer

    @property
    def peername(self) -> Any:
        """The remote address, as ``transport.get_extra_info("peername")``."""
        return self._writer.get_extra_info("peername")

    @property
    def sockname(self) -> Any:
        """The local address, as ``transport.get_extra_info("sockname")``."""
        return self._writer.get_extra_info("sockname")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport information: ``"peername"``, ``"ssl_object"``, ``"socket"``..."""
        return self._writer.get_extra_info(name, default)

    # -- sending ------------------------------------------------------------

    async def send(self, frame: FrameT) -> None:
        """Send one frame.

        Raises what the codec raises for a frame it cannot encode
        (:class:`~streamkit.errors.FrameTooLarge`, ``ValueError``) before
        anything is written, and :class:`ConnectionLost` once the connection
        is closing or lost.
        """
        transport = self._transport
        if transport.is_closing():
            raise ConnectionLost("cannot send: the connection is closing or lost")
        if (
            self._encode_parts is not None
            and len(frame) >= _LARGE_SEND  # type: ignore[arg-type]
            and (len(frame) >= _HUGE_SEND or transport.get_write_buffer_size())  # type: ignore[arg-type]
        ):
            over = self._write_parts(self._encode_parts(frame))
        else:
            out = self._out
            self._encode_into(out, frame)
            if self._flush_handle is not None:
                if len(out) < self._flush_at:
                    return  # goes out with the rest of this turn's frames
                over = self._written()
            elif self._wrote_at_once:
                over = self._written()
            else:
                # A lone frame, the request/response case: _written inlined.
                self._wrote_at_once = True
                self._out = bytearray()
                transport.write(out)
                over = self._check_buffer()
        if over:
            await self._drain()

    def send_nowait(self, frame: FrameT) -> None:
        """Queue one frame without waiting for the write buffer to drain.

        For small control messages and for callers with their own flow
        control: frames queued this way and by ``send`` keep call order.
        Raises like :meth:`send`.
        """
        self._check_open()
        self._codec.encode_into(self._out, frame)
        self._written()

    def send_encoded_nowait(self, data: bytes, payload: bytes = b"") -> bool:
        """Queue bytes already framed with this stream's codec, as they are.

        ``payload``, if given, follows ``data`` (a header and its payload
        need not be joined first).

        For a layer that frames its own messages on its hot path, or one
        encoding sent to many streams. Nothing checks the framing. Returns
        whether the write buffer is over its high-water mark (the caller
        should ``await drain()``). Raises :class:`ConnectionLost` once the
        connection is closing or lost.
        """
        if self._transport.is_closing():
            raise ConnectionLost("cannot send: the connection is closing or lost")
        if len(payload) >= _LARGE_SEND and type(payload) is bytes:
            return self._write_parts((data, payload))
        self._out += data
        if payload:
            self._out += payload
        return self._written()

    async def send_many(self, frames: Iterable[FrameT]) -> None:
        """Send several frames, written together with one ``write``.

        If a frame cannot be encoded, the frames before it are sent and the
        codec's error is raised.
        """
        self._check_open()
        encode_into = self._codec.encode_into
        out = self._out
        try:
            for frame in frames:
                encode_into(out, frame)
        finally:
            self._flush()
        if self._transport.get_write_buffer_size() > self._high_water:
            await self._drain()

    @property
    def must_drain(self) -> bool:
        """Whether the write buffer is over its high-water mark: callers of
        ``send_nowait`` should ``await drain()`` now."""
        return self._transport.get_write_buffer_size() > self._high_water

    async def drain(self) -> None:
        """Write the frames buffered so far and wait until the transport can take more."""
        self._flush()
        await self._drain()

    def _check_open(self) -> None:
        if self._transport.is_closing():
            raise ConnectionLost("cannot send: the connection is closing or lost")

    def _written(self) -> bool:
        """Frames were added to the buffer: write them if due.

        Returns whether the transport's buffer is over its high-water mark.
        It only grows when we write to it, so it is checked only then.
        """
        if self._flush_handle is not None:
            if len(self._out) < self._flush_at:
                return False
        elif self._wrote_at_once:
            # A second frame before the turn ended: gather it and the rest
            # of the turn's frames, and write them together when it ends.
            self._flush_handle = self._loop.call_soon(self._end_turn)
            if len(self._out) < self._flush_at:
                return False
        else:
            # A lone frame goes out at once: no latency added, and no
            # callback (an extra loop iteration) unless more follow it.
            self._wrote_at_once = True
        self._write_out()
        return self._check_buffer()

    def _write_parts(self, parts: tuple[Buffer, ...]) -> bool:
        """Write one large frame now, its large parts as they are.

        Joining them would copy the whole payload into the send buffer
        first; the transport copies only what the socket does not take at
        once (nothing at all on Python 3.12+). The parts must not change
        later (``encode_parts`` guarantees it). Returns like ``_written``.
        """
        transport = self._transport
        for part in parts:
            if len(part) < _LARGE_SEND:
                self._out += part
            else:
                self._write_out()  # the frames queued before it, and its header
                if not transport.is_closing():
                    # A view: Python 3.11's transport would copy a slice of
                    # bytes before buffering the unsent rest.
                    transport.write(memoryview(part))
        self._write_out()
        return self._check_buffer()

    def _check_buffer(self) -> bool:
        """After a write: whether the transport's buffer is over its high-water mark."""
        buffered = self._transport.get_write_buffer_size()
        if not buffered:  # all sent: the common case of a lone frame
            self._flush_at = self._flush_most
            return False
        # The buffer only shrinks until our next write, so gathering no more
        # than the room left keeps it within the high-water mark plus a frame.
        self._flush_at = min(_FLUSH_SIZE, self._high_water - buffered)
        return buffered > self._high_water

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._write_out()

    def _end_turn(self) -> None:
        self._flush_handle = None
        self._wrote_at_once = False
        self._write_out()

    def _write_out(self) -> None:
        out = self._out
        if out and not self._transport.is_closing():
            # Hand the buffer over and start a new one: the transport may
            # keep a reference to what it could not send yet.
            self._out = bytearray()
            self._transport.write(out)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost while sending: {exc!r}") from exc

    # -- receiving ----------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Coroutine[Any, Any, FrameT]:
        """Return the next frame (a coroutine: ``frame = await stream.recv()``).

        Raises :class:`EndOfStream` at a clean end of stream (again on every
        later call), the codec's :class:`~streamkit.errors.ProtocolError` for
        bad input, :class:`ConnectionLost` if the connection breaks, and
        ``TimeoutError`` after ``timeout`` seconds (no frame is lost; the
        stream stays usable). One task receives at a time, as with a
        ``StreamReader``: a ``recv`` while another is waiting raises
        ``RuntimeError``.
        """
        # The coroutine itself, not one awaiting it: a frame level fewer per call.
        return self._receive() if timeout is None else self._receive_within(timeout)

    async def _receive_within(self, timeout: float) -> FrameT:
        if self._frames:
            return self._frames.pop()
        async with asyncio.timeout(timeout):
            return await self._receive()

    async def recv_batch(self) -> list[FrameT]:
        """Return every frame received so far, at least one (waiting for it).

        For consumers that process frames in bulk: one call instead of one
        ``recv`` per frame. Raises like :meth:`recv`.
        """
        if not self._frames:
            first = await self._receive()
            batch = [first, *reversed(self._frames)]
        else:
            batch = self._frames[::-1]
        self._frames = []
        return batch

    def __aiter__(self) -> FramedStream[FrameT]:
        return self

    def __anext__(self) -> Coroutine[Any, Any, FrameT]:
        return self._receive(StopAsyncIteration)

    async def _receive(self, end: type[Exception] = EndOfStream) -> FrameT:
        """The next frame; ``end`` is raised at the end of the stream."""
        frames = self._frames
        if frames:
            return frames.pop()
        if self._receiving:
            raise RuntimeError("recv() called while another task is receiving from this stream")
        self._receiving = True
        try:
            decoder = self._decoder
            if decoder.pending:
                # An error held back for the frames before it, or the frames
                # after a bad one, not parsed yet: no new input is needed.
                got = decoder.feed(b"")
                got.reverse()
                frames = self._frames = got
            while not frames:
                if self._eof_received:
                    decoder.close()
                    raise end("end of stream")
                buffered = decoder.buffered
                missing = decoder.missing() if buffered else 0
                # Waiting for the peer ends the turn: a frame sent after it
                # is a lone frame again, written at once.
                self._wrote_at_once = False
                try:
                    if missing and missing + buffered >= _LARGE_REST:
                        # A large frame: read the rest of it in one piece,
                        # copied once, as readexactly-per-frame code would.
                        # Frames after it are then read header, then payload
                        # (below), so they never pass through the buffer.
                        self._large_frames = True
                        return decoder.complete(await self._reader.readexactly(missing))
                    header = decoder.header_missing() if self._large_frames else 0
                    if header:
                        # After a large frame, read just the next header, so
                        # a large payload after it comes in one piece, uncopied.
                        data = await self._reader.readexactly(header)
                    else:
                        self._large_frames = False
                        long = buffered >= _LARGE_REST  # a long frame, size unknown
                        data = await self._reader.read(_LONG_READ_SIZE if long else _READ_SIZE)
                except asyncio.IncompleteReadError as exc:
                    data = exc.partial  # the stream ended inside the frame
                except (ConnectionError, OSError) as exc:
                    raise ConnectionLost(f"connection lost: {exc!r}") from exc
                if not data:
                    self._eof_received = True
                    continue
                got = decoder.feed(data)
                if got:
                    got.reverse()
                    frames = self._frames = got
            return frames.pop()
        finally:
            self._receiving = False

    def switch_codec(self, codec: Codec[Any]) -> None:
        """Decode and encode with ``codec`` from now on.

        Every byte received but not yet returned by ``recv`` (including
        frames the old codec had decoded ahead) is handed to the new codec,
        so a protocol can switch framing after a handshake. Frames already
        passed to ``send`` keep the old framing.
        """
        self._flush()
        rest = self._decoder.take_buffered(frames=len(self._frames))
        self._frames = []
        self._codec = codec
        self._encode_into = codec.encode_into
        self._encode_parts = _parts_encoder(codec)
        self._decoder = codec.decoder()
        if rest:
            got = self._decoder.feed(rest)
            got.reverse()
            self._frames = got

    # -- closing ------------------------------------------------------------

    def write_eof(self) -> None:
        """Send the frames buffered so far, then half-close the write side.

        The peer's ``recv`` then sees the end of stream; this side can still
        receive. A transport that cannot half-close (TLS: asyncio's SSL
        transport has no half-close) only sends the buffered frames, and the
        peer sees no end until ``close()``; ``writer.can_write_eof()`` tells
        which.
        """
        self._flush()
        if self._writer.can_write_eof() and not self._transport.is_closing():
            self._writer.write_eof()

    def close(self) -> None:
        """Send the frames buffered so far and close the connection.

        ``await wait_closed()`` then waits until the peer has the last bytes
        (and, with TLS, the close handshake is done), at most
        ``close_timeout`` seconds from this call.
        """
        if self._close_deadline is None and self._close_timeout is not None:
            self._close_deadline = self._loop.time() + self._close_timeout
        self._flush()
        self._writer.close()

    def abort(self) -> None:
        """Close the connection at once, dropping unsent data."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out = bytearray()
        self._transport.abort()

    def is_closing(self) -> bool:
        """Whether the connection is closed or closing."""
        return self._transport.is_closing()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed; a reset while closing is not an error.

        After ``close()``, waits at most ``close_timeout`` seconds from it,
        then aborts the connection (dropping what the peer did not take)
        and returns once that is done. Without ``close()`` it waits for the
        connection to end, however long that takes.
        """
        with contextlib.suppress(ConnectionError, OSError):
            deadline = self._close_deadline
            if deadline is None:
                await self._writer.wait_closed()
                return
            closed = asyncio.ensure_future(self._writer.wait_closed())
            closed.add_done_callback(_retrieve)  # if we are cancelled before it ends
            try:
                async with asyncio.timeout_at(deadline):
                    # Shielded: a timeout must not cancel the close waiter,
                    # which every later wait_closed() awaits as well.
                    await asyncio.shield(closed)
            except TimeoutError:
                logger.debug(
                    "closing the connection to %s took over close_timeout=%s s: aborted",
                    self.peername,
                    self._close_timeout,
                )
                self._transport.abort()
                await closed

    def __repr__(self) -> str:
        return f"<FramedStream {self._codec!r} peer={self.peername!r}>"


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a task's exception as retrieved (a reset while closing is no error)."""
    if not task.cancelled():
        task.exception()


def _parts_encoder(codec: Codec[Any]) -> Callable[[Any], tuple[Buffer, ...]] | None:
    """The codec's ``encode_parts``, if it has one (it is optional)."""
    parts: Callable[[Any], tuple[Buffer, ...]] | None = getattr(codec, "encode_parts", None)
    return parts
