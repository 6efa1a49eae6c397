"""File storage for the hub: one append-only log per stream, recovered on restart.

Each stream is a file ``<sha256 of its name>.log`` in the data directory: a
sequence of entries ``kind u8 | length u32 | crc32 u32 | payload`` (big
endian; the CRC covers the kind byte and the payload). Kinds:

- ``CREATE`` (first entry): JSON ``{"name", "content_type", "ttl", "created"}``;
- ``DATA``: one appended batch, ``flags u8`` (bit 0: a producer, bit 1: a
  tag, bit 2: packed), [``tag``: 8 bytes], [``id_length u16 | id | epoch
  u64 | seq u64``], then the records: packed, as a hub message body packs
  them (``count u32``, ``count`` times ``length u32``, the records back to
  back), or else (before lineage tags) ``count u32`` then ``count`` times
  ``length u32 | record``. A producer's state is in the same entry as its
  records, so a retried batch is recognised after a restart. A DATA entry
  without a tag has the tag ``<crc32 of the entry, 8 hex digits><its file
  position mod 2**32, 8 hex digits>``;
- ``FINISH``: empty.

Every append is one entry, so no entry the hub writes is larger than one
batch can make: a payload of at most ``Limits.max_batch`` plus the DATA
header (or a CREATE entry's JSON, for a long ``max_name``). Records are read
back with ``pread`` through an in-memory index (two integers per record).

Recovery. On open, each log is read back entry by entry. An entry is
*damaged* if its header is short, its length is over the largest entry the
hub can write (checked before anything is read or allocated) or runs past
the end of the file, its CRC fails, or it does not parse (a kind out of
place, a record running past its entry). What is done about it depends on
what follows:

- a *torn tail*: nothing valid follows the damaged entry (it is the last
  thing in the file, or no valid entry starts where the next one could: see
  below). A crash cut an append short; that append was never acknowledged.
  The file is truncated at the damaged entry and later appends go there.
- *damage inside the log*: a valid entry follows. Acknowledged records may
  lie beyond the damage, so nothing is cut and nothing past the damage is
  served: the stream serves the records before it, refuses appends (and
  ``finish``) with a :class:`HubError` naming the stream, the file, the
  byte and the first record offset not served, and the hub logs it at
  ERROR. Deleting (or expiring) such a stream renames its file to
  ``<file>.corrupt`` rather than removing it.

A valid entry follows the damage if, anywhere from the byte after the
damaged entry's start up to where the next entry could start at the
latest (the damaged entry's start, plus the largest entry the hub can
write), there is an entry header of a kind that may follow (DATA or
FINISH, FINISH with an empty payload), a length within the bound and within
the file, and a payload whose CRC checks; or if the damaged entry's length
is over the bound but leads exactly to the end of the file or to such an
entry (an entry written under a larger ``max_batch`` than this hub's: it is
kept, not cut). A file whose first (CREATE) entry is damaged is no stream
the hub can trust: it is removed if it was torn with nothing valid after
it (a create cut short), and otherwise renamed to ``<file>.corrupt``.

Writing. Every file operation after recovery runs in one thread the storage
owns, in the order the event loop asked for them: the loop only decides and
keeps the books. Appends to a stream that arrive while its last ones are
being written are written together, with one ``write`` (and, with
``fsync=True``, one ``fsync``): a group commit. An append is acknowledged,
and its records readable, once its entry is written to the OS (it survives
the hub process being killed), or with ``fsync=True`` once it is also
flushed to disk (it survives a power loss or an OS crash).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from streamkit.hub.protocol import (
    MAX_CONTENT_TYPE,
    MAX_PRODUCER_ID,
    Records,
    check_content_type,
    check_ttl,
    quote,
)
from streamkit.hub.storage import (
    HubError,
    Limits,
    ProducerState,
    StreamInfo,
    StreamTable,
    _Entry,
    _Stream,
    take_within,
)

__all__ = ["FileStorage"]

logger = logging.getLogger("streamkit.hub")

_ENTRY = struct.Struct(">BII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_PRODUCER = struct.Struct(">QQ")
_CREATE, _DATA, _FINISH = 1, 2, 3
#: Flags of a DATA entry.
_HAS_PRODUCER, _HAS_TAG, _PACKED = 1, 2, 4
_FLAGS = _HAS_PRODUCER | _HAS_TAG | _PACKED
_TAG_SIZE = 8
#: The bytes of a DATA payload beside its batch's lengths and records: the
#: flags, the tag, the longest producer id with its length, epoch and seq,
#: and the record count.
_DATA_OVERHEAD = 1 + _TAG_SIZE + _U16.size + MAX_PRODUCER_ID + _PRODUCER.size + _U32.size
#: A CREATE payload's JSON beside its name and content type, which JSON may
#: escape to 6 characters a byte.
_CREATE_OVERHEAD = 256
#: Where an entry that may follow damage could start: a DATA or FINISH header.
_NEXT_KINDS = re.compile(b"[%s]" % re.escape(bytes((_DATA, _FINISH))))
_LOCK_FILE = "LOCK"
_T = TypeVar("_T")


def _max_entry_payload(limits: Limits) -> int:
    """The largest entry payload a hub with ``limits`` writes.

    A DATA entry is one appended batch, at most ``limits.max_batch`` bytes
    as it travels (``count`` and a length per record, which the entry holds
    too) plus its header; a CREATE entry is JSON of at most ``max_name``
    and ``MAX_CONTENT_TYPE`` bytes, each escaped to at most 6.
    """
    data = _DATA_OVERHEAD + limits.max_batch
    create = _CREATE_OVERHEAD + 6 * (limits.max_name + MAX_CONTENT_TYPE)
    return max(data, create)


class _Corrupt(Exception):
    """A damaged entry: the log's valid entries end before it."""


