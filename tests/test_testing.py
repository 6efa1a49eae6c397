"""The fault-injecting proxy, over real loopback and Unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest

from streamkit.session import (
    Backoff,
    ServerSession,
    SessionSettings,
    connect_resumable,
    serve_resumable,
)
from streamkit.testing import Direction, FaultProxy, main
from tests._pairs import HAS_IPV6

FAST = SessionSettings(
    keepalive_interval=0.1,
    keepalive_timeout=0.3,
    ack_delay=0.002,
    ack_every=8,
    reconnect_backoff=Backoff(initial=0.002, maximum=0.02),
    handshake_timeout=0.5,
)


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


class Collector:
    """A server that records what each connection received and how it ended."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.chunks = asyncio.Queue[bytes]()  # as they arrive, from every connection
        self.ended = asyncio.Queue[bytes]()  # all a connection received, when it ends
        self.writers: list[asyncio.StreamWriter] = []
        self.send_on_connect = b""

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        data = bytearray()
        try:
            if self.send_on_connect:
                writer.write(self.send_on_connect)
                await writer.drain()
            while chunk := await reader.read(65536):
                self.chunks.put_nowait(chunk)
                data += chunk
        except OSError:
            pass
        self.received.append(bytes(data))
        writer.close()
        self.ended.put_nowait(bytes(data))


async def read_until_dead(reader: asyncio.StreamReader) -> bytes:
    """Everything the connection delivers until it ends, by a reset or a FIN."""
    data = bytearray()
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except OSError:
        pass
    return bytes(data)


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


async def test_a_slow_reader_stops_the_proxy_reading_from_the_writer() -> None:
    """Flow control: the proxy buffers a bounded amount for a client that does not read."""
    collector = Collector()
    collector.send_on_connect = b"x" * (64 * 1024 * 1024)  # far more than any buffer
    server = await asyncio.start_server(collector, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        previous = -1
        while proxy.stats.bytes_down != previous:  # until the proxy stops forwarding
            previous = proxy.stats.bytes_down
            await asyncio.sleep(0.05)
        # Kernel socket buffers and the proxy's own chunks, not the 64 MiB.
        assert proxy.stats.bytes_down < 32 * 1024 * 1024
        assert len(await reader.readexactly(1024 * 1024)) == 1024 * 1024
        writer.close()


async def test_cut_aborts_every_connection_and_new_ones_still_work() -> None:
    async with echo_behind_proxy() as proxy:
        pairs = [await asyncio.open_connection(*proxy.address) for _ in range(3)]
        for reader, writer in pairs:  # every link is up
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        assert proxy.open_connections == 3
        assert proxy.cut() == 3
        for reader, writer in pairs:
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)
            writer.close()
        assert (proxy.stats.cuts, proxy.open_connections) == (3, 0)
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()
        assert proxy.stats.connections == 4


async def test_cut_after_tears_a_frame_going_up() -> None:
    collector = Collector()
    server = await asyncio.start_server(collector, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"a" * 10)
        assert await collector.chunks.get() == b"a" * 10  # through whole, before the cut
        assert proxy.cut_after(35, "up") == 1
        writer.write(b"b" * 20)  # forwarded whole: 15 to go
        await asyncio.sleep(0.01)
        writer.write(b"c" * 100)  # a frame the cut tears after 15 bytes
        assert await collector.ended.get() == b"a" * 10 + b"b" * 20 + b"c" * 15
        assert await read_until_dead(reader) == b""
        writer.close()
        assert (proxy.stats.cuts, proxy.stats.bytes_up) == (1, 45)


async def test_cut_after_tears_a_frame_going_down() -> None:
    collector = Collector()
    server = await asyncio.start_server(collector, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"hi")
        assert await collector.chunks.get() == b"hi"  # the link is up
        assert proxy.cut_after(123, "down") == 1
        collector.writers[0].write(b"d" * 1000)
        assert await read_until_dead(reader) == b"d" * 123
        assert await collector.ended.get() == b"hi"
        writer.close()
        assert proxy.stats.cuts == 1


