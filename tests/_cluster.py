"""Cluster test helpers: nodes in this process, a client speaking the handshake by hand."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from streamkit.session import ResumableServer, serve_resumable
from streamkit.session.cluster import Address, Cluster, StaticPeers
from streamkit.session.protocol import (
    HelloNew,
    HelloResume,
    Message,
    Reject,
    Welcome,
    resume_proof,
)
from tests._handlers import echo_session as echo
from tests._sessions import RawClient, open_raw


async def new_session(port: int) -> Welcome:
    raw = await open_raw(port)
    welcome = await raw.hello(HelloNew().encode())
    raw.close()
    assert isinstance(welcome, Welcome) and not welcome.present
    return welcome


async def resume(port: int, welcome: Welcome) -> tuple[Message, RawClient, bytes]:
    """Resume ``welcome``'s session on ``port``: the answer, the connection, the hello sent."""
    raw = await open_raw(port)
    proof = resume_proof(welcome.token, raw.nonce, welcome.session_id, 0)
    hello = HelloResume(welcome.session_id, proof, 0).encode()
    return await raw.hello(hello), raw, hello


async def rejected(port: int, session_id: bytes) -> Reject:
    raw = await open_raw(port)
    reply = await raw.hello(HelloResume(session_id, bytes(32), 0).encode())
    raw.close()
    assert isinstance(reply, Reject)
    return reply


KEY = secrets.token_bytes(32)
FAST = {"grace_period": 0.1, "handshake_timeout": 2.0}


class SharedPeers:
    """A directory the test's nodes share in memory: each joins with its bound address."""

    def __init__(self, addresses: dict[str, Address]) -> None:
        self.addresses = addresses

    async def join(self, node: str, address: Address) -> None:
        self.addresses[node] = address

    async def lookup(self, node: str) -> Address | None:
        return self.addresses.get(node)

    async def leave(self) -> None:
        pass


@asynccontextmanager
async def nodes(
    tmp_path: Path, names: str = "a,b", *, keys: dict[str, bytes] | None = None, **cluster: Any
) -> AsyncIterator[dict[str, ResumableServer]]:
    """Nodes ``names`` with cluster ports on Unix sockets in ``tmp_path``; ``keys`` per node."""
    peers = cluster.pop("peers", None) or StaticPeers(
        {name: str(tmp_path / f"{name}.sock") for name in names.split(",")}
    )
    async with AsyncExitStack() as stack:
        servers = {}
        for name in names.split(","):
            key = (keys or {}).get(name, KEY)
            node = Cluster(name, peers, key, **cluster)
            servers[name] = await stack.enter_async_context(
                serve_resumable(echo, "127.0.0.1", 0, cluster=node, **FAST)  # type: ignore[arg-type]
            )
        yield servers
