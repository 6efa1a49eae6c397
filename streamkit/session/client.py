"""The client side of resumable sessions: connect, handshake, reconnect with resume."""

from __future__ import annotations

import asyncio
import os
import random
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import Unpack

from streamkit.codecs import LengthPrefixed
from streamkit.errors import (
    ConnectionLost,
    EndOfStream,
    ProtocolError,
    ResumeRejected,
    SessionError,
    SessionExpired,
    StreamkitError,
)
from streamkit.net import Connector, Endpoint, connect_endpoint
from streamkit.session.protocol import (
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

__all__ = ["ClientSession", "connect_resumable", "connect_resumable_unix"]

Opener = Callable[[], Awaitable[FramedStream[bytes]]]


class _Finished(SessionError):
    """The server says the session was closed gracefully."""


#: Why a server may drop a connection in the middle of the handshake.
_HANDSHAKE_HINT = (
    "is it a streamkit session server, does it use TLS exactly when this client does "
    "(a TLS server drops a plain client), and is it below its max_connections?"
)


async def _read_raw(
    stream: FramedStream[bytes], size: int, what: str, *, preface: bool = False
) -> bytes:
    """Read ``size`` unframed bytes of the handshake (``preface``: the server's preface)."""
    try:
        return await stream.reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        if preface:
            check_partial_preface(exc.partial, "server")  # names what the peer speaks instead
        raise ConnectionLost(
            f"the server closed the connection during the {what}: {_HANDSHAKE_HINT}"
        ) from exc
    except (ConnectionError, OSError) as exc:
        raise ConnectionLost(
            f"connection lost during the {what}: {exc!r}; {_HANDSHAKE_HINT}"
        ) from exc


async def _open_tls(connecting: Awaitable[FramedStream[bytes]], where: str) -> FramedStream[bytes]:
    """Await a TLS connection; a connection broken during the TLS handshake is explained.

    A plain session server reads the ClientHello as a bad preface and drops
    the connection, which the client sees as a bare reset. Certificate
    errors are clear already and pass through.
    """
    try:
        return await connecting
    except _ssl.SSLCertVerificationError:
        raise
    except (_ssl.SSLError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
        raise ConnectionLost(
            f"the TLS handshake with {where} failed ({exc!r}): the server may not use TLS "
            "on this port (a plain streamkit session server drops a TLS client), or may not "
            "be a streamkit session server"
        ) from exc


def _rejected(reject: Reject) -> StreamkitError:
    message = f"server rejected the session: {reject.message}"
    if reject.reason == RejectReason.EXPIRED:
        return SessionExpired(message)
    if reject.reason == RejectReason.FINISHED:
        return _Finished(message)
    return ResumeRejected(message)


async def _handshake(stream: FramedStream[bytes], hello: Callable[[bytes], bytes]) -> Welcome:
    """Exchange prefaces, send ``hello(nonce)`` and return the server's welcome."""
    stream.writer.write(make_preface())
    preface = await _read_raw(stream, PREFACE_SIZE, "handshake", preface=True)
    version = check_preface(preface, "server")
    if version != VERSION:
        raise ProtocolError(
            f"the server speaks session protocol version {version}; this client speaks {VERSION}"
        )
    nonce = await _read_raw(stream, NONCE_SIZE, "handshake")
    stream.send_nowait(hello(nonce))
    try:
        reply = decode_message(await stream.recv())
    except EndOfStream as exc:
        raise ConnectionLost(
            f"the server closed the connection during the handshake: {_HANDSHAKE_HINT}"
        ) from exc
    if isinstance(reply, Reject):
        raise _rejected(reply)
    if not isinstance(reply, Welcome):
        raise ProtocolError(f"expected WELCOME or REJECT, got {type(reply).__name__}")
    return reply


class ClientSession(Session):
    """A :class:`Session` that reconnects and resumes when its connection is lost.

    A connection made progress if the server acknowledged a new frame, a
    new frame arrived, or a keepalive round trip completed on it (the
    client pings right after each resume, behind its replay). After a
    connection that made progress, the client reconnects at once; after
    one that did not (the server dropped it right after the resume, or it
    could not be opened), it backs off (``reconnect_backoff``). When
    ``max_reconnect_time`` passes with no progress, the session fails with
    :class:`ConnectionLost` if the server could not be reached, or
    :class:`ProtocolError` if it accepted resumes and kept dropping them;
    with :class:`SessionExpired` / :class:`ResumeRejected` at once when the
    server refuses the resume.
    """

    def __init__(
        self, session_id: bytes, token: bytes, settings: SessionSettings, opener: Opener
    ) -> None:
        super().__init__(session_id, settings)
        self._token = token
        self._opener = opener
        self._reconnect_task: asyncio.Task[None] | None = None
        self._random = random.Random()
        # Progress counters as of the last attach: frames the server
        # acknowledged, frames received, PONGs received.
        self._marks = (0, 0, 0)
        # While connections make no progress: when the session gives up,
        # the next backoff delays, resumes the server accepted and the last error.
        self._retry_deadline: float | None = None
        self._retry_delays = settings.reconnect_backoff.delays(self._random)
        self._dropped = 0  # connections in a row that ended without progress
        self._last_error: BaseException | None = None
        self._last_dropped = False  # the last failure was such a connection

    def reconnect(self) -> None:
        """Drop the current connection and resume on a new one; nothing is lost.

        For a client that knows its network changed, and for tests.
        """
        conn = self._conn
        if conn is not None:
            conn.stream.abort()  # the read loop sees the loss and resumes

    # The PONG to that ping comes back after the server has taken our
    # replay and sent its own: progress, even for an idle session.
    _ping_on_attach = True

    def _attach(
        self, stream: FramedStream[bytes], peer_received: int, peer: ReceiveLimits
    ) -> _Connection:
        conn = super()._attach(stream, peer_received, peer)
        self._marks = self._progress_marks()
        return conn

    def _progress_marks(self) -> tuple[int, int, int]:
        return (self._send_state.received, self._recv_state.received, self._pongs)

    def _connection_lost(self, conn: _Connection, reason: BaseException | None) -> None:
        if conn is self._conn:
            self._last_error = reason
        super()._connection_lost(conn, reason)

    def _on_detached(self) -> None:
        progressed = self._progress_marks() != self._marks
        pause = not progressed and self._retry_deadline is not None
        if not pause:
            # A new run of reconnects: its own deadline, first try at once.
            self._retry_deadline = self._loop.time() + self.settings.max_reconnect_time
            self._retry_delays = self.settings.reconnect_backoff.delays(self._random)
            self._dropped = 0
        if not progressed:
            self._dropped += 1
        self._last_dropped = not progressed
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect(pause))

    def _teardown(self) -> None:
        task = self._reconnect_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        super()._teardown()

    def _resume_hello(self, nonce: bytes) -> bytes:
        received = self._recv_state.received
        proof = resume_proof(self._token, nonce, self._id, received)
        return HelloResume(self._id, proof, received, self.settings.announced()).encode()

    async def _resume_once(self) -> None:
        async with asyncio.timeout(self.settings.handshake_timeout):
            stream = await self._opener()
            try:
                welcome = await _handshake(stream, self._resume_hello)
                if not welcome.present or welcome.session_id != self._id:
                    raise ProtocolError("the server answered a resume with another session")
                self._attach(stream, welcome.received, welcome.limits)
            except BaseException:
                stream.abort()
                raise

    async def _reconnect(self, pause: bool) -> None:
        """Resume the session, backing off while nothing gets through."""
        deadline = self._retry_deadline
        assert deadline is not None
        while True:
            if pause:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    self._give_up()
                    return
                await asyncio.sleep(min(remaining, next(self._retry_delays)))
            pause = True
            try:
                await self._resume_once()
            except _Finished:
                # The server closed the session after we received all of it.
                self._peer_closed = True
                self._finish()
                return
            except (SessionExpired, ResumeRejected) as exc:
                self._fail(exc)
                self._teardown()
                return
            except (OSError, TimeoutError, ProtocolError, ConnectionLost) as exc:
                self._last_error = exc
                self._last_dropped = False
            else:
                return

    def _give_up(self) -> None:
        """Fail the session: ``max_reconnect_time`` passed without progress."""
        limit = self.settings.max_reconnect_time
        error: StreamkitError
        if self._last_dropped:
            error = ProtocolError(
                f"session {self.id} made no progress within max_reconnect_time={limit} s: "
                f"{self._dropped} connections in a row were resumed and lost before "
                "anything got through (the server may be refusing a frame we replay; "
                f"see its log); last error: {self._last_error!r}"
            )
        else:
            error = ConnectionLost(
                f"could not resume session {self.id} within max_reconnect_time={limit} s: "
                f"{self._last_error!r}"
            )
        self._fail(error)
        self._teardown()


def _handshake_timeout(stream: FramedStream[bytes] | None, timeout: float) -> TimeoutError:
    """The error of a handshake that did not complete within ``handshake_timeout``."""
    if stream is None:
        return TimeoutError(f"no connection within handshake_timeout={timeout:g} s")
    peer = stream.peername
    where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    return TimeoutError(
        f"no answer to the session handshake from {where} within handshake_timeout="
        f"{timeout:g} s: the peer accepted the connection but sent no session preface "
        "(is it a streamkit session server?)"
    )


async def _open_session(opener: Opener, settings: SessionSettings) -> ClientSession:
    stream: FramedStream[bytes] | None = None
    try:
        async with asyncio.timeout(settings.handshake_timeout):
            stream = await opener()
            try:
                hello = HelloNew(settings.announced()).encode()
                welcome = await _handshake(stream, lambda nonce: hello)
                if (
                    welcome.present
                    or len(welcome.session_id) != SESSION_ID_SIZE
                    or len(welcome.token) != TOKEN_SIZE
                ):
                    raise ProtocolError("malformed WELCOME for a new session")
            except _Finished as exc:
                stream.abort()
                raise SessionError(str(exc)) from None
            except BaseException:
                stream.abort()
                raise
    except TimeoutError as exc:  # asyncio's says nothing: say what was tried, and where
        if stream is None and (exc.errno is not None or exc.args):
            raise  # the OS's connect timeout, or the TLS handshake's: they say so
        raise _handshake_timeout(stream, settings.handshake_timeout) from exc
    session = ClientSession(welcome.session_id, welcome.token, settings, opener)
    session._attach(stream, welcome.received, welcome.limits)
    return session


async def _release(session: Session, exc: BaseException | None) -> None:
    if exc is None:
        await session.close()
    else:
        session.abort()


def connect_resumable_endpoint(
    endpoint: Endpoint,
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    settings: SessionSettings | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[ClientSession]:
    """Open a resumable session to ``endpoint``: both connect functions in one.

    For the layers above (users call :func:`connect_resumable` /
    :func:`connect_resumable_unix`). Arguments as :func:`connect_resumable`.
    """
    resolved = resolve_settings(settings, options)
    codec = LengthPrefixed(max_frame=resolved.framing_limit())

    def opener() -> Awaitable[FramedStream[bytes]]:
        connecting = connect_endpoint(
            endpoint,
            codec=codec,
            ssl=ssl,
            server_hostname=server_hostname,
            close_timeout=resolved.close_timeout,
        )
        return _open_tls(connecting, str(endpoint)) if ssl else connecting

    return Connector(lambda: _open_session(opener, resolved), _release)


def connect_resumable(
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    settings: SessionSettings | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[ClientSession]:
    """Open a resumable session to a :func:`serve_resumable` server over TCP.

    ``session = await connect_resumable(...)`` or ``async with
    connect_resumable(...) as session:`` (closed gracefully on exit, aborted
    on an exception). Settings come from ``settings`` with any
    :class:`SessionSettings` field overridden by keyword, e.g.
    ``connect_resumable(host, port, resume_timeout=5)`` (a keyword that is
    no field raises ``TypeError``; see :class:`SessionOptions`). The first
    connection's errors are raised (``OSError``, ``TimeoutError``,
    :class:`ProtocolError` for a peer that is no session server,
    :class:`ConnectionLost` saying why for one that drops the handshake,
    such as a plain server a TLS client connects to, with the OS error as
    ``__cause__``); after that the session reconnects by itself.
    ``handshake_timeout`` bounds each connection's connect, TLS handshake
    and session handshake; ``close_timeout`` bounds the session's graceful
    close, and closing each of its connections (TLS's close included).
    """
    return connect_resumable_endpoint(
        Endpoint.tcp(host, port),
        ssl=ssl,
        server_hostname=server_hostname,
        settings=settings,
        **options,
    )


def connect_resumable_unix(
    path: str | os.PathLike[str],
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    settings: SessionSettings | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[ClientSession]:
    """Open a resumable session over a Unix socket; otherwise as :func:`connect_resumable`."""
    return connect_resumable_endpoint(
        Endpoint.unix(path),
        ssl=ssl,
        server_hostname=server_hostname,
        settings=settings,
        **options,
    )
