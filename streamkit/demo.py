"""``python -m streamkit demo``: a resumable echo session through a cutting proxy.

Everything runs in this process on loopback: a resumable echo server, a
:class:`~streamkit.testing.FaultProxy` in front of it that cuts the
connection at random moments (often in the middle of a frame), and a client
that streams numbered frames through the proxy and checks every echo. It
ends with a summary verified against what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from streamkit import _args
from streamkit.errors import StreamkitError
from streamkit.session import (
    Backoff,
    ServerSession,
    SessionSettings,
    connect_resumable,
    serve_resumable,
)
from streamkit.testing import FaultProxy

__all__ = ["main", "run"]

_SETTINGS = SessionSettings(
    keepalive_interval=0.5,
    keepalive_timeout=1.5,
    reconnect_backoff=Backoff(initial=0.005, maximum=0.05),
    handshake_timeout=2.0,
)


async def _echo(session: ServerSession) -> None:
    async for payload in session:
        await session.send(payload)


def _progress(text: str, *, done: bool = False) -> None:
    if sys.stdout.isatty():
        print(f"\r{text}", end="\n" if done else "", flush=True)
    elif done:
        print(text)


class _Seen:
    """What the demo has seen so far, kept outside the timeout so a failure can report it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []


async def _run(frames: int, cut_every: float, seed: int, seen: _Seen) -> int:
    expected = [b"frame %06d " % n + b"." * (n % 200) for n in range(frames)]
    print(f"streamkit demo: {frames} frames echoed through a proxy that cuts the connection")
    print(f"about every {cut_every * 1000:.0f} ms (seed {seed}), often in the middle of a frame.")
    start = time.perf_counter()
    received = seen.received
    async with (
        await serve_resumable(_echo, "127.0.0.1", 0, settings=_SETTINGS) as server,
        FaultProxy("127.0.0.1", server.port, seed=seed) as proxy,
        connect_resumable("127.0.0.1", proxy.port, settings=_SETTINGS) as session,
    ):
        print(f"server on 127.0.0.1:{server.port}, proxy on 127.0.0.1:{proxy.port}")
        proxy.cut_every(cut_every)

        async def send_all() -> None:
            for payload in expected:
                await session.send(payload)
                await asyncio.sleep(0)  # a steady stream, so cuts land mid-stream

        sender = asyncio.create_task(send_all())
        try:
            for _ in expected:
                received.append(await session.recv())
                if len(received) % 250 == 0:
                    _progress(
                        f"  {len(received):>6}/{frames} echoed, "
                        f"{proxy.stats.cuts} cuts, {session.stats.reconnects} reconnects"
                    )
            await sender
        finally:
            sender.cancel()
        proxy.stop_cutting()
        stats = session.stats
        cuts = proxy.stats.cuts
    seconds = time.perf_counter() - start
    _progress(f"  {len(received):>6}/{frames} echoed", done=True)
    lost = len(set(expected) - set(received))
    in_order = received == expected
    print(f"frames sent             {stats.frames_sent}")
    print(f"echoes received         {stats.frames_received}")
    print(f"connections cut         {cuts}")
    print(f"reconnects              {stats.reconnects}")
    print(f"frames replayed         {stats.frames_replayed}")
    print(f"duplicates dropped      {stats.duplicates_dropped}")
    print(f"lost                    {lost}")
    print(f"in order, exactly once  {'yes' if in_order else 'NO'}")
    print(f"time                    {seconds:.2f} s")
    if not in_order or stats.frames_sent != frames or stats.frames_received != frames:
        print("demo FAILED: the echoes differ from what was sent", file=sys.stderr)
        return 1
    if cuts == 0:
        print("demo FAILED: the proxy never cut the connection", file=sys.stderr)
        return 1
    return 0


def _time_limit(frames: int) -> float:
    """Seconds the demo may take: about a hundred times what it needs on a laptop."""
    return 10 + frames / 1000


def run(frames: int = 20_000, cut_every: float = 0.03, seed: int = 1) -> int:
    """Run the demo; returns 0 when every echo came back exactly once, in order.

    It always ends by itself: after ``10 + frames / 1000`` seconds it gives
    up, prints why on stderr and returns 1, as it does when the session fails.
    """
    limit = _time_limit(frames)
    seen = _Seen()

    async def bounded() -> int:
        async with asyncio.timeout(limit):
            return await _run(frames, cut_every, seed, seen)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        reason = f"timed out after {limit:g} s with {len(seen.received)}/{frames} echoed"
    except (StreamkitError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    print(f"demo FAILED: {reason}", file=sys.stderr)
    return 1


def _interval(text: str) -> float:
    value = _args.number(text)
    if not 0 < value < 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, > 0 and < 60")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m streamkit demo``; ``argv`` are the arguments after ``demo``.

    Returns 0 when every echo came back exactly once and in order, else 1.
    Bad arguments print a one-line error and raise ``SystemExit(2)``.
    """
    parser = _args.Parser(
        prog="python -m streamkit demo",
        description="A resumable echo session through a proxy that keeps cutting it: "
        "every frame must come back exactly once, in order.",
    )
    parser.add_argument("--frames", type=_args.count, default=20_000, help="frames to echo (20000)")
    parser.add_argument(
        "--cut-every",
        type=_interval,
        default=0.03,
        metavar="SECONDS",
        help="mean time between cuts (0.03)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the proxy's random seed (1)")
    args = parser.parse_args(argv)
    return run(args.frames, args.cut_every, args.seed)
