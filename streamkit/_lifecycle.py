"""``async with`` and ``serve_forever()`` for every streamkit object that closes.

Two shapes of closing exist here: streams and servers have ``close()`` plus
``await wait_closed()`` (:class:`Closable`); hub readers, producers and
clients have one ``await close()`` (:class:`AsyncClosable`). Each base gives
``async with`` from those methods, returning the object itself.
:func:`wait_all` waits for a set of tasks an object owns;
:func:`close_listener` stops an asyncio server without leaking a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Set
from types import TracebackType
from typing import Any, Self


async def wait_all(tasks: Set[asyncio.Task[Any]]) -> None:
    """Wait until every task in ``tasks`` is done, tasks added meanwhile included.

    ``tasks`` is a set that tasks add themselves to and leave from a
    done-callback. A task that is done may still be in it (its callback
    is queued), so this never awaits a done task: since Python 3.12,
    ``gather()`` of done futures returns without yielding, and a loop on
    it would spin in one event-loop step, never letting those callbacks
    run. Each turn here waits for at least one unfinished task, so it
    yields. The tasks' results and errors are theirs to report; cancelling
    this wait cancels none of them.
    """
    while pending := [task for task in tasks if not task.done()]:
        await asyncio.wait(pending)


def close_listener(server: asyncio.Server) -> None:
    """Stop ``server`` accepting now, and close it once what it accepted is handed over.

    A selector event loop accepts a connection in one step and makes its
    transport in a later one; a transport made after ``Server.close()``
    fails in ``Server._attach`` and its socket is dropped unclosed
    (CPython gh-109564, 3.11 to 3.13): a ResourceWarning, and a peer left
    waiting on a connection nobody holds. So the listening sockets stop
    being read at once (a readiness already queued is cancelled too) and
    are shut down, which on Linux refuses new connections at once, as a
    close would; ``close()`` runs after the steps already queued, those
    that hand over connections accepted so far, and closes the sockets.
    The server's owner then closes those connections, as it refuses any
    that come while it is closing; ``await server.wait_closed()`` waits
    for all of it.
    """
    loop = server.get_loop()
    if not isinstance(loop, asyncio.SelectorEventLoop):
        server.close()  # other loops (uvloop, proactor) make the transport at once
        return
    for sock in server.sockets:
        loop.remove_reader(sock.fileno())
        with contextlib.suppress(OSError):  # not every system shuts a listener down
            sock.shutdown(socket.SHUT_RDWR)
    loop.call_soon(server.close)


class Closable:
    """A base for objects with ``close()`` and ``await wait_closed()``.

    It gives them ``async with`` (closing gracefully on exit).
    """

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


class ServerBase(Closable):
    """A :class:`Closable` server: ``serve_forever()``, ``port``, ``sockets``, ``connections``.

    A server built on another streamkit server keeps it in ``_server``; its
    ``port``, ``sockets``, ``connections`` and ``max_connections`` are the
    inner server's.
    """

    _server: Any = None

    async def serve_forever(self) -> None:
        """Serve until cancelled; then close gracefully."""
        try:
            await asyncio.Future()
        finally:
            self.close()
            await self.wait_closed()

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.port)

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets."""
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def connections(self) -> int:
        """How many connections are open (handshakes in progress included)."""
        return int(self._server.connections) if self._server is not None else 0

    @property
    def max_connections(self) -> int:
        """The most connections open at once; more are closed as they come."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.max_connections)


class AsyncClosable:
    """A base for objects with one ``await close()``: gives them ``async with``."""

    __slots__ = ()

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
