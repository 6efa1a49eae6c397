"""The ``python -m streamkit`` command line (also installed as ``streamkit``).

- ``demo``: a resumable echo session through a proxy that keeps cutting it;
- ``serve``: a framed echo server (TCP, Unix socket, TLS);
- ``send`` / ``recv``: a framed netcat (stdin and stdout through frames);
- ``proxy``: the fault-injecting proxy of :mod:`streamkit.testing`;
- ``hub``: a hub of named streams, and ``hub VERB`` to use one from the shell
  (:mod:`streamkit._hub_cli`);
- ``bench``: the framed-stream benchmark, quickly.

Bad arguments print a one-line error and exit with status 2; a runtime
failure (say, a refused connection) prints one line and exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any

from streamkit import __version__, _args
from streamkit.codecs import (
    Buffer,
    Codec,
    Decoder,
    JsonLines,
    LengthPrefixed,
    Lines,
    VarintPrefixed,
)
from streamkit.errors import (
    ConnectionLost,
    DecodeError,
    EndOfStream,
    IncompleteFrame,
    ProtocolError,
    StreamkitError,
)
from streamkit.net import Server, connect, connect_unix, serve, serve_unix
from streamkit.session.protocol import guess_protocol
from streamkit.stream import FramedStream

__all__ = ["main"]

logger = logging.getLogger("streamkit")

#: The codecs of ``--codec``; the line codecs take ``--newline``.
_CODECS = ("length4", "varint", "lines", "jsonl")
_BINARY = ("length4", "varint")
_NEWLINES = {"lf": "\n", "crlf": "\r\n"}

#: Commands whose module has the command line: ``python -m streamkit NAME ARGS``
#: runs ``main(ARGS)`` of that module, so each keeps its flags and --help in one place.
_DELEGATED: dict[str, tuple[str, str]] = {
    "demo": ("streamkit.demo", "a resumable echo session through a proxy that keeps cutting it"),
    "proxy": ("streamkit.testing", "a fault-injecting TCP proxy"),
    "bench": ("streamkit._bench", "the framed-stream benchmark, quickly"),
}

#: ``python -m streamkit hub VERB ...`` uses a hub (streamkit._hub_cli);
#: ``hub`` alone, or ``hub serve``, runs one.
_HUB_VERBS = ("create", "append", "read", "status", "finish", "delete")

#: Bytes read from stdin at a time by ``send`` and ``hub append``.
_STDIN_CHUNK = 64 * 1024
#: How many of the peer's first bytes ``send`` keeps to say what it speaks.
_SNIFF = 32


class _Failed(Exception):
    """A runtime failure to report in one line (exit status 1, unless ``status`` says)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _make_codec(args: argparse.Namespace) -> Codec[Any]:
    """The codec of ``--codec`` (and ``--newline`` for the line codecs)."""
    newline = _NEWLINES[args.newline]
    if args.codec == "lines":
        return Lines(newline=newline)
    if args.codec == "jsonl":
        return JsonLines(newline=newline)
    return LengthPrefixed() if args.codec == "length4" else VarintPrefixed()


def _tls_context(purpose: ssl.Purpose, what: str, *files: str) -> ssl.SSLContext:
    """A TLS context; a missing or bad file is a one-line failure naming it."""
    try:
        if purpose is ssl.Purpose.SERVER_AUTH:
            return ssl.create_default_context(cafile=files[0])
        context = ssl.create_default_context(purpose)
        context.load_cert_chain(*files)
        return context
    except ssl.SSLError as exc:
        # "[SSL] PEM lib" says nothing to most users: say what a file must hold.
        needs = (
            "a PEM CA certificate"
            if purpose is ssl.Purpose.SERVER_AUTH
            else "a PEM certificate and the private key that matches it"
        )
        raise _Failed(f"cannot load {what} {' / '.join(files)}: not {needs} ({exc})") from exc
    except OSError as exc:
        raise _Failed(f"cannot load {what} {' / '.join(files)}: {_args.os_reason(exc)}") from exc


def _connect_reason(exc: OSError, tls: bool) -> str:
    """Why connecting failed, in the same words for every command."""
    broken = isinstance(exc, ssl.SSLError | ConnectionResetError | ConnectionAbortedError)
    if tls and broken and not isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the TLS handshake failed ({type(exc).__name__}): "
            "the server may not use TLS on this port"
        )
    return _args.os_reason(exc)