class _Torn(_Corrupt):
    """An entry cut short by the end of the file: a write a crash interrupted."""


class _TooLong(_Corrupt):
    """An entry longer than any this hub writes; ``end`` is where its length says it ends."""

    def __init__(self, message: str, end: int) -> None:
        super().__init__(message)
        self.end = end


class _Unrecoverable(OSError):
    """A failed write whose partial entry could not be cut from the log."""


class _Log:
    """One stream's log file: its descriptor, its entries being written, each record's place.

    ``fd`` belongs to the I/O thread once the storage is open (it is -1
    before the file is opened and after it is closed); everything else
    belongs to the event loop.
    """

    __slots__ = (
        "broken",
        "closed",
        "committed",
        "damaged",
        "end",
        "fd",
        "lengths",
        "path",
        "positions",
        "queue",
        "writer",
    )

    def __init__(self, path: Path, fd: int, end: int) -> None:
        self.path = path
        self.fd = fd
        self.end = end  # bytes of the entries written or being written
        self.committed = end  # bytes of the entries written (and flushed, with fsync)
        self.positions = array("Q")  # file position of each record's bytes
        self.lengths = array("Q")
        self.queue: list[tuple[_Entry, bytes]] = []  # entries waiting for the writer
        self.writer: asyncio.Task[None] | None = None  # writes the queue, one group at a time
        self.closed = False  # deleted: nothing more is written
        self.broken: str | None = None  # why the log takes no appends (the error to raise)
        self.damaged = False  # damage inside it: deleting it sets it aside


def _recovered(
    log: _Log, field: str, check: Callable[[object], _T], meta: dict[str, Any]
) -> _T | None:
    """A CREATE entry's setting, or ``None`` (with a warning) if it is invalid.

    Earlier versions stored settings unchecked (a TTL of ``"abc"``): the
    stream and its records are kept, without the setting.
    """
    try:
        return check(meta[field])
    except (TypeError, ValueError) as exc:
        logger.warning("%s: ignoring an invalid %s (%s)", log.path.name, field, exc)
        return None


def _entry(kind: int, parts: Sequence[bytes | memoryview]) -> bytes:
    """An entry of ``parts`` (its payload, in pieces), made with one copy."""
    crc = zlib.crc32(bytes((kind,)))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join((_ENTRY.pack(kind, sum(map(len, parts)), crc), *parts))


def _derived_tag(crc: int, position: int) -> str:
    """The tag of a DATA entry stored without one (see the module doc)."""
    return f"{crc:08x}{position & 0xFFFFFFFF:08x}"


# -- what the I/O thread runs ---------------------------------------------------------


