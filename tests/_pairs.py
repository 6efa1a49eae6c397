"""Real connected stream pairs for tests: loopback TCP (IPv4, IPv6) and Unix sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from streamkit import FramedStream
from streamkit.codecs import Codec

HAS_IPV6 = socket.has_ipv6
try:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
except OSError:
    HAS_IPV6 = False


@asynccontextmanager
async def stream_pair(
    codec: Codec[Any],
    where: str = "tcp",
    tmp_path: Path | None = None,
    *,
    server_codec: Codec[Any] | None = None,
    limit: int = 2**16,
    **options: Any,
) -> AsyncIterator[tuple[FramedStream[Any], FramedStream[Any]]]:
    """Yield (client, server) framed streams over a real socket; ``where``: tcp, tcp6, unix."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    if where == "unix":
        assert tmp_path is not None
        path = str(tmp_path / "pair.sock")
        server = await asyncio.start_unix_server(on_connection, path, limit=limit)
        reader, writer = await asyncio.open_unix_connection(path, limit=limit)
    else:
        host = "::1" if where == "tcp6" else "127.0.0.1"
        server = await asyncio.start_server(on_connection, host, 0, limit=limit)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(host, port, limit=limit)
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
