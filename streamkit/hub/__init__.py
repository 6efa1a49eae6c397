"""The hub: named, append-only streams with offsets, live tail, resume and idempotent producers.

``serve_hub`` runs a hub; ``connect`` opens a :class:`HubClient` to one.
Streams live in memory, or in an append-only log per stream on request.
"""

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
