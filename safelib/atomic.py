"""Atomic writes: a reader sees the old file or the whole new one, never half of one.

Records, sample ids, cache manifests, classifiers and checkpoints all go through `atomic_path`,
so a run killed mid-write (or two job-array shards on a shared filesystem) leaves nothing partial.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
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
    # the owner (host and pid) is in the name, so a later write can tell a dead writer's leftover
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}-", suffix=".tmp")
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
    remove_dead_owners(path.parent, f".{path.name}.", ".tmp")


def host_tag() -> str:
    """This machine's name, safe in a file name: a pid means something only on its own host."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """``<host>-<pid>``: put in the name of a temporary file or folder, so that a later process can tell
    whether its writer was killed (``remove_dead_owners``)."""
    return f"{host_tag()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process of this host exists (signal 0 checks, delivers nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_dead_owners(folder: str | os.PathLike, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the entries ``<prefix><host>-<pid>-*<suffix>`` of ``folder`` whose process (of this host) is gone.

    What a kill -9 leaves behind (a half-written file, a calibration sample) is removed by the next
    process that looks; an entry whose writer still runs (another shard) is never touched. Another
    host's entries are kept: its pids mean nothing here. Nothing is removed on Windows, where
    ``os.kill(pid, 0)`` would end the process.
    """
    if os.name != "posix":
        return []
    pattern = re.compile(re.escape(f"{prefix}{host_tag()}-") + r"(\d+)-.*" + re.escape(suffix) + "$")
    removed = []
    for entry in Path(folder).glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        match = pattern.match(entry.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue  # removed by another process first, or not ours to remove
    return removed



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
