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

Every append is one ``write`` of one entry. On open, each log is read back;
the first entry that is short (torn by a crash mid-write), fails its CRC or
does not parse ends the log: the file is truncated there, so a corrupt tail
is never served. A file whose CREATE entry is torn (a create cut short) is
removed; one whose CREATE entry is bad in any other way is no stream the
hub can trust, but may hold data: it is renamed to ``<file>.corrupt``.
Records are read back with ``pread`` through an in-memory index (two
integers per record).

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
import struct
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from streamkit.hub.protocol import check_content_type, check_ttl
from streamkit.hub.storage import HubError, Limits, StreamInfo, StreamTable, take_within

__all__ = ["FileStorage"]

logger = logging.getLogger("streamkit.hub")

_ENTRY = struct.Struct(">BII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_PRODUCER = struct.Struct(">QQ")
_CREATE, _DATA, _FINISH = 1, 2, 3
_LOCK_FILE = "LOCK"
_T = TypeVar("_T")


class _Corrupt(Exception):
    """An entry that cannot be trusted; the log ends before it."""


class _Torn(_Corrupt):
    """An entry cut short by the end of the file: a write a crash interrupted."""


class _Log:
    """One stream's open log file and the position of each of its records."""

    __slots__ = ("end", "fd", "lengths", "path", "positions")

    def __init__(self, path: Path, fd: int, end: int) -> None:
        self.path = path
        self.fd = fd
        self.end = end  # bytes of valid entries
        self.positions = array("Q")  # file position of each record's bytes
        self.lengths = array("Q")


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
        log = _Log(path, fd, 0)
        info: StreamInfo | None = None
        problem: Exception | None = None  # what was wrong with the first entry
        with open(path, "rb") as file:
            while True:
                start = log.end
                header = file.read(_ENTRY.size)
                if not header:
                    break
                try:
                    if len(header) < _ENTRY.size:
                        raise _Torn("a torn entry header")
                    kind, length, crc = _ENTRY.unpack(header)
                    payload = file.read(length)
                    if len(payload) < length:
                        raise _Torn(f"a torn entry ({len(payload)} of {length} bytes)")
                    if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
                        raise _Corrupt("a CRC mismatch")
                    info = self._replay(log, info, kind, payload, start + _ENTRY.size)
                except (_Corrupt, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
                    if info is None:
                        problem = exc
                        break
                    logger.warning(
                        "%s: cutting a corrupt tail at byte %d (%s)", path.name, start, exc
                    )
                    os.ftruncate(fd, start)
                    break
                log.end = start + _ENTRY.size + length
        if info is None:
            os.close(fd)
            if problem is None or isinstance(problem, _Torn):
                path.unlink()  # empty, or a create that a crash cut short
            else:
                self._set_aside(path, problem)
            return
        self._logs[info.name] = log

    def _set_aside(self, path: Path, problem: Exception) -> None:
        """Rename a log whose CREATE entry is bad: not a stream, but maybe someone's data."""
        aside = path.with_name(path.name + ".corrupt")
        number = 0
        while aside.exists():
            number += 1
            aside = path.with_name(f"{path.name}.corrupt.{number}")
        path.rename(aside)
        logger.warning(
            "%s: no valid CREATE entry (%s); moved to %s", path.name, problem, aside.name
        )

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
                raise _Corrupt(f"a second log for stream {info.name!r}")
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

    def _store_append(
        self, name: str, records: list[bytes], producer: tuple[str, int, int] | None
    ) -> None:
        log = self._logs[name]
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
        self._write(self._logs[name], _entry(_FINISH, []))

    def _store_delete(self, name: str) -> None:
        log = self._logs.pop(name)
        os.close(log.fd)
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
