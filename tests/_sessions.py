"""What the session tests share: quick timers, an echo server, and a raw client.

:func:`raw_client` speaks the session protocol by hand over a real socket,
to play a peer the library would never be (one that forges, replays, sends
past limits or vanishes at the worst moment). Its hello is built from the
server's nonce (:func:`resume_hello` makes a resume's proof for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypedDict, Unpack

import pytest

from streamkit.session import ClientSession, ResumableServer, SessionOptions, serve_resumable
from streamkit.session.protocol import (
    NONCE_SIZE,
    PREFACE_SIZE,
    HelloResume,
    Message,
    decode_message,
    make_preface,
    resume_proof,
)
from tests._handlers import echo_session


class _GracePeriod(TypedDict):
    grace_period: float


class _ServerOptions(SessionOptions, total=False):
    """The keywords of serve_resumable that echo_server takes."""

    grace_period: float
    max_sessions: int


FAST: SessionOptions = {"keepalive_interval": 0.2, "keepalive_timeout": 0.6, "ack_delay": 0.005}
QUICK_SHUTDOWN: _GracePeriod = {"grace_period": 0.1}

#: What a hello is: its bytes, or built from the server's nonce.
Hello = bytes | Callable[[bytes], bytes]


def fast(**options: Unpack[SessionOptions]) -> SessionOptions:
    """FAST with ``options`` added (or in place of its timers)."""
    return {**FAST, **options}


@asynccontextmanager
async def echo_server(**options: Unpack[_ServerOptions]) -> AsyncIterator[ResumableServer]:
    """A session server on loopback that echoes every payload (quick timers)."""
    settings: _ServerOptions = {**FAST, **QUICK_SHUTDOWN, **options}
    async with serve_resumable(echo_session, "127.0.0.1", 0, **settings) as server:
        yield server


def frame(body: bytes) -> bytes:
    """A message body with its u32 length."""
    return struct.pack(">I", len(body)) + body


def data_frame(offset: int, payload: bytes) -> bytes:
    """A framed DATA message."""
    return frame(bytes([0x10]) + struct.pack(">Q", offset) + payload)


def resume_hello(session_id: bytes, token: bytes, received: int = 0) -> Callable[[bytes], bytes]:
    """A HELLO_RESUME of ``session_id``, its proof made for the connection's nonce."""

    def hello(nonce: bytes) -> bytes:
        proof = resume_proof(token, nonce, session_id, received)
        return HelloResume(session_id, proof, received).encode()

    return hello


class RawClient:
    """One raw connection after the prefaces: ``nonce`` is the server's, ``reply`` its
    answer to the hello (None if none was sent)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nonce: bytes
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.nonce = nonce
        self.reply: Message | None = None

    def send(self, *bodies: bytes) -> None:
        """Write message bodies, each framed."""
        self.writer.write(b"".join(map(frame, bodies)))

    async def hello(self, hello: Hello) -> Message:
        """Send ``hello`` (its body, or made from the nonce) and return the server's reply."""
        self.send(hello(self.nonce) if callable(hello) else hello)
        self.reply = await self.receive()
        return self.reply

    def close(self) -> None:
        """Close the connection (without waiting)."""
        self.writer.close()

    async def receive(self) -> Message:
        """The next message (``asyncio.IncompleteReadError`` if the server closed)."""
        size = struct.unpack(">I", await self.reader.readexactly(4))[0]
        return decode_message(await self.reader.readexactly(size))

    async def receive_until(self, kind: type) -> list[Message]:
        """The messages up to the first ``kind`` (within 5 s)."""
        messages: list[Message] = []
        async with asyncio.timeout(5):
            while not messages or not isinstance(messages[-1], kind):
                messages.append(await self.receive())
        return messages

    async def until_closed(self) -> list[Message]:
        """Every message until the server closes the connection (within 5 s)."""
        messages: list[Message] = []
        async with asyncio.timeout(5):
            while header := await self.reader.read(4):
                header += await self.reader.readexactly(4 - len(header))
                size = struct.unpack(">I", header)[0]
                messages.append(decode_message(await self.reader.readexactly(size)))
        return messages


async def open_raw(port: int, *, preface: bytes | None = None) -> RawClient:
    """Open a raw connection and exchange prefaces; the caller closes it.

    ``preface`` replaces the client's (another version, say).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(preface if preface is not None else make_preface())
        server_preface = await reader.readexactly(PREFACE_SIZE)
        assert server_preface == make_preface()
        return RawClient(reader, writer, await reader.readexactly(NONCE_SIZE))
    except BaseException:
        writer.close()
        raise


@asynccontextmanager
async def raw_client(
    port: int, hello: Hello | None = None, *, preface: bytes | None = None
) -> AsyncIterator[RawClient]:
    """Open a raw connection, exchange prefaces, send ``hello`` and read the reply.

    ``hello`` is the hello's body or a function of the server's nonce that
    makes it; ``preface`` replaces the client's (another version, say).
    The connection is closed on exit.
    """
    raw = await open_raw(port, preface=preface)
    try:
        if hello is not None:
            await raw.hello(hello)
        yield raw
    finally:
        raw.close()
        with contextlib.suppress(ConnectionError):  # reset by the server: closed all the same
            await raw.writer.wait_closed()


async def raw_handshake(port: int, hello: Hello) -> tuple[Message | None, bytes]:
    """One raw handshake: the server's reply to ``hello`` and its nonce."""
    async with raw_client(port, hello) as raw:
        return raw.reply, raw.nonce


def cut(session: ClientSession) -> None:
    """Drop the session's current connection as a network failure would."""
    assert session.connected
    session.reconnect()


async def cut_and_resume(session: ClientSession) -> None:
    """Cut the connection and wait until the session is attached to a new one."""
    before = session.stats.connections
    cut(session)
    await session.wait_connected(before)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (for counters with no event to await) for up to 5 s."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


def window_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The receive-window errors logged."""
    return [r.getMessage() for r in caplog.records if "receive window" in r.getMessage()]


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The server's logged refusals of handshakes."""
    return [r for r in caplog.records if "refused" in r.getMessage()]