# -- argument types -------------------------------------------------------------


def _add_listen(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=_args.port, default=port, help=f"TCP port ({port}; 0: any)")
    where.add_argument("--unix", metavar="PATH", help="a Unix socket instead of TCP")


def _add_codec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--codec",
        choices=_CODECS,
        default="length4",
        help="framing: 4-byte length prefix, varint prefix, text lines, JSON lines (length4)",
    )
    parser.add_argument(
        "--newline",
        choices=sorted(_NEWLINES),
        default="lf",
        help="line ending the line codecs write: lf, or crlf for peers such as Twisted's "
        "LineReceiver; both are read either way (lf)",
    )


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


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hex", action="store_true", help="print each frame in hex (length4 and varint)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="log at DEBUG, with the tracebacks of peer errors"
    )


def _build_parser() -> tuple[_args.Parser, dict[str, _args.Parser]]:
    """The parser, and each command's own (its errors name the command)."""
    parser = _args.Parser(
        prog="python -m streamkit",
        description="streamkit: framed stream protocols over TCP and Unix sockets.",
    )
    parser.add_argument("--version", action="version", version=f"streamkit {__version__}")
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
        "side and gives open connections up to 5 s to close (Ctrl-C again: at once). A peer "
        "that sends what the codec refuses is logged in one WARNING line (the traceback with "
        "--debug); a line that is not valid text is skipped, and the connection goes on.",
    )
    server.add_argument(
        "--echo",
        action="store_true",
        help="echo every frame: what serve does (the flag is accepted for older scripts)",
    )
    _add_listen(server, 8765)
    _add_limits(server)
    _add_codec(server)
    server.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate")
    server.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    server.add_argument(
        "--debug", action="store_true", help="log at DEBUG, with the tracebacks of peer errors"
    )

    send = commands.add_parser(
        "send",
        help="send stdin as frames, print the frames that come back",
        description="Send stdin as frames and print every frame received, one per line, "
        "until the server ends the stream. Each input line is one frame (without its "
        "newline; with --codec jsonl, one JSON value); with --raw all of stdin is one frame. "
        "At the end of stdin, send half-closes the connection, so an echo server's echoes "
        "all arrive before it ends. A server that closes without answering, or answers in "
        "another protocol (TLS, a session or hub, another codec), is one line on stderr and "
        "exit status 1.",
    )
    where = send.add_mutually_exclusive_group(required=True)
    where.add_argument("address", nargs="?", type=_args.address, help="HOST:PORT")
    where.add_argument("--unix", metavar="PATH", help="a Unix socket instead of TCP")
    _add_codec(send)
    send.add_argument(
        "--raw",
        action="store_true",
        help="all of stdin as one frame (with --codec lines: one line, its final newline "
        "dropped; with --codec jsonl: one JSON value, which may span lines)",
    )
    send.add_argument(
        "--no-reply",
        action="store_true",
        help="the server is not expected to answer (a sink such as recv): closing without "
        "a frame is then not an error",
    )
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
    _add_output(send)

    recv = commands.add_parser(
        "recv",
        help="accept one connection and print its frames, one per line",
        description="Accept one connection, write each frame it sends to stdout, one per "
        "line, and exit when it ends (or on Ctrl-C or SIGTERM, with status 0). The address "
        "goes to stderr, so stdout is only frames.",
    )
    _add_listen(recv, 8765)
    _add_codec(recv)
    _add_output(recv)

    hub = commands.add_parser(
        "hub",
        help="run a hub of named append-only streams, or use one: hub create|append|read|...",
        description="A hub of named, append-only streams (see streamkit.hub), in memory, "
        "in logs under --data-dir, or in Redis (--storage), where any number of hubs serve "
        "the same streams. Prints its address; runs until Ctrl-C or SIGTERM. "
        f"`hub serve` is the same. To use a hub from the shell: hub {'|'.join(_HUB_VERBS)} "
        "(each with --help).",
    )
    _add_listen(hub, 8766)
    _add_limits(hub)
    hub.add_argument("--data-dir", metavar="DIR", help="keep streams in logs under DIR")
    hub.add_argument("--fsync", action="store_true", help="fsync each append (with --data-dir)")
    hub.add_argument(
        "--storage",
        metavar="URL",
        help="keep streams in Redis at URL (redis://HOST:PORT/DB, rediss://..., unix:///PATH),"
        " shared by every hub on it; needs streamkit[redis]",
    )
    hub.add_argument(
        "--prefix",
        default="streamkit",
        help="with --storage or --cluster-redis: the deployment's key prefix in Redis",
    )
    _add_cluster(hub)

    return parser, commands.choices


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    """The ``--cluster-*`` flags of a server of sessions (see streamkit.session.Cluster)."""
    group = parser.add_argument_group(
        "cluster",
        "several servers behind one TCP balancer, each a node: a session resumes through any "
        "of them (the node it reaches relays it to the node that holds it)",
    )
    group.add_argument("--cluster-node", metavar="TAG", help="this node's tag, e.g. a")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster-peers",
        type=_args.peers,
        metavar="NODE=ADDR,...",
        help="every node's cluster port: HOST:PORT or a Unix socket path",
    )
    where.add_argument(
        "--cluster-redis",
        metavar="URL",
        help="a peer directory in Redis instead (needs streamkit[redis])",
    )
    group.add_argument(
        "--cluster-listen",
        type=_args.endpoint,
        metavar="ADDR",
        help="where this node's cluster port listens (default: its entry in --cluster-peers)",
    )
    group.add_argument(
        "--cluster-advertise",
        type=_args.endpoint,
        metavar="ADDR",
        help="with --cluster-redis: the address the other nodes reach the cluster port at",
    )
    group.add_argument(
        "--cluster-key-file",
        metavar="FILE",
        help="the cluster key, the same on every node (at least 16 bytes; a final newline "
        "is not part of it)",
    )
    group.add_argument("--cluster-tls-cert", metavar="FILE", help="TLS on the cluster port")
    group.add_argument("--cluster-tls-key", metavar="FILE", help="the certificate's key")
    group.add_argument(
        "--cluster-tls-ca", metavar="FILE", help="TLS to the other nodes, trusting this CA"
    )


