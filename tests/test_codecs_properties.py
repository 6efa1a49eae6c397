"""Properties every codec keeps, whatever the frames and however the bytes are split.

- Round trips: any list of frames, encoded with ``encode``, ``encode_into`` or
  ``encode_many``, decodes to the same list when fed whole, a byte at a time
  or in any random chunks (``bytes``, ``bytearray`` or ``memoryview``), also
  through one reused buffer overwritten after each feed: a decoder keeps no
  reference to a mutable input.
- Limits and errors fire the same way at every split: the same frames come out
  before the error and the error is the same (type, message, ``missing``).
  A split inside a length header or a varint is the classic bug.
- ``read_frame`` over a real ``asyncio.StreamReader`` agrees with the
  incremental decoder: same frames, same error types.
- Any bytes at all only ever raise a ``StreamkitError`` subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamkit.codecs import (
    Buffer,
    Codec,
    Decoder,
    Delimited,
    JsonLines,
    LengthPrefixed,
    Lines,
    VarintPrefixed,
    encode_varint,
)
from streamkit.errors import (
    DecodeError,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    ProtocolError,
    StreamkitError,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADERS = (1, 2, 3, 4, 8)
BYTEORDERS: tuple[Any, ...] = ("big", "little")
DELIMITERS = (b"\n", b"\r\n", b"--", b"\x00", b"END", b"aba", b"\n\n")
#: Bytes that make frames collide with the delimiters above.
ALPHABET = (b"\n", b"\r", b"-", b"a", b"b", b"E", b"N", b"D", b"\x00", b"x", b"\xff")


# -- driving a decoder --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadFrame:
    """A DecodeError among the decoded frames: that frame was skipped, decoding went on."""

    frame_number: int | None


class Outcome(NamedTuple):
    """What a decoder made of a whole input: frames (and BadFrame marks), then the error."""

    events: list[Any]
    error: StreamkitError | None

    @property
    def error_type(self) -> type[StreamkitError] | None:
        return None if self.error is None else type(self.error)

    def key(self) -> tuple[Any, ...]:
        """Everything that must not depend on how the bytes were split."""
        error = self.error
        message = None if error is None else str(error)
        return (self.events, self.error_type, message, getattr(error, "missing", None))


def decode_chunks(decoder: Decoder[Any], chunks: Iterable[Buffer]) -> Outcome:
    """Feed ``chunks`` like a careful caller, then ``close()``; return what came out.

    After each chunk, while ``decoder.pending`` says more can come out
    without new input, it feeds ``b""`` (as ``FramedStream`` does before it
    waits); once it is false, ``feed(b"")`` must give nothing. A
    ``DecodeError`` is recorded as a :class:`BadFrame` and decoding goes on,
    as the decoder contract allows; any other ``StreamkitError`` ends the
    run (it is fatal). Anything else propagates and fails the test.
    """
    events: list[Any] = []

    def feed(chunk: Buffer) -> StreamkitError | None:
        while True:
            try:
                events.extend(decoder.feed(chunk))
            except DecodeError as exc:
                events.append(BadFrame(exc.frame_number))
            except StreamkitError as exc:
                return exc
            if not decoder.pending:
                return None
            chunk = b""  # an error held back, or the frames after a bad one

    for chunk in chunks:
        error = feed(chunk)
        if error is not None:
            return Outcome(events, error)
        assert decoder.feed(b"") == []  # not pending: nothing comes out without input
    try:
        decoder.close()
    except StreamkitError as exc:
        return Outcome(events, exc)
    return Outcome(events, None)


async def read_frames(codec: Codec[Any], chunks: Sequence[bytes], limit: int) -> Outcome:
    """Call ``codec.read_frame`` on a real StreamReader fed ``chunks`` by another task."""
    reader = asyncio.StreamReader(limit=limit)

    async def produce() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    producer = asyncio.create_task(produce())
    events: list[Any] = []
    try:
        while True:
            try:
                events.append(await codec.read_frame(reader))
            except DecodeError as exc:
                events.append(BadFrame(exc.frame_number))
    except StreamkitError as exc:
        return Outcome(events, exc)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given positions."""
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if a < b]


