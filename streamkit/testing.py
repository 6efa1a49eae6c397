"""Test helpers for services built on streamkit: a fault-injecting proxy.

:class:`FaultProxy` sits between a client and a server (TCP or Unix socket)
and forwards bytes both ways, with asyncio's flow control, until told to
misbehave: cut every connection now, after a given number of bytes (in the
middle of a frame) or at random moments, add latency, or black-hole the
traffic while keeping the connections open (a half-open link, which only a
keepalive detects). Random choices come from one seeded ``random.Random``,
so a failing run can be repeated with its seed::

    async with FaultProxy("127.0.0.1", server_port, seed=7) as proxy:
        client = await connect_resumable("127.0.0.1", proxy.port)
        proxy.cut_every(0.1)            # a cut every 100 ms, give or take
        ...
        assert proxy.stats.cuts > 0

``python -m streamkit proxy --listen 9000 --target 127.0.0.1:8765
--cut-every 0.5`` runs one from the command line (see :func:`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from streamkit import _args
from streamkit._lifecycle import ServerBase, wait_all

__all__ = ["Direction", "FaultProxy", "ProxyStats", "main"]

logger = logging.getLogger("streamkit.testing")

#: ``"up"``: client to server; ``"down"``: server to client.
Direction = Literal["up", "down"]

#: Bytes read per chunk on each side.
_CHUNK = 64 * 1024
_ARROWS: dict[Direction, str] = {"up": "client->server", "down": "server->client"}


@dataclass(slots=True)
class ProxyStats:
    """What a :class:`FaultProxy` has done so far."""

    connections: int = 0  # accepted from clients
    cuts: int = 0  # connections cut by the proxy (not those its peers closed)
    bytes_up: int = 0  # forwarded client -> server
    bytes_down: int = 0  # forwarded server -> client


class _Link:
    """One proxied connection: a client side and a server side."""

    __slots__ = ("client", "closed", "cut_after", "server")

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.closed = False
        # (direction, n): forward n more bytes that way, then cut.
        self.cut_after: tuple[Direction, int] | None = None

    def abort(self) -> None:
        self.closed = True
        self.client.transport.abort()
        self.server.transport.abort()


class FaultProxy(ServerBase):
    """A proxy to ``target_host:target_port`` (or the Unix socket ``target_unix``) with faults.

    - ``cut()`` aborts every live connection now; ``cut_after(n, direction)``
      lets ``n`` more bytes through one way, then cuts (a torn frame);
      ``cut_every(interval)`` cuts at random moments, half of them torn,
      until ``stop_cutting()``.
    - ``delay`` (seconds, settable at any time) holds each chunk that long
      before forwarding it. Chunks go in order, one at a time, so a delay
      also caps throughput at 64 KiB per ``delay`` in each direction.
    - ``blackhole()`` stops forwarding both ways (``blackhole("up")`` or
      ``"down"``: one way) while every connection stays open; ``restore()``
      resumes. Nothing is dropped: bytes wait, as TCP's
      retransmissions would on a dead route, so a restored connection carries
      the same byte stream. Flow control stops the senders meanwhile.
    - ``stats`` counts connections, cuts and bytes forwarded each way.

    Forwarding waits on ``drain()``: a slow side slows the other, and each
    connection costs at most a few chunks of memory. ``close()`` / ``await
    wait_closed()`` (or ``async with``) stop listening and cut everything;
    every task the proxy starts ends with it. A cut aborts both sockets, so
    peers see a reset or an end of stream, possibly in the middle of a frame.
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
        if delay < 0:
            raise ValueError(f"delay={delay} must be >= 0")
        self.target_host = target_host
        self.target_port = target_port
        self.target_unix = target_unix
        self.delay = delay
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        # A dict, not a set: cut_every visits links in accept order, so a
        # seed gives the same choices on every run.
        self._links: dict[_Link, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection, and stopped cutters
        self._server: asyncio.Server | None = None
        self._cutter: asyncio.Task[None] | None = None
        self._closing = False
        # Forwarding "up" (client to target) and "down" is on while set.
        self._open: dict[Direction, asyncio.Event] = {way: asyncio.Event() for way in _ARROWS}
        for event in self._open.values():
            event.set()

    # -- lifecycle ----------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        """Listen on TCP ``host``:``port`` (port 0 picks a free one); returns the proxy."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return self

    async def start_unix(self, path: str) -> FaultProxy:
        """Listen on the Unix socket ``path``; returns the proxy."""
        self._server = await asyncio.start_unix_server(self._accept, path)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients connect to (a TCP proxy only)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        name = self._server.sockets[0].getsockname()
        if not isinstance(name, tuple):
            raise RuntimeError(f"the proxy listens on the Unix socket {name!r}, not TCP")
        return str(name[0]), int(name[1])

    @property
    def port(self) -> int:
        """The TCP port clients connect to."""
        return self.address[1]

    @property
    def open_connections(self) -> int:
        """Connections forwarded right now."""
        return len(self._links)

    @property
    def blackholed(self) -> bool:
        """True between ``blackhole()`` and ``restore()``."""
        return not all(event.is_set() for event in self._open.values())

    def close(self) -> None:
        """Stop listening, stop cutting and cut every connection (not counted as cuts)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        self.stop_cutting()
        for link in self._links:
            link.abort()
        self._links.clear()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until every task of the proxy has ended."""
        await wait_all(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        if self._server is None:
            await self.start()
        return self

    # -- faults -------------------------------------------------------------

    def cut(self) -> int:
        """Abort every live connection now, both sides; returns how many were cut."""
        links = list(self._links)
        for link in links:
            self._cut(link, "now")
        return len(links)

    def cut_after(self, nbytes: int, direction: Direction) -> int:
        """Forward ``nbytes`` more bytes ``direction`` on every live connection, then cut it.

        The peer on that side receives at most those ``nbytes`` (fewer if
        the proxy's own write buffer was not empty, as its contents die with
        the connection). Returns how many connections will be cut.
        """
        if nbytes < 1:
            raise ValueError(f"nbytes={nbytes} must be >= 1")
        if direction not in _ARROWS:
            raise ValueError(f"direction={direction!r} must be 'up' or 'down'")
        for link in self._links:
            link.cut_after = (direction, nbytes)
        return len(self._links)

    def cut_every(self, interval: float, *, jitter: float = 0.5) -> None:
        """Cut every connection at random moments, on average every ``interval`` seconds.

        Each wait is drawn uniformly from ``interval * (1 ± jitter)``. Half
        of the cuts are torn: a connection forwards a random 1 to 511 more
        bytes in a random direction, then dies. Replaces an earlier
        ``cut_every``; ``stop_cutting()`` ends it.
        """
        if not interval > 0 or not 0 <= jitter <= 1:
            raise ValueError(
                f"cut_every needs interval > 0 and 0 <= jitter <= 1, not {interval}, {jitter}"
            )
        self.stop_cutting()
        self._cutter = asyncio.create_task(self._cut_loop(interval, jitter))

    def stop_cutting(self) -> None:
        """Stop the cuts started by ``cut_every``."""
        if self._cutter is not None:
            self._cutter.cancel()
            self._tasks.add(self._cutter)  # awaited by wait_closed
            self._cutter.add_done_callback(self._tasks.discard)
            self._cutter = None

    def blackhole(self, direction: Direction | None = None) -> None:
        """Stop forwarding, both ways or one, keeping every connection open (half-open)."""
        if direction is not None and direction not in _ARROWS:
            raise ValueError(f"direction must be 'up', 'down' or None, not {direction!r}")
        for way, event in self._open.items():
            if direction in (None, way):
                event.clear()

    def restore(self) -> None:
        """Forward again after ``blackhole()``, starting with the bytes held meanwhile."""
        for event in self._open.values():
            event.set()

    async def _cut_loop(self, interval: float, jitter: float) -> None:
        rng = self._rng
        while True:
            await asyncio.sleep(interval * rng.uniform(1 - jitter, 1 + jitter))
            for link in list(self._links):
                if rng.random() < 0.5:
                    self._cut(link, "at a random moment")
                elif link.cut_after is None:
                    link.cut_after = (rng.choice(("up", "down")), rng.randrange(1, 512))

    def _cut(self, link: _Link, how: str) -> None:
        if link in self._links:
            del self._links[link]
            self.stats.cuts += 1
            logger.info("cut a connection %s", how)
        link.abort()

    # -- forwarding ---------------------------------------------------------

    async def _connect_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.target_unix is not None:
            return await asyncio.open_unix_connection(self.target_unix)
        return await asyncio.open_connection(self.target_host, self.target_port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:  # accepted just before close(): not ours to forward
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.stats.connections += 1
        try:
            target_reader, target_writer = await self._connect_target()
        except asyncio.CancelledError:
            # close() cancelled us. End quietly: asyncio's server logs a
            # connection task that ends cancelled as an error.
            writer.transport.abort()
            return
        except OSError as exc:
            logger.warning("proxy could not reach its target: %s", exc)
            writer.transport.abort()
            return
        link = _Link(writer, target_writer)
        self._links[link] = None
        try:
            await asyncio.gather(
                self._pump(link, reader, target_writer, "up"),
                self._pump(link, target_reader, writer, "down"),
            )
        except asyncio.CancelledError:
            pass  # close() cancelled us: end quietly, as above
        finally:
            self._links.pop(link, None)
            link.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        """Forward ``reader`` to ``writer`` until end of stream, a cut or an error."""
        is_open = self._open[direction]
        try:
            while data := await reader.read(_CHUNK):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if not is_open.is_set():
                    await is_open.wait()
                if link.closed:
                    return
                cut_after = link.cut_after
                if cut_after is not None and cut_after[0] == direction:
                    if len(data) >= cut_after[1]:
                        self._count(direction, cut_after[1])
                        writer.write(data[: cut_after[1]])
                        self._cut(link, f"{cut_after[1]} bytes into {_ARROWS[direction]} data")
                        return
                    link.cut_after = (direction, cut_after[1] - len(data))
                writer.write(data)
                self._count(direction, len(data))
                await writer.drain()
            # End of stream from one side: pass the half-close on, in turn.
            if self.delay:
                await asyncio.sleep(self.delay)
            await is_open.wait()
            if not link.closed and writer.can_write_eof():
                writer.write_eof()
        except OSError:
            # One side is gone, so is the other (not a cut of ours); a
            # black hole keeps even that news from the other side.
            await is_open.wait()
            link.abort()

    def _count(self, direction: Direction, nbytes: int) -> None:
        if direction == "up":
            self.stats.bytes_up += nbytes
        else:
            self.stats.bytes_down += nbytes


# -- the command line -------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = _args.Parser(
        prog="python -m streamkit proxy",
        description="A fault-injecting proxy: forwards every connection to the target, "
        "cutting connections at random moments (often in the middle of a frame) and "
        "adding latency on request. Runs until Ctrl-C; logs each cut.",
    )
    listen = parser.add_mutually_exclusive_group()
    listen.add_argument(
        "--listen",
        type=_args.address,
        default=("127.0.0.1", 0),
        metavar="[HOST:]PORT",
        help="where clients connect (127.0.0.1, any free port)",
    )
    listen.add_argument("--listen-unix", metavar="PATH", help="listen on a Unix socket")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", type=_args.address, metavar="HOST:PORT", help="the server")
    target.add_argument("--target-unix", metavar="PATH", help="a server on a Unix socket")
    parser.add_argument(
        "--cut-every", type=_args.seconds, metavar="SECONDS", help="cut connections this often"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.5, help="spread of the cut times, 0..1 (0.5)"
    )
    parser.add_argument(
        "--delay", type=_args.seconds, default=0.0, metavar="SECONDS", help="latency per chunk"
    )
    parser.add_argument("--seed", type=int, help="random seed, to repeat a run")
    parser.add_argument(
        "--duration", type=_args.seconds, metavar="SECONDS", help="stop after this long"
    )
    return parser


async def _run_proxy(args: argparse.Namespace) -> None:
    host, port = args.target or (None, None)
    proxy = FaultProxy(host, port, target_unix=args.target_unix, seed=args.seed, delay=args.delay)
    where = args.listen_unix or _args.host_port(*args.listen)
    try:
        if args.listen_unix:
            await proxy.start_unix(args.listen_unix)
        else:
            await proxy.start(*args.listen)
            where = _args.host_port(*proxy.address)
    except OSError as exc:  # the same words as every server command
        raise OSError(_args.cannot_listen(where, exc)) from exc
    target = args.target_unix or _args.host_port(*args.target)
    print(f"proxy on {where} -> {target}", flush=True)
    if args.cut_every:
        proxy.cut_every(args.cut_every, jitter=args.jitter)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        proxy.close()
        await proxy.wait_closed()
        stats = proxy.stats
        logger.info(
            "proxy stopped: %d connections, %d cuts, %d bytes up, %d bytes down",
            stats.connections,
            stats.cuts,
            stats.bytes_up,
            stats.bytes_down,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m streamkit proxy``; ``argv`` are the arguments after ``proxy``.

    Returns 0 when stopped by Ctrl-C, SIGTERM or ``--duration``, and 1 (after
    one line on stderr) when the proxy cannot listen. Bad arguments print a
    one-line error and raise ``SystemExit(2)``, as argparse does.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.cut_every is not None and args.cut_every <= 0:
        parser.error("--cut-every must be > 0")
    if not 0 <= args.jitter <= 1:
        parser.error("--jitter must be between 0 and 1")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_proxy(args))
    except OSError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 1
    return 0
