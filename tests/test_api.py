"""The notebooks use only the public API: names that ``safelib/__init__.py`` exports, reached as ``sl.<name>``.

Every notebook in ``notebooks/`` is read (code cells parsed with `ast`, Markdown cells scanned for
``sl.`` in their text and code blocks), so a chapter added later is covered too. Rules:

- ``safelib`` is imported only as ``import safelib as sl``: no ``from safelib.x import``, no
  ``import safelib.x``, no ``from safelib import x``;
- the first name of every ``sl.<name>...`` chain is one that ``safelib/__init__.py`` binds;
- where that name is a module (``sl.miniworld``, ``sl.plots``), the next name is a public name of it
  (in its ``__all__`` when it has one) and not a module: ``sl.data.miniworld_tasks.target_cells``
  reaches past the facade.

The Colab setup cell (tag ``colab-setup``) is exempt: it installs safelib and runs before the chapter's
own ``import safelib as sl``; ``python -m safelib.book.colab`` writes and checks it.
"""
from __future__ import annotations

import ast
import json
import re
import types
from pathlib import Path

import pytest

import safelib as sl

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb"))
FACADE = ROOT / "safelib" / "__init__.py"
EXEMPT_TAGS = {"colab-setup"}
SL_IN_TEXT = re.compile(r"(?<![\w.])sl((?:\.[A-Za-z_]\w*)+)")


def exported_names(facade: Path = FACADE) -> set[str]:
    """Every name the facade binds at module level: its imports (``as`` names included) and assignments."""
    names = set()
    for node in ast.parse(facade.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _code(source: str) -> str:
    """Cell source without IPython magics and shell escapes (not Python)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _chain(node: ast.Attribute) -> list[str] | None:
    """['a', 'b'] for ``sl.a.b`` (outermost attribute node), else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1] if isinstance(node, ast.Name) and node.id == "sl" else None


