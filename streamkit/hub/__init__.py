"""The hub: named, append-only streams with offsets, live tail, resume and idempotent producers.

``serve_hub`` runs a hub; ``connect`` opens a :class:`HubClient` to one.
Streams live in memory, in an append-only log per stream on request, or in
Redis Streams (:class:`RedisStorage`, with the ``streamkit[redis]`` extra),
where several hub processes serve the same streams.
"""

from typing import TYPE_CHECKING, Any

from streamkit.hub.client import (
    HubClient,
    Producer,
    Reader,
    Record,
    StreamStatus,
    connect,
    connect_unix,
)
from streamkit.hub.filelog import FileStorage
from streamkit.hub.server import HubServer, serve_hub, serve_hub_unix
from streamkit.hub.storage import (
    PRODUCER_OVERHEAD,
    RECORD_OVERHEAD,
    BadRequest,
    HubError,
    LimitExceeded,
    Limits,
    MemoryStorage,
    ProducerFenced,
    Storage,
    StorageUnavailable,
    StreamExists,
    StreamFinished,
    StreamGone,
    StreamNotFound,
)

if TYPE_CHECKING:
    from streamkit.hub.redis import RedisStorage

__all__ = [
    "PRODUCER_OVERHEAD",
    "RECORD_OVERHEAD",
    "BadRequest",
    "FileStorage",
    "HubClient",
    "HubError",
    "HubServer",
    "LimitExceeded",
    "Limits",
    "MemoryStorage",
    "Producer",
    "ProducerFenced",
    "Reader",
    "Record",
    "RedisStorage",
    "Storage",
    "StorageUnavailable",
    "StreamExists",
    "StreamFinished",
    "StreamGone",
    "StreamNotFound",
    "StreamStatus",
    "connect",
    "connect_unix",
    "serve_hub",
    "serve_hub_unix",
]


def __getattr__(name: str) -> Any:
    # RedisStorage's module is loaded on first use: importing the hub stays light.
    if name == "RedisStorage":
        from streamkit.hub.redis import RedisStorage

        return RedisStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
