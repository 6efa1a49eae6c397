"""splice(): two connections joined into one, both ways, over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import streamkit.stream
from streamkit import FramedStream, LengthPrefixed, connect, serve
from streamkit.errors import ConnectionLost, EndOfStream
from streamkit.stream import splice
from tests._pairs import on_uvloop, stream_pair
from tests._sessions import wait_until
from tests._tls import tls_contexts

CODEC = LengthPrefixed(max_frame=8 << 20)
Pair = tuple[FramedStream[bytes], FramedStream[bytes]]


#: Both ways streams read: through StreamProtocol (streamkit.net's) and asyncio's own.
READINGS = pytest.mark.parametrize("reading", ["streamkit", "asyncio"])


@asynccontextmanager
async def pairs(
    where: str = "tcp", tmp_path: Path | None = None, reading: str = "streamkit"
) -> AsyncIterator[tuple[Pair, Pair]]:
    """(client, front_in), (front_out, owner): two connections for a front to splice."""
    paths = [None, None] if tmp_path is None else [tmp_path / "in", tmp_path / "out"]
    for path in paths:
        if path is not None:
            path.mkdir()
    async with (
        stream_pair(CODEC, where, paths[0], reading=reading) as first,
        stream_pair(CODEC, where, paths[1], reading=reading) as second,
    ):
        yield first, second


@asynccontextmanager
async def relayed(
    where: str = "tcp", tmp_path: Path | None = None, reading: str = "streamkit"
) -> AsyncIterator[Pair]:
    """(client, owner) streams joined by a splice in the middle, which must end with them."""
    async with pairs(where, tmp_path, reading) as ((client, front_in), (front_out, owner)):
        relay = asyncio.ensure_future(splice(front_in, front_out))
        try:
            yield client, owner
        finally:
            client.abort()
            owner.abort()
            async with asyncio.timeout(5):
                await relay


@READINGS
@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_frames_cross_both_ways_in_order(where: str, reading: str, tmp_path: Path) -> None:
    sizes = [0, 1, 100, 70_000, 4 << 20, 3, 300_000]
    async with relayed(where, tmp_path, reading) as (client, owner):

        async def echo() -> None:
            for _ in sizes:
                await owner.send(await owner.recv())

        echoing = asyncio.ensure_future(echo())
        for size in sizes:
            await client.send(bytes([size % 251]) * size)
        got = [await client.recv() for _ in sizes]
        await echoing
    assert [len(frame) for frame in got] == sizes
    assert all(frame == bytes([size % 251]) * size for frame, size in zip(got, sizes, strict=True))


@READINGS
async def test_bytes_read_ahead_of_the_switch_go_first(reading: str) -> None:
    async with pairs(reading=reading) as ((client, front_in), (front_out, owner)):
        # The client's hello and what it sent right behind it arrive together:
        # the front's decoder has read past the hello when it splices.
        await client.send_many([b"hello", b"one", b"two"])
        assert await front_in.recv() == b"hello"
        relay = asyncio.ensure_future(splice(front_in, front_out))
        assert [await owner.recv(), await owner.recv()] == [b"one", b"two"]
        client.abort()
        await relay


async def test_a_side_that_ends_its_stream_closes_the_other() -> None:
    async with relayed() as (client, owner):
        await owner.send(b"last words")
        owner.close()
        assert await client.recv() == b"last words"
        with pytest.raises(EndOfStream):
            await client.recv(timeout=5)


async def test_a_reset_on_one_side_closes_the_other() -> None:
    async with relayed() as (client, owner):
        await client.send(b"x")
        assert await owner.recv() == b"x"
        client.abort()
        with pytest.raises((EndOfStream, ConnectionLost)):
            await owner.recv(timeout=5)


async def test_a_reader_that_stops_holds_the_writer_back() -> None:
    chunk = b"z" * (1 << 20)
    async with (
        stream_pair(CODEC) as (client, front_in),
        stream_pair(CODEC) as (front_out, owner),
    ):
        relay = asyncio.ensure_future(splice(front_in, front_out))
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await client.send(chunk)
                sent += len(chunk)

        flooding = asyncio.ensure_future(flood())
        # The owner reads nothing: the client is held back, once the kernel's
        # socket buffers and the relay's own are full, a few MiB.
        stalled = -1
        while sent != stalled:
            stalled = sent
            await asyncio.sleep(0.2)
        assert stalled < 64 << 20
        transport = front_out.writer.transport
        assert transport.get_write_buffer_size() <= (1 << 20) + 256 * 1024
        # Everything that went in comes out, in order, once the owner reads.
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding
        received = 0
        while received < stalled:
            frame = await owner.recv(timeout=5)
            assert frame == chunk
            received += len(frame)
        client.abort()
        await relay


async def test_cancelling_the_splice_aborts_both_sides() -> None:
    async with (
        stream_pair(CODEC) as (client, front_in),
        stream_pair(CODEC) as (front_out, owner),
    ):
        relay = asyncio.ensure_future(splice(front_in, front_out))
        await asyncio.sleep(0)
        relay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relay
        assert front_in.is_closing() and front_out.is_closing()
        with pytest.raises((EndOfStream, ConnectionLost)):
            await client.recv(timeout=5)
        with pytest.raises((EndOfStream, ConnectionLost)):
            await owner.recv(timeout=5)


async def test_a_side_lost_before_the_splice_ends_it_at_once() -> None:
    async with (
        stream_pair(CODEC) as (client, front_in),
        stream_pair(CODEC) as (front_out, owner),
    ):
        client.abort()
        with pytest.raises((EndOfStream, ConnectionLost)):
            await front_in.recv(timeout=5)
        async with asyncio.timeout(5):
            await splice(front_in, front_out)
        with pytest.raises((EndOfStream, ConnectionLost)):
            await owner.recv(timeout=5)


@READINGS
async def test_bytes_the_reader_holds_go_first(reading: str, tmp_path: Path) -> None:
    async with pairs("unix", tmp_path, reading) as ((client, front_in), (front_out, owner)):
        await client.send(b"hello")
        assert await front_in.recv() == b"hello"
        # Sent while nobody reads the front: it waits in the front's reader
        # (this loop reads the socket as soon as it runs).
        await client.send_many([b"%d" % n for n in range(1000)])
        await client.drain()
        for _ in range(20):
            await asyncio.sleep(0)
        relay = asyncio.ensure_future(splice(front_in, front_out))
        assert [await owner.recv() for _ in range(1000)] == [b"%d" % n for n in range(1000)]
        client.abort()
        await relay


@READINGS
async def test_a_large_frame_half_received_goes_on_whole(reading: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    framed = CODEC.encode(payload)
    async with pairs(reading=reading) as ((client, front_in), (front_out, owner)):
        await client.send(b"hello")
        assert await front_in.recv() == b"hello"
        # The front waits inside a large frame (over StreamProtocol, reading its
        # rest into memory of its own) when the splice takes the connection.
        receiving = asyncio.ensure_future(front_in.recv())
        client.writer.write(framed[:300_000])
        await client.drain()
        await asyncio.sleep(0.1)
        assert not receiving.done()
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        relay = asyncio.ensure_future(splice(front_in, front_out))
        client.writer.write(framed[300_000:])
        await client.send(b"after")
        assert await owner.recv(timeout=5) == payload
        assert await owner.recv(timeout=5) == b"after"
        client.abort()
        await relay


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return tls_contexts()


async def test_a_tls_connection_splices_with_a_plain_one(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls
    accepted: asyncio.Queue[FramedStream[bytes]] = asyncio.Queue()

    async def on_connection(stream: FramedStream[bytes]) -> None:
        await accepted.put(stream)
        await stream.wait_closed()

    async with (
        serve(on_connection, "127.0.0.1", 0, codec=CODEC, ssl=server_context) as server,
        connect("127.0.0.1", server.port, codec=CODEC, ssl=client_context) as client,
        stream_pair(CODEC) as (front_out, owner),
    ):
        front_in = await accepted.get()
        # Over TLS too, what the front received past its last frame goes first.
        await client.send_many([b"hello", b"ahead"])
        assert await front_in.recv() == b"hello"
        relay = asyncio.ensure_future(splice(front_in, front_out))
        assert await owner.recv(timeout=5) == b"ahead"
        payloads = [bytes([n]) * (n * 1000) for n in range(50)]
        for payload in payloads:
            await client.send(payload)
            assert await owner.recv() == payload
            await owner.send(payload[::-1])
            assert await client.recv() == payload[::-1]
        owner.close()
        with pytest.raises((EndOfStream, ConnectionLost)):
            await client.recv(timeout=5)
        async with asyncio.timeout(5):
            await relay


@READINGS
async def test_frames_queued_before_the_splice_go_first(reading: str) -> None:
    async with pairs(reading=reading) as ((client, front_in), (front_out, owner)):
        await client.send_many([b"hello", b"one", b"two"])
        assert await front_in.recv() == b"hello"  # "one" and "two" are read ahead
        # The first goes out at once, the second is gathered for the end of
        # the turn; bytes written through the sender share its order.
        front_in.send_nowait(b"welcome")
        front_in.send_nowait(b"gathered")
        front_out.sender.write_parts([CODEC.encode(b"raw"), CODEC.encode(b"parts")])
        front_out.send_nowait(b"first")
        front_out.send_nowait(b"gathered too")  # and before what the splice forwards
        splicing = splice(front_in, front_out)
        if sys.version_info >= (3, 12):
            # Begun at once, while the turn's gathered frames wait in the senders.
            relay = asyncio.eager_task_factory(asyncio.get_running_loop(), splicing)
        else:
            relay = asyncio.ensure_future(splicing)
        assert [await client.recv() for _ in range(2)] == [b"welcome", b"gathered"]
        got = [await owner.recv() for _ in range(6)]
        assert got == [b"raw", b"parts", b"first", b"gathered too", b"one", b"two"]
        await client.send(b"after")
        assert await owner.recv(timeout=5) == b"after"
        client.abort()
        await relay


@pytest.fixture
def kernel_splices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times splice() went through the kernel (os.splice), counted."""
    counted: list[int] = []
    through_kernel = streamkit.stream._splice_in_kernel

    async def counting(*args: Any) -> None:
        counted.append(1)
        await through_kernel(*args)

    monkeypatch.setattr(streamkit.stream, "_splice_in_kernel", counting)
    return counted


