"""FramedStream: frames over an asyncio StreamReader/StreamWriter pair.

The send path writes a lone frame at once (no latency added, no callback),
coalesces the frames that follow it in the same event-loop turn into one
``write``, hands a large frame's payload to the transport as it is (no copy
into the send buffer), and waits on ``drain()`` only when the transport's
buffer is over its high-water mark.

The receive path parses frames out of large reads with the codec's
incremental decoder and reads a large frame's payload in one piece. Over a
:class:`StreamProtocol` (every connection ``streamkit.net`` opens), reads go
into one reused buffer and the stream takes them straight from it (see
:class:`StreamProtocol` for why); over any other ``StreamReader`` it reads
the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar, cast

from streamkit._lifecycle import Closable
from streamkit.codecs import Buffer, Codec, Decoder
from streamkit.codecs._base import APART_PAYLOAD
from streamkit.errors import ConnectionLost, EndOfStream, ProtocolError, StreamkitError

__all__ = ["FramedStream", "StreamProtocol", "TurnWriter", "splice"]

logger = logging.getLogger("streamkit")

FrameT = TypeVar("FrameT")
ItemT = TypeVar("ItemT")

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
#: The buffer StreamProtocols read into: one per event loop, reused by every
#: read of every connection (asyncio's own transports read up to this much).
RECEIVE_BUFFER_SIZE = 256 * 1024
#: How much a receiving stream reads at a time while frames are small or
#: wait to be taken (see _Receiver).
_SMALL_READ = 64 * 1024
#: A stream's receiving half pauses the transport past this many bytes read
#: and held, not yet decoded (or past the reader's ``limit``, if lower).
_MAX_HELD = RECEIVE_BUFFER_SIZE
#: Frames of this size on average make reads of the whole receive buffer.
_LARGE_FRAMES = 1024
#: At most this much memory of large frames' pieces is kept, per event loop,
#: for the next large frames (see _Pieces).
_SPARE_PIECES = 8 * 1024 * 1024


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
        # Always this one list: a _Receiver fills it in place.
        self._frames: list[FrameT] = []
        self._receiving = False  # a recv() is running (one at a time, as StreamReader's reads)
        protocol = self._transport.get_protocol()
        # Bytes come from the protocol itself from the first receive on (a
        # _Receiver), if it is a StreamProtocol feeding this reader.
        self._protocol = (
            protocol if isinstance(protocol, StreamProtocol) and protocol.reader is reader else None
        )
        self._receiver: _Receiver[FrameT] | None = None
        self._sender = TurnWriter(writer, high=write_buffer_high, low=write_buffer_low)
        self._loop = asyncio.get_running_loop()
        self._eof_received = False
        self._close_timeout = close_timeout
        self._close_deadline: float | None = None  # when close() gives up and aborts
        self._large_frames = False  # the last frame was read in one piece
        self._delivering: asyncio.Task[None] | None = None  # deliver()'s, over another reader

    # -- properties ---------------------------------------------------------

    @property
    def codec(self) -> Codec[FrameT]:
        """The codec frames are encoded and decoded with."""
        return self._codec

    @property
    def reader(self) -> asyncio.StreamReader:
        """The underlying ``StreamReader``: a handshake may read it before the first ``recv``.

        Bytes the decoder holds are not in it. Over a :class:`StreamProtocol`
        (every stream ``streamkit.net`` makes) the stream reads the
        connection itself from its first receive on, and the reader is then
        at its end.
        """
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

    @property
    def sender(self) -> TurnWriter:
        """The connection's send side, for a layer above that frames its own bytes.

        Frames sent through this stream and bytes written through it keep
        their order (one writer); see :class:`TurnWriter`.
        """
        return self._sender

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
        sender = self._sender
        if self._encode_parts is not None and len(frame) >= APART_PAYLOAD:  # type: ignore[arg-type]
            parts = self._encode_parts(frame)
            if len(frame) >= _LARGE_SEND and (  # type: ignore[arg-type]
                len(frame) >= _HUGE_SEND or transport.get_write_buffer_size()  # type: ignore[arg-type]
            ):
                over = sender.write_parts(parts)
            elif sender.gather_parts(parts):
                return  # goes out with the rest of this turn's frames
            else:
                over = sender.wrote()
        else:
            out = sender.buffer
            self._encode_into(out, frame)
            if sender.gathering and len(out) < sender.flush_at:
                return  # goes out with the rest of this turn's frames
            over = sender.wrote()
        if over:
            await sender.wait_drained()

    def send_nowait(self, frame: FrameT) -> None:
        """Queue one frame without waiting for the write buffer to drain.

        For small control messages and for callers with their own flow
        control: frames queued this way and by ``send`` keep call order.
        Raises like :meth:`send`.
        """
        self._check_open()
        self._codec.encode_into(self._sender.buffer, frame)
        self._sender.wrote()

    async def send_many(self, frames: Iterable[FrameT]) -> None:
        """Send several frames, written together with one ``write``.

        If a frame cannot be encoded, the frames before it are sent and the
        codec's error is raised.
        """
        self._check_open()
        encode_into = self._codec.encode_into
        out = self._sender.buffer
        try:
            for frame in frames:
                encode_into(out, frame)
        finally:
            self._sender.flush()
        if self._sender.must_drain:
            await self._sender.wait_drained()

    @property
    def must_drain(self) -> bool:
        """Whether the write buffer is over its high-water mark: callers of
        ``send_nowait`` should ``await drain()`` now."""
        return self._sender.must_drain

    async def drain(self) -> None:
        """Write the frames buffered so far and wait until the transport can take more."""
        await self._sender.drain()

    def _check_open(self) -> None:
        if self._transport.is_closing():
            raise ConnectionLost("cannot send: the connection is closing or lost")

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
        frames = self._frames
        if not frames:
            first = await self._receive()
            batch = [first, *reversed(frames)]
        else:
            batch = frames[::-1]
        frames.clear()
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
            receiver = self._receiver
            if receiver is None and self._protocol is not None:
                receiver = await self._take_over(self._protocol)
            if receiver is not None:
                await receiver.next_frames(end)
            else:
                await self._read_frames(end)
            return frames.pop()
        finally:
            self._receiving = False

    async def _take_over(self, protocol: StreamProtocol) -> _Receiver[FrameT]:
        """Take the connection's bytes from the protocol: the reader's first, then every read."""
        transport = cast(asyncio.ReadTransport, self._transport)  # it reads, too
        receiver = _Receiver(self, transport, protocol.receive_buffer, protocol.limit)
        self._receiver = receiver
        protocol.attach(receiver)
        # Nothing is fed to the reader any more: what it still holds comes first.
        reader = self._reader
        reader.feed_eof()
        try:
            rest = await reader.read()
        except (ConnectionError, OSError) as exc:
            receiver.connection_lost(exc)
        else:
            if rest:
                receiver.hold(rest)
        return receiver

    async def _read_frames(self, end: type[Exception]) -> None:
        """Read the reader until frames are decoded (a ``StreamReader`` of any protocol)."""
        frames = self._frames
        decoder = self._decoder
        if decoder.pending:
            # An error held back for the frames before it, or the frames
            # after a bad one, not parsed yet: no new input is needed.
            _put(frames, decoder.feed(b""))
        while not frames:
            if self._eof_received:
                decoder.close()
                raise end("end of stream")
            buffered = decoder.buffered
            missing = decoder.missing() if buffered else 0
            # Waiting for the peer ends the turn: a frame sent after it
            # is a lone frame again, written at once.
            self._sender.turn_ended()
            try:
                if missing and missing + buffered >= _LARGE_REST:
                    # A large frame: read the rest of it in one piece,
                    # copied once, as readexactly-per-frame code would.
                    # Frames after it are then read header, then payload
                    # (below), so they never pass through the buffer.
                    self._large_frames = True
                    frames.append(decoder.complete(await self._reader.readexactly(missing)))
                    return
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
            _put(frames, decoder.feed(data))

    async def recv_data(self) -> bytes:
        """Return the bytes received next, unframed: at least one byte, waiting for it.

        For a layer that parses the connection's bytes itself (a sans-IO
        core's ``receive_data``): the first call hands over every byte
        received and not yet returned as a frame, as ``switch_codec`` does;
        from then on the input is not decoded, and each call returns what
        arrived since the last (``recv`` would return it in pieces).
        Sending keeps the codec. Returns ``b""`` at the end of the stream;
        raises :class:`ConnectionLost` if the connection breaks.
        """
        if not isinstance(self._decoder, _Unframed):
            self._switch_decoder(_Unframed())
        try:
            chunks = cast(list[bytes], await self.recv_batch())  # _Unframed's
        except EndOfStream:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def recv_decoded(self, decoder: Decoder[ItemT]) -> list[ItemT]:
        """Return what ``decoder`` makes of the bytes received next: at least one item, waiting.

        For a layer that parses the connection's bytes with a decoder of its
        own (a sans-IO core's, one per connection), as :meth:`recv_data`
        does unparsed: ``decoder`` gets every byte received and not yet
        returned (as after ``switch_codec``), then each read as it comes, as
        this stream's own decoder would. So a decoder that parses in place
        (``Decoder.in_place``) is read for as widely, with no copy of the
        input, and a large message's rest (``Decoder.missing``) comes into
        memory of its own. Sending keeps the codec. Returns ``[]`` at the end
        of the stream; raises the decoder's errors (``IncompleteFrame`` for
        an end inside a message) and :class:`ConnectionLost`.
        """
        if self._decoder is not decoder:
            self._switch_decoder(decoder)
        try:
            return cast(list[ItemT], await self.recv_batch())
        except EndOfStream:
            return []

    def deliver(
        self,
        decoder: Decoder[ItemT],
        received: Callable[[list[ItemT]], None],
        ended: Callable[[StreamkitError], None],
        first: bytes = b"",
    ) -> None:
        """From now on, hand what ``decoder`` makes of the bytes received to ``received``.

        For a layer that reacts to every read itself (a sans-IO core's glue):
        no task waits in ``recv``, so a read costs no task wake-up and no
        extra loop turn. ``received(items)`` is called with what each read
        decoded (never empty), in order, in the event loop's read callback
        (over a :class:`StreamProtocol`; over another reader, from a task
        reading it): first what ``decoder`` makes of ``first`` (bytes the
        caller read ahead and did not use) and of every byte received and
        not returned yet, from the next loop turn on. The decoder is read for
        as :meth:`recv_decoded` reads for it (in place; a large message's
        rest into memory of its own).

        ``ended(error)`` is called once, after the last items, and nothing
        after it: with :class:`EndOfStream` at a clean end, the decoder's
        :class:`~streamkit.errors.ProtocolError` (``IncompleteFrame`` for an
        end inside a message), a ``StreamkitError`` that ``received`` raised,
        or :class:`ConnectionLost`. The stream stays open: closing it is the
        caller's. ``recv`` is not available once delivering; sending keeps
        the codec.
        """
        if self._receiving:
            raise RuntimeError("deliver() called while a task is receiving from this stream")
        self._receiving = True  # for good: recv() raises from now on
        rest = first + self._take_undelivered()
        self._decoder = decoder  # type: ignore[assignment]  # ItemT: the caller's
        receiver = self._receiver
        if receiver is not None:
            receiver.deliver(rest, received, ended)
        else:
            self._delivering = self._loop.create_task(self._deliver_later(rest, received, ended))

    async def _deliver_later(
        self,
        rest: bytes,
        received: Callable[[list[Any]], None],
        ended: Callable[[StreamkitError], None],
    ) -> None:
        """deliver() before the first receive, or over a reader of another protocol."""
        if self._protocol is not None:
            # What the reader holds comes after ``rest``: held, then decoded.
            receiver = await self._take_over(self._protocol)
            receiver.deliver(rest, received, ended)
            return
        frames = self._frames
        try:
            if rest:
                _put(frames, self._decoder.feed(rest))
            while True:
                if not frames:
                    await self._read_frames(EndOfStream)
                got = frames[::-1]
                frames.clear()
                received(got)
        except StreamkitError as exc:
            ended(exc)

    def switch_codec(self, codec: Codec[Any]) -> None:
        """Decode and encode with ``codec`` from now on.

        Every byte received but not yet returned by ``recv`` (including
        frames the old codec had decoded ahead) is handed to the new codec,
        so a protocol can switch framing after a handshake. Frames already
        passed to ``send`` keep the old framing.
        """
        self._sender.flush()
        self._codec = codec
        self._encode_into = codec.encode_into
        self._encode_parts = _parts_encoder(codec)
        self._switch_decoder(codec.decoder())

    def _switch_decoder(self, decoder: Decoder[Any]) -> None:
        """Decode with ``decoder`` from now on, first what the old one had not returned."""
        rest = self._take_undelivered()
        self._decoder = decoder
        if rest:
            _put(self._frames, decoder.feed(rest))

    def _take_undelivered(self) -> bytes:
        """Remove and return the bytes received but not returned as frames.

        The frames decoded ahead, the decoder's partial frame and the
        receiving half's bytes not decoded yet (a large frame's rest
        included); a reader's bytes before the first receive are not among
        them.
        """
        rest = self._decoder.take_buffered(frames=len(self._frames))
        self._frames.clear()
        if self._receiver is not None:
            rest += self._receiver.take_undecoded()
        return rest

    async def _take_received(self) -> bytes:
        """Every byte received and not returned as a frame; the stream reads no more.

        For :func:`splice`, which takes the connection over: the bytes of
        the frames decoded ahead, the decoder's partial frame, and the bytes
        not decoded yet: the receiving half's (a large frame's rest
        included), or, before the first receive, the reader's (it is told
        the input ended, so it hands them all over). The transport is left
        paused: nothing is read until the caller says.
        """
        rest = self._take_undelivered()
        if self._receiver is not None:
            # take_undecoded resumes a paused transport: the caller keeps it paused.
            cast(asyncio.ReadTransport, self._transport).pause_reading()
        else:
            self._reader.feed_eof()
            with contextlib.suppress(ConnectionError, OSError):  # lost: splice sees it closing
                rest += await self._reader.read()
        return rest

    # -- closing ------------------------------------------------------------

    def write_eof(self) -> None:
        """Send the frames buffered so far, then half-close the write side.

        The peer's ``recv`` then sees the end of stream; this side can still
        receive. A transport that cannot half-close (TLS: asyncio's SSL
        transport has no half-close) only sends the buffered frames, and the
        peer sees no end until ``close()``; ``writer.can_write_eof()`` tells
        which.
        """
        self._sender.flush()
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
        self._sender.flush()
        self._writer.close()

    def abort(self) -> None:
        """Close the connection at once, dropping unsent data."""
        self._sender.abort()
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


class TurnWriter:
    """A connection's send side: a lone write goes out at once, a turn's writes together.

    The first write after the producer waited for its peer (or after the
    last end of turn) goes to the transport at once: no latency added, no
    callback. Writes that follow it in the same event-loop turn are
    gathered and written in one piece when the turn ends, or once 64 KiB
    are gathered (less when the transport's buffer is near its high-water
    mark). Large pieces go to the transport as they are, never copied into
    the buffer.

    Two kinds of producer share it, in order: one that encodes into
    :attr:`buffer` and calls :meth:`wrote` (``FramedStream``), and one with
    its own output, registered as :attr:`source` (a sans-IO protocol's
    ``data_to_send``), which calls ``wrote(pending)`` with the bytes it
    has ready and is pulled whenever the writer writes. While
    :attr:`gathering` is true and less than :attr:`flush_at` bytes wait, a
    write needs no call at all. ``wrote`` and :meth:`write_parts` return
    whether the transport's buffer is over its high-water mark: then
    ``await wait_drained()``.
    """

    __slots__ = (
        "_flush_most",
        "_handle",
        "_high_water",
        "_loop",
        "_pieces",
        "_pieces_bytes",
        "_transport",
        "_writer",
        "_wrote_at_once",
        "buffer",
        "flush_at",
        "gathering",
        "source",
    )

    def __init__(
        self, writer: asyncio.StreamWriter, *, high: int | None = None, low: int | None = None
    ) -> None:
        self._writer = writer
        self._transport = transport = writer.transport
        self._loop = asyncio.get_running_loop()
        #: Encoded bytes waiting to be written (after those in _pieces).
        self.buffer = bytearray()
        # Waiting before the buffer's bytes, to be joined with them: frames
        # given in parts (their payloads of APART_PAYLOAD or more uncopied),
        # and the buffer's bytes before each.
        self._pieces: list[Buffer] = []
        self._pieces_bytes = 0
        #: Pulled for the bytes a producer with its own output has ready.
        self.source: Callable[[], list[Buffer]] | None = None
        #: This turn's writes are being gathered, to go out when it ends.
        self.gathering = False
        self._handle: asyncio.Handle | None = None
        # A write went out at once and no end of turn was seen since: the
        # next write starts gathering.
        self._wrote_at_once = False
        if high is not None or low is not None:
            transport.set_write_buffer_limits(high, low)
        self._high_water = transport.get_write_buffer_limits()[1]
        #: Gathered bytes are written once they reach this: at most _FLUSH_SIZE,
        #: and no more than the room left under the high-water mark.
        self.flush_at = _FLUSH_SIZE
        self._flush_most = min(_FLUSH_SIZE, self._high_water)  # flush_at with nothing buffered

    def wrote(self, pending: int = 0) -> bool:
        """Bytes were added to :attr:`buffer` (or ``pending`` bytes at the source): write
        them if due. Returns whether the transport's buffer is over its high-water mark
        (it only grows when we write to it, so it is checked only then)."""
        pending += self._pieces_bytes
        if self._handle is not None:
            if len(self.buffer) + pending < self.flush_at:
                return False
        elif self._wrote_at_once:
            # A second write before the turn ended: gather it and the rest
            # of the turn's writes, and write them together when it ends.
            self._handle = self._loop.call_soon(self._end_turn)
            self.gathering = True
            if len(self.buffer) + pending < self.flush_at:
                return False
        else:
            # A lone write goes out at once: no latency added, and no
            # callback (an extra loop iteration) unless more follow it.
            self._wrote_at_once = True
        self._write_out()
        return self._check_buffer()

    def gather_parts(self, parts: tuple[Buffer, ...]) -> bool:
        """Add a frame given as ``parts`` (they must not change later) after what waits.

        Returns True if it waits with this turn's writes (no call needed),
        else call :meth:`wrote` now.
        """
        buffer = self.buffer
        if buffer:
            self._pieces.append(buffer)
            self.buffer = bytearray()
        self._pieces += parts
        self._pieces_bytes = waiting = self._pieces_bytes + sum(map(len, parts))
        return self.gathering and waiting < self.flush_at

    def write_parts(self, parts: Iterable[Buffer]) -> bool:
        """Write ``parts`` now, in order (a large frame; a handshake's bytes).

        Small parts go through the buffer, large ones to the transport as
        they are: joining them would copy a large payload into the buffer
        first; the transport copies only what the socket does not take at
        once (nothing at all on Python 3.12+). The parts must not change
        later. Returns like :meth:`wrote`.
        """
        for part in parts:
            if len(part) < _LARGE_SEND:
                self.buffer += part
            else:
                self._write_out()  # what was queued before it, and its header
                self._write_large(part)
        self._write_out()
        return self._check_buffer()

    def _write_large(self, part: Buffer) -> None:
        if not self._transport.is_closing():
            # A view: Python 3.11's transport would copy a slice of bytes
            # before buffering the unsent rest.
            self._transport.write(memoryview(part))

    def turn_ended(self) -> None:
        """The producer waits for its peer: the next write is a lone one again."""
        self._wrote_at_once = False

    @property
    def must_drain(self) -> bool:
        """Whether the transport's buffer is over its high-water mark."""
        return self._transport.get_write_buffer_size() > self._high_water

    def flush(self) -> None:
        """Write everything waiting now."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.gathering = False
        self._write_out()

    async def drain(self) -> None:
        """Write everything waiting, then wait until the transport can take more."""
        self.flush()
        await self.wait_drained()

    async def wait_drained(self) -> None:
        """Wait until the transport's buffer is below its low-water mark.

        Raises :class:`ConnectionLost` if the connection broke.
        """
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost while sending: {exc!r}") from exc

    def abort(self) -> None:
        """Drop everything waiting (the connection is being aborted)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.gathering = False
        self.buffer = bytearray()
        self._pieces = []
        self._pieces_bytes = 0

    def _check_buffer(self) -> bool:
        """After a write: whether the transport's buffer is over its high-water mark."""
        buffered = self._transport.get_write_buffer_size()
        if not buffered:  # all sent: the common case of a lone write
            self.flush_at = self._flush_most
            return False
        # The buffer only shrinks until our next write, so gathering no more
        # than the room left keeps it within the high-water mark plus a write.
        self.flush_at = min(_FLUSH_SIZE, self._high_water - buffered)
        return buffered > self._high_water

    def _end_turn(self) -> None:
        self._handle = None
        self.gathering = False
        self._wrote_at_once = False
        self._write_out()

    def _write_out(self) -> None:
        transport = self._transport
        out: Buffer = self.buffer
        if out:
            # Hand the buffer over and start a new one: the transport may
            # keep a reference to what it could not send yet.
            self.buffer = bytearray()
        pieces = self._pieces
        if pieces:
            if out:
                pieces.append(out)
            out = b"".join(pieces)
            self._pieces = []
            self._pieces_bytes = 0
        if out and not transport.is_closing():
            transport.write(out)
        source = self.source
        if source is not None:
            for part in source():
                if len(part) >= _LARGE_SEND and type(part) is bytes:
                    self._write_large(part)
                elif not transport.is_closing():
                    transport.write(part)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a task's exception as retrieved (a reset while closing is no error)."""
    if not task.cancelled():
        task.exception()


#: Each event loop's receive buffer (see StreamProtocol): scratch memory, which
#: every read leaves before the next one starts, so one serves all connections.
_loop_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


def _loop_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    """The receive buffer of ``loop``, made on first use."""
    buffer = _loop_buffers.get(loop)
    if buffer is None:
        buffer = _loop_buffers[loop] = memoryview(bytearray(RECEIVE_BUFFER_SIZE))
    return buffer


class StreamProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """The asyncio protocol under streamkit's connections: every read goes into one reused buffer.

    Why (DESIGN, performance principles): asyncio's stock stream protocol
    gets each read from the transport as a new ``bytes`` of up to 256 KiB
    (over TLS, one per decrypted read), and the ``StreamReader`` copies it
    into a ``bytearray`` that grows and shrinks with every read. With glibc's
    default malloc thresholds that memory goes back to the kernel when freed
    and is faulted in again by the next reads: 250 to 400 minor page faults
    per MB received (600 over TLS), half of the receiver's CPU at 4 KiB to
    64 KiB frames (``benchmarks/bench_streams.py``, faults/MB). This protocol
    is an ``asyncio.BufferedProtocol``: the transport reads into one buffer
    handed to it every time, so receiving allocates nothing per read and the
    process's memory stays put. Users need not tune their allocator.

    The ``StreamReader`` shape stays: the bytes go to the connection's
    reader (a handshake can read it; ``read_frame(reader)`` works) until a
    :class:`FramedStream` over it starts receiving. From its first receive
    on, the stream takes the bytes itself (:meth:`attach`): frames are
    parsed straight out of the buffer, and the rest of a large frame is read
    straight into memory of its own, rather than through the reader's
    buffer: two copies and a task wake-up per read fewer (at 4 KiB frames,
    through the reader with the reused buffer the receiver took 800 us of
    CPU per MB, taking the reads itself 550), and a 1 MiB frame costs its
    own copy and little more. The reader then reports the end of the stream.

    One buffer serves every connection of an event loop, because every
    read is consumed before the next one starts: the transport calls
    :meth:`get_buffer`, reads, and calls :meth:`buffer_updated` in one go.
    TLS works the same way (asyncio's SSL layer decrypts straight into the
    buffer). A transport that reads into its own memory instead (uvloop's,
    for a protocol that is both kinds) calls :meth:`data_received`, and the
    bytes take the same path from there.

    ``pause_reading`` / ``resume_reading`` keep their meaning: the reader
    pauses the transport past twice its ``limit`` as before, and a stream's
    receiving half past ``limit`` (at most 256 KiB, see _Receiver) bytes
    received and not yet decoded.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
        | None = None,
        *,
        limit: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(reader, client_connected_cb, loop=loop)
        self._reader = weakref.ref(reader)
        self._limit = limit
        #: Where reads go (but a large frame's rest): the event loop's one buffer.
        self.receive_buffer = _loop_buffer(loop)
        self._receiver: _Receiver[Any] | None = None
        self._eof = False  # the end of the input was seen
        self._lost: tuple[Exception | None] | None = None  # connection_lost's argument

    @classmethod
    def factory(
        cls,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        *,
        limit: int,
    ) -> Callable[[], StreamProtocol]:
        """A protocol factory for ``loop.create_server``, as ``asyncio.start_server`` makes.

        ``client_connected_cb(reader, writer)`` is called for each
        connection; every connection's reader has this ``limit``.
        """
        loop = asyncio.get_running_loop()
        _loop_buffer(loop)  # now, not with the first connection

        def make() -> StreamProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return cls(reader, client_connected_cb, limit=limit)

        return make

    @classmethod
    async def open(
        cls,
        create_connection: Callable[
            [Callable[[], StreamProtocol]], Awaitable[tuple[asyncio.BaseTransport, Any]]
        ],
        *,
        limit: int,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connected reader and writer, as ``asyncio.open_connection`` returns.

        ``create_connection(protocol_factory)`` opens the connection, e.g.
        ``lambda factory: loop.create_connection(factory, host, port)``.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = cls(reader, limit=limit)
        transport, _ = await create_connection(lambda: protocol)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]

    @property
    def reader(self) -> asyncio.StreamReader | None:
        """The reader this protocol feeds (``None`` once it is gone)."""
        return self._reader()

    @property
    def limit(self) -> int:
        """The reader's ``limit``, which also bounds what an attached stream holds."""
        return self._limit

    def attach(self, receiver: _Receiver[Any]) -> None:
        """Send every read, and the end of the input, to ``receiver`` from now on.

        The reader gets nothing more; what it holds is the caller's to take.
        An end of the input or a lost connection seen already is passed on.
        """
        self._receiver = receiver
        if self._eof:
            receiver.eof_received()
        if self._lost is not None:
            receiver.connection_lost(self._lost[0])

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport reads next: the receive buffer, or a large frame's own memory."""
        receiver = self._receiver
        return self.receive_buffer if receiver is None else receiver.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were read into the buffer :meth:`get_buffer` returned."""
        receiver = self._receiver
        if receiver is None:
            # Any buffer does: the reader copies it into its own.
            super().data_received(self.receive_buffer[:nbytes])  # type: ignore[arg-type]
        else:
            receiver.buffer_updated(nbytes)

    def data_received(self, data: bytes) -> None:
        """Bytes read by a transport that does not use :meth:`get_buffer`.

        uvloop's transports, for one, treat a protocol that is both kinds as
        a plain one (and read into a buffer of their own).
        """
        receiver = self._receiver
        if receiver is None:
            super().data_received(data)
        else:
            receiver.data_received(data)

    def eof_received(self) -> bool:
        self._eof = True
        receiver = self._receiver
        if receiver is not None:
            receiver.eof_received()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = (exc,)
        receiver = self._receiver
        if receiver is not None:
            receiver.connection_lost(exc)
        super().connection_lost(exc)


class _Receiver(Generic[FrameT]):
    """A FramedStream's receiving half once it takes its StreamProtocol's reads.

    The protocol calls it, in the event loop's callbacks, with every read
    (the receive buffer's bytes are valid during the call only). A read is
    decoded at once while no decoded frame waits to be returned, so the
    decoder only ever holds the bytes of its last feed's frames (what
    ``take_buffered(frames=...)`` needs for ``switch_codec``); otherwise it
    is held, as bytes, and decoded once those frames are taken. Past
    :data:`_MAX_HELD` held bytes (or the reader's ``limit``, if lower) the
    transport is paused until they are decoded. Not past ``limit`` alone:
    uvloop's transports make up to 32 reads in a row (libuv's read loop)
    before the stream's task runs, so all but the first are held; held up to
    a large ``limit`` (one that fits long lines, 4 MiB in the benchmark),
    those copies and the frames made of them came and went in megabyte
    bursts that glibc gave back to the kernel and faulted in again: 160 to
    240 minor faults per MB at 4 KiB and 64 KiB lines, slower than naive
    asyncio, whose reader keeps one buffer (3 faults per MB held to 256
    KiB). A paused transport leaves the rest in the socket, which is where
    flow control wants it anyway.

    With nothing waiting, the rest of a large frame of known size is read
    straight into memory of its own, allocated as the bytes arrive (never
    more than twice what came), and completed when the stream takes it.

    Reads are of the whole receive buffer (fewer, larger reads) only while
    frames are large, none wait and the decoder parses the buffer in place
    (``Decoder.in_place``); else of :data:`_SMALL_READ` bytes. So no read
    is copied whole in more than that much memory (held, or by a decoder
    that copies its input), and the frames of one read of tiny frames fit
    the allocator's free memory: larger allocations and bursts of
    short-lived objects go back to the kernel when freed and are faulted in
    again (glibc's malloc, Python's arenas).
    """

    __slots__ = (
        "_buffer",
        "_completed",
        "_ended",
        "_ended_cb",
        "_error",
        "_filled",
        "_frames",
        "_header_next",
        "_held",
        "_held_bytes",
        "_large_got",
        "_large_missing",
        "_limit",
        "_lost",
        "_paused",
        "_piece",
        "_pieces",
        "_received_cb",
        "_small",
        "_spares",
        "_stream",
        "_transport",
        "_waiter",
        "_wide",
    )

    def __init__(
        self,
        stream: FramedStream[FrameT],
        transport: asyncio.ReadTransport,
        buffer: memoryview,
        limit: int,
    ) -> None:
        self._stream = stream
        self._transport = transport
        self._frames = stream._frames  # filled in place, last first
        self._buffer = buffer
        self._small = buffer[:_SMALL_READ]
        self._wide = False  # the last frames were large: read the whole buffer
        self._header_next = False  # a large frame was just read: read the next header alone
        # Not the reader's limit alone: see _Receiver (held reads).
        self._limit = min(limit, _MAX_HELD)
        self._held: list[bytes] = []  # reads not decoded yet, in order
        self._held_bytes = 0
        self._error: ProtocolError | None = None  # raised by a feed, for the stream to raise
        self._ended = False
        self._lost: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        # A large frame's rest, read into pieces of its own.
        self._pieces: list[memoryview] = []
        self._piece: memoryview | None = None  # the piece being filled
        self._filled = 0  # bytes in it
        self._large_got = 0
        self._large_missing = 0
        self._completed: list[Buffer] | None = None  # the rest, read: complete() it when taken
        self._spares = _spare_pieces(stream._loop)
        # FramedStream.deliver's callbacks, once delivering.
        self._received_cb: Callable[[list[Any]], None] | None = None
        self._ended_cb: Callable[[StreamkitError], None] | None = None

    # -- called by the protocol, in the event loop's callbacks ----------------------------

    def get_buffer(self) -> memoryview:
        piece = self._piece
        if piece is not None:
            return piece[self._filled :]
        if self._waiting():
            return self._small  # held: a copy of at most this much
        if self._header_next:
            # After a large frame, just the next header: a large payload
            # after it then comes straight into its own memory, uncopied.
            header = self._stream._decoder.header_missing()
            if header:
                return self._buffer[:header]
        return self._buffer if self._wide else self._small

    def buffer_updated(self, nbytes: int) -> None:
        if self._piece is not None:
            self._large_updated(nbytes)
        else:
            self._received(self._buffer[:nbytes])

    def data_received(self, data: bytes) -> None:
        """A read the transport made into memory of its own (see StreamProtocol.data_received).

        Taken in copies of at most _SMALL_READ bytes, as reads into the
        receive buffer are, so that nothing made of that read (up to 256 KiB
        on uvloop: a decoder's copy joined to a partial frame, the text of
        its lines) is larger: decoded whole, such copies made glibc give
        memory back to the kernel and fault it in again (110 to 140 faults
        per MB at 4 KiB and 64 KiB lines on uvloop, with held reads bounded
        as they are now). Held, they are copies too: views of the read kept
        it alive, and the fault churn came back (183 per MB). A large
        frame's rest goes into its own memory, as read into it.
        """
        view = memoryview(data)
        while view:
            if self._piece is not None:
                piece = self.get_buffer()
                size = min(len(piece), len(view))
                piece[:size] = view[:size]
                view = view[size:]
                self._large_updated(size)
            else:
                chunk, view = view[:_SMALL_READ], view[_SMALL_READ:]
                self._received(chunk.tobytes())

    def _received(self, data: Buffer) -> None:
        """A read (valid during this call only, unless it is bytes)."""
        self._header_next = False
        if self._waiting():
            self.hold(data if type(data) is bytes else bytes(data))
            return
        decoder = self._stream._decoder
        try:
            got = decoder.feed(data)
        except ProtocolError as exc:
            self._error = exc
            self._wake()
            return
        # Wide reads only where they cost no copy of the read (see _Receiver).
        if got:
            self._wide = decoder.in_place and len(data) >= _LARGE_FRAMES * len(got)
            _put(self._frames, got)
            self._wake()  # or, delivering, hand them over
        else:
            self._wide = decoder.in_place
            self._start_large()

    def eof_received(self) -> None:
        self._give_back_large()
        self._ended = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            if not self._ended:
                self.eof_received()
            return
        self._lost = exc
        self._wake()

    # -- called by the stream -------------------------------------------------------------

    def hold(self, data: bytes) -> None:
        """Keep ``data`` to decode after what waits now."""
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self._limit and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    async def next_frames(self, end: type[Exception]) -> None:
        """Wait until the stream's frame list (empty) has frames; raise what ends the input."""
        stream = self._stream
        frames = self._frames
        while True:
            if not self._take_next(end):
                self._start_large()
                # Waiting for the peer ends the turn: a frame sent after it
                # is a lone frame again, written at once.
                stream._sender.turn_ended()
                waiter = self._waiter = stream._loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
            if frames:
                return

    def deliver(
        self,
        rest: bytes,
        received: Callable[[list[Any]], None],
        ended: Callable[[StreamkitError], None],
    ) -> None:
        """Hand decoded frames to ``received`` from the next loop turn on (FramedStream.deliver).

        ``rest`` is decoded first, then what this receiver holds, then each
        read in the read callback. Until then, reads are held or decoded
        ahead, as for a receive to come.
        """
        if rest:
            self._held.insert(0, rest)
            self._held_bytes += len(rest)
        self._stream._loop.call_soon(self._begin, received, ended)

    def take_undecoded(self) -> bytes:
        """Remove and return the bytes received but not given to the decoder (switch_codec)."""
        self._give_back_large()
        completed, self._completed = self._completed or [], None
        rest = b"".join([*completed, *self._held])
        self._give_back_pieces(completed)
        self._held.clear()
        self._held_bytes = 0
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        return rest

    # -- inside ---------------------------------------------------------------------------

    def _take_next(self, end: type[Exception]) -> bool:
        """Move what waits to be decoded into the frame list (empty), one step of it.

        Returns False if nothing waits: the peer must send more. Raises what
        ends the input (``end`` at a clean end) once it is next.
        """
        frames = self._frames
        decoder = self._stream._decoder
        if self._completed is not None:
            rest, self._completed = self._completed, None
            frames.append(decoder.complete(rest))
            self._give_back_pieces(rest)
        elif self._error is not None:
            error, self._error = self._error, None
            raise error
        elif decoder.pending:
            # An error held back for the frames before it, or the frames
            # after a bad one, not parsed yet: no new input is needed.
            _put(frames, decoder.feed(b""))
        elif self._held:
            held = self._held
            data = held.pop(0)
            self._held_bytes -= len(data)
            if not held and self._paused:
                self._paused = False
                self._transport.resume_reading()
            _put(frames, decoder.feed(data))
        elif self._lost is not None:
            raise ConnectionLost(f"connection lost: {self._lost!r}") from self._lost
        elif self._ended:
            decoder.close()
            raise end("end of stream")
        else:
            return False
        return True

    def _begin(
        self, received: Callable[[list[Any]], None], ended: Callable[[StreamkitError], None]
    ) -> None:
        self._received_cb = received
        self._ended_cb = ended
        self._pump()

    def _pump(self) -> None:
        """Hand everything that waits to the deliver() callbacks: frames, then the end."""
        frames = self._frames
        try:
            while self._received_cb is not None:
                if frames:
                    got = frames[::-1]
                    frames.clear()
                    self._received_cb(got)
                elif not self._take_next(EndOfStream):
                    break
        except StreamkitError as exc:
            self._end_delivery(exc)
            return
        if self._received_cb is not None:
            # Each read is a turn: a frame sent after it is written at once.
            self._stream._sender.turn_ended()
            self._start_large()

    def _end_delivery(self, error: StreamkitError) -> None:
        ended = self._ended_cb
        self._received_cb = self._ended_cb = None
        if ended is not None:
            ended(error)

    def _waiting(self) -> bool:
        """Whether something received waits to be taken: a new read is then held."""
        return bool(
            self._frames
            or self._held
            or self._completed is not None
            or self._error is not None
            or self._stream._decoder.pending
        )

    def _wake(self) -> None:
        if self._received_cb is not None:
            self._pump()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start_large(self) -> None:
        """With nothing waiting: read a large frame's rest (size known) into its own memory."""
        if self._piece is not None or self._held:
            return
        decoder = self._stream._decoder
        buffered = decoder.buffered
        missing = decoder.missing() if buffered else 0
        # A smaller rest comes with the next read, joined to what is buffered,
        # unless the decoder would copy that read whole (not in place).
        if missing >= (RECEIVE_BUFFER_SIZE if decoder.in_place else _LARGE_REST):
            self._large_missing = missing
            self._large_got = 0
            self._new_piece(buffered)

    def _new_piece(self, have: int) -> None:
        # At most as large as what came of the frame so far (a header alone
        # never makes us allocate max_frame), and at least one buffer.
        size = min(self._large_missing - self._large_got, max(RECEIVE_BUFFER_SIZE, have))
        piece = self._piece = memoryview(self._spares.take(size))[:size]
        self._pieces.append(piece)
        self._filled = 0

    def _large_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self._large_got += nbytes
        piece = self._piece
        assert piece is not None
        if self._filled < len(piece):
            return
        if self._large_got < self._large_missing:
            self._new_piece(self._stream._decoder.buffered + self._large_got)
            return
        self._completed = self._filled_pieces()
        self._end_large()
        self._header_next = True
        self._wake()

    def _filled_pieces(self) -> list[Buffer]:
        """What the pieces hold: views of them (the last one up to what was read into it)."""
        assert self._piece is not None
        return [*self._pieces[:-1], self._piece[: self._filled]]

    def _end_large(self) -> None:
        if self._piece is not None:
            self._piece.release()
        self._piece = None
        self._pieces = []

    def _give_back_pieces(self, views: list[Buffer]) -> None:
        """The frame made of ``views`` (see _filled_pieces) is complete: their memory is spare."""
        for view in views:
            assert isinstance(view, memoryview)
            piece = view.obj
            try:
                view.release()
            except BufferError:
                continue  # a decoder kept a view of it: not for reuse
            self._spares.give(cast(bytearray, piece))

    def _give_back_large(self) -> None:
        """End a large frame's read early: what came of it is held, to decode first."""
        piece = self._piece
        if piece is None:
            return
        came = self._filled_pieces()
        data = b"".join(came)
        self._end_large()
        self._give_back_pieces(came)
        if data:
            self._held.insert(0, data)
            self._held_bytes += len(data)


class _Pieces:
    """An event loop's spare memory for large frames' rests (see _Receiver), up to a bound.

    Why (DESIGN, performance principles): a large frame's rest is read into
    pieces of memory of its own, then copied once into the frame. Fresh
    pieces for every frame are fresh memory from the kernel whenever glibc's
    malloc hands freed large blocks back (its thresholds move with what the
    process freed before): at 1 MiB frames, 460 minor page faults per MB
    received and a quarter of the speed (benchmarks/bench_session.py), or
    none, by the history of the process. Pieces kept for the next frames
    cost no fault, whatever that history. Sizes are rounded up to whole
    receive buffers, so frames of any size share them, and at most
    ``_SPARE_PIECES`` bytes are kept per event loop.
    """

    __slots__ = ("_bytes", "_spare")

    def __init__(self) -> None:
        self._spare: dict[int, list[bytearray]] = {}  # by size
        self._bytes = 0

    def take(self, size: int) -> bytearray:
        """Memory for at least ``size`` bytes: a spare piece, else a new one."""
        rounded = -(-size // RECEIVE_BUFFER_SIZE) * RECEIVE_BUFFER_SIZE
        spare = self._spare.get(rounded)
        if spare:
            self._bytes -= rounded
            return spare.pop()
        return bytearray(rounded)

    def give(self, piece: bytearray) -> None:
        """``piece`` (from :meth:`take`) is free: keep it, if there is room."""
        size = len(piece)
        if self._bytes + size <= _SPARE_PIECES:
            self._spare.setdefault(size, []).append(piece)
            self._bytes += size


def _spare_pieces(loop: asyncio.AbstractEventLoop) -> _Pieces:
    """The spare pieces of ``loop``, made on first use."""
    pieces = _loop_pieces.get(loop)
    if pieces is None:
        pieces = _loop_pieces[loop] = _Pieces()
    return pieces


#: Each event loop's spare pieces (see _Pieces).
_loop_pieces: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pieces] = (
    weakref.WeakKeyDictionary()
)


class _Unframed(Decoder[bytes]):
    """No framing: each input comes out whole, as it came (``FramedStream.recv_data``)."""

    __slots__ = ()

    def feed(self, data: Buffer) -> list[bytes]:
        """Return ``data`` as one frame (a copy, when it is not ``bytes``)."""
        if not data:
            return []
        chunk = data if type(data) is bytes else bytes(data)
        self._buf, self._pos = chunk, len(chunk)  # for take_buffered(frames=1)
        return [chunk]

    def _fresh(self) -> _Unframed:
        return _Unframed()


def _put(frames: list[FrameT], got: list[FrameT]) -> None:
    """Make ``got`` (decoded, in order) the frames to return, in ``frames`` (empty), last first."""
    if got:
        got.reverse()
        frames += got


def _parts_encoder(codec: Codec[Any]) -> Callable[[Any], tuple[Buffer, ...]] | None:
    """The codec's ``encode_parts``, if it has one (it is optional)."""
    parts: Callable[[Any], tuple[Buffer, ...]] | None = getattr(codec, "encode_parts", None)
    return parts


class _SpliceSide(asyncio.Protocol):
    """One connection of a splice: what it receives goes to the other's transport.

    Flow control both ways: while this transport's write buffer is over its
    high-water mark, the other connection is not read. The connection's own
    protocol (its stream's) still hears of the end, so the stream's
    ``wait_closed()`` works as ever.
    """

    def __init__(self, transport: asyncio.Transport, lost: asyncio.Future[None]) -> None:
        self.transport = transport
        self.previous = transport.get_protocol()
        self.peer = self
        self.paused = False  # our write buffer is full: the peer is not read
        self.lost = lost

    def data_received(self, data: bytes) -> None:
        peer = self.peer.transport
        if not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        return False  # a session never half-closes: the transport closes, which ends both

    def pause_writing(self) -> None:
        self.paused = True
        if not self.peer.transport.is_closing():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.previous.connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


#: Bytes a kernel splice holds in each direction's pipe (F_SETPIPE_SZ; the default is 64 KiB): what
#: one of asyncio's reads takes (max_size); a larger pipe saved little CPU, and pipes count
#: against a user's pipe-user-pages-soft (64 MiB), past which new pipes are small.
_PIPE_SIZE = 1 << 18
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)  # Linux


