"""FramedStream over real loopback TCP (IPv4, IPv6) and Unix sockets; no mocked transports."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from streamkit import (
    ConnectionLost,
    DecodeError,
    Delimited,
    EndOfStream,
    FramedStream,
    FrameTooLarge,
    IncompleteFrame,
    JsonLines,
    LengthPrefixed,
    Lines,
    VarintPrefixed,
)
from streamkit.codecs import Codec
from streamkit.codecs.varint import encode_varint
from tests import _pairs
from tests._pairs import HAS_IPV6, listen_and_connect, stream_pair

WHERE = [
    "tcp",
    pytest.param("tcp6", marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")),
    "unix",
]
CASES: list[tuple[Codec[Any], list[Any]]] = [
    (LengthPrefixed(), [b"", b"one", bytes(range(256)) * 300]),
    (LengthPrefixed(header=2, byteorder="little"), [b"x" * 65535, b"y"]),
    (VarintPrefixed(), [b"a" * 300, b"", b"b", bytes(100_000)]),
    (Lines(), ["hello", "", "wörld"]),
    (JsonLines(), [{"a": [1, 2]}, None, "text", 3.5, [{"nested": "é"}]]),
]


@pytest.fixture(autouse=True, params=["streamkit", "asyncio"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs over both ways of reading (see tests/_pairs.py)."""
    monkeypatch.setattr(_pairs, "READING", request.param)
    return str(request.param)


def record_writes(stream: FramedStream[Any]) -> tuple[list[int], list[int]]:
    """Record each write on the stream's real transport: its size, and the buffer size after it.

    The real ``write`` still runs; this only watches it.
    """
    transport = stream.writer.transport
    sizes: list[int] = []
    buffered: list[int] = []
    real_write = transport.write

    def watched_write(data: Any) -> None:
        sizes.append(len(data))
        real_write(data)
        buffered.append(transport.get_write_buffer_size())

    transport.write = watched_write  # type: ignore[method-assign]
    return sizes, buffered


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(("codec", "frames"), CASES)
async def test_round_trip_both_ways(
    codec: Codec[Any], frames: list[Any], where: str, tmp_path: Path
) -> None:
    async with stream_pair(codec, where, tmp_path) as (client, server):
        for frame in frames:
            await client.send(frame)
        await server.send_many(frames)
        assert [await server.recv() for _ in frames] == frames
        assert [await client.recv() for _ in frames] == frames


async def test_send_many_is_one_write() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        sizes, _ = record_writes(client)
        await client.send_many([b"a" * 100] * 50)
        assert sizes == [50 * 104]
        assert [await server.recv() for _ in range(50)] == [b"a" * 100] * 50


async def test_send_many_of_an_unencodable_frame_sends_the_ones_before() -> None:
    async with stream_pair(LengthPrefixed(max_frame=10)) as (client, server):
        with pytest.raises(FrameTooLarge, match="11 bytes exceeds max_frame=10"):
            await client.send_many([b"first", b"x" * 11, b"never"])
        await client.send(b"next")
        assert [await server.recv() for _ in range(2)] == [b"first", b"next"]


async def test_frames_sent_in_one_turn_are_coalesced() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        sizes, _ = record_writes(client)
        for n in range(100):
            await client.send(b"%03d" % n)
        await asyncio.sleep(0)  # the turn ends
        assert sizes == [7, 99 * 7]  # the first at once, the rest together
        assert [await server.recv() for _ in range(100)] == [b"%03d" % n for n in range(100)]


async def test_a_turn_of_mixed_sizes_is_one_write_and_no_larger_payload_is_copied_in() -> None:
    # Payloads of 1 KiB or more wait apart from the buffer (not copied into
    # it) and are joined with the bytes around them once, when written.
    frames = [b"first", b"s1", b"m" * 3000, b"s2", b"s3", b"n" * 1024, b"o" * 5000, b"s4"]
    async with stream_pair(LengthPrefixed()) as (client, server):
        sizes, _ = record_writes(client)
        buffered: list[int] = []
        for frame in frames:
            await client.send(frame)
            buffered.append(len(client.sender.buffer))
        assert max(buffered) < 1024  # the small frames since the last larger one
        await asyncio.sleep(0)  # the turn ends
        assert sizes == [9, sum(len(frame) + 4 for frame in frames[1:])]
        assert [await server.recv() for _ in frames] == frames


