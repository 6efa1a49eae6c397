"""Hostile input to a hub over real loopback sockets: huge fields, reused ids, many reads.

Peers here are the real hub client, or a raw session client that sends
hand-made hub messages (as a client without the hub client's checks would).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from streamkit import hub
from streamkit.errors import EndOfStream, SessionError
from streamkit.hub import HubServer, Limits, MemoryStorage
from streamkit.hub.protocol import decode_message, encode_message
from streamkit.hub.storage import StreamInfo
from streamkit.session import Session, SessionOptions, connect_resumable
from tests.test_hub import FAST, hub_and_client

#: A 1.5 MB stream name whose repr (and JSON) doubles it: its error reply
#: quoted in full (6 MB) would exceed the default max_frame (4 MiB).
HUGE_NAME = "\\" * 1_500_000
#: The most characters an error message may take whatever it quotes.
BOUNDED = 1000


class RawClient:
    """A session client that sends hand-made hub messages and reads the replies."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def send(self, header: dict[str, Any]) -> None:
        await self.session.send(encode_message(header))

    async def reply(self) -> dict[str, Any]:
        header, _ = decode_message(await self.session.recv(timeout=5))
        return header

    async def ask(self, header: dict[str, Any]) -> dict[str, Any]:
        await self.send(header)
        return await self.reply()


@asynccontextmanager
async def raw_client(server: HubServer, **options: Any) -> AsyncIterator[RawClient]:
    async with await connect_resumable("127.0.0.1", server.port, **{**FAST, **options}) as session:
        yield RawClient(session)


async def settled(before: set[asyncio.Task[Any]]) -> None:
    """Wait (polling, up to 5 s) until no task runs that did not run ``before``."""
    for _ in range(500):
        extra = asyncio.all_tasks() - before
        if not extra:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(extra)} tasks outlived their session: {sorted(map(repr, extra))}")


# -- 1. an error reply larger than the frame limit -------------------------------


async def test_an_error_quoting_a_huge_name_fits_the_frame_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hub_and_client() as (_, client):
        session = client.session
        with pytest.raises(hub.StreamNotFound, match=r"no stream named '\\\\\\\\.*1500000") as info:
            await asyncio.wait_for(client.finish(HUGE_NAME), 10)
        assert len(str(info.value)) < BOUNDED
        await client.create("s")
        assert await client.append("s", b"still here") == 0
        assert client.session is session  # the same session: nothing was lost
    assert "bad request" not in caplog.text


async def test_every_field_a_peer_sends_is_quoted_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    huge = "\\" * 1_000_000
    async with hub_and_client() as (server, client), raw_client(server) as raw:
        await client.create("s")
        for request in (
            {"op": huge, "id": 1},
            {"op": "read", "id": 2, "name": "s", "offset": huge},
            {"op": "create", "id": 3, "name": "t", "content_type": huge},
            {"op": "create", "id": 4, "name": "t", "ttl": huge},
            {"op": "produce", "id": 5, "name": "s", "producer": huge, "epoch": 0, "seq": 0},
            {"op": "produce", "id": 6, "name": "s", "producer": "p", "epoch": 0, "seq": huge},
            {"op": "read", "id": 7, "name": "s", "offset": [[[["deep"] * 100_000]]]},
            {"op": "status", "id": 8, "name": "\ud800" * 100_000},  # not valid Unicode
        ):
            reply = await raw.ask(request)
            expected = ("error", request["id"], "bad_request")
            assert (reply["op"], reply["id"], reply["code"]) == expected
            assert len(reply["message"]) < BOUNDED, reply["message"][:200]
        assert (await raw.ask({"op": "status", "id": 9, "name": "s"}))["op"] == "ok"
    assert max(map(len, caplog.messages), default=0) < BOUNDED


# -- 2. every request gets an answer -------------------------------------------------


