"""take_buffered(): hand the bytes a decoder has not delivered to another codec."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamkit.codecs import Delimited, LengthPrefixed, Lines, VarintPrefixed
from streamkit.errors import FrameTooLarge

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if a < b]


def switch_after_first(first: Any, second: Any, chunks: Sequence[bytes]) -> tuple[Any, list[Any]]:
    """Decode one frame with ``first``, then everything else with ``second``.

    Like a protocol reading a handshake: a chunk may hold the handshake and
    more, so the first decoder may decode ahead; those frames are handed
    back with ``take_buffered(frames=...)``.
    """
    decoder = first.decoder()
    handshake = None
    frames: list[Any] = []
    for chunk in chunks:
        if handshake is None:
            decoded = decoder.feed(chunk)
            if not decoded:
                continue
            handshake = decoded[0]
            rest = decoder.take_buffered(frames=len(decoded) - 1)
            assert decoder.buffered == 0
            decoder = second.decoder()
            chunk = rest
        frames += decoder.feed(chunk)
    decoder.close()
    return handshake, frames


# Text that is valid UTF-8 wherever a "\n" cuts it: length headers and varints
# under 128 are ASCII too, so decoding ahead as lines never fails.
ASCII = st.binary(max_size=40).map(lambda b: bytes(x % 128 for x in b))


@FAST
@given(
    greeting=st.text("abcXYZ 0123", max_size=20),
    frames=st.lists(ASCII, max_size=6),
    cuts=st.lists(st.integers(1, 400), max_size=8),
)
def test_lines_handshake_then_length_prefixed_frames(
    greeting: str, frames: list[bytes], cuts: list[int]
) -> None:
    binary = LengthPrefixed(2)
    wire = Lines(newline="\r\n").encode(greeting) + binary.encode_many(frames)
    handshake, decoded = switch_after_first(Lines(), binary, split(wire, cuts))
    assert handshake == greeting
    assert decoded == frames


@FAST
@given(
    hello=ASCII,
    lines=st.lists(st.text("abc -\r", max_size=10).map(lambda s: s.rstrip("\r")), max_size=6),
    cuts=st.lists(st.integers(1, 200), max_size=8),
)
def test_varint_handshake_then_lines(hello: bytes, lines: list[str], cuts: list[int]) -> None:
    # Text bytes are one-byte varints under 128: decoding ahead never fails.
    wire = VarintPrefixed().encode(hello) + Lines().encode_many(lines)
    handshake, decoded = switch_after_first(VarintPrefixed(), Lines(), split(wire, cuts))
    assert handshake == hello
    assert decoded == lines


def test_take_buffered_returns_the_partial_frame_and_empties_the_decoder() -> None:
    codec = LengthPrefixed(2)
    decoder = codec.decoder()
    assert decoder.feed(codec.encode(b"one") + b"\x00\x05ab") == [b"one"]
    assert decoder.take_buffered() == b"\x00\x05ab"
    assert decoder.buffered == 0
    decoder.close()  # nothing left: no IncompleteFrame
    assert decoder.take_buffered() == b""


def test_take_buffered_gives_back_frames_decoded_ahead() -> None:
    decoder = Lines().decoder()
    assert decoder.feed(b"HELLO\r\nx\ny\nzz") == ["HELLO", "x", "y"]
    assert decoder.take_buffered(frames=2) == b"x\ny\nzz"
    decoder = Lines().decoder()
    assert decoder.feed(b"a\nb\n") == ["a", "b"]
    assert decoder.take_buffered(frames=2) == b"a\nb\n"


def test_take_buffered_rejects_bad_frame_counts() -> None:
    decoder = Lines().decoder()
    decoder.feed(b"a\nb\n")
    with pytest.raises(ValueError, match="frames must be >= 0, not -1"):
        decoder.take_buffered(frames=-1)
    with pytest.raises(ValueError, match="cannot give back more frames than the last feed"):
        decoder.take_buffered(frames=3)


def test_a_decoder_reused_after_take_buffered_starts_afresh() -> None:
    decoder = Delimited(b"--").decoder()
    assert decoder.feed(b"abcdef-") == []  # scanned up to the possible delimiter start
    assert decoder.take_buffered() == b"abcdef-"
    assert decoder.feed(b"--x--") == [b"", b"x"]


def test_a_decoder_with_a_fatal_error_has_nothing_to_give_back() -> None:
    decoder = LengthPrefixed(1, max_frame=1).decoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x02ab")
    assert decoder.take_buffered() == b""


@pytest.mark.parametrize(
    "payload",
    [b"\xff\n", b"z" * 70_000],  # invalid UTF-8 as a line; a line over max_frame
    ids=["DecodeError", "FrameTooLarge"],
)
def test_switching_keeps_bytes_the_old_codec_failed_to_decode_ahead(payload: bytes) -> None:
    binary = LengthPrefixed()
    wire = b"HELLO\n" + binary.encode_many([payload, b"next"])
    handshake, decoded = switch_after_first(Lines(), binary, [wire])
    assert handshake == "HELLO"
    assert decoded == [payload, b"next"]


@FAST
@given(
    frames=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 2000), max_size=8),
    data=st.data(),
)
def test_take_buffered_gives_back_exact_bytes_after_feeds_from_a_reused_buffer(
    frames: list[bytes], cuts: list[int], data: st.DataObject
) -> None:
    """LengthPrefixed keeps only the partial frame of such input, and rebuilds the rest."""
    codec = LengthPrefixed()
    wire = codec.encode_many(frames)
    chunks = split(wire, cuts)
    stop = data.draw(st.integers(1, len(chunks)))
    buffer = bytearray(len(wire))
    decoder = codec.decoder()
    decoded: list[bytes] = []
    last: list[bytes] = []
    for chunk in chunks[:stop]:
        buffer[: len(chunk)] = chunk
        with memoryview(buffer) as view:
            last = decoder.feed(view[: len(chunk)])
        buffer[:] = bytes(len(buffer))  # reused for the next read
        decoded += last
    fed = sum(map(len, chunks[:stop]))
    back = data.draw(st.integers(0, len(last)))
    rest = decoder.take_buffered(frames=back)
    start = len(codec.encode_many(decoded[: len(decoded) - back]))
    assert rest == wire[start:fed]
    assert decoder.buffered == 0
