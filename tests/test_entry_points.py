"""The entry points of every layer: serve and connect, TCP and Unix, awaited or ``async with``.

Every serve function is awaitable and an async context manager, like every
connect function; the session and hub functions take the session settings
as typed keywords (a misspelt one is a type error and a ``TypeError``); each
``*_unix`` function is the TCP one on another endpoint.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from streamkit import (
    Connector,
    FramedStream,
    LengthPrefixed,
    connect,
    connect_unix,
    hub,
    serve,
    serve_unix,
)
from streamkit._lifecycle import ServerBase
from streamkit.net import Endpoint
from streamkit.session import (
    SessionOptions,
    SessionSettings,
    connect_resumable,
    connect_resumable_unix,
    serve_resumable,
    serve_resumable_unix,
)
from tests._handlers import echo, echo_session

CODEC = LengthPrefixed()


async def framed_round_trip(opening: Connector[FramedStream[bytes]]) -> None:
    async with opening as stream:
        await stream.send(b"ping")
        assert await stream.recv(timeout=10) == b"ping"


async def session_round_trip(opening: Connector[Any]) -> None:
    async with opening as session:
        await session.send(b"ping")
        assert await session.recv(timeout=10) == b"ping"


async def hub_round_trip(opening: Connector[hub.HubClient]) -> None:
    async with opening as client:
        await client.create("s")
        assert await client.append("s", b"ping") == 0


#: For each serve function: how to start it, and a round trip with a client of its layer.
Layer = tuple[
    Callable[[Path], Connector[Any]],
    Callable[[Any, Path], Any],
]
LAYERS: dict[str, Layer] = {
    "serve": (
        lambda tmp: serve(echo, "127.0.0.1", 0, codec=CODEC),
        lambda server, tmp: framed_round_trip(connect("127.0.0.1", server.port, codec=CODEC)),
    ),
    "serve_unix": (
        lambda tmp: serve_unix(echo, tmp / "s.sock", codec=CODEC),
        lambda server, tmp: framed_round_trip(connect_unix(tmp / "s.sock", codec=CODEC)),
    ),
    "serve_resumable": (
        lambda tmp: serve_resumable(echo_session, "127.0.0.1", 0),
        lambda server, tmp: session_round_trip(connect_resumable("127.0.0.1", server.port)),
    ),
    "serve_resumable_unix": (
        lambda tmp: serve_resumable_unix(echo_session, tmp / "s.sock"),
        lambda server, tmp: session_round_trip(connect_resumable_unix(tmp / "s.sock")),
    ),
    "serve_hub": (
        lambda tmp: hub.serve_hub("127.0.0.1", 0),
        lambda server, tmp: hub_round_trip(hub.connect("127.0.0.1", server.port)),
    ),
    "serve_hub_unix": (
        lambda tmp: hub.serve_hub_unix(tmp / "s.sock"),
        lambda server, tmp: hub_round_trip(hub.connect_unix(tmp / "s.sock")),
    ),
}


@pytest.mark.parametrize("layer", LAYERS)
async def test_every_serve_function_works_with_async_with(layer: str, tmp_path: Path) -> None:
    start, round_trip = LAYERS[layer]
    async with start(tmp_path) as server:
        assert isinstance(server, ServerBase)
        await round_trip(server, tmp_path)
        port = None if layer.endswith("_unix") else server.port
    # Closed on exit: nothing listens any more.
    assert server.sockets == ()
    if port is None:
        assert not (tmp_path / "s.sock").exists()
    else:
        with pytest.raises(OSError):
            await connect("127.0.0.1", port, codec=CODEC)


@pytest.mark.parametrize("layer", LAYERS)
async def test_every_serve_function_is_still_awaitable(layer: str, tmp_path: Path) -> None:
    start, round_trip = LAYERS[layer]
    server = await start(tmp_path)
    try:
        await round_trip(server, tmp_path)
    finally:
        server.close()
        await server.wait_closed()
    async with await start(tmp_path) as server:  # the older spelling goes on working
        await round_trip(server, tmp_path)


async def test_async_with_serve_closes_the_server_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="in the block"):
        async with serve(echo, "127.0.0.1", 0, codec=CODEC) as server:
            raise RuntimeError("in the block")
    assert not server.is_serving()


# -- typed session settings ----------------------------------------------------------------


def test_session_options_name_every_session_setting() -> None:
    hints = typing.get_type_hints(SessionOptions)
    fields = {field.name: field.type for field in dataclasses.fields(SessionSettings)}
    assert hints.keys() == fields.keys()
    settings_hints = typing.get_type_hints(SessionSettings)
    assert all(hints[name] == settings_hints[name] for name in fields)


@asynccontextmanager
async def nothing() -> AsyncIterator[None]:
    yield


#: A misspelt setting, cast so that mypy lets it through to the call that
#: raises (test_a_misspelt_setting_is_a_mypy_error checks that mypy flags it).
TYPO = cast(SessionOptions, {"resume_timout": 5})

MISSPELT: dict[str, Callable[[Path], object]] = {
    "connect_resumable": lambda tmp: connect_resumable("127.0.0.1", 1, **TYPO),
    "connect_resumable_unix": lambda tmp: connect_resumable_unix(tmp, **TYPO),
    "serve_resumable": lambda tmp: serve_resumable(echo_session, None, 0, **TYPO),
    "serve_resumable_unix": lambda tmp: serve_resumable_unix(echo_session, tmp, **TYPO),
    "hub.connect": lambda tmp: hub.connect("127.0.0.1", 1, **TYPO),
    "hub.connect_unix": lambda tmp: hub.connect_unix(tmp, **TYPO),
    "serve_hub": lambda tmp: hub.serve_hub(None, 0, **TYPO),
    "serve_hub_unix": lambda tmp: hub.serve_hub_unix(tmp, **TYPO),
}


@pytest.mark.parametrize("function", MISSPELT)
async def test_a_misspelt_setting_is_a_type_error_at_the_call(
    function: str, tmp_path: Path
) -> None:
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument.*'resume_timout'.*resume_timeout"
    ):
        MISSPELT[function](tmp_path / "never.sock")  # raised before anything connects or listens


MYPY_SNIPPET = """
from streamkit import hub
from streamkit.session import connect_resumable, connect_resumable_unix
from streamkit.session import serve_resumable, serve_resumable_unix


