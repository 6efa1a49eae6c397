"""What every streamkit server shares: ``async with`` and ``serve_forever()`` from close()."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any


class Closable:
    """A base for servers that have ``close()`` and ``await wait_closed()``.

    It gives them ``async with`` (closing gracefully on exit) and
    ``serve_forever()`` (running until cancelled, then closing gracefully).
    """

    def close(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        raise NotImplementedError

    async def serve_forever(self) -> None:
        """Serve until cancelled; then close gracefully."""
        try:
            await asyncio.Future()
        finally:
            self.close()
            await self.wait_closed()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()
