"""The hub's file log: recovery, the format on disk, group commit and write failures."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkit.hub import HubError, Limits, filelog
from streamkit.hub.filelog import FileStorage
from streamkit.hub.storage import Produced
from tests.test_hub_storage import read_all, started

BIG = 1 << 20


def opened(data_dir: Path, *, fsync: bool = False) -> AbstractAsyncContextManager[FileStorage]:
    """File storage on ``data_dir``, started, closed on the way out."""
    return started(FileStorage(data_dir, fsync=fsync))


async def fill(data_dir: Path) -> list[bytes]:
    records = []
    async with opened(data_dir) as storage:
        await storage.create("log", ttl=3600, content_type="application/json")
        for n in range(20):
            batch = [b"record %d.%d " % (n, i) + b"x" * (n * 13 % 50) for i in range(n % 3 + 1)]
            if n % 2:
                await storage.produce("log", batch, "producer-é", 1, n // 2)
            else:
                await storage.append("log", batch)
            records += batch
    return records


def log_file(data_dir: Path) -> Path:
    (path,) = logs(data_dir)
    return path


def logs(data_dir: Path) -> list[Path]:
    return list(data_dir.glob("*.log"))


async def test_reopened_storage_has_every_stream_record_producer_and_tag(tmp_path: Path) -> None:
    records = await fill(tmp_path)
    async with opened(tmp_path) as storage:
        await storage.create("other", ttl=None, content_type=None)
        await storage.finish("other")
        tags = [await storage.tag_at("log", offset) for offset in range(len(records))]

    async with opened(tmp_path) as storage:
        info = await storage.get("log")
        assert info is not None
        assert (info.ttl, info.content_type, info.finished) == (3600, "application/json", False)
        assert info.next_offset == len(records)
        assert info.size_bytes == sum(map(len, records))
        assert await read_all(storage, "log") == records
        assert [await storage.tag_at("log", offset) for offset in range(len(records))] == tags
        state = await storage.producer("log", "producer-é")
        assert state is not None
        assert (state.epoch, state.seq) == (1, 9)
        other = await storage.get("other")
        assert other is not None and other.finished
        await storage.append("log", [b"after restart"])
        assert await read_all(storage, "log", len(records)) == [b"after restart"]


async def test_a_second_hub_cannot_open_the_same_data_dir(tmp_path: Path) -> None:
    async with opened(tmp_path):
        with pytest.raises(HubError, match="in use by another hub"):
            FileStorage(tmp_path)
    async with opened(tmp_path):  # released on close
        pass


async def test_deleted_stream_leaves_no_file_and_its_name_can_be_made_again(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path, fsync=True) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"durable"])
        assert len(logs(tmp_path)) == 1
        await storage.delete("s")
        assert logs(tmp_path) == []
        # Deleted and made again at once: the old file's removal never takes the new one.
        await storage.create("s", ttl=None, content_type=None)
        appended = asyncio.ensure_future(storage.append("s", [b"one"]))
        await asyncio.sleep(0)  # its entry is queued
        await storage.delete("s")
        await storage.create("s", ttl=None, content_type=None)
        with pytest.raises(HubError, match="deleted"):
            await appended  # queued before the delete: not written, and says so
        await storage.append("s", [b"two"])
    async with opened(tmp_path) as storage:
        assert await read_all(storage, "s") == [b"two"]


def entry_spans(log: bytes) -> list[tuple[int, int]]:
    """Where each entry of an undamaged log starts and ends."""
    spans, start = [], 0
    while start < len(log):
        (length,) = struct.unpack_from(">I", log, start + 1)
        spans.append((start, start + 9 + length))
        start += 9 + length
    return spans


#: Records in each DATA entry that fill() writes: batch n holds n % 3 + 1.
FILL_BATCHES = [n % 3 + 1 for n in range(20)]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_torn_tail_is_cut_and_damage_inside_is_kept_and_neither_is_served(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    data_dir = tmp_path_factory.mktemp("log")
    records = asyncio.run(fill(data_dir))
    path = log_file(data_dir)
    original = path.read_bytes()
    spans = entry_spans(original)
    # Positions are drawn as fractions: the log's size varies with its timestamp.
    scale = 10_000
    cut = data.draw(st.integers(0, scale), label="cut") * len(original) // scale
    flip_at = data.draw(st.none() | st.integers(0, scale - 1), label="flip")
    flip = None if flip_at is None else flip_at * len(original) // scale
    content = bytearray(original[:cut])
    if flip is not None and flip < cut:
        content[flip] ^= 0x20
    path.write_bytes(content)
    # The first damaged entry (cut short or flipped), and whether a whole,
    # undamaged entry follows it: then it is damage inside the log.
    hurt = [end > cut or (flip is not None and start <= flip < end) for start, end in spans]
    damaged = hurt.index(True) if True in hurt else len(spans)
    inside = not all(hurt[damaged:])

    async def check() -> None:
        async with opened(data_dir) as storage:
            info = await storage.get("log")
            if damaged == 0:  # no valid CREATE entry: no stream, but no data thrown away
                assert info is None and not path.exists()
                aside = list(data_dir.glob("*.corrupt"))
                assert [file.read_bytes() for file in aside] == ([content] if aside else [])
                assert aside or not inside
                return
            assert info is not None
            served = sum(FILL_BATCHES[: damaged - 1])
            assert await read_all(storage, "log") == records[:served]
            assert info.next_offset == served
            if inside:  # kept whole, served up to the damage, closed to appends
                message = rf"'log' is read-only.*byte {spans[damaged][0]} .*offset {served} on"
                with pytest.raises(HubError, match=message):
                    await storage.append("log", [b"next"])
                assert path.read_bytes() == content
                return
            good = spans[damaged][0] if damaged < len(spans) else cut
            assert path.stat().st_size == good  # a torn tail is cut
            await storage.append("log", [b"next"])  # and later appends land after the good part
        async with opened(data_dir) as storage:
            assert await read_all(storage, "log") == [*records[:served], b"next"]

    asyncio.run(check())


@pytest.mark.parametrize("last", [True, False], ids=["last-entry", "entries-after"])
async def test_a_batch_over_a_lowered_max_batch_is_kept_not_cut(tmp_path: Path, last: bool) -> None:
    big = [b"x" * 5000, b"y" * 5000]
    async with opened(tmp_path) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"small"])
        await storage.append("s", big)
        if not last:
            await storage.append("s", [b"after"])
    content = log_file(tmp_path).read_bytes()
    lowered = FileStorage(tmp_path, limits=Limits(max_batch=1000))  # the entry is too long now
    try:
        assert await read_all(lowered, "s") == [b"small"]
        with pytest.raises(HubError, match=r"read-only.*over the \d+ that max_batch=1000 allows"):
            await lowered.append("s", [b"more"])
    finally:
        await lowered.close()
    assert log_file(tmp_path).read_bytes() == content  # nothing cut
    async with opened(tmp_path) as storage:  # the limit raised again: all of it is served
        assert await read_all(storage, "s") == [b"small", *big] + ([] if last else [b"after"])


async def test_garbage_files_do_not_stop_recovery(tmp_path: Path) -> None:
    await fill(tmp_path)
    (tmp_path / ("0" * 64 + ".log")).write_bytes(os.urandom(100))
    (tmp_path / "notes.txt").write_text("not a log")
    async with opened(tmp_path) as storage:
        assert await storage.names() == ["log"]


async def test_a_log_with_a_bad_ttl_from_an_old_version_keeps_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta = {"name": "old", "content_type": 5, "ttl": "abc", "created": 1.0}
    data = b"\x00" + (1).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc"
    (tmp_path / "old.log").write_bytes(
        filelog._entry(filelog._CREATE, [json.dumps(meta).encode()])
        + filelog._entry(filelog._DATA, [data])
    )
    async with opened(tmp_path) as storage:
        info = await storage.get("old")
        assert info is not None and (info.ttl, info.content_type) == (None, None)
        assert await read_all(storage, "old") == [b"abc"]
        assert await storage.expire(1e12) == []  # it never expires, and expiry goes on
    assert "ignoring an invalid ttl" in caplog.text
    assert "ignoring an invalid content_type" in caplog.text


def old_data_entry(records: list[bytes], producer: tuple[str, int, int] | None = None) -> bytes:
    """A DATA entry as versions before lineage tags wrote it (``has_producer u8``, no tag)."""
    parts = [b"\x00"]
    if producer is not None:
        producer_id, epoch, seq = producer
        encoded = producer_id.encode()
        parts = [b"\x01", len(encoded).to_bytes(2, "big"), encoded]
        parts += [epoch.to_bytes(8, "big"), seq.to_bytes(8, "big")]
    parts.append(len(records).to_bytes(4, "big"))
    for record in records:
        parts += [len(record).to_bytes(4, "big"), record]
    return filelog._entry(filelog._DATA, parts)


async def test_a_log_written_before_tags_gets_tags_from_each_entry(tmp_path: Path) -> None:
    meta = {"name": "old", "content_type": None, "ttl": None, "created": 1.0}
    create = filelog._entry(filelog._CREATE, [json.dumps(meta).encode()])
    first = old_data_entry([b"a", b"b"])
    second = old_data_entry([b"c"], ("p", 0, 0))
    (tmp_path / "old.log").write_bytes(create + first + second)
    async with opened(tmp_path) as storage:
        tags = [await storage.tag_at("old", offset) for offset in range(3)]
        assert await storage.producer("old", "p") is not None
        await storage.append("old", [b"new"])
        assert await storage.produce("old", [b"c"], "p", 0, 0) == Produced(2, True)
    # The documented derivation: the entry's CRC, then its position.
    crc = int.from_bytes(first[5:9], "big")
    assert tags[0] == tags[1] == f"{crc:08x}{len(create):08x}"
    assert tags[2] is not None and tags[2] != tags[0]
    assert tags[2].endswith(f"{len(create) + len(first):08x}")
    async with opened(tmp_path) as storage:  # the same after every restart
        assert [await storage.tag_at("old", offset) for offset in range(3)] == tags
        assert await storage.tag_at("old", 3) not in (*tags, None)  # a new entry has its own
        assert await read_all(storage, "old") == [b"a", b"b", b"c", b"new"]


async def test_a_log_with_a_bad_create_entry_is_set_aside_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(tmp_path)
    path = log_file(tmp_path)
    content = bytearray(path.read_bytes())
    content[12] ^= 0x01  # a bit of the CREATE entry's JSON: its CRC fails
    path.write_bytes(content)
    (tmp_path / (path.name + ".corrupt")).write_bytes(b"set aside earlier")
    async with opened(tmp_path) as storage:
        assert await storage.names() == []
    assert not path.exists()
    aside = tmp_path / (path.name + ".corrupt.1")
    assert aside.read_bytes() == content  # every byte kept for inspection
    assert "no valid CREATE entry (a CRC mismatch); moved to" in caplog.text
    # A create cut short by a crash (a torn CREATE entry) is just removed.
    torn = tmp_path / ("1" * 64 + ".log")
    torn.write_bytes(filelog._entry(filelog._CREATE, [b'{"name": "t"}'])[:-3])
    async with opened(tmp_path):
        pass
    assert not torn.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["LOCK", path.name + ".corrupt", aside.name])


async def test_a_stream_whose_ttl_passed_while_the_hub_was_down_is_gone_on_restart(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as storage:
        await storage.create("brief", ttl=10.0, content_type=None)
        await storage.append("brief", [b"x"])
    path = log_file(tmp_path)
    content = bytearray(path.read_bytes())
    # Move its creation 100 s into the past, as if the hub had been down that long.
    meta_end = 9 + int.from_bytes(content[1:5], "big")
    meta = json.loads(content[9:meta_end])
    meta["created"] -= 100
    path.write_bytes(
        filelog._entry(filelog._CREATE, [json.dumps(meta).encode()]) + content[meta_end:]
    )
    async with opened(tmp_path) as storage:
        assert await storage.get("brief") is None and await storage.names() == []  # gone at once
        assert await storage.expire(time.time()) == ["brief"]  # and the sweep frees it
        assert not path.exists()


# -- group commit ---------------------------------------------------------------------


class WatchedFlushes(FileStorage):
    """File storage that counts its (real) fsyncs and notes how much of each log they cover."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, fsync=True)
        self.flushes = 0
        self.durable: dict[int, int] = {}  # bytes of each log (by fd) known flushed
        self.thread: threading.Thread | None = None

    def _flush(self, fd: int) -> None:
        size = os.fstat(fd).st_size  # what this fsync makes durable
        super()._flush(fd)
        self.thread = threading.current_thread()
        self.flushes += 1
        self.durable[fd] = size


