"""The hub client: create, append, read and tail named streams; idempotent producers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import os
import random
import ssl as _ssl
from bisect import bisect_left
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from dataclasses import dataclass
from itertools import accumulate, repeat
from typing import Any, Literal, NamedTuple, Unpack

from streamkit._lifecycle import AsyncClosable
from streamkit._units import MiB
from streamkit.errors import ConnectionLost, DecodeError, SessionError, StreamkitError
from streamkit.hub.protocol import (
    check_content_type,
    check_counter,
    check_flag,
    check_name,
    check_offset,
    check_producer_id,
    check_seconds,
    check_ttl,
    check_window,
    decode_message,
    decode_records,
    encode_message,
)
from streamkit.hub.storage import (
    BadRequest,
    HubError,
    LimitExceeded,
    ProducerFenced,
    StorageUnavailable,
    StreamExists,
    StreamFinished,
    StreamGone,
    StreamNotFound,
)
from streamkit.net import Connector, Endpoint
from streamkit.session import ClientSession, SessionOptions, SessionSettings
from streamkit.session.client import connect_resumable_endpoint
from streamkit.session.settings import resolve_settings

__all__ = ["HubClient", "Producer", "Reader", "Record", "StreamStatus", "connect", "connect_unix"]

_ERRORS: dict[str, type[HubError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        HubError,
        LimitExceeded,
        ProducerFenced,
        StorageUnavailable,
        StreamExists,
        StreamFinished,
        StreamGone,
        StreamNotFound,
    )
}

logger = logging.getLogger("streamkit.hub")

#: Bytes of a record's length in a batch (see hub.protocol).
_RECORD_LENGTH = 4
#: Seconds to finish a resumable source's stream once the source stops.
_FINISH_TIMEOUT = 10.0
#: Seconds a client keeps trying to get back to its hub (see :func:`connect`).
DEFAULT_RECONNECT_TIMEOUT = 60.0
#: Sessions in a row a request may be lost with (written, unanswered) before
#: it fails: a request that makes the hub crash must not do so forever.
_MAX_LOSSES = 3

_Reply = tuple[dict[str, Any], memoryview]


class _SessionLost(StreamkitError):
    """The session a request went out on was lost before its reply came.

    ``written``: whether the request may have reached the hub, that is
    was written to a connection (else it never left the client).
    """

    def __init__(self, why: StreamkitError | None, written: bool) -> None:
        super().__init__("the hub lost this client's session")
        self.why = why
        self.written = written


def _outcome_unknown(header: dict[str, Any], why: StreamkitError | None) -> str:
    reason = "the hub closed the session" if why is None else str(why)
    return (
        f"{header['op']} of stream {header.get('name')!r} was in flight when the hub lost"
        f" this client's session ({reason}): whether the hub applied it is unknown"
        " (look with status() or read() before doing it again)"
    )


class Record(NamedTuple):
    """One record of a stream: its offset and its bytes."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """A stream's state: ``"open"`` or ``"finished"``, its next offset and TTL."""

    name: str
    state: Literal["open", "finished"]
    next_offset: int
    ttl: float | None
    expires_at: float | None
    content_type: str | None

    @property
    def finished(self) -> bool:
        return self.state == "finished"


def _status(fields: dict[str, Any]) -> StreamStatus:
    return StreamStatus(
        name=fields["name"],
        state=fields["state"],
        next_offset=fields["next_offset"],
        ttl=fields["ttl"],
        expires_at=fields["expires_at"],
        content_type=fields["content_type"],
    )


def _data(record: object) -> bytes:
    if not isinstance(record, bytes | bytearray | memoryview):
        raise TypeError(f"a record must be bytes-like, not {type(record).__name__}")
    return bytes(record)


