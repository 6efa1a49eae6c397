"""PASSTHROUGH: a codec of no framing, for the unframed bytes of a relay link's handshake.

Each read is one "frame", sent as it is: a :class:`~streamkit.stream.FramedStream`
with it reads raw bytes (``recv_batch``) and writes them (``send_nowait``),
with the stream's flow control and its TLS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from streamkit.codecs import Buffer, Decoder
from streamkit.errors import EndOfStream, ProtocolError

if TYPE_CHECKING:
    from asyncio import StreamReader

__all__ = ["PASSTHROUGH"]


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
