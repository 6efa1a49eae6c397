"""The examples run as documented: the echo pair, over a real loopback port."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_echo_client_gets_every_frame_back_from_echo_server() -> None:
    with ExitStack() as stack:
        server, line = start(stack, str(EXAMPLES / "echo_server.py"), "0")
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


def start(stack: ExitStack, *argv: str) -> tuple[subprocess.Popen[str], str]:
    """Start a long-running process and return it with its first line of output.

    When ``stack`` closes, the process is killed (if still running), its
    pipes are closed and it is waited for.
    """
    process = stack.enter_context(
        subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    )
    stack.callback(process.kill)  # first, then Popen's exit: close the pipes, wait
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_resume_client_survives_the_cutting_proxy_of_its_docstring() -> None:
    """resume_server + ``python -m streamkit proxy --cut-every`` + resume_client, as documented."""
    with ExitStack() as stack:
        _, line = start(stack, str(EXAMPLES / "resume_server.py"), "0")
        port = line.rsplit(":", 1)[1]
        _, line = start(
            stack,
            "-m",
            "streamkit",
            "proxy",
            "--target",
            f"127.0.0.1:{port}",
            "--cut-every",
            "0.1",
        )
        proxy_port = line.split()[2].rsplit(":", 1)[1]
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "resume_client.py"), proxy_port, "1500"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        assert "all 1500 messages answered in order" in client.stdout
        reconnects = int(client.stdout.split("reconnects=")[1].split(",")[0])
        assert reconnects >= 1


def test_resume_client_starts_a_new_session_when_the_server_restarts() -> None:
    """ResumeRejected after a restart: a new session, from the first unanswered message."""
    with ExitStack() as stack:
        server, line = start(stack, str(EXAMPLES / "resume_server.py"), "0")
        port = line.rsplit(":", 1)[1]
        client, first = start(stack, str(EXAMPLES / "resume_client.py"), port, "3000")
        assert "200 answered" in first  # the stream is flowing
        server.kill()
        server.wait()
        _, line = start(stack, str(EXAMPLES / "resume_server.py"), port)
        assert line.endswith(f":{port}")
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, out + err
        assert "session lost (server rejected the session: no session" in out
        assert "all 3000 messages answered in order" in out


def test_hub_chat_prints_every_message_once_in_order() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "hub_chat.py")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for user, text in [("alice", "hi bob"), ("bob", "bye")]:
        assert result.stdout.count(f"{user}: {text}") == 1, result.stdout
    assert "reconnects: 2" in result.stdout  # each FaultProxy cut was resumed
