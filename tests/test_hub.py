"""The hub over real loopback sockets: streams, reads, live tail, producers, cuts."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from streamkit import hub
from streamkit.errors import DecodeError
from streamkit.hub import HubClient, HubServer, Limits, MemoryStorage
from streamkit.hub import server as hub_server
from streamkit.hub.protocol import encode_message
from streamkit.hub.storage import Batch, Produced
from streamkit.session import SessionOptions

FAST: SessionOptions = {"keepalive_interval": 0.2, "keepalive_timeout": 0.6, "ack_delay": 0.002}


@asynccontextmanager
async def hub_and_client(
    limits: Limits | None = None,
) -> AsyncIterator[tuple[HubServer, HubClient]]:
    async with (
        await hub.serve_hub("127.0.0.1", 0, limits=limits, grace_period=0.2, **FAST) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        yield server, client


async def collect_all(reader: hub.Reader) -> list[bytes]:
    return [record.data async for record in reader]


async def read_all(client: HubClient, name: str, offset: int = 0) -> list[bytes]:
    async with client.read(name, offset) as reader:
        return [record.data async for record in reader]


async def test_create_status_append_read_finish_delete() -> None:
    async with hub_and_client() as (_, client):
        assert await client.status("s") is None
        status = await client.create("s", content_type="text/plain")
        assert (status.state, status.next_offset, status.content_type) == ("open", 0, "text/plain")
        with pytest.raises(hub.StreamExists, match="exists"):
            await client.create("s")
        assert (await client.create("s", exist_ok=True)).name == "s"
        assert [await client.append("s", b"r%d" % n) for n in range(3)] == [0, 1, 2]
        assert await client.append_many("s", [b"r3", b"r4"]) == 3
        assert await read_all(client, "s") == [b"r%d" % n for n in range(5)]
        assert await read_all(client, "s", 3) == [b"r3", b"r4"]
        assert await read_all(client, "s", 99) == []  # past the end, not live: ends
        finished = await client.finish("s")
        assert finished.finished and finished.next_offset == 5
        with pytest.raises(hub.StreamFinished, match="finished"):
            await client.append("s", b"late")
        await client.delete("s")
        assert await client.status("s") is None
        with pytest.raises(hub.StreamNotFound, match="no stream named 's'"):
            await client.append("s", b"x")
        with pytest.raises(hub.StreamNotFound):
            await read_all(client, "s")


async def test_live_reader_tails_and_tells_caught_up_from_finished() -> None:
    async with hub_and_client() as (_, client):
        await client.create("live")
        await client.append("live", b"old")
        reader = client.read("live", 0, live=True)
        first = await anext(reader)
        assert (first.offset, first.data) == (0, b"old")
        waiting = asyncio.create_task(anext(reader))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # past the live end: it waits
        assert reader.caught_up and not reader.finished
        await client.append("live", b"new")
        assert (await waiting).data == b"new"
        await client.finish("live")
        with pytest.raises(StopAsyncIteration):
            await anext(reader)
        assert reader.finished and reader.next_offset == 2


async def test_read_from_now_sees_only_new_records() -> None:
    async with hub_and_client() as (_, client):
        await client.create("s")
        await client.append("s", b"before")
        async with client.read("s", "now", live=True) as reader:
            pending = asyncio.create_task(anext(reader))
            await asyncio.sleep(0.05)
            await client.append("s", b"after")
            record = await pending
        assert (record.offset, record.data) == (1, b"after")


async def test_deleted_stream_raises_gone_for_a_live_reader() -> None:
    async with hub_and_client() as (_, client):
        await client.create("doomed")
        reader = client.read("doomed", 0, live=True)
        pending = asyncio.create_task(anext(reader))
        await asyncio.sleep(0.05)
        await client.delete("doomed")
        with pytest.raises(hub.StreamGone, match="deleted or expired"):
            await pending


async def test_stream_expires_after_its_ttl() -> None:
    async with hub_and_client() as (_, client):
        status = await client.create("short", ttl=0.5)
        assert status.ttl == 0.5 and status.expires_at is not None
        await client.append("short", b"x")
        for _ in range(50):
            await asyncio.sleep(0.1)
            if await client.status("short") is None:
                break
        assert await client.status("short") is None


async def test_json_helpers() -> None:
    async with hub_and_client() as (_, client):
        await client.create("j", content_type="application/json")
        await client.append_json("j", {"a": 1})
        await client.append_json("j", [1, "two"])
        got = [item async for item in client.read_json("j")]
        assert got == [(0, {"a": 1}), (1, [1, "two"])]
        await client.append("j", b"{not json")
        values = client.read_json("j")
        assert [await anext(values), await anext(values)] == got
        with pytest.raises(DecodeError, match="record 2 of stream 'j' is not JSON") as info:
            await anext(values)
        assert info.value.frame_number == 2


async def test_producer_batches_and_retries_are_exactly_once() -> None:
    async with hub_and_client() as (_, client):
        await client.create("p")
        async with client.producer("p", "writer-1", linger=0.001) as producer:
            for n in range(1000):
                producer.append_nowait(b"%d" % n)
        assert await read_all(client, "p") == [b"%d" % n for n in range(1000)]
        # A retried batch (same producer, epoch and sequence) is dropped.
        state = await client._call({"op": "producer", "name": "p", "producer": "writer-1"})
        retry = {"op": "produce", "name": "p", "producer": "writer-1", "epoch": 0}
        reply = await client._call({**retry, "seq": state["seq"]}, [b"dup"])
        assert reply["duplicate"] is True
        assert (await client.status("p")).next_offset == 1000  # type: ignore[union-attr]
        # The next sequence is appended.
        reply = await client._call({**retry, "seq": state["seq"] + 1}, [b"next"])
        assert reply["duplicate"] is False and reply["offset"] == 1000


async def test_producer_with_older_epoch_is_fenced() -> None:
    errors: list[BaseException] = []
    async with hub_and_client() as (_, client):
        await client.create("f")
        async with client.producer("f", "w", epoch=2) as new:
            new.append_nowait(b"from epoch 2")
        old = client.producer("f", "w", epoch=1)
        old.append_nowait(b"from epoch 1")
        with pytest.raises(hub.ProducerFenced, match="epoch 1 is fenced off by epoch 2"):
            await old.flush()
        quiet = client.producer("f", "w", epoch=1, on_error=errors.append)
        quiet.append_nowait(b"again")
        await quiet.flush()
        assert isinstance(errors[0], hub.ProducerFenced)
        assert await read_all(client, "f") == [b"from epoch 2"]


async def test_record_over_the_limit_is_a_clear_error() -> None:
    async with hub_and_client(limits=Limits(max_record=100, max_streams=2)) as (_, client):
        await client.create("small")
        with pytest.raises(hub.LimitExceeded, match="exceeds max_record=100"):
            await client.append("small", b"x" * 101)
        await client.create("second")
        with pytest.raises(hub.LimitExceeded, match="max_streams=2"):
            await client.create("third")


async def test_resumable_starts_the_source_once_and_it_runs_to_the_end() -> None:
    started = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal started
        started += 1
        for n in range(50):
            yield b"chunk %d" % n
            await asyncio.sleep(0.001)

    async with hub_and_client() as (_, client):
        first = await client.resumable("gen", source())
        got = [(await anext(first)).data for _ in range(5)]
        await first.close()  # the reader goes away early
        # A second reader attaches (the source is not started again) from its offset.
        async with await client.resumable("gen", source(), offset=5) as second:
            rest = [record.data async for record in second]
        assert started == 1
        assert got + rest == [b"chunk %d" % n for n in range(50)]
        status = await client.status("gen")
        assert status is not None and status.finished


async def test_many_producers_and_readers_with_connection_cuts() -> None:
    rng = random.Random(7)
    async with hub_and_client() as (server, client):
        await client.create("busy")
        async with (
            hub.connect("127.0.0.1", server.port, **FAST) as writer_a,
            hub.connect("127.0.0.1", server.port, **FAST) as writer_b,
        ):
            # Readers join before production: at the start, behind the end
            # still to come, and far past the live end (it waits there).
            reader_offsets = [0, 150, 800]

            async def produce(writer: HubClient, tag: bytes) -> None:
                async with writer.producer("busy", tag.decode(), linger=0.001) as producer:
                    for n in range(500):
                        producer.append_nowait(tag + b"%d" % n)
                        if n % 10 == 0:
                            await asyncio.sleep(0.001)  # a steady flow, cut now and then

            async def cut_now_and_then() -> None:
                for _ in range(20):
                    await asyncio.sleep(rng.uniform(0.001, 0.01))
                    for victim in (writer_a, writer_b, client):
                        if rng.random() < 0.5:
                            victim.session.reconnect()

            readers = [client.read("busy", offset, live=True) for offset in reader_offsets]

            async def collect(reader: hub.Reader, count: int) -> list[bytes]:
                return [(await anext(reader)).data for _ in range(count)]

            collecting = [
                asyncio.create_task(collect(reader, 1000 - offset))
                for reader, offset in zip(readers, reader_offsets, strict=True)
            ]
            await asyncio.gather(
                produce(writer_a, b"a"), produce(writer_b, b"b"), cut_now_and_then()
            )
            first, second, ahead = await asyncio.gather(*collecting)
            cuts = sum(c.session.stats.reconnects for c in (writer_a, writer_b, client))
            assert cuts >= 3
        everything = await read_all(client, "busy")
        assert len(everything) == 1000  # no producer retry duplicated a record
        expected = [b"a%d" % n for n in range(500)] + [b"b%d" % n for n in range(500)]
        assert sorted(everything) == sorted(expected)
        for tag in (b"a", b"b"):  # each producer's records in its order
            mine = [record for record in everything if record.startswith(tag)]
            assert mine == [tag + b"%d" % n for n in range(500)]
        assert first == everything
        assert second == everything[150:]
        assert ahead == everything[800:]


async def test_unix_socket_hub(tmp_path: Path) -> None:
    path = tmp_path / "hub.sock"
    async with (
        await hub.serve_hub_unix(path, grace_period=0.2) as _,
        hub.connect_unix(path) as client,
    ):
        await client.create("u")
        assert await client.append("u", b"over unix") == 0
        assert await read_all(client, "u") == [b"over unix"]


async def test_producers_and_readers_through_a_cutting_proxy() -> None:
    """Every connection goes through a FaultProxy that tears frames at random."""
    from streamkit.session import Backoff
    from streamkit.testing import FaultProxy

    through_proxy: SessionOptions = {
        **FAST,
        "handshake_timeout": 1.0,
        "reconnect_backoff": Backoff(initial=0.002, maximum=0.02),
    }
    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **FAST) as server,
        FaultProxy("127.0.0.1", server.port, seed=42) as proxy,
        hub.connect("127.0.0.1", proxy.port, **through_proxy) as producer_a,
        hub.connect("127.0.0.1", proxy.port, **through_proxy) as producer_b,
        hub.connect("127.0.0.1", proxy.port, **through_proxy) as reader_client,
    ):
        await producer_a.create("torn")
        early = reader_client.read("torn", 0, live=True)
        ahead = reader_client.read("torn", 1000, live=True)  # joins past the live end

        async def produce(client: HubClient, tag: bytes) -> None:
            async with client.producer("torn", tag.decode(), linger=0.001) as producer:
                for n in range(600):
                    producer.append_nowait(tag + b"%d" % n)
                    if n % 20 == 0:
                        await asyncio.sleep(0.002)

        async def collect(reader: hub.Reader, count: int) -> list[bytes]:
            return [(await anext(reader)).data for _ in range(count)]

        proxy.cut_every(0.02)
        collecting = asyncio.create_task(collect(early, 1200))
        waiting_ahead = asyncio.create_task(collect(ahead, 200))
        await asyncio.gather(produce(producer_a, b"a"), produce(producer_b, b"b"))
        # It joins behind the live end, with a small window: flow control across cuts.
        late = reader_client.read("torn", 300, live=True, window=500)
        first, second, third = await asyncio.gather(collecting, collect(late, 900), waiting_ahead)
        proxy.stop_cutting()
        everything = await read_all(reader_client, "torn")
    assert proxy.stats.cuts >= 5
    assert len(everything) == 1200  # no retried batch appended twice
    for tag in (b"a", b"b"):
        assert [r for r in everything if r.startswith(tag)] == [tag + b"%d" % n for n in range(600)]
    assert first == everything
    assert second == everything[300:]
    assert third == everything[1000:]


async def test_live_reader_sees_an_append_made_while_it_sends_caught_up() -> None:
    # A one-frame send window on the server and slow acks from the reader's
    # client: the hub's "caught_up" to the reader waits for an ack, and the
    # append from another client lands during that wait. The reader must
    # still be woken for it (it once slept until the next append).
    one_frame_window: SessionOptions = {**FAST, "max_unacked_frames": 1}
    slow_acks: SessionOptions = {**FAST, "ack_delay": 0.2}
    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **one_frame_window) as server,
        hub.connect("127.0.0.1", server.port, **slow_acks) as reading,
        hub.connect("127.0.0.1", server.port, **FAST) as writing,
    ):
        await writing.create("race")
        await writing.append("race", b"first")
        async with reading.read("race", 0, live=True) as reader:
            assert (await anext(reader)).data == b"first"
            await writing.append("race", b"second")  # while "caught_up" waits for the window
            record = await asyncio.wait_for(anext(reader), 5)
        assert (record.offset, record.data) == (1, b"second")


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"op": "create", "name": "x", "ttl": "abc"}, "'ttl'.*must be a number"),
    ({"op": "create", "name": "x", "ttl": -1}, "'ttl'.*> 0, not -1"),
    ({"op": "create", "name": "x", "ttl": 0}, "'ttl'.*> 0, not 0"),
    ({"op": "create", "name": "x", "ttl": math.nan}, "'ttl'.*> 0, not nan"),
    ({"op": "create", "name": "x", "ttl": math.inf}, "'ttl'.*> 0, not inf"),
    ({"op": "create", "name": "x", "ttl": True}, "'ttl'.*not bool"),
    ({"op": "create", "name": "x", "content_type": 5}, "'content_type'.*must be a str"),
    ({"op": "create", "name": "x", "exist_ok": "yes"}, "'exist_ok'.*must be a bool"),
    ({"op": "create", "name": 5}, "'name'.*must be a str"),
    ({"op": "create", "name": "\ud800"}, "'name'.*not valid Unicode"),
    ({"op": "create"}, "'name'.*must be a str, not NoneType"),
    ({"op": "status", "name": ["s"]}, "'name'.*must be a str"),
    ({"op": "producer", "name": "s"}, "'producer'.*must be a str"),
    ({"op": "produce", "name": "s", "producer": "", "epoch": 0, "seq": 0}, "1..255 bytes"),
    ({"op": "produce", "name": "s", "producer": "p", "epoch": "0", "seq": 0}, "'epoch'.*an int"),
    ({"op": "produce", "name": "s", "producer": "p", "epoch": -1, "seq": 0}, "'epoch'.*not -1"),
    ({"op": "produce", "name": "s", "producer": "p", "epoch": 0, "seq": 2**64}, "'seq'.*0\\.\\."),
    ({"op": "produce", "name": "s", "producer": "p", "epoch": 0}, "'seq'.*not NoneType"),
    ({"op": "produce", "name": "s", "producer": "p", "epoch": 0, "seq": 1.0}, "'seq'.*not float"),
    ({"op": "frobnicate"}, "unknown hub request 'frobnicate'"),
]


@pytest.mark.parametrize(("request_header", "message"), BAD_REQUESTS)
async def test_a_bad_request_gets_an_error_reply_and_the_session_goes_on(
    request_header: dict[str, Any], message: str
) -> None:
    async with hub_and_client() as (server, client):
        await client.create("s")
        with pytest.raises(hub.BadRequest, match=message):
            await client._call(request_header)
        assert await client.append("s", b"still here") == 0  # the session lives
        assert isinstance(server.storage, MemoryStorage)
        assert await server.storage.names() == ["s"]  # nothing bad was stored


async def test_a_malformed_records_body_gets_an_error_reply() -> None:
    async with hub_and_client() as (_, client):
        await client.create("s")
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        client._pending[99_999] = (reply, client.session, None)
        message = encode_message({"op": "append", "id": 99_999, "name": "s"})
        await client.session.send(message + b"\0\0\0\1\0\0\0\x09abc")
        header, _ = await asyncio.wait_for(reply, 5)
        assert (header["op"], header["code"]) == ("error", "bad_request")
        assert "does not match its record lengths" in header["message"]
        assert await client.append("s", b"ok") == 0


@pytest.mark.parametrize(
    ("offset", "message"),
    [("bogus", "'bogus'"), ("NOW", "'NOW'"), (-1, "not -1"), (1.5, "not 1.5"), (None, "None")],
)
async def test_a_read_with_a_bad_offset_gets_an_error_not_a_hang(
    offset: object, message: str
) -> None:
    async with hub_and_client() as (_, client):
        await client.create("s")
        await client.append("s", b"r")
        # As a client without checks would send it:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        client._pending[99_999] = (reply, client.session, None)
        read = {"op": "read", "id": 99_999, "name": "s", "offset": offset, "live": True}
        await client.session.send(encode_message(read))
        header, _ = await asyncio.wait_for(reply, 5)
        assert (header["op"], header["code"]) == ("error", "bad_request")
        assert re.search(f"'offset'.*{message}", header["message"])
        assert await read_all(client, "s") == [b"r"]  # the session lives


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.create("s", ttl="abc"), TypeError, "ttl must be a number"),
        (lambda c: c.create("s", ttl=-1), ValueError, "ttl must be a finite number"),
        (lambda c: c.create("s", ttl=math.nan), ValueError, "not nan"),
        (lambda c: c.create("s", ttl=math.inf), ValueError, "not inf"),
        (lambda c: c.create("s", content_type=b"text"), TypeError, "content_type must be a str"),
        (lambda c: c.create(5), TypeError, "stream name must be a str"),
        (lambda c: c.append("s", "text"), TypeError, "record must be bytes-like, not str"),
        (lambda c: c.append("s", 5), TypeError, "record must be bytes-like, not int"),
        (lambda c: c.append_many("s", [b"a", None]), TypeError, "not NoneType"),
        (lambda c: c.status(None), TypeError, "stream name must be a str"),
        (lambda c: c.read("s", "bogus"), ValueError, "offset must be an int >= 0 or 'now'"),
        (lambda c: c.read("s", -3), ValueError, "not -3"),
        (lambda c: c.read("s", True), TypeError, "not True"),
        (lambda c: c.read("s", live="yes"), TypeError, "live must be a bool"),
        (lambda c: c.producer("s", ""), ValueError, "producer id must be 1..255 bytes"),
        (lambda c: c.producer("s", "p", epoch=-1), ValueError, "epoch must be 0.."),
        (lambda c: c.producer("s", "p", linger=-1), ValueError, "linger must be"),
        (lambda c: c.producer("s", "p", max_batch_bytes=0), ValueError, "max_batch_bytes"),
    ],
)
async def test_bad_arguments_raise_at_the_call(call: Any, error: type, message: str) -> None:
    async with hub_and_client() as (_, client):
        with pytest.raises(error, match=message):
            result = call(client)
            if asyncio.iscoroutine(result):
                await result
        assert await client.status("s") is None  # nothing was sent


async def test_a_stream_past_its_ttl_is_gone_at_once_for_every_request() -> None:
    async with hub_and_client() as (server, client):
        await client.create("brief", ttl=0.1)
        await client.append("brief", b"x")
        live = client.read("brief", 1, live=True)
        waiting = asyncio.create_task(anext(live))
        await asyncio.sleep(0.15)  # let the TTL pass (the sweep runs only each second)
        assert await client.status("brief") is None
        with pytest.raises(hub.StreamNotFound):
            await client.append("brief", b"late")
        with pytest.raises(hub.StreamNotFound):
            await read_all(client, "brief")
        with pytest.raises(hub.StreamGone, match="deleted or expired"):
            await asyncio.wait_for(waiting, 5)
        assert (await client.create("brief")).next_offset == 0  # a new stream of that name
        assert isinstance(server.storage, MemoryStorage)
        assert await server.storage.names() == ["brief"]


class _FailingSweep(MemoryStorage):
    """Memory storage whose first TTL sweep fails."""

    def __init__(self) -> None:
        super().__init__()
        self.sweeps = 0
        self.expired = asyncio.Event()

    async def expire(self, now: float) -> list[str]:
        self.sweeps += 1
        if self.sweeps == 1:
            raise RuntimeError("a sweep that fails")
        gone = await super().expire(now)
        if gone:
            self.expired.set()
        return gone


async def test_a_failed_ttl_sweep_does_not_stop_expiry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hub_server, "_EXPIRY_INTERVAL", 0.01)
    storage = _FailingSweep()
    async with (
        await hub.serve_hub("127.0.0.1", 0, storage=storage, grace_period=0.2, **FAST) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        await client.create("brief", ttl=0.05)
        await client.append("brief", b"x" * 100)
        await asyncio.wait_for(storage.expired.wait(), 5)  # a later sweep freed it
        assert "brief" not in storage._streams and storage._total_bytes == 0
    assert "hub TTL sweep failed" in caplog.text


async def test_one_stream_that_cannot_expire_does_not_keep_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = MemoryStorage()
    for name in ("a", "bad", "c"):
        await storage.create(name, ttl=1.0, content_type=None)
    storage._streams["bad"].info.ttl = "abc"  # type: ignore[assignment]  # as an old bug stored
    with caplog.at_level(logging.ERROR, logger="streamkit.hub"):
        assert await storage.expire(time.time() + 2) == ["a", "c"]
    assert "could not expire stream 'bad'" in caplog.text


async def test_memory_limit_counts_each_record_even_an_empty_one() -> None:
    limit = 3 * hub.RECORD_OVERHEAD + 10
    async with hub_and_client(limits=Limits(max_total_bytes=limit)) as (_, client):
        await client.create("small")
        await client.append("small", b"x" * 10)
        await client.append_many("small", [b"", b""])  # exactly at the limit
        with pytest.raises(hub.LimitExceeded, match=f"max_total_bytes={limit}"):
            await client.append("small", b"")
        status = await client.status("small")
        assert status is not None and status.next_offset == 3


async def test_a_refused_batch_names_its_records_and_later_batches_go_on() -> None:
    errors: list[BaseException] = []
    async with hub_and_client(limits=Limits(max_record=100)) as (_, client):
        await client.create("p")
        producer = client.producer("p", "w", linger=60)
        producer.append_nowait(b"r0")
        await producer.flush()
        producer.append_nowait(b"r1")
        producer.append_nowait(b"x" * 101)  # the hub refuses this batch, whole
        with pytest.raises(hub.LimitExceeded, match=r"'w': records 1\.\.2 not appended") as info:
            await producer.flush()
        assert "exceeds max_record=100" in str(info.value)
        assert info.value.records == (b"r1", b"x" * 101)
        producer.append_nowait(b"r3")
        await producer.flush()  # the next batch is appended, not refused as "a gap"
        await producer.close()
        with pytest.raises(RuntimeError, match="'w' of 'p' is closed"):
            producer.append_nowait(b"late")

        quiet = client.producer("p", "q", linger=60, on_error=errors.append)
        quiet.append_nowait(b"y" * 101)
        await quiet.flush()
        quiet.append_nowait(b"q1")
        await quiet.close()
        (error,) = errors
        assert isinstance(error, hub.LimitExceeded) and error.records == (b"y" * 101,)
        assert "'q': record 0 not appended to 'p'" in str(error)
        assert await read_all(client, "p") == [b"r0", b"r3", b"q1"]


@pytest.mark.timeout(10)
async def test_flush_in_the_loop_step_in_which_a_batch_ended_returns() -> None:
    # on_error runs inside the batch's delivery task, as its last act: the
    # test wakes in the step in which that task ends, before its
    # done-callbacks run. On 3.12+, gather() of a done task returns without
    # yielding, so a flush() that looped on it never let them run.
    refused: list[BaseException] = []
    reported = asyncio.Event()

    def on_error(error: BaseException) -> None:
        refused.append(error)
        reported.set()

    async with hub_and_client() as (_, client):
        producer = client.producer("absent", "w", max_batch_bytes=1, on_error=on_error)
        producer.append_nowait(b"r0")  # a full batch: sent at once
        await reported.wait()
        await producer.flush()
        (error,) = refused
        assert isinstance(error, hub.StreamNotFound) and error.records == (b"r0",)


async def test_a_new_epoch_must_start_at_batch_zero() -> None:
    async with hub_and_client() as (_, client):
        await client.create("e")
        produce = {"op": "produce", "name": "e", "producer": "w"}
        await client._call({**produce, "epoch": 0, "seq": 0}, [b"a"])
        with pytest.raises(hub.HubError, match="epoch 1 must start at batch 0, not 5"):
            await client._call({**produce, "epoch": 1, "seq": 5}, [b"b"])
        await client._call({**produce, "epoch": 1, "seq": 0}, [b"c"])
        assert await read_all(client, "e") == [b"a", b"c"]


async def test_resumable_raises_at_the_await() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"never"

    async with hub_and_client(limits=Limits(max_streams=1)) as (_, client):
        await client.create("taken")
        with pytest.raises(hub.LimitExceeded, match="max_streams=1"):
            await client.resumable("new", source())
        with pytest.raises(TypeError, match="stream name must be a str"):
            await client.resumable(b"new", source())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="offset must be an int >= 0"):
            await client.resumable("taken", source(), offset=-1)


async def test_a_failing_source_is_logged_and_its_readers_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def source() -> AsyncIterator[bytes]:
        for n in range(3):
            yield b"item %d" % n
        raise OSError("the upstream went away")

    async with hub_and_client() as (server, client):
        async with (
            hub.connect("127.0.0.1", server.port, **FAST) as other,
            await client.resumable("flaky", source()) as reader,
        ):
            got = await asyncio.wait_for(collect_all(reader), 5)
            async with other.read("flaky", 0, live=True) as elsewhere:
                also = await asyncio.wait_for(collect_all(elsewhere), 5)  # ends too
            assert reader.finished and elsewhere.finished
        assert got == also == [b"item 0", b"item 1", b"item 2"]
    (failure,) = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failure.name.startswith("streamkit") and failure.levelno == logging.ERROR
    assert "the source of stream 'flaky' failed; finishing the stream" in failure.getMessage()
    assert isinstance(failure.exc_info[1], OSError)  # type: ignore[index]


async def test_close_cancels_an_endless_source_and_finishes_its_stream() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            n = 0
            while True:
                yield b"%d" % n
                n += 1
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async with hub_and_client() as (server, watcher):
        feeding = await hub.connect("127.0.0.1", server.port, **FAST)
        reader = await feeding.resumable("endless", endless())
        await anext(reader)
        await reader.close()  # the reader goes away: the source keeps running
        async with watcher.read("endless", 0, live=True) as elsewhere:
            for _ in range(20):
                await anext(elsewhere)
            assert not closed.is_set()
            await asyncio.wait_for(feeding.close(), 5)  # did wait for the source forever
            assert closed.is_set()
            rest = [record async for record in elsewhere]  # the stream was finished
        assert elsewhere.finished
        status = await watcher.status("endless")
        assert status is not None and status.finished
        assert status.next_offset == 20 + len(rest)


def test_hub_command_serves_on_a_unix_socket(tmp_path: Path) -> None:
    path, data_dir = tmp_path / "hub.sock", tmp_path / "data"
    command = [sys.executable, "-m", "streamkit", "hub", "--unix", str(path)]
    with subprocess.Popen(
        [*command, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:  # closes its pipes and waits for it on the way out
        try:
            assert process.stdout is not None and process.stderr is not None
            ready, _, _ = select.select([process.stdout], [], [], 20)
            assert ready, "the hub printed no address"
            assert process.stdout.readline().strip() == f"hub on {path} (logs in {data_dir})"

            async def use() -> list[bytes]:
                async with hub.connect_unix(path) as client:
                    await client.create("cli")
                    await client.append("cli", b"over the unix socket")
                    return await read_all(client, "cli")

            assert asyncio.run(asyncio.wait_for(use(), 20)) == [b"over the unix socket"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
            assert "Traceback" not in process.stderr.read()
            assert list(data_dir.glob("*.log"))  # the stream is on disk
        finally:
            if process.poll() is None:
                process.kill()


async def test_a_name_of_exactly_max_name_bytes_is_allowed() -> None:
    async with hub_and_client(limits=Limits(max_name=10)) as (_, client):
        await client.create("a" * 10)
        await client.create("é" * 5)  # 10 bytes of UTF-8
        for name in ("a" * 11, "é" * 5 + "a", ""):
            with pytest.raises(hub.BadRequest, match=r"must be 1\.\.10 bytes"):
                await client.create(name)
        assert await client.append("a" * 10, b"x") == 0


async def until(reader: hub.Reader, told: Any) -> None:
    """Wait until the hub has told ``reader`` something (``told()`` is true)."""
    while not told():
        reader._event.clear()
        await asyncio.wait_for(reader._event.wait(), 5)


async def test_caught_up_and_next_offset_count_only_records_yielded() -> None:
    async with hub_and_client() as (_, client):
        await client.create("s")
        await client.append_many("s", [b"r0", b"r1", b"r2"])
        async with client.read("s", 0, live=True) as reader:
            assert (await anext(reader)).data == b"r0"
            await until(reader, lambda: reader._caught_up)  # the hub said so...
            assert not reader.caught_up and reader.next_offset == 1  # ...but two records wait
            assert [(await anext(reader)).data for _ in range(2)] == [b"r1", b"r2"]
            assert reader.caught_up and reader.next_offset == 3
        async with client.read("s", "now", live=True) as now:
            waiting = asyncio.create_task(anext(now))
            await until(now, lambda: now._caught_up)
            assert now.caught_up and now.next_offset == 3  # where "now" was
            await client.append("s", b"r3")
            assert (await asyncio.wait_for(waiting, 5)).data == b"r3"
        await client.finish("s")
        async with client.read("s", 2) as ending:
            assert (await anext(ending)).data == b"r2"
            await until(ending, lambda: ending._ended)
            assert not ending.finished  # r3 is still to come
            assert [record.data async for record in ending] == [b"r3"]
            assert ending.finished and ending.next_offset == 4


async def test_producer_batches_fit_the_session_frame_when_their_records_do() -> None:
    small: SessionOptions = {**FAST, "max_frame": 64 * 1024}
    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **small) as server,
        hub.connect("127.0.0.1", server.port, **small) as client,
    ):
        await client.create("big")
        records = [bytes([n]) * 39_000 for n in range(3)] + [b"tiny"] * 5000
        async with client.producer("big", "w", linger=60, max_batch_bytes=40_000) as producer:
            for record in records:  # two records of 39 kB once made a 78 kB frame
                producer.append_nowait(record)
        assert await read_all(client, "big") == records


async def test_a_record_too_large_for_the_readers_session_is_an_error_not_a_hang() -> None:
    large: SessionOptions = {**FAST, "max_frame": 1024 * 1024}
    small: SessionOptions = {**FAST, "max_frame": 64 * 1024}
    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **large) as server,
        hub.connect("127.0.0.1", server.port, **large) as writer,
        hub.connect("127.0.0.1", server.port, **small) as reader_client,
    ):
        await writer.create("s")
        await writer.append_many("s", [b"a" * 30_000, b"b" * 30_000, b"c" * 100_000])
        assert len(await read_all(writer, "s")) == 3
        got: list[bytes] = []
        with pytest.raises(hub.LimitExceeded, match="record 2 of 100000 bytes does not fit"):
            async with reader_client.read("s") as reader:
                async for record in reader:
                    got.append(record.data)
        assert got == [b"a" * 30_000, b"b" * 30_000]  # split to fit, up to the record that cannot


async def test_endless_new_producer_ids_hit_the_memory_limit() -> None:
    limit = 10 * (hub.PRODUCER_OVERHEAD + len("producer-0"))
    async with hub_and_client(limits=Limits(max_total_bytes=limit)) as (_, client):
        await client.create("s")
        produce = {"op": "produce", "name": "s", "epoch": 0, "seq": 0}
        for n in range(10):  # empty batches: only the producers' states cost
            await client._call({**produce, "producer": f"producer-{n}"}, [])
        with pytest.raises(hub.LimitExceeded, match="a new producer's state"):
            await client._call({**produce, "producer": "producer-X"}, [])


@pytest.mark.parametrize("storage", ["memory", "file"])
def test_the_hub_benchmark_runs(tmp_path: Path, storage: str) -> None:
    """A smoke run of benchmarks/bench_hub.py (its numbers are not checked: timings vary).

    With file storage each hub gets a directory of its own: one started on
    an earlier hub's would find its streams there.
    """
    script = Path(__file__).parent.parent / "benchmarks" / "bench_hub.py"
    results = tmp_path / "bench.json"
    command = [sys.executable, str(script), "--records", "400", "--storage", storage]
    run = subprocess.run(
        [*command, "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rows = {row["row"]: row for row in json.loads(results.read_text())["rows"]}
    assert rows["producer, 8 batches in flight, batches stored as they came"]["records"] == 400
    assert rows["fan-out to 100 readers, as they came, taken in runs"]["records"] == 100 * 100
    assert rows["durable appends x10 to the hub, group commit"]["records"] == 10
    assert rows["durable appends x10 to FileStorage itself, group commit"]["ratio"] > 0
    assert rows["read-back"]["records"] == 400
    for row in rows.values():  # each row is a measurement, each ratio one against a baseline
        assert row.get("records_per_s", 1) > 0 and row.get("p50_seconds", 1) > 0
    assert rows["latency: awaited append"]["ratio"] > 0


async def test_a_reader_that_stops_iterating_holds_a_bounded_window() -> None:
    window = 10_000
    records = [b"%04d" % n + b"x" * 996 for n in range(1000)]  # 1 MB in all

    def buffered(reader: hub.Reader) -> int:
        held = reader._current[reader._position :]
        held += [record for message in reader._queue for record in message.records]
        return sum(map(len, held))

    async with hub_and_client() as (_, client):
        await client.create("s")
        await client.append_many("s", records)
        async with client.read("s", 0, live=True, window=window) as reader:
            assert (await anext(reader)).data == records[0]
            await until(reader, lambda: buffered(reader) >= window // 2)
            for _ in range(3):  # round trips: the hub had every chance to send more
                await client.status("s")
            assert buffered(reader) <= 2 * window  # not the whole megabyte
            rest = [(await anext(reader)).data for _ in range(999)]  # consuming lets more come
        assert rest == records[1:]
        async with client.read("s", 0, window=None) as unbounded:
            assert [record.data async for record in unbounded] == records


async def test_a_bad_window_is_refused_at_the_call_and_by_the_hub() -> None:
    async with hub_and_client() as (_, client):
        await client.create("s")
        with pytest.raises(ValueError, match="read window must be >= 1 byte, not 0"):
            client.read("s", window=0)
        with pytest.raises(TypeError, match="read window must be an int or None"):
            client.read("s", window=1.5)  # type: ignore[arg-type]
        reader = client.read("s")
        assert reader._header is not None
        reader._header["window"] = -5  # as a client without checks would send it
        with pytest.raises(hub.BadRequest, match=r"'window'.*not -5"):
            await asyncio.wait_for(anext(reader), 5)


async def test_a_record_too_large_to_read_back_is_refused_at_append() -> None:
    small: SessionOptions = {**FAST, "max_frame": 64 * 1024}
    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **small) as server,
        hub.connect("127.0.0.1", server.port, **small) as client,
    ):
        await client.create("s")
        # The largest record an append message of this session carries: its
        # read-back message (a longer header) would not fit in a frame.
        head = len(encode_message({"op": "append", "name": "s", "id": 3}))
        largest = 64 * 1024 - head - 8
        with pytest.raises(hub.LimitExceeded, match=f"record of {largest} bytes could not be read"):
            await client.append("s", b"x" * largest)
        fits = 64 * 1024 - 512
        assert await client.append("s", b"y" * fits) == 0
        assert await read_all(client, "s") == [b"y" * fits]


async def test_a_source_whose_records_are_refused_still_finishes_its_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"fits"
        yield b"x" * 101  # over max_record: its batch is refused

    async with (
        hub_and_client(limits=Limits(max_record=100)) as (_, client),
        await client.resumable("s", source()) as reader,
    ):
        got = await asyncio.wait_for(collect_all(reader), 5)
        assert reader.finished
    assert b"x" * 101 not in got
    assert "were not appended" in caplog.text or "failed" in caplog.text


async def test_a_read_that_expects_another_incarnation_of_its_stream_is_gone() -> None:
    async with hub_and_client() as (_, client):
        await client.create("s")
        await client.append("s", b"r0")
        async with client.read("s", 0) as reader:
            assert [record.data async for record in reader] == [b"r0"]
            created = reader._created
        assert isinstance(created, float)  # the read's first message says it
        await client.delete("s")
        await client.create("s")
        again = client.read("s", 0)
        again._created = created  # as a re-issued read sends it
        with pytest.raises(hub.StreamGone, match="deleted and created again since this read"):
            await asyncio.wait_for(anext(again), 5)
        for bad, error in (("x", "created must be a number"), (math.inf, "finite")):
            odd = client.read("s", 0)
            odd._created = bad  # type: ignore[assignment]  # as a client without checks would
            with pytest.raises(hub.BadRequest, match=rf"'created'.*{error}"):
                await asyncio.wait_for(anext(odd), 5)


async def eventually(condition: Any, seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds (it depends on another process's doing: polled)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


class _HeldProduces(MemoryStorage):
    """Memory storage whose produce requests wait until the test lets them through."""

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(limits)
        self.open = asyncio.Event()
        self.arrived = 0

    async def produce(
        self, name: str, records: Sequence[bytes], producer_id: str, epoch: int, seq: int
    ) -> Produced:
        self.arrived += 1
        await self.open.wait()
        return await super().produce(name, records, producer_id, epoch, seq)


async def test_a_producer_sends_several_batches_before_the_first_is_answered() -> None:
    storage = _HeldProduces()
    async with (
        await hub.serve_hub("127.0.0.1", 0, storage=storage, grace_period=0.2, **FAST) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        await client.create("p")
        # A batch per record (max_batch_bytes=1), up to three unanswered at once.
        producer = client.producer("p", "w", max_batch_bytes=1, max_in_flight=3)
        for n in range(10):
            producer.append_nowait(b"r%d" % n)
        flushed = asyncio.create_task(producer.flush())
        await eventually(lambda: len(producer._in_flight) == 3)  # the hub holds the first
        await asyncio.sleep(0.05)
        assert len(producer._in_flight) == 3 and len(producer._unsent) == 7
        assert storage.arrived == 1  # the hub applies them one at a time, in order
        storage.open.set()
        await asyncio.wait_for(flushed, 5)
        assert await read_all(client, "p") == [b"r%d" % n for n in range(10)]
        state = await client._call({"op": "producer", "name": "p", "producer": "w"})
        assert state["seq"] == 9  # each batch appended once, in sequence


async def test_batches_sent_behind_a_refused_one_are_sent_again_and_appended() -> None:
    errors: list[BaseException] = []
    storage = _HeldProduces(Limits(max_record=100))
    async with (
        await hub.serve_hub("127.0.0.1", 0, storage=storage, grace_period=0.2, **FAST) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        await client.create("p")
        producer = client.producer("p", "w", max_batch_bytes=1, on_error=errors.append)
        for record in (b"r0", b"x" * 101, b"r2", b"r3", b"y" * 101, b"r5"):
            producer.append_nowait(record)
        await eventually(lambda: len(producer._in_flight) == 6)  # all out before any answer
        storage.open.set()
        await asyncio.wait_for(producer.close(), 5)
        # The hub refused batches 1 and 4, and took 2, 3 and 5 (after 1 and 4,
        # first as gaps) once sent again with the sequences that follow.
        assert await read_all(client, "p") == [b"r0", b"r2", b"r3", b"r5"]
        assert [getattr(error, "records", None) for error in errors] == [
            (b"x" * 101,),
            (b"y" * 101,),
        ]
        assert "'w': record 1 not appended" in str(errors[0])
        assert "'w': record 4 not appended" in str(errors[1])
        state = await client._call({"op": "producer", "name": "p", "producer": "w"})
        assert state["seq"] == 3


async def test_a_producer_pipeline_survives_connection_cuts_exactly_once() -> None:
    from streamkit.testing import FaultProxy

    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **FAST) as server,
        FaultProxy("127.0.0.1", server.port, seed=7) as proxy,
        hub.connect("127.0.0.1", proxy.port, **FAST) as client,
    ):
        await client.create("p")
        producer = client.producer("p", "w", max_batch_bytes=64, max_in_flight=8)
        proxy.cut_every(0.01)
        for n in range(3000):
            producer.append_nowait(b"%05d" % n)
            if n % 50 == 49:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(producer.close(), 20)
        proxy.stop_cutting()
        assert await read_all(client, "p") == [b"%05d" % n for n in range(3000)]
        assert proxy.stats.cuts > 0


async def test_a_reader_hands_out_lists_of_records_as_they_arrive() -> None:
    records = [b"%04d" % n + b"x" * 996 for n in range(1000)]  # 1 MB: many messages
    async with hub_and_client() as (_, client):
        await client.create("s")
        await client.append_many("s", records)
        async with client.read("s", 0, live=True, window=10_000) as reader:
            first = await anext(reader)  # records and runs mix
            got, sizes = [first.data], []
            async for offset, batch in reader.batches():
                assert batch and offset == len(got)
                assert reader.next_offset == offset + len(batch)
                got += batch
                sizes.append(len(batch))
                if len(got) == 1000:
                    break
            assert got == records
            assert max(sizes) > 1 and len(sizes) > 2  # several at once, over several messages
            # The window was consumed list by list, or the hub would have
            # stopped sending after about 10 kB.
            await client.append("s", b"live")
            tail = reader.batches()
            assert await anext(tail) == (1000, [b"live"])
            await client.finish("s")
            assert [batch async for batch in tail] == []
            assert reader.finished and reader.next_offset == 1001
        await client.delete("s")
        await client.create("s")
        gone = client.read("s", 0, live=True)
        waiting = asyncio.ensure_future(anext(gone.batches()))
        await asyncio.sleep(0.05)
        await client.delete("s")
        with pytest.raises(hub.StreamGone):
            await asyncio.wait_for(waiting, 5)


class _Unreachable(MemoryStorage):
    """Memory storage whose reads fail as if its engine were unreachable, until let through."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused = 0

    async def read(self, name: str, offset: int, max_records: int, max_bytes: int) -> Batch:
        if self.down:
            self.refused += 1
            raise hub.StorageUnavailable("the engine cannot be reached (a test)")
        return await super().read(name, offset, max_records, max_bytes)


