"""A grid file -> the list of cases it names, each checked before anything runs.

A grid file (YAML) names notebooks, parameters they share, a cross-product and explicit cases::

    notebook_dir: ..            # where notebooks are named from and run (default: the grid's folder)
    notebooks: [grids/run_protocol]   # each crossed with `grid`
    parameters: {backbone: miniclip}  # shared by every case
    grid: {dataset: [a, b], shots: [1, 16], seed: [1, 2, 3]}
    cases:                      # explicit cases; each may carry its own `grid` and a `name`
      - {notebook: 01_attention_pooling, name: tiny, parameters: {n_maps: 3}}

Checking is strict because papermill is not: it only warns about a parameter the notebook does not
declare, and YAML silently reads ``1e-3`` as a string. Every problem of every case is collected
and reported at once, naming the case, the parameter, the value and what is allowed.
"""
from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import papermill
import yaml

from ..clip.models import valid_model_names
from ..data import list_datasets
from ..methods import METHODS, method_config
from ..methods.base import LOST_FLOAT
from .case import Case

GRID_KEYS = ("notebook_dir", "notebooks", "parameters", "grid", "cases")
CASE_KEYS = ("notebook", "name", "parameters", "grid")
# Parameters the runner sets itself (inside DIR), whenever the notebook declares them.
RUNNER_PARAMETERS = ("out_dir", "cache_dir")
# Parameter names whose values must be registered names.
_DATASET_KEYS = ("dataset", "test_dataset")
_MODEL_KEYS = ("model", "backbone")
_METHOD_KEYS = ("method", "methods")


class GridError(ValueError):
    """A grid file that is wrong; the message lists every problem found, each naming case and field."""


@dataclass(frozen=True)
class Grid:
    """A parsed grid: where its notebooks live and the cases it names (checked, in file order)."""

    path: Path
    notebook_dir: Path
    cases: tuple[Case, ...]