# -- running until stopped --------------------------------------------------------


@contextlib.contextmanager
def _signals() -> Iterator[asyncio.Event]:
    """An event that SIGINT or SIGTERM sets, while the block runs.

    Commands enter it before they print their address, so that a signal
    sent once the address is out always stops them cleanly.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def stopped(stop: asyncio.Event, until: Awaitable[Any]) -> bool:
    """Wait for ``stop`` (True: then ``until`` is cancelled) or for ``until`` (False).

    ``until``'s error, if it fails first, is raised.
    """
    waiting = asyncio.ensure_future(stop.wait())
    done = asyncio.ensure_future(until)
    try:
        await asyncio.wait((waiting, done), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if done.done():
        done.result()
        return False
    done.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await done
    return True


def _print_frame(args: argparse.Namespace, frame: Any) -> None:
    """Write one frame to stdout, one line each."""
    try:
        if args.codec == "jsonl":
            print(json.dumps(frame, ensure_ascii=False), flush=True)
        elif args.codec == "lines":
            print(frame, flush=True)
        elif args.hex:
            print(bytes(frame).hex(), flush=True)
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
        raise _Failed(_args.cannot_listen(where, exc)) from exc
    return server, _args.host_port(args.host, server.port)


async def _frames_from(stream: FramedStream[Any], codec_name: str, peer: Any) -> AsyncIterator[Any]:
    """The frames a peer sends, until it ends its side; a misbehaving peer is logged.

    A frame the codec cannot read (invalid text, invalid JSON) is skipped, as
    the decoder goes on with the next one. Anything else the peer does wrong
    (a frame over max_frame, a stream cut inside a frame, a reset) ends the
    connection. The first of these is a WARNING line, later ones and the
    tracebacks are DEBUG.
    """
    warned = False  # one WARNING a peer: a flood of bad frames is not a flood of log lines

    def log(message: str, *args: Any) -> None:
        nonlocal warned
        logger.log(logging.DEBUG if warned else logging.WARNING, message, *args)
        warned = True

    while True:
        try:
            frame = await stream.recv()
        except EndOfStream:
            return
        except DecodeError as exc:
            log("%s sent a frame --codec %s cannot read, skipped: %s", peer, codec_name, exc)
            continue
        except (ProtocolError, ConnectionLost, OSError) as exc:
            log("closing the connection from %s: %s", peer, exc)
            logger.debug("the error from %s", peer, exc_info=True)
            return
        yield frame


async def _serve_echo(args: argparse.Namespace) -> None:
    codec = _make_codec(args)
    context = None
    if args.tls_cert:
        context = _tls_context(
            ssl.Purpose.CLIENT_AUTH, "--tls-cert / --tls-key", args.tls_cert, args.tls_key
        )

    streams: set[FramedStream[Any]] = set()
    stopping = False

    async def echo(stream: FramedStream[Any]) -> None:
        peer = stream.peername
        logger.info("connection from %s", peer)
        streams.add(stream)
        try:
            async for frame in _frames_from(stream, args.codec, peer):
                if stopping:
                    break  # our side has ended: frames after that are not echoed
                await stream.send(frame)
            if not stream.is_closing():
                stream.write_eof()
        except (ConnectionLost, OSError) as exc:  # the peer went while we answered
            logger.warning("closing the connection from %s: %s", peer, exc)
        finally:
            streams.discard(stream)

    with _signals() as stop:
        server, where = await _listen(
            args,
            echo,
            codec,
            context,
            max_connections=args.max_connections,
            handshake_timeout=args.handshake_timeout,
        )
        print(f"echo server on {where} ({args.codec}{', TLS' if context else ''})", flush=True)
        await stop.wait()
    stopping = True
    server.close()
    # End each connection's sending side: a client such as send sees the end,
    # closes, and its handler finishes well within the grace period.
    for stream in streams:
        stream.write_eof()
    await server.wait_closed()


def _read_stdin(
    loop: asyncio.AbstractEventLoop,
    chunks: asyncio.Queue[bytes | OSError],
    room: threading.Semaphore,
) -> None:
    """Thread body: put stdin's bytes on ``chunks``, then ``b""`` at its end (or the error).

    A daemon thread rather than ``asyncio.to_thread``: when the peer ends the
    stream first, ``send`` exits even though this read is still blocked on
    stdin. It reads the file descriptor, not ``sys.stdin``, so that it holds
    no lock the interpreter needs at exit, and hands chunks over with
    ``call_soon_threadsafe``, so that a loop that has ended leaves no
    coroutine behind. ``room`` bounds the chunks waiting in the queue: a
    slow connection slows the reading down.
    """
    while True:
        room.acquire()
        try:
            chunk: bytes | OSError = os.read(0, _STDIN_CHUNK)
        except OSError as exc:
            chunk = exc
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
        except RuntimeError:
            return  # the event loop has ended: the command is exiting
        if not chunk or isinstance(chunk, OSError):
            return


async def stdin_records(raw: bool, max_size: int) -> AsyncIterator[list[bytes]]:
    """Batches of stdin's lines (without ``\\n``, nor a ``\\r`` before it), or all of it.

    With ``raw``, all of stdin is one record. A line (or, with ``raw``,
    stdin) over ``max_size`` bytes fails at once, before more is buffered.
    Used by ``send`` and ``hub append``.
    """
    chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue()
    room = threading.Semaphore(4)  # chunks read ahead of the connection, at most
    loop = asyncio.get_running_loop()
    reader = threading.Thread(
        target=_read_stdin, args=(loop, chunks, room), name="stdin", daemon=True
    )
    reader.start()
    pending = bytearray()
    line_number = 1
    while chunk := await _next_chunk(chunks, room):
        if isinstance(chunk, OSError):
            raise _Failed(f"cannot read stdin: {_args.os_reason(chunk)}") from chunk
        pending += chunk
        if not raw and b"\n" in chunk:
            *lines, rest = bytes(pending).split(b"\n")
            pending = bytearray(rest)
            records = [line.removesuffix(b"\r") for line in lines]
            for offset, record in enumerate(records):
                _check_size(record, max_size, f"line {line_number + offset} of stdin")
            line_number += len(records)
            yield records
        # Without a newline in it, the rest is part of one line: bound it.
        _check_size(pending, max_size, "stdin" if raw else f"line {line_number} of stdin")
    if pending:
        yield [bytes(pending) if raw else bytes(pending).removesuffix(b"\r")]


async def _next_chunk(
    chunks: asyncio.Queue[bytes | OSError], room: threading.Semaphore
) -> bytes | OSError:
    chunk = await chunks.get()
    room.release()
    return chunk


def _check_size(data: Buffer, max_size: int, what: str) -> None:
    if len(data) > max_size + 1:  # + 1: a line's "\r"
        raise _Failed(f"{what} is over {max_size} bytes, the most one frame or record holds")


def _stdin_frames(args: argparse.Namespace, records: list[bytes]) -> list[Any]:
    """The frames of ``--codec`` from stdin's records."""
    if args.codec in _BINARY:
        return records
    frames = []
    for record in records:
        try:
            text = record.decode()
        except UnicodeDecodeError as exc:
            raise _Failed(f"stdin is not UTF-8 text: {exc}") from exc
        if args.codec == "jsonl":
            try:
                frames.append(json.loads(text))
            except ValueError as exc:
                raise _Failed(f"stdin is not JSON lines: {exc}") from exc
            continue
        if args.raw:
            text = text.removesuffix("\n").removesuffix("\r")
            if "\n" in text:
                raise _Failed(
                    "with --codec lines a frame is one line, and stdin holds several: "
                    "send it without --raw (a frame a line)"
                )
        frames.append(text)
    return frames


