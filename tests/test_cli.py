"""``python -m streamkit``: every command over real sockets, and bad arguments."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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
    cli,
    connect,
    connect_unix,
    demo,
    hub,
)
from streamkit import _bench as bench
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
        ["serve", "--newline", "crlf"],  # the line codecs only
        ["send", "1", "--hex", "--codec", "lines"],  # binary codecs only
        ["hub", "read"],  # a verb needs a stream's name
        ["hub", "read", "x", "--from", "-1"],
        ["hub", "append", "x", "--connect", "nowhere"],
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
        ["bench", "--repeat", "0"],
        ["bench", "--repeat", "many"],
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


def test_bench_repeat_ends_with_the_rows_over_the_passes(tmp_path: Path) -> None:
    """--repeat 2: both passes' rows, then one summary row each, in the output and the JSON."""
    out = tmp_path / "bench.json"
    args = ["--transport", "unix", "--payloads", "16", "--repeat", "2", "--json", str(out)]
    result = subprocess.run(
        [*CLI, "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert len(results["passes"]) == 2
    assert len(results["rows"]) == len(results["passes"][0])
    for row in results["rows"]:
        ratio = "ratio" if "ratio" in row else "p50_ratio"
        assert row["passes"] == 2
        assert row[f"{ratio}_low"] <= row[ratio] <= row[f"{ratio}_high"]
    assert "-- pass 2 of 2" in result.stdout and "over the 2 passes" in result.stdout


def test_bench_rows_over_passes_give_the_ratios_median_and_range() -> None:
    """--repeat N: a row over the passes has each number's median, the ratio's median and range."""
    passes = [
        {"payload": 65536, "frames": 384, "naive_mb_per_s": mb, "ratio": ratio}
        for mb, ratio in ((300.0, 3.1), (900.0, 1.1), (700.0, 1.4))
    ]
    row = bench._over_passes(passes)
    assert row == {
        "passes": 3,
        "payload": 65536,
        "frames": 384,
        "naive_mb_per_s": 700.0,
        "ratio": 1.4,
        "ratio_low": 1.1,
        "ratio_high": 3.1,
    }
    echo = bench._over_passes([{"p50_ratio": 1.2}, {"p50_ratio": 0.9}])
    assert (echo["p50_ratio"], echo["p50_ratio_low"], echo["p50_ratio_high"]) == (1.05, 0.9, 1.2)
    assert str(bench.spread([1.0, 2.0, 4.0])) == "2.00x (1.00-4.00)"


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


# -- what a user reaches for first ------------------------------------------------


def test_version_and_the_console_scripts_own_name() -> None:
    from streamkit import __version__

    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout) == (0, f"streamkit {__version__}\n")
    script = Path(sys.executable).with_name("streamkit")
    if not script.exists():
        pytest.skip("the streamkit console script is not installed next to this Python")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout) == (0, f"streamkit {__version__}\n")
    result = subprocess.run([script, "serve", "--help"], capture_output=True, text=True)
    assert result.stdout.startswith("usage: streamkit serve ")
    result = subprocess.run([script, "demo", "--frames", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("streamkit demo: error: ")


def port_of(line: str) -> str:
    """The port in a server's first line ("echo server on 127.0.0.1:PORT (...)")."""
    return next(word for word in line.split() if ":" in word).rsplit(":", 1)[1]


def send(*args: str, input: str | bytes = "1\n") -> subprocess.CompletedProcess[str]:
    data = input.encode() if isinstance(input, str) else input
    result = subprocess.run([*CLI, "send", *args], input=data, capture_output=True, timeout=30)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def test_serve_echoes_without_the_echo_flag() -> None:
    with running("serve", "--port", "0", "--codec", "lines") as (server, line):
        result = send(f"127.0.0.1:{port_of(line)}", "--codec", "lines", input="no flag\n")
        assert (result.returncode, result.stdout) == (0, "no flag\n"), result.stderr
        stop(server)


@contextmanager
def fake_server(answer: bytes, *, read_first: bool) -> Iterator[int]:
    """A TCP server answering each connection with ``answer`` bytes, then closing it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed: the test is over
            with conn:
                if read_first:
                    conn.recv(1024)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone may not)
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("answer", "codec", "expected"),
    [
        (b"SKSP\x02" + b"\x80" * 16, "length4", "look like the streamkit session protocol"),
        (b"SKSP\x02" + b"\x80" * 16, "lines", "look like the streamkit session protocol"),
        (b"\x15\x03\x03\x00\x02\x02\x46", "length4", "look like a TLS alert"),
        (b"\x15\x03\x03\x00\x02\x02\x46", "jsonl", "look like a TLS alert"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "varint", "look like HTTP"),
    ],
)
def test_send_says_what_a_peer_of_another_protocol_answered(
    answer: bytes, codec: str, expected: str
) -> None:
    with fake_server(answer, read_first=True) as port:
        result = send(f"127.0.0.1:{port}", "--codec", codec)
    assert result.returncode == 1
    [message] = result.stderr.splitlines()
    assert message.startswith(f"send: 127.0.0.1:{port} ") and expected in message, message
    assert result.stdout == ""


def test_send_says_a_server_closed_without_answering(tmp_path: Path) -> None:
    hint = "without answering 1 frame: it may speak another protocol"
    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    servers = [
        ("serve", "--port", "0"),  # lines into a length4 server, below
        ("serve", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)),
        ("hub", "--port", "0"),
    ]
    for argv, codec in zip(servers, ["lines", "length4", "length4"], strict=True):
        with running(*argv) as (server, line):
            address = f"127.0.0.1:{port_of(line)}"
            result = send(address, "--codec", codec)
            assert result.returncode == 1, (argv, result)
            assert result.stderr.startswith(f"send: {address} closed the connection {hint}")
            assert len(result.stderr.splitlines()) == 1
            stop(server)


def test_tls_send_to_a_plain_server_says_why(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    with running("serve", "--port", "0") as (server, line):
        address = f"127.0.0.1:{port_of(line)}"
        result = send(address, "--tls-ca", str(ca_file))
        assert result.returncode == 1
        assert result.stderr == (
            f"send: cannot connect to {address}: the TLS handshake failed "
            "(ConnectionResetError): the server may not use TLS on this port\n"
        )
        stop(server)


def test_send_no_reply_to_recv_and_recv_hex() -> None:
    with running("recv", "--port", "0", "--hex", address_on="stderr") as (receiver, line):
        result = send(f"127.0.0.1:{port_of(line)}", "--no-reply", input=b"\x00\xff\nab\n")
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert receiver.wait(timeout=10) == 0
        assert receiver.stdout is not None and receiver.stdout.read() == "00ff\n6162\n"
    # Without --no-reply, a server that says nothing is reported.
    with running("recv", "--port", "0", address_on="stderr") as (receiver, line):
        result = send(f"127.0.0.1:{port_of(line)}")
        assert result.returncode == 1 and "or never answer (then use --no-reply)" in result.stderr
        assert receiver.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("codec", "stdin", "returncode", "output"),
    [
        ("lines", "one line ü\n", 0, "one line ü\n"),
        ("lines", "two\nlines\n", 1, "send: with --codec lines a frame is one line"),
        ("jsonl", '{\n  "a": [1,\n 2]\n}\n', 0, '{"a": [1, 2]}\n'),
        ("jsonl", "{not json", 1, "send: stdin is not JSON lines"),
    ],
)
def test_send_raw_with_the_line_codecs(
    codec: str, stdin: str, returncode: int, output: str
) -> None:
    with running("serve", "--port", "0", "--codec", codec) as (server, line):
        result = send(f"127.0.0.1:{port_of(line)}", "--codec", codec, "--raw", input=stdin)
        assert result.returncode == returncode, result.stderr
        assert (result.stdout if returncode == 0 else result.stderr).startswith(output)
        assert "Traceback" not in result.stderr
        stop(server)


def test_send_refuses_a_line_over_max_frame_before_buffering_more() -> None:
    with running("serve", "--port", "0", "--codec", "lines") as (server, line):
        result = send(f"127.0.0.1:{port_of(line)}", "--codec", "lines", input="x" * 200_000)
        assert result.returncode == 1
        assert result.stderr == (
            "send: line 1 of stdin is over 65536 bytes, the most one frame or record holds\n"
        )
        stop(server)


def exchange(port: str, data: bytes) -> bytes:
    """Send ``data`` to a server, half-close, and return all it answers."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_echo_server_skips_invalid_text_and_warns_once_per_peer() -> None:
    with running("serve", "--port", "0", "--codec", "lines") as (server, line):
        port = port_of(line)
        # Invalid UTF-8 skips that line only; a last line without "\n" ends it.
        assert exchange(port, b"ok\n\xff\nstill\n\xfe\nlast") == b"ok\nstill\n"
        assert exchange(port, b"fine\n") == b"fine\n"  # a good peer: no warning
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert server.stderr is not None
        log = server.stderr.read()
    warnings = [entry for entry in log.splitlines() if " WARNING " in entry]
    assert len(warnings) == 1, log
    assert "sent a frame --codec lines cannot read, skipped: invalid utf-8 in line 2" in warnings[0]
    assert "Traceback" not in log


def test_echo_server_gives_a_wrong_codec_one_warning_and_the_traceback_at_debug() -> None:
    for debug in ([], ["--debug"]):
        with running("serve", "--port", "0", *debug) as (server, line):
            assert exchange(port_of(line), b"hello\n") == b""  # lines into length4
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
            assert server.stderr is not None
            log = server.stderr.read()
        [warning] = [entry for entry in log.splitlines() if " WARNING " in entry]
        assert "closing the connection from" in warning and "b'hell' looks like text" in warning
        assert ("Traceback" in log) == bool(debug)


def test_newline_crlf_for_twisted_line_receivers() -> None:
    command = ("serve", "--port", "0", "--codec", "lines", "--newline", "crlf")
    with running(*command) as (server, line):
        assert exchange(port_of(line), b"hi\nthere\r\n") == b"hi\r\nthere\r\n"
        stop(server)


def test_send_writes_crlf_with_newline_crlf() -> None:
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def take() -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(1024):
                received.append(chunk)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    with listener:
        port = listener.getsockname()[1]
        args = ["--codec", "lines", "--newline", "crlf", "--no-reply"]
        result = send(f"127.0.0.1:{port}", *args, input="a\nb\n")
        thread.join(timeout=10)
    assert result.returncode == 0, result.stderr
    assert b"".join(received) == b"a\r\nb\r\n"


def test_recv_exits_0_on_sigterm_with_or_without_a_connection() -> None:
    with running("recv", "--port", "0", address_on="stderr") as (receiver, _):
        stop(receiver)
    with (
        running("recv", "--port", "0", address_on="stderr") as (receiver, line),
        socket.create_connection(("127.0.0.1", int(port_of(line)))) as sock,
    ):
        sock.sendall(b"\x00\x00\x00\x02hi")
        assert receiver.stdout is not None
        assert receiver.stdout.readline() == "hi\n"
        stop(receiver)


def test_a_bad_key_file_says_what_it_must_hold(tmp_path: Path) -> None:
    cert, bad = tmp_path / "cert.pem", tmp_path / "bad.pem"
    trustme.CA().issue_cert("localhost").cert_chain_pems[0].write_to_path(str(cert))
    bad.write_text("not a key\n")
    result = subprocess.run(
        [*CLI, "serve", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(bad)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    [message] = result.stderr.splitlines()
    assert message.startswith(
        f"serve: cannot load --tls-cert / --tls-key {cert} / {bad}: "
        "not a PEM certificate and the private key that matches it ([SSL] PEM lib"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "{port}"],
        ["recv", "--port", "{port}"],
        ["hub", "--port", "{port}"],
        ["proxy", "--listen", "{port}", "--target", "127.0.0.1:1"],
    ],
)
def test_every_server_words_a_busy_port_the_same(argv: list[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = [arg.replace("{port}", str(port)) for arg in argv]
        result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"{argv[0]}: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def hub_cli(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "hub", *args], input=input, capture_output=True, text=True, timeout=30
    )


def test_hub_verbs_from_the_shell(tmp_path: Path) -> None:
    with running("hub", "serve", "--port", "0") as (server, line):
        hub_at = ["--connect", f"127.0.0.1:{port_of(line)}"]
        created = hub_cli("create", "events", "--content-type", "text/plain", *hub_at)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["state"] == "open"
        assert hub_cli("create", "events", *hub_at).stderr == "hub create: stream 'events' exists\n"
        assert hub_cli("create", "events", "--exist-ok", *hub_at).returncode == 0

        appended = hub_cli("append", "events", *hub_at, input="one\r\ntwo\nthree")
        assert appended.stdout == "appended 3 records to 'events' at offsets 0-2\n"
        raw = hub_cli("append", "events", "--raw", *hub_at, input="four\nlines")
        assert raw.stdout == "appended 1 record to 'events' at offset 3\n"

        follow = ("read", "events", "--from", "2", "--follow", "--offsets", *hub_at)
        with running("hub", *follow) as (follower, first):
            assert follower.stdout is not None
            assert [first, follower.stdout.readline(), follower.stdout.readline()] == [
                "2\tthree",
                "3\tfour\n",
                "lines\n",
            ]
            hub_cli("append", "events", *hub_at, input="live\n")
            assert follower.stdout.readline() == "4\tlive\n"
            finished = hub_cli("finish", "events", *hub_at)
            assert json.loads(finished.stdout)["state"] == "finished"
            assert follower.wait(timeout=10) == 0  # a finished stream ends the follow

        read = hub_cli("read", "events", "--from", "1", *hub_at)
        assert read.stdout == "two\nthree\nfour\nlines\nlive\n"
        status = json.loads(hub_cli("status", "events", *hub_at).stdout)
        assert (status["name"], status["next_offset"], status["content_type"]) == (
            "events",
            5,
            "text/plain",
        )
        assert hub_cli("delete", "events", *hub_at).returncode == 0
        for verb in ("status", "read", "delete", "finish", "append"):
            missing = hub_cli(verb, "events", *hub_at, input="x\n")
            assert missing.returncode == 3, (verb, missing)
            assert missing.stderr == (
                f"hub {verb}: no stream named 'events' (on the hub at {hub_at[1]})\n"
            )
        stop(server)
    unreachable = hub_cli("status", "events", *hub_at)
    assert unreachable.returncode == 1
    assert unreachable.stderr == (
        f"hub status: cannot connect to the hub at {hub_at[1]}: Connection refused\n"
    )


def test_hub_verbs_over_a_unix_socket_and_follow_stops_on_sigterm(tmp_path: Path) -> None:
    path = str(tmp_path / "hub.sock")
    with running("hub", "--unix", path) as (server, _):
        assert hub_cli("create", "s", "--unix", path).returncode == 0
        assert hub_cli("append", "s", "--unix", path, input="old\n").returncode == 0
        now = hub_cli("read", "s", "--from", "now", "--unix", path)
        assert (now.returncode, now.stdout) == (0, "")  # nothing after now, and no --follow
        follow = ("read", "s", "--from", "0", "--follow", "--unix", path)
        with running("hub", *follow) as (follower, first):
            assert first == "old"
            hub_cli("append", "s", "--unix", path, input="new\n")
            assert follower.stdout is not None and follower.stdout.readline() == "new\n"
            stop(follower)  # Ctrl-C or SIGTERM ends a --follow with status 0
        stop(server)
