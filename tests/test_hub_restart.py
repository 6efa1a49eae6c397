"""Hubs killed (SIGKILL) and restarted: what is kept, and what their clients see."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamkit import hub
from streamkit.errors import ConnectionLost, SessionError, StreamkitError
from streamkit.session import Backoff, ClientSession, SessionOptions, SessionSettings

SERVER = """
import asyncio, os, signal, sys
from streamkit import hub

async def main():
    data_dir, port, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    server = await hub.serve_hub("127.0.0.1", port, data_dir=data_dir or None)
    if crash_at >= 0:
        produce = server.storage.produce

        async def produce_then_crash(name, records, producer, epoch, seq):
            produced = await produce(name, records, producer, epoch, seq)
            if seq == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)  # appended, never acknowledged
            return produced

        server.storage.produce = produce_then_crash
    print(server.port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class _ClientOptions(SessionOptions, total=False):
    """``hub.connect`` keywords: the session options and ``reconnect_timeout``."""

    reconnect_timeout: float


#: Clients that retry fast, so a restart costs them little time.
FAST: _ClientOptions = {
    "keepalive_interval": 0.2,
    "keepalive_timeout": 0.6,
    "ack_delay": 0.002,
    "reconnect_backoff": Backoff(initial=0.01, maximum=0.1),
    "reconnect_timeout": 20.0,
}


class HubProcess:
    """A hub in a subprocess (in memory without ``data_dir``), restarted on its port.

    ``crash_at``: see SERVER. ``async with`` starts it and kills it on the way out.
    """

    def __init__(self, data_dir: Path | None, *, crash_at: int = -1) -> None:
        self.data_dir = data_dir
        self.crash_at = crash_at
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *, crash_at: int | None = None) -> HubProcess:
        """Start the hub (again, on the same port)."""
        where = "" if self.data_dir is None else str(self.data_dir)
        crash = self.crash_at if crash_at is None else crash_at
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SERVER,
            where,
            str(self.port),
            str(crash),
            stdout=asyncio.subprocess.PIPE,
        )
        self.process = process
        assert process.stdout is not None
        self.port = int(await asyncio.wait_for(process.stdout.readline(), 20))
        return self

    @property
    def running(self) -> asyncio.subprocess.Process:
        assert self.process is not None
        return self.process

    async def kill(self) -> None:
        process = self.running
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.wait()

    async def restart(self) -> None:
        """Kill the hub and start it again on its port."""
        await self.kill()
        await self.start(crash_at=-1)

    async def __aenter__(self) -> HubProcess:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None:
            await self.kill()