async def test_recv_batch_returns_every_frame_received() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        await client.send_many([b"1", b"2", b"3"])
        batch: list[bytes] = []
        while len(batch) < 3:
            batch += await server.recv_batch()
        assert batch == [b"1", b"2", b"3"]


async def test_codec_error_on_send_writes_nothing() -> None:
    async with stream_pair(Delimited()) as (client, server):
        with pytest.raises(ValueError, match="delimiter"):
            await client.send(b"has\na newline")
        await client.send(b"fine")
        assert await server.recv() == b"fine"


async def test_oversized_frame_on_send_is_refused_before_writing() -> None:
    async with stream_pair(LengthPrefixed(max_frame=1024)) as (client, server):
        with pytest.raises(FrameTooLarge, match="1025 bytes exceeds max_frame=1024"):
            await client.send(b"x" * 1025)
        await client.send(b"y" * 1024)
        assert await server.recv() == b"y" * 1024


# -- the end of a stream, and broken ones ---------------------------------------------------


async def test_clean_end_of_stream() -> None:
    async with stream_pair(Lines()) as (client, server):
        await client.send_many(["a", "b"])
        client.close()
        assert [line async for line in server] == ["a", "b"]
        for _ in range(2):  # and again on every later call
            with pytest.raises(EndOfStream, match="end of stream"):
                await server.recv()
        assert [line async for line in server] == []


@pytest.mark.parametrize(
    ("codec", "partial", "message"),
    [
        (LengthPrefixed(), struct.pack(">I", 10) + b"abc", "7 bytes short"),
        (VarintPrefixed(), encode_varint(10) + b"abc", "7 bytes short"),
        (Lines(), b"no newline yet", None),
    ],
)
async def test_peer_vanishing_mid_frame_is_incomplete_frame(
    codec: Codec[Any], partial: bytes, message: str | None
) -> None:
    async with stream_pair(codec) as (client, server):
        server.writer.write(partial)
        server.writer.close()
        with pytest.raises(IncompleteFrame, match=message) as info:
            await client.recv()
        if message is not None:
            assert info.value.missing == 7


async def test_async_for_raises_incomplete_frame_rather_than_stopping() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        server.writer.write(LengthPrefixed().encode(b"whole") + struct.pack(">I", 5) + b"ha")
        server.writer.close()
        received = []
        with pytest.raises(IncompleteFrame, match="3 bytes short"):
            async for frame in client:
                received.append(frame)
        assert received == [b"whole"]


async def test_reset_connection_is_connection_lost_with_the_os_error() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        sock = server.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        receiving = asyncio.create_task(client.recv())
        server.abort()  # with SO_LINGER 0: an RST, not a FIN
        with pytest.raises(ConnectionLost, match="connection lost") as info:
            await receiving
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(ConnectionLost):  # and again
            await client.recv()
        with pytest.raises(ConnectionLost):
            await client.send(b"after")


async def test_sending_into_a_reset_connection_is_connection_lost() -> None:
    async with stream_pair(LengthPrefixed(), write_buffer_high=4096) as (client, server):
        sock = server.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.abort()
        with pytest.raises(ConnectionLost):
            while True:  # until the RST is seen: by the write, the drain, or the next send
                await client.send(b"x" * 65536)


async def test_a_decode_error_names_the_frame_and_loses_no_other_frame() -> None:
    async with stream_pair(JsonLines()) as (client, server):
        server.writer.write(b'{"a": 1}\nnot json\n{"b": 2}\n')
        assert await client.recv() == {"a": 1}
        with pytest.raises(DecodeError, match="line 2") as info:
            await client.recv()
        assert info.value.frame_number == 2
        assert await client.recv() == {"b": 2}


