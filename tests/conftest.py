"""Test support: run ``async def`` tests with ``asyncio.run`` under a timeout.

Warnings are errors (pyproject.toml), and every test ends with a garbage
collection: an unclosed transport or socket warns from its ``__del__``, and
collecting here makes that fail the test that leaked it, not a later one.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests._redis import RedisServer

#: Seconds an async test may take before it fails as a hang.
ASYNC_TEST_TIMEOUT = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run coroutine test functions in a fresh event loop, with a timeout."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    marker = pyfuncitem.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else ASYNC_TEST_TIMEOUT
    kwargs: dict[str, Any] = {
        name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames
    }

    async def run() -> None:
        async with asyncio.timeout(timeout):
            await pyfuncitem.obj(**kwargs)

    asyncio.run(run())
    return True


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what exists once the tests are collected: it lives to the end anyway.

    The collection after each test then looks only at newer objects, which
    keeps it fast.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect what the test left behind while its warning filters still apply."""
    yield
    gc.collect()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.slow`` soak tests unless ``STREAMKIT_SLOW=1``."""
    if os.environ.get("STREAMKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="a slow soak test: set STREAMKIT_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test session, without persistence, on a Unix socket.

    Skips the tests that use it where redis-server (or redis-py) is missing,
    unless ``STREAMKIT_REQUIRE_REDIS=1``, which fails them instead.
    """
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test alone, so tests on one Redis never see each other's streams."""
    return f"t-{next(_PREFIXES)}-{secrets.token_hex(4)}"


_PREFIXES = itertools.count()
