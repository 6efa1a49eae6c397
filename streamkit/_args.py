"""Argument parsing shared by the command lines (``python -m streamkit`` and its parts).

Each type raises ``argparse.ArgumentTypeError`` with a one-line message,
which :class:`Parser` turns into one line, ``PROG: error: ...``, and exit
status 2.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (not argparse's usage, then the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (on 127.0.0.1); ``[::1]:PORT`` for IPv6."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def host_port(host: str, port: int) -> str:
    """The address as :func:`address` reads it back: ``[::1]:8765`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
