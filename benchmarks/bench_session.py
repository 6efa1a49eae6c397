"""Resumable-session throughput against a plain FramedStream, in the same run.

    python benchmarks/bench_session.py [--quick] [--json PATH] [--repeat N]

Each measurement runs the sender and the receiver in two fresh processes
(spawned, so no run inherits another's heap) on loopback TCP; the sender
sends N frames one way and the receiver answers once it has them all.
Rows compare a session with a plain ``FramedStream`` (``LengthPrefixed(4)``)
for the same payloads, run alternately, best of the repeats.

The processes run with the memory allocator as users have it (nothing is
tuned; the header line says what was in effect). The receiver reports its
CPU time and its minor page faults per MB received: an allocator handing
freed memory back to the kernel and faulting it in again shows there.

Then the echo round trip of 64 B frames, one in flight, through a session
and through a plain ``FramedStream`` (the same sink process serves both,
the sender alternates between them in blocks); p50 and p99.

Then a session streams numbered frames for a fixed time through a
``FaultProxy`` (in the sender's process) that cuts the connection every
100 ms, often in the middle of a frame, beside the same run through the
proxy without cuts. The receiver checks that every number arrives once and
in order, and reports how many duplicates it dropped.

``--repeat N`` runs all of it N times and ends with each ratio's median and
range over the N passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from typing import Any

from _harness import add_repeat_option, allocator, minor_faults, receive_from_child, spread

from streamkit import EndOfStream, FramedStream, LengthPrefixed, connect, serve
from streamkit.session import Backoff, ServerSession, connect_resumable, serve_resumable
from streamkit.testing import FaultProxy

SIZES = [16, 256, 4096, 65536, 1024 * 1024]
DONE = b"done"
ECHO_PAYLOAD = 64
_SPAWN = multiprocessing.get_context("spawn")


def _frames_for(size: int, quick: bool) -> int:
    # Runs of a fraction of a second: shorter ones mostly measure warm-up.
    budget = (64 if quick else 256) * 1024 * 1024  # bytes per run
    return max(200, min(150_000 if quick else 600_000, budget // max(size, 1)))


# -- the receiving process ------------------------------------------------------


def _done(cpu_start: float, faults_start: int) -> bytes:
    """The sink's answer once it has every frame: its CPU seconds and page faults for them."""
    return b"%r %d" % (time.process_time() - cpu_start, minor_faults() - faults_start)


async def _plain_sink(count: int, port_out: Any) -> None:
    async def handler(stream: FramedStream[bytes]) -> None:
        cpu_start, faults_start = time.process_time(), minor_faults()
        for _ in range(count):
            await stream.recv()
        await stream.send(_done(cpu_start, faults_start))
        with contextlib.suppress(EndOfStream):
            await stream.recv()  # until the client closes

    server = await serve(handler, "127.0.0.1", 0, codec=LengthPrefixed())
    port_out.send(server.port)
    await server.serve_forever()


async def _session_sink(count: int, port_out: Any) -> None:
    async def handler(session: ServerSession) -> None:
        cpu_start, faults_start = time.process_time(), minor_faults()
        for _ in range(count):
            await session.recv()
        await session.send(_done(cpu_start, faults_start))
        await session.recv()

    server = await serve_resumable(handler, "127.0.0.1", 0, resume_timeout=10)
    port_out.send(server.port)
    await server.serve_forever()


async def _verifying_sink(port_out: Any) -> None:
    """Receive numbered frames until DONE; answer with a summary, or what went wrong."""

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
        summary = {"received": expected, "duplicates": session.stats.duplicates_dropped}
        await session.send(json.dumps(summary).encode())
        await session.recv()

    server = await serve_resumable(handler, "127.0.0.1", 0, resume_timeout=10)
    port_out.send(server.port)
    await server.serve_forever()


