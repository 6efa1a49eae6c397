"""Resumable sessions over real loopback and Unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from streamkit import EndOfStream, FrameTooLarge, ResumeRejected, SessionError, SessionExpired
from streamkit.codecs import LengthPrefixed
from streamkit.errors import ConnectionLost, ProtocolError, StreamkitError
from streamkit.net import connect
from streamkit.session import (
    Backoff,
    ClientSession,
    ResumableServer,
    ServerSession,
    connect_resumable,
    connect_resumable_unix,
    serve_resumable,
    serve_resumable_unix,
)
from streamkit.session.protocol import (
    MAGIC,
    NONCE_SIZE,
    PREFACE_SIZE,
    Ack,
    Close,
    CloseAck,
    Data,
    HelloNew,
    HelloResume,
    Ping,
    Pong,
    Reject,
    RejectReason,
    Welcome,
    decode_message,
    make_preface,
    resume_proof,
)
from streamkit.testing import FaultProxy

FAST = {"keepalive_interval": 0.2, "keepalive_timeout": 0.6, "ack_delay": 0.005}
QUICK_SHUTDOWN = {"grace_period": 0.1}


async def echo(session: ServerSession) -> None:
    async for payload in session:
        await session.send(payload)


@asynccontextmanager
async def echo_server(**options: object) -> AsyncIterator[ResumableServer]:
    settings = {**FAST, **QUICK_SHUTDOWN, **options}
    async with await serve_resumable(echo, "127.0.0.1", 0, **settings) as server:
        yield server


def cut(session: ClientSession) -> None:
    """Drop the session's current connection as a network failure would."""
    assert session.connected
    session.reconnect()


async def cut_and_resume(session: ClientSession) -> None:
    """Cut the connection and wait until the session is attached to a new one."""
    before = session.stats.connections
    cut(session)
    while session.stats.connections == before or not session.connected:
        session._progress.clear()  # set by every attach
        await session._progress.wait()


async def test_echo_round_trip_and_stats() -> None:
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        for n in range(100):
            await session.send(b"frame %d" % n)
        got = [await session.recv() for _ in range(100)]
        assert got == [b"frame %d" % n for n in range(100)]
        assert len(session.id) == 32
        assert session.stats.frames_sent == 100
        assert session.stats.frames_received == 100
        assert session.stats.connections == 1
        assert session.stats.reconnects == 0


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with (
        await serve_resumable_unix(echo, path, **FAST) as server,
        connect_resumable_unix(path, **FAST) as session,
    ):
        await session.send(b"over unix")
        assert await session.recv() == b"over unix"
        assert server.sessions == 1


async def test_survives_repeated_cuts_exactly_once_in_order() -> None:
    total = 5000
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        received: list[bytes] = []

        async def reader() -> None:
            while len(received) < total:
                received.append(await session.recv())

        task = asyncio.create_task(reader())
        for n in range(total):
            await session.send(struct.pack(">I", n))
            if n % 500 == 250:
                await cut_and_resume(session)
        await task
        assert [struct.unpack(">I", p)[0] for p in received] == list(range(total))
        assert session.stats.reconnects >= 5
        assert session.stats.frames_replayed > 0


async def test_handler_runs_once_per_session_across_reconnects() -> None:
    calls = 0
    seen: list[bytes] = []

    async def handler(session: ServerSession) -> None:
        nonlocal calls
        calls += 1
        async for payload in session:
            seen.append(payload)

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        for n in range(10):
            await session.send(b"%d" % n)
            await session.flush()
            await cut_and_resume(session)
        await session.flush()
    assert calls == 1
    assert seen == [b"%d" % n for n in range(10)]


async def test_close_is_graceful_and_peer_sees_end_of_stream() -> None:
    done = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        frames = [payload async for payload in session]
        done.set_result(frames)

    async with await serve_resumable(handler, "127.0.0.1", 0, **FAST) as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        for n in range(50):
            await session.send(b"%d" % n)
        await session.close()
        assert session.closed
        assert await done == [b"%d" % n for n in range(50)]
        with pytest.raises(SessionError, match=r"closing|closed"):
            await session.send(b"late")


async def test_server_close_gives_client_end_of_stream() -> None:
    async def handler(session: ServerSession) -> None:
        for n in range(20):
            await session.send(b"%d" % n)
        # returning closes the session gracefully

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        got = [payload async for payload in session]
        assert got == [b"%d" % n for n in range(20)]
        with pytest.raises(EndOfStream):
            await session.recv()
        with pytest.raises(SessionError, match="peer closed"):
            await session.send(b"x")


async def test_recv_timeout_leaves_session_usable() -> None:
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        with pytest.raises(TimeoutError):
            await session.recv(timeout=0.05)
        await session.send(b"after timeout")
        assert await session.recv(timeout=5) == b"after timeout"


async def test_send_over_max_frame_is_refused() -> None:
    async with (
        echo_server(max_frame=1024) as server,
        connect_resumable("127.0.0.1", server.port, max_frame=1024, **FAST) as session,
    ):
        await session.send(b"x" * 1024)
        assert await session.recv() == b"x" * 1024
        with pytest.raises(FrameTooLarge, match="1025 bytes exceeds max_frame=1024"):
            await session.send(b"x" * 1025)


