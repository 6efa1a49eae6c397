"""The server side of resumable sessions: handshake, session registry, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl as _ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Unpack

from streamkit._lifecycle import ServerBase
from streamkit.codecs import LengthPrefixed
from streamkit.errors import (
    ConnectionLost,
    EndOfStream,
    ProtocolError,
    SessionExpired,
    StreamkitError,
)
from streamkit.net import (
    DEFAULT_GRACE_PERIOD,
    Connector,
    Endpoint,
    Server,
    close_server,
    default_max_connections,
    serve_endpoint,
)
from streamkit.session._relaying import Relayer
from streamkit.session.cluster import Cluster, ClusterStats, node_of, tagged_session_id
from streamkit.session.core import ServerHandshake, SessionCore, State
from streamkit.session.protocol import (
    MAX_HANDSHAKE_MESSAGE,
    NONCE_SIZE,
    SESSION_ID_SIZE,
    TOKEN_SIZE,
    VERSION,
    HelloNew,
    HelloResume,
    Reject,
    RejectReason,
    decode_message,
)
from streamkit.session.relay import Relay
from streamkit.session.session import Session
from streamkit.session.settings import SessionOptions, SessionSettings, resolve_settings
from streamkit.stream import FramedStream

__all__ = [
    "ResumableServer",
    "ServerSession",
    "ServerStats",
    "serve_resumable",
    "serve_resumable_unix",
]

logger = logging.getLogger("streamkit.session")

SessionHandler = Callable[["ServerSession"], Awaitable[Any]]

#: Default limit on sessions held at once (live or waiting for a resume).
DEFAULT_MAX_SESSIONS = 10_000
#: Ended session ids remembered, to tell a late resume why it is refused.
_ENDED_MEMORY = 4096
#: The framing connections are served with. The session reads their bytes
#: itself (a hello announcing more than MAX_HANDSHAKE_MESSAGE closes the
#: connection before any of its body is read); this bounds a frame anyone
#: would read through the stream before that.
_HANDSHAKE_CODEC = LengthPrefixed(max_frame=MAX_HANDSHAKE_MESSAGE)
#: How long an HTTP client's request head may take to arrive before the answer.
_HTTP_READ_TIMEOUT = 1.0


@dataclass(slots=True)
class ServerStats:
    """Counters of a :class:`ResumableServer`: ``server.stats``.

    - ``sessions``: held now (live, or waiting for their client);
    - ``sessions_opened``: new sessions since the server started;
    - ``resumes``: resumes it welcomed (of its own sessions, whether the
      connection came straight or relayed by another node);
    - ``cluster``: what its relaying did (:class:`ClusterStats`; zeros
      without a cluster).
    """

    sessions: int = 0
    sessions_opened: int = 0
    resumes: int = 0
    cluster: ClusterStats = field(default_factory=ClusterStats)


class _Refused(Exception):
    """The handshake was refused; the REJECT is already written."""


class _Relay(Exception):
    """The hello resumes another node's session: relay the connection to ``owner``."""

    def __init__(self, hello: HelloResume, owner: str) -> None:
        self.hello = hello
        self.owner = owner


class ServerSession(Session):
    """A :class:`Session` held by a server; it waits ``resume_timeout`` for its client.

    A session that ends is unregistered and remembered at once, not when
    its handler returns: a client whose CLOSE_ACK was lost resumes and must
    hear FINISHED; one that comes back too late must hear EXPIRED; and an
    ended session must not count towards ``max_sessions``.
    """

    __slots__ = ("_server", "handler_task")

    def __init__(self, core: SessionCore, server: ResumableServer) -> None:
        super().__init__(core, on_ended=self._unregister)
        self._server = server
        self.handler_task: asyncio.Task[None] | None = None

    def _unregister(self) -> None:
        self._server._ended_session(self)


