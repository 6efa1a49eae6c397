"""Hubs on one Redis: any hub serves any stream, and a hub or Redis dying loses nothing.

Hub processes are real subprocesses killed with SIGKILL; clients reach them
through a :class:`~streamkit.testing.Balancer`, as through a load balancer.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from streamkit import hub
from streamkit.hub.redis import RedisStorage
from streamkit.testing import Balancer, FaultProxy
from tests._redis import RedisServer, redis_storage
from tests.test_cli import CLI, running, stop
from tests.test_hub_restart import FAST  # clients that notice a dead hub and retry fast

SERVER = """
import asyncio, sys
from streamkit import hub
from streamkit.hub.redis import RedisStorage

async def main():
    url, prefix, port, recheck = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    storage = RedisStorage.from_url(url, prefix=prefix, timeout=2.0, recheck_interval=recheck)
    server = await hub.serve_hub("127.0.0.1", port, storage=storage)
    print(server.port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class HubOnRedis:
    """A hub subprocess on the Redis at ``url`` (deployment ``prefix``), restartable on its port."""

    def __init__(self, url: str, prefix: str, *, recheck_interval: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.recheck_interval = recheck_interval
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> HubOnRedis:
        self.process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", SERVER, self.url, self.prefix, str(self.port)),
            str(self.recheck_interval),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.port = int(await asyncio.wait_for(self.process.stdout.readline(), 20))
        return self

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def __aenter__(self) -> HubOnRedis:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None:
            await self.kill()


@asynccontextmanager
async def hub_on(url: str, prefix: str, **options: object) -> AsyncIterator[hub.HubServer]:
    """A hub in this process on its own RedisStorage (as a hub process would have)."""
    storage = RedisStorage.from_url(url, prefix=prefix, **options)  # type: ignore[arg-type]
    server = await hub.serve_hub("127.0.0.1", 0, storage=storage)
    async with server:
        yield server


async def test_a_record_appended_through_one_hub_is_read_live_through_another(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    # recheck_interval is long: the readers must be woken by the notification.
    url, slow = redis_server.url, {"recheck_interval": 60.0}
    async with (
        HubOnRedis(url, redis_prefix, **slow) as one,
        HubOnRedis(url, redis_prefix, **slow) as two,
        HubOnRedis(url, redis_prefix, **slow) as three,
        hub.connect("127.0.0.1", one.port) as writer,
        hub.connect("127.0.0.1", two.port) as tail,
        hub.connect("127.0.0.1", three.port) as other,
    ):
        await writer.create("s")
        async with tail.read("s", 0, live=True) as reader, other.read("s", 0, live=True) as third:
            for n in range(20):
                await writer.append("s", b"r%d" % n)
                async with asyncio.timeout(5):
                    assert await anext(reader) == (n, b"r%d" % n)
                    assert await anext(third) == (n, b"r%d" % n)
            await writer.finish("s")
            async with asyncio.timeout(5):
                assert [record async for record in reader] == []
            assert reader.finished
        status = await other.status("s")
        assert status is not None and status.finished and status.next_offset == 20


async def test_a_lost_notification_costs_a_live_reader_a_recheck_interval_not_a_record(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with FaultProxy(target_unix=redis_server.socket_path) as proxy:
        deaf_url = f"redis://127.0.0.1:{proxy.port}/0"
        async with (
            hub_on(redis_server.url, redis_prefix) as one,
            hub_on(deaf_url, redis_prefix, recheck_interval=0.2, timeout=30.0) as two,
            hub.connect("127.0.0.1", one.port) as writer,
            hub.connect("127.0.0.1", two.port) as tail,
        ):
            await writer.create("s")
            async with tail.read("s", 0, live=True) as reader:
                await writer.append("s", b"first")
                assert await anext(reader) == (0, b"first")
                proxy.blackhole("down")  # hub two hears nothing from Redis now
                await writer.append("s", b"second")
                await asyncio.sleep(0.5)
                proxy.restore()
                # Heard by the re-check once Redis answers again, not by a notification.
                async with asyncio.timeout(5):
                    assert await anext(reader) == (1, b"second")


async def test_an_idempotent_producer_and_a_live_reader_ride_over_hubs_killed_behind_a_balancer(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    total = 50_000
    async with (
        HubOnRedis(redis_server.url, redis_prefix) as first,
        HubOnRedis(redis_server.url, redis_prefix) as second,
        Balancer([("127.0.0.1", first.port), ("127.0.0.1", second.port)]) as balancer,
    ):
        hubs = [first, second]
        # Round robin: the producer's client lands on hub 0, the reader's on hub 1.
        async with (
            hub.connect("127.0.0.1", balancer.port, **FAST) as writer,
            hub.connect("127.0.0.1", balancer.port, **FAST) as tail,
        ):
            assert balancer.connections_to(0) == balancer.connections_to(1) == 1
            await writer.create("numbers")
            seen: list[hub.Record] = []
            reached = {n: asyncio.Event() for n in (15_000, 35_000)}

            async def collect() -> None:
                async with tail.read("numbers", 0, live=True) as reader:
                    async for record in reader:
                        seen.append(record)
                        if len(seen) in reached:
                            reached[len(seen)].set()
                        if len(seen) == total:
                            return

            produced = asyncio.Event()

            async def produce() -> None:
                async with writer.producer("numbers", "p", linger=0.002) as producer:
                    for n in range(total):
                        producer.append_nowait(b"%d" % n)
                        if n % 500 == 499:
                            await asyncio.sleep(0.002)  # records flow while hubs die
                    await producer.flush()
                produced.set()

            collecting = asyncio.create_task(collect())
            producing = asyncio.create_task(produce())
            try:
                async with asyncio.timeout(60):
                    await reached[15_000].wait()
                    assert not produced.is_set()
                    await hubs[0].kill()  # the producer's hub, mid-run
                    await hubs[0].start()  # back on its port, for the next failover
                    await reached[35_000].wait()
                    await hubs[1].kill()  # the reader's hub (the producer's too by now)
                    await asyncio.gather(producing, collecting)
            finally:
                for task in (producing, collecting):
                    task.cancel()
                await asyncio.gather(producing, collecting, return_exceptions=True)
            assert produced.is_set()  # flush() succeeded
            assert [record.offset for record in seen] == list(range(total))
            assert [record.data for record in seen] == [b"%d" % n for n in range(total)]
            status = await writer.status("numbers")
            assert status is not None and status.next_offset == total
            assert balancer.stats.forwarded[0] >= 2  # clients did move between hubs

    # The stream itself holds each record once.
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        batch = await storage.read("numbers", 0, total + 1, 1 << 30)
        assert batch.records == [b"%d" % n for n in range(total)]


async def test_every_acknowledged_record_survives_redis_killed_and_restarted(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    acknowledged: dict[int, bytes] = {}
    try:
        async with (
            hub_on(server.url, "aof", timeout=1.0) as hub_server,
            hub.connect("127.0.0.1", hub_server.port) as client,
        ):
            await client.create("log")
            enough = asyncio.Event()
            failed = asyncio.Event()

            async def append_until_it_fails() -> None:
                n = 0
                while True:
                    data = b"record %d " % n + b"x" * (n % 300)
                    try:
                        offset = await client.append_many("log", [data, data + b"!"])
                    except hub.HubError:
                        failed.set()
                        return
                    acknowledged[offset] = data
                    acknowledged[offset + 1] = data + b"!"
                    n += 1
                    if n == 300:
                        enough.set()

            appending = asyncio.create_task(append_until_it_fails())
            await enough.wait()
            server.kill()  # appends are in flight
            async with asyncio.timeout(10):
                await failed.wait()
            await appending
            server.start()  # the same AOF
            # The hub was never restarted: it reconnects to Redis by itself.
            deadline = time.monotonic() + 10
            while True:
                try:
                    status = await client.status("log")
                    break
                except hub.HubError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            assert status is not None and status.next_offset >= len(acknowledged) >= 600
            async with client.read("log", 0) as reader:
                records = [record async for record in reader]
            assert len(records) == status.next_offset
            for offset, data in acknowledged.items():
                assert records[offset].data == data
            assert await client.append("log", b"after") == status.next_offset
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_redis_urls_of_both_kinds_serve_a_hub(
    redis_server: RedisServer, redis_prefix: str, where: str
) -> None:
    async with FaultProxy(target_unix=redis_server.socket_path) as proxy:
        url = redis_server.url if where == "unix" else f"redis://127.0.0.1:{proxy.port}/0"
        async with hub_on(url, redis_prefix) as server, hub.connect("127.0.0.1", server.port) as c:
            await c.create("s")
            assert await c.append("s", b"a") == 0
            assert (await c.status("s")).next_offset == 1  # type: ignore[union-attr]


async def test_a_live_reader_waits_while_redis_is_away_and_goes_on_when_it_is_back(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        async with (
            hub_on(server.url, "away", timeout=0.5, recheck_interval=0.2) as hub_server,
            hub.connect("127.0.0.1", hub_server.port) as client,
        ):
            await client.create("s")
            await client.append("s", b"before")
            async with client.read("s", 0, live=True) as reader:
                assert await anext(reader) == (0, b"before")
                waiting = asyncio.create_task(anext(reader))
                await asyncio.sleep(0.3)  # caught up, re-checking
                server.kill()
                # Requests get "unavailable" within the storage's timeout.
                for call in (client.append("s", b"lost"), client.status("s")):
                    started = time.monotonic()
                    with pytest.raises(hub.StorageUnavailable, match="unavailable"):
                        await call
                    assert time.monotonic() - started < 2
                with pytest.raises(hub.StorageUnavailable):
                    async with client.read("s", 0) as not_live:
                        await anext(not_live)
                await asyncio.sleep(1.0)  # re-checks of the live reader fail meanwhile
                assert not waiting.done()
                server.start()
                async with asyncio.timeout(10):
                    while True:  # the hub's connections come back with Redis
                        try:
                            await client.append("s", b"after")
                            break
                        except hub.HubError:
                            await asyncio.sleep(0.1)
                    assert await waiting == (1, b"after")
    finally:
        server.stop()


# -- the command line ------------------------------------------------------------------------


def test_hub_command_keeps_streams_in_redis(redis_server: RedisServer, redis_prefix: str) -> None:
    command = ("hub", "--port", "0", "--storage", redis_server.url, "--prefix", redis_prefix)
    with running(*command) as (first, line), running(*command) as (second, other):
        where = f"(Redis at {redis_server.socket_path}, prefix {redis_prefix!r})"
        assert line.startswith("hub on 127.0.0.1:") and line.endswith(where)
        ports = [int(text.split()[2].rsplit(":", 1)[1]) for text in (line, other)]

        async def use() -> list[bytes]:
            async with (
                hub.connect("127.0.0.1", ports[0]) as writer,
                hub.connect("127.0.0.1", ports[1]) as reader,
            ):
                await writer.create("cli")
                await writer.append("cli", b"through one hub")
                await writer.finish("cli")
                return [record.data async for record in reader.read("cli")]  # the other

        assert asyncio.run(use()) == [b"through one hub"]
        stop(first)
        stop(second)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--storage", "http://x"), "--storage must be a redis://, rediss:// or unix:// URL"),
        (("--storage", "redis://x", "--data-dir", "d"), "--storage and --data-dir do not go"),
    ],
)
def test_hub_command_refuses_a_bad_storage(arguments: tuple[str, ...], message: str) -> None:
    done = subprocess.run(
        [*CLI, "hub", "--port", "0", *arguments], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and message in done.stderr


def test_hub_command_on_a_redis_that_is_not_there_says_so_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "hub", "--port", "0", "--storage", f"unix://{tmp_path}/none.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"hub: Redis at {tmp_path}/none.sock is unavailable" in done.stderr
    assert "Traceback" not in done.stderr