@st.composite
def splits_of(draw: st.DrawFn, data: bytes) -> list[Buffer]:
    """``data`` cut into random chunks, as bytes, bytearray or memoryview."""
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))
    kind: Callable[[bytes], Buffer] = draw(st.sampled_from([bytes, bytearray, memoryview]))
    return [kind(chunk) for chunk in split(data, cuts)]


#: ``st.DataObject.draw`` or a composite's ``draw``.
Draw = Callable[[st.SearchStrategy[Any]], Any]


def through_one_buffer(chunks: Sequence[Buffer]) -> Iterator[memoryview]:
    """Each chunk as a view of one reused buffer, scribbled over once the decoder is done.

    As a receive buffer is reused for the next read: a decoder that kept a
    reference to it, rather than a copy, would see the scribble.
    """
    buffer = bytearray(max(map(len, chunks), default=0))
    for chunk in chunks:
        buffer[: len(chunk)] = chunk
        with memoryview(buffer) as view:
            yield view[: len(chunk)]
        buffer[:] = b"\xee" * len(buffer)


def all_splits(draw: Draw, data: bytes) -> list[Iterable[Buffer]]:
    """Whole, a byte at a time, one random split, and one through a reused buffer."""
    bytewise: list[Buffer] = [data[i : i + 1] for i in range(len(data))]
    return [[data], bytewise, draw(splits_of(data)), through_one_buffer(draw(splits_of(data)))]


def assert_split_invariant(codec: Codec[Any], data: bytes, draw: Draw) -> Outcome:
    """Decode ``data`` under several splits; every split must give the same outcome."""
    outcomes = [decode_chunks(codec.decoder(), chunks) for chunks in all_splits(draw, data)]
    first = outcomes[0]
    for other in outcomes[1:]:
        assert other.key() == first.key()
    return first


# -- codecs and frames --------------------------------------------------------


class Case(NamedTuple):
    codec: Any
    frames: list[Any]
    #: A codec with the same framing and a larger max_frame, to write frames too large.
    lax: Any


def edge(needed: int) -> st.SearchStrategy[int]:
    """A max_frame that fits ``needed``: often exactly, so the edge gets tested."""
    return st.one_of(st.just(needed), st.integers(needed, needed + 40))


@st.composite
def length_cases(draw: st.DrawFn) -> Case:
    header = draw(st.sampled_from(HEADERS))
    byteorder = draw(st.sampled_from(BYTEORDERS))
    offset = draw(st.sampled_from((0, 0, 1, 2)))
    # Netty's lengthAdjustment: none, length counts the header, counts header
    # and leading bytes, or a payload longer than the length says.
    adjustment = draw(st.sampled_from((0, 0, -header, -(offset + header), 2)))
    top = min(300, 256**header - 1 + adjustment)
    payload = st.binary(min_size=max(0, adjustment), max_size=top)
    frames = [
        draw(st.binary(min_size=offset, max_size=offset)) + body
        for body in draw(st.lists(payload, max_size=6))
    ]
    needed = max((len(f) - offset for f in frames), default=max(0, adjustment))
    max_frame = draw(edge(needed))
    codec = LengthPrefixed(header, byteorder, max_frame, adjustment, offset)
    return Case(codec, frames, dataclasses.replace(codec, max_frame=top))


@st.composite
def varint_cases(draw: st.DrawFn) -> Case:
    # Sizes past 127 and 16383 take two and three varint bytes.
    sizes = st.one_of(st.integers(0, 140), st.sampled_from((127, 128, 16383, 16384)))
    frames = [bytes([n % 251]) * n for n in draw(st.lists(sizes, max_size=5))]
    codec = VarintPrefixed(draw(edge(max(map(len, frames), default=0))))
    return Case(codec, frames, VarintPrefixed(1 << 20))


def without_delimiter(frame: bytes, delimiter: bytes) -> bytes:
    """Shorten ``frame`` until it reads back whole when followed by ``delimiter``."""
    while delimiter in frame + delimiter[:-1]:
        frame = frame.replace(delimiter, b"") if delimiter in frame else frame[:-1]
    return frame


