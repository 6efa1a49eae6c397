"""A hub with a data_dir, killed mid-append (SIGKILL), restarts with every acknowledged record."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from streamkit import hub
from streamkit.errors import StreamkitError

SERVER = """
import asyncio, sys
from streamkit import hub

async def main():
    server = await hub.serve_hub("127.0.0.1", 0, data_dir=sys.argv[1])
    print(server.port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


async def start_hub(data_dir: Path) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    return process, int(line)


async def test_killed_hub_serves_every_acknowledged_record_after_restart(tmp_path: Path) -> None:
    process, port = await start_hub(tmp_path)
    acknowledged: dict[int, bytes] = {}
    enough = asyncio.Event()
    try:
        async with hub.connect("127.0.0.1", port, max_reconnect_time=0.5) as client:
            await client.create("log")

            async def append_forever() -> None:
                n = 0
                while True:
                    data = b"record %d " % n + b"x" * (n % 700)
                    offset = await client.append_many("log", [data])
                    acknowledged[offset] = data
                    n += 1
                    if n == 300:
                        enough.set()

            appender = asyncio.create_task(append_forever())
            await enough.wait()
            os.kill(process.pid, signal.SIGKILL)  # mid-append: requests are in flight
            await process.wait()
            with pytest.raises(StreamkitError):  # the session fails: its server is gone
                await appender
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    process, port = await start_hub(tmp_path)
    try:
        async with hub.connect("127.0.0.1", port) as client:
            status = await client.status("log")
            assert status is not None
            async with client.read("log", 0) as reader:
                records = [record async for record in reader]
        assert len(records) == status.next_offset
        assert len(records) >= len(acknowledged) >= 300
        for record in records:
            assert record.data.startswith(b"record %d " % record.offset)  # nothing corrupt
        for offset, data in acknowledged.items():
            assert records[offset].data == data
    finally:
        process.kill()
        await process.wait()
