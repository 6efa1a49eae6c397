"""The relay link between cluster nodes, sans-IO: prefaces, challenges, proofs, the RELAY message.

Nothing here performs I/O or imports asyncio. ``docs/protocol.md`` 2.12
is the specification. A *front* (the node a client's resume reached)
connects to the *owner*'s cluster port and both prove that they hold the
cluster key, each over a fresh challenge of the other, so a recorded link
handshake cannot be replayed:

```
front -> owner   "SKSR" u8 version, front_challenge (16)
owner -> front   "SKSR" u8 version, u8 n, owner tag (n), owner_challenge (16), owner_proof (32)
front -> owner   u32 length, RELAY: 0x20, u8 session version, u8 m, front tag (m),
                 nonce (16), hello, front_proof (32)
owner -> front   the session's answer to the hello (WELCOME or REJECT, docs/protocol.md 2.4),
                 then the session's messages both ways
```

:class:`FrontLink` is the front's side (it returns the owner's answer, to
forward to the client); :class:`OwnerLink` the owner's (it returns the
:class:`Relay`: the client's hello and the nonce its proof is bound to).
Every length is checked before the bytes it announces are read, so a peer
that has not proven the key costs at most a preface and one bounded message.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from streamkit.errors import ConnectionLost, ProtocolError
from streamkit.session.cluster import MAX_NODE_TAG, check_node
from streamkit.session.protocol import (
    MAGIC,
    MAX_HANDSHAKE_MESSAGE,
    NONCE_SIZE,
    VERSION,
    Reject,
    Welcome,
    decode_message,
    guess_protocol,
)

__all__ = [
    "CHALLENGE_SIZE",
    "MAX_RELAY_MESSAGE",
    "PROOF_SIZE",
    "RELAY",
    "RELAY_MAGIC",
    "RELAY_VERSION",
    "FrontLink",
    "OwnerLink",
    "Relay",
    "front_proof",
    "owner_proof",
]

RELAY_MAGIC = b"SKSR"
RELAY_VERSION = 1
CHALLENGE_SIZE = 16
PROOF_SIZE = 32
#: The type byte of the front's RELAY message.
RELAY = 0x20
#: The front's preface: magic, version, challenge.
_FRONT_PREFACE = len(RELAY_MAGIC) + 1 + CHALLENGE_SIZE
#: The owner's preface up to its tag length byte (the rest depends on it).
_OWNER_HEAD = len(RELAY_MAGIC) + 2
#: The largest RELAY body: type, session version, tag length and tag, nonce,
#: a hello of at most MAX_HANDSHAKE_MESSAGE bytes, proof.
MAX_RELAY_MESSAGE = 3 + MAX_NODE_TAG + NONCE_SIZE + MAX_HANDSHAKE_MESSAGE + PROOF_SIZE
_MIN_RELAY_MESSAGE = 3 + 1 + NONCE_SIZE + 1 + PROOF_SIZE
_LENGTH = struct.Struct(">I")
_FRONT_LABEL = b"streamkit-relay-front"
_OWNER_LABEL = b"streamkit-relay-owner"


def _tag(node: str) -> bytes:
    raw = node.encode()
    return bytes([len(raw)]) + raw


def owner_proof(key: bytes, front_challenge: bytes, owner_challenge: bytes, owner: str) -> bytes:
    """The owner's proof that it holds ``key`` and is node ``owner``, for this link."""
    message = _OWNER_LABEL + front_challenge + owner_challenge + _tag(owner)
    return hmac.new(key, message, hashlib.sha256).digest()


def front_proof(key: bytes, owner_challenge: bytes, front_challenge: bytes, body: bytes) -> bytes:
    """The front's proof that it holds ``key``, over this link and the RELAY ``body``
    (everything in it before the proof)."""
    message = _FRONT_LABEL + owner_challenge + front_challenge + body
    return hmac.new(key, message, hashlib.sha256).digest()