def _open_log(log: _Log, entry: bytes, fsync: bool) -> None:
    """Create the log file with its CREATE entry (and make it durable with ``fsync``)."""
    fd = os.open(log.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        _write_all(fd, entry)
        if fsync:
            os.fsync(fd)
            _sync_dir(log.path.parent)
    except BaseException:
        os.close(fd)
        log.path.unlink(missing_ok=True)
        raise
    log.fd = fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_range(log: _Log, size: int, position: int) -> bytes:
    if log.fd < 0:
        raise OSError(errno.EBADF, "the log file is closed")
    return os.pread(log.fd, size, position)


def _remove_log(log: _Log, name: str, fsync: bool) -> None:
    if log.fd >= 0:
        os.close(log.fd)
        log.fd = -1
    if log.damaged:  # what lies past the damage may be someone's records
        _set_aside(log.path, f"stream {quote(name)} deleted with a damaged log")
    else:
        log.path.unlink(missing_ok=True)
    if fsync:
        _sync_dir(log.path.parent)


def _set_aside(path: Path, why: str) -> None:
    """Rename a log the hub cannot serve (or delete) in full: it may hold someone's data."""
    aside = path.with_name(path.name + ".corrupt")
    number = 0
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.corrupt.{number}")
    path.rename(aside)
    logger.warning("%s: %s; moved to %s", path.name, why, aside.name)


def _close_logs(logs: list[_Log]) -> None:
    for log in logs:
        if log.fd >= 0:
            os.close(log.fd)
            log.fd = -1


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStorage(StreamTable):
    """Streams kept as append-only logs under ``data_dir``; see the module doc.

    ``fsync=True`` flushes every append to disk before it is acknowledged
    (appends waiting together share one flush). One process at a time may
    use a ``data_dir`` (an exclusive lock on ``data_dir/LOCK``); a second
    gets a :class:`HubError`. The logs are read back when the storage is
    made (before it serves anything). File operations run in one thread
    the storage owns, ended by ``close()``.

    An I/O error writing a stream's log fails the appends being written
    (and those waiting behind them) with a :class:`HubError`, and leaves
    the log as it was before them; a log that could not even be restored
    so takes no more appends until the hub restarts (which recovers it).
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], *, limits: Limits | None = None, fsync: bool = False
    ) -> None:
        super().__init__(limits)
        self._max_payload = _max_entry_payload(self.limits)
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock)
            raise HubError(f"data_dir {str(self.data_dir)!r} is in use by another hub") from exc
        self._io = ThreadPoolExecutor(1, thread_name_prefix="streamkit-hub-log")
        for path in sorted(self.data_dir.glob("*.log")):
            self._recover(path)

    def _run(self, job: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``job`` in the I/O thread, after every job asked for before this call."""
        return asyncio.get_running_loop().run_in_executor(self._io, job, *args)

    # -- recovery -----------------------------------------------------------

    def _recover(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        size = os.fstat(fd).st_size
        log = _Log(path, fd, 0)
        stream: _Stream | None = None
        damage: _Corrupt | None = None  # the first damaged entry, at log.end
        with open(path, "rb") as file:
            while log.end < size:
                try:
                    kind, payload, crc = self._read_entry(file, log.end, size)
                    stream = self._replay(log, stream, kind, payload, log.end, crc)
                except _Corrupt as exc:
                    damage = exc
                    break
                except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
                    damage = _Corrupt(f"an entry that does not parse ({exc!r})")
                    break
                log.end = log.committed = log.end + _ENTRY.size + len(payload)
        if damage is None and stream is not None:
            stream.data = log
            return
        followed = damage is not None and self._followed(fd, log.end, size, damage)
        if stream is None:
            os.close(fd)
            if damage is None or (isinstance(damage, _Torn) and not followed):
                path.unlink()  # empty, or a create that a crash cut short
            else:
                _set_aside(path, f"no valid CREATE entry ({damage})")
            return
        assert damage is not None
        if followed:
            log.damaged = True
            log.broken = (
                f"stream {quote(stream.info.name)} is read-only: its log {path.name} is damaged"
                f" at byte {log.end} ({damage}) with valid entries after it; records from"
                f" offset {stream.info.next_offset} on are not served, and appends are refused,"
                " until the log is repaired"
            )
            logger.error("%s", log.broken)
        else:
            logger.warning("%s: cutting a torn tail at byte %d (%s)", path.name, log.end, damage)
            os.ftruncate(fd, log.end)
        stream.data = log

    def _read_entry(self, file: BinaryIO, start: int, size: int) -> tuple[int, bytes, int]:
        """The entry at ``start`` (where ``file`` is): its kind, payload and CRC, checked.

        Its length is checked against the file and the largest entry this
        hub writes before anything is read.
        """
        header = file.read(_ENTRY.size)
        if len(header) < _ENTRY.size:
            raise _Torn("a torn entry header")
        kind, length, crc = _ENTRY.unpack(header)
        end = start + _ENTRY.size + length
        if length > self._max_payload:
            raise _TooLong(
                f"an entry length of {length} bytes, over the {self._max_payload} that"
                f" max_batch={self.limits.max_batch} allows",
                end,
            )
        if end > size:
            raise _Torn(f"a torn entry ({size - start - _ENTRY.size} of {length} bytes)")
        payload = file.read(length)
        if len(payload) < length:
            raise _Torn(f"a torn entry ({len(payload)} of {length} bytes)")
        if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
            raise _Corrupt("a CRC mismatch")
        return kind, payload, crc

    def _followed(self, fd: int, start: int, size: int, damage: _Corrupt) -> bool:
        """Whether a valid entry follows the damaged entry at ``start`` (see the module doc)."""
        if isinstance(damage, _TooLong) and (
            damage.end == size or self._valid_at(fd, damage.end, size)
        ):
            return True
        # The next entry starts at most one largest entry after this one's start.
        window = os.pread(fd, 2 * _ENTRY.size + self._max_payload, start)
        view = memoryview(window)
        return any(
            self._valid_at(fd, start + match.start(), size, view[match.start() :])
            for match in _NEXT_KINDS.finditer(window, 1, len(window) - _ENTRY.size + 1)
        )

    def _valid_at(self, fd: int, start: int, size: int, head: bytes | memoryview = b"") -> bool:
        """Whether a valid DATA or FINISH entry is at ``start`` (``head``: the bytes there)."""
        if len(head) < _ENTRY.size + 1:
            head = os.pread(fd, _ENTRY.size + 1, start)
            if len(head) < _ENTRY.size:
                return False
        kind, length, crc = _ENTRY.unpack_from(head)
        if kind not in (_DATA, _FINISH) or (kind == _FINISH) != (length == 0):
            return False
        if length > self._max_payload or start + _ENTRY.size + length > size:
            return False
        if kind == _DATA and head[_ENTRY.size] & ~_FLAGS:  # flags this hub never writes
            return False
        payload = os.pread(fd, length, start + _ENTRY.size)
        return bool(zlib.crc32(payload, zlib.crc32(bytes((kind,)))) == crc)

    def _replay(
        self, log: _Log, stream: _Stream | None, kind: int, payload: bytes, start: int, crc: int
    ) -> _Stream:
        if stream is None:
            if kind != _CREATE:
                raise _Corrupt("no CREATE entry first")
            meta = json.loads(payload)
            info = StreamInfo(
                str(meta["name"]),
                content_type=_recovered(log, "content_type", check_content_type, meta),
                ttl=_recovered(log, "ttl", check_ttl, meta),
                created=float(meta["created"]),
            )
            if info.name in self._streams:
                raise _Corrupt(f"a second log for stream {quote(info.name)}")
            return self._add(info)
        if kind == _DATA and not stream.finishing:
            count, size, producer, tag = self._parse_data(log, payload, start + _ENTRY.size)
            self._replay_batch(stream, count, size, producer, tag or _derived_tag(crc, start))
        elif kind == _FINISH:
            self._replay_finish(stream)
        else:
            raise _Corrupt(f"an unexpected entry of kind {kind}")
        return stream

    @staticmethod
    def _parse_data(
        log: _Log, payload: bytes, base: int
    ) -> tuple[int, int, tuple[str, int, int] | None, str | None]:
        """A DATA entry's record count and bytes, producer and tag; indexes its records."""
        producer: tuple[str, int, int] | None = None
        tag: str | None = None
        flags = payload[0]
        if flags & ~_FLAGS:
            raise _Corrupt(f"unknown DATA flags {flags:#x}")
        pos = 1
        if flags & _HAS_TAG:
            tag = payload[pos : pos + _TAG_SIZE].hex()
            if len(tag) != 2 * _TAG_SIZE:
                raise _Corrupt("a DATA entry shorter than its tag")
            pos += _TAG_SIZE
        if flags & _HAS_PRODUCER:
            (id_length,) = _U16.unpack_from(payload, pos)
            producer_id = payload[pos + 2 : pos + 2 + id_length].decode()
            pos += 2 + id_length
            epoch, seq = _PRODUCER.unpack_from(payload, pos)
            producer = (producer_id, epoch, seq)
            pos += _PRODUCER.size
        (count,) = _U32.unpack_from(payload, pos)
        pos += 4
        if flags & _PACKED:  # the records as a message body packs them
            lengths = array("Q", struct.unpack_from(f">{count}I", payload, pos))
            starts = array("Q", accumulate(lengths, initial=base + pos + 4 * count))
            if starts.pop() != base + len(payload):
                raise _Corrupt("record lengths that do not add up to the DATA entry")
        else:  # each record after its length (before lineage tags)
            starts, lengths = array("Q"), array("Q")
            for _ in range(count):
                (length,) = _U32.unpack_from(payload, pos)
                pos += 4
                if pos + length > len(payload):
                    raise _Corrupt("a record longer than its entry")
                starts.append(base + pos)
                lengths.append(length)
                pos += length
            if pos != len(payload):
                raise _Corrupt("trailing bytes in a DATA entry")
        log.positions.extend(starts)
        log.lengths.extend(lengths)
        return count, sum(lengths), producer, tag

    # -- writing ------------------------------------------------------------

    def _write_group(self, log: _Log, entries: list[bytes], start: int) -> None:
        """In the I/O thread: write entries at the log's end, ``start``, and flush them.

        With ``fsync=False`` nothing is flushed. On failure the log is cut
        back to ``start``, so it holds no partial entry (recovery would stop
        there and lose every later append); if it cannot be cut,
        :class:`_Unrecoverable`.
        """
        fd = log.fd
        if fd < 0:
            raise OSError(errno.EBADF, "the log file is closed")
        try:
            _write_all(fd, entries[0] if len(entries) == 1 else b"".join(entries))
            if self.fsync:
                self._flush(fd)
        except OSError as exc:
            try:
                self._cut(fd, start)
            except OSError as cut:
                raise _Unrecoverable(
                    f"{exc}; and the partial entry could not be cut at byte {start}: {cut}"
                ) from exc
            raise

    def _flush(self, fd: int) -> None:
        """In the I/O thread: flush a log to disk (a hook for tests)."""
        os.fsync(fd)

    def _cut(self, fd: int, size: int) -> None:
        """In the I/O thread: cut a log back to ``size`` bytes (a hook for tests)."""
        os.ftruncate(fd, size)

    def _check_writable(self, stream: _Stream) -> None:
        broken = stream.data.broken
        if broken is not None:
            raise HubError(broken)

    def _path(self, name: str) -> Path:
        return self.data_dir / (hashlib.sha256(name.encode()).hexdigest() + ".log")

    async def _store_create(self, stream: _Stream) -> None:
        info = stream.info
        meta = {
            "name": info.name,
            "content_type": info.content_type,
            "ttl": info.ttl,
            "created": info.created,
        }
        entry = _entry(_CREATE, [json.dumps(meta).encode()])
        log = stream.data = _Log(self._path(info.name), -1, len(entry))
        # Appends that come meanwhile are written after it: the thread runs
        # jobs in order. If it fails, they fail too (the file is not open).
        try:
            await self._run(_open_log, log, entry, self.fsync)
        except OSError as exc:
            raise HubError(f"could not create {log.path.name}: {exc}") from exc

    async def _store_append(self, stream: _Stream, entry: _Entry, records: Records) -> None:
        log: _Log = stream.data
        flags = _HAS_TAG | _PACKED
        head = [b"", bytes.fromhex(entry.tag)]
        if entry.producer_id is not None:
            state: ProducerState | None = entry.state
            assert state is not None
            flags |= _HAS_PRODUCER
            encoded_id = entry.producer_id.encode()
            head += (_U16.pack(len(encoded_id)), encoded_id, _PRODUCER.pack(state.epoch, state.seq))
        head[0] = bytes((flags,))
        count = len(records)
        body = records.view() if records else memoryview(_U32.pack(0))
        lengths = struct.unpack_from(f">{count}I", body, 4)
        first = log.end + _ENTRY.size + sum(map(len, head)) + 4 + 4 * count
        starts = array("Q", accumulate(lengths, initial=first))
        starts.pop()
        log.positions.extend(starts)
        log.lengths.extend(lengths)
        parts: list[bytes | memoryview] = [*head, body]
        await self._write(stream, entry, _entry(_DATA, parts))

    async def _store_finish(self, stream: _Stream, entry: _Entry) -> None:
        await self._write(stream, entry, _entry(_FINISH, []))

    async def _write(self, stream: _Stream, entry: _Entry, data: bytes) -> None:
        """Queue an entry for the stream's writer and wait until it is committed."""
        log: _Log = stream.data
        log.end += len(data)
        entry.done = asyncio.get_running_loop().create_future()
        log.queue.append((entry, data))
        if log.writer is None:
            log.writer = asyncio.create_task(self._write_queue(stream, log))
        # Shielded: the entry is written, and others may wait for it, even
        # if this request is cancelled.
        await asyncio.shield(entry.done)

    async def _write_queue(self, stream: _Stream, log: _Log) -> None:
        """Write the queued entries, those queued together as one group, until none is left."""
        try:
            while log.queue and not log.closed:
                group, log.queue = log.queue, []
                start = log.committed
                try:
                    await self._run(self._write_group, log, [data for _, data in group], start)
                except OSError as exc:
                    self._failed(stream, log, exc)
                    continue
                log.committed += sum(len(data) for _, data in group)
                for entry, _ in group:
                    self._commit(stream, entry)
        except BaseException as exc:  # cancelled by close(): nothing waits unanswered
            self._failed(stream, log, exc)
            raise
        finally:
            log.writer = None
            if log.queue:  # deleted: what was waiting is not written
                self._failed(stream, log, HubError(f"stream {quote(stream.info.name)} was deleted"))

    def _failed(self, stream: _Stream, log: _Log, exc: BaseException) -> None:
        """Writing failed: forget every entry not committed, as if never appended."""
        log.queue.clear()
        log.end = log.committed
        committed = stream.info.next_offset
        del log.positions[committed:]
        del log.lengths[committed:]
        if isinstance(exc, _Unrecoverable):
            log.broken = (
                f"stream {quote(stream.info.name)} takes no appends until the hub restarts:"
                f" writing to {log.path.name} failed: {exc}"
            )
            logger.error("%s", log.broken)
        error = (
            exc
            if isinstance(exc, HubError)
            else HubError(f"could not write to {log.path.name}: {exc}")
        )
        self._rollback(stream, error)

    # -- reading and deleting -------------------------------------------------

    async def _store_read(
        self, stream: _Stream, start: int, stop: int, max_bytes: int
    ) -> tuple[Records, str]:
        log: _Log = stream.data
        positions, lengths = log.positions, log.lengths
        count = take_within(lengths[start:stop], max_bytes)
        first, last = positions[start], start + count - 1
        try:
            data = memoryview(
                await self._run(_read_range, log, positions[last] + lengths[last] - first, first)
            )
        except OSError as exc:
            raise HubError(f"could not read {log.path.name}: {exc}") from exc
        # The records of a packed entry lie back to back; older entries
        # have each one's length before it.
        pieces = []
        starts = stream.starts
        batch = bisect_right(starts, start) - 1
        low = start
        while low <= last:
            high = min(last + 1, starts[batch + 1] if batch + 1 < len(starts) else last + 1)
            span = positions[high - 1] + lengths[high - 1] - positions[low]
            if span == sum(lengths[low:high]):
                at = positions[low] - first
                pieces.append(data[at : at + span])
            else:
                pieces += (
                    data[position - first : position - first + length]
                    for position, length in zip(positions[low:high], lengths[low:high], strict=True)
                )
            low = high
            batch += 1
        return Records.from_lengths(lengths[start : last + 1], b"".join(pieces)), self._tag(
            stream, last
        )

    async def _store_delete(self, stream: _Stream) -> None:
        log: _Log = stream.data
        log.closed = True
        # Queued now, before any later job: a stream created again under
        # this name opens its file after this one is gone.
        try:
            await self._run(_remove_log, log, stream.info.name, self.fsync)
        except OSError as exc:
            raise HubError(f"could not delete {log.path.name}: {exc}") from exc

    async def close(self) -> None:
        """Close every log and release ``data_dir``; the files stay."""
        logs = [stream.data for stream in self._streams.values() if stream.data is not None]
        # No request comes any more: let the writers finish what was asked.
        writers = [log.writer for log in logs if log.writer is not None]
        await asyncio.gather(*writers, return_exceptions=True)
        await self._run(_close_logs, logs)
        self._io.shutdown()
        await super().close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1
