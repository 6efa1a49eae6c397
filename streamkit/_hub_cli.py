"""``python -m streamkit hub VERB``: use a hub from the shell.

``create``, ``append`` (stdin, a record a line or all of it with ``--raw``),
``read`` (``--from OFFSET|now``, ``--follow``), ``status``, ``finish`` and
``delete``, against ``--connect HOST:PORT`` (127.0.0.1:8766) or ``--unix
PATH``. ``create``, ``status`` and ``finish`` print the stream's status as
one JSON line; ``append`` prints what it appended. Exit status: 0 done, 1 a
failure (one line on stderr: the hub unreachable, a refused request), 2 bad
arguments, 3 no such stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Literal

from streamkit import _args
from streamkit.cli import _Failed, _signals, run_command, stdin_records, stopped
from streamkit.hub import HubClient, StreamNotFound, connect, connect_unix
from streamkit.hub.client import StreamStatus

__all__ = ["main"]

#: The exit status of a request about a stream that does not exist.
NOT_FOUND = 3
#: The largest record ``append`` sends: the hub's default ``max_record``.
_MAX_RECORD = 4 * 1024 * 1024


def _offset(text: str) -> int | Literal["now"]:
    if text == "now":
        return "now"
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an offset (a number >= 0, or now)")
    return int(text)


def _build_parser() -> tuple[_args.Parser, dict[str, _args.Parser]]:
    parser = _args.Parser(
        prog="python -m streamkit hub",
        description="Use a hub of named streams from the shell (python -m streamkit hub, "
        "without a verb, runs one). Exit status: 0 done, 1 a failure, 2 bad arguments, "
        "3 no such stream.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    def verb(name: str, summary: str, description: str) -> _args.Parser:
        command: _args.Parser = verbs.add_parser(
            name, help=summary, description=f"{description} Exit status 3: no such stream."
        )
        command.add_argument("name", help="the stream's name")
        where = command.add_mutually_exclusive_group()
        where.add_argument(
            "--connect",
            metavar="HOST:PORT",
            type=_args.address,
            default=("127.0.0.1", 8766),
            help="the hub's address (127.0.0.1:8766)",
        )
        where.add_argument("--unix", metavar="PATH", help="the hub's Unix socket")
        command.add_argument(
            "--timeout",
            type=_args.positive,
            default=10.0,
            metavar="SECONDS",
            help="how long to try to reach the hub, at first and after a lost connection (10)",
        )
        return command

    create = verb("create", "create a stream", "Create a stream; print its status (JSON).")
    create.add_argument("--ttl", type=_args.positive, metavar="SECONDS", help="expire after")
    create.add_argument("--content-type", metavar="TYPE", help="e.g. application/json")
    create.add_argument("--exist-ok", action="store_true", help="no error if it exists")

    append = verb(
        "append",
        "append stdin to a stream",
        "Append stdin to a stream: each line is one record (without its newline), or with "
        "--raw all of stdin is one record. Prints the count and the offsets appended.",
    )
    append.add_argument("--raw", action="store_true", help="all of stdin as one record")

    read = verb(
        "read",
        "print a stream's records, one a line",
        "Print a stream's records, one a line, from --from to its current end; with "
        "--follow, keep printing new ones until the stream is finished (or Ctrl-C).",
    )
    read.add_argument(
        "--from",
        dest="offset",
        type=_offset,
        default=0,
        metavar="OFFSET",
        help="the first offset to read, or now: only records appended from now on (0)",
    )
    read.add_argument("--follow", action="store_true", help="tail the stream live")
    read.add_argument("--offsets", action="store_true", help="print OFFSET<TAB> before each")
    read.add_argument("--hex", action="store_true", help="print each record in hex")

    verb("status", "print a stream's status", "Print a stream's status (JSON).")
    verb("finish", "finish a stream", "Finish a stream: no more appends. Prints its status.")
    verb("delete", "delete a stream", "Delete a stream; its readers end.")
    return parser, verbs.choices


def _print_status(status: StreamStatus) -> None:
    print(json.dumps(dataclasses.asdict(status)), flush=True)


def _print_record(args: argparse.Namespace, offset: int, data: bytes) -> None:
    prefix = f"{offset}\t".encode() if args.offsets else b""
    sys.stdout.buffer.write(prefix + (data.hex().encode() if args.hex else data) + b"\n")
    sys.stdout.buffer.flush()


async def _append(client: HubClient, args: argparse.Namespace) -> None:
    count = 0
    first = last = None
    async for records in stdin_records(args.raw, _MAX_RECORD):
        offset = await client.append_many(args.name, records)
        first = offset if first is None else first
        last = offset + len(records) - 1
        count += len(records)
    span = "" if first is None else f" at offset {first}"
    if last != first:
        span = f" at offsets {first}-{last}"
    print(f"appended {count} record{'' if count == 1 else 's'} to {args.name!r}{span}", flush=True)


async def _read(client: HubClient, args: argparse.Namespace) -> None:
    async def read_all() -> None:
        async with client.read(args.name, args.offset, live=args.follow) as reader:
            async for record in reader:
                _print_record(args, record.offset, record.data)

    with _signals() as stop:
        await stopped(stop, read_all())  # Ctrl-C or SIGTERM ends a --follow: status 0


async def _run(args: argparse.Namespace) -> None:
    if args.unix:
        where = args.unix
        connector = connect_unix(
            args.unix, reconnect_timeout=args.timeout, handshake_timeout=args.timeout
        )
    else:
        where = _args.host_port(*args.connect)
        connector = connect(
            *args.connect, reconnect_timeout=args.timeout, handshake_timeout=args.timeout
        )
    try:
        client = await connector
    except TimeoutError as exc:
        raise _Failed(f"no hub answered at {where} within {args.timeout:g} s") from exc
    except OSError as exc:
        raise _Failed(f"cannot connect to the hub at {where}: {_args.os_reason(exc)}") from exc
    async with client:
        try:
            if args.verb == "create":
                _print_status(
                    await client.create(
                        args.name,
                        ttl=args.ttl,
                        content_type=args.content_type,
                        exist_ok=args.exist_ok,
                    )
                )
            elif args.verb == "append":
                await _append(client, args)
            elif args.verb == "read":
                await _read(client, args)
            elif args.verb == "status":
                status = await client.status(args.name)
                if status is None:
                    raise StreamNotFound(f"no stream named {args.name!r}")
                _print_status(status)
            elif args.verb == "finish":
                _print_status(await client.finish(args.name))
            else:
                await client.delete(args.name)
        except StreamNotFound as exc:
            raise _Failed(f"{exc} (on the hub at {where})", status=NOT_FOUND) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m streamkit hub VERB ...``; ``argv`` starts with the verb.

    Returns the exit status: 0, 1 for a failure, 3 when the stream does not
    exist; bad arguments raise ``SystemExit(2)`` after one line, as argparse
    does.
    """
    parser, _ = _build_parser()
    args = parser.parse_args(argv)
    # ValueError: a name the hub cannot take (empty, too long), said in one line.
    return run_command(f"hub {args.verb}", _run, args, failures=(ValueError,))
