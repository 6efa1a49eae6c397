"""``python -m streamkit demo``: a resumable echo session through a cutting proxy.

Everything runs in this process on loopback: a resumable echo server, a
:class:`~streamkit.testing.FaultProxy` in front of it that cuts the
connection at random moments (often in the middle of a frame), and a client
that streams numbered frames through the proxy and checks every echo. It
ends with a summary verified against what was sent.
"""

from __future__ import annotations

import asyncio
import sys
import time

from streamkit.session import (
    Backoff,
    ServerSession,
    SessionSettings,
    connect_resumable,
    serve_resumable,
)
from streamkit.testing import FaultProxy

__all__ = ["run"]

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


async def _run(frames: int, cut_every: float, seed: int) -> int:
    expected = [b"frame %06d " % n + b"." * (n % 200) for n in range(frames)]
    print(f"streamkit demo: {frames} frames echoed through a proxy that cuts the connection")
    print(f"about every {cut_every * 1000:.0f} ms (seed {seed}), often in the middle of a frame.")
    start = time.perf_counter()
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
        received: list[bytes] = []
        for _ in expected:
            received.append(await session.recv(timeout=30))
            if len(received) % 250 == 0:
                _progress(
                    f"  {len(received):>6}/{frames} echoed, "
                    f"{proxy.stats.cuts} cuts, {session.stats.reconnects} reconnects"
                )
        await sender
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
    if not in_order or cuts == 0:
        print("demo FAILED", file=sys.stderr)
        return 1
    return 0


def run(frames: int = 20_000, cut_every: float = 0.03, seed: int = 1) -> int:
    """Run the demo; returns 0 when every echo came back exactly once, in order."""
    return asyncio.run(_run(frames, cut_every, seed))