def test_cut_after_checks_its_arguments() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError, match="nbytes=0 must be >= 1"):
        proxy.cut_after(0, "up")
    with pytest.raises(ValueError, match="direction='sideways' must be 'up' or 'down'"):
        proxy.cut_after(1, "sideways")  # type: ignore[arg-type]


async def test_random_cuts_tear_frames_in_the_middle() -> None:
    """With cut_every, some connections die with part of a frame delivered."""
    collector = Collector()
    server = await asyncio.start_server(collector, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    frame = b"f" * 100
    async with server, FaultProxy("127.0.0.1", port, seed=3) as proxy:
        proxy.cut_every(0.005, jitter=0.5)
        for _ in range(200):
            if any(len(data) % len(frame) for data in collector.received):
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
            await collector.ended.get()
        assert proxy.stats.cuts > 0
        assert any(len(data) % len(frame) for data in collector.received)


@pytest.mark.timeout(10)
async def test_wait_closed_right_after_a_task_of_the_proxy_ended_returns() -> None:
    # The stopped cutter ends in the step before close(), and its
    # done-callback (which forgets it) runs after this task's next step.
    # On 3.12+, gather() of a done task returns without yielding, so a
    # wait_closed() that looped on it never let that callback run.
    proxy = await FaultProxy("127.0.0.1", 1).start()
    proxy.cut_every(10)
    proxy.stop_cutting()
    await asyncio.sleep(0)  # the cancelled cutter ends meanwhile
    proxy.close()
    await proxy.wait_closed()
    assert proxy.open_connections == 0


@pytest.mark.parametrize("turns", range(8))
async def test_a_connection_accepted_around_close_is_closed_with_the_proxy(turns: int) -> None:
    """However many loop turns pass between a connect and close(), the
    connection's socket is closed, never leaked (the warning filters make a
    leak an error): one the loop accepted just before close() is handed
    over first, then cut (CPython gh-109564)."""
    # The target never accepts: the proxy's connects to it wait in its backlog.
    with socket.create_server(("127.0.0.1", 0)) as target:
        proxy = await FaultProxy("127.0.0.1", target.getsockname()[1]).start()
        # A blocking connect: on loopback the kernel completes it at once, and
        # the event loop accepts it on one of its next turns.
        with socket.create_connection(proxy.address, timeout=5) as client:
            for _ in range(turns):
                await asyncio.sleep(0)
            proxy.close()
            async with asyncio.timeout(10):
                await proxy.wait_closed()
            assert proxy.open_connections == 0
            client.setblocking(False)
            with contextlib.suppress(ConnectionResetError):  # cut, or never accepted
                async with asyncio.timeout(5):
                    assert await asyncio.get_running_loop().sock_recv(client, 1) == b""


@pytest.mark.parametrize("turns", range(3))
def test_a_connection_handed_over_as_the_proxy_closes_is_closed_before_the_loop_ends(
    turns: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection the loop hands over in the same step as close() is cut
    before ``wait_closed()`` returns, not left to a task that the loop's
    shutdown cancels before it starts (on 3.11, asyncio then logs an error
    and leaks the connection)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as target:
            proxy = await FaultProxy("127.0.0.1", target.getsockname()[1]).start()
            wake, woken = socket.socketpair()
            with wake, woken, socket.create_connection(proxy.address, timeout=5):
                # The listener is ready first, then `woken`: one select reports
                # both, so this task resumes just after the loop accepted.
                ready = loop.create_future()
                loop.add_reader(woken.fileno(), ready.set_result, None)
                wake.send(b"x")
                await ready
                loop.remove_reader(woken.fileno())
                proxy.close()
                for _ in range(turns):
                    await asyncio.sleep(0)
                await proxy.wait_closed()

    asyncio.run(scenario())  # the loop's end is part of the case
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_cut_every_checks_its_arguments() -> None:
    async with echo_behind_proxy() as proxy:
        with pytest.raises(ValueError, match=r"interval > 0 and 0 <= jitter <= 1, not 0, 0\.5"):
            proxy.cut_every(0)
        with pytest.raises(ValueError, match=r"not 1, 1\.5"):
            proxy.cut_every(1, jitter=1.5)


async def test_blackhole_holds_traffic_with_the_connection_open_and_restore_delivers_it() -> None:
    async with echo_behind_proxy() as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        proxy.blackhole()
        assert proxy.blackholed
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.1)
        assert not reader.at_eof() and proxy.open_connections == 1
        assert proxy.stats.bytes_up == 6  # nothing went through
        proxy.restore()
        writer.write(b" then after")
        # Nothing was lost: the byte stream is the one a real TCP link carries.
        assert await reader.readexactly(15) == b"held then after"
        writer.close()


async def test_a_one_way_blackhole_holds_only_that_direction() -> None:
    async with echo_behind_proxy() as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        proxy.blackhole("down")
        assert proxy.blackholed
        writer.write(b"ping")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.1)
        # It reached the server; its echo is held.
        assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == (4, 0)
        proxy.restore()
        assert await reader.readexactly(4) == b"ping"
        proxy.blackhole("up")
        writer.write(b"pong")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.1)
        assert proxy.stats.bytes_up == 4  # held before the server
        proxy.restore()
        assert not proxy.blackholed
        assert await reader.readexactly(4) == b"pong"
        with pytest.raises(ValueError, match="direction must be 'up', 'down' or None"):
            proxy.blackhole(cast(Direction, "sideways"))  # not a direction
        writer.close()