async def _echo_sink(port_out: Any) -> None:
    """Serve a plain echo and a session echo; send both ports."""

    async def plain(stream: FramedStream[bytes]) -> None:
        with contextlib.suppress(EndOfStream):
            async for payload in stream:
                await stream.send(payload)

    async def session_echo(session: ServerSession) -> None:
        async for payload in session:
            await session.send(payload)

    plain_server = await serve(plain, "127.0.0.1", 0, codec=LengthPrefixed())
    session_server = await serve_resumable(session_echo, "127.0.0.1", 0, resume_timeout=10)
    port_out.send((plain_server.port, session_server.port))
    await asyncio.gather(plain_server.serve_forever(), session_server.serve_forever())


def _sink_main(kind: str, count: int, port_out: Any) -> None:
    if kind == "echo":
        asyncio.run(_echo_sink(port_out))
    elif kind == "plain":
        asyncio.run(_plain_sink(count, port_out))
    elif kind == "session":
        asyncio.run(_session_sink(count, port_out))
    else:
        asyncio.run(_verifying_sink(port_out))


# -- the sending process --------------------------------------------------------


async def _run_plain(port: int, payload: bytes, count: int) -> dict[str, Any]:
    async with connect("127.0.0.1", port, codec=LengthPrefixed()) as stream:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(count):
            await stream.send(payload)
        return _timings(start, cpu_start, await stream.recv(), count)


async def _run_session(port: int, payload: bytes, count: int) -> dict[str, Any]:
    async with connect_resumable("127.0.0.1", port) as session:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(count):
            await session.send(payload)
        return _timings(start, cpu_start, await session.recv(), count)


def _timings(start: float, cpu_start: float, answer: bytes, count: int) -> dict[str, Any]:
    seconds = time.perf_counter() - start
    sink_cpu, sink_faults = answer.split()
    return {
        "seconds": seconds,
        "sender_cpu_ns": (time.process_time() - cpu_start) / count * 1e9,
        "receiver_cpu_ns": float(sink_cpu) / count * 1e9,
        "receiver_faults": int(sink_faults),
    }


async def _run_through_proxy(
    port: int, size: int, seconds: float, cut_every: float | None
) -> dict[str, Any]:
    settings = {"reconnect_backoff": Backoff(initial=0.002, maximum=0.05)}
    async with (
        FaultProxy("127.0.0.1", port, seed=1) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **settings) as session,  # type: ignore[arg-type]
    ):
        if cut_every is not None:
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
    try:
        summary = json.loads(answer)
    except ValueError:
        raise AssertionError(answer.decode(errors="replace")) from None
    assert summary["received"] == sent, (summary, sent)
    return {
        "seconds": elapsed,
        "frames": sent,
        "frames_per_s": sent / elapsed,
        "cuts": proxy.stats.cuts,
        "reconnects": stats.reconnects,
        "replayed": stats.frames_replayed,
        "duplicates": summary["duplicates"],
    }


async def _round_trips(send: Any, recv: Any, count: int) -> list[float]:
    payload = b"p" * ECHO_PAYLOAD
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await send(payload)
        await recv()
        times.append(time.perf_counter() - start)
    return times


