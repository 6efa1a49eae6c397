"""The ``python -m streamkit`` command line: demo and tools."""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from typing import Any

from streamkit.codecs import Codec, JsonLines, LengthPrefixed, Lines, VarintPrefixed

__all__ = ["main"]


def _demo_codecs(seed: int) -> int:
    """Encode frames with each codec, feed them back in random chunks, check them."""
    rng = random.Random(seed)
    cases: list[tuple[str, Codec[Any], list[Any]]] = [
        ("LengthPrefixed(4)", LengthPrefixed(), [b"hello", b"", bytes(range(256)) * 40]),
        ("VarintPrefixed", VarintPrefixed(), [b"x" * 300, b"protobuf-style"]),
        ("Lines", Lines(), ["first line", "zweite Zeile ü", ""]),
        ("JsonLines", JsonLines(), [{"id": 1, "text": "hi"}, [1, 2, 3], None]),
    ]
    for name, codec, frames in cases:
        wire = codec.encode_many(frames)
        decoder = codec.decoder()
        decoded: list[Any] = []
        pos = chunks = 0
        while pos < len(wire):
            step = rng.randint(1, 64)
            decoded += decoder.feed(wire[pos : pos + step])
            pos += step
            chunks += 1
        decoder.close()
        status = "ok" if decoded == frames else "MISMATCH"
        print(
            f"{name:<18} {len(frames)} frames, {len(wire):>6} bytes on the wire, "
            f"fed in {chunks:>4} random chunks -> {len(decoded)} frames decoded: {status}"
        )
        if decoded != frames:
            return 1
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamkit",
        description="streamkit: framed stream protocols over TCP and Unix sockets.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser("demo", help="a self-contained demonstration")
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo_codecs(args.seed)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