def load_grid(path: str | Path) -> Grid:
    """Read, expand and check a grid file; raise ``GridError`` listing every problem."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise GridError(f"{path}: cannot read the grid file ({error})") from None
    if not isinstance(spec, Mapping):
        raise GridError(f"{path}: a grid file is a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; valid: {', '.join(GRID_KEYS)}")
    notebook_dir = (path.parent / str(spec.get("notebook_dir", "."))).resolve()
    shared = _mapping(spec.get("parameters"), f"{path}: parameters")
    blocks: list[dict[str, Any]] = []
    if spec.get("notebooks") is not None:
        notebooks = spec["notebooks"]
        if isinstance(notebooks, str) or not isinstance(notebooks, list):
            raise GridError(f"{path}: notebooks must be a list of notebook names, got {notebooks!r}")
        blocks += [{"notebook": nb, "grid": spec.get("grid")} for nb in notebooks]
    elif spec.get("grid") is not None:
        raise GridError(f"{path}: a top-level grid needs a list of notebooks to cross it with")
    cases_spec = spec.get("cases") or []
    if not isinstance(cases_spec, list):
        raise GridError(f"{path}: cases must be a list of {{notebook, name, parameters, grid}}, got {cases_spec!r}")
    for i, entry in enumerate(cases_spec):
        if not isinstance(entry, Mapping) or "notebook" not in entry:
            raise GridError(f"{path}: cases[{i}] must be a mapping with a notebook, got {entry!r}")
        bad = sorted(set(entry) - set(CASE_KEYS))
        if bad:
            raise GridError(f"{path}: cases[{i}]: unknown key(s) {bad}; valid: {', '.join(CASE_KEYS)}")
        blocks.append(dict(entry))
    if not blocks:
        raise GridError(f"{path}: the grid names no cases (give notebooks + grid, or cases)")

    cases: list[Case] = []
    problems: list[str] = []
    declared_cache: dict[Path, dict[str, Any]] = {}
    for block in blocks:
        notebook = _notebook_path(notebook_dir, str(block["notebook"]))
        if not notebook.is_file():
            problems.append(f"notebook {block['notebook']!r}: no such notebook {notebook}")
            continue
        if notebook not in declared_cache:
            declared_cache[notebook] = declared_parameters(notebook)
        declared = declared_cache[notebook]
        axes = _mapping(block.get("grid"), f"{path}: grid of {block['notebook']}")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                problems.append(f"{notebook.stem}: grid.{key} must be a non-empty list of values, got {values!r}")
        axes = {k: v for k, v in axes.items() if isinstance(v, list) and v}
        own = _mapping(block.get("parameters"), f"{path}: parameters of {block['notebook']}")
        for combination in itertools.product(*axes.values()):
            varying = dict(zip(axes, combination))
            parameters = {**shared, **own, **varying}
            case = Case(notebook=notebook.relative_to(notebook_dir).with_suffix("").as_posix(),
                        parameters=parameters, varying=tuple(varying), name=block.get("name"))
            problems += [f"{case.label}: {p}" for p in check_parameters(parameters, declared)]
            cases.append(case)
    seen: dict[str, Case] = {}
    for case in cases:
        if case.key in seen:
            problems.append(f"{case.label}: the same notebook and parameters appear twice in the grid")
        seen[case.key] = case
    if problems:
        listed = "\n  ".join(dict.fromkeys(problems))
        raise GridError(f"{path}: {len(dict.fromkeys(problems))} problem(s), nothing was run:\n  {listed}")
    return Grid(path=path, notebook_dir=notebook_dir, cases=tuple(seen.values()))


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """The parameters a notebook's ``parameters`` cell declares, with their default values."""
    declared = {}
    for name, info in papermill.inspect_notebook(str(notebook)).items():
        try:
            declared[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            declared[name] = _UNKNOWN
    return declared


_UNKNOWN = object()  # a default that is an expression, not a literal: any type is accepted


def check_parameters(parameters: Mapping[str, Any], declared: Mapping[str, Any]) -> list[str]:
    """Every problem of one case's parameters: undeclared names, wrong types, unknown registered names."""
    problems = []
    for name, value in parameters.items():
        if name not in declared:
            problems.append(f"parameter {name!r} is not declared by the notebook's parameters cell "
                            f"(declared: {', '.join(declared)})")
            continue
        if name in RUNNER_PARAMETERS:
            problems.append(f"parameter {name!r} is set by the runner (inside --out DIR); remove it from the grid")
            continue
        problems += _type_problems(name, value, declared[name])
        problems += _name_problems(name, value)
    return problems


def _type_problems(where: str, value: Any, default: Any) -> list[str]:
    """Wrong types against the declared default (recursing into dicts and lists)."""
    if isinstance(value, str) and LOST_FLOAT.match(value.strip()) and not isinstance(default, str):
        return [f"{where} = {value!r} is a string: YAML reads a float without a dot in its mantissa as text; "
                f"write {_with_dot(value)} instead"]
    if isinstance(value, Mapping):
        inner = default if isinstance(default, Mapping) else {}
        nested = [p for k, v in value.items() for p in _type_problems(f"{where}.{k}", v, inner.get(k, _UNKNOWN))]
        if default is _UNKNOWN or default is None or isinstance(default, Mapping):
            return nested
    elif isinstance(value, list):
        nested = [p for i, v in enumerate(value) for p in _type_problems(f"{where}[{i}]", v, _UNKNOWN)]
        if default is _UNKNOWN or default is None or isinstance(default, (list, tuple)):
            return nested
    if default is _UNKNOWN or default is None or value is None:
        return []
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if ok:
        return []
    return [f"{where} = {value!r} is a {type(value).__name__}; the notebook's default {default!r} "
            f"is a {type(default).__name__}"]


def _with_dot(text: str) -> str:
    mantissa, exponent = re.split(r"[eE]", text.strip())
    return f"{mantissa}.0e{exponent}"


def _name_problems(name: str, value: Any) -> list[str]:
    """Unknown dataset, model or method names (checked against the registries)."""
    problems = []

    def check(kind: str, item: Any, valid: list[str]) -> None:
        if item is not None and item not in valid:
            problems.append(f"{name}: unknown {kind} {item!r}; valid: {', '.join(valid)}")

    values = value if isinstance(value, list) else [value]
    if name in _DATASET_KEYS:
        for item in values:
            check("dataset", item, list_datasets())
    elif name in _MODEL_KEYS:
        for item in values:
            check("model", item, list(valid_model_names()))
    elif name in _METHOD_KEYS:
        for item in values:
            check("method", item, list(METHODS))
    elif name == "method_configs" and isinstance(value, Mapping):
        for method, overrides in value.items():
            if method not in METHODS:
                check("method", method, list(METHODS))
                continue
            settings = overrides if isinstance(overrides, list) else [overrides]  # run_grid: one run per setting
            for i, setting in enumerate(settings):
                where = f"method_configs.{method}" + (f"[{i}]" if isinstance(overrides, list) else "")
                try:
                    method_config(method, dict(setting or {}))
                except (ValueError, TypeError) as error:
                    problems.append(f"{where}: {error}")
    return problems


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridError(f"{where} must be a mapping of name: value, got {value!r}")
    return dict(value)


def _notebook_path(notebook_dir: Path, name: str) -> Path:
    path = notebook_dir / name
    return (path if path.suffix == ".ipynb" else path.with_suffix(".ipynb")).resolve()