async def test_stalled_receiver_bounds_sender_and_blocks_send() -> None:
    limit = 64 * 1024
    started = asyncio.Event()
    release = asyncio.Event()

    async def stalled(session: ServerSession) -> None:
        started.set()
        await release.wait()
        async for _ in session:
            pass

    async with (
        await serve_resumable(stalled, "127.0.0.1", 0, **FAST) as server,
        connect_resumable(
            "127.0.0.1", server.port, max_unacked_bytes=limit, max_unacked_frames=10_000, **FAST
        ) as session,
    ):
        await started.wait()
        payload = b"x" * 1024
        sent = 0

        async def producer() -> None:
            nonlocal sent
            for _ in range(1000):
                await session.send(payload)
                sent += 1

        task = asyncio.create_task(producer())
        await asyncio.sleep(0.3)
        assert not task.done()
        assert sent <= limit // len(payload)
        assert session._send_state.held_bytes <= limit
        release.set()
        await asyncio.wait_for(task, 10)
        await session.flush()


async def test_keepalive_detects_half_open_connection() -> None:
    async with (
        echo_server() as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        await session.send(b"before")
        assert await session.recv() == b"before"
        # Half-open: nothing gets through, yet no end of stream or reset arrives.
        proxy.blackhole()
        await session.send(b"during")
        with pytest.raises(TimeoutError):
            await session.recv(timeout=0.2)
        for _ in range(250):  # keepalive_timeout (0.6 s) lets go of the silent link
            if not session.connected:
                break
            await asyncio.sleep(0.02)
        assert not session.connected and session.stats.reconnects == 0
        proxy.restore()
        assert await session.recv(timeout=5) == b"during"
        assert session.stats.reconnects == 1


# -- handshake security ------------------------------------------------------


async def raw_handshake(port: int, hello: bytes | None = None) -> tuple[object, bytes]:
    """Open a raw connection, exchange prefaces, send ``hello``; return the reply and nonce."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(make_preface())
        preface = await reader.readexactly(PREFACE_SIZE)
        assert preface == make_preface()
        nonce = await reader.readexactly(NONCE_SIZE)
        if hello is None:
            return None, nonce
        writer.write(struct.pack(">I", len(hello)) + hello)
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        return decode_message(await reader.readexactly(size)), nonce
    finally:
        writer.close()


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
        reply, nonce = await raw_handshake(server.port, HelloNew().encode())
        assert isinstance(reply, Welcome) and not reply.present
        proof = resume_proof(reply.token, nonce, reply.session_id, 0)
        first = HelloResume(reply.session_id, proof, 0).encode()
        # The proof is bound to the first connection's nonce: replaying it fails.
        replayed, _ = await raw_handshake(server.port, first)
        assert isinstance(replayed, Reject)
        assert replayed.reason == RejectReason.BAD_TOKEN
        # With this connection's nonce the same token works.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(make_preface())
        await reader.readexactly(PREFACE_SIZE)
        nonce = await reader.readexactly(NONCE_SIZE)
        hello = HelloResume(
            reply.session_id, resume_proof(reply.token, nonce, reply.session_id, 0), 0
        ).encode()
        writer.write(struct.pack(">I", len(hello)) + hello)
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        welcome = decode_message(await reader.readexactly(size))
        assert isinstance(welcome, Welcome) and welcome.present
        writer.close()


async def test_another_sessions_token_is_rejected() -> None:
    async with echo_server() as server:
        first, nonce1 = await raw_handshake(server.port, HelloNew().encode())
        second, _ = await raw_handshake(server.port, HelloNew().encode())
        assert isinstance(first, Welcome) and isinstance(second, Welcome)
        # second's id with first's token (and a stale nonce): rejected.
        hello = HelloResume(
            second.session_id, resume_proof(first.token, nonce1, second.session_id, 0), 0
        ).encode()
        reply, _ = await raw_handshake(server.port, hello)
        assert isinstance(reply, Reject) and reply.reason == RejectReason.BAD_TOKEN


async def test_offset_never_sent_is_rejected() -> None:
    async with echo_server() as server:
        reply, _ = await raw_handshake(server.port, HelloNew().encode())
        assert isinstance(reply, Welcome)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(make_preface())
        await reader.readexactly(PREFACE_SIZE)
        nonce = await reader.readexactly(NONCE_SIZE)
        proof = resume_proof(reply.token, nonce, reply.session_id, 99)
        hello = HelloResume(reply.session_id, proof, 99).encode()
        writer.write(struct.pack(">I", len(hello)) + hello)
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        rejected = decode_message(await reader.readexactly(size))
        assert isinstance(rejected, Reject)
        assert rejected.reason == RejectReason.BAD_OFFSET
        assert "99" in rejected.message
        writer.close()


async def test_resume_after_expiry_raises_session_expired() -> None:
    async with echo_server(resume_timeout=0.2) as server:
        session = await connect_resumable("127.0.0.1", server.port, max_reconnect_time=5, **FAST)
        await session.send(b"x")
        assert await session.recv() == b"x"
        # Keep the client away past the server's resume_timeout.
        session._opener = _refused_opener  # type: ignore[method-assign]
        cut(session)
        await asyncio.sleep(0.5)
        assert server.sessions == 0
        session._opener = session_opener(server.port)  # type: ignore[method-assign]
        with pytest.raises(SessionExpired, match="resume_timeout"):
            await session.recv(timeout=5)
        with pytest.raises(SessionExpired):
            await session.send(b"y")


async def test_resume_of_finished_session_is_rejected() -> None:
    async with echo_server() as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        session_id, token = bytes.fromhex(session.id), session._token
        await session.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(make_preface())
        await reader.readexactly(PREFACE_SIZE)
        nonce = await reader.readexactly(NONCE_SIZE)
        hello = HelloResume(session_id, resume_proof(token, nonce, session_id, 0), 0).encode()
        writer.write(struct.pack(">I", len(hello)) + hello)
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        rejected = decode_message(await reader.readexactly(size))
        assert isinstance(rejected, Reject)
        assert rejected.reason == RejectReason.FINISHED
        assert "closed" in rejected.message
        writer.close()


async def test_client_that_cannot_reconnect_fails_with_connection_lost() -> None:
    async with echo_server() as server:
        session = await connect_resumable("127.0.0.1", server.port, max_reconnect_time=0.3, **FAST)
        session._opener = _refused_opener  # type: ignore[method-assign]
        cut(session)
        with pytest.raises(ConnectionLost, match="max_reconnect_time"):
            await session.recv(timeout=5)
        with pytest.raises(ConnectionLost):
            await session.send(b"x")


async def _refused_opener() -> object:
    raise ConnectionRefusedError("test: server unreachable")


def session_opener(port: int) -> object:
    from streamkit.codecs import LengthPrefixed
    from streamkit.net import connect
    from streamkit.session import SessionSettings

    codec = LengthPrefixed(max_frame=SessionSettings().framing_limit())
    return lambda: connect("127.0.0.1", port, codec=codec)


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
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


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


async def test_client_of_another_version_is_rejected_by_the_server() -> None:
    async with echo_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(MAGIC + bytes([9]))
        await reader.readexactly(PREFACE_SIZE + NONCE_SIZE)
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        reply = decode_message(await reader.readexactly(size))
        assert isinstance(reply, Reject)
        assert reply.reason == RejectReason.UNSUPPORTED_VERSION
        assert "version 9" in reply.message
        writer.close()


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


async def test_max_sessions_refuses_new_sessions() -> None:
    async with (
        echo_server(max_sessions=1) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as first,
    ):
        with pytest.raises(ResumeRejected, match="max_sessions=1"):
            await connect_resumable("127.0.0.1", server.port, **FAST)
        await first.send(b"ok")
        assert await first.recv() == b"ok"


# -- bad input after the handshake ---------------------------------------------


async def attached_raw_client(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome]:
    """A raw client that opened a new session and is attached to it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(make_preface())
    await reader.readexactly(PREFACE_SIZE + NONCE_SIZE)
    hello = HelloNew().encode()
    writer.write(struct.pack(">I", len(hello)) + hello)
    size = struct.unpack(">I", await reader.readexactly(4))[0]
    welcome = decode_message(await reader.readexactly(size))
    assert isinstance(welcome, Welcome)
    return reader, writer, welcome


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (bytes([0x7E]), "unknown session message type 0x7e"),
        (bytes([0x10]) + struct.pack(">Q", 5) + b"x", "offset 5 but offset 0 was expected"),
        (bytes([0x11]) + struct.pack(">QQ", 3, 0), "ack for offset 3 but only 0 frames"),
        (bytes([0x11]) + struct.pack(">QQ", 0, 1), "consumed 1 > received 0"),
        (bytes([0x11, 0]), "malformed ACK"),
        (bytes([0x15]), "CLOSE_ACK for a close that was never sent"),
        (HelloNew().encode(), "unexpected HelloNew"),
    ],
)
async def test_bad_message_closes_the_connection_and_is_logged(
    body: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server, connect_resumable("127.0.0.1", server.port, **FAST) as good:
        reader, writer, _ = await attached_raw_client(server.port)
        writer.write(frame(body))
        while await reader.read(65536):  # the server closes this connection
            pass
        writer.close()
        assert message in caplog.text
        await good.send(b"others are unaffected")
        assert await good.recv() == b"others are unaffected"


async def test_acks_going_backwards_close_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server, connect_resumable("127.0.0.1", server.port, **FAST) as good:
        reader, writer, _ = await attached_raw_client(server.port)
        writer.write(frame(bytes([0x10]) + struct.pack(">Q", 0) + b"echo me"))
        writer.write(frame(bytes([0x11]) + struct.pack(">QQ", 0, 0)))
        await asyncio.sleep(0.1)  # the echo arrives; ack it, then go backwards
        writer.write(frame(bytes([0x11]) + struct.pack(">QQ", 1, 1)))
        writer.write(frame(bytes([0x11]) + struct.pack(">QQ", 0, 0)))
        while await reader.read(65536):
            pass
        writer.close()
        assert "ack went backwards" in caplog.text
        await good.send(b"unaffected")
        assert await good.recv() == b"unaffected"


async def test_oversized_frame_from_peer_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with (
        echo_server(max_frame=1000) as server,
        connect_resumable("127.0.0.1", server.port, max_frame=1000, **FAST) as good,
    ):
        reader, writer, _ = await attached_raw_client(server.port)
        writer.write(struct.pack(">I", 5000) + bytes([0x10]))
        while await reader.read(65536):
            pass
        writer.close()
        assert "exceeds max_frame=1009" in caplog.text
        await good.send(b"unaffected")
        assert await good.recv() == b"unaffected"


async def test_second_connection_replaces_the_first() -> None:
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        await session.send(b"one")
        assert await session.recv() == b"one"
        old = session._conn
        assert old is not None
        # Resume on a new connection while the old one is still up.
        await session._resume_once()
        assert session._conn is not old
        assert old.stream.is_closing()
        await session.send(b"two")
        assert await session.recv() == b"two"
        assert session.stats.connections == 2


async def read_messages(reader: asyncio.StreamReader) -> list[object]:
    """Every message a raw connection receives until the server closes it."""
    messages: list[object] = []
    while header := await reader.read(4):
        header += await reader.readexactly(4 - len(header))
        size = struct.unpack(">I", header)[0]
        messages.append(decode_message(await reader.readexactly(size)))
    return messages


async def test_a_resume_on_a_second_socket_closes_the_first() -> None:
    async with echo_server() as server:
        old_reader, old_writer, welcome = await attached_raw_client(server.port)
        # A second, independent socket resumes while the first is still up.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(make_preface())
        await reader.readexactly(PREFACE_SIZE)
        nonce = await reader.readexactly(NONCE_SIZE)
        proof = resume_proof(welcome.token, nonce, welcome.session_id, 0)
        writer.write(frame(HelloResume(welcome.session_id, proof, 0).encode()))
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        resumed = decode_message(await reader.readexactly(size))
        assert isinstance(resumed, Welcome) and resumed.present
        # The server closed the first connection; nothing of the session goes there.
        old = await asyncio.wait_for(read_messages(old_reader), 5)
        assert not any(isinstance(message, Data) for message in old)
        old_writer.close()
        writer.write(data_frame(0, b"on the second"))
        async with asyncio.timeout(5):
            while True:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                message = decode_message(await reader.readexactly(size))
                if isinstance(message, Data):
                    break
        assert message == Data(0, b"on the second")
        writer.close()


async def fake_server(
    on_resume: Callable[[HelloResume], bytes],
) -> tuple[asyncio.Server, int]:
    """A session server of one new session that drops every connection after its welcome.

    The welcome to a resume is ``on_resume(hello)``.
    """
    session_id, token = b"\x05" * 16, b"\x06" * 32

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(PREFACE_SIZE)
        writer.write(make_preface(b"\0" * NONCE_SIZE))
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        hello = decode_message(await reader.readexactly(size))
        if isinstance(hello, HelloResume):
            writer.write(frame(on_resume(hello)))
        else:
            writer.write(frame(Welcome(False, session_id, 0, token).encode()))
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_server_that_claims_frames_never_sent_fails_the_client() -> None:
    server, port = await fake_server(lambda hello: Welcome(True, hello.session_id, 99).encode())
    async with server:
        session = await connect_resumable("127.0.0.1", port, **FAST)
        with pytest.raises(ResumeRejected, match="expects offset 99 but only 0 frames were sent"):
            await session.recv(timeout=5)


async def test_a_server_that_resumes_another_session_delivers_nothing_of_it() -> None:
    server, port = await fake_server(lambda hello: Welcome(True, b"\x07" * 16, 0).encode())
    async with server:
        session = await connect_resumable(
            "127.0.0.1", port, max_reconnect_time=0.3, reconnect_backoff=Backoff(0.01, 0.05)
        )
        with pytest.raises(ConnectionLost, match="answered a resume with another session"):
            await session.recv(timeout=5)
        assert session.stats.connections == 1  # never attached to the other session


# -- closing under cuts ----------------------------------------------------------


def intercept(session: ClientSession, name: str, kind: type, proxy: FaultProxy) -> asyncio.Event:
    """Cut the connection, through ``proxy``, instead of the first ``kind`` message.

    ``name`` is ``"_on_message"`` (a message received) or ``"_send_control"``
    (an encoded control message sent). Returns an event set at the cut.
    """
    original = getattr(session, name)
    encoded = kind().encode() if name == "_send_control" else None
    done = asyncio.Event()

    def hooked(message: object) -> None:
        hit = message == encoded if encoded is not None else isinstance(message, kind)
        if hit and not done.is_set():
            done.set()
            proxy.cut()  # the message is lost with the connection
            return
        original(message)

    setattr(session, name, hooked)
    return done


async def test_client_close_completes_when_close_ack_is_lost_and_handler_still_runs() -> None:
    received = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def handler(session: ServerSession) -> None:
        received.set_result([payload async for payload in session])
        await release.wait()  # still running when the client comes back

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable("127.0.0.1", proxy.port, **FAST)
        for n in range(5):
            await session.send(b"%d" % n)
        lost = intercept(session, "_on_message", CloseAck, proxy)
        await asyncio.wait_for(session.close(), 10)
        assert lost.is_set()
        assert session.closed
        assert proxy.stats.cuts == 1
        assert session.stats.connections == 1  # the resume was answered FINISHED
        assert await received == [b"%d" % n for n in range(5)]
        assert not release.is_set()
        assert server.sessions == 0  # a finished session is unregistered at once
        release.set()


async def test_session_expiring_while_its_handler_runs_is_unregistered_at_once() -> None:
    got = asyncio.get_running_loop().create_future()
    pending_failed = asyncio.get_running_loop().create_future()
    release = asyncio.Event()
    later = asyncio.get_running_loop().create_future()

    async def pending_recv(session: ServerSession) -> None:
        try:
            await session.recv()
        except BaseException as exc:
            pending_failed.set_result(exc)

    async def handler(session: ServerSession) -> None:
        got.set_result(await session.recv())
        waiter = asyncio.create_task(pending_recv(session))
        await release.wait()  # busy elsewhere, not awaiting the session, when it expires
        try:
            await session.send(b"late")
        except BaseException as exc:
            later.set_result(exc)
        await waiter

    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, resume_timeout=0.2, **FAST, **QUICK_SHUTDOWN
        ) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable(
            "127.0.0.1",
            proxy.port,
            max_reconnect_time=5,
            reconnect_backoff=Backoff(0.01, 0.05),
            **FAST,
        )
        await session.send(b"x")
        assert await got == b"x"
        session._opener = _refused_opener  # type: ignore[method-assign]
        proxy.cut()
        failure = await asyncio.wait_for(pending_failed, 5)
        assert isinstance(failure, SessionExpired)
        assert "resume_timeout" in str(failure)
        assert server.sessions == 0
        session._opener = session_opener(proxy.port)  # type: ignore[method-assign]
        with pytest.raises(SessionExpired, match="resume_timeout"):
            await session.recv(timeout=5)
        release.set()
        assert isinstance(await asyncio.wait_for(later, 5), SessionExpired)


