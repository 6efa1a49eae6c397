"""Hub throughput: appends, producer batching, live fan-out, read-back.

    python benchmarks/bench_hub.py [--quick | --records N] [--json PATH]

The hub runs in a second process on loopback TCP (memory storage unless a
row says "log"). Rows, for 256 B records:

- single appends: one request per record, awaited one by one (the
  baseline a producer improves on);
- producer: ``append_nowait`` through an idempotent producer (batched);
- fan-out: one producer while N live readers tail the stream; the rate is
  per reader (records each reader received per second of the run);
- read-back: reading a finished stream from offset 0, from memory and from
  the append-only log (``data_dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from typing import Any

from streamkit import hub
from streamkit.bench import receive_from_child

RECORD = b"r" * 256


def _server_main(data_dir: str | None, port_out: Any) -> None:
    async def run() -> None:
        server = await hub.serve_hub("127.0.0.1", 0, data_dir=data_dir)
        port_out.send(server.port)
        await server.serve_forever()

    asyncio.run(run())


def _start(data_dir: str | None = None) -> tuple[multiprocessing.Process, int]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_server_main, args=(data_dir, writer), daemon=True)
    process.start()
    writer.close()  # the child's copy remains
    if not reader.poll(30):
        process.terminate()
        raise RuntimeError("the hub server process did not start")
    return process, int(receive_from_child(reader, process, "hub server"))


async def _single_appends(port: int, count: int) -> float:
    async with hub.connect("127.0.0.1", port) as client:
        await client.create("single")
        start = time.perf_counter()
        for _ in range(count):
            await client.append("single", RECORD)
        return time.perf_counter() - start


async def _produce(client: hub.HubClient, name: str, count: int) -> None:
    async with client.producer(name, "bench") as producer:
        for n in range(count):
            producer.append_nowait(RECORD)
            if n % 1000 == 999:
                await asyncio.sleep(0)  # let batches go out while producing


async def _producer_run(port: int, count: int, readers: int) -> tuple[float, float]:
    """Seconds for the producer to finish, and for the slowest reader to get everything."""
    name = f"fanout-{readers}"
    async with hub.connect("127.0.0.1", port) as client:
        await client.create(name)
        tails = [await hub.connect("127.0.0.1", port) for _ in range(readers)]
        try:

            async def tail(reader_client: hub.HubClient) -> None:
                got = 0
                async with reader_client.read(name, 0, live=True) as reader:
                    async for _ in reader:
                        got += 1
                        if got == count:
                            return

            start = time.perf_counter()
            tasks = [asyncio.create_task(tail(t)) for t in tails]
            await _produce(client, name, count)
            produced = time.perf_counter() - start
            await asyncio.gather(*tasks)
            return produced, time.perf_counter() - start
        finally:
            for t in tails:
                await t.close()


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


def _row(label: str, count: int, seconds: float) -> dict[str, Any]:
    rate = count / seconds
    print(f"{label:<34} {count:>8} {rate:>12,.0f} {rate * len(RECORD) / 1e6:>8.1f}")
    return {"row": label, "records": count, "seconds": seconds, "records_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument(
        "--records", type=int, metavar="N", help="records per run (a smoke test uses few)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    count = args.records or (50_000 if args.quick else 200_000)
    rows = []
    print("hub, 256 B records, server in a second process (loopback TCP)")
    print(f"{'row':<34} {'records':>8} {'records/s':>12} {'MB/s':>8}")
    process, port = _start()
    try:
        single = count // 10
        rows.append(
            _row("single appends (awaited)", single, asyncio.run(_single_appends(port, single)))
        )
        produced, _ = asyncio.run(_producer_run(port, count, 0))
        rows.append(_row("producer (batched)", count, produced))
        for readers in (1, 10, 100):
            n = count if readers < 100 else count // 4
            produced, delivered = asyncio.run(_producer_run(port, n, readers))
            rows.append(_row(f"fan-out: producer, {readers} readers", n, produced))
            rows.append(_row(f"fan-out: each of {readers} readers", n, delivered))
        rows.append(_row("read-back from memory", count, asyncio.run(_read_back(port, count))))
    finally:
        process.terminate()
        process.join()
    with tempfile.TemporaryDirectory() as data_dir:
        process, port = _start(data_dir)
        try:
            rows.append(_row("read-back from the log", count, asyncio.run(_read_back(port, count))))
        finally:
            process.terminate()
            process.join()
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
