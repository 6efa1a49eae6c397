"""The hub's messages, sans-IO: a JSON header and a body of records.

Each hub message travels as one frame of a resumable session:

    u32 header length | header (a JSON object, UTF-8) | body

The body, when present, is a batch of records: ``count u32``, the
``count`` record lengths (u32 each), then the records back to back, so a
batch is packed and unpacked with one ``struct`` call rather than a loop
over varints. See ``docs/protocol.md`` for every operation.
"""

from __future__ import annotations

import json
import struct
from itertools import accumulate, pairwise
from typing import Any

from streamkit.errors import ProtocolError

__all__ = ["decode_message", "decode_records", "encode_message"]

_HEADER_SIZE = struct.Struct(">I")
_COUNT = struct.Struct(">I")


def encode_message(header: dict[str, Any], records: list[bytes] | None = None) -> bytes:
    """One hub message: ``header`` and optional ``records``."""
    head = json.dumps(header, separators=(",", ":")).encode()
    message = _HEADER_SIZE.pack(len(head)) + head
    if records:
        count = len(records)
        message = b"".join(
            (message, _COUNT.pack(count), struct.pack(f">{count}I", *map(len, records)), *records)
        )
    return message


def decode_message(message: bytes) -> tuple[dict[str, Any], memoryview]:
    """Split a hub message into its header and its (undecoded) body.

    Raises :class:`ProtocolError` for a malformed message.
    """
    if len(message) < _HEADER_SIZE.size:
        raise ProtocolError(f"hub message of {len(message)} bytes is too short")
    size = _HEADER_SIZE.unpack_from(message)[0]
    end = _HEADER_SIZE.size + size
    if end > len(message):
        raise ProtocolError(f"hub header of {size} bytes runs past its message")
    try:
        header = json.loads(message[_HEADER_SIZE.size : end])
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"hub header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("hub header must be a JSON object with an 'op'")
    return header, memoryview(message)[end:]


def decode_records(body: memoryview | bytes) -> list[bytes]:
    """The records of a message body; raises :class:`ProtocolError` if malformed."""
    size = len(body)
    if size == 0:
        return []  # a message without records has no body
    if size < _COUNT.size:
        raise ProtocolError(f"hub records body of {size} bytes is too short")
    (count,) = _COUNT.unpack_from(body)
    start = _COUNT.size + 4 * count
    if start > size:
        raise ProtocolError(f"hub records body of {size} bytes cannot hold {count} lengths")
    lengths = struct.unpack_from(f">{count}I", body, _COUNT.size)
    ends = list(accumulate(lengths, initial=start))
    if ends[-1] != size:
        raise ProtocolError(
            f"hub records body of {size} bytes does not match its record lengths ({ends[-1]})"
        )
    data = bytes(body)
    return [data[begin:end] for begin, end in pairwise(ends)]