async def test_server_close_completes_when_the_clients_close_ack_is_lost() -> None:
    closed = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        await session.send(b"bye")
        try:
            await session.close()
        except BaseException as exc:
            closed.set_result(exc)
        else:
            closed.set_result(None)

    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, close_timeout=3, resume_timeout=30, **FAST, **QUICK_SHUTDOWN
        ) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable("127.0.0.1", proxy.port, **FAST)
        lost = intercept(session, "_send_control", CloseAck, proxy)
        assert await session.recv(timeout=5) == b"bye"
        with pytest.raises(EndOfStream):
            await session.recv(timeout=5)
        assert lost.is_set()
        # The client has finished and never comes back; everything was
        # acknowledged, so the server's close() completes.
        assert await asyncio.wait_for(closed, 10) is None
        assert server.sessions == 0


async def test_client_that_missed_the_servers_close_resumes_into_end_of_stream() -> None:
    closed = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        for n in range(3):
            await session.send(b"%d" % n)
        await session.close()
        closed.set_result(None)

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable("127.0.0.1", proxy.port, **FAST)
        lost = intercept(session, "_on_message", Close, proxy)
        got = [payload async for payload in session]
        assert got == [b"0", b"1", b"2"]
        assert lost.is_set()
        await asyncio.wait_for(closed, 10)
        assert session.closed
        with pytest.raises(SessionError, match="peer closed"):
            await session.send(b"x")


