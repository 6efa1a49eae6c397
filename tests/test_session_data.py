"""Frames both ways: delivery, limits, flow control, the receive window, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from pathlib import Path

import pytest

from streamkit import FrameTooLarge
from streamkit.session import (
    ServerSession,
    Session,
    SessionOptions,
    connect_resumable,
    connect_resumable_unix,
    serve_resumable,
    serve_resumable_unix,
)
from streamkit.session.protocol import (
    Ack,
    Data,
    HelloNew,
    Ping,
    Pong,
    Welcome,
    decode_message,
    make_preface,
)
from tests._handlers import echo_session as echo
from tests._sessions import (
    FAST,
    QUICK_SHUTDOWN,
    RawClient,
    data_frame,
    echo_server,
    fast,
    frame,
    raw_client,
    resume_hello,
    wait_until,
    window_errors,
)

#: A raw client's hello for a new session.
NEW = HelloNew().encode()


async def test_echo_round_trip_and_stats() -> None:
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        for n in range(100):
            await session.send(b"frame %d" % n)
        got = [await session.recv() for _ in range(100)]
        assert got == [b"frame %d" % n for n in range(100)]
        assert len(session.id) == 32
        assert session.stats.frames_sent == 100
        assert session.stats.frames_received == 100
        assert session.stats.connections == 1
        assert session.stats.reconnects == 0


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with (
        await serve_resumable_unix(echo, path, **FAST) as server,
        connect_resumable_unix(path, **FAST) as session,
    ):
        await session.send(b"over unix")
        assert await session.recv() == b"over unix"
        assert server.sessions == 1


async def test_recv_timeout_leaves_session_usable() -> None:
    async with (
        echo_server() as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        with pytest.raises(TimeoutError):
            await session.recv(timeout=0.05)
        await session.send(b"after timeout")
        assert await session.recv(timeout=5) == b"after timeout"


async def test_send_over_max_frame_is_refused() -> None:
    async with (
        echo_server(max_frame=1024) as server,
        connect_resumable("127.0.0.1", server.port, **fast(max_frame=1024)) as session,
    ):
        await session.send(b"x" * 1024)
        assert await session.recv() == b"x" * 1024
        with pytest.raises(FrameTooLarge, match="1025 bytes exceeds max_frame=1024"):
            await session.send(b"x" * 1025)


@pytest.mark.parametrize(
    ("server_max", "client_max", "server_error"),
    [
        (1000, 2000, "1001 bytes exceeds max_frame=1000"),
        (2000, 1000, "1001 bytes exceeds the peer's max_frame=1000"),
    ],
)
async def test_send_over_the_peers_max_frame_is_refused_locally(
    server_max: int, client_max: int, server_error: str
) -> None:
    refused = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        try:
            await session.send(b"y" * 1001)
        except FrameTooLarge as exc:
            refused.set_result(str(exc))
        async for payload in session:
            await session.send(payload)

    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, **fast(max_frame=server_max), **QUICK_SHUTDOWN
        ) as server,
        connect_resumable("127.0.0.1", server.port, **fast(max_frame=client_max)) as session,
    ):
        assert server_error in await asyncio.wait_for(refused, 5)
        assert session.max_frame == 1000
        whose = "the peer's " if server_max < client_max else ""
        for size in (1001, 2001):  # over one limit, over both: the smaller is named
            with pytest.raises(FrameTooLarge, match=f"{size} bytes exceeds {whose}max_frame=1000"):
                await session.send(b"x" * size)
        await session.send(b"x" * 1000)  # the session goes on
        assert await session.recv(timeout=5) == b"x" * 1000
        assert session.stats.reconnects == 0


async def test_stalled_receiver_bounds_sender_and_blocks_send() -> None:
    limit = 64 * 1024
    started = asyncio.Event()
    release = asyncio.Event()

    async def stalled(session: ServerSession) -> None:
        started.set()
        await release.wait()
        async for _ in session:
            pass

    async with (
        await serve_resumable(stalled, "127.0.0.1", 0, **FAST) as server,
        connect_resumable(
            "127.0.0.1", server.port, **fast(max_unacked_bytes=limit, max_unacked_frames=10_000)
        ) as session,
    ):
        await started.wait()
        payload = b"x" * 1024
        sent = 0

        async def producer() -> None:
            nonlocal sent
            for _ in range(1000):
                await session.send(payload)
                sent += 1

        task = asyncio.create_task(producer())
        await asyncio.sleep(0.3)
        assert not task.done()
        assert sent <= limit // len(payload)
        assert session.core.held_bytes <= limit
        release.set()
        await asyncio.wait_for(task, 10)
        await session.flush()


# -- bad input after the handshake ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (bytes([0x7E]), "unknown session message type 0x7e"),
        (bytes([0x10]) + struct.pack(">Q", 5) + b"x", "offset 5 but offset 0 was expected"),
        (bytes([0x11]) + struct.pack(">QQ", 3, 0), "ack for offset 3 but only 0 frames"),
        (bytes([0x11]) + struct.pack(">QQ", 0, 1), "consumed 1 > received 0"),
        (bytes([0x11, 0]), "malformed ACK"),
        (bytes([0x15]), "CLOSE_ACK for a close that was never sent"),
        (HelloNew().encode(), "unexpected HelloNew"),
    ],
)
async def test_bad_message_closes_the_connection_and_is_logged(
    body: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server, connect_resumable("127.0.0.1", server.port, **FAST) as good:
        async with raw_client(server.port, NEW) as raw:
            raw.send(body)
            await raw.until_closed()  # the server closes this connection
        assert message in caplog.text
        await good.send(b"others are unaffected")
        assert await good.recv() == b"others are unaffected"


async def test_acks_going_backwards_close_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with echo_server() as server, connect_resumable("127.0.0.1", server.port, **FAST) as good:
        async with raw_client(server.port, NEW) as raw:
            raw.writer.write(data_frame(0, b"echo me"))
            await raw.receive_until(Data)  # the echo arrives; ack it, then go backwards
            raw.send(Ack(1, 1).encode(), Ack(0, 0).encode())
            await raw.until_closed()
        assert "ack went backwards" in caplog.text
        await good.send(b"unaffected")
        assert await good.recv() == b"unaffected"


async def test_oversized_frame_from_peer_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with (
        echo_server(max_frame=1000) as server,
        connect_resumable("127.0.0.1", server.port, **fast(max_frame=1000)) as good,
    ):
        async with raw_client(server.port, NEW) as raw:
            raw.writer.write(struct.pack(">I", 5000) + bytes([0x10]))
            await raw.until_closed()
        assert "exceeds max_frame=1009" in caplog.text
        await good.send(b"unaffected")
        assert await good.recv() == b"unaffected"


async def test_duplicate_frames_from_a_peer_are_dropped_and_counted() -> None:
    received = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        got = [await session.recv(), await session.recv()]
        received.set_result((got, session.stats))

    async with await serve_resumable(handler, "127.0.0.1", 0, **FAST, **QUICK_SHUTDOWN) as server:
        async with raw_client(server.port, NEW) as raw:
            # Offset 0 twice, as a peer replaying what it need not would send it.
            raw.writer.write(data_frame(0, b"one") + data_frame(0, b"one") + data_frame(1, b"two!"))
            got, stats = await asyncio.wait_for(received, 5)
        assert got == [b"one", b"two!"]
        assert (stats.frames_received, stats.bytes_received, stats.duplicates_dropped) == (2, 7, 1)


# -- the receive window ----------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "payload", "over"),
    [
        ({"max_unacked_frames": 16}, b"f" * 10, "over max_unacked_frames=16 announced"),
        ({"max_unacked_bytes": 4000}, b"b" * 1000, "over max_unacked_bytes=4000 announced"),
    ],
    ids=["frames", "bytes"],
)
async def test_a_peer_sending_past_the_receive_window_is_cut_off(
    window: SessionOptions, payload: bytes, over: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    stalled: list[ServerSession] = []

    async def handler(session: ServerSession) -> None:
        if not stalled:  # the hostile peer's session: never read
            stalled.append(session)
            await asyncio.Event().wait()
        await echo(session)

    total = 2_000_000 // len(payload)  # 2 MB and more on the wire, far past the window
    async with await serve_resumable(
        handler, "127.0.0.1", 0, **fast(**window), **QUICK_SHUTDOWN
    ) as server:
        async with raw_client(server.port, NEW) as raw:
            with contextlib.suppress(ConnectionError):
                for start in range(0, total, 64):
                    burst = (data_frame(n, payload) for n in range(start, start + 64))
                    raw.writer.write(b"".join(burst))
                    await raw.writer.drain()
            await wait_until(lambda: bool(stalled) and not stalled[0].connected)
        [error] = window_errors(caplog)
        assert "the peer sent past the receive window: " in error
        assert over in error
        # What the session holds: the window and at most one batch (one read) more.
        session = stalled[0]
        frames, held = len(session.core.queue), sum(map(len, session.core.queue))
        assert f"{frames} frames ({held} bytes) received and not yet consumed" in error
        one_read = 256 * 1024
        assert held <= window.get("max_unacked_bytes", 16 * len(payload)) + one_read
        assert session.stats.frames_received == frames < total // 4
        # The server goes on serving others.
        async with connect_resumable("127.0.0.1", server.port, **FAST) as good:
            await good.send(b"unaffected")
            assert await good.recv(timeout=5) == b"unaffected"


async def test_duplicates_and_replays_do_not_count_against_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    stalled: list[ServerSession] = []

    async def handler(session: ServerSession) -> None:
        stalled.append(session)
        await asyncio.Event().wait()

    async with serve_resumable(
        handler, "127.0.0.1", 0, **fast(max_unacked_frames=4), **QUICK_SHUTDOWN
    ) as server:
        fill = b"".join(data_frame(n, b"%d" % n) for n in range(4))
        async with raw_client(server.port, NEW) as first:
            welcome = first.reply
            assert isinstance(welcome, Welcome)
            # The window is full; the same frames again are duplicates, not more.
            first.writer.write(fill + fill + frame(Ping().encode()))
            await first.receive_until(Pong)
            # A resume that replays them once more (they were received) is fine too.
            hello = resume_hello(welcome.session_id, welcome.token)
            async with raw_client(server.port, hello) as second:
                resumed = second.reply
                assert isinstance(resumed, Welcome) and resumed.received == 4
                assert resumed.limits.max_unacked_frames == 4
                second.writer.write(fill + frame(Ping().encode()))
                await second.receive_until(Pong)
                assert stalled[0].stats.duplicates_dropped == 8
                assert window_errors(caplog) == []
                # One frame more than the window closes the connection.
                second.writer.write(data_frame(4, b"4"))
                await second.until_closed()
        [error] = window_errors(caplog)
        assert "5 frames (5 bytes) received and not yet consumed" in error


async def test_one_frame_over_the_byte_window_passes_only_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    consume = asyncio.Event()

    async def handler(session: ServerSession) -> None:
        await consume.wait()
        await session.recv()  # frame 0, and nothing more

    async with (
        serve_resumable(
            handler, "127.0.0.1", 0, **fast(max_unacked_bytes=1000), **QUICK_SHUTDOWN
        ) as server,
        raw_client(server.port, NEW) as raw,
    ):
        # Alone in the queue, a frame over the window is what a sender may send.
        raw.writer.write(data_frame(0, bytes(5000)) + frame(Ping().encode()))
        await raw.receive_until(Pong)
        consume.set()
        # Consumed: the queue is empty, so another one may come; behind it, nothing.
        async with asyncio.timeout(5):
            while not any(
                isinstance(m, Ack) and m.consumed == 1 for m in await raw.receive_until(Ack)
            ):
                pass
        raw.writer.write(data_frame(1, bytes(5000)) + frame(Ping().encode()))
        await raw.receive_until(Pong)
        assert window_errors(caplog) == []
        raw.writer.write(data_frame(2, b"x"))
        # Acks of what it had may still come; then the server closes.
        assert all(isinstance(m, Ack) for m in await raw.until_closed())
        [error] = window_errors(caplog)
        assert "2 frames (5001 bytes) received and not yet consumed" in error
        assert "over max_unacked_bytes=1000" in error


@pytest.mark.parametrize("receiver", ["server", "client"])
@pytest.mark.parametrize(
    ("window", "payload", "fits"),
    [({"max_unacked_frames": 8}, b"x" * 10, 8), ({"max_unacked_bytes": 1000}, b"x" * 300, 3)],
    ids=["frames", "bytes"],
)
async def test_a_sender_keeps_to_the_receivers_smaller_window(
    receiver: str,
    window: SessionOptions,
    payload: bytes,
    fits: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    total = 100
    served: list[ServerSession] = []
    release = asyncio.Event()
    server_got: list[bytes] = []

    async def handler(session: ServerSession) -> None:
        served.append(session)
        if receiver == "server":
            await release.wait()
            for _ in range(total):
                server_got.append(await session.recv())
        else:
            for _ in range(total):
                await session.send(payload)
        await session.recv()  # until the client closes

    # Only the receiver sets the small window: the sender (default settings)
    # learns it from the handshake.
    server_window: SessionOptions = window if receiver == "server" else {}
    client_window: SessionOptions = window if receiver == "client" else {}
    async with (
        await serve_resumable(
            handler, "127.0.0.1", 0, **fast(**server_window), **QUICK_SHUTDOWN
        ) as server,
        connect_resumable("127.0.0.1", server.port, **fast(**client_window)) as session,
    ):
        await wait_until(lambda: bool(served))
        peer = served[0]
        sender: Session
        receiving: Session
        if receiver == "server":
            sender, receiving = session, peer

            async def produce() -> None:
                for _ in range(total):
                    await session.send(payload)

            task: asyncio.Task[None] | None = asyncio.create_task(produce())
        else:
            sender, receiving, task = peer, session, None
        await wait_until(lambda: receiving.stats.frames_received == fits)
        await asyncio.sleep(0.2)  # room for a frame past the window, were it sent
        # The sender stopped at the receiver's window, not at its own (16384, 8 MiB).
        assert sender.stats.frames_sent == fits
        assert receiving.stats.frames_received == fits
        if receiver == "server":
            assert task is not None and not task.done()
            release.set()
            await asyncio.wait_for(task, 10)
            await session.flush()
            assert server_got == [payload] * total
        else:
            got = [await session.recv(timeout=5) for _ in range(total)]
            assert got == [payload] * total
        assert session.stats.connections == 1
        assert window_errors(caplog) == []


async def test_frames_over_the_receivers_byte_window_go_one_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    async with (
        echo_server(max_unacked_bytes=1000) as server,
        connect_resumable("127.0.0.1", server.port, **FAST) as session,
    ):
        payloads = [bytes([n]) * 3000 for n in range(20)]

        async def produce() -> None:
            for payload in payloads:
                await session.send(payload)

        task = asyncio.create_task(produce())
        got = [await session.recv(timeout=5) for _ in payloads]
        await task
        assert got == payloads
        assert session.stats.connections == 1
        assert window_errors(caplog) == []


# -- acks on the wire -----------------------------------------------------------


async def acks_until(raw: RawClient, consumed: int) -> list[Ack]:
    """The acks (of frames received) a raw client gets until one says ``consumed``."""
    acks: list[Ack] = []
    while not acks or acks[-1].consumed < consumed:
        message = await raw.receive()
        if isinstance(message, Ack) and message.received:
            acks.append(message)
    return acks


async def test_a_batch_consumed_in_one_turn_is_acked_once() -> None:
    async def consume(session: ServerSession) -> None:
        async for _ in session:
            pass

    async with (
        serve_resumable(
            consume, "127.0.0.1", 0, ack_every=64, ack_delay=5.0, grace_period=0.1
        ) as server,
        raw_client(server.port, NEW) as raw,
    ):
        raw.writer.write(b"".join(data_frame(n, bytes(100)) for n in range(200)))
        async with asyncio.timeout(2):  # well before ack_delay
            acks = await acks_until(raw, 200)
        # One ack per read batch (loopback may split the 22 KB write), each
        # covering what was received and consumed, not one per 64 frames.
        assert len(acks) <= 2
        assert acks[-1] == Ack(200, 200)


async def test_frames_consumed_slowly_are_all_acked_after_ack_delay() -> None:
    async def consume_slowly(session: ServerSession) -> None:
        async for _ in session:
            await asyncio.sleep(0.02)

    async with (
        serve_resumable(
            consume_slowly, "127.0.0.1", 0, ack_every=64, ack_delay=0.01, grace_period=0.1
        ) as server,
        raw_client(server.port, NEW) as raw,
    ):
        raw.writer.write(b"".join(data_frame(n, b"x") for n in range(10)))
        async with asyncio.timeout(5):
            acks = await acks_until(raw, 10)
        assert acks[0].received == 10
        assert acks[-1] == Ack(10, 10)


async def test_frames_pipelined_behind_the_hello_are_delivered() -> None:
    async with await serve_resumable(echo, "127.0.0.1", 0, grace_period=0.1) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # Everything in one write: the server reads the HELLO with its
        # handshake framing and must hand the DATA behind it to the session.
        writer.write(
            make_preface()
            + frame(HelloNew().encode())
            + b"".join(data_frame(n, b"%d" % n) for n in range(3))
        )
        await reader.readexactly(len(make_preface()) + 16)
        echoed: list[bytes] = []
        async with asyncio.timeout(2):
            while len(echoed) < 3:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                message = decode_message(await reader.readexactly(size))
                if isinstance(message, Data):
                    echoed.append(message.payload)
        assert echoed == [b"0", b"1", b"2"]
        writer.close()


async def test_bad_frames_pipelined_behind_the_hello_drop_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")

    async def consume(session: ServerSession) -> None:
        async for _ in session:
            pass

    async with await serve_resumable(consume, "127.0.0.1", 0, grace_period=0.1) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(make_preface() + frame(HelloNew().encode()) + data_frame(5, b"gap"))
        async with asyncio.timeout(2):
            while await reader.read(65536):  # the server closes the connection
                pass
        writer.close()
        assert "offset 5 but offset 0 was expected" in caplog.text
