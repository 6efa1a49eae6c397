"""File storage for the hub: one append-only log per stream, recovered on restart.

Each stream is a file ``<sha256 of its name>.log`` in the data directory: a
sequence of entries ``kind u8 | length u32 | crc32 u32 | payload`` (big
endian; the CRC covers the kind byte and the payload). Kinds:

- ``CREATE`` (first entry): JSON ``{"name", "content_type", "ttl", "created"}``;
- ``DATA``: one appended batch, ``has_producer u8`` [``id_length u16 | id |
  epoch u64 | seq u64``], ``count u32``, then ``count`` times ``length u32 |
  record``; a producer's state is in the same entry as its records, so a
  retried batch is recognised after a restart;
- ``FINISH``: empty.

Every append is one ``write`` of one entry, so no entry the hub writes is
larger than one batch can make: a payload of at most ``Limits.max_batch``
plus the DATA header (or a CREATE entry's JSON, for a long ``max_name``).
Records are read back with ``pread`` through an in-memory index (two
integers per record).

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

Durability: an append is acknowledged once its entry is written to the OS,
so it survives the hub process being killed; with ``fsync=True`` each entry
is also ``fsync``-ed before the acknowledgement, so it survives a power loss
or an OS crash, at the cost of one disk flush per append (or producer batch).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from streamkit.hub.protocol import (
    MAX_CONTENT_TYPE,
    MAX_PRODUCER_ID,
    check_content_type,
    check_ttl,
    quote,
)
from streamkit.hub.storage import HubError, Limits, StreamInfo, StreamTable, take_within

__all__ = ["FileStorage"]

logger = logging.getLogger("streamkit.hub")

_ENTRY = struct.Struct(">BII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_PRODUCER = struct.Struct(">QQ")
_CREATE, _DATA, _FINISH = 1, 2, 3
#: The bytes of a DATA payload beside its batch's lengths and records: the
#: producer flag, the longest producer id with its length, epoch and seq,
#: and the record count.
_DATA_OVERHEAD = 1 + _U16.size + MAX_PRODUCER_ID + _PRODUCER.size + _U32.size
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
    too) plus the producer's header; a CREATE entry is JSON of at most
    ``max_name`` and ``MAX_CONTENT_TYPE`` bytes, each escaped to at most 6.
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


class _Log:
    """One stream's open log file and the position of each of its records."""

    __slots__ = ("damage", "end", "fd", "lengths", "path", "positions")

    def __init__(self, path: Path, fd: int, end: int) -> None:
        self.path = path
        self.fd = fd
        self.end = end  # bytes of valid entries
        self.positions = array("Q")  # file position of each record's bytes
        self.lengths = array("Q")
        # Why the log takes no appends (damage inside it), or None.
        self.damage: str | None = None


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


def _entry(kind: int, parts: list[bytes]) -> bytes:
    payload = b"".join(parts)
    crc = zlib.crc32(payload, zlib.crc32(bytes((kind,))))
    return _ENTRY.pack(kind, len(payload), crc) + payload


