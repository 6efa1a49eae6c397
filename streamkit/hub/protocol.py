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
import operator
import reprlib
import struct
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate, pairwise
from typing import Any, Literal, overload

from streamkit.errors import ProtocolError

__all__ = [
    "MAX_CONTENT_TYPE",
    "MAX_COUNTER",
    "MAX_PRODUCER_ID",
    "MAX_QUOTE",
    "MAX_REQUEST_ID",
    "MAX_TAG",
    "Records",
    "check_after",
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
    "encode_head",
    "encode_message",
    "encode_records",
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
#: The longest lineage tag a read may name, in UTF-8 bytes.
MAX_TAG = 64

_HEADER_SIZE = struct.Struct(">I")
_COUNT = struct.Struct(">I")
#: A body's count and first length, for the common batch of one record.
_ONE_RECORD = struct.Struct(">II")
#: Decodes a header already decoded from UTF-8 (json.loads would look for the encoding).
_decode_json = json.JSONDecoder().decode
#: Encodes a header as json.dumps(header, separators=(",", ":")) does, made once.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
#: The scanner _decode_json runs, for a header that is one JSON value and nothing
#: else (every header a peer of ours sends); anything else goes to _decode_json.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: What _encode_json runs for each header, made once rather than per header:
#: the C encoder json.JSONEncoder.encode makes anew for each call (with the
#: same settings, but no check for circular references: a header is a tree
#: of our own making; one that is not fails with RecursionError). None
#: without the C accelerator.
_make_encoder: Callable[..., Callable[[object, int], Iterable[str]]] | None
_make_encoder = json.encoder.c_make_encoder  # type: ignore[attr-defined]
_encoder = (
    None
    if _make_encoder is None
    else _make_encoder(
        None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
)


def _encode_header(header: dict[str, Any]) -> str:
    """``header`` as JSON text, as _encode_json makes it."""
    if _encoder is None:
        return _encode_json(header)
    return "".join(_encoder(header, 0))


def _decode_header(text: str) -> Any:
    """The JSON value of ``text``, as _decode_json decodes it (and raises)."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return _decode_json(text)  # not a value at 0: raises (or skips leading spaces)
    return value if end == len(text) else _decode_json(text)


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


def encode_message(header: dict[str, Any], records: Sequence[bytes] | None = None) -> bytes:
    """One hub message: ``header`` and optional ``records``.

    Made with one join: each record's bytes are copied once, straight into
    the message.
    """
    head = encode_head(header)
    if not records:
        return head
    if isinstance(records, Records):
        return records.message(head)
    count = len(records)
    if count == 1:  # an awaited append
        record = records[0]
        return b"".join((head, _ONE_RECORD.pack(1, len(record)), record))
    lengths = struct.pack(f">{count}I", *map(len, records))
    return b"".join((head, _COUNT.pack(count), lengths, *records))


def encode_head(header: dict[str, Any]) -> bytes:
    """A message's header, length-prefixed: a body (:func:`encode_records`) may follow."""
    head = _encode_header(header).encode()
    return _HEADER_SIZE.pack(len(head)) + head


def encode_records(records: Sequence[bytes]) -> bytes:
    """The body a message carries ``records`` in (``b""`` for none).

    Encoded once, it can follow the heads of many messages (a batch sent
    to every reader of a stream).
    """
    if isinstance(records, Records):
        return records.body
    if not records:
        return b""
    count = len(records)
    if count == 1:  # an awaited append
        record = records[0]
        return _ONE_RECORD.pack(1, len(record)) + record
    return b"".join((_COUNT.pack(count), struct.pack(f">{count}I", *map(len, records)), *records))


def records_size(records: Sequence[bytes]) -> int:
    """The size of the body :func:`encode_message` makes of ``records``.

    A read's flow control counts records messages by this size, the same
    on both sides.
    """
    if not records:
        return 0
    size = records.size if isinstance(records, Records) else sum(map(len, records))
    return _COUNT.size + 4 * len(records) + size


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
        header = _decode_header(message[_HEADER_SIZE.size : end].decode())
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"hub header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("hub header must be a JSON object with an 'op'")
    return header, memoryview(message)[end:]


def decode_records(body: memoryview | bytes, message: bytes | None = None) -> list[bytes]:
    """The records of a message body; raises :class:`ProtocolError` if malformed.

    With ``message``, the ``bytes`` that ``body`` is the tail of (as
    :func:`decode_message` gives it), the records are sliced straight out
    of ``message``: the body is not copied first.
    """
    if not body:
        return []  # a message without records has no body
    if message is None:
        data, base = bytes(body), 0
    else:
        data, base = message, len(message) - len(body)
    _, ends = _record_ends(body, base)
    return [data[begin:end] for begin, end in pairwise(ends)]


def _record_ends(
    body: bytes | bytearray | memoryview, base: int = 0
) -> tuple[tuple[int, ...], list[int]]:
    """A records body's lengths, and where each record ends in it (after where they begin).

    Positions count from ``base`` (where the body begins in the bytes to
    slice). Raises :class:`ProtocolError` if the body is malformed. The
    ends are a list, made in C without a conversion per item: what a
    client slices once; a batch that is kept packs them (:func:`_packed_ends`).
    """
    size = len(body)
    if size < _COUNT.size:
        raise ProtocolError(
            f"hub records body of {size} bytes is too short (at least {_COUNT.size})"
        )
    if size >= _ONE_RECORD.size:
        count, length = _ONE_RECORD.unpack_from(body)
        if count == 1 and length == size - _ONE_RECORD.size:  # an awaited append's record
            return (length,), [base + _ONE_RECORD.size, base + size]
    (count,) = _COUNT.unpack_from(body)
    start = _COUNT.size + 4 * count
    if start > size:
        raise ProtocolError(f"hub records body of {size} bytes cannot hold {count} lengths")
    lengths = struct.unpack_from(f">{count}I", body, _COUNT.size)
    ends = list(accumulate(lengths, initial=base + start))
    if ends[-1] != base + size:
        raise ProtocolError(
            f"hub records body of {size} bytes does not match its record lengths"
            f" ({ends[-1] - base})"
        )
    return lengths, ends


def _packed_ends(ends: list[int]) -> array[int]:
    """``ends`` as the array a kept batch holds (8 bytes each, no object per record).

    Packed by ``struct`` and copied in: ``array("q", ends)`` would convert
    each item through a format-string parse, about twice the work.
    """
    return array("q", struct.pack(f"={len(ends)}q", *ends))


class Records(Sequence[bytes]):
    """A batch of records as a message body packs them: ``count``, the lengths, the bytes.

    What the hub stores and sends: kept as it came, a batch is checked,
    stored, sliced and sent again without a Python object per record.
    Indexing makes the ``bytes`` of one record; slicing (step 1) makes a
    :class:`Records` of the slice, sharing the bytes; ``body`` is the packed
    form (the one it came as, for a whole batch). Equal to any sequence of
    the same records. Immutable.
    """

    __slots__ = ("_body", "_ends", "_high", "_largest", "_low")

    def __init__(
        self, body: bytes | memoryview, ends: array[int], low: int, high: int, largest: int = -1
    ) -> None:
        # ``body`` is a whole packed batch (bytes, or a view of immutable
        # bytes); ``ends[i]`` is where its record i - 1 ends (``ends[0]``:
        # where the records begin); this holds its records ``low`` up to
        # ``high``; ``largest`` their largest length, if known. Use the
        # class methods.
        self._body = body
        self._ends = ends
        self._low = low
        self._high = high
        self._largest = largest

    @classmethod
    def pack(cls, records: Iterable[bytes]) -> Records:
        """The records packed (a :class:`Records` as it is)."""
        if isinstance(records, Records):
            return records
        records = list(records)
        return cls._trusted(encode_records(records), map(len, records), len(records))

    @classmethod
    def unpack(cls, body: bytes | bytearray | memoryview) -> Records:
        """The records of a message body; :class:`ProtocolError` if it is malformed.

        A view of ``bytes`` (as :func:`decode_message` gives) is kept, not
        copied: the records share its memory.
        """
        if not body:
            return _NO_RECORDS
        lengths, ends = _record_ends(body)
        data: bytes | memoryview
        if type(body) is bytes or (isinstance(body, memoryview) and type(body.obj) is bytes):
            data = body
        else:
            data = bytes(body)  # a buffer that may change: copied
        return cls(data, _packed_ends(ends), 0, len(lengths), max(lengths, default=0))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], data: bytes) -> Records:
        """Records of the given ``lengths`` whose bytes, back to back, are ``data``."""
        count = len(lengths)
        head = _COUNT.pack(count) + struct.pack(f">{count}I", *lengths)
        return cls._trusted(head + data, lengths, count)

    @classmethod
    def join(cls, parts: Sequence[Records]) -> Records:
        """The records of ``parts``, one after another."""
        if len(parts) == 1:
            return parts[0]
        count = sum(map(len, parts))
        heads = [part._body[4 + 4 * part._low : 4 + 4 * part._high] for part in parts]
        data = [part._body[part._ends[part._low] : part._ends[part._high]] for part in parts]
        head = b"".join((_COUNT.pack(count), *heads))
        lengths = struct.unpack_from(f">{count}I", head, _COUNT.size)
        return cls._trusted(b"".join((head, *data)), lengths, count)

    @classmethod
    def _trusted(cls, body: bytes, lengths: Iterable[int], count: int) -> Records:
        ends = _packed_ends(list(accumulate(lengths, initial=_COUNT.size + 4 * count)))
        return cls(body, ends, 0, count)

    @property
    def body(self) -> bytes:
        """The records packed as a message body (``b""`` for none)."""
        low, high, body = self._low, self._high, self._body
        if low == 0 and high == len(self._ends) - 1:
            return body if type(body) is bytes else bytes(body)
        return b"".join(self._parts())

    def view(self) -> memoryview:
        """The records packed, as ``body``, without copying a whole batch kept as a view."""
        low, high, body = self._low, self._high, self._body
        if low == 0 and high == len(self._ends) - 1:
            return memoryview(body)
        return memoryview(self.body)

    def message(self, head: bytes) -> bytes:
        """``head`` and the records packed after it, as one ``bytes``: each byte copied once.

        What a records message is made of, for each of a batch's readers.
        """
        return b"".join((head, *self._parts()))

    def _parts(self) -> tuple[bytes | memoryview, ...]:
        """The records packed, in pieces that share the batch's memory (nothing copied)."""
        low, high, body = self._low, self._high, self._body
        if low == 0 and high == len(self._ends) - 1:
            return (body,)
        if low == high:
            return ()
        ends = self._ends
        whole = memoryview(body)
        return (
            _COUNT.pack(high - low),
            whole[4 + 4 * low : 4 + 4 * high],
            whole[ends[low] : ends[high]],
        )

    @property
    def size(self) -> int:
        """The bytes of the records (without their lengths)."""
        return self._ends[self._high] - self._ends[self._low]

    def largest(self) -> int:
        """The length of the largest record (0 for none)."""
        if self._largest < 0:
            count = len(self)
            lengths = (
                struct.unpack_from(f">{count}I", self._body, 4 + 4 * self._low) if count else ()
            )
            self._largest = max(lengths, default=0)
        return self._largest

    def fit(self, max_bytes: int) -> int:
        """How many of the leading records add up to at most ``max_bytes`` (maybe none)."""
        low, ends = self._low, self._ends
        return bisect_right(ends, ends[low] + max_bytes, low + 1, self._high + 1) - low - 1

    def __len__(self) -> int:
        return self._high - self._low

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Records: ...

    def __getitem__(self, index: int | slice) -> bytes | Records:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("Records slices take no step")
            stop = max(start, stop)
            largest = self._largest if (start, stop) == (0, len(self)) else -1
            return Records(self._body, self._ends, self._low + start, self._low + stop, largest)
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"record {index} of {count}")
        ends = self._ends
        return bytes(self._body[ends[self._low + index] : ends[self._low + index + 1]])

    def __iter__(self) -> Iterator[bytes]:
        body, ends, low, high = self._body, self._ends, self._low, self._high
        slices = map(slice, ends[low:high], ends[low + 1 : high + 1])
        if type(body) is bytes:
            return map(body.__getitem__, slices)
        return map(bytes, map(body.__getitem__, slices))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records | list | tuple):
            return len(self) == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Records: {len(self)} records, {self.size} bytes>"


_NO_RECORDS = Records(b"", array("q", [0]), 0, 0)


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


def check_after(after: object) -> tuple[int, str] | None:
    """A re-issued read's ``after``: ``None``, or ``{"offset": int >= 0, "tag": str}``.

    The tag is 1..``MAX_TAG`` UTF-8 bytes. Returns ``(offset, tag)``.
    """
    if after is None:
        return None
    if not isinstance(after, dict):
        raise TypeError(f"after must be an object or None, not {type(after).__name__}")
    offset = after.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"after's offset must be an int, not {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"after's offset must be >= 0, not {quote(offset)}")
    return offset, _text("after's tag", after.get("tag"), MAX_TAG)


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