@pytest.mark.skipif(not hasattr(os, "splice"), reason="os.splice is Linux only")
@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_plain_sockets_splice_in_the_kernel_and_a_slow_reader_holds_the_writer(
    where: str, tmp_path: Path, kernel_splices: list[int]
) -> None:
    frames = [bytes([n % 251]) * (1000 + n * 37 % 70_000) for n in range(1500)]  # 53 MB
    async with pairs(where, tmp_path) as ((client, front_in), (front_out, owner)):
        await client.send_many([b"hello", b"ahead"])
        assert await front_in.recv() == b"hello"  # "ahead" is read ahead: it goes first
        relay = asyncio.ensure_future(splice(front_in, front_out))
        assert await owner.recv(timeout=5) == b"ahead"
        sent = 0

        async def send() -> None:
            nonlocal sent
            for frame in frames:
                await client.send(frame)
                sent += 1

        sending = asyncio.ensure_future(send())
        # The owner does not read: the client comes to wait, once the kernel's
        # buffers (about 14 MB over TCP on loopback, under 1 MB over Unix) are full.
        await asyncio.sleep(0.5)
        stalled_at = sent
        assert stalled_at < len(frames) and not sending.done()
        await asyncio.sleep(0.2)
        assert sent == stalled_at
        got = []
        for _ in frames:
            got.append(await owner.recv(timeout=5))
            if len(got) % 50 == 0:
                await asyncio.sleep(0.01)  # a slow reader
        await sending
        assert got == frames
        await answered_then_closed(client, owner, relay)
    assert kernel_splices == [1]