async def test_frames_after_a_bad_first_frame_need_no_more_input() -> None:
    async with stream_pair(JsonLines()) as (client, server):
        server.writer.write(b'not json\n{"b": 2}\n')  # then the peer waits
        with pytest.raises(DecodeError, match="line 1"):
            await client.recv(timeout=5)
        assert await client.recv(timeout=5) == {"b": 2}


async def test_an_oversized_header_after_good_frames_fails_without_more_input() -> None:
    codec = LengthPrefixed(max_frame=100)
    async with stream_pair(codec) as (client, server):
        server.writer.write(codec.encode_many([b"one", b"two"]) + (101).to_bytes(4, "big"))
        assert [await client.recv(timeout=5), await client.recv(timeout=5)] == [b"one", b"two"]
        with pytest.raises(FrameTooLarge, match="101 bytes exceeds max_frame=100"):
            await client.recv(timeout=5)


async def test_a_second_concurrent_recv_is_refused_and_the_first_unharmed() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        first = asyncio.create_task(client.recv())
        await asyncio.sleep(0.01)  # the first recv is waiting for data
        with pytest.raises(RuntimeError, match="another task is receiving"):
            await client.recv()
        with pytest.raises(RuntimeError, match="another task is receiving"):
            await anext(aiter(client))
        await server.send(b"only")
        assert await first == b"only"
        await server.send(b"next")
        assert await client.recv(timeout=5) == b"next"  # usable again


# -- timeouts -------------------------------------------------------------------------


async def test_recv_timeout_leaves_the_stream_usable() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        with pytest.raises(TimeoutError):
            await server.recv(timeout=0.05)
        await client.send(b"later")
        assert await server.recv(timeout=5) == b"later"


