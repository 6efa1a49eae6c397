"""Resumable sessions across lost connections: resume, replay, expiry, reconnect policy."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest

from streamkit import ResumeRejected, SessionExpired
from streamkit.errors import ConnectionLost, ProtocolError
from streamkit.session import (
    Backoff,
    ServerSession,
    connect_resumable,
    serve_resumable,
)
from streamkit.session.protocol import (
    NONCE_SIZE,
    PREFACE_SIZE,
    Data,
    HelloNew,
    HelloResume,
    Welcome,
    decode_message,
    make_preface,
)
from streamkit.testing import FaultProxy
from tests._pairs import on_uvloop
from tests._sessions import (
    FAST,
    QUICK_SHUTDOWN,
    cut,
    cut_and_resume,
    data_frame,
    echo_server,
    fast,
    frame,
    raw_client,
    resume_hello,
    wait_until,
)


async def test_survives_repeated_cuts_exactly_once_in_order() -> None:
    """Each cut loses what is in flight to the server; it is replayed once, in order."""
    total = 5000
    async with (
        echo_server() as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        received: list[bytes] = []

        async def reader() -> None:
            while len(received) < total:
                received.append(await session.recv())

        task = asyncio.create_task(reader())
        for n in range(total):
            await session.send(struct.pack(">I", n))
            if n % 500 == 250:
                before = session.stats.connections
                proxy.blackhole("up")  # the frames written now never reach the server...
                await asyncio.sleep(0.01)  # (the turn ends: they are written)
                proxy.cut()  # ...and die with the connection
                proxy.restore()
                await session.wait_connected(before)
                await session.flush()  # the replay arrived: the next cut loses new frames
        await task
        assert [struct.unpack(">I", p)[0] for p in received] == list(range(total))
        assert session.stats.reconnects == 10
        assert session.stats.frames_replayed >= 10  # at least the frame before each cut


async def test_handler_runs_once_per_session_across_reconnects() -> None:
    calls = 0
    seen: list[bytes] = []

    async def handler(session: ServerSession) -> None:
        nonlocal calls
        calls += 1
        async for payload in session:
            seen.append(payload)

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        for n in range(10):
            await session.send(b"%d" % n)
            await session.flush()
            await cut_and_resume(session)
        await session.flush()
    assert calls == 1
    assert seen == [b"%d" % n for n in range(10)]


async def test_resume_after_expiry_raises_session_expired() -> None:
    async with (
        echo_server(resume_timeout=0.2) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable(
            "127.0.0.1", proxy.port, **fast(max_reconnect_time=5, handshake_timeout=0.1)
        )
        await session.send(b"x")
        assert await session.recv() == b"x"
        # Keep the client away past the server's resume_timeout: its resumes
        # get no answer through the black hole.
        proxy.blackhole()
        cut(session)
        await wait_until(lambda: server.sessions == 0)
        proxy.restore()
        with pytest.raises(SessionExpired, match="resume_timeout"):
            await session.recv(timeout=5)
        with pytest.raises(SessionExpired):
            await session.send(b"y")


async def test_client_that_cannot_reconnect_fails_with_connection_lost() -> None:
    async with echo_server() as server:
        proxy = await FaultProxy("127.0.0.1", server.port).start()
        session = await connect_resumable("127.0.0.1", proxy.port, **fast(max_reconnect_time=0.3))
        proxy.close()  # stops listening and cuts: every reconnect is refused
        await proxy.wait_closed()
        with pytest.raises(ConnectionLost, match="max_reconnect_time") as failure:
            await session.recv(timeout=5)
        assert "ConnectionRefusedError" in str(failure.value)
        with pytest.raises(ConnectionLost):
            await session.send(b"x")


async def test_a_second_connection_resuming_the_session_replaces_the_first() -> None:
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        await session.send(b"one")
        assert await session.recv() == b"one"
        # Another connection resumes the session while the client's is up (as
        # a client's new connection may arrive before its old one is gone):
        # the server takes it and drops the old one...
        hello = resume_hello(bytes.fromhex(session.id), session.core.token, received=1)
        async with raw_client(server.port, hello) as raw:
            assert isinstance(raw.reply, Welcome) and raw.reply.present
            # ...and the client, its connection lost, resumes and takes it back.
            await session.wait_connected(1)
            assert not any(isinstance(m, Data) for m in await raw.until_closed())
        await session.send(b"two")
        assert await session.recv() == b"two"
        assert session.stats.connections == 2


async def test_a_resume_on_a_second_socket_closes_the_first() -> None:
    async with echo_server() as server, raw_client(server.port, HelloNew().encode()) as old:
        welcome = old.reply
        assert isinstance(welcome, Welcome)
        # A second, independent socket resumes while the first is still up.
        hello = resume_hello(welcome.session_id, welcome.token)
        async with raw_client(server.port, hello) as new:
            assert isinstance(new.reply, Welcome) and new.reply.present
            # The server closed the first connection; nothing of the session goes there.
            assert not any(isinstance(m, Data) for m in await old.until_closed())
            new.writer.write(data_frame(0, b"on the second"))
            echoed = await new.receive_until(Data)
            assert echoed[-1] == Data(0, b"on the second")


async def fake_server(
    on_resume: Callable[[HelloResume], bytes],
) -> tuple[asyncio.Server, int]:
    """A session server of one new session that drops every connection after its welcome.

    The welcome to a resume is ``on_resume(hello)``.
    """
    session_id, token = b"\x05" * 16, b"\x06" * 32

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(PREFACE_SIZE)
        writer.write(make_preface(b"\0" * NONCE_SIZE))
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        hello = decode_message(await reader.readexactly(size))
        if isinstance(hello, HelloResume):
            writer.write(frame(on_resume(hello)))
        else:
            writer.write(frame(Welcome(False, session_id, 0, token).encode()))
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_server_that_claims_frames_never_sent_fails_the_client() -> None:
    server, port = await fake_server(lambda hello: Welcome(True, hello.session_id, 99).encode())
    async with server:
        session = await connect_resumable("127.0.0.1", port, **FAST)
        with pytest.raises(ResumeRejected, match="expects offset 99 but only 0 frames were sent"):
            await session.recv(timeout=5)


async def test_a_server_that_resumes_another_session_delivers_nothing_of_it() -> None:
    server, port = await fake_server(lambda hello: Welcome(True, b"\x07" * 16, 0).encode())
    async with server:
        session = await connect_resumable(
            "127.0.0.1", port, max_reconnect_time=0.3, reconnect_backoff=Backoff(0.01, 0.05)
        )
        with pytest.raises(ConnectionLost, match="answered a resume with another session"):
            await session.recv(timeout=5)
        assert session.stats.connections == 1  # never attached to the other session


async def test_session_expiring_while_its_handler_runs_is_unregistered_at_once() -> None:
    got = asyncio.get_running_loop().create_future()
    pending_failed = asyncio.get_running_loop().create_future()
    release = asyncio.Event()
    later = asyncio.get_running_loop().create_future()

    async def pending_recv(session: ServerSession) -> None:
        try:
            await session.recv()
        except BaseException as exc:
            pending_failed.set_result(exc)

    async def handler(session: ServerSession) -> None:
        got.set_result(await session.recv())
        waiter = asyncio.create_task(pending_recv(session))
        await release.wait()  # busy elsewhere, not awaiting the session, when it expires
        try:
            await session.send(b"late")
        except BaseException as exc:
            later.set_result(exc)
        await waiter

    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, **fast(resume_timeout=0.2), **QUICK_SHUTDOWN
        ) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        session = await connect_resumable(
            "127.0.0.1",
            proxy.port,
            **fast(
                max_reconnect_time=5,
                handshake_timeout=0.1,
                reconnect_backoff=Backoff(0.01, 0.05),
            ),
        )
        await session.send(b"x")
        assert await got == b"x"
        proxy.blackhole()  # the client's resumes get no answer...
        proxy.cut()
        failure = await asyncio.wait_for(pending_failed, 5)
        assert isinstance(failure, SessionExpired)
        assert "resume_timeout" in str(failure)
        assert server.sessions == 0
        proxy.restore()  # ...until it is too late
        with pytest.raises(SessionExpired, match="resume_timeout"):
            await session.recv(timeout=5)
        release.set()
        assert isinstance(await asyncio.wait_for(later, 5), SessionExpired)


async def test_resumes_that_never_make_progress_end_the_session() -> None:
    """A server that accepts every resume, then drops the connection at once."""
    resumes: list[HelloResume] = []

    def welcome(hello: HelloResume) -> bytes:
        resumes.append(hello)
        return Welcome(True, hello.session_id, 0).encode()

    server, port = await fake_server(welcome)
    async with server:
        session = await connect_resumable(
            "127.0.0.1",
            port,
            **fast(max_reconnect_time=0.5, reconnect_backoff=Backoff(0.01, 0.05)),
        )
        await session.send(b"never acknowledged")
        with pytest.raises(ProtocolError, match="no progress") as failure:
            await session.recv(timeout=10)
        assert "max_reconnect_time=0.5" in str(failure.value)
        assert 1 <= len(resumes) < 200  # backed off, not thousands
        with pytest.raises(ProtocolError):
            await session.send(b"x")


async def test_stats_count_bytes_and_replays_exactly_across_a_cut() -> None:
    server_session = asyncio.get_running_loop().create_future()
    first = [b"a" * n for n in range(1, 11)]  # 55 bytes, acknowledged before the cut
    lost = [b"b" * n for n in range(100, 105)]  # 510 bytes, lost in the cut
    got: list[bytes] = []

    async def handler(session: ServerSession) -> None:
        server_session.set_result(session)
        async for payload in session:
            got.append(payload)

    async with (
        await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        for payload in first:
            await session.send(payload)
        await session.flush()
        proxy.blackhole()  # what is sent now never reaches the server...
        for payload in lost:
            await session.send(payload)
        proxy.cut()  # ...and dies with the connection
        proxy.restore()
        await session.flush()  # after the resume and the replay
        served = await asyncio.wait_for(server_session, 5)
        assert got == first + lost
        stats = session.stats
        assert stats.reconnects == 1
        assert stats.frames_sent == 15
        assert stats.bytes_sent == 565
        assert stats.frames_replayed == 5  # exactly the lost frames, no more
        assert stats.duplicates_dropped == 0
        assert (stats.frames_received, stats.bytes_received) == (0, 0)
        peer = served.stats
        assert (peer.frames_received, peer.bytes_received) == (15, 565)
        assert peer.duplicates_dropped == 0
        assert (peer.frames_sent, peer.bytes_sent, peer.frames_replayed) == (0, 0, 0)


async def test_frames_sent_during_an_outage_are_not_counted_as_replayed() -> None:
    """Only frames written to the lost connection are replayed; the rest go out once."""
    got: list[bytes] = []
    done = asyncio.Event()

    async def handler(session: ServerSession) -> None:
        async for payload in session:
            got.append(payload)
            if len(got) == 22:
                done.set()

    async with (
        serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
    ):
        acknowledged = [b"a%d" % n for n in range(10)]
        lost = [b"b%d" % n for n in range(5)]
        during_outage = [b"c%d" % n for n in range(7)]
        for payload in acknowledged:
            await session.send(payload)
        await session.flush()
        proxy.blackhole()  # written to the connection, never delivered...
        for payload in lost:
            await session.send(payload)
        proxy.cut()  # ...and lost with it; the black hole holds the reconnects too
        async with asyncio.timeout(5):
            # No event tells a detach: poll the public property, bounded.
            while session.connected:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        for payload in during_outage:  # queued: no connection is attached
            await session.send(payload)
        assert not session.connected
        proxy.restore()
        await asyncio.wait_for(done.wait(), 10)
        assert got == acknowledged + lost + during_outage
        stats = session.stats
        assert stats.frames_sent == 22
        assert stats.frames_replayed == 5  # the lost frames; not the 7 sent while away


async def test_on_uvloop_every_frame_once_in_order_across_cuts() -> None:
    """uvloop's transports read into memory of their own (data_received): the same guarantees."""

    async def run() -> None:
        sizes = [10, 5000, 300_000, 1024 * 1024, 3, 70_000] * 5
        payloads = [bytes([n]) * size for n, size in enumerate(sizes)]
        async with (
            echo_server() as server,
            FaultProxy("127.0.0.1", server.port) as proxy,
            connect_resumable("127.0.0.1", proxy.port, **FAST) as session,
        ):

            async def send_all() -> None:
                for n, payload in enumerate(payloads):
                    await session.send(payload)
                    if n % 7 == 3:
                        before = session.stats.connections
                        proxy.cut()
                        await session.wait_connected(before)

            sending = asyncio.create_task(send_all())
            got = [await session.recv() for _ in payloads]
            await sending
            assert [len(payload) for payload in got] == sizes
            assert got == payloads
            assert session.stats.reconnects == 4  # a cut after frames 3, 10, 17 and 24

    await on_uvloop(run)