@st.composite
def delimited_cases(draw: st.DrawFn) -> Case:
    delimiter = draw(st.sampled_from(DELIMITERS))
    pieces = st.lists(st.sampled_from(ALPHABET), max_size=20).map(b"".join)
    frames = [without_delimiter(f, delimiter) for f in draw(st.lists(pieces, max_size=6))]
    codec = Delimited(delimiter, draw(edge(max(map(len, frames), default=0))))
    return Case(codec, frames, Delimited(delimiter, 1 << 20))


def as_line(text: str, encoding: str) -> str:
    """``text`` made a valid line for ``encoding``: no ``\\n``, no trailing ``\\r``."""
    text = text.replace("\n", "").rstrip("\r")
    return text.encode(encoding, "ignore").decode(encoding).rstrip("\r")


@st.composite
def lines_cases(draw: st.DrawFn) -> Case:
    encoding = draw(st.sampled_from(("utf-8", "latin-1")))
    chars = st.characters(max_codepoint=0xFF if encoding == "latin-1" else 0x10FFFF)
    texts = st.text(st.one_of(chars, st.sampled_from("\r\n é")), max_size=12)
    frames = [as_line(t, encoding) for t in draw(st.lists(texts, max_size=6))]
    needed = max((len(f.encode(encoding)) for f in frames), default=0)
    newline = draw(st.sampled_from(("\n", "\r\n")))
    codec = Lines(encoding, draw(edge(needed)), newline)
    return Case(codec, frames, Lines(encoding, 1 << 20, newline))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@st.composite
def json_cases(draw: st.DrawFn) -> Case:
    frames = draw(st.lists(JSON_VALUES, max_size=6))
    needed = max((len(JsonLines().encode(f)) - 1 for f in frames), default=0)
    codec = JsonLines(draw(edge(needed)))
    return Case(codec, frames, JsonLines(1 << 20))


FAMILIES = (length_cases(), varint_cases(), delimited_cases(), lines_cases(), json_cases())
ALL_CASES = st.one_of(FAMILIES)


def wire_of(codec: Any, frames: Sequence[Any], how: str) -> bytes:
    if how == "encode":
        return b"".join(codec.encode(f) for f in frames)
    if how == "encode_into":
        out = bytearray()
        for frame in frames:
            codec.encode_into(out, frame)
        return bytes(out)
    return bytes(codec.encode_many(frames))


def slack_of(codec: Any) -> int:
    """Bytes that may precede the delimiter without counting (the ``\\r`` of ``\\r\\n``)."""
    return 1 if isinstance(codec, Lines | JsonLines) else 0


# -- round trips --------------------------------------------------------------


@FAST
@given(
    case=ALL_CASES, how=st.sampled_from(("encode", "encode_into", "encode_many")), data=st.data()
)
def test_any_frames_round_trip_under_any_split(case: Case, how: str, data: st.DataObject) -> None:
    codec, frames, _ = case
    wire = wire_of(codec, frames, how)
    assert wire == wire_of(codec, frames, "encode_many")
    outcome = assert_split_invariant(codec, wire, data.draw)
    assert outcome.events == frames
    assert outcome.error is None


@FAST
@given(
    delimiter=st.sampled_from(DELIMITERS),
    frames=st.lists(st.lists(st.sampled_from(ALPHABET), max_size=8).map(b"".join), max_size=5),
    data=st.data(),
)
def test_every_frame_delimited_encode_accepts_reads_back(
    delimiter: bytes, frames: list[bytes], data: st.DataObject
) -> None:
    codec = Delimited(delimiter)
    accepted = []
    for frame in frames:
        try:
            accepted.append(codec.encode(frame))
        except ValueError:
            assert without_delimiter(frame, delimiter) != frame
        else:
            assert without_delimiter(frame, delimiter) == frame
    wire = b"".join(accepted)
    outcome = assert_split_invariant(codec, wire, data.draw)
    assert outcome == Outcome([f for f in frames if without_delimiter(f, delimiter) == f], None)


@FAST
@given(case=st.one_of(length_cases(), varint_cases(), delimited_cases()))
def test_bytes_codecs_accept_any_buffer_type(case: Case) -> None:
    codec, frames, _ = case
    wire = codec.encode_many(frames)
    for kind in (bytearray, memoryview):
        assert codec.encode_many(kind(f) for f in frames) == wire
        assert b"".join(codec.encode(kind(f)) for f in frames) == wire