class _SniffingDecoder(Decoder[Any]):
    """A decoder that keeps the first bytes it is fed, to say what the peer speaks."""

    __slots__ = ("_inner", "seen")

    def __init__(self, inner: Decoder[Any]) -> None:
        super().__init__()
        self._inner = inner
        self.seen = b""

    def feed(self, data: Buffer) -> list[Any]:
        if len(self.seen) < _SNIFF:
            self.seen += bytes(data[: _SNIFF - len(self.seen)])
        return self._inner.feed(data)

    def close(self) -> None:
        self._inner.close()

    def missing(self) -> int:
        return self._inner.missing()

    def header_missing(self) -> int:
        return self._inner.header_missing()

    def complete(self, data: Buffer | list[Buffer]) -> Any:
        return self._inner.complete(data)

    @property
    def buffered(self) -> int:
        return self._inner.buffered

    @property
    def pending(self) -> bool:
        return self._inner.pending

    def take_buffered(self, frames: int = 0) -> bytes:
        return self._inner.take_buffered(frames)


class _Sniffing:
    """A codec as another, whose decoder keeps the peer's first bytes (``seen``)."""

    def __init__(self, codec: Codec[Any]) -> None:
        self._codec = codec
        self._decoder: _SniffingDecoder | None = None

    @property
    def max_frame(self) -> int:
        return self._codec.max_frame

    @property
    def seen(self) -> bytes:
        """The first bytes the peer sent (up to 32)."""
        return self._decoder.seen if self._decoder is not None else b""

    def encode(self, frame: Any) -> bytes:
        return self._codec.encode(frame)

    def encode_into(self, out: bytearray, frame: Any) -> None:
        self._codec.encode_into(out, frame)

    def encode_many(self, frames: Iterable[Any]) -> bytes:
        return self._codec.encode_many(frames)

    def decoder(self) -> Decoder[Any]:
        self._decoder = _SniffingDecoder(self._codec.decoder())
        return self._decoder

    async def read_frame(self, reader: asyncio.StreamReader) -> Any:
        return await self._codec.read_frame(reader)


