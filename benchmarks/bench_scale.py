"""Connection scale: thousands of idle connections on one serve(), then one echo each.

    python benchmarks/bench_scale.py [--connections 5000] [--json PATH]

The server runs in a second process. Once it has a handler running for
every connection, it reports its resident memory (VmRSS in /proc/self/status,
after a garbage collection) against what it used before the clients came,
so the memory per connection is the server's: transport, StreamReader,
FramedStream and handler task. The clients then send one 64 B frame on
every connection at once and wait for every echo: the time for that round
is printed. The same is done with a naive asyncio echo server
(``start_server`` + ``readexactly``) as the baseline, in the same run.

Each side needs a file descriptor per connection: the soft open-file limit
is raised up to the hard limit; if that is still too low, the run uses
fewer connections and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import resource
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from _harness import receive_from_child

from streamkit import FramedStream, LengthPrefixed, serve

PAYLOAD = b"s" * 64
FRAME = len(PAYLOAD).to_bytes(4, "big") + PAYLOAD
#: File descriptors besides the connections (stdio, pipes, the listener, the loop).
SPARE_FDS = 64


def _rss_kib() -> int:
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, not current


def _server(kind: str, pipe: Connection) -> None:
    connected = 0
    expected = -1  # until the clients say how many they opened
    everyone: asyncio.Event

    def count_one() -> None:
        nonlocal connected
        connected += 1
        if connected == expected:
            everyone.set()

    async def streamkit_echo(stream: FramedStream[bytes]) -> None:
        count_one()
        async for frame in stream:
            await stream.send(frame)

    async def naive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count_one()
        try:
            while True:
                header = await reader.readexactly(4)
                writer.write(header + await reader.readexactly(int.from_bytes(header, "big")))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        nonlocal expected, everyone
        everyone = asyncio.Event()
        if kind == "streamkit":
            server = await serve(
                streamkit_echo, "127.0.0.1", 0, codec=LengthPrefixed(), backlog=4096
            )
            port = server.port
        else:
            naive = await asyncio.start_server(naive_echo, "127.0.0.1", 0, backlog=4096)
            port = naive.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        pipe.send((port, _rss_kib()))
        expected = await loop.run_in_executor(None, pipe.recv)  # the clients are connected
        if connected >= expected:
            everyone.set()
        with contextlib.suppress(TimeoutError):  # the client reports a shortfall
            await asyncio.wait_for(everyone.wait(), 30)
        pipe.send((connected, _rss_kib()))
        await loop.run_in_executor(None, pipe.recv)  # done

    asyncio.run(main())


async def _clients(port: int, count: int, pipe: Connection) -> tuple[float, float, int]:
    start = time.perf_counter()
    connections = []
    for _ in range(count):
        connections.append(await asyncio.open_connection("127.0.0.1", port))
    connect_seconds = time.perf_counter() - start
    loop = asyncio.get_running_loop()
    pipe.send(count)
    accepted, rss_after = await loop.run_in_executor(None, pipe.recv)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(FRAME)
        assert await reader.readexactly(len(FRAME)) == FRAME

    start = time.perf_counter()
    await asyncio.gather(*(echo(reader, writer) for reader, writer in connections))
    round_seconds = time.perf_counter() - start
    for _, writer in connections:
        writer.close()
    assert accepted == count, f"the server had {accepted} of {count} connections"
    return connect_seconds, round_seconds, rss_after


def _run(kind: str, count: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_server, args=(kind, theirs))
    process.start()
    theirs.close()  # the child's copy remains
    try:
        port, rss_before = receive_from_child(ours, process, "server")
        connect_s, round_s, rss_after = asyncio.run(_clients(port, count, ours))
        ours.send("done")
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return {
        "server": kind,
        "connections": count,
        "connect_s": connect_s,
        "echo_round_s": round_s,
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "kib_per_connection": (rss_after - rss_before) / count,
    }


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted``; return the connections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        soft = limit
    return soft - SPARE_FDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000, help="how many (5000)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    count = args.connections
    allowed = _raise_fd_limit(count + SPARE_FDS)
    if allowed < count:
        print(
            f"the open-file limit ({resource.getrlimit(resource.RLIMIT_NOFILE)[1]} hard) "
            f"allows {allowed} connections, not {count}: running with {allowed}"
        )
        count = allowed
    print(f"{count} idle connections on one server, then one 64 B echo on each")
    print(
        f"{'server':<11}{'connect s':>10}{'echo round s':>14}{'server RSS MiB':>16}{'KiB/conn':>10}"
    )
    rows = []
    for kind in ("naive", "streamkit"):
        row = _run(kind, count)
        rows.append(row)
        print(
            f"{kind:<11}{row['connect_s']:>10.2f}{row['echo_round_s']:>14.3f}"
            f"{row['server_rss_kib_after'] / 1024:>16.1f}{row['kib_per_connection']:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
