"""A peer directory in Redis: ``RedisPeers(url)``, for clusters whose nodes come and go.

``Cluster(node="a", peers=RedisPeers("redis://10.0.0.9:6379/0"), key=...,
listen=("0.0.0.0", 7001), advertise=("10.0.0.1", 7001))``: each node claims
its tag in Redis when its cluster port listens, with the address other nodes
reach it at, and refreshes the claim while it runs; a node that dies drops
out of the directory when its claim expires. It needs redis-py: ``pip
install "streamkit[redis]"``; this module imports it only when a
:class:`RedisPeers` is made, so ``import streamkit`` never does.

One key per node, ``<prefix>:node:<tag>``, holding a JSON object
``{"instance": <random hex of the claiming process>, "host": ..., "port":
...}`` (or ``"path"`` for a Unix socket) with a Redis expiry of ``ttl``.
Claiming is ``SET ... NX``: two processes never hold one tag. Refreshing and
leaving are Lua scripts that touch the key only while it is still this
process's claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

from streamkit._redis import import_redis
from streamkit.session.cluster import Address, check_address, check_node, format_address

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["RedisPeers"]

logger = logging.getLogger("streamkit.session")

# Extend the claim if it is still ours; take it again if it lapsed (nobody
# else took it meanwhile); 0 if another process holds the tag now.
_REFRESH = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not held then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 2
end
return 0
"""

_LEAVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _encode(instance: str, address: Address) -> str:
    if isinstance(address, str):
        return json.dumps({"instance": instance, "path": address})
    return json.dumps({"instance": instance, "host": address[0], "port": address[1]})