# -- a peer that keeps dropping the session ------------------------------------


async def test_resumes_that_never_make_progress_end_the_session() -> None:
    """A server that accepts every resume, then drops the connection at once."""
    resumes: list[HelloResume] = []

    def welcome(hello: HelloResume) -> bytes:
        resumes.append(hello)
        return Welcome(True, hello.session_id, 0).encode()

    server, port = await fake_server(welcome)
    async with server:
        session = await connect_resumable(
            "127.0.0.1",
            port,
            max_reconnect_time=0.5,
            reconnect_backoff=Backoff(0.01, 0.05),
            **FAST,
        )
        await session.send(b"never acknowledged")
        with pytest.raises(ProtocolError, match="no progress") as failure:
            await session.recv(timeout=10)
        assert "max_reconnect_time=0.5" in str(failure.value)
        assert 1 <= len(resumes) < 200  # backed off, not thousands
        with pytest.raises(ProtocolError):
            await session.send(b"x")


async def test_an_idle_session_cut_again_and_again_lives_on() -> None:
    """Each resume of an idle session is progress (its ping is answered), however many."""
    async with (
        echo_server() as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, max_reconnect_time=0.2, **FAST) as session,
    ):
        for _ in range(8):  # cuts spread over more than max_reconnect_time
            pongs = session._pongs
            for _ in range(500):
                if session._pongs > pongs:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            before = session.stats.connections
            assert proxy.cut() == 1
            async with asyncio.timeout(5):
                while session.stats.connections == before and not session.closed:
                    session._progress.clear()  # set by every attach, and a failure
                    await session._progress.wait()
            assert not session.closed
        await session.send(b"still here")
        assert await session.recv(timeout=5) == b"still here"
        assert session.stats.reconnects == 8


