"""Varints and VarintPrefixed: protobuf's bytes, bad varints, limits at their edge."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkit.codecs import VarintPrefixed, decode_varint, encode_varint
from streamkit.errors import EndOfStream, FrameTooLarge, IncompleteFrame, ProtocolError

MAX_UINT64 = 2**64 - 1

# Protocol Buffers encoding guide, "Base 128 Varints".
VECTORS = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "80 01"),
    (150, "96 01"),
    (300, "ac 02"),
    (16383, "ff 7f"),
    (16384, "80 80 01"),
    (2**32 - 1, "ff ff ff ff 0f"),
    (MAX_UINT64, "ff ff ff ff ff ff ff ff ff 01"),
]


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# -- encode_varint / decode_varint ------------------------------------------------


@pytest.mark.parametrize(("value", "hex_bytes"), VECTORS)
def test_varint_known_answers(value: int, hex_bytes: str) -> None:
    wire = bytes.fromhex(hex_bytes)
    assert encode_varint(value) == wire
    assert decode_varint(wire) == (value, len(wire))
    assert decode_varint(b"junk" + wire + b"rest", 4) == (value, 4 + len(wire))


@settings(max_examples=200, deadline=None)
@given(value=st.integers(0, MAX_UINT64))
def test_varint_round_trips_and_every_prefix_is_incomplete(value: int) -> None:
    wire = encode_varint(value)
    assert decode_varint(wire) == (value, len(wire))
    for end in range(len(wire)):
        assert decode_varint(wire[:end]) is None


def test_non_minimal_varints_are_accepted_as_protobuf_does() -> None:
    assert decode_varint(b"\x80\x00") == (0, 2)
    assert decode_varint(b"\xff\x80\x80\x80\x80\x80\x80\x80\x80\x00") == (127, 10)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_encode_varint_rejects_values_outside_uint64(value: int) -> None:
    with pytest.raises(ValueError, match=rf"varint value {value} is outside 0..2\*\*64-1"):
        encode_varint(value)


def test_decode_varint_rejects_more_than_ten_bytes() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_varint(b"\x80" * 10 + b"\x01")
    assert str(info.value) == "varint longer than 10 bytes (a malformed length)"
    # Ten continuation bytes are enough to know: the 11th is not awaited.
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        decode_varint(b"\x80" * 10)
    assert decode_varint(b"\x80" * 9) is None


def test_decode_varint_rejects_a_value_over_uint64() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_varint(b"\xff" * 9 + b"\x02")
    assert str(info.value) == f"varint value {2**64 + 2**63 - 1} exceeds 2**64-1"


# -- VarintPrefixed known answers ------------------------------------------------


def test_protobuf_delimited_message() -> None:
    # writeDelimitedTo of a message with field 1 = 150 (08 96 01): length 3, then the message.
    codec = VarintPrefixed()
    message = bytes.fromhex("08 96 01")
    assert codec.encode(message) == bytes.fromhex("03 08 96 01")
    assert codec.decoder().feed(bytes.fromhex("03 08 96 01 00")) == [message, b""]


@pytest.mark.parametrize(
    ("size", "hex_bytes"), [(0, "00"), (127, "7f"), (128, "80 01"), (300, "ac 02")]
)
def test_length_prefix_is_the_varint_of_the_size(size: int, hex_bytes: str) -> None:
    codec = VarintPrefixed()
    prefix = bytes.fromhex(hex_bytes)
    assert codec.encode(b"z" * size) == prefix + b"z" * size
    decoder = codec.decoder()
    assert decoder.feed(prefix + b"z" * size) == [b"z" * size]
    decoder.close()


async def test_read_frame_reads_multibyte_varints() -> None:
    codec = VarintPrefixed()
    reader = reader_with(codec.encode_many([b"a" * 300, b"", b"b" * 128]))
    assert await codec.read_frame(reader) == b"a" * 300
    assert await codec.read_frame(reader) == b""
    assert await codec.read_frame(reader) == b"b" * 128
    with pytest.raises(EndOfStream):
        await codec.read_frame(reader)


# -- bad input ---------------------------------------------------------------------


def test_oversized_varint_fails_as_soon_as_the_varint_ends() -> None:
    decoder = VarintPrefixed(max_frame=299).decoder()
    assert decoder.feed(b"\xac") == []  # a split inside the varint
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"\x02")  # 300: no payload byte needed
    assert str(info.value) == "frame of 300 bytes exceeds max_frame=299"
    assert decoder.buffered == 0


def test_frames_before_an_oversized_varint_come_first_and_the_error_sticks() -> None:
    codec = VarintPrefixed(max_frame=5)
    decoder = codec.decoder()
    assert decoder.feed(codec.encode(b"abc") + b"\x06") == [b"abc"]
    with pytest.raises(FrameTooLarge, match="frame of 6 bytes exceeds max_frame=5") as first:
        decoder.feed(b"")
    with pytest.raises(FrameTooLarge) as again:
        decoder.feed(codec.encode(b"ok"))
    assert again.value is first.value
    with pytest.raises(FrameTooLarge):
        decoder.close()


def test_overlong_varint_is_a_protocol_error() -> None:
    decoder = VarintPrefixed().decoder()
    assert decoder.feed(b"\x80" * 9) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"\x80")  # the tenth byte still continues
    assert type(info.value) is ProtocolError
    assert "longer than 10 bytes (a malformed length)" in str(info.value)
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        decoder.feed(b"\x01")


def test_varint_over_uint64_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match=r"exceeds 2\*\*64-1"):
        VarintPrefixed().decoder().feed(b"\xff" * 9 + b"\x7f")


def test_truncated_varint_has_no_known_missing_count() -> None:
    decoder = VarintPrefixed().decoder()
    decoder.feed(b"\x80\x80")
    with pytest.raises(IncompleteFrame) as info:
        decoder.close()
    assert info.value.missing is None
    assert str(info.value) == "stream ended inside a varint length (2 of up to 10 bytes)"


def test_truncated_payload_reports_the_missing_bytes() -> None:
    decoder = VarintPrefixed().decoder()
    decoder.feed(b"\xac\x02" + b"p" * 100)
    with pytest.raises(IncompleteFrame) as info:
        decoder.close()
    assert info.value.missing == 200
    assert str(info.value) == (
        "stream ended 200 bytes short of a complete frame (payload: got 100 of 300)"
    )


def test_encode_rejects_a_frame_over_max_frame() -> None:
    codec = VarintPrefixed(max_frame=2)
    with pytest.raises(FrameTooLarge, match=r"^frame of 3 bytes exceeds max_frame=2$"):
        codec.encode(b"abc")
    out = bytearray(b"earlier")
    with pytest.raises(FrameTooLarge):
        codec.encode_into(out, b"abc")
    assert out == b"earlier"


def test_constructor_rejects_a_negative_max_frame() -> None:
    with pytest.raises(ValueError, match=r"^max_frame must be >= 0, not -1$"):
        VarintPrefixed(max_frame=-1)


@pytest.mark.parametrize("max_frame", [0, 127, 128, 300])
def test_max_frame_is_inclusive(max_frame: int) -> None:
    codec = VarintPrefixed(max_frame)
    assert codec.decoder().feed(codec.encode(b"m" * max_frame)) == [b"m" * max_frame]
    with pytest.raises(FrameTooLarge):
        codec.encode(b"m" * (max_frame + 1))
    with pytest.raises(FrameTooLarge, match=f"frame of {max_frame + 1} bytes exceeds"):
        codec.decoder().feed(encode_varint(max_frame + 1))


# -- read_frame errors ---------------------------------------------------------------


async def test_read_frame_rejects_an_oversized_varint_without_waiting_for_payload() -> None:
    reader = reader_with(b"\xac\x02", eof=False)
    async with asyncio.timeout(5):
        with pytest.raises(FrameTooLarge, match="frame of 300 bytes exceeds max_frame=299"):
            await VarintPrefixed(max_frame=299).read_frame(reader)


async def test_read_frame_rejects_an_overlong_varint() -> None:
    reader = reader_with(b"\x80" * 10, eof=False)
    async with asyncio.timeout(5):
        with pytest.raises(ProtocolError, match="longer than 10 bytes"):
            await VarintPrefixed().read_frame(reader)


async def test_read_frame_reports_cuts() -> None:
    codec = VarintPrefixed()
    with pytest.raises(IncompleteFrame, match="varint length"):
        await codec.read_frame(reader_with(b"\x80"))
    with pytest.raises(IncompleteFrame) as info:
        await codec.read_frame(reader_with(b"\x05abc"))
    assert info.value.missing == 2
    assert "payload: got 3 of 5" in str(info.value)
