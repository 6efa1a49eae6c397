"""Clusters of session servers: node tags in session ids, peer directories, :class:`Cluster`.

Several ``serve_resumable`` instances behind one layer-4 balancer form a
cluster. Each is a *node* with a short tag; the sessions it opens carry the
tag in their ids (docs/protocol.md 2.11), so any node that receives a resume
knows which node owns the session, looks its cluster address up in the
*peer directory* and relays the connection to it (2.12). Nothing here does
I/O except the directories' lookups.

- :class:`Cluster`: one node's settings (its tag, the directory, the
  cluster key, where its cluster port listens, TLS, the relay deadline).
- :class:`PeerDirectory`: what a directory does (join, lookup, leave);
  :class:`StaticPeers` is a fixed map, ``streamkit.session.redis.RedisPeers``
  (the ``redis`` extra) a directory in Redis that nodes join and leave.
- :func:`tagged_session_id` and :func:`node_of`: the node tag in an id.
"""

from __future__ import annotations

import os
import secrets
import ssl as _ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from streamkit.session.protocol import SESSION_ID_SIZE

__all__ = [
    "MAX_NODE_TAG",
    "MIN_CLUSTER_KEY",
    "Address",
    "Cluster",
    "ClusterStats",
    "PeerDirectory",
    "StaticPeers",
    "check_address",
    "check_node",
    "node_of",
    "tagged_session_id",
]

#: Where a node's cluster port is reached: TCP ``(host, port)``, or a Unix socket path.
Address = tuple[str, int] | str

#: The longest node tag, in bytes: the rest of a 16-byte session id (at
#: least 7 bytes, 56 bits) is random.
MAX_NODE_TAG = 8
#: The shortest cluster key, in bytes (``secrets.token_bytes(32)`` makes a good one).
MIN_CLUSTER_KEY = 16
#: The default bound, in seconds, on reaching a session's owner and hearing its answer.
DEFAULT_RELAY_TIMEOUT = 5.0

_TAG_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_node(node: object) -> str:
    """A node tag: 1 to 8 ASCII letters, digits, ``-``, ``_`` or ``.``; returned as it is.

    Raises ``TypeError`` for a non-string and ``ValueError`` (naming the
    rule) for anything else.
    """
    if not isinstance(node, str):
        raise TypeError(f"a node tag is a str, not {type(node).__name__}")
    raw = node.encode("utf-8", "replace")
    if not 1 <= len(raw) <= MAX_NODE_TAG or not _TAG_BYTES.issuperset(raw):
        raise ValueError(
            f"node tag {node[:40]!r} must be 1 to {MAX_NODE_TAG} ASCII letters, digits, "
            "'-', '_' or '.' (it is carried in every session id the node opens)"
        )
    return node


def tagged_session_id(node: str) -> bytes:
    """A new random session id carrying ``node``'s tag (docs/protocol.md 2.11).

    ``u8 length | tag | random bytes``, 16 bytes in all; ``node`` must be a
    valid tag (:func:`check_node`).
    """
    tag = node.encode()
    return bytes([len(tag)]) + tag + secrets.token_bytes(SESSION_ID_SIZE - 1 - len(tag))


def node_of(session_id: bytes) -> str | None:
    """The node tag a session id carries, or None if it carries none.

    Any 16 bytes are accepted: an id from a peer that is no tagged id (its
    first byte is no tag length, or the tag has a byte no tag may have)
    gives None.
    """
    if len(session_id) != SESSION_ID_SIZE:
        return None
    length = session_id[0]
    if not 1 <= length <= MAX_NODE_TAG:
        return None
    tag = session_id[1 : 1 + length]
    if not _TAG_BYTES.issuperset(tag):
        return None
    return tag.decode("ascii")


def check_address(address: object, what: str = "a peer address") -> Address:
    """A cluster address: ``(host, port)`` with a port in 0..65535, or a Unix socket path.

    Returned normalised (a list becomes a tuple, a path-like a str); anything
    else raises ``ValueError`` naming ``what``.
    """
    if isinstance(address, str | os.PathLike) and not isinstance(address, bytes):
        path = os.fspath(address)
        if isinstance(path, str) and path:
            return path
    elif isinstance(address, tuple | list) and len(address) == 2:
        host, port = address
        if (
            isinstance(host, str)
            and isinstance(port, int)
            and not isinstance(port, bool)
            and 0 <= port <= 65535
        ):
            return (host, port)
    raise ValueError(f"{what} is (host, port) or a Unix socket path, not {address!r}")


def format_address(address: Address) -> str:
    """An address for messages: ``host:port`` (``[host]:port`` for IPv6) or the path."""
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@runtime_checkable
class PeerDirectory(Protocol):
    """Where each node of a cluster listens for relayed connections.

    A server calls :meth:`join` once its cluster port listens (a directory
    that others write to claims the tag there, so two nodes never share
    one, and keeps the entry alive until :meth:`leave`), :meth:`lookup` for
    each resume of another node's session, and :meth:`leave` when it
    closes. ``lookup`` returns None for a node it does not know; any
    exception it raises (say, its store is unreachable) is logged and the
    resume refused. Every call is bounded by the caller's deadline.
    """

    async def join(self, node: str, address: Address) -> None:
        """Claim ``node`` for this server, reached at ``address``; raise if it cannot."""
        ...

    async def lookup(self, node: str) -> Address | None:
        """Where ``node``'s cluster port is reached, or None if no such node is known."""
        ...

    async def leave(self) -> None:
        """Give the claim up (a no-op for a static directory)."""
        ...