@pytest.mark.parametrize(
    ("server_max", "client_max", "server_error"),
    [
        (1000, 2000, "1001 bytes exceeds max_frame=1000"),
        (2000, 1000, "1001 bytes exceeds the peer's max_frame=1000"),
    ],
)
async def test_send_over_the_peers_max_frame_is_refused_locally(
    server_max: int, client_max: int, server_error: str
) -> None:
    refused = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        try:
            await session.send(b"y" * 1001)
        except FrameTooLarge as exc:
            refused.set_result(str(exc))
        async for payload in session:
            await session.send(payload)

    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, max_frame=server_max, **FAST, **QUICK_SHUTDOWN
        ) as server,
        connect_resumable("127.0.0.1", server.port, max_frame=client_max, **FAST) as session,
    ):
        assert server_error in await asyncio.wait_for(refused, 5)
        assert session.max_frame == 1000
        whose = "the peer's " if server_max < client_max else ""
        for size in (1001, 2001):  # over one limit, over both: the smaller is named
            with pytest.raises(FrameTooLarge, match=f"{size} bytes exceeds {whose}max_frame=1000"):
                await session.send(b"x" * size)
        await session.send(b"x" * 1000)  # the session goes on
        assert await session.recv(timeout=5) == b"x" * 1000
        assert session.stats.reconnects == 0