async def test_blackhole_holds_the_end_of_stream_too() -> None:
    async with echo_behind_proxy() as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"up")
        assert await reader.readexactly(2) == b"up"
        proxy.blackhole()
        writer.write_eof()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(), 0.1)
        proxy.restore()
        assert await reader.read() == b"<eof>"
        writer.close()


async def test_delay_holds_each_chunk() -> None:
    async with echo_behind_proxy(delay=0.1) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        start = time.monotonic()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert time.monotonic() - start >= 0.19  # held once each way
        proxy.delay = 0
        start = time.monotonic()
        writer.write(b"y")
        assert await reader.readexactly(1) == b"y"
        assert time.monotonic() - start < 0.1
        writer.close()


def test_constructor_needs_one_target_and_a_sane_delay() -> None:
    with pytest.raises(ValueError, match="target_host and target_port, or target_unix"):
        FaultProxy()
    with pytest.raises(ValueError, match="target_host and target_port, or target_unix"):
        FaultProxy("127.0.0.1", 1, target_unix="/tmp/x")
    with pytest.raises(ValueError, match="delay=-1 must be >= 0"):
        FaultProxy("127.0.0.1", 1, delay=-1)
    with pytest.raises(RuntimeError, match="not started"):
        FaultProxy("127.0.0.1", 1).port  # noqa: B018


async def test_unix_socket_target_and_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    server = await asyncio.start_unix_server(echo, path)
    async with server, FaultProxy(target_unix=path) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"over unix")
        assert await reader.readexactly(9) == b"over unix"
        writer.close()
    proxy_path = str(tmp_path / "proxy.sock")
    server = await asyncio.start_unix_server(echo, path)
    async with server, await FaultProxy(target_unix=path).start_unix(proxy_path) as proxy:
        with pytest.raises(RuntimeError, match="Unix socket"):
            proxy.port  # noqa: B018
        reader, writer = await asyncio.open_unix_connection(proxy_path)
        writer.write(b"unix to unix")
        assert await reader.readexactly(12) == b"unix to unix"
        assert proxy.cut() == 1
        assert await read_until_dead(reader) == b""
        writer.close()


