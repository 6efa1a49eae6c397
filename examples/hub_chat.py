"""A tiny chat room on a hub stream: live tail, and a reader that resumes after a cut.

    python examples/hub_chat.py

Starts a hub on loopback; alice and bob post to the "room" stream while a
third client tails it live through a FaultProxy, which cuts the tail's
connection twice mid-chat; it resumes and prints every message exactly once,
in order.
"""

from __future__ import annotations

import asyncio

from streamkit import hub
from streamkit.testing import FaultProxy

LINES = [
    ("alice", "hi bob"),
    ("bob", "hi alice"),
    ("alice", "streams survive cuts?"),
    ("bob", "watch the tail below"),
    ("alice", "nice"),
    ("bob", "bye"),
]


async def post(port: int, user: str, texts: list[str]) -> None:
    async with hub.connect("127.0.0.1", port) as client:
        for text in texts:
            await client.append_json("room", {"from": user, "text": text})
            await asyncio.sleep(0.05)


async def main() -> None:
    server = await hub.serve_hub("127.0.0.1", 0)
    async with (
        server,
        FaultProxy("127.0.0.1", server.port) as proxy,  # the tail's link, to cut
        hub.connect("127.0.0.1", proxy.port) as tail,
    ):
        await tail.create("room", content_type="application/json")
        posters = asyncio.gather(
            post(server.port, "alice", [t for u, t in LINES if u == "alice"]),
            post(server.port, "bob", [t for u, t in LINES if u == "bob"]),
        )
        seen = 0
        async for offset, message in tail.read_json("room", 0, live=True):
            print(f"[{offset}] {message['from']:>5}: {message['text']}")
            seen += 1
            if seen in (2, 4):
                print("        -- the tail's connection is cut; it resumes --")
                proxy.cut()  # both sides see the connection die, as on a real network
            if seen == len(LINES):
                break
        await posters
        print(f"{seen} messages, each once, in order; reconnects: {tail.session.stats.reconnects}")


if __name__ == "__main__":
    asyncio.run(main())
