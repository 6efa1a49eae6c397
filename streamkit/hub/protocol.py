"""The hub's messages, sans-IO: a JSON header and a body of records.

Each hub message travels as one frame of a resumable session:

    u32 header length | header (a JSON object, UTF-8) | body

The body, when present, is a batch of records: ``count u32``, the
``count`` record lengths (u32 each), then the records back to back, so a
batch is packed and unpacked with one ``struct`` call rather than a loop
over varints. See ``docs/protocol.md`` for every operation.

The ``check_*`` functions validate a request's fields, the same on both
sides: the client calls them so a bad argument raises at the call, the
server so a bad request gets an error reply instead of hurting the hub.
Each raises :class:`TypeError` for a value of the wrong type and
:class:`ValueError` for one out of range, naming the field.

Every message that quotes what a peer sent (an error reply, a log line)
quotes it through :func:`quote`, which bounds it: a reply must fit the
peer's ``max_frame`` however large the field it answers.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from itertools import accumulate, pairwise
from typing import Any, Literal

from streamkit.errors import ProtocolError

__all__ = [
    "MAX_CONTENT_TYPE",
    "MAX_COUNTER",
    "MAX_PRODUCER_ID",
    "MAX_QUOTE",
    "MAX_REQUEST_ID",
    "check_content_type",
    "check_counter",
    "check_created",
    "check_flag",
    "check_name",
    "check_offset",
    "check_producer_id",
    "check_request_id",
    "check_seconds",
    "check_ttl",
    "check_window",
    "decode_message",
    "decode_records",
    "encode_message",
    "quote",
    "records_size",
]

#: The longest content type and producer id, in UTF-8 bytes.
MAX_CONTENT_TYPE = 255
MAX_PRODUCER_ID = 255
#: The largest producer epoch or batch sequence (they are stored as u64).
MAX_COUNTER = 2**63 - 1
#: The largest request id (a request's ``"id"`` is an integer 0..this).
MAX_REQUEST_ID = 2**63 - 1
#: The most characters of a peer's string that :func:`quote` shows.
MAX_QUOTE = 80

_HEADER_SIZE = struct.Struct(">I")
_COUNT = struct.Struct(">I")

#: Longer integers are quoted by their size (their digits may not even convert).
_MAX_QUOTED_BITS = 256
# reprlib bounds every kind of value (containers by item count and depth);
# strings and bytes get a prefix and their length from quote() itself.
_REPR = reprlib.Repr()
_REPR.maxlevel = 1
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_QUOTE
for _container in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _container, 4)


def quote(value: object) -> str:
    """``repr(value)``, bounded: how a message quotes a value a peer sent.

    A string or bytes value longer than :data:`MAX_QUOTE` is shown as the
    repr of its first ``MAX_QUOTE`` characters (or bytes), then ``...`` and
    its length; an integer too long to show, as its size; any other value is
    cut by :mod:`reprlib`. The result is at most a few hundred characters
    whatever ``value`` is, so an error reply that quotes a field fits any
    session frame.
    """
    if isinstance(value, str | bytes | bytearray):
        if len(value) <= MAX_QUOTE:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:MAX_QUOTE]!r}... ({len(value)} {unit})"
    if isinstance(value, int) and value.bit_length() > _MAX_QUOTED_BITS:
        return f"an int of {value.bit_length()} bits"
    return _REPR.repr(value)


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


def records_size(records: list[bytes]) -> int:
    """The size of the body :func:`encode_message` makes of ``records``.

    A read's flow control counts records messages by this size, the same
    on both sides.
    """
    if not records:
        return 0
    return _COUNT.size + 4 * len(records) + sum(map(len, records))


def decode_message(message: bytes) -> tuple[dict[str, Any], memoryview]:
    """Split a hub message into its header and its (undecoded) body.

    Raises :class:`ProtocolError` for a malformed message.
    """
    if len(message) < _HEADER_SIZE.size:
        raise ProtocolError(
            f"hub message of {len(message)} bytes is too short (at least {_HEADER_SIZE.size})"
        )
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
        raise ProtocolError(
            f"hub records body of {size} bytes is too short (at least {_COUNT.size})"
        )
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


# -- request fields -------------------------------------------------------------


def _text(field: str, value: object, max_bytes: int | None) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} {quote(value)} is not valid Unicode: {exc.reason}") from exc
    if max_bytes is not None and not 1 <= size <= max_bytes:
        raise ValueError(f"{field} must be 1..{max_bytes} bytes (UTF-8), not {size}")
    return value


def check_name(name: object) -> str:
    """A stream name: a ``str`` (its length is a hub limit, ``Limits.max_name``)."""
    return _text("a stream name", name, None)


def check_seconds(field: str, value: object, *, allow_zero: bool = False) -> float:
    """A duration: a finite number of seconds > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be a finite number of seconds {bound}, not {quote(value)}")
    return float(value)


def check_ttl(ttl: object) -> float | None:
    """A TTL: ``None`` (no expiry) or a finite number of seconds > 0."""
    return None if ttl is None else check_seconds("ttl", ttl)


def check_content_type(content_type: object) -> str | None:
    """A content type: ``None`` or a ``str`` of 1..``MAX_CONTENT_TYPE`` UTF-8 bytes."""
    if content_type is None:
        return None
    return _text("content_type", content_type, MAX_CONTENT_TYPE)


def check_offset(offset: object) -> int | Literal["now"]:
    """A read offset: an ``int`` >= 0, or ``"now"`` (the current end)."""
    if offset == "now":
        return "now"
    if isinstance(offset, str):
        raise ValueError(f"offset must be an int >= 0 or 'now', not {quote(offset)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int >= 0 or 'now', not {quote(offset)}")
    if offset < 0:
        raise ValueError(f"offset must be an int >= 0 or 'now', not {quote(offset)}")
    return offset


def check_producer_id(producer_id: object) -> str:
    """A producer id: a ``str`` of 1..``MAX_PRODUCER_ID`` UTF-8 bytes."""
    return _text("producer id", producer_id, MAX_PRODUCER_ID)


def check_counter(field: str, value: object) -> int:
    """A producer ``epoch`` or batch ``seq``: an ``int`` in 0..``MAX_COUNTER``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"{field} must be 0..{MAX_COUNTER}, not {quote(value)}")
    return value


def check_request_id(request: object) -> int:
    """A request's ``"id"``: an ``int`` in 0..``MAX_REQUEST_ID`` (not a ``bool``)."""
    if isinstance(request, bool) or not isinstance(request, int):
        raise TypeError(f"a request id must be an int, not {type(request).__name__}")
    if not 0 <= request <= MAX_REQUEST_ID:
        raise ValueError(f"a request id must be 0..{MAX_REQUEST_ID}, not {quote(request)}")
    return request


def check_created(created: object) -> float | None:
    """A stream's creation time (Unix seconds) a read expects: ``None`` or a finite number."""
    if created is None:
        return None
    if isinstance(created, bool) or not isinstance(created, int | float):
        raise TypeError(f"created must be a number or None, not {type(created).__name__}")
    if not math.isfinite(created):
        raise ValueError(f"created must be a finite number, not {quote(created)}")
    return float(created)


def check_window(window: object) -> int | None:
    """A read's window: ``None`` (no flow control) or an ``int`` >= 1 (bytes)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"a read window must be an int or None, not {type(window).__name__}")
    if window < 1:
        raise ValueError(f"a read window must be >= 1 byte, not {quote(window)}")
    return window


def check_flag(field: str, value: object) -> bool:
    """A yes/no field (``live``, ``exist_ok``): a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be a bool, not {type(value).__name__}")
    return value