async def test_appends_waiting_together_share_one_fsync_and_none_is_acknowledged_before_it(
    tmp_path: Path,
) -> None:
    storage = WatchedFlushes(tmp_path)
    try:
        await storage.create("s", ttl=None, content_type=None)
        log = storage._streams["s"].data
        loop_thread = threading.current_thread()

        async def append(number: int) -> None:
            offset = await storage.append("s", [b"record %d" % number])
            # Acknowledged: the fsync that covers its entry has returned.
            end = log.positions[offset] + log.lengths[offset]
            assert storage.durable[log.fd] >= end, (number, offset)

        for rounds in range(3):
            appends = [asyncio.ensure_future(append(n)) for n in range(20)]
            await asyncio.sleep(0)
            info = await storage.get("s")
            assert info is not None and info.next_offset == 20 * rounds  # none readable yet
            await asyncio.gather(*appends)
        assert storage.flushes <= 6  # 60 appends in a few groups, not one fsync each
        assert storage.thread is not None and storage.thread is not loop_thread  # off the loop
        assert len(await read_all(storage, "s")) == 60
    finally:
        await storage.close()


# -- write failures -------------------------------------------------------------------


class FailingFlushes(FileStorage):
    """File storage whose next fsyncs fail (a disk error), and whose log cut may fail too."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, fsync=True)
        self.fail_flushes = 0
        self.fail_cut = False

    def _flush(self, fd: int) -> None:
        if self.fail_flushes:
            self.fail_flushes -= 1
            raise OSError(5, "Input/output error")
        super()._flush(fd)

    def _cut(self, fd: int, size: int) -> None:
        if self.fail_cut:
            raise OSError(30, "Read-only file system")
        super()._cut(fd, size)


async def test_a_failed_write_leaves_the_log_and_the_books_as_they_were(tmp_path: Path) -> None:
    storage = FailingFlushes(tmp_path)
    try:
        await storage.create("s", ttl=None, content_type=None)
        assert await storage.produce("s", [b"a"], "p", 0, 0) == Produced(0, False)
        size = log_file(tmp_path).stat().st_size
        storage.fail_flushes = 1
        failed = [storage.produce("s", [b"b"], "p", 0, 1), storage.append("s", [b"c"])]
        for outcome in await asyncio.gather(*failed, return_exceptions=True):
            assert isinstance(outcome, HubError)
            assert "could not write to" in str(outcome) and "Input/output error" in str(outcome)
        assert log_file(tmp_path).stat().st_size == size  # cut back: no partial entry
        info = await storage.get("s")
        assert info is not None and info.next_offset == 1
        # Not appended, so not counted: the producer's batch 1 is new again.
        assert await storage.produce("s", [b"b"], "p", 0, 1) == Produced(1, False)
        assert await storage.append("s", [b"c"]) == 2
    finally:
        await storage.close()
    async with opened(tmp_path) as reopened:
        assert await read_all(reopened, "s") == [b"a", b"b", b"c"]


async def test_a_log_that_cannot_be_cut_back_takes_no_more_appends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = FailingFlushes(tmp_path)
    try:
        await storage.create("s", ttl=None, content_type=None)
        await storage.create("other", ttl=None, content_type=None)
        storage.fail_flushes, storage.fail_cut = 1, True
        with pytest.raises(HubError, match="could not be cut at byte"):
            await storage.append("s", [b"lost"])
        storage.fail_cut = False
        for refused in (storage.append("s", [b"x"]), storage.finish("s")):
            with pytest.raises(HubError, match="'s' takes no appends until the hub restarts"):
                await refused
        assert await storage.append("other", [b"fine"]) == 0  # other streams go on
        assert await read_all(storage, "s") == []
    finally:
        await storage.close()
    assert "writing to" in caplog.text and "could not be cut" in caplog.text
