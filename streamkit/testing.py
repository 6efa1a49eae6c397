"""Test helpers for services built on streamkit: a fault-injecting proxy.

:class:`FaultProxy` sits between a client and a server (TCP or Unix socket)
and forwards bytes both ways, with asyncio's flow control, until told to
misbehave: cut every connection now or at random moments (also in the
middle of a chunk, in either direction), add latency, or black-hole the
traffic while keeping the connections open (a half-open link, which only a
keepalive detects). Random choices come from one seeded ``random.Random``,
so a failing run can be repeated with its seed::

    async with FaultProxy("127.0.0.1", server_port, seed=7) as proxy:
        client = await connect_resumable("127.0.0.1", proxy.port)
        proxy.cut_every(0.1)            # a cut every 100 ms, give or take
        ...
        assert proxy.stats.cuts > 0

``python -m streamkit proxy --listen 9000 --target 127.0.0.1:8765
--cut-every 0.5`` runs one from the command line.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from streamkit._lifecycle import Closable

__all__ = ["FaultProxy", "ProxyStats"]

logger = logging.getLogger("streamkit.testing")

#: Bytes read per chunk on each side.
_CHUNK = 64 * 1024
_UP, _DOWN = "client->server", "server->client"


@dataclass(slots=True)
class ProxyStats:
    """What a :class:`FaultProxy` has done so far."""

    connections: int = 0  # accepted from clients
    cuts: int = 0  # connections cut
    bytes_up: int = 0  # forwarded client -> server
    bytes_down: int = 0  # forwarded server -> client
    bytes_dropped: int = 0  # swallowed while black-holed


class _Link:
    """One proxied connection: a client side and a server side."""

    __slots__ = ("client", "cut_after", "server")

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        # Set to (direction, n): forward n more bytes that way, then cut.
        self.cut_after: tuple[str, int] | None = None

    def abort(self) -> None:
        self.client.transport.abort()
        self.server.transport.abort()


class FaultProxy(Closable):
    """A proxy that forwards to ``target_host:target_port`` (or ``target_unix``) with faults.

    - ``cut()`` aborts every live connection now; ``cut_every(interval)``
      keeps cutting at random moments, half of them in the middle of the
      next chunk in a random direction (a part of it is forwarded, then the
      connection dies), so peers see torn frames.
    - ``delay`` (seconds, settable) holds each chunk that long before
      forwarding it (order is kept).
    - ``blackhole()`` swallows everything in both directions while the
      connections stay open; ``restore()`` forwards again. Bytes swallowed
      are gone, as on a dead route.
    - ``stats`` counts connections, cuts and bytes.

    Forwarding waits on ``drain()``, so a slow side slows the other and the
    proxy's memory stays bounded. ``close()`` / ``await wait_closed()`` (or
    ``async with``) stop listening and cut everything; every task the proxy
    starts ends with it.
    """

    def __init__(
        self,
        target_host: str | None = None,
        target_port: int | None = None,
        *,
        target_unix: str | None = None,
        seed: int | None = None,
        delay: float = 0.0,
    ) -> None:
        if (target_unix is None) == (target_host is None or target_port is None):
            raise ValueError("give target_host and target_port, or target_unix")
        self.target_host = target_host
        self.target_port = target_port
        self.target_unix = target_unix
        self.delay = delay
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # one per accepted connection
        self._server: asyncio.Server | None = None
        self._cutter: asyncio.Task[None] | None = None
        self._open = asyncio.Event()
        self._open.set()

    # -- lifecycle ----------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        """Listen on ``host``:``port`` (port 0 picks a free one); returns the proxy."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return self

    @property
    def port(self) -> int:
        """The port clients connect to."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients connect to."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._links)

    def close(self) -> None:
        """Stop listening, stop cutting and cut every connection."""
        if self._server is not None:
            self._server.close()
        self.stop_cutting()
        for link in self._links:
            link.abort()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until every task of the proxy has ended."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        if self._server is None:
            await self.start()
        return self

    # -- faults -------------------------------------------------------------

    def cut(self) -> int:
        """Abort every live connection now; returns how many were cut."""
        links = list(self._links)
        for link in links:
            self._cut(link, "now")
        return len(links)

    def cut_every(self, interval: float, *, jitter: float = 0.5) -> None:
        """Cut every connection at random moments, on average every ``interval`` seconds.

        Each wait is drawn uniformly from ``interval * (1 ± jitter)``. Half of
        the cuts happen inside the next chunk sent in a random direction.
        Replaces an earlier ``cut_every``; ``stop_cutting()`` ends it.
        """
        if interval <= 0 or not 0 <= jitter <= 1:
            raise ValueError("cut_every needs interval > 0 and 0 <= jitter <= 1")
        self.stop_cutting()
        self._cutter = asyncio.create_task(self._cut_loop(interval, jitter))

    def stop_cutting(self) -> None:
        """Stop the cuts started by ``cut_every``."""
        if self._cutter is not None:
            self._cutter.cancel()
            self._tasks.add(self._cutter)  # awaited by wait_closed
            self._cutter.add_done_callback(self._tasks.discard)
            self._cutter = None

    def blackhole(self) -> None:
        """Swallow all traffic, both ways, keeping every connection open."""
        self._open.clear()

    def restore(self) -> None:
        """Forward traffic again after ``blackhole()``."""
        self._open.set()

    async def _cut_loop(self, interval: float, jitter: float) -> None:
        rng = self._rng
        while True:
            await asyncio.sleep(interval * rng.uniform(1 - jitter, 1 + jitter))
            for link in list(self._links):
                if rng.random() < 0.5:
                    self._cut(link, "at a random moment")
                elif link.cut_after is None:
                    # Torn: let a few bytes of the next chunk through, then cut.
                    link.cut_after = (rng.choice((_UP, _DOWN)), rng.randrange(1, 64))

    def _cut(self, link: _Link, how: str) -> None:
        if link in self._links:
            self._links.discard(link)
            self.stats.cuts += 1
            logger.info("cut a connection %s", how)
        link.abort()

    # -- forwarding ---------------------------------------------------------

    async def _connect_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.target_unix is not None:
            return await asyncio.open_unix_connection(self.target_unix)
        return await asyncio.open_connection(self.target_host, self.target_port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            target_reader, target_writer = await self._connect_target()
        except asyncio.CancelledError:
            writer.transport.abort()
            return  # close() cancelled us: end quietly, as below
        except OSError as exc:
            logger.warning("proxy could not reach its target: %s", exc)
            writer.transport.abort()
            return
        link = _Link(writer, target_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, reader, target_writer, _UP),
                self._pump(link, target_reader, writer, _DOWN),
            )
        except OSError:
            pass  # one side went away; the finally cuts the other
        except asyncio.CancelledError:
            # close() cancelled us. End quietly: asyncio's server logs a
            # connection task that ends cancelled as an error.
            pass
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        stats = self.stats
        while data := await reader.read(_CHUNK):
            if self.delay:
                await asyncio.sleep(self.delay)
            if not self._open.is_set():
                stats.bytes_dropped += len(data)
                continue
            cut_after = link.cut_after
            if cut_after is not None and cut_after[0] == direction:
                writer.write(data[: cut_after[1]])
                self._cut(link, f"{cut_after[1]} bytes into a chunk {direction}")
                return
            writer.write(data)
            if direction is _UP:
                stats.bytes_up += len(data)
            else:
                stats.bytes_down += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # pass the half-close on