async def handler(session: object) -> None: ...


async def main() -> None:
    connect_resumable("h", 1, resume_timout=5)  # E1
    connect_resumable_unix("p", max_fram=5)  # E2
    serve_resumable(handler, "h", 1, keepalive_intervall=1.0)  # E3
    serve_resumable_unix(handler, "p", ack_evry=2)  # E4
    hub.connect("h", 1, reconect_timeout=5)  # E5
    hub.connect_unix("p", close_timout=1.0)  # E6
    hub.serve_hub("h", 1, max_session=3)  # E7
    hub.serve_hub_unix("p", handshake_timeout="10")  # E8: a setting of the wrong type
    connect_resumable("h", 1, resume_timeout=5, max_frame=1024)  # fine
    hub.serve_hub("h", 1, max_connections=10, keepalive_interval=1.0)  # fine
"""


def test_a_misspelt_setting_is_a_mypy_error(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(MYPY_SNIPPET))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            "--no-error-summary",
            str(snippet),
        ],
        cwd=Path(__file__).parent.parent,  # where mypy finds streamkit's source
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = snippet.read_text().splitlines()
    flagged = {
        lines[int(error.split(":")[1]) - 1].split("# ")[-1][:2]
        for error in result.stdout.splitlines()
        if ": error:" in error
    }
    assert flagged == {f"E{n}" for n in range(1, 9)}, result.stdout


# -- one endpoint ------------------------------------------------------------------------------


def test_an_endpoint_is_tcp_or_a_unix_path(tmp_path: Path) -> None:
    assert str(Endpoint.tcp("127.0.0.1", 8765)) == "127.0.0.1:8765"
    assert str(Endpoint.tcp("::1", 8765)) == "[::1]:8765"
    assert str(Endpoint.tcp(None, 8765)) == "*:8765"
    assert str(Endpoint.unix(tmp_path / "a.sock", 0o600)) == str(tmp_path / "a.sock")
    with pytest.raises(ValueError, match="mode applies to a Unix socket file only"):
        Endpoint(host="127.0.0.1", port=1, mode=0o600)
    with pytest.raises(ValueError, match="abstract socket name"):
        Endpoint.unix("\0streamkit-test", 0o600)


UNIX_TWINS = [
    (serve, serve_unix, {"host", "port"}, {"path", "mode"}),
    (connect, connect_unix, {"host", "port"}, {"path"}),
    (serve_resumable, serve_resumable_unix, {"host", "port"}, {"path", "mode"}),
    (connect_resumable, connect_resumable_unix, {"host", "port"}, {"path"}),
    (hub.serve_hub, hub.serve_hub_unix, {"host", "port"}, {"path", "mode"}),
    (hub.connect, hub.connect_unix, {"host", "port"}, {"path"}),
]


@pytest.mark.parametrize(("tcp", "unix", "tcp_only", "unix_only"), UNIX_TWINS)
def test_every_unix_function_takes_what_its_tcp_twin_takes(
    tcp: Callable[..., Any], unix: Callable[..., Any], tcp_only: set[str], unix_only: set[str]
) -> None:
    import inspect

    tcp_parameters = set(inspect.signature(tcp).parameters) - tcp_only
    unix_parameters = set(inspect.signature(unix).parameters) - unix_only
    assert tcp_parameters == unix_parameters


def test_async_context_managers_are_what_the_serve_functions_return() -> None:
    opening: AbstractAsyncContextManager[Any] = serve(echo, "127.0.0.1", 0, codec=CODEC)
    assert isinstance(opening, Connector)
    del opening  # never awaited: nothing was started