async def test_without_os_splice_the_transports_copy(
    monkeypatch: pytest.MonkeyPatch, kernel_splices: list[int]
) -> None:
    monkeypatch.delattr(os, "splice", raising=False)
    async with relayed() as (client, owner):
        payloads = [bytes([n]) * (n * 3000) for n in range(40)]
        for payload in payloads:
            await client.send(payload)
        assert [await owner.recv(timeout=5) for _ in payloads] == payloads
        await owner.send(b"back")
        assert await client.recv(timeout=5) == b"back"
    assert kernel_splices == []


async def test_a_tls_connection_is_not_spliced_in_the_kernel(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], kernel_splices: list[int]
) -> None:
    await test_a_tls_connection_splices_with_a_plain_one(tls)
    assert kernel_splices == []


async def answered_then_closed(
    client: FramedStream[bytes], owner: FramedStream[bytes], relay: asyncio.Task[None]
) -> None:
    """The owner's answer reaches the client; its close ends the client's stream and the relay."""
    await owner.send(b"back")
    assert await client.recv(timeout=5) == b"back"
    owner.close()
    with pytest.raises((EndOfStream, ConnectionLost)):
        await client.recv(timeout=5)
    async with asyncio.timeout(5):
        await relay


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def only_new_descriptors(spare: int) -> Iterator[None]:
    """Inside, the process can open ``spare`` more descriptors (RLIMIT_NOFILE), then EMFILE."""
    import resource

    free = [os.dup(0) for _ in range(spare + 1)]  # the lowest free numbers, in order
    for fd in free:
        os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[spare], hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not hasattr(os, "splice"), reason="os.splice is Linux only")
