"""Codec decode throughput against a naive parser, side by side in one run.

    python benchmarks/bench_codecs.py [--quick] [--json PATH]

Every codec decodes the same encoded stream, fed in 64 KiB chunks, for
payloads of 16 B, 256 B, 4 KiB and 64 KiB. The naive baseline is the parser
people write first: append each chunk to a ``bytes`` buffer, then in a loop
``struct.unpack`` the header (or ``find`` the delimiter), slice the frame
out and re-slice the rest of the buffer, copying it, once per frame. Lines
and JSON lines baselines also decode / parse each frame, as the codec does.

The last table feeds one 1, 4 and 16 MiB frame in 1 KiB chunks to show the
decoder is linear: 4x the bytes should take about 4x the time (a decoder
that re-joins or re-scans its buffer per chunk is quadratic and takes ~16x,
as the naive parser does on smaller frames; it would need minutes for
16 MiB). Above a few MiB the machine's memory (caches, page faults) adds
to every linear decoder too, so read ~4-6x as linear. The memory allocator
is as the user has it (the header line says which).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from _harness import allocator

from streamkit.codecs import Codec, Delimited, JsonLines, LengthPrefixed, Lines, VarintPrefixed

PAYLOADS = (16, 256, 4096, 64 * 1024)
CHUNK = 64 * 1024
MiB = 1024 * 1024
_HEADER = struct.Struct(">I")


def naive_length(chunks: Iterable[bytes]) -> int:
    buf = b""
    frames = 0
    for chunk in chunks:
        buf += chunk
        while len(buf) >= 4:
            (size,) = _HEADER.unpack(buf[:4])
            if len(buf) < 4 + size:
                break
            _frame = buf[4 : 4 + size]
            buf = buf[4 + size :]
            frames += 1
    return frames


def naive_varint(chunks: Iterable[bytes]) -> int:
    buf = b""
    frames = 0
    for chunk in chunks:
        buf += chunk
        while buf:
            size = shift = pos = 0
            while pos < len(buf):
                byte = buf[pos]
                size |= (byte & 0x7F) << shift
                shift += 7
                pos += 1
                if not byte & 0x80:
                    break
            else:
                break  # the varint is not complete yet
            if len(buf) < pos + size:
                break
            _frame = buf[pos : pos + size]
            buf = buf[pos + size :]
            frames += 1
    return frames


def _naive_delimited(convert: Callable[[bytes], Any]) -> Callable[[Iterable[bytes]], int]:
    def parse(chunks: Iterable[bytes]) -> int:
        buf = b""
        frames = 0
        for chunk in chunks:
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                convert(buf[:end])
                buf = buf[end + 1 :]
                frames += 1
        return frames

    return parse


CASES: list[tuple[str, Codec[Any], Callable[[int], Any], Callable[[Iterable[bytes]], int]]] = [
    ("LengthPrefixed(4)", LengthPrefixed(), lambda n: b"x" * n, naive_length),
    ("VarintPrefixed", VarintPrefixed(), lambda n: b"x" * n, naive_varint),
    ("Delimited", Delimited(max_frame=MiB), lambda n: b"x" * n, _naive_delimited(bytes)),
    ("Lines", Lines(max_frame=MiB), lambda n: "x" * n, _naive_delimited(bytes.decode)),
    ("JsonLines", JsonLines(), lambda n: "x" * (n - 2), _naive_delimited(json.loads)),
]


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def _decode(codec: Codec[Any], chunks: list[bytes]) -> int:
    decoder = codec.decoder()
    frames = 0
    for chunk in chunks:
        frames += len(decoder.feed(chunk))
    decoder.close()
    return frames


def _best(repeats: int, work: Callable[[], int], expected: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        got = work()
        best = min(best, time.perf_counter() - start)
        assert got == expected, (got, expected)
    return best


def throughput(quick: bool) -> list[dict[str, Any]]:
    volume = 8 * MiB if quick else 32 * MiB
    repeats = 2 if quick else 5
    rows = []
    print(
        f"decode, fed in {CHUNK // 1024} KiB chunks; ratio = streamkit / naive (frames/s); "
        f"{allocator()}"
    )
    print(
        f"{'codec':<19}{'payload':>8}{'frames':>9}{'naive fr/s':>13}{'codec fr/s':>13}"
        f"{'MB/s':>8}{'ratio':>8}"
    )
    for name, codec, make, naive in CASES:
        for size in PAYLOADS:
            count = max(16, volume // size)
            wire = codec.encode_many([make(size)] * count)
            chunks = _chunks(wire, CHUNK)
            naive_s = _best(repeats, lambda: naive(chunks), count)  # noqa: B023
            codec_s = _best(repeats, lambda: _decode(codec, chunks), count)  # noqa: B023
            row = {
                "codec": name,
                "payload": size,
                "frames": count,
                "naive_frames_per_s": count / naive_s,
                "codec_frames_per_s": count / codec_s,
                "codec_mb_per_s": len(wire) / codec_s / 1e6,
                "ratio": naive_s / codec_s,
            }
            rows.append(row)
            print(
                f"{name:<19}{size:>7}B{count:>9}{row['naive_frames_per_s']:>13,.0f}"
                f"{row['codec_frames_per_s']:>13,.0f}{row['codec_mb_per_s']:>8.0f}"
                f"{row['ratio']:>7.1f}x"
            )
    return rows


def linearity(quick: bool) -> list[dict[str, Any]]:
    """One large frame in 1 KiB chunks: time grows with the bytes, not their square."""
    sizes = (MiB, 4 * MiB, 16 * MiB)
    repeats = 3 if quick else 7
    rows = []
    print("\none large frame fed in 1 KiB chunks (linear: 4x the bytes, ~4x the time); best")
    print(f"of {repeats}, sizes interleaved; the naive parser (re-joins its buffer) for contrast")
    print(f"{'codec':<19}{'1 MiB s':>9}{'4 MiB s':>9}{'16 MiB s':>10}{'16/4 MiB':>10}{'ms/MiB':>8}")
    for name, codec, make, _ in CASES[:3] if quick else CASES:
        big = type(codec)(max_frame=17 * MiB)  # type: ignore[call-arg]
        chunked = [_chunks(big.encode(make(size)), 1024) for size in sizes]
        best = [float("inf")] * len(sizes)
        for _ in range(repeats):
            for index, chunks in enumerate(chunked):
                best[index] = min(best[index], _best(1, lambda: _decode(big, chunks), 1))  # noqa: B023
        row = {
            "codec": name,
            "seconds": dict(zip(("1MiB", "4MiB", "16MiB"), best, strict=True)),
            "ratio_16_to_4": best[2] / best[1],
        }
        rows.append(row)
        print(
            f"{name:<19}{best[0]:>9.4f}{best[1]:>9.4f}{best[2]:>10.4f}{row['ratio_16_to_4']:>9.1f}x"
            f"{best[2] / 16 * 1e3:>8.2f}"
        )
    # The naive parser copies its whole buffer per chunk: quadratic, so it
    # gets sizes 16x smaller (16 MiB would take minutes).
    small = (64 * 1024, 256 * 1024, MiB)
    chunked = [_chunks(LengthPrefixed().encode(b"x" * size), 1024) for size in small]
    best = [min(_best(1, lambda: naive_length(c), 1) for _ in range(3)) for c in chunked]  # noqa: B023
    rows.append(
        {
            "codec": "naive length",
            "seconds": dict(zip(("64KiB", "256KiB", "1MiB"), best, strict=True)),
            "ratio_1_to_0.25": best[2] / best[1],
        }
    )
    print(
        f"{'naive, 64K/256K/1M':<19}{best[0]:>9.4f}{best[1]:>9.4f}{best[2]:>10.4f}"
        f"{best[2] / best[1]:>9.1f}x  (1 MiB / 256 KiB: quadratic is 16x)"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = {
        "python": sys.version,
        "throughput": throughput(args.quick),
        "linearity": linearity(args.quick),
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
