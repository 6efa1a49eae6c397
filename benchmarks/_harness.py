"""What the benchmark scripts share: child processes and the allocator setting.

Imported by the scripts in this folder (``from _harness import ...``; a
script's own folder is first on ``sys.path``). The framed-stream benchmark
itself lives in ``streamkit._bench`` because ``python -m streamkit bench``
runs it too; its helpers are shared from there, not written twice.
"""

from __future__ import annotations

import os
import sys

from streamkit._bench import MALLOC_TUNABLES, receive_from_child

__all__ = ["MALLOC_TUNABLES", "receive_from_child", "rerun_with_fixed_malloc"]


def rerun_with_fixed_malloc() -> None:
    """Re-execute this script with glibc's malloc thresholds fixed high, unless already set.

    For benchmark scripts that measure in their own process: call first
    thing in ``main``; returns only when the thresholds are in place (or
    ``GLIBC_TUNABLES`` was set by the caller).
    """
    if "GLIBC_TUNABLES" in os.environ:
        return
    environment = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], environment)
