"""Hub storage: the interface every backend implements, and the local backends' bookkeeping.

The hub server keeps live readers and speaks the protocol; a storage backend
keeps streams of records. The interface, :class:`Storage`, is async: a
backend may live in this process (``MemoryStorage``, ``FileStorage``) or in
an engine several hub processes share (``RedisStorage``). Everything that
must be atomic across those processes is one call: ``produce`` decides
(with :func:`decide_produce`, the one rule every backend applies) and
appends in one step.

Offsets are record numbers from 0. Each appended batch is stored as one
unit with a lineage *tag* (:func:`new_tag`): a reader that comes back
names the tag of the last batch it read, and a stream whose history from
there was lost and rewritten (a failover, a log without ``fsync`` after a
power loss) tells it so instead of serving someone else's records.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from streamkit.errors import StreamkitError
from streamkit.hub.protocol import check_content_type, check_ttl, quote, records_size

__all__ = [
    "PRODUCER_OVERHEAD",
    "RECORD_OVERHEAD",
    "BadRequest",
    "Batch",
    "HubError",
    "LimitExceeded",
    "Limits",
    "MemoryStorage",
    "Produced",
    "ProducerFenced",
    "ProducerState",
    "Storage",
    "StorageUnavailable",
    "StreamExists",
    "StreamFinished",
    "StreamGone",
    "StreamInfo",
    "StreamNotFound",
    "StreamTable",
    "decide_produce",
    "new_tag",
]

logger = logging.getLogger("streamkit.hub")

KiB = 1024
MiB = 1024 * KiB


class HubError(StreamkitError):
    """A hub request failed; ``code`` names the reason on the wire.

    For a producer's batch the hub refused, ``records`` holds the records
    that were not appended (and the message says which they were).
    """

    code = "error"
    records: tuple[bytes, ...] = ()


class BadRequest(HubError):
    """A request with a missing or invalid field (a bad ttl, offset, name, ...)."""

    code = "bad_request"


class StreamNotFound(HubError):
    """No stream of that name (never created, deleted, or expired)."""

    code = "not_found"


class StreamGone(StreamNotFound):
    """The stream a read was reading is gone: deleted, expired, or its history rewritten."""

    code = "gone"


class StreamExists(HubError):
    """``create`` of a stream that exists (without ``exist_ok``)."""

    code = "exists"


class StreamFinished(HubError):
    """``append`` to a stream that was finished."""

    code = "finished"


class LimitExceeded(HubError):
    """A hub limit (streams, record size, memory) would be exceeded."""

    code = "limit"


class ProducerFenced(HubError):
    """An idempotent producer with an older epoch than the stream has seen."""

    code = "fenced"


class StorageUnavailable(HubError):
    """The storage engine (a Redis server, say) cannot be reached right now.

    Raised within a bounded time, never after waiting indefinitely; the
    request may succeed later.
    """

    code = "unavailable"


#: What a record costs against ``Limits.max_total_bytes`` beside its bytes:
#: about what holding it in memory costs (a list slot and a ``bytes``
#: object's header, rounded up), so that many small or empty records are
#: bounded too.
RECORD_OVERHEAD = 48
#: What an idempotent producer's state costs a stream against
#: ``max_total_bytes``, beside its id's UTF-8 bytes (about what holding it
#: costs), so that endless new producer ids are bounded too.
PRODUCER_OVERHEAD = 192


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that turn resource exhaustion into clear errors.

    ``max_streams`` streams at once; ``max_record`` bytes per record;
    ``max_batch`` bytes per appended batch, counted as the batch travels
    (:func:`~streamkit.hub.protocol.records_size`: 4, plus 4 and its
    length for each record), which bounds every entry a log holds;
    ``max_total_bytes`` over every stream, each record counting its length
    plus :data:`RECORD_OVERHEAD`, and each producer a stream knows its id's
    length plus :data:`PRODUCER_OVERHEAD`; ``max_name`` UTF-8 bytes per
    stream name. Past any of them a request gets :class:`LimitExceeded`
    (:class:`BadRequest` for a name), and nothing is stored.

    The hub server also runs at most ``max_reads`` reads at once on one
    client session (a read past it gets :class:`LimitExceeded`), and
    refuses a record it could not send back in one message of the session
    (about ``max_frame`` less 512 bytes), whatever ``max_record`` says.
    """

    max_streams: int = 10_000
    max_record: int = 4 * MiB
    max_batch: int = 16 * MiB
    max_total_bytes: int = 1024 * MiB
    max_name: int = 255
    max_reads: int = 1000


@dataclass(slots=True)
class ProducerState:
    """What a stream remembers of an idempotent producer, to drop retried batches."""

    epoch: int
    seq: int  # sequence number of the last batch appended
    first_offset: int  # offset of that batch's first record
    count: int  # records in that batch