@pytest.mark.parametrize("size", [100, 200_000])  # a small frame, and one read in one piece
async def test_recv_timeout_inside_a_frame_loses_no_byte(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    wire = LengthPrefixed().encode(payload)
    async with stream_pair(LengthPrefixed()) as (client, server):
        server.writer.write(wire[: size // 2])  # the header and half the payload
        await server.writer.drain()
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.05)
        server.writer.write(wire[size // 2 :] + LengthPrefixed().encode(b"next"))
        assert await client.recv(timeout=5) == payload
        assert await client.recv(timeout=5) == b"next"


# -- limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "header"),
    [
        (LengthPrefixed(max_frame=1024), struct.pack(">I", 1 << 30)),
        (VarintPrefixed(max_frame=1024), encode_varint(1 << 30)),
    ],
)
async def test_oversized_header_fails_before_the_payload_arrives(
    codec: Codec[bytes], header: bytes
) -> None:
    async with stream_pair(codec) as (client, server):
        server.writer.write(header)  # announces 1 GiB and sends nothing more
        with pytest.raises(FrameTooLarge, match="1073741824 bytes exceeds max_frame=1024"):
            await client.recv(timeout=5)
        with pytest.raises(FrameTooLarge):  # a broken stream stays broken
            await client.recv(timeout=5)


async def test_a_line_without_end_stops_at_max_frame() -> None:
    async with stream_pair(Lines(max_frame=1000)) as (client, server):
        server.writer.write(b"y" * 5000)  # no newline, and the connection stays open
        with pytest.raises(FrameTooLarge, match="max_frame=1000"):
            await client.recv(timeout=5)


# -- half-close, concurrency, flow control ------------------------------------------------


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_write_eof_half_closes(where: str, tmp_path: Path) -> None:
    async with stream_pair(LengthPrefixed(), where, tmp_path) as (client, server):
        await client.send(b"request")
        client.write_eof()
        assert [frame async for frame in server] == [b"request"]
        with pytest.raises(EndOfStream):
            await server.recv()
        await server.send(b"reply after the client's end")
        await server.send_many([b"and", b"more"])
        server.write_eof()
        assert [frame async for frame in client] == [
            b"reply after the client's end",
            b"and",
            b"more",
        ]


async def test_concurrent_senders_never_interleave_and_all_finish() -> None:
    async with stream_pair(LengthPrefixed(), write_buffer_high=4096, write_buffer_low=1024) as (
        client,
        server,
    ):

        def frame(task: int, seq: int) -> bytes:
            # 60 MB in all: more than the kernel buffers can hold.
            return b"%02d:%03d:" % (task, seq) + bytes([task]) * 30_000

        sent = [0]

        async def sender(task: int) -> None:
            for seq in range(100):
                await client.send(frame(task, seq))
                sent[0] += 1

        async def batch_sender(task: int) -> None:
            for start in range(0, 100, 10):
                await client.send_many(frame(task, seq) for seq in range(start, start + 10))
                sent[0] += 10

        senders = [asyncio.create_task(sender(task)) for task in range(10)]
        senders += [asyncio.create_task(batch_sender(task)) for task in range(10, 20)]
        await asyncio.sleep(0.1)  # nothing read yet: the buffers fill up
        assert client.must_drain
        stalled_at = sent[0]
        await asyncio.sleep(0.05)
        assert sent[0] == stalled_at < 2000  # the senders wait for the reader
        seen: dict[int, list[int]] = {task: [] for task in range(20)}
        for count in range(2000):
            received = await server.recv()
            task, seq = int(received[:2]), int(received[3:6])
            assert received == frame(task, seq)  # whole, not interleaved with another
            seen[task].append(seq)
            if count % 50 == 0:
                await asyncio.sleep(0.001)  # a slow reader: the senders' buffer fills
        async with asyncio.timeout(10):  # every sender is released once the buffer drains
            await asyncio.gather(*senders)
        assert all(seqs == list(range(100)) for seqs in seen.values())


@asynccontextmanager
async def small_buffer_pair(
    codec: Codec[Any], *, kernel_buffer: int, limit: int, **options: Any
) -> AsyncIterator[tuple[FramedStream[Any], FramedStream[Any]]]:
    """A TCP pair whose kernel send (client) and receive (server) buffers are small and fixed."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, kernel_buffer)  # accepted inherit it
    listener.bind(("127.0.0.1", 0))
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, kernel_buffer)
    sock.setblocking(False)
    try:
        server, (reader, writer) = await listen_and_connect(
            listener, on_connection, limit, client_sock=sock
        )
    except BaseException:
        sock.close()
        raise
    client = FramedStream(reader, writer, codec, **options)
    served = FramedStream(*await accepted, codec, **options)
    try:
        yield client, served
    finally:
        client.abort()
        served.abort()
        server.close()
        await server.wait_closed()


async def until_stalled(stream: FramedStream[Any], progress: Callable[[], int]) -> None:
    """Return once the stream's sender is held: bytes wait in its buffer and nothing moves.

    (The checks that follow hold at any moment; this only lets the buffers fill first.)
    """
    last = None
    while True:
        state = (progress(), stream.writer.transport.get_write_buffer_size())
        if state == last and state[1] > 0:
            return
        last = state
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("frame_size", [8 * 1024, 100])
async def test_a_consumer_that_stops_blocks_the_producer_with_bounded_memory(
    frame_size: int,
) -> None:
    high, limit = 32 * 1024, 64 * 1024
    async with small_buffer_pair(
        LengthPrefixed(), kernel_buffer=32 * 1024, limit=limit, write_buffer_high=high
    ) as (client, server):
        in_kernel = client.get_extra_info("socket").getsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF
        ) + server.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Everything that may hold sent bytes: the kernel buffers (twice, for slack), the
        # server's StreamReader (it pauses past 2 * limit), the client's write buffer.
        bound = 2 * in_kernel + 2 * limit + in_kernel + high + frame_size
        total = 4 * bound // frame_size  # far more than fits anywhere
        filler = b"f" * (frame_size - 4)
        _, buffered = record_writes(client)
        sent = 0

        async def produce() -> None:
            nonlocal sent
            for seq in range(total):
                await client.send(seq.to_bytes(4, "big") + filler)
                sent += 1
            client.write_eof()

        producer = asyncio.create_task(produce())
        await until_stalled(client, lambda: sent)  # the server reads nothing
        assert not producer.done()
        assert sent * frame_size <= bound  # held back, not growing with the frames sent
        assert max(buffered) <= high + frame_size + 4  # the water mark, plus one frame

        # Reading resumes: every frame arrives exactly once, in order, and the producer ends.
        expected = 0
        async for frame in server:
            assert frame == expected.to_bytes(4, "big") + filler
            expected += 1
        assert expected == total
        await producer
        assert max(buffered) <= high + frame_size + 4


# -- switching codecs, addresses, closing -------------------------------------------------


async def test_switch_codec_keeps_bytes_already_buffered() -> None:
    async with stream_pair(Lines()) as (client, server):
        binary = LengthPrefixed()
        # The handshake line and the binary frames after it, in one segment.
        server.writer.write(b"HELLO v1\r\n" + binary.encode_many([b"\x00\x01", b"", b"\n\n"]))
        assert await client.recv() == "HELLO v1"
        client.switch_codec(binary)
        assert [await client.recv() for _ in range(3)] == [b"\x00\x01", b"", b"\n\n"]
        await client.send(b"binary now")
        assert await server.reader.readexactly(14) == binary.encode(b"binary now")
        assert client.codec is binary


async def test_switch_codec_both_ways_after_a_handshake() -> None:
    async with stream_pair(Lines()) as (client, server):
        await client.send("UPGRADE")
        client.switch_codec(VarintPrefixed())
        await client.send_many([b"a", b"b" * 1000])  # in the same turn as the line
        assert await server.recv() == "UPGRADE"
        server.switch_codec(VarintPrefixed())
        assert [await server.recv() for _ in range(2)] == [b"a", b"b" * 1000]
        await server.send(b"ack")
        assert await client.recv() == b"ack"


async def test_addresses_and_extra_info(tmp_path: Path) -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        assert client.peername == server.sockname
        assert client.sockname == server.peername
        assert client.peername[0] == "127.0.0.1"
        sock = client.get_extra_info("socket")
        assert sock.getsockname() == client.sockname
        assert client.get_extra_info("no such thing", 42) == 42
        assert client.get_extra_info("ssl_object") is None
        assert "FramedStream" in repr(client)
    async with stream_pair(LengthPrefixed(), "unix", tmp_path) as (client, server):
        assert client.peername == str(tmp_path / "pair.sock")
        assert server.sockname == str(tmp_path / "pair.sock")


async def test_async_with_closes_and_wait_closed_returns() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        async with client:
            await client.send(b"last")
        assert client.is_closing()
        await client.wait_closed()
        assert [frame async for frame in server] == [b"last"]
        with pytest.raises(ConnectionLost, match="closing"):
            await client.send(b"too late")
        with pytest.raises(ConnectionLost, match="closing"):
            client.send_nowait(b"too late")


async def test_abort_drops_unsent_frames() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        client.send_nowait(b"first")  # written at once
        client.send_nowait(b"queued")  # waits for the end of the turn
        client.abort()
        assert await server.recv(timeout=5) == b"first"
        with pytest.raises((ConnectionLost, EndOfStream)):
            await server.recv(timeout=5)


async def test_large_frames_and_a_large_frame_cut_short() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB: read in one piece past its header
    async with stream_pair(LengthPrefixed()) as (client, server):
        sending = asyncio.create_task(server.send_many([big, b"small", big]))
        assert [await client.recv() for _ in range(3)] == [big, b"small", big]
        await sending
        server.writer.write(struct.pack(">I", len(big)) + big[:100_000])
        server.writer.close()
        with pytest.raises(IncompleteFrame) as info:
            await client.recv()
        assert info.value.missing == len(big) - 100_000
