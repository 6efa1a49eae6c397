"""The examples run as documented: the echo pair, over a real loopback port."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_echo_client_gets_every_frame_back_from_echo_server() -> None:
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "echo_server.py"), "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("echo server on 127.0.0.1:"), line
        port = line.rsplit(":", 1)[1].strip()
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "echo_client.py"), port],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == ["echo: hello", "echo: framed", "echo: world"]
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=10) == 0
        assert "Traceback" not in server.stderr.read()  # type: ignore[union-attr]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
