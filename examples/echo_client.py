"""Send a few frames to the echo server and print what comes back.

python examples/echo_client.py [PORT]
"""

import asyncio
import sys

from streamkit import LengthPrefixed, connect


async def main(port: int) -> None:
    async with connect("127.0.0.1", port, codec=LengthPrefixed()) as stream:
        for text in ("hello", "framed", "world"):
            await stream.send(text.encode())
            print("echo:", (await stream.recv()).decode())


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8765))
