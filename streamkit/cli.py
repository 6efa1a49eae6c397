"""The ``python -m streamkit`` command line.

- ``demo``: a resumable echo session through a proxy that keeps cutting it;
- ``serve --echo``: a framed echo server (TCP, Unix socket, TLS);
- ``send`` / ``recv``: a framed netcat (stdin and stdout through frames);
- ``proxy``: the fault-injecting proxy of :mod:`streamkit.testing`;
- ``hub``: a hub of named streams;
- ``bench``: the framed-stream benchmark, quickly.

Bad arguments print a one-line error and exit with status 2; a runtime
failure (say, a refused connection) prints one line and exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from streamkit import _args
from streamkit.codecs import Codec, JsonLines, LengthPrefixed, Lines, VarintPrefixed
from streamkit.errors import EndOfStream, StreamkitError
from streamkit.net import Server, connect, connect_unix, serve, serve_unix
from streamkit.stream import FramedStream

__all__ = ["main"]

logger = logging.getLogger("streamkit")

_CODECS: dict[str, Callable[[], Codec[Any]]] = {
    "length4": LengthPrefixed,
    "varint": VarintPrefixed,
    "lines": Lines,
    "jsonl": JsonLines,
}

#: Commands whose module has the command line: ``python -m streamkit NAME ARGS``
#: runs ``main(ARGS)`` of that module, so each keeps its flags and --help in one place.
_DELEGATED: dict[str, tuple[str, str]] = {
    "demo": ("streamkit.demo", "a resumable echo session through a proxy that keeps cutting it"),
    "proxy": ("streamkit.testing", "a fault-injecting TCP proxy"),
    "bench": ("streamkit.bench", "the framed-stream benchmark, quickly"),
}


#: Bytes read from stdin at a time by ``send``.
_STDIN_CHUNK = 64 * 1024


class _Failed(Exception):
    """A runtime failure to report in one line (exit status 1)."""


def _tls_context(purpose: ssl.Purpose, what: str, *files: str) -> ssl.SSLContext:
    """A TLS context; a missing or bad file is a one-line failure naming it."""
    try:
        if purpose is ssl.Purpose.SERVER_AUTH:
            return ssl.create_default_context(cafile=files[0])
        context = ssl.create_default_context(purpose)
        context.load_cert_chain(*files)
        return context
    except (OSError, ssl.SSLError) as exc:
        raise _Failed(f"cannot load {what} {' / '.join(files)}: {exc.strerror or exc}") from exc


# -- argument types -------------------------------------------------------------


def _add_listen(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=_args.port, default=port, help=f"TCP port ({port}; 0: any)")
    where.add_argument("--unix", metavar="PATH", help="a Unix socket instead of TCP")


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-connections",
        type=_args.count,
        metavar="N",
        help="refuse connections past N open ones (default: what the open-file limit allows)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_args.positive,
        default=10.0,
        metavar="SECONDS",
        help="drop a connection whose TLS (or session) handshake takes longer (10 s)",
    )


def _add_codec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--codec",
        choices=sorted(_CODECS),
        default="length4",
        help="framing: 4-byte length prefix, varint prefix, text lines, JSON lines (length4)",
    )


def _build_parser() -> tuple[_args.Parser, dict[str, _args.Parser]]:
    """The parser, and each command's own (its errors name the command)."""
    parser = _args.Parser(
        prog="python -m streamkit",
        description="streamkit: framed stream protocols over TCP and Unix sockets.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    for name, (_, summary) in _DELEGATED.items():
        # Listed here for the overview only: main() hands everything after the
        # command name to the module's own parser, --help included.
        commands.add_parser(name, help=summary, add_help=False)

    server = commands.add_parser(
        "serve",
        help="run a framed echo server",
        description="A framed echo server: every frame that comes in goes back out. Prints "
        "its address (with the real port when --port is 0), logs each connection, and runs "
        "until Ctrl-C or SIGTERM; then it stops accepting, ends each connection's sending "
        "side and gives open connections up to 5 s to close (Ctrl-C again: at once).",
    )
    server.add_argument("--echo", action="store_true", required=True, help="echo every frame")
    _add_listen(server, 8765)
    _add_codec(server)
    server.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate")
    server.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    _add_limits(server)

    send = commands.add_parser(
        "send",
        help="send stdin as frames, print the frames that come back",
        description="Send stdin as frames and print every frame received, one per line, "
        "until the server ends the stream. Each input line is one frame (without its "
        "newline; with --codec jsonl, one JSON value); with --raw all of stdin is one frame. "
        "At the end of stdin, send half-closes the connection, so an echo server's echoes "
        "all arrive before it ends.",
    )
    where = send.add_mutually_exclusive_group(required=True)
    where.add_argument("address", nargs="?", type=_args.address, help="HOST:PORT")
    where.add_argument("--unix", metavar="PATH", help="a Unix socket instead of TCP")
    _add_codec(send)
    send.add_argument("--raw", action="store_true", help="all of stdin as one frame")
    send.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this CA certificate")
    send.add_argument("--timeout", type=_args.positive, default=10.0, help="connect timeout (10 s)")
    send.add_argument(
        "--idle",
        type=_args.positive,
        default=1.0,
        metavar="SECONDS",
        help="with TLS, which cannot half-close: once stdin has ended, stop after this long "
        "without a frame (1 s)",
    )

    recv = commands.add_parser(
        "recv",
        help="accept one connection and print its frames, one per line",
        description="Accept one connection, write each frame it sends to stdout, one per "
        "line, and exit when it ends. The address goes to stderr, so stdout is only frames.",
    )
    _add_listen(recv, 8765)
    _add_codec(recv)

    hub = commands.add_parser(
        "hub",
        help="run a hub of named append-only streams",
        description="A hub of named, append-only streams (see streamkit.hub), in memory or "
        "in logs under --data-dir. Prints its address; runs until Ctrl-C or SIGTERM.",
    )
    _add_listen(hub, 8766)
    hub.add_argument("--data-dir", metavar="DIR", help="keep streams in logs under DIR")
    hub.add_argument("--fsync", action="store_true", help="fsync each append (with --data-dir)")
    _add_limits(hub)

    return parser, commands.choices


# -- running until stopped --------------------------------------------------------


async def _until_stopped(closer: Callable[[], Awaitable[None]]) -> None:
    """Wait for SIGINT or SIGTERM, then run ``closer``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    await closer()


def _print_frame(codec_name: str, frame: Any) -> None:
    """Write one frame to stdout, one line each."""
    try:
        if codec_name == "jsonl":
            print(json.dumps(frame, ensure_ascii=False), flush=True)
        elif codec_name == "lines":
            print(frame, flush=True)
        else:
            sys.stdout.buffer.write(bytes(frame) + b"\n")
            sys.stdout.buffer.flush()
    except BrokenPipeError as exc:  # say, | head: stop, and spare the exit its flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise _Failed("stdout was closed") from exc


# -- commands -------------------------------------------------------------------


async def _listen(
    args: argparse.Namespace,
    handler: Callable[[FramedStream[Any]], Awaitable[None]],
    codec: Codec[Any],
    context: ssl.SSLContext | None,
    **limits: Any,
) -> tuple[Server[Any], str]:
    """Serve on ``--unix`` or ``--host``/``--port``: the server and its address."""
    where = args.unix or _args.host_port(args.host, args.port)
    try:
        if args.unix:
            return await serve_unix(handler, args.unix, codec=codec, ssl=context, **limits), where
        server = await serve(handler, args.host, args.port, codec=codec, ssl=context, **limits)
    except OSError as exc:  # name the address: the OS error may not
        raise _Failed(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return server, _args.host_port(args.host, server.port)


async def _serve_echo(args: argparse.Namespace) -> None:
    codec = _CODECS[args.codec]()
    context = None
    if args.tls_cert:
        context = _tls_context(
            ssl.Purpose.CLIENT_AUTH, "--tls-cert / --tls-key", args.tls_cert, args.tls_key
        )

    streams: set[FramedStream[Any]] = set()
    stopping = False

    async def echo(stream: FramedStream[Any]) -> None:
        logger.info("connection from %s", stream.peername)
        streams.add(stream)
        try:
            async for frame in stream:
                if stopping:
                    break  # our side has ended: frames after that are not echoed
                await stream.send(frame)
            stream.write_eof()
        finally:
            streams.discard(stream)

    server, where = await _listen(
        args,
        echo,
        codec,
        context,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
    )
    print(f"echo server on {where} ({args.codec}{', TLS' if context else ''})", flush=True)

    async def close() -> None:
        nonlocal stopping
        stopping = True
        server.close()
        # End each connection's sending side: a client such as send sees the end,
        # closes, and its handler finishes well within the grace period.
        for stream in streams:
            stream.write_eof()
        await server.wait_closed()

    await _until_stopped(close)


def _read_stdin(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue[bytes | OSError]) -> None:
    """Thread body: put stdin's bytes on ``chunks``, then ``b""`` at its end (or the error).

    A daemon thread rather than ``asyncio.to_thread``: when the peer ends the
    stream first, ``send`` exits even though this read is still blocked on
    stdin. It reads the file descriptor, not ``sys.stdin``, so that it holds
    no lock the interpreter needs at exit.
    """
    try:
        while True:
            try:
                chunk: bytes | OSError = os.read(0, _STDIN_CHUNK)
            except OSError as exc:
                chunk = exc
            # Waiting for the put makes a slow connection slow the reading down.
            asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
            if not chunk or isinstance(chunk, OSError):
                return
    except (RuntimeError, concurrent.futures.CancelledError):
        return  # the event loop has ended: send is exiting


def _stdin_frame(codec_name: str, line: bytes) -> Any:
    line = line.removesuffix(b"\r")
    if codec_name == "lines":
        try:
            return line.decode()
        except UnicodeDecodeError as exc:
            raise _Failed(f"stdin is not UTF-8 text: {exc}") from exc
    if codec_name == "jsonl":
        try:
            return json.loads(line)
        except ValueError as exc:
            raise _Failed(f"stdin is not JSON lines: {exc}") from exc
    return line


async def _stdin_frames(args: argparse.Namespace) -> AsyncIterator[list[Any]]:
    """Batches of frames from stdin: one per line, or all of it as one with ``--raw``."""
    chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=4)
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_stdin, args=(loop, chunks), name="stdin", daemon=True).start()
    pending = b""
    while chunk := await chunks.get():
        if isinstance(chunk, OSError):
            raise _Failed(f"cannot read stdin: {chunk}") from chunk
        pending += chunk
        if not args.raw and b"\n" in pending:
            *lines, pending = pending.split(b"\n")
            yield [_stdin_frame(args.codec, line) for line in lines]
    if pending:
        yield [pending if args.raw else _stdin_frame(args.codec, pending)]


async def _send(args: argparse.Namespace) -> None:
    codec = _CODECS[args.codec]()
    context = None
    if args.tls_ca:
        context = _tls_context(ssl.Purpose.SERVER_AUTH, "--tls-ca", args.tls_ca)
    if args.unix:
        opening = connect_unix(args.unix, codec=codec, ssl=context, timeout=args.timeout)
        where = args.unix
    else:
        opening = connect(*args.address, codec=codec, ssl=context, timeout=args.timeout)
        where = _args.host_port(*args.address)
    try:
        stream = await opening
    except TimeoutError as exc:  # it says nothing itself
        raise _Failed(f"no connection to {where} within {args.timeout:g} s") from exc
    except OSError as exc:  # name the address: the OS error may not
        raise _Failed(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    async with stream:
        # TLS cannot half-close: there the end of stdin cannot reach the
        # server, so send stops when no frame has come back for --idle.
        idle = None if stream.writer.can_write_eof() else args.idle
        stdin_sent = asyncio.Event()

        async def send_stdin() -> None:
            async for frames in _stdin_frames(args):
                await stream.send_many(frames)
            await stream.drain()
            stream.write_eof()
            stdin_sent.set()

        async def print_received() -> None:
            while True:
                try:
                    frame = await stream.recv(timeout=idle)
                except EndOfStream:
                    return
                except TimeoutError:
                    if stdin_sent.is_set():
                        return
                    continue
                _print_frame(args.codec, frame)

        try:
            async with asyncio.TaskGroup() as tasks:  # either failing stops both
                sending = tasks.create_task(send_stdin())
                await print_received()
                sending.cancel()  # the server ended the stream: nothing more to say
        except ExceptionGroup as group:
            raise group.exceptions[0] from None


async def _recv(args: argparse.Namespace) -> None:
    codec = _CODECS[args.codec]()
    done = asyncio.get_running_loop().create_future()
    accepted = False

    async def receive(stream: FramedStream[Any]) -> None:
        nonlocal accepted
        if accepted:
            return  # only the first connection: a second one is closed at once
        accepted = True
        logger.info("connection from %s", stream.peername)
        try:
            async for frame in stream:
                _print_frame(args.codec, frame)
        except Exception as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)

    server, where = await _listen(args, receive, codec, None)
    print(f"receiving on {where} ({args.codec})", file=sys.stderr, flush=True)
    async with server:
        await done


async def _hub(args: argparse.Namespace) -> None:
    from streamkit import hub

    options = {
        "data_dir": args.data_dir,
        "fsync": args.fsync,
        "max_connections": args.max_connections,
        "handshake_timeout": args.handshake_timeout,
    }
    if args.unix:
        server = await hub.serve_hub_unix(args.unix, **options)
        where = args.unix
    else:
        server = await hub.serve_hub(args.host, args.port, **options)
        where = _args.host_port(args.host, server.port)
    storage = f"logs in {args.data_dir}" if args.data_dir else "in memory"
    print(f"hub on {where} ({storage})", flush=True)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    await _until_stopped(close)


def _check(args: argparse.Namespace) -> str | None:
    """Argument rules argparse cannot express: the error, if any (then status 2)."""
    if args.command == "serve" and bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.command == "hub" and args.fsync and not args.data_dir:
        return "--fsync needs --data-dir"
    return None


# -- commands run by their own modules ---------------------------------------------


def _delegate(command: str, argv: list[str]) -> int:
    """Run ``main(argv)`` of the command's module (lazily imported: only what runs loads)."""
    module_main: Callable[[list[str]], int] = importlib.import_module(_DELEGATED[command][0]).main
    try:
        return module_main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command finished: no traceback
        return 130


# -- the entry point --------------------------------------------------------------


def _run_async(
    command: str,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    args: argparse.Namespace,
) -> int:
    """Run a command's coroutine; a runtime failure is one line on stderr and status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(args))
    except (OSError, StreamkitError, _Failed) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        # Verbatim: argparse cannot pass on options it does not know as a remainder.
        return _delegate(argv[0], argv[1:])
    parser, command_parsers = _build_parser()
    args = parser.parse_args(argv)
    if error := _check(args):
        command_parsers[args.command].error(error)
    commands: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
        "serve": _serve_echo,
        "send": _send,
        "recv": _recv,
        "hub": _hub,
    }
    return _run_async(args.command, commands[args.command], args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
