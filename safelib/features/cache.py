"""The on-disk array cache: one format for dense maps and pooled features.

SAFE trains only ``attnpool``, so the frozen trunk runs once per image view and everything after
reads these arrays. This module is the format and nothing else (no CLIP, no images): it is the
single source of truth that ``safelib.features.extract`` writes and every method reads. Where the arrays
then live while training (GPU, pinned RAM, memmap streamed in chunks) is the caller's choice.

One entry is a folder ``<root>/<key>/``::

    manifest.json   what the arrays are: the key's fields, rows, item shape, dtype, views, chunk rows
    view_000.npy    one contiguous .npy per augmented view, rows x item shape (memory-mappable)
    ...
    progress.json   while writing: rows done and their per-chunk checksums (lets a rerun resume)
    complete.json   written last, atomically: per-view, per-chunk checksums. No marker, no entry.

``key = cache_key(fields)`` hashes every field that changes the arrays plus ``FORMAT_VERSION``.
Opening checks the marker, the manifest's fields against the key, the file sizes and (by default)
every chunk's checksum, and raises ``CacheError`` saying which; ``CacheWriter`` then resumes from the
last checksummed chunk of an interrupted write, or starts over when nothing there can be trusted.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np
import torch

from ..atomic import atomic_write_json

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock
    fcntl = None

FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
CACHE_DTYPE = "float16"  # what dense maps are stored as, unless a writer asks for float32
BYTES_PER_VALUE = np.dtype(CACHE_DTYPE).itemsize  # 2: the one place the planner and calibration size maps from
VERIFY_MODES = ("full", "size", "none")
MANIFEST, PROGRESS, MARKER = "manifest.json", "progress.json", "complete.json"
CHUNK_BYTES = 64 * 2**20  # checksum granularity: small enough to resume often, big enough to hash fast


class CacheError(RuntimeError):
    """A cache entry that must not be used; ``reason`` is one of missing, incomplete, corrupt, mismatch."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"cache entry {path} is {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def _unbuildable(path: Path, fields: Mapping[str, Any], error: OSError) -> CacheError:
    """The two facts a user needs when an entry must be (re)built where nothing may be written:
    what is wrong with the entry, and that its folder is read-only (not a bare PermissionError)."""
    try:
        open_entry(path, fields, "full")
        reason, detail = "incomplete", "another process may be writing it"
    except CacheError as bad:
        reason, detail = ("missing", "there is no such entry") if not path.exists() else (bad.reason, bad.detail)
    where = "is read-only" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "cannot be changed"
    return CacheError(path, reason, f"{detail}. It must be (re)built, but the cache folder {where} ({error}). Make "
                                    "it writable, or point cache_dir at a writable copy of the cache")


def _canonical(fields: Mapping[str, Any]) -> dict:
    """Fields as JSON would give them back, so a written manifest compares equal to a fresh request."""
    try:
        return json.loads(json.dumps(dict(fields), sort_keys=True))
    except TypeError as err:
        raise TypeError(f"cache key fields must be JSON values (str, int, float, bool, None, lists, "
                        f"dicts); got {err}") from None


def cache_key(fields: Mapping[str, Any]) -> str:
    """A 24-hex-digit name for everything that changes the cached arrays (and the format version)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **_canonical(fields)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def ids_digest(ids: list | tuple) -> str:
    """A short hash of the sampled image ids: the key must change when the sample does."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()[:16]


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, sort_keys=True)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _chunk_digest(rows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(rows).data, digest_size=16).hexdigest()


def _view_name(view: int) -> str:
    return f"view_{view:03d}.npy"


