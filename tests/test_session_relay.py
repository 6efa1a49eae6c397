"""The relay link handshake between cluster nodes, sans-IO: no sockets, no event loop."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkit.errors import ConnectionLost, ProtocolError
from streamkit.session.protocol import (
    MAX_HANDSHAKE_MESSAGE,
    VERSION,
    HelloResume,
    Ping,
    Reject,
    RejectReason,
    Welcome,
    make_preface,
)
from streamkit.session.relay import (
    CHALLENGE_SIZE,
    MAX_RELAY_MESSAGE,
    RELAY_MAGIC,
    FrontLink,
    OwnerLink,
    Relay,
    front_proof,
)

KEY = b"k" * 32
NONCE = bytes(range(16))
HELLO = HelloResume(b"\x01b" + bytes(14), b"p" * 32, 7).encode()
WELCOME = Welcome(True, b"\x01b" + bytes(14), 3)


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def joined(parts: list[bytes]) -> bytes:
    return b"".join(parts)


def handshake(
    front: FrontLink, owner: OwnerLink, answer: bytes, after: bytes = b""
) -> tuple[Relay, Welcome | Reject]:
    """Run a whole link handshake in memory; the owner answers ``answer`` then ``after``."""
    assert owner.receive_data(joined(front.data_to_send())) is None
    assert front.receive_data(joined(owner.data_to_send())) is None
    relay = owner.receive_data(joined(front.data_to_send()))
    assert relay is not None
    result = front.receive_data(answer + after)
    assert result is not None
    return relay, result


def test_a_relay_carries_the_hello_and_nonce_and_brings_the_answer_back() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    answer = framed(WELCOME.encode())
    session_bytes = framed(Ping().encode())
    relay, result = handshake(front, owner, answer, session_bytes)
    assert relay == Relay("a", VERSION, NONCE, HELLO)
    assert owner.done and owner.rest == b""
    assert result == WELCOME
    assert front.answer == answer
    assert front.rest == session_bytes
    assert front.done and front.authenticated


def test_bytes_the_front_sends_after_the_relay_are_the_owners_rest() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    owner.receive_data(joined(front.data_to_send()))
    front.receive_data(joined(owner.data_to_send()))
    relay = owner.receive_data(joined(front.data_to_send()) + b"client bytes")
    assert relay is not None
    assert owner.rest == b"client bytes"


def test_a_reject_is_an_answer_too() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    reject = Reject(RejectReason.UNKNOWN_SESSION, "no session")
    _, result = handshake(front, OwnerLink(KEY, "b"), framed(reject.encode()))
    assert result == reject


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_the_handshake_completes_the_same_under_any_chunking(cuts: list[int]) -> None:
    challenges = (b"f" * CHALLENGE_SIZE, b"o" * CHALLENGE_SIZE)
    front = FrontLink(KEY, "node-a", "node.b", NONCE, HELLO, challenge=challenges[0])
    owner = OwnerLink(KEY, "node.b", challenge=challenges[1])

    def feed(link: FrontLink | OwnerLink, data: bytes) -> tuple[list[object], bytes]:
        """Feed ``data`` in pieces until the link is done: its results, and the bytes after."""
        points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
        results: list[object] = []
        for start, end in itertools.pairwise(points):
            if link.done:
                return results, link.rest + data[start:]
            result = link.receive_data(data[start:end])
            if result is not None:
                results.append(result)
        return results, link.rest

    assert feed(owner, joined(front.data_to_send())) == ([], b"")
    assert feed(front, joined(owner.data_to_send())) == ([], b"")
    relay = Relay("node-a", VERSION, NONCE, HELLO)
    assert feed(owner, joined(front.data_to_send()) + b"x") == ([relay], b"x")
    assert feed(front, framed(WELCOME.encode()) + b"tail") == ([WELCOME], b"tail")


# -- authentication --------------------------------------------------------------


def test_an_owner_without_the_key_is_refused_before_the_hello_leaves() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(b"x" * 32, "b")
    owner.receive_data(joined(front.data_to_send()))
    with pytest.raises(ProtocolError, match="node 'b' failed to prove the cluster key"):
        front.receive_data(joined(owner.data_to_send()))
    assert not front.authenticated
    assert front.data_to_send() == []  # the client's hello never went out


def test_a_front_without_the_key_is_refused() -> None:
    owner = OwnerLink(KEY, "b")
    challenge = b"c" * CHALLENGE_SIZE
    owner.receive_data(RELAY_MAGIC + b"\x01" + challenge)
    preface = joined(owner.data_to_send())
    owner_challenge = preface[-CHALLENGE_SIZE - 32 : -32]
    forged = Relay("a", VERSION, NONCE, HELLO).encode(b"x" * 32, owner_challenge, challenge)
    with pytest.raises(ProtocolError, match="failed to prove the cluster key"):
        owner.receive_data(forged)


def test_a_recorded_relay_handshake_cannot_be_replayed() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    preface = joined(front.data_to_send())
    owner.receive_data(preface)
    front.receive_data(joined(owner.data_to_send()))
    relay = joined(front.data_to_send())
    assert owner.receive_data(relay) is not None  # accepted the first time
    recorded = preface + relay
    # Replayed to a new link: its owner challenge is fresh, the recorded proof is not.
    with pytest.raises(ProtocolError, match="replayed"):
        OwnerLink(KEY, "b").receive_data(recorded)


def test_a_replay_is_refused_by_the_challenge_alone() -> None:
    # The same recording is accepted by a link whose challenge is the same:
    # what refuses a replay is the owner's fresh challenge, nothing else.
    challenge = b"o" * CHALLENGE_SIZE
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b", challenge=challenge)
    recorded = joined(front.data_to_send())
    owner.receive_data(recorded)
    front.receive_data(joined(owner.data_to_send()))
    recorded += joined(front.data_to_send())
    assert OwnerLink(KEY, "b", challenge=challenge).receive_data(recorded) is not None


@pytest.mark.parametrize("where", ["nonce", "hello", "front tag"])
def test_a_relay_altered_in_flight_is_refused(where: str) -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    owner.receive_data(joined(front.data_to_send()))
    front.receive_data(joined(owner.data_to_send()))
    message = bytearray(joined(front.data_to_send()))
    at = {"front tag": 4 + 3, "nonce": 4 + 5, "hello": 4 + 5 + 16 + 20}[where]
    message[at] ^= 1
    with pytest.raises(ProtocolError, match="failed to prove"):
        owner.receive_data(bytes(message))


def test_a_front_that_reached_another_node_says_the_directory_is_out_of_date() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "c")
    owner.receive_data(joined(front.data_to_send()))
    with pytest.raises(ProtocolError, match="reached node 'c' where the peer directory has"):
        front.receive_data(joined(owner.data_to_send()))


# -- bounds and bad input ------------------------------------------------------------


def test_an_oversized_relay_is_refused_from_its_length_alone() -> None:
    owner = OwnerLink(KEY, "b")
    owner.receive_data(RELAY_MAGIC + b"\x01" + bytes(CHALLENGE_SIZE))
    with pytest.raises(ProtocolError, match=f"over the {MAX_RELAY_MESSAGE} it may have"):
        owner.receive_data(struct.pack(">I", MAX_RELAY_MESSAGE + 1))


def test_a_relay_at_the_size_limit_is_read() -> None:
    # The largest hello a relay may carry: refused for its content, not its size.
    hello = b"\x02" * MAX_HANDSHAKE_MESSAGE
    front = FrontLink(KEY, "abcdefgh", "b", NONCE, hello)
    owner = OwnerLink(KEY, "b")
    owner.receive_data(joined(front.data_to_send()))
    front.receive_data(joined(owner.data_to_send()))
    message = joined(front.data_to_send())
    assert len(message) == 4 + MAX_RELAY_MESSAGE
    relay = owner.receive_data(message)
    assert relay is not None and relay.hello == hello


def test_an_oversized_answer_is_refused_from_its_length_alone() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    owner.receive_data(joined(front.data_to_send()))
    front.receive_data(joined(owner.data_to_send()))
    with pytest.raises(ProtocolError, match="answer announces"):
        front.receive_data(struct.pack(">I", MAX_HANDSHAKE_MESSAGE + 1))


def test_an_answer_that_is_no_welcome_or_reject_is_refused() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    owner.receive_data(joined(front.data_to_send()))
    front.receive_data(joined(owner.data_to_send()))
    with pytest.raises(ProtocolError, match="answered a relayed hello with Ping"):
        front.receive_data(framed(Ping().encode()))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (make_preface(), "a session client"),
        (b"\x16\x03\x01\x02\x00", "TLS handshake"),
        (b"GET / HTTP/1.1\r\n", "HTTP"),
        (RELAY_MAGIC + b"\x02" + bytes(CHALLENGE_SIZE), "relay link version 2"),
    ],
)
def test_a_peer_speaking_something_else_is_named(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        OwnerLink(KEY, "b").receive_data(data)


def test_bad_magic_is_refused_from_the_first_byte() -> None:
    with pytest.raises(ProtocolError, match="not speaking the streamkit relay link"):
        OwnerLink(KEY, "b").receive_data(b"X")


def _proven(owner: OwnerLink, challenge: bytes) -> bytes:
    owner.receive_data(RELAY_MAGIC + b"\x01" + challenge)
    preface = joined(owner.data_to_send())
    return preface[-CHALLENGE_SIZE - 32 : -32]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x21" + bytes(60), "malformed RELAY message: 93 bytes, type 21"),
        (b"\x20\x02", "malformed RELAY message: 34 bytes, type 20"),
    ],
)
def test_a_malformed_relay_is_refused(body: bytes, match: str) -> None:
    owner = OwnerLink(KEY, "b")
    _proven(owner, bytes(CHALLENGE_SIZE))
    with pytest.raises(ProtocolError, match=match):
        owner.receive_data(framed(body + bytes(32)))


def test_a_proven_relay_with_a_bad_node_tag_is_refused() -> None:
    owner = OwnerLink(KEY, "b")
    challenge = bytes(CHALLENGE_SIZE)
    owner_challenge = _proven(owner, challenge)
    body = b"\x20" + bytes([VERSION]) + b"\x01!" + NONCE + HELLO
    with pytest.raises(ProtocolError, match="node tag"):
        owner.receive_data(framed(body + front_proof(KEY, owner_challenge, challenge, body)))


def test_an_owner_preface_with_a_bad_tag_length_is_refused() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    with pytest.raises(ProtocolError, match="node tag of 9 bytes"):
        front.receive_data(RELAY_MAGIC + b"\x01\x09")


def test_closing_early_says_what_happened() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    error = front.receive_eof()
    assert isinstance(error, ConnectionLost) and "during its handshake" in str(error)
    owner = OwnerLink(KEY, "b")
    owner.receive_data(joined(front.data_to_send()))
    front.receive_data(joined(owner.data_to_send()))
    error = front.receive_eof()
    assert isinstance(error, ConnectionLost)
    assert "without answering the hello" in str(error)
    other = FrontLink(KEY, "a", "b", NONCE, HELLO)
    other.receive_data(b"SK")
    assert isinstance(other.receive_eof(), ConnectionLost)


def test_a_done_link_takes_no_more_bytes() -> None:
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    owner = OwnerLink(KEY, "b")
    handshake(front, owner, framed(WELCOME.encode()))
    with pytest.raises(RuntimeError):
        front.receive_data(b"x")
    with pytest.raises(RuntimeError):
        owner.receive_data(b"x")


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="a nonce is 16 bytes"):
        FrontLink(KEY, "a", "b", b"short", HELLO)
    with pytest.raises(ValueError, match="a challenge is 16 bytes"):
        OwnerLink(KEY, "b", challenge=b"x")
    with pytest.raises(ValueError, match="node tag"):
        OwnerLink(KEY, "far-too-long")
    with pytest.raises(ValueError, match="a hello is at most"):
        FrontLink(KEY, "a", "b", NONCE, bytes(MAX_HANDSHAKE_MESSAGE + 1))


def test_challenges_are_fresh() -> None:
    assert OwnerLink(KEY, "b").challenge != OwnerLink(KEY, "b").challenge
    front = FrontLink(KEY, "a", "b", NONCE, HELLO)
    assert front.challenge != FrontLink(KEY, "a", "b", NONCE, HELLO).challenge