def _framed(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def _check_magic(data: bytes, peer: str) -> None:
    """Raise a :class:`ProtocolError` saying what the peer speaks, if not the relay link."""
    if data[: len(RELAY_MAGIC)] == RELAY_MAGIC[: len(data)]:
        return
    guess = guess_protocol(data)
    if data[: len(MAGIC)] == MAGIC:
        guess = "a session client (the cluster port is for the cluster's other nodes)"
    raise ProtocolError(
        f"the {peer} is not speaking the streamkit relay link: got {data[:16]!r}, which "
        f"looks like {guess or 'an unknown protocol'}; expected {RELAY_MAGIC!r}"
    )


def _check_version(version: int, peer: str) -> None:
    if version != RELAY_VERSION:
        raise ProtocolError(
            f"the {peer} speaks relay link version {version}; this node speaks {RELAY_VERSION}"
        )


@dataclass(frozen=True, slots=True)
class Relay:
    """A relayed resume, as the owner received it from an authenticated front.

    ``hello`` is the client's hello body as it sent it (a ``HELLO_RESUME``
    of session protocol ``session_version``), ``nonce`` the nonce of the
    front's server preface, which the client's proof is bound to.
    """

    front: str
    session_version: int
    nonce: bytes
    hello: bytes

    def encode(self, key: bytes, owner_challenge: bytes, front_challenge: bytes) -> bytes:
        """The framed RELAY message, with the front's proof for this link."""
        body = bytes([RELAY, self.session_version]) + _tag(self.front) + self.nonce + self.hello
        return _framed(body + front_proof(key, owner_challenge, front_challenge, body))


class _Link:
    """Bytes in, bytes out, for one side of the link handshake."""

    def __init__(self, key: bytes, challenge: bytes | None) -> None:
        self._key = key
        self.challenge = secrets.token_bytes(CHALLENGE_SIZE) if challenge is None else challenge
        if len(self.challenge) != CHALLENGE_SIZE:
            raise ValueError(f"a challenge is {CHALLENGE_SIZE} bytes, not {len(self.challenge)}")
        self._buf = bytearray()
        self._out: list[bytes] = []
        #: Bytes received after the handshake's last message (the session's, to pass on).
        self.rest = b""
        self.done = False

    def data_to_send(self) -> list[bytes]:
        """The bytes due to the peer, in order; empties the queue."""
        out, self._out = self._out, []
        return out

    def _frame(self, at: int, limit: int, what: str) -> tuple[bytes, int] | None:
        """The body of the framed message at ``at`` once complete, and its end.

        A length over ``limit`` raises before its body is read.
        """
        buf = self._buf
        if len(buf) < at + _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buf, at)
        if length > limit:
            raise ProtocolError(
                f"{what} announces {length} bytes, over the {limit} it may have; "
                "closed before reading it"
            )
        end = at + _LENGTH.size + length
        if len(buf) < end:
            return None
        return bytes(buf[at + _LENGTH.size : end]), end

    def _finish(self, end: int) -> None:
        self.rest = bytes(self._buf[end:])
        self._buf = bytearray()
        self.done = True


class FrontLink(_Link):
    """The front's side of a relay link to ``owner``, for the client hello ``hello``.

    ``data_to_send()`` starts with the front's preface. ``receive_data``
    takes the owner's bytes: once the owner has proven the key, the RELAY
    message is queued; once the owner's answer to the hello is in, it
    returns it (a :class:`~streamkit.session.protocol.Welcome` or
    :class:`~streamkit.session.protocol.Reject`); :attr:`answer` holds its
    framed bytes, to forward to the client as they are, and :attr:`rest`
    whatever followed. An owner that is not ``owner``, fails its proof, or
    sends anything malformed or too long raises :class:`ProtocolError`.
    """

    def __init__(
        self,
        key: bytes,
        front: str,
        owner: str,
        nonce: bytes,
        hello: bytes,
        *,
        challenge: bytes | None = None,
    ) -> None:
        super().__init__(key, challenge)
        self._relay = Relay(check_node(front), VERSION, nonce, hello)
        self.owner = check_node(owner)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        if len(hello) > MAX_HANDSHAKE_MESSAGE:
            raise ValueError(f"a hello is at most {MAX_HANDSHAKE_MESSAGE} bytes, not {len(hello)}")
        self._authenticated = False
        #: The owner's answer, framed, once received.
        self.answer = b""
        self._out.append(RELAY_MAGIC + bytes([RELAY_VERSION]) + self.challenge)

    @property
    def authenticated(self) -> bool:
        """Whether the owner proved the key (the client's hello went out)."""
        return self._authenticated

    def receive_data(self, data: bytes | bytearray | memoryview) -> Welcome | Reject | None:
        """Take bytes from the owner; its answer to the hello once complete, else None."""
        if self.done:
            raise RuntimeError("the relay link handshake is complete: pass the bytes on")
        self._buf += data
        if not self._authenticated and not self._owner_preface():
            return None
        found = self._frame(0, MAX_HANDSHAKE_MESSAGE, f"node {self.owner!r}'s answer")
        if found is None:
            return None
        body, end = found
        answer = decode_message(body)
        if not isinstance(answer, Welcome | Reject):
            raise ProtocolError(
                f"node {self.owner!r} answered a relayed hello with {type(answer).__name__}, "
                "not WELCOME or REJECT"
            )
        self.answer = bytes(self._buf[:end])
        self._finish(end)
        return answer

    def _owner_preface(self) -> bool:
        """Check the owner's preface once in and queue the RELAY; False: wait for more."""
        buf = self._buf
        _check_magic(bytes(buf[: len(RELAY_MAGIC)]), f"node {self.owner!r}")
        if len(buf) < _OWNER_HEAD:
            return False
        _check_version(buf[len(RELAY_MAGIC)], f"node {self.owner!r}")
        length = buf[_OWNER_HEAD - 1]
        if not 1 <= length <= MAX_NODE_TAG:
            raise ProtocolError(f"node {self.owner!r} sent a node tag of {length} bytes")
        end = _OWNER_HEAD + length + CHALLENGE_SIZE + PROOF_SIZE
        if len(buf) < end:
            return False
        tag = bytes(buf[_OWNER_HEAD : _OWNER_HEAD + length])
        if tag != self.owner.encode():
            raise ProtocolError(
                f"reached node {tag.decode('ascii', 'replace')!r} where the peer directory "
                f"has node {self.owner!r}: the directory is out of date"
            )
        challenge = bytes(buf[_OWNER_HEAD + length : end - PROOF_SIZE])
        proof = bytes(buf[end - PROOF_SIZE : end])
        expected = owner_proof(self._key, self.challenge, challenge, self.owner)
        if not hmac.compare_digest(expected, proof):
            raise ProtocolError(
                f"node {self.owner!r} failed to prove the cluster key: the nodes' keys differ"
            )
        self._authenticated = True
        self._out.append(self._relay.encode(self._key, challenge, self.challenge))
        del buf[:end]
        return True

    def receive_eof(self) -> ProtocolError | ConnectionLost:
        """The error for an owner that closed the link before answering."""
        if self._buf and not self._authenticated:
            try:
                _check_magic(bytes(self._buf[: len(RELAY_MAGIC)]), f"node {self.owner!r}")
            except ProtocolError as exc:
                return exc
        if self._authenticated:
            return ConnectionLost(
                f"node {self.owner!r} closed the relay link without answering the hello: it "
                "refused the relay (a cluster key mismatch? see its log) or is shutting down"
            )
        return ConnectionLost(f"node {self.owner!r} closed the relay link during its handshake")


