"""LengthPrefixed: bytes other implementations write, bad input, limits at their edge."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streamkit.codecs import LengthPrefixed
from streamkit.errors import EndOfStream, FrameTooLarge, IncompleteFrame, ProtocolError

HEADERS = (1, 2, 3, 4, 8)
BYTEORDERS: tuple[Any, ...] = ("big", "little")
HELLO_WORLD = b"HELLO, WORLD"


def decode_all(codec: LengthPrefixed, wire: bytes) -> list[bytes]:
    decoder = codec.decoder()
    frames = decoder.feed(wire)
    decoder.close()
    return frames


def reader_with(data: bytes, eof: bool = True, limit: int = 2**16) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# -- known answers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "wire"),
    [
        # Twisted Int32StringReceiver, Netty LengthFieldPrepender(4), Erlang {packet, 4},
        # and node's frame-stream (its default: a 4-byte big-endian UInt32 length).
        (LengthPrefixed(), b"\x00\x00\x00\x05hello"),
        # Twisted Int16StringReceiver, Erlang {packet, 2}.
        (LengthPrefixed(2), b"\x00\x05hello"),
        # Twisted Int8StringReceiver, Erlang {packet, 1}.
        (LengthPrefixed(1), b"\x05hello"),
        # Netty LengthFieldPrepender(3): a medium (24-bit) length.
        (LengthPrefixed(3), b"\x00\x00\x05hello"),
        (LengthPrefixed(8), b"\x00\x00\x00\x00\x00\x00\x00\x05hello"),
        # Little-endian headers, as Int16StringReceiver with structFormat "<H".
        (LengthPrefixed(2, "little"), b"\x05\x00hello"),
        (LengthPrefixed(3, "little"), b"\x05\x00\x00hello"),
        (LengthPrefixed(4, "little"), b"\x05\x00\x00\x00hello"),
        (LengthPrefixed(8, "little"), b"\x05\x00\x00\x00\x00\x00\x00\x00hello"),
        # Netty LengthFieldPrepender(2, lengthIncludesLengthFieldLength=true).
        (LengthPrefixed(2, adjustment=-2), b"\x00\x07hello"),
    ],
    ids=repr,
)
def test_known_answers(codec: LengthPrefixed, wire: bytes) -> None:
    assert codec.encode(b"hello") == wire
    assert decode_all(codec, wire) == [b"hello"]


def test_multibyte_lengths_put_the_high_byte_where_the_byteorder_says() -> None:
    frame = b"x" * 0x0102
    assert LengthPrefixed(2).encode(frame)[:2] == b"\x01\x02"
    assert LengthPrefixed(2, "little").encode(frame)[:2] == b"\x02\x01"
    assert LengthPrefixed(4).encode(frame)[:4] == b"\x00\x00\x01\x02"
    assert LengthPrefixed(4, "little").encode(frame)[:4] == b"\x02\x01\x00\x00"


def test_empty_frames_are_just_a_zero_header() -> None:
    codec = LengthPrefixed()
    assert codec.encode(b"") == b"\x00\x00\x00\x00"
    assert decode_all(codec, b"\x00\x00\x00\x00" * 3) == [b"", b"", b""]


# Netty's LengthFieldBasedFrameDecoder javadoc examples. streamkit always strips
# the length field itself and keeps the bytes before it (offset) with the frame.
@pytest.mark.parametrize(
    ("codec", "wire", "frame"),
    [
        # lengthFieldLength=2: 0x000C | "HELLO, WORLD".
        (LengthPrefixed(2), b"\x00\x0c" + HELLO_WORLD, HELLO_WORLD),
        # The length counts the header: lengthAdjustment=-2, 0x000E | "HELLO, WORLD".
        (LengthPrefixed(2, adjustment=-2), b"\x00\x0e" + HELLO_WORLD, HELLO_WORLD),
        # A 2-byte magic before a 3-byte length: lengthFieldOffset=2.
        (
            LengthPrefixed(3, offset=2),
            b"\xca\xfe\x00\x00\x0c" + HELLO_WORLD,
            b"\xca\xfe" + HELLO_WORLD,
        ),
        # A 2-byte header after the length, not counted by it: lengthAdjustment=2.
        (
            LengthPrefixed(3, adjustment=2),
            b"\x00\x00\x0c\xca\xfe" + HELLO_WORLD,
            b"\xca\xfe" + HELLO_WORLD,
        ),
        # HDR1 | length | HDR2 | payload: lengthFieldOffset=1, lengthAdjustment=1.
        (
            LengthPrefixed(2, offset=1, adjustment=1),
            b"\xca\x00\x0c\xfe" + HELLO_WORLD,
            b"\xca\xfe" + HELLO_WORLD,
        ),
        # The same with a length counting the whole message (16): lengthAdjustment=-3.
        (
            LengthPrefixed(2, offset=1, adjustment=-3),
            b"\xca\x00\x10\xfe" + HELLO_WORLD,
            b"\xca\xfe" + HELLO_WORLD,
        ),
    ],
    ids=repr,
)
def test_netty_length_field_examples(codec: LengthPrefixed, wire: bytes, frame: bytes) -> None:
    assert decode_all(codec, wire) == [frame]
    assert codec.encode(frame) == wire


async def test_read_frame_reads_known_answers() -> None:
    codec = LengthPrefixed(3, offset=2)
    reader = reader_with(b"\xca\xfe\x00\x00\x0c" + HELLO_WORLD + b"\xbe\xef\x00\x00\x00")
    assert await codec.read_frame(reader) == b"\xca\xfe" + HELLO_WORLD
    assert await codec.read_frame(reader) == b"\xbe\xef"
    with pytest.raises(EndOfStream, match="end of stream"):
        await codec.read_frame(reader)


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("byteorder", BYTEORDERS)
def test_oversized_length_fails_on_the_header_alone(header: int, byteorder: Any) -> None:
    codec = LengthPrefixed(header, byteorder, max_frame=100)
    decoder = codec.decoder()
    assert decoder.feed((101).to_bytes(header, byteorder)[:-1]) == []
    # The last header byte is enough: no payload byte is awaited or buffered.
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed((101).to_bytes(header, byteorder)[-1:])
    assert str(info.value) == "frame of 101 bytes exceeds max_frame=100"
    assert decoder.buffered == 0


def test_huge_eight_byte_length_fails_without_allocating() -> None:
    decoder = LengthPrefixed(8).decoder()
    with pytest.raises(FrameTooLarge, match=r"frame of 18446744073709551615 bytes exceeds"):
        decoder.feed(b"\xff" * 8)


def test_frames_before_an_oversized_header_come_first() -> None:
    codec = LengthPrefixed(2, max_frame=10)
    decoder = codec.decoder()
    assert decoder.feed(codec.encode_many([b"a", b"bc"]) + b"\x00\x0b") == [b"a", b"bc"]
    with pytest.raises(FrameTooLarge, match="frame of 11 bytes exceeds max_frame=10"):
        decoder.feed(b"")
    assert decoder.buffered == 0


@pytest.mark.parametrize("wire", [b"GET / HTTP/1.1\r\n", b"SSH-2.0-x\r\n", b"SKSP\x02"])
def test_a_text_header_is_named_as_another_protocol(wire: bytes) -> None:
    with pytest.raises(FrameTooLarge, match="looks like text: is the peer speaking another"):
        LengthPrefixed().decoder().feed(wire)
    with pytest.raises(FrameTooLarge) as info:
        LengthPrefixed().decoder().feed(b"\xff\xff\xff\xff")
    assert "text" not in str(info.value)


def test_oversized_header_is_sticky() -> None:
    decoder = LengthPrefixed(1, max_frame=3).decoder()
    with pytest.raises(FrameTooLarge) as first:
        decoder.feed(b"\x04abcd")
    for again in (lambda: decoder.feed(b"\x01a"), lambda: decoder.feed(b""), decoder.close):
        with pytest.raises(FrameTooLarge) as info:
            again()
        assert info.value is first.value
    assert decoder.buffered == 0


def test_length_below_the_adjustment_is_a_protocol_error() -> None:
    # The length counts a 4-byte header, so a value under 4 cannot be right.
    decoder = LengthPrefixed(4, adjustment=-4).decoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"\x00\x00\x00\x03")
    assert type(info.value) is ProtocolError
    assert "length value 3 with adjustment=-4 gives a negative size" in str(info.value)
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00\x00\x00\x04")  # fatal: raised again


def test_truncated_header_reports_what_the_header_needs() -> None:
    decoder = LengthPrefixed(4).decoder()
    decoder.feed(b"\x00\x00")
    with pytest.raises(IncompleteFrame) as info:
        decoder.close()
    assert info.value.missing == 2
    assert "length header: got 2 of 4" in str(info.value)


def test_truncated_payload_reports_the_missing_bytes() -> None:
    codec = LengthPrefixed(2, offset=1)
    decoder = codec.decoder()
    assert decoder.feed(codec.encode(b"Mok") + b"M\x00\x05abc") == [b"Mok"]
    assert decoder.buffered == 6
    with pytest.raises(IncompleteFrame) as info:
        decoder.close()
    assert info.value.missing == 2
    assert str(info.value) == (
        "stream ended 2 bytes short of a complete frame (payload: got 3 of 5)"
    )


def test_close_at_a_frame_boundary_is_quiet() -> None:
    codec = LengthPrefixed()
    decoder = codec.decoder()
    assert decoder.feed(codec.encode(b"x")) == [b"x"]
    decoder.close()


# -- encode errors ------------------------------------------------------------------


def test_encode_rejects_a_frame_over_max_frame() -> None:
    codec = LengthPrefixed(max_frame=4)
    with pytest.raises(FrameTooLarge, match=r"^frame of 5 bytes exceeds max_frame=4$"):
        codec.encode(b"12345")
    with pytest.raises(FrameTooLarge):
        codec.encode_many([b"ok", b"12345"])


@pytest.mark.parametrize(
    ("codec", "size"),
    [
        (LengthPrefixed(1), 256),
        (LengthPrefixed(2), 65536),
        (LengthPrefixed(1, adjustment=-1), 255),  # the length counts its own byte
    ],
    ids=repr,
)
def test_encode_rejects_a_length_the_header_cannot_hold(codec: LengthPrefixed, size: int) -> None:
    with pytest.raises(FrameTooLarge) as info:
        codec.encode(b"x" * size)
    assert f"frame of {size} bytes does not fit a {codec.header}-byte length header" in str(
        info.value
    )
    assert codec.encode(b"x" * (size - 1))  # one byte less fits


def test_encode_rejects_a_frame_shorter_than_its_leading_bytes() -> None:
    with pytest.raises(ValueError, match="frame of 1 bytes is shorter than offset=2"):
        LengthPrefixed(offset=2).encode(b"x")


@pytest.mark.parametrize(
    ("codec", "frame"),
    [
        (LengthPrefixed(max_frame=2), b"abc"),
        (LengthPrefixed(1, offset=2), b"ab" + b"x" * 300),
        (LengthPrefixed(offset=2), b"a"),
    ],
    ids=repr,
)
def test_encode_into_leaves_the_buffer_alone_when_it_fails(
    codec: LengthPrefixed, frame: bytes
) -> None:
    out = bytearray(b"earlier")
    with pytest.raises((FrameTooLarge, ValueError)):
        codec.encode_into(out, frame)
    assert out == b"earlier"


# -- constructor validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"header": 5}, "header must be 1, 2, 3, 4 or 8 bytes, not 5"),
        ({"header": 0}, "header must be 1, 2, 3, 4 or 8 bytes, not 0"),
        ({"byteorder": "network"}, "byteorder must be 'big' or 'little', not 'network'"),
        ({"max_frame": -1}, "max_frame must be >= 0, not -1"),
        ({"offset": -1}, "offset must be >= 0, not -1"),
    ],
    ids=repr,
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        LengthPrefixed(**kwargs)
    assert str(info.value) == message


# -- limits at their edge -----------------------------------------------------------------


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("adjustment", [0, "-header"])
def test_max_frame_is_inclusive(header: int, adjustment: Any) -> None:
    codec = LengthPrefixed(
        header, max_frame=200, adjustment=-header if adjustment == "-header" else 0
    )
    exact = codec.encode(b"x" * 200)
    assert decode_all(codec, exact) == [b"x" * 200]
    with pytest.raises(FrameTooLarge, match="exceeds max_frame=200"):
        codec.encode(b"x" * 201)
    over = LengthPrefixed(header, adjustment=codec.adjustment).encode(b"x" * 201)
    with pytest.raises(FrameTooLarge, match="frame of 201 bytes exceeds max_frame=200"):
        codec.decoder().feed(over[: codec.header])


def test_one_byte_header_holds_255_and_max_frame_zero_holds_empty_frames() -> None:
    assert decode_all(LengthPrefixed(1, max_frame=255), b"\xff" + b"x" * 255) == [b"x" * 255]
    empty = LengthPrefixed(1, max_frame=0)
    assert empty.encode(b"") == b"\x00"
    assert decode_all(empty, b"\x00\x00") == [b"", b""]
    with pytest.raises(FrameTooLarge, match="frame of 1 bytes exceeds max_frame=0"):
        empty.decoder().feed(b"\x01")


# -- read_frame over a real StreamReader ----------------------------------------------------


async def test_read_frame_raises_end_of_stream_only_between_frames() -> None:
    codec = LengthPrefixed(2)
    reader = reader_with(codec.encode(b"ab"))
    assert await codec.read_frame(reader) == b"ab"
    with pytest.raises(EndOfStream):
        await codec.read_frame(reader)


async def test_read_frame_reports_a_cut_in_the_header() -> None:
    with pytest.raises(IncompleteFrame) as info:
        await LengthPrefixed(4).read_frame(reader_with(b"\x00"))
    assert info.value.missing == 3
    assert "length header: got 1 of 4" in str(info.value)
    assert isinstance(info.value.__cause__, asyncio.IncompleteReadError)


async def test_read_frame_reports_a_cut_in_the_payload() -> None:
    with pytest.raises(IncompleteFrame) as info:
        await LengthPrefixed(2).read_frame(reader_with(b"\x00\x05ab"))
    assert info.value.missing == 3
    assert "payload: got 2 of 5" in str(info.value)


async def test_read_frame_rejects_an_oversized_header_without_waiting_for_payload() -> None:
    # No EOF and no payload: read_frame must fail on the header, not wait.
    reader = reader_with(b"\x00\x00\x10\x00", eof=False)
    async with asyncio.timeout(5):
        with pytest.raises(FrameTooLarge, match="frame of 4096 bytes exceeds max_frame=4095"):
            await LengthPrefixed(max_frame=4095).read_frame(reader)


async def test_read_frame_rejects_a_negative_size() -> None:
    with pytest.raises(ProtocolError, match="gives a negative size"):
        await LengthPrefixed(2, adjustment=-2).read_frame(reader_with(b"\x00\x01"))


async def test_read_frame_ignores_the_reader_limit() -> None:
    # readexactly is not bound by the reader's limit: only max_frame counts.
    codec = LengthPrefixed(max_frame=10_000)
    reader = reader_with(codec.encode(b"y" * 10_000), limit=16)
    assert await codec.read_frame(reader) == b"y" * 10_000


def test_missing_and_complete_hand_over_the_rest_of_a_frame() -> None:
    codec = LengthPrefixed(offset=2)
    decoder = codec.decoder()
    assert decoder.missing() == 0  # no header yet
    assert decoder.header_missing() == 6  # the offset bytes and the length
    assert decoder.feed(b"ab\x00") == []
    assert decoder.header_missing() == 3
    assert decoder.feed(b"\x00\x00\x05he") == []
    assert decoder.header_missing() == 0
    assert decoder.missing() == 3
    with pytest.raises(ValueError, match="exactly the 3 missing bytes"):
        decoder.complete(b"l")
    assert decoder.complete(b"llo") == b"abhello"  # offset bytes kept, as feed does
    assert decoder.missing() == 0 and decoder.buffered == 0
    assert decoder.feed(codec.encode(b"ab" + b"next")) == [b"abnext"]
    payload = b"p" * 1000
    plain = LengthPrefixed().decoder()
    plain.feed(b"\x00\x00\x03\xe8")
    assert plain.complete(payload) is payload  # nothing buffered: no copy at all


@pytest.mark.parametrize(
    ("codec", "frame"),
    [
        (LengthPrefixed(header=1), b"x" * 256),  # over the header's range
        (LengthPrefixed(max_frame=10), b"x" * 11),  # over max_frame
        (LengthPrefixed(header=1, adjustment=-1), b"x" * 255),  # counts itself: 256 > 255
    ],
)
def test_encode_into_checks_every_limit(codec: LengthPrefixed, frame: bytes) -> None:
    out = bytearray(b"before")
    with pytest.raises(FrameTooLarge):
        codec.encode_into(out, frame)
    assert out == b"before"  # nothing appended


def test_encode_into_with_adjustment_and_offset_matches_encode() -> None:
    for codec in (
        LengthPrefixed(header=2, adjustment=-2),
        LengthPrefixed(header=1, adjustment=3),
        LengthPrefixed(offset=2),
    ):
        out = bytearray()
        codec.encode_into(out, b"ab" + b"payload")
        assert bytes(out) == codec.encode(b"ab" + b"payload")
        assert codec.decoder().feed(bytes(out)) == [b"ab" + b"payload"]
