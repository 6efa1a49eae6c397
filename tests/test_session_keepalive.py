"""Keepalive: pings find half-open connections, and a ping answered is progress."""

from __future__ import annotations

import asyncio

import pytest

from streamkit.session import connect_resumable
from streamkit.testing import FaultProxy
from tests._sessions import FAST, echo_server, fast


async def test_keepalive_detects_half_open_connection() -> None:
    async with (
        echo_server() as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        await session.send(b"before")
        assert await session.recv() == b"before"
        # Half-open: nothing gets through, yet no end of stream or reset arrives.
        proxy.blackhole()
        await session.send(b"during")
        with pytest.raises(TimeoutError):
            await session.recv(timeout=0.2)
        for _ in range(250):  # keepalive_timeout (0.6 s) lets go of the silent link
            if not session.connected:
                break
            await asyncio.sleep(0.02)
        assert not session.connected and session.stats.reconnects == 0
        proxy.restore()
        assert await session.recv(timeout=5) == b"during"
        assert session.stats.reconnects == 1


async def test_an_idle_session_cut_again_and_again_lives_on() -> None:
    """Each resume of an idle session is progress (its ping is answered), however many."""
    async with (
        echo_server() as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **fast(max_reconnect_time=0.2)) as session,
    ):
        for _ in range(8):  # cuts spread over more than max_reconnect_time
            pongs = session.core.pongs
            for _ in range(500):
                if session.core.pongs > pongs:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            before = session.stats.connections
            assert proxy.cut() == 1
            async with asyncio.timeout(5):
                await session.wait_connected(before)
            assert not session.closed
        await session.send(b"still here")
        assert await session.recv(timeout=5) == b"still here"
        assert session.stats.reconnects == 8
