"""TLS with a certificate made in the test (trustme): framed streams and resumable sessions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

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
    hub,
    serve,
    serve_unix,
)
from streamkit.session import SessionOptions, connect_resumable, serve_resumable
from streamkit.session.client import connect_resumable_unix
from streamkit.session.server import serve_resumable_unix
from streamkit.stream import RECEIVE_BUFFER_SIZE
from streamkit.testing import FaultProxy
from tests._handlers import echo, echo_session

CODEC = LengthPrefixed()


class _Server(Protocol):
    """What the handshake_timeout test asks of a server of any layer."""

    @property
    def port(self) -> int: ...

    @property
    def connections(self) -> int: ...


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


async def test_tls_large_frames_come_into_their_own_memory_small_ones_from_the_buffer(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """asyncio's SSL layer decrypts into what StreamProtocol hands it, whichever it is."""
    big = bytes(range(256)) * (3 * RECEIVE_BUFFER_SIZE // 256)
    codec = LengthPrefixed(max_frame=len(big))
    async with (
        serve(echo, "127.0.0.1", 0, codec=codec, ssl=server_context) as server,
        connect("127.0.0.1", server.port, codec=codec, ssl=client_context, timeout=10) as stream,
    ):
        frames = [big, *(b"%d" % n for n in range(500)), big, b"", big]
        sending = asyncio.create_task(stream.send_many(frames))
        assert [await stream.recv() for _ in frames] == frames
        await sending


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


# -- handshake_timeout and close_timeout ----------------------------------------------------

#: A TLS record header announcing a 512-byte ClientHello, then its first 5 bytes.
HALF_A_CLIENT_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03"


async def dropped_after(port: int, sends: bytes) -> float:
    """Connect, send ``sends`` and nothing more: seconds until the server drops us."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    try:
        writer.write(sends)
        async with asyncio.timeout(10):  # asyncio's own TLS handshake timeout is 60 s
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        return loop.time() - started
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("sends", [b"", HALF_A_CLIENT_HELLO], ids=["nothing", "half-a-hello"])
@pytest.mark.parametrize("layer", ["serve", "serve_unix", "serve_resumable", "serve_hub"])
async def test_a_tls_handshake_that_never_finishes_ends_at_handshake_timeout(
    layer: str,
    sends: bytes,
    tmp_path: Path,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if layer == "serve_unix":
        path = tmp_path / "tls.sock"
        async with serve_unix(echo, path, codec=CODEC, ssl=server_context, handshake_timeout=0.5):
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_unix_connection(path)
            started = loop.time()
            writer.write(sends)
            async with asyncio.timeout(10):
                assert await reader.read() == b""
            assert loop.time() - started >= 0.45
            writer.close()
            await writer.wait_closed()
            async with connect_unix(
                path, codec=CODEC, ssl=client_context, server_hostname="localhost"
            ) as stream:
                await stream.send(b"served")
                assert await stream.recv(timeout=10) == b"served"
    else:
        servers: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[_Server]]] = {
            "serve": lambda: serve(
                echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context, handshake_timeout=0.5
            ),
            "serve_resumable": lambda: serve_resumable(
                echo_session, "127.0.0.1", 0, ssl=server_context, handshake_timeout=0.5
            ),
            "serve_hub": lambda: hub.serve_hub(
                "127.0.0.1", 0, ssl=server_context, handshake_timeout=0.5
            ),
        }
        async with servers[layer]() as server:
            assert await dropped_after(server.port, sends) >= 0.45
            assert server.connections == 0
    [line] = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert "failed: not done within handshake_timeout=0.5 s" in line


async def test_a_tls_handshake_past_handshake_timeout_leaves_good_clients_alone(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with (
        serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context, handshake_timeout=1) as server,
        connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as good,
    ):
        stalled = asyncio.create_task(dropped_after(server.port, HALF_A_CLIENT_HELLO))
        for n in range(20):
            await good.send(b"%d" % n)
            assert await good.recv(timeout=10) == b"%d" % n
        assert await stalled >= 0.9
        await good.send(b"after")
        assert await good.recv(timeout=10) == b"after"


async def test_ssl_handshake_timeout_is_the_deprecated_name_of_handshake_timeout(
    server_context: ssl.SSLContext,
) -> None:
    with pytest.warns(
        DeprecationWarning, match="ssl_handshake_timeout is deprecated: use handshake_timeout"
    ):
        starting = serve(
            echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context, ssl_handshake_timeout=0.5
        )
    async with starting as server:
        assert await dropped_after(server.port, b"") < 5


async def test_a_tls_handshake_failure_is_one_warning_and_no_handler_runs(
    server_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[object] = []

    async def handler(stream: FramedStream[bytes]) -> None:
        handled.append(stream)

    async with serve(handler, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server:
        await dropped_after(server.port, b"GET / HTTP/1.1\r\n\r\n")
    assert handled == []
    [line] = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert line.startswith("TLS handshake with ('127.0.0.1', ") and "failed: " in line


async def test_closing_a_tls_stream_to_a_black_holed_peer_ends_at_close_timeout(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    loop = asyncio.get_running_loop()
    async with (
        serve(echo, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        stream = await connect(
            "127.0.0.1", proxy.port, codec=CODEC, ssl=client_context, close_timeout=0.5
        )
        await stream.send(b"hello")
        assert await stream.recv(timeout=10) == b"hello"
        proxy.blackhole()  # the server's close_notify will never come back
        started = loop.time()
        async with asyncio.timeout(10):  # asyncio's TLS shutdown timeout is 30 s
            stream.close()
            await stream.wait_closed()
        assert loop.time() - started >= 0.45
        assert stream.is_closing()


async def test_a_tls_server_closes_a_black_holed_connection_within_close_timeout(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    black_holed = asyncio.Event()

    async def handler(stream: FramedStream[bytes]) -> None:
        await stream.send(await stream.recv())
        await black_holed.wait()  # then return: the server closes the stream

    loop = asyncio.get_running_loop()
    server = await serve(
        handler, "127.0.0.1", 0, codec=CODEC, ssl=server_context, close_timeout=0.5, grace_period=30
    )
    try:
        async with (
            FaultProxy("127.0.0.1", server.port) as proxy,
            connect("127.0.0.1", proxy.port, codec=CODEC, ssl=client_context) as client,
        ):
            await client.send(b"hello")
            assert await client.recv(timeout=10) == b"hello"
            proxy.blackhole()
            black_holed.set()
            started = loop.time()
            server.close()
            async with asyncio.timeout(10):  # not the grace period, not TLS's 30 s
                await server.wait_closed()
            assert loop.time() - started >= 0.45
            proxy.cut()
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_a_tls_session_to_a_black_holed_peer_ends_at_close_timeout(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    quick: SessionOptions = {
        "close_timeout": 0.5,
        "keepalive_interval": 5.0,
        "keepalive_timeout": 30.0,
    }
    loop = asyncio.get_running_loop()
    async with (
        serve_resumable(
            echo_session, "127.0.0.1", 0, ssl=server_context, grace_period=1, **quick
        ) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable("127.0.0.1", proxy.port, ssl=client_context, **quick)
        await session.send(b"hello")
        assert await session.recv(timeout=10) == b"hello"
        proxy.blackhole()
        started = loop.time()
        async with asyncio.timeout(10):
            with pytest.raises(TimeoutError):
                await session.close()
        assert loop.time() - started >= 0.45
        assert session.closed
