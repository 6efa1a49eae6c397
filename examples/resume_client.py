"""A resumable-session client: streams numbered messages and checks every answer.

    python examples/resume_client.py [PORT] [COUNT]

Run it through a proxy you can cut, and nothing is lost:

    python examples/resume_server.py 8765
    python -m streamkit proxy --listen 9000 --target 127.0.0.1:8765 --cut-every 0.5
    python examples/resume_client.py 9000 2000

A cut connection is resumed by the session itself. A restarted server has
lost the session (sessions live in its memory): the client is refused with
ResumeRejected, opens a new session and sends again from the first message
not yet answered, which the new server has never seen.
"""

from __future__ import annotations

import asyncio
import sys

from streamkit import ConnectionLost, ResumeRejected, SessionExpired
from streamkit.session import connect_resumable


async def main(port: int, count: int) -> int:
    answered = reconnects = replayed = 0  # progress that outlives any one session
    while answered < count:
        try:
            async with connect_resumable("127.0.0.1", port, keepalive_interval=1.0) as session:

                async def send_all(first: int) -> None:
                    for n in range(first, count):
                        await session.send(b"message %d" % n)
                        await asyncio.sleep(0.001)  # a steady stream, so cuts land mid-stream

                sender = asyncio.create_task(send_all(answered))
                try:
                    while answered < count:
                        answer = await session.recv()
                        if answer != b"got message %d" % answered:
                            print(f"wrong answer {answer!r} for message {answered}")
                            return 1
                        answered += 1
                        if answered % 200 == 0:
                            so_far = reconnects + session.stats.reconnects
                            print(f"{answered:>6} answered, reconnects so far: {so_far}")
                    await sender
                finally:
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                    reconnects += session.stats.reconnects
                    replayed += session.stats.frames_replayed
        except (ResumeRejected, SessionExpired, ConnectionRefusedError, ConnectionLost) as exc:
            # The server lost our session (it restarted) or is still down, or
            # the link broke before the session opened or for longer than
            # max_reconnect_time (ConnectionLost): what was not answered is
            # lost with the session, so send again from there.
            print(f"session lost ({exc}); a new session from message {answered}")
            await asyncio.sleep(0.2)
    print(f"all {count} messages answered in order; reconnects={reconnects}, replayed={replayed}")
    return 0


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    sys.exit(asyncio.run(main(port, count)))
