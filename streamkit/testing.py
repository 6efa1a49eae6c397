"""Test helpers for services built on streamkit: a fault-injecting proxy and a balancer.

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

:class:`Balancer` spreads connections over several servers, round robin, as
a TCP load balancer in front of a service's replicas does; ``kill(i)``
takes server ``i`` out (its connections are cut, new ones go elsewhere) and
``restore(i)`` puts it back, so a test can fail a replica over::

    async with Balancer([("127.0.0.1", port_a), ("127.0.0.1", port_b)]) as balancer:
        client = await hub.connect("127.0.0.1", balancer.port)
        ...
        balancer.kill(0)                # as if replica 0 died: clients move to 1

Both forward with the same core: flow control end to end, every task owned
and ended by ``close()``.

``python -m streamkit proxy --listen 9000 --target 127.0.0.1:8765
--cut-every 0.5`` runs a proxy from the command line (see :func:`main`).
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
from dataclasses import dataclass, field
from typing import Literal, Self

from streamkit import _args
from streamkit._lifecycle import ServerBase, close_listener, wait_all

__all__ = ["Balancer", "BalancerStats", "Direction", "FaultProxy", "ProxyStats", "Target", "main"]

logger = logging.getLogger("streamkit.testing")

#: ``"up"``: client to server; ``"down"``: server to client.
Direction = Literal["up", "down"]

#: Bytes read per chunk on each side.
_CHUNK = 64 * 1024
_ARROWS: dict[Direction, str] = {"up": "client->server", "down": "server->client"}


@dataclass(slots=True)
class ProxyStats:
    """What a :class:`FaultProxy` (or a :class:`Balancer`) has done so far."""

    connections: int = 0  # accepted from clients
    cuts: int = 0  # connections cut by the proxy (not those its peers closed)
    bytes_up: int = 0  # forwarded client -> server
    bytes_down: int = 0  # forwarded server -> client


@dataclass(slots=True)
class BalancerStats(ProxyStats):
    """What a :class:`Balancer` has done so far: :class:`ProxyStats`, and per target."""

    forwarded: list[int] = field(default_factory=list)  # connections forwarded to each target
    unreachable: int = 0  # attempts to connect a target that failed (it was skipped)


class _Link:
    """One forwarded connection: a client side and a server side (of target ``target``)."""

    __slots__ = ("client", "closed", "cut_after", "server", "target")

    def __init__(
        self, client: asyncio.StreamWriter, server: asyncio.StreamWriter, target: int
    ) -> None:
        self.client = client
        self.server = server
        self.target = target
        self.closed = False
        # (direction, n): forward n more bytes that way, then cut.
        self.cut_after: tuple[Direction, int] | None = None

    def abort(self) -> None:
        self.closed = True
        self.client.transport.abort()
        self.server.transport.abort()


_Connected = tuple[asyncio.StreamReader, asyncio.StreamWriter, int]


class _Relay(ServerBase):
    """The forwarding core of :class:`FaultProxy` and :class:`Balancer`.

    Accepts clients, connects each to a target (``_connect_target``, the
    subclass's choice) and pumps bytes both ways with flow control, holding
    a direction while its ``_open`` event is clear and each chunk ``delay``
    seconds, and honouring a link's ``cut_after``. Owns every task it
    starts; ``close()`` cuts every link (not counted as cuts).
    """

    #: What the log says when a client's connection could not be forwarded.
    _unreachable = "could not reach a target"

    def __init__(self, stats: ProxyStats, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"delay={delay} must be >= 0")
        self.delay = delay
        self.stats = stats
        # A dict, not a set: links are visited in accept order, so a seeded
        # FaultProxy makes the same choices on every run.
        self._links: dict[_Link, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection, and stopped cutters
        self._server: asyncio.Server | None = None
        self._closing = False
        # Forwarding "up" (client to target) and "down" is on while set.
        self._open: dict[Direction, asyncio.Event] = {way: asyncio.Event() for way in _ARROWS}
        for event in self._open.values():
            event.set()

    # -- lifecycle ----------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        """Listen on TCP ``host``:``port`` (port 0 picks a free one); returns itself."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return self

    async def start_unix(self, path: str) -> Self:
        """Listen on the Unix socket ``path``; returns itself."""
        self._server = await asyncio.start_unix_server(self._accept, path)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients connect to (when listening on TCP)."""
        if self._server is None or not self._server.sockets:
            state = "not started" if self._server is None else "closed"
            raise RuntimeError(f"the {type(self).__name__} is {state}")
        name = self._server.sockets[0].getsockname()
        if not isinstance(name, tuple):
            raise RuntimeError(f"listening on the Unix socket {name!r}, not TCP")
        return str(name[0]), int(name[1])

    @property
    def port(self) -> int:
        """The TCP port clients connect to."""
        return self.address[1]

    @property
    def open_connections(self) -> int:
        """Connections forwarded right now."""
        return len(self._links)

    def close(self) -> None:
        """Stop listening and cut every connection (not counted as cuts)."""
        self._closing = True
        if self._server is not None:
            close_listener(self._server)
        for link in self._links:
            link.abort()
        self._links.clear()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until every task it started has ended."""
        await wait_all(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        if self._server is None:
            await self.start()
        return self

    # -- cutting ------------------------------------------------------------

    def _cut_links(self, links: list[_Link], how: str) -> int:
        for link in links:
            self._cut(link, how)
        return len(links)

    def _cut(self, link: _Link, how: str) -> None:
        if link in self._links:
            del self._links[link]
            self.stats.cuts += 1
            logger.info("cut a connection %s", how)
        link.abort()

    # -- forwarding ---------------------------------------------------------

    async def _connect_target(self) -> _Connected:
        """Connect a target for a new client: its reader, writer and index; OSError if none."""
        raise NotImplementedError

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
            target_reader, target_writer, target = await self._connect_target()
        except asyncio.CancelledError:
            # close() cancelled us. End quietly: asyncio's server logs a
            # connection task that ends cancelled as an error.
            writer.transport.abort()
            return
        except OSError as exc:
            logger.warning("%s: %s", self._unreachable, exc)
            writer.transport.abort()
            return
        link = _Link(writer, target_writer, target)
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


class FaultProxy(_Relay):
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
    connection costs at most a few chunks of memory. ``start()`` (TCP) or
    ``start_unix(path)`` listens; ``close()`` / ``await wait_closed()`` (or
    ``async with``) stop listening and cut everything; every task the proxy
    starts ends with it. A cut aborts both sockets, so peers see a reset or
    an end of stream, possibly in the middle of a frame.
    """

    stats: ProxyStats
    _unreachable = "proxy could not reach its target"

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
        super().__init__(ProxyStats(), delay)
        self.target_host = target_host
        self.target_port = target_port
        self.target_unix = target_unix
        self._rng = random.Random(seed)
        self._cutter: asyncio.Task[None] | None = None

    @property
    def blackholed(self) -> bool:
        """True between ``blackhole()`` and ``restore()``."""
        return not all(event.is_set() for event in self._open.values())

    def close(self) -> None:
        """Stop listening, stop cutting and cut every connection (not counted as cuts)."""
        self.stop_cutting()
        super().close()

    # -- faults -------------------------------------------------------------

    def cut(self) -> int:
        """Abort every live connection now, both sides; returns how many were cut."""
        return self._cut_links(list(self._links), "now")

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

    async def _connect_target(self) -> _Connected:
        if self.target_unix is not None:
            reader, writer = await asyncio.open_unix_connection(self.target_unix)
        else:
            reader, writer = await asyncio.open_connection(self.target_host, self.target_port)
        return reader, writer, 0


#: A balancer's target: ``(host, port)`` over TCP, or the path of a Unix socket.
Target = tuple[str, int] | str


class Balancer(_Relay):
    """A round-robin TCP (or Unix socket) balancer over ``targets``, for failover tests.

    Each new client connection goes to the next target in turn that is not
    killed and accepts it (a target that refuses is skipped, as a balancer's
    health check would, and counted in ``stats.unreachable``); with none
    left, the client's connection is closed. ``kill(i)`` takes target ``i``
    out: its live connections are cut and new ones skip it until
    ``restore(i)``. ``cut()`` cuts every live connection. ``stats``
    (:class:`BalancerStats`) counts connections, cuts, bytes each way and
    connections forwarded to each target; ``connections_to(i)`` counts
    those open now.

    ``connect_timeout`` bounds each attempt to reach a target. Forwarding,
    ``start()`` / ``start_unix(path)``, ``close()`` and ``async with`` are
    those of :class:`FaultProxy` (one core): flow control end to end, and
    every task ends with the balancer.
    """

    stats: BalancerStats
    _unreachable = "balancer could not reach any target"

    def __init__(self, targets: Sequence[Target], *, connect_timeout: float = 5.0) -> None:
        if not targets:
            raise ValueError("a Balancer needs at least one target")
        for target in targets:
            if not isinstance(target, str) and not (
                isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], int)
            ):
                raise ValueError(f"a target is (host, port) or a Unix socket path, not {target!r}")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout={connect_timeout} must be > 0")
        super().__init__(BalancerStats(forwarded=[0] * len(targets)))
        self.targets: tuple[Target, ...] = tuple(targets)
        self.connect_timeout = connect_timeout
        self._next = 0  # the target the next connection tries first
        self._killed: set[int] = set()

    def _check(self, target: int) -> int:
        if not 0 <= target < len(self.targets):
            raise IndexError(f"target {target} out of range: the balancer has {len(self.targets)}")
        return target

    @property
    def killed(self) -> frozenset[int]:
        """The targets taken out by ``kill``."""
        return frozenset(self._killed)

    def kill(self, target: int) -> int:
        """Take ``target`` out: cut its live connections, send new ones elsewhere.

        Returns how many connections were cut.
        """
        self._killed.add(self._check(target))
        links = [link for link in self._links if link.target == target]
        return self._cut_links(links, f"of killed target {target}")

    def restore(self, target: int) -> None:
        """Put ``target`` back in turn for new connections."""
        self._killed.discard(self._check(target))

    def cut(self) -> int:
        """Abort every live connection now, both sides; returns how many were cut."""
        return self._cut_links(list(self._links), "now")

    def connections_to(self, target: int) -> int:
        """Connections forwarded to ``target`` open now."""
        self._check(target)
        return sum(link.target == target for link in self._links)

    async def _connect_target(self) -> _Connected:
        failures = []
        for _ in range(len(self.targets)):
            index = self._next
            self._next = (index + 1) % len(self.targets)
            if index in self._killed:
                continue
            target = self.targets[index]
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if isinstance(target, str):
                        reader, writer = await asyncio.open_unix_connection(target)
                    else:
                        reader, writer = await asyncio.open_connection(*target)
            except (OSError, TimeoutError) as exc:
                self.stats.unreachable += 1
                failures.append(f"target {index}: {exc!r}")
                continue
            if index in self._killed:  # killed while we connected
                writer.transport.abort()
                continue
            self.stats.forwarded[index] += 1
            return reader, writer, index
        raise OSError(f"no target took the connection ({'; '.join(failures) or 'all killed'})")


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
