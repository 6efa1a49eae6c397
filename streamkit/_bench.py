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

- ``raw``, for ``length4``: the limit of the sockets themselves, the same
  bytes sent with a blocking ``sendall`` of about 1 MiB at a time and
  received by a blocking ``recv_into`` of one reused 1 MiB buffer, frames
  not parsed;

and the echo round-trip latency of 64 B frames, one in flight, the two
sides alternating in blocks. Both sides' readers have the same ``limit``
(streamkit's default, 256 KiB; for lines, room for the largest line), so
the rows compare framing code, not buffer sizes. The time of a throughput
run is from the first frame sent until the receiver reports it has every
frame. The sides run alternately a few times; a row shows each side's median
and the median of the ratios of runs made one after the other, with their
range.

Sender and receiver each run in a fresh (spawned) process with the memory
allocator as it is: nothing is tuned (set ``GLIBC_TUNABLES`` yourself to
compare; the header line says what was in effect). The receiver counts its
minor page faults per MB received (``ru_minflt``): an allocator that hands
freed memory back to the kernel and faults it in again for the next read
shows there, in CPU time spent in the kernel.

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
import platform
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple

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
#: The raw side's reads and writes: about this many bytes each.
_RAW_CHUNK = 1024 * 1024

Address = tuple[str, Any]  # ("tcp", (host, port)) or ("unix", path)


def _length_codec() -> LengthPrefixed:
    return LengthPrefixed(max_frame=_MAX_FRAME)


def _lines_codec() -> Lines:
    return Lines(max_frame=_MAX_FRAME)


# -- the allocator and page faults ------------------------------------------------


def minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocator() -> str:
    """The memory allocator the benchmark's processes run with, for its header line."""
    if platform.libc_ver()[0] != "glibc":
        return "the system's malloc"
    tunables = os.environ.get("GLIBC_TUNABLES")
    if tunables is None:
        return "glibc malloc, defaults"
    return f"glibc malloc, GLIBC_TUNABLES={tunables!r} (from the environment)"


# -- repeats ----------------------------------------------------------------------


def repeat_count(text: str) -> int:
    """``--repeat N``'s type: a whole number of passes, at least 1."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError("--repeat takes 1 or more passes")
    return count


def add_repeat_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--repeat N`` (default 1): the whole comparison N times, then medians and ranges."""
    parser.add_argument(
        "--repeat",
        type=repeat_count,
        default=1,
        metavar="N",
        help="run the whole comparison N times, then print each row's median ratio and its "
        "range over the N passes (default 1: one pass, as it always ran)",
    )


class Spread(NamedTuple):
    """A ratio over several passes: its median and its range."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def spread(values: Sequence[float]) -> Spread:
    """The median, the lowest and the highest of ``values`` (at least one)."""
    return Spread(statistics.median(values), min(values), max(values))


# -- the receiving process --------------------------------------------------------


def _report(frames: int, faults_since: int) -> bytes:
    """A receiver's answer: frames received and its page faults meanwhile."""
    return b"%d %d" % (frames, minor_faults() - faults_since)


async def _naive_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    faults = minor_faults()
    frames = 0
    unpack = _HEADER.unpack
    while header := await _read_or_eof(reader, 4):
        (size,) = unpack(header)
        await reader.readexactly(size)
        frames += 1
    writer.write(_report(frames, faults) + b"\n")
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
    faults = minor_faults()
    frames = 0
    while line := await reader.readline():
        line.decode()  # text out, as Lines gives
        frames += 1
    writer.write(_report(frames, faults) + b"\n")
    await writer.drain()
    writer.close()


async def _naive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while header := await _read_or_eof(reader, 4):
        writer.write(header + await reader.readexactly(_HEADER.unpack(header)[0]))
        await writer.drain()
    writer.close()


async def _streamkit_receiver(stream: FramedStream[Any]) -> None:
    faults = minor_faults()
    frames = 0
    async for _ in stream:
        frames += 1
    report = _report(frames, faults)
    await stream.send(report if isinstance(stream.codec, LengthPrefixed) else report.decode())


def _raw_receiver(listener: socket.socket) -> None:
    """Blocking: receive each connection's bytes into one buffer, answer with their count."""
    buffer = bytearray(_RAW_CHUNK)
    while True:
        connection, _ = listener.accept()
        with connection:
            faults = minor_faults()
            received = 0
            while got := connection.recv_into(buffer):
                received += got
            connection.sendall(_report(received, faults) + b"\n")


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
    raw_tcp = socket.create_server(("127.0.0.1", 0))
    raw_path = os.path.join(directory, "raw.sock")
    raw_unix = socket.create_server(raw_path, family=socket.AF_UNIX)
    for listener in (raw_tcp, raw_unix):
        # A thread of its own, blocking: the event loop is idle while it runs.
        threading.Thread(target=_raw_receiver, args=(listener,), daemon=True).start()
    addresses["tcp raw"] = ("tcp", raw_tcp.getsockname()[:2])
    addresses["unix raw"] = ("unix", raw_path)
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


def _sender_process(pipe: Connection, use_uvloop: bool) -> None:
    """Run each job the parent sends (a ``_SENDERS`` name and its arguments), answer its result."""
    with _runner(use_uvloop) as runner:
        while job := pipe.recv():
            name, *args = job
            pipe.send(runner.run(_SENDERS[name](*args)))


def _run_loop(coro: Any, use_uvloop: bool) -> Any:
    with _runner(use_uvloop) as runner:
        return runner.run(coro)


def _runner(use_uvloop: bool) -> asyncio.Runner:
    if use_uvloop:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # optional

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


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


#: A run's result: seconds, the receiver's page faults and the sender's.
Run = tuple[float, int, int]


def _answer(line: bytes | str, count: int) -> int:
    """The receiver's page faults, from its answer; checks it got ``count`` frames (or bytes)."""
    received, faults = map(int, line.split())
    assert received == count, (received, count)
    return faults


async def _naive_send(address: Address, size: int, count: int, lines: bool) -> Run:
    payload = b"x" * size
    reader, writer = await _open(address)
    pack = _HEADER.pack
    text = payload.decode()
    faults = minor_faults()
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
    answer = await reader.readline()
    seconds = time.perf_counter() - start
    sender_faults = minor_faults() - faults
    writer.close()
    return seconds, _answer(answer, count), sender_faults


async def _streamkit_send(address: Address, size: int, count: int, lines: bool) -> Run:
    frame: Any = "x" * size if lines else b"x" * size
    async with _connect(address, _lines_codec() if lines else _length_codec()) as stream:
        faults = minor_faults()
        start = time.perf_counter()
        for _ in range(count):
            await stream.send(frame)
        stream.write_eof()
        answer = await stream.recv()
        seconds = time.perf_counter() - start
        sender_faults = minor_faults() - faults
    return seconds, _answer(answer, count), sender_faults


async def _raw_send(address: Address, size: int, count: int, lines: bool) -> Run:
    """The same bytes as length4's, blocking, about 1 MiB per ``sendall`` (the loop is idle)."""
    frame = _HEADER.pack(size) + b"x" * size
    per_chunk = max(1, _RAW_CHUNK // len(frame))
    chunk = frame * per_chunk
    family = socket.AF_UNIX if address[0] == "unix" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.connect(address[1])
        faults = minor_faults()
        start = time.perf_counter()
        for _ in range(count // per_chunk):
            sock.sendall(chunk)
        sock.sendall(frame * (count % per_chunk))
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline()
        seconds = time.perf_counter() - start
        sender_faults = minor_faults() - faults
    return seconds, _answer(answer, count * len(frame)), sender_faults


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


#: What the sender process can be asked to run.
_SENDERS: dict[str, Callable[..., Coroutine[Any, Any, Any]]] = {
    "naive": _naive_send,
    "streamkit": _streamkit_send,
    "raw": _raw_send,
    "latency": _latency,
}


def _frames_for(size: int, quick: bool) -> int:
    volume, most, least = (24 << 20, 100_000, 40) if quick else (256 << 20, 500_000, 200)
    return max(least, min(most, volume // size))


class _Processes(NamedTuple):
    """A receiver and a sender process (see :func:`_processes`)."""

    addresses: dict[str, Address]
    #: ``job(name, *args)`` runs ``_SENDERS[name](*args)`` in the sender, returns its result.
    job: Callable[..., Any]


@contextlib.contextmanager
def _processes(context: Any, use_uvloop: bool) -> Iterator[_Processes]:
    """A fresh receiver process and a fresh sender process, stopped on exit.

    Fresh for each side of each row: what one run leaves in a process's heap
    (glibc raises its thresholds for good once a large block is freed) must
    not help or hurt another side, as no user's process runs the baseline.
    """
    ours, theirs = context.Pipe()
    receiver = context.Process(target=_receiver_process, args=(theirs, use_uvloop))
    receiver.start()
    theirs.close()  # the child's copy remains: a child that dies ends the pipe
    try:
        addresses = receive_from_child(ours, receiver, "receiver")
        jobs, sender_end = context.Pipe()
        sender = context.Process(target=_sender_process, args=(sender_end, use_uvloop))
        sender.start()
        sender_end.close()

        def job(name: str, *args: Any) -> Any:
            jobs.send((name, *args))
            return receive_from_child(jobs, sender, "sender")

        try:
            yield _Processes(addresses, job)
        finally:
            with contextlib.suppress(OSError):
                jobs.send(None)
            sender.join(10)
            if sender.is_alive():
                sender.kill()
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        receiver.join(10)
        if receiver.is_alive():
            receiver.kill()


def _measure_row(
    context: Any, loop_name: str, transport: str, lines: bool, size: int, quick: bool
) -> dict[str, Any]:
    """One row: the sides run alternately, each in its own pair of processes.

    Each side's processes first carry an unmeasured run of a quarter of the
    frames (a server that has served a connection before), so the first
    measured run does not pay for the heap's growth alone.
    """
    sides = ["naive", "streamkit"] if lines else ["naive", "streamkit", "raw"]
    count = _frames_for(size, quick)
    # Large frames swing most from run to run on a shared machine: more runs.
    repeats = (1 if quick else 3) + (2 if size >= 65536 else 0)
    runs: dict[str, list[Run]] = {side: [] for side in sides}
    uvloop = loop_name == "uvloop"
    with contextlib.ExitStack() as stack:
        pairs = {side: stack.enter_context(_processes(context, uvloop)) for side in sides}
        addresses = {
            side: pair.addresses[f"{transport} {side}{'-lines' if lines else ''}"]
            for side, pair in pairs.items()
        }
        for side, pair in pairs.items():
            pair.job(side, addresses[side], size, max(1, count // 4), lines)
        for _ in range(repeats):
            for side, pair in pairs.items():
                runs[side].append(pair.job(side, addresses[side], size, count, lines))
    return _row(loop_name, transport, "lines" if lines else "length4", size, count, runs)


def _measure_latency(context: Any, loop_name: str, transport: str, quick: bool) -> dict[str, Any]:
    count = 4_000 if quick else 20_000
    with _processes(context, loop_name == "uvloop") as pair:
        naive_address = pair.addresses[f"{transport} echo-naive"]
        streamkit_address = pair.addresses[f"{transport} echo-streamkit"]
        naive, ours = pair.job("latency", naive_address, streamkit_address, count)
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
    return row


def _row(
    loop_name: str,
    transport: str,
    framing: str,
    size: int,
    count: int,
    runs: dict[str, list[Run]],
) -> dict[str, Any]:
    """A table row: each side's median, and the ratios of runs made one after the other."""
    megabytes = count * size / 1e6
    row: dict[str, Any] = {
        "loop": loop_name,
        "transport": transport,
        "framing": framing,
        "payload": size,
        "frames": count,
        "runs": len(runs["naive"]),
    }
    for name, side in runs.items():
        seconds = statistics.median(run[0] for run in side)
        row[f"{name}_frames_per_s"] = count / seconds
        row[f"{name}_mb_per_s"] = megabytes / seconds
        row[f"{name}_faults_per_mb"] = statistics.median(run[1] for run in side) / megabytes
        row[f"{name}_sender_faults_per_mb"] = statistics.median(run[2] for run in side) / megabytes
    ours = runs["streamkit"]
    ratios = [naive[0] / mine[0] for naive, mine in zip(runs["naive"], ours, strict=True)]
    row["ratio"] = statistics.median(ratios)
    row["ratio_low"], row["ratio_high"] = min(ratios), max(ratios)
    if "raw" in runs:
        to_raw = [raw[0] / mine[0] for raw, mine in zip(runs["raw"], ours, strict=True)]
        row["raw_ratio"] = statistics.median(to_raw)
    return row


def _size(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


_HEAD = (
    f"{'loop':<8}{'transport':<10}{'framing':<9}{'payload':>8}{'frames':>8}"
    f"{'naive fr/s':>12}{'sk fr/s':>12}{'naive MB/s':>11}{'sk MB/s':>9}{'raw MB/s':>9}"
    f"{'ratio':>8}{'range':>11}{'sk/raw':>7}{'faults/MB naive':>16}{'sk':>6}{'raw':>6}"
)


def _print_row(row: dict[str, Any]) -> None:
    raw = "raw_ratio" in row
    spread = f"{row['ratio_low']:.2f}-{row['ratio_high']:.2f}"
    print(
        f"{row['loop']:<8}{row['transport']:<10}{row['framing']:<9}{_size(row['payload']):>8}"
        f"{row['frames']:>8}{row['naive_frames_per_s']:>12,.0f}"
        f"{row['streamkit_frames_per_s']:>12,.0f}{row['naive_mb_per_s']:>11.1f}"
        f"{row['streamkit_mb_per_s']:>9.1f}"
        + (f"{row['raw_mb_per_s']:>9.1f}" if raw else f"{'-':>9}")
        + f"{row['ratio']:>7.2f}x{spread:>11}"
        + (f"{row['raw_ratio']:>6.2f}x" if raw else f"{'-':>7}")
        + f"{row['naive_faults_per_mb']:>16.1f}{row['streamkit_faults_per_mb']:>6.1f}"
        + (f"{row['raw_faults_per_mb']:>6.1f}" if raw else f"{'-':>6}"),
        flush=True,
    )


def _print_latency(row: dict[str, Any]) -> None:
    print(
        f"{row['loop']:<8}{row['transport']:<10}echo {row['latency_payload']} B, one in flight, "
        f"{row['round_trips']} round trips each: p50 {row['naive_p50_us']:.0f} us naive, "
        f"{row['streamkit_p50_us']:.0f} us streamkit ({row['p50_ratio']:.2f}x); "
        f"p99 {row['naive_p99_us']:.0f} / {row['streamkit_p99_us']:.0f} us"
        + (
            f"; p50 ratio over the passes {row['p50_ratio_low']:.2f}-{row['p50_ratio_high']:.2f}"
            if "p50_ratio_low" in row
            else ""
        ),
        flush=True,
    )


def _over_passes(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row of several passes: each number's median; a ratio's median and range.

    ``ratio`` (or ``p50_ratio``, a latency row) is the median of the passes'
    ratios, ``ratio_low`` / ``ratio_high`` their range: how far apart whole
    runs of the benchmark land, not the runs inside one pass.
    """
    summary: dict[str, Any] = {"passes": len(rows)}
    for key, value in rows[0].items():
        if isinstance(value, float):
            summary[key] = statistics.median(row[key] for row in rows)
        else:
            summary[key] = value
    ratio = "ratio" if "ratio" in summary else "p50_ratio"
    over = spread([row[ratio] for row in rows])
    summary[ratio], summary[f"{ratio}_low"], summary[f"{ratio}_high"] = over
    return summary


def run(
    quick: bool = True,
    transport: str = "both",
    json_path: str | None = None,
    payloads: Sequence[int] = PAYLOADS,
    repeat: int = 1,
) -> int:
    """Run the benchmark and print its table; ``ratio`` is streamkit's speed over naive.

    Each row: every side's median frames/s and MB/s, the median ratio and its
    range, streamkit against the raw sockets (``sk/raw``, length4 rows) and
    the receivers' minor page faults per MB received.

    ``transport`` is ``"tcp"``, ``"unix"`` or ``"both"``; ``payloads`` the
    payload sizes in bytes; with ``json_path`` the rows are also written
    there as JSON. The benchmark also runs on ``uvloop`` when it is
    installed. With ``repeat`` > 1 the whole table is measured that many
    times, each pass's rows printed as they come, then one table of them
    all: each column's median, and the ratio's median and range over the
    passes (:func:`_over_passes`). Returns 0 (the exit status).
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
        f"{', quick' if quick else ''}; {allocator()}; faults: the receiver's minor page faults"
        + (f"; {repeat} passes" if repeat > 1 else "")
    )
    print(_HEAD)
    passes: list[list[dict[str, Any]]] = []
    context = multiprocessing.get_context("spawn")
    for number in range(1, repeat + 1):
        if repeat > 1:
            print(f"-- pass {number} of {repeat}", flush=True)
        rows: list[dict[str, Any]] = []
        passes.append(rows)
        for loop_name in loops:
            for transport_name in transports:
                for lines in (False, True):
                    for size in payloads:
                        rows.append(
                            _measure_row(context, loop_name, transport_name, lines, size, quick)
                        )
                        _print_row(rows[-1])
                rows.append(_measure_latency(context, loop_name, transport_name, quick))
                _print_latency(rows[-1])
    results: dict[str, Any] = {"python": sys.version, "quick": quick}
    if repeat > 1:
        print(
            f"-- over the {repeat} passes: each column's median; ratio: the median of the "
            "passes' ratios, range: theirs (lowest-highest)"
        )
        print(_HEAD)
        rows = [_over_passes(same) for same in zip(*passes, strict=True)]
        for row in rows:
            (_print_row if "ratio" in row else _print_latency)(row)
        results["passes"] = passes
    results["rows"] = rows
    if json_path:
        with open(json_path, "w") as out:
            json.dump(results, out, indent=2)
    return 0


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
    add_repeat_option(parser)
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
            repeat=args.repeat,
        )
    except (RuntimeError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m streamkit bench``: the quick benchmark over TCP by default.

    Flags: ``--quick`` (default) / ``--full``, ``--transport tcp|unix|both``,
    ``--json PATH``, ``--payloads BYTES...``, ``--repeat N``. Bad arguments
    exit with status 2 (``SystemExit``, as argparse does); otherwise returns
    the exit status.
    """
    return _run_args(_parse(argv, "python -m streamkit bench", full=False, transport="tcp"))


def script_main(argv: list[str] | None = None) -> int:
    """``benchmarks/bench_streams.py``: the same flags, full runs on both transports by default."""
    return _run_args(_parse(argv, "bench_streams.py", full=True, transport="both"))
