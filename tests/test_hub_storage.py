"""Hub storage: one conformance suite every backend passes, and the producer rule.

Every test here takes ``backend`` (every backend) or ``local_backend`` (the
backends in this process, whose TTL sweep and internals a test may use).
Adding a backend is one more ``backend`` param: a :class:`Backend` whose
``make(limits)`` returns a storage not yet started; with ``persistent``, a
storage made after the last one was closed sees what it stored.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamkit.hub import (
    PRODUCER_OVERHEAD,
    RECORD_OVERHEAD,
    BadRequest,
    HubError,
    LimitExceeded,
    Limits,
    MemoryStorage,
    ProducerFenced,
    StreamExists,
    StreamFinished,
    StreamNotFound,
)
from streamkit.hub.filelog import FileStorage
from streamkit.hub.protocol import MAX_COUNTER
from streamkit.hub.redis import RedisStorage
from streamkit.hub.storage import (
    Produced,
    ProducerState,
    Storage,
    StreamTable,
    decide_produce,
)
from tests._redis import RedisServer

AnyStorage = TypeVar("AnyStorage", bound=Storage)
LIMITS = Limits(max_streams=3, max_record=100, max_total_bytes=1000, max_name=10)
BIG = 1 << 20


@dataclass
class Backend:
    """How the suite makes a storage of one kind."""

    name: str
    make: Callable[[Limits | None], Storage]
    #: A storage made after the last was closed still has its streams.
    persistent: bool


def _local(kind: str, data_dir: Path) -> Backend:
    if kind == "memory":
        return Backend("memory", MemoryStorage, persistent=False)
    return Backend("file", lambda limits: FileStorage(data_dir, limits=limits), persistent=True)


def _redis(request: pytest.FixtureRequest) -> Backend:
    """Redis storage on the session's redis-server, under this test's own prefix."""
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")

    def make(limits: Limits | None) -> Storage:
        return RedisStorage.from_url(server.url, prefix=prefix, limits=limits)

    return Backend("redis", make, persistent=True)


@pytest.fixture(params=["memory", "file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every storage backend, one per param."""
    if request.param == "redis":
        return _redis(request)
    return _local(request.param, tmp_path / "data")


@pytest.fixture(params=["memory", "file"])
def local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backends that live in this process.

    Their TTL sweep runs here, and they count ``max_streams`` and
    ``max_total_bytes`` (Redis storage leaves memory to Redis's maxmemory).
    """
    return _local(request.param, tmp_path / "data")


@asynccontextmanager
async def started(storage: AnyStorage) -> AsyncIterator[AnyStorage]:
    """``storage``, started, and closed on the way out."""
    await storage.start()
    try:
        yield storage
    finally:
        await storage.close()


def opened(
    backend: Backend, limits: Limits | None = LIMITS
) -> AbstractAsyncContextManager[Storage]:
    """A new storage of ``backend``'s kind, started, closed on the way out."""
    return started(backend.make(limits))


async def read_all(storage: Storage, name: str, offset: int = 0) -> list[bytes]:
    return list((await storage.read(name, offset, 1_000_000, 1 << 30)).records)


# -- the contract, on every backend ---------------------------------------------


async def test_append_and_read_back(backend: Backend) -> None:
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type="text/plain")
        assert await storage.append("s", [b"a", b"bb"]) == 0
        assert await storage.append("s", [b"", b"dddd"]) == 2
        assert await read_all(storage, "s") == [b"a", b"bb", b"", b"dddd"]
        batch = await storage.read("s", 1, 2, BIG)
        assert batch.records == [b"bb", b""]
        assert batch.info.next_offset == 4 and not batch.info.finished
        for past in (4, 99):
            end = await storage.read("s", past, 10, BIG)
            assert (end.records, end.tag, end.info.next_offset) == ([], None, 4)
        info = await storage.get("s")
        assert info is not None
        assert (info.next_offset, info.size_bytes, info.content_type) == (4, 7, "text/plain")


async def test_read_is_bounded_by_bytes_but_returns_at_least_one_record(backend: Backend) -> None:
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"x" * 40, b"y" * 40])
        await storage.append("s", [b"z" * 40])
        assert (await storage.read("s", 0, 10, 80)).records == [b"x" * 40, b"y" * 40]
        assert (await storage.read("s", 0, 10, 10)).records == [b"x" * 40]
        assert (await storage.read("s", 1, 10, 80)).records == [b"y" * 40, b"z" * 40]
        assert (await storage.read("s", 2, 10, 1)).records == [b"z" * 40]


