"""Resumable-session throughput against a plain FramedStream, in the same run.

    python benchmarks/bench_session.py [--quick] [--json PATH]

The receiver runs in a second process on loopback TCP; the client sends N
frames one way and the receiver answers once it has them all. Rows compare
a session with a plain ``FramedStream`` (``LengthPrefixed(4)``) for the
same payloads. Then a session streams numbered frames for a few seconds
through a ``FaultProxy`` (in the client's process) that cuts the connection
every 100 ms, often in the middle of a frame; the receiver checks that
every number arrives once and in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from typing import Any

from streamkit import FramedStream, LengthPrefixed, connect, serve
from streamkit.session import Backoff, ServerSession, connect_resumable, serve_resumable
from streamkit.testing import FaultProxy

SIZES = [16, 256, 4096, 65536]
DONE = b"done"


def _frames_for(size: int, quick: bool) -> int:
    budget = (8 if quick else 48) * 1024 * 1024  # bytes per run
    return max(200, min(100_000 if quick else 300_000, budget // max(size, 1)))


async def _plain_sink(count: int, port_out: Any) -> None:
    async def handler(stream: FramedStream[bytes]) -> None:
        for _ in range(count):
            await stream.recv()
        await stream.send(DONE)
        await stream.recv()  # until the client closes

    server = await serve(handler, "127.0.0.1", 0, codec=LengthPrefixed())
    port_out.send(server.port)
    await server.serve_forever()


async def _session_sink(count: int, port_out: Any) -> None:
    async def handler(session: ServerSession) -> None:
        for _ in range(count):
            await session.recv()
        await session.send(DONE)
        await session.recv()

    server = await serve_resumable(handler, "127.0.0.1", 0, resume_timeout=10)
    port_out.send(server.port)
    await server.serve_forever()


def _sink_main(kind: str, count: int, port_out: Any) -> None:
    sink = _plain_sink if kind == "plain" else _session_sink
    asyncio.run(sink(count, port_out))


def _start_sink(kind: str, count: int) -> tuple[multiprocessing.Process, int]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_sink_main, args=(kind, count, writer), daemon=True)
    process.start()
    return process, int(reader.recv())


async def _run_plain(port: int, payload: bytes, count: int) -> float:
    async with connect("127.0.0.1", port, codec=LengthPrefixed()) as stream:
        start = time.perf_counter()
        for _ in range(count):
            await stream.send(payload)
        assert await stream.recv() == DONE
        return time.perf_counter() - start


async def _run_session(port: int, payload: bytes, count: int) -> dict[str, Any]:
    async with connect_resumable("127.0.0.1", port) as session:
        start = time.perf_counter()
        for _ in range(count):
            await session.send(payload)
        assert await session.recv() == DONE
        return {"seconds": time.perf_counter() - start}


async def _verifying_sink(port_out: Any) -> None:
    """Receive numbered frames until DONE; answer how many, or what went wrong."""

    async def handler(session: ServerSession) -> None:
        expected = 0
        async for payload in session:
            if payload == DONE:
                break
            number = int.from_bytes(payload[:8], "big")
            if number != expected:
                await session.send(b"frame %d where %d was expected" % (number, expected))
                return
            expected += 1
        await session.send(b"%d" % expected)
        await session.recv()

    server = await serve_resumable(handler, "127.0.0.1", 0, resume_timeout=10)
    port_out.send(server.port)
    await server.serve_forever()


def _verifying_sink_main(port_out: Any) -> None:
    asyncio.run(_verifying_sink(port_out))


async def _run_with_cuts(port: int, size: int, seconds: float, cut_every: float) -> dict[str, Any]:
    settings = {"reconnect_backoff": Backoff(initial=0.002, maximum=0.05)}
    async with (
        FaultProxy("127.0.0.1", port, seed=1) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **settings) as session,  # type: ignore[arg-type]
    ):
        proxy.cut_every(cut_every)
        padding = b"x" * (size - 8)
        sent = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await session.send(sent.to_bytes(8, "big") + padding)
            sent += 1
        await session.send(DONE)
        answer = await session.recv(timeout=60)
        elapsed = time.perf_counter() - start
        proxy.stop_cutting()
        stats = session.stats
    assert answer == b"%d" % sent, answer
    return {
        "seconds": elapsed,
        "frames": sent,
        "frames_per_s": sent / elapsed,
        "cuts": proxy.stats.cuts,
        "reconnects": stats.reconnects,
        "replayed": stats.frames_replayed,
    }


def _measure_with_cuts(size: int, seconds: float, cut_every: float) -> dict[str, Any]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_verifying_sink_main, args=(writer,), daemon=True)
    process.start()
    try:
        return asyncio.run(_run_with_cuts(int(reader.recv()), size, seconds, cut_every))
    finally:
        process.terminate()
        process.join()


def _measure(kind: str, size: int, count: int) -> dict[str, Any]:
    process, port = _start_sink(kind, count)
    try:
        payload = b"x" * size
        if kind == "plain":
            result = {"seconds": asyncio.run(_run_plain(port, payload, count))}
        else:
            result = asyncio.run(_run_session(port, payload, count))
    finally:
        process.terminate()
        process.join()
    result["frames_per_s"] = count / result["seconds"]
    result["mb_per_s"] = count * size / result["seconds"] / 1e6
    return result


def _best(kind: str, size: int, count: int, repeat: int, **options: Any) -> dict[str, Any]:
    runs = [_measure(kind, size, count, **options) for _ in range(repeat)]
    best = min(runs, key=lambda run: run["seconds"])
    best["median_frames_per_s"] = statistics.median(run["frames_per_s"] for run in runs)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, one repeat")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else 3
    rows: list[dict[str, Any]] = []
    print(f"session vs plain FramedStream, one way over loopback TCP, best of {repeat}")
    print(
        f"{'payload':>8} {'frames':>8} {'plain f/s':>12} {'session f/s':>12} "
        f"{'session MB/s':>12} {'ratio':>6}"
    )
    for size in SIZES:
        count = _frames_for(size, args.quick)
        plain = _best("plain", size, count, repeat)
        session = _best("session", size, count, repeat)
        ratio = session["frames_per_s"] / plain["frames_per_s"]
        print(
            f"{size:>8} {count:>8} {plain['frames_per_s']:>12,.0f} "
            f"{session['frames_per_s']:>12,.0f} {session['mb_per_s']:>12,.1f} {ratio:>6.2f}"
        )
        rows.append(
            {"payload": size, "frames": count, "plain": plain, "session": session, "ratio": ratio}
        )
    print()
    seconds = 2.0 if args.quick else 5.0
    print(f"session through a proxy cutting the connection every 100 ms, for {seconds:.0f} s")
    print(
        f"{'payload':>8} {'frames':>8} {'session f/s':>12} {'cuts':>6} {'reconnects':>10} "
        f"{'replayed':>9}  delivered"
    )
    cut_rows = []
    for size in (256, 4096):
        result = _measure_with_cuts(size, seconds, 0.1)
        print(
            f"{size:>8} {result['frames']:>8} {result['frames_per_s']:>12,.0f} "
            f"{result['cuts']:>6} {result['reconnects']:>10} {result['replayed']:>9}  "
            "all, once, in order"
        )
        cut_rows.append({"payload": size, **result})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "rows": rows, "cut_rows": cut_rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
