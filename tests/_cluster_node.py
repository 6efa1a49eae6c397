"""A node of a test cluster, a process: ``python tests/_cluster_node.py NODE DIR NODES N``.

Serves resumable sessions on 127.0.0.1 (a free port) as node ``NODE`` of a
cluster whose nodes (``NODES``, comma-separated) have their cluster ports on
Unix sockets ``DIR/<node>.sock``; the cluster key is the hex of
``$STREAMKIT_TEST_CLUSTER_KEY``. Prints ``{"node": ..., "port": ...}`` once
it listens. Each session's handler exchanges numbered frames with its
client: it sends ``s0`` .. ``s<N-1>`` (one every ``$STREAMKIT_TEST_INTERVAL``
seconds) while it checks that ``c0`` .. ``c<N-1>`` arrive exactly once and
in order, then sends ``done`` and waits for the client to close; ``N`` of
0 goes on until the client closes. When stdin ends, it closes the server
and prints a summary: the sessions whose handler started (one entry per
start), what went wrong in handlers, and the server's stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys

from streamkit.errors import EndOfStream, SessionError
from streamkit.session import ServerSession, serve_resumable
from streamkit.session.cluster import Cluster, StaticPeers

KEY_VARIABLE = "STREAMKIT_TEST_CLUSTER_KEY"
INTERVAL_VARIABLE = "STREAMKIT_TEST_INTERVAL"


async def main(node: str, directory: str, nodes: str, frames: int) -> None:
    interval = float(os.environ.get(INTERVAL_VARIABLE, "0.02"))
    peers = StaticPeers(
        {name: os.path.join(directory, f"{name}.sock") for name in nodes.split(",")}
    )
    cluster = Cluster(node, peers, bytes.fromhex(os.environ[KEY_VARIABLE]), relay_timeout=3.0)
    started: list[str] = []
    problems: list[str] = []

    async def send_numbered(session: ServerSession) -> None:
        number = 0
        while not frames or number < frames:
            await session.send(b"s%d" % number)
            number += 1
            await asyncio.sleep(interval)

    async def handler(session: ServerSession) -> None:
        started.append(session.id)
        sending = asyncio.create_task(send_numbered(session))
        try:
            number = 0
            while not frames or number < frames:
                payload = await session.recv()
                if payload != b"c%d" % number:
                    problems.append(f"{session.id}: expected c{number}, got {payload[:20]!r}")
                    return
                number += 1
            await sending
            await session.send(b"done")
            async for payload in session:
                problems.append(f"{session.id}: a frame after the last: {payload[:20]!r}")
        except EndOfStream:
            if frames:
                problems.append(f"{session.id}: the client closed before c{frames - 1}")
        except SessionError:
            pass  # the session expired or its client gave up: the client's test says
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, SessionError):
                await sending

    server = await serve_resumable(handler, "127.0.0.1", 0, cluster=cluster)
    print(json.dumps({"node": node, "port": server.port}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until stdin ends
    stats = server.stats
    server.close()
    await server.wait_closed()
    summary = {"started": started, "problems": problems, "stats": dataclasses.asdict(stats)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
