"""Run records on disk and their provenance: one JSON file per run, written atomically.

A record is written to a temporary name in its folder, flushed to disk, then renamed, so job-array
shards on a shared filesystem never interleave and a killed run leaves no partial record (a hard
kill may leave a ``.tmp`` file, which nothing ever reads as a record).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..atomic import atomic_write_json
from .._version import __version__

RECORD_FORMAT = "safelib.run/1"
RECORD_SUFFIX = ".run.json"
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "numpy", "scikit-learn", "safetensors", "pandas")


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Package version (stamped at build), git commit when run from a checkout, library versions."""

    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    commit, dirty = _git_state(Path(__file__).resolve().parents[2])
    return {
        "safelib_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": libraries,
    }


def _git_state(where: Path) -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes to tracked files) of the checkout holding safelib, or (None, None)."""
    if not (where / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write a record atomically: a temporary file in the same folder, fsync, then rename.

    Records are strict JSON (a strict parser rejects bare ``NaN``): a non-finite number is written
    as null, and ``non_finite`` says where it was and what it was (e.g. ``{"chosen.val_loss": "nan"}``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    notes: dict[str, str] = {}
    strict = _finite_or_null(jsonable(dict(record)), "", notes)
    if notes:
        strict["non_finite"] = notes
    return atomic_write_json(path, strict, sort_keys=True, allow_nan=False)


def _finite_or_null(value: Any, where: str, notes: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        notes[where] = repr(value)  # 'nan', 'inf', '-inf'
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{where}.{k}" if where else k, notes) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    return value


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A run record; a file that is not one says so."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid run record (broken JSON: {error})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a {RECORD_FORMAT} run record")
    return record


def jsonable(value: Any) -> Any:
    """Plain JSON values: tuples become lists, numpy and torch scalars become numbers."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return value  # str, int, float (non-finite ones become null in write_record), bool, None
