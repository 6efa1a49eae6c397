"""The whole streamkit exception hierarchy, for every layer.

Errors split by who is at fault and what can follow:

- ``ProtocolError``: the bytes on the wire break the framing rules. Its
  subclasses ``FrameTooLarge``, ``IncompleteFrame`` and ``DecodeError`` name
  the limit or the offending frame.
- ``EndOfStream``: the peer ended the stream cleanly, between frames.
- ``ConnectionLost``: the connection broke (reset, broken pipe); the OS
  error is kept as ``__cause__``.
- ``SessionError``: a resumable session cannot go on (``ResumeRejected``,
  ``SessionExpired``).

Every message says what was wrong and the limit or offset involved.
"""

from __future__ import annotations

__all__ = [
    "ConnectionLost",
    "DecodeError",
    "EndOfStream",
    "FrameTooLarge",
    "IncompleteFrame",
    "ProtocolError",
    "ResumeRejected",
    "SessionError",
    "SessionExpired",
    "StreamkitError",
]


class StreamkitError(Exception):
    """Root of every error streamkit raises on purpose."""


class ProtocolError(StreamkitError):
    """The peer's bytes break the framing or wire protocol."""


class FrameTooLarge(ProtocolError):
    """A frame is longer than the configured ``max_frame`` (or another size limit)."""

    @classmethod
    def exceeds(cls, size: int, max_frame: int, whose: str = "") -> FrameTooLarge:
        """The error for a frame of ``size`` bytes over ``max_frame``.

        ``whose`` names another side's limit, as in ``"the peer's "``.
        """
        return cls(f"frame of {size} bytes exceeds {whose}max_frame={max_frame}")


class IncompleteFrame(ProtocolError):
    """The stream ended in the middle of a frame.

    ``missing`` is how many more bytes the frame needed, when the framing
    tells (a length prefix does; a delimiter does not), else ``None``.
    """

    def __init__(self, message: str, missing: int | None = None) -> None:
        super().__init__(message)
        self.missing = missing

    @classmethod
    def short(cls, part: str, got: int, size: int, unit: str = "frame") -> IncompleteFrame:
        """The error for a stream that ended after ``got`` of the ``size`` bytes of ``part``.

        ``part`` is the piece cut short (``"length header"``, ``"payload"``),
        ``unit`` what it belongs to (a frame, a session message).
        """
        missing = size - got
        return cls(
            f"stream ended {missing} bytes short of a complete {unit} "
            f"({part}: got {got} of {size})",
            missing=missing,
        )


class DecodeError(ProtocolError):
    """A complete frame could not be decoded (invalid UTF-8, invalid JSON).

    ``frame_number`` is the 1-based number of the offending frame (the line
    number for line-based codecs) in what the decoder has seen.
    """

    def __init__(self, message: str, frame_number: int | None = None) -> None:
        super().__init__(message)
        self.frame_number = frame_number


class EndOfStream(StreamkitError):
    """The peer ended the stream cleanly, with no partial frame pending."""


class ConnectionLost(StreamkitError):
    """The connection broke (reset, broken pipe, closed under us)."""


class SessionError(StreamkitError):
    """A resumable session cannot continue."""


class ResumeRejected(SessionError):
    """The peer refused to resume a session; the message says why."""


class SessionExpired(SessionError):
    """The session timed out or could not reconnect in time; its buffers are gone."""
