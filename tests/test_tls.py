"""TLS with a certificate made in the test: framed streams and resumable sessions."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from streamkit import FramedStream, LengthPrefixed, connect, connect_unix, serve, serve_unix
from streamkit.session import ServerSession, connect_resumable, serve_resumable

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


async def test_tls_round_trip_over_tcp(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with (
        await serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server,
        connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as stream,
    ):
        frames = [b"secret", b"", b"x" * 200_000]
        await stream.send_many(frames)
        assert [await stream.recv() for _ in frames] == frames
        assert stream.get_extra_info("ssl_object").version().startswith("TLS")


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


async def test_tls_half_close_is_not_supported_but_close_is_clean(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def greet(stream: FramedStream[bytes]) -> None:
        await stream.send(b"bye")

    async with (
        await serve(greet, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server,
        connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as stream,
    ):
        assert [frame async for frame in stream] == [b"bye"]


async def test_untrusted_certificate_is_a_clear_error(server_context: ssl.SSLContext) -> None:
    async with await serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await connect("127.0.0.1", server.port, codec=CODEC, ssl=ssl.create_default_context())


async def test_resumable_session_over_tls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def echo_session(session: ServerSession) -> None:
        async for payload in session:
            await session.send(payload)

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
