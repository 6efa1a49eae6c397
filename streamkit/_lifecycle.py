"""``async with`` and ``serve_forever()`` for every streamkit object that closes.

Two shapes of closing exist here: streams and servers have ``close()`` plus
``await wait_closed()`` (:class:`Closable`); hub readers, producers and
clients have one ``await close()`` (:class:`AsyncClosable`). Each base gives
``async with`` from those methods, returning the object itself.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self


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
    """A :class:`Closable` server: ``serve_forever()``, and ``port`` / ``sockets``.

    A server built on another streamkit server keeps it in ``_server``; its
    ``port`` and ``sockets`` are the inner server's.
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
