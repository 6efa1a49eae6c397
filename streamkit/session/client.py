"""The client side of resumable sessions: connect, handshake, reconnect with resume."""

from __future__ import annotations

import asyncio
import os
import random
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import Unpack

from streamkit.codecs import LengthPrefixed
from streamkit.errors import ConnectionLost, ProtocolError, SessionError
from streamkit.net import Connector, Endpoint, connect_endpoint
from streamkit.session.core import ClientHandshake, SessionCore, SessionFinished, rejection_error
from streamkit.session.protocol import HelloNew, Reject, Welcome
from streamkit.session.session import Session
from streamkit.session.settings import SessionOptions, SessionSettings, resolve_settings
from streamkit.stream import FramedStream

__all__ = ["ClientSession", "connect_resumable", "connect_resumable_unix"]

Opener = Callable[[], Awaitable[FramedStream[bytes]]]


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


async def _handshake(
    stream: FramedStream[bytes], handshake: ClientHandshake
) -> tuple[Welcome | Reject, bytes]:
    """Run the client's handshake on ``stream``: the server's answer and the bytes after it."""
    stream.sender.write_parts(handshake.data_to_send())
    while True:
        try:
            data = await stream.recv_data()
        except ConnectionLost as exc:
            raise handshake.connection_lost(exc.__cause__ or exc) from exc
        if not data:
            raise handshake.receive_eof()
        answer = handshake.receive_data(data)
        stream.sender.write_parts(handshake.data_to_send())
        if answer is not None:
            return answer, handshake.rest


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

    __slots__ = ("_delays", "_opener", "_random", "_reconnect_task")

    def __init__(self, core: SessionCore, opener: Opener) -> None:
        super().__init__(core, on_detached=self._reconnect_soon, on_ended=self._stop_reconnecting)
        self._opener = opener
        self._reconnect_task: asyncio.Task[None] | None = None
        self._random = random.Random()
        self._delays = core.settings.reconnect_backoff.delays(self._random)

    def reconnect(self) -> None:
        """Drop the current connection and resume on a new one; nothing is lost.

        For a client that knows its network changed, and for tests.
        """
        self.drop_connection()

    def _reconnect_soon(self) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect())

    def _stop_reconnecting(self) -> None:
        task = self._reconnect_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _reconnect(self) -> None:
        """Resume the session, backing off while nothing gets through.

        The core decides whether to begin at once and when to give up
        (its timer fails the session, which cancels this task).
        """
        core = self.core
        pause = not core.reconnect_at_once
        if not pause:  # a new run of retries
            self._delays = self.settings.reconnect_backoff.delays(self._random)
        while not core.attached and not core.ended:
            if pause:
                await asyncio.sleep(next(self._delays))
            pause = True
            try:
                await self._resume_once()
            except (OSError, TimeoutError, ProtocolError, ConnectionLost) as exc:
                core.resume_failed(exc)
            except SessionError:
                return  # the welcome could not be served: the session failed with it

    async def _resume_once(self) -> None:
        core = self.core
        async with asyncio.timeout(self.settings.handshake_timeout):
            stream = await self._opener()
            try:
                handshake = ClientHandshake(core.resume_hello, core.session_id)
                answer, rest = await _handshake(stream, handshake)
            except BaseException:
                stream.abort()
                raise
        if isinstance(answer, Reject):
            stream.abort()
            self.rejected(answer)
        else:
            self.attach(stream, answer.received, answer.limits, rest)


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
                hello = HelloNew(settings.announced())
                answer, rest = await _handshake(stream, ClientHandshake(lambda nonce: hello))
            except BaseException:
                stream.abort()
                raise
    except TimeoutError as exc:  # asyncio's says nothing: say what was tried, and where
        if stream is None and (exc.errno is not None or exc.args):
            raise  # the OS's connect timeout, or the TLS handshake's: they say so
        raise _handshake_timeout(stream, settings.handshake_timeout) from exc
    if isinstance(answer, Reject):
        stream.abort()
        error = rejection_error(answer)
        if isinstance(error, SessionFinished):  # no new session is ever finished
            raise SessionError(str(error))
        raise error
    clock = asyncio.get_running_loop().time
    core = SessionCore(answer.session_id, answer.token, settings, client=True, clock=clock)
    session = ClientSession(core, opener)
    session.attach(stream, answer.received, answer.limits, rest)
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