# -- every rejection, on the wire and in the server's log ------------------------


async def raw_resume(port: int, session_id: bytes, token: bytes, received: int) -> object:
    """Resume ``session_id`` on a raw connection with a proof for its nonce; return the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(make_preface())
        await reader.readexactly(PREFACE_SIZE)
        nonce = await reader.readexactly(NONCE_SIZE)
        proof = resume_proof(token, nonce, session_id, received)
        writer.write(frame(HelloResume(session_id, proof, received).encode()))
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        return decode_message(await reader.readexactly(size))
    finally:
        writer.close()


async def provoke(reason: RejectReason, server: ResumableServer) -> object:
    """Make the server refuse a handshake for ``reason``; return its reply."""
    port = server.port
    if reason == RejectReason.UNSUPPORTED_VERSION:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(MAGIC + bytes([9]))
        await reader.readexactly(PREFACE_SIZE + NONCE_SIZE)
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        writer.close()
        return decode_message(await reader.readexactly(size))
    if reason == RejectReason.MALFORMED:
        return (await raw_handshake(port, Ping().encode()))[0]
    if reason == RejectReason.UNKNOWN_SESSION:
        return await raw_resume(port, b"\1" * 16, b"\0" * 32, 0)
    session = await connect_resumable("127.0.0.1", port, **FAST)
    session_id, token = bytes.fromhex(session.id), session._token
    try:
        if reason == RejectReason.BAD_TOKEN:
            return await raw_resume(port, session_id, b"\0" * 32, 0)
        if reason == RejectReason.BAD_OFFSET:
            return await raw_resume(port, session_id, token, 99)
        if reason == RejectReason.BUSY:  # the server holds max_sessions=1
            return (await raw_handshake(port, HelloNew().encode()))[0]
        if reason == RejectReason.FINISHED:
            await session.close()
        else:  # EXPIRED: the client vanishes for longer than resume_timeout
            session.abort()
            for _ in range(500):
                if not server.sessions:
                    break
                await asyncio.sleep(0.01)
        return await raw_resume(port, session_id, token, 0)
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
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1
        assert f"({reason.name}): {reply.message}" in refusals[0]


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


# -- abort ------------------------------------------------------------------------


async def test_client_abort_fails_pending_calls_and_the_server_session_expires() -> None:
    handler_saw = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        try:
            await session.recv()
        except BaseException as exc:
            handler_saw.set_result(exc)
            raise

    async with await serve_resumable(
        handler, "127.0.0.1", 0, resume_timeout=0.2, **FAST, **QUICK_SHUTDOWN
    ) as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        pending = asyncio.create_task(session.recv())
        await asyncio.sleep(0)  # the recv is waiting
        session.abort()
        with pytest.raises(SessionError, match="aborted"):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(SessionError, match="aborted"):
            await session.send(b"late")
        with pytest.raises(SessionError, match="aborted"):
            await session.recv()
        assert session.closed and not session.connected
        # abort tells the server nothing: its session ends after resume_timeout.
        failure = await asyncio.wait_for(handler_saw, 5)
        assert isinstance(failure, SessionExpired)
        assert server.sessions == 0


async def test_server_abort_fails_its_calls_and_the_client_is_told_on_resume() -> None:
    aborted = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        assert await session.recv() == b"abort, please"
        session.abort()
        try:
            await session.send(b"late")
        except SessionError as exc:
            aborted.set_result(exc)

    async with await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        await session.send(b"abort, please")
        with pytest.raises(ResumeRejected, match="was aborted"):
            await session.recv(timeout=5)
        assert "aborted" in str(await asyncio.wait_for(aborted, 5))
        assert server.sessions == 0
        with pytest.raises(ResumeRejected):
            await session.send(b"x")


# -- stats ------------------------------------------------------------------------


async def test_stats_count_bytes_and_replays_exactly_across_a_cut() -> None:
    server_session = asyncio.get_running_loop().create_future()
    first = [b"a" * n for n in range(1, 11)]  # 55 bytes, acknowledged before the cut
    lost = [b"b" * n for n in range(100, 105)]  # 510 bytes, lost in the cut
    got: list[bytes] = []

    async def handler(session: ServerSession) -> None:
        server_session.set_result(session)
        async for payload in session:
            got.append(payload)

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        for payload in first:
            await session.send(payload)
        await session.flush()
        proxy.blackhole()  # what is sent now never reaches the server...
        for payload in lost:
            await session.send(payload)
        proxy.cut()  # ...and dies with the connection
        proxy.restore()
        await session.flush()  # after the resume and the replay
        served = await asyncio.wait_for(server_session, 5)
        assert got == first + lost
        stats = session.stats
        assert stats.reconnects == 1
        assert stats.frames_sent == 15
        assert stats.bytes_sent == 565
        assert stats.frames_replayed == 5  # exactly the lost frames, no more
        assert stats.duplicates_dropped == 0
        assert (stats.frames_received, stats.bytes_received) == (0, 0)
        peer = served.stats
        assert (peer.frames_received, peer.bytes_received) == (15, 565)
        assert peer.duplicates_dropped == 0
        assert (peer.frames_sent, peer.bytes_sent, peer.frames_replayed) == (0, 0, 0)


async def test_frames_sent_during_an_outage_are_not_counted_as_replayed() -> None:
    """Only frames written to the lost connection are replayed; the rest go out once."""
    got: list[bytes] = []
    done = asyncio.Event()

    async def handler(session: ServerSession) -> None:
        async for payload in session:
            got.append(payload)
            if len(got) == 22:
                done.set()

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        acknowledged = [b"a%d" % n for n in range(10)]
        lost = [b"b%d" % n for n in range(5)]
        during_outage = [b"c%d" % n for n in range(7)]
        for payload in acknowledged:
            await session.send(payload)
        await session.flush()
        proxy.blackhole()  # written to the connection, never delivered...
        for payload in lost:
            await session.send(payload)
        proxy.cut()  # ...and lost with it; the black hole holds the reconnects too
        async with asyncio.timeout(5):
            # No event tells a detach: poll the public property, bounded.
            while session.connected:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        for payload in during_outage:  # queued: no connection is attached
            await session.send(payload)
        assert not session.connected
        proxy.restore()
        await asyncio.wait_for(done.wait(), 10)
        assert got == acknowledged + lost + during_outage
        stats = session.stats
        assert stats.frames_sent == 22
        assert stats.frames_replayed == 5  # the lost frames; not the 7 sent while away


async def test_duplicate_frames_from_a_peer_are_dropped_and_counted() -> None:
    received = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        got = [await session.recv(), await session.recv()]
        received.set_result((got, session.stats))

    async with await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server:
        _, writer, _ = await attached_raw_client(server.port)
        # Offset 0 twice, as a peer replaying what it need not would send it.
        writer.write(data_frame(0, b"one") + data_frame(0, b"one") + data_frame(1, b"two!"))
        got, stats = await asyncio.wait_for(received, 5)
        assert got == [b"one", b"two!"]
        assert (stats.frames_received, stats.bytes_received, stats.duplicates_dropped) == (2, 7, 1)
        writer.close()


def data_frame(offset: int, payload: bytes) -> bytes:
    return frame(bytes([0x10]) + struct.pack(">Q", offset) + payload)


# -- the receive window ----------------------------------------------------------


def window_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "receive window" in r.getMessage()]


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (session counters have no event to await) for up to 5 s."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


@pytest.mark.parametrize(
    ("window", "payload", "over"),
    [
        ({"max_unacked_frames": 16}, b"f" * 10, "over max_unacked_frames=16 announced"),
        ({"max_unacked_bytes": 4000}, b"b" * 1000, "over max_unacked_bytes=4000 announced"),
    ],
    ids=["frames", "bytes"],
)
async def test_a_peer_sending_past_the_receive_window_is_cut_off(
    window: dict[str, int], payload: bytes, over: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    stalled: list[ServerSession] = []

    async def handler(session: ServerSession) -> None:
        if not stalled:  # the hostile peer's session: never read
            stalled.append(session)
            await asyncio.Event().wait()
        await echo(session)

    total = 2_000_000 // len(payload)  # 2 MB and more on the wire, far past the window
    async with await serve_resumable(
        handler, "127.0.0.1", 0, **window, **FAST, **QUICK_SHUTDOWN
    ) as server:
        _, writer, _ = await attached_raw_client(server.port)
        with contextlib.suppress(ConnectionError):
            for start in range(0, total, 64):
                writer.write(b"".join(data_frame(n, payload) for n in range(start, start + 64)))
                await writer.drain()
        await wait_until(lambda: bool(stalled) and not stalled[0].connected)
        writer.close()
        [error] = window_errors(caplog)
        assert "the peer sent past the receive window: " in error
        assert over in error
        # What the session holds: the window and at most one batch (one read) more.
        session = stalled[0]
        frames, held = len(session._queue), sum(map(len, session._queue))
        assert f"{frames} frames ({held} bytes) received and not yet consumed" in error
        one_read = 256 * 1024
        assert held <= window.get("max_unacked_bytes", 16 * len(payload)) + one_read
        assert session.stats.frames_received == frames < total // 4
        # The server goes on serving others.
        async with connect_resumable("127.0.0.1", server.port, **FAST) as good:
            await good.send(b"unaffected")
            assert await good.recv(timeout=5) == b"unaffected"


async def read_until(reader: asyncio.StreamReader, kind: type) -> list[object]:
    """The messages a raw connection receives up to the first ``kind``."""
    messages: list[object] = []
    async with asyncio.timeout(5):
        while not messages or not isinstance(messages[-1], kind):
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            messages.append(decode_message(await reader.readexactly(size)))
    return messages


async def test_duplicates_and_replays_do_not_count_against_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    stalled: list[ServerSession] = []

    async def handler(session: ServerSession) -> None:
        stalled.append(session)
        await asyncio.Event().wait()

    async with await serve_resumable(
        handler, "127.0.0.1", 0, max_unacked_frames=4, **FAST, **QUICK_SHUTDOWN
    ) as server:
        reader, writer, welcome = await attached_raw_client(server.port)
        fill = b"".join(data_frame(n, b"%d" % n) for n in range(4))
        # The window is full; the same frames again are duplicates, not more.
        writer.write(fill + fill + frame(Ping().encode()))
        await read_until(reader, Pong)
        # A resume that replays them once more (they were received) is fine too.
        port = server.port
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(make_preface())
        await reader2.readexactly(PREFACE_SIZE)
        nonce = await reader2.readexactly(NONCE_SIZE)
        proof = resume_proof(welcome.token, nonce, welcome.session_id, 0)
        writer2.write(frame(HelloResume(welcome.session_id, proof, 0).encode()))
        resumed = (await read_until(reader2, Welcome))[-1]
        assert isinstance(resumed, Welcome) and resumed.received == 4
        assert resumed.limits.max_unacked_frames == 4
        writer2.write(fill + frame(Ping().encode()))
        await read_until(reader2, Pong)
        assert stalled[0].stats.duplicates_dropped == 8
        assert window_errors(caplog) == []
        # One frame more than the window closes the connection.
        writer2.write(data_frame(4, b"4"))
        assert await asyncio.wait_for(reader2.read(), 5) == b""
        writer.close()
        writer2.close()
        [error] = window_errors(caplog)
        assert "5 frames (5 bytes) received and not yet consumed" in error


async def test_one_frame_over_the_byte_window_passes_only_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    consume = asyncio.Event()

    async def handler(session: ServerSession) -> None:
        await consume.wait()
        await session.recv()  # frame 0, and nothing more

    async with await serve_resumable(
        handler, "127.0.0.1", 0, max_unacked_bytes=1000, **FAST, **QUICK_SHUTDOWN
    ) as server:
        reader, writer, _ = await attached_raw_client(server.port)
        # Alone in the queue, a frame over the window is what a sender may send.
        writer.write(data_frame(0, bytes(5000)) + frame(Ping().encode()))
        await read_until(reader, Pong)
        consume.set()
        # Consumed: the queue is empty, so another one may come; behind it, nothing.
        async with asyncio.timeout(5):
            while not any(
                isinstance(m, Ack) and m.consumed == 1 for m in await read_until(reader, Ack)
            ):
                pass
        writer.write(data_frame(1, bytes(5000)) + frame(Ping().encode()))
        await read_until(reader, Pong)
        assert window_errors(caplog) == []
        writer.write(data_frame(2, b"x"))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        [error] = window_errors(caplog)
        assert "2 frames (5001 bytes) received and not yet consumed" in error
        assert "over max_unacked_bytes=1000" in error


@pytest.mark.parametrize("receiver", ["server", "client"])
@pytest.mark.parametrize(
    ("window", "payload", "fits"),
    [({"max_unacked_frames": 8}, b"x" * 10, 8), ({"max_unacked_bytes": 1000}, b"x" * 300, 3)],
    ids=["frames", "bytes"],
)
async def test_a_sender_keeps_to_the_receivers_smaller_window(
    receiver: str,
    window: dict[str, int],
    payload: bytes,
    fits: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    total = 100
    served: list[ServerSession] = []
    release = asyncio.Event()
    server_got: list[bytes] = []

    async def handler(session: ServerSession) -> None:
        served.append(session)
        if receiver == "server":
            await release.wait()
            for _ in range(total):
                server_got.append(await session.recv())
        else:
            for _ in range(total):
                await session.send(payload)
        await session.recv()  # until the client closes

    # Only the receiver sets the small window: the sender (default settings)
    # learns it from the handshake.
    server_window = window if receiver == "server" else {}
    client_window = window if receiver == "client" else {}
    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, **server_window, **FAST, **QUICK_SHUTDOWN
        ) as server,
        connect_resumable("127.0.0.1", server.port, **client_window, **FAST) as session,
    ):
        await wait_until(lambda: bool(served))
        peer = served[0]
        if receiver == "server":
            sender, receiving = session, peer

            async def produce() -> None:
                for _ in range(total):
                    await session.send(payload)

            task: asyncio.Task[None] | None = asyncio.create_task(produce())
        else:
            sender, receiving, task = peer, session, None
        await wait_until(lambda: receiving.stats.frames_received == fits)
        await asyncio.sleep(0.2)  # room for a frame past the window, were it sent
        # The sender stopped at the receiver's window, not at its own (4096, 8 MiB).
        assert sender.stats.frames_sent == fits
        assert receiving.stats.frames_received == fits
        if receiver == "server":
            assert task is not None and not task.done()
            release.set()
            await asyncio.wait_for(task, 10)
            await session.flush()
            assert server_got == [payload] * total
        else:
            got = [await session.recv(timeout=5) for _ in range(total)]
            assert got == [payload] * total
        assert session.stats.connections == 1
        assert window_errors(caplog) == []


async def test_frames_over_the_receivers_byte_window_go_one_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with (
        echo_server(max_unacked_bytes=1000) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        payloads = [bytes([n]) * 3000 for n in range(20)]

        async def produce() -> None:
            for payload in payloads:
                await session.send(payload)

        task = asyncio.create_task(produce())
        got = [await session.recv(timeout=5) for _ in payloads]
        await task
        assert got == payloads
        assert session.stats.connections == 1
        assert window_errors(caplog) == []


LEFT_OPEN = """
import asyncio
from streamkit import connect_resumable, serve_resumable

async def handler(session):
    async for message in session:
        await session.send(message)

async def main():
    server = await serve_resumable(handler, "127.0.0.1", 0)
    session = await connect_resumable("127.0.0.1", server.port)
    await session.send(b"x")
    assert await session.recv() == b"x"
    print("returning with the session and its server open", flush=True)

asyncio.run(main())
"""


def test_a_session_left_open_when_asyncio_run_returns_ends_quietly() -> None:
    """The loop's shutdown cancels the session's tasks: it ends, with no reconnect
    started on a closing loop (no 'Task was destroyed', no 'Event loop is closed')."""
    result = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "returning with the session and its server open\n"
    assert result.stderr == ""
