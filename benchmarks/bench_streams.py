"""Framed-stream throughput and latency: streamkit against naive asyncio, side by side.

    python benchmarks/bench_streams.py [--quick] [--transport tcp|unix|both] [--json PATH]
                                       [--payloads BYTES ...] [--repeat N]

Two processes over loopback TCP and a Unix socket, payloads 16 B to 1 MiB,
streamkit LengthPrefixed(4) and Lines against the naive baseline in the same
run, plus 64 B echo latency; also on uvloop if it is installed. The logic
lives in the private ``streamkit/_bench.py`` (see there for what each row
measures), because ``python -m streamkit bench`` runs the quick version of
the same thing. ``--repeat N`` measures the whole table N times and ends
with each row's median ratio and its range over the N passes (the shared
option of ``_harness.py``).
"""

from __future__ import annotations

import sys

from streamkit._bench import script_main

if __name__ == "__main__":
    sys.exit(script_main())