def _at_least_one(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, not {value!r}")
    if value < 1:
        raise ValueError(f"{field} must be >= 1, not {value}")
    return value


def _error(header: dict[str, Any]) -> HubError:
    return _ERRORS.get(header.get("code", ""), HubError)(header.get("message", "hub error"))


class _Message(NamedTuple):
    """A records message a reader holds: its first offset, records, body size, lineage tag."""

    offset: int
    records: list[bytes]
    size: int
    tag: str | None


#: The record type append_many_nowait's hot path takes as it is (a set: one compare).
_BYTES = frozenset((bytes,))

#: Makes a ``Record`` in C: ``_new_record(Record, (offset, data))``.
_new_record = tuple.__new__


class Reader(AsyncClosable):
    """Records of one stream from an offset: ``async for record in reader``.

    With ``live=True`` it tails new records and stops when the stream is
    finished; without, it stops at the current end. ``caught_up`` tells a
    live reader has yielded every record up to the stream's current end
    (more may come); ``finished`` that the stream was finished and every
    record yielded; ``next_offset`` is the offset of the next record it
    yields, where a new reader would continue. Reading a stream that is
    deleted or expires raises :class:`StreamGone`. ``close()`` (or leaving
    ``async with``) stops it.

    The hub sends at most about ``window`` bytes of records ahead of what
    the reader has yielded (see :meth:`HubClient.read`), so a reader that
    stops iterating holds bounded memory and the hub waits for it.

    When its client opens a new session (the hub lost the old one, see
    :class:`HubClient`), the read is issued again from ``next_offset``:
    records buffered from the old session are dropped and read again, so
    the reader yields no gap and no duplicate (a ``"now"`` reader that had
    not heard from the hub yet asks for ``"now"`` again). A stream the hub
    no longer has then (a hub without ``data_dir`` restarted) raises
    :class:`StreamNotFound`; one deleted and created again meanwhile, or
    whose records the reader has read are no longer the stream's (the hub
    lost them, and maybe stored others at their offsets), :class:`StreamGone`.
    """

    def __init__(self, client: HubClient, request: int, header: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._header = header
        self._started = False  # iteration began: the read was (or is being) issued
        self._session: ClientSession | None = None  # the session its read went out on
        self._reissued = False  # its read went out again on a new session
        self._created: float | None = None  # when its stream was created, the hub says
        offset = header["offset"]
        # A "now" read learns where the stream's end was from the hub.
        self._known = offset != "now"
        # The records being handed out: those of one message, from _position
        # on; _offset is the offset of its first (of the next record, when
        # there is none), so next_offset is _offset + _position. Records are
        # kept as bytes and made Record objects only as they are yielded:
        # thousands alive at once would keep the garbage collector busy.
        self._current: list[bytes] = []
        self._position = 0
        self._offset: int = offset if self._known else 0
        self._current_size = 0
        self._current_tag: str | None = None
        self._queue: deque[_Message] = deque()  # the messages after it
        # The last offset and tag of the last records message handed out in
        # full: what a re-issued read names as the history it continues.
        self._lineage: tuple[int, str] | None = None
        self._caught_up = False  # the server said so (records may still be buffered)
        self._finished = False
        self._ended = False
        self._error: StreamkitError | None = None
        self._event = asyncio.Event()
        # Flow control: the body sizes of the records messages handed out
        # in full, and what was reported to the hub.
        window = header.get("window")
        self._report_every = None if window is None else max(1, window // 2)
        self._consumed = self._reported = 0

    @property
    def next_offset(self) -> int:
        """The offset of the next record this reader yields."""
        return self._offset + self._position

    def _issue_on(self, session: ClientSession) -> bytes:
        """The read request for ``session``, from ``next_offset``; forget the last session's.

        What an earlier session sent and the reader has not yielded is
        dropped (it comes again), and the window counts from zero, as the
        hub's new read does. The request names the history the reader has
        yielded (``after``: the last offset and tag of the message its last
        record came in), so a hub that no longer holds it says so.
        """
        self._reissued = self._session is not None
        self._session = session
        self._lineage = self._after()
        self._offset, self._position, self._current = self.next_offset, 0, []
        self._queue.clear()
        self._consumed = self._reported = 0
        self._caught_up = False
        header = {**self._header, "offset": self._offset if self._known else "now"}
        if self._created is not None:
            header["created"] = self._created  # the stream it was reading, not a new one
        if self._lineage is not None:
            header["after"] = {"offset": self._lineage[0], "tag": self._lineage[1]}
        return encode_message(header)

    def _after(self) -> tuple[int, str] | None:
        """The last offset and tag of the message the last record yielded came in.

        ``None`` if it came untagged (from a hub that tags nothing), or if
        no record was yielded yet.
        """
        if self._position:  # part of the current message was handed out
            tag = self._current_tag
            return None if tag is None else (self._offset + len(self._current) - 1, tag)
        return self._lineage

    def _on_message(self, header: dict[str, Any], body: memoryview, message: bytes) -> None:
        op = header["op"]
        created = header.get("created")
        if created is not None:
            self._created = created
        if op == "records":
            first = header["offset"]
            if not self._known:
                self._known, self._offset = True, first
            records = decode_records(body, message)
            if records:
                self._queue.append(_Message(first, records, len(body), header.get("tag")))
            self._caught_up = False
        elif op == "caught_up":
            self._caught_up = True
            self._at_end(header["next_offset"])
        elif op == "end":
            self._ended = True
            self._finished = bool(header.get("finished"))
            self._at_end(header["next_offset"])
            self._client._reads.pop(self._request, None)
        elif op == "error":
            error = _error(header)
            if self._reissued and isinstance(error, StreamNotFound):
                error = type(error)(
                    f"{error} (asked again at offset {self.next_offset} on a new session,"
                    " after the hub lost this client's session: a hub without data_dir"
                    " loses its streams when it restarts)"
                )
            self._fail(error)
        self._event.set()

    def _buffered(self) -> bool:
        """Whether records received are still to be yielded."""
        return self._position < len(self._current) or bool(self._queue)

    def _at_end(self, next_offset: int) -> None:
        # Buffered records move next_offset as they are yielded; without
        # any, the server says where the end is (for a "now" reader).
        if not self._buffered():
            self._handed_out()
            self._known, self._offset = True, next_offset

    @property
    def caught_up(self) -> bool:
        """Whether a live reader has yielded every record up to the current end."""
        return self._caught_up and not self._buffered()

    @property
    def finished(self) -> bool:
        """Whether the stream was finished and this reader yielded its every record."""
        return self._finished and not self._buffered()

    def _fail(self, error: StreamkitError) -> None:
        self._error = error
        self._client._reads.pop(self._request, None)
        self._event.set()

    def __aiter__(self) -> Reader:
        return self

    async def __anext__(self) -> Record:
        position = self._position
        current = self._current
        if position < len(current):  # the hot path: a record at hand
            self._position = position + 1
            return _new_record(Record, (self._offset + position, current[position]))
        return await self._next_message()

    async def batches(self) -> AsyncIterator[tuple[int, list[bytes]]]:
        """Records in bulk as they arrive: ``async for offset, records in reader.batches()``.

        Each item is the offset of a run of consecutive records and their
        bytes (at least one): the records of one message of the hub, or
        what is left of one. For consumers that take records in bulk: one
        ``await`` per run instead of one per record, and no ``Record``
        object each. Everything else is as iterating the reader (which a
        consumer may also do between runs): ``next_offset`` moves past each
        run yielded, and the iteration ends, or raises, as the reader's does.
        """
        while True:
            position, current = self._position, self._current
            if position < len(current):
                self._position = len(current)
                # A list of its own: the reader keeps its own.
                yield self._offset + position, current[position:]
                continue
            try:
                await self._next_message()
            except StopAsyncIteration:
                return
            self._position = 0  # the message's first record comes with the rest

    async def _next_message(self) -> Record:
        """The first record of the next message, once the current one is handed out."""
        if not self._started:
            self._started = True
            await self._client._issue(self)
        if self._current:
            self._handed_out()
            if self._report_every is not None and (
                self._consumed - self._reported >= self._report_every
            ):
                await self._report()
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        message = self._queue.popleft()
        self._offset, self._current, self._current_size, self._current_tag = message
        self._position = 1
        return _new_record(Record, (message.offset, message.records[0]))

    def _handed_out(self) -> None:
        """The current message's records were all yielded: count it consumed."""
        current = self._current
        if not current:
            return
        last = self._offset + len(current) - 1
        self._offset, self._position, self._current = last + 1, 0, []
        self._consumed += self._current_size
        tag = self._current_tag
        self._lineage = None if tag is None else (last, tag)

    async def _report(self) -> None:
        """Tell the hub what was consumed, so it sends more."""
        self._reported = self._consumed
        if self._request in self._client._reads and self._session is not None:
            await self._client._send_now(
                self._session, {"op": "consumed", "id": self._request, "bytes": self._consumed}
            )

    async def close(self) -> None:
        """Stop reading (the server stops sending)."""
        session = self._session
        if self._client._reads.pop(self._request, None) is not None and session is not None:
            await self._client._send_now(session, {"op": "cancel", "id": self._request})
        self._ended = True
        self._event.set()


class _Batch:
    """A producer's batch on its way: its records, their numbers, its sequence once it has one."""

    __slots__ = ("first", "future", "losses", "records", "request", "seq", "session")

    def __init__(self, records: list[bytes], first: int) -> None:
        self.records = records
        self.first = first  # the producer's number of its first record
        self.seq: int | None = None
        # Once sent: the request, the session it went out on, its reply.
        self.request = 0
        self.session: ClientSession | None = None
        self.future: asyncio.Future[_Reply] | None = None
        self.losses = 0  # sessions lost in a row with it written and unanswered


class Producer(AsyncClosable):
    """An idempotent producer: batched appends that are exactly-once across retries.

    ``append_nowait(data)`` adds a record to the current batch, sent after
    ``linger`` seconds or once ``max_batch_bytes`` are pending. Up to
    ``max_in_flight`` batches are sent before the first is answered; the
    hub applies them in order. Batches carry (producer id, epoch,
    sequence): the server drops a batch it already has, and fences off a
    producer with an older epoch (:class:`ProducerFenced`). When the hub
    loses the client's session, every batch not yet acknowledged is sent
    again on the next, in order, with its sequence. Errors go to
    ``on_error`` if given, and are raised by the next ``flush()`` or
    ``close()`` otherwise.

    A batch the hub refuses (a record over ``max_record``, a finished
    stream, ...) is not appended at all: its error is a :class:`HubError`
    whose ``records`` are the refused records and whose message numbers
    them (the producer's records count from 0). Later batches go on (those
    sent behind it are sent again, numbered anew).
    ``append_nowait`` after ``close()`` raises :class:`RuntimeError`.
    """

    def __init__(
        self,
        client: HubClient,
        name: str,
        producer_id: str,
        *,
        epoch: int,
        linger: float,
        max_batch_bytes: int,
        max_in_flight: int,
        on_error: Callable[[BaseException], object] | None,
    ) -> None:
        self._client = client
        self.name = name
        self.producer_id = producer_id
        self.epoch = epoch
        self.linger = linger
        self.max_batch_bytes = max_batch_bytes
        self.max_in_flight = max_in_flight
        self._on_error = on_error
        self._batch: list[bytes] = []
        self._room = max_batch_bytes  # bytes the pending batch may still take
        self._seq: int | None = None  # next batch's sequence, learned from the server
        self._timer: asyncio.TimerHandle | None = None
        self._unsent: deque[_Batch] = deque()  # batches to send, in order
        self._in_flight: deque[_Batch] = deque()  # sent, unanswered, in order
        self._pump: asyncio.Task[None] | None = None  # sends them, while there are any
        self._error: BaseException | None = None
        self._batched = 0  # records put in batches so far
        self._closed = False
        # append_nowait must raise (closed, or an error to raise): checked once.
        self._refusing = False

    def append_nowait(self, data: bytes) -> None:
        """Add a record to the pending batch; it is sent soon (see ``linger``).

        A batch holds at most ``max_batch_bytes`` (counting 4 bytes of
        length per record), or one larger record alone, so that it fits
        the session's ``max_frame`` whenever its records do.
        """
        if type(data) is bytes and self._timer is not None and not self._refusing:
            # The hot path: the pending batch (it has a timer) takes it and has room left.
            room = self._room - len(data) - _RECORD_LENGTH
            if room > 0:
                self._batch.append(data)
                self._room = room
                return
        self._append(data)

    def append_many_nowait(self, records: Iterable[bytes]) -> None:
        """Add ``records`` to the pending batch, in order: ``append_nowait`` of each, in one call.

        The same batches and checks as appending them one by one (a batch
        full at ``max_batch_bytes`` goes out and the next begins; a record
        that is not bytes-like raises :class:`TypeError`, and the records
        before it were added); for a producer that has its records in a
        list, without a Python call per record.
        """
        if type(records) is not list:
            records = list(records)
        if not set(map(type, records)) <= _BYTES:
            for data in records:  # each checked (and copied) as it comes
                self.append_nowait(data)
            return
        if self._timer is not None and not self._refusing:
            # The hot path: the pending batch (it has a timer) takes them all and has room left.
            room = self._room - sum(map(len, records)) - _RECORD_LENGTH * len(records)
            if room > 0:
                self._batch += records
                self._room = room
                return
        # totals[i]: what records[:i] take of a batch's room.
        sizes = map(operator.add, map(len, records), repeat(_RECORD_LENGTH))
        totals = list(accumulate(sizes, initial=0))
        start, count = 0, len(records)
        while start < count:
            if self._timer is not None and not self._refusing:
                # As many as the pending batch takes and still has room left
                # (append_nowait's hot path for each).
                stop = bisect_left(totals, totals[start] + self._room, start + 1, count + 1) - 1
                if stop > start:
                    self._batch += records[start:stop]
                    self._room -= totals[stop] - totals[start]
                    start = stop
                    continue
            self.append_nowait(records[start])  # it starts or ends a batch
            start += 1

    def _append(self, data: bytes) -> None:
        """``append_nowait`` of a record that starts or ends a batch, or has to be checked."""
        if self._refusing:
            self._refuse()
        if type(data) is not bytes:
            data = _data(data)
        size = len(data) + _RECORD_LENGTH
        if size > self._room and self._batch:
            self._send_batch()  # this record would make the batch too large
        self._batch.append(data)
        self._room -= size
        if self._room <= 0:
            self._send_batch()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._send_batch)

    def _refuse(self) -> None:
        if self._closed:
            raise RuntimeError(f"producer {self.producer_id!r} of {self.name!r} is closed")
        if self._error is not None and self._on_error is None:
            raise self._error
        self._refusing = False

    def _send_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch:
            return
        records, self._batch, self._room = self._batch, [], self.max_batch_bytes
        self._unsent.append(_Batch(records, self._batched))
        self._batched += len(records)
        if self._pump is None:
            self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Send the batches in order, up to ``max_in_flight`` ahead, until none is left."""
        try:
            while self._unsent or self._in_flight:
                try:
                    while self._unsent and len(self._in_flight) < self.max_in_flight:
                        if not await self._send_next():
                            break
                    if self._in_flight:
                        await self._settle_first()
                except _Refused as refused:
                    await self._after_refusal(refused.batch, refused.error)
        except Exception as exc:  # the client failed: nothing more can be sent
            for batch in (*self._in_flight, *self._unsent):
                self._forget(batch)
                self._report(exc)
            self._in_flight.clear()
            self._unsent.clear()
        finally:
            self._pump = None

    async def _send_next(self) -> bool:
        """Send the first unsent batch; ``False`` if it must wait for those in flight."""
        client = self._client
        batch = self._unsent[0]
        if batch.seq is None and self._seq is None:
            if self._in_flight:
                return False  # where to continue is known once they are answered
            try:
                reply = await client._call(
                    {"op": "producer", "name": self.name, "producer": self.producer_id},
                    retry=True,
                )
            except HubError as exc:  # no such stream, say: this batch is refused
                raise _Refused(batch, exc) from exc
            same_epoch = reply["epoch"] == self.epoch and reply["seq"] is not None
            self._seq = reply["seq"] + 1 if same_epoch else 0
        session = await client._current()
        if self._in_flight and self._in_flight[-1].session is not session:
            # Those went out on a session the hub lost: they go again first,
            # or the hub would take this one's sequence as theirs.
            return False
        if batch.seq is None:
            assert self._seq is not None
            batch.seq, self._seq = self._seq, self._seq + 1
        header = {
            "op": "produce",
            "name": self.name,
            "producer": self.producer_id,
            "epoch": self.epoch,
            "seq": batch.seq,
        }
        try:
            sent = await client._send_request(session, header, batch.records)
        except StreamkitError as exc:
            if client._failure is not None:
                raise
            raise _Refused(batch, exc) from exc  # it cannot be sent at all (FrameTooLarge)
        if sent is None:
            return False  # the session closed first: it goes on the next
        batch.request, batch.future = sent
        batch.session = session
        self._in_flight.append(self._unsent.popleft())
        return True

    async def _settle_first(self) -> None:
        """Wait for the first batch in flight's reply; on a lost session, send them again."""
        batch = self._in_flight[0]
        assert batch.future is not None
        try:
            reply, _ = await batch.future
        except _SessionLost as exc:
            # Every batch in flight went out on that session: they go again,
            # in order, with their sequences (the hub drops what it has).
            for lost in self._in_flight:
                outcome = lost.future
                if outcome is not None and outcome.done() and not outcome.cancelled():
                    why = outcome.exception()
                    if isinstance(why, _SessionLost) and why.written:
                        lost.losses += 1
            if batch.losses >= _MAX_LOSSES:
                raise _Refused(
                    batch,
                    ConnectionLost(
                        f"a batch of producer {self.producer_id!r} was in flight on"
                        f" {batch.losses} sessions in a row that the hub lost: it may be"
                        " what makes the hub fail; not sending it again"
                    ),
                ) from exc.why
            for lost in reversed(self._in_flight):
                self._forget(lost)
                self._unsent.appendleft(lost)
            self._in_flight.clear()
            return
        if reply["op"] == "error":
            raise _Refused(batch, _error(reply))
        self._forget(batch)
        self._in_flight.popleft()

    async def _after_refusal(self, refused: _Batch, error: StreamkitError) -> None:
        """Report a refused batch; send again, numbered anew, the batches sent after it.

        The hub refused them as a gap (the refused batch took no
        sequence), unless it applied them anyway: their replies tell.
        """
        if refused in self._in_flight:
            self._in_flight.remove(refused)
        else:
            self._unsent.remove(refused)
        self._forget(refused)
        self._report(self._refused(error, refused) if isinstance(error, HubError) else error)
        again: list[_Batch] = []
        for batch in self._in_flight:
            reply: _Reply | None = None
            if batch.future is not None:
                with contextlib.suppress(StreamkitError):
                    reply = await batch.future
            self._forget(batch)
            if reply is None or reply[0]["op"] == "error":
                again.append(batch)
        self._in_flight.clear()
        self._unsent.extendleft(reversed(again))
        for batch in self._unsent:
            batch.seq = None
        self._seq = None  # ask the hub where to continue

    def _forget(self, batch: _Batch) -> None:
        """Stop waiting for ``batch``'s reply (a reply that comes later is dropped)."""
        if batch.future is not None:
            self._client._forget(batch.request)
            batch.future = batch.session = None

    def _refused(self, exc: HubError, batch: _Batch) -> HubError:
        """``exc`` again, naming the records of the batch it refused."""
        first, last = batch.first, batch.first + len(batch.records) - 1
        which = f"record {first}" if first == last else f"records {first}..{last}"
        error = type(exc)(
            f"producer {self.producer_id!r}: {which} not appended to {self.name!r}: {exc}"
        )
        error.records = tuple(batch.records)
        error.__cause__ = exc
        return error

    def _report(self, error: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(error)
        elif self._error is None:
            self._error = error
            self._refusing = True

    async def flush(self) -> None:
        """Send the pending batch and wait until every batch is appended (or refused).

        Cancelling ``flush()`` cancels no batch: they go on.
        """
        self._send_batch()
        pump = self._pump
        if pump is not None:
            # Not a loop: a pump that is done is never waited on again.
            await asyncio.wait([pump])
        if self._error is not None and self._on_error is None:
            error, self._error = self._error, None
            raise error

    async def close(self) -> None:
        """Flush, then stop: ``append_nowait`` raises from now on."""
        self._closed = self._refusing = True
        await self.flush()


class _Refused(Exception):
    """A producer's batch the hub refused (or that could not be sent at all)."""

    def __init__(self, batch: _Batch, error: StreamkitError) -> None:
        super().__init__(str(error))
        self.batch = batch
        self.error = error


class HubClient(AsyncClosable):
    """A connection to a hub (over a resumable session, so drops are invisible).

    Use ``await streamkit.hub.connect(host, port)`` or ``async with``.
    Requests raise :class:`HubError` subclasses: :class:`StreamNotFound`,
    :class:`StreamExists`, :class:`StreamFinished`, :class:`StreamGone`,
    :class:`LimitExceeded`, :class:`ProducerFenced`.

    When the hub loses the client's session (it restarted, or expired the
    session) or cannot be reached, the client opens a new session to the
    same address, backing off, for up to ``reconnect_timeout`` seconds
    from the loss (see :func:`connect`). On the new session, readers
    continue from their ``next_offset`` and producers resend their batch
    in flight with the same (producer id, epoch, sequence), so with a hub
    that keeps its streams (``data_dir``) a restart is invisible to them.
    A request made while the session was resuming, and so never written
    to a connection, goes out on the new session. A request in flight when
    the session was lost is sent again if that is harmless (``status``,
    ``finish``, ``create(exist_ok=True)``); any other (``append``,
    ``append_many``, ``create``, ``delete``) raises :class:`ConnectionLost`
    saying its outcome is unknown. A request sent again that is in flight
    on three sessions in a row the hub loses raises :class:`ConnectionLost`
    (it may be what crashes the hub). After
    ``reconnect_timeout`` every pending and later call raises
    :class:`ConnectionLost`; a session that fails with a
    :class:`~streamkit.errors.ProtocolError` ends the client at once with it.
    """

    def __init__(
        self,
        session: ClientSession,
        *,
        reopen: Callable[[], Awaitable[ClientSession]] | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        self._session = session
        self._reopen = reopen  # opens a new session; None: a lost session is the end
        self.reconnect_timeout = check_seconds("reconnect_timeout", reconnect_timeout)
        self._closing = False
        self._failure: StreamkitError | None = None  # every call raises it from now on
        self._renewed = asyncio.Event()  # set when a session replaces the last, or all fail
        self._random = random.Random()
        self._next_request = 0
        # Each request's reply, the session it went out on, and if that
        # session had no connection then, how many it had had.
        self._pending: dict[int, tuple[asyncio.Future[_Reply], ClientSession, int | None]] = {}
        self._reads: dict[int, Reader] = {}
        self._feeders: set[asyncio.Task[None]] = set()
        self._runner = asyncio.create_task(self._run())

    @property
    def session(self) -> ClientSession:
        """The resumable session underneath (a new one after the hub lost the last)."""
        return self._session

    # -- plumbing ---------------------------------------------------------------

    async def _run(self) -> None:
        """Dispatch each session's messages; when one ends, open the next."""
        session = self._session
        reissue: asyncio.Task[None] | None = None
        try:
            while True:
                lost = await self._dispatch(session)
                await _cancel(reissue)
                if self._closing:
                    self._fail_all(lost or SessionError("the hub client is closed"))
                    return
                self._lost(session, lost)
                session = await self._new_session(lost)
                self._session = session
                self._renew()
                reissue = asyncio.create_task(self._reissue(session))
        except StreamkitError as exc:
            self._fail_all(exc)
        except Exception as exc:  # a bug must not leave every call waiting forever
            logger.exception("the hub client failed")
            self._fail_all(StreamkitError(f"the hub client failed: {exc!r}"))
        finally:
            await _cancel(reissue)

    async def _dispatch(self, session: ClientSession) -> StreamkitError | None:
        """Hand the session's messages to readers and calls until it ends; return why."""
        try:
            async for message in session:
                header, body = decode_message(message)
                request = header.get("id")
                if not isinstance(request, int):
                    continue
                reader = self._reads.get(request)
                if reader is not None:
                    reader._on_message(header, body, message)
                    continue
                pending = self._pending.pop(request, None)
                if pending is not None and not pending[0].done():
                    pending[0].set_result((header, body))
        except StreamkitError as exc:
            return exc
        return None  # the hub closed the session

    def _lost(self, session: ClientSession, why: StreamkitError | None) -> None:
        """Tell each call whose request went out on ``session`` that it was lost."""
        for future, sent_on, detached_at in self._pending.values():
            if sent_on is session and not future.done():
                # A request sent while the session had no connection, which
                # got none since, was never written: it never left us.
                written = detached_at is None or session.stats.connections != detached_at
                future.set_exception(_SessionLost(why, written))

    async def _new_session(self, lost: StreamkitError | None) -> ClientSession:
        """A new session to the hub, within ``reconnect_timeout`` of losing the last one.

        Raises ``lost`` itself if it is no reason to reconnect (a protocol
        error), and :class:`ConnectionLost` once the time is up.
        """
        why = "the hub closed the session" if lost is None else str(lost)
        if self._reopen is None or not (
            lost is None or isinstance(lost, SessionError | ConnectionLost)
        ):
            raise lost or ConnectionLost(why)
        settings = self._session.settings
        budget = self.reconnect_timeout
        if isinstance(lost, ConnectionLost):
            # The session tried to resume for max_reconnect_time already.
            budget -= settings.max_reconnect_time
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        delays = settings.reconnect_backoff.delays(self._random)
        last: BaseException | None = lost
        logger.warning("hub session %s lost (%s); opening a new session", self._session.id, why)
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    session = await self._reopen()
            except (OSError, TimeoutError, ConnectionLost, SessionError) as exc:
                last = exc
            else:
                if self._closing:  # close() came first: this session is not wanted
                    session.abort()
                    raise SessionError("the hub client is closed")
                logger.info("hub session %s replaces %s", session.id, self._session.id)
                return session
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, next(delays)))
        raise ConnectionLost(
            f"lost the hub ({why}) and could not open a new session within"
            f" reconnect_timeout={self.reconnect_timeout} s; last error: {last!r}"
        ) from last

    async def _reissue(self, session: ClientSession) -> None:
        """Issue every read that went out on an earlier session again, on ``session``.

        A read names the records its reader has yielded (``after``: the
        last offset and tag of their message), and the hub refuses it with
        :class:`StreamGone` if it no longer holds them. For a reader past
        offset 0 with nothing to name (it has yielded nothing yet, or the
        hub tags nothing), a stream that now holds fewer records than the
        reader's offset is not the one it was reading (deleted and created
        again, or the hub lost records): that reader fails with
        :class:`StreamGone` rather than silently skip the records that come
        at offsets it has passed. Reads with nothing to check go first, at
        once (a ``"now"`` read must not wait behind the checks of others).
        """
        readers = [
            reader
            for reader in self._reads.values()
            if reader._session is not None and reader._session is not session
        ]
        checked = [
            reader
            for reader in readers
            if reader._known and reader.next_offset > 0 and reader._after() is None
        ]
        ends: dict[str, int | None] = {}  # each stream's end, asked once
        try:
            for reader in readers:
                if reader not in checked and self._reissuable(reader, session):
                    await session.send(reader._issue_on(session))
            for reader in checked:
                name = reader._header["name"]
                if name not in ends:
                    ends[name] = await self._stream_end(name)
                end = ends[name]
                if not self._reissuable(reader, session):
                    continue
                if end is not None and end < reader.next_offset:
                    reader._fail(
                        StreamGone(
                            f"stream {name!r} holds {end} records after the hub lost this"
                            f" client's session, fewer than the {reader.next_offset} this"
                            " reader has read: it is not the stream it was reading (deleted"
                            " and created again, or records lost with the hub)"
                        )
                    )
                    continue
                await session.send(reader._issue_on(session))
        except StreamkitError:
            return  # this session is lost too: the next one issues them

    def _reissuable(self, reader: Reader, session: ClientSession) -> bool:
        """Whether ``reader`` still reads and is not yet issued on ``session``."""
        return reader._request in self._reads and reader._session is not session

    async def _stream_end(self, name: str) -> int | None:
        """The stream's next offset, or ``None`` if it is absent or that is unknown."""
        try:
            status = await self.status(name)
        except HubError:
            return None
        return None if status is None else status.next_offset

    def _fail_all(self, error: StreamkitError) -> None:
        """End the client's calls and reads with ``error``, now and from now on."""
        if self._failure is None:
            self._failure = error
        for future, _, _ in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for reader in list(self._reads.values()):
            reader._fail(error)
        self._renew()

    def _renew(self) -> None:
        self._renewed.set()
        self._renewed = asyncio.Event()

    async def _current(self) -> ClientSession:
        """The session to send on: the current one, or the next once it is open."""
        while True:
            if self._failure is not None:
                raise self._failure
            session = self._session
            if not session.closed:
                return session
            await self._renewed.wait()

    def _new_request(self) -> int:
        self._next_request += 1
        return self._next_request

    async def _send_now(self, session: ClientSession, header: dict[str, Any]) -> None:
        """Send ``header`` on ``session`` if it is still the live one, else drop it."""
        if session is self._session and not session.closed:
            with contextlib.suppress(StreamkitError):  # the reader meets the loss next
                await session.send(encode_message(header))

    async def _issue(self, reader: Reader) -> None:
        """Send ``reader``'s read on the current session, unless it went out on it already."""
        while True:
            session = await self._current()
            if reader._session is session or reader._request not in self._reads:
                return
            message = reader._issue_on(session)
            try:
                await session.send(message)
                return
            except StreamkitError:
                if not session.closed or self._closing:
                    raise
                # It never went out: it goes on the next session.

    async def _call(
        self, header: dict[str, Any], records: list[bytes] | None = None, *, retry: bool = False
    ) -> dict[str, Any]:
        """Send a request and return its reply; raise its error.

        ``retry``: a request the hub would apply once however often it
        arrives, sent again on the next session if the one it went out on
        is lost; without it, such a loss raises :class:`ConnectionLost`,
        unless the request was never written to a connection (it was sent
        while the session was resuming, and the resume failed).
        """
        losses = 0  # sessions lost with this request written and unanswered
        while True:
            session = await self._current()
            sent = await self._send_request(session, header, records)
            if sent is None:
                continue  # it never went out: send it on the next session
            request, future = sent
            try:
                reply, _ = await future
            except _SessionLost as exc:
                if not exc.written:
                    continue
                losses += 1
                if not retry:
                    raise ConnectionLost(_outcome_unknown(header, exc.why)) from exc.why
                if losses >= _MAX_LOSSES:
                    raise ConnectionLost(
                        f"{header['op']} of stream {header.get('name')!r} was in flight on"
                        f" {losses} sessions in a row that the hub lost: it may be what"
                        " makes the hub fail; not sending it again"
                    ) from exc.why
                continue
            finally:
                self._forget(request)
            break
        if reply["op"] == "error":
            raise _error(reply)
        return reply

    async def _send_request(
        self, session: ClientSession, header: dict[str, Any], records: list[bytes] | None = None
    ) -> tuple[int, asyncio.Future[_Reply]] | None:
        """Send a request on ``session``; return its id and the future of its reply.

        ``None`` if the session closed before the request went out (it can
        go on the next). Forget the request (:meth:`_forget`) once its reply
        is in or no longer wanted.
        """
        request = self._new_request()
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        detached_at = None if session.connected else session.stats.connections
        self._pending[request] = (future, session, detached_at)
        try:
            await session.send(encode_message({**header, "id": request}, records))
        except StreamkitError:
            self._forget(request)
            if not session.closed or self._closing:
                raise
            return None
        except BaseException:
            self._forget(request)
            raise
        return request, future

    def _forget(self, request: int) -> None:
        """Stop waiting for ``request``'s reply: one that comes later is dropped."""
        pending = self._pending.pop(request, None)
        if pending is not None:
            future = pending[0]
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a call that stopped waiting logs nothing
            else:
                future.cancel()

    # -- streams ----------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        ttl: float | None = None,
        content_type: str | None = None,
        exist_ok: bool = False,
    ) -> StreamStatus:
        """Create a stream; raises :class:`StreamExists` unless ``exist_ok``.

        ``ttl`` is ``None`` (no expiry) or a finite number of seconds > 0;
        a bad argument raises :class:`TypeError` or :class:`ValueError`.
        """
        reply = await self._call(
            {
                "op": "create",
                "name": check_name(name),
                "ttl": check_ttl(ttl),
                "content_type": check_content_type(content_type),
                "exist_ok": check_flag("exist_ok", exist_ok),
            },
            retry=exist_ok,  # creating a stream that may exist is harmless twice
        )
        return _status(reply["status"])

    async def append(self, name: str, data: bytes) -> int:
        """Append one record; return its offset."""
        reply = await self._call({"op": "append", "name": check_name(name)}, [_data(data)])
        return int(reply["offset"])

    async def append_many(self, name: str, records: list[bytes]) -> int:
        """Append records in one request; return the first one's offset."""
        reply = await self._call(
            {"op": "append", "name": check_name(name)}, [_data(record) for record in records]
        )
        return int(reply["offset"])

    async def append_json(self, name: str, value: Any) -> int:
        """Append ``value`` as a JSON record; return its offset."""
        return await self.append(name, json.dumps(value, separators=(",", ":")).encode())

    async def status(self, name: str) -> StreamStatus | None:
        """The stream's status, or ``None`` if it is absent."""
        reply = await self._call({"op": "status", "name": check_name(name)}, retry=True)
        return None if reply["status"] is None else _status(reply["status"])

    async def finish(self, name: str) -> StreamStatus:
        """Mark the stream finished: no more appends; readers end after the last record."""
        reply = await self._call({"op": "finish", "name": check_name(name)}, retry=True)
        return _status(reply["status"])

    async def delete(self, name: str) -> None:
        """Delete the stream; its readers get :class:`StreamGone`."""
        await self._call({"op": "delete", "name": check_name(name)})

    def read(
        self,
        name: str,
        offset: int | Literal["now"] = 0,
        *,
        live: bool = False,
        window: int | None = 8 * MiB,
    ) -> Reader:
        """Records of ``name`` from ``offset`` (``0`` the start, ``"now"`` only new ones).

        ``window`` bounds the bytes of records the hub sends ahead of what
        the reader has yielded (about two windows at most; a record larger
        than the window still comes, alone); ``None`` lets the hub send
        everything at once. A bad argument raises :class:`TypeError` or
        :class:`ValueError` here.
        """
        header = {
            "op": "read",
            "name": check_name(name),
            "offset": check_offset(offset),
            "live": check_flag("live", live),
            "window": check_window(window),
        }
        request = header["id"] = self._new_request()
        reader = Reader(self, request, header)
        self._reads[request] = reader
        return reader

    async def read_json(
        self, name: str, offset: int | Literal["now"] = 0, *, live: bool = False
    ) -> AsyncGenerator[tuple[int, Any], None]:
        """``(offset, value)`` for each JSON record of ``name``.

        A record that is not JSON raises :class:`~streamkit.errors.DecodeError`
        naming its offset (``frame_number``); the records before it were yielded.
        """
        async with self.read(name, offset, live=live) as reader:
            async for record in reader:
                try:
                    value = json.loads(record.data)
                except (ValueError, RecursionError) as exc:
                    raise DecodeError(
                        f"record {record.offset} of stream {name!r} is not JSON: {exc}",
                        frame_number=record.offset,
                    ) from exc
                yield record.offset, value

    def producer(
        self,
        name: str,
        producer_id: str,
        *,
        epoch: int = 0,
        linger: float = 0.005,
        max_batch_bytes: int = 1 * MiB,
        max_in_flight: int = 8,
        on_error: Callable[[BaseException], object] | None = None,
    ) -> Producer:
        """An idempotent, batching producer for ``name`` (see :class:`Producer`).

        ``producer_id`` is 1..255 bytes (UTF-8), ``epoch`` an int >= 0,
        ``linger`` seconds >= 0, ``max_batch_bytes`` and ``max_in_flight``
        (batches sent ahead of the first one's answer) ints >= 1; a bad
        argument raises :class:`TypeError` or :class:`ValueError` here.
        """
        return Producer(
            self,
            check_name(name),
            check_producer_id(producer_id),
            epoch=check_counter("epoch", epoch),
            linger=check_seconds("linger", linger, allow_zero=True),
            max_batch_bytes=_at_least_one("max_batch_bytes", max_batch_bytes),
            max_in_flight=_at_least_one("max_in_flight", max_in_flight),
            on_error=on_error,
        )

    async def resumable(self, name: str, source: AsyncIterable[bytes], offset: int = 0) -> Reader:
        """Attach to stream ``name``, first starting ``source`` to feed it if it is new.

        ``reader = await client.resumable(name, source)`` creates the stream
        if it does not exist and starts a task of this client that appends
        every item of ``source``, then finishes the stream; if the stream
        exists, ``source`` is not used. Errors of creating or attaching
        raise here. Returns a live :class:`Reader` of the records from
        ``offset``, which ends when the stream is finished.

        The source keeps running when its reader goes away, but not past
        this client's ``close()``, which cancels it. A source that raises, or
        is cancelled, ends the stream as well: the error is logged (logger
        ``"streamkit.hub"``) and the stream finished after what was appended,
        so its readers end rather than wait forever.
        """
        check_name(name)
        check_offset(offset)
        status = await self.create(name, exist_ok=True)
        if status.next_offset == 0 and not status.finished and not await self._claimed(name):
            task = asyncio.create_task(self._feed(name, source))
            self._feeders.add(task)
            task.add_done_callback(self._feeders.discard)
        return self.read(name, offset, live=True)

    async def _claimed(self, name: str) -> bool:
        reply = await self._call(
            {"op": "producer", "name": name, "producer": "resumable"}, retry=True
        )
        if reply["epoch"] is not None:
            return True
        # Claim the stream with an empty first batch: a second caller sees it
        # taken. Not retried: a retry would find the claim taken, by us or not.
        reply = await self._call(
            {"op": "produce", "name": name, "producer": "resumable", "epoch": 0, "seq": 0}, []
        )
        return bool(reply["duplicate"])

    async def _feed(self, name: str, source: AsyncIterable[bytes]) -> None:
        producer = self.producer(name, "resumable")
        producer._seq = 1  # batch 0 was the claim
        try:
            async for item in source:
                producer.append_nowait(item)
        except asyncio.CancelledError:
            logger.warning("close() cancelled the source of stream %r; finishing it", name)
            await self._wrap_up(name, source, producer)
            raise
        except Exception:
            logger.exception("the source of stream %r failed; finishing the stream", name)
        await self._wrap_up(name, source, producer)

    async def _wrap_up(self, name: str, source: AsyncIterable[bytes], producer: Producer) -> None:
        """Close a resumable source, append what it gave and finish its stream, in bounded time.

        Finishing lets the stream's readers end; it is tried even when some
        of the source's records could not be appended.
        """
        close_source = getattr(source, "aclose", None)
        if close_source is not None:  # an async iterator left suspended
            with contextlib.suppress(Exception):
                await close_source()
        try:
            async with asyncio.timeout(_FINISH_TIMEOUT):
                try:
                    await producer.close()
                except StreamkitError:
                    logger.exception("records of the source of stream %r were not appended", name)
                await self.finish(name)
        except (StreamkitError, TimeoutError) as exc:
            logger.warning("could not finish stream %r after its source: %r", name, exc)

    # -- lifecycle --------------------------------------------------------------

    async def close(self) -> None:
        """Cancel the resumable sources still running (their streams are finished), then close.

        The session is closed gracefully if it has a connection, else
        aborted: a client whose hub is down does not wait for it. A client
        that is opening a new session stops trying; every pending and later
        call raises :class:`SessionError`.
        """
        for task in self._feeders:
            task.cancel()
        if self._feeders:
            await asyncio.gather(*self._feeders, return_exceptions=True)
        for reader in list(self._reads.values()):
            await reader.close()
        self._closing = True
        session = self._session
        if session.connected:
            with contextlib.suppress(StreamkitError, TimeoutError):
                await session.close()
        else:
            session.abort()
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        self._fail_all(SessionError("the hub client is closed"))


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


Opener = Callable[[], Awaitable[ClientSession]]


async def _open(opener: Opener, reconnect_timeout: float) -> HubClient:
    return HubClient(await opener(), reopen=opener, reconnect_timeout=reconnect_timeout)


async def _release(client: HubClient, exc: BaseException | None) -> None:
    await client.close()


def _connect(
    endpoint: Endpoint,
    ssl: _ssl.SSLContext | bool | None,
    server_hostname: str | None,
    settings: SessionSettings | None,
    reconnect_timeout: float,
    options: SessionOptions,
) -> Connector[HubClient]:
    """Connect to a hub at ``endpoint``: what :func:`connect` and :func:`connect_unix` do."""
    reconnect_timeout = check_seconds("reconnect_timeout", reconnect_timeout)
    if settings is None and "max_reconnect_time" not in options:
        options = {**options, "max_reconnect_time": reconnect_timeout}
    resolved = resolve_settings(settings, options)
    return Connector(
        lambda: _open(
            lambda: connect_resumable_endpoint(
                endpoint, ssl=ssl, server_hostname=server_hostname, settings=resolved
            ),
            reconnect_timeout,
        ),
        _release,
    )


def connect(
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    settings: SessionSettings | None = None,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    **options: Unpack[SessionOptions],
) -> Connector[HubClient]:
    """Connect to a hub: ``await connect(...)`` or ``async with connect(...)``.

    ``reconnect_timeout`` (seconds, default 60) bounds how long the client
    tries to get back to its hub once the connection is lost: first its
    session tries to resume (for the session's ``max_reconnect_time``, which
    is ``reconnect_timeout`` unless given by keyword or in ``settings``),
    then, if the hub lost the session (it restarted), the client opens new
    sessions, backing off, until ``reconnect_timeout`` has passed since the
    loss; then every pending and later call raises :class:`ConnectionLost`
    (see :class:`HubClient`). A bad ``reconnect_timeout`` raises
    :class:`TypeError` or :class:`ValueError` here. ``ssl``,
    ``server_hostname``, ``settings`` and the
    :class:`~streamkit.session.SessionSettings` fields as keywords are those
    of :func:`~streamkit.session.connect_resumable` (a keyword that is none
    of these raises ``TypeError`` here). The first connection's errors are
    raised at the ``await``.
    """
    return _connect(
        Endpoint.tcp(host, port), ssl, server_hostname, settings, reconnect_timeout, options
    )


def connect_unix(
    path: str | os.PathLike[str],
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    settings: SessionSettings | None = None,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    **options: Unpack[SessionOptions],
) -> Connector[HubClient]:
    """Connect to a hub on a Unix socket; otherwise as :func:`connect`."""
    return _connect(Endpoint.unix(path), ssl, server_hostname, settings, reconnect_timeout, options)
