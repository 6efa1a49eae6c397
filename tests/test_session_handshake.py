"""Opening and resuming a session: the handshake, its proofs, and every refusal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct

import pytest

from streamkit import EndOfStream, ResumeRejected
from streamkit.codecs import LengthPrefixed
from streamkit.errors import ConnectionLost, ProtocolError, StreamkitError
from streamkit.net import connect
from streamkit.session import ResumableServer, connect_resumable, serve_resumable
from streamkit.session.protocol import (
    MAGIC,
    NONCE_SIZE,
    PREFACE_SIZE,
    HelloNew,
    HelloResume,
    Message,
    Ping,
    Reject,
    RejectReason,
    Welcome,
    make_preface,
    resume_proof,
)
from tests import _tls
from tests._handlers import echo_session as echo
from tests._sessions import (
    FAST,
    QUICK_SHUTDOWN,
    echo_server,
    frame,
    raw_client,
    raw_handshake,
    refusals,
    resume_hello,
    wait_until,
)

#: A raw client's hello for a new session.
NEW = HelloNew().encode()


# -- who may resume --------------------------------------------------------------


async def test_wrong_token_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        forged = HelloResume(bytes.fromhex(session.id), b"\0" * 32, 0).encode()
        reply, _ = await raw_handshake(server.port, forged)
        assert isinstance(reply, Reject)
        assert reply.reason == RejectReason.BAD_TOKEN
        assert "wrong token" in caplog.text
        await session.send(b"still fine")
        assert await session.recv() == b"still fine"


async def test_unknown_session_is_rejected() -> None:
    async with echo_server() as server:
        reply, _ = await raw_handshake(server.port, HelloResume(b"\1" * 16, b"\0" * 32, 0).encode())
        assert isinstance(reply, Reject)
        assert reply.reason == RejectReason.UNKNOWN_SESSION


async def test_replayed_handshake_is_rejected() -> None:
    async with echo_server() as server:
        reply, nonce = await raw_handshake(server.port, NEW)
        assert isinstance(reply, Welcome) and not reply.present
        proof = resume_proof(reply.token, nonce, reply.session_id, 0)
        first = HelloResume(reply.session_id, proof, 0).encode()
        # The proof is bound to the first connection's nonce: replaying it fails.
        replayed, _ = await raw_handshake(server.port, first)
        assert isinstance(replayed, Reject)
        assert replayed.reason == RejectReason.BAD_TOKEN
        # With this connection's nonce the same token works.
        welcome, _ = await raw_handshake(server.port, resume_hello(reply.session_id, reply.token))
        assert isinstance(welcome, Welcome) and welcome.present


async def test_another_sessions_token_is_rejected() -> None:
    async with echo_server() as server:
        first, nonce1 = await raw_handshake(server.port, NEW)
        second, _ = await raw_handshake(server.port, NEW)
        assert isinstance(first, Welcome) and isinstance(second, Welcome)
        # second's id with first's token (and a stale nonce): rejected.
        hello = HelloResume(
            second.session_id, resume_proof(first.token, nonce1, second.session_id, 0), 0
        ).encode()
        reply, _ = await raw_handshake(server.port, hello)
        assert isinstance(reply, Reject) and reply.reason == RejectReason.BAD_TOKEN


async def test_offset_never_sent_is_rejected() -> None:
    async with echo_server() as server:
        reply, _ = await raw_handshake(server.port, NEW)
        assert isinstance(reply, Welcome)
        rejected, _ = await raw_handshake(
            server.port, resume_hello(reply.session_id, reply.token, received=99)
        )
        assert isinstance(rejected, Reject)
        assert rejected.reason == RejectReason.BAD_OFFSET
        assert "peer expects offset 99 but only 0 frames were sent" in rejected.message


async def test_resume_of_finished_session_is_rejected() -> None:
    async with echo_server() as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        session_id, token = bytes.fromhex(session.id), session.core.token
        await session.close()
        rejected, _ = await raw_handshake(server.port, resume_hello(session_id, token))
        assert isinstance(rejected, Reject)
        assert rejected.reason == RejectReason.FINISHED
        assert "closed" in rejected.message


async def test_max_sessions_refuses_new_sessions() -> None:
    async with (
        echo_server(max_sessions=1) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as first,
    ):
        with pytest.raises(ResumeRejected, match="max_sessions=1"):
            await connect_resumable("127.0.0.1", server.port, **FAST)
        await first.send(b"ok")
        assert await first.recv() == b"ok"


# -- every refusal, on the wire and in the server's log ----------------------------


async def provoke(reason: RejectReason, server: ResumableServer) -> Message | None:
    """Make the server refuse a handshake for ``reason``; return its reply."""
    port = server.port
    if reason == RejectReason.UNSUPPORTED_VERSION:
        async with raw_client(port, preface=MAGIC + bytes([9])) as raw:
            return await raw.receive()
    if reason == RejectReason.MALFORMED:
        return (await raw_handshake(port, Ping().encode()))[0]
    if reason == RejectReason.UNKNOWN_SESSION:
        return (await raw_handshake(port, resume_hello(b"\1" * 16, b"\0" * 32)))[0]
    session = await connect_resumable("127.0.0.1", port, **FAST)
    session_id, token = bytes.fromhex(session.id), session.core.token
    try:
        if reason == RejectReason.BAD_TOKEN:
            return (await raw_handshake(port, resume_hello(session_id, b"\0" * 32)))[0]
        if reason == RejectReason.BAD_OFFSET:
            return (await raw_handshake(port, resume_hello(session_id, token, received=99)))[0]
        if reason == RejectReason.BUSY:  # the server holds max_sessions=1
            return (await raw_handshake(port, NEW))[0]
        if reason == RejectReason.FINISHED:
            await session.close()
        else:  # EXPIRED: the client vanishes for longer than resume_timeout
            session.abort()
            await wait_until(lambda: not server.sessions)
        return (await raw_handshake(port, resume_hello(session_id, token)))[0]
    finally:
        session.abort()


@pytest.mark.parametrize("reason", list(RejectReason), ids=lambda reason: reason.name)
async def test_every_rejection_reaches_the_client_and_the_servers_log(
    reason: RejectReason, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit.session")
    async with echo_server(resume_timeout=0.1, max_sessions=1) as server:
        reply = await provoke(reason, server)
        assert isinstance(reply, Reject)
        assert reply.reason == reason
        [refusal] = refusals(caplog)
        assert f"({reason.name}): {reply.message}" in refusal.getMessage()


async def test_client_of_another_version_is_rejected_by_the_server() -> None:
    async with echo_server() as server, raw_client(server.port, preface=MAGIC + bytes([9])) as raw:
        reply = await raw.receive()
        assert isinstance(reply, Reject)
        assert reply.reason == RejectReason.UNSUPPORTED_VERSION
        assert "version 9" in reply.message


# -- speaking the wrong protocol ----------------------------------------------


async def test_http_client_gets_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # then the server closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert answer.endswith(
            b"\r\n\r\nThis port speaks the streamkit session protocol, not HTTP.\n"
        )
        assert "looks like HTTP" in caplog.text


async def test_plain_framed_stream_client_is_named_in_the_servers_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server:
        stream = await connect("127.0.0.1", server.port, codec=LengthPrefixed())
        await stream.send(b"hello")
        with pytest.raises((EndOfStream, ConnectionLost)):
            await stream.recv(timeout=5)  # the server closes (or resets: bytes were unread)
        stream.close()
        assert "looks like a length-prefixed frame (a plain streamkit stream" in caplog.text


async def test_client_against_a_non_session_server_gets_a_clear_error() -> None:
    async def http_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(http_like, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ProtocolError, match="not speaking the streamkit session protocol"):
            await connect_resumable("127.0.0.1", port)


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client TLS context, with a certificate made for the test."""
    return _tls.tls_contexts()


