"""Relaying between cluster nodes in one process: raw clients and attackers on real sockets.

The nodes are ``serve_resumable`` servers with a ``cluster``; their cluster
ports are Unix sockets in the test's directory (or TCP, through a directory
the nodes join). Clients speak the session handshake by hand, to resume
through a chosen node and to see every REJECT; attackers speak the relay
link by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import struct
from pathlib import Path

import pytest

from streamkit.session import serve_resumable
from streamkit.session.cluster import Address, Cluster, StaticPeers, tagged_session_id
from streamkit.session.protocol import (
    Data,
    HelloNew,
    HelloResume,
    Message,
    Reject,
    RejectReason,
    Welcome,
    decode_message,
    make_preface,
    resume_proof,
)
from streamkit.session.relay import (
    CHALLENGE_SIZE,
    MAX_RELAY_MESSAGE,
    RELAY_MAGIC,
    FrontLink,
    Relay,
)
from tests._cluster import (
    FAST,
    KEY,
    SharedPeers,
    new_session,
    nodes,
    rejected,
    resume,
)
from tests._handlers import echo_session as echo
from tests._sessions import data_frame, frame, open_raw
from tests._tls import tls_contexts

# -- resumes through another node ---------------------------------------------------------


async def test_a_resume_through_another_node_reaches_its_session(tmp_path: Path) -> None:
    async with nodes(tmp_path) as servers:
        welcome = await new_session(servers["a"].port)
        assert welcome.session_id[:2] == b"\x01a"  # the owner's tag
        answer, raw, _ = await resume(servers["b"].port, welcome)
        assert isinstance(answer, Welcome) and answer.present
        assert answer.session_id == welcome.session_id
        raw.close()
        a, b = servers["a"].stats, servers["b"].stats
        assert (a.resumes, a.cluster.relayed_in, a.cluster.relayed_out) == (1, 1, 0)
        assert (b.resumes, b.cluster.relayed_out, b.cluster.relayed_in) == (0, 1, 0)


async def test_frames_sent_right_behind_a_relayed_hello_reach_the_owner(tmp_path: Path) -> None:
    async with nodes(tmp_path) as servers:
        welcome = await new_session(servers["a"].port)
        raw = await open_raw(servers["b"].port)
        try:
            # The hello and a frame in one write: the front reads both together.
            proof = resume_proof(welcome.token, raw.nonce, welcome.session_id, 0)
            hello = HelloResume(welcome.session_id, proof, 0).encode()
            raw.writer.write(frame(hello) + data_frame(0, b"right behind"))
            replies = await raw.receive_until(Data)
        finally:
            raw.close()
        assert isinstance(replies[0], Welcome) and replies[0].present
        assert replies[-1] == Data(0, b"right behind")  # echoed by the owner's handler
        assert servers["b"].stats.cluster.relayed_out == 1


async def test_a_relayed_hello_cannot_be_replayed_through_another_node(tmp_path: Path) -> None:
    async with nodes(tmp_path, "a,b,c") as servers:
        welcome = await new_session(servers["a"].port)
        answer, raw, hello = await resume(servers["b"].port, welcome)
        assert isinstance(answer, Welcome)
        raw.close()
        # The proof is bound to b's nonce: through c (or b again) it fails.
        for name in ("c", "b", "a"):
            again = await open_raw(servers[name].port)
            reply = await again.hello(hello)
            again.close()
            assert isinstance(reply, Reject) and reply.reason == RejectReason.BAD_TOKEN


async def test_a_session_the_owner_does_not_hold_is_rejected_as_today(tmp_path: Path) -> None:
    async with nodes(tmp_path) as servers:
        reject = await rejected(servers["b"].port, tagged_session_id("a"))
        assert reject.reason == RejectReason.UNKNOWN_SESSION
        assert "no session" in reject.message
        assert servers["b"].stats.cluster.relays_rejected == 1


async def test_a_session_of_the_front_itself_is_not_relayed(tmp_path: Path) -> None:
    async with nodes(tmp_path) as servers:
        reject = await rejected(servers["b"].port, tagged_session_id("b"))
        assert reject.reason == RejectReason.UNKNOWN_SESSION
        stats = servers["b"].stats.cluster
        assert (stats.relayed_out, stats.relays_rejected, stats.relays_failed) == (0, 0, 0)


@pytest.mark.parametrize("session_id", [bytes(16), b"\x01!" + bytes(14)])
async def test_an_untagged_session_is_the_fronts_own(tmp_path: Path, session_id: bytes) -> None:
    async with nodes(tmp_path) as servers:
        reject = await rejected(servers["b"].port, session_id)
        assert reject.reason == RejectReason.UNKNOWN_SESSION
        assert servers["b"].stats.cluster.relays_failed == 0


async def test_a_node_the_directory_does_not_know_is_rejected_at_once(tmp_path: Path) -> None:
    async with nodes(tmp_path) as servers:
        reject = await rejected(servers["b"].port, tagged_session_id("zz"))
        assert reject.reason == RejectReason.UNKNOWN_SESSION
        assert "node 'zz', is not in the peer directory" in reject.message
        assert servers["b"].stats.cluster.relays_failed == 1


async def test_a_node_that_is_down_is_rejected_at_once(tmp_path: Path) -> None:
    peers = StaticPeers({"a": str(tmp_path / "a.sock"), "b": str(tmp_path / "gone.sock")})
    async with nodes(tmp_path, "a", peers=peers) as servers:
        reject = await rejected(servers["a"].port, tagged_session_id("b"))
        assert "node 'b', cannot be reached at" in reject.message
        assert servers["a"].stats.cluster.relays_failed == 1


class FailingPeers(StaticPeers):
    async def lookup(self, node: str) -> Address | None:
        raise ConnectionError("the directory is down")


async def test_a_directory_that_fails_is_a_prompt_reject(tmp_path: Path) -> None:
    peers = FailingPeers({"a": str(tmp_path / "a.sock")})
    async with nodes(tmp_path, "a", peers=peers, relay_timeout=0.3) as servers:
        reject = await rejected(servers["a"].port, tagged_session_id("b"))
        # Tried again until relay_timeout: a directory may answer a moment later.
        assert "did not answer within relay_timeout=0.3 s" in reject.message
        assert "could not be looked up in the peer directory" in reject.message
        assert "the directory is down" in reject.message


class FlakyPeers(StaticPeers):
    """A directory that fails once, then sends the front to a port that drops it, then works."""

    def __init__(self, peers: dict[str, Address], dropping: str) -> None:
        super().__init__(peers)
        self.dropping = dropping
        self.lookups = 0

    async def lookup(self, node: str) -> Address | None:
        self.lookups += 1
        if self.lookups == 1:
            raise ConnectionError("the directory hiccupped")
        if self.lookups == 2:
            return self.dropping
        return await super().lookup(node)


async def test_a_transient_failure_is_tried_again_within_the_deadline(tmp_path: Path) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # as an owner's full backlog or a lost link would

    dropper = await asyncio.start_unix_server(drop, str(tmp_path / "drop.sock"))
    peers = FlakyPeers(
        {name: str(tmp_path / f"{name}.sock") for name in "ab"}, str(tmp_path / "drop.sock")
    )
    try:
        async with nodes(tmp_path, peers=peers) as servers:
            welcome = await new_session(servers["a"].port)
            answer, raw, _ = await resume(servers["b"].port, welcome)
            raw.close()
            assert isinstance(answer, Welcome) and answer.present
            assert peers.lookups == 3
            stats = servers["b"].stats.cluster
            assert (stats.relayed_out, stats.relays_failed) == (1, 0)
    finally:
        dropper.close()
        await dropper.wait_closed()


async def test_an_owner_that_never_answers_is_given_up_at_the_deadline(tmp_path: Path) -> None:
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # reads nothing, says nothing

    peers = StaticPeers({"a": str(tmp_path / "a.sock"), "b": str(tmp_path / "b.sock")})
    black_hole = await asyncio.start_unix_server(accept, str(tmp_path / "b.sock"))
    try:
        async with nodes(tmp_path, "a", peers=peers, relay_timeout=0.3) as servers:
            started = asyncio.get_running_loop().time()
            reject = await rejected(servers["a"].port, tagged_session_id("b"))
            assert asyncio.get_running_loop().time() - started < 5
            assert "did not answer within relay_timeout=0.3 s" in reject.message
    finally:
        for writer in silent:
            writer.close()
        black_hole.close()
        await black_hole.wait_closed()


async def test_a_front_with_another_key_is_refused_by_the_owner_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "streamkit")
    async with nodes(tmp_path, keys={"b": secrets.token_bytes(32)}) as servers:
        welcome = await new_session(servers["a"].port)
        answer, raw, _ = await resume(servers["b"].port, welcome)
        raw.close()
    assert isinstance(answer, Reject) and answer.reason == RejectReason.UNKNOWN_SESSION
    assert "node 'a' failed to prove the cluster key: the nodes' keys differ" in answer.message
    assert servers["b"].stats.cluster.relays_failed == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not relay a resume" in message for message in warnings)


# -- attackers on the cluster port ------------------------------------------------------


class Link:
    """A raw connection to a node's cluster port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Link:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def closed_without_answer(self) -> bool:
        """Whether the node closed the link, having sent nothing more."""
        async with asyncio.timeout(5):
            rest = await self.reader.read()
        self.writer.close()
        return rest == b""

    async def relay(self, front: FrontLink) -> bytes:
        """Run the front's side with ``front``; the bytes this link sent."""
        sent = b"".join(front.data_to_send())
        self.writer.write(sent)
        head = await self.reader.readexactly(6)
        preface = head + await self.reader.readexactly(head[5] + CHALLENGE_SIZE + 32)
        assert front.receive_data(preface) is None
        relay = b"".join(front.data_to_send())
        self.writer.write(relay)
        return sent + relay


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused a relay link" in r.getMessage()]


