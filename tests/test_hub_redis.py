"""Hub storage in Redis Streams, against a real redis-server (see tests/_redis.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamkit import hub
from streamkit.hub.protocol import MAX_COUNTER
from streamkit.hub.redis import RedisStorage, changes_channel, check_prefix, stream_keys
from streamkit.hub.storage import (
    HubError,
    LimitExceeded,
    Produced,
    ProducerFenced,
    ProducerState,
    StorageUnavailable,
    StreamFinished,
    decide_produce,
)
from tests._redis import RedisServer, just_sent, proxied_redis_storage, redis_storage

# -- the key layout (no Redis needed) -------------------------------------------------


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes (its first non-empty {...})."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


@pytest.mark.parametrize("name", ["s", "with {braces} and }{", "é🙂\n", "x" * 255])
def test_a_streams_keys_share_one_hash_tag_whatever_its_name(name: str) -> None:
    keys = stream_keys("sk", name)
    assert len(set(keys)) == 4
    assert {hash_tag(key) for key in keys} == {hash_tag(keys.meta)}
    assert re.fullmatch(r"sk:[0-9a-f]{32}", hash_tag(keys.meta))
    assert [key.rsplit(":", 1)[1] for key in keys] == ["meta", "log", "producers", "tags"]


def test_keys_differ_between_names_and_between_deployments() -> None:
    assert stream_keys("sk", "a") == stream_keys("sk", "a")
    assert hash_tag(stream_keys("sk", "a").meta) != hash_tag(stream_keys("sk", "b").meta)
    assert stream_keys("sk", "a").meta != stream_keys("other", "a").meta
    assert changes_channel("sk") != changes_channel("other")


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "x" * 101])
def test_a_prefix_that_would_break_the_hash_tag_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match=r"prefix must be 1\.\.100 characters without braces"):
        check_prefix(prefix)
    with pytest.raises(TypeError, match="prefix must be a str"):
        check_prefix(b"sk")


def test_the_redis_storage_and_the_balancer_are_exported() -> None:
    import streamkit.hub
    import streamkit.hub.redis
    import streamkit.testing

    for module in (streamkit.hub.redis, streamkit.testing):
        for name in module.__all__:
            assert hasattr(module, name), name
    assert "RedisStorage" in streamkit.hub.__all__
    assert streamkit.hub.RedisStorage is RedisStorage is streamkit.hub.redis.RedisStorage
    assert {"Balancer", "BalancerStats"} <= set(streamkit.testing.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        streamkit.hub.Nothing  # noqa: B018


# -- redis-py stays optional -------------------------------------------------------------

HIDE_REDIS = """
import importlib.abc, sys

