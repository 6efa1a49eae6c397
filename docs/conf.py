"""Sphinx configuration: the API reference, built from the docstrings.

Build it as CI does: ``python -m sphinx -W -b html docs docs/_build/html``
(``pip install -e ".[docs]"`` first).
"""

from __future__ import annotations

import streamkit

project = "streamkit"
author = "the streamkit authors"
copyright = "2026, the streamkit authors"
release = version = streamkit.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
# Markdown guides (README, protocol.md, performance.md) stay Markdown: GitHub renders them.
exclude_patterns = ["_build", "*.md"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# No network at build time: intersphinx finds no inventory and links nothing.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
html_theme = "alabaster"
