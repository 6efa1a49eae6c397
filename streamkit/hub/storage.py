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

import asyncio
import contextlib
import logging
import os
import random
import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, NamedTuple, Protocol

from streamkit._units import MiB
from streamkit.errors import StreamkitError
from streamkit.hub.protocol import Records, check_content_type, check_ttl, quote, records_size

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
    "check_batch",
    "check_new_stream",
    "decide_produce",
    "new_tag",
]

logger = logging.getLogger("streamkit.hub")


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

    #: Consecutive records from the offset asked for; none at the end. A
    #: backend that keeps batches packed returns a :class:`Records`, which
    #: the hub sends on as it is.
    records: Sequence[bytes]
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
                f"producer {quote(producer_id)} epoch {epoch} is fenced off by epoch {state.epoch}"
            )
        if epoch == state.epoch:
            if seq <= state.seq:
                # A retry of a batch already appended: exactly once.
                return Produced(state.first_offset if seq == state.seq else None, True)
            if seq != state.seq + 1:
                raise HubError(
                    f"producer {quote(producer_id)} sent batch {seq} after batch {state.seq}: a gap"
                )
            return None
    if seq != 0:  # a new producer, or a new epoch
        raise HubError(
            f"producer {quote(producer_id)} epoch {epoch} must start at batch 0, not {seq}"
        )
    return None


def check_new_stream(
    name: str, ttl: object, content_type: object, limits: Limits
) -> tuple[float | None, str | None]:
    """A new stream's name, ``ttl`` and ``content_type``, checked: ``(ttl, content_type)``.

    Raises :class:`BadRequest` for a bad one. Every backend's ``create``
    checks with it, before it stores anything.
    """
    try:
        ttl = check_ttl(ttl)
        content_type = check_content_type(content_type)
        size = len(name.encode())
    except (TypeError, ValueError) as exc:
        raise BadRequest(str(exc)) from exc
    if not 1 <= size <= limits.max_name:
        raise BadRequest(f"a stream name must be 1..{limits.max_name} bytes (UTF-8), not {size}")
    return ttl, content_type


