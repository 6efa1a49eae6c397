"""What the benchmark scripts share: child processes, the allocator, page faults, repeats.

Imported by the scripts in this folder (``from _harness import ...``; a
script's own folder is first on ``sys.path``). The framed-stream benchmark
itself lives in ``streamkit._bench`` because ``python -m streamkit bench``
runs it too; its helpers are shared from there, not written twice.

Every benchmark measures with the memory allocator as users have it: no
script sets ``GLIBC_TUNABLES``. Set it yourself to compare; each script's
header line says what was in effect (:func:`allocator`).

On this kind of machine one run of a comparison says little: a script takes
``--repeat N`` (:func:`add_repeat_option`), runs the whole comparison N
times, and prints each row's ratio as its median and range over the passes
(:func:`spread`), the numbers a closing note quotes.
"""

from __future__ import annotations

from streamkit._bench import (
    Spread,
    add_repeat_option,
    allocator,
    minor_faults,
    receive_from_child,
    spread,
)

__all__ = [
    "Spread",
    "add_repeat_option",
    "allocator",
    "minor_faults",
    "receive_from_child",
    "spread",
]
