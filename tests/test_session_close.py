"""Ending a session: graceful close from either side, lost close messages, abort."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from streamkit import EndOfStream, ResumeRejected, SessionError, SessionExpired
from streamkit.session import ServerSession, connect_resumable, serve_resumable
from streamkit.session.protocol import Ack, Close, Data, HelloNew, Welcome
from streamkit.testing import FaultProxy
from tests._sessions import FAST, QUICK_SHUTDOWN, fast, raw_client, wait_until


async def test_close_is_graceful_and_peer_sees_end_of_stream() -> None:
    done = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        frames = [payload async for payload in session]
        done.set_result(frames)

    async with await serve_resumable(handler, "127.0.0.1", 0, **FAST) as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        for n in range(50):
            await session.send(b"%d" % n)
        await session.close()
        assert session.closed
        assert await done == [b"%d" % n for n in range(50)]
        with pytest.raises(SessionError, match=r"closing|closed"):
            await session.send(b"late")


async def test_server_close_gives_client_end_of_stream() -> None:
    async def handler(session: ServerSession) -> None:
        for n in range(20):
            await session.send(b"%d" % n)
        # returning closes the session gracefully

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        got = [payload async for payload in session]
        assert got == [b"%d" % n for n in range(20)]
        with pytest.raises(EndOfStream):
            await session.recv()
        with pytest.raises(SessionError, match="peer closed"):
            await session.send(b"x")


async def test_client_close_completes_when_close_ack_is_lost_and_handler_still_runs() -> None:
    received = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def handler(session: ServerSession) -> None:
        received.set_result([payload async for payload in session])
        await release.wait()  # still running when the client comes back

    async with (
        serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable("127.0.0.1", proxy.port, **FAST)
        for n in range(5):
            await session.send(b"%d" % n)
        await session.flush()
        proxy.blackhole("down")  # what the server sends now, its CLOSE_ACK included, is held...
        closing = asyncio.create_task(session.close())
        # The server had the CLOSE: its handler saw the end of the session.
        assert await asyncio.wait_for(received, 5) == [b"%d" % n for n in range(5)]
        assert server.sessions == 0  # a finished session is unregistered at once
        proxy.cut()  # ...and lost with the connection
        proxy.restore()
        await asyncio.wait_for(closing, 10)
        assert session.closed
        assert proxy.stats.cuts == 1
        assert session.stats.connections == 1  # the resume was answered FINISHED
        assert not release.is_set()
        release.set()


async def test_server_close_completes_when_the_clients_close_ack_is_lost() -> None:
    closed = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        await session.send(b"bye")
        try:
            await session.close()
        except BaseException as exc:
            closed.set_result(exc)
        else:
            closed.set_result(None)

    async with serve_resumable(
        handler, "127.0.0.1", 0, **fast(close_timeout=3, resume_timeout=30), **QUICK_SHUTDOWN
    ) as server:
        async with raw_client(server.port, HelloNew().encode()) as client:
            assert isinstance(client.reply, Welcome)
            assert (await client.receive_until(Data))[-1] == Data(0, b"bye")
            client.send(Ack(1, 1).encode())
            assert (await client.receive_until(Close))[-1] == Close(1)
            # The client has everything, and vanishes without its CLOSE_ACK.
        assert await asyncio.wait_for(closed, 10) is None
        assert server.sessions == 0


async def test_client_that_missed_the_servers_close_resumes_into_end_of_stream() -> None:
    closed = asyncio.get_running_loop().create_future()
    served: list[ServerSession] = []

    async def handler(session: ServerSession) -> None:
        served.append(session)
        for n in range(3):
            await session.send(b"%d" % n)
        await session.close()
        closed.set_result(None)

    async with (
        serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable("127.0.0.1", proxy.port, **FAST)
        got = [await session.recv(timeout=5) for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        # The ack of the last frame goes out ack_delay later: the CLOSE that
        # answers it is held, and lost with the connection.
        proxy.blackhole("down")
        await wait_until(lambda: served[0].core.close_sent)
        proxy.cut()
        proxy.restore()
        with pytest.raises(EndOfStream):  # the resume was answered FINISHED
            await session.recv(timeout=5)
        await asyncio.wait_for(closed, 10)
        assert session.closed and server.sessions == 0
        assert session.stats.connections == 1
        with pytest.raises(SessionError, match="peer closed"):
            await session.send(b"x")


async def test_client_abort_fails_pending_calls_and_the_server_session_expires() -> None:
    handler_saw = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        try:
            await session.recv()
        except BaseException as exc:
            handler_saw.set_result(exc)
            raise

    async with await serve_resumable(
        handler, "127.0.0.1", 0, **fast(resume_timeout=0.2), **QUICK_SHUTDOWN
    ) as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        pending = asyncio.create_task(session.recv())
        await asyncio.sleep(0)  # the recv is waiting
        session.abort()
        with pytest.raises(SessionError, match="aborted"):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(SessionError, match="aborted"):
            await session.send(b"late")
        with pytest.raises(SessionError, match="aborted"):
            await session.recv()
        assert session.closed and not session.connected
        # abort tells the server nothing: its session ends after resume_timeout.
        failure = await asyncio.wait_for(handler_saw, 5)
        assert isinstance(failure, SessionExpired)
        assert server.sessions == 0


async def test_server_abort_fails_its_calls_and_the_client_is_told_on_resume() -> None:
    aborted = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        assert await session.recv() == b"abort, please"
        session.abort()
        try:
            await session.send(b"late")
        except SessionError as exc:
            aborted.set_result(exc)

    async with await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server:
        session = await connect_resumable("127.0.0.1", server.port, **FAST)
        await session.send(b"abort, please")
        with pytest.raises(ResumeRejected, match="was aborted"):
            await session.recv(timeout=5)
        assert "aborted" in str(await asyncio.wait_for(aborted, 5))
        assert server.sessions == 0
        with pytest.raises(ResumeRejected):
            await session.send(b"x")


LEFT_OPEN = """
import asyncio
from streamkit import connect_resumable, serve_resumable

async def handler(session):
    async for message in session:
        await session.send(message)

async def main():
    server = await serve_resumable(handler, "127.0.0.1", 0)
    session = await connect_resumable("127.0.0.1", server.port)
    await session.send(b"x")
    assert await session.recv() == b"x"
    print("returning with the session and its server open", flush=True)

asyncio.run(main())
"""


def test_a_session_left_open_when_asyncio_run_returns_ends_quietly() -> None:
    """The loop's shutdown cancels the session's tasks: it ends, with no reconnect
    started on a closing loop (no 'Task was destroyed', no 'Event loop is closed')."""
    result = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "returning with the session and its server open\n"
    assert result.stderr == ""
