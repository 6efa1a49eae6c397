"""A framed echo server: every frame that comes in goes back out.

python examples/echo_server.py [PORT]
"""

import asyncio
import contextlib
import sys

from streamkit import FramedStream, LengthPrefixed, serve


async def echo(stream: FramedStream[bytes]) -> None:
    async for frame in stream:  # until the client ends its side
        await stream.send(frame)


async def main(port: int) -> None:
    async with await serve(echo, "127.0.0.1", port, codec=LengthPrefixed()) as server:
        print(f"echo server on 127.0.0.1:{server.port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8765))