@FAST
@given(case=st.one_of(lines_cases(), json_cases()), blank=st.booleans(), data=st.data())
def test_text_codecs_read_crlf_line_endings(case: Case, blank: bool, data: st.DataObject) -> None:
    codec, frames, _ = case
    wire = codec.encode_many(frames)
    if isinstance(codec, Lines):
        wire = wire.replace(b"\r\n", b"\n")  # from either newline setting ...
    crlf = wire.replace(b"\n", b"\r\n")  # ... to CRLF throughout
    if blank and isinstance(codec, JsonLines):
        crlf = b"\r\n" + crlf.replace(b"\r\n", b"\r\n \n", 1)  # blank lines are skipped
    outcome = assert_split_invariant(codec, crlf, data.draw)
    assert outcome == Outcome(frames, None)


# -- limits and errors at every split ------------------------------------------


@st.composite
def noisy_wires(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A codec and bytes made of its frames, frames over its limit, junk, and a cut."""
    family = draw(st.sampled_from(FAMILIES))
    codec, frames, lax = draw(family)
    extra = draw(family)
    pieces: list[bytes] = [codec.encode(f) for f in frames]
    with contextlib.suppress(ValueError, FrameTooLarge):
        pieces += [lax.encode(f) for f in extra.frames]
    pieces += draw(st.lists(st.binary(max_size=12), max_size=3))
    # A run without any delimiter, possibly past max_frame and cut off by the end.
    pieces.append(draw(st.sampled_from([b"x", b"7"])) * draw(st.integers(0, 80)))
    pieces = draw(st.permutations(pieces))
    wire = b"".join(pieces)
    cut = draw(st.integers(0, len(wire)))
    return codec, wire[: cut if draw(st.booleans()) else len(wire)]


@FAST
@given(noisy=noisy_wires(), data=st.data())
def test_any_input_gives_the_same_outcome_under_any_split(
    noisy: tuple[Any, bytes], data: st.DataObject
) -> None:
    codec, wire = noisy
    assert_split_invariant(codec, wire, data.draw)


@st.composite
def oversized_headers(draw: st.DrawFn) -> tuple[Any, list[bytes], bytes]:
    """A length codec, frames, and a header announcing max_frame + 1 or more."""
    header = draw(st.sampled_from(HEADERS))
    byteorder = draw(st.sampled_from(BYTEORDERS))
    offset = draw(st.sampled_from((0, 2)))
    adjustment = draw(st.sampled_from((0, -header)))
    max_frame = draw(st.integers(0, min(200, 255 + adjustment - 1)))
    codec = LengthPrefixed(header, byteorder, max_frame, adjustment, offset)
    frames = draw(st.lists(st.binary(min_size=offset, max_size=offset + max_frame), max_size=3))
    value = draw(st.integers(max_frame + 1 - adjustment, 256**header - 1))
    lead = draw(st.binary(min_size=offset, max_size=offset))
    return codec, frames, lead + value.to_bytes(header, byteorder)


@FAST
@given(case=oversized_headers(), payload=st.binary(max_size=5), data=st.data())
def test_oversized_length_fails_at_the_header_under_any_split(
    case: tuple[Any, list[bytes], bytes], payload: bytes, data: st.DataObject
) -> None:
    codec, frames, bad_header = case
    wire = codec.encode_many(frames) + bad_header
    # No payload byte is needed for the error ...
    outcome = assert_split_invariant(codec, wire, data.draw)
    assert outcome.events == frames
    assert outcome.error_type is FrameTooLarge
    assert f"max_frame={codec.max_frame}" in str(outcome.error)
    # ... and payload bytes after the header change nothing.
    assert decode_chunks(codec.decoder(), [wire + payload]).key() == outcome.key()


@FAST
@given(
    frames=st.lists(st.binary(max_size=20), max_size=3),
    max_frame=st.integers(0, 20_000),
    excess=st.integers(1, 2**40),
    data=st.data(),
)
def test_oversized_varint_fails_when_the_varint_ends_under_any_split(
    frames: list[bytes], max_frame: int, excess: int, data: st.DataObject
) -> None:
    codec = VarintPrefixed(max_frame)
    frames = [f for f in frames if len(f) <= max_frame]
    wire = codec.encode_many(frames) + encode_varint(max_frame + excess)
    outcome = assert_split_invariant(codec, wire, data.draw)
    assert outcome.events == frames
    assert outcome.error_type is FrameTooLarge
    # Fed a byte at a time, the error comes with the varint's last byte.
    decoder = codec.decoder()
    decoded: list[bytes] = []
    for index in range(len(wire) - 1):
        decoded += decoder.feed(wire[index : index + 1])
    assert decoded == frames
    with pytest.raises(FrameTooLarge):
        decoder.feed(wire[-1:])


@FAST
@given(
    frames=st.lists(st.binary(max_size=20), max_size=3),
    length=st.integers(11, 14),
    data=st.data(),
)
def test_overlong_varint_is_a_protocol_error_under_any_split(
    frames: list[bytes], length: int, data: st.DataObject
) -> None:
    codec = VarintPrefixed(100)
    wire = codec.encode_many(frames) + b"\x80" * (length - 1) + b"\x01"
    outcome = assert_split_invariant(codec, wire, data.draw)
    assert outcome.events == frames
    assert outcome.error_type is ProtocolError
    assert "longer than 10 bytes" in str(outcome.error)


@FAST
@given(case=st.one_of(delimited_cases(), lines_cases(), json_cases()), data=st.data())
def test_missing_delimiter_fails_at_max_frame_under_any_split(
    case: Case, data: st.DataObject
) -> None:
    codec, frames, _ = case
    window = codec.max_frame + slack_of(codec) + len(codec.delimiter)
    wire = codec.encode_many(frames)
    filler = b"x" if isinstance(codec, Delimited) else b"7"
    # One byte short of the limit: still waiting, then cut off at the end.
    short = assert_split_invariant(codec, wire + filler * (window - 1), data.draw)
    assert short.events == frames
    assert short.error_type is (IncompleteFrame if window > 1 else None)
    # At the limit: too large, however the bytes came in.
    full = assert_split_invariant(codec, wire + filler * window, data.draw)
    assert full.events == frames
    assert full.error_type is FrameTooLarge


@FAST
@given(case=st.one_of(length_cases(), varint_cases()), data=st.data())
def test_truncation_reports_the_missing_bytes_under_any_split(
    case: Case, data: st.DataObject
) -> None:
    codec, frames, _ = case
    assume(frames)
    encoded = codec.encode(data.draw(st.sampled_from(frames)))
    assume(len(encoded) > 1)
    cut = data.draw(st.integers(1, len(encoded) - 1))
    wire = codec.encode_many(frames) + encoded[:cut]
    outcome = assert_split_invariant(codec, wire, data.draw)
    assert outcome.events == frames
    assert outcome.error_type is IncompleteFrame
    assert isinstance(outcome.error, IncompleteFrame)
    if isinstance(codec, VarintPrefixed):
        # Inside the varint the frame size is unknown.
        unfinished = all(byte & 0x80 for byte in encoded[:cut])
        assert outcome.error.missing == (None if unfinished else len(encoded) - cut)
    else:
        # Inside the header, what the header still needs (a lower bound).
        prefix = codec.offset + codec.header
        expected = prefix - cut if cut < prefix else len(encoded) - cut
        assert outcome.error.missing == expected


@FAST
@given(case=st.one_of(lines_cases(), json_cases()), where=st.integers(0, 6), data=st.data())
def test_bad_line_is_skipped_and_numbered_under_any_split(
    case: Case, where: int, data: st.DataObject
) -> None:
    codec, frames, _ = case
    where = min(where, len(frames))
    bad = data.draw(st.sampled_from([b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"]))
    if isinstance(codec, JsonLines):
        bad = data.draw(st.sampled_from([bad, b"{", b"[1,]", b'"x', b"nul"]))
    elif codec.encoding == "latin-1":
        return  # every byte string is latin-1 text
    if len(bad) > codec.max_frame:
        return
    lines = [codec.encode(f) for f in frames]
    wire = b"".join([*lines[:where], bad + b"\n", *lines[where:]])
    outcome = assert_split_invariant(codec, wire, data.draw)
    # Blank JSON lines are skipped but counted: JsonLines never encodes one.
    assert outcome.events == [*frames[:where], BadFrame(where + 1), *frames[where:]]
    assert outcome.error is None


# -- read_frame agrees with the decoder -----------------------------------------


def comparable(
    outcome: Outcome, with_message: bool = True
) -> tuple[list[Any], type[StreamkitError] | None, str]:
    """Events (bad frames named by number), the error type and its message."""
    return outcome.events, outcome.error_type, str(outcome.error) if with_message else ""


@FEW
@given(noisy=noisy_wires(), data=st.data())
def test_read_frame_agrees_with_the_decoder(noisy: tuple[Any, bytes], data: st.DataObject) -> None:
    codec, wire = noisy
    expected = decode_chunks(codec.decoder(), [wire])
    if expected.error is None:
        expected = Outcome(expected.events, EndOfStream("end of stream"))
    # Any reader limit from the smallest that holds a frame and its line ending.
    base = max(1, codec.max_frame + slack_of(codec))
    limit = data.draw(st.sampled_from((base, base + 1, base + 2, 1 << 16)))
    chunks = [bytes(c) for c in data.draw(splits_of(wire))]
    got = asyncio.run(read_frames(codec, chunks, limit))
    # A frame over a limit may be caught before or after its delimiter came
    # (or by the reader's limit): then the messages may differ. And a
    # delimited codec's read_frame, one call per frame with no state between
    # them, cannot number lines as the decoder does.
    numbered = isinstance(codec, (Delimited, Lines, JsonLines))
    if numbered:
        expected = Outcome(
            [BadFrame(None) if isinstance(e, BadFrame) else e for e in expected.events],
            expected.error,
        )
    same_message = not isinstance(got.error, FrameTooLarge) and not numbered
    assert comparable(got, same_message) == comparable(expected, same_message)
    if isinstance(got.error, IncompleteFrame):
        assert isinstance(expected.error, IncompleteFrame)
        assert got.error.missing == expected.error.missing


@FEW
@given(case=ALL_CASES, data=st.data())
def test_read_frame_round_trips(case: Case, data: st.DataObject) -> None:
    codec, frames, _ = case
    wire = codec.encode_many(frames)
    chunks = [bytes(c) for c in data.draw(splits_of(wire))]
    limit = max(1, codec.max_frame + slack_of(codec))
    got = asyncio.run(read_frames(codec, chunks, limit))
    assert got.events == frames
    assert type(got.error) is EndOfStream


# -- nothing but StreamkitError ------------------------------------------------


FUZZ_CODECS: list[Any] = [
    *(LengthPrefixed(h, o, max_frame=64) for h in HEADERS for o in BYTEORDERS),
    LengthPrefixed(2, max_frame=64, adjustment=-2),
    LengthPrefixed(3, max_frame=64, adjustment=-5, offset=2),
    LengthPrefixed(1, max_frame=64, adjustment=3, offset=1),
    VarintPrefixed(64),
    VarintPrefixed(0),
    *(Delimited(d, max_frame=16) for d in DELIMITERS),
    Lines(max_frame=16),
    Lines("ascii", max_frame=16),
    Lines("latin-1", max_frame=16),
    JsonLines(max_frame=64),
    JsonLines(max_frame=2),
]

RANDOM_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from([*ALPHABET, b"[", b"{", b'"', b"1", b"\x80", b"\xc3"]), max_size=80
    ).map(b"".join),
)


@FAST
@given(codec=st.sampled_from(FUZZ_CODECS), wire=RANDOM_BYTES, data=st.data())
def test_random_bytes_raise_only_streamkit_errors(
    codec: Any, wire: bytes, data: st.DataObject
) -> None:
    # decode_chunks lets anything but a StreamkitError propagate.
    outcome = assert_split_invariant(codec, wire, data.draw)
    error = outcome.error
    if error is None or isinstance(error, DecodeError | IncompleteFrame):
        return  # not fatal: a DecodeError skips a frame, close() reports a cut
    # Fatal errors are sticky: the decoder holds nothing and raises them again.
    decoder = codec.decoder()
    assert decode_chunks(decoder, [wire]).key() == outcome.key()
    assert decoder.buffered == 0
    for again in (lambda: decoder.feed(wire), lambda: decoder.feed(b""), decoder.close):
        with pytest.raises(type(error)) as info:
            again()
        assert str(info.value) == str(error)