class OwnerLink(_Link):
    """The owner's side of a relay link: node ``owner``, holding ``key``.

    ``receive_data`` takes the front's bytes; after the front's preface
    the owner's (with its proof) is queued; once the RELAY message is in
    and its proof checks, it returns the :class:`Relay` (the bytes after
    it are in :attr:`rest`). Anything else raises :class:`ProtocolError`:
    a wrong proof (a wrong key, or a recorded handshake replayed: the
    proof covers this link's fresh challenge), a message over
    :data:`MAX_RELAY_MESSAGE` (before its body is read), a malformed one.
    """

    def __init__(self, key: bytes, owner: str, *, challenge: bytes | None = None) -> None:
        super().__init__(key, challenge)
        self.owner = check_node(owner)
        self._front_challenge: bytes | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> Relay | None:
        """Take bytes from the front; the authenticated :class:`Relay` once complete."""
        if self.done:
            raise RuntimeError("the relay link handshake is complete: pass the bytes on")
        self._buf += data
        buf = self._buf
        if self._front_challenge is None:
            _check_magic(bytes(buf[: len(RELAY_MAGIC)]), "peer")
            if len(buf) < _FRONT_PREFACE:
                return None
            _check_version(buf[len(RELAY_MAGIC)], "peer")
            self._front_challenge = bytes(buf[len(RELAY_MAGIC) + 1 : _FRONT_PREFACE])
            proof = owner_proof(self._key, self._front_challenge, self.challenge, self.owner)
            self._out.append(
                RELAY_MAGIC + bytes([RELAY_VERSION]) + _tag(self.owner) + self.challenge + proof
            )
        found = self._frame(_FRONT_PREFACE, MAX_RELAY_MESSAGE, "the peer's RELAY message")
        if found is None:
            return None
        body, end = found
        relay = self._parse(body)
        self._finish(end)
        return relay

    def _parse(self, body: bytes) -> Relay:
        assert self._front_challenge is not None
        if len(body) < _MIN_RELAY_MESSAGE or body[0] != RELAY:
            raise ProtocolError(
                f"malformed RELAY message: {len(body)} bytes, type {body[:1].hex() or 'none'}"
            )
        signed, proof = body[:-PROOF_SIZE], body[-PROOF_SIZE:]
        expected = front_proof(self._key, self.challenge, self._front_challenge, signed)
        if not hmac.compare_digest(expected, proof):
            raise ProtocolError(
                "the peer failed to prove the cluster key (a wrong key, or a recorded relay "
                "handshake replayed)"
            )
        # Proven: from here on the peer is a node of the cluster.
        length = body[2]
        hello_at = 3 + length + NONCE_SIZE
        if not 1 <= length <= MAX_NODE_TAG or hello_at >= len(signed):
            raise ProtocolError(f"malformed RELAY message: a node tag of {length} bytes")
        front = body[3 : 3 + length].decode("ascii", "replace")
        try:
            check_node(front)
        except ValueError as exc:
            raise ProtocolError(f"malformed RELAY message: {exc}") from None
        return Relay(front, body[1], bytes(body[3 + length : hello_at]), bytes(signed[hello_at:]))