def _another_protocol(where: str, seen: bytes, what: str) -> _Failed:
    """The one line ``send`` says about a peer that speaks something else."""
    if seen:
        guess = guess_protocol(seen) or "no protocol streamkit knows"
        what += f"; its first bytes {seen!r} look like {guess}"
    return _Failed(f"{where} {what}")


async def _send(args: argparse.Namespace) -> None:
    codec = _Sniffing(_make_codec(args))
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
        raise _Failed(f"cannot connect to {where}: {_connect_reason(exc, bool(context))}") from exc
    sent = received = 0
    peer_ended = False
    async with stream:
        # TLS cannot half-close: there the end of stdin cannot reach the
        # server, so send stops when no frame has come back for --idle.
        idle = None if stream.writer.can_write_eof() else args.idle
        stdin_sent = asyncio.Event()

        async def send_stdin() -> None:
            nonlocal sent
            async for records in stdin_records(args.raw, codec.max_frame):
                frames = _stdin_frames(args, records)
                await stream.send_many(frames)
                sent += len(frames)
            await stream.drain()
            stream.write_eof()
            stdin_sent.set()

        async def print_received() -> None:
            nonlocal received, peer_ended
            while True:
                try:
                    frame = await stream.recv(timeout=idle)
                except EndOfStream:
                    peer_ended = True
                    return
                except TimeoutError:
                    if stdin_sent.is_set():
                        return
                    continue
                received += 1
                _print_frame(args, frame)

        try:
            async with asyncio.TaskGroup() as tasks:  # either failing stops both
                sending = tasks.create_task(send_stdin())
                await print_received()
                sending.cancel()  # the server ended the stream: nothing more to say
        except ExceptionGroup as group:
            error = group.exceptions[0]
            # A peer in another protocol may still yield a "frame" or two
            # (a TLS record, a session preface split on a newline byte).
            foreign = codec.seen and guess_protocol(codec.seen) is not None
            if not isinstance(error, ProtocolError | ConnectionLost) or (received and not foreign):
                raise error from None
            if isinstance(error, IncompleteFrame):
                what = f"ended the connection in the middle of a frame ({error})"
            elif isinstance(error, ConnectionLost):
                what = f"reset the connection ({error})"
            else:
                what = f"sent what --codec {args.codec} cannot read ({error})"
            raise _another_protocol(where, codec.seen, what) from error
    if received or args.no_reply:
        return
    if codec.seen:
        raise _another_protocol(where, codec.seen, f"sent nothing --codec {args.codec} reads")
    frames = f"{sent} frame{'' if sent == 1 else 's'}"
    ended = "closed the connection" if peer_ended else f"sent nothing for --idle {args.idle:g} s"
    raise _Failed(
        f"{where} {ended} without answering {frames}: it may speak another protocol "
        f"(TLS, a session or hub, a --codec other than {args.codec}; its log says which) "
        "or never answer (then use --no-reply)"
    )