async def test_limits_give_clear_errors(backend: Backend) -> None:
    async with opened(backend) as storage:
        with pytest.raises(BadRequest, match=r"1\.\.10 bytes"):
            await storage.create("a-very-long-name", ttl=None, content_type=None)
        for name in "abc":
            await storage.create(name, ttl=None, content_type=None)
        with pytest.raises(StreamExists, match="'a' exists"):
            await storage.create("a", ttl=None, content_type=None)
        with pytest.raises(LimitExceeded, match="101 bytes exceeds max_record=100"):
            await storage.append("a", [b"x" * 101])
        assert await read_all(storage, "a") == []


async def test_streams_and_total_bytes_are_counted(local_backend: Backend) -> None:
    async with opened(local_backend) as storage:
        for name in "abc":
            await storage.create(name, ttl=None, content_type=None)
        with pytest.raises(LimitExceeded, match="max_streams=3"):
            await storage.create("d", ttl=None, content_type=None)
        await storage.append("a", [b"x" * 100] * 6)  # 6 x (100 + RECORD_OVERHEAD) = 888
        with pytest.raises(LimitExceeded, match="max_total_bytes=1000"):
            await storage.append("b", [b"x" * 60, b"y" * 50])  # 110 + 2 x RECORD_OVERHEAD more
        assert await read_all(storage, "b") == []  # nothing of a refused batch is kept
        await storage.delete("a")
        await storage.append("b", [b"x" * 60, b"y" * 50])  # deleting gave the bytes back


async def test_a_batch_over_max_batch_is_refused_whole_at_its_edge(backend: Backend) -> None:
    async with opened(backend, Limits(max_batch=50)) as storage:
        await storage.create("s", ttl=None, content_type=None)
        edge = [b"x" * 10] * 3 + [b""]  # 4 + 3 x (4 + 10) + 4: exactly 50, the limit
        assert await storage.append("s", edge) == 0
        with pytest.raises(LimitExceeded, match=r"4 records \(51 bytes .*max_batch=50"):
            await storage.append("s", [b"x" * 10] * 3 + [b"y"])
        with pytest.raises(LimitExceeded, match="max_batch=50"):
            await storage.produce("s", [b"x" * 10] * 3 + [b"y"], "p", 0, 0)
        assert await read_all(storage, "s") == edge  # nothing of it was kept


async def test_total_bytes_count_every_record_with_its_overhead_up_to_the_edge(
    local_backend: Backend,
) -> None:
    backend = local_backend
    assert LIMITS.max_total_bytes == 1000 and RECORD_OVERHEAD == 48
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b""] * 19)  # empty records cost RECORD_OVERHEAD each: 912
        await storage.append("s", [b"x" * 40])  # 40 + 48: exactly 1000, the limit, is allowed
        with pytest.raises(LimitExceeded, match=r"1 records of 0 bytes \(\+48 each\)"):
            await storage.append("s", [b""])
    if backend.persistent:  # a restart counts the same
        async with opened(backend) as storage:
            with pytest.raises(LimitExceeded, match="max_total_bytes=1000"):
                await storage.append("s", [b""])
    async with opened(backend) as storage:
        if backend.persistent:
            await storage.delete("s")
        await storage.create("t", ttl=None, content_type=None)
        await storage.append("t", [b""] * 20)  # deleting gave back what the records cost


async def test_finish_delete_and_unknown_streams(backend: Backend) -> None:
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"1"])
        assert (await storage.finish("s")).finished
        assert (await storage.finish("s")).finished  # idempotent
        with pytest.raises(StreamFinished, match="'s' is finished"):
            await storage.append("s", [b"2"])
        with pytest.raises(StreamFinished, match="'s' is finished"):
            await storage.produce("s", [b"2"], "p", 0, 0)
        batch = await storage.read("s", 0, 10, 100)
        assert batch.records == [b"1"] and batch.info.finished
        await storage.delete("s")
        assert await storage.get("s") is None
        for call in (
            lambda: storage.append("s", [b"x"]),
            lambda: storage.produce("s", [b"x"], "p", 0, 0),
            lambda: storage.read("s", 0, 1, 1),
            lambda: storage.tag_at("s", 0),
            lambda: storage.producer("s", "p"),
            lambda: storage.finish("s"),
            lambda: storage.delete("s"),
        ):
            with pytest.raises(StreamNotFound, match="no stream named 's'"):
                await call()


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
async def test_bad_settings_are_refused_and_never_stored(
    backend: Backend, ttl: object, content_type: object, message: str
) -> None:
    async with opened(backend) as storage:
        with pytest.raises(BadRequest, match=message):
            await storage.create("s", ttl=ttl, content_type=content_type)  # type: ignore[arg-type]
        assert await storage.get("s") is None
    async with opened(backend) as storage:  # nothing of it, even after a restart
        assert await storage.get("s") is None