@dataclass(slots=True)
class StreamInfo:
    """A stream's metadata."""

    name: str
    content_type: str | None = None
    ttl: float | None = None  # seconds after creation (None: no expiry)
    created: float = field(default_factory=time.time)
    finished: bool = False
    next_offset: int = 0
    size_bytes: int = 0

    @property
    def expires_at(self) -> float | None:
        return None if self.ttl is None else self.created + self.ttl

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now >= self.created + self.ttl


class Produced(NamedTuple):
    """What ``Storage.produce`` did with an idempotent producer's batch."""

    #: Offset of the batch's first record; ``None`` for a retry of a batch
    #: older than the last one the stream has of that producer.
    offset: int | None
    #: Whether the batch was a retry, acknowledged without appending it again.
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Batch:
    """What ``Storage.read`` returns."""

    #: Consecutive records from the offset asked for; ``[]`` at the end.
    records: list[bytes]
    #: The stream's state as of this read (``next_offset``, ``finished``, ...).
    info: StreamInfo
    #: Lineage tag of the stored batch holding the last record returned
    #: (``None`` if no records were returned).
    tag: str | None


def new_tag() -> str:
    """A new batch's lineage tag: 64 random bits in hex.

    Two batches ever stored at the same offset of a stream differ in tag
    with overwhelming probability, whatever their records.
    """
    return os.urandom(8).hex()


def decide_produce(
    state: ProducerState | None, producer_id: str, epoch: int, seq: int
) -> Produced | None:
    """The idempotent-producer rule of docs/protocol.md section 3.3, pure.

    ``state`` is what the stream has of ``producer_id`` (``None``: nothing).
    Returns ``None`` for "append it"; a ``Produced(offset, duplicate=True)``
    for a retry to acknowledge without appending (the offset of the last
    batch when ``seq`` is its sequence, ``None`` for an older one). Raises
    :class:`ProducerFenced` for an epoch older than the stored one and
    :class:`HubError` for a sequence gap, or a new epoch (or producer) not
    starting at batch 0. Every backend calls it (memory, file) or mirrors
    it exactly (the Redis script, comparing epoch and seq as integers of
    up to 2**63-1, never as floating-point numbers).
    """
    if state is not None:
        if epoch < state.epoch:
            raise ProducerFenced(
                f"producer {producer_id!r} epoch {epoch} is fenced off by epoch {state.epoch}"
            )
        if epoch == state.epoch:
            if seq <= state.seq:
                # A retry of a batch already appended: exactly once.
                return Produced(state.first_offset if seq == state.seq else None, True)
            if seq != state.seq + 1:
                raise HubError(
                    f"producer {producer_id!r} sent batch {seq} after batch {state.seq}: a gap"
                )
            return None
    if seq != 0:  # a new producer, or a new epoch
        raise HubError(f"producer {producer_id!r} epoch {epoch} must start at batch 0, not {seq}")
    return None


class Storage(Protocol):
    """What the hub server needs of a storage backend.

    Every method but ``subscribe`` is a coroutine, and raises a
    :class:`HubError` subclass for a request that cannot be served
    (:class:`StreamNotFound`, :class:`StreamExists`, :class:`StreamFinished`,
    :class:`LimitExceeded`, :class:`ProducerFenced`, :class:`BadRequest`),
    or :class:`StorageUnavailable`, within a bounded time, when its engine
    cannot be reached. A stream whose TTL has passed is absent for every
    method. Offsets are record numbers from 0.
    """

    #: The limits the backend enforces.
    limits: Limits
    #: Seconds between re-checks of a caught-up live reader, for a backend
    #: several processes share (its change notifications are hints that can
    #: be lost); ``None`` when every change goes through this process.
    recheck_interval: float | None

    async def start(self) -> None:
        """Connect and check the engine's settings; called once before any request."""
        ...

    async def close(self) -> None:
        """Release everything: connections, files, threads. No request may follow."""
        ...

    async def create(self, name: str, *, ttl: float | None, content_type: str | None) -> StreamInfo:
        """Create a stream; :class:`StreamExists`, :class:`LimitExceeded`, :class:`BadRequest`."""
        ...

    async def get(self, name: str) -> StreamInfo | None:
        """The stream's metadata, or ``None`` if it is absent (or expired)."""
        ...

    async def append(self, name: str, records: list[bytes]) -> int:
        """Append ``records`` as one batch; return the offset of the first."""
        ...

    async def produce(
        self, name: str, records: list[bytes], producer_id: str, epoch: int, seq: int
    ) -> Produced:
        """An idempotent producer's batch: decide and append, atomically.

        Applies :func:`decide_produce` to the producer's stored state and,
        if it says so, appends ``records`` as one batch with the producer's
        new state stored with it, as one step even across processes that
        share the backend. A duplicate is acknowledged only once the batch
        it repeats is as durable as an append.
        """
        ...

    async def producer(self, name: str, producer_id: str) -> ProducerState | None:
        """What the stream has of an idempotent producer, or ``None``."""
        ...

    async def read(self, name: str, offset: int, max_records: int, max_bytes: int) -> Batch:
        """Records from ``offset`` on, within both bounds, with the stream's state.

        At least one record if any exist at ``offset`` (even one larger than
        ``max_bytes``); :class:`StreamNotFound` if the stream is absent.
        """
        ...

    async def tag_at(self, name: str, offset: int) -> str | None:
        """The lineage tag of the batch holding record ``offset``, or ``None`` if there is none."""
        ...

    async def finish(self, name: str) -> StreamInfo:
        """Mark the stream finished (no more appends); idempotent."""
        ...

    async def delete(self, name: str) -> None:
        """Delete the stream and its records."""
        ...

    async def expire(self, now: float) -> list[str]:
        """Free the streams whose TTL has passed by ``now``; return their names.

        One stream that cannot be freed must not keep the others from
        expiring. A backend whose engine expires streams itself returns ``[]``.
        """
        ...

    def subscribe(self, on_change: Callable[[str | None], None]) -> None:
        """Call ``on_change(name)`` when stream ``name`` may have changed through another process.

        ``on_change(None)``: anything may have changed (say, the backend's
        notification channel reconnected). A backend only this process
        writes never calls it. Not a coroutine.
        """
        ...


