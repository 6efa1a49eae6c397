"""A real redis-server for the tests: started in a temp dir, on a Unix socket, and stopped.

The session's server (the ``redis_server`` fixture of conftest.py) serves
every test, each under its own key prefix (``redis_prefix``); a test that
kills or reconfigures Redis starts its own :class:`RedisServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamkit.hub.redis import RedisStorage
from streamkit.testing import FaultProxy

#: Set to 1 (as CI does) to make a missing redis-server fail the Redis tests, not skip them.
REQUIRE = "STREAMKIT_REQUIRE_REDIS"
#: Seconds a redis-server may take to answer after it starts.
START_TIMEOUT = 20.0


def redis_server_path() -> str:
    """The redis-server executable; skips the test (fails it under REQUIRE) without one."""
    path = shutil.which("redis-server")
    problem = None
    if path is None:
        problem = "redis-server is not installed (apt-get install redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            problem = 'redis-py is not installed (pip install -e ".[test]")'
    if problem is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{problem}, and {REQUIRE}=1 requires the Redis tests to run")
        pytest.skip(f"{problem}: the Redis tests need both (CI sets {REQUIRE}=1)")
    assert path is not None
    return path


class RedisServer:
    """A redis-server process of the tests, on the Unix socket ``socket_path`` in ``directory``.

    No persistence unless ``appendonly`` (then AOF with ``appendfsync
    always``, so every acknowledged write survives a SIGKILL). ``kill()``
    and ``start()`` again restart it on the same socket and files.
    """

    def __init__(
        self, directory: Path, *, appendonly: bool = False, args: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.socket_path = str(directory / "redis.sock")
        self.appendonly = appendonly
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_path(),
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self.directory / "redis.log"),
            "--maxmemory", "1gb",  # the settings the README recommends, unless args say
            "--maxmemory-policy", "noeviction",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start: {command}\n{tail}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        """Whether the server answers PING on its socket (and is done loading)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(self.socket_path)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
            except OSError:
                return False

    def kill(self) -> None:
        """SIGKILL the server and wait for it to end."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def redis_storage(url: str, prefix: str, **options: Any) -> AsyncIterator[RedisStorage]:
    """A started :class:`~streamkit.hub.redis.RedisStorage`, closed on the way out."""
    storage = RedisStorage.from_url(url, prefix=prefix, **options)
    try:
        await storage.start()
        yield storage
    finally:
        await storage.close()


@contextlib.asynccontextmanager
async def proxied_redis_storage(
    server: RedisServer, prefix: str, **options: Any
) -> AsyncIterator[tuple[FaultProxy, RedisStorage]]:
    """A started storage that reaches ``server`` over TCP through a :class:`FaultProxy`."""
    async with (
        FaultProxy(target_unix=server.socket_path) as proxy,
        redis_storage(f"redis://127.0.0.1:{proxy.port}/0", prefix, **options) as storage,
    ):
        yield proxy, storage


def awaiting(task: asyncio.Task[Any]) -> Iterator[str]:
    """The names of the coroutines ``task`` is suspended in, outermost first."""
    awaited: Any = task.get_coro()
    while awaited is not None:
        code = getattr(awaited, "cr_code", None) or getattr(awaited, "gi_code", None)
        if code is not None:
            yield code.co_name
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)


async def just_sent(task: asyncio.Task[Any], timeout: float = 5.0) -> None:
    """Return once ``task``'s command to Redis has been sent but before the task has heard so.

    On Python 3.11 redis-py's ``asyncio.wait_for`` runs the send as a task
    of its own, which completes one turn of the loop after ``wait_for``
    starts; ``wait_for`` hears of it a turn or two later, and a
    cancellation in that gap is lost (``wait_for`` returns the send's
    result instead). On 3.12 and later ``wait_for`` runs the send in
    ``task`` itself, without a pause: there is no gap, and this returns
    once ``task`` waits for Redis's answer.
    """
    gap = sys.version_info < (3, 12)
    async with asyncio.timeout(timeout):
        # One turn of the loop at a time: what is looked for lasts a turn or two.
        while ("wait_for" if gap else "read_response") not in awaiting(task):  # noqa: ASYNC110
            await asyncio.sleep(0)
    if gap:
        await asyncio.sleep(0)  # the send has run (it never waits for Redis) and ended