async def test_produce_appends_each_batch_once_and_keeps_the_producer_state(
    backend: Backend,
) -> None:
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        assert await storage.producer("s", "p1") is None
        await storage.append("s", [b"a"])
        assert await storage.produce("s", [b"b", b"c"], "p1", 2, 0) == Produced(1, False)
        assert await storage.produce("s", [b"d"], "p1", 2, 1) == Produced(3, False)
        # Retries are acknowledged, not appended: the last batch with its offset.
        assert await storage.produce("s", [b"d"], "p1", 2, 1) == Produced(3, True)
        assert await storage.produce("s", [b"b", b"c"], "p1", 2, 0) == Produced(None, True)
        with pytest.raises(HubError, match="sent batch 3 after batch 1: a gap"):
            await storage.produce("s", [b"x"], "p1", 2, 3)
        with pytest.raises(ProducerFenced, match="epoch 1 is fenced off by epoch 2"):
            await storage.produce("s", [b"x"], "p1", 1, 2)
        with pytest.raises(HubError, match="epoch 3 must start at batch 0, not 2"):
            await storage.produce("s", [b"x"], "p1", 3, 2)
        # A refused batch does not count: the next batch reuses its sequence.
        with pytest.raises(LimitExceeded, match="max_record"):
            await storage.produce("s", [b"x" * 101], "p1", 2, 2)
        assert await storage.produce("s", [b"e"], "p1", 2, 2) == Produced(4, False)
        assert await storage.produce("s", [], "p2", 0, 0) == Produced(5, False)  # empty claims
        state = await storage.producer("s", "p1")
        assert state == ProducerState(epoch=2, seq=2, first_offset=4, count=1)
        assert await storage.producer("s", "other") is None
        assert await read_all(storage, "s") == [b"a", b"b", b"c", b"d", b"e"]
    if backend.persistent:  # the state is stored with its batch and comes back with it
        async with opened(backend) as storage:
            assert await storage.producer("s", "p1") == state
            assert await storage.produce("s", [b"e"], "p1", 2, 2) == Produced(4, True)
            assert await storage.produce("s", [b"f"], "p1", 2, 3) == Produced(5, False)


async def test_concurrent_copies_of_a_batch_are_appended_once(backend: Backend) -> None:
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        results = await asyncio.gather(
            *(storage.produce("s", [b"once"], "p", 0, 0) for _ in range(10))
        )
        assert sorted(results, key=lambda produced: produced.duplicate) == [
            Produced(0, False),
            *[Produced(0, True)] * 9,
        ]
        assert await read_all(storage, "s") == [b"once"]


async def test_each_producer_a_stream_knows_counts_against_total_bytes(
    local_backend: Backend,
) -> None:
    backend = local_backend
    assert PRODUCER_OVERHEAD == 192
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        for n in range(5):  # 5 x (192 + 2) = 970 bytes for five producers' states
            await storage.produce("s", [], f"p{n}", 0, 0)
        await storage.produce("s", [], "p0", 0, 1)  # a producer it knows costs nothing more
        with pytest.raises(LimitExceeded, match=r"a new producer's state \(194 bytes\)"):
            await storage.produce("s", [], "p5", 0, 0)
    if backend.persistent:  # a restart counts the same
        async with opened(backend) as storage:
            with pytest.raises(LimitExceeded, match="max_total_bytes=1000"):
                await storage.produce("s", [], "p5", 0, 0)
    async with opened(backend) as storage:
        if backend.persistent:
            await storage.delete("s")  # gives back what its producers cost
        await storage.create("t", ttl=None, content_type=None)
        await storage.produce("t", [], "p5", 0, 0)


