"""``python -m streamkit``: every command over real sockets, and bad arguments."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from streamkit import (
    ConnectionLost,
    EndOfStream,
    LengthPrefixed,
    Lines,
    bench,
    cli,
    connect,
    connect_unix,
    demo,
    hub,
)
from streamkit.cli import main

CLI = [sys.executable, "-m", "streamkit"]


@contextmanager
def running(*args: str, address_on: str = "stdout") -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``python -m streamkit *args``; yield it and its first line (the address)."""
    with subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:  # closes its pipes and waits for it on the way out
        try:
            stream = process.stdout if address_on == "stdout" else process.stderr
            assert stream is not None
            yield process, stream.readline().strip()
        finally:
            if process.poll() is None:
                process.kill()


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> None:
    """Signal the command and check it ends cleanly, without a traceback."""
    process.send_signal(signum)
    assert process.wait(timeout=10) == 0
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["serve"],  # --echo is the only mode, and required
        ["serve", "--echo", "--codec", "protobuf"],
        ["serve", "--echo", "--port", "99999"],
        ["serve", "--echo", "--port", "80", "--unix", "/tmp/x.sock"],
        ["serve", "--echo", "--tls-cert", "cert.pem"],
        ["send"],
        ["send", "localhost"],
        ["send", "host:port"],
        ["send", "127.0.0.1:1", "--unix", "/tmp/x.sock"],
        ["recv", "--port", "-1"],
        ["proxy"],
        ["proxy", "--target", "nowhere"],
        ["proxy", "--target", "127.0.0.1:1", "--cut-every", "0"],
        ["proxy", "--target", "127.0.0.1:1", "--jitter", "2"],
        ["proxy", "--target", "127.0.0.1:1", "--listen", "x:y"],
        ["hub", "--fsync"],
        ["demo", "--frames", "0"],
        ["demo", "--cut-every", "fast"],
        ["bench", "--transport", "carrier-pigeon"],
        ["bench", "--json", "/nonexistent/dir/bench.json"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()  # one line, no usage
    assert error.startswith("python -m streamkit") and "error:" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["send", "nowhere"], "'nowhere' is not [HOST:]PORT"),
        (["serve", "--echo", "--codec", "protobuf"], "invalid choice: 'protobuf'"),
        (["hub", "--fsync"], "--fsync needs --data-dir"),
        (["demo", "--frames", "0"], "--frames"),
        (["proxy", "--target", "nowhere"], "'nowhere' is not [HOST:]PORT"),
        (["bench", "--json", "/nonexistent/dir/b.json"], "no such directory: /nonexistent/dir"),
    ],
)
def test_bad_arguments_in_a_real_process_give_no_traceback(argv: list[str], message: str) -> None:
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(f"python -m streamkit {argv[0]}: error: ") and message in error


def test_every_command_has_help() -> None:
    for command in ("demo", "serve", "send", "recv", "proxy", "hub", "bench"):
        result = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: python -m streamkit {command} ")
    overview = subprocess.run([*CLI, "--help"], capture_output=True, text=True).stdout
    assert all(command in overview for command in ("demo", "proxy", "bench", "serve", "hub"))


def test_commands_run_in_modules_get_every_argument_verbatim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        received.append(argv)
        return 7

    monkeypatch.setattr(bench, "main", fake_main, raising=False)
    assert main(["bench", "--json=x", "--", "-h", "--seed", "-1"]) == 7
    assert received == [["--json=x", "--", "-h", "--seed", "-1"]]


def test_ctrl_c_in_a_command_run_in_its_module_is_status_130(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "main", interrupted, raising=False)
    assert cli.main(["demo"]) == 130


