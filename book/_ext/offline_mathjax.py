"""Sphinx extension: serve MathJax 3 from the built site instead of a CDN.

The book must typeset its formulas when opened from disk or on a machine without internet, so
the MathJax files come from an installed package (``django-static-mathjax``, MathJax 3 under the
import name ``mathjax``; it is in the ``book`` extra) and are copied into ``_static/mathjax/`` of
the HTML output; ``mathjax_path`` points there. Only the ``tex-chtml`` component and the files it
loads at run time (CHTML fonts, the menu's and the accessibility extensions) are copied.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

MATHJAX_PATH = "mathjax/tex-chtml.js"  # relative to the build's _static folder
# What tex-chtml.js loads lazily, relative to MathJax's es5 folder.
RUNTIME = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "a11y", "sre", "ui", "adaptors")


def mathjax_source() -> Path:
    """The es5 folder of the installed MathJax 3 package, or a clear error saying what to install."""
    try:
        import mathjax  # django-static-mathjax: a data-only package, no Django needed
    except ImportError as error:
        raise ExtensionError("offline_mathjax: MathJax is not installed; pip install django-static-mathjax "
                             "(it is in safelib's 'book' extra)") from error
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-chtml.js").is_file():
        raise ExtensionError(f"offline_mathjax: {es5 / 'tex-chtml.js'} is missing; reinstall django-static-mathjax")
    return es5


def _set_path(app: Sphinx) -> None:
    mathjax_source()  # fail at the start of the build, not at its end
    app.config.mathjax_path = MATHJAX_PATH


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for part in RUNTIME:
        src, dst = source / part, target / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _set_path)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
