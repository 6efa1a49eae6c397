"""connect / serve over real loopback TCP and Unix sockets: lifecycle, errors, shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (it was just released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def settle() -> None:
    """Let callbacks already scheduled run (asyncio's own done-callbacks of finished tasks)."""
    for _ in range(3):
        await asyncio.sleep(0)


# -- connect ------------------------------------------------------------------------


async def test_connect_is_awaitable_and_an_async_context_manager() -> None:
    async with await serve(echo, "127.0.0.1", 0, codec=CODEC) as server:
        assert server.port > 0
        assert server.sockets[0].getsockname() == ("127.0.0.1", server.port)
        assert server.is_serving()
        stream = await connect("127.0.0.1", server.port, codec=CODEC)
        await stream.send(b"awaited")
        assert await stream.recv() == b"awaited"
        assert stream.peername == ("127.0.0.1", server.port)
        stream.close()
        await stream.wait_closed()
        async with connect("127.0.0.1", server.port, codec=CODEC, timeout=5) as managed:
            await managed.send(b"managed")
            assert await managed.recv() == b"managed"
        assert managed.is_closing()
    assert not server.is_serving()


async def test_connect_closes_the_stream_when_the_block_raises() -> None:
    async with await serve(echo, "127.0.0.1", 0, codec=CODEC) as server:
        with pytest.raises(RuntimeError, match="inside"):
            async with connect("127.0.0.1", server.port, codec=CODEC) as stream:
                raise RuntimeError("inside the block")
        assert stream.is_closing()


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    async with (
        await serve(echo, "::1", 0, codec=CODEC) as server,
        connect("::1", server.port, codec=CODEC) as stream,
    ):
        await stream.send(b"v6")
        assert await stream.recv() == b"v6"
        assert stream.peername[0] == "::1"
        assert server.sockets[0].family == socket.AF_INET6


async def test_refused_connection_raises_the_os_error() -> None:
    """Documented in connect(): connection failures raise the OSError the OS gave."""
    with pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.1", free_port(), codec=CODEC)
    with pytest.raises(ConnectionRefusedError):
        async with connect("127.0.0.1", free_port(), codec=CODEC):
            pass  # pragma: no cover


async def test_connect_unix_to_nothing_raises_the_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await connect_unix(tmp_path / "absent.sock", codec=CODEC)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # a socket file that nothing listens on
    with pytest.raises(ConnectionRefusedError):
        await connect_unix(stale, codec=CODEC)


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


async def test_write_buffer_limits_reach_both_ends() -> None:
    limits: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def handler(stream: FramedStream[bytes]) -> None:
        limits.set_result(stream.writer.transport.get_write_buffer_limits())
        await echo(stream)

    options: dict[str, Any] = {"write_buffer_high": 10_000, "write_buffer_low": 100}
    async with (
        await serve(handler, "127.0.0.1", 0, codec=CODEC, **options) as server,
        connect("127.0.0.1", server.port, codec=CODEC, **options) as stream,
    ):
        assert stream.writer.transport.get_write_buffer_limits() == (100, 10_000)
        assert await limits == (100, 10_000)


# -- serve ----------------------------------------------------------------------------


async def test_many_clients_at_once() -> None:
    async def client(port: int, n: int) -> list[bytes]:
        async with connect("127.0.0.1", port, codec=CODEC) as stream:
            frames = [b"%d:%d" % (n, i) for i in range(10)]
            await stream.send_many(frames)
            stream.write_eof()
            return [frame async for frame in stream]

    async with await serve(echo, "127.0.0.1", 0, codec=CODEC) as server:
        results = await asyncio.gather(*(client(server.port, n) for n in range(30)))
    assert results == [[b"%d:%d" % (n, i) for i in range(10)] for n in range(30)]


async def test_a_failing_handler_is_logged_and_closes_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(stream: FramedStream[bytes]) -> None:
        async for frame in stream:
            if frame == b"boom":
                raise RuntimeError("handler exploded")
            await stream.send(frame)

    caplog.set_level(logging.ERROR, logger="streamkit")
    async with (
        await serve(handler, "127.0.0.1", 0, codec=CODEC) as server,
        connect("127.0.0.1", server.port, codec=CODEC) as victim,
        connect("127.0.0.1", server.port, codec=CODEC) as bystander,
    ):
        await bystander.send(b"before")
        assert await bystander.recv() == b"before"
        await victim.send(b"boom")
        with pytest.raises((ConnectionLost, EndOfStream)):
            await victim.recv(timeout=5)
        [record] = [r for r in caplog.records if r.name == "streamkit"]
        assert record.levelno == logging.ERROR
        assert "failed; closing its connection" in record.getMessage()
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
        await bystander.send(b"still here")
        assert await bystander.recv() == b"still here"
        assert server.handlers == 1
        async with connect("127.0.0.1", server.port, codec=CODEC) as newcomer:
            await newcomer.send(b"new")
            assert await newcomer.recv() == b"new"


async def test_handler_return_closes_the_connection() -> None:
    async def greet(stream: FramedStream[str]) -> None:
        await stream.send("hello and goodbye")

    async with (
        await serve(greet, "127.0.0.1", 0, codec=Lines()) as server,
        connect("127.0.0.1", server.port, codec=Lines()) as stream,
    ):
        assert [line async for line in stream] == ["hello and goodbye"]


async def test_graceful_close_lets_handlers_finish_then_cancels_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grace = 0.2
    started: asyncio.Queue[None] = asyncio.Queue()
    finished = asyncio.Event()
    outcomes: list[str] = []

    async def handler(stream: FramedStream[bytes]) -> None:
        started.put_nowait(None)
        try:
            frame = await stream.recv()
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise
        outcomes.append(frame.decode())
        finished.set()

    loop = asyncio.get_running_loop()
    server = await serve(handler, "127.0.0.1", 0, codec=CODEC, grace_period=grace)
    port = server.port
    async with (
        connect("127.0.0.1", port, codec=CODEC) as quick,
        connect("127.0.0.1", port, codec=CODEC) as silent,
    ):
        await started.get()
        await started.get()
        closed_at = loop.time()
        server.close()  # stop accepting; both handlers keep running
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await connect("127.0.0.1", port, codec=CODEC)
        assert server.handlers == 2
        await quick.send(b"done in time")
        await finished.wait()  # a handler finishes within the grace period
        assert [frame async for frame in quick] == []  # its handler returned: its end
        await server.wait_closed()  # the silent one is cancelled after it
        assert loop.time() - closed_at >= grace - 0.01
        with pytest.raises((ConnectionLost, EndOfStream)):
            await silent.recv(timeout=5)  # its connection was closed
    assert outcomes == ["done in time", "cancelled"]
    assert server.handlers == 0
    await settle()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_wait_closed_returns_as_soon_as_the_handlers_finish() -> None:
    async def handler(stream: FramedStream[bytes]) -> None:
        await stream.recv()

    server = await serve(handler, "127.0.0.1", 0, codec=CODEC, grace_period=60)
    async with connect("127.0.0.1", server.port, codec=CODEC) as stream:
        await stream.send(b"x")
        server.close()
        async with asyncio.timeout(10):  # far less than the grace period
            await server.wait_closed()
    assert server.handlers == 0


@pytest.mark.parametrize("turns", range(8))
async def test_a_connection_accepted_around_close_never_outlives_wait_closed(turns: int) -> None:
    """However many loop turns pass between a connect and close(), no handler
    runs after wait_closed() returns: it is refused, or given its grace
    period and cancelled. And its socket is closed, never leaked (the
    warning filters make a leak an error): a connection the loop accepted
    just before close() is handed over first (CPython gh-109564)."""
    events: list[str] = []

    async def handler(stream: FramedStream[bytes]) -> None:
        events.append("start")
        try:
            await asyncio.sleep(30)
        finally:
            events.append("end")

    server = await serve(handler, "127.0.0.1", 0, codec=CODEC, grace_period=0.05)
    # A blocking connect: on loopback the kernel completes it at once, and
    # the event loop accepts it on one of its next turns.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        for _ in range(turns):
            await asyncio.sleep(0)
        server.close()
        async with asyncio.timeout(10):
            await server.wait_closed()
        events.append("wait_closed returned")
        await asyncio.sleep(0.1)  # a handler started late would show up now
        assert events in (["wait_closed returned"], ["start", "end", "wait_closed returned"])
        if events[0] == "start":
            client.settimeout(5)
            assert client.recv(1) == b""  # its connection was closed
    assert server.handlers == 0


async def test_serve_forever_runs_until_cancelled_then_closes_gracefully() -> None:
    cancelled = asyncio.Event()

    async def handler(stream: FramedStream[bytes]) -> None:
        await stream.send(await stream.recv())
        try:
            await stream.recv()  # until the server's shutdown cancels it
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await serve(handler, "127.0.0.1", 0, codec=CODEC, grace_period=0.1)
    serving = asyncio.create_task(server.serve_forever())
    async with connect("127.0.0.1", server.port, codec=CODEC) as stream:
        await stream.send(b"up")
        assert await stream.recv() == b"up"
        serving.cancel()
        # Bounded: pytest.raises(CancelledError) around a bare await would
        # also swallow the test's own timeout. (On 3.12+, asyncio's
        # serve_forever() waits for every client to leave once cancelled.)
        await asyncio.wait({serving}, timeout=5)
        assert serving.cancelled(), "serve_forever() went on after it was cancelled"
        assert cancelled.is_set()
        assert not server.is_serving()
        assert server.handlers == 0
        with pytest.raises((ConnectionLost, EndOfStream)):
            await stream.recv(timeout=5)


async def test_wait_closed_before_close_is_an_error() -> None:
    server = await serve(echo, "127.0.0.1", 0, codec=CODEC)
    with pytest.raises(RuntimeError, match="before close"):
        await server.wait_closed()
    server.close()
    await server.wait_closed()
    server.close()  # closing twice is harmless
    await server.wait_closed()


# -- Unix sockets -----------------------------------------------------------------


async def test_unix_server_mode_round_trip_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await serve_unix(echo, path, codec=CODEC, mode=0o600) as server:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with connect_unix(path, codec=CODEC) as stream:
            await stream.send(b"unix")
            assert await stream.recv() == b"unix"
        assert server.sockets
        with pytest.raises(ValueError, match="no TCP socket"):
            _ = server.port
    assert not path.exists()  # removed on close


@pytest.mark.skipif(sys.platform != "linux", reason="abstract socket names are Linux's")
async def test_an_abstract_unix_name_serves_without_a_file(tmp_path: Path) -> None:
    name = f"\0streamkit-test-{os.getpid()}-{id(tmp_path)}"
    async with await serve_unix(echo, name, codec=CODEC):
        async with connect_unix(name, codec=CODEC) as stream:
            await stream.send(b"abstract")
            assert await stream.recv() == b"abstract"
        with pytest.raises(OSError, match="already listening") as info:
            await serve_unix(echo, name, codec=CODEC)
        assert info.value.errno == errno.EADDRINUSE
    with pytest.raises(ValueError, match="abstract"):
        await serve_unix(echo, name, codec=CODEC, mode=0o600)
    async with await serve_unix(echo, name, codec=CODEC):  # free again after close
        pass


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens
    assert path.exists()
    async with (
        await serve_unix(echo, path, codec=CODEC, mode=0o660),
        connect_unix(path, codec=CODEC) as stream,
    ):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        await stream.send(b"fresh")
        assert await stream.recv() == b"fresh"
    assert not path.exists()


async def test_a_live_servers_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    async with await serve_unix(echo, path, codec=CODEC):
        inode = os.stat(path).st_ino
        with pytest.raises(OSError, match="already listening") as info:
            await serve_unix(echo, path, codec=CODEC)
        assert info.value.errno == errno.EADDRINUSE
        assert os.stat(path).st_ino == inode
        async with connect_unix(path, codec=CODEC) as stream:  # the first still works
            await stream.send(b"first")
            assert await stream.recv() == b"first"
    assert not path.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="a full Unix backlog blocks connect on Linux")
@pytest.mark.timeout(10)
async def test_a_live_server_with_a_full_backlog_is_not_replaced(tmp_path: Path) -> None:
    """The check for a live server must not block the loop when that server is not accepting."""
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(path))
        busy.listen(0)
        waiting: list[socket.socket] = []
        try:
            for _ in range(100):  # fill its backlog: a blocking connect would now wait
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    client.close()
                    break
                waiting.append(client)
            with pytest.raises(OSError, match="already listening"):
                await serve_unix(echo, path, codec=CODEC)
            assert path.exists()
        finally:
            for client in waiting:
                client.close()


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
