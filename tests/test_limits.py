"""Limits every server puts on its peers, at their edges, over real sockets.

``max_connections`` on every serve function, and the bound on what a
session connection may send before its handshake completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from streamkit import (
    ConnectionLost,
    EndOfStream,
    FramedStream,
    LengthPrefixed,
    connect,
    connect_unix,
    hub,
    serve,
    serve_unix,
)
from streamkit.net import FD_RESERVE, default_max_connections
from streamkit.session import (
    SessionOptions,
    connect_resumable,
    connect_resumable_unix,
    serve_resumable,
    serve_resumable_unix,
)
from streamkit.session.protocol import (
    MAX_HANDSHAKE_MESSAGE,
    NONCE_SIZE,
    PREFACE_SIZE,
    MessageType,
    make_preface,
)
from streamkit.session.server import DEFAULT_MAX_SESSIONS
from tests._handlers import echo, echo_session

CODEC = LengthPrefixed()
QUICK: SessionOptions = {
    "keepalive_interval": 0.2,
    "keepalive_timeout": 0.6,
    "handshake_timeout": 2.0,
}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (briefly polling) until ``condition()`` holds: a count no event reports."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - nothing reports these counts
            await asyncio.sleep(0.005)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()]


# -- max_connections ------------------------------------------------------------------


@asynccontextmanager
async def framed_server(
    where: str, tmp_path: Path, limit: int
) -> AsyncIterator[tuple[Any, Callable[[], Awaitable[Any]]]]:
    """A framed echo server with ``max_connections=limit``, and a way to connect to it."""
    if where == "unix":
        path = tmp_path / "limit.sock"
        async with serve_unix(echo, path, codec=CODEC, max_connections=limit) as server:
            yield server, lambda: connect_unix(path, codec=CODEC)
    else:
        async with serve(echo, "127.0.0.1", 0, codec=CODEC, max_connections=limit) as server:
            yield server, lambda: connect("127.0.0.1", server.port, codec=CODEC)


async def is_refused(stream: FramedStream[bytes]) -> bool:
    """Whether the server closed ``stream`` without serving it."""
    try:
        await stream.send(b"anyone?")
        await stream.recv(timeout=5)
    except (EndOfStream, ConnectionLost):
        return True
    finally:
        stream.close()
        await stream.wait_closed()
    return False


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_max_connections_serves_n_refuses_the_next_and_serves_again_after_one_leaves(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamkit")
    async with framed_server(where, tmp_path, 3) as (server, open_stream):
        assert server.max_connections == 3
        served = [await open_stream() for _ in range(3)]
        for n, stream in enumerate(served):
            await stream.send(b"%d" % n)
            assert await stream.recv(timeout=5) == b"%d" % n
        assert server.connections == 3
        assert await is_refused(await open_stream())
        [line] = refusals(caplog)
        assert "refused a connection from" in line and "max_connections=3 are open" in line
        for n, stream in enumerate(served):  # the others go on
            await stream.send(b"still %d" % n)
            assert await stream.recv(timeout=5) == b"still %d" % n
        leaving = served.pop()
        leaving.close()
        await leaving.wait_closed()
        await until(lambda: server.connections == 2, "the server to see the leaver go")
        again = await open_stream()
        served.append(again)
        await again.send(b"room again")
        assert await again.recv(timeout=5) == b"room again"
        for stream in served:
            stream.close()
            await stream.wait_closed()


async def test_a_flood_of_refused_connections_logs_one_line_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="streamkit")
    async with (
        serve(echo, "127.0.0.1", 0, codec=CODEC, max_connections=1) as server,
        connect("127.0.0.1", server.port, codec=CODEC) as kept,
    ):
        await kept.send(b"first")
        assert await kept.recv(timeout=5) == b"first"
        for _ in range(25):
            assert await is_refused(await connect("127.0.0.1", server.port, codec=CODEC))
        assert len(refusals(caplog)) == 1  # not one line per refused connection
        await kept.send(b"served throughout")
        assert await kept.recv(timeout=5) == b"served throughout"
    # Closing the server reports the refusals not logged yet, in one line.
    _, count = refusals(caplog)
    assert "refused 24 more connection(s)" in count and "max_connections=1" in count


async def test_resumable_server_max_connections_at_its_edge(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sessions.sock"
    async with serve_resumable_unix(echo_session, path, max_connections=2, **QUICK) as server:
        assert server.max_connections == 2
        first = await connect_resumable_unix(path, **QUICK)
        second = await connect_resumable_unix(path, **QUICK)
        with pytest.raises(ConnectionLost, match="below its max_connections"):
            await connect_resumable_unix(path, **QUICK)
        assert len(refusals(caplog)) == 1
        for session in (first, second):
            await session.send(b"served")
            assert await session.recv(timeout=5) == b"served"
        await first.close()
        await until(lambda: server.connections == 1, "the closed session's connection to go")
        async with connect_resumable_unix(path, **QUICK) as third:
            await third.send(b"room again")
            assert await third.recv(timeout=5) == b"room again"
        await second.close()


async def test_hub_max_connections_at_its_edge(caplog: pytest.LogCaptureFixture) -> None:
    async with hub.serve_hub("127.0.0.1", 0, max_connections=1, **QUICK) as server:
        async with hub.connect("127.0.0.1", server.port, **QUICK) as client:
            await client.create("s")
            with pytest.raises(ConnectionLost):
                await hub.connect("127.0.0.1", server.port, reconnect_timeout=0.5, **QUICK)
            assert await client.append("s", b"still served") == 0
        await until(lambda: server.connections == 0, "the client's connection to go")
        async with hub.connect("127.0.0.1", server.port, **QUICK) as client:
            assert (await client.status("s")).next_offset == 1  # type: ignore[union-attr]
    assert len(refusals(caplog)) >= 1


def test_the_default_max_connections_follows_max_sessions_and_the_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))
        if min(hard, 20_000) - FD_RESERVE >= 11_000:
            # Sessions, plus a tenth for handshakes and resumes in progress.
            assert default_max_connections(DEFAULT_MAX_SESSIONS) == 11_000
        assert default_max_connections(2) == 12
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        # Within the descriptors the process may open, some left for the rest.
        assert default_max_connections() == 256 - FD_RESERVE
        assert default_max_connections(DEFAULT_MAX_SESSIONS) == 256 - FD_RESERVE
        resource.setrlimit(resource.RLIMIT_NOFILE, (20, hard))
        assert default_max_connections() == 10
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_every_server_takes_the_default_max_connections(tmp_path: Path) -> None:
    async with (
        serve(echo, "127.0.0.1", 0, codec=CODEC) as plain,
        serve_resumable(echo_session, "127.0.0.1", 0, max_sessions=50) as sessions,
        hub.serve_hub_unix(tmp_path / "hub.sock") as hub_server,
    ):
        assert plain.max_connections == default_max_connections()
        assert sessions.max_connections == default_max_connections(50) == 60
        assert hub_server.max_connections == default_max_connections(DEFAULT_MAX_SESSIONS)


@pytest.mark.parametrize("bad", [0, -1])
async def test_max_connections_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=f"max_connections must be >= 1, not {bad}"):
        serve(echo, "127.0.0.1", 0, codec=CODEC, max_connections=bad)
    with pytest.raises(ValueError, match=f"max_connections must be >= 1, not {bad}"):
        serve_resumable(echo_session, "127.0.0.1", 0, max_connections=bad)


# -- before the session handshake ---------------------------------------------------------


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise EndOfStream(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


@asynccontextmanager
async def after_prefaces(port: int) -> AsyncIterator[socket.socket]:
    """A raw connection to a session server, past both prefaces: next comes the hello."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, make_preface())
        await recv_exactly(sock, PREFACE_SIZE + NONCE_SIZE)
        yield sock


