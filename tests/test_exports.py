"""A deliberate public surface: each public module's ``__all__`` is importable and documented."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import streamkit

#: Every public module: no part of its dotted name after ``streamkit`` starts with "_".
PUBLIC_MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(streamkit.__path__, "streamkit.")
    if not any(part.startswith("_") for part in info.name.split(".")[1:])
)


@pytest.mark.parametrize("module_name", ["streamkit", *PUBLIC_MODULES])
def test_every_exported_name_exists_and_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert module_name in {"streamkit.cli", "streamkit.demo", "streamkit.bench"}, (
            f"{module_name} has no __all__"
        )
        return
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ repeats a name"
    for name in exported:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            doc = inspect.getdoc(value) or ""
            # A dataclass without a docstring gets its signature as one.
            assert doc and not doc.startswith(f"{value.__name__}("), f"{module_name}.{name}"


def test_the_session_types_a_handler_is_annotated_with_are_exported() -> None:
    import streamkit.session

    for name in ("ClientSession", "ServerSession", "Session", "SessionSettings"):
        assert name in streamkit.__all__
        assert name in streamkit.session.__all__
        assert getattr(streamkit, name) is getattr(streamkit.session, name)


def test_test_only_helpers_are_not_exported() -> None:
    from streamkit.session import protocol

    assert not hasattr(protocol, "encode_data_header")
    assert not hasattr(protocol, "SessionCodec")
    assert "send_encoded_nowait" not in dir(streamkit.FramedStream)
