"""Resumable sessions: frames both ways, exactly once and in order, across dropped connections.

``protocol`` is the sans-IO wire protocol; ``session`` the application's
side shared by both roles; ``client`` and ``server`` the thin asyncio
parts that connect, handshake, reconnect and expire.
"""

from streamkit.session.client import ClientSession, connect_resumable, connect_resumable_unix
from streamkit.session.server import (
    ResumableServer,
    ServerSession,
    serve_resumable,
    serve_resumable_unix,
)
from streamkit.session.session import (
    Backoff,
    Session,
    SessionOptions,
    SessionSettings,
    SessionStats,
)

__all__ = [
    "Backoff",
    "ClientSession",
    "ResumableServer",
    "ServerSession",
    "Session",
    "SessionOptions",
    "SessionSettings",
    "SessionStats",
    "connect_resumable",
    "connect_resumable_unix",
    "serve_resumable",
    "serve_resumable_unix",
]