async def _run_echo(ports: tuple[int, int], count: int) -> dict[str, list[float]]:
    """Round trips of both, alternating in blocks so both see the same machine."""
    plain: list[float] = []
    session_times: list[float] = []
    block = 500
    async with (
        connect("127.0.0.1", ports[0], codec=LengthPrefixed()) as stream,
        connect_resumable("127.0.0.1", ports[1]) as session,
    ):
        for _ in range(max(1, count // block)):
            plain += await _round_trips(stream.send, stream.recv, block)
            session_times += await _round_trips(session.send, session.recv, block)
    return {"plain": plain, "session": session_times}


def _echo_sender_main(ports: tuple[int, int], count: int, out: Any) -> None:
    out.send(asyncio.run(_run_echo(ports, count)))


def _sender_main(port: int, kind: str, size: int, count: int, out: Any) -> None:
    if kind == "plain":
        out.send(asyncio.run(_run_plain(port, b"x" * size, count)))
    else:
        out.send(asyncio.run(_run_session(port, b"x" * size, count)))


def _proxy_sender_main(
    port: int, size: int, seconds: float, cut_every: float | None, out: Any
) -> None:
    out.send(asyncio.run(_run_through_proxy(port, size, seconds, cut_every)))


# -- orchestration --------------------------------------------------------------


def _in_processes(sink: tuple[Any, ...], sender: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    """Start a sink process, then a sender process given its port; return the sender's result."""
    port_in, port_out = _SPAWN.Pipe(duplex=False)
    sink_process = _SPAWN.Process(target=_sink_main, args=(*sink, port_out), daemon=True)
    sink_process.start()
    port_out.close()  # the child's copy remains
    try:
        port = receive_from_child(port_in, sink_process, "sink")
        result_in, result_out = _SPAWN.Pipe(duplex=False)
        sender_process = _SPAWN.Process(target=sender, args=(port, *args, result_out))
        sender_process.start()
        result_out.close()
        try:
            result: dict[str, Any] = receive_from_child(result_in, sender_process, "sender")
        finally:
            sender_process.join()
        return result
    finally:
        sink_process.terminate()
        sink_process.join()


def _measure(kind: str, size: int, count: int) -> dict[str, Any]:
    result = _in_processes((kind, count), _sender_main, (kind, size, count))
    result["frames_per_s"] = count / result["seconds"]
    result["mb_per_s"] = count * size / result["seconds"] / 1e6
    result["receiver_faults_per_mb"] = result["receiver_faults"] / (count * size / 1e6)
    return result


def _measure_echo(count: int) -> dict[str, Any]:
    times = _in_processes(("echo", 0), _echo_sender_main, (count,))
    result: dict[str, Any] = {"round_trips": count}
    for side in ("plain", "session"):
        ordered = sorted(times[side])
        result[f"{side}_p50_us"] = statistics.median(ordered) * 1e6
        result[f"{side}_p99_us"] = ordered[int(len(ordered) * 0.99)] * 1e6
    result["p50_ratio"] = result["plain_p50_us"] / result["session_p50_us"]
    return result


def _measure_through_proxy(size: int, seconds: float, cut_every: float | None) -> dict[str, Any]:
    return _in_processes(("verify", 0), _proxy_sender_main, (size, seconds, cut_every))


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(min(runs, key=lambda run: run["seconds"]))
    best["median_frames_per_s"] = statistics.median(run["frames_per_s"] for run in runs)
    for side in ("sender_cpu_ns", "receiver_cpu_ns"):
        best[side] = min(run[side] for run in runs)
    best["receiver_faults_per_mb"] = statistics.median(
        run["receiver_faults_per_mb"] for run in runs
    )
    return best


def _cpu(run: dict[str, Any]) -> str:
    return f"{run['sender_cpu_ns']:,.0f}/{run['receiver_cpu_ns']:,.0f}"


def _throughput(quick: bool, runs: int) -> list[dict[str, Any]]:
    """The throughput table, printed row by row as measured."""
    print(
        f"{'payload':>8} {'frames':>8} {'plain f/s':>12} {'session f/s':>12} "
        f"{'session MB/s':>12} {'ratio':>6} {'plain CPU':>14} {'session CPU':>14} {'ratio':>6}"
        f" {'faults/MB plain':>15} {'session':>7}"
    )
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        count = _frames_for(size, quick)
        plain_runs, session_runs = [], []
        for _ in range(runs):  # alternately, so both see the same machine
            plain_runs.append(_measure("plain", size, count))
            session_runs.append(_measure("session", size, count))
        plain, session = _best(plain_runs), _best(session_runs)
        ratio = session["frames_per_s"] / plain["frames_per_s"]
        cpu_ratio = max(plain["sender_cpu_ns"], plain["receiver_cpu_ns"]) / max(
            session["sender_cpu_ns"], session["receiver_cpu_ns"]
        )
        print(
            f"{size:>8} {count:>8} {plain['frames_per_s']:>12,.0f} "
            f"{session['frames_per_s']:>12,.0f} {session['mb_per_s']:>12,.1f} {ratio:>6.2f} "
            f"{_cpu(plain):>14} {_cpu(session):>14} {cpu_ratio:>6.2f}"
            f" {plain['receiver_faults_per_mb']:>15.1f} {session['receiver_faults_per_mb']:>7.1f}",
            flush=True,
        )
        rows.append(
            {
                "payload": size,
                "frames": count,
                "plain": plain,
                "session": session,
                "ratio": ratio,
                "cpu_ratio": cpu_ratio,
            }
        )
    return rows


def _echo(quick: bool) -> dict[str, Any]:
    echo = _measure_echo(4000 if quick else 20000)
    print(
        f"echo {ECHO_PAYLOAD} B, one in flight, {echo['round_trips']} round trips each: "
        f"p50 {echo['plain_p50_us']:.0f} us plain, {echo['session_p50_us']:.0f} us session "
        f"({echo['p50_ratio']:.2f}x); p99 {echo['plain_p99_us']:.0f} / "
        f"{echo['session_p99_us']:.0f} us",
        flush=True,
    )
    return echo


_CUT_SIZES = (256, 4096)


def _through_proxy(quick: bool) -> list[dict[str, Any]]:
    seconds = 2.0 if quick else 5.0
    print(
        f"session through a proxy for {seconds:.0f} s: without cuts, then cut every 100 ms; "
        "every frame checked by number"
    )
    print(
        f"{'payload':>8} {'uncut f/s':>10} {'frames':>8} {'cut f/s':>10} {'ratio':>6} "
        f"{'cuts':>5} {'reconnects':>10} {'replayed':>9} {'dups':>5}  delivered"
    )
    cut_rows = []
    for size in _CUT_SIZES:
        uncut = _measure_through_proxy(size, seconds, None)
        result = _measure_through_proxy(size, seconds, 0.1)
        ratio = result["frames_per_s"] / uncut["frames_per_s"]
        print(
            f"{size:>8} {uncut['frames_per_s']:>10,.0f} {result['frames']:>8} "
            f"{result['frames_per_s']:>10,.0f} {ratio:>6.2f} {result['cuts']:>5} "
            f"{result['reconnects']:>10} {result['replayed']:>9} {result['duplicates']:>5}  "
            "all, once, in order",
            flush=True,
        )
        cut_rows.append({"payload": size, "uncut": uncut, **result, "ratio": ratio})
    return cut_rows


def _print_over_passes(passes: list[dict[str, Any]]) -> None:
    """Each row's ratios over the passes: median and range (lowest-highest)."""
    print()
    print(
        f"over the {len(passes)} passes: each ratio's median (lowest-highest); "
        "throughput and CPU ratios are session/plain, echo p50 plain/session, cut/uncut"
    )
    print(f"{'payload':>8} {'ratio':>20} {'CPU ratio':>20}")
    for index, size in enumerate(SIZES):
        rows = [one["rows"][index] for one in passes]
        ratio = spread([row["ratio"] for row in rows])
        cpu_ratio = spread([row["cpu_ratio"] for row in rows])
        print(f"{size:>8} {ratio!s:>20} {cpu_ratio!s:>20}")
    echo = spread([one["echo"]["p50_ratio"] for one in passes])
    print(f"echo {ECHO_PAYLOAD} B p50: {echo}")
    for index, size in enumerate(_CUT_SIZES):
        cut = spread([one["cut_rows"][index]["ratio"] for one in passes])
        print(f"through the proxy, {size} B, cut every 100 ms / uncut: {cut}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, one repeat")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_repeat_option(parser)
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 3
    print(
        f"session vs plain FramedStream, one way over loopback TCP, best of {runs}; {allocator()}"
        + (f"; {args.repeat} passes" if args.repeat > 1 else "")
    )
    print(
        "CPU: ns per frame, sender/receiver; its ratio (plain/session, busier side) holds "
        "steadier than wall time on a busy machine; faults: the receivers' minor page faults "
        "per MB (median)"
    )
    passes: list[dict[str, Any]] = []
    for number in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"-- pass {number} of {args.repeat}")
        rows = _throughput(args.quick, runs)
        print()
        echo = _echo(args.quick)
        print()
        passes.append({"rows": rows, "echo": echo, "cut_rows": _through_proxy(args.quick)})
    if args.repeat > 1:
        _print_over_passes(passes)
    if args.json:
        results = {"python": sys.version, **passes[-1]}
        if args.repeat > 1:
            results["passes"] = passes
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