@pytest.mark.parametrize("spare", range(7))  # 6: both duplicates and both pipes open
async def test_without_descriptors_to_spare_the_transports_copy(
    spare: int, kernel_splices: list[int]
) -> None:
    at_first, splices = open_descriptors(), len(kernel_splices)
    async with pairs() as ((client, front_in), (front_out, owner)):
        await client.send_many([b"hello", b"ahead"])
        assert await front_in.recv() == b"hello"
        before = open_descriptors()
        with only_new_descriptors(spare):
            relay = asyncio.ensure_future(splice(front_in, front_out))
            # The splice begins (and opens what it can) while the limit holds.
            assert await owner.recv(timeout=5) == b"ahead"
        assert len(kernel_splices) - splices == (1 if spare >= 6 else 0)
        assert open_descriptors() == before + (6 if spare >= 6 else 0)
        payloads = [bytes([n]) * (n * 5000) for n in range(60)]

        async def send_all() -> None:
            for payload in payloads:
                await client.send(payload)

        # 9 MB: read while they are sent (the socket buffers may hold less).
        sending = asyncio.ensure_future(send_all())
        assert [await owner.recv(timeout=5) for _ in payloads] == payloads
        await sending
        await answered_then_closed(client, owner, relay)
    await wait_until(lambda: open_descriptors() == at_first)  # transports close in callbacks


#: Both ways splice() copies: in the kernel (where os.splice is) and transport to transport.
COPYING = pytest.mark.parametrize("copying", ["kernel", "transports"])


