"""The round-robin test balancer, over real loopback and Unix sockets."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from streamkit.testing import Balancer, BalancerStats, Target


class Replica:
    """A server that greets each connection with its name, then echoes (and echoes a FIN)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.Server | None = None

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.name.encode() + b"\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"<eof>")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def start(self, unix: Path | None = None) -> Target:
        if unix is not None:
            self.server = await asyncio.start_unix_server(self, str(unix))
            return str(unix)
        self.server = await asyncio.start_server(self, "127.0.0.1", 0)
        return "127.0.0.1", self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@asynccontextmanager
async def replicas(count: int) -> AsyncIterator[tuple[list[Replica], list[Target]]]:
    async with AsyncExitStack() as stack:
        servers = [Replica(f"r{n}") for n in range(count)]
        targets = []
        for server in servers:
            targets.append(await server.start())
            stack.push_async_callback(server.stop)
        yield servers, targets


async def greeted(balancer: Balancer) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect through ``balancer``; the name of the replica that answered, and the streams."""
    reader, writer = await asyncio.open_connection(*balancer.address)
    name = (await reader.readline()).decode().strip()
    return name, reader, writer


async def test_connections_go_round_robin_and_carry_bytes_exactly() -> None:
    async with replicas(3) as (_, targets), Balancer(targets) as balancer:
        links = [await greeted(balancer) for _ in range(6)]
        assert [name for name, _, _ in links] == ["r0", "r1", "r2", "r0", "r1", "r2"]
        assert [balancer.connections_to(n) for n in range(3)] == [2, 2, 2]
        data = random.Random(3).randbytes(1024 * 1024 + 7)
        _, reader, writer = links[4]
        writer.write(data)
        writer.write_eof()
        assert await reader.readexactly(len(data)) == data
        assert await reader.read() == b"<eof>"  # the half-close went through
        for _, _, other in links:
            other.close()
        stats = balancer.stats
        assert isinstance(stats, BalancerStats)
        assert (stats.connections, stats.forwarded, stats.cuts) == (6, [2, 2, 2], 0)
        assert stats.bytes_up == len(data)
        assert stats.bytes_down == len(data) + 6 * 3 + len(b"<eof>")


async def test_kill_cuts_a_targets_connections_and_skips_it_until_restored() -> None:
    async with replicas(2) as (_, targets), Balancer(targets) as balancer:
        on_0, reader_0, writer_0 = await greeted(balancer)
        on_1, reader_1, writer_1 = await greeted(balancer)
        assert (on_0, on_1) == ("r0", "r1")
        assert balancer.kill(0) == 1
        assert balancer.killed == {0}
        assert await reader_0.read() == b""  # cut: nothing more comes
        writer_1.write(b"still here")
        assert await reader_1.readexactly(10) == b"still here"  # the other lives on
        skipping = [await greeted(balancer) for _ in range(3)]
        assert [name for name, _, _ in skipping] == ["r1", "r1", "r1"]
        balancer.restore(0)
        restored = [await greeted(balancer) for _ in range(2)]
        assert {name for name, _, _ in restored} == {"r0", "r1"}
        assert balancer.stats.cuts == 1
        assert (balancer.connections_to(0), balancer.connections_to(1)) == (1, 5)
        for _, _, writer in [*skipping, *restored]:
            writer.close()
        for writer in (writer_0, writer_1):
            writer.close()


async def test_an_unreachable_target_is_skipped_and_none_left_closes_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with replicas(2) as (servers, targets), Balancer(targets) as balancer:
        await servers[0].stop()
        links = [await greeted(balancer) for _ in range(3)]
        assert [name for name, _, _ in links] == ["r1", "r1", "r1"]
        assert balancer.stats.unreachable >= 1
        for _, _, link in links:
            link.close()
        balancer.kill(1)
        with caplog.at_level(logging.WARNING, "streamkit.testing"):
            reader, writer = await asyncio.open_connection(*balancer.address)
            assert await reader.read() == b""
            writer.close()
        assert "balancer could not reach any target" in caplog.text
        assert "target 0: ConnectionRefusedError" in caplog.text


async def test_cut_aborts_every_connection_and_new_ones_still_work() -> None:
    async with replicas(2) as (_, targets), Balancer(targets) as balancer:
        links = [await greeted(balancer) for _ in range(4)]
        assert balancer.cut() == 4 and balancer.open_connections == 0
        for _, reader, writer in links:
            assert await reader.read() == b""
            writer.close()
        name, _, writer = await greeted(balancer)
        assert name == "r0"
        writer.close()
        assert balancer.stats.cuts == 4


async def test_unix_socket_listener_and_targets(tmp_path: Path) -> None:
    replica = Replica("unix")
    target = await replica.start(tmp_path / "replica.sock")
    try:
        async with Balancer([target]) as balancer:
            pass
        balancer = await Balancer([target]).start_unix(str(tmp_path / "balancer.sock"))
        async with balancer:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "balancer.sock"))
            assert await reader.readline() == b"unix\n"
            writer.close()
            with pytest.raises(RuntimeError, match="Unix socket"):
                balancer.port  # noqa: B018
    finally:
        await replica.stop()


async def test_close_cuts_everything_and_ends_every_task() -> None:
    async with replicas(2) as (_, targets):
        balancer = await Balancer(targets).start()
        address = balancer.address
        links = [await greeted(balancer) for _ in range(3)]
        balancer.close()
        await asyncio.wait_for(balancer.wait_closed(), 5)
        for _, reader, writer in links:
            assert await reader.read() == b""
            writer.close()
        assert balancer.stats.cuts == 0  # closing is not cutting
        with pytest.raises(OSError):
            await asyncio.open_connection(*address)
        with pytest.raises(RuntimeError, match="Balancer is closed"):
            balancer.port  # noqa: B018


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one target"):
        Balancer([])
    with pytest.raises(ValueError, match="a target is"):
        Balancer([("127.0.0.1", "80")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="connect_timeout"):
        Balancer(["/tmp/x.sock"], connect_timeout=0)
    balancer = Balancer([("127.0.0.1", 1), "/tmp/x.sock"])
    for call in (balancer.kill, balancer.restore, balancer.connections_to):
        with pytest.raises(IndexError, match="target 2 out of range: the balancer has 2"):
            call(2)
    with pytest.raises(RuntimeError, match="not started"):
        balancer.port  # noqa: B018
