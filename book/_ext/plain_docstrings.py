"""Sphinx extension: show safelib's plain-text docstrings as they are written.

safelib's docstrings are plain prose with aligned continuation lines, not reStructuredText, so
autodoc would report them as malformed (and the book builds with warnings as errors). A docstring
that parses as reStructuredText without a complaint is kept; any other is shown as a literal
block, its layout intact.
"""
from __future__ import annotations

import io

from docutils.core import publish_doctree
from docutils.utils import SystemMessage
from sphinx.application import Sphinx


def _is_clean_rst(text: str) -> bool:
    try:
        stream = io.StringIO()
        publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": stream})
    except (SystemMessage, Exception):  # unknown roles (:func:, :class:) land here too: keep those as text
        return False
    return not stream.getvalue()


def _process(app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]) -> None:
    text = "\n".join(lines)
    if not text.strip() or _is_clean_rst(text):
        return
    lines[:] = ["::", ""] + [f"    {line}" if line.strip() else "" for line in lines] + [""]


def setup(app: Sphinx) -> dict:
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
