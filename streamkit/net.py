"""connect / serve: framed streams over TCP and Unix sockets, with TLS and graceful shutdown.

Every function here opens or serves one :class:`Endpoint`, a TCP host and
port or a Unix socket path: :func:`connect_endpoint` is the one place that
opens a connection and :func:`serve_endpoint` the one place that listens.
``connect`` / ``connect_unix`` and ``serve`` / ``serve_unix`` are thin
wrappers over them, and so are the session and hub layers' functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl as _ssl
import stat
import sys
import warnings
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from streamkit._lifecycle import Closable, ServerBase, close_listener
from streamkit.codecs import Codec
from streamkit.stream import DEFAULT_CLOSE_TIMEOUT, FramedStream, StreamProtocol

__all__ = ["Connector", "Server", "connect", "connect_unix", "serve", "serve_unix"]

logger = logging.getLogger("streamkit")

FrameT = TypeVar("FrameT")
Handler = Callable[[FramedStream[FrameT]], Awaitable[Any]]

#: Default reader ``limit``: what a ``StreamReader`` buffers before it pauses reading.
DEFAULT_LIMIT = 256 * 1024
#: Default seconds that running handlers get to finish once a server closes.
DEFAULT_GRACE_PERIOD = 5.0
#: Default seconds a server gives a new connection to complete its TLS handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: File descriptors that the default ``max_connections`` leaves to the rest of
#: the process (files, logs, outgoing connections), at most half of them all.
FD_RESERVE = 64
#: The default ``max_connections`` where the process has no open-file limit.
_UNLIMITED_FDS_CONNECTIONS = 100_000
#: Seconds between two log lines about connections refused over ``max_connections``.
REFUSALS_LOG_INTERVAL = 10.0


ConnT = TypeVar("ConnT")


class Connector(Generic[ConnT]):
    """The pending result of a connect or serve call: ``await`` it or use ``async with``.

    ``conn = await connect(...)`` gives a connection (``server = await
    serve(...)`` a server) that the caller closes; ``async with connect(...)
    as conn:`` closes it on exit (``release`` is called with the connection
    and the exception that ended the block, if any).
    """

    def __init__(
        self,
        opener: Callable[[], Awaitable[ConnT]],
        release: Callable[[ConnT, BaseException | None], Awaitable[None]],
    ) -> None:
        self._opener = opener
        self._release = release
        self._conn: ConnT | None = None

    def __await__(self) -> Generator[Any, None, ConnT]:
        return self._opener().__await__()

    async def __aenter__(self) -> ConnT:
        self._conn = await self._opener()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._release(conn, exc)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a connection goes or a server listens: TCP ``host``:``port``, or a Unix socket.

    With ``path`` set it is the Unix socket at ``path`` (on Linux, a name
    starting with ``"\\0"`` is abstract: no file), and ``mode`` is the
    permission bits its file gets when served (e.g. ``0o660``); otherwise
    it is TCP ``host``:``port`` (``host=None``: every interface, when
    served). Build one with :meth:`tcp` or :meth:`unix`.
    """

    host: str | None = None
    port: int | str | None = None
    path: str | None = None
    mode: int | None = None

    def __post_init__(self) -> None:
        if self.path is None:
            if self.mode is not None:
                raise ValueError("mode applies to a Unix socket file only")
        elif self.path.startswith("\0") and self.mode is not None:
            raise ValueError("mode does not apply to an abstract socket name (no file)")

    @classmethod
    def tcp(cls, host: str | None, port: int | str | None) -> Endpoint:
        """TCP ``host``:``port``."""
        return cls(host=host, port=port)

    @classmethod
    def unix(cls, path: str | os.PathLike[str], mode: int | None = None) -> Endpoint:
        """The Unix socket at ``path`` (its file gets ``mode`` when served)."""
        return cls(path=os.fspath(path), mode=mode)

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = self.host or "*"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _check_timeout(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0 or None, not {value}")


async def _close_stream(stream: FramedStream[Any], exc: BaseException | None) -> None:
    stream.close()
    await stream.wait_closed()


async def _open(
    endpoint: Endpoint,
    codec: Codec[FrameT],
    timeout: float | None,
    stream_options: dict[str, Any],
    kwargs: dict[str, Any],
) -> FramedStream[FrameT]:
    loop = asyncio.get_running_loop()
    options = dict(kwargs)
    limit = options.pop("limit")
    path = endpoint.path
    # As asyncio.open_connection passes them: the loop's stubs are narrower
    # than what it takes (a service name is a port too).
    host: Any = endpoint.host
    port: Any = endpoint.port

    def create(factory: Callable[[], StreamProtocol]) -> Awaitable[tuple[Any, Any]]:
        if path is not None:
            return loop.create_unix_connection(factory, path, **options)
        return loop.create_connection(factory, host, port, **options)

    async with asyncio.timeout(timeout):
        reader, writer = await StreamProtocol.open(create, limit=limit)
    return FramedStream(reader, writer, codec, **stream_options)


def connect_endpoint(
    endpoint: Endpoint,
    *,
    codec: Codec[FrameT],
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    **kwargs: Any,
) -> Connector[FramedStream[FrameT]]:
    """Open a connection to ``endpoint``: :func:`connect` and :func:`connect_unix` in one.

    The one place that opens a connection, for the layers above (users call
    :func:`connect` / :func:`connect_unix`). Arguments as :func:`connect`.
    """
    _check_timeout("close_timeout", close_timeout)
    options: dict[str, Any] = {"ssl": ssl, "server_hostname": server_hostname, "limit": limit}
    if ssl and close_timeout is not None:
        options["ssl_shutdown_timeout"] = close_timeout
    options.update(kwargs)
    stream_options = {
        "write_buffer_high": write_buffer_high,
        "write_buffer_low": write_buffer_low,
        "close_timeout": close_timeout,
    }
    return Connector(
        lambda: _open(endpoint, codec, timeout, stream_options, options), _close_stream
    )


def connect(
    host: str | None,
    port: int | str | None,
    *,
    codec: Codec[FrameT],
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    **kwargs: Any,
) -> Connector[FramedStream[FrameT]]:
    """Open a TCP connection (TLS with ``ssl``) and frame it with ``codec``.

    Use ``stream = await connect(...)`` or ``async with connect(...) as
    stream:``. ``timeout`` bounds the connection and TLS handshake (raising
    ``TimeoutError``); connection failures raise the ``OSError`` the OS
    gave. ``limit`` is the reader's buffer limit and ``write_buffer_high`` /
    ``write_buffer_low`` the transport's write-buffer water marks (see
    :class:`FramedStream`). ``close_timeout`` (seconds, default 10;
    ``None``: no bound) bounds closing the stream, TLS's close handshake
    included: past it the connection is aborted. Other keywords go to
    ``asyncio.open_connection``.
    """
    return connect_endpoint(
        Endpoint.tcp(host, port),
        codec=codec,
        ssl=ssl,
        server_hostname=server_hostname,
        timeout=timeout,
        limit=limit,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
        close_timeout=close_timeout,
        **kwargs,
    )


def connect_unix(
    path: str | os.PathLike[str],
    *,
    codec: Codec[FrameT],
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    **kwargs: Any,
) -> Connector[FramedStream[FrameT]]:
    """Open a Unix-socket connection at ``path``; otherwise as :func:`connect`."""
    return connect_endpoint(
        Endpoint.unix(path),
        codec=codec,
        ssl=ssl,
        server_hostname=server_hostname,
        timeout=timeout,
        limit=limit,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
        close_timeout=close_timeout,
        **kwargs,
    )


def default_max_connections(sessions: int | None = None) -> int:
    """The default ``max_connections`` of a server started now.

    Every connection holds a file descriptor, so the default is what the
    process may open (its soft ``RLIMIT_NOFILE``, ``ulimit -n``) less
    :data:`FD_RESERVE` for everything else: a flood of connections is
    refused before it starves the process of descriptors (when ``accept``
    fails for want of one, asyncio stops accepting for a second, and the
    process cannot open a file). For a server of at most ``sessions``
    sessions it is also at most ``sessions`` plus a tenth (at least 10)
    for handshakes and resumes in progress: with the default
    ``max_sessions`` of 10,000, 11,000 connections.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - no open-file limit to read (Windows)
        budget = _UNLIMITED_FDS_CONNECTIONS
    else:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            budget = _UNLIMITED_FDS_CONNECTIONS
        else:
            budget = soft - min(FD_RESERVE, soft // 2)
    if sessions is not None:
        budget = min(budget, sessions + max(10, sessions // 10))
    return max(1, budget)


class Server(ServerBase, Generic[FrameT]):
    """A listening server that calls a handler with a framed stream per connection.

    ``async with`` closes it on exit; ``serve_forever()`` runs until
    cancelled. ``close()`` stops accepting at once; ``await wait_closed()``
    then gives running handlers ``grace_period`` seconds to finish before
    cancelling them, and returns when every handler and connection is done.

    At most ``max_connections`` connections are open at once (those still
    in their TLS handshake included); one past it is closed as soon as it
    is accepted, and logged (the first at once, then a count every
    :data:`REFUSALS_LOG_INTERVAL` seconds while refusals go on). With
    ``ssl``, each connection's TLS handshake must finish within
    ``handshake_timeout`` seconds, or the connection is dropped and logged;
    no handler runs for it.
    """

    def __init__(
        self,
        handler: Handler[FrameT],
        codec: Codec[FrameT],
        *,
        ssl: _ssl.SSLContext | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        write_buffer_high: int | None = None,
        write_buffer_low: int | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
        max_connections: int | None = None,
    ) -> None:
        _check_timeout("handshake_timeout", handshake_timeout)
        _check_timeout("close_timeout", close_timeout)
        if max_connections is None:
            max_connections = default_max_connections()
        elif max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self._handler = handler
        self._codec = codec
        self._ssl = ssl
        self._grace_period = grace_period
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections
        self._stream_options: dict[str, Any] = {
            "write_buffer_high": write_buffer_high,
            "write_buffer_low": write_buffer_low,
            "close_timeout": close_timeout,
        }
        self._tls_options: dict[str, Any] = {"ssl_handshake_timeout": handshake_timeout}
        if sys.version_info >= (3, 12) and close_timeout is not None:
            # Bounds a TLS close nobody waits for too (StreamWriter.start_tls
            # takes it since 3.12; before, wait_closed's abort is the bound).
            self._tls_options["ssl_shutdown_timeout"] = close_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing_since: float | None = None
        self._unix_path: str | None = None
        self._unix_inode: tuple[int, int] | None = None
        # Refusals over max_connections since the last log line about them
        # (None: none is due, the next one is logged at once).
        self._refused: int | None = None
        self._refusals_report: asyncio.TimerHandle | None = None

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing_since is not None:
            # Accepted by the event loop just before close(): refuse it.
            writer.close()
            return
        if len(self._tasks) >= self._max_connections:
            self._refuse(writer)
            return
        if self._ssl is not None:
            # The handler's task does the TLS handshake: until it starts,
            # the ClientHello must stay in the socket, not in the reader.
            cast(asyncio.Transport, writer.transport).pause_reading()
        # Tracked from the moment of accepting, so that a close() right
        # after it still gives this handler its grace period, then cancels it.
        task = asyncio.get_running_loop().create_task(self._run_handler(reader, writer))
        self._tasks.add(task)
        self._idle.clear()

        def done(task: asyncio.Task[None]) -> None:
            writer.close()  # a no-op unless cancelled before it started
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

        task.add_done_callback(done)

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection over ``max_connections`` now; log it, or count it for the log."""
        writer.transport.abort()
        if self._refused is not None:
            self._refused += 1
            return
        logger.warning(
            "refused a connection from %s: max_connections=%d are open "
            "(further refusals are counted and logged every %.0f s)",
            writer.get_extra_info("peername") or "a Unix-socket peer",
            self._max_connections,
            REFUSALS_LOG_INTERVAL,
        )
        self._refused = 0
        self._refusals_report = asyncio.get_running_loop().call_later(
            REFUSALS_LOG_INTERVAL, self._report_refusals
        )

    def _report_refusals(self) -> None:
        """Log how many connections were refused since the last line; stop when none was."""
        refused, self._refused = self._refused, None
        self._refusals_report = None
        if refused:
            logger.warning(
                "refused %d more connection(s) in the last %.0f s: max_connections=%d were open",
                refused,
                REFUSALS_LOG_INTERVAL,
                self._max_connections,
            )
            if self._closing_since is None:  # more may come: count them
                self._refused = 0
                self._refusals_report = asyncio.get_running_loop().call_later(
                    REFUSALS_LOG_INTERVAL, self._report_refusals
                )

    async def _start_tls(self, writer: asyncio.StreamWriter) -> bool:
        """Do the server's side of the TLS handshake; False if it failed (logged, dropped)."""
        assert self._ssl is not None
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(self._handshake_timeout):
                await writer.start_tls(self._ssl, **self._tls_options)
        except TimeoutError:
            logger.warning(
                "TLS handshake with %s failed: not done within handshake_timeout=%s s",
                peer,
                self._handshake_timeout,
            )
        except OSError as exc:  # ssl.SSLError included
            logger.warning("TLS handshake with %s failed: %s", peer, exc)
        else:
            return True
        writer.transport.abort()
        return False

    async def _run_handler(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stream: FramedStream[FrameT] | None = None
        try:
            if self._ssl is not None and not await self._start_tls(writer):
                return
            stream = FramedStream(reader, writer, self._codec, **self._stream_options)
            try:
                await self._handler(stream)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("handler for %s failed; closing its connection", stream.peername)
                stream.abort()
            else:
                stream.close()
            await stream.wait_closed()
        except asyncio.CancelledError:
            # Cancelled after the grace period or at loop shutdown: drop the
            # connection and end normally, so that nothing logs the
            # cancelled task as an error.
            if stream is not None:
                stream.abort()
            else:
                writer.transport.abort()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        if self._server is None:
            return ()
        return tuple(self._server.sockets)

    @property
    def port(self) -> int:
        """The bound TCP port of the first listening socket (useful with ``port=0``)."""
        for sock in self.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        raise ValueError("this server listens on no TCP socket")

    @property
    def connections(self) -> int:
        """How many connections are open (those in their TLS handshake included)."""
        return len(self._tasks)

    @property
    def handlers(self) -> int:
        """How many connection handlers are running: one per open connection."""
        return len(self._tasks)

    @property
    def max_connections(self) -> int:
        """The most connections open at once; more are closed as they come."""
        return self._max_connections

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return (
            self._closing_since is None and self._server is not None and self._server.is_serving()
        )

    def close(self) -> None:
        """Stop accepting connections; running handlers keep going for now."""
        if self._closing_since is None:
            self._closing_since = asyncio.get_running_loop().time()
        if self._server is not None:
            close_listener(self._server)
        self._remove_unix_socket()
        if self._refusals_report is not None:
            self._refusals_report.cancel()
            self._report_refusals()  # the refusals not logged yet, now

    async def wait_closed(self) -> None:
        """Wait for handlers up to the grace period from ``close()``, then cancel the rest."""
        if self._closing_since is None:
            raise RuntimeError("wait_closed() called before close()")
        deadline = self._closing_since + self._grace_period
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._idle.wait()
        if self._tasks:
            logger.info(
                "cancelling %d handler(s) still running after the %.1f s grace period",
                len(self._tasks),
                self._grace_period,
            )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _remove_unix_socket(self) -> None:
        path, self._unix_path = self._unix_path, None
        if path is None:
            return
        # Remove the file only if it is still ours, not a later server's.
        with contextlib.suppress(OSError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == self._unix_inode:
                os.unlink(path)


async def close_server(server: Closable, exc: BaseException | None) -> None:
    """Close ``server`` gracefully: how ``async with serve...(...)`` ends."""
    server.close()
    await server.wait_closed()


def _renamed(kwargs: dict[str, Any], old: str, new: str, value: float | None) -> float | None:
    """``kwargs[old]`` if given (a deprecated name of ``new``), else ``value``."""
    if old not in kwargs:
        return value
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=4)
    renamed: float | None = kwargs.pop(old)
    return renamed


async def _listen(server: Server[FrameT], endpoint: Endpoint, kwargs: dict[str, Any]) -> None:
    """Start ``server`` listening on ``endpoint``; ``kwargs`` go to ``asyncio.start_server``."""
    loop = asyncio.get_running_loop()
    options = dict(kwargs)
    factory = StreamProtocol.factory(server._on_connection, limit=options.pop("limit"))
    if endpoint.path is None:
        port: Any = endpoint.port  # as asyncio.start_server passes it (see _open)
        server._server = await loop.create_server(factory, endpoint.host, port, **options)
        return
    path = endpoint.path
    sock = _bind_unix(path)
    try:
        if endpoint.mode is not None:
            os.chmod(path, endpoint.mode)
        if not path.startswith("\0"):
            info = os.stat(path)
            server._unix_path = path
            server._unix_inode = (info.st_dev, info.st_ino)
        server._server = await loop.create_unix_server(factory, sock=sock, **options)
    except BaseException:
        sock.close()
        server._remove_unix_socket()
        raise


def serve_endpoint(
    handler: Handler[FrameT],
    endpoint: Endpoint,
    *,
    codec: Codec[FrameT],
    ssl: _ssl.SSLContext | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    max_connections: int | None = None,
    **kwargs: Any,
) -> Connector[Server[FrameT]]:
    """Serve on ``endpoint``: :func:`serve` and :func:`serve_unix` in one.

    The one place that listens, for the layers above (users call
    :func:`serve` / :func:`serve_unix`). Arguments as :func:`serve`; bad
    ones raise ``ValueError`` here, before anything listens.
    """
    kwargs = dict(kwargs)
    handshake_timeout = _renamed(
        kwargs, "ssl_handshake_timeout", "handshake_timeout", handshake_timeout
    )
    close_timeout = _renamed(kwargs, "ssl_shutdown_timeout", "close_timeout", close_timeout)
    kwargs["limit"] = limit
    server = Server(
        handler,
        codec,
        ssl=ssl,
        grace_period=grace_period,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
        handshake_timeout=handshake_timeout,
        close_timeout=close_timeout,
        max_connections=max_connections,
    )

    async def start() -> Server[FrameT]:
        if server._server is not None or server._closing_since is not None:
            raise RuntimeError("this serve call has started its server already")
        await _listen(server, endpoint, kwargs)
        return server

    return Connector(start, close_server)


def serve(
    handler: Handler[FrameT],
    host: str | None,
    port: int | str | None,
    *,
    codec: Codec[FrameT],
    ssl: _ssl.SSLContext | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    max_connections: int | None = None,
    **kwargs: Any,
) -> Connector[Server[FrameT]]:
    """Listen on TCP ``host``:``port`` and call ``await handler(stream)`` per connection.

    ``server = await serve(...)`` (close it with ``close()`` and ``await
    wait_closed()``) or ``async with serve(...) as server:`` (closed
    gracefully on exit). ``port=0`` picks a free port (see
    :attr:`Server.port`). A handler that raises is logged on the
    ``streamkit`` logger and closes only its own connection; when it
    returns, its stream is closed.

    - ``ssl`` makes it a TLS server; each TLS handshake must finish within
      ``handshake_timeout`` seconds (default 10; ``None``: asyncio's 60 s),
      or the connection is dropped and logged. (``ssl_handshake_timeout``
      is its deprecated name.)
    - ``max_connections`` bounds the connections open at once; one more
      is closed as soon as it is accepted, and logged (one line, then a
      count every 10 s while refusals go on). Default: what the process's
      open-file limit allows (see :func:`default_max_connections`).
    - ``close_timeout`` (seconds, default 10; ``None``: no bound) bounds
      closing each connection, TLS's close handshake included: past it
      the connection is aborted. (``ssl_shutdown_timeout`` is its
      deprecated name.)
    - ``grace_period``: seconds running handlers get once the server
      closes, before they are cancelled.
    - ``limit``, ``write_buffer_high`` and ``write_buffer_low`` apply to
      every connection (see :class:`FramedStream`); other keywords go to
      ``asyncio.start_server``.
    """
    return serve_endpoint(
        handler,
        Endpoint.tcp(host, port),
        codec=codec,
        ssl=ssl,
        limit=limit,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
        grace_period=grace_period,
        handshake_timeout=handshake_timeout,
        close_timeout=close_timeout,
        max_connections=max_connections,
        **kwargs,
    )


def _bind_unix(path: str) -> socket.socket:
    """Bind a Unix socket at ``path``, replacing the file only if it is a stale socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if path.startswith("\0"):  # Linux's abstract names have no file
                raise OSError(
                    errno.EADDRINUSE, f"a server is already listening on {path!r}"
                ) from exc
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise FileExistsError(
                    errno.EEXIST, f"{path} exists and is not a socket; not replacing it"
                ) from exc
            live = OSError(errno.EADDRINUSE, f"a server is already listening on {path}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Non-blocking: a connect to a live server with a full backlog
            # would otherwise block the event loop until that server accepts.
            probe.setblocking(False)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale: nothing listens on it
            except BlockingIOError:
                raise live from exc  # live, with its backlog full
            else:
                raise live from exc
            finally:
                probe.close()
            sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_unix(
    handler: Handler[FrameT],
    path: str | os.PathLike[str],
    *,
    codec: Codec[FrameT],
    mode: int | None = None,
    ssl: _ssl.SSLContext | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    max_connections: int | None = None,
    **kwargs: Any,
) -> Connector[Server[FrameT]]:
    """Listen on a Unix socket at ``path``; otherwise as :func:`serve`.

    A stale socket file (nothing listening) is replaced; a live server's
    socket raises ``OSError(EADDRINUSE)`` and any other file
    ``FileExistsError``. ``mode`` (e.g. ``0o660``) is applied to the socket
    file. The file is removed when the server closes, if it is still ours.
    On Linux a ``path`` starting with ``"\\0"`` is an abstract name: no file.
    """
    return serve_endpoint(
        handler,
        Endpoint.unix(path, mode),
        codec=codec,
        ssl=ssl,
        limit=limit,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
        grace_period=grace_period,
        handshake_timeout=handshake_timeout,
        close_timeout=close_timeout,
        max_connections=max_connections,
        **kwargs,
    )
