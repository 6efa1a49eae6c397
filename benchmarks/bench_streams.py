"""Framed-stream throughput and latency: streamkit against naive asyncio, side by side.

    python benchmarks/bench_streams.py [--quick] [--transport tcp|unix|both] [--json PATH]

Two processes over loopback TCP and a Unix socket, payloads 16 B to 1 MiB,
streamkit LengthPrefixed(4) and Lines against the naive baseline in the same
run, plus 64 B echo latency; see ``streamkit/bench.py`` for what each row
measures. ``python -m streamkit bench`` runs the quick version.
"""

from __future__ import annotations

import argparse
import sys

from streamkit.bench import PAYLOADS, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--transport", choices=("tcp", "unix", "both"), default="both")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--payloads", type=int, nargs="+", default=PAYLOADS, metavar="BYTES", help="sizes"
    )
    args = parser.parse_args(argv)
    return run(
        quick=args.quick, transport=args.transport, json_path=args.json, payloads=args.payloads
    )


if __name__ == "__main__":
    sys.exit(main())