def check_batch(records: Records, limits: Limits) -> None:
    """Raise :class:`LimitExceeded` for a record over ``max_record`` or a batch over ``max_batch``.

    Every backend's ``append`` and ``produce`` check with it, before they
    store anything.
    """
    largest = records.largest()
    if largest > limits.max_record:
        raise LimitExceeded(f"record of {largest} bytes exceeds max_record={limits.max_record}")
    batch = records_size(records)
    if batch > limits.max_batch:
        raise LimitExceeded(
            f"a batch of {len(records)} records ({batch} bytes with their lengths)"
            f" exceeds max_batch={limits.max_batch}"
        )


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

    async def append(self, name: str, records: Sequence[bytes]) -> int:
        """Append ``records`` as one batch; return the offset of the first.

        The hub passes a :class:`~streamkit.hub.protocol.Records`: the
        batch packed as it came (``records.body``), to store as it is.
        """
        ...

    async def produce(
        self, name: str, records: Sequence[bytes], producer_id: str, epoch: int, seq: int
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


class _Entry:
    """A batch (or a finish) in a stream's bookkeeping, from its reservation to its commit.

    A local backend reserves an entry when a request is validated (so the
    next request sees its offsets and producer state), stores it, then
    commits it (readers see it from then on); entries commit in order.
    ``done`` is set when it commits or fails, for a backend whose storing
    takes time (the file log); ``None`` for one that commits at once.
    """

    __slots__ = ("cost", "count", "done", "finish", "first", "producer_id", "size", "state", "tag")

    def __init__(self, first: int, count: int, size: int, cost: int, tag: str) -> None:
        self.first = first
        self.count = count
        self.size = size  # bytes of its records
        self.cost = cost  # what it counts against max_total_bytes
        self.tag = tag
        self.producer_id: str | None = None
        self.state: ProducerState | None = None  # the producer's state once it is committed
        self.finish = False
        self.done: asyncio.Future[None] | None = None


class _Stream:
    """A stream in a :class:`StreamTable`: its committed state and what is being stored.

    ``info``, ``producers``, ``starts`` and ``tags`` are committed: what
    readers see. ``end``, ``size``, ``finishing`` and ``pending_producers``
    include the entries reserved and not yet committed (``pending``), which
    new requests are decided against.
    """

    __slots__ = (
        "cost",
        "data",
        "end",
        "finishing",
        "info",
        "pending",
        "pending_producers",
        "producers",
        "removed",
        "size",
        "starts",
        "tags",
    )

    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.producers: dict[str, ProducerState] = {}
        self.starts = array("q")  # first offset of each stored batch with records
        self.tags: list[str] = []  # and its lineage tag
        self.end = info.next_offset
        self.size = info.size_bytes
        self.finishing = info.finished
        self.pending: deque[_Entry] = deque()
        self.pending_producers: dict[str, ProducerState] = {}
        self.cost = 0  # what it counts against max_total_bytes, pending entries included
        self.removed = False
        self.data: Any = None  # the backend's own: the records, or the log file

    def producer_state(self, producer_id: str) -> ProducerState | None:
        """The producer's state, counting the entries not yet committed."""
        state = self.pending_producers.get(producer_id)
        return self.producers.get(producer_id) if state is None else state


class StreamTable:
    """The bookkeeping every local storage shares: names, limits, metadata, producers, tags.

    A backend subclasses it and keeps the records: ``_store_*`` hooks run
    once a request is validated and its entry reserved; each entry is then
    committed (:meth:`_commit`, in order) or, if storing it failed, the
    stream's uncommitted entries are rolled back (:meth:`_rollback`).
    Everything but the hooks runs without yielding, so requests are decided
    one at a time and in order. A stream whose TTL has passed is absent at
    once (``get`` is ``None``, other requests raise :class:`StreamNotFound`,
    ``create`` replaces it); ``expire`` frees it.
    """

    recheck_interval: float | None = None

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._streams: dict[str, _Stream] = {}
        self._total_bytes = 0
        self._random = random.Random()  # seeded from os.urandom

    def _new_tag(self) -> str:
        """A new batch's tag, as :func:`new_tag` makes them, without a system call."""
        return f"{self._random.getrandbits(64):016x}"

    async def start(self) -> None:
        """Nothing to connect to."""

    def subscribe(self, on_change: Callable[[str | None], None]) -> None:
        """Every change goes through this process: ``on_change`` is never called."""

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
        return stream

    async def create(self, name: str, *, ttl: float | None, content_type: str | None) -> StreamInfo:
        if name in self._streams:
            if self._live(name) is not None:
                raise StreamExists(f"stream {quote(name)} exists")
            await self._remove(name)  # expired, not swept yet
            if name in self._streams:  # created again while it was removed
                raise StreamExists(f"stream {quote(name)} exists")
        ttl, content_type = check_new_stream(name, ttl, content_type, self.limits)
        if len(self._streams) >= self.limits.max_streams:
            await self.expire(time.time())  # make room from streams past their TTL
        if name in self._streams:
            raise StreamExists(f"stream {quote(name)} exists")
        if len(self._streams) >= self.limits.max_streams:
            raise LimitExceeded(f"the hub holds max_streams={self.limits.max_streams}")
        stream = self._add(StreamInfo(name, content_type=content_type, ttl=ttl))
        try:
            await self._store_create(stream)
        except BaseException:
            if self._streams.get(name) is stream:
                del self._streams[name]
                self._total_bytes -= stream.cost
            stream.removed = True
            raise
        return stream.info

    async def get(self, name: str) -> StreamInfo | None:
        stream = self._live(name)
        return None if stream is None else stream.info

    async def names(self) -> list[str]:
        """The streams present (not expired)."""
        return [name for name in self._streams if self._live(name) is not None]

    async def append(self, name: str, records: Sequence[bytes]) -> int:
        stream = self._stream(name)
        packed = Records.pack(records)
        entry = self._reserve(stream, packed, None)
        await self._store_append(stream, entry, packed)
        return entry.first

    async def produce(
        self, name: str, records: Sequence[bytes], producer_id: str, epoch: int, seq: int
    ) -> Produced:
        records = Records.pack(records)
        while True:
            stream = self._stream(name)
            state = stream.producer_state(producer_id)
            decided = decide_produce(state, producer_id, epoch, seq)
            if decided is None:
                entry = self._reserve(stream, records, (producer_id, epoch, seq))
                await self._store_append(stream, entry, records)
                return Produced(entry.first, False)
            if not stream.pending:
                return decided
            # A retry of a batch not yet committed: acknowledged once it is
            # (decided again then: if storing it failed, this one is appended).
            await _settled(stream)

    def _reserve(
        self, stream: _Stream, records: Records, producer: tuple[str, int, int] | None
    ) -> _Entry:
        """Validate an append and take its place at the stream's end; return its entry."""
        self._check_writable(stream)
        if stream.finishing:
            raise StreamFinished(f"stream {quote(stream.info.name)} is finished; no more appends")
        limits = self.limits
        check_batch(records, limits)
        size = records.size
        cost = size + RECORD_OVERHEAD * len(records)
        new_producer = ""
        if producer is not None and stream.producer_state(producer[0]) is None:
            state_cost = _producer_cost(producer[0])
            cost += state_cost
            new_producer = f" and a new producer's state ({state_cost} bytes)"
        if self._total_bytes + cost > limits.max_total_bytes:
            raise LimitExceeded(
                f"appending {len(records)} records of {size} bytes (+{RECORD_OVERHEAD} each)"
                f"{new_producer} would exceed max_total_bytes={limits.max_total_bytes}"
            )
        entry = _Entry(stream.end, len(records), size, cost, self._new_tag())
        if producer is not None:
            producer_id, epoch, seq = producer
            entry.producer_id = producer_id
            entry.state = stream.pending_producers[producer_id] = ProducerState(
                epoch, seq, stream.end, len(records)
            )
        self._reserved(stream, entry)
        return entry

    def _reserved(self, stream: _Stream, entry: _Entry) -> None:
        stream.end += entry.count
        stream.size += entry.size
        stream.cost += entry.cost
        self._total_bytes += entry.cost
        stream.pending.append(entry)

    def _commit(self, stream: _Stream, entry: _Entry) -> None:
        """Make the stream's oldest pending entry, ``entry``, what readers see."""
        assert stream.pending[0] is entry
        stream.pending.popleft()
        info = stream.info
        if entry.count:
            stream.starts.append(entry.first)
            stream.tags.append(entry.tag)
            info.next_offset += entry.count
            info.size_bytes += entry.size
        if entry.producer_id is not None:
            assert entry.state is not None
            stream.producers[entry.producer_id] = entry.state
            if stream.pending_producers.get(entry.producer_id) is entry.state:
                del stream.pending_producers[entry.producer_id]
        if entry.finish:
            info.finished = True
        if entry.done is not None and not entry.done.done():
            entry.done.set_result(None)

    def _rollback(self, stream: _Stream, error: BaseException) -> None:
        """Drop every entry of ``stream`` not committed: storing them failed with ``error``."""
        cost = sum(entry.cost for entry in stream.pending)
        if not stream.removed:
            self._total_bytes -= cost
        stream.cost -= cost
        info = stream.info
        stream.end, stream.size, stream.finishing = info.next_offset, info.size_bytes, info.finished
        stream.pending_producers.clear()
        pending, stream.pending = stream.pending, deque()
        for entry in pending:
            if entry.done is not None and not entry.done.done():
                entry.done.set_exception(error)

    async def producer(self, name: str, producer_id: str) -> ProducerState | None:
        stream = self._stream(name)
        if stream.pending:
            await _settled(stream)  # where the producer is once its batches are stored
        return stream.producers.get(producer_id)

    async def read(self, name: str, offset: int, max_records: int, max_bytes: int) -> Batch:
        stream = self._stream(name)
        info = stream.info
        stop = min(info.next_offset, offset + max_records)
        if offset >= stop:
            return Batch([], info, None)
        records, tag = await self._store_read(stream, offset, stop, max_bytes)
        return Batch(records, info, tag)

    async def tag_at(self, name: str, offset: int) -> str | None:
        stream = self._stream(name)
        if not 0 <= offset < stream.info.next_offset:
            return None
        return self._tag(stream, offset)

    @staticmethod
    def _tag(stream: _Stream, offset: int) -> str:
        """The tag of the committed batch holding record ``offset``."""
        return stream.tags[bisect_right(stream.starts, offset) - 1]

    async def finish(self, name: str) -> StreamInfo:
        while True:
            stream = self._stream(name)
            if not stream.finishing:
                self._check_writable(stream)
                entry = _Entry(stream.end, 0, 0, 0, "")
                entry.finish = True
                stream.finishing = True
                self._reserved(stream, entry)
                await self._store_finish(stream, entry)
                return stream.info
            if stream.info.finished:
                return stream.info
            await _settled(stream)  # another finish is being stored

    async def delete(self, name: str) -> None:
        self._stream(name)
        await self._remove(name)

    async def _remove(self, name: str) -> None:
        stream = self._streams.pop(name)
        stream.removed = True
        self._total_bytes -= stream.cost
        await self._store_delete(stream)

    async def expire(self, now: float) -> list[str]:
        gone = []
        for name, stream in list(self._streams.items()):
            try:
                if not stream.info.expired(now) or self._streams.get(name) is not stream:
                    continue
                await self._remove(name)
            except Exception:
                # One stream that cannot be removed must not stop the others
                # expiring; it is retried at the next sweep.
                logger.exception("could not expire stream %r", name)
                continue
            gone.append(name)
        return gone

    async def close(self) -> None:
        self._streams.clear()
        self._total_bytes = 0

    def _replay_batch(
        self,
        stream: _Stream,
        count: int,
        size: int,
        producer: tuple[str, int, int] | None,
        tag: str,
    ) -> None:
        """Account for a batch a backend recovered (limits are not checked: it is stored)."""
        cost = size + RECORD_OVERHEAD * count
        entry = _Entry(stream.end, count, size, cost, tag)
        if producer is not None:
            producer_id, epoch, seq = producer
            if stream.producer_state(producer_id) is None:
                entry.cost += _producer_cost(producer_id)
            entry.producer_id = producer_id
            entry.state = ProducerState(epoch, seq, stream.end, count)
        self._reserved(stream, entry)
        self._commit(stream, entry)

    def _replay_finish(self, stream: _Stream) -> None:
        """Account for a finish a backend recovered."""
        stream.finishing = stream.info.finished = True

    # -- what a backend provides -------------------------------------------

    def _check_writable(self, stream: _Stream) -> None:
        """Raise a :class:`HubError` if the stream can take no appends now."""

    async def _store_create(self, stream: _Stream) -> None:
        raise NotImplementedError

    async def _store_append(self, stream: _Stream, entry: _Entry, records: Records) -> None:
        """Store ``entry``'s records and commit it (or roll back and raise)."""
        raise NotImplementedError

    async def _store_finish(self, stream: _Stream, entry: _Entry) -> None:
        """Store that the stream is finished and commit ``entry`` (or roll back and raise)."""
        raise NotImplementedError

    async def _store_read(
        self, stream: _Stream, start: int, stop: int, max_bytes: int
    ) -> tuple[Records, str]:
        """Committed records ``start`` up to ``stop`` (at least one), within ``max_bytes``.

        Returns them and the tag of the batch holding the last.
        """
        raise NotImplementedError

    async def _store_delete(self, stream: _Stream) -> None:
        raise NotImplementedError


async def _settled(stream: _Stream) -> None:
    """Wait until every entry pending in ``stream`` now has committed or failed."""
    done = stream.pending[-1].done
    if done is not None:
        with contextlib.suppress(Exception):
            await asyncio.shield(done)


def _producer_cost(producer_id: str) -> int:
    return PRODUCER_OVERHEAD + len(producer_id.encode())


def take_within(sizes: Iterable[int], max_bytes: int) -> int:
    """How many of the leading ``sizes`` fit in ``max_bytes`` (at least one, if any)."""
    totals = list(accumulate(sizes))
    return max(bisect_right(totals, max_bytes), min(1, len(totals)))


class MemoryStorage(StreamTable):
    """Streams held in memory; gone when the process ends.

    Each appended batch is kept as it came (packed, with its offset and
    tag); a read slices across batches. Every request is served without
    yielding.
    """

    async def _store_create(self, stream: _Stream) -> None:
        stream.data = []  # the batches with records, one per entry of stream.starts

    async def _store_append(self, stream: _Stream, entry: _Entry, records: Records) -> None:
        if records:
            stream.data.append(records)
        self._commit(stream, entry)

    async def _store_finish(self, stream: _Stream, entry: _Entry) -> None:
        self._commit(stream, entry)

    async def _store_read(
        self, stream: _Stream, start: int, stop: int, max_bytes: int
    ) -> tuple[Records, str]:
        batches: list[Records] = stream.data
        starts = stream.starts
        index = bisect_right(starts, start) - 1
        parts: list[Records] = []
        offset = start
        budget = max_bytes
        while True:
            low = offset - starts[index]
            part = batches[index][low : low + stop - offset]
            fits = part.fit(budget) or (0 if parts else 1)  # at least one record in all
            if fits:
                taken = part[:fits]
                parts.append(taken)
                budget -= taken.size
                offset += fits
            if fits < len(part) or offset >= stop:
                return Records.join(parts), stream.tags[index if fits else index - 1]
            index += 1

    async def _store_delete(self, stream: _Stream) -> None:
        stream.data = None
