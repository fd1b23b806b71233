"""The package's shape, read from its source with `ast`: wings import only downwards, no two modules
import each other, and no module hides an import of safelib (or of the standard library) inside a function.

The wings, bottom up (``docs/ARCHITECTURE.md`` says what each holds):

    ground      atomic, seeding, _version
    clip        the model
    data        datasets, templates, the mini-world
    features    dense maps: extraction, cache, placement
    methods     the fit/predict protocol, SAFE, the baselines
    perf        the cache planner, calibration
    runs        RunConfig -> record, aggregation
    book, experiments   figures and widgets; the mini-CLIP's pretraining and acceptance (siblings)
    reproduce   the paper's tables, end to end
    top         the facade ``safelib/__init__.py`` and every ``__main__`` module (may import anything)

A module may import from its own wing or any wing below it. Imports under ``if TYPE_CHECKING:``
never run, so they cannot close a cycle and are left out of the cycle check; they are held to the
wing rule like any other (a type hint that names a higher wing is an upward dependency too).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "safelib"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Bottom up. Wings on one rank are siblings: neither may import the other.
WINGS: tuple[tuple[str, ...], ...] = (
    ("ground",),
    ("clip",),
    ("data",),
    ("features",),
    ("methods",),
    ("perf",),
    ("runs",),
    ("book", "experiments"),
    ("reproduce",),
    ("top",),
)
RANK = {wing: rank for rank, wings in enumerate(WINGS) for wing in wings}
GROUND_MODULES = {"atomic", "seeding", "_version"}


@dataclass(frozen=True)
class Import:
    source: str          # importing module, dotted
    target: str          # imported module, dotted (a safelib module or a top-level third-party name)
    line: int
    local: bool          # inside a function
    type_only: bool      # under `if TYPE_CHECKING:`


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def wing_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[-1] == "__main__":
        return "top"  # the facade, and command-line entry points
    if parts[1] in GROUND_MODULES:
        return "ground"
    if parts[1] not in RANK:
        raise AssertionError(f"{module}: wing {parts[1]!r} is not listed in WINGS of {__file__}; add it at its rank")
    return parts[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, local: bool = False, type_only: bool = False):
    """(import node, inside a function, under TYPE_CHECKING) for every import in the tree."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local, type_only
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, True, type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), local, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), local, type_only)
        else:
            yield from _walk(child, local, type_only)


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """Every import in `path`, resolved: `from . import x` names module `.x` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, local, type_only in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        for target in dict.fromkeys(targets):
            found.append(Import(module, target, node.lineno, local, type_only))
    return found


def import_graph(root: Path = ROOT) -> list[Import]:
    known = modules(root)
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def _internal(imp: Import) -> bool:
    return imp.target == PACKAGE or imp.target.startswith(PACKAGE + ".")


def upward_imports(graph: list[Import]) -> list[str]:
    problems = []
    for imp in filter(_internal, graph):
        source, target = wing_of(imp.source), wing_of(imp.target)
        if source == target or RANK[target] < RANK[source]:
            continue
        what = "a sibling" if RANK[target] == RANK[source] else "a higher"
        problems.append(f"{imp.source}:{imp.line} imports {imp.target}: wing {target!r} is {what} wing than {source!r}")
    return problems


def import_cycles(graph: list[Import]) -> list[list[str]]:
    """Strongly connected groups of modules (two or more) in the graph of imports that run."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        if _internal(imp) and not imp.type_only and imp.source != imp.target:
            edges.setdefault(imp.source, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the package is far too small to need iteration
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def hidden_imports(graph: list[Import]) -> list[str]:
    """Function-local imports of safelib or the standard library: they hide dependencies and cycles.

    A third-party package may be imported where it is used (ipywidgets, papermill, playwright: optional,
    or heavy to import), so that `import safelib` works without it.
    """
    problems = []
    for imp in graph:
        if imp.local and (_internal(imp) or imp.target.split(".")[0] in sys.stdlib_module_names):
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function")
    return problems


GRAPH = import_graph()


def test_every_module_has_a_wing():
    for name in modules():
        assert wing_of(name) in RANK


def test_no_module_imports_from_a_higher_wing():
    problems = upward_imports(GRAPH)
    assert not problems, "imports that run up the wings:\n" + "\n".join(problems)


def test_no_modules_import_each_other():
    cycles = import_cycles(GRAPH)
    assert not cycles, "modules that import each other (directly or round a loop):\n" + "\n".join(
        " <-> ".join(group) for group in cycles)


def test_imports_are_at_module_level():
    problems = hidden_imports(GRAPH)
    assert not problems, "function-local imports of safelib or the standard library:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the checks themselves can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_planted_upward_import_is_caught(tmp_path):
    root = _tree(tmp_path, {
        "clip/__init__.py": "", "clip/models.py": "from ..runs.runner import run\n",
        "runs/__init__.py": "", "runs/runner.py": "from ..clip import models\n",
    })
    graph = import_graph(root)
    assert upward_imports(graph) == [
        "safelib.clip.models:1 imports safelib.runs.runner: wing 'runs' is a higher wing than 'clip'"]
    assert import_cycles(graph) == [["safelib.clip.models", "safelib.runs.runner"]]


def test_sibling_wings_and_the_facade_are_off_limits(tmp_path):
    root = _tree(tmp_path, {
        "book/__init__.py": "", "book/plots.py": "import safelib.experiments.pretrain\n",
        "experiments/__init__.py": "", "experiments/pretrain.py": "",
        "data/__init__.py": "", "data/loading.py": "from .. import __version__\n",
    })
    problems = upward_imports(import_graph(root))
    assert any("'experiments' is a sibling wing than 'book'" in p for p in problems)
    assert any("safelib.data.loading:1 imports safelib: wing 'top'" in p for p in problems)


def test_cycles_within_a_wing_and_type_only_imports(tmp_path):
    root = _tree(tmp_path, {
        "methods/__init__.py": "from .safe import Safe\n",
        "methods/safe.py": "def f():\n    from . import make\n",
        "methods/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .safe import Safe\n",
        "clip/__init__.py": "", "clip/text.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                "    from ..methods.base import X\n",
    })
    graph = import_graph(root)
    assert import_cycles(graph) == [["safelib.methods", "safelib.methods.safe"]]
    assert hidden_imports(graph) == ["safelib.methods.safe:2 imports safelib.methods inside a function"]
    assert upward_imports(graph) == [
        "safelib.clip.text:3 imports safelib.methods.base: wing 'methods' is a higher wing than 'clip'"]


@pytest.mark.parametrize("line, allowed", [("import ipywidgets", True), ("import argparse", False),
                                           ("from ..data import loading", False)])
def test_only_third_party_packages_may_be_imported_in_a_function(tmp_path, line, allowed):
    root = _tree(tmp_path, {"book/__init__.py": "", "book/widgets.py": f"def f():\n    {line}\n"})
    assert (hidden_imports(import_graph(root)) == []) == allowed


def test_the_wings_are_written_down_where_readers_look():
    """The package docstring and docs/ARCHITECTURE.md name every wing this test enforces."""
    import safelib

    architecture = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    for wing in RANK:
        if wing in ("ground", "top"):
            continue
        assert f"{wing}/" in safelib.__doc__, f"safelib/__init__.py's docstring does not list the wing {wing}/"
        assert f"`{wing}/`" in architecture, f"docs/ARCHITECTURE.md does not list the wing {wing}/"
