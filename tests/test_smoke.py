"""The package imports, exports what it says, and the codecs never need asyncio."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import streamkit


def test_all_names_exist() -> None:
    for name in streamkit.__all__:
        assert hasattr(streamkit, name), name
    assert streamkit.__version__ == "0.1.0"


def test_the_main_names_of_every_layer_are_exported_from_the_package() -> None:
    import streamkit.session

    layers = {
        "codecs": ["LengthPrefixed", "VarintPrefixed", "Delimited", "Lines", "JsonLines"],
        "streams": ["FramedStream", "connect", "connect_unix", "serve", "serve_unix"],
        "sessions": [
            "Session",
            "connect_resumable",
            "connect_resumable_unix",
            "serve_resumable",
            "serve_resumable_unix",
        ],
    }
    for names in layers.values():
        for name in names:
            assert name in streamkit.__all__, name
    assert streamkit.connect_resumable is streamkit.session.connect_resumable


#: Modules that are sans-IO: importing them, and what they import, loads no asyncio.
SANS_IO = (
    "session/protocol.py",
    "session/core.py",
    "session/settings.py",
    "session/cluster.py",
    "session/relay.py",
    "hub/protocol.py",
)


def test_sans_io_modules_do_not_import_asyncio_at_module_level() -> None:
    package = Path(streamkit.__file__).parent
    modules = sorted((package / "codecs").glob("*.py")) + [package / name for name in SANS_IO]
    assert len(modules) >= 8
    for module in modules:
        tree = ast.parse(module.read_text())
        for node in tree.body:  # module level only; TYPE_CHECKING blocks are fine
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "asyncio" for n in names), (module.name, names)


def test_importing_the_codecs_loads_no_asyncio() -> None:
    code = (
        "import sys, streamkit, streamkit.codecs\n"
        "streamkit.JsonLines().decoder().feed(b'[1]\\n')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asyncio'))\n"
        "streamkit.connect\n"  # the asyncio layers load on first use
        "print('asyncio' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


@pytest.mark.parametrize("module", SANS_IO)
def test_loading_a_sans_io_module_loads_no_asyncio(module: str) -> None:
    """The module alone, by its file (its package's ``__init__`` may load the asyncio parts)."""
    path = Path(streamkit.__file__).parent / module
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('probe', {str(path)!r})\n"
        "module = sys.modules['probe'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asyncio'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_importing_the_session_package_and_its_sans_io_parts_loads_no_asyncio() -> None:
    code = (
        "import sys, streamkit.session, streamkit.session.core, streamkit.session.protocol\n"
        "import streamkit.session.cluster, streamkit.session.relay\n"
        "core = streamkit.session.core.SessionCore(\n"
        "    bytes(16), bytes(32), streamkit.session.SessionSettings(), client=True)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asyncio'))\n"
        "streamkit.session.connect_resumable  # the asyncio parts load on first use\n"
        "print('asyncio' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_layers_are_attributes_of_the_package() -> None:
    code = "import streamkit as sk\nprint(sk.session.Session is sk.Session, sk.net.serve)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True <function serve")


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = streamkit.nope


def test_demo_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamkit", "demo"], capture_output=True, text=True, check=True
    )
    assert "lost                    0\n" in result.stdout
    assert "in order, exactly once  yes\n" in result.stdout