@COPYING
@pytest.mark.parametrize("closing", ["close", "abort"])
@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_a_stream_closed_during_the_splice_ends_it(
    where: str, closing: str, copying: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The copy path hears of it through the transport; the kernel one must too,
    # though it reads and writes duplicates of the sockets, which stay open.
    copying_by(copying, monkeypatch)
    at_first = open_descriptors()
    async with pairs(where, tmp_path) as ((client, front_in), (front_out, owner)):
        relay = asyncio.ensure_future(splice(front_in, front_out))
        await client.send(b"x")
        assert await owner.recv(timeout=5) == b"x"
        getattr(front_in, closing)()  # as a server shutting down closes its connections
        with pytest.raises((EndOfStream, ConnectionLost)):
            await client.recv(timeout=5)
        with pytest.raises((EndOfStream, ConnectionLost)):
            await owner.recv(timeout=5)
        async with asyncio.timeout(5):
            await relay
    await wait_until(lambda: open_descriptors() == at_first)


def copying_by(copying: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if copying == "transports":
        monkeypatch.delattr(os, "splice", raising=False)


@COPYING
@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_a_half_close_ends_the_splice_once_its_bytes_are_through(
    where: str, copying: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copying_by(copying, monkeypatch)
    async with pairs(where, tmp_path) as ((client, front_in), (front_out, owner)):
        relay = asyncio.ensure_future(splice(front_in, front_out))
        frames = [bytes([n]) * (n * 2000) for n in range(100)]
        for frame in frames:  # ~10 MB: most of it still in flight at the half-close
            client.send_nowait(frame)
        client.write_eof()
        assert [await owner.recv(timeout=5) for _ in frames] == frames
        # A session never half-closes: the relay closes both connections.
        with pytest.raises(EndOfStream):
            await owner.recv(timeout=5)
        with pytest.raises((EndOfStream, ConnectionLost)):
            await client.recv(timeout=5)
        async with asyncio.timeout(5):
            await relay


@COPYING
async def test_cancelling_a_running_splice_aborts_both_and_closes_its_descriptors(
    copying: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    copying_by(copying, monkeypatch)
    at_first = open_descriptors()
    async with pairs() as ((client, front_in), (front_out, owner)):
        relay = asyncio.ensure_future(splice(front_in, front_out))
        await client.send(b"x")
        assert await owner.recv(timeout=5) == b"x"
        for _ in range(100):  # in flight when cancelled
            client.send_nowait(b"y" * 100_000)
        relay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relay
        assert front_in.is_closing() and front_out.is_closing()
        with pytest.raises((EndOfStream, ConnectionLost)):
            while True:
                await owner.recv(timeout=5)
    await wait_until(lambda: open_descriptors() == at_first)


@COPYING
async def test_a_blocked_reader_costs_no_cpu(
    copying: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    copying_by(copying, monkeypatch)
    async with relayed("unix", tmp_path) as (client, owner):
        chunk = b"z" * (1 << 20)
        sent = stalled = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await client.send(chunk)
                sent += 1

        flooding = asyncio.ensure_future(flood())
        while True:  # the owner reads nothing: the client comes to wait
            await asyncio.sleep(0.2)
            if sent == stalled:
                break
            stalled = sent
        # Both sides wait on the kernel now: no wake-up spins on EAGAIN.
        started = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - started < 0.1
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding
        for _ in range(stalled):
            assert await owner.recv(timeout=5) == chunk


@COPYING
async def test_on_uvloop_too(
    copying: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel_splices: list[int]
) -> None:
    copying_by(copying, monkeypatch)

    async def run() -> None:
        for where in ["tcp", "unix"]:
            (tmp_path / where).mkdir()
            await test_frames_cross_both_ways_in_order(where, "streamkit", tmp_path / where)
        # After a first listen, for which libuv keeps a descriptor (its EMFILE reserve).
        if copying == "kernel":
            await test_without_descriptors_to_spare_the_transports_copy(2, kernel_splices)
        for closing in ["close", "abort"]:
            (tmp_path / closing).mkdir()
            await test_a_stream_closed_during_the_splice_ends_it(
                "unix", closing, copying, tmp_path / closing, monkeypatch
            )
        at_first = open_descriptors()
        async with relayed() as (client, owner):
            await client.send(b"x")
            assert await owner.recv(timeout=5) == b"x"
            owner.close()
            with pytest.raises((EndOfStream, ConnectionLost)):
                await client.recv(timeout=5)
        await wait_until(lambda: open_descriptors() == at_first)

    await on_uvloop(run)  # its own loop, in a thread: the test's loop is asyncio's
    assert len(kernel_splices) == (5 if copying == "kernel" else 0)
