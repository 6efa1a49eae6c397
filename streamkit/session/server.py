"""The server side of resumable sessions: handshake, session registry, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import ssl as _ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Unpack

from streamkit._lifecycle import ServerBase
from streamkit.codecs import LengthPrefixed
from streamkit.errors import (
    ConnectionLost,
    EndOfStream,
    FrameTooLarge,
    ProtocolError,
    ResumeRejected,
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
from streamkit.session.protocol import (
    MAX_HANDSHAKE_MESSAGE,
    NONCE_SIZE,
    PREFACE_SIZE,
    SESSION_ID_SIZE,
    TOKEN_SIZE,
    VERSION,
    HelloNew,
    HelloResume,
    ReceiveLimits,
    Reject,
    RejectReason,
    Welcome,
    check_partial_preface,
    check_preface,
    decode_message,
    looks_like_http,
    make_preface,
    resume_proof,
)
from streamkit.session.session import (
    Session,
    SessionOptions,
    SessionSettings,
    _Connection,
)
from streamkit.session.settings import resolve_settings
from streamkit.stream import FramedStream

__all__ = ["ResumableServer", "ServerSession", "serve_resumable", "serve_resumable_unix"]

logger = logging.getLogger("streamkit.session")

SessionHandler = Callable[["ServerSession"], Awaitable[Any]]

#: Default limit on sessions held at once (live or waiting for a resume).
DEFAULT_MAX_SESSIONS = 10_000
#: Ended session ids remembered, to tell a late resume why it is refused.
_ENDED_MEMORY = 4096
#: The framing of a connection until its handshake completes (the session
#: then frames it with its own limits): a first message whose header
#: announces more than a handshake message can be closes the connection
#: before any of its body is read.
_HANDSHAKE_CODEC = LengthPrefixed(max_frame=MAX_HANDSHAKE_MESSAGE)


class _Refused(Exception):
    """The handshake was refused; the REJECT is already queued."""


class ServerSession(Session):
    """A :class:`Session` held by a server; it waits ``resume_timeout`` for its client."""

    def __init__(
        self, session_id: bytes, token: bytes, settings: SessionSettings, server: ResumableServer
    ) -> None:
        super().__init__(session_id, settings)
        self._token = token
        self._server = server
        self._expiry: asyncio.TimerHandle | None = None
        self.handler_task: asyncio.Task[None] | None = None

    def _check_proof(self, nonce: bytes, received: int, proof: bytes) -> bool:
        expected = resume_proof(self._token, nonce, self._id, received)
        return hmac.compare_digest(expected, proof)

    def _attach(
        self, stream: FramedStream[bytes], peer_received: int, peer: ReceiveLimits
    ) -> _Connection:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        return super()._attach(stream, peer_received, peer)

    def _on_detached(self) -> None:
        if not self._close_complete():
            self._expiry = self._loop.call_later(self.settings.resume_timeout, self._expire)

    def _on_close_sent(self) -> None:
        self._close_complete()

    def _close_complete(self) -> bool:
        """End a closing session that has no connection and nothing unacknowledged.

        The client has every frame; whether or not it saw the CLOSE, it
        needs nothing more from us. If it comes back, its resume is
        answered FINISHED, which is its end of stream. So ``close()`` does
        not wait for a CLOSE_ACK lost with the connection.
        """
        if self._close_sent and self._conn is None and self._send_state.unacked == 0:
            self._finish()
            return True
        return False

    # A session that ends is unregistered and remembered at once, not when
    # its handler returns: a client whose CLOSE_ACK was lost resumes and
    # must hear FINISHED; one that comes back too late must hear EXPIRED;
    # and an ended session must not count towards max_sessions.

    def _finish(self) -> None:
        super()._finish()
        self._server._ended_session(self)

    def _fail(self, error: StreamkitError) -> None:
        super()._fail(error)
        self._server._ended_session(self)

    def _expire(self) -> None:
        self._expiry = None
        self._fail(
            SessionExpired(
                f"session {self.id} expired: its client did not resume within "
                f"resume_timeout={self.settings.resume_timeout} s"
            )
        )
        self._teardown()

    def _teardown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        super()._teardown()


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
    ) -> None:
        self._handler = handler
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

    def close(self) -> None:
        """Stop accepting connections and new sessions."""
        if self._closing_since is None:
            self._closing_since = asyncio.get_running_loop().time()
        if self._server is not None:
            self._server.close()

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

    # -- sessions -------------------------------------------------------------

    def _ended_session(self, session: ServerSession) -> None:
        """Unregister a session that ended and remember why, for a late resume."""
        if self._sessions.pop(session._id, None) is None:
            return
        if session._failure is None and session._finished.is_set():
            ended = (RejectReason.FINISHED, f"session {session.id} was closed")
        elif isinstance(session._failure, SessionExpired):
            ended = (RejectReason.EXPIRED, str(session._failure))
        else:
            ended = (RejectReason.UNKNOWN_SESSION, f"session {session.id} was aborted")
        self._ended[session._id] = ended
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
            session._teardown()
            self._ended_session(session)

    # -- connections ----------------------------------------------------------

    async def _on_connection(self, stream: FramedStream[bytes]) -> None:
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                conn = await self._handshake(stream)
        except _Refused:
            return
        except (ProtocolError, ConnectionLost, EndOfStream, TimeoutError, OSError) as exc:
            logger.warning("session handshake with %s failed: %s", stream.peername, exc)
            return
        await conn.closed

    def _refuse(self, stream: FramedStream[bytes], reason: RejectReason, message: str) -> _Refused:
        logger.warning(
            "refused session handshake from %s (%s): %s", stream.peername, reason.name, message
        )
        stream.send_nowait(Reject(reason, message).encode())
        return _Refused(message)

    async def _handshake(self, stream: FramedStream[bytes]) -> _Connection:
        try:
            preface = await stream.reader.readexactly(PREFACE_SIZE)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                check_partial_preface(exc.partial, "client")
            raise ConnectionLost("the client closed the connection during the handshake") from exc
        try:
            version = check_preface(preface, "client")
        except ProtocolError:
            if looks_like_http(preface):
                await _answer_http(stream)
            raise
        nonce = secrets.token_bytes(NONCE_SIZE)
        stream.writer.write(make_preface(nonce))
        if version != VERSION:
            raise self._refuse(
                stream,
                RejectReason.UNSUPPORTED_VERSION,
                f"client speaks session protocol version {version}; this server speaks {VERSION}",
            )
        try:
            hello = decode_message(await stream.recv())
        except FrameTooLarge as exc:
            raise ProtocolError(
                f"the client's first message is over the {MAX_HANDSHAKE_MESSAGE} bytes a "
                f"connection may send before its handshake completes ({exc}); closed "
                "before reading it"
            ) from None
        if isinstance(hello, HelloNew):
            return self._new_session(stream, hello)
        if isinstance(hello, HelloResume):
            return self._resume_session(stream, nonce, hello)
        raise self._refuse(
            stream, RejectReason.MALFORMED, f"expected a HELLO, got {type(hello).__name__}"
        )

    def _new_session(self, stream: FramedStream[bytes], hello: HelloNew) -> _Connection:
        if self._closing_since is not None:
            raise self._refuse(stream, RejectReason.BUSY, "the server is shutting down")
        if len(self._sessions) >= self._max_sessions:
            raise self._refuse(
                stream, RejectReason.BUSY, f"the server holds max_sessions={self._max_sessions}"
            )
        session_id = secrets.token_bytes(SESSION_ID_SIZE)
        token = secrets.token_bytes(TOKEN_SIZE)
        # Raises ConnectionLost if the client is gone already: then no
        # session is registered, which nothing would ever expire.
        stream.send_nowait(self._welcome(False, session_id, 0, token).encode())
        session = ServerSession(session_id, token, self.settings, self)
        self._sessions[session_id] = session
        conn = session._attach(stream, 0, hello.limits)
        task = asyncio.create_task(self._run_handler(session))
        session.handler_task = task
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return conn

    def _resume_session(
        self, stream: FramedStream[bytes], nonce: bytes, hello: HelloResume
    ) -> _Connection:
        session = self._sessions.get(hello.session_id)
        if session is None or session.closed:
            reason, message = self._ended.get(
                hello.session_id,
                (RejectReason.UNKNOWN_SESSION, f"no session {hello.session_id.hex()}"),
            )
            raise self._refuse(stream, reason, message)
        if not session._check_proof(nonce, hello.received, hello.proof):
            raise self._refuse(
                stream, RejectReason.BAD_TOKEN, f"wrong token for session {session.id}"
            )
        try:
            session._send_state.check_replay(hello.received)
        except ResumeRejected as exc:
            raise self._refuse(stream, RejectReason.BAD_OFFSET, str(exc)) from None
        welcome = self._welcome(True, session._id, session._recv_state.received)
        stream.send_nowait(welcome.encode())
        return session._attach(stream, hello.received, hello.limits)

    def _welcome(
        self, present: bool, session_id: bytes, received: int, token: bytes = b""
    ) -> Welcome:
        """A WELCOME announcing our max_frame and receive window."""
        return Welcome(present, session_id, received, token, self.settings.announced())


_HTTP_BODY = b"This port speaks the streamkit session protocol, not HTTP.\n"
_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_HTTP_BODY), _HTTP_BODY)
)
#: How long an HTTP client's request head may take to arrive before the answer.
_HTTP_READ_TIMEOUT = 1.0


async def _answer_http(stream: FramedStream[bytes]) -> None:
    """Tell an HTTP client, in HTTP, that this is a session port."""
    # Read the request head first: closing with it unread would reset the
    # connection, and the answer would be lost.
    with contextlib.suppress(
        TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError
    ):
        async with asyncio.timeout(_HTTP_READ_TIMEOUT):
            await stream.reader.readuntil(b"\r\n\r\n")
    stream.writer.write(_HTTP_REPLY)


def serve_resumable_endpoint(
    handler: SessionHandler,
    endpoint: Endpoint,
    *,
    ssl: _ssl.SSLContext | None = None,
    settings: SessionSettings | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_connections: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
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
        handler, resolved, max_sessions=max_sessions, grace_period=grace_period
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
        server._server = await serving
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
        **options,
    )