class _Stream:
    __slots__ = ("info", "producer_bytes", "producers")

    def __init__(self, info: StreamInfo) -> None:
        self.producer_bytes = 0  # what its producers' states count
        self.info = info
        self.producers: dict[str, ProducerState] = {}


class StreamTable:
    """The bookkeeping every storage shares: names, limits, metadata, producers.

    A backend subclasses it and keeps the records: ``_store_*`` hooks run
    after a request is validated and before the table changes, so a hook
    that raises leaves the table as it was. A stream whose TTL has passed
    is absent at once (``get`` is ``None``, other requests raise
    :class:`StreamNotFound`, ``create`` replaces it); ``expire`` frees it.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._streams: dict[str, _Stream] = {}
        self._total_bytes = 0

    def _live(self, name: str) -> _Stream | None:
        """The stream, unless it is absent or its TTL has passed."""
        stream = self._streams.get(name)
        if stream is not None and stream.info.ttl is not None and stream.info.expired(time.time()):
            return None
        return stream

    def _stream(self, name: str) -> _Stream:
        stream = self._live(name)
        if stream is None:
            raise StreamNotFound(f"no stream named {quote(name)}")
        return stream

    def _add(self, info: StreamInfo) -> _Stream:
        """Put a stream (new or recovered) in the table."""
        stream = self._streams[info.name] = _Stream(info)
        self._total_bytes += _cost(stream)
        return stream

    def create(self, name: str, *, ttl: float | None, content_type: str | None) -> StreamInfo:
        if name in self._streams:
            if self._live(name) is not None:
                raise StreamExists(f"stream {quote(name)} exists")
            self._remove(name)  # expired, not swept yet
        try:
            ttl = check_ttl(ttl)
            content_type = check_content_type(content_type)
            size = len(name.encode())
        except (TypeError, ValueError) as exc:
            raise BadRequest(str(exc)) from exc
        if not 1 <= size <= self.limits.max_name:
            raise BadRequest(
                f"a stream name must be 1..{self.limits.max_name} bytes (UTF-8), not {size}"
            )
        if len(self._streams) >= self.limits.max_streams:
            self.expire(time.time())  # make room from streams past their TTL
        if len(self._streams) >= self.limits.max_streams:
            raise LimitExceeded(f"the hub holds max_streams={self.limits.max_streams}")
        info = StreamInfo(name, content_type=content_type, ttl=ttl)
        self._store_create(info)
        return self._add(info).info

    def get(self, name: str) -> StreamInfo | None:
        stream = self._live(name)
        return None if stream is None else stream.info

    def names(self) -> list[str]:
        return [name for name in self._streams if self._live(name) is not None]

    def append(
        self, name: str, records: list[bytes], producer: tuple[str, int, int] | None = None
    ) -> int:
        stream = self._stream(name)
        info = stream.info
        if info.finished:
            raise StreamFinished(f"stream {quote(name)} is finished; no more appends")
        size = 0
        for record in records:
            if len(record) > self.limits.max_record:
                raise LimitExceeded(
                    f"record of {len(record)} bytes exceeds max_record={self.limits.max_record}"
                )
            size += len(record)
        batch = records_size(records)
        if batch > self.limits.max_batch:
            raise LimitExceeded(
                f"a batch of {len(records)} records ({batch} bytes with their lengths)"
                f" exceeds max_batch={self.limits.max_batch}"
            )
        cost = size + RECORD_OVERHEAD * len(records)
        new_producer = ""
        if producer is not None and producer[0] not in stream.producers:
            state_cost = _producer_cost(producer[0])
            cost += state_cost
            new_producer = f" and a new producer's state ({state_cost} bytes)"
        if self._total_bytes + cost > self.limits.max_total_bytes:
            raise LimitExceeded(
                f"appending {len(records)} records of {size} bytes (+{RECORD_OVERHEAD} each)"
                f"{new_producer} would exceed max_total_bytes={self.limits.max_total_bytes}"
            )
        first = info.next_offset
        self._store_append(name, records, producer)
        self._appended(stream, records, size, producer)
        return first

    def _appended(
        self,
        stream: _Stream,
        records: list[bytes],
        size: int,
        producer: tuple[str, int, int] | None,
    ) -> None:
        """Account for records appended (or recovered) at the stream's end."""
        info = stream.info
        if producer is not None:
            producer_id, epoch, seq = producer
            if producer_id not in stream.producers:
                state_cost = _producer_cost(producer_id)
                stream.producer_bytes += state_cost
                self._total_bytes += state_cost
            stream.producers[producer_id] = ProducerState(
                epoch, seq, info.next_offset, len(records)
            )
        info.next_offset += len(records)
        info.size_bytes += size
        self._total_bytes += size + RECORD_OVERHEAD * len(records)

    def read(self, name: str, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        info = self._stream(name).info
        stop = min(info.next_offset, offset + max_records)
        if offset >= stop:
            return []
        return self._store_read(name, offset, stop, max_bytes)

    def finish(self, name: str) -> StreamInfo:
        info = self._stream(name).info
        if not info.finished:
            self._store_finish(name)
            info.finished = True
        return info

    def delete(self, name: str) -> None:
        self._stream(name)
        self._remove(name)

    def _remove(self, name: str) -> None:
        stream = self._streams[name]
        self._store_delete(name)
        del self._streams[name]
        self._total_bytes -= _cost(stream)

    def producer(self, name: str, producer_id: str) -> ProducerState | None:
        return self._stream(name).producers.get(producer_id)

    def expire(self, now: float) -> list[str]:
        gone = []
        for name, stream in list(self._streams.items()):
            try:
                if not stream.info.expired(now):
                    continue
                self._remove(name)
            except Exception:
                # One stream that cannot be removed must not stop the others
                # expiring; it is retried at the next sweep.
                logger.exception("could not expire stream %r", name)
                continue
            gone.append(name)
        return gone

    def close(self) -> None:
        self._streams.clear()
        self._total_bytes = 0

    # -- what a backend provides -------------------------------------------

    def _store_create(self, info: StreamInfo) -> None:
        raise NotImplementedError

    def _store_append(
        self, name: str, records: list[bytes], producer: tuple[str, int, int] | None
    ) -> None:
        raise NotImplementedError

    def _store_read(self, name: str, start: int, stop: int, max_bytes: int) -> list[bytes]:
        """Records ``start`` up to ``stop`` (at least one), within ``max_bytes``."""
        raise NotImplementedError

    def _store_finish(self, name: str) -> None:
        raise NotImplementedError

    def _store_delete(self, name: str) -> None:
        raise NotImplementedError


def _cost(stream: _Stream) -> int:
    """What a stream counts against ``max_total_bytes``."""
    info = stream.info
    return info.size_bytes + RECORD_OVERHEAD * info.next_offset + stream.producer_bytes


def _producer_cost(producer_id: str) -> int:
    return PRODUCER_OVERHEAD + len(producer_id.encode())


def take_within(sizes: Iterable[int], max_bytes: int) -> int:
    """How many of the leading ``sizes`` fit in ``max_bytes`` (at least one)."""
    count = total = 0
    for size in sizes:
        total += size
        if count and total > max_bytes:
            break
        count += 1
    return count


class MemoryStorage(StreamTable):
    """Streams held in memory; gone when the process ends."""

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(limits)
        self._records: dict[str, list[bytes]] = {}

    def _store_create(self, info: StreamInfo) -> None:
        self._records[info.name] = []

    def _store_append(
        self, name: str, records: list[bytes], producer: tuple[str, int, int] | None
    ) -> None:
        self._records[name].extend(records)

    def _store_read(self, name: str, start: int, stop: int, max_bytes: int) -> list[bytes]:
        records = self._records[name][start:stop]
        return records[: take_within(map(len, records), max_bytes)]

    def _store_finish(self, name: str) -> None:
        pass

    def _store_delete(self, name: str) -> None:
        del self._records[name]

    def close(self) -> None:
        super().close()
        self._records.clear()