async def test_every_batch_gets_its_own_tag_and_reads_name_the_last_ones(
    backend: Backend,
) -> None:
    async with opened(backend) as storage:
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"a", b"b"])
        await storage.produce("s", [], "p", 0, 0)  # no records: no tag
        await storage.produce("s", [b"c"], "p", 0, 1)
        await storage.append("s", [b"d", b"e", b"f"])
        tags = [await storage.tag_at("s", offset) for offset in range(6)]
        first, second, third = tags[0], tags[2], tags[3]
        assert tags == [first, first, second, third, third, third]
        assert len({first, second, third}) == 3
        assert all(isinstance(tag, str) and 0 < len(tag) <= 64 for tag in (first, second, third))
        assert await storage.tag_at("s", 6) is None
        assert await storage.tag_at("s", -1) is None
        assert (await storage.read("s", 0, 1, BIG)).tag == first
        assert (await storage.read("s", 0, 3, BIG)).tag == second
        assert (await storage.read("s", 1, 10, BIG)).tag == third
        assert (await storage.read("s", 2, 10, 1)).tag == second  # cut short by bytes
        # The same records at the same offset of a stream made anew: another lineage.
        await storage.delete("s")
        await storage.create("s", ttl=None, content_type=None)
        await storage.append("s", [b"a", b"b"])
        assert await storage.tag_at("s", 0) not in (None, first)
    if backend.persistent:  # tags are stored: the same after a restart
        async with opened(backend) as storage:
            again = await storage.tag_at("s", 0)
        async with opened(backend) as storage:
            assert await storage.tag_at("s", 1) == again


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Empty records right where the byte budget is spent still fit (Redis's read once stopped).
@example(batches=[[b"a", b"b"], [b"", b""], [b"c"]], reads=[(0, 9, 2)])
@given(
    batches=st.lists(st.lists(st.binary(max_size=12), max_size=6), min_size=1, max_size=12),
    reads=st.lists(
        st.tuples(st.integers(0, 80), st.integers(1, 30), st.integers(1, 60)), max_size=12
    ),
)
def test_reads_slice_across_batches_like_one_list(
    backend: Backend, batches: list[list[bytes]], reads: list[tuple[int, int, int]]
) -> None:
    async def run() -> None:
        async with opened(backend, None) as storage:
            name = f"s{next(_names)}"
            await storage.create(name, ttl=None, content_type=None)
            flat: list[bytes] = []
            owner: list[int] = []  # which batch holds each record
            for number, batch in enumerate(batches):
                assert await storage.append(name, batch) == len(flat)
                flat += batch
                owner += [number] * len(batch)
            tags = [await storage.tag_at(name, offset) for offset in range(len(flat))]
            for offset, max_records, max_bytes in reads:
                got = await storage.read(name, offset, max_records, max_bytes)
                expected = flat[offset : offset + max_records]
                if expected:  # as many as fit max_bytes, but at least one
                    fit = max(1, sum(1 for total in _running(expected) if total <= max_bytes))
                    expected = expected[:fit]
                assert got.records == expected
                last = offset + len(expected) - 1
                assert got.tag == (tags[last] if expected else None)
                assert got.info.next_offset == len(flat)
            for offset in range(1, len(flat)):  # one tag per batch
                same_batch = owner[offset] == owner[offset - 1]
                assert (tags[offset] == tags[offset - 1]) == same_batch
            await storage.delete(name)

    asyncio.run(run())


_names = itertools.count()


def _running(records: list[bytes]) -> list[int]:
    return list(itertools.accumulate(map(len, records)))


# -- the backends in this process -------------------------------------------------


async def test_expire_deletes_streams_past_their_ttl(local_backend: Backend) -> None:
    async with opened(local_backend) as storage:
        short = await storage.create("short", ttl=10, content_type=None)
        await storage.create("forever", ttl=None, content_type=None)
        assert await storage.expire(short.created + 9.9) == []
        assert await storage.expire(short.created + 10) == ["short"]
        assert isinstance(storage, StreamTable)
        assert await storage.names() == ["forever"]


async def test_a_stream_past_its_ttl_is_absent_before_the_sweep(local_backend: Backend) -> None:
    async with opened(local_backend) as storage:
        info = await storage.create("brief", ttl=10.0, content_type=None)
        await storage.append("brief", [b"x" * 10])
        info.created -= 11  # its TTL has passed; no sweep has run
        assert isinstance(storage, StreamTable)
        assert await storage.get("brief") is None and await storage.names() == []
        for request in (
            lambda: storage.append("brief", [b"y"]),
            lambda: storage.read("brief", 0, 10, 100),
            lambda: storage.finish("brief"),
            lambda: storage.delete("brief"),
            lambda: storage.producer("brief", "p"),
        ):
            with pytest.raises(StreamNotFound):
                await request()
        replaced = await storage.create("brief", ttl=None, content_type=None)
        assert replaced.next_offset == 0
        assert await read_all(storage, "brief") == []


# -- the producer rule, pure ----------------------------------------------------------

EDGES = [0, 1, 2, 3, MAX_COUNTER - 2, MAX_COUNTER - 1, MAX_COUNTER]


def expected_decision(
    state: ProducerState | None, epoch: int, seq: int
) -> Produced | type[HubError] | None:
    """docs/protocol.md section 3.3, sentence by sentence."""
    if state is not None and epoch < state.epoch:
        return ProducerFenced  # "an epoch below the stored one is refused"
    if state is not None and epoch == state.epoch and seq <= state.seq:
        # "the stored epoch and seq <= stored seq is a retry"
        return Produced(state.first_offset if seq == state.seq else None, True)
    same_epoch_next = state is not None and epoch == state.epoch and seq == state.seq + 1
    new_epoch_first = (state is None or epoch > state.epoch) and seq == 0
    if same_epoch_next or new_epoch_first:
        return None  # appended
    return HubError  # "anything else is a sequence gap"


def check_decision(state: ProducerState | None, epoch: int, seq: int) -> None:
    expected = expected_decision(state, epoch, seq)
    if isinstance(expected, type):
        with pytest.raises(expected) as info:
            decide_produce(state, "p", epoch, seq)
        if expected is HubError:
            assert type(info.value) is HubError
            assert "a gap" in str(info.value) or "must start at batch 0" in str(info.value)
    else:
        assert decide_produce(state, "p", epoch, seq) == expected


def test_decide_produce_on_every_edge() -> None:
    states = [None] + [
        ProducerState(epoch, seq, first_offset=7, count=2)
        for epoch, seq in itertools.product(EDGES, EDGES)
    ]
    for state in states:
        for epoch, seq in itertools.product(EDGES, EDGES):
            check_decision(state, epoch, seq)


@given(
    state=st.none()
    | st.builds(
        ProducerState,
        st.integers(0, MAX_COUNTER),
        st.integers(0, MAX_COUNTER),
        st.integers(0, 2**62),
        st.integers(0, 10_000),
    ),
    epoch=st.integers(0, MAX_COUNTER),
    seq=st.integers(0, MAX_COUNTER),
)
def test_decide_produce_follows_the_protocol(
    state: ProducerState | None, epoch: int, seq: int
) -> None:
    check_decision(state, epoch, seq)
    if state is not None:  # and right next to the stored state, where it matters
        for near_epoch in {max(0, state.epoch - 1), state.epoch, min(MAX_COUNTER, state.epoch + 1)}:
            for near_seq in {0, max(0, state.seq - 1), state.seq, min(MAX_COUNTER, state.seq + 1)}:
                check_decision(state, near_epoch, near_seq)


def test_the_last_sequence_and_epoch_are_usable() -> None:
    top = ProducerState(MAX_COUNTER, MAX_COUNTER - 1, first_offset=5, count=1)
    assert decide_produce(top, "p", MAX_COUNTER, MAX_COUNTER) is None
    last = ProducerState(MAX_COUNTER, MAX_COUNTER, first_offset=6, count=1)
    assert decide_produce(last, "p", MAX_COUNTER, MAX_COUNTER) == Produced(6, True)
    with pytest.raises(ProducerFenced, match=f"epoch {MAX_COUNTER - 1} is fenced"):
        decide_produce(last, "p", MAX_COUNTER - 1, 0)


@given(
    batches=st.integers(1, 12),
    deliveries=st.lists(st.integers(0, 11), max_size=60),
    restarts=st.lists(st.integers(0, 3), max_size=4),
)
def test_retries_in_any_order_append_each_batch_once_in_order(
    batches: int, deliveries: list[int], restarts: list[int]
) -> None:
    """A producer's batches, retried and reordered as a network may, are appended once each.

    The producer sends batch ``k`` only after batches ``0..k-1`` were
    acknowledged (as the client does on a new session), but copies of old
    batches keep arriving at any time; a new epoch starts over at 0.
    """
    state: ProducerState | None = None
    log: list[tuple[int, int]] = []  # (epoch, seq) of each batch appended
    expected: list[tuple[int, int]] = []  # each new batch the producer sent
    epoch = 0
    acknowledged = -1
    plan = iter(deliveries)
    for restart in [0, *restarts]:
        if restart:
            epoch += restart
            acknowledged = -1
        for _ in range(batches):
            copies = [seq for seq in itertools.islice(plan, 3) if seq <= acknowledged]
            expected.append((epoch, acknowledged + 1))
            for seq in [*copies, acknowledged + 1]:
                decision = decide_produce(state, "p", epoch, seq)
                if decision is None:
                    state = ProducerState(epoch, seq, len(log), 1)
                    log.append((epoch, seq))
                else:
                    assert decision.duplicate and seq <= acknowledged
            acknowledged += 1
        if epoch:  # once a new epoch is stored, the old one's copies are refused
            with pytest.raises(ProducerFenced):
                decide_produce(state, "p", epoch - 1, 0)
    assert log == expected
