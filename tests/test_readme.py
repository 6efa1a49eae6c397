"""Every Python snippet of the README runs as written, in a fresh interpreter.

A snippet that is not meant to run says so in its first line, visibly:
``# not run: <why>``. A snippet that needs a server says so in the sentence
before it ("With `python -m streamkit serve ...` running (... on port
8765)"): the test starts that command on a free port and points the snippet
at it, the one change it makes.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
NOT_RUN = "# not run:"
#: "With `python -m streamkit serve --codec jsonl` running" before a block.
NEEDS_SERVER = re.compile(r"With `python -m streamkit (serve[^`]*)` running[^`]*?\n```python\n$")


def snippets() -> list[tuple[int, str, str | None]]:
    """``(line number, code, server command or None)`` for each python block."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.DOTALL):
        before = text[max(0, match.start() - 300) : match.start() + len("```python\n")]
        server = NEEDS_SERVER.search(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, match.group(1), server.group(1) if server else None))
    return found


SNIPPETS = snippets()


def test_the_readme_has_snippets_and_few_are_not_run() -> None:
    assert len(SNIPPETS) >= 6
    skipped = [code for _, code, _ in SNIPPETS if code.startswith(NOT_RUN)]
    assert len(skipped) <= 2, "most snippets must run: mark only those that cannot"


@pytest.mark.parametrize(
    ("line", "code", "server"), SNIPPETS, ids=[f"line {line}" for line, _, _ in SNIPPETS]
)
def test_readme_snippet_runs(line: int, code: str, server: str | None, tmp_path: Path) -> None:
    if code.startswith(NOT_RUN):
        pytest.skip(code.splitlines()[0])
    with contextlib.ExitStack() as stack:
        if server is not None:
            argv = [sys.executable, "-m", "streamkit", *server.split(), "--port", "0"]
            process = stack.enter_context(
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
            stack.callback(process.terminate)  # first, then Popen's exit closes pipes, waits
            assert process.stdout is not None
            first = process.stdout.readline()  # "echo server on 127.0.0.1:PORT (...)"
            port = first.split()[3].rsplit(":", 1)[1]
            assert "8765" in code, "a snippet that needs a server talks to port 8765"
            code = code.replace("8765", port)
        script = tmp_path / "snippet.py"
        script.write_text(code)
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, f"README line {line}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
