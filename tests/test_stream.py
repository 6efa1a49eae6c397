"""FramedStream over real loopback TCP (IPv4, IPv6) and Unix sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from streamkit import (
    ConnectionLost,
    Delimited,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    JsonLines,
    LengthPrefixed,
    Lines,
    VarintPrefixed,
)
from streamkit.codecs import Codec
from tests._pairs import HAS_IPV6, stream_pair

WHERE = [
    "tcp",
    pytest.param("tcp6", marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")),
    "unix",
]
CASES: list[tuple[Codec[Any], list[Any]]] = [
    (LengthPrefixed(), [b"", b"one", bytes(range(256)) * 300]),
    (LengthPrefixed(header=2, byteorder="little"), [b"x" * 65535, b"y"]),
    (VarintPrefixed(), [b"a" * 300, b"", b"b"]),
    (Lines(), ["hello", "", "wörld"]),
    (JsonLines(), [{"a": [1, 2]}, None, "text", 3.5]),
]


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


def count_writes(stream: Any) -> list[int]:
    """Record the size of every write on the stream's (real) transport."""
    transport = stream.writer.transport
    writes: list[int] = []
    real_write = transport.write

    def counting_write(data: Any) -> None:
        writes.append(len(data))
        real_write(data)

    transport.write = counting_write
    return writes


async def test_send_many_is_one_write() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        writes = count_writes(client)
        await client.send_many([b"a" * 100] * 50)
        assert writes == [50 * 104]
        assert [await server.recv() for _ in range(50)] == [b"a" * 100] * 50


async def test_frames_sent_in_one_turn_are_coalesced() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        writes = count_writes(client)
        for n in range(100):
            await client.send(b"%03d" % n)
        await asyncio.sleep(0)  # the turn ends
        assert writes == [7, 99 * 7]  # the first at once, the rest together
        assert [await server.recv() for _ in range(100)] == [b"%03d" % n for n in range(100)]


async def test_clean_end_of_stream() -> None:
    async with stream_pair(Lines()) as (client, server):
        await client.send_many(["a", "b"])
        client.close()
        assert [line async for line in server] == ["a", "b"]
        for _ in range(2):  # and again on every later call
            with pytest.raises(EndOfStream):
                await server.recv()


async def test_peer_vanishing_mid_frame_is_incomplete_frame() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        server.writer.write(struct.pack(">I", 10) + b"abc")  # 7 bytes short
        server.writer.close()
        with pytest.raises(IncompleteFrame, match="7 bytes short") as info:
            await client.recv()
        assert info.value.missing == 7


async def test_reset_connection_is_connection_lost_with_the_os_error() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        sock = server.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        receiving = asyncio.create_task(client.recv())
        await asyncio.sleep(0.01)
        server.abort()  # with SO_LINGER 0: an RST
        with pytest.raises(ConnectionLost) as info:
            await receiving
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(ConnectionLost):
            await client.send(b"after")


async def test_recv_timeout_leaves_the_stream_usable() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        with pytest.raises(TimeoutError):
            await server.recv(timeout=0.05)
        await client.send(b"later")
        assert await server.recv(timeout=5) == b"later"


async def test_oversized_header_fails_before_the_payload_arrives() -> None:
    async with stream_pair(LengthPrefixed(max_frame=1024)) as (client, server):
        server.writer.write(struct.pack(">I", 1 << 30))  # announces 1 GiB, sends nothing more
        with pytest.raises(FrameTooLarge, match="1073741824 bytes exceeds max_frame=1024"):
            await client.recv(timeout=5)


async def test_write_eof_half_closes() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        await client.send(b"request")
        client.write_eof()
        assert [frame async for frame in server] == [b"request"]
        await server.send(b"reply after the client's end")
        assert await client.recv() == b"reply after the client's end"


async def test_codec_error_on_send_writes_nothing() -> None:
    async with stream_pair(Delimited()) as (client, server):
        with pytest.raises(ValueError, match="delimiter"):
            await client.send(b"has\na newline")
        await client.send(b"fine")
        assert await server.recv() == b"fine"


async def test_concurrent_senders_never_interleave_and_all_finish() -> None:
    async with stream_pair(LengthPrefixed(), write_buffer_high=4096, write_buffer_low=1024) as (
        client,
        server,
    ):

        async def sender(task: int) -> None:
            for seq in range(100):
                await client.send(b"%02d:%03d:" % (task, seq) + bytes([task]) * 3000)

        senders = [asyncio.create_task(sender(task)) for task in range(20)]
        seen: dict[int, list[int]] = {task: [] for task in range(20)}
        for count in range(2000):
            frame = await server.recv()
            task, seq = int(frame[:2]), int(frame[3:6])
            assert frame[7:] == bytes([task]) * 3000  # whole, not interleaved
            seen[task].append(seq)
            if count % 50 == 0:
                await asyncio.sleep(0.001)  # a slow reader
        await asyncio.gather(*senders)
        assert all(seqs == list(range(100)) for seqs in seen.values())


async def test_a_reader_that_stops_blocks_the_writer_with_bounded_memory() -> None:
    high = 64 * 1024
    frame = b"z" * 16 * 1024
    async with stream_pair(LengthPrefixed(), write_buffer_high=high) as (client, server):
        sent = 0
        buffered: list[int] = []

        async def produce() -> None:
            nonlocal sent
            while True:
                await client.send(frame)
                sent += 1
                buffered.append(client.writer.transport.get_write_buffer_size())

        producer = asyncio.create_task(produce())
        # The server reads nothing: once the kernel buffers fill, send blocks.
        while True:
            before = sent
            await asyncio.sleep(0.2)
            if sent == before:
                break
            assert sent < 20_000, "send never blocked"
        assert not producer.done()
        assert max(buffered) <= high + len(frame)  # not growing with the frames sent
        producer.cancel()
        # Reading resumes: every frame sent arrives, once and in order.
        for _ in range(sent):
            assert await server.recv(timeout=5) == frame


async def test_switch_codec_keeps_bytes_already_buffered() -> None:
    async with stream_pair(Lines()) as (client, server):
        binary = LengthPrefixed()
        server.writer.write(b"HELLO v1\r\n" + binary.encode_many([b"\x00\x01", b"", b"\n\n"]))
        assert await client.recv() == "HELLO v1"
        client.switch_codec(binary)
        assert [await client.recv() for _ in range(3)] == [b"\x00\x01", b"", b"\n\n"]
        await client.send(b"binary now")
        assert await server.reader.readexactly(14) == binary.encode(b"binary now")
        assert client.codec is binary


async def test_addresses_and_extra_info(tmp_path: Path) -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        assert client.peername == server.sockname
        assert client.sockname == server.peername
        assert client.get_extra_info("socket") is not None
        assert client.get_extra_info("no such thing", 42) == 42
        assert "FramedStream" in repr(client)
    async with stream_pair(LengthPrefixed(), "unix", tmp_path) as (client, server):
        assert client.peername == str(tmp_path / "pair.sock")


async def test_async_with_closes_and_wait_closed_returns() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        async with client:
            await client.send(b"last")
        assert client.is_closing()
        await client.wait_closed()
        assert [frame async for frame in server] == [b"last"]
        with pytest.raises(ConnectionLost, match="closing"):
            await client.send(b"too late")


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
