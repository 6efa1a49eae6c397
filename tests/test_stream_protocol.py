"""StreamProtocol: reads into one reused buffer, and a FramedStream taking them from it.

Real loopback sockets throughout (TLS: test_tls.py). The
frame-level behaviour of FramedStream over StreamProtocol is tested in
test_stream.py, which runs every test over both ways of reading.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest

from streamkit import (
    ConnectionLost,
    Delimited,
    EndOfStream,
    FramedStream,
    FrameTooLarge,
    IncompleteFrame,
    LengthPrefixed,
    Lines,
    ProtocolError,
    StreamkitError,
)
from streamkit.codecs import Codec
from streamkit.session.protocol import MessageDecoder
from streamkit.stream import _MAX_HELD, RECEIVE_BUFFER_SIZE, StreamProtocol
from tests._pairs import on_uvloop, stream_pair
from tests._sessions import data_frame, wait_until

HEADER = struct.Struct(">I")


def framed(*payloads: bytes) -> bytes:
    return b"".join(HEADER.pack(len(payload)) + payload for payload in payloads)


def protocol_of(stream: FramedStream[Any]) -> StreamProtocol:
    protocol = stream.writer.transport.get_protocol()
    assert isinstance(protocol, StreamProtocol)
    return protocol


def watch_reads(stream: FramedStream[Any]) -> list[tuple[int, bool]]:
    """Record each buffer the transport reads into: its size, and whether it is the loop's."""
    protocol = protocol_of(stream)
    shared = protocol.receive_buffer.obj
    reads: list[tuple[int, bool]] = []
    real_get_buffer = protocol.get_buffer

    def watched(sizehint: int) -> memoryview:
        buffer = real_get_buffer(sizehint)
        reads.append((len(buffer), buffer.obj is shared))
        return buffer

    protocol.get_buffer = watched  # type: ignore[method-assign]
    return reads


# -- the reader first, then the stream ---------------------------------------------------


async def test_bytes_before_the_first_recv_are_the_readers_then_every_byte_is_the_streams() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        # A handshake and frames after it, in one segment: the handshake is read
        # from the reader, the frames behind it (in the reader's buffer) by recv.
        server.writer.write(b"HELLO\r\n" + framed(b"one", b"two"))
        assert await client.reader.readuntil(b"\r\n") == b"HELLO\r\n"
        assert await client.recv() == b"one"
        assert await client.recv() == b"two"
        await server.send(b"three")
        assert await client.recv() == b"three"
        # From the first recv on the stream reads the connection; the reader has ended.
        assert client.reader.at_eof()
        assert await client.reader.read() == b""


async def test_frames_and_the_end_that_came_before_the_first_recv_are_all_received() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        await server.send_many([b"a", b"b" * 100_000, b"c"])
        server.write_eof()
        await asyncio.sleep(0.05)  # the end arrives before the client ever receives
        assert [frame async for frame in client] == [b"a", b"b" * 100_000, b"c"]
        with pytest.raises(EndOfStream):
            await client.recv()


async def test_a_reset_before_the_first_recv_is_connection_lost() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        sock = server.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.abort()  # RST
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionLost) as info:
            await client.recv()
        assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_every_connection_of_a_loop_reads_into_one_buffer() -> None:
    async with (
        stream_pair(LengthPrefixed()) as (client, server),
        stream_pair(LengthPrefixed()) as (other, other_server),
    ):
        buffers = {id(protocol_of(stream).receive_buffer) for stream in (client, other, server)}
        assert len(buffers) == 1
        assert len(protocol_of(client).receive_buffer) == RECEIVE_BUFFER_SIZE
        # Interleaved traffic on both: each stream gets its own bytes.
        for n in range(50):
            await server.send(b"server %d" % n)
            await other_server.send(b"other %d" % n)
        assert [await client.recv() for _ in range(50)] == [b"server %d" % n for n in range(50)]
        assert [await other.recv() for _ in range(50)] == [b"other %d" % n for n in range(50)]


