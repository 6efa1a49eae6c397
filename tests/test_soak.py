"""Soak tests (``STREAMKIT_SLOW=1``): long runs of what CI runs briefly.

CI runs the short versions in test_testing.py, test_session_properties.py
and test_hub.py; these run for a minute each through the cutting proxy.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from streamkit.session import (
    Backoff,
    ServerSession,
    SessionOptions,
    connect_resumable,
    serve_resumable,
)
from streamkit.testing import FaultProxy

SOAK_SECONDS = 60.0
FAST: SessionOptions = {
    "keepalive_interval": 0.1,
    "keepalive_timeout": 0.3,
    "handshake_timeout": 1.0,
    "reconnect_backoff": Backoff(initial=0.002, maximum=0.02),
}


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS * 3)
async def test_session_soak_through_cuts_delays_and_blackholes() -> None:
    rng = random.Random(99)
    server_got: list[bytes] = []

    async def echo(session: ServerSession) -> None:
        async for payload in session:
            server_got.append(payload)
            await session.send(payload)

    client_options: SessionOptions = {**FAST, "max_unacked_frames": 256}
    async with (
        await serve_resumable(echo, "127.0.0.1", 0, **FAST) as server,
        FaultProxy("127.0.0.1", server.port, seed=5) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **client_options) as session,
    ):
        proxy.cut_every(0.02)
        sent: list[bytes] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOAK_SECONDS

        async def send_until_deadline() -> None:
            while loop.time() < deadline:
                payload = rng.randbytes(rng.randint(0, 4000))
                sent.append(payload)
                await session.send(payload)
                if rng.random() < 0.001:  # now and then, a half-open spell
                    proxy.blackhole()
                    await asyncio.sleep(0.5)
                    proxy.restore()

        sending = asyncio.create_task(send_until_deadline())
        echoed: list[bytes] = []
        while not sending.done() or len(echoed) < len(sent):
            echoed.append(await session.recv(timeout=30))
        await sending
        proxy.stop_cutting()
    assert server_got == sent
    assert echoed == sent
    assert proxy.stats.cuts > SOAK_SECONDS * 10
