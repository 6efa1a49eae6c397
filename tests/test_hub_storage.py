"""Hub storage backends: the same contract in memory and on disk, and log recovery."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkit.hub import (
    PRODUCER_OVERHEAD,
    RECORD_OVERHEAD,
    BadRequest,
    HubError,
    LimitExceeded,
    Limits,
    MemoryStorage,
    StreamExists,
    StreamFinished,
    StreamNotFound,
    filelog,
)
from streamkit.hub.filelog import FileStorage
from streamkit.hub.storage import StreamTable


@pytest.fixture(params=["memory", "file"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StreamTable]:
    limits = Limits(max_streams=3, max_record=100, max_total_bytes=1000, max_name=10)
    store: StreamTable
    if request.param == "memory":
        store = MemoryStorage(limits)
    else:
        store = FileStorage(tmp_path / "data", limits=limits)
    yield store
    store.close()


def test_append_and_read_back(storage: StreamTable) -> None:
    storage.create("s", ttl=None, content_type="text/plain")
    assert storage.append("s", [b"a", b"bb"]) == 0
    assert storage.append("s", [b"", b"dddd"]) == 2
    assert storage.read("s", 0, 10, 1 << 20) == [b"a", b"bb", b"", b"dddd"]
    assert storage.read("s", 1, 2, 1 << 20) == [b"bb", b""]
    assert storage.read("s", 4, 10, 1 << 20) == []
    assert storage.read("s", 99, 10, 1 << 20) == []
    info = storage.get("s")
    assert info is not None
    assert (info.next_offset, info.size_bytes, info.content_type) == (4, 7, "text/plain")


def test_read_is_bounded_by_bytes_but_returns_at_least_one_record(storage: StreamTable) -> None:
    storage.create("s", ttl=None, content_type=None)
    storage.append("s", [b"x" * 40, b"y" * 40, b"z" * 40])
    assert storage.read("s", 0, 10, 80) == [b"x" * 40, b"y" * 40]
    assert storage.read("s", 0, 10, 10) == [b"x" * 40]


def test_limits_give_clear_errors(storage: StreamTable) -> None:
    with pytest.raises(HubError, match=r"1\.\.10 bytes"):
        storage.create("a-very-long-name", ttl=None, content_type=None)
    for name in "abc":
        storage.create(name, ttl=None, content_type=None)
    with pytest.raises(StreamExists, match="'a' exists"):
        storage.create("a", ttl=None, content_type=None)
    with pytest.raises(LimitExceeded, match="max_streams=3"):
        storage.create("d", ttl=None, content_type=None)
    with pytest.raises(LimitExceeded, match="101 bytes exceeds max_record=100"):
        storage.append("a", [b"x" * 101])
    storage.append("a", [b"x" * 100] * 6)  # 6 x (100 + RECORD_OVERHEAD) = 888
    with pytest.raises(LimitExceeded, match="max_total_bytes=1000"):
        storage.append("b", [b"x" * 60, b"y" * 50])  # 110 + 2 x RECORD_OVERHEAD more
    assert storage.read("b", 0, 10, 1 << 20) == []  # nothing of a refused batch is kept
    storage.delete("a")
    storage.append("b", [b"x" * 60, b"y" * 50])  # deleting gave the bytes back


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_batch_over_max_batch_is_refused_whole_at_its_edge(kind: str, tmp_path: Path) -> None:
    limits = Limits(max_batch=50)
    store = MemoryStorage(limits) if kind == "memory" else FileStorage(tmp_path, limits=limits)
    try:
        store.create("s", ttl=None, content_type=None)
        edge = [b"x" * 10] * 3 + [b""]  # 4 + 3 x (4 + 10) + 4: exactly 50, the limit
        assert store.append("s", edge) == 0
        with pytest.raises(LimitExceeded, match=r"4 records \(51 bytes .*max_batch=50"):
            store.append("s", [b"x" * 10] * 3 + [b"y"])
        assert store.read("s", 0, 100, 1 << 20) == edge  # nothing of it was kept
    finally:
        store.close()


def test_total_bytes_count_every_record_with_its_overhead_up_to_the_edge(
    storage: StreamTable, tmp_path: Path
) -> None:
    assert storage.limits.max_total_bytes == 1000 and RECORD_OVERHEAD == 48
    storage.create("s", ttl=None, content_type=None)
    storage.append("s", [b""] * 19)  # empty records cost RECORD_OVERHEAD each: 912
    storage.append("s", [b"x" * 40])  # 40 + 48: exactly 1000, the limit, is allowed
    with pytest.raises(LimitExceeded, match=r"1 records of 0 bytes \(\+48 each\)"):
        storage.append("s", [b""])
    if isinstance(storage, FileStorage):  # a restart counts the same
        storage.close()
        storage = FileStorage(tmp_path / "data", limits=storage.limits)
        with pytest.raises(LimitExceeded, match="max_total_bytes=1000"):
            storage.append("s", [b""])
    storage.delete("s")
    storage.create("t", ttl=None, content_type=None)
    storage.append("t", [b""] * 20)  # deleting gave back what the records cost
    storage.close()


def test_finish_delete_and_unknown_streams(storage: StreamTable) -> None:
    storage.create("s", ttl=None, content_type=None)
    storage.append("s", [b"1"])
    assert storage.finish("s").finished
    assert storage.finish("s").finished  # idempotent
    with pytest.raises(StreamFinished, match="'s' is finished"):
        storage.append("s", [b"2"])
    assert storage.read("s", 0, 10, 100) == [b"1"]
    storage.delete("s")
    assert storage.get("s") is None
    for call in (
        lambda: storage.append("s", [b"x"]),
        lambda: storage.read("s", 0, 1, 1),
        lambda: storage.finish("s"),
        lambda: storage.delete("s"),
    ):
        with pytest.raises(StreamNotFound, match="no stream named 's'"):
            call()


def test_expire_deletes_streams_past_their_ttl(storage: StreamTable) -> None:
    short = storage.create("short", ttl=10, content_type=None)
    storage.create("forever", ttl=None, content_type=None)
    assert storage.expire(short.created + 9.9) == []
    assert storage.expire(short.created + 10) == ["short"]
    assert storage.names() == ["forever"]


def test_producer_state_is_recorded_with_its_batch(storage: StreamTable) -> None:
    storage.create("s", ttl=None, content_type=None)
    storage.append("s", [b"a"])
    storage.append("s", [b"b", b"c"], ("p1", 2, 7))
    state = storage.producer("s", "p1")
    assert state is not None
    assert (state.epoch, state.seq, state.first_offset, state.count) == (2, 7, 1, 2)
    assert storage.producer("s", "other") is None


# -- the log on disk ----------------------------------------------------------


def fill(data_dir: Path) -> list[bytes]:
    store = FileStorage(data_dir)
    store.create("log", ttl=3600, content_type="application/json")
    records = []
    for n in range(20):
        batch = [b"record %d.%d " % (n, i) + b"x" * (n * 13 % 50) for i in range(n % 3 + 1)]
        store.append("log", batch, ("producer-é", 1, n) if n % 2 else None)
        records += batch
    store.close()
    return records


def test_reopened_storage_has_every_stream_record_and_producer(tmp_path: Path) -> None:
    records = fill(tmp_path)
    store = FileStorage(tmp_path)
    store.create("other", ttl=None, content_type=None)
    store.finish("other")
    store.close()

    store = FileStorage(tmp_path)
    try:
        info = store.get("log")
        assert info is not None
        assert (info.ttl, info.content_type, info.finished) == (3600, "application/json", False)
        assert info.next_offset == len(records)
        assert info.size_bytes == sum(map(len, records))
        assert store.read("log", 0, 1000, 1 << 20) == records
        state = store.producer("log", "producer-é")
        assert state is not None
        assert (state.epoch, state.seq) == (1, 19)
        other = store.get("other")
        assert other is not None and other.finished
        store.append("log", [b"after restart"])
        assert store.read("log", len(records), 10, 100) == [b"after restart"]
    finally:
        store.close()


def test_a_second_hub_cannot_open_the_same_data_dir(tmp_path: Path) -> None:
    store = FileStorage(tmp_path)
    try:
        with pytest.raises(HubError, match="in use by another hub"):
            FileStorage(tmp_path)
    finally:
        store.close()
    FileStorage(tmp_path).close()  # released on close


def test_deleted_stream_leaves_no_file_and_fsync_mode_works(tmp_path: Path) -> None:
    store = FileStorage(tmp_path, fsync=True)
    store.create("s", ttl=None, content_type=None)
    store.append("s", [b"durable"])
    assert len(list(tmp_path.glob("*.log"))) == 1
    store.delete("s")
    assert list(tmp_path.glob("*.log")) == []
    store.close()


def log_file(data_dir: Path) -> Path:
    (path,) = data_dir.glob("*.log")
    return path


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
    records = fill(data_dir)
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

    store = FileStorage(data_dir)
    try:
        info = store.get("log")
        if damaged == 0:  # no valid CREATE entry: no stream, but no data thrown away
            assert info is None and not path.exists()
            aside = list(data_dir.glob("*.corrupt"))
            assert [file.read_bytes() for file in aside] == ([content] if aside else [])
            assert aside or not inside
            return
        assert info is not None
        served = sum(FILL_BATCHES[: damaged - 1])
        got = store.read("log", 0, 1000, 1 << 20) if served else []
        assert got == records[:served] and info.next_offset == served
        if inside:  # kept whole, served up to the damage, closed to appends
            message = rf"'log' is read-only.*byte {spans[damaged][0]} .*offset {served} on"
            with pytest.raises(HubError, match=message):
                store.append("log", [b"next"])
            assert path.read_bytes() == content
            return
        good = spans[damaged][0] if damaged < len(spans) else cut
        assert path.stat().st_size == good  # a torn tail is cut
        store.append("log", [b"next"])  # and later appends land after the good part
    finally:
        store.close()
    store = FileStorage(data_dir)
    try:
        assert store.read("log", 0, 1000, 1 << 20) == [*got, b"next"]
    finally:
        store.close()


@pytest.mark.parametrize("last", [True, False], ids=["last-entry", "entries-after"])
def test_a_batch_over_a_lowered_max_batch_is_kept_not_cut(tmp_path: Path, last: bool) -> None:
    big = [b"x" * 5000, b"y" * 5000]
    store = FileStorage(tmp_path)
    store.create("s", ttl=None, content_type=None)
    store.append("s", [b"small"])
    store.append("s", big)
    if not last:
        store.append("s", [b"after"])
    store.close()
    content = log_file(tmp_path).read_bytes()
    store = FileStorage(tmp_path, limits=Limits(max_batch=1000))  # lowered: the entry is too long
    try:
        assert store.read("s", 0, 10, 1 << 20) == [b"small"]
        with pytest.raises(HubError, match=r"read-only.*over the \d+ that max_batch=1000 allows"):
            store.append("s", [b"more"])
    finally:
        store.close()
    assert log_file(tmp_path).read_bytes() == content  # nothing cut
    store = FileStorage(tmp_path)  # the limit raised again: all of it is served
    try:
        expected = [b"small", *big] + ([] if last else [b"after"])
        assert store.read("s", 0, 10, 1 << 20) == expected
    finally:
        store.close()


def test_garbage_files_do_not_stop_recovery(tmp_path: Path) -> None:
    fill(tmp_path)
    (tmp_path / ("0" * 64 + ".log")).write_bytes(os.urandom(100))
    (tmp_path / "notes.txt").write_text("not a log")
    store = FileStorage(tmp_path)
    try:
        assert store.names() == ["log"]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("ttl", "content_type", "message"),
    [
        ("abc", None, "ttl must be a number"),
        (-1.0, None, "ttl must be a finite number of seconds > 0"),
        (float("nan"), None, "not nan"),
        (float("inf"), None, "not inf"),
        (None, 7, "content_type must be a str"),
        (None, "x" * 256, "content_type must be 1..255 bytes"),
    ],
)
def test_bad_settings_are_refused_and_never_stored(
    storage: StreamTable, tmp_path: Path, ttl: object, content_type: object, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        storage.create("s", ttl=ttl, content_type=content_type)  # type: ignore[arg-type]
    assert storage.get("s") is None and storage.names() == []
    assert list((tmp_path / "data").glob("*.log")) == []


def test_a_log_with_a_bad_ttl_from_an_old_version_keeps_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta = {"name": "old", "content_type": 5, "ttl": "abc", "created": 1.0}
    data = b"\x00" + (1).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc"
    (tmp_path / "old.log").write_bytes(
        filelog._entry(filelog._CREATE, [json.dumps(meta).encode()])
        + filelog._entry(filelog._DATA, [data])
    )
    store = FileStorage(tmp_path)
    try:
        info = store.get("old")
        assert info is not None and (info.ttl, info.content_type) == (None, None)
        assert store.read("old", 0, 10, 100) == [b"abc"]
        assert store.expire(1e12) == []  # it never expires, and expiry goes on
    finally:
        store.close()
    assert "ignoring an invalid ttl" in caplog.text
    assert "ignoring an invalid content_type" in caplog.text


def test_a_stream_past_its_ttl_is_absent_before_the_sweep(storage: StreamTable) -> None:
    info = storage.create("brief", ttl=10.0, content_type=None)
    storage.append("brief", [b"x" * 10])
    info.created -= 11  # its TTL has passed; no sweep has run
    assert storage.get("brief") is None and storage.names() == []
    for request in (
        lambda: storage.append("brief", [b"y"]),
        lambda: storage.read("brief", 0, 10, 100),
        lambda: storage.finish("brief"),
        lambda: storage.delete("brief"),
        lambda: storage.producer("brief", "p"),
    ):
        with pytest.raises(StreamNotFound):
            request()
    assert storage.create("brief", ttl=None, content_type=None).next_offset == 0  # replaced
    assert storage.read("brief", 0, 10, 100) == []


def test_a_log_with_a_bad_create_entry_is_set_aside_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(tmp_path)
    path = log_file(tmp_path)
    content = bytearray(path.read_bytes())
    content[12] ^= 0x01  # a bit of the CREATE entry's JSON: its CRC fails
    path.write_bytes(content)
    (tmp_path / (path.name + ".corrupt")).write_bytes(b"set aside earlier")
    store = FileStorage(tmp_path)
    try:
        assert store.names() == []
    finally:
        store.close()
    assert not path.exists()
    aside = tmp_path / (path.name + ".corrupt.1")
    assert aside.read_bytes() == content  # every byte kept for inspection
    assert "no valid CREATE entry (a CRC mismatch); moved to" in caplog.text
    # A create cut short by a crash (a torn CREATE entry) is just removed.
    torn = tmp_path / ("1" * 64 + ".log")
    torn.write_bytes(filelog._entry(filelog._CREATE, [b'{"name": "t"}'])[:-3])
    FileStorage(tmp_path).close()
    assert not torn.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["LOCK", path.name + ".corrupt", aside.name]
    )


def test_each_producer_a_stream_knows_counts_against_total_bytes(
    storage: StreamTable, tmp_path: Path
) -> None:
    assert PRODUCER_OVERHEAD == 192
    storage.create("s", ttl=None, content_type=None)
    for n in range(5):  # 5 x (192 + 2) = 970 bytes for five producers' states
        storage.append("s", [], (f"p{n}", 0, 0))
    storage.append("s", [], ("p0", 0, 1))  # a producer it knows costs nothing more
    with pytest.raises(LimitExceeded, match=r"a new producer's state \(194 bytes\)"):
        storage.append("s", [], ("p5", 0, 0))
    if isinstance(storage, FileStorage):  # a restart counts the same
        storage.close()
        storage = FileStorage(tmp_path / "data", limits=storage.limits)
        with pytest.raises(LimitExceeded, match="max_total_bytes=1000"):
            storage.append("s", [], ("p5", 0, 0))
    storage.delete("s")  # gives back what its producers cost
    storage.create("t", ttl=None, content_type=None)
    storage.append("t", [], ("p5", 0, 0))
    storage.close()


def test_a_stream_whose_ttl_passed_while_the_hub_was_down_is_gone_on_restart(
    tmp_path: Path,
) -> None:
    store = FileStorage(tmp_path)
    store.create("brief", ttl=10.0, content_type=None)
    store.append("brief", [b"x"])
    store.close()
    path = log_file(tmp_path)
    content = bytearray(path.read_bytes())
    # Move its creation 100 s into the past, as if the hub had been down that long.
    meta_end = 9 + int.from_bytes(content[1:5], "big")
    meta = json.loads(content[9:meta_end])
    meta["created"] -= 100
    path.write_bytes(
        filelog._entry(filelog._CREATE, [json.dumps(meta).encode()]) + content[meta_end:]
    )
    store = FileStorage(tmp_path)
    try:
        assert store.get("brief") is None and store.names() == []  # gone at once
        assert store.expire(time.time()) == ["brief"]  # and the sweep frees it
        assert not path.exists()
    finally:
        store.close()
