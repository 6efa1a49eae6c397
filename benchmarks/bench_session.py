"""Resumable-session throughput against a plain FramedStream, in the same run.

    python benchmarks/bench_session.py [--quick] [--json PATH]

The receiver runs in a second process on loopback TCP; the client sends N
frames one way and the receiver answers once it has them all. Rows compare
a session with a plain ``FramedStream`` (``LengthPrefixed(4)``) for the
same payloads, then a session whose connection is cut every 100 ms (by
aborting the client's socket) and which must still deliver every frame.
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
from streamkit.session import ServerSession, connect_resumable, serve_resumable

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


async def _run_session(
    port: int, payload: bytes, count: int, cut_every: float | None
) -> dict[str, Any]:
    async with connect_resumable("127.0.0.1", port) as session:

        async def cutter() -> None:
            assert cut_every is not None
            while True:
                await asyncio.sleep(cut_every)
                conn = session._conn
                if conn is not None:
                    conn.stream.abort()

        cuts = asyncio.create_task(cutter()) if cut_every else None
        start = time.perf_counter()
        for _ in range(count):
            await session.send(payload)
        assert await session.recv() == DONE
        elapsed = time.perf_counter() - start
        if cuts is not None:
            cuts.cancel()
        stats = session.stats
    return {"seconds": elapsed, "reconnects": stats.reconnects, "replayed": stats.frames_replayed}


def _measure(kind: str, size: int, count: int, cut_every: float | None = None) -> dict[str, Any]:
    process, port = _start_sink(kind, count)
    try:
        payload = b"x" * size
        if kind == "plain":
            result = {"seconds": asyncio.run(_run_plain(port, payload, count))}
        else:
            result = asyncio.run(_run_session(port, payload, count, cut_every))
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
    print("session with the connection cut every 100 ms (every frame still delivered)")
    print(f"{'payload':>8} {'frames':>8} {'session f/s':>12} {'reconnects':>10} {'replayed':>9}")
    cut_rows = []
    for size in (256, 4096):
        count = _frames_for(size, args.quick)
        result = _best("session", size, count, 1, cut_every=0.1)
        print(
            f"{size:>8} {count:>8} {result['frames_per_s']:>12,.0f} "
            f"{result['reconnects']:>10} {result['replayed']:>9}"
        )
        cut_rows.append({"payload": size, "frames": count, **result})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "rows": rows, "cut_rows": cut_rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
