"""streamkit: framed stream protocols over TCP and Unix sockets, pure asyncio."""

import importlib
import logging
from typing import TYPE_CHECKING, Any

from streamkit.codecs import (
    Codec,
    Decoder,
    Delimited,
    JsonLines,
    LengthPrefixed,
    Lines,
    VarintPrefixed,
)
from streamkit.errors import (
    ConnectionLost,
    DecodeError,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    ProtocolError,
    ResumeRejected,
    SessionError,
    SessionExpired,
    StreamkitError,
)

if TYPE_CHECKING:
    from streamkit.net import Connector, Server, connect, connect_unix, serve, serve_unix
    from streamkit.session import (
        ClientSession,
        ResumableServer,
        ServerSession,
        Session,
        SessionSettings,
        SessionStats,
        connect_resumable,
        connect_resumable_unix,
        serve_resumable,
        serve_resumable_unix,
    )
    from streamkit.stream import FramedStream

# The asyncio layers load on first use, so that sync code and other
# protocols can import the codecs (``streamkit.codecs``) without asyncio.
_LAZY = {
    **dict.fromkeys(
        ("Connector", "Server", "connect", "connect_unix", "serve", "serve_unix"), "net"
    ),
    **dict.fromkeys(
        (
            "ClientSession",
            "ResumableServer",
            "ServerSession",
            "Session",
            "SessionSettings",
            "SessionStats",
            "connect_resumable",
            "connect_resumable_unix",
            "serve_resumable",
            "serve_resumable_unix",
        ),
        "session",
    ),
    "FramedStream": "stream",
}


#: The layers' modules, attributes of the package once loaded (as when
#: ``streamkit/__init__`` imported them eagerly).
_LAYERS = frozenset(_LAZY.values())


def __getattr__(name: str) -> Any:
    if name in _LAYERS:
        return importlib.import_module(f"streamkit.{name}")
    layer = _LAZY.get(name)
    if layer is None:
        raise AttributeError(f"module 'streamkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"streamkit.{layer}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

# A library logs, the application decides where it goes: without this, a
# warning from streamkit reaches stderr unformatted through logging's last
# resort in an application that configured no logging.
logging.getLogger("streamkit").addHandler(logging.NullHandler())

__all__ = [
    "ClientSession",
    "Codec",
    "ConnectionLost",
    "Connector",
    "DecodeError",
    "Decoder",
    "Delimited",
    "EndOfStream",
    "FrameTooLarge",
    "FramedStream",
    "IncompleteFrame",
    "JsonLines",
    "LengthPrefixed",
    "Lines",
    "ProtocolError",
    "ResumableServer",
    "ResumeRejected",
    "Server",
    "ServerSession",
    "Session",
    "SessionError",
    "SessionExpired",
    "SessionSettings",
    "SessionStats",
    "StreamkitError",
    "VarintPrefixed",
    "__version__",
    "connect",
    "connect_resumable",
    "connect_resumable_unix",
    "connect_unix",
    "serve",
    "serve_resumable",
    "serve_resumable_unix",
    "serve_unix",
]