async def test_a_link_without_the_key_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with nodes(tmp_path, "a") as servers:
        welcome = await new_session(servers["a"].port)
        hello = HelloResume(welcome.session_id, bytes(32), 0).encode()
        link = await Link.open(tmp_path / "a.sock")
        front_challenge = secrets.token_bytes(CHALLENGE_SIZE)
        link.writer.write(RELAY_MAGIC + b"\x01" + front_challenge)
        head = await link.reader.readexactly(6)
        preface = head + await link.reader.readexactly(head[5] + CHALLENGE_SIZE + 32)
        owner_challenge = preface[6 + head[5] : -32]
        relay = Relay("x", 2, bytes(16), hello)
        link.writer.write(relay.encode(secrets.token_bytes(32), owner_challenge, front_challenge))
        assert await link.closed_without_answer()
        assert servers["a"].stats.cluster.links_refused == 1
    assert any("failed to prove the cluster key" in message for message in refusals(caplog))


async def test_a_recorded_relay_handshake_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with nodes(tmp_path, "a") as servers:
        welcome = await new_session(servers["a"].port)
        nonce = secrets.token_bytes(16)
        proof = resume_proof(welcome.token, nonce, welcome.session_id, 0)
        hello = HelloResume(welcome.session_id, proof, 0).encode()
        # A genuine relay (the attacker recorded it on the wire)...
        link = await Link.open(tmp_path / "a.sock")
        recorded = await link.relay(FrontLink(KEY, "b", "a", nonce, hello))
        size = struct.unpack(">I", await link.reader.readexactly(4))[0]
        answer = decode_message(await link.reader.readexactly(size))
        assert isinstance(answer, Welcome) and answer.present
        link.writer.close()
        # ...played again: the owner's challenge is fresh, the proof is not.
        replay = await Link.open(tmp_path / "a.sock")
        replay.writer.write(recorded)
        assert await replay.closed_without_answer()
        assert servers["a"].stats.cluster.links_refused == 1
        assert servers["a"].stats.cluster.relayed_in == 1
    assert any("a recorded relay handshake replayed" in m for m in refusals(caplog))


