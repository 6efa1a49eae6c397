"""A resumable-session server: counts each client's messages and answers every one.

    python examples/resume_server.py [PORT]

A client that loses its connection reconnects into the same running
handler, which never notices the drop (see resume_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from streamkit.session import ServerSession, serve_resumable


async def handler(session: ServerSession) -> None:
    count = 0
    async for message in session:
        count += 1
        await session.send(b"got " + message)
    print(f"session {session.id[:8]} ended after {count} messages, stats: {session.stats}")


async def main(port: int) -> None:
    server = await serve_resumable(handler, "127.0.0.1", port, resume_timeout=30)
    print(f"resumable server on 127.0.0.1:{server.port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(port))