def _decode(value: bytes | str) -> tuple[str, Address]:
    """A claim's instance and address; ValueError for anything else."""
    try:
        entry = json.loads(value)
        instance = entry["instance"]
        raw = entry["path"] if "path" in entry else (entry["host"], entry["port"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a node entry: {value[:80]!r}") from exc
    return str(instance), check_address(raw, "a node entry's address")


class RedisPeers:
    """A :class:`~streamkit.session.cluster.PeerDirectory` in Redis, at ``url``.

    ``url`` is ``redis://host:port/db``, ``rediss://...`` or
    ``unix:///path/redis.sock``. Nodes of one cluster share ``prefix``.

    - :meth:`join` claims the node's tag atomically: if another process
      holds it, it waits up to ``claim_timeout`` seconds (default: ``ttl``
      plus one, long enough for the claim of a process that died to
      expire), then raises ``RuntimeError`` naming the holder's address.
      The claim expires ``ttl`` seconds (default 10) after its last
      refresh; a task refreshes it every ``ttl / 3`` seconds until
      :meth:`leave`. A refresh that finds the tag taken by another process
      logs an ERROR and stops (resumes of this node's sessions then reach
      the other process and are refused).
    - :meth:`lookup` reads a node's entry: None if there is none (never
      joined, left, or expired: its process died or lost Redis for ``ttl``).
    - Every Redis call is bounded by ``timeout`` seconds (default 2):
      ``join`` and ``lookup`` raise ``TimeoutError``, or ``ConnectionError``
      for a Redis they cannot reach or that fails (a resume whose lookup
      fails is refused); a refresh that fails is retried at its next turn.
    - ``leave()`` closes its connections; it may ``join`` again after.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "streamkit",
        ttl: float = 10.0,
        timeout: float = 2.0,
        claim_timeout: float | None = None,
    ) -> None:
        self._redis = import_redis("RedisPeers")
        if not ttl > 0 or not timeout > 0:
            raise ValueError(f"ttl and timeout must be > 0, not {ttl}, {timeout}")
        if claim_timeout is not None and claim_timeout < 0:
            raise ValueError(f"claim_timeout must be >= 0, not {claim_timeout}")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be non-empty, without braces, not {prefix!r}")
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        self.claim_timeout = ttl + 1.0 if claim_timeout is None else claim_timeout
        self.url = url
        self._client: aioredis.Redis | None = None  # from join() to leave()
        self._key: str | None = None
        self._claim = ""
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisPeers(prefix={self.prefix!r}, ttl={self.ttl})"

    @contextlib.contextmanager
    def _unreachable(self) -> Iterator[None]:
        """Raise redis-py's errors as ``ConnectionError`` naming this directory's Redis."""
        try:
            yield
        except self._redis.RedisError as exc:
            raise ConnectionError(f"the peer directory's Redis failed: {exc}") from exc

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    async def join(self, node: str, address: Address) -> None:
        """Claim ``node`` for this process at ``address``; refresh it until :meth:`leave`."""
        if self._client is not None:
            raise RuntimeError("this RedisPeers has joined already: one node per directory")
        key = self._node_key(check_node(node))
        claim = _encode(secrets.token_hex(8), check_address(address))
        self._client = client = self._redis.asyncio.Redis.from_url(
            self.url, socket_connect_timeout=self.timeout, socket_timeout=2 * self.timeout
        )
        try:
            await self._claim_tag(client, node, key, claim)
        except BaseException:
            self._client = None
            await client.aclose()
            raise
        self._key = key
        self._claim = claim
        self._refresher = asyncio.create_task(self._refresh(client, node, key))

    async def _claim_tag(self, client: aioredis.Redis, node: str, key: str, claim: str) -> None:
        """Claim ``key`` with ``claim``, waiting up to ``claim_timeout`` for another's to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.claim_timeout
        while True:
            with self._unreachable():
                async with asyncio.timeout(self.timeout):
                    won = await client.set(key, claim, nx=True, px=self._ttl_ms)
                    held = None if won else await client.get(key)
            if won:
                return
            if loop.time() >= deadline:
                holder = "another process"
                with contextlib.suppress(ValueError):
                    if held is not None:
                        holder = f"the process at {format_address(_decode(held)[1])}"
                raise RuntimeError(
                    f"node tag {node!r} is held by {holder} (waited {self.claim_timeout:g} s "
                    "for its claim to expire): give each node its own tag"
                )
            await asyncio.sleep(min(self.ttl / 10, max(0.0, deadline - loop.time())))

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    async def _refresh(self, client: aioredis.Redis, node: str, key: str) -> None:
        script = client.register_script(_REFRESH)
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                async with asyncio.timeout(self.timeout):
                    result = await script(keys=[key], args=[self._claim, self._ttl_ms])
            except (OSError, TimeoutError, self._redis.RedisError) as exc:
                logger.warning("could not refresh node %r's claim in Redis: %r", node, exc)
                continue
            if result == 2:
                logger.warning("node %r's claim in Redis had expired: claimed again", node)
            elif result == 0:
                logger.error(
                    "node tag %r is now held by another process: this node left the directory "
                    "(resumes of its sessions reach the other process and are refused)",
                    node,
                )
                return

    async def lookup(self, node: str) -> Address | None:
        """Where ``node``'s cluster port is reached; None if no process holds the tag."""
        if self._client is None:
            raise RuntimeError("look nodes up between join() and leave()")
        with self._unreachable():
            async with asyncio.timeout(self.timeout):
                value = await self._client.get(self._node_key(node))
        if value is None:
            return None
        try:
            return _decode(value)[1]
        except ValueError as exc:
            logger.warning("node %r's entry in Redis is damaged: %s", node, exc)
            return None

    async def leave(self) -> None:
        """Stop refreshing, give the tag up (if still ours) and close the Redis connections."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        client, self._client = self._client, None
        key, self._key = self._key, None
        if client is None:
            return
        try:
            if key is not None:
                async with asyncio.timeout(self.timeout):
                    await client.register_script(_LEAVE)(keys=[key], args=[self._claim])
        except (OSError, TimeoutError, self._redis.RedisError) as exc:
            logger.warning("could not remove this node from Redis (it expires anyway): %r", exc)
        finally:
            await client.aclose()
