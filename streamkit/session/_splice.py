"""Copy bytes both ways between two connections: a relayed session's front after its handshake.

Both connections are :class:`~streamkit.stream.FramedStream` objects switched
to :data:`PASSTHROUGH`, a codec whose every read is one frame, so the bytes
they had read ahead of their handshake are the first to go across, and
``send`` brings FramedStream's flow control: a side that stops reading makes
the other side's reads stop, and the relay holds at most a read and a write
buffer each way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from streamkit.codecs import Buffer, Decoder
from streamkit.errors import ConnectionLost, EndOfStream, ProtocolError
from streamkit.stream import FramedStream

if TYPE_CHECKING:
    from asyncio import StreamReader

__all__ = ["PASSTHROUGH", "splice"]


class _PassthroughDecoder(Decoder[bytes]):
    """Every byte fed is a frame: whatever a read returned, as it is."""

    __slots__ = ()

    def _parse(self, frames: list[bytes]) -> None:
        buf = self._buf
        pos = self._pos
        if pos < len(buf):
            frames.append(buf if type(buf) is bytes and not pos else bytes(buf[pos:]))
            self._pos = len(buf)

    def _incomplete(self) -> ProtocolError:  # pragma: no cover - nothing is ever partial
        raise AssertionError("a passthrough decoder holds no partial frame")

    def _fresh(self) -> Decoder[bytes]:
        return _PassthroughDecoder()


class _Passthrough:
    """Bytes as they are, both ways: no framing (each read is a "frame")."""

    __slots__ = ()

    @property
    def max_frame(self) -> int:
        return 2**63 - 1

    def encode(self, frame: Buffer) -> bytes:
        return bytes(frame)

    def encode_into(self, out: bytearray, frame: Buffer) -> None:
        out += frame

    def encode_many(self, frames: Iterable[Buffer]) -> bytes:
        return b"".join(frames)

    def encode_parts(self, frame: Buffer) -> tuple[Buffer, ...]:
        return (frame if type(frame) is bytes else bytes(frame),)

    def decoder(self) -> Decoder[bytes]:
        return _PassthroughDecoder()

    async def read_frame(self, reader: StreamReader) -> bytes:
        data = await reader.read(64 * 1024)
        if not data:
            raise EndOfStream("end of stream")
        return data

    def __repr__(self) -> str:
        return "PASSTHROUGH"


#: The codec of a spliced connection: bytes in, the same bytes out.
PASSTHROUGH = _Passthrough()


async def _pipe(source: FramedStream[bytes], target: FramedStream[bytes]) -> None:
    """Copy ``source`` to ``target`` until ``source`` ends or either breaks."""
    with contextlib.suppress(EndOfStream, ConnectionLost, OSError):
        while True:
            for chunk in await source.recv_batch():
                await target.send(chunk)


async def splice(one: FramedStream[bytes], other: FramedStream[bytes]) -> None:
    """Copy bytes between ``one`` and ``other`` both ways until either ends; close both.

    Each stream is switched to :data:`PASSTHROUGH` first: what it read
    ahead goes across before anything else. When either side ends its
    stream or its connection breaks, both are closed together (the bytes
    already taken are flushed to the other side within its
    ``close_timeout``). Cancelling aborts both connections.
    """
    one.switch_codec(PASSTHROUGH)
    other.switch_codec(PASSTHROUGH)
    pipes = (
        asyncio.ensure_future(_pipe(one, other)),
        asyncio.ensure_future(_pipe(other, one)),
    )
    try:
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        one.abort()
        other.abort()
        raise
    finally:
        for pipe in pipes:
            pipe.cancel()
        # Both end here, whatever happened: no pipe outlives the splice.
        await asyncio.gather(*pipes, return_exceptions=True)
    one.close()
    other.close()
    await asyncio.gather(one.wait_closed(), other.wait_closed())