async def test_a_read_of_an_absent_stream_with_a_huge_name_gets_its_error() -> None:
    async with hub_and_client() as (_, client):
        session = client.session
        with pytest.raises(hub.StreamNotFound, match="1500000") as info:
            async with client.read(HUGE_NAME) as reader:
                await asyncio.wait_for(anext(reader), 10)
        assert len(str(info.value)) < BOUNDED
        await client.create("s")
        assert await client.append("s", b"still here") == 0
        assert client.session is session


async def test_a_reply_too_large_for_the_clients_frame_becomes_an_error_with_its_id() -> None:
    # The client's frames are smaller than the hub's: a name that fits its
    # request does not fit the status that quotes it back (whatever the reply,
    # the hub sends a small error in its place).
    small: SessionOptions = {**FAST, "max_frame": 64 * 1024}
    name = "n" * (64 * 1024 - 100)
    async with (
        hub_and_client(limits=Limits(max_name=100_000)) as (server, client),
        hub.connect("127.0.0.1", server.port, **small) as small_client,
    ):
        await client.create(name)
        session = small_client.session
        with pytest.raises(hub.LimitExceeded, match="exceeds the peer's max_frame=65536") as info:
            await asyncio.wait_for(small_client.status(name), 10)
        assert "reply" in str(info.value)
        assert len(str(info.value)) < BOUNDED
        await small_client.create("s")
        assert await small_client.append("s", b"still here") == 0
        assert small_client.session is session
        async with small_client.read(name) as reader:  # a read's messages do not quote it
            assert reader.next_offset == 0
            assert [record async for record in reader] == []


class UnencodableStatus(MemoryStorage):
    """A storage (with a bug) whose stream status cannot be encoded as JSON."""

    async def get(self, name: str) -> StreamInfo | None:
        info = await super().get(name)
        if info is not None and name == "odd":
            info.content_type = b"bytes, not str"  # type: ignore[assignment]
        return info


async def test_a_reply_that_cannot_be_encoded_becomes_an_error_with_its_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = UnencodableStatus()
    async with (
        await hub.serve_hub("127.0.0.1", 0, storage=storage, grace_period=0.2, **FAST) as server,
        hub.connect("127.0.0.1", server.port, **FAST) as client,
    ):
        await client.create("odd")
        session = client.session
        with pytest.raises(hub.HubError, match="failed to serve the request: TypeError"):
            await asyncio.wait_for(client.status("odd"), 10)
        assert await client.append("odd", b"still here") == 0
        assert client.session is session
    assert "request 2 failed" in caplog.text  # logged with its traceback, as a bug


# -- 3. request ids in use, and the tasks of a session ------------------------------------


async def test_reads_reusing_an_id_are_refused_and_no_task_outlives_its_session() -> None:
    async with hub_and_client() as (server, client):
        await client.create("quiet")
        before = asyncio.all_tasks()
        async with raw_client(server) as raw:
            read = {"op": "read", "id": 7, "name": "quiet", "live": True}
            for _ in range(20):
                await raw.send(read)
            replies = [await raw.reply() for _ in range(20)]
            assert all(reply["id"] == 7 for reply in replies)
            assert sorted(reply["op"] for reply in replies) == ["caught_up"] + ["error"] * 19
            refusals = [reply for reply in replies if reply["op"] == "error"]
            assert {reply["code"] for reply in refusals} == {"bad_request"}
            assert "request id 7 is in use" in refusals[0]["message"]
            # A request of another kind with that id is refused too; other ids are served.
            assert (await raw.ask({"op": "status", "id": 7, "name": "quiet"}))["op"] == "error"
            assert (await raw.ask({"op": "status", "id": 8, "name": "quiet"}))["op"] == "ok"
            # Once its read is cancelled, the id is free at once.
            await raw.send({"op": "cancel", "id": 7})
            assert (await raw.ask({"op": "status", "id": 7, "name": "quiet"}))["op"] == "ok"
            await raw.send(read)
            assert (await raw.reply())["op"] == "caught_up"
        await settled(before)