async def test_tls_client_on_a_plain_port_gets_a_clear_error(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server:
        with pytest.raises(ConnectionLost, match=r"TLS handshake .* failed") as failure:
            await connect_resumable(
                "127.0.0.1", server.port, ssl=tls_contexts[1], handshake_timeout=5
            )
        message = str(failure.value)
        assert f"127.0.0.1:{server.port}" in message
        assert "not use TLS" in message and "streamkit session server" in message
        assert isinstance(failure.value.__cause__, OSError)
        assert "looks like a TLS handshake" in caplog.text


async def test_plain_client_on_a_tls_port_gets_a_clear_error(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with await serve_resumable(
        echo, "127.0.0.1", 0, ssl=tls_contexts[0], **QUICK_SHUTDOWN
    ) as server:
        with pytest.raises(StreamkitError, match="handshake") as failure:
            await connect_resumable("127.0.0.1", server.port, handshake_timeout=5)
        assert "TLS" in str(failure.value)
        async with connect_resumable(
            "127.0.0.1", server.port, ssl=tls_contexts[1], **FAST
        ) as session:  # the server still serves TLS clients
            await session.send(b"ok")
            assert await session.recv(timeout=5) == b"ok"


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (b"\x7f", "unknown session message type 0x7f"),
        (b"", "empty session message"),
        (b"\x02" + bytes(10), "malformed HELLO_RESUME message: 11 bytes, expected 73"),
        (b"\x01" + struct.pack(">IIQ", 0, 1, 1), "malformed HELLO_NEW message: max_frame=0"),
        (b"\x01" + struct.pack(">IIQ", 1, 1, 0), "max_unacked_bytes=0 (a window must be"),
    ],
)
async def test_bad_hello_closes_only_that_connection(
    hello: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server, connect_resumable("127.0.0.1", server.port, **FAST) as good:
        with pytest.raises(asyncio.IncompleteReadError):  # the server just closes
            await raw_handshake(server.port, hello)
        assert message in caplog.text
        await good.send(b"unaffected")
        assert await good.recv() == b"unaffected"


async def test_a_preface_cut_short_is_a_lost_connection_not_another_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(MAGIC[:3])
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert "the client closed the connection during the handshake" in caplog.text
        assert "not speaking" not in caplog.text


async def test_clients_that_vanish_during_the_handshake_leave_no_session() -> None:
    async with echo_server(resume_timeout=0.1, max_sessions=1) as server:
        hello = frame(HelloNew().encode())
        for _ in range(10):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(make_preface() + hello)
            await writer.drain()
            # A reset right behind the hello: the server may find the
            # connection gone before it can answer, or just after.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for _ in range(500):  # each either never registered, or expired after resume_timeout
            if server.sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert server.sessions == 0
        async with connect_resumable("127.0.0.1", server.port, **FAST) as session:
            await session.send(b"room for me")
            assert await session.recv(timeout=5) == b"room for me"


async def test_a_server_closing_in_its_nonce_is_a_lost_connection_not_another_protocol() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(PREFACE_SIZE)
        writer.write(make_preface() + b"\x16\x03\x01")  # 3 bytes of nonce, then the end
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ConnectionLost, match="closed the connection during the handshake"):
            await connect_resumable("127.0.0.1", port, handshake_timeout=5)


async def test_client_of_a_server_speaking_another_version_gets_a_clear_error() -> None:
    async def other_version(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(PREFACE_SIZE)
            writer.write(MAGIC + bytes([1]) + bytes(NONCE_SIZE))  # an older server
            await writer.drain()
            await reader.read()  # until the client closes
        finally:
            writer.close()

    server = await asyncio.start_server(other_version, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(
            ProtocolError, match="server speaks session protocol version 1; this client speaks 2"
        ):
            await connect_resumable("127.0.0.1", port, handshake_timeout=5)


async def test_a_silent_server_times_out_saying_what_was_tried() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # reads the preface and hello, answers nothing
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            closed.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(TimeoutError) as info:
            await connect_resumable("127.0.0.1", port, handshake_timeout=0.2)
        await asyncio.wait_for(closed.wait(), 5)  # the client gave up and closed
    assert str(info.value) == (
        f"no answer to the session handshake from 127.0.0.1:{port} within "
        "handshake_timeout=0.2 s: the peer accepted the connection but sent no session "
        "preface (is it a streamkit session server?)"
    )