async def test_unreachable_target_closes_the_client_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
    assert "proxy could not reach its target" in caplog.text


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
        idle_reader, idle_writer = await asyncio.open_connection(*proxy.address)
        proxy.blackhole()  # a connection waiting on the black hole ends too
        writer.write(b"held")
        proxy.cut_every(10)
        proxy.stop_cutting()
        proxy.cut_every(10)
        assert proxy_tasks()  # the connections' and the cutters'
        address = proxy.address
    assert proxy_tasks() == []
    assert proxy.stats.cuts == 0  # closing is not a cut
    for conn_reader, conn_writer in ((reader, writer), (idle_reader, idle_writer)):
        assert await read_until_dead(conn_reader) == b""
        conn_writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*address)


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
        await serve_resumable(echo_session, "127.0.0.1", 0, settings=FAST) as server,
        FaultProxy("127.0.0.1", server.port, seed=11) as proxy,
        connect_resumable(
            "127.0.0.1", proxy.port, settings=FAST, max_unacked_frames=128
        ) as session,
    ):
        proxy.cut_every(0.01)
        sent: list[bytes] = []

        async def send_until_cut_enough() -> None:
            while proxy.stats.cuts < 40 or len(sent) < 1000:
                payload = rng.randbytes(rng.randint(0, 2000))
                sent.append(payload)
                await session.send(payload)

        sending = asyncio.create_task(send_until_cut_enough())
        echoed: list[bytes] = []
        while not sending.done() or len(echoed) < len(sent):
            echoed.append(await session.recv())
        await sending
        proxy.stop_cutting()
    assert server_got == sent
    assert echoed == sent
    assert session.stats.reconnects >= 20


# -- the command line -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "one of the arguments --target --target-unix is required"),
        (["--target", "nowhere"], "'nowhere' is not [HOST:]PORT"),
        (["--target", "127.0.0.1:70000"], "'127.0.0.1:70000' is not [HOST:]PORT"),
        (["--target", "127.0.0.1:1", "--target-unix", "/tmp/x"], "not allowed with"),
        (["--target", "127.0.0.1:1", "--listen", "x:y"], "'x:y' is not [HOST:]PORT"),
        (["--target", "127.0.0.1:1", "--cut-every", "0"], "--cut-every must be > 0"),
        (["--target", "127.0.0.1:1", "--cut-every", "often"], "'often' is not a number"),
        (["--target", "127.0.0.1:1", "--jitter", "2"], "--jitter must be between 0 and 1"),
        (["--target", "127.0.0.1:1", "--delay", "-1"], "'-1' is not a number of seconds"),
        (["--target", "127.0.0.1:1", "--duration", "0"], "--duration must be > 0"),
        (["--target", "127.0.0.1:1", "--seed", "x"], "invalid int value: 'x'"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m streamkit proxy: error: ")
    assert message in error


def test_cli_runs_for_a_duration_and_reports_a_port_in_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--target", "127.0.0.1:1", "--duration", "0.05"]) == 0
    assert capsys.readouterr().out.startswith("proxy on 127.0.0.1:")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--listen", str(port), "--target", "127.0.0.1:1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("proxy: ") and "\n" not in error


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_cli_writes_ipv6_addresses_as_it_reads_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--listen", "[::1]:0", "--target", "[::1]:9", "--duration", "0.05"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("proxy on [::1]:") and line.endswith(" -> [::1]:9\n")


def test_cli_forwards_and_logs_cuts_until_interrupted() -> None:
    async def serve_and_use() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        code = "import sys; from streamkit.testing import main; sys.exit(main(sys.argv[1:]))"
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-c", code, "--target", f"127.0.0.1:{port}"],
            *["--cut-every", "0.05", "--seed", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        async with server:
            line = (await process.stdout.readline()).decode()
            assert line.startswith("proxy on 127.0.0.1:")
            assert line.endswith(f"-> 127.0.0.1:{port}\n")
            proxy_port = int(line.split()[2].rsplit(":", 1)[1])
            while True:  # until an echo beats the next cut
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                writer.write(b"through the cli")
                echoed = await read_until_dead(reader)  # the proxy cuts it soon
                writer.close()
                assert b"through the cli".startswith(echoed)
                if echoed:
                    break
            process.send_signal(signal.SIGINT)
            stderr = (await process.stderr.read()).decode()
            assert await process.wait() == 0
        assert "cut a connection" in stderr
        stopped = re.search(r"proxy stopped: (\d+) connections, (\d+) cuts", stderr)
        assert stopped is not None, stderr
        assert int(stopped[1]) == int(stopped[2]) >= 1
        assert "Traceback" not in stderr

    asyncio.run(asyncio.wait_for(serve_and_use(), 30))