def _kernel_sockets(transports: list[asyncio.Transport]) -> list[int] | None:
    """The descriptors of the plain sockets under ``transports``, if the kernel can splice them.

    Not for TLS (the bytes must be decrypted and encrypted in this process),
    nor while a transport still holds bytes to write (they would go after
    what the kernel forwards).
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "splice"):
        return None
    sockets = []
    for transport in transports:
        sock = transport.get_extra_info("socket")
        if (
            transport.get_extra_info("sslcontext") is not None
            or sock is None
            or sock.type != socket.SOCK_STREAM
            or transport.get_write_buffer_size()
        ):
            return None
        sockets.append(sock.fileno())
    return sockets


class _KernelPipe:
    """One direction of a kernel splice: socket -> pipe -> socket, no byte through Python.

    Flow control: the source is read (``os.splice`` into the pipe) only
    while the pipe is empty; while the destination cannot take the pipe's
    bytes, the source is not read. ``first`` (bytes read ahead before the
    splice) goes before anything read from the source.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: int,
        sink: int,
        first: bytes,
        ended: asyncio.Future[None],
        pipe: tuple[int, int],
    ) -> None:
        self.loop, self.source, self.sink, self.ended = loop, source, sink, ended
        self.first = memoryview(first)
        self.held = 0  # bytes in the pipe
        self.pipe_out, self.pipe_in = pipe
        self.reading = self.writing = False

    def start(self) -> None:
        self._writable()

    def _read(self, on: bool) -> None:
        if on != self.reading:
            self.reading = on
            if on:
                self.loop.add_reader(self.source, self._readable)
            else:
                self.loop.remove_reader(self.source)

    def _write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            if on:
                self.loop.add_writer(self.sink, self._writable)
            else:
                self.loop.remove_writer(self.sink)

    def _flush(self) -> bool:
        """Move what is held to the sink; False when it cannot take it all now."""
        while self.first:
            try:
                self.first = self.first[os.write(self.sink, self.first) :]
            except BlockingIOError:
                return False
        while self.held:
            try:
                self.held -= os.splice(self.pipe_out, self.sink, self.held, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
        return True

    def _readable(self) -> None:
        try:
            count = os.splice(self.source, self.pipe_in, _PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            count = 0  # reset: the connection ends as at its end of stream
        if not count:
            self._end()
            return
        self.held += count
        self._writable()

    def _writable(self) -> None:
        try:
            flushed = self._flush()
        except OSError:
            self._end()
            return
        self._write(not flushed)
        self._read(flushed)

    def _end(self) -> None:
        self.stop()
        if not self.ended.done():
            self.ended.set_result(None)

    def stop(self) -> None:
        self._read(False)
        self._write(False)

    def leftover(self) -> bytes:
        """What was read and not passed on yet (a pipe holds up to _PIPE_SIZE)."""
        rest = bytes(self.first)
        while self.held:
            piece = os.read(self.pipe_out, self.held)
            self.held -= len(piece)
            rest += piece
        return rest


def _kernel_descriptors(sockets: list[int]) -> list[int] | None:
    """Duplicates of ``sockets``, then each direction's pipe (read end, write end).

    None, with nothing left open, when the process cannot have them now
    (EMFILE, ENFILE, a user's pipe limit): the transports copy instead.
    """
    opened: list[int] = []
    try:
        for sock in sockets:
            opened.append(os.dup(sock))
        for _ in sockets:
            opened.extend(os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError:
        for fd in opened:
            os.close(fd)
        return None
    import fcntl  # here: POSIX only, and a kernel splice is Linux only

    for pipe_in in opened[3::2]:
        with contextlib.suppress(OSError):  # a smaller pipe only means more, smaller splices
            fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    return opened


async def _splice_in_kernel(
    transports: list[asyncio.Transport], descriptors: list[int], first: list[bytes]
) -> None:
    """Copy between the sockets under ``transports`` with ``os.splice`` until either one ends.

    ``first[i]`` goes to ``transports[i]``'s socket before anything else. The transports
    stay paused (reading) and idle (writing) meanwhile; the loop watches
    ``descriptors`` (from ``_kernel_descriptors``), which no transport owns
    and which are closed on every way out. When either direction ends, or
    either transport is closed (by its stream, say), what each had read and
    not passed on yet goes to its destination's transport, which flushes it
    when it is closed, as the protocol path's write buffers are.
    """
    try:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        sides = [_SpliceSide(transport, ended) for transport in transports]
        for side in sides:  # hears of a transport closed meanwhile: it ends the splice
            side.transport.set_protocol(side)
        fds, pipe_ends = descriptors[:2], descriptors[2:]
        pipes = [
            _KernelPipe(loop, fds[1], fds[0], first[0], ended, (pipe_ends[0], pipe_ends[1])),
            _KernelPipe(loop, fds[0], fds[1], first[1], ended, (pipe_ends[2], pipe_ends[3])),
        ]
        try:
            for pipe in pipes:
                pipe.start()
            await ended
        finally:
            for pipe in pipes:
                pipe.stop()
        for pipe, transport in zip(pipes, transports, strict=True):
            rest = pipe.leftover()
            if rest and not transport.is_closing():
                transport.write(rest)
    finally:
        for fd in descriptors:
            os.close(fd)


async def splice(one: FramedStream[Any], other: FramedStream[Any]) -> None:
    """Copy bytes between the connections of ``one`` and ``other``, both ways, until either ends.

    For a relay (a session's front, a proxy): from the call on, the two
    connections are one. Bytes each stream received but did not return
    (read ahead of its last frame) go to the other connection first; then
    every read, as it comes, straight from transport to transport: no task
    wakes up per read, nothing is decoded. Between two plain sockets on
    Linux the bytes do not even enter the process: ``os.splice`` moves them
    socket -> pipe -> socket in the kernel, and a side is read only while
    its pipe (256 KiB) is empty, so a slow reader makes the writer wait.
    Elsewhere (TLS, other systems, no descriptors to spare for the pipes)
    the transports copy, and the flow control is theirs:
    while a side's write buffer is over its high-water mark, the other
    side is not read. Either way a relay holds at most about a write
    buffer or a pipe each way. When either
    connection ends (closed by its peer, reset), the other is closed once
    what it was sent is flushed (within its ``close_timeout``), and
    ``splice`` returns when both are closed. Cancelling it aborts both.
    The streams carry no frames afterwards.
    """
    loop = asyncio.get_running_loop()
    streams = (one, other)
    lost: asyncio.Future[None] = loop.create_future()
    try:
        transports = [cast(asyncio.Transport, stream._transport) for stream in streams]
        for transport in transports:
            transport.pause_reading()
        pending = [await stream._take_received() for stream in streams]
        for stream in streams:  # what each had to send goes first, under its flow control
            await stream.drain()
        kernel = _kernel_sockets(transports)
        if any(stream.is_closing() for stream in streams):
            pass
        elif kernel is not None and (descriptors := _kernel_descriptors(kernel)) is not None:
            await _splice_in_kernel(transports, descriptors, pending[::-1])
        else:
            sides = [_SpliceSide(transport, lost) for transport in transports]
            sides[0].peer, sides[1].peer = sides[1], sides[0]
            for side in sides:
                side.transport.set_protocol(side)
            for side, data in zip(sides, pending[::-1], strict=True):
                if data:
                    side.transport.write(data)  # may pause the peer's reading
            for side in sides:
                if not side.peer.paused:
                    side.transport.resume_reading()
            await lost
    except (ConnectionLost, ConnectionError):
        pass  # one side was lost before the splice began: it ends as if after
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    for stream in streams:
        stream.close()
    await asyncio.gather(one.wait_closed(), other.wait_closed())
