"""Resumable sessions: frames both ways, exactly once and in order, across dropped connections.

``protocol`` is the sans-IO wire protocol and ``core`` the sans-IO state
machine (``SessionCore``); neither imports asyncio, and importing them, or
this package and its settings, loads none. ``session`` (the application's
side, shared by both roles), ``client`` and ``server`` are the thin asyncio
parts that move bytes, connect, reconnect and serve: they load on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any

from streamkit.session.cluster import Cluster, ClusterStats, PeerDirectory, StaticPeers
from streamkit.session.settings import Backoff, SessionOptions, SessionSettings, SessionStats

if TYPE_CHECKING:
    from streamkit.session.client import ClientSession, connect_resumable, connect_resumable_unix
    from streamkit.session.server import (
        ResumableServer,
        ServerSession,
        ServerStats,
        serve_resumable,
        serve_resumable_unix,
    )
    from streamkit.session.session import Session

_LAZY = {
    "ClientSession": "client",
    "connect_resumable": "client",
    "connect_resumable_unix": "client",
    "ResumableServer": "server",
    "ServerSession": "server",
    "ServerStats": "server",
    "serve_resumable": "server",
    "serve_resumable_unix": "server",
    "Session": "session",
}
_MODULES = frozenset(
    {"client", "cluster", "core", "protocol", "redis", "relay", "server", "session", "settings"}
)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"streamkit.session.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamkit.session' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"streamkit.session.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Backoff",
    "ClientSession",
    "Cluster",
    "ClusterStats",
    "PeerDirectory",
    "ResumableServer",
    "ServerSession",
    "ServerStats",
    "Session",
    "SessionOptions",
    "SessionSettings",
    "SessionStats",
    "StaticPeers",
    "connect_resumable",
    "connect_resumable_unix",
    "serve_resumable",
    "serve_resumable_unix",
]
