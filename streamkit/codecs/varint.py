"""Unsigned LEB128 varints (protobuf's base-128 varint), the one copy in streamkit.

Used by :class:`~streamkit.codecs.VarintPrefixed` and by any higher layer
that writes varints on the wire.
"""

from __future__ import annotations

from streamkit.errors import ProtocolError

__all__ = ["MAX_VARINT_BYTES", "decode_varint", "encode_varint"]

#: A uint64 needs at most 10 varint bytes; more is a malformed varint.
MAX_VARINT_BYTES = 10
_MAX_UINT64 = (1 << 64) - 1

# One-byte varints are the common case: build them once.
_SMALL = [bytes([n]) for n in range(0x80)]


def encode_varint(value: int) -> bytes:
    """Return the unsigned LEB128 encoding of ``value`` (0 <= value < 2**64)."""
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0 or value > _MAX_UINT64:
        raise ValueError(f"varint value {value} is outside 0..2**64-1")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode the varint at ``data[pos:]``.

    Returns ``(value, position after the varint)``, or ``None`` when the
    varint is not complete yet. Raises :class:`~streamkit.errors.ProtocolError`
    for a varint longer than 10 bytes or a value over 2**64-1. Non-minimal
    encodings (``80 00`` for 0) are accepted, as protobuf decoders do.
    """
    end = len(data)
    value = 0
    shift = 0
    for index in range(pos, min(end, pos + MAX_VARINT_BYTES)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value > _MAX_UINT64:
                raise ProtocolError(f"varint value {value} exceeds 2**64-1")
            return value, index + 1
        shift += 7
    if end - pos >= MAX_VARINT_BYTES:
        raise ProtocolError(f"varint longer than {MAX_VARINT_BYTES} bytes (a malformed length)")
    return None