async def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server ends the connection within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_connections_that_never_finish_a_hello_hold_almost_no_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ten connections each announce a 4 MiB hello and send all of it but one byte."""
    loop = asyncio.get_running_loop()
    body = bytes(4 * 1024 * 1024)  # allocated before tracing starts: the attacker's, not ours
    # Captured log records would keep each failed handshake's objects alive.
    caplog.set_level(logging.ERROR, logger="streamkit.session")

    async def attack(port: int) -> bool:
        async with after_prefaces(port) as sock:
            await loop.sock_sendall(sock, struct.pack(">I", len(body)))
            with contextlib.suppress(ConnectionError):
                await loop.sock_sendall(sock, memoryview(body)[:-1])  # no copy of it here
            return await closed_by_server(sock, within=2)

    async with serve_resumable(
        echo_session, "127.0.0.1", 0, max_sessions=2, handshake_timeout=20
    ) as server:
        tracing = tracemalloc.is_tracing()  # already, under PYTHONTRACEMALLOC
        if not tracing:
            tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            closed = await asyncio.gather(*(attack(server.port) for _ in range(10)))
            gc.collect()  # what a failed handshake leaves is garbage, not held
            held, peak = (size - before for size in tracemalloc.get_traced_memory())
        finally:
            if not tracing:
                tracemalloc.stop()
        # Before the hello limit, each of them held its 4 MiB until handshake_timeout.
        assert held < 256 * 1024, f"the server holds {held} bytes for ten unfinished hellos"
        assert peak < 8 * 1024 * 1024, f"the server held up to {peak} bytes"
        assert closed == [True] * 10
        async with connect_resumable("127.0.0.1", server.port) as session:  # still serving
            await session.send(b"after the attack")
            assert await session.recv(timeout=5) == b"after the attack"


async def test_the_hello_limit_is_checked_on_the_length_header_at_its_edge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve_resumable(echo_session, "127.0.0.1", 0, handshake_timeout=20) as server:
        loop = asyncio.get_running_loop()
        # One byte over: closed on the header alone, no body sent at all.
        async with after_prefaces(server.port) as sock:
            await loop.sock_sendall(sock, struct.pack(">I", MAX_HANDSHAKE_MESSAGE + 1))
            assert await closed_by_server(sock, within=5)
        [line] = [r.getMessage() for r in caplog.records if "first message" in r.getMessage()]
        assert (
            f"the client's first message is over the {MAX_HANDSHAKE_MESSAGE} bytes a connection "
            "may send before its handshake completes (frame of 1025 bytes exceeds "
            "max_frame=1024); closed before reading it"
        ) in line
        # At the limit: the server waits for the body and reads it (not a hello: closed).
        async with after_prefaces(server.port) as sock:
            await loop.sock_sendall(sock, struct.pack(">I", MAX_HANDSHAKE_MESSAGE))
            assert not await closed_by_server(sock, within=0.2)
            await loop.sock_sendall(sock, bytes([MessageType.HELLO_NEW]) * MAX_HANDSHAKE_MESSAGE)
            assert await closed_by_server(sock, within=5)
        assert "malformed HELLO_NEW message: 1024 bytes" in caplog.records[-1].getMessage()
