"""TLS with a certificate made in the test (trustme): framed streams and resumable sessions."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
import trustme

from streamkit import (
    ConnectionLost,
    EndOfStream,
    FramedStream,
    LengthPrefixed,
    ProtocolError,
    connect,
    connect_unix,
    serve,
    serve_unix,
)
from streamkit.session import ServerSession, connect_resumable, serve_resumable
from streamkit.session.client import connect_resumable_unix
from streamkit.session.server import serve_resumable_unix

CODEC = LengthPrefixed()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def echo(stream: FramedStream[bytes]) -> None:
    async for frame in stream:
        await stream.send(frame)


async def echo_session(session: ServerSession) -> None:
    async for payload in session:
        await session.send(payload)


async def test_tls_round_trip_over_tcp(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with (
        await serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server,
        connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context, timeout=10) as stream,
    ):
        frames = [b"secret", b"", b"x" * 200_000, bytes(range(256))]
        await stream.send_many(frames)
        assert [await stream.recv() for _ in frames] == frames
        for n in range(100):
            await stream.send(b"%d" % n)
        assert [await stream.recv() for _ in range(100)] == [b"%d" % n for n in range(100)]
        ssl_object = stream.get_extra_info("ssl_object")
        assert ssl_object.version().startswith("TLS")
        assert ssl_object.server_hostname == "127.0.0.1"
        assert stream.get_extra_info("peercert")["subjectAltName"]


async def test_tls_over_a_unix_socket(
    tmp_path: Path, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    path = tmp_path / "tls.sock"
    async with (
        await serve_unix(echo, path, codec=CODEC, ssl=server_context),
        connect_unix(path, codec=CODEC, ssl=client_context, server_hostname="localhost") as stream,
    ):
        await stream.send(b"over unix")
        assert await stream.recv() == b"over unix"
        assert stream.get_extra_info("ssl_object") is not None


async def test_tls_handler_end_is_a_clean_end_of_stream(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def greet(stream: FramedStream[bytes]) -> None:
        await stream.send(b"bye")

    async with (
        await serve(greet, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server,
        connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as stream,
    ):
        assert [frame async for frame in stream] == [b"bye"]
        with pytest.raises(EndOfStream):
            await stream.recv()


async def test_untrusted_certificate_is_a_clear_error_and_the_server_goes_on(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[object] = []

    async def handler(stream: FramedStream[bytes]) -> None:
        handled.append(stream.peername)
        await echo(stream)

    async with await serve(handler, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server:
        untrusting = ssl.create_default_context()  # the system CAs: not our test CA
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await connect("127.0.0.1", server.port, codec=CODEC, ssl=untrusting, timeout=10)
        async with connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as stream:
            await stream.send(b"trusted")
            assert await stream.recv() == b"trusted"
        assert len(handled) == 1  # no handler ran for the failed handshake
    assert [r for r in caplog.records if r.name == "streamkit" and r.levelno >= logging.ERROR] == []


async def test_wrong_hostname_is_a_clear_error(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with await serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)hostname mismatch"):
            await connect(
                "127.0.0.1",
                server.port,
                codec=CODEC,
                ssl=client_context,
                server_hostname="not-the-server.example",
            )


async def test_a_plaintext_client_of_a_tls_server_is_cut_off(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with await serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server:
        async with connect("127.0.0.1", server.port, codec=CODEC) as plain:
            await plain.send(b"not a ClientHello")
            with pytest.raises((ConnectionLost, EndOfStream, ProtocolError)):
                while True:  # whatever the server's alert decodes to, the stream then ends
                    await plain.recv(timeout=10)
        async with connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as stream:
            await stream.send(b"still serving")
            assert await stream.recv() == b"still serving"


async def test_resumable_session_over_tls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with (
        await serve_resumable(echo_session, "127.0.0.1", 0, ssl=server_context) as server,
        connect_resumable("127.0.0.1", server.port, ssl=client_context) as session,
    ):
        for n in range(100):
            await session.send(b"tls %d" % n)
        assert [await session.recv() for _ in range(100)] == [b"tls %d" % n for n in range(100)]
        session.reconnect()  # a new TLS connection, the same session
        await session.send(b"after reconnect")
        assert await session.recv(timeout=10) == b"after reconnect"
        assert session.stats.reconnects == 1


async def test_resumable_session_over_tls_on_a_unix_socket(
    tmp_path: Path, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    path = tmp_path / "session.sock"
    async with (
        await serve_resumable_unix(echo_session, path, ssl=server_context),
        connect_resumable_unix(path, ssl=client_context, server_hostname="localhost") as session,
    ):
        frames = [b"a", b"", b"z" * 100_000]
        for frame in frames:
            await session.send(frame)
        assert [await session.recv(timeout=10) for _ in frames] == frames