class StaticPeers:
    """A fixed peer directory: ``StaticPeers({"a": ("10.0.0.1", 7001), "b": ...})``.

    Every node of the cluster gets the same map (each node's own entry
    included: by default its cluster port listens there). Addresses are
    ``(host, port)`` or Unix socket paths. Joining as a node the map does
    not list raises ``ValueError``; nothing stops two processes from
    running as one node, so give each process its own tag.
    """

    def __init__(self, peers: Mapping[str, Address]) -> None:
        if not peers:
            raise ValueError("StaticPeers needs at least one node")
        self.peers: dict[str, Address] = {
            check_node(node): check_address(address, f"the address of node {node!r}")
            for node, address in peers.items()
        }

    def __repr__(self) -> str:
        return f"StaticPeers({self.peers!r})"

    async def join(self, node: str, address: Address) -> None:
        if node not in self.peers:
            raise ValueError(
                f"node {node!r} is not in the static peer list ({', '.join(sorted(self.peers))})"
            )

    async def lookup(self, node: str) -> Address | None:
        return self.peers.get(node)

    async def leave(self) -> None:
        return None


@dataclass(frozen=True)
class Cluster:
    """One node's cluster settings, for ``serve_resumable(..., cluster=...)`` and ``serve_hub``.

    - ``node``: this node's tag (:func:`check_node`): 1 to 8 letters,
      digits, ``-``, ``_``, ``.``; unique in the cluster.
    - ``peers``: the :class:`PeerDirectory` (:class:`StaticPeers`, or
      ``RedisPeers`` of the ``redis`` extra).
    - ``key``: the cluster key, at least 16 bytes, the same on every node
      and secret: it authenticates relayed connections both ways.
    - ``listen``: where this node's cluster port listens (a private
      address: only other nodes connect to it); ``None`` takes this node's
      entry in a :class:`StaticPeers` (another directory needs it given).
      Port 0 picks a free port.
    - ``advertise``: the address other nodes reach the cluster port at, as
      joined in the directory; ``None``: ``listen``, with the port bound.
    - ``ssl``: the cluster port's server-side TLS context; ``peer_ssl``:
      the client-side context for connecting to other nodes' cluster
      ports (both or neither, in practice).
    - ``relay_timeout``: seconds (default 5) to look the owner up, reach
      it, authenticate and hear its answer; past it the client's resume is
      rejected. Keep it below the clients' ``handshake_timeout``.
    """

    node: str
    peers: PeerDirectory
    key: bytes = field(repr=False)
    listen: Address | None = None
    advertise: Address | None = None
    ssl: _ssl.SSLContext | None = None
    peer_ssl: _ssl.SSLContext | None = None
    relay_timeout: float = DEFAULT_RELAY_TIMEOUT

    def __post_init__(self) -> None:
        check_node(self.node)
        if not isinstance(self.peers, PeerDirectory):
            raise TypeError(
                f"peers must be a peer directory (StaticPeers, RedisPeers), not {self.peers!r}"
            )
        if not isinstance(self.key, bytes):
            raise TypeError(f"the cluster key is bytes, not {type(self.key).__name__}")
        if len(self.key) < MIN_CLUSTER_KEY:
            raise ValueError(
                f"the cluster key is {len(self.key)} bytes; it needs at least "
                f"{MIN_CLUSTER_KEY} (make one with secrets.token_bytes(32))"
            )
        if self.listen is None:
            if not isinstance(self.peers, StaticPeers):
                raise ValueError(
                    "listen is needed: where this node's cluster port listens "
                    "(only a StaticPeers directory names it in advance)"
                )
            if self.node not in self.peers.peers:
                raise ValueError(
                    f"node {self.node!r} is not in the static peer list "
                    f"({', '.join(sorted(self.peers.peers))}), which says where it listens"
                )
        else:
            object.__setattr__(self, "listen", check_address(self.listen, "listen"))
        if self.advertise is not None:
            object.__setattr__(self, "advertise", check_address(self.advertise, "advertise"))
        if not self.relay_timeout > 0:
            raise ValueError(f"relay_timeout must be > 0, not {self.relay_timeout}")

    @property
    def listen_address(self) -> Address:
        """Where the cluster port listens: ``listen``, or this node's static entry."""
        if self.listen is not None:
            return self.listen
        assert isinstance(self.peers, StaticPeers)
        return self.peers.peers[self.node]


@dataclass(slots=True)
class ClusterStats:
    """What a node's relaying has done so far (all zero without a cluster).

    As a front (a resume of another node's session reached it):

    - ``relayed_out``: resumes relayed to their owner that it welcomed;
    - ``relays_rejected``: relayed resumes the owner answered with ``REJECT``;
    - ``relays_failed``: resumes refused without an answer from the owner
      (unknown to the directory, unreachable, a failed link handshake, past
      ``relay_timeout``);
    - ``relaying``: relayed connections open now.

    As an owner:

    - ``relayed_in``: resumes of its own sessions that came through another
      node and that it welcomed;
    - ``links_refused``: connections to its cluster port refused (no proof
      of the cluster key, a malformed or unfinished link handshake).
    """

    relayed_out: int = 0
    relays_rejected: int = 0
    relays_failed: int = 0
    relaying: int = 0
    relayed_in: int = 0
    links_refused: int = 0
