"""Delimited, Lines and JsonLines: known bytes, bad input, bounded memory, edges."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import pytest

from streamkit.codecs import Delimited, JsonLines, Lines
from streamkit.errors import DecodeError, EndOfStream, FrameTooLarge, IncompleteFrame

KiB = 1024
MiB = 1024 * KiB


def decode_all(codec: Any, wire: bytes) -> list[Any]:
    decoder = codec.decoder()
    frames: list[Any] = decoder.feed(wire)
    decoder.close()
    return frames


def reader_with(data: bytes, limit: int = 2**16) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def window(codec: Any) -> int:
    """Bytes without a delimiter after which a frame is known to be too large."""
    slack = 0 if isinstance(codec, Delimited) else 1  # the \r of \r\n
    return int(codec.max_frame) + slack + len(codec.delimiter)


# -- known answers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "wire", "frames"),
    [
        (Delimited(), b"one\ntwo\n\n", [b"one", b"two", b""]),
        # Line protocols and Netty DelimiterBasedFrameDecoder(Delimiters.lineDelimiter()).
        (Delimited(b"\r\n"), b"USER bob\r\nPASS a\rb\r\n", [b"USER bob", b"PASS a\rb"]),
        # NUL-terminated frames, as STOMP ends each frame.
        (Delimited(b"\x00"), b"CONNECT\n\n\x00SEND\x00", [b"CONNECT\n\n", b"SEND"]),
        (Delimited(b"--"), b"a-b--c--", [b"a-b", b"c"]),
    ],
    ids=repr,
)
def test_delimited_known_answers(codec: Delimited, wire: bytes, frames: list[bytes]) -> None:
    assert decode_all(codec, wire) == frames
    assert codec.encode_many(frames) == wire


def test_multibyte_delimiter_split_across_feeds() -> None:
    decoder = Delimited(b"\r\n").decoder()
    assert decoder.feed(b"abc\r") == []
    assert decoder.feed(b"\n") == [b"abc"]
    decoder = Delimited(b"END").decoder()
    assert [decoder.feed(bytes([b])) for b in b"xEyENEND"][-1] == [b"xEyEN"]


def test_lines_read_lf_and_crlf_and_write_their_newline() -> None:
    assert decode_all(Lines(), b"hello\r\nworld\n\r\n\n") == ["hello", "world", "", ""]
    assert Lines().encode("hi") == b"hi\n"
    assert Lines(newline="\r\n").encode("hi") == b"hi\r\n"  # telnet-style peers
    assert Lines().encode("é") == b"\xc3\xa9\n"
    assert Lines("latin-1").encode("é") == b"\xe9\n"
    assert decode_all(Lines("latin-1"), b"\xe9\r\n") == ["é"]


def test_json_lines_write_their_newline_and_read_both() -> None:
    codec = JsonLines(newline="\r\n")  # for peers that expect CRLF, as LineReceiver does
    assert codec.encode({"a": 1}) == b'{"a":1}\r\n'
    assert codec.encode_many([1, "x"]) == b'1\r\n"x"\r\n'
    assert JsonLines().encode([1]) == b"[1]\n"
    assert decode_all(codec, b'1\r\n2\n"x"\r\n') == [1, 2, "x"]


def test_lines_keep_a_carriage_return_inside_a_line() -> None:
    assert decode_all(Lines(), b"a\rb\n") == ["a\rb"]
    assert Lines().encode("a\rb") == b"a\rb\n"


# The examples of ndjson.org / jsonlines.org, with both line endings.
NDJSON = (
    b'{"some":"thing"}\n'
    b'{"foo":17,"bar":false,"quux":true}\r\n'
    b'{"may":{"include":"nested","objects":["and","arrays"]}}\n'
)
NDJSON_VALUES = [
    {"some": "thing"},
    {"foo": 17, "bar": False, "quux": True},
    {"may": {"include": "nested", "objects": ["and", "arrays"]}},
]


def test_json_lines_known_answers() -> None:
    assert decode_all(JsonLines(), NDJSON) == NDJSON_VALUES
    assert JsonLines().encode_many(NDJSON_VALUES) == NDJSON.replace(b"\r\n", b"\n")
    # Compact, non-ASCII kept as UTF-8, control characters escaped.
    assert JsonLines().encode({"a": [1, 2.5], "é": "ü\n"}) == '{"a":[1,2.5],"é":"ü\\n"}\n'.encode()
    assert JsonLines().encode(None) == b"null\n"


def test_json_lines_skip_blank_lines_but_count_them() -> None:
    decoder = JsonLines().decoder()
    assert decoder.feed(b"\n  \r\n1\n\t\n") == [1]
    with pytest.raises(DecodeError, match="line 5") as info:
        decoder.feed(b"nope\n")
    assert info.value.frame_number == 5


async def test_read_frame_known_answers() -> None:
    reader = reader_with(b"USER bob\r\nPASS x\r\n")
    assert await Delimited(b"\r\n").read_frame(reader) == b"USER bob"
    assert await Delimited(b"\r\n").read_frame(reader) == b"PASS x"
    with pytest.raises(EndOfStream):
        await Delimited(b"\r\n").read_frame(reader)
    reader = reader_with(b"hello\r\nworld\n")
    assert [await Lines().read_frame(reader), await Lines().read_frame(reader)] == [
        "hello",
        "world",
    ]
    reader = reader_with(b"\r\n" + NDJSON + b"\n")
    assert [await JsonLines().read_frame(reader) for _ in range(3)] == NDJSON_VALUES
    with pytest.raises(EndOfStream):
        await JsonLines().read_frame(reader)  # the blank line is skipped, then the end


# -- a delimiter that never comes --------------------------------------------------------


@pytest.mark.parametrize(
    "codec",
    [Delimited(max_frame=10), Delimited(b"\r\n", max_frame=10), Delimited(b"--", max_frame=10)],
    ids=repr,
)
def test_missing_delimiter_fails_once_max_frame_and_delimiter_are_buffered(
    codec: Delimited,
) -> None:
    decoder = codec.decoder()
    assert decoder.feed(codec.encode_many([b"a", b"b"])) == [b"a", b"b"]
    limit = codec.max_frame + len(codec.delimiter)
    assert decoder.feed(b"x" * (limit - 1)) == []
    assert decoder.buffered == limit - 1
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"x")
    assert str(info.value) == (
        f"no delimiter {codec.delimiter!r} within max_frame=10 bytes of frame 3"
    )
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    "codec",
    [
        Delimited(max_frame=64 * KiB),
        Delimited(b"\r\n", max_frame=64 * KiB),
        Lines(max_frame=64 * KiB),
        JsonLines(max_frame=64 * KiB),
    ],
    ids=repr,
)
def test_ten_megabytes_without_a_delimiter_cost_bounded_memory(codec: Any) -> None:
    chunk_size = 4 * KiB
    decoder = codec.decoder()
    fed = 0
    failed_at = None
    gc.collect()
    tracemalloc.start()
    try:
        while fed < 10 * MiB:
            chunk = bytearray(b"7" * chunk_size)  # a fresh object each time
            fed += chunk_size
            try:
                assert decoder.feed(chunk) == []
            except FrameTooLarge:
                failed_at = fed if failed_at is None else failed_at
            assert decoder.buffered <= codec.max_frame + len(codec.delimiter) + chunk_size
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The error came with the chunk that reached the limit, and stuck.
    assert failed_at is not None
    assert failed_at - chunk_size < window(codec) <= failed_at
    assert decoder.buffered == 0
    # Nothing fed after the error is kept (not even by the error's traceback).
    assert current < window(codec) + 4 * chunk_size, current
    assert peak < 3 * window(codec), peak


def test_truncated_frame_has_no_known_missing_count() -> None:
    decoder = Delimited().decoder()
    assert decoder.feed(b"a\nbcd") == [b"a"]
    with pytest.raises(IncompleteFrame) as info:
        decoder.close()
    assert info.value.missing is None
    assert str(info.value) == "stream ended inside frame 2: 3 bytes and no delimiter b'\\n'"


def test_too_large_is_fatal_and_sticky() -> None:
    decoder = Lines(max_frame=3).decoder()
    with pytest.raises(FrameTooLarge) as first:
        decoder.feed(b"abcd\nok\n")
    assert str(first.value) == "frame of 4 bytes exceeds max_frame=3"
    for again in (lambda: decoder.feed(b"ok\n"), lambda: decoder.feed(b""), decoder.close):
        with pytest.raises(FrameTooLarge) as info:
            again()
        assert info.value is first.value
    assert decoder.buffered == 0


# -- text that does not decode ----------------------------------------------------------


def test_invalid_utf8_line_is_named_skipped_and_nothing_else_is_lost() -> None:
    decoder = Lines().decoder()
    assert decoder.feed(b"one\n\xffbad\ntwo\n") == ["one"]
    # The error comes with the next feed, whose bytes are kept.
    with pytest.raises(DecodeError) as info:
        decoder.feed(b"three\n")
    assert str(info.value) == "invalid utf-8 in line 2 at byte 0: invalid start byte"
    assert info.value.frame_number == 2
    assert isinstance(info.value.__cause__, UnicodeDecodeError)
    assert decoder.feed(b"") == ["two", "three"]
    assert decoder.feed(b"four\n") == ["four"]
    decoder.close()


def test_invalid_line_first_in_a_feed_raises_at_once() -> None:
    decoder = Lines("ascii").decoder()
    with pytest.raises(DecodeError) as info:
        decoder.feed(b"caf\xc3\xa9\r\nok\r\n")
    assert info.value.frame_number == 1
    assert "invalid ascii in line 1 at byte 3" in str(info.value)
    assert decoder.feed(b"") == ["ok"]


def test_decode_errors_are_not_sticky() -> None:
    decoder = JsonLines().decoder()
    for number in (1, 2):
        with pytest.raises(DecodeError, match=f"line {number}"):
            decoder.feed(b"{oops}\n")
    assert decoder.feed(b"[]\n") == [[]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"a":}', "invalid JSON on line 2: Expecting value: line 1 column 6 (char 5)"),
        (b"[1,2", "invalid JSON on line 2: Expecting ',' delimiter: line 1 column 5 (char 4)"),
        (b"1 2", "invalid JSON on line 2: Extra data: line 1 column 3 (char 2)"),
        (b'"\xff"', "invalid UTF-8 in JSON line 2 at byte 1: invalid start byte"),
    ],
    ids=repr,
)
def test_invalid_json_line_is_named_and_skipped(line: bytes, message: str) -> None:
    decoder = JsonLines().decoder()
    assert decoder.feed(b"1\n" + line + b"\r\n3\n") == [1]
    with pytest.raises(DecodeError) as info:
        decoder.feed(b"")
    assert str(info.value) == message
    assert info.value.frame_number == 2
    assert decoder.feed(b"") == [3]


@pytest.mark.parametrize(
    "line", [b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 50_000 + b"1"]
)
def test_deeply_nested_json_is_a_decode_error_not_a_recursion_error(line: bytes) -> None:
    codec = JsonLines()
    assert len(line) <= codec.max_frame
    decoder = codec.decoder()
    with pytest.raises(DecodeError, match="invalid JSON on line 1") as info:
        decoder.feed(line + b"\n" + b"[1]\n")
    assert isinstance(info.value.__cause__, RecursionError)
    assert decoder.feed(b"") == [[1]]


async def test_read_frame_skips_a_bad_line_and_goes_on() -> None:
    reader = reader_with(b"1\n\n{\n2\n")
    assert await JsonLines().read_frame(reader) == 1
    with pytest.raises(DecodeError, match="invalid JSON on line: ") as info:
        await JsonLines().read_frame(reader)  # the blank line 2 is skipped
    assert info.value.frame_number is None  # read_frame keeps no count of lines
    assert await JsonLines().read_frame(reader) == 2
    reader = reader_with(b"\xff\nok\n")
    with pytest.raises(DecodeError, match="invalid utf-8 in line at byte 0"):
        await Lines().read_frame(reader)
    assert await Lines().read_frame(reader) == "ok"


async def test_read_frame_keeps_no_state_between_calls_or_readers() -> None:
    codec = JsonLines()
    first, second = reader_with(b"1\n2\n[\n"), reader_with(b"[\n")
    assert [await codec.read_frame(first) for _ in range(2)] == [1, 2]
    for reader in (second, first):
        with pytest.raises(DecodeError, match=r"^invalid JSON on line: ") as info:
            await codec.read_frame(reader)
        assert info.value.frame_number is None


# -- encode errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "frame", "message"),
    [
        (Delimited(), b"a\nb", "frame contains the delimiter b'\\n'"),
        (Delimited(b"\r\n"), b"a\r\nb", "frame contains the delimiter b'\\r\\n'"),
        # These would read back short: the frame's end starts the delimiter early.
        (Delimited(b"--"), b"a-", "frame ends with b'-', which would end it early"),
        (Delimited(b"\n\n"), b"\n", "frame ends with b'\\n', which would end it early"),
        (Delimited(b"aba"), b"xab", "frame ends with b'ab', which would end it early"),
        (Lines(), "a\nb", "a line must not contain '\\n'"),
        (Lines(newline="\r\n"), "a\r", "a line must not end with '\\r'"),
    ],
    ids=repr,
)
def test_encode_rejects_frames_that_would_not_read_back(
    codec: Any, frame: Any, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        codec.encode(frame)
    assert message in str(info.value)
    out = bytearray(b"earlier")
    with pytest.raises(ValueError):
        codec.encode_into(out, frame)
    assert out == b"earlier"


def test_frames_that_end_in_part_of_a_delimiter_that_cannot_overlap_are_fine() -> None:
    for codec, frame in [(Delimited(b"\r\n"), b"a\r"), (Delimited(b"aba"), b"xa")]:
        assert decode_all(codec, codec.encode(frame)) == [frame]


@pytest.mark.parametrize(
    ("codec", "frame", "size"),
    [
        (Delimited(max_frame=3), b"abcd", 4),
        (Lines(max_frame=3), "abcd", 4),
        (Lines(max_frame=3), "é" * 2, 4),  # counted in encoded bytes
        (JsonLines(max_frame=3), "ab", 4),  # '"ab"'
    ],
    ids=repr,
)
def test_encode_rejects_a_frame_over_max_frame(codec: Any, frame: Any, size: int) -> None:
    with pytest.raises(FrameTooLarge) as info:
        codec.encode(frame)
    assert str(info.value) == f"frame of {size} bytes exceeds max_frame=3"
    out = bytearray()
    with pytest.raises(FrameTooLarge):
        codec.encode_into(out, frame)
    assert out == b""


def test_encode_rejects_values_that_have_no_encoding() -> None:
    with pytest.raises(UnicodeEncodeError):
        Lines("ascii").encode("é")
    with pytest.raises(TypeError, match="not JSON serializable"):
        JsonLines().encode(object())


# -- constructor validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Delimited(b""), "delimiter must be non-empty bytes, not b''"),
        (
            lambda: Delimited("\n"),  # type: ignore[arg-type]
            "delimiter must be non-empty bytes, not '\\n'",
        ),
        (lambda: Delimited(max_frame=-1), "max_frame must be >= 0, not -1"),
        (lambda: Lines(newline="\r"), "newline must be '\\n' or '\\r\\n', not '\\r'"),
        (lambda: Lines(newline=""), "newline must be '\\n' or '\\r\\n', not ''"),
        (lambda: Lines(max_frame=-1), "max_frame must be >= 0, not -1"),
        (lambda: JsonLines(max_frame=-1), "max_frame must be >= 0, not -1"),
        (lambda: JsonLines(newline="\n\r"), "newline must be '\\n' or '\\r\\n', not '\\n\\r'"),
    ],
)
def test_constructor_rejects_bad_settings(make: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_unknown_encoding_fails_at_construction() -> None:
    with pytest.raises(LookupError, match="no-such-codec"):
        Lines("no-such-codec")


# -- limits at their edge ---------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n", b"--", b"END"])
def test_delimited_max_frame_is_inclusive(delimiter: bytes) -> None:
    codec = Delimited(delimiter, max_frame=5)
    assert decode_all(codec, codec.encode(b"x" * 5)) == [b"x" * 5]
    with pytest.raises(FrameTooLarge, match="frame of 6 bytes exceeds max_frame=5"):
        codec.encode(b"x" * 6)
    with pytest.raises(FrameTooLarge, match="no delimiter"):
        codec.decoder().feed(b"x" * 6 + delimiter)


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_lines_max_frame_is_inclusive_whatever_the_line_ending(ending: bytes) -> None:
    codec = Lines(max_frame=5)
    assert decode_all(codec, b"x" * 5 + ending) == ["x" * 5]
    with pytest.raises(FrameTooLarge, match=r"exceeds max_frame=5|within max_frame=5"):
        codec.decoder().feed(b"x" * 6 + ending)


def test_json_lines_max_frame_is_inclusive() -> None:
    codec = JsonLines(max_frame=5)
    assert codec.encode("abc") == b'"abc"\n'
    assert decode_all(codec, b'"abc"\r\n') == ["abc"]
    with pytest.raises(FrameTooLarge):
        codec.encode("abcd")
    with pytest.raises(FrameTooLarge, match=r"exceeds max_frame=5|within max_frame=5"):
        codec.decoder().feed(b'"abcd"\n')


def test_max_frame_zero_allows_only_empty_frames() -> None:
    codec = Delimited(max_frame=0)
    assert decode_all(codec, b"\n\n") == [b"", b""]
    with pytest.raises(FrameTooLarge):
        codec.decoder().feed(b"x")
    assert decode_all(Lines(max_frame=0), b"\r\n\n") == ["", ""]


# -- read_frame errors ----------------------------------------------------------------------


async def test_read_frame_reports_a_cut_frame() -> None:
    with pytest.raises(IncompleteFrame) as info:
        await Delimited(b"\r\n").read_frame(reader_with(b"abc\r"))
    assert info.value.missing is None
    assert str(info.value) == "stream ended inside a frame: 4 bytes and no delimiter b'\\r\\n'"


async def test_read_frame_rejects_a_frame_over_max_frame() -> None:
    with pytest.raises(FrameTooLarge, match=r"^frame of 6 bytes exceeds max_frame=5$"):
        await Delimited(max_frame=5).read_frame(reader_with(b"123456\n"))
    with pytest.raises(FrameTooLarge, match=r"^frame of 6 bytes exceeds max_frame=5$"):
        await Lines(max_frame=5).read_frame(reader_with(b"123456\r\n"))


async def test_read_frame_maps_the_reader_limit_to_frame_too_large() -> None:
    reader = reader_with(b"x" * 100 + b"\n", limit=50)
    with pytest.raises(FrameTooLarge, match="within the reader's limit") as info:
        await Delimited().read_frame(reader)
    assert isinstance(info.value.__cause__, asyncio.LimitOverrunError)


async def test_read_frame_agrees_with_the_decoder_on_an_overlong_cut_frame() -> None:
    # Enough bytes to know the frame is too large, then the end of the stream:
    # the decoder fails before it sees the end, so read_frame must say the same.
    codec = Delimited(max_frame=5)
    with pytest.raises(FrameTooLarge):
        codec.decoder().feed(b"x" * 6)
    with pytest.raises(FrameTooLarge, match="no delimiter b'\\\\n' within max_frame=5"):
        await codec.read_frame(reader_with(b"x" * 6))
    with pytest.raises(IncompleteFrame):
        await codec.read_frame(reader_with(b"x" * 5))


def test_lines_refuses_an_encoding_that_is_not_ascii_compatible() -> None:
    with pytest.raises(ValueError, match="'utf-16' is not ASCII-compatible"):
        Lines(encoding="utf-16")


def test_json_lines_refuses_nan_which_is_not_json() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        JsonLines().encode(float("nan"))
