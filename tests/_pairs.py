"""Real connected stream pairs for tests: loopback TCP (IPv4, IPv6) and Unix sockets.

A pair's streams read the way ``streamkit.net`` makes them (a
:class:`~streamkit.stream.StreamProtocol` under each reader) or, with
``reading="asyncio"``, over ``asyncio``'s own stream protocol (a
``FramedStream`` made from a user's ``asyncio.open_connection``). A test
module can switch its default with :data:`READING`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from streamkit import FramedStream
from streamkit.codecs import Codec
from streamkit.stream import StreamProtocol

#: How pairs read by default: "streamkit" (StreamProtocol) or "asyncio".
READING = "streamkit"

HAS_IPV6 = socket.has_ipv6
try:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
except OSError:
    HAS_IPV6 = False


async def listen_and_connect(
    sock: socket.socket,
    on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter], None],
    limit: int,
    reading: str | None = None,
    client_sock: socket.socket | None = None,
) -> tuple[asyncio.Server, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Listen on the bound ``sock``; connect to it (from ``client_sock``), as ``reading``."""
    loop = asyncio.get_running_loop()
    address = sock.getsockname()
    unix = sock.family == socket.AF_UNIX
    if (reading or READING) == "asyncio":
        if unix:
            server = await asyncio.start_unix_server(on_connection, sock=sock, limit=limit)
        else:
            server = await asyncio.start_server(on_connection, sock=sock, limit=limit)
        if client_sock is not None:
            await loop.sock_connect(client_sock, address)
            return server, await asyncio.open_connection(sock=client_sock, limit=limit)
        if unix:
            return server, await asyncio.open_unix_connection(address, limit=limit)
        return server, await asyncio.open_connection(*address[:2], limit=limit)
    factory = StreamProtocol.factory(on_connection, limit=limit)
    if unix:
        server = await loop.create_unix_server(factory, sock=sock)
    else:
        server = await loop.create_server(factory, sock=sock)
    if client_sock is not None:
        await loop.sock_connect(client_sock, address)
        return server, await StreamProtocol.open(
            lambda protocol: loop.create_connection(protocol, sock=client_sock), limit=limit
        )
    if unix:
        return server, await StreamProtocol.open(
            lambda protocol: loop.create_unix_connection(protocol, address), limit=limit
        )
    return server, await StreamProtocol.open(
        lambda protocol: loop.create_connection(protocol, *address[:2]), limit=limit
    )


@asynccontextmanager
async def stream_pair(
    codec: Codec[Any],
    where: str = "tcp",
    tmp_path: Path | None = None,
    *,
    server_codec: Codec[Any] | None = None,
    limit: int = 2**16,
    reading: str | None = None,
    **options: Any,
) -> AsyncIterator[tuple[FramedStream[Any], FramedStream[Any]]]:
    """Yield (client, server) framed streams over a real socket; ``where``: tcp, tcp6, unix."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    sock: socket.socket | None = None
    if where == "unix":
        assert tmp_path is not None
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "pair.sock"))
    else:
        sock = socket.socket(socket.AF_INET6 if where == "tcp6" else socket.AF_INET)
        sock.bind(("::1" if where == "tcp6" else "127.0.0.1", 0))
    server, (reader, writer) = await listen_and_connect(sock, on_connection, limit, reading)
    server_reader, server_writer = await accepted
    client = FramedStream(reader, writer, codec, **options)
    served = FramedStream(server_reader, server_writer, server_codec or codec, **options)
    try:
        yield client, served
    finally:
        for stream in (client, served):
            stream.abort()
        server.close()
        await server.wait_closed()


async def on_uvloop(main: Callable[[], Coroutine[Any, Any, None]], timeout: float = 20) -> None:
    """Run ``main()`` on uvloop, in a thread of its own, within ``timeout`` seconds.

    The test's own loop is asyncio's; skips the test where uvloop is not installed.
    """
    import pytest  # a test helper: only tests import this module

    uvloop = pytest.importorskip("uvloop")
    failure: list[BaseException] = []

    async def within_a_time_limit() -> None:
        async with asyncio.timeout(timeout):
            await main()

    def in_thread() -> None:
        try:
            uvloop.run(within_a_time_limit())
        except BaseException as exc:  # reported below
            failure.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    if failure:
        raise failure[0]
