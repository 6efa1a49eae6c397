"""Connection scale: thousands of idle connections on one serve(), then one echo each.

    python benchmarks/bench_scale.py [--connections 5000]

The server runs in a second process and reports its resident memory before
and after the clients connect (from /proc/self/status), so the memory per
connection is the server's, streamkit's ``FramedStream`` and handler task
included. The clients then send one 64 B frame on every connection at once
and wait for every echo: the time for that round is printed. The same is
done with a naive asyncio echo server (``start_server`` + ``readexactly``)
as the baseline, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import sys
import time
from multiprocessing.connection import Connection

from streamkit import FramedStream, LengthPrefixed, serve

PAYLOAD = b"s" * 64
FRAME = len(PAYLOAD).to_bytes(4, "big") + PAYLOAD


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _streamkit_echo(stream: FramedStream[bytes]) -> None:
    async for frame in stream:
        await stream.send(frame)


async def _naive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(4)
            writer.write(header + await reader.readexactly(int.from_bytes(header, "big")))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _server(kind: str, pipe: Connection) -> None:
    async def main() -> None:
        if kind == "streamkit":
            server = await serve(
                _streamkit_echo, "127.0.0.1", 0, codec=LengthPrefixed(), backlog=4096
            )
            port = server.port
        else:
            naive = await asyncio.start_server(_naive_echo, "127.0.0.1", 0, backlog=4096)
            port = naive.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        pipe.send((port, _rss_kib()))
        await loop.run_in_executor(None, pipe.recv)  # the clients are connected
        pipe.send(_rss_kib())
        await loop.run_in_executor(None, pipe.recv)  # done

    asyncio.run(main())


async def _clients(port: int, count: int, pipe: Connection) -> tuple[float, float]:
    start = time.perf_counter()
    connections = []
    for _ in range(count):
        connections.append(await asyncio.open_connection("127.0.0.1", port))
    connect_seconds = time.perf_counter() - start
    await asyncio.sleep(0.5)  # let the server accept and start every handler
    loop = asyncio.get_running_loop()
    pipe.send("connected")
    await loop.run_in_executor(None, pipe.poll, 30)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(FRAME)
        assert await reader.readexactly(len(FRAME)) == FRAME

    start = time.perf_counter()
    await asyncio.gather(*(echo(reader, writer) for reader, writer in connections))
    round_seconds = time.perf_counter() - start
    for _, writer in connections:
        writer.close()
    return connect_seconds, round_seconds


def _run(kind: str, count: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_server, args=(kind, theirs))
    process.start()
    try:
        port, rss_before = ours.recv()
        connect_s, round_s = asyncio.run(_clients(port, count, ours))
        rss_after = ours.recv()
        ours.send("done")
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return {
        "connect_s": connect_s,
        "round_s": round_s,
        "kib_per_connection": (rss_after - rss_before) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.connections + 100
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    if min(needed, hard) < needed:
        print(f"the open-file limit ({hard}) allows fewer connections than asked")
        args.connections = hard - 100
    print(f"{args.connections} idle connections on one server, then one 64 B echo on each")
    print(f"{'server':<11}{'connect s':>10}{'echo round s':>14}{'KiB/conn':>10}")
    for kind in ("naive", "streamkit"):
        result = _run(kind, args.connections)
        print(
            f"{kind:<11}{result['connect_s']:>10.2f}{result['round_s']:>14.3f}"
            f"{result['kib_per_connection']:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
