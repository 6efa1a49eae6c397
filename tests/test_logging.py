"""The library's logging: silent unless the application configures logging, and documented."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import streamkit

ROOT = Path(__file__).parent.parent

#: A session server meets a client that speaks another protocol: streamkit.session
#: logs a WARNING. ``CONFIGURE`` is replaced by the application's logging setup.
SCRIPT = """
import asyncio, logging
CONFIGURE
from streamkit import serve_resumable

async def handler(session):
    pass

async def main():
    async with await serve_resumable(handler, "127.0.0.1", 0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\\r\\n\\r\\n")
        await reader.read()  # the server closes after its warning
        writer.close()
        await writer.wait_closed()

asyncio.run(main())
"""


def run(configure: str) -> subprocess.CompletedProcess[str]:
    script = SCRIPT.replace("CONFIGURE", configure)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )


def test_the_streamkit_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("streamkit").handlers
    assert any(isinstance(handler, logging.NullHandler) for handler in handlers)


def test_a_warning_reaches_stderr_only_when_the_application_configures_logging() -> None:
    silent = run("")
    assert silent.returncode == 0, silent.stderr
    assert silent.stderr == ""  # not logging's last resort, unformatted
    configured = run("logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')")
    assert configured.returncode == 0, configured.stderr
    assert configured.stderr.startswith("WARNING streamkit.session: session handshake with")
    assert "looks like HTTP" in configured.stderr


def test_every_logger_the_code_uses_is_in_the_readme_logging_section() -> None:
    names = set()
    for path in (ROOT / "streamkit").rglob("*.py"):
        names.update(re.findall(r'getLogger\("([^"]+)"\)', path.read_text()))
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Logging\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(streamkit[.\w]*)` \|", section, re.MULTILINE))
    assert names <= documented, f"loggers missing from the README: {names - documented}"
    assert streamkit.__name__ in names
