"""Sphinx configuration: `sphinx-build -M html docs docs/public -W --keep-going`."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # the mmm package, also when it is not installed

project = "mmm"
author = "the mmm authors"
copyright = "the mmm authors, MIT license"
release = "0.1.0"

default_role = "code"  # `x` in docstrings and pages is inline code, as in the code base

extensions = [
    "sphinx.ext.autodoc",
    "mmm_docs",  # docs/_ext/mmm_docs.py: config tables, token example, gallery
]

exclude_patterns = ["public", "_build", "gallery/*.md", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_theme = "furo"
html_title = "mmm — Multi-Track Music Machine"
html_static_path = ["_static"]
html_css_files = ["mmm.css"]
pygments_style = "sphinx"

# Autodoc: signatures with their type hints, members in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"undoc-members": False, "show-inheritance": True}
autoclass_content = "both"  # a class's docstring and its __init__'s
autodoc_inherit_docstrings = False  # Lightning's docstrings of overridden hooks are not ours

# A renamed or removed mmm function referenced anywhere fails the build (with -W). References
# to other projects' objects (torch, symusic, miditok, numpy, the standard library) are not
# resolved (no network for intersphinx), so they are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!mmm\.).*"),
    (r"py:.*", r"mmm\..*\._.*"),  # private helpers named in annotations
]
