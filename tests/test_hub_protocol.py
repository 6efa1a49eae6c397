"""The hub's message encoding: round trips and malformed input."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkit.errors import ProtocolError
from streamkit.hub.protocol import (
    MAX_QUOTE,
    MAX_REQUEST_ID,
    Records,
    check_request_id,
    decode_message,
    decode_records,
    encode_message,
    encode_records,
    quote,
    records_size,
)

#: What a peer can put in a header field: any JSON value, some of them huge.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=3000)
    | st.sampled_from(["\\" * 10_000, "\x00" * 10_000, "\U0010ffff" * 10_000, 10**4000]),
    lambda children: st.lists(children, max_size=30) | st.dictionaries(st.text(), children),
    max_leaves=200,
)


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
    # One record (an awaited append) is packed the same way, by its own path.
    assert encode_records([b"abc"]) == b"\0\0\0\1" + b"\0\0\0\3" + b"abc"
    bytes_like = cast(list[bytes], [bytearray(b"")])  # not bytes: packed the same
    assert encode_records(bytes_like) == b"\0\0\0\1\0\0\0\0"


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


@given(JSON_VALUES)
def test_quote_is_repr_for_small_values_and_bounded_for_any(value: object) -> None:
    quoted = quote(value)
    assert len(quoted) < 1000
    if isinstance(value, str) and len(value) <= MAX_QUOTE:
        assert quoted == repr(value)


def test_quote_shows_a_prefix_and_the_length() -> None:
    assert quote("ab") == "'ab'"
    assert quote("x" * 1000) == repr("x" * MAX_QUOTE) + "... (1000 characters)"
    assert quote(b"\0" * 100) == repr(b"\0" * MAX_QUOTE) + "... (100 bytes)"
    assert quote(10**5000) == "an int of 16610 bits"
    assert quote([[[[1]]]]) == "[[...]]"


@pytest.mark.parametrize(
    ("request_id", "error", "message"),
    [
        (None, TypeError, "must be an int, not NoneType"),
        (True, TypeError, "not bool"),
        ("1", TypeError, "not str"),
        (-1, ValueError, "not -1"),
        (MAX_REQUEST_ID + 1, ValueError, f"0..{MAX_REQUEST_ID}, not {MAX_REQUEST_ID + 1}"),
        (10**4000, ValueError, "not an int of 13288 bits"),
    ],
)
def test_a_request_id_is_an_int_within_63_bits(
    request_id: object, error: type[Exception], message: str
) -> None:
    assert check_request_id(0) == 0
    assert check_request_id(MAX_REQUEST_ID) == MAX_REQUEST_ID
    with pytest.raises(error, match=message):
        check_request_id(request_id)


# -- Records: batches kept packed ------------------------------------------------------

batches = st.lists(st.binary(max_size=40), max_size=30)


@given(batches, st.integers(-35, 35), st.integers(-35, 35))
def test_records_index_and_slice_as_a_list_does(
    records: list[bytes], start: int, stop: int
) -> None:
    packed = Records.unpack(encode_records(records))
    assert packed == records and list(packed) == records and len(packed) == len(records)
    assert [packed[n] for n in range(-len(records), len(records))] == records + records
    part = packed[start:stop]
    assert part == records[start:stop]
    assert decode_records(part.body) == records[start:stop]  # its body is a whole batch
    assert part.size == sum(map(len, records[start:stop]))
    assert part.largest() == max(map(len, records[start:stop]), default=0)
    assert Records.unpack(part.body)[1:] == records[start:stop][1:]  # and slices again
    with pytest.raises(IndexError):
        packed[len(records)]


@given(batches, st.integers(-35, 35), st.integers(-35, 35), st.binary(max_size=20))
def test_a_records_message_is_its_head_and_the_packed_records(
    records: list[bytes], start: int, stop: int, head: bytes
) -> None:
    message = encode_message({"op": "records"}, records)  # kept as a view, as received
    _, body = decode_message(message)
    packed = Records.unpack(body) if records else Records.pack(records)
    for part in (packed, packed[start:stop], Records.pack(records)[start:stop]):
        assert part.message(head) == head + encode_records(list(part))
        assert type(part.message(head)) is bytes


@given(batches)
def test_a_whole_batch_is_sent_as_it_came(records: list[bytes]) -> None:
    body = encode_records(records)
    packed = Records.unpack(body)
    assert packed.body == body and packed[:].body is packed.body
    assert Records.pack(records) == records and Records.pack(packed) is packed
    assert encode_message({"op": "x"}, packed) == encode_message({"op": "x"}, records)


@given(st.lists(batches, max_size=6), st.data())
def test_joined_records_are_one_batch(parts: list[list[bytes]], data: st.DataObject) -> None:
    views = []
    for records in parts:  # slices of packed batches, as a read takes them
        start = data.draw(st.integers(0, len(records)))
        views.append(Records.pack(records)[start:])
    joined = Records.join(views)
    expected = [record for view in views for record in view]
    assert joined == expected and decode_records(joined.body) == expected
    lengths = [len(record) for record in expected]
    assert Records.from_lengths(lengths, b"".join(expected)) == expected


@given(batches, st.integers(0, 200))
def test_fit_counts_the_leading_records_within_a_size(records: list[bytes], limit: int) -> None:
    fits = Records.pack(records).fit(limit)
    assert sum(map(len, records[:fits])) <= limit
    assert fits == len(records) or sum(map(len, records[: fits + 1])) > limit


def test_records_refuse_steps_and_compare_only_with_sequences() -> None:
    packed = Records.pack([b"a", b"b"])
    with pytest.raises(ValueError, match="no step"):
        packed[::2]
    assert packed != b"ab" and packed != {b"a", b"b"}
    assert packed == (b"a", b"b") and packed != [b"a"]
    assert repr(packed) == "<Records: 2 records, 2 bytes>"


def test_records_keep_a_view_of_immutable_bytes_and_copy_anything_else() -> None:
    body = encode_records([b"ab", b"c"])
    message = b"head" + body
    kept = Records.unpack(memoryview(message)[4:])  # as decode_message gives a body
    assert kept._body.obj is message  # type: ignore[union-attr]  # not copied
    assert kept == [b"ab", b"c"] and type(kept[0]) is bytes and kept.body == body
    assert all(type(record) is bytes for record in kept)
    mutable = bytearray(body)
    copied = Records.unpack(mutable)
    mutable[8:10] = b"XY"  # a buffer that changes later does not change the records
    assert copied == [b"ab", b"c"]


def test_a_whole_batch_kept_as_a_view_is_viewed_and_checked_without_a_copy() -> None:
    body = encode_records([b"ab", b"c"])
    message = b"head" + body
    records = Records.unpack(memoryview(message)[4:])
    assert records.view().obj is message  # the received message itself
    assert bytes(records[1:].view()) == encode_records([b"c"])  # a slice packs anew
    assert records_size(records) == len(body) and records_size(records[:0]) == 0
