"""A session's settings and counters: every limit and timer, with safe defaults.

Plain data, no asyncio: the sans-IO core (:mod:`streamkit.session.core`)
and the asyncio glue both read them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypedDict

from streamkit.session.protocol import (
    DATA_HEADER,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_UNACKED_BYTES,
    DEFAULT_MAX_UNACKED_FRAMES,
    MAX_FRAME_LIMIT,
    MAX_UNACKED_BYTES_LIMIT,
    MAX_UNACKED_FRAMES_LIMIT,
    ReceiveLimits,
)

__all__ = ["Backoff", "SessionOptions", "SessionSettings", "SessionStats", "resolve_settings"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial`` seconds, doubling up to ``maximum``.

    Each delay is drawn from ``[delay * (1 - jitter), delay]`` so that many
    clients cut at once do not come back in lockstep.
    """

    initial: float = 0.05
    maximum: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial}, {self.maximum}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, not {self.jitter}")

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The pauses of one run of retries, jittered with ``rng``: endless."""
        delay = self.initial
        while True:
            yield rng.uniform(delay * (1 - self.jitter), delay)
            delay = min(delay * 2, self.maximum)


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Every limit and timer of a session, with safe defaults.

    - ``max_frame``: the largest payload (bytes), up to 2**32 - 10; each
      side announces its own in the handshake, and ``send`` refuses a
      payload over its own or the peer's; a larger one from a peer closes
      the connection.
    - ``max_unacked_frames`` / ``max_unacked_bytes`` (up to 2**32 - 1 and
      2**64 - 1): the receive window, frames and payload bytes received
      but not yet consumed by the application. Each side announces its own
      in the handshake; a side's send window (frames sent and not yet
      consumed by the peer's application) is its own setting or, if
      smaller, the peer's. A full send window makes ``send`` wait (one
      frame of any size fits an empty one); it bounds the replay buffer
      and the peer's queue. A peer that sends past our window has its
      connection closed with a :class:`ProtocolError`.
    - ``ack_every`` (frames; default 1024) and ``ack_delay`` (seconds):
      acks are coalesced, sent after that many frames or that long,
      whichever comes first; and once a
      quarter of the byte window (or of a frame window under
      ``4 * ack_every``) was received or consumed. An ack is a write on one
      side and a wakeup on the other: for flow control a quarter of the
      window is enough.
    - ``keepalive_interval`` / ``keepalive_timeout``: a ping every interval;
      a connection silent for the timeout is dropped (half-open) and resumed.
    - ``resume_timeout``: how long a server keeps a detached session.
    - ``reconnect_backoff`` / ``max_reconnect_time``: how a client retries,
      and for how long without progress (nothing acknowledged or received,
      no keepalive answer, even across resumes that succeed) before it
      fails the session.
    - ``handshake_timeout``: bound on connecting plus the handshake.
    - ``close_timeout``: bound on a graceful ``close()``.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    max_unacked_frames: int = DEFAULT_MAX_UNACKED_FRAMES
    max_unacked_bytes: int = DEFAULT_MAX_UNACKED_BYTES
    ack_every: int = 1024
    ack_delay: float = 0.01
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 15.0
    resume_timeout: float = 60.0
    reconnect_backoff: Backoff = field(default_factory=Backoff)
    max_reconnect_time: float = 60.0
    handshake_timeout: float = 10.0
    close_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_unacked_frames", "max_unacked_bytes", "ack_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in (
            "ack_delay",
            "keepalive_interval",
            "keepalive_timeout",
            "resume_timeout",
            "max_reconnect_time",
            "handshake_timeout",
            "close_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        for name, limit in (
            ("max_frame", MAX_FRAME_LIMIT),
            ("max_unacked_frames", MAX_UNACKED_FRAMES_LIMIT),
            ("max_unacked_bytes", MAX_UNACKED_BYTES_LIMIT),
        ):
            if getattr(self, name) > limit:
                raise ValueError(f"{name} must be <= {limit}, not {getattr(self, name)}")
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError("keepalive_timeout must be longer than keepalive_interval")

    def announced(self) -> ReceiveLimits:
        """What a hello or welcome announces: ``max_frame`` and the receive window."""
        return ReceiveLimits(self.max_frame, self.max_unacked_frames, self.max_unacked_bytes)

    def framing_limit(self) -> int:
        """``max_frame`` of the connection's message framing."""
        return self.max_frame + DATA_HEADER.size


class SessionOptions(TypedDict, total=False):
    """The :class:`SessionSettings` fields, as keywords of the connect and serve functions.

    ``connect_resumable(host, port, resume_timeout=5)`` is ``settings=
    SessionSettings(resume_timeout=5)``; a type checker flags a misspelt
    keyword, and at run time it raises ``TypeError``.
    """

    max_frame: int
    max_unacked_frames: int
    max_unacked_bytes: int
    ack_every: int
    ack_delay: float
    keepalive_interval: float
    keepalive_timeout: float
    resume_timeout: float
    reconnect_backoff: Backoff
    max_reconnect_time: float
    handshake_timeout: float
    close_timeout: float


def resolve_settings(
    settings: SessionSettings | None, options: Mapping[str, Any]
) -> SessionSettings:
    """``settings`` (or the defaults) with the fields in ``options`` replaced.

    Raises ``TypeError`` naming a keyword that is no setting, and
    ``ValueError`` for a bad value.
    """
    unknown = options.keys() - _SETTING_NAMES
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(map(repr, sorted(unknown)))}: "
            f"not a SessionSettings field (those are {', '.join(sorted(_SETTING_NAMES))})"
        )
    return replace(settings or SessionSettings(), **options)


_SETTING_NAMES = frozenset(f.name for f in fields(SessionSettings))


@dataclass(slots=True)
class SessionStats:
    """Counters of one session, for monitoring and tests."""

    connections: int = 0
    reconnects: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    #: Frames written again on a new connection because the peer had not
    #: received them on the last one (frames sent while disconnected count
    #: only in ``frames_sent``).
    frames_replayed: int = 0
    duplicates_dropped: int = 0
