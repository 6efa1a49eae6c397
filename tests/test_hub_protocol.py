"""The hub's message encoding: round trips and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkit.errors import ProtocolError
from streamkit.hub.protocol import decode_message, decode_records, encode_message


@given(st.lists(st.binary(max_size=300), max_size=50), st.integers(0, 2**40))
def test_messages_round_trip(records: list[bytes], offset: int) -> None:
    header = {"op": "records", "id": 3, "offset": offset}
    decoded, body = decode_message(encode_message(header, records))
    assert decoded == header
    assert decode_records(body) == records


def test_known_layout() -> None:
    message = encode_message({"op": "append"}, [b"ab", b""])
    head = b'{"op":"append"}'
    assert message == (
        len(head).to_bytes(4, "big") + head + b"\0\0\0\2" + b"\0\0\0\2\0\0\0\0" + b"ab"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\0\0\1", "3 bytes is too short"),
        (b"\0\0\0\3\0\0\0\1", "cannot hold 3 lengths"),
        (b"\0\0\0\1\0\0\0\5abc", "does not match its record lengths"),
        (b"\0\0\0\1\0\0\0\1abc", "does not match its record lengths"),
        (b"\xff\xff\xff\xff", "cannot hold 4294967295 lengths"),
    ],
)
def test_malformed_bodies_are_protocol_errors(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_records(body)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\0\0", "too short"),
        (b"\0\0\0\x09{}", "runs past its message"),
        (b"\0\0\0\x02{]", "not valid JSON"),
        (b"\0\0\0\x02[]", "must be a JSON object"),
    ],
)
def test_malformed_headers_are_protocol_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_message(raw)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_protocol_error(raw: bytes) -> None:
    try:
        _, body = decode_message(raw)
        decode_records(body)
    except ProtocolError:
        pass