async def until(event: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    """Wait for ``event``; raise the error of any of ``tasks`` that fails first."""
    waiting = asyncio.create_task(event.wait())
    await asyncio.wait({waiting, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    for task in tasks:
        if task.done():
            task.result()


async def detached(session: ClientSession) -> None:
    """Wait until ``session`` has noticed its connection is gone.

    Polled: the session has no event for it.
    """
    for _ in range(2000):
        if not session.connected:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{session} still has its connection")


async def test_killed_hub_serves_every_acknowledged_record_after_restart(tmp_path: Path) -> None:
    acknowledged: dict[int, bytes] = {}
    enough = asyncio.Event()
    async with HubProcess(tmp_path) as hub_process:
        async with hub.connect("127.0.0.1", hub_process.port, reconnect_timeout=0.5) as client:
            await client.create("log")

            async def append_forever() -> None:
                n = 0
                while True:
                    data = b"record %d " % n + b"x" * (n % 700)
                    offset = await client.append_many("log", [data])
                    acknowledged[offset] = data
                    n += 1
                    if n == 300:
                        enough.set()

            appender = asyncio.create_task(append_forever())
            await enough.wait()
            await hub_process.kill()  # mid-append: requests are in flight
            with pytest.raises(StreamkitError):  # the session fails: its server is gone
                await appender

        await hub_process.start()
        async with hub.connect("127.0.0.1", hub_process.port) as client:
            status = await client.status("log")
            assert status is not None
            async with client.read("log", 0) as reader:
                records = [record async for record in reader]
        assert len(records) == status.next_offset
        assert len(records) >= len(acknowledged) >= 300
        for record in records:
            assert record.data.startswith(b"record %d " % record.offset)  # nothing corrupt
        for offset, data in acknowledged.items():
            assert records[offset].data == data


async def test_a_live_reader_and_a_producer_ride_over_hub_restarts(tmp_path: Path) -> None:
    # The first hub dies right after appending the producer's batch 20 and
    # before acknowledging it: the producer sends that batch again to the
    # next hub, which must drop it. The second is killed while records flow.
    total = 600
    async with HubProcess(tmp_path, crash_at=20) as hub_process:
        port = hub_process.port
        async with (
            hub.connect("127.0.0.1", port, **FAST) as tail,
            hub.connect("127.0.0.1", port, **FAST) as writer,
        ):
            await writer.create("log")
            first_sessions = (tail.session, writer.session)
            reader = tail.read("log", 0, live=True, window=2000)
            seen: list[hub.Record] = []
            enough = asyncio.Event()

            async def collect() -> None:
                async for record in reader:
                    seen.append(record)
                    if len(seen) == 400:
                        enough.set()

            async def produce() -> None:
                producer = writer.producer("log", "p", linger=0.001, max_batch_bytes=64)
                async with producer:
                    for n in range(total):
                        producer.append_nowait(b"p%d" % n)
                        if n % 20 == 19:
                            await producer.flush()  # paced by the hub: a kill cuts batches
                await writer.finish("log")

            collecting = asyncio.create_task(collect())
            producing = asyncio.create_task(produce())
            await hub_process.running.wait()  # the crash after batch 20
            await hub_process.start(crash_at=-1)
            await until(enough, producing, collecting)
            await hub_process.restart()  # records are flowing
            await asyncio.gather(producing, collecting)
            assert tail.session is not first_sessions[0]
            assert writer.session is not first_sessions[1]
        expected = [b"p%d" % n for n in range(total)]
        assert [record.data for record in seen] == expected  # each once, in order
        assert [record.offset for record in seen] == list(range(total))
        assert reader.finished
        async with (
            hub.connect("127.0.0.1", port, **FAST) as client,
            client.read("log", 0) as again,
        ):
            assert [record.data async for record in again] == expected  # no duplicate
    storage = hub.FileStorage(tmp_path)  # the log itself, read back
    try:
        info = await storage.get("log")
        assert info is not None and info.finished and info.next_offset == total
        assert (await storage.read("log", 0, total, 1 << 20)).records == expected
    finally:
        await storage.close()


async def test_a_plain_call_in_flight_when_the_hub_restarts_has_an_unknown_outcome(
    tmp_path: Path,
) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            hub_process.running.send_signal(signal.SIGSTOP)  # it takes requests and never answers
            in_flight = asyncio.create_task(client.append("s", b"maybe"))
            await asyncio.sleep(0)  # written to the connection
            assert client.session.connected and len(client._pending) == 1
            await hub_process.kill()
            await detached(client.session)
            # Sent while the session resumes, never written to a connection:
            # these go out again on the new session.
            later = asyncio.create_task(client.append("s", b"later"))
            asking = asyncio.create_task(client.status("s"))
            await asyncio.sleep(0)
            assert len(client._pending) == 3
            await hub_process.start()
            with pytest.raises(ConnectionLost, match="append of stream 's' was in flight") as lost:
                await in_flight
            assert "whether the hub applied it is unknown" in str(lost.value)
            assert await later == 0  # the stopped hub never applied "maybe"
            status = await asking
            assert status is not None
            assert await client.append("s", b"sure") == 1  # later calls go on


async def test_a_reader_of_a_memory_hub_that_restarted_finds_no_such_stream() -> None:
    async with HubProcess(None) as hub_process:
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            await client.append("s", b"r0")
            async with client.read("s", 0, live=True) as reader:
                assert (await anext(reader)).data == b"r0"
                await hub_process.kill()
                await hub_process.start()
                with pytest.raises(hub.StreamNotFound, match=r"no stream named 's'.*data_dir"):
                    await anext(reader)
                assert reader.next_offset == 1


async def test_a_client_whose_hub_never_comes_back_fails_after_reconnect_timeout(
    tmp_path: Path,
) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        options: _ClientOptions = {**FAST, "reconnect_timeout": 0.5}
        async with hub.connect("127.0.0.1", port, **options) as client:
            await client.create("s")
            reader = client.read("s", 0, live=True)
            producer = client.producer("s", "p")
            await client.append("s", b"r0")
            assert (await anext(reader)).data == b"r0"
            await hub_process.kill()
            producer.append_nowait(b"lost")
            asking = asyncio.create_task(client.status("s"))
            for waiting in (anext(reader), producer.flush(), asking):
                with pytest.raises(ConnectionLost, match=r"reconnect_timeout=0\.5 s"):
                    await waiting
            with pytest.raises(ConnectionLost, match="could not open a new session"):
                await client.append("s", b"later")  # at once


@pytest.mark.timeout(20)
async def test_flush_after_the_hub_died_raises_instead_of_spinning() -> None:
    # The reproduction of issue 10 with the hub command. The batch is in
    # flight when the client gives up: its delivery task ends in the loop
    # step that also wakes the reader, so flush() runs before that task's
    # done-callbacks do. On 3.12+, gather() of a done task does not yield:
    # a loop on it spun at 100% CPU, deaf even to wait_for's timer.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamkit", "hub", "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        found = re.search(rb":(\d+)\b", line)
        assert found is not None, f"the hub printed no port: {line!r}"
        async with hub.connect("127.0.0.1", int(found[1]), reconnect_timeout=0.5) as client:
            await client.create("s")
            reader = client.read("s", 0, live=True)
            producer = client.producer("s", "p")
            await client.append("s", b"r0")
            assert (await anext(reader)).data == b"r0"
            process.send_signal(signal.SIGKILL)
            await process.wait()
            producer.append_nowait(b"lost")
            with pytest.raises(ConnectionLost, match=r"reconnect_timeout=0\.5 s"):
                await anext(reader)
            with pytest.raises(ConnectionLost, match=r"reconnect_timeout=0\.5 s"):
                await asyncio.wait_for(producer.flush(), 6)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def test_a_bad_reconnect_timeout_raises_at_the_call() -> None:
    with pytest.raises(TypeError, match="reconnect_timeout must be a number"):
        hub.connect("127.0.0.1", 1, reconnect_timeout="1")  # type: ignore[arg-type]
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="reconnect_timeout must be a finite number"):
            hub.connect("127.0.0.1", 1, reconnect_timeout=bad)


async def test_readers_of_every_kind_continue_after_a_restart(tmp_path: Path) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("j", content_type="application/json")
            await client.create("k")
            await client.append_many("j", [b'{"n": %d}' % n for n in range(50)])
            plain = client.read("j", 0, window=64)  # not live, mid-read at the kill
            values = client.read_json("j", 10, live=True)
            now = client.read("k", "now", live=True)
            assert (await anext(plain)).offset == 0
            assert await anext(values) == (10, {"n": 10})
            later = asyncio.create_task(anext(now))
            await hub_process.kill()
            await hub_process.start()
            assert await client.status("k") is not None  # asked again on the new session
            await client.append("k", b"new")
            assert await later == (0, b"new")
            assert [record.offset async for record in plain] == list(range(1, 50))
            rest = [await anext(values) for _ in range(11, 50)]
            assert rest == [(n, {"n": n}) for n in range(11, 50)]
            await values.aclose()
            await now.close()


async def test_a_resumable_stream_and_its_reader_ride_over_a_restart(tmp_path: Path) -> None:
    items: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def source() -> AsyncIterator[bytes]:
        while (item := await items.get()) is not None:
            yield item

    async with (
        HubProcess(tmp_path) as hub_process,
        hub.connect("127.0.0.1", hub_process.port, **FAST) as client,
    ):
        reader = await client.resumable("gen", source())
        for n in range(10):
            items.put_nowait(b"item %d" % n)
        seen = [await anext(reader) for _ in range(10)]
        await hub_process.kill()
        for n in range(10, 20):
            items.put_nowait(b"item %d" % n)  # appended through the restart
        await hub_process.start()
        items.put_nowait(None)  # the source ends: its stream is finished
        seen += [record async for record in reader]
        assert reader.finished
        assert [record.data for record in seen] == [b"item %d" % n for n in range(20)]
        assert [record.offset for record in seen] == list(range(20))
        status = await client.status("gen")
        assert status is not None and status.finished and status.next_offset == 20


async def test_reconnect_timeout_is_the_sessions_max_reconnect_time_unless_given() -> None:
    async with await hub.serve_hub("127.0.0.1", 0) as server:
        port = server.port
        async with hub.connect("127.0.0.1", port, reconnect_timeout=7) as client:
            assert client.reconnect_timeout == 7
            assert client.session.settings.max_reconnect_time == 7
        async with hub.connect("127.0.0.1", port, max_reconnect_time=3) as client:
            assert client.reconnect_timeout == 60
            assert client.session.settings.max_reconnect_time == 3
        settings = SessionSettings(max_reconnect_time=4)
        async with hub.connect("127.0.0.1", port, settings=settings) as client:
            assert client.session.settings.max_reconnect_time == 4


async def test_a_hub_closed_and_served_again_on_its_port_is_invisible_to_a_reader(
    tmp_path: Path,
) -> None:
    server = await hub.serve_hub("127.0.0.1", 0, data_dir=tmp_path, grace_period=0.2)
    port = server.port
    try:
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            await client.append("s", b"a")
            async with client.read("s", 0, live=True) as reader:
                assert (await anext(reader)).data == b"a"
                first = client.session
                server.close()
                await server.wait_closed()
                server = await hub.serve_hub("127.0.0.1", port, data_dir=tmp_path)
                status = await client.status("s")
                assert status is not None and status.next_offset == 1
                await client.append("s", b"b")
                assert await anext(reader) == (1, b"b")
                assert client.session is not first
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_a_client_whose_hub_is_down_does_not_wait_for_it(tmp_path: Path) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        # It would try to resume for a minute, longer than the test may take.
        patient: _ClientOptions = {**FAST, "reconnect_timeout": 60}
        client = await hub.connect("127.0.0.1", port, **patient)
        await client.create("s")
        await hub_process.kill()
        await detached(client.session)
        asking = asyncio.create_task(client.status("s"))
        await asyncio.sleep(0)
        await client.close()  # within the test's timeout, not close_timeout (30 s)
        with pytest.raises(SessionError, match="closed"):
            await asking
        with pytest.raises(SessionError, match="the hub client is closed"):
            await client.append("s", b"late")


async def test_a_reader_whose_stream_came_back_shorter_fails_instead_of_skipping(
    tmp_path: Path,
) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            await client.append_many("s", [b"r0", b"r1", b"r2"])
            # A reader from offset 3 that has yielded nothing has no records
            # to name when it asks again: the stream's length is checked.
            async with client.read("s", 3, live=True) as reader:
                waiting = asyncio.create_task(anext(reader))
                await asyncio.sleep(0.05)
                assert reader._caught_up and reader._after() is None
                await hub_process.kill()
                storage = hub.FileStorage(tmp_path)  # meanwhile, "s" is made anew
                await storage.delete("s")
                await storage.create("s", ttl=None, content_type=None)
                await storage.append("s", [b"new"])
                await storage.close()
                await hub_process.start()
                with pytest.raises(hub.StreamGone, match=r"holds 1 records .* fewer than the 3"):
                    await waiting


async def test_a_reader_whose_records_were_lost_and_rewritten_fails_instead_of_reading_others(
    tmp_path: Path,
) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            for n in range(3):
                await client.append("s", b"r%d" % n)
            kept = log_size(tmp_path)  # the log holds r0..r2
            await client.append_many("s", [b"r3", b"r4"])
            async with client.read("s", 0, live=True) as reader:
                assert [(await anext(reader)).data for _ in range(5)] == [
                    b"r%d" % n for n in range(5)
                ]
                await hub_process.kill()
                # The hub lost its last append (as a log without fsync can in a
                # power loss), then took others at the same offsets: the stream
                # is as long as before, but r3 and r4 are not in it any more.
                cut_log(tmp_path, kept)
                storage = hub.FileStorage(tmp_path)
                await storage.append("s", [b"x3", b"x4"])
                await storage.close()
                await hub_process.start()
                with pytest.raises(hub.StreamGone, match="no longer holds the records"):
                    await anext(reader)  # never x3: not the record after r4
                assert reader.next_offset == 5


def log_size(data_dir: Path) -> int:
    (path,) = data_dir.glob("*.log")
    return path.stat().st_size


def cut_log(data_dir: Path, size: int) -> None:
    (path,) = data_dir.glob("*.log")
    os.truncate(path, size)


async def test_a_reader_whose_stream_was_made_anew_and_longer_fails_too(tmp_path: Path) -> None:
    async with HubProcess(tmp_path) as hub_process:
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            await client.append_many("s", [b"r0", b"r1"])
            async with client.read("s", 0, live=True) as reader:
                assert [(await anext(reader)).data for _ in range(2)] == [b"r0", b"r1"]
                await hub_process.kill()
                storage = hub.FileStorage(tmp_path)  # meanwhile, "s" is made anew, longer
                await storage.delete("s")
                await storage.create("s", ttl=None, content_type=None)
                await storage.append("s", [b"n0", b"n1", b"n2", b"n3"])
                await storage.close()
                await hub_process.start()
                with pytest.raises(hub.StreamGone, match="deleted and created again"):
                    await anext(reader)  # not b"n2"


async def test_a_batch_that_crashes_every_hub_fails_after_three_sessions(tmp_path: Path) -> None:
    async with HubProcess(tmp_path, crash_at=0) as hub_process:  # every hub dies on batch 0
        port = hub_process.port
        async with hub.connect("127.0.0.1", port, **FAST) as client:
            await client.create("s")
            producer = client.producer("s", "p")
            producer.append_nowait(b"poison")
            flushing = asyncio.create_task(producer.flush())
            for _ in range(3):
                await hub_process.running.wait()
                await hub_process.start()
            with pytest.raises(ConnectionLost, match="in flight on 3 sessions in a row"):
                await flushing
            status = await client.status("s")  # the client goes on
            assert status is not None and status.next_offset == 1  # appended once
