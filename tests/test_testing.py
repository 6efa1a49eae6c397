"""The fault-injecting proxy, over real loopback and Unix sockets."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from streamkit.session import Backoff, ServerSession, connect_resumable, serve_resumable
from streamkit.testing import FaultProxy

FAST = {
    "keepalive_interval": 0.1,
    "keepalive_timeout": 0.3,
    "ack_delay": 0.002,
    "ack_every": 8,
    "reconnect_backoff": Backoff(initial=0.002, maximum=0.02),
    "handshake_timeout": 0.5,
}


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"<eof>")  # the half-close came through
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def echo_behind_proxy(**options: object) -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FaultProxy("127.0.0.1", port, **options) as proxy:  # type: ignore[arg-type]
            yield proxy
    finally:
        server.close()
        await server.wait_closed()


async def test_forwards_bytes_exactly_both_ways_and_passes_the_half_close_on() -> None:
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    async with echo_behind_proxy() as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)

        async def write() -> None:
            for start in range(0, len(data), 100_000):
                writer.write(data[start : start + 100_000])
                await writer.drain()
            writer.write_eof()

        writing = asyncio.create_task(write())
        assert await reader.readexactly(len(data)) == data
        assert await reader.read() == b"<eof>"
        await writing
        writer.close()
        assert proxy.stats.connections == 1
        assert proxy.stats.bytes_up == len(data)
        assert proxy.stats.bytes_down == len(data) + len(b"<eof>")
        assert proxy.stats.cuts == 0


async def test_cut_aborts_every_connection_and_new_ones_still_work() -> None:
    async with echo_behind_proxy() as proxy:
        pairs = [await asyncio.open_connection(*proxy.address) for _ in range(3)]
        for reader, writer in pairs:  # every link is up
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        assert proxy.cut() == 3
        for reader, writer in pairs:
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)
            writer.close()
        assert (proxy.stats.cuts, proxy.connections) == (3, 0)
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()


async def test_random_cuts_tear_frames_in_the_middle() -> None:
    """With cut_every, some connections die with half a frame delivered."""
    received: list[int] = []
    ended = asyncio.Queue[None]()

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        try:
            while data := await reader.read(65536):
                total += len(data)
        except OSError:
            pass
        received.append(total)
        writer.close()
        ended.put_nowait(None)

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    frame = b"f" * 100
    async with server, FaultProxy("127.0.0.1", port, seed=3) as proxy:
        proxy.cut_every(0.005, jitter=0.5)
        for _ in range(200):
            if any(total % len(frame) for total in received):
                break
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                while not reader.at_eof():
                    writer.write(frame)
                    await writer.drain()
                    await asyncio.sleep(0)
            except OSError:
                pass
            writer.close()
            await ended.get()
        assert proxy.stats.cuts > 0
        assert any(total % len(frame) for total in received), received


async def test_blackhole_swallows_traffic_but_keeps_the_connection_open() -> None:
    async with echo_behind_proxy() as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        proxy.blackhole()
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.2)
        assert not reader.at_eof() and proxy.connections == 1
        proxy.restore()
        writer.write(b"found")
        assert await reader.readexactly(5) == b"found"
        assert proxy.stats.bytes_dropped == len(b"lost")
        writer.close()


async def test_delay_holds_each_chunk() -> None:
    async with echo_behind_proxy(delay=0.05) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        start = time.monotonic()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert time.monotonic() - start >= 0.09  # held once each way
        writer.close()


async def test_unix_socket_target(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    server = await asyncio.start_unix_server(echo, path)
    async with server, FaultProxy(target_unix=path) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"over unix")
        assert await reader.readexactly(9) == b"over unix"
        writer.close()


async def test_unreachable_target_closes_the_client_connection() -> None:
    probe = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()


def proxy_tasks() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.startswith("FaultProxy.")  # type: ignore[union-attr]
    ]


async def test_close_stops_listening_and_every_task() -> None:
    async with echo_behind_proxy() as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"up")
        assert await reader.readexactly(2) == b"up"
        proxy.cut_every(10)
        assert proxy_tasks()  # the connection's and the cutter's
        address = proxy.address
    assert proxy_tasks() == []
    assert await reader.read() == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*address)


def test_constructor_needs_one_target() -> None:
    with pytest.raises(ValueError, match="target_host and target_port, or target_unix"):
        FaultProxy()
    with pytest.raises(ValueError, match="target_host and target_port, or target_unix"):
        FaultProxy("127.0.0.1", 1, target_unix="/tmp/x")


# -- sessions through the proxy -------------------------------------------------


async def test_session_is_exactly_once_through_random_mid_frame_cuts() -> None:
    """Echo through a proxy that tears frames both ways: nothing lost, nothing twice."""
    rng = random.Random(2026)
    server_got: list[bytes] = []

    async def echo_session(session: ServerSession) -> None:
        async for payload in session:
            server_got.append(payload)
            await session.send(payload)

    async with (
        await serve_resumable(echo_session, "127.0.0.1", 0, **FAST) as server,
        FaultProxy("127.0.0.1", server.port, seed=11) as proxy,
        connect_resumable("127.0.0.1", proxy.port, max_unacked_frames=128, **FAST) as session,
    ):
        proxy.cut_every(0.01)
        sent: list[bytes] = []

        async def send_until_cut_enough() -> None:
            while proxy.stats.cuts < 40 or len(sent) < 1000:
                payload = rng.randbytes(rng.randint(0, 2000))
                sent.append(payload)
                await session.send(payload)

        sending = asyncio.create_task(send_until_cut_enough())
        echoed = []
        while not sending.done() or len(echoed) < len(sent):
            echoed.append(await session.recv())
        await sending
        proxy.stop_cutting()
    assert server_got == sent
    assert echoed == sent
    assert session.stats.reconnects >= 20


async def test_keepalive_recovers_a_session_from_a_blackhole() -> None:
    async def echo_session(session: ServerSession) -> None:
        async for payload in session:
            await session.send(payload)

    async with (
        await serve_resumable(echo_session, "127.0.0.1", 0, **FAST) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        await session.send(b"before")
        assert await session.recv() == b"before"
        proxy.blackhole()
        await session.send(b"during")
        await asyncio.sleep(0.5)  # past keepalive_timeout: the client gives up the link
        proxy.restore()
        assert await session.recv(timeout=5) == b"during"
        assert session.stats.reconnects >= 1
