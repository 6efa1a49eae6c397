"""The session's sans-IO parts: MessageDecoder, the replay buffer, and how acks go out."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkit.codecs import Buffer
from streamkit.errors import FrameTooLarge, IncompleteFrame, ProtocolError
from streamkit.session import Backoff, SessionSettings
from streamkit.session.protocol import (
    Ack,
    Data,
    HelloNew,
    HelloResume,
    Message,
    MessageDecoder,
    Ping,
    ReceiveLimits,
    Welcome,
    decode_message,
    guess_protocol,
)
from tests._sessions import data_frame, frame
from tests.test_codecs_properties import through_one_buffer

LIMIT = 1 << 20


data = data_frame


def feed_all(decoder: MessageDecoder, chunks: list[bytes]) -> list[bytes | Message]:
    out: list[bytes | Message] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


# -- MessageDecoder -------------------------------------------------------------


@given(
    st.lists(st.binary(max_size=200), max_size=30),
    st.lists(st.integers(1, 64), min_size=1, max_size=20),
    st.integers(0, 2**40),
)
def test_payloads_and_messages_come_out_in_order_under_any_chunking(
    payloads: list[bytes], cuts: list[int], first: int
) -> None:
    wire = bytearray()
    expected: list[bytes | Message] = []
    for number, payload in enumerate(payloads):
        wire += data(first + number, payload)
        expected.append(payload)
        if number % 7 == 3:
            wire += frame(Ack(first, 0).encode())
            expected.append(Ack(first, 0))
        if number % 5 == 4:  # a duplicate, as a replay may bring
            wire += data(first + number, payload)
            expected.append(Data(first + number, payload))
    chunks, position = [], 0
    for size in cuts * (len(wire) // sum(cuts) + 1):
        chunks.append(bytes(wire[position : position + size]))
        position += size
    decoder = MessageDecoder(first, LIMIT)
    assert feed_all(decoder, chunks) == expected
    decoder.close()
    assert decoder.expected == first + len(payloads)
    assert decoder.payload_bytes == sum(map(len, payloads))
    assert decoder.messages == sum(not isinstance(item, bytes) for item in expected)


@given(
    st.lists(st.one_of(st.binary(max_size=300), st.just(b"junk")), max_size=20),
    st.lists(st.integers(1, 400), min_size=1, max_size=20),
    st.integers(0, 60),
)
def test_views_of_a_reused_buffer_decode_as_bytes_do_at_any_split(
    items: list[bytes], cuts: list[int], cut_short: int
) -> None:
    """Parsed in place (in_place: a read of a reused receive buffer): the same messages,
    the same error at the same point, and nothing kept of the buffer, as from bytes."""
    wire = bytearray()
    for number, payload in enumerate(items):
        # b"junk" is an unknown message type: an error after the messages before it.
        wire += frame(b"\x99junk") if payload == b"junk" else data(number, payload)
    wire = wire[: len(wire) - cut_short] if cut_short < len(wire) else wire

    def outcome(chunks: Iterable[Buffer]) -> tuple[list[bytes | Message], str]:
        decoder = MessageDecoder(0, 250)  # some payloads are over it: FrameTooLarge
        out: list[bytes | Message] = []
        try:
            for chunk in chunks:
                out += decoder.feed(chunk)
            decoder.close()
        except ProtocolError as exc:
            return out, type(exc).__name__
        return out, "end"

    chunks, position = [], 0
    for size in cuts * (len(wire) // sum(cuts) + 1):
        chunks.append(bytes(wire[position : position + size]))
        position += size
    assert MessageDecoder(0, 1).in_place
    assert outcome(through_one_buffer(chunks)) == outcome([bytes(wire)])


def test_a_gap_is_raised_after_the_frames_before_it() -> None:
    decoder = MessageDecoder(0, LIMIT)
    assert decoder.feed(data(0, b"a") + data(2, b"c")) == [b"a"]
    with pytest.raises(ProtocolError, match="offset 2 but offset 1 was expected"):
        decoder.feed(b"")


def test_an_oversized_body_is_refused_at_its_length() -> None:
    decoder = MessageDecoder(0, 100)
    with pytest.raises(FrameTooLarge, match="frame of 5000 bytes exceeds max_frame=100"):
        decoder.feed(struct.pack(">I", 5000))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty session message"),
        (bytes([0x10]) + b"\0\0\0", "malformed DATA message"),
        (bytes([0x11, 0]), "malformed ACK"),
        (bytes([0x7E]), "unknown session message type 0x7e"),
    ],
)
def test_malformed_messages_are_protocol_errors(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        MessageDecoder(0, LIMIT).feed(frame(body))


def test_a_stream_ending_inside_a_message_is_incomplete() -> None:
    decoder = MessageDecoder(0, LIMIT)
    decoder.feed(data(0, b"payload")[:-3])
    with pytest.raises(IncompleteFrame, match=r"3 bytes short .* \(body: got 13 of 16\)") as info:
        decoder.close()
    assert info.value.missing == 3
    decoder = MessageDecoder(0, LIMIT)
    decoder.feed(b"\0\0")
    with pytest.raises(IncompleteFrame, match="length header: got 2 of 4"):
        decoder.close()


def test_a_large_payload_is_read_in_one_piece_and_kept_as_read() -> None:
    payload = bytes(100_000)
    wire = data(7, payload)
    decoder = MessageDecoder(7, LIMIT)
    assert decoder.header_missing() == 13  # up to a DATA header, whatever comes
    assert decoder.feed(wire[:4]) == []
    assert decoder.missing() == 0  # the offset is not buffered yet
    assert decoder.header_missing() == 9
    assert decoder.feed(wire[4:13]) == []
    assert decoder.missing() == len(payload)
    assert decoder.complete(payload) is payload
    assert decoder.expected == 8
    assert decoder.payload_bytes == len(payload)
    assert decoder.buffered == 0


def test_a_short_message_needs_no_more_than_its_own_bytes() -> None:
    decoder = MessageDecoder(0, LIMIT)
    assert decoder.feed(frame(Ping().encode())[:4]) == []
    assert decoder.header_missing() == 0  # a 1-byte body: do not wait for 9 more
    assert decoder.feed(frame(Ping().encode())[4:]) == [Ping()]


def test_complete_gives_duplicates_as_data_and_raises_gaps_for_good() -> None:
    payload = bytes(50_000)
    decoder = MessageDecoder(3, LIMIT)
    decoder.feed(data(1, payload)[:13])
    assert decoder.complete(payload) == Data(1, payload)
    assert decoder.expected == 3
    decoder.feed(data(9, payload)[:13])
    with pytest.raises(ProtocolError, match="offset 9 but offset 3 was expected"):
        decoder.complete(payload)
    with pytest.raises(ProtocolError, match="offset 9"):
        decoder.feed(b"")


def test_complete_needs_exactly_the_missing_bytes() -> None:
    decoder = MessageDecoder(0, LIMIT)
    decoder.feed(data(0, bytes(100))[:13])
    with pytest.raises(ValueError, match="exactly the 100 missing bytes"):
        decoder.complete(bytes(99))


# -- the handshake messages ------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        HelloNew(ReceiveLimits(1000)),
        HelloNew(ReceiveLimits(1, 2**32 - 1, 2**64 - 1)),
        HelloResume(b"\1" * 16, b"\2" * 32, 7, ReceiveLimits(2**32 - 10, 1, 1)),
        Welcome(False, b"\3" * 16, 0, b"\4" * 32, ReceiveLimits(1, 300, 5000)),
        Welcome(True, b"\3" * 16, 12, limits=ReceiveLimits(max_frame=5000, max_unacked_bytes=77)),
    ],
)
def test_handshake_messages_round_trip_with_their_limits(
    message: HelloNew | HelloResume | Welcome,
) -> None:
    assert decode_message(message.encode()) == message


def test_handshake_layouts_are_as_documented() -> None:
    limits = struct.pack(">IIQ", 0x01020304, 0x05060708, 0x090A0B0C0D0E0F10)
    announced = ReceiveLimits(0x01020304, 0x05060708, 0x090A0B0C0D0E0F10)
    assert HelloNew(announced).encode() == b"\x01" + limits
    assert len(HelloNew().encode()) == 17
    resume = HelloResume(b"i" * 16, b"p" * 32, 5, ReceiveLimits(9, 10, 11)).encode()
    assert resume == b"\x02" + b"i" * 16 + b"p" * 32 + struct.pack(">QIIQ", 5, 9, 10, 11)
    welcome = Welcome(False, b"i" * 16, 0, b"t" * 32, ReceiveLimits(9, 10, 11)).encode()
    assert welcome == b"\x03\x00" + b"i" * 16 + struct.pack(">QIIQ", 0, 9, 10, 11) + b"t" * 32
    resumed = Welcome(True, b"i" * 16, 3, b"", ReceiveLimits(9, 10, 11)).encode()
    assert resumed == b"\x03\x01" + b"i" * 16 + struct.pack(">QIIQ", 3, 9, 10, 11)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x01", "malformed HELLO_NEW message: 1 bytes, expected 17"),
        (b"\x01" + struct.pack(">I", 1000), "malformed HELLO_NEW message: 5 bytes, expected 17"),
        (b"\x01" + struct.pack(">IIQ", 0, 1, 1), "malformed HELLO_NEW message: max_frame=0"),
        (b"\x01" + struct.pack(">IIQ", 2**32 - 1, 1, 1), "max_frame=4294967295"),
        (
            b"\x01" + struct.pack(">IIQ", 1, 0, 1),
            r"malformed HELLO_NEW message: max_unacked_frames=0, max_unacked_bytes=1 "
            r"\(a window must be at least 1\)",
        ),
        (b"\x01" + struct.pack(">IIQ", 1, 1, 0), "max_unacked_frames=1, max_unacked_bytes=0"),
        (
            b"\x02" + bytes(48) + struct.pack(">QI", 0, 1),
            "malformed HELLO_RESUME message: 61 bytes, expected 73",
        ),
        (
            b"\x02" + bytes(48) + struct.pack(">QIIQ", 0, 0, 1, 1),
            "malformed HELLO_RESUME message: max_frame=0",
        ),
        (
            b"\x02" + bytes(48) + struct.pack(">QIIQ", 0, 1, 0, 1),
            "malformed HELLO_RESUME message: max_unacked_frames=0",
        ),
        (
            b"\x03\x01" + bytes(16) + struct.pack(">QI", 0, 1),
            r"malformed WELCOME message: 30 bytes \(expected 42 or 74\)",
        ),
        (
            b"\x03\x01" + bytes(16) + struct.pack(">QIIQ", 0, 0, 1, 1),
            "WELCOME message: max_frame=0",
        ),
        (
            b"\x03\x01" + bytes(16) + struct.pack(">QIIQ", 0, 1, 1, 0),
            "malformed WELCOME message: max_unacked_frames=1, max_unacked_bytes=0",
        ),
    ],
)
def test_malformed_handshake_messages_are_protocol_errors(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_message(body)


def test_max_frame_setting_must_fit_the_wire() -> None:
    SessionSettings(max_frame=2**32 - 10)
    with pytest.raises(ValueError, match="max_frame must be <= 4294967286"):
        SessionSettings(max_frame=2**32 - 9)


def test_window_settings_must_fit_the_wire() -> None:
    SessionSettings(max_unacked_frames=2**32 - 1, max_unacked_bytes=2**64 - 1)
    with pytest.raises(ValueError, match="max_unacked_frames must be <= 4294967295"):
        SessionSettings(max_unacked_frames=2**32)
    with pytest.raises(ValueError, match="max_unacked_bytes must be <= 18446744073709551615"):
        SessionSettings(max_unacked_bytes=2**64)
    with pytest.raises(ValueError, match="max_unacked_bytes must be >= 1"):
        SessionSettings(max_unacked_bytes=0)


def test_backoff_delays_double_up_to_the_maximum_within_their_jitter() -> None:
    delays = Backoff(initial=0.1, maximum=0.5, jitter=0).delays(random.Random(1))
    assert [next(delays) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    jittered = Backoff(initial=0.1, maximum=0.5, jitter=0.5).delays(random.Random(1))
    for ceiling in (0.1, 0.2, 0.4, 0.5, 0.5):
        assert ceiling / 2 <= next(jittered) <= ceiling


@pytest.mark.parametrize(
    ("first_bytes", "guess"),
    [
        (b"\x16\x03\x01\x02\x00", "a TLS handshake (is TLS enabled on one side only?)"),
        (b"\x15\x03\x03\x00\x02", "a TLS alert (is TLS enabled on one side only?)"),
        (b"SKSP\x02" + bytes(16), "the streamkit session protocol (a session server or a hub"),
        (b"HTTP/1.1 400 Bad Request", "HTTP"),
        (b"GET / HTTP/1.1", "HTTP"),
        (b"\x00\x00\x00\x05hello", "a length-prefixed frame"),
    ],
)
def test_guess_protocol_names_what_a_peer_speaks(first_bytes: bytes, guess: str) -> None:
    assert (guess_protocol(first_bytes) or "").startswith(guess)


def test_guess_protocol_is_none_for_anything_else() -> None:
    assert guess_protocol(b"hello\n") is None
    assert guess_protocol(b"") is None
