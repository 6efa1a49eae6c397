"""What the benchmark scripts share: child processes, the allocator, page faults.

Imported by the scripts in this folder (``from _harness import ...``; a
script's own folder is first on ``sys.path``). The framed-stream benchmark
itself lives in ``streamkit._bench`` because ``python -m streamkit bench``
runs it too; its helpers are shared from there, not written twice.

Every benchmark measures with the memory allocator as users have it: no
script sets ``GLIBC_TUNABLES``. Set it yourself to compare; each script's
header line says what was in effect (:func:`allocator`).
"""

from __future__ import annotations

from streamkit._bench import allocator, minor_faults, receive_from_child

__all__ = ["allocator", "minor_faults", "receive_from_child"]
