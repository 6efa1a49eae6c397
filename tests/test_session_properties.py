"""Exactly-once, in-order delivery under random connection cuts (seeded, reproducible)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamkit.session import (
    Backoff,
    ClientSession,
    ServerSession,
    SessionOptions,
    connect_resumable,
    serve_resumable,
)
from streamkit.testing import FaultProxy

FAST: SessionOptions = {
    "keepalive_interval": 0.2,
    "keepalive_timeout": 0.6,
    "ack_delay": 0.002,
    "ack_every": 8,
}
#: The cutter often cuts a connection before anything got through on it,
#: which makes the client back off: keep the back-off short.
CLIENT: SessionOptions = {**FAST, "reconnect_backoff": Backoff(0.001, 0.01)}
#: Each receiver's window, small enough that both senders wait on it often
#: across cuts. Only the receivers set them: each sender learns the other's
#: in the handshake, so it is enforced exactly at the edge a sender keeps to.
SERVER_WINDOW: SessionOptions = {"max_unacked_frames": 64}
CLIENT_WINDOW: SessionOptions = {"max_unacked_bytes": 4096}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_window_errors() -> Iterator[None]:
    """Fail if either side closes a connection for a window overrun (which a resume hides)."""
    handler = _Collect()
    logger = logging.getLogger("streamkit")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not [m for m in handler.messages if "receive window" in m]


async def exchange_with_cuts(
    client_payloads: list[bytes], server_payloads: list[bytes], seed: int, cuts: int
) -> tuple[list[bytes], list[bytes], ClientSession]:
    """Both sides send their payloads at once through a proxy that cuts ``cuts`` times.

    Half of the cuts are torn: a random few bytes more go one way, then the
    connection dies, so frames are often half delivered.
    """
    rng = random.Random(seed)
    server_got: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    async def handler(session: ServerSession) -> None:
        async def sender() -> None:
            for payload in server_payloads:
                await session.send(payload)

        # Nothing moves before the client's first frame, which it sends once
        # the first cut is armed.
        server_got.append(await session.recv())
        task = asyncio.create_task(sender())
        for _ in client_payloads[1:]:
            server_got.append(await session.recv())
        await task
        await session.flush()
        done.set_result(None)
        await session.recv()  # until the client closes

    server_options: SessionOptions = {**SERVER_WINDOW, **FAST}
    client_options: SessionOptions = {**CLIENT_WINDOW, **CLIENT}
    async with (
        await serve_resumable(handler, "127.0.0.1", 0, grace_period=1, **server_options) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
        connect_resumable("127.0.0.1", proxy.port, **client_options) as session,
    ):
        # Each sender keeps to the smaller window, the receiver's.
        assert session.core.send_window[0] == 64
        client_got: list[bytes] = []
        # The first cut is armed before any frame moves: a few hundred bytes
        # into the traffic one way, so every exchange of 30 frames or more
        # (13 bytes each at least) is cut at least once, in mid-stream.
        proxy.cut_after(rng.randint(1, 300), rng.choice(("up", "down")))
        first_connection = session.stats.connections

        async def sender() -> None:
            for payload in client_payloads:
                await session.send(payload)

        async def receiver() -> None:
            for _ in server_payloads:
                client_got.append(await session.recv())

        async def cutter() -> None:
            await session.wait_connected(first_connection)
            for _ in range(cuts - 1):
                # Let a random, small amount of traffic through, then cut:
                # frames are in flight both ways.
                for _ in range(rng.randint(0, 4)):
                    await asyncio.sleep(0)
                before = session.stats.connections
                if rng.random() < 0.5:
                    cut = proxy.cut()
                else:
                    cut = proxy.cut_after(rng.randint(1, 300), rng.choice(("up", "down")))
                if not cut:
                    continue
                await session.wait_connected(before)

        tasks = [asyncio.create_task(c()) for c in (sender, receiver, cutter)]
        await asyncio.gather(*tasks[:2])
        tasks[2].cancel()
        await session.flush()
        await done
        return client_got, server_got, session


#: At least 30 frames each way: enough traffic that the first cut always lands.
payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=30, max_size=300)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(to_server=payloads, to_client=payloads, seed=st.integers(0, 2**32 - 1))
def test_exactly_once_in_order_under_random_cuts(
    to_server: list[bytes], to_client: list[bytes], seed: int
) -> None:
    async def run() -> None:
        with no_window_errors():
            async with asyncio.timeout(20):
                client_got, server_got, session = await exchange_with_cuts(
                    to_server, to_client, seed, 30
                )
        assert server_got == to_server
        assert client_got == to_client
        assert session.stats.reconnects >= 1  # every example is cut

    asyncio.run(run())


async def test_hundreds_of_cuts_in_one_session() -> None:
    """300 cuts through the proxy, half of them mid-frame, and every frame once in order."""
    rng = random.Random(1234)
    # Enough traffic that the exchange outlasts the cuts (each costs a resume).
    to_server = [rng.randbytes(rng.randint(0, 600)) for _ in range(40_000)]
    to_client = [rng.randbytes(rng.randint(0, 600)) for _ in range(40_000)]
    with no_window_errors():
        client_got, server_got, session = await exchange_with_cuts(to_server, to_client, 99, 300)
    assert server_got == to_server
    assert client_got == to_client
    assert session.stats.reconnects >= 200
    assert session.stats.frames_replayed > 0