@pytest.mark.parametrize(
    ("data", "logged"),
    [
        (make_preface(), "a session client"),
        (b"\x16\x03\x01\x00\x10", "TLS handshake"),
        (RELAY_MAGIC + b"\x01" + bytes(16) + struct.pack(">I", MAX_RELAY_MESSAGE + 1), "over the"),
    ],
)
async def test_a_peer_that_is_no_front_is_refused_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, data: bytes, logged: str
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with nodes(tmp_path, "a") as servers:
        link = await Link.open(tmp_path / "a.sock")
        link.writer.write(data)
        async with asyncio.timeout(5):
            await link.reader.read()  # the owner's preface, if it got that far, then the end
        link.writer.close()
        assert servers["a"].stats.cluster.links_refused == 1
    assert any(logged in message for message in refusals(caplog))


async def test_a_link_that_never_finishes_its_handshake_is_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with nodes(tmp_path, "a") as servers:
        servers["a"]._relayer._handshake_timeout = 0.2  # type: ignore[union-attr]
        link = await Link.open(tmp_path / "a.sock")
        link.writer.write(RELAY_MAGIC)  # and nothing more
        assert await link.closed_without_answer()
        assert servers["a"].stats.cluster.links_refused == 1
    assert any("no proven RELAY within handshake_timeout" in m for m in refusals(caplog))


