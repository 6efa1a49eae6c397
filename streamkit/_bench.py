"""Framed-stream benchmark: streamkit against naive asyncio, side by side in one run.

Private: the code behind ``python -m streamkit bench`` and
``benchmarks/bench_streams.py``, not part of streamkit's API (the other
benchmark scripts share their helpers through ``benchmarks/_harness.py``).

One-way throughput, client to server, in two processes over loopback TCP
and a Unix socket, for payloads of 16 B to 1 MiB:

- ``length4``: streamkit ``FramedStream`` with ``LengthPrefixed(4)``
  (``await send(frame)`` per frame, ``async for`` on the receiver) against
  the naive baseline: ``write(header + payload)`` and ``await drain()`` per
  frame, ``readexactly(4)`` + ``readexactly(n)`` on the receiver;
- ``lines``: streamkit with ``Lines`` (``str`` frames) against
  ``write(text.encode() + b"\\n")`` / ``readline().decode()``: the same text
  in and out;

and the echo round-trip latency of 64 B frames, one in flight, the two
sides alternating in blocks. Both sides' readers have the same ``limit``
(streamkit's default, 256 KiB; for lines, room for the largest line), so
the rows compare framing code, not buffer sizes. The time of a throughput
run is from the first frame sent until the receiver reports it has every
frame; each row is the best of a few alternating runs.

Sender and receiver each run in a fresh (spawned) process with glibc's
malloc thresholds fixed high (``GLIBC_TUNABLES``, unless already set): by
default, until some large block happens to be freed, glibc hands freed heap
back to the kernel and faults it in again for the next frames, and the same
code measures 2-3x apart from run to run at 64 KiB (see
:func:`fixed_malloc`).

``python -m streamkit bench`` runs the quick version (:func:`main`);
``benchmarks/bench_streams.py`` the full one (:func:`script_main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from streamkit import _args
from streamkit.codecs import LengthPrefixed, Lines
from streamkit.net import DEFAULT_LIMIT, connect, connect_unix, serve, serve_unix
from streamkit.stream import FramedStream

PAYLOADS = (16, 256, 4096, 64 * 1024, 1024 * 1024)
_MAX_FRAME = 2 * 1024 * 1024
#: The readers' limit for lines: readline() needs room for the largest line.
_LINES_LIMIT = 2 * _MAX_FRAME
_HEADER = struct.Struct(">I")
_LATENCY_PAYLOAD = 64
#: glibc malloc keeps freed memory in the heap (see the module docstring).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"

Address = tuple[str, Any]  # ("tcp", (host, port)) or ("unix", path)


def _length_codec() -> LengthPrefixed:
    return LengthPrefixed(max_frame=_MAX_FRAME)


def _lines_codec() -> Lines:
    return Lines(max_frame=_MAX_FRAME)


# -- the receiving process --------------------------------------------------------


async def _naive_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    frames = 0
    unpack = _HEADER.unpack
    while header := await _read_or_eof(reader, 4):
        (size,) = unpack(header)
        await reader.readexactly(size)
        frames += 1
    writer.write(b"%d\n" % frames)
    await writer.drain()
    writer.close()


async def _read_or_eof(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""


async def _naive_lines_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    frames = 0
    while line := await reader.readline():
        line.decode()  # text out, as Lines gives
        frames += 1
    writer.write(b"%d\n" % frames)
    await writer.drain()
    writer.close()


async def _naive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while header := await _read_or_eof(reader, 4):
        writer.write(header + await reader.readexactly(_HEADER.unpack(header)[0]))
        await writer.drain()
    writer.close()


async def _streamkit_receiver(stream: FramedStream[Any]) -> None:
    frames = 0
    async for _ in stream:
        frames += 1
    await stream.send(b"%d" % frames if isinstance(stream.codec, LengthPrefixed) else str(frames))


async def _streamkit_echo(stream: FramedStream[bytes]) -> None:
    async for frame in stream:
        await stream.send(frame)


async def _start_receivers(directory: str) -> tuple[list[Any], dict[str, Address]]:
    """Every kind of receiver on TCP and on a Unix socket."""
    naive: dict[str, tuple[Callable[..., Awaitable[None]], int]] = {
        "naive": (_naive_receiver, DEFAULT_LIMIT),
        "naive-lines": (_naive_lines_receiver, _LINES_LIMIT),
        "echo-naive": (_naive_echo, DEFAULT_LIMIT),
    }
    streamkit: dict[str, tuple[Callable[..., Awaitable[None]], Any, int]] = {
        "streamkit": (_streamkit_receiver, _length_codec(), DEFAULT_LIMIT),
        "streamkit-lines": (_streamkit_receiver, _lines_codec(), _LINES_LIMIT),
        "echo-streamkit": (_streamkit_echo, _length_codec(), DEFAULT_LIMIT),
    }
    servers: list[Any] = []
    addresses: dict[str, Address] = {}
    for kind, (handler, limit) in naive.items():
        tcp = await asyncio.start_server(handler, "127.0.0.1", 0, limit=limit)
        path = os.path.join(directory, f"{kind}.sock")
        unix = await asyncio.start_unix_server(handler, path, limit=limit)
        servers += (tcp, unix)
        addresses[f"tcp {kind}"] = ("tcp", tcp.sockets[0].getsockname()[:2])
        addresses[f"unix {kind}"] = ("unix", path)
    for kind, (handler, codec, limit) in streamkit.items():
        tcp_server = await serve(handler, "127.0.0.1", 0, codec=codec, limit=limit)
        path = os.path.join(directory, f"{kind}.sock")
        unix_server = await serve_unix(handler, path, codec=codec, limit=limit)
        servers += (tcp_server, unix_server)
        addresses[f"tcp {kind}"] = ("tcp", ("127.0.0.1", tcp_server.port))
        addresses[f"unix {kind}"] = ("unix", path)
    return servers, addresses


def _receiver_process(pipe: Connection, use_uvloop: bool) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            servers, addresses = await _start_receivers(directory)
            pipe.send(addresses)
            await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told
            for server in servers:
                server.close()

    _run_loop(main(), use_uvloop)


def _sender_process(
    pipe: Connection,
    addresses: dict[str, Address],
    transports: Sequence[str],
    payloads: Sequence[int],
    quick: bool,
    loop_name: str,
) -> None:
    rows = _run_loop(
        _measure(addresses, transports, payloads, quick, loop_name), loop_name == "uvloop"
    )
    pipe.send(rows)


def _run_loop(coro: Any, use_uvloop: bool) -> Any:
    if use_uvloop:
        import uvloop  # type: ignore[import-not-found]  # optional

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def receive_from_child(pipe: Connection, process: BaseProcess, role: str) -> Any:
    """What a child process sends; a clear error if it died first (its traceback is above).

    Close the parent's copy of the child's end of ``pipe`` once the child
    has started: only then does a child that dies end the pipe.
    """
    try:
        return pipe.recv()
    except EOFError:
        process.join(10)
        raise RuntimeError(
            f"the benchmark's {role} process failed (exit status {process.exitcode})"
        ) from None


# -- the sending side -------------------------------------------------------------


async def _open(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address[0] == "unix":
        return await asyncio.open_unix_connection(address[1])
    return await asyncio.open_connection(*address[1])


def _connect(address: Address, codec: Any) -> Any:
    if address[0] == "unix":
        return connect_unix(address[1], codec=codec)
    return connect(*address[1], codec=codec)


async def _naive_send(address: Address, payload: bytes, count: int, lines: bool) -> float:
    reader, writer = await _open(address)
    pack = _HEADER.pack
    text = payload.decode()
    start = time.perf_counter()
    if lines:
        for _ in range(count):
            writer.write(text.encode() + b"\n")
            await writer.drain()
    else:
        for _ in range(count):
            writer.write(pack(len(payload)) + payload)
            await writer.drain()
    writer.write_eof()
    received = int(await reader.readline())
    seconds = time.perf_counter() - start
    writer.close()
    assert received == count, (received, count)
    return seconds


async def _streamkit_send(address: Address, payload: bytes, count: int, lines: bool) -> float:
    frame: Any = payload.decode() if lines else payload
    async with _connect(address, _lines_codec() if lines else _length_codec()) as stream:
        start = time.perf_counter()
        for _ in range(count):
            await stream.send(frame)
        stream.write_eof()
        received = int(await stream.recv())
        seconds = time.perf_counter() - start
    assert received == count, (received, count)
    return seconds


async def _naive_round_trips(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int
) -> list[float]:
    payload = b"p" * _LATENCY_PAYLOAD
    pack = _HEADER.pack
    times = []
    for _ in range(count):
        start = time.perf_counter()
        writer.write(pack(len(payload)) + payload)  # framed per message, as streamkit does
        await writer.drain()
        (size,) = _HEADER.unpack(await reader.readexactly(4))
        await reader.readexactly(size)
        times.append(time.perf_counter() - start)
    return times


async def _streamkit_round_trips(stream: FramedStream[bytes], count: int) -> list[float]:
    payload = b"p" * _LATENCY_PAYLOAD
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await stream.send(payload)
        await stream.recv()
        times.append(time.perf_counter() - start)
    return times


async def _latency(
    naive_address: Address, streamkit_address: Address, count: int
) -> tuple[list[float], list[float]]:
    """Round-trip times of both, alternating in blocks so both see the same machine."""
    reader, writer = await _open(naive_address)
    naive: list[float] = []
    ours: list[float] = []
    block = 500
    async with _connect(streamkit_address, _length_codec()) as stream:
        for _ in range(max(1, count // block)):
            naive += await _naive_round_trips(reader, writer, block)
            ours += await _streamkit_round_trips(stream, block)
    writer.close()
    return naive, ours


def _frames_for(size: int, quick: bool) -> int:
    volume, most, least = (24 << 20, 100_000, 40) if quick else (256 << 20, 500_000, 200)
    return max(least, min(most, volume // size))


async def _measure(
    addresses: dict[str, Address],
    transports: Sequence[str],
    payloads: Sequence[int],
    quick: bool,
    loop_name: str,
) -> list[dict[str, Any]]:
    # Runs alternate naive / streamkit and the best of each counts. Large
    # frames swing most from run to run on a shared machine (memory effects
    # hit both sides alike), so they get more tries.
    repeats = 1 if quick else 3
    rows: list[dict[str, Any]] = []
    for transport in transports:
        for framing, lines in (("length4", False), ("lines", True)):
            for size in payloads:
                count = _frames_for(size, quick)
                payload = b"x" * size
                best: dict[str, float] = {}
                for _ in range(repeats if size < 65536 else repeats + 2):
                    for name, send in (("naive", _naive_send), ("streamkit", _streamkit_send)):
                        kind = f"{name}-lines" if lines else name
                        seconds = await send(
                            addresses[f"{transport} {kind}"], payload, count, lines
                        )
                        best[name] = min(best.get(name, seconds), seconds)
                rows.append(
                    {
                        "loop": loop_name,
                        "transport": transport,
                        "framing": framing,
                        "payload": size,
                        "frames": count,
                        "naive_frames_per_s": count / best["naive"],
                        "naive_mb_per_s": count * size / best["naive"] / 1e6,
                        "streamkit_frames_per_s": count / best["streamkit"],
                        "streamkit_mb_per_s": count * size / best["streamkit"] / 1e6,
                        "ratio": best["naive"] / best["streamkit"],
                    }
                )
                _print_row(rows[-1])
        count = 4_000 if quick else 20_000
        naive, ours = await _latency(
            addresses[f"{transport} echo-naive"], addresses[f"{transport} echo-streamkit"], count
        )
        row: dict[str, Any] = {
            "loop": loop_name,
            "transport": transport,
            "latency_payload": _LATENCY_PAYLOAD,
            "round_trips": len(ours),
            "naive_p50_us": statistics.median(naive) * 1e6,
            "naive_p99_us": statistics.quantiles(naive, n=100)[98] * 1e6,
            "streamkit_p50_us": statistics.median(ours) * 1e6,
            "streamkit_p99_us": statistics.quantiles(ours, n=100)[98] * 1e6,
        }
        row["p50_ratio"] = row["naive_p50_us"] / row["streamkit_p50_us"]
        rows.append(row)
        _print_latency(row)
    return rows


def _size(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


_HEAD = (
    f"{'loop':<8}{'transport':<10}{'framing':<9}{'payload':>8}{'frames':>9}"
    f"{'naive fr/s':>13}{'streamkit fr/s':>16}{'naive MB/s':>12}{'sk MB/s':>9}{'ratio':>8}"
)


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['loop']:<8}{row['transport']:<10}{row['framing']:<9}{_size(row['payload']):>8}"
        f"{row['frames']:>9}{row['naive_frames_per_s']:>13,.0f}"
        f"{row['streamkit_frames_per_s']:>16,.0f}{row['naive_mb_per_s']:>12.1f}"
        f"{row['streamkit_mb_per_s']:>9.1f}{row['ratio']:>7.2f}x",
        flush=True,
    )


def _print_latency(row: dict[str, Any]) -> None:
    print(
        f"{row['loop']:<8}{row['transport']:<10}echo {row['latency_payload']} B, one in flight, "
        f"{row['round_trips']} round trips each: p50 {row['naive_p50_us']:.0f} us naive, "
        f"{row['streamkit_p50_us']:.0f} us streamkit ({row['p50_ratio']:.2f}x); "
        f"p99 {row['naive_p99_us']:.0f} / {row['streamkit_p99_us']:.0f} us",
        flush=True,
    )


def run(
    quick: bool = True,
    transport: str = "both",
    json_path: str | None = None,
    payloads: Sequence[int] = PAYLOADS,
) -> int:
    """Run the benchmark and print its table; ``ratio`` is streamkit's speed over naive.

    ``transport`` is ``"tcp"``, ``"unix"`` or ``"both"``; ``payloads`` the
    payload sizes in bytes; with ``json_path`` the rows are also written
    there as JSON. The benchmark also runs on ``uvloop`` when it is
    installed. Returns 0 (the exit status).
    """
    transports = ["tcp", "unix"] if transport == "both" else [transport]
    loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        loops.append("uvloop")
    except ImportError:
        pass
    print(
        f"framed streams, one way, client -> server in two processes (loopback); "
        f"ratio = streamkit / naive; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
        f"{', quick' if quick else ''}"
    )
    print(_HEAD)
    rows: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    for loop_name in loops:
        ours, theirs = context.Pipe()
        results, sender_end = context.Pipe(duplex=False)
        with fixed_malloc():
            receiver = context.Process(
                target=_receiver_process, args=(theirs, loop_name == "uvloop")
            )
            receiver.start()
        theirs.close()  # the child's copy remains: a child that dies ends the pipe
        try:
            addresses = receive_from_child(ours, receiver, "receiver")
            with fixed_malloc():
                sender = context.Process(
                    target=_sender_process,
                    args=(sender_end, addresses, transports, payloads, quick, loop_name),
                )
                sender.start()
            sender_end.close()
            try:
                rows += receive_from_child(results, sender, "sender")
            finally:
                sender.join(10)
                if sender.is_alive():
                    sender.kill()
        finally:
            with contextlib.suppress(OSError):
                ours.send("stop")
            receiver.join(10)
            if receiver.is_alive():
                receiver.kill()
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"python": sys.version, "quick": quick, "rows": rows}, out, indent=2)
    return 0


# -- the allocator ----------------------------------------------------------------


@contextlib.contextmanager
def fixed_malloc() -> Iterator[None]:
    """Processes started inside run with glibc's malloc thresholds fixed high.

    Sets ``GLIBC_TUNABLES`` (read by glibc when a process starts) for the
    duration, unless the caller set it already (even empty: to measure with
    glibc's defaults). Harmless off glibc.
    """
    if "GLIBC_TUNABLES" in os.environ:
        yield
        return
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    try:
        yield
    finally:
        del os.environ["GLIBC_TUNABLES"]


# -- command lines ----------------------------------------------------------------


def _payload_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes") from None
    if not 1 <= size <= _MAX_FRAME:
        raise argparse.ArgumentTypeError(f"payload sizes go from 1 to {_MAX_FRAME} bytes")
    return size


def _parse(argv: Sequence[str] | None, prog: str, full: bool, transport: str) -> argparse.Namespace:
    parser = _args.Parser(
        prog=prog,
        description="Framed-stream throughput and echo latency, streamkit against naive "
        "asyncio, side by side (two processes, loopback TCP and/or a Unix socket).",
    )
    length = parser.add_mutually_exclusive_group()
    default = " (default)"
    quick_help = "short runs" + ("" if full else default)
    full_help = "longer runs" + (default if full else "")
    length.add_argument("--quick", dest="full", action="store_false", help=quick_help)
    length.add_argument("--full", dest="full", action="store_true", help=full_help)
    parser.set_defaults(full=full)
    parser.add_argument(
        "--transport",
        choices=("tcp", "unix", "both"),
        default=transport,
        help=f"which sockets ({transport})",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=_json_path, help="also write the results as JSON"
    )
    parser.add_argument(
        "--payloads",
        type=_payload_size,
        nargs="+",
        default=PAYLOADS,
        metavar="BYTES",
        help="payload sizes (16 256 4096 65536 1048576)",
    )
    return parser.parse_args(argv)


def _json_path(path: str) -> str:
    """A file the results can be written to: checked before the benchmark runs."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such directory: {folder}")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}")
    return path


def _run_args(args: argparse.Namespace) -> int:
    try:
        return run(
            quick=not args.full,
            transport=args.transport,
            json_path=args.json,
            payloads=tuple(args.payloads),
        )
    except (RuntimeError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m streamkit bench``: the quick benchmark over TCP by default.

    Flags: ``--quick`` (default) / ``--full``, ``--transport tcp|unix|both``,
    ``--json PATH``, ``--payloads BYTES...``. Bad arguments exit with status 2
    (``SystemExit``, as argparse does); otherwise returns the exit status.
    """
    return _run_args(_parse(argv, "python -m streamkit bench", full=False, transport="tcp"))


def script_main(argv: list[str] | None = None) -> int:
    """``benchmarks/bench_streams.py``: the same flags, full runs on both transports by default."""
    return _run_args(_parse(argv, "bench_streams.py", full=True, transport="both"))