# -- large frames ------------------------------------------------------------------------


async def test_a_frame_larger_than_the_buffer_is_read_into_memory_of_its_own() -> None:
    big = bytes(range(256)) * (3 * RECEIVE_BUFFER_SIZE // 256)
    async with stream_pair(LengthPrefixed(max_frame=len(big))) as (client, server):
        await server.send(b"first")
        assert await client.recv() == b"first"
        reads = watch_reads(client)
        sending = asyncio.create_task(server.send_many([big, b"between", big, b"after"]))
        assert [await client.recv() for _ in range(4)] == [big, b"between", big, b"after"]
        await sending
    own = [size for size, shared in reads if not shared]
    # Most of each large frame went straight to its own memory, not the shared buffer.
    assert sum(own) >= 2 * (len(big) - RECEIVE_BUFFER_SIZE)
    # Memory is allocated as the bytes come: no piece larger than what came before it.
    assert max(own) <= len(big) // 2 + RECEIVE_BUFFER_SIZE


async def test_delivered_session_messages_read_each_large_payload_into_memory_of_its_own() -> None:
    # After a large message, the next read takes just the next header (13
    # bytes for DATA), so the next payload goes to its own memory too: none
    # of it is copied through the decoder's buffer.
    big = bytes(range(256)) * (4 * RECEIVE_BUFFER_SIZE // 256)
    decoder = MessageDecoder(0, 2 * len(big))
    got: list[Any] = []
    ended: asyncio.Future[StreamkitError] = asyncio.get_running_loop().create_future()
    async with stream_pair(LengthPrefixed()) as (client, server):
        reads = watch_reads(client)
        client.deliver(decoder, got.extend, ended.set_result)
        server.writer.write(b"".join(data_frame(offset, big) for offset in range(3)))
        await wait_until(lambda: len(got) == 3)
    assert got == [big] * 3
    own = sum(size for size, shared in reads if not shared)
    assert own >= 3 * len(big) - RECEIVE_BUFFER_SIZE  # all but the first read
    assert decoder.buffered == 0


async def test_a_header_alone_allocates_nothing_near_max_frame() -> None:
    max_frame = 64 * 1024 * 1024
    async with stream_pair(LengthPrefixed(max_frame=max_frame)) as (client, server):
        await server.send(b"first")
        assert await client.recv() == b"first"
        reads = watch_reads(client)
        server.writer.write(HEADER.pack(max_frame) + b"x" * 10)
        receiving = asyncio.create_task(client.recv())
        await asyncio.sleep(0.1)
        assert not receiving.done()
        assert max(size for size, _ in reads) <= RECEIVE_BUFFER_SIZE  # not 64 MiB
        server.writer.close()
        with pytest.raises(IncompleteFrame) as info:
            await receiving
        assert info.value.missing == max_frame - 10


async def test_a_large_frame_cut_short_reports_the_bytes_that_came() -> None:
    big = b"z" * (2 * RECEIVE_BUFFER_SIZE + 12345)
    async with stream_pair(LengthPrefixed()) as (client, server):
        await server.send(b"first")
        assert await client.recv() == b"first"
        server.writer.write(HEADER.pack(len(big)) + big[: RECEIVE_BUFFER_SIZE + 7])
        await asyncio.sleep(0.05)  # the rest is being read into its own memory
        server.writer.close()
        with pytest.raises(IncompleteFrame, match=f"got {RECEIVE_BUFFER_SIZE + 7} of") as info:
            await client.recv()
        assert info.value.missing == len(big) - RECEIVE_BUFFER_SIZE - 7


# -- switching codecs with bytes in every state -------------------------------------------


@pytest.mark.parametrize("size", [10, 600, 5000])
async def test_switch_codec_hands_over_frames_decoded_ahead_and_reads_held(size: int) -> None:
    frames = [b"%06d" % n * (size // 6) for n in range(3000)]  # many reads
    async with stream_pair(LengthPrefixed()) as (client, server):
        sending = asyncio.create_task(server.send_many(frames))
        assert await client.recv() == frames[0]  # the rest of its read waits, decoded
        await asyncio.sleep(0.1)  # more reads arrive, held, while nothing is taken
        client.switch_codec(LengthPrefixed())
        assert [await client.recv() for _ in frames[1:]] == frames[1:]
        await sending


async def test_switch_codec_from_lines_to_binary_mid_read() -> None:
    frames = [b"%06d" % n * 100 for n in range(2000)]  # 1.2 MB, many reads
    async with stream_pair(
        Delimited(b"\n", max_frame=4 * 1024 * 1024), server_codec=LengthPrefixed()
    ) as (client, server):
        server.writer.write(b"switch\n")
        sending = asyncio.create_task(server.send_many(frames))
        assert await client.recv() == b"switch"
        await asyncio.sleep(0.1)  # the binary frames are read as one unfinished line
        client.switch_codec(LengthPrefixed())
        assert [await client.recv() for _ in frames] == frames
        await sending


async def test_switch_codec_during_a_large_frames_read_hands_over_its_bytes() -> None:
    async with stream_pair(LengthPrefixed(max_frame=8 * 1024 * 1024)) as (client, server):
        await server.send(b"first")
        assert await client.recv() == b"first"
        raw = HEADER.pack(4 * 1024 * 1024) + b"r" * (RECEIVE_BUFFER_SIZE * 2)
        server.writer.write(raw)  # a large frame, begun and not finished
        await asyncio.sleep(0.1)
        client.switch_codec(Delimited(b"\n", max_frame=8 * 1024 * 1024))
        server.writer.write(b"\n")
        assert await client.recv() == raw


async def test_switch_codec_with_a_large_frame_read_but_not_taken_hands_it_back_whole() -> None:
    big = bytes(range(256)) * (4 * RECEIVE_BUFFER_SIZE // 256)
    async with stream_pair(LengthPrefixed(max_frame=len(big))) as (client, server):
        await server.send(b"first")
        assert await client.recv() == b"first"
        await server.send_many([big, b"after"])
        await asyncio.sleep(0.1)  # read whole, while nobody takes it
        client.switch_codec(LengthPrefixed(max_frame=len(big)))
        assert [await client.recv(), await client.recv()] == [big, b"after"]


# -- other loops, memory -------------------------------------------------------------


async def test_on_uvloop_too() -> None:
    async def run() -> None:
        big = bytes(range(256)) * (4 * RECEIVE_BUFFER_SIZE // 256)
        async with stream_pair(LengthPrefixed(), limit=256 * 1024) as (client, server):
            server.writer.write(b"HI")
            assert await client.reader.readexactly(2) == b"HI"
            for _ in range(5):  # a read that begins with a large frame's header
                sending = asyncio.create_task(server.send(big))
                assert await client.recv() == big
                await sending
            frames = [b"x", big, b"y" * 5000, big, b""] * 10
            sending = asyncio.create_task(server.send_many(frames))
            await asyncio.sleep(0.05)  # uvloop's reads are then full: frames begin inside them
            assert [await client.recv() for _ in frames] == frames
            await sending

    await on_uvloop(run)  # its own loop, in a thread: the test's loop is asyncio's


#: The fault scripts' common part: ``feeding(chunk)`` starts a blocking thread
#: that sends 56 MB of ``chunk`` to the listener it returns; ``count(...)``
#: receives frames of ``size`` bytes after a warm-up and prints the MB
#: received and the minor page faults it took.
_FEED_AND_COUNT = """
import asyncio, resource, socket, sys, threading
from streamkit import EndOfStream
from streamkit.stream import StreamProtocol

TOTAL = 56 * 1024 * 1024

def feeding(chunk):
    listener = socket.create_server(("127.0.0.1", 0))
    def feed():
        connection, _ = listener.accept()
        with connection:
            for _ in range(TOTAL // len(chunk)):
                connection.sendall(chunk)
    thread = threading.Thread(target=feed)
    thread.start()
    return listener, thread

async def count(stream, size, warm_up, listener, thread):
    for _ in range(8 * 1024 * 1024 // warm_up):  # the heap grows once
        await stream.recv()
    received = 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        while True:
            received += len(await stream.recv_batch())
    except EndOfStream:
        pass
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    stream.close()
    await stream.wait_closed()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    listener.close()
    print(received * size / 1e6, faults)
"""

#: Receives 48 MB of frames of ``SIZE`` bytes from a blocking thread, through
#: StreamProtocol, and prints its minor page faults per MB (after a warm-up).
_FAULTS_SCRIPT = (
    _FEED_AND_COUNT
    + """
import struct
from streamkit import FramedStream, LengthPrefixed

SIZE = int(sys.argv[1])
FRAME = struct.pack(">I", SIZE) + b"f" * SIZE

async def main():
    listener, thread = feeding(FRAME * max(1, 256 * 1024 // len(FRAME)))
    sock = socket.socket()
    # Reads shorter than asyncio's 256 KiB, as when a receiver keeps up.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, listener.getsockname())
    reader, writer = await StreamProtocol.open(
        lambda protocol: loop.create_connection(protocol, sock=sock), limit=256 * 1024
    )
    stream = FramedStream(reader, writer, LengthPrefixed())
    await count(stream, SIZE, len(FRAME), listener, thread)

asyncio.run(main())
"""
)


def faults_per_mb(script: str, size: int) -> float:
    """Run a fault script in a fresh process with glibc's defaults: its minor faults per MB."""
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(size)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=True,
    )
    megabytes, faults = map(float, result.stdout.split())
    assert megabytes > 40
    return faults / megabytes


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="counts minor page faults under glibc's default malloc",
)
@pytest.mark.parametrize("size", [4096, 65536, 1024 * 1024])
def test_receiving_faults_no_memory_in_per_read(size: int) -> None:
    """glibc hands freed memory back to the kernel: a fresh allocation per read faults it in.

    Measured in a fresh process (what a process freed before decides
    glibc's thresholds), with glibc's defaults. The stock protocol's reads,
    a new bytes of up to 256 KiB and a StreamReader bytearray growing and
    shrinking, cost 250 to 400 minor faults per MB there; fresh memory for
    each 1 MiB frame's rest (no spare pieces), about 460.
    """
    per_mb = faults_per_mb(_FAULTS_SCRIPT, size)
    assert per_mb < 20, f"{per_mb:.0f} minor page faults per MB"


#: Line lengths around the reads' sizes (64 KiB, uvloop's 256 KiB) and beyond.
_LINE_SIZES = [0, 1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 262143, 262145, 700_000]
#: A reader limit that fits the longest line, as a line protocol's must.
_LONG_LINES_LIMIT = 4 * 1024 * 1024


def _lines_of_many_sizes(text: bool) -> list[Any]:
    lines = [(b"%d" % size * size)[:size] for size in _LINE_SIZES] * 3
    lines += [b"x" * (i % 9000) for i in range(300)]
    return [line.decode() for line in lines] if text else lines


@pytest.mark.parametrize(
    "codec",
    [Lines(max_frame=1024 * 1024), Delimited(max_frame=1024 * 1024), Delimited(b"\r\n", 1 << 20)],
    ids=["Lines", "Delimited", "Delimited-crlf"],
)
async def test_lines_of_many_sizes_split_across_reads_arrive_intact_on_uvloop(
    codec: Codec[Any],
) -> None:
    lines = _lines_of_many_sizes(isinstance(codec, Lines))

    async def run() -> None:
        async with stream_pair(codec, limit=_LONG_LINES_LIMIT) as (client, server):
            for taking in ("at once", "late"):
                sending = asyncio.create_task(server.send_many(lines))
                if taking == "late":
                    await asyncio.sleep(0.05)  # the reads come while nobody takes them
                assert [await client.recv() for _ in lines] == lines
                await sending

    await on_uvloop(run)


async def test_held_reads_are_bounded_below_a_large_limit_on_uvloop() -> None:
    """uvloop reads many times in a row: what is held for frames not taken stops at _MAX_HELD."""
    lines = [b"%05d" % i + b"y" * 4000 for i in range(1000)]  # 4 MB, in reads of 64 KiB

    async def run() -> None:
        codec = Delimited(max_frame=64 * 1024)
        async with stream_pair(codec, limit=_LONG_LINES_LIMIT) as (client, server):
            sending = asyncio.create_task(server.send_many(lines))
            assert await client.recv() == lines[0]  # the rest of its read waits: more is held
            receiver = client._receiver
            assert receiver is not None
            await wait_until(lambda: receiver._paused)
            assert 0 < receiver._held_bytes <= _MAX_HELD + RECEIVE_BUFFER_SIZE
            assert [await client.recv() for _ in lines[1:]] == lines[1:]
            await sending
            assert not receiver._paused

    await on_uvloop(run)


#: Receives 48 MB of 4 KiB or 64 KiB text lines from a blocking thread on uvloop,
#: with a limit that fits long lines, and prints its minor page faults per MB.
_LINES_FAULTS_SCRIPT = (
    _FEED_AND_COUNT
    + """
import uvloop
from streamkit import FramedStream, Lines

SIZE = int(sys.argv[1])

async def main():
    listener, thread = feeding((b"l" * (SIZE - 1) + b"\\n") * max(1, 1024 * 1024 // SIZE))
    loop = asyncio.get_running_loop()
    reader, writer = await StreamProtocol.open(
        lambda protocol: loop.create_connection(protocol, *listener.getsockname()),
        limit=4 * 1024 * 1024,
    )
    stream = FramedStream(reader, writer, Lines(max_frame=1024 * 1024))
    await count(stream, SIZE, SIZE, listener, thread)

uvloop.run(main())
"""
)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="counts minor page faults under glibc's default malloc",
)
@pytest.mark.parametrize("size", [4096, 65536])
def test_receiving_lines_on_uvloop_faults_no_memory_in_per_read(size: int) -> None:
    """uvloop's runs of reads, held while frames wait, must not come and go in bursts.

    Held up to a 4 MiB limit, they cost 160 to 240 minor faults per MB
    (glibc trimming the heap and faulting it in again); held to 256 KiB,
    about 3.
    """
    pytest.importorskip("uvloop")
    per_mb = faults_per_mb(_LINES_FAULTS_SCRIPT, size)
    assert per_mb < 20, f"{per_mb:.0f} minor page faults per MB"


# -- unframed bytes ------------------------------------------------------------------------


@pytest.mark.parametrize("reading", ["streamkit", "asyncio"])
async def test_recv_data_hands_over_every_byte_not_yet_returned_then_reads_unframed(
    reading: str,
) -> None:
    async with stream_pair(LengthPrefixed(), reading=reading) as (client, server):
        server.writer.write(framed(b"hello", b"ahead") + b"raw bytes")
        assert await client.recv() == b"hello"
        data = b""
        while len(data) < len(framed(b"ahead") + b"raw bytes"):
            data += await client.recv_data()
        assert data == framed(b"ahead") + b"raw bytes"  # the frame decoded ahead, as bytes
        big = bytes(range(256)) * 4096
        server.writer.write(big)
        got = b""
        while len(got) < len(big):
            got += await client.recv_data()
        assert got == big
        await client.send(b"framed still")  # sending keeps the codec
        assert await server.recv() == b"framed still"
        server.writer.write_eof()
        assert await client.recv_data() == b""
        assert await client.recv_data() == b""


@pytest.mark.parametrize("reading", ["streamkit", "asyncio"])
async def test_recv_decoded_feeds_a_decoder_of_the_callers_every_byte_not_yet_returned(
    reading: str,
) -> None:
    async with stream_pair(LengthPrefixed(), reading=reading) as (client, server):
        server.writer.write(framed(b"hello", b"ahead") + b"\x00\x00\x00\x02hi")
        assert await client.recv() == b"hello"
        # A decoder of the caller's own: "ahead", decoded by the stream already, comes again.
        decoder = LengthPrefixed().decoder()
        got: list[bytes] = []
        while len(got) < 2:
            got += await client.recv_decoded(decoder)
        assert got == [b"ahead", b"hi"]
        large = bytes(range(256)) * 4096  # 1 MiB: its rest read in one piece
        server.writer.write(framed(large, b"after"))
        got = []
        while len(got) < 2:
            got += await client.recv_decoded(decoder)
        assert got == [large, b"after"]
        await client.send(b"framed still")  # sending keeps the codec
        assert await server.recv() == b"framed still"
        server.writer.write(b"\x00\x00")
        server.writer.write_eof()
        with pytest.raises(IncompleteFrame):  # the decoder's end: inside a frame
            await client.recv_decoded(decoder)


async def test_recv_decoded_returns_nothing_at_a_clean_end() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        server.writer.write_eof()
        assert await client.recv_decoded(LengthPrefixed().decoder()) == []


# -- deliver: decoded items to a callback, in the read callback ------------------------------


class Delivery:
    """What ``FramedStream.deliver`` hands over: items, whether a task was running, the end."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.in_task: list[bool] = []
        self.ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def received(self, items: list[Any]) -> None:
        assert items, "never called with nothing"
        assert not self.ended.done(), "called after ended"
        self.items += items
        self.in_task.append(asyncio.current_task() is not None)

    def end(self, error: BaseException) -> None:
        assert not self.ended.done(), "ended twice"
        self.ended.set_result(error)

    async def until(self, count: int) -> None:
        await wait_until(lambda: len(self.items) >= count or self.ended.done())


@pytest.mark.parametrize("reading", ["streamkit", "asyncio"])
async def test_deliver_hands_first_then_everything_not_returned_then_each_read_in_order(
    reading: str,
) -> None:
    async with stream_pair(LengthPrefixed(), reading=reading) as (client, server):
        server.writer.write(framed(b"hello", b"ahead") + b"\x00\x00\x00\x02h")
        assert await client.recv() == b"hello"  # "ahead" and "h" are received, not returned
        delivery = Delivery()
        client.deliver(
            LengthPrefixed().decoder(), delivery.received, delivery.end, first=framed(b"first")
        )
        assert delivery.items == []  # from the next loop turn on
        server.writer.write(b"i" + framed(*(b"%d" % n for n in range(1000))))
        large = bytes(range(256)) * 4096  # 1 MiB: its rest read into memory of its own
        server.writer.write(framed(large, b"after"))
        await delivery.until(1005)
        assert delivery.items == [
            b"first",
            b"ahead",
            b"hi",
            *(b"%d" % n for n in range(1000)),
            large,
            b"after",
        ]
        with pytest.raises(RuntimeError, match="receiving"):
            await client.recv()
        with pytest.raises(RuntimeError, match="receiving"):
            client.deliver(LengthPrefixed().decoder(), delivery.received, delivery.end)
        await client.send(b"framed still")  # sending keeps the codec
        assert await server.recv() == b"framed still"
        server.writer.write_eof()
        assert isinstance(await asyncio.wait_for(delivery.ended, 5), EndOfStream)
        assert delivery.items[-1] == b"after"
        if reading == "streamkit":
            assert not any(delivery.in_task)  # in the read callback: no task woken per read
        else:
            assert all(delivery.in_task)  # another protocol's reader is read by a task


async def test_deliver_before_the_first_receive_takes_the_readers_bytes_after_first() -> None:
    async with stream_pair(LengthPrefixed()) as (client, server):
        server.writer.write(framed(b"in the reader"))
        await asyncio.sleep(0.05)  # read by the reader: no receive has taken the bytes yet
        delivery = Delivery()
        client.deliver(
            LengthPrefixed().decoder(), delivery.received, delivery.end, first=framed(b"first")
        )
        await delivery.until(2)
        server.writer.write(framed(b"then"))
        await delivery.until(3)
        assert delivery.items == [b"first", b"in the reader", b"then"]
        assert delivery.in_task[-1] is False  # taken over: reads come in the read callback


@pytest.mark.parametrize("reading", ["streamkit", "asyncio"])
@pytest.mark.parametrize(
    ("ending", "error"),
    [
        (b"\x00\x00", IncompleteFrame),  # the end inside a header
        (b"\x00\x00\x00\x09part", IncompleteFrame),  # and inside a payload
        (b"\x7f\xff\xff\xff", FrameTooLarge),  # the decoder's error: after the frames before it
    ],
)
async def test_deliver_ends_with_the_decoders_error_after_the_items_before_it(
    reading: str, ending: bytes, error: type[Exception]
) -> None:
    async with stream_pair(LengthPrefixed(), reading=reading) as (client, server):
        delivery = Delivery()
        client.deliver(LengthPrefixed().decoder(), delivery.received, delivery.end)
        server.writer.write(framed(b"a", b"b") + ending)
        server.writer.write_eof()
        assert isinstance(await asyncio.wait_for(delivery.ended, 5), error)
        assert delivery.items == [b"a", b"b"]


@pytest.mark.parametrize("reading", ["streamkit", "asyncio"])
async def test_deliver_ends_with_connection_lost_on_a_reset(reading: str) -> None:
    async with stream_pair(LengthPrefixed(), reading=reading) as (client, server):
        delivery = Delivery()
        client.deliver(LengthPrefixed().decoder(), delivery.received, delivery.end)
        server.writer.write(framed(b"before"))
        await delivery.until(1)
        sock = server.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.writer.transport.abort()  # an RST
        assert isinstance(await asyncio.wait_for(delivery.ended, 5), ConnectionLost)
        assert delivery.items == [b"before"]


@pytest.mark.parametrize("reading", ["streamkit", "asyncio"])
async def test_an_error_the_callback_raises_ends_the_delivery_with_it(reading: str) -> None:
    async with stream_pair(LengthPrefixed(), reading=reading) as (client, server):
        delivery = Delivery()

        def refuse(items: list[bytes]) -> None:
            delivery.received(items)
            if b"bad" in items:
                raise ProtocolError("a bad item")

        client.deliver(LengthPrefixed().decoder(), refuse, delivery.end)
        server.writer.write(framed(b"good", b"bad", b"never"))
        ended = await asyncio.wait_for(delivery.ended, 5)
        assert isinstance(ended, ProtocolError)
        assert str(ended) == "a bad item"
        server.writer.write(framed(b"later"))
        await asyncio.sleep(0.05)
        assert b"later" not in delivery.items  # nothing after ended
        assert not client.is_closing()  # closing is the caller's


@pytest.mark.parametrize("reading", ["recv", "deliver"])
async def test_large_frames_read_into_reused_memory_each_arrive_intact(reading: str) -> None:
    """The memory a large frame's rest was read into serves the next ones: never a byte mixed."""
    sizes = [1024 * 1024, 700 * 1024, 3 * 1024 * 1024, 300 * 1024] * 3
    payloads = [bytes([n]) * (size - 1) + b"!" for n, size in enumerate(sizes)]
    async with stream_pair(LengthPrefixed()) as (client, server):
        got: list[bytes] = []
        if reading == "recv":
            server.writer.write(framed(*payloads))
            while len(got) < len(payloads):
                got.append(await client.recv())
        else:
            delivery = Delivery()
            client.deliver(LengthPrefixed().decoder(), delivery.received, delivery.end)
            server.writer.write(framed(*payloads))
            await delivery.until(len(payloads))
            got = delivery.items
        assert [len(payload) for payload in got] == [len(payload) for payload in payloads]
        assert got == payloads