async def test_reads_past_max_reads_are_refused_and_the_others_go_on() -> None:
    async with hub_and_client(limits=Limits(max_reads=3)) as (server, client):
        await client.create("s")
        async with raw_client(server) as raw:
            for request in (1, 2, 3):  # exactly max_reads at once: served
                read = {"op": "read", "id": request, "name": "s", "live": True}
                caught_up = await raw.ask(read)
                assert (caught_up["op"], caught_up["id"]) == ("caught_up", request)
            refused = await raw.ask({"op": "read", "id": 4, "name": "s", "live": True})
            assert (refused["op"], refused["id"], refused["code"]) == ("error", 4, "limit")
            assert "max_reads=3" in refused["message"]
            await client.append("s", b"r")
            told = [await raw.reply() for _ in range(6)]  # records, then caught_up again
            assert sorted((reply["op"], reply["id"]) for reply in told) == [
                *(("caught_up", request) for request in (1, 2, 3)),
                *(("records", request) for request in (1, 2, 3)),
            ]
            await raw.send({"op": "cancel", "id": 1})  # a read that ends makes room
            again = await raw.ask({"op": "read", "id": 5, "name": "s", "live": True})
            assert (again["op"], again["id"]) == ("records", 5)


async def test_a_running_read_does_not_pin_what_else_its_request_carried() -> None:
    # Each read carries 1 MB the hub has no use for; a live read of a quiet
    # stream runs for ever, and must not keep it.
    padding = "x" * 1_000_000
    async with hub_and_client() as (server, client):
        await client.create("quiet")
        async with raw_client(server) as raw:
            tracemalloc.start()
            try:
                before, _ = tracemalloc.get_traced_memory()
                for request in range(1, 21):
                    read = {"op": "read", "id": request, "name": "quiet", "live": True}
                    assert (await raw.ask({**read, "pad": padding}))["op"] == "caught_up"
                gc.collect()
                held, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert held - before < 5_000_000, f"20 reads hold {held - before} bytes"


# -- peers that are not hub clients at all ------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"op": "status", "id": 10**4000, "name": "s"},
        {"op": "status", "id": -1, "name": "s"},
        {"op": "status", "id": True, "name": "s"},
        {"op": "x" * 1_000_000},
    ],
    ids=["huge-id", "negative-id", "bool-id", "huge-op-without-id"],
)
async def test_a_message_that_is_no_request_ends_only_its_own_session(
    header: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "streamkit.hub")
    async with hub_and_client() as (server, client), raw_client(server) as raw:
        await raw.send(header)
        with pytest.raises(EndOfStream):
            await raw.session.recv(timeout=5)
        await client.create("s")  # other clients are served
        assert await client.append("s", b"r") == 0
    (line,) = [record.message for record in caplog.records if "bad request" in record.message]
    assert len(line) < BOUNDED


async def test_a_header_nested_past_the_recursion_limit_ends_only_its_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    depth = 200_000
    head = b'{"op":"status","id":1,"name":' + b"[" * depth + b"]" * depth + b"}"
    async with hub_and_client() as (server, client), raw_client(server) as raw:
        await raw.session.send(struct.pack(">I", len(head)) + head)
        with pytest.raises(EndOfStream):
            await raw.session.recv(timeout=5)
        await client.create("s")
        assert await client.append("s", b"r") == 0
    assert "not valid JSON" in caplog.text


@pytest.mark.parametrize("op", ["finish", "read"])
async def test_a_client_whose_frames_cannot_carry_an_error_loses_its_session_not_its_answer(
    op: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 80 bytes carry the request, but not the not_found error it gets, nor the
    # limit error that replaces it: the hub ends the session (the client's
    # calls fail), rather than leave the request unanswered.
    async with hub_and_client() as (server, client):
        before = asyncio.all_tasks()
        tiny_frames: SessionOptions = {**FAST, "max_frame": 80}
        session = await connect_resumable("127.0.0.1", server.port, **tiny_frames)
        try:
            await session.send(encode_message({"op": op, "id": 1, "name": "absent"}))
            with pytest.raises((EndOfStream, SessionError)):
                await session.recv(timeout=5)
        finally:
            session.abort()
        await settled(before)
        await client.create("s")  # other clients are served
    assert "max_frame=80 cannot carry even an error reply" in caplog.text