class HideRedis(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "redis" or name.startswith("redis."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideRedis())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_streamkit_and_its_hub_never_imports_redis() -> None:
    done = run_python(
        "import sys, streamkit, streamkit.hub, streamkit.testing\n"
        "from streamkit.hub import *\n"
        "from streamkit.hub import RedisStorage\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_redis_py_using_redis_storage_names_the_extra() -> None:
    done = run_python(
        HIDE_REDIS
        + "import streamkit.hub\n"
        + "from streamkit.hub import RedisStorage\n"  # importable: the error comes on use
        + "try:\n"
        + "    RedisStorage.from_url('redis://127.0.0.1:6379/0')\n"
        + "except ImportError as exc:\n"
        + "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "streamkit[redis]"' in done.stdout
    assert "No module named 'redis'" in done.stdout


# -- the tests' own redis-server -------------------------------------------------------------


@pytest.mark.parametrize(("require", "outcome"), [("0", "skipped"), ("1", "error")])
def test_without_redis_server_the_redis_tests_skip_unless_required(
    require: str, outcome: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "STREAMKIT_REQUIRE_REDIS": require}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider"),
            "tests/test_hub_redis.py::test_every_key_of_a_stream_expires_with_it",
        ],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert f"1 {outcome}" in done.stdout, done.stdout + done.stderr
    assert done.returncode == (0 if outcome == "skipped" else 1)
    assert "redis-server is not installed (apt-get install redis-server)" in done.stdout
    if outcome == "error":  # the run fails
        assert "STREAMKIT_REQUIRE_REDIS=1 requires the Redis tests to run" in done.stdout


# -- the storage on a real Redis ---------------------------------------------------------


async def test_a_stream_is_created_with_redis_s_clock_and_an_empty_batch_stores_nothing(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        info = await storage.create("s", ttl=None, content_type="text/plain")
        assert (info.name, info.next_offset, info.finished, info.ttl) == ("s", 0, False, None)
        assert abs(info.created - time.time()) < 5  # Redis's TIME, to the microsecond
        assert await storage.get("s") == info
        assert await storage.append("s", [b"a"]) == 0
        assert await storage.append("s", []) == 1  # nothing stored, nothing changed
        keys = stream_keys(redis_prefix, "s")
        assert await storage._client.xlen(keys.log) == await storage._client.xlen(keys.tags) == 1
        await storage.produce("s", [b"b"], "p", 0, 0)
        await storage.delete("s")
        assert await storage._client.exists(*keys) == 0  # deleting leaves no key behind
        assert await storage.expire(time.time() + 1e6) == []  # Redis expires streams itself


async def test_every_key_of_a_stream_expires_with_it(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        info = await storage.create("short", ttl=0.5, content_type=None)
        assert info.ttl == 0.5
        await storage.append("short", [b"a"])
        await storage.produce("short", [b"b"], "p", 0, 0)
        await storage.create("forever", ttl=None, content_type=None)
        await storage.append("forever", [b"a"])
        client = storage._client
        for key in stream_keys(redis_prefix, "short"):
            assert 0 < await client.pttl(key) <= 500
        forever = stream_keys(redis_prefix, "forever")
        for key in (forever.meta, forever.log, forever.tags):
            assert await client.pttl(key) == -1  # no expiry
        await asyncio.sleep(0.6)
        assert await storage.get("short") is None
        for key in stream_keys(redis_prefix, "short"):
            assert not await client.exists(key)
        # A stream made again under that name starts afresh.
        again = await storage.create("short", ttl=None, content_type=None)
        assert again.next_offset == 0 and again.created > info.created
        assert (await storage.read("short", 0, 10, 1000)).records == []
        assert await storage.producer("short", "p") is None


async def test_a_huge_ttl_is_kept_without_an_expiry_redis_cannot_hold(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        info = await storage.create("s", ttl=1e300, content_type=None)
        assert info.ttl == 1e300 and await storage.get("s") is not None
        assert await storage._client.pttl(stream_keys(redis_prefix, "s").meta) == -1


async def test_redis_itself_refuses_a_second_write_at_an_offset(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A log ahead of its meta (as after a bug) fails the append; nothing is written."""
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"a", b"b"])
        keys = stream_keys(redis_prefix, "s")
        await storage._client.hset(keys.meta, "next_offset", 0)  # as if "a" were not there
        with pytest.raises(HubError, match="equal or smaller"):
            await storage.append("s", [b"x"])
        assert await storage._client.xlen(keys.log) == 1
        assert (await storage.get("s")).size_bytes == 2  # type: ignore[union-attr]


# -- reads ------------------------------------------------------------------------------
# (the conformance suite, tests/test_hub_storage.py, reads every backend the same)


async def test_a_read_starts_inside_a_large_batch_and_takes_part_of_it(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        await storage.create("s", ttl=None, content_type=None)
        records = [b"%04d" % n + b"x" * (n % 7) for n in range(4000)]
        await storage.append("s", records[:1])
        await storage.append("s", records[1:])  # one entry of 3,999 records
        got: list[bytes] = []
        while len(got) < len(records):
            batch = await storage.read("s", len(got), 1024, 3000)
            assert 0 < len(batch.records) <= 1024 and sum(map(len, batch.records)) <= 3000
            got += batch.records
        assert got == records
        # A record over max_bytes still comes, alone.
        await storage.append("s", [b"L" * 5000, b"after"])
        assert (await storage.read("s", 4000, 10, 100)).records == [b"L" * 5000]


# -- idempotent producers: the script is decide_produce ----------------------------------

BIG = MAX_COUNTER  # 2**63 - 1: a Lua double cannot tell it from 2**63 - 2


async def test_epochs_near_2_63_are_told_apart(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        await storage.create("s", ttl=None, content_type=None)
        assert await storage.produce("s", [b"a"], "p", BIG - 1, 0) == Produced(0, False)
        # As doubles the epochs are equal and seq 0 a duplicate; it is a new epoch.
        assert await storage.produce("s", [b"b"], "p", BIG, 0) == Produced(1, False)
        with pytest.raises(ProducerFenced, match=f"epoch {BIG - 1} is fenced off by epoch {BIG}"):
            await storage.produce("s", [b"c"], "p", BIG - 1, 0)
        assert await storage.producer("s", "p") == ProducerState(BIG, 0, 1, 1)


async def test_sequence_numbers_near_2_63_are_told_apart(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        await storage.create("s", ttl=None, content_type=None)
        keys = stream_keys(redis_prefix, "s")
        await storage._client.hset(keys.producers, "p", f"7 {BIG - 2} 0 0")
        # BIG - 1 follows BIG - 2 (as doubles: equal, a duplicate).
        assert await storage.produce("s", [b"a"], "p", 7, BIG - 1) == Produced(0, False)
        assert await storage.produce("s", [b"a"], "p", 7, BIG - 1) == Produced(0, True)
        assert await storage.produce("s", [b"a"], "p", 7, BIG - 2) == Produced(None, True)
        await storage._client.hset(keys.producers, "q", f"7 {BIG - 3} 0 0")
        # BIG - 1 does not follow BIG - 3 (as doubles: both 2**63, a duplicate).
        with pytest.raises(HubError, match=f"sent batch {BIG - 1} after batch {BIG - 3}: a gap"):
            await storage.produce("s", [b"b"], "q", 7, BIG - 1)
        assert (await storage.read("s", 0, 10, 1000)).records == [b"a"]


counters = st.one_of(
    st.sampled_from([0, 1, 2, 9, 10, 99, 100, BIG - 3, BIG - 2, BIG - 1, BIG]),
    st.integers(0, BIG),
)
states = st.one_of(
    st.none(),
    st.builds(ProducerState, counters, counters, st.integers(0, 5), st.integers(0, 3)),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=states, epoch=counters, seq=counters, near=st.booleans())
def test_the_produce_script_decides_as_decide_produce(
    redis_server: RedisServer,
    redis_prefix: str,
    state: ProducerState | None,
    epoch: int,
    seq: int,
    near: bool,
) -> None:
    if near and state is not None:  # the interesting cases: the next batch, the same epoch
        epoch, seq = state.epoch, min(state.seq + 1, BIG)
    try:
        expected: Produced | Exception | None = decide_produce(state, "p", epoch, seq)
    except HubError as exc:
        expected = exc

    async def run() -> None:
        async with redis_storage(redis_server.url, redis_prefix) as storage:
            name = f"s-{time.monotonic_ns()}"
            await storage.create(name, ttl=None, content_type=None)
            await storage.append(name, [b"x"] * 8)
            if state is not None:
                producers = stream_keys(redis_prefix, name).producers
                value = f"{state.epoch} {state.seq} {state.first_offset} {state.count}"
                await storage._client.hset(producers, "p", value)
            try:
                got: Produced | Exception = await storage.produce(name, [b"new"], "p", epoch, seq)
            except HubError as exc:
                got = exc
            after = await storage.get(name)
            stored = await storage.producer(name, "p")
            await storage.delete(name)
        assert after is not None
        if expected is None:  # appended
            assert got == Produced(8, False)
            assert after.next_offset == 9
            assert stored == ProducerState(epoch, seq, 8, 1)
        else:
            assert after.next_offset == 8 and stored == state
            if isinstance(expected, Exception):
                assert type(got) is type(expected) and str(got) == str(expected)
            else:
                assert got == expected

    asyncio.run(run())


async def test_an_empty_batch_of_a_producer_records_its_state_only(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"a"])
        assert await storage.produce("s", [], "claim", 0, 0) == Produced(1, False)
        assert await storage.produce("s", [], "claim", 0, 0) == Produced(1, True)
        assert await storage.producer("s", "claim") == ProducerState(0, 0, 1, 0)
        assert (await storage.get("s")).next_offset == 1  # type: ignore[union-attr]
        assert await storage.produce("s", [b"b"], "claim", 0, 1) == Produced(1, False)
        await storage.finish("s")
        # A retry of a batch appended before the stream was finished is acknowledged.
        assert await storage.produce("s", [b"b"], "claim", 0, 1) == Produced(1, True)
        with pytest.raises(StreamFinished):
            await storage.produce("s", [b"c"], "claim", 0, 2)


async def test_concurrent_producers_of_two_storages_append_each_batch_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Two hub processes' storages racing the same batches: each is appended once."""
    async with (
        redis_storage(redis_server.url, redis_prefix) as one,
        redis_storage(redis_server.url, redis_prefix) as two,
    ):
        await one.create("s", ttl=None, content_type=None)

        async def produce(storage: RedisStorage) -> list[Produced]:
            return [await storage.produce("s", [b"%d" % seq], "p", 0, seq) for seq in range(200)]

        first, second = await asyncio.gather(produce(one), produce(two))
        assert sum(not produced.duplicate for produced in first + second) == 200
        batch = await one.read("s", 0, 1000, 1 << 20)
        assert batch.records == [b"%d" % seq for seq in range(200)]


# -- Redis settings and failures ----------------------------------------------------------


async def test_an_evicting_redis_is_refused(tmp_path: Path) -> None:
    server = RedisServer(
        tmp_path, args=("--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru")
    )
    server.start()
    try:
        storage = RedisStorage.from_url(server.url, prefix="t")
        with pytest.raises(HubError, match="maxmemory-policy allkeys-lru: it would evict"):
            await storage.start()
        await storage.close()
    finally:
        server.stop()


async def test_a_redis_older_than_7_is_refused(tmp_path: Path) -> None:
    """A server that says it is Redis 6.2 (a stand-in: the scripts need Redis 7)."""

    async def old_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():  # a command: *N, then $len and arg each
                args = []
                for _ in range(int(line[1:])):
                    await reader.readline()
                    args.append((await reader.readline()).strip().upper())
                if args[:1] == [b"INFO"]:
                    info = b"redis_version:6.2.14\r\n"
                    writer.write(b"$%d\r\n%s\r\n" % (len(info), info))
                elif args[:1] == [b"HELLO"]:  # Redis 6 has it, but speak RESP2 here
                    writer.write(b"-ERR unknown command 'HELLO'\r\n")
                else:
                    writer.write(b"+OK\r\n")
        finally:
            writer.close()

    path = str(tmp_path / "old.sock")
    async with await asyncio.start_unix_server(old_redis, path):
        storage = RedisStorage.from_url(f"unix://{path}", prefix="t")
        with pytest.raises(HubError, match=r"runs Redis 6\.2\.14; RedisStorage needs Redis 7\.0"):
            await storage.start()
        await storage.close()


async def test_a_full_redis_refuses_appends_whole_and_still_serves_reads(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, args=("--maxmemory", "3mb"))
    server.start()
    try:
        async with redis_storage(server.url, "t") as storage:
            await storage.create("s", ttl=None, content_type=None)
            record = b"r" * 10_000
            appended = 0
            with pytest.raises(LimitExceeded, match="out of memory"):
                for _ in range(10_000):  # about 100 MB: far more than maxmemory
                    await storage.append("s", [record] * 10)
                    appended += 10
            assert appended > 0
            with pytest.raises(LimitExceeded, match="out of memory"):
                for seq in range(10_000):
                    await storage.produce("s", [record] * 10, "p", 0, seq)
                    appended += 10
            # What was refused left nothing behind: the log holds what the meta counts.
            info = await storage.get("s")
            assert info is not None and info.next_offset == appended
            assert info.size_bytes == appended * len(record)
            got = 0
            while got < appended:
                got += len((await storage.read("s", got, 1000, 1 << 20)).records)
            assert got == appended
            assert await storage._client.xlen(stream_keys("t", "s").log) == appended // 10
            # Finishing and deleting work when full; deleting makes room again.
            assert (await storage.finish("s")).finished
            await storage.delete("s")
            await storage.create("s", ttl=None, content_type=None)
            assert await storage.append("s", [record]) == 0
    finally:
        server.stop()


async def test_an_unreachable_redis_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    storage = RedisStorage.from_url(f"unix://{tmp_path}/nothing.sock", prefix="t", timeout=0.5)
    with pytest.raises(StorageUnavailable, match=r"Redis at .*nothing\.sock is unavailable"):
        await storage.start()
    with pytest.raises(StorageUnavailable) as caught:
        await storage.get("s")
    assert caught.value.code == "unavailable"
    await storage.close()


async def test_a_silent_redis_is_unavailable_within_the_timeout_then_serves_again(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with proxied_redis_storage(redis_server, redis_prefix, timeout=0.5) as (proxy, storage):
        await storage.create("s", ttl=None, content_type=None)
        proxy.blackhole()
        calls: list[Callable[[], Any]] = [
            lambda: storage.get("s"),
            lambda: storage.append("s", [b"a"]),
            lambda: storage.read("s", 0, 10, 100),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match=r"did not answer .* within 0\.5 s"):
                await call()
            assert time.monotonic() - started < 2.0  # the timeout, and some slack
        proxy.restore()
        proxy.cut()  # the connections that timed out are gone anyway
        assert await storage.append("s", [b"b"]) >= 0
        assert b"b" in (await storage.read("s", 0, 10, 100)).records


async def test_waiting_for_a_connection_counts_against_the_timeout(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with proxied_redis_storage(
        redis_server, redis_prefix, timeout=0.5, max_connections=1
    ) as (proxy, storage):
        proxy.blackhole()
        started = time.monotonic()
        calls = [storage.get(f"s{n}") for n in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(result, StorageUnavailable) for result in results)
        assert time.monotonic() - started < 1.5  # not 4 x 0.5 s: they waited together
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        RedisStorage.from_url(redis_server.url, max_connections=0)


async def test_a_cancelled_read_on_a_silent_redis_ends_within_a_second(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with proxied_redis_storage(redis_server, redis_prefix, timeout=30) as (proxy, storage):
        await storage.create("s", ttl=None, content_type=None)
        proxy.blackhole()
        reads = [asyncio.create_task(storage.read("s", 0, 10, 100)) for _ in range(3)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        for read in reads:
            read.cancel()
        await asyncio.wait(reads, timeout=1.0)
        assert all(read.cancelled() for read in reads)
        assert time.monotonic() - started < 1.0
        proxy.restore()


async def test_a_redis_killed_and_restarted_is_unavailable_then_serves_again(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, appendonly=True).start()
    try:
        async with redis_storage(server.url, "t", timeout=1.0) as storage:
            await storage.create("s", ttl=None, content_type=None)
            await storage.append("s", [b"a"])
            server.kill()
            with pytest.raises(StorageUnavailable):
                await storage.append("s", [b"lost"])
            server.start()
            assert await storage.append("s", [b"b"]) == 1  # AOF: "a" survived
            assert (await storage.read("s", 0, 10, 100)).records == [b"a", b"b"]
    finally:
        server.stop()


# -- notifications -------------------------------------------------------------------------


class Changes:
    """What a storage's subscription reported; ``await changes.next()`` the next one."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self._event = asyncio.Event()

    def __call__(self, name: str | None) -> None:
        self.seen.append(name)
        self._event.set()

    async def next(self, timeout: float = 5.0) -> str | None:
        async with asyncio.timeout(timeout):
            while not self.seen:
                self._event.clear()
                await self._event.wait()
        return self.seen.pop(0)


async def test_a_change_through_one_storage_is_heard_by_another(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    heard = Changes()
    other_deployment = Changes()
    itself = Changes()
    async with (
        redis_storage(redis_server.url, redis_prefix) as writer,
        redis_storage(redis_server.url, redis_prefix) as listener,
        redis_storage(redis_server.url, redis_prefix + "-other") as elsewhere,
    ):
        listener.subscribe(heard)
        elsewhere.subscribe(other_deployment)
        writer.subscribe(itself)
        assert await heard.next() is None  # subscribed: anything may have changed
        assert await other_deployment.next() is None
        assert await itself.next() is None
        await writer.create("s é", ttl=None, content_type=None)
        assert await heard.next() == "s é"
        await writer.append("s é", [b"a"])
        assert await heard.next() == "s é"
        await writer.produce("s é", [b"b"], "p", 0, 0)
        assert await heard.next() == "s é"
        await writer.finish("s é")
        assert await heard.next() == "s é"
        await writer.delete("s é")
        assert await heard.next() == "s é"
        await asyncio.sleep(0.1)
        # Not heard: changes of another deployment, and a storage's own changes.
        assert heard.seen == [] and other_deployment.seen == [] and itself.seen == []
        assert listener.recheck_interval == 1.0


async def test_a_lost_subscription_is_renewed_and_reported_as_any_change(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    heard = Changes()
    async with (
        proxied_redis_storage(redis_server, redis_prefix, timeout=0.5) as (proxy, listener),
        redis_storage(redis_server.url, redis_prefix) as writer,
    ):
        await writer.create("s", ttl=None, content_type=None)
        listener.subscribe(heard)
        assert await heard.next() is None
        proxy.cut()
        assert await heard.next() is None  # subscribed again
        await writer.append("s", [b"a"])
        assert await heard.next() == "s"
        # A half-open subscription (its pings unanswered) is renewed too.
        proxy.blackhole()
        await asyncio.sleep(1.6)  # more than a ping's interval and its answer's wait
        assert heard.seen == []
        proxy.restore()
        assert await heard.next(timeout=5) is None


# -- closing, whatever Redis is doing ----------------------------------------------------


async def test_closing_ends_the_listener_cancelled_as_redis_py_sends_its_ping(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Python 3.11's ``asyncio.wait_for`` loses a cancellation that comes as its send ends.

    redis-py sends under it (see ``just_sent``); a close() at that moment
    once cancelled the listener to no effect, and it listened (and waited
    on every later cancellation) forever.
    """
    heard = Changes()
    storage = RedisStorage.from_url(redis_server.url, prefix=redis_prefix, timeout=0.2)
    try:
        await storage.start()
        storage.subscribe(heard)
        assert await heard.next() is None
        listener = storage._listener
        assert listener is not None
        await just_sent(listener)  # its ping, after 0.2 s without a word from Redis
        async with asyncio.timeout(2):
            await storage.close()
        assert listener.cancelled()
    finally:
        await storage.close()


async def test_a_request_cancelled_as_redis_py_sends_it_is_cancelled(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Not answered as if never cancelled: a live reader of a closing hub would go on reading."""
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        await storage.create("s", ttl=None, content_type=None)
        request = asyncio.create_task(storage.get("s"))
        await just_sent(request)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request


async def test_a_closed_storage_refuses_to_start_or_subscribe(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Not a listener nothing would ever stop: a clear error, and no task left running."""
    async with redis_storage(redis_server.url, redis_prefix) as storage:
        pass
    tasks = asyncio.all_tasks()
    with pytest.raises(HubError, match="is closed"):
        storage.subscribe(lambda name: None)
    with pytest.raises(HubError, match="is closed"):
        await storage.start()
    assert asyncio.all_tasks() == tasks


@pytest.mark.parametrize("redis", ["stopped", "killed", "restarted"])
@pytest.mark.parametrize("after", [0.0, 0.25, 0.7])
async def test_a_hub_on_redis_closes_in_bounded_time_whatever_redis_is_doing(
    tmp_path: Path, redis: str, after: float
) -> None:
    """Redis SIGSTOPped (silent), SIGKILLed, or killed and started again; the hub closed at
    once, about when its listener pings, or while the listener subscribes again."""
    server = RedisServer(tmp_path).start()
    assert server.process is not None
    pid = server.process.pid
    storage = RedisStorage.from_url(server.url, prefix="t", timeout=0.3, recheck_interval=0.1)
    hub_server = await hub.serve_hub("127.0.0.1", 0, storage=storage, grace_period=0.1)
    try:
        async with hub.connect("127.0.0.1", hub_server.port) as client:
            await client.create("s")
            await client.append("s", b"a")
            async with client.read("s", 0, live=True) as reader:
                assert await anext(reader) == (0, b"a")
                waiting = asyncio.create_task(anext(reader))
                await asyncio.sleep(0.2)  # caught up: the reader re-checks
                if redis == "stopped":
                    os.kill(pid, signal.SIGSTOP)
                else:
                    server.kill()
                    if redis == "restarted":
                        server.start()
                await asyncio.sleep(after)
                started = time.monotonic()
                hub_server.close()
                async with asyncio.timeout(10):
                    await hub_server.wait_closed()  # and closes the storage
                # The grace period, a request of the reader's, closing the listener's
                # (0.1 + 0.3 + 0.3 s), with room for a loaded machine.
                assert time.monotonic() - started < 3
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
    finally:
        hub_server.close()
        await hub_server.wait_closed()
        if redis == "stopped":
            os.kill(pid, signal.SIGCONT)
        server.stop()


def test_the_hub_benchmark_runs_on_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """A smoke run of ``bench_hub.py --storage redis`` (its numbers are not checked)."""
    script = Path(__file__).parent.parent / "benchmarks" / "bench_hub.py"
    results = tmp_path / "bench.json"
    run = subprocess.run(
        [
            *(sys.executable, str(script), "--records", "400", "--json", str(results)),
            *("--storage", "redis", "--redis-url", redis_server.url),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "redis storage" in run.stdout
    rows = {row["row"]: row for row in json.loads(results.read_text())["rows"]}
    raw = rows["raw Redis: XADD, 1,000 records per entry (ceiling)"]
    assert raw["records"] == 1000 and raw["records_per_s"] > 0
    against = rows["producer, 8 in flight, against raw Redis"]
    assert against["records"] == 400 and against["ratio"] > 0