async def test_a_flood_of_links_is_bounded_and_the_port_serves_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    peers = StaticPeers({name: str(tmp_path / f"{name}.sock") for name in "ab"})
    limits = {"grace_period": 0.1, "handshake_timeout": 0.3, "max_connections": 4}
    async with (
        serve_resumable(echo, "127.0.0.1", 0, cluster=Cluster("a", peers, KEY), **limits) as a,  # type: ignore[arg-type]
        serve_resumable(echo, "127.0.0.1", 0, cluster=Cluster("b", peers, KEY), **FAST) as b,  # type: ignore[arg-type]
    ):
        welcome = await new_session(a.port)
        # 40 links that start the handshake and never finish it: a's cluster
        # port holds max_connections of them, each for handshake_timeout, and
        # closes the rest at once.
        flood = [await Link.open(tmp_path / "a.sock") for _ in range(40)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for link in flood:
            link.writer.write(RELAY_MAGIC + b"\x01")
        for link in flood:
            with contextlib.suppress(ConnectionError):  # closed unread: a reset
                assert await link.closed_without_answer()
        assert loop.time() - started < 3
        assert 1 <= a.stats.cluster.links_refused <= 4  # the others never got a handshake
        # Once they are gone, relays reach a again.
        answer, raw, _ = await resume(b.port, welcome)
        raw.close()
        assert isinstance(answer, Welcome) and answer.present
        assert a.stats.cluster.relayed_in == 1
    assert any("max_connections=4" in r.getMessage() for r in caplog.records)


class Recording(SharedPeers):
    """A shared directory that records joins and leaves."""

    def __init__(self) -> None:
        super().__init__({})
        self.calls: list[str] = []

    async def join(self, node: str, address: Address) -> None:
        await super().join(node, address)
        self.calls.append(f"join {node}")

    async def leave(self) -> None:
        self.calls.append("leave")


async def test_a_node_whose_public_port_fails_leaves_no_cluster_port(tmp_path: Path) -> None:
    peers = Recording()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = Cluster("a", peers, KEY, listen=str(tmp_path / "a.sock"))
        with pytest.raises(OSError):
            await serve_resumable(echo, "127.0.0.1", port, cluster=cluster)
    assert peers.calls == ["join a", "leave"]
    with pytest.raises(OSError):  # nobody listens on the cluster port
        await asyncio.open_unix_connection(str(tmp_path / "a.sock"))
    async with serve_resumable(echo, "127.0.0.1", 0, cluster=cluster, **FAST) as server:  # type: ignore[arg-type]
        assert (await new_session(server.port)).session_id[:2] == b"\x01a"
    assert peers.calls == ["join a", "leave", "join a", "leave"]


async def relayed_answer(path: Path, hello: bytes) -> Message:
    """Relay ``hello`` to the node at ``path`` as a front with the key; its answer."""
    link = await Link.open(path)
    await link.relay(FrontLink(KEY, "b", "a", bytes(16), hello))
    size = struct.unpack(">I", await link.reader.readexactly(4))[0]
    answer = decode_message(await link.reader.readexactly(size))
    link.writer.close()
    return answer


async def test_a_relayed_connection_is_never_relayed_again(tmp_path: Path) -> None:
    async with nodes(tmp_path) as servers:
        welcome = await new_session(servers["b"].port)  # b's session, relayed to a
        hello = HelloResume(welcome.session_id, bytes(32), 0).encode()
        answer = await relayed_answer(tmp_path / "a.sock", hello)
        assert isinstance(answer, Reject) and answer.reason == RejectReason.UNKNOWN_SESSION
        assert "belongs to node 'b'" in answer.message
        assert servers["a"].stats.cluster.relayed_out == 0
        assert servers["b"].stats.cluster.relayed_in == 0


async def test_a_new_session_through_a_relay_link_is_refused(tmp_path: Path) -> None:
    async with nodes(tmp_path, "a") as servers:
        answer = await relayed_answer(tmp_path / "a.sock", HelloNew().encode())
        assert isinstance(answer, Reject) and answer.reason == RejectReason.MALFORMED
        assert servers["a"].stats.sessions_opened == 0


# -- TLS on the relay link ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return tls_contexts()


async def test_relay_links_over_tls(
    tmp_path: Path, tls: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    server_context, client_context = tls
    peers = SharedPeers({})
    async with nodes(
        tmp_path,
        peers=peers,
        listen=("127.0.0.1", 0),
        ssl=server_context,
        peer_ssl=client_context,
    ) as servers:
        assert set(peers.addresses) == {"a", "b"}  # each joined with its bound port
        welcome = await new_session(servers["a"].port)
        answer, raw, _ = await resume(servers["b"].port, welcome)
        raw.close()
        assert isinstance(answer, Welcome) and answer.present
        # A plain connection to the TLS cluster port gets nowhere.
        address = peers.addresses["a"]
        assert isinstance(address, tuple)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(RELAY_MAGIC + b"\x01" + bytes(16))
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
