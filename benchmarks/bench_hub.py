"""Hub speed: latency, producers, live fan-out, durable appends, read-back; baselines beside.

    python benchmarks/bench_hub.py [--quick | --records N] [--storage memory|file|redis]
                                   [--redis-url URL] [--json PATH]

The hub runs in a process of its own on loopback TCP, its streams in the
storage ``--storage`` names (memory by default; ``file``: logs in a temporary
directory, without fsync; ``redis``: Redis Streams, on a redis-server the run
starts without persistence on a Unix socket in a temporary directory, or the
one at ``--redis-url``; each hub process under a key prefix of its own).
Records are 256 B. Each row that has a baseline
runs it in the same run, and the ratio says how many times faster the row
is (for latency: how many times the baseline's p50 the row's p50 is).

- latency: the p50 of one awaited ``append`` against the p50 of one echo
  through a resumable session (the layer the hub runs on) with the same
  bytes, measured in alternating blocks on the same hub process;
- single appends (awaited): one request per record, one at a time;
- producer: ``append_nowait`` through an idempotent producer, 8 batches in
  flight, each batch stored as it came; the baseline is the old way: one
  batch in flight, and (in memory) each record stored on its own
  (``_StoredOneByOne``, a faithful copy of the old MemoryStorage); the row
  "given in lists" hands the producer lists of 1,000 records
  (``append_many_nowait``) rather than one record per call;
- fan-out: one producer while 100 live readers, spread over 4 client
  processes (25 connections each), tail the stream; the rate is records
  delivered to all readers together per second, from the first record
  produced until the last reader has every one; the baseline is the old
  way (in memory, records stored one by one and each read's body made anew
  for each reader); the last row's readers take their records in runs
  (``reader.batches()``) rather than one by one;
- durable appends: 10 producers, each appending one record at a time and
  waiting for it, to ``fsync=True`` file storage: group commit off the
  event loop against the old way, one ``fsync`` per append on the loop (a
  faithful copy, ``_FsyncOnTheLoop``); through a hub (10 connections), and
  to the storage itself (10 tasks, no network: the storage's own gain,
  which through a hub the requests' own cost bounds); these rows always use
  file storage;
- read-back: reading a finished stream from offset 0;
- with ``redis``, the raw engine as the ceiling: redis-py (in this process)
  appending the same records straight to a Redis stream, one entry per
  1,000 records packed as the hub packs them, 8 entries per pipeline round
  trip; the producer row is then also given as a ratio of it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

from _harness import receive_from_child

from streamkit import hub
from streamkit.hub.filelog import FileStorage
from streamkit.hub.protocol import Records, encode_message
from streamkit.hub.storage import Storage, _Entry, _Stream, take_within
from streamkit.session import ServerSession, connect_resumable, serve_resumable

RECORD = b"r" * 256
STORAGES = ("memory", "file", "redis")
READERS, READER_PROCESSES = 100, 4
DURABLE_PRODUCERS = 10
_SPAWN = multiprocessing.get_context("spawn")


class _StoredOneByOne(hub.MemoryStorage):
    """The old way, as a baseline: records stored one by one, a read's body made per reader.

    As MemoryStorage was before batches were kept as they came: each
    record of an append split out and kept on its own, and each read
    sliced out and encoded anew for every reader of it.
    """

    async def _store_create(self, stream: _Stream) -> None:
        stream.data = []

    async def _store_append(self, stream: _Stream, entry: _Entry, records: Records) -> None:
        stream.data.extend(records)
        self._commit(stream, entry)

    async def _store_read(
        self, stream: _Stream, start: int, stop: int, max_bytes: int
    ) -> tuple[Records, str]:
        records = stream.data[start:stop]
        count = take_within(map(len, records), max_bytes)
        return Records.pack(records[:count]), self._tag(stream, start + count - 1)


class _FsyncOnTheLoop(FileStorage):
    """The old way, as a baseline: each append written and fsync-ed on the event loop.

    Every session waits for every flush, and appends share none.
    """

    async def _write(self, stream: _Stream, entry: _Entry, data: bytes) -> None:
        log = stream.data
        log.end += len(data)
        os.write(log.fd, data)
        os.fsync(log.fd)
        log.committed = log.end
        self._commit(stream, entry)


def make_storage(spec: str) -> Storage:
    """The storage a benchmark hub uses: ``memory``, or ``<kind>:<directory>`` for files.

    Baselines: ``memory-one-by-one``; for files, ``file`` (no fsync), ``fsync``
    (group commit) and ``fsync-on-the-loop``; ``redis:<url>`` for Redis, under
    a key prefix of this process.
    """
    kind, _, where = spec.partition(":")
    if kind == "memory":
        return hub.MemoryStorage()
    if kind == "redis":
        return hub.RedisStorage.from_url(where, prefix=f"bench-{os.getpid()}")
    if kind == "memory-one-by-one":
        return _StoredOneByOne()
    if kind == "file":
        return FileStorage(where)
    if kind == "fsync":
        return FileStorage(where, fsync=True)
    if kind == "fsync-on-the-loop":
        return _FsyncOnTheLoop(where, fsync=True)
    raise ValueError(f"unknown storage {spec!r}")


# -- the hub's process ----------------------------------------------------------------


def _server_main(spec: str, ports_out: Connection) -> None:
    async def echo(session: ServerSession) -> None:
        async for message in session:
            await session.send(message)

    async def run() -> None:
        server = await hub.serve_hub("127.0.0.1", 0, storage=make_storage(spec))
        echoes = await serve_resumable(echo, "127.0.0.1", 0)
        ports_out.send((server.port, echoes.port))
        async with echoes:
            await server.serve_forever()

    asyncio.run(run())


class _Hub:
    """A hub (and a session echo server) in a process of its own."""

    def __init__(self, spec: str) -> None:
        reader, writer = _SPAWN.Pipe(duplex=False)
        self.process = _SPAWN.Process(target=_server_main, args=(spec, writer), daemon=True)
        self.process.start()
        writer.close()  # the child's copy remains
        if not reader.poll(60):
            self.process.terminate()
            raise RuntimeError("the hub server process did not start")
        self.port, self.echo_port = receive_from_child(reader, self.process, "hub server")

    def __enter__(self) -> _Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join()


# -- rows -----------------------------------------------------------------------------


async def _latency(port: int, echo_port: int, count: int) -> tuple[float, float]:
    """p50 seconds of an awaited append and of a session echo of the same bytes."""
    async with (
        hub.connect("127.0.0.1", port) as client,
        connect_resumable("127.0.0.1", echo_port) as session,
    ):
        await client.create("latency")
        message = encode_message({"op": "append", "name": "latency", "id": 1}, [RECORD])
        appends: list[float] = []
        echoes: list[float] = []
        block = max(10, count // 20)
        for _ in range(max(1, count // block)):  # alternating blocks: drift hits both
            for _ in range(block):
                start = time.perf_counter()
                await client.append("latency", RECORD)
                appends.append(time.perf_counter() - start)
            for _ in range(block):
                start = time.perf_counter()
                await session.send(message)
                await session.recv()
                echoes.append(time.perf_counter() - start)
        return statistics.median(appends), statistics.median(echoes)


async def _single_appends(port: int, count: int) -> float:
    async with hub.connect("127.0.0.1", port) as client:
        await client.create("single")
        start = time.perf_counter()
        for _ in range(count):
            await client.append("single", RECORD)
        return time.perf_counter() - start


async def _produce(
    client: hub.HubClient, name: str, count: int, in_flight: int = 8, lists: bool = False
) -> None:
    """Append ``count`` records one by one, or with ``lists`` in lists of 1,000."""
    async with client.producer(name, "bench", max_in_flight=in_flight) as producer:
        if lists:
            chunk = [RECORD] * 1000
            for first in range(0, count, 1000):
                producer.append_many_nowait(chunk[: count - first])
                await asyncio.sleep(0)  # let batches go out while producing
            return
        for n in range(count):
            producer.append_nowait(RECORD)
            if n % 1000 == 999:
                await asyncio.sleep(0)  # let batches go out while producing


async def _producer_run(
    port: int, name: str, count: int, in_flight: int, lists: bool = False
) -> float:
    async with hub.connect("127.0.0.1", port) as client:
        await client.create(name)
        start = time.perf_counter()
        await _produce(client, name, count, in_flight, lists)
        return time.perf_counter() - start


def _readers_main(
    port: int, name: str, count: int, readers: int, lists: bool, pipe: Connection
) -> None:
    """A reader process: ``readers`` live readers, each on its own connection.

    Each takes its records one by one (``async for record in reader``), or
    with ``lists`` in runs (``async for offset, records in reader.batches()``).
    """

    async def run() -> None:
        clients = [await hub.connect("127.0.0.1", port) for _ in range(readers)]
        try:
            tails = [client.read(name, 0, live=True) for client in clients]
            firsts = [asyncio.ensure_future(anext(tail)) for tail in tails]
            for _ in range(6000):  # until every read is on the hub (a minute at most)
                if all(tail._caught_up for tail in tails):
                    break
                await asyncio.sleep(0.01)
            pipe.send("ready")

            async def tail_of(reader: hub.Reader, first: asyncio.Future[hub.Record]) -> None:
                await first
                got = 1
                if lists:
                    async for _, records in reader.batches():
                        got += len(records)
                        if got == count:
                            return
                async for _ in reader:
                    got += 1
                    if got == count:
                        return

            await asyncio.gather(*map(tail_of, tails, firsts))
            pipe.send("done")
        finally:
            for client in clients:
                await client.close()

    asyncio.run(run())


async def _fan_out(port: int, count: int, lists: bool = False) -> float:
    """Seconds from the first record produced until every reader had every record."""
    name = "fanout"
    async with hub.connect("127.0.0.1", port) as client:
        await client.create(name)
        pipes, processes = [], []
        for _ in range(READER_PROCESSES):
            reader, writer = _SPAWN.Pipe(duplex=False)
            process = _SPAWN.Process(
                target=_readers_main,
                args=(port, name, count, READERS // READER_PROCESSES, lists, writer),
                daemon=True,
            )
            process.start()
            writer.close()
            pipes.append(reader)
            processes.append(process)
        try:
            loop = asyncio.get_running_loop()

            async def hear(expected: str) -> None:
                for pipe, process in zip(pipes, processes, strict=True):
                    said = await loop.run_in_executor(
                        None, receive_from_child, pipe, process, "reader"
                    )
                    assert said == expected, said

            await hear("ready")
            start = time.perf_counter()
            await _produce(client, name, count)
            await hear("done")
            return time.perf_counter() - start
        finally:
            for process in processes:
                process.join(30)
                if process.is_alive():
                    process.terminate()


async def _durable_appends(port: int, count: int) -> float:
    """Seconds for DURABLE_PRODUCERS connections to append ``count`` records in all."""
    clients = [await hub.connect("127.0.0.1", port) for _ in range(DURABLE_PRODUCERS)]
    try:
        await clients[0].create("durable")
        each = count // DURABLE_PRODUCERS

        async def appends(client: hub.HubClient) -> None:
            for _ in range(each):
                await client.append("durable", RECORD)

        start = time.perf_counter()
        await asyncio.gather(*map(appends, clients))
        return time.perf_counter() - start
    finally:
        for client in clients:
            await client.close()


async def _durable_storage(spec: str, count: int) -> float:
    """Seconds for DURABLE_PRODUCERS tasks to append ``count`` records to a storage itself."""
    storage = make_storage(spec)
    await storage.start()
    try:
        await storage.create("durable", ttl=None, content_type=None)
        each = count // DURABLE_PRODUCERS

        async def appends() -> None:
            for _ in range(each):
                await storage.append("durable", [RECORD])

        start = time.perf_counter()
        await asyncio.gather(*(appends() for _ in range(DURABLE_PRODUCERS)))
        return time.perf_counter() - start
    finally:
        await storage.close()


async def _read_back(port: int, count: int) -> float:
    async with hub.connect("127.0.0.1", port) as client:
        await client.create("back")
        await _produce(client, "back", count)
        await client.finish("back")
        start = time.perf_counter()
        got = 0
        async with client.read("back", 0) as reader:
            async for _ in reader:
                got += 1
        assert got == count
        return time.perf_counter() - start


def _durable_seconds(where: str, spec: str, count: int) -> float:
    if where == "storage":
        return asyncio.run(_durable_storage(spec, count))
    with _Hub(spec) as server:
        return asyncio.run(_durable_appends(server.port, count))


@contextmanager
def _redis_url(storage: str, url: str | None, directory: str) -> Iterator[str | None]:
    """The Redis of a ``redis`` run: ``url``, or a redis-server of its own (else ``None``).

    Its own runs without persistence on a Unix socket in ``directory``.
    """
    if storage != "redis" or url:
        yield url
        return
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("--storage redis needs redis-server (apt-get install redis-server) or --redis-url")
    socket_path = os.path.join(directory, "redis.sock")
    command = [executable, "--port", "0", "--unixsocket", socket_path, "--dir", directory]
    command += ["--save", "", "--appendonly", "no"]
    command += ["--maxmemory", "4gb", "--maxmemory-policy", "noeviction"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        for _ in range(1000):  # ten seconds at most
            if os.path.exists(socket_path):
                break
            time.sleep(0.01)
        yield f"unix://{socket_path}"
    finally:
        process.terminate()
        process.wait()


async def _raw_redis(url: str, count: int) -> tuple[int, float]:
    """How many records redis-py appended straight to a Redis stream, and in how many seconds.

    The ceiling: ``count`` records (a whole number of entries, at least one)
    in entries of 1,000 records, packed as the hub packs a batch and with a
    tag as the hub's entries have, 8 entries per pipeline round trip.
    """
    import redis.asyncio

    per_entry, per_trip = 1000, 8
    body = Records.pack([RECORD] * per_entry).body
    client = redis.asyncio.Redis.from_url(url)
    key = f"bench-raw-{os.getpid()}"
    try:
        await client.delete(key)
        entries = max(1, count // per_entry)
        start = time.perf_counter()
        for first in range(0, entries, per_trip):
            async with client.pipeline(transaction=False) as pipeline:
                for entry in range(first, min(first + per_trip, entries)):
                    fields = {"r": body, "t": "0123456789abcdef"}
                    pipeline.xadd(key, fields, id=f"0-{entry * per_entry + 1}")  # type: ignore[arg-type]
                await pipeline.execute()
        return entries * per_entry, time.perf_counter() - start
    finally:
        await client.delete(key)
        await client.aclose()


# -- the table ------------------------------------------------------------------------


class _Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        print(f"{'row':<72} {'records':>8} {'records/s':>12} {'MB/s':>7} {'ratio':>7}")

    def rate(
        self, label: str, count: int, seconds: float, baseline: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        rate = count / seconds
        ratio = "" if baseline is None else f"{rate / baseline['records_per_s']:.2f}x"
        print(f"{label:<72} {count:>8} {rate:>12,.0f} {rate * len(RECORD) / 1e6:>7.1f} {ratio:>7}")
        row = {"row": label, "records": count, "seconds": seconds, "records_per_s": rate}
        if baseline is not None:
            row["ratio"] = rate / baseline["records_per_s"]
        self.rows.append(row)
        return row

    def latency(self, label: str, seconds: float, baseline: float | None = None) -> None:
        ratio = "" if baseline is None else f"{seconds / baseline:.2f}x"
        print(f"{label:<72} {'p50':>8} {seconds * 1e6:>10.1f}us {'':>7} {ratio:>7}")
        row: dict[str, Any] = {"row": label, "p50_seconds": seconds}
        if baseline is not None:
            row["ratio"] = seconds / baseline
        self.rows.append(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument(
        "--records", type=int, metavar="N", help="records per run (a smoke test uses few)"
    )
    parser.add_argument("--storage", choices=STORAGES, default="memory", help="the hub's storage")
    parser.add_argument(
        "--redis-url", metavar="URL", help="with --storage redis: this Redis (else one of its own)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    count = args.records or (100_000 if args.quick else 400_000)
    fan_out = max(READERS, count // 8)
    durable = max(DURABLE_PRODUCERS, count // 50)
    with (
        tempfile.TemporaryDirectory() as data_dir,
        _redis_url(args.storage, args.redis_url, data_dir) as redis_url,
    ):
        spec = args.storage if args.storage == "memory" else f"file:{data_dir}/{args.storage}"
        hubs = itertools.count()

        def fresh(spec: str) -> str:
            """A file hub's own directory: a hub on an earlier one's would recover its streams."""
            return f"{spec}-{next(hubs)}" if spec.startswith("file:") else spec

        storage = args.storage
        if redis_url is not None:
            spec = f"redis:{redis_url}"
            storage = "redis" if args.redis_url else "redis (no persistence)"
        print(f"hub, {len(RECORD)} B records, {storage} storage, loopback TCP")
        table = _Table()
        raw = None
        if redis_url is not None:
            raw = table.rate(
                "raw Redis: XADD, 1,000 records per entry (ceiling)",
                *asyncio.run(_raw_redis(redis_url, count)),
            )
        # The old way, for the baselines: in memory, records stored one by one
        # (another storage: itself, the producer with one batch in flight).
        old_spec = "memory-one-by-one" if args.storage == "memory" else spec
        one_by_one = ", stored one by one" if args.storage == "memory" else ""
        with _Hub(fresh(old_spec)) as server:
            old_producer = table.rate(
                f"producer, 1 batch in flight{one_by_one} (baseline)",
                count,
                asyncio.run(_producer_run(server.port, "old", count, 1)),
            )
        with _Hub(fresh(old_spec)) as server:
            old_fan_out = table.rate(
                f"fan-out to {READERS} readers{one_by_one} (baseline)",
                READERS * fan_out,
                asyncio.run(_fan_out(server.port, fan_out)),
            )
        with _Hub(fresh(spec)) as server:
            append_p50, echo_p50 = asyncio.run(
                _latency(server.port, server.echo_port, max(100, count // 100))
            )
            table.latency("latency: session echo (baseline)", echo_p50)
            table.latency("latency: awaited append", append_p50, echo_p50)
            single = max(10, count // 40)
            table.rate(
                "single appends (awaited)",
                single,
                asyncio.run(_single_appends(server.port, single)),
            )
            new = table.rate(
                "producer, 8 batches in flight, batches stored as they came",
                count,
                asyncio.run(_producer_run(server.port, "new", count, 8)),
                old_producer,
            )
            if raw is not None:
                table.rate("producer, 8 in flight, against raw Redis", count, new["seconds"], raw)
            table.rate(
                "producer, 8 in flight, as they came, given in lists of 1,000",
                count,
                asyncio.run(_producer_run(server.port, "lists", count, 8, lists=True)),
                old_producer,
            )
            table.rate("read-back", count, asyncio.run(_read_back(server.port, count)))
        with _Hub(fresh(spec)) as server:
            table.rate(
                f"fan-out to {READERS} readers, batches stored as they came",
                READERS * fan_out,
                asyncio.run(_fan_out(server.port, fan_out)),
                old_fan_out,
            )
        with _Hub(fresh(spec)) as server:
            table.rate(
                f"fan-out to {READERS} readers, as they came, taken in runs",
                READERS * fan_out,
                asyncio.run(_fan_out(server.port, fan_out, lists=True)),
                old_fan_out,
            )
        for name, where in (("the hub", "hub"), ("FileStorage itself", "storage")):
            old = table.rate(
                f"durable appends x{DURABLE_PRODUCERS} to {name}, fsync on the loop (baseline)",
                durable,
                _durable_seconds(where, f"fsync-on-the-loop:{data_dir}/loop-{where}", durable),
            )
            table.rate(
                f"durable appends x{DURABLE_PRODUCERS} to {name}, group commit",
                durable,
                _durable_seconds(where, f"fsync:{data_dir}/group-{where}", durable),
                old,
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "rows": table.rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
