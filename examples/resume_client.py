"""A resumable-session client: streams numbered messages and checks every answer.

    python examples/resume_client.py [PORT] [COUNT]

Run it through a proxy you can cut, and nothing is lost:

    python examples/resume_server.py 8765
    python -m streamkit proxy --listen 9000 --target 127.0.0.1:8765 --cut-every 0.5
    python examples/resume_client.py 9000 2000
"""

from __future__ import annotations

import asyncio
import sys

from streamkit.session import connect_resumable


async def main(port: int, count: int) -> int:
    async with connect_resumable("127.0.0.1", port, keepalive_interval=1.0) as session:

        async def send_all() -> None:
            for n in range(count):
                await session.send(b"message %d" % n)
                await asyncio.sleep(0.001)  # a steady stream, so cuts land mid-stream

        sender = asyncio.create_task(send_all())
        for n in range(count):
            answer = await session.recv()
            if answer != b"got message %d" % n:
                print(f"wrong answer {answer!r} for message {n}")
                return 1
            if n % 200 == 0:
                print(f"{n:>6} answered, reconnects so far: {session.stats.reconnects}")
        await sender
        stats = session.stats
    print(
        f"all {count} messages answered in order; reconnects={stats.reconnects}, "
        f"replayed={stats.frames_replayed}, duplicates dropped={stats.duplicates_dropped}"
    )
    return 0


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    sys.exit(asyncio.run(main(port, count)))
