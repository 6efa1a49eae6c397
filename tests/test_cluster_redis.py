"""RedisPeers: a peer directory in a real redis-server (the conftest's, or the test's own)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from pathlib import Path

import pytest
import redis.asyncio

from streamkit.session import serve_resumable
from streamkit.session.cluster import Cluster
from streamkit.session.protocol import Welcome
from streamkit.session.redis import RedisPeers
from tests._cluster import KEY, new_session, rejected, resume
from tests._handlers import echo_session as echo
from tests._redis import RedisServer


async def test_nodes_join_look_each_other_up_and_leave(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    a = RedisPeers(redis_server.url, prefix=redis_prefix)
    b = RedisPeers(redis_server.url, prefix=redis_prefix)
    await a.join("a", ("10.0.0.1", 7001))
    await b.join("b", "/run/b.sock")
    try:
        assert await b.lookup("a") == ("10.0.0.1", 7001)
        assert await a.lookup("b") == "/run/b.sock"
        assert await a.lookup("c") is None
        other = RedisPeers(redis_server.url, prefix=redis_prefix + "-other")
        await other.join("x", ("h", 1))
        assert await other.lookup("a") is None  # another deployment
        await other.leave()
    finally:
        await a.leave()
    assert await b.lookup("a") is None  # left: gone at once, not at expiry
    await b.leave()


async def test_a_tag_is_held_by_one_process_at_a_time(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    first = RedisPeers(redis_server.url, prefix=redis_prefix)
    await first.join("a", ("10.0.0.1", 7001))
    second = RedisPeers(redis_server.url, prefix=redis_prefix, claim_timeout=0.2)
    with pytest.raises(RuntimeError, match=r"node tag 'a' is held by the process at 10.0.0.1:7001"):
        await second.join("a", ("10.0.0.2", 7001))
    assert await first.lookup("a") == ("10.0.0.1", 7001)  # the claim stays the first's
    await first.leave()
    await second.join("a", ("10.0.0.2", 7001))  # free now
    assert await second.lookup("a") == ("10.0.0.2", 7001)
    await second.leave()


async def test_claims_race_and_one_wins(redis_server: RedisServer, redis_prefix: str) -> None:
    racers = [RedisPeers(redis_server.url, prefix=redis_prefix, claim_timeout=0) for _ in range(8)]
    results = await asyncio.gather(
        *(racer.join("a", ("h", port)) for port, racer in enumerate(racers)),
        return_exceptions=True,
    )
    winners = [racer for racer, result in zip(racers, results, strict=True) if result is None]
    assert len(winners) == 1
    assert all(isinstance(r, RuntimeError) for r in results if r is not None)
    assert await winners[0].lookup("a") == ("h", racers.index(winners[0]))
    await winners[0].leave()


async def test_a_claim_is_refreshed_while_its_node_runs(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    peers = RedisPeers(redis_server.url, prefix=redis_prefix, ttl=0.3)
    await peers.join("a", ("h", 1))
    await asyncio.sleep(1.0)  # three TTLs: alive only through its refreshes
    assert await peers.lookup("a") == ("h", 1)
    await peers.leave()


async def test_a_dead_nodes_tag_expires_and_can_be_claimed_again(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    # A process that claims "a" with a short TTL, then dies without leaving.
    script = (
        "import asyncio, os, sys\n"
        "from streamkit.session.redis import RedisPeers\n"
        "async def main():\n"
        f"    peers = RedisPeers({redis_server.url!r}, prefix={redis_prefix!r}, ttl=0.5)\n"
        "    await peers.join('a', ('10.0.0.1', 1))\n"
        "    print('joined', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert await process.stdout.readline() == b"joined\n"
    finally:
        process.kill()
        await process.communicate()
    # The next process waits for the claim to expire (at most its TTL), then has it.
    successor = RedisPeers(redis_server.url, prefix=redis_prefix, claim_timeout=5)
    await successor.join("a", ("10.0.0.2", 2))
    assert await successor.lookup("a") == ("10.0.0.2", 2)
    await successor.leave()


async def test_a_lost_claim_is_logged_and_not_taken_back(
    redis_server: RedisServer, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit")
    peers = RedisPeers(redis_server.url, prefix=redis_prefix, ttl=0.3)
    await peers.join("a", ("h", 1))
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        # Another process took the tag (say this one stalled past its TTL).
        await client.set(f"{redis_prefix}:node:a", '{"instance": "other", "path": "/x"}')
        await asyncio.sleep(0.5)
        assert await peers.lookup("a") == "/x"
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("node tag 'a' is now held by another process" in m for m in errors)
        assert len(errors) == 1  # and it stopped refreshing
    finally:
        await client.aclose()
        await peers.leave()


async def test_a_redis_that_is_away_fails_lookups_within_the_timeout(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    peers = RedisPeers(server.url, prefix=secrets.token_hex(4), timeout=0.5)
    try:
        await peers.join("a", ("h", 1))
        server.kill()
        started = asyncio.get_running_loop().time()
        with pytest.raises((ConnectionError, TimeoutError), match=r"peer directory's Redis|^$"):
            await peers.lookup("b")
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await peers.leave()  # logs that it could not remove the entry; never hangs
        server.stop()


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="ttl and timeout must be > 0"):
        RedisPeers("redis://h", ttl=0)
    with pytest.raises(ValueError, match="prefix must be non-empty, without braces"):
        RedisPeers("redis://h", prefix="{x}")
    with pytest.raises(ValueError, match="claim_timeout must be >= 0"):
        RedisPeers("redis://h", claim_timeout=-1)


async def test_lookups_need_a_joined_directory() -> None:
    with pytest.raises(RuntimeError, match="between join"):
        await RedisPeers("redis://127.0.0.1:1").lookup("a")


async def test_nodes_find_each_other_through_redis(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for name in ("a", "b"):
            peers = RedisPeers(redis_server.url, prefix=redis_prefix)
            cluster = Cluster(name, peers, KEY, listen=("127.0.0.1", 0))
            servers[name] = await stack.enter_async_context(
                serve_resumable(echo, "127.0.0.1", 0, cluster=cluster, grace_period=0.1)
            )
        welcome = await new_session(servers["a"].port)
        answer, raw, _ = await resume(servers["b"].port, welcome)
        raw.close()
        assert isinstance(answer, Welcome) and answer.present
        assert servers["a"].stats.cluster.relayed_in == 1
        # A node that closed left the directory: its sessions' resumes fail at once.
        servers["a"].close()
        await servers["a"].wait_closed()
        reject = await rejected(servers["b"].port, welcome.session_id)
        assert "node 'a', is not in the peer directory" in reject.message


async def test_a_node_listening_everywhere_must_say_where_it_is_reached(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    peers = RedisPeers(redis_server.url, prefix=redis_prefix)
    cluster = Cluster("a", peers, KEY, listen=("0.0.0.0", 0))
    with pytest.raises(ValueError, match="give advertise, the address other nodes reach it at"):
        await serve_resumable(echo, "127.0.0.1", 0, cluster=cluster)