async def test_a_live_reader_waits_for_an_unavailable_storage_and_a_plain_one_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hub_server, "_UNAVAILABLE_RETRY", 0.02)
    storage = _Unreachable()
    async with (
        await hub.serve_hub("127.0.0.1", 0, storage=storage, grace_period=0.2, **FAST) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        await client.create("s")
        await client.append("s", b"r0")
        storage.down = True
        with pytest.raises(hub.StorageUnavailable, match="cannot be reached"):
            await read_all(client, "s")
        async with client.read("s", 0, live=True) as reader:
            waiting = asyncio.ensure_future(anext(reader))
            await eventually(lambda: storage.refused >= 5)  # it tries again and again
            assert not waiting.done()
            storage.down = False
            assert (await asyncio.wait_for(waiting, 5)).data == b"r0"
            await client.append("s", b"r1")
            assert (await anext(reader)).data == b"r1"
    assert caplog.text.count("live read of stream 's' waits") == 1  # said once, not each time


async def test_append_many_nowait_makes_the_batches_append_nowait_makes() -> None:
    small: SessionOptions = {**FAST, "max_frame": 64 * 1024}
    async with (
        await hub.serve_hub("127.0.0.1", 0, grace_period=0.2, **small) as server,
        hub.connect("127.0.0.1", server.port, **small) as client,
    ):
        rng = random.Random(13)
        records = [bytes([n % 256]) * rng.choice((0, 1, 100, 9_000, 39_000)) for n in range(400)]
        sent: dict[str, list[list[bytes]]] = {}
        for name in ("one-by-one", "many"):
            await client.create(name)
            producer = client.producer(name, "w", linger=60, max_batch_bytes=40_000)
            batches = sent[name] = []
            real_send = producer._send_batch

            def send_batch(
                batches: list[list[bytes]] = batches,
                producer: hub.Producer = producer,
                send: Any = real_send,
            ) -> None:
                if producer._batch:
                    batches.append(list(producer._batch))
                send()

            producer._send_batch = send_batch  # type: ignore[method-assign]
            async with producer:
                if name == "many":
                    producer.append_many_nowait(records[:7])
                    producer.append_many_nowait(iter(records[7:300]))  # any iterable
                    producer.append_many_nowait([])
                    producer.append_many_nowait(records[300:])
                else:
                    for record in records:
                        producer.append_nowait(record)
            assert await read_all(client, name) == records
        assert sent["many"] == sent["one-by-one"]
        assert all(sum(map(len, batch)) + 4 * len(batch) <= 40_000 for batch in sent["many"])


async def test_append_many_nowait_checks_each_record_as_append_nowait_does() -> None:
    async with hub_and_client() as (_, client):
        await client.create("m")
        async with client.producer("m", "w") as producer:
            producer.append_many_nowait([b"a", bytearray(b"b"), memoryview(b"c")])  # type: ignore[list-item]
            with pytest.raises(TypeError, match="a record must be bytes-like, not str"):
                producer.append_many_nowait([b"d", "e"])  # type: ignore[list-item]
        assert await read_all(client, "m") == [b"a", b"b", b"c", b"d"]
        with pytest.raises(RuntimeError, match="is closed"):
            producer.append_many_nowait([b"f"])
