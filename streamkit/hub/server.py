"""The hub server: named append-only streams served over resumable sessions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl as _ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar, Unpack

from streamkit._lifecycle import ServerBase
from streamkit.errors import (
    EndOfStream,
    FrameTooLarge,
    ProtocolError,
    SessionError,
    StreamkitError,
)
from streamkit.hub.filelog import FileStorage
from streamkit.hub.protocol import (
    Records,
    check_after,
    check_content_type,
    check_counter,
    check_created,
    check_flag,
    check_name,
    check_offset,
    check_producer_id,
    check_request_id,
    check_ttl,
    check_window,
    decode_message,
    encode_head,
    encode_message,
    quote,
    records_size,
)
from streamkit.hub.storage import (
    BadRequest,
    Batch,
    HubError,
    LimitExceeded,
    Limits,
    MemoryStorage,
    Storage,
    StorageUnavailable,
    StreamExists,
    StreamGone,
    StreamInfo,
    StreamNotFound,
)
from streamkit.net import DEFAULT_GRACE_PERIOD, Connector, Endpoint, close_server
from streamkit.session import ResumableServer, ServerSession, SessionOptions, SessionSettings
from streamkit.session.cluster import Cluster
from streamkit.session.server import DEFAULT_MAX_SESSIONS, serve_resumable_endpoint
from streamkit.session.settings import resolve_settings

__all__ = ["HubServer", "serve_hub", "serve_hub_unix"]

logger = logging.getLogger("streamkit.hub")

#: Records and bytes sent to a reader per message.
_READ_BATCH = 1024
_READ_BYTES = 256 * 1024
#: Bytes of a records message beside its records and their lengths (its header).
_MESSAGE_HEADROOM = 512
#: Seconds between TTL sweeps.
_EXPIRY_INTERVAL = 1.0
#: Seconds a live read waits before it tries a storage that was unavailable again.
_UNAVAILABLE_RETRY = 1.0

#: The fields of a read request.
_READ_FIELDS = ("name", "offset", "live", "window", "created", "after")
#: The requests answered with one reply ("read" and "cancel" are not).
_REQUESTS = frozenset(("append", "produce", "create", "status", "finish", "delete", "producer"))

_T = TypeVar("_T")

# Made once, not per request.
_check_epoch = functools.partial(check_counter, "epoch")
_check_seq = functools.partial(check_counter, "seq")


def status_of(info: StreamInfo) -> dict[str, Any]:
    """A stream's status as sent on the wire."""
    return {
        "name": info.name,
        "state": "finished" if info.finished else "open",
        "next_offset": info.next_offset,
        "ttl": info.ttl,
        "expires_at": info.expires_at,
        "content_type": info.content_type,
    }


