"""Argument parsing and messages shared by the command lines (``python -m streamkit ...``).

Each type raises ``argparse.ArgumentTypeError`` with a one-line message,
which :class:`Parser` turns into one line, ``PROG: error: ...``, and exit
status 2. :func:`os_reason` and :func:`cannot_listen` word OS errors the
same way in every command.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import ssl
import sys
from pathlib import Path
from typing import Any, NoReturn

#: How the usage lines name the program when not run as the ``streamkit`` script.
_MODULE_PROG = "python -m streamkit"


def program() -> str:
    """``streamkit`` when run as the console script, else ``python -m streamkit``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "streamkit" if name in ("streamkit", "streamkit.exe") else _MODULE_PROG


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (not argparse's usage, then the error).

    A ``prog`` starting with ``python -m streamkit`` names the program as it
    was run (see :func:`program`).
    """

    def __init__(self, prog: str | None = None, **kwargs: Any) -> None:
        if prog is not None and prog.startswith(_MODULE_PROG):
            prog = program() + prog.removeprefix(_MODULE_PROG)
        super().__init__(prog=prog, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def os_reason(exc: OSError) -> str:
    """Why an OS call failed, in a few words: ``Address already in use``, never blank.

    The OS's words for its error number, else the error's own message.
    """
    if exc.errno is not None and exc.errno in errno.errorcode and not isinstance(exc, ssl.SSLError):
        # asyncio's own words ("Connect call failed ('::1', 1)", "error while
        # attempting to bind on address ...") repeat the address the caller names.
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def cannot_listen(where: str, exc: OSError) -> str:
    """The message of every server command that cannot listen on ``where``."""
    return f"cannot listen on {where}: {os_reason(exc)}"


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (on 127.0.0.1); ``[::1]:PORT`` for IPv6."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def host_port(host: str, port: int) -> str:
    """The address as :func:`address` reads it back: ``[::1]:8765`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint(text: str) -> tuple[str, int] | str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6), or a Unix socket path (it has a ``/``)."""
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or a Unix socket path")
    return host.strip("[]"), int(port)


def peers(text: str) -> dict[str, tuple[str, int] | str]:
    """``NODE=ADDRESS,NODE=ADDRESS,...``, each ADDRESS as :func:`endpoint` reads it."""
    result: dict[str, tuple[str, int] | str] = {}
    for entry in text.split(","):
        node, equals, where = entry.partition("=")
        if not equals or not node:
            raise argparse.ArgumentTypeError(f"{entry!r} is not NODE=HOST:PORT (or NODE=PATH)")
        result[node] = endpoint(where)
    return result


def port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def count(text: str) -> int:
    """A whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 1")
    return int(text)


def number(text: str) -> float:
    """``text`` as a finite float, or NaN (which fails every bound check)."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    value = number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value