class FileStorage(StreamTable):
    """Streams kept as append-only logs under ``data_dir``; see the module doc.

    ``fsync=True`` flushes every append to disk before it is acknowledged.
    One process at a time may use a ``data_dir`` (an exclusive lock on
    ``data_dir/LOCK``); a second gets a :class:`HubError`. An I/O error on
    append raises :class:`HubError` and leaves the log as it was.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], *, limits: Limits | None = None, fsync: bool = False
    ) -> None:
        super().__init__(limits)
        self._max_payload = _max_entry_payload(self.limits)
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self._logs: dict[str, _Log] = {}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock)
            raise HubError(f"data_dir {str(self.data_dir)!r} is in use by another hub") from exc
        for path in sorted(self.data_dir.glob("*.log")):
            self._recover(path)

    # -- recovery -----------------------------------------------------------

    def _recover(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        size = os.fstat(fd).st_size
        log = _Log(path, fd, 0)
        info: StreamInfo | None = None
        damage: _Corrupt | None = None  # the first damaged entry, at log.end
        with open(path, "rb") as file:
            while log.end < size:
                try:
                    kind, payload = self._read_entry(file, log.end, size)
                    info = self._replay(log, info, kind, payload, log.end + _ENTRY.size)
                except _Corrupt as exc:
                    damage = exc
                    break
                except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
                    damage = _Corrupt(f"an entry that does not parse ({exc!r})")
                    break
                log.end += _ENTRY.size + len(payload)
        if damage is None and info is not None:
            self._logs[info.name] = log
            return
        followed = damage is not None and self._followed(fd, log.end, size, damage)
        if info is None:
            os.close(fd)
            if damage is None or (isinstance(damage, _Torn) and not followed):
                path.unlink()  # empty, or a create that a crash cut short
            else:
                self._set_aside(path, f"no valid CREATE entry ({damage})")
            return
        assert damage is not None
        if followed:
            log.damage = (
                f"stream {quote(info.name)} is read-only: its log {path.name} is damaged at"
                f" byte {log.end} ({damage}) with valid entries after it; records from"
                f" offset {info.next_offset} on are not served, and appends are refused,"
                " until the log is repaired"
            )
            logger.error("%s", log.damage)
        else:
            logger.warning("%s: cutting a torn tail at byte %d (%s)", path.name, log.end, damage)
            os.ftruncate(fd, log.end)
        self._logs[info.name] = log

    def _read_entry(self, file: BinaryIO, start: int, size: int) -> tuple[int, bytes]:
        """The entry at ``start`` (where ``file`` is): its kind and payload, checked.

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
        return kind, payload

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
        if kind == _DATA and head[_ENTRY.size] > 1:  # its producer flag is 0 or 1
            return False
        payload = os.pread(fd, length, start + _ENTRY.size)
        return bool(zlib.crc32(payload, zlib.crc32(bytes((kind,)))) == crc)

    def _set_aside(self, path: Path, why: str) -> None:
        """Rename a log the hub cannot serve (or delete) in full: it may hold someone's data."""
        aside = path.with_name(path.name + ".corrupt")
        number = 0
        while aside.exists():
            number += 1
            aside = path.with_name(f"{path.name}.corrupt.{number}")
        path.rename(aside)
        logger.warning("%s: %s; moved to %s", path.name, why, aside.name)

    def _replay(
        self, log: _Log, info: StreamInfo | None, kind: int, payload: bytes, base: int
    ) -> StreamInfo:
        if info is None:
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
            self._add(info)
            return info
        if kind == _DATA and not info.finished:
            records, producer = self._parse_data(log, payload, base)
            self._appended(self._streams[info.name], records, sum(map(len, records)), producer)
        elif kind == _FINISH:
            info.finished = True
        else:
            raise _Corrupt(f"an unexpected entry of kind {kind}")
        return info

    @staticmethod
    def _parse_data(
        log: _Log, payload: bytes, base: int
    ) -> tuple[list[bytes], tuple[str, int, int] | None]:
        producer: tuple[str, int, int] | None = None
        pos = 1
        if payload[0]:
            (id_length,) = _U16.unpack_from(payload, pos)
            producer_id = payload[pos + 2 : pos + 2 + id_length].decode()
            pos += 2 + id_length
            epoch, seq = _PRODUCER.unpack_from(payload, pos)
            producer = (producer_id, epoch, seq)
            pos += _PRODUCER.size
        (count,) = _U32.unpack_from(payload, pos)
        pos += 4
        records = []
        positions: list[int] = []
        for _ in range(count):
            (length,) = _U32.unpack_from(payload, pos)
            pos += 4
            if pos + length > len(payload):
                raise _Corrupt("a record longer than its entry")
            records.append(payload[pos : pos + length])
            positions.append(base + pos)
            pos += length
        if pos != len(payload):
            raise _Corrupt("trailing bytes in a DATA entry")
        log.positions.extend(positions)
        log.lengths.extend(map(len, records))
        return records, producer

    # -- writing ------------------------------------------------------------

    def _write(self, log: _Log, entry: bytes) -> None:
        try:
            written = os.write(log.fd, entry)
            if written != len(entry):
                raise OSError(f"short write ({written} of {len(entry)} bytes)")
            if self.fsync:
                os.fsync(log.fd)
        except OSError as exc:
            # Cut a partly written entry, or recovery would stop there and
            # lose every later append.
            os.ftruncate(log.fd, log.end)
            raise HubError(f"could not write to {log.path.name}: {exc}") from exc
        log.end += len(entry)

    def _path(self, name: str) -> Path:
        return self.data_dir / (hashlib.sha256(name.encode()).hexdigest() + ".log")

    def _store_create(self, info: StreamInfo) -> None:
        path = self._path(info.name)
        meta = {
            "name": info.name,
            "content_type": info.content_type,
            "ttl": info.ttl,
            "created": info.created,
        }
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as exc:
            raise HubError(f"could not create {path.name}: {exc}") from exc
        log = _Log(path, fd, 0)
        try:
            self._write(log, _entry(_CREATE, [json.dumps(meta).encode()]))
            if self.fsync:
                self._sync_dir()
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._logs[info.name] = log

    def _writable(self, name: str) -> _Log:
        log = self._logs[name]
        if log.damage is not None:
            raise HubError(log.damage)
        return log

    def _store_append(
        self, name: str, records: list[bytes], producer: tuple[str, int, int] | None
    ) -> None:
        log = self._writable(name)
        parts = [b"\x00"]
        if producer is not None:
            producer_id, epoch, seq = producer
            encoded_id = producer_id.encode()
            parts = [b"\x01", _U16.pack(len(encoded_id)), encoded_id, _PRODUCER.pack(epoch, seq)]
        parts.append(_U32.pack(len(records)))
        position = log.end + _ENTRY.size + sum(map(len, parts))
        positions = []
        for record in records:
            parts += (_U32.pack(len(record)), record)
            positions.append(position + 4)
            position += 4 + len(record)
        self._write(log, _entry(_DATA, parts))
        log.positions.extend(positions)
        log.lengths.extend(map(len, records))

    def _store_read(self, name: str, start: int, stop: int, max_bytes: int) -> list[bytes]:
        log = self._logs[name]
        count = take_within(log.lengths[start:stop], max_bytes)
        first = log.positions[start]
        last = start + count - 1
        data = memoryview(os.pread(log.fd, log.positions[last] + log.lengths[last] - first, first))
        return [
            bytes(data[position - first : position - first + length])
            for position, length in zip(
                log.positions[start : start + count],
                log.lengths[start : start + count],
                strict=True,
            )
        ]

    def _store_finish(self, name: str) -> None:
        self._write(self._writable(name), _entry(_FINISH, []))

    def _store_delete(self, name: str) -> None:
        log = self._logs.pop(name)
        os.close(log.fd)
        if log.damage is not None:  # what lies past the damage may be someone's records
            self._set_aside(log.path, f"stream {quote(name)} deleted with a damaged log")
        else:
            log.path.unlink(missing_ok=True)
        if self.fsync:
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close every log and release ``data_dir``; the files stay."""
        for log in self._logs.values():
            os.close(log.fd)
        self._logs.clear()
        super().close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1
