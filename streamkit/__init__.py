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

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "ConnectionLost",
    "DecodeError",
    "Decoder",
    "Delimited",
    "EndOfStream",
    "FrameTooLarge",
    "IncompleteFrame",
    "JsonLines",
    "LengthPrefixed",
    "Lines",
    "ProtocolError",
    "ResumeRejected",
    "SessionError",
    "SessionExpired",
    "StreamkitError",
    "VarintPrefixed",
    "__version__",
]