class ResumableServer(ServerBase):
    """A server of resumable sessions: ``handler(session)`` runs once per session.

    A client that reconnects lands in the same running handler. Supports
    ``async with``, ``serve_forever()``, ``port``, ``sockets``, ``close()``
    and ``await wait_closed()`` (handlers get ``grace_period`` seconds, then
    are cancelled and their sessions aborted). When a handler returns (or
    raises, which is logged), its session is closed gracefully.
    """

    def __init__(
        self,
        handler: SessionHandler,
        settings: SessionSettings,
        *,
        max_sessions: int,
        grace_period: float,
        cluster: Cluster | None = None,
    ) -> None:
        self._handler = handler
        self.cluster = cluster
        self._relayer: Relayer | None = None
        self._opened = 0
        self._resumes = 0
        self.settings = settings
        self._max_sessions = max_sessions
        self._grace_period = grace_period
        self._sessions: dict[bytes, ServerSession] = {}
        self._ended: OrderedDict[bytes, tuple[RejectReason, str]] = OrderedDict()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: Server[bytes] | None = None
        self._closing_since: float | None = None

    # -- server lifecycle -----------------------------------------------------

    @property
    def sessions(self) -> int:
        """How many sessions are held (live, or waiting for their client)."""
        return len(self._sessions)

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the server's counters (see :class:`ServerStats`)."""
        cluster = self._relayer.stats if self._relayer is not None else ClusterStats()
        return ServerStats(len(self._sessions), self._opened, self._resumes, replace(cluster))

    def close(self) -> None:
        """Stop accepting connections and new sessions."""
        if self._closing_since is None:
            self._closing_since = asyncio.get_running_loop().time()
        if self._server is not None:
            self._server.close()
        if self._relayer is not None:
            self._relayer.close()

    async def wait_closed(self) -> None:
        """Wait for handlers up to the grace period from ``close()``; cancel the rest."""
        if self._closing_since is None:
            raise RuntimeError("wait_closed() called before close()")
        if self._handlers:
            deadline = self._closing_since + self._grace_period
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.wait(set(self._handlers))
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for session in list(self._sessions.values()):
            session.abort()
            self._ended_session(session)
        if self._server is not None:
            await self._server.wait_closed()
        if self._relayer is not None:
            await self._relayer.wait_closed()

    # -- sessions -------------------------------------------------------------

    def _ended_session(self, session: ServerSession) -> None:
        """Unregister a session that ended and remember why, for a late resume."""
        core = session.core
        if self._sessions.pop(core.session_id, None) is None:
            return
        if core.state is State.CLOSED:
            ended = (RejectReason.FINISHED, f"session {session.id} was closed")
        elif isinstance(core.failure, SessionExpired):
            ended = (RejectReason.EXPIRED, str(core.failure))
        else:
            ended = (RejectReason.UNKNOWN_SESSION, f"session {session.id} was aborted")
        self._ended[core.session_id] = ended
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    async def _run_handler(self, session: ServerSession) -> None:
        try:
            await self._handler(session)
        except asyncio.CancelledError:
            session.abort()
            self._ended_session(session)
            raise
        except EndOfStream:
            pass  # the client closed the session: a normal end
        except (SessionExpired, ConnectionLost) as exc:
            logger.info("session %s ended: %s", session.id, exc)
        except Exception:
            logger.exception("handler of session %s failed; closing the session", session.id)
        try:
            if not session.closed:
                await session.close()
        except (StreamkitError, TimeoutError) as exc:
            logger.info("closing session %s failed: %r", session.id, exc)
            session.abort()
        finally:
            session.abort()  # a session not closed by now is let go
            self._ended_session(session)

    # -- connections ----------------------------------------------------------

    async def _on_connection(self, stream: FramedStream[bytes]) -> None:
        handshake = ServerHandshake(secrets.token_bytes(NONCE_SIZE))
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                hello = await _read_hello(stream, handshake)
            closed = self._answer(stream, handshake, hello, handshake.nonce)
        except _Refused:
            return
        except _Relay as relay:
            assert self._relayer is not None
            await self._relayer.relay(
                stream, handshake.nonce, relay.hello.encode(), relay.owner, handshake.rest
            )
            return
        except (ProtocolError, ConnectionLost, EndOfStream, TimeoutError, OSError) as exc:
            logger.warning("session handshake with %s failed: %s", stream.peername, exc)
            return
        await closed

    async def _on_relayed(self, stream: FramedStream[bytes], relay: Relay) -> None:
        """A resume another node relayed, its link authenticated: resume it as our own.

        The client's proof is bound to the front's nonce (``relay.nonce``);
        the answer goes back over the link, framed as on a session port.
        """
        handshake = ServerHandshake(relay.nonce)
        try:
            if relay.session_version != VERSION:
                raise self._refuse(stream, handshake, RejectReason.UNSUPPORTED_VERSION, "version")
            try:
                hello = decode_message(relay.hello)
            except ProtocolError as exc:
                raise self._refuse(stream, handshake, RejectReason.MALFORMED, str(exc)) from None
            if not isinstance(hello, HelloResume):
                raise self._refuse(
                    stream, handshake, RejectReason.MALFORMED, "relayed hello is no resume"
                )
            assert self.cluster is not None
            owner = node_of(hello.session_id)
            if owner != self.cluster.node:
                raise self._refuse(
                    stream,
                    handshake,
                    RejectReason.UNKNOWN_SESSION,
                    f"session belongs to node {owner!r}",
                )
            closed = self._answer(stream, handshake, hello, relay.nonce)
        except _Refused:
            return
        except ConnectionLost as exc:
            logger.warning("relayed resume from %s failed: %s", stream.peername, exc)
            return
        assert self._relayer is not None
        self._relayer.stats.relayed_in += 1
        await closed

    def _answer(
        self,
        stream: FramedStream[bytes],
        handshake: ServerHandshake,
        hello: HelloNew | HelloResume | Reject,
        nonce: bytes,
    ) -> asyncio.Future[None]:
        """Answer ``hello``, whose resume proof is bound to ``nonce``; attach its session.

        Returns the future of the connection's end. Raises :class:`_Refused`
        once a REJECT is written.
        """
        if isinstance(hello, Reject):  # the handshake refused it itself
            raise self._refused(stream, hello)
        if stream.is_closing():
            # Then no session is registered, which nothing would ever expire.
            raise ConnectionLost("the client closed the connection during the handshake")
        if isinstance(hello, HelloNew):
            session = self._new_session(stream, handshake)
            peer_received = 0
        else:
            if self.cluster is not None:
                owner = node_of(hello.session_id)
                if owner is not None and owner != self.cluster.node:
                    raise _Relay(hello, owner)
            session = self._resumed_session(stream, handshake, hello, nonce)
            peer_received = hello.received
        handshake.accept(session.core.welcome())
        stream.sender.write_parts(handshake.data_to_send())
        closed = session.attach(stream, peer_received, hello.limits, handshake.rest)
        if isinstance(hello, HelloResume):
            self._resumes += 1
        if session.handler_task is None:
            task = asyncio.create_task(self._run_handler(session))
            session.handler_task = task
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        return closed

    def _new_session(
        self, stream: FramedStream[bytes], handshake: ServerHandshake
    ) -> ServerSession:
        if self._closing_since is not None:
            raise self._refuse(stream, handshake, RejectReason.BUSY, "the server is shutting down")
        if len(self._sessions) >= self._max_sessions:
            raise self._refuse(
                stream,
                handshake,
                RejectReason.BUSY,
                f"the server holds max_sessions={self._max_sessions}",
            )
        while True:
            if self.cluster is not None:
                session_id = tagged_session_id(self.cluster.node)
            else:
                session_id = secrets.token_bytes(SESSION_ID_SIZE)
            if session_id not in self._sessions and session_id not in self._ended:
                break
        token = secrets.token_bytes(TOKEN_SIZE)
        clock = asyncio.get_running_loop().time
        core = SessionCore(session_id, token, self.settings, client=False, clock=clock)
        session = ServerSession(core, self)
        self._sessions[session_id] = session
        self._opened += 1
        return session

    def _resumed_session(
        self,
        stream: FramedStream[bytes],
        handshake: ServerHandshake,
        hello: HelloResume,
        nonce: bytes,
    ) -> ServerSession:
        session = self._sessions.get(hello.session_id)
        if session is None or session.closed:
            reason, message = self._ended.get(
                hello.session_id,
                (RejectReason.UNKNOWN_SESSION, f"no session {hello.session_id.hex()}"),
            )
            raise self._refuse(stream, handshake, reason, message)
        reject = session.core.check_resume(hello, nonce)
        if reject is not None:
            raise self._refuse(stream, handshake, reject.reason, reject.message)
        return session

    def _refuse(
        self,
        stream: FramedStream[bytes],
        handshake: ServerHandshake,
        reason: RejectReason,
        message: str,
    ) -> _Refused:
        return self._refused(stream, handshake.reject(reason, message), handshake)

    @staticmethod
    def _refused(
        stream: FramedStream[bytes], reject: Reject, handshake: ServerHandshake | None = None
    ) -> _Refused:
        """Log ``reject``, queued already; write what the handshake owes the client."""
        logger.warning(
            "refused session handshake from %s (%s): %s",
            stream.peername,
            reject.reason.name,
            reject.message,
        )
        if handshake is not None:
            stream.sender.write_parts(handshake.data_to_send())
        return _Refused(reject.message)


