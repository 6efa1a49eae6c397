"""connect / serve: framed streams over TCP and Unix sockets, with TLS and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl as _ssl
import stat
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

from streamkit._lifecycle import ServerBase
from streamkit.codecs import Codec
from streamkit.stream import FramedStream

__all__ = ["Connector", "Server", "connect", "connect_unix", "serve", "serve_unix"]

logger = logging.getLogger("streamkit")

FrameT = TypeVar("FrameT")
Handler = Callable[[FramedStream[FrameT]], Awaitable[Any]]

#: Default reader ``limit``: what a ``StreamReader`` buffers before it pauses reading.
DEFAULT_LIMIT = 256 * 1024
#: Default seconds that running handlers get to finish once a server closes.
DEFAULT_GRACE_PERIOD = 5.0


ConnT = TypeVar("ConnT")


class Connector(Generic[ConnT]):
    """The pending result of a connect call: ``await`` it or use ``async with``.

    ``conn = await connect(...)`` gives a connection that the caller closes;
    ``async with connect(...) as conn:`` closes it on exit (``release`` is
    called with the connection and the exception that ended the block, if
    any).
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


async def _close_stream(stream: FramedStream[Any], exc: BaseException | None) -> None:
    stream.close()
    await stream.wait_closed()


async def _open(
    open_streams: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    codec: Codec[FrameT],
    timeout: float | None,
    write_buffer_high: int | None,
    write_buffer_low: int | None,
) -> FramedStream[FrameT]:
    async with asyncio.timeout(timeout):
        reader, writer = await open_streams
    return FramedStream(
        reader,
        writer,
        codec,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
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
    **kwargs: Any,
) -> Connector[FramedStream[FrameT]]:
    """Open a TCP connection (TLS with ``ssl``) and frame it with ``codec``.

    Use ``stream = await connect(...)`` or ``async with connect(...) as
    stream:``. ``timeout`` bounds the connection and TLS handshake (raising
    ``TimeoutError``); connection failures raise the ``OSError`` the OS
    gave. ``limit`` is the reader's buffer limit and ``write_buffer_high`` /
    ``write_buffer_low`` the transport's write-buffer water marks (see
    :class:`FramedStream`). Other keywords go to ``asyncio.open_connection``.
    """
    return Connector(
        lambda: _open(
            asyncio.open_connection(
                host,
                port,
                ssl=ssl,
                server_hostname=server_hostname,
                limit=limit,
                **kwargs,
            ),
            codec,
            timeout,
            write_buffer_high,
            write_buffer_low,
        ),
        _close_stream,
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
    **kwargs: Any,
) -> Connector[FramedStream[FrameT]]:
    """Open a Unix-socket connection at ``path``; otherwise as :func:`connect`."""
    return Connector(
        lambda: _open(
            asyncio.open_unix_connection(
                os.fspath(path),
                ssl=ssl,
                server_hostname=server_hostname,
                limit=limit,
                **kwargs,
            ),
            codec,
            timeout,
            write_buffer_high,
            write_buffer_low,
        ),
        _close_stream,
    )


class Server(ServerBase, Generic[FrameT]):
    """A listening server that calls a handler with a framed stream per connection.

    ``async with`` closes it on exit; ``serve_forever()`` runs until
    cancelled. ``close()`` stops accepting at once; ``await wait_closed()``
    then gives running handlers ``grace_period`` seconds to finish before
    cancelling them, and returns when every handler and connection is done.
    """

    def __init__(
        self,
        handler: Handler[FrameT],
        codec: Codec[FrameT],
        *,
        grace_period: float,
        write_buffer_high: int | None,
        write_buffer_low: int | None,
    ) -> None:
        self._handler = handler
        self._codec = codec
        self._grace_period = grace_period
        self._write_buffer_high = write_buffer_high
        self._write_buffer_low = write_buffer_low
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing_since: float | None = None
        self._unix_path: str | None = None
        self._unix_inode: tuple[int, int] | None = None

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing_since is not None:
            # Accepted by the event loop just before close(): refuse it.
            writer.close()
            return
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

    async def _run_handler(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            stream = FramedStream(
                reader,
                writer,
                self._codec,
                write_buffer_high=self._write_buffer_high,
                write_buffer_low=self._write_buffer_low,
            )
            try:
                await self._handler(stream)
            except asyncio.CancelledError:
                stream.abort()
                raise
            except Exception:
                logger.exception("handler for %s failed; closing its connection", stream.peername)
                stream.abort()
            else:
                stream.close()
            await stream.wait_closed()
        except asyncio.CancelledError:
            # Cancelled after the grace period or at loop shutdown: end
            # normally, so that nothing logs the cancelled task as an error.
            pass

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
    def handlers(self) -> int:
        """How many connection handlers are running."""
        return len(self._tasks)

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return self._server is not None and self._server.is_serving()

    def close(self) -> None:
        """Stop accepting connections; running handlers keep going for now."""
        if self._closing_since is None:
            self._closing_since = asyncio.get_running_loop().time()
        if self._server is not None:
            self._server.close()
        self._remove_unix_socket()

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


async def serve(
    handler: Handler[FrameT],
    host: str | None,
    port: int,
    *,
    codec: Codec[FrameT],
    ssl: _ssl.SSLContext | None = None,
    limit: int = DEFAULT_LIMIT,
    write_buffer_high: int | None = None,
    write_buffer_low: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    **kwargs: Any,
) -> Server[FrameT]:
    """Listen on TCP ``host``:``port`` and call ``await handler(stream)`` per connection.

    ``port=0`` picks a free port (see :attr:`Server.port`). A handler that
    raises is logged on the ``streamkit`` logger and closes only its own
    connection; when it returns, its stream is closed. ``ssl`` makes it a TLS
    server. ``limit``, ``write_buffer_high`` and ``write_buffer_low`` apply
    to every connection; other keywords go to ``asyncio.start_server``.
    """
    server: Server[FrameT] = Server(
        handler,
        codec,
        grace_period=grace_period,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
    )
    server._server = await asyncio.start_server(
        server._on_connection, host, port, ssl=ssl, limit=limit, **kwargs
    )
    return server


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


async def serve_unix(
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
    **kwargs: Any,
) -> Server[FrameT]:
    """Listen on a Unix socket at ``path``; otherwise as :func:`serve`.

    A stale socket file (nothing listening) is replaced; a live server's
    socket raises ``OSError(EADDRINUSE)`` and any other file
    ``FileExistsError``. ``mode`` (e.g. ``0o660``) is applied to the socket
    file. The file is removed when the server closes, if it is still ours.
    On Linux a ``path`` starting with ``"\\0"`` is an abstract name: no file.
    """
    path_str = os.fspath(path)
    abstract = path_str.startswith("\0")
    if abstract and mode is not None:
        raise ValueError("mode does not apply to an abstract socket name (no file)")
    sock = _bind_unix(path_str)
    server: Server[FrameT] = Server(
        handler,
        codec,
        grace_period=grace_period,
        write_buffer_high=write_buffer_high,
        write_buffer_low=write_buffer_low,
    )
    try:
        if mode is not None:
            os.chmod(path_str, mode)
        if not abstract:
            info = os.stat(path_str)
            server._unix_path = path_str
            server._unix_inode = (info.st_dev, info.st_ino)
        server._server = await asyncio.start_unix_server(
            server._on_connection, sock=sock, ssl=ssl, limit=limit, **kwargs
        )
    except BaseException:
        sock.close()
        server._remove_unix_socket()
        raise
    return server
