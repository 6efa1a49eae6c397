"""Sessions behind a load balancer: node processes, a Balancer that cuts, resumes relayed.

Each node is a process of its own (tests/_cluster_node.py) on loopback, its
cluster port on a Unix socket in the test's directory; the test process
runs the clients and a :class:`streamkit.testing.Balancer` in front of the
nodes' public ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from streamkit.errors import ResumeRejected
from streamkit.session import Backoff, ClientSession, SessionSettings, connect_resumable
from streamkit.session.cluster import node_of
from streamkit.testing import Balancer

NODE = str(Path(__file__).with_name("_cluster_node.py"))
#: Clients that come back fast after a cut, and keep trying through a busy machine's minute.
CLIENT = SessionSettings(
    reconnect_backoff=Backoff(initial=0.02, maximum=0.3), max_reconnect_time=120
)


class Node:
    """A node process: ``start()`` waits until it listens, ``stop()`` returns its summary."""

    def __init__(self, name: str, directory: Path, names: str, frames: int, env: dict[str, str]):
        self.name = name
        self.args = (NODE, name, str(directory), names, str(frames))
        self.env = env
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> Node:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 20)
        self.port = json.loads(line)["port"]
        return self

    async def stop(self) -> dict[str, Any]:
        """Close the node gracefully; its summary (see tests/_cluster_node.py)."""
        process = self.process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.close()
        output, _ = await asyncio.wait_for(process.communicate(), 20)
        summary: dict[str, Any] = json.loads(output)
        return summary

    async def kill(self) -> None:
        process = self.process
        assert process is not None
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.communicate()


@asynccontextmanager
async def cluster(
    directory: Path, names: str = "a,b,c", *, frames: int, interval: float = 0.02
) -> AsyncIterator[tuple[list[Node], Balancer]]:
    """Node processes ``names`` behind a Balancer; killed on the way out if still running."""
    env = {
        **os.environ,
        "STREAMKIT_TEST_CLUSTER_KEY": secrets.token_hex(32),
        "STREAMKIT_TEST_INTERVAL": str(interval),
    }
    nodes = [Node(name, directory, names, frames, env) for name in names.split(",")]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        async with Balancer([("127.0.0.1", node.port) for node in nodes]) as balancer:
            yield nodes, balancer
    finally:
        for node in nodes:
            if node.process is not None and node.process.returncode is None:
                await node.kill()


async def exchange(session: ClientSession, frames: int, interval: float) -> None:
    """The client's half of tests/_cluster_node.py's numbered frames; closes the session."""

    async def send_numbered() -> None:
        for number in range(frames):
            await session.send(b"c%d" % number)
            await asyncio.sleep(interval)

    sending = asyncio.create_task(send_numbered())
    try:
        for number in range(frames):
            assert await session.recv() == b"s%d" % number
        assert await session.recv() == b"done"
        await sending
        await session.close()
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending


async def abandon(tasks: list[asyncio.Task[None]], sessions: list[ClientSession]) -> None:
    """Cancel what is left of ``tasks`` (one failed) and abort ``sessions`` that remain open."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for session in sessions:
        session.abort()
    await asyncio.sleep(0.1)  # the aborted connections' callbacks run


async def cut_every(balancer: Balancer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        balancer.cut()


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(60, marks=pytest.mark.timeout(90), id="3s"),
        pytest.param(1200, marks=[pytest.mark.slow, pytest.mark.timeout(600)], id="soak"),
    ],
)
async def test_sessions_survive_cuts_through_any_node(tmp_path: Path, frames: int) -> None:
    """200 sessions, frames both ways every 50 ms, every link cut every 200 ms (3 s; soak: 60 s)."""
    sessions, interval = 200, 0.05
    async with cluster(tmp_path, frames=frames, interval=interval) as (nodes, balancer):
        # Opened before the cuts start: a first handshake cut short is not retried.
        done = [
            await connect_resumable("127.0.0.1", balancer.port, settings=CLIENT)
            for _ in range(sessions)
        ]
        cutting = asyncio.create_task(cut_every(balancer, 0.2))
        exchanges = [asyncio.create_task(exchange(session, frames, interval)) for session in done]
        try:
            await asyncio.gather(*exchanges)
        finally:
            cutting.cancel()
            await abandon(exchanges, done)
        summaries = [await node.stop() for node in nodes]
    reconnects = sum(session.stats.reconnects for session in done)
    # Every session was cut and resumed (how often depends on the machine's
    # pace: a cut that hits a handshake costs a try, not a resume).
    assert all(session.stats.reconnects >= 1 for session in done)
    for summary in summaries:
        assert summary["problems"] == []
    started = [session_id for summary in summaries for session_id in summary["started"]]
    assert sorted(started) == sorted(session.id for session in done)  # each handler ran once
    for node, summary in zip(nodes, summaries, strict=True):  # each session on its owner
        assert {node_of(bytes.fromhex(sid)) for sid in summary["started"]} <= {node.name}
    stats = [summary["stats"] for summary in summaries]
    resumes = sum(each["resumes"] for each in stats)
    relayed = sum(each["cluster"]["relayed_in"] for each in stats)
    assert sum(each["cluster"]["relayed_out"] for each in stats) == relayed
    assert resumes >= reconnects  # close() may resume once more
    assert relayed > resumes / 2  # most resumes reached another node first
    assert all(each["cluster"]["relays_failed"] == 0 for each in stats)


@pytest.mark.timeout(90)
async def test_a_dead_owner_ends_its_sessions_and_no_other(tmp_path: Path) -> None:
    frames, interval, deadline = 150, 0.02, 3.0  # the nodes' relay_timeout
    async with cluster(tmp_path, frames=frames, interval=interval) as (nodes, balancer):
        sessions = [
            await connect_resumable("127.0.0.1", balancer.port, settings=CLIENT) for _ in range(30)
        ]
        exchanges = [asyncio.create_task(exchange(s, frames, interval)) for s in sessions]
        await asyncio.sleep(0.5)
        victim = nodes[1]
        await victim.kill()
        killed_at = asyncio.get_running_loop().time()
        ended: dict[str, float] = {}

        async def watch(session: ClientSession, task: asyncio.Task[None]) -> BaseException | None:
            try:
                await task
            except ResumeRejected as exc:
                ended[session.id] = asyncio.get_running_loop().time() - killed_at
                return exc
            return None

        try:
            results = await asyncio.gather(
                *(watch(s, t) for s, t in zip(sessions, exchanges, strict=True))
            )
        finally:
            await abandon(exchanges, sessions)
        summaries = [await node.stop() for node in nodes if node is not victim]
    owned = {s.id for s in sessions if node_of(bytes.fromhex(s.id)) == victim.name}
    assert owned and len(owned) < len(sessions)
    assert set(ended) == owned  # the dead node's sessions, and only those, were rejected
    assert all(elapsed < deadline + 5 for elapsed in ended.values())
    for session, result in zip(sessions, results, strict=True):
        if session.id in owned:
            assert "node 'b'" in str(result)
    for summary in summaries:
        assert summary["problems"] == []
