"""Server handlers the tests share: echo every frame (or session payload) back."""

from __future__ import annotations

from streamkit import FramedStream
from streamkit.session import ServerSession


async def echo(stream: FramedStream[bytes]) -> None:
    """Send every frame back until the client ends the stream."""
    async for frame in stream:
        await stream.send(frame)


async def echo_session(session: ServerSession) -> None:
    """Send every payload back until the client closes the session."""
    async for payload in session:
        await session.send(payload)
