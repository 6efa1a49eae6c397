"""``python -m streamkit hub --cluster-*``: hub processes as one cluster, and bad flags."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamkit.cli import main
from streamkit.session.protocol import Welcome
from tests._cluster import new_session, resume

CLI = [sys.executable, "-m", "streamkit"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hub", "--cluster-peers", "a=h:1"], "--cluster-peers goes with --cluster-node"),
        (["hub", "--cluster-node", "a"], "--cluster-node needs --cluster-peers or --cluster-redis"),
        (["hub", "--cluster-node", "a", "--cluster-peers", "a=h:1"], "needs --cluster-key-file"),
        (["hub", "--cluster-node", "a", "--cluster-peers", "a"], "'a' is not NODE=HOST:PORT"),
        (["hub", "--cluster-node", "a", "--cluster-peers", "a=h"], "'h' is not HOST:PORT or a"),
        (
            [
                "hub",
                "--cluster-node",
                "a",
                "--cluster-redis",
                "redis://h",
                "--cluster-key-file",
                "k",
            ],
            "--cluster-redis needs --cluster-listen",
        ),
        (
            ["hub", "--cluster-node", "a", "--cluster-peers", "a=h:1", "--cluster-redis", "r"],
            "not allowed with argument",
        ),
    ],
)
def test_bad_cluster_flags_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert message in error


def test_a_missing_or_short_key_is_one_line(tmp_path: Path) -> None:
    peers = f"a={tmp_path}/a.sock"
    for key_file, message in [
        (tmp_path / "missing", "cannot read --cluster-key-file"),
        (tmp_path / "short", "the cluster key is 5 bytes; it needs at least 16"),
    ]:
        if key_file.name == "short":
            key_file.write_bytes(b"short\n")
        argv = ["hub", "--port", "0", "--cluster-node", "a", "--cluster-peers", peers]
        result = subprocess.run(
            [*CLI, *argv, "--cluster-key-file", str(key_file)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 1
        assert message in result.stderr and "Traceback" not in result.stderr


async def test_hub_processes_resume_each_others_sessions(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(secrets.token_hex(32).encode() + b"\n")
    peers = ",".join(f"{name}={tmp_path}/{name}.sock" for name in "ab")
    hubs: list[asyncio.subprocess.Process] = []
    ports = []
    try:
        for name in "ab":
            hub = await asyncio.create_subprocess_exec(
                *CLI,
                *("hub", "--port", "0", "--cluster-node", name, "--cluster-peers", peers),
                *("--cluster-key-file", str(key_file)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            hubs.append(hub)
            assert hub.stdout is not None
            line = (await asyncio.wait_for(hub.stdout.readline(), 20)).decode()
            assert line.endswith(f"(in memory; cluster node '{name}')\n"), line
            ports.append(int(line.split()[2].rsplit(":", 1)[1]))
        welcome = await new_session(ports[0])
        answer, raw, _ = await resume(ports[1], welcome)
        raw.close()
        assert isinstance(answer, Welcome) and answer.present
    finally:
        for hub in hubs:
            hub.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(hub.communicate(), 20)
            assert hub.returncode == 0 and b"Traceback" not in stderr, stderr