async def _recv(args: argparse.Namespace) -> None:
    codec = _make_codec(args)
    done = asyncio.get_running_loop().create_future()
    accepted: list[FramedStream[Any]] = []

    async def receive(stream: FramedStream[Any]) -> None:
        if accepted:
            return  # only the first connection: a second one is closed at once
        accepted.append(stream)
        logger.info("connection from %s", stream.peername)
        try:
            async for frame in _frames_from(stream, args.codec, stream.peername):
                _print_frame(args, frame)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)

    with _signals() as stop:
        server, where = await _listen(args, receive, codec, None)
        print(f"receiving on {where} ({args.codec})", file=sys.stderr, flush=True)
        async with server:
            if await stopped(stop, done):  # Ctrl-C or SIGTERM: stop now, as the servers do
                for stream in accepted:
                    stream.close()


async def _hub(args: argparse.Namespace) -> None:
    from streamkit import hub

    options: dict[str, Any] = {
        "data_dir": args.data_dir,
        "fsync": args.fsync,
        "max_connections": args.max_connections,
        "handshake_timeout": args.handshake_timeout,
    }
    if args.storage:
        try:
            options["storage"] = hub.RedisStorage.from_url(args.storage, prefix=args.prefix)
        except (ImportError, ValueError) as exc:
            raise _Failed(f"--storage {args.storage}: {exc}") from exc
    options["cluster"] = cluster = _cluster(args)
    where = args.unix or _args.host_port(args.host, args.port)
    with _signals() as stop:
        try:
            if args.unix:
                server = await hub.serve_hub_unix(args.unix, **options)
            else:
                server = await hub.serve_hub(args.host, args.port, **options)
                where = _args.host_port(args.host, server.port)
        except (RuntimeError, ValueError) as exc:  # the cluster's node tag or addresses
            raise _Failed(f"cluster: {exc}") from exc
        except OSError as exc:
            if exc.filename is not None:  # the data directory, not the address
                reason = _args.os_reason(exc)
                raise _Failed(f"cannot use --data-dir {args.data_dir}: {reason}") from exc
            raise _Failed(_args.cannot_listen(where, exc)) from exc
        storage = f"logs in {args.data_dir}" if args.data_dir else "in memory"
        if args.storage:
            storage = f"{options['storage'].where}, prefix {args.prefix!r}"
        if cluster is not None:
            storage += f"; cluster node {cluster.node!r}"
        print(f"hub on {where} ({storage})", flush=True)
        await stop.wait()
    server.close()
    await server.wait_closed()


