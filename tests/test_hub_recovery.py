"""Hubs started on damaged logs, over real sockets: what they serve, keep and refuse."""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from streamkit import hub
from tests.test_hub import FAST, read_all
from tests.test_hub_filelog import entry_spans, log_file

#: A hub in a process whose address space is limited (argv: data_dir, bytes).
LIMITED_HUB = """
import asyncio, resource, sys
from streamkit import hub

limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

async def main():
    server = await hub.serve_hub("127.0.0.1", 0, data_dir=sys.argv[1])
    print(server.port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"""
GiB = 1 << 30
#: A DATA entry header whose length field reads 0xFFFFFFF0 (4 GiB less 16).
HUGE_ENTRY = struct.pack(">BII", 2, 0xFFFF_FFF0, 0)


@asynccontextmanager
async def limited_hub(data_dir: Path, address_space: int) -> AsyncIterator[int]:
    """Run a hub on ``data_dir`` under RLIMIT_AS=``address_space``; yield its port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LIMITED_HUB,
        str(data_dir),
        str(address_space),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        if not line:
            error = await process.stderr.read()
            raise AssertionError(f"the hub did not start:\n{error.decode()[-2000:]}")
        yield int(line)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def write_log(data_dir: Path, batches: list[list[bytes]]) -> Path:
    """A log of stream "s" with ``batches`` appended, written by a real hub."""
    async with (
        await hub.serve_hub("127.0.0.1", 0, data_dir=data_dir, grace_period=0.2) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        await client.create("s")
        for batch in batches:
            await client.append_many("s", batch)
    return log_file(data_dir)


# -- 4. a length field that is never trusted ------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["past-the-end", "within-a-sparse-file"])
async def test_a_huge_entry_length_is_damage_found_before_anything_is_allocated(
    tmp_path: Path, sparse: bool
) -> None:
    # An entry whose length reads 0xFFFFFFF0, with nothing valid after it: a
    # torn tail, cut. Reading it at once would need 4 GiB, over the hub's
    # 1 GiB of address space. In a sparse file the length even stays within
    # the file: only the bound on entries (max_batch) tells it is damage.
    path = await write_log(tmp_path, [[b"r0", b"r1"], [b"r2"]])
    good = path.stat().st_size
    with path.open("ab") as file:
        file.write(HUGE_ENTRY + b"and then some")
        if sparse:
            file.truncate(good + len(HUGE_ENTRY) + 0xFFFF_FFF0 + 100)
    async with (
        limited_hub(tmp_path, GiB) as port,
        hub.connect("127.0.0.1", port, **FAST) as client,
    ):
        assert await read_all(client, "s") == [b"r0", b"r1", b"r2"]
        assert await client.append("s", b"r3") == 3
    assert path.stat().st_size > good  # the tail was cut, then r3 appended


# -- 5. damage inside a log ------------------------------------------------------


async def test_a_flipped_byte_inside_a_log_keeps_it_whole_and_serves_up_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batches = [[b"batch %d record %d" % (n, i) for i in range(3)] for n in range(5)]
    path = await write_log(tmp_path, batches)
    damaged_entry = entry_spans(path.read_bytes())[3]  # CREATE, then batches 0, 1, 2...
    content = bytearray(path.read_bytes())
    content[damaged_entry[1] - 5] ^= 0x01  # a bit of batch 2's last record
    path.write_bytes(content)

    async with (
        await hub.serve_hub("127.0.0.1", 0, data_dir=tmp_path, grace_period=0.2) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        assert await read_all(client, "s") == batches[0] + batches[1]  # nothing corrupt
        status = await client.status("s")
        assert status is not None and status.next_offset == 6
        refusal = rf"'s' is read-only: its log {path.name} is damaged at byte {damaged_entry[0]}"
        with pytest.raises(hub.HubError, match=f"{refusal}.*from offset 6 on"):
            await client.append("s", b"more")
        with pytest.raises(hub.HubError, match=refusal):
            await client.finish("s")
        assert path.read_bytes() == content  # kept whole: batches 3 and 4 are still there
        await client.delete("s")  # deleting keeps the file too, set aside
    assert path.with_name(path.name + ".corrupt").read_bytes() == content
    assert not path.exists()
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert any("'s' is read-only" in record.getMessage() for record in errors)


async def test_a_flipped_byte_in_the_last_entry_is_a_torn_tail_and_cut(tmp_path: Path) -> None:
    batches = [[b"batch %d" % n] for n in range(3)]
    path = await write_log(tmp_path, batches)
    last = entry_spans(path.read_bytes())[-1]
    content = bytearray(path.read_bytes())
    content[last[1] - 1] ^= 0x01
    path.write_bytes(content)
    async with (
        await hub.serve_hub("127.0.0.1", 0, data_dir=tmp_path, grace_period=0.2) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        assert await read_all(client, "s") == batches[0] + batches[1]
        assert path.stat().st_size == last[0]
        assert await client.append("s", b"again") == 2
