"""streamkit: framed stream protocols over TCP and Unix sockets, pure asyncio."""

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
from streamkit.net import Connector, Server, connect, connect_unix, serve, serve_unix
from streamkit.session import (
    ResumableServer,
    Session,
    SessionSettings,
    SessionStats,
    connect_resumable,
    connect_resumable_unix,
    serve_resumable,
    serve_resumable_unix,
)
from streamkit.stream import FramedStream

__version__ = "0.1.0"

__all__ = [
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