async def _read_hello(
    stream: FramedStream[bytes], handshake: ServerHandshake
) -> HelloNew | HelloResume | Reject:
    """Read the client's preface and hello (or what the handshake refuses itself)."""
    try:
        while True:
            if handshake.http:
                # An HTTP client: its request head is read before the answer,
                # or closing with it unread would reset the connection.
                try:
                    async with asyncio.timeout(_HTTP_READ_TIMEOUT):
                        data = await stream.recv_data()
                except TimeoutError:
                    data = b""
            else:
                data = await stream.recv_data()
            if not data:
                raise handshake.receive_eof()
            hello = handshake.receive_data(data)
            if hello is not None:
                return hello
            stream.sender.write_parts(handshake.data_to_send())  # the server's preface
    finally:
        stream.sender.write_parts(handshake.data_to_send())  # a reject, or the answer to HTTP


def serve_resumable_endpoint(
    handler: SessionHandler,
    endpoint: Endpoint,
    *,
    ssl: _ssl.SSLContext | None = None,
    settings: SessionSettings | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_connections: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    cluster: Cluster | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[ResumableServer]:
    """Serve resumable sessions on ``endpoint``: both serve functions in one.

    For the layers above (users call :func:`serve_resumable` /
    :func:`serve_resumable_unix`). Arguments as :func:`serve_resumable`.
    """
    resolved = resolve_settings(settings, options)
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be >= 1, not {max_sessions}")
    if max_connections is None:
        max_connections = default_max_connections(max_sessions)
    server = ResumableServer(
        handler, resolved, max_sessions=max_sessions, grace_period=grace_period, cluster=cluster
    )
    if cluster is not None:
        server._relayer = Relayer(
            cluster,
            server._on_relayed,
            handshake_timeout=resolved.handshake_timeout,
            close_timeout=resolved.close_timeout,
            grace_period=grace_period,
            max_connections=max_connections,
        )
    serving = serve_endpoint(
        server._on_connection,
        endpoint,
        codec=_HANDSHAKE_CODEC,
        ssl=ssl,
        grace_period=grace_period,
        handshake_timeout=resolved.handshake_timeout,
        close_timeout=resolved.close_timeout,
        max_connections=max_connections,
    )

    async def start() -> ResumableServer:
        relayer = server._relayer
        if relayer is not None:
            await relayer.start()
        try:
            server._server = await serving
        except BaseException:  # the cluster port and the directory entry go too
            if relayer is not None:
                relayer.close()
                await relayer.wait_closed()
            raise
        return server

    return Connector(start, close_server)


def serve_resumable(
    handler: SessionHandler,
    host: str | None,
    port: int,
    *,
    ssl: _ssl.SSLContext | None = None,
    settings: SessionSettings | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_connections: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    cluster: Cluster | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[ResumableServer]:
    """Serve resumable sessions on TCP ``host``:``port``; ``handler(session)`` once per session.

    ``server = await serve_resumable(...)`` or ``async with
    serve_resumable(...) as server:`` (closed gracefully on exit).
    Settings come from ``settings`` with any :class:`SessionSettings` field
    overridden by keyword (a keyword that is no field raises ``TypeError``;
    see :class:`SessionOptions`). A bad handshake or bad input from a peer
    closes that connection and is logged on ``streamkit.session``.

    - ``max_sessions`` (default 10,000) bounds sessions held at once: a new
      one past it is refused with ``REJECT(BUSY)``.
    - ``max_connections`` bounds connections open at once (each session has
      at most one; handshakes in progress count too): one past it is
      closed as soon as it is accepted, and logged. Default: ``max_sessions``
      plus a tenth, within what the open-file limit allows (see
      :func:`streamkit.net.default_max_connections`).
    - ``handshake_timeout`` (a setting, default 10 s) bounds the TLS
      handshake, then the session handshake, of each connection; a
      connection's first message (its hello) may announce at most
      1 KiB (:data:`~streamkit.session.protocol.MAX_HANDSHAKE_MESSAGE`),
      or it is closed before any more of it is read.
    - ``close_timeout`` (a setting, default 30 s) bounds a session's
      graceful close, and closing each connection (TLS's close included).
    - ``grace_period``: seconds handlers get once the server closes.
    """
    return serve_resumable_endpoint(
        handler,
        Endpoint.tcp(host, port),
        ssl=ssl,
        settings=settings,
        max_sessions=max_sessions,
        max_connections=max_connections,
        grace_period=grace_period,
        cluster=cluster,
        **options,
    )


def serve_resumable_unix(
    handler: SessionHandler,
    path: str | os.PathLike[str],
    *,
    mode: int | None = None,
    ssl: _ssl.SSLContext | None = None,
    settings: SessionSettings | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_connections: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    cluster: Cluster | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[ResumableServer]:
    """Serve resumable sessions on a Unix socket; otherwise as :func:`serve_resumable`.

    ``mode`` (e.g. ``0o660``) is applied to the socket file (see
    :func:`streamkit.serve_unix`).
    """
    return serve_resumable_endpoint(
        handler,
        Endpoint.unix(path, mode),
        ssl=ssl,
        settings=settings,
        max_sessions=max_sessions,
        max_connections=max_connections,
        grace_period=grace_period,
        cluster=cluster,
        **options,
    )
