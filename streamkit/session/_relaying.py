"""A cluster node's relaying: its cluster port (the owner's side), relays to owners (the front's).

The asyncio glue around :mod:`streamkit.session.relay` (docs/protocol.md
2.12). :class:`Relayer` belongs to one ``ResumableServer`` with a
:class:`~streamkit.session.cluster.Cluster`: it listens on the cluster port
and joins the peer directory when the server starts, and the server hands it
every resume of another node's session (:meth:`Relayer.relay`). On the
cluster port it authenticates each link and hands the relayed hello back to
the server, which resumes its session as for a connection of its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from streamkit.codecs import LengthPrefixed
from streamkit.errors import ConnectionLost, EndOfStream, ProtocolError
from streamkit.net import Endpoint, Server, connect_endpoint, serve_endpoint
from streamkit.session.cluster import (
    Address,
    Cluster,
    ClusterStats,
    StaticPeers,
    format_address,
)
from streamkit.session.protocol import Reject, RejectReason, Welcome
from streamkit.session.relay import MAX_RELAY_MESSAGE, FrontLink, OwnerLink, Relay
from streamkit.session.settings import Backoff
from streamkit.stream import FramedStream, splice

__all__ = ["RelayedResume", "Relayer"]

logger = logging.getLogger("streamkit.session")

#: The owner's resume of a relayed hello on ``stream`` (answered in the
#: session's handshake framing), for the client's proof bound to the relay's
#: nonce; it returns when that connection ends.
RelayedResume = Callable[[FramedStream[bytes], Relay], Awaitable[None]]

_T_co = TypeVar("_T_co", covariant=True)

#: The codec of a link's streams. The link handshake is read unframed
#: (``recv_data``) and written as it is (``stream.sender``); after it, the
#: owner's server answers the relayed hello in the session's handshake
#: framing and the front's is spliced: this codec frames nothing of the link's.
_LINK_CODEC = LengthPrefixed(max_frame=MAX_RELAY_MESSAGE)

#: Pauses between tries to reach an owner that failed transiently (within relay_timeout).
_RETRY = Backoff(initial=0.02, maximum=0.5)
#: The cluster port's listen backlog: every client cut at once resumes at once,
#: and most of their resumes are relayed (asyncio's default is 100).
_BACKLOG = 1024

#: Hosts that listen on every interface: no address to give other nodes.
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class _Unreachable(Exception):
    """The owner cannot be relayed to; the message says why (for the client's REJECT).

    ``transient``: it may work a moment later (a lost link, a full listen
    backlog, a directory that did not answer): tried again until the relay
    deadline. Else it will not: the owner is unknown or down (as when it
    died), or, ``broken``, the link is misconfigured (another key, a node
    that is not the owner, TLS that fails), worth a WARNING.
    """

    def __init__(self, message: str, *, broken: bool = False, transient: bool = False) -> None:
        super().__init__(message)
        self.broken = broken
        self.transient = transient


def _peer(stream: FramedStream[bytes]) -> object:
    """The peer's address for the log (a Unix-socket peer has none)."""
    return stream.peername or "a Unix-socket peer"


class _Side(Protocol[_T_co]):
    """One side of the link handshake (:class:`FrontLink`, :class:`OwnerLink`)."""

    rest: bytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> _T_co | None: ...

    def data_to_send(self) -> list[bytes]: ...


async def _exchange(stream: FramedStream[bytes], side: _Side[_T_co]) -> tuple[_T_co, bytes]:
    """Run ``side`` of the link handshake on ``stream`` until it has its result.

    Sends what it has due, feeds it what comes, and returns its result with
    the bytes that came after the handshake. Raises :class:`EndOfStream` if
    the peer closes first.
    """
    while True:
        stream.sender.write_parts(side.data_to_send())
        data = await stream.recv_data()
        if not data:
            raise EndOfStream("the peer closed the relay link")
        result = side.receive_data(data)
        if result is not None:
            stream.sender.write_parts(side.data_to_send())
            return result, side.rest


def _endpoint(address: Address) -> Endpoint:
    if isinstance(address, str):
        return Endpoint.unix(address)
    return Endpoint.tcp(*address)


class Relayer:
    """Relaying for one node of ``cluster``; ``resume`` is its server's relayed resume.

    ``start()`` listens on the cluster port (TLS with ``cluster.ssl``; at
    most ``max_connections`` links, each link handshake within
    ``handshake_timeout``) and joins the directory; ``close()`` stops
    listening and cuts the relays this node carries as a front (their
    clients resume through another node); ``await wait_closed()`` waits for
    the cluster port's connections and leaves the directory.
    """

    def __init__(
        self,
        cluster: Cluster,
        resume: RelayedResume,
        *,
        handshake_timeout: float,
        close_timeout: float,
        grace_period: float,
        max_connections: int,
    ) -> None:
        self.cluster = cluster
        self.stats = ClusterStats()
        self._resume = resume
        self._handshake_timeout = handshake_timeout
        self._close_timeout = close_timeout
        self._grace_period = grace_period
        self._max_connections = max_connections
        self._server: Server[bytes] | None = None
        self._joined = False
        self._closing = False
        # The client side of every relay open now, to cut them on close().
        self._relays: set[FramedStream[bytes]] = set()

    @property
    def address(self) -> Address:
        """Where other nodes reach this node's cluster port (once started)."""
        advertise = self.cluster.advertise
        if advertise is not None:
            return advertise
        listen = self.cluster.listen_address
        if isinstance(listen, str) or self._server is None:
            return listen
        return (listen[0], self._server.port)

    async def start(self) -> None:
        """Listen on the cluster port, then join the peer directory."""
        cluster = self.cluster
        listen = cluster.listen_address
        if (
            cluster.advertise is None
            and not isinstance(listen, str)
            and listen[0] in _WILDCARDS
            and not isinstance(cluster.peers, StaticPeers)
        ):
            raise ValueError(
                f"the cluster port listens on every interface ({format_address(listen)}): "
                "give advertise, the address other nodes reach it at"
            )
        self._server = await serve_endpoint(
            self._on_link,
            _endpoint(listen),
            codec=_LINK_CODEC,
            ssl=cluster.ssl,
            grace_period=self._grace_period,
            handshake_timeout=self._handshake_timeout,
            close_timeout=self._close_timeout,
            max_connections=self._max_connections,
            backlog=_BACKLOG,
        )
        try:
            await cluster.peers.join(cluster.node, self.address)
        except BaseException:
            self._server.close()
            await self._server.wait_closed()
            raise
        self._joined = True
        logger.info(
            "cluster node %r: cluster port on %s, reached at %s",
            cluster.node,
            format_address(listen),
            format_address(self.address),
        )

    def close(self) -> None:
        """Stop listening on the cluster port and cut the relays this node carries."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for stream in self._relays:
            stream.abort()

    async def wait_closed(self) -> None:
        """Wait for the cluster port's connections to end; leave the directory."""
        if self._server is not None:
            await self._server.wait_closed()
        if self._joined:
            self._joined = False
            await self.cluster.peers.leave()

    # -- the owner's side --------------------------------------------------------

    async def _on_link(self, stream: FramedStream[bytes]) -> None:
        """A connection to the cluster port: authenticate the front, then resume."""
        link = OwnerLink(self.cluster.key, self.cluster.node)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                relay, rest = await _exchange(stream, link)
            if rest:  # a front sends nothing more until the owner has answered
                raise ProtocolError("the front sent bytes past its RELAY before the answer")
        except EndOfStream:
            error: Exception = ConnectionLost("the peer closed the link during its handshake")
        except TimeoutError:  # before OSError, its base class
            error = TimeoutError(
                f"no proven RELAY within handshake_timeout={self._handshake_timeout} s"
            )
        except (ProtocolError, ConnectionLost, OSError) as exc:
            error = exc
        else:
            await self._resume(stream, relay)
            return
        self.stats.links_refused += 1
        logger.warning("refused a relay link from %s: %s", _peer(stream), error)
        stream.abort()

    # -- the front's side ----------------------------------------------------------

    async def relay(
        self,
        stream: FramedStream[bytes],
        nonce: bytes,
        hello: bytes,
        owner: str,
        rest: bytes = b"",
    ) -> None:
        """Relay ``stream``, whose client sent ``hello`` after a preface with ``nonce``,
        to node ``owner``; return when the relayed connection ends.

        If the owner does not answer within ``relay_timeout`` (unknown,
        unreachable, failing the link handshake), the client gets
        ``REJECT(UNKNOWN_SESSION)`` saying why. Otherwise the owner's answer
        goes to the client as it is, then ``rest`` (what the client sent
        after its hello, read with it) to the owner, then bytes both ways
        until either side closes.
        """
        try:
            link, forward = await self._reach_in_time(owner, nonce, hello)
        except _Unreachable as exc:
            self.stats.relays_failed += 1
            message = f"the session's owner, node {owner!r}, {exc}"
            level = logging.WARNING if exc.broken else logging.INFO
            logger.log(level, "could not relay a resume from %s: %s", _peer(stream), message)
            stream.send_nowait(Reject(RejectReason.UNKNOWN_SESSION, message).encode())
            return
        if self._closing:
            link.abort()
            stream.abort()
            return
        stream.sender.write_parts((forward,))
        if rest:  # sent with the hello, before the answer: the owner's, after it
            link.sender.write_parts((rest,))
        self._relays.add(stream)
        self.stats.relaying += 1
        try:
            await splice(stream, link)
        finally:
            self.stats.relaying -= 1
            self._relays.discard(stream)

    async def _reach_in_time(
        self, owner: str, nonce: bytes, hello: bytes
    ) -> tuple[FramedStream[bytes], bytes]:
        """:meth:`_reach`, tried again after a transient failure, within ``relay_timeout``.

        A retry sends the same hello: the owner may take it twice (the
        front holds the key), never a third party.
        """
        timeout = self.cluster.relay_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delays = _RETRY.delays(random.Random())
        last: _Unreachable | None = None
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        return await self._reach(owner, nonce, hello)
                    except _Unreachable as exc:
                        if not exc.transient:
                            raise
                        last = exc
                        logger.debug("relay to node %r failed, trying again: %s", owner, exc)
                    await asyncio.sleep(next(delays))
        except TimeoutError:
            reason = f"did not answer within relay_timeout={timeout} s"
            if last is not None:
                reason += f" ({last})"
            raise _Unreachable(reason, broken=last is not None and last.broken) from None

    async def _reach(
        self, owner: str, nonce: bytes, hello: bytes
    ) -> tuple[FramedStream[bytes], bytes]:
        """Open an authenticated link to ``owner`` and relay ``hello``.

        Returns the link and the bytes to forward to the client: the owner's
        answer (a WELCOME, or a REJECT after which the owner closes the link)
        and what followed it. Raises :class:`_Unreachable` if the owner
        cannot be relayed to.
        """
        try:
            address = await self.cluster.peers.lookup(owner)
        except Exception as exc:
            raise _Unreachable(
                f"could not be looked up in the peer directory: {exc!r}", transient=True
            ) from exc
        if address is None:
            raise _Unreachable("is not in the peer directory (it left, or its claim expired)")
        where = format_address(address)
        try:
            link = await connect_endpoint(
                _endpoint(address),
                codec=_LINK_CODEC,
                ssl=self.cluster.peer_ssl,
                close_timeout=self._close_timeout,
            )
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise _Unreachable(f"cannot be reached at {where} (is it down?): {exc}") from exc
        except _ssl.SSLError as exc:
            raise _Unreachable(f"failed TLS at {where}: {exc}", broken=True) from exc
        except OSError as exc:
            raise _Unreachable(f"cannot be reached at {where}: {exc}", transient=True) from exc
        front = FrontLink(self.cluster.key, self.cluster.node, owner, nonce, hello)
        try:
            try:
                side: _Side[Welcome | Reject] = front  # (mypy infers object otherwise)
                answer, rest = await _exchange(link, side)
            except EndOfStream:
                raise front.receive_eof() from None
            self._count(answer)
            return link, front.answer + rest
        except ProtocolError as exc:
            link.abort()
            raise _Unreachable(f"failed the relay link at {where}: {exc}", broken=True) from exc
        except (ConnectionLost, OSError) as exc:
            link.abort()
            raise _Unreachable(
                f"lost the relay link at {where}: {exc}", broken=True, transient=True
            ) from exc
        except BaseException:
            link.abort()
            raise

    def _count(self, answer: Welcome | Reject) -> None:
        if isinstance(answer, Welcome):
            self.stats.relayed_out += 1
        else:
            self.stats.relays_rejected += 1