def test_refused_connection_is_one_line_and_exit_1() -> None:
    with running("recv", "--port", "0", address_on="stderr") as (_, line):
        port = line.split()[2].rsplit(":", 1)[1]
    # The receiver is gone: its port now refuses connections.
    result = subprocess.run(
        [*CLI, "send", f"127.0.0.1:{port}"], input="x\n", capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"send: cannot connect to 127.0.0.1:{port}: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["send", "--unix", "{tmp}/none.sock"], "send: cannot connect to {tmp}/none.sock: "),
        (["send", "1", "--tls-ca", "{tmp}/ca.pem"], "send: cannot load --tls-ca {tmp}/ca.pem: "),
        (["recv", "--unix", "{tmp}/no/r.sock"], "recv: cannot listen on {tmp}/no/r.sock: "),
        (
            ["serve", "--echo", "--tls-cert", "{tmp}/c.pem", "--tls-key", "{tmp}/k.pem"],
            "serve: cannot load --tls-cert / --tls-key {tmp}/c.pem / {tmp}/k.pem: ",
        ),
    ],
)
def test_a_runtime_failure_names_its_file_or_address(
    argv: list[str], expected: str, tmp_path: Path
) -> None:
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = subprocess.run([*CLI, *argv], input="", capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(expected.replace("{tmp}", str(tmp_path)))
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("codec", "text", "expected"),
    [
        ("length4", "first\nsecond\n\nlast", "first\nsecond\n\nlast\n"),
        ("varint", "one\ntwo\n", "one\ntwo\n"),
        ("lines", "zeile ü\r\nzwei\n", "zeile ü\nzwei\n"),
        ("jsonl", '{"a": 1}\n["ü", 2]\n', '{"a": 1}\n["ü", 2]\n'),
    ],
)
def test_send_through_serve_echo(codec: str, text: str, expected: str) -> None:
    with running("serve", "--echo", "--port", "0", "--codec", codec) as (server, line):
        assert line.startswith("echo server on 127.0.0.1:")
        port = line.split()[3].rsplit(":", 1)[1]
        result = subprocess.run(
            [*CLI, "send", f"127.0.0.1:{port}", "--codec", codec],
            input=text,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected
        stop(server)


def test_send_raw_over_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    with running("serve", "--echo", "--unix", path) as (server, line):
        assert line == f"echo server on {path} (length4)"
        payload = "line one\nline two\n" * 1000
        result = subprocess.run(
            [*CLI, "send", "--unix", path, "--raw"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == payload + "\n"  # one frame, printed with a newline
        stop(server, signal.SIGINT)
    assert not Path(path).exists()  # the server removed its socket file


def test_send_over_tls_and_ipv6(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued = ca.issue_cert("::1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with running("serve", "--echo", "--host", "::1", "--port", "0", *tls) as (server, line):
        assert line.startswith("echo server on [::1]:") and line.endswith("(length4, TLS)")
        address = line.split()[3]
        result = subprocess.run(
            [*CLI, "send", address, "--tls-ca", str(ca_file)],
            input="secret\n",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "secret\n"
        # A certificate from a CA send does not trust: one line, status 1.
        stranger = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(stranger))
        result = subprocess.run(
            [*CLI, "send", address, "--tls-ca", str(stranger)],
            input="secret\n",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 1
        assert result.stderr.startswith("send: ") and "CERTIFICATE_VERIFY_FAILED" in result.stderr
        assert "Traceback" not in result.stderr
        stop(server)


def test_send_gives_up_on_a_silent_server_after_its_timeout(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never answers the TLS hello
        port = silent.getsockname()[1]
        result = subprocess.run(
            [*CLI, "send", f"127.0.0.1:{port}", "--tls-ca", str(ca_file), "--timeout", "0.2"],
            input="x\n",
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert result.returncode == 1
    assert result.stderr == f"send: no connection to 127.0.0.1:{port} within 0.2 s\n"


def test_stopping_serve_ends_a_connected_send_with_stdin_still_open() -> None:
    with running("serve", "--echo", "--port", "0", "--codec", "lines") as (server, line):
        port = line.split()[3].rsplit(":", 1)[1]
        client = subprocess.Popen(
            [*CLI, "send", f"127.0.0.1:{port}", "--codec", "lines"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write("still typing\n")
            client.stdin.flush()
            assert client.stdout.readline() == "still typing\n"
            stop(server)  # the server ends its side; send's stdin stays open
            assert client.wait(timeout=10) == 0
            assert client.stderr is not None and client.stderr.read() == ""
        finally:
            if client.poll() is None:
                client.kill()
            client.wait()
            for pipe in (client.stdin, client.stdout, client.stderr):
                if pipe is not None:
                    pipe.close()


def test_send_rejects_stdin_that_is_not_utf8_text() -> None:
    with running("serve", "--echo", "--port", "0", "--codec", "lines") as (server, line):
        port = line.split()[3].rsplit(":", 1)[1]
        result = subprocess.run(
            [*CLI, "send", f"127.0.0.1:{port}", "--codec", "lines"],
            input=b"ok\n\xff\n",
            capture_output=True,
            timeout=20,
        )
        assert result.returncode == 1
        assert result.stderr.decode().startswith("send: stdin is not UTF-8 text")
        stop(server)


def test_send_rejects_stdin_that_is_not_json() -> None:
    with running("serve", "--echo", "--port", "0", "--codec", "jsonl") as (server, line):
        port = line.split()[3].rsplit(":", 1)[1]
        result = subprocess.run(
            [*CLI, "send", f"127.0.0.1:{port}", "--codec", "jsonl"],
            input="{not json\n",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 1
        assert result.stderr.startswith("send: stdin is not JSON lines")
        stop(server)


def test_recv_prints_the_frames_of_one_connection() -> None:
    with running("recv", "--port", "0", address_on="stderr") as (receiver, line):
        port = int(line.split()[2].rsplit(":", 1)[1])

        async def send() -> None:
            async with connect("127.0.0.1", port, codec=LengthPrefixed()) as stream:
                await stream.send_many([b"alpha", b"", b"gamma"])

        asyncio.run(send())
        assert receiver.wait(timeout=10) == 0
        assert receiver.stdout is not None
        assert receiver.stdout.read() == "alpha\n\ngamma\n"


def test_recv_over_a_unix_socket_with_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "recv.sock")
    command = ("recv", "--unix", path, "--codec", "lines")
    with running(*command, address_on="stderr") as (receiver, line):
        assert line == f"receiving on {path} (lines)"

        async def send() -> None:
            async with connect_unix(path, codec=Lines()) as stream:
                await stream.send_many(["eins", "zwei ü"])

        asyncio.run(send())
        assert receiver.wait(timeout=10) == 0
        assert receiver.stdout is not None
        assert receiver.stdout.read() == "eins\nzwei ü\n"


def test_hub_command_serves_a_hub_with_a_data_dir(tmp_path: Path) -> None:
    with running("hub", "--port", "0", "--data-dir", str(tmp_path)) as (server, line):
        assert line.startswith("hub on 127.0.0.1:") and line.endswith(f"(logs in {tmp_path})")
        port = int(line.split()[2].rsplit(":", 1)[1])

        async def use() -> list[bytes]:
            async with hub.connect("127.0.0.1", port) as client:
                await client.create("cli")
                await client.append("cli", b"record")
                await client.finish("cli")
                return [record.data async for record in client.read("cli")]

        assert asyncio.run(use()) == [b"record"]
        stop(server)
    assert list(tmp_path.glob("*.log"))  # the stream is on disk


def test_proxy_command_forwards_until_interrupted() -> None:
    with running("serve", "--echo", "--port", "0") as (server, line):
        port = line.split()[3].rsplit(":", 1)[1]
        with running("proxy", "--target", f"127.0.0.1:{port}", "--seed", "1") as (proxy, line):
            assert line.startswith("proxy on 127.0.0.1:")
            assert line.endswith(f"-> 127.0.0.1:{port}")
            proxy_port = line.split()[2].rsplit(":", 1)[1]
            result = subprocess.run(
                [*CLI, "send", f"127.0.0.1:{proxy_port}"],
                input="via the proxy\n",
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert result.stdout == "via the proxy\n", result.stderr
            stop(proxy, signal.SIGINT)
        stop(server)


def test_demo_verifies_every_echo() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--frames", "3000", "--cut-every", "0.01", "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    summary = {
        key.strip(): value
        for key, value in (line.rsplit(None, 1) for line in result.stdout.splitlines())
    }
    assert summary["lost"] == "0"
    assert summary["in order, exactly once"] == "yes"
    assert summary["echoes received"] == "3000"
    assert int(summary["connections cut"]) >= 1


def test_bench_writes_json(tmp_path: Path) -> None:
    """The quick benchmark runs end to end (its numbers are not checked: timings vary)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [*CLI, "bench", "--transport", "unix", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    throughput = [row for row in rows if "ratio" in row]
    assert {row["payload"] for row in throughput} == {16, 256, 4096, 65536, 1048576}
    assert {row["framing"] for row in throughput} == {"length4", "lines"}
    assert all(row["ratio"] > 0 for row in throughput)
    assert "ratio" in result.stdout and "p50" in result.stdout


def test_bench_fails_in_one_line_when_a_benchmark_process_dies(tmp_path: Path) -> None:
    """A child that dies (here: an installed but broken uvloop) ends the run, never hangs it."""
    (tmp_path / "uvloop.py").write_text(
        "def new_event_loop():\n    raise RuntimeError('this uvloop is broken')\n"
    )
    result = subprocess.run(
        [*CLI, "bench", "--transport", "unix", "--payloads", "16"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "this uvloop is broken" in result.stderr  # the child's own traceback
    last = result.stderr.strip().splitlines()[-1]
    assert last == "bench: the benchmark's receiver process failed (exit status 1)"
    assert "asyncio" in result.stdout  # the rows measured before it failed


@pytest.mark.parametrize("command", ["serve", "hub"])
def test_server_commands_take_max_connections(command: str) -> None:
    args = ["serve", "--echo"] if command == "serve" else ["hub"]
    with running(*args, "--port", "0", "--max-connections", "1") as (server, line):
        port = int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])

        async def second_is_refused() -> bool:
            # The first connection holds the one place (a hub waits for its
            # session handshake), the second is closed at once.
            async with (
                connect("127.0.0.1", port, codec=LengthPrefixed()),
                connect("127.0.0.1", port, codec=LengthPrefixed()) as second,
            ):
                try:
                    await second.send(b"anyone?")
                    await second.recv(timeout=5)
                except (EndOfStream, ConnectionLost):
                    return True
                return False

        assert asyncio.run(second_is_refused())
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert server.stderr is not None
        assert "max_connections=1 are open" in server.stderr.read()