class HubServer(ServerBase):
    """Serves named streams; ``async with``, ``serve_forever()``, ``port``, ``close()``.

    Every client session gets its own handler; requests are answered in
    order, reads run as tasks of that session and end with it. Every
    request gets an answer: a reply that cannot be sent within the
    session's ``max_frame`` is replaced by a small ``limit`` error with the
    request's id. A request whose id a running read of the session holds
    gets ``bad_request``; a read past the storage's ``limits.max_reads``
    at once gets ``limit``.

    Live readers wake on every change made through this hub and on every
    hint ``storage.subscribe`` gives of a change made elsewhere; with a
    storage several hubs share (``storage.recheck_interval`` set), a
    caught-up reader also looks again that often, so a lost hint costs a
    delay, never a record; a live reader whose storage is unavailable
    (:class:`StorageUnavailable`) waits and tries again. Records go out as
    the storage keeps them (packed, as they came): a batch is encoded once,
    when it arrives, whatever the number of its readers.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._changed: dict[str, asyncio.Event] = {}
        self._server: ResumableServer | None = None
        self._expiry: asyncio.Task[None] | None = None

    def close(self) -> None:
        """Stop accepting clients."""
        if self._server is not None:
            self._server.close()
        if self._expiry is not None:
            self._expiry.cancel()

    async def wait_closed(self) -> None:
        """Wait until every session handler has ended, then close the storage."""
        if self._server is not None:
            await self._server.wait_closed()
        if self._expiry is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.storage.close()

    # -- change notification --------------------------------------------------

    def _notify(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()

    def _on_change(self, name: str | None) -> None:
        """The storage's hint that ``name`` (``None``: any stream) changed elsewhere."""
        if name is not None:
            self._notify(name)
            return
        changed, self._changed = self._changed, {}
        for event in changed.values():
            event.set()

    def _next_change(self, name: str) -> asyncio.Event:
        """The event the next change to ``name`` sets.

        Take it *before* looking at the stream and wait on it after: a
        change made while the reader was sending (and yielding) then still
        wakes it, where an event taken after the send would miss it.
        """
        event = self._changed.get(name)
        if event is None:
            event = self._changed[name] = asyncio.Event()
        return event

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(_EXPIRY_INTERVAL)
            try:
                gone = await self.storage.expire(time.time())
            except Exception:
                # The next sweep tries again: expiry must outlive any one failure.
                logger.exception("hub TTL sweep failed")
                continue
            for name in gone:
                logger.info("stream %s expired", quote(name))
                self._notify(name)

    # -- sessions -------------------------------------------------------------

    async def _serve_session(self, session: ServerSession) -> None:
        reads: dict[int, _Read] = {}  # the reads running, by request id
        tasks: set[asyncio.Task[None]] = set()  # every task the session started
        try:
            async for message in session:
                header, body = decode_message(message)
                op = header["op"]
                request = _request_id(op, header)
                if op == "consumed":
                    running = reads.get(request)
                    consumed = header.get("bytes")
                    if running is not None and isinstance(consumed, int):
                        running.credit(consumed)
                    continue  # no reply; one for a read that ended is moot
                if op == "cancel":
                    running = reads.pop(request, None)  # its id is free at once
                    if running is not None and running.task is not None:
                        running.task.cancel()
                    continue
                if request in reads:
                    # Its replies could not be told from the read's.
                    in_use = BadRequest(f"request id {request} is in use by a read that is running")
                    await _answer(session, _error_reply(request, in_use, session))
                    continue
                if op == "read":
                    max_reads = self.storage.limits.max_reads
                    if len(reads) < max_reads:
                        await self._start_read(session, request, header, reads, tasks)
                        continue
                    too_many = LimitExceeded(
                        f"this session runs max_reads={max_reads} reads at once;"
                        " cancel one or wait for one to end"
                    )
                    await _answer(session, _error_reply(request, too_many, session))
                    continue
                try:
                    records = _Records(body, session.settings.max_frame - _MESSAGE_HEADROOM)
                    reply = {"op": "ok", "id": request, **await self._handle(op, header, records)}
                except Exception as exc:
                    reply = _error_reply(request, exc, session)
                await _answer(session, reply)
        except EndOfStream:
            pass
        except _Unanswerable as exc:
            logger.warning("hub session %s: %s; ending it", session.id, exc)
        except ProtocolError as exc:
            logger.warning("hub session %s sent a bad request: %s", session.id, exc)
        except SessionError as exc:  # ended under us (expired, or aborted by a read)
            logger.info("hub session %s ended: %s", session.id, exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _start_read(
        self,
        session: ServerSession,
        request: int,
        header: dict[str, Any],
        reads: dict[int, _Read],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Start a read as a task of the session; it holds ``request`` until it ends.

        The task keeps only the read's own fields, not the whole header: a
        read may run for ever, and must not pin whatever else a client
        packed into its request.
        """
        read = reads[request] = _Read()
        header = {key: header[key] for key in _READ_FIELDS if key in header}
        with contextlib.suppress(HubError):  # the read's task meets it again, and answers it
            header = await self._from_now(header)
        read.task = task = asyncio.create_task(self._read(session, request, header, read))
        tasks.add(task)
        task.add_done_callback(functools.partial(_forget, reads, tasks, request, read))

    async def _from_now(self, header: dict[str, Any]) -> dict[str, Any]:
        """A ``"now"`` read's header with the offset of the stream's end as it comes in.

        Resolved here, in order with the session's other requests, rather
        than when the read's task starts: an append the client sends after
        the read must be one the read sees.
        """
        name = header.get("name")
        if header.get("offset") != "now" or not isinstance(name, str):
            return header
        info = await self.storage.get(name)
        return header if info is None else {**header, "offset": info.next_offset}

    async def _handle(self, op: str, header: dict[str, Any], body: _Records) -> dict[str, Any]:
        if op not in _REQUESTS:
            raise BadRequest(f"unknown hub request {quote(op)}")
        storage = self.storage
        name = _field(header, "name", check_name)
        if op == "produce":
            producer = _field(header, "producer", check_producer_id)
            epoch = _field(header, "epoch", _check_epoch)
            seq = _field(header, "seq", _check_seq)
            produced = await storage.produce(name, body.decode(), producer, epoch, seq)
            if not produced.duplicate:
                self._notify(name)
            return {"offset": produced.offset, "duplicate": produced.duplicate}
        if op == "append":
            first = await storage.append(name, body.decode())
            self._notify(name)
            return {"offset": first}
        if op == "create":
            return await self._create(name, header)
        if op == "status":
            info = await storage.get(name)
            return {"status": None if info is None else status_of(info)}
        if op == "finish":
            info = await storage.finish(name)
            self._notify(name)
            return {"status": status_of(info)}
        if op == "delete":
            await storage.delete(name)
            self._notify(name)
            return {}
        # "producer": where an idempotent producer should continue
        state = await storage.producer(name, _field(header, "producer", check_producer_id))
        return {
            "epoch": None if state is None else state.epoch,
            "seq": None if state is None else state.seq,
        }

    async def _create(self, name: str, header: dict[str, Any]) -> dict[str, Any]:
        ttl = _field(header, "ttl", check_ttl)
        content_type = _field(header, "content_type", check_content_type)
        exist_ok = _field(header, "exist_ok", functools.partial(check_flag, "exist_ok"), False)
        try:
            info = await self.storage.create(name, ttl=ttl, content_type=content_type)
        except StreamExists:
            existing = await self.storage.get(name)
            if not exist_ok or existing is None:
                raise
            return {"status": status_of(existing), "created": False}
        self._notify(name)  # readers of an expired stream of that name end
        return {"status": status_of(info), "created": True}

    async def _read(
        self, session: ServerSession, request: int, header: dict[str, Any], flow: _Read
    ) -> None:
        """Serve a read until it ends; its error, if any, is its last message."""
        try:
            try:
                await self._serve_read(session, request, header, flow)
            except StreamkitError as exc:
                if not isinstance(exc, HubError):
                    raise  # the session ended: its client reads again on a new one
                await _answer(session, _error_reply(request, exc, session))
            except Exception as exc:  # a bug must not leave the reader waiting forever
                await _answer(session, _error_reply(request, exc, session))
        except _Unanswerable as exc:
            # Nothing can tell the reader: end the session, so its client knows.
            logger.warning("hub session %s: %s; ending it", session.id, exc)
            session.abort()
        except StreamkitError:
            pass

    async def _serve_read(
        self, session: ServerSession, request: int, header: dict[str, Any], flow: _Read
    ) -> None:
        storage = self.storage
        name = _field(header, "name", check_name)
        live = _field(header, "live", functools.partial(check_flag, "live"), False)
        start = _field(header, "offset", check_offset, 0)
        window = _field(header, "window", check_window)
        expected = _field(header, "created", check_created)
        after = _field(header, "after", check_after)
        first = await storage.get(name)
        if first is None:
            raise StreamNotFound(f"no stream named {quote(name)}")
        created = first.created
        if expected is not None and expected != created:
            raise StreamGone(
                f"stream {quote(name)} was deleted and created again since this read began"
            )
        if after is not None and await storage.tag_at(name, after[0]) != after[1]:
            raise StreamGone(
                f"stream {quote(name)} no longer holds the records this reader read up to"
                f" offset {after[0]}: they were lost (and maybe others stored in their place)"
                " since this read began"
            )
        offset = first.next_offset if start == "now" else start
        # The read's first message says which stream it reads (when it
        # was created), so a client that asks again can name it.
        stamp: dict[str, float] = {"created": created}
        # Records of one message fit a session frame (the smaller of
        # ours and the client's), with its header and a length per record.
        frame_room = session.max_frame - _MESSAGE_HEADROOM - 4 * _READ_BATCH
        read_bytes = max(1, min(_READ_BYTES, frame_room, window or _READ_BYTES))
        recheck = storage.recheck_interval
        sent = 0  # bytes of records messages, for the window
        caught_up_sent = False
        waiting = False  # for an unavailable storage
        while True:
            change = self._next_change(name) if live else None
            if window is not None and sent - flow.consumed >= window:
                # The reader holds a window of records it has not consumed:
                # wait until it reports some consumed.
                flow.more.clear()
                await flow.more.wait()
                continue
            try:
                batch: Batch | None = await storage.read(name, offset, _READ_BATCH, read_bytes)
            except StreamNotFound:
                batch = None
            except StorageUnavailable as exc:
                if change is None:
                    raise  # a read that is not live ends with it
                # A live read waits for the storage and tries again.
                if not waiting:
                    logger.warning("live read of stream %s waits: %s", quote(name), exc)
                waiting = True
                await _wait(change, None, recheck or _UNAVAILABLE_RETRY)
                continue
            waiting = False
            if batch is None or batch.info.created != created:
                raise StreamGone(f"stream {quote(name)} was deleted or expired")
            info = batch.info
            if batch.records:
                assert batch.tag is not None
                records = Records.pack(batch.records)
                count = await self._send_records(
                    session, request, name, offset, records, batch.tag, stamp
                )
                stamp = {}
                sent += records_size(records[:count])
                offset += count
                caught_up_sent = False
                continue
            if info.finished or not live:
                end = {"op": "end", "id": request, "next_offset": offset}
                await _answer(session, {**end, "finished": info.finished, **stamp})
                return
            if not caught_up_sent:
                caught_up = {"op": "caught_up", "id": request, "next_offset": offset}
                await _answer(session, {**caught_up, **stamp})
                caught_up_sent, stamp = True, {}
            assert change is not None  # live
            await _wait(change, info.expires_at, recheck)

    async def _send_records(
        self,
        session: ServerSession,
        request: int,
        name: str,
        offset: int,
        records: Records,
        tag: str,
        stamp: dict[str, float],
    ) -> int:
        """Send ``records`` (from ``offset``; ``tag``: the last one's) in as few messages as fit.

        Returns how many were sent. ``stamp`` goes into the first message's header.
        """
        count = len(records)
        part = records
        while True:
            header = {"op": "records", "id": request, "offset": offset, "tag": tag, **stamp}
            try:
                await session.send(part.message(encode_head(header)))
            except FrameTooLarge as exc:  # a lone large record, or many empty ones in tiny frames
                if count == 1:
                    raise LimitExceeded(
                        f"record {offset} of {len(records[0])} bytes does not fit in one"
                        f" message of this session ({exc})"
                    ) from exc
                count //= 2
                part = records[:count]
                found = await self.storage.tag_at(name, offset + count - 1)
                if found is None:
                    raise StreamGone(f"stream {quote(name)} was deleted or expired") from exc
                tag = found
                continue
            return count


async def _wait(change: asyncio.Event, expires_at: float | None, recheck: float | None) -> None:
    """Wait for the next change, until the stream's TTL passes, or ``recheck`` seconds."""
    timeout = recheck
    if expires_at is not None:
        left = max(0.0, expires_at - time.time())
        timeout = left if timeout is None else min(timeout, left)
    if timeout is None:
        await change.wait()
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await change.wait()


def _field(
    header: dict[str, Any], key: str, check: Callable[[object], _T], default: object = None
) -> _T:
    """A request field, checked; an invalid one is a :class:`BadRequest`."""
    try:
        return check(header.get(key, default))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bad {key!r} in request: {exc}") from exc


class _Records:
    """A request's body of records, and the largest record a read could send back."""

    __slots__ = ("body", "readable")

    def __init__(self, body: memoryview, readable: int) -> None:
        self.body = body
        self.readable = readable

    def decode(self) -> Records:
        """The records; a malformed body is a :class:`BadRequest`.

        A record too large to be read back in one message of this session
        is refused (:class:`LimitExceeded`): stored, it could not be served.
        """
        try:
            records = Records.unpack(self.body)
        except ProtocolError as exc:
            raise BadRequest(str(exc)) from exc
        largest = records.largest()
        if largest > self.readable:
            raise LimitExceeded(
                f"record of {largest} bytes could not be read back in one message"
                f" (max_frame allows {self.readable} bytes of record)"
            )
        return records


class _Unanswerable(ProtocolError):
    """Not even a small error reply fits the session's frames: nothing can answer."""


def _request_id(op: str, header: dict[str, Any]) -> int:
    """The request's id; a header without a valid one is no hub request at all."""
    try:
        return check_request_id(header.get("id"))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"hub request {quote(op)} without a valid 'id': {exc}") from exc


async def _answer(session: ServerSession, reply: dict[str, Any]) -> None:
    """Send ``reply`` (a message with a request's ``id``), or an error in its place.

    No request goes unanswered: a reply that cannot be encoded, or is over
    the session's ``max_frame`` (ours or the client's), is replaced by a
    small error reply with the same id (``limit``, or ``error`` for one
    that cannot be encoded). Raises :class:`_Unanswerable` if even that
    does not fit, and the session's error if it ended.
    """
    request = reply["id"]
    substitute: Exception
    try:
        message = encode_message(reply)
    except (TypeError, ValueError, RecursionError) as exc:  # a bug: the reader must hear of it
        substitute = exc
    else:
        try:
            await session.send(message)
            return
        except FrameTooLarge as exc:
            done = " (the request was carried out)" if reply["op"] == "ok" else ""
            substitute = LimitExceeded(
                f"the hub's {quote(reply['op'])} reply to request {request}{done}"
                f" could not be sent: {exc}"
            )
    try:
        await session.send(encode_message(_error_reply(request, substitute, session)))
    except FrameTooLarge as exc:
        raise _Unanswerable(
            f"its max_frame={session.max_frame} cannot carry even an error reply"
            f" (to request {request})"
        ) from exc


def _error_reply(request: int, exc: Exception, session: ServerSession) -> dict[str, Any]:
    """The error reply to a request that failed; an unexpected failure is logged."""
    if isinstance(exc, HubError):
        return {"op": "error", "id": request, "code": exc.code, "message": str(exc)}
    logger.error("hub session %s: request %d failed", session.id, request, exc_info=exc)
    return {
        "op": "error",
        "id": request,
        "code": HubError.code,
        "message": f"the hub failed to serve the request: {quote(exc)}",
    }


class _Read:
    """A read running in a session: its task, and what its reader has consumed."""

    __slots__ = ("consumed", "more", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.consumed = 0  # bytes of records messages the reader consumed
        self.more = asyncio.Event()  # set when it reports more

    def credit(self, consumed: int) -> None:
        if consumed > self.consumed:
            self.consumed = consumed
            self.more.set()


def _forget(
    reads: dict[int, _Read],
    tasks: set[asyncio.Task[None]],
    request: int,
    read: _Read,
    task: asyncio.Task[None],
) -> None:
    """A read's task ended: free its request id (unless a new read holds it now)."""
    tasks.discard(task)
    if reads.get(request) is read:
        del reads[request]


def _storage(
    data_dir: str | os.PathLike[str] | None, limits: Limits | None, fsync: bool
) -> Storage:
    if data_dir is None:
        return MemoryStorage(limits)
    return FileStorage(data_dir, limits=limits, fsync=fsync)


def _serve_hub(
    endpoint: Endpoint,
    make_storage: Callable[[], Storage],
    serve_options: dict[str, Any],
) -> Connector[HubServer]:
    """Serve a hub on ``endpoint``: what :func:`serve_hub` and :func:`serve_hub_unix` do."""

    async def start() -> HubServer:
        hub = HubServer(make_storage())
        await hub.storage.start()
        try:
            hub.storage.subscribe(hub._on_change)
            hub._server = await serve_resumable_endpoint(
                hub._serve_session, endpoint, **serve_options
            )
        except BaseException:
            await hub.storage.close()
            raise
        hub._expiry = asyncio.create_task(hub._expire_loop())
        return hub

    return Connector(start, close_server)


def serve_hub(
    host: str | None,
    port: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
    fsync: bool = False,
    storage: Storage | None = None,
    ssl: _ssl.SSLContext | None = None,
    settings: SessionSettings | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_connections: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    cluster: Cluster | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[HubServer]:
    """Serve a hub of named streams on TCP ``host``:``port``.

    ``hub = await serve_hub(...)`` or ``async with serve_hub(...) as hub:``
    (closed gracefully on exit). Streams live in memory, or in an
    append-only log per stream under ``data_dir`` (recovered on restart;
    ``fsync=True`` flushes each append to disk before acknowledging it,
    see :class:`FileStorage`). ``limits`` bounds streams, record size and
    memory; ``storage`` replaces the storage backend. ``ssl``,
    ``settings``, ``max_sessions``, ``max_connections`` (default: 11,000
    with the default ``max_sessions``, within the open-file limit),
    ``grace_period``, ``cluster`` (hub processes behind one balancer, each
    a node: a session resumes through any of them, see
    :class:`~streamkit.session.Cluster`) and the
    :class:`~streamkit.session.SessionSettings` fields as keywords are
    those of :func:`~streamkit.session.serve_resumable` (a keyword that is
    none of these raises ``TypeError`` here).
    """
    return _serve_hub(
        Endpoint.tcp(host, port),
        lambda: storage or _storage(data_dir, limits, fsync),
        {
            "ssl": ssl,
            "settings": resolve_settings(settings, options),
            "max_sessions": max_sessions,
            "max_connections": max_connections,
            "grace_period": grace_period,
            "cluster": cluster,
        },
    )


def serve_hub_unix(
    path: str | os.PathLike[str],
    *,
    mode: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
    fsync: bool = False,
    storage: Storage | None = None,
    ssl: _ssl.SSLContext | None = None,
    settings: SessionSettings | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_connections: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    cluster: Cluster | None = None,
    **options: Unpack[SessionOptions],
) -> Connector[HubServer]:
    """Serve a hub on a Unix socket (its file gets ``mode``); otherwise as :func:`serve_hub`."""
    return _serve_hub(
        Endpoint.unix(path, mode),
        lambda: storage or _storage(data_dir, limits, fsync),
        {
            "ssl": ssl,
            "settings": resolve_settings(settings, options),
            "max_sessions": max_sessions,
            "max_connections": max_connections,
            "grace_period": grace_period,
            "cluster": cluster,
        },
    )
