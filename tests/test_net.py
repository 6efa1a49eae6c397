"""connect / serve over real loopback TCP and Unix sockets: lifecycle, errors, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path

import pytest

from streamkit import (
    ConnectionLost,
    EndOfStream,
    FramedStream,
    LengthPrefixed,
    Lines,
    connect,
    connect_unix,
    serve,
    serve_unix,
)
from tests._pairs import HAS_IPV6

CODEC = LengthPrefixed()


async def echo(stream: FramedStream[bytes]) -> None:
    async for frame in stream:
        await stream.send(frame)


async def test_connect_is_awaitable_and_an_async_context_manager() -> None:
    async with await serve(echo, "127.0.0.1", 0, codec=CODEC) as server:
        assert server.port > 0
        assert server.sockets[0].getsockname()[1] == server.port
        stream = await connect("127.0.0.1", server.port, codec=CODEC)
        await stream.send(b"awaited")
        assert await stream.recv() == b"awaited"
        stream.close()
        await stream.wait_closed()
        async with connect("127.0.0.1", server.port, codec=CODEC) as managed:
            await managed.send(b"managed")
            assert await managed.recv() == b"managed"
        assert managed.is_closing()


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    async with (
        await serve(echo, "::1", 0, codec=CODEC) as server,
        connect("::1", server.port, codec=CODEC) as stream,
    ):
        await stream.send(b"v6")
        assert await stream.recv() == b"v6"
        assert stream.peername[0] == "::1"


async def test_refused_connection_raises_the_os_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.1", port, codec=CODEC)


async def test_connect_timeout_covers_a_server_that_never_answers_tls() -> None:
    """A TLS client to a plain server that never speaks: the timeout ends the handshake."""
    import ssl

    hold = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(TimeoutError):
            await connect(
                "127.0.0.1",
                port,
                codec=CODEC,
                ssl=ssl.create_default_context(),
                server_hostname="localhost",
                timeout=0.2,
            )
        hold.set()


async def test_a_failing_handler_is_logged_and_closes_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(stream: FramedStream[bytes]) -> None:
        async for frame in stream:
            if frame == b"boom":
                raise RuntimeError("handler exploded")
            await stream.send(frame)

    async with (
        await serve(handler, "127.0.0.1", 0, codec=CODEC) as server,
        connect("127.0.0.1", server.port, codec=CODEC) as victim,
        connect("127.0.0.1", server.port, codec=CODEC) as bystander,
    ):
        with caplog.at_level(logging.ERROR, logger="streamkit"):
            await victim.send(b"boom")
            with pytest.raises((ConnectionLost, EndOfStream)):
                await victim.recv(timeout=5)
        assert any("handler exploded" in (r.exc_text or "") for r in caplog.records)
        assert any(r.name == "streamkit" for r in caplog.records)
        await bystander.send(b"still here")
        assert await bystander.recv() == b"still here"


async def test_handler_return_closes_the_connection() -> None:
    async def greet(stream: FramedStream[str]) -> None:
        await stream.send("hello and goodbye")

    async with (
        await serve(greet, "127.0.0.1", 0, codec=Lines()) as server,
        connect("127.0.0.1", server.port, codec=Lines()) as stream,
    ):
        assert [line async for line in stream] == ["hello and goodbye"]


async def test_graceful_close_waits_for_handlers_then_cancels_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finished: list[str] = []
    started = asyncio.Event()

    async def handler(stream: FramedStream[bytes]) -> None:
        started.set()
        try:
            frame = await stream.recv()
            finished.append(frame.decode())
        except asyncio.CancelledError:
            finished.append("cancelled")
            raise

    server = await serve(handler, "127.0.0.1", 0, codec=CODEC, grace_period=0.3)
    port = server.port
    async with connect("127.0.0.1", port, codec=CODEC) as quick:
        await started.wait()
        started.clear()
        async with connect("127.0.0.1", port, codec=CODEC):
            await started.wait()
            server.close()  # stop accepting; both handlers keep running
            with pytest.raises(OSError):
                await connect("127.0.0.1", port, codec=CODEC)
            await quick.send(b"done in time")
            loop = asyncio.get_running_loop()
            start = loop.time()
            await server.wait_closed()  # the silent one is cancelled after the grace
            assert loop.time() - start >= 0.2
    assert sorted(finished) == ["cancelled", "done in time"]
    assert server.handlers == 0
    await asyncio.sleep(0.01)  # asyncio's done-callbacks of the connection tasks have run
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_serve_forever_runs_until_cancelled() -> None:
    server = await serve(echo, "127.0.0.1", 0, codec=CODEC, grace_period=0.1)
    serving = asyncio.create_task(server.serve_forever())
    async with connect("127.0.0.1", server.port, codec=CODEC) as stream:
        await stream.send(b"up")
        assert await stream.recv() == b"up"
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert not server.is_serving()


async def test_wait_closed_before_close_is_an_error() -> None:
    server = await serve(echo, "127.0.0.1", 0, codec=CODEC)
    with pytest.raises(RuntimeError, match="before close"):
        await server.wait_closed()
    server.close()
    await server.wait_closed()


# -- Unix sockets -----------------------------------------------------------------


async def test_unix_server_mode_round_trip_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await serve_unix(echo, path, codec=CODEC, mode=0o600) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with connect_unix(path, codec=CODEC) as stream:
            await stream.send(b"unix")
            assert await stream.recv() == b"unix"
        assert server.sockets
    assert not path.exists()  # removed on close


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens
    assert path.exists()
    async with (
        await serve_unix(echo, path, codec=CODEC),
        connect_unix(path, codec=CODEC) as stream,
    ):
        await stream.send(b"fresh")
        assert await stream.recv() == b"fresh"


async def test_a_live_servers_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    async with await serve_unix(echo, path, codec=CODEC):
        with pytest.raises(OSError, match="already listening"):
            await serve_unix(echo, path, codec=CODEC)
        async with connect_unix(path, codec=CODEC) as stream:  # the first still works
            await stream.send(b"first")
            assert await stream.recv() == b"first"


async def test_a_regular_file_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await serve_unix(echo, path, codec=CODEC)
    assert path.read_text() == "precious"


async def test_closing_server_leaves_a_newer_servers_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "moved.sock"
    old = await serve_unix(echo, path, codec=CODEC)
    os.unlink(path)  # someone removed it, and another server took the path
    async with await serve_unix(echo, path, codec=CODEC):
        old.close()
        await old.wait_closed()
        assert path.exists()
        async with connect_unix(path, codec=CODEC) as stream:
            await stream.send(b"newer")
            assert await stream.recv() == b"newer"