def notebook_uses(path: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(where, sl chain) for each use, and the imports of safelib that are not ``import safelib as sl``."""
    uses, bad_imports = [], []
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if EXEMPT_TAGS & set(cell.get("metadata", {}).get("tags", [])):
            continue
        source = "".join(cell["source"])
        where = f"{path.name} cell {i}"
        if cell["cell_type"] == "markdown":
            uses += [(where, chain.split(".")[1:]) for chain in SL_IN_TEXT.findall(source)]
            continue
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse(_code(source), where)
        inner = set()  # attribute nodes that are part of a longer chain
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                inner.add(id(node.value))
            if isinstance(node, ast.Import):
                bad_imports += [f"{where}: import {a.name}" + (f" as {a.asname}" if a.asname else "")
                                for a in node.names if a.name.split(".")[0] == "safelib"
                                and (a.name, a.asname) != ("safelib", "sl")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "safelib":
                bad_imports.append(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
        chains = [(node.lineno, node.col_offset, chain) for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and id(node) not in inner and (chain := _chain(node))]
        uses += [(where, chain) for *_, chain in sorted(chains)]
    return uses, bad_imports


def api_problems(uses: list[tuple[str, list[str]]], exported: set[str], package=sl) -> list[str]:
    problems = []
    for where, chain in uses:
        first = chain[0]
        if first not in exported:
            problems.append(f"{where}: sl.{'.'.join(chain)}: {first!r} is not exported by safelib/__init__.py")
            continue
        value = getattr(package, first, None)
        if isinstance(value, types.ModuleType) and len(chain) > 1:
            second = chain[1]
            public = getattr(value, "__all__", None)
            inner = getattr(value, second, None)
            if second.startswith("_") or (public is not None and second not in public) or \
                    isinstance(inner, types.ModuleType):
                problems.append(f"{where}: sl.{'.'.join(chain)}: {second!r} is not a public name of sl.{first}")
    return problems


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 4 and "load_clip" in exported_names() and "__version__" in exported_names()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_the_exported_api(path):
    uses, bad_imports = notebook_uses(path)
    assert not bad_imports, "import safelib only as `import safelib as sl`:\n" + "\n".join(bad_imports)
    problems = api_problems(uses, exported_names())
    assert not problems, "\n".join(problems)


def test_every_exported_name_exists():
    missing = sorted(name for name in exported_names() if not hasattr(sl, name))
    assert not missing


# ---------------------------------------------------------------- the check itself can fail


def _notebook(tmp_path: Path, *cells: tuple[str, str]) -> Path:
    path = tmp_path / "99_try.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": kind, "metadata": {}, "source": [src]} for kind, src in cells]}))
    return path


def test_the_check_catches_what_it_should(tmp_path):
    path = _notebook(
        tmp_path,
        ("code", "import safelib as sl\nx = sl.load_clip('miniclip')\ny = sl.data.miniworld_tasks.target_cells(1)\n"
                 "z = sl.miniworld.SHAPES\nw = sl.not_there\n%matplotlib inline"),
        ("code", "from safelib.book import plots\nimport safelib.data"),
        ("markdown", "Call `sl.plan_cache(w)`, or `sl.secret`."),
    )
    uses, bad_imports = notebook_uses(path)
    assert bad_imports == ["99_try.ipynb cell 1: from safelib.book import plots", "99_try.ipynb cell 1: import safelib.data"]
    assert [chain for _, chain in uses] == [["load_clip"], ["data", "miniworld_tasks", "target_cells"],
                                           ["miniworld", "SHAPES"], ["not_there"], ["plan_cache"], ["secret"]]
    problems = api_problems(uses, exported_names())
    assert problems == [
        "99_try.ipynb cell 0: sl.data.miniworld_tasks.target_cells: 'miniworld_tasks' is not a public name of sl.data",
        "99_try.ipynb cell 0: sl.not_there: 'not_there' is not exported by safelib/__init__.py",
        "99_try.ipynb cell 2: sl.secret: 'secret' is not exported by safelib/__init__.py",
    ]


# ---------------------------------------------------------------- docstrings point at chapters that exist

NOTEBOOK_PATH = re.compile(r"notebooks/((?:\d\d|[A-Z]\d)_\w+)(?:\.ipynb)?")
QUOTED_TITLE = re.compile(r'"([^"\n]+)"\s+(?:chapter|section)\b|(?:chapter|section|Taught in)\s+"([^"\n]+)"')
UNNAMED_CHAPTER = re.compile(r"(?<![\"\w])([\w'-]+)\s+(?:chapter|section)\b(?!\s*\")")
GENERIC = {"this", "next", "previous", "each", "every", "a", "the", "one", "new", "that", "its", "which", "in", "of",
           "to", "see", "and", "or"}


def headings(notebooks=NOTEBOOKS) -> dict[str, set[str]]:
    """Notebook stem -> its Markdown headings, whole and up to the first colon ("Attention pooling")."""
    out = {}
    for path in notebooks:
        lines = [line.lstrip("#").strip() for cell in json.loads(path.read_text())["cells"]
                 if cell["cell_type"] == "markdown" for line in "".join(cell["source"]).splitlines()
                 if line.startswith("#")]
        out[path.stem] = set(lines) | {line.split(":")[0] for line in lines}
    return out


def reference_problems(where: str, text: str, titles: dict[str, set[str]]) -> list[str]:
    problems = []
    known = set().union(*titles.values())
    for line_no, line in enumerate(text.splitlines(), 1):
        at = f"{where}:{line_no}"
        paths = NOTEBOOK_PATH.findall(line)
        problems += [f"{at}: notebooks/{p} does not exist" for p in paths if p not in titles]
        quoted = [a or b for a, b in QUOTED_TITLE.findall(line)]
        problems += [f"{at}: no notebook has a heading {q!r}" for q in quoted if q not in known]
        problems += [f"{at}: '{word} chapter/section' names no notebook (quote a heading, or name notebooks/NN_name)"
                     for word in UNNAMED_CHAPTER.findall(line) if word.lower() not in GENERIC]
        if "Taught in" in line and not (paths or quoted):
            problems.append(f"{at}: 'Taught in' must name a notebook (notebooks/NN_name) or quote its heading")
    return problems


def test_docstrings_name_chapters_that_exist():
    titles = headings()
    problems = []
    for path in sorted((ROOT / "safelib").rglob("*.py")):
        problems += reference_problems(str(path.relative_to(ROOT)), path.read_text(), titles)
    assert not problems, "\n".join(problems)


def test_the_reference_check_catches_dangling_chapters():
    titles = {"01_attention_pooling": {"Attention pooling", "Zero-shot classification"}}
    text = ('Taught in the book\'s "The model" chapter.\nstudied in the ablation chapter\nTaught in chapter 01.\n'
            "see notebooks/07_more.ipynb\n"
            'Taught in notebooks/01_attention_pooling, section "Zero-shot classification"; this chapter is fine')
    assert reference_problems("m.py", text, titles) == [
        "m.py:1: no notebook has a heading 'The model'",
        "m.py:2: 'ablation chapter/section' names no notebook (quote a heading, or name notebooks/NN_name)",
        "m.py:3: 'Taught in' must name a notebook (notebooks/NN_name) or quote its heading",
        "m.py:4: notebooks/07_more does not exist",
    ]
