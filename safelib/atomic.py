"""Atomic writes: a reader sees the old file or the whole new one, never half of one.

Records, sample ids, cache manifests, classifiers and checkpoints all go through `atomic_path`,
so a run killed mid-write (or two job-array shards on a shared filesystem) leaves nothing partial.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it onto `path`.

    The temporary file lives in the same folder (a rename across filesystems is not atomic) and
    gets the permissions a plain `open()` would give, not mkstemp's owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_options: Any) -> Path:
    """`json.dumps(obj, **dump_options)` written atomically (indent=1 unless told otherwise)."""
    dump_options.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **dump_options))