@dataclass(frozen=True)
class CacheEntry:
    """A complete, verified entry: read-only memmaps, one per view (``entry[k]`` is rows x item).

    Dense maps' entries become the one dense-map type with ``safelib.features.maps.DenseMaps.of(entry)``.
    """

    path: Path
    manifest: dict
    view_arrays: tuple[np.memmap, ...]

    @property
    def fields(self) -> dict:
        return self.manifest["fields"]

    @property
    def num_views(self) -> int:
        return len(self.view_arrays)

    @property
    def num_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["item_shape"])

    def __len__(self) -> int:
        return self.num_views

    def __getitem__(self, view: int) -> np.memmap:
        return self.view_arrays[view]

    def rows(self, view: int, index: np.ndarray | torch.Tensor | slice) -> torch.Tensor:
        """Rows of one view as a fresh tensor in the stored dtype (sorted fancy index reads fastest)."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(np.array(self.view_arrays[view][index]))  # a copy: the memmap is read-only

    def to_tensor(self, view: int | None = None) -> torch.Tensor:
        """Everything in RAM: views x rows x item (or one view's rows x item)."""
        if view is not None:
            return torch.from_numpy(np.array(self.view_arrays[view]))
        return stack_views(self.view_arrays)


def stack_views(view_arrays) -> torch.Tensor:
    """Per-view arrays (a ``CacheEntry``, memmaps, arrays) read into one tensor ``views x rows x item`` in RAM."""
    return torch.from_numpy(np.stack([np.asarray(v) for v in view_arrays]))


def _check_manifest(path: Path, fields: Mapping[str, Any] | None) -> dict:
    try:
        manifest = _read_json(path / MANIFEST)
    except (OSError, ValueError) as err:
        raise CacheError(path, "incomplete", f"no readable {MANIFEST} ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(path, "mismatch", f"format version {manifest.get('format_version')}, "
                                           f"this safelib reads {FORMAT_VERSION}")
    if fields is not None and manifest.get("fields") != _canonical(fields):
        raise CacheError(path, "mismatch", f"manifest fields {manifest.get('fields')} differ from "
                                           f"the requested {_canonical(fields)}")
    return manifest


def _open_views(path: Path, manifest: dict, names: list[str], mode: str) -> list[np.memmap]:
    shape = (manifest["rows"], *manifest["item_shape"])
    view_arrays = []
    for name in names:
        try:
            arr = np.load(path / name, mmap_mode=mode)
        except (OSError, ValueError) as err:
            raise CacheError(path, "corrupt", f"{name} does not open as .npy ({err})") from None
        if arr.shape != shape or arr.dtype != np.dtype(manifest["dtype"]):
            raise CacheError(path, "corrupt", f"{name} is {arr.dtype} {arr.shape}, manifest says "
                                              f"{manifest['dtype']} {shape}")
        view_arrays.append(arr)
    return view_arrays


def _verify_chunks(path: Path, view_arrays: list[np.memmap], names: list[str], chunk_rows: int,
                   checksums: list[list[str]], rows: int) -> None:
    """Compare each chunk of each view with its recorded checksum, up to ``rows`` rows."""
    for view, name, sums in zip(view_arrays, names, checksums):
        starts = range(0, rows, chunk_rows)
        if len(sums) != len(starts):
            raise CacheError(path, "corrupt", f"{name}: {len(sums)} checksums for {len(starts)} chunks")
        for chunk, (start, expected) in enumerate(zip(starts, sums)):
            if _chunk_digest(view[start:min(start + chunk_rows, rows)]) != expected:
                raise CacheError(path, "corrupt", f"{name} chunk {chunk} (rows {start}..) fails its checksum")


def open_entry(path: str | os.PathLike, fields: Mapping[str, Any] | None = None,
               verify: Literal["full", "size", "none"] = "full") -> CacheEntry:
    """Open a complete entry read-only, or raise ``CacheError`` saying why it must not be used.

    ``verify="full"`` re-hashes every chunk (about a second per GB); ``"size"`` trusts the bytes and
    checks only shapes; ``"none"`` also skips comparing ``fields`` with the manifest.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}; valid: {', '.join(VERIFY_MODES)}")
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CacheError(path, "incomplete", f"no {MARKER} (the write never finished)")
    manifest = _check_manifest(path, None if verify == "none" else fields)
    try:
        marker = _read_json(path / MARKER)
    except (OSError, ValueError) as err:
        raise CacheError(path, "corrupt", f"{MARKER} unreadable ({err})") from None
    names = [_view_name(k) for k in range(manifest["views"])]
    view_arrays = _open_views(path, manifest, names, "r")
    if verify == "full":
        _verify_chunks(path, view_arrays, names, manifest["chunk_rows"], marker["checksums"], manifest["rows"])
    return CacheEntry(path, manifest, tuple(view_arrays))


@contextlib.contextmanager
def entry_lock(root: str | os.PathLike, fields: Mapping[str, Any]) -> Iterator[None]:
    """Hold ``<root>/<key>.lock`` so that two processes never build one entry at once.

    An OS file lock (``flock``): the kernel drops it when its holder dies, so a killed build
    never leaves a stale lock. Where ``fcntl`` is missing (Windows) this does nothing.
    """
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        handle = open(Path(root) / f"{cache_key(fields)}.lock", "a")
    except PermissionError as err:
        raise _unbuildable(Path(root) / cache_key(fields), fields, err) from err
    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def find_entry(root: str | os.PathLike, fields: Mapping[str, Any],
               verify: Literal["full", "size", "none"] = "full") -> CacheEntry | None:
    """The usable entry for ``fields`` under ``root``, or None (absent, incomplete, corrupt, mismatched)."""
    path = Path(root) / cache_key(fields)
    try:
        return open_entry(path, fields, verify)
    except CacheError:
        return None


class CacheWriter:
    """Fill one entry row-batch by row-batch; resumes an interrupted write; ``finish()`` publishes it.

    Rows arrive as ``views x B x item`` in order. Every ``chunk_rows`` rows the data is flushed and
    its checksums recorded in ``progress.json``, so a rerun continues from ``start_row``.
    """

    def __init__(self, root: str | os.PathLike, fields: Mapping[str, Any], rows: int,
                 item_shape: tuple[int, ...], views: int = 1, dtype: str = CACHE_DTYPE,
                 chunk_rows: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
        if rows < 1 or views < 1 or any(int(s) < 1 for s in item_shape):
            raise ValueError(f"need rows >= 1, views >= 1 and a positive item shape; got rows={rows}, "
                             f"views={views}, item_shape={tuple(item_shape)}")
        row_bytes = int(np.prod(item_shape)) * np.dtype(dtype).itemsize
        self.fields = _canonical(fields)
        self.path = Path(root) / cache_key(fields)
        self.manifest = {
            "format_version": FORMAT_VERSION, "fields": self.fields, "rows": int(rows),
            "item_shape": [int(s) for s in item_shape], "views": int(views), "dtype": dtype,
            "chunk_rows": int(chunk_rows or max(1, CHUNK_BYTES // row_bytes)),
        }
        self.names = [_view_name(k) + ".partial" for k in range(views)]
        self.checksums: list[list[str]] = [[] for _ in range(views)]
        self._buffered_from = 0  # first row not yet checksummed
        self.start_row = self._resume_or_create()
        self.row = self.start_row

    def _resume_or_create(self) -> int:
        """Reuse an interrupted write of the same manifest after verifying its chunks; else start over."""
        try:
            existing = _read_json(self.path / MANIFEST)
            # an interrupted write keeps its own chunking; every other field must match
            if existing == {**self.manifest, "chunk_rows": existing.get("chunk_rows")} \
                    and not (self.path / MARKER).exists():
                self.manifest = existing
                progress = _read_json(self.path / PROGRESS)
                view_arrays = _open_views(self.path, self.manifest, self.names, "r+")
                _verify_chunks(self.path, view_arrays, self.names, self.manifest["chunk_rows"],
                               progress["checksums"], progress["rows"])
                self._views, self.checksums = view_arrays, progress["checksums"]
                self._buffered_from = progress["rows"]
                return int(progress["rows"])
        except (OSError, ValueError, KeyError, CacheError):
            pass
        try:  # no ignore_errors: a read-only folder must say so, not fail later on mkdir
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
        except OSError as err:
            raise _unbuildable(self.path, self.fields, err) from err
        _atomic_write_json(self.path / MANIFEST, self.manifest)
        shape = (self.manifest["rows"], *self.manifest["item_shape"])
        self._views = [np.lib.format.open_memmap(self.path / n, mode="w+", dtype=self.manifest["dtype"],
                                                 shape=shape) for n in self.names]
        self._record_progress()
        return 0

    def _record_progress(self) -> None:
        _atomic_write_json(self.path / PROGRESS, {"rows": self._buffered_from, "checksums": self.checksums})

    def _close_chunks(self, upto: int) -> None:
        """Checksum every whole chunk (and the last partial one at the end) below row ``upto``."""
        chunk = self.manifest["chunk_rows"]
        closed = False
        while self._buffered_from < upto and (upto - self._buffered_from >= chunk or upto == self.manifest["rows"]):
            end = min(self._buffered_from + chunk, upto)
            for view, sums in zip(self._views, self.checksums):
                view.flush()
                sums.append(_chunk_digest(view[self._buffered_from:end]))
            self._buffered_from, closed = end, True
        if closed:
            self._record_progress()

    def write(self, rows: torch.Tensor | np.ndarray) -> None:
        """Append ``views x B x item`` rows (any float dtype; stored in the entry's dtype)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu", torch.float32).numpy()
        expected = (self.manifest["views"], *self.manifest["item_shape"])
        if rows.ndim != len(expected) + 1 or (rows.shape[0], *rows.shape[2:]) != expected:
            raise ValueError(f"rows must be views x B x item = {expected[0]} x B x {expected[1:]}; "
                             f"got {tuple(rows.shape)}")
        end = self.row + rows.shape[1]
        if end > self.manifest["rows"]:
            raise ValueError(f"writing rows {self.row}..{end} overflows an entry of {self.manifest['rows']} rows")
        with np.errstate(over="ignore"):  # overflow is reported just below, with advice
            stored = rows.astype(self.manifest["dtype"])
        if not np.isfinite(stored).all():
            raise ValueError(f"rows hold non-finite values in {self.manifest['dtype']} (overflow?); "
                             "store them as dtype='float32' or check the model")
        for view, data in zip(self._views, stored):
            view[self.row:end] = data
        self.row = end
        self._close_chunks(end)

    def finish(self, verify: Literal["full", "size", "none"] = "size") -> CacheEntry:
        """Publish: rename the views into place, then write the marker last; returns the entry."""
        if self.row != self.manifest["rows"]:
            raise RuntimeError(f"finish() after {self.row} of {self.manifest['rows']} rows")
        for view in self._views:
            view.flush()
        del self._views
        for name in self.names:
            os.replace(self.path / name, self.path / name.removesuffix(".partial"))
        _atomic_write_json(self.path / MARKER, {"checksums": self.checksums})
        (self.path / PROGRESS).unlink(missing_ok=True)
        return open_entry(self.path, self.fields, verify)