def _check(args: argparse.Namespace) -> str | None:
    """Argument rules argparse cannot express: the error, if any (then status 2)."""
    if args.command == "serve" and bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.command == "hub" and args.fsync and not args.data_dir:
        return "--fsync needs --data-dir"
    if args.command in ("send", "recv") and args.hex and args.codec not in _BINARY:
        return "--hex prints binary frames: it goes with --codec length4 or varint"
    line_command = args.command in ("serve", "send", "recv")
    if line_command and args.newline != "lf" and args.codec in _BINARY:
        return "--newline goes with the line codecs (--codec lines or jsonl)"
    if args.command == "hub" and args.storage:
        if args.data_dir:
            return "--storage and --data-dir do not go together"
        if not args.storage.startswith(("redis://", "rediss://", "unix://")):
            return f"--storage must be a redis://, rediss:// or unix:// URL, not {args.storage!r}"
    if args.command == "hub":
        return _check_cluster(args)
    return None


def _check_cluster(args: argparse.Namespace) -> str | None:
    flags = {name: value for name, value in vars(args).items() if name.startswith("cluster_")}
    if not args.cluster_node:
        given = [name for name, value in flags.items() if value]
        if given:
            return f"--{given[0].replace('_', '-')} goes with --cluster-node"
        return None
    if not (args.cluster_peers or args.cluster_redis):
        return "--cluster-node needs --cluster-peers or --cluster-redis"
    if not args.cluster_key_file:
        return "--cluster-node needs --cluster-key-file"
    if args.cluster_redis and not args.cluster_listen:
        return "--cluster-redis needs --cluster-listen"
    if bool(args.cluster_tls_cert) != bool(args.cluster_tls_key):
        return "--cluster-tls-cert and --cluster-tls-key go together"
    return None


def _cluster(args: argparse.Namespace) -> Any:
    """The :class:`~streamkit.session.Cluster` of the ``--cluster-*`` flags, or None."""
    if not args.cluster_node:
        return None
    from streamkit.session.cluster import Cluster, StaticPeers

    try:
        with open(args.cluster_key_file, "rb") as file:
            key = file.read().rstrip(b"\r\n")
    except OSError as exc:
        raise _Failed(
            f"cannot read --cluster-key-file {args.cluster_key_file}: {_args.os_reason(exc)}"
        ) from exc
    server_tls = client_tls = None
    if args.cluster_tls_cert:
        server_tls = _tls_context(
            ssl.Purpose.CLIENT_AUTH,
            "--cluster-tls-cert / --cluster-tls-key",
            args.cluster_tls_cert,
            args.cluster_tls_key,
        )
    if args.cluster_tls_ca:
        client_tls = _tls_context(ssl.Purpose.SERVER_AUTH, "--cluster-tls-ca", args.cluster_tls_ca)
    try:
        if args.cluster_redis:
            from streamkit.session.redis import RedisPeers

            peers: Any = RedisPeers(args.cluster_redis, prefix=args.prefix)
        else:
            peers = StaticPeers(args.cluster_peers)
        return Cluster(
            args.cluster_node,
            peers,
            key,
            listen=args.cluster_listen,
            advertise=args.cluster_advertise,
            ssl=server_tls,
            peer_ssl=client_tls,
        )
    except (ImportError, ValueError, TypeError) as exc:
        raise _Failed(f"cluster: {exc}") from exc


# -- commands run by their own modules ---------------------------------------------


def _delegate(module: str, argv: list[str]) -> int:
    """Run ``main(argv)`` of a command's module (lazily imported: only what runs loads)."""
    module_main: Callable[[list[str]], int] = importlib.import_module(module).main
    try:
        return module_main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command finished: no traceback
        return 130


# -- the entry point --------------------------------------------------------------


def configure_logging(debug: bool = False) -> None:
    """Log to stderr, at INFO (DEBUG with ``debug``), as every server command does."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_command(
    command: str,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    args: argparse.Namespace,
    *,
    failures: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a command's coroutine; a runtime failure is one line on stderr and status 1."""
    configure_logging(getattr(args, "debug", False))
    caught: tuple[type[BaseException], ...] = (OSError, StreamkitError, *failures)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(args))
    except _Failed as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return exc.status
    except caught as exc:
        reason = _args.os_reason(exc) if isinstance(exc, OSError) else str(exc)
        print(f"{command}: {reason or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        # Verbatim: argparse cannot pass on options it does not know as a remainder.
        return _delegate(_DELEGATED[argv[0]][0], argv[1:])
    if argv[:1] == ["hub"] and len(argv) > 1 and argv[1] in _HUB_VERBS:
        return _delegate("streamkit._hub_cli", argv[1:])
    if argv[:2] == ["hub", "serve"]:
        argv = ["hub", *argv[2:]]  # `hub serve` is `hub`
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
    return run_command(args.command, commands[args.command], args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
