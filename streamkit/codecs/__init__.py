"""Sans-IO framing codecs: bytes in, frames out; no asyncio import.

Import them alone from any protocol, sync or async::

    from streamkit.codecs import LengthPrefixed

    codec = LengthPrefixed(header=4)
    wire = codec.encode(b"hello")          # b"\\x00\\x00\\x00\\x05hello"
    decoder = codec.decoder()
    decoder.feed(wire[:3])                 # []
    decoder.feed(wire[3:])                 # [b"hello"]
"""

from streamkit.codecs._base import Buffer, Codec, Decoder
from streamkit.codecs.delimited import Delimited, JsonLines, Lines
from streamkit.codecs.length import LengthPrefixed, VarintPrefixed
from streamkit.codecs.varint import decode_varint, encode_varint

__all__ = [
    "Buffer",
    "Codec",
    "Decoder",
    "Delimited",
    "JsonLines",
    "LengthPrefixed",
    "Lines",
    "VarintPrefixed",
    "decode_varint",
    "encode_varint",
]
