"""What a folder of images holds: a content digest that a feature cache can key on.

A cache keyed by image ids alone serves old features after an image is replaced, and even after
one is deleted. Generated sets need nothing more (their pixels are a function of their name and
options), but a folder's pixels are whatever its files hold. So a folder-backed ``ImageSet`` is
fingerprinted by every file's size and content hash: copying the folder elsewhere keeps the
fingerprint, editing one image changes it.

Hashing a test split (ImageNet's is 6.4 GB) on every run would cost minutes, so each file's hash is
remembered in a small JSON memo beside the cache, keyed by path, size, ``mtime_ns`` and
``ctime_ns``. The memo only avoids rehashing; it never decides the identity. A read-only cache
folder just means no memo is written.

A run on a user-registered (``kind="custom"``) dataset is named by the same digests
(``dataset_files_digest``), so a rerun after its images changed is a new run, not the old record.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import atomic_write_json
from .imageset import FolderReader, ImageSet
from .registry import dataset_spec, get_dataset

MEMO_VERSION = 1
_READ_BYTES = 1 << 20


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _memo_path(memo_dir: Path, root: Path) -> Path:
    """One memo per image folder, named by its absolute path (the memo is about this copy's files)."""
    return memo_dir / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"


def _read_memo(path: Path, root: Path) -> dict[str, list]:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict) or memo.get("version") != MEMO_VERSION or memo.get("root") != str(root):
        return {}
    files = memo.get("files")
    return files if isinstance(files, dict) else {}


def image_files_digest(images: ImageSet, memo_dir: str | os.PathLike | None = None) -> str | None:
    """A 16-hex-digit digest of the files behind ``images`` (their ids, sizes and contents), or None
    when the set is not read from a folder (generated sets: their name already says what they hold).

    ``memo_dir``: where the hash memo lives (a folder beside the feature cache); None hashes every
    file. A listed file that no longer exists raises ``FileNotFoundError`` naming it.
    """
    if not isinstance(images.reader, FolderReader):
        return None
    root = Path(images.reader.root).resolve()
    memo_file = None if memo_dir is None else _memo_path(Path(memo_dir), root)
    memo = {} if memo_file is None else _read_memo(memo_file, root)
    changed = False
    digest = hashlib.blake2b(digest_size=8)
    for image_id in sorted(set(images.ids)):
        path = images.reader.path(image_id)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {image_id!r} of {images.name or 'an image set'} is gone: {path} does not "
                                    "exist. The folder changed since its split was listed; restore the file or "
                                    "fix the split file") from None
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        seen = memo.get(image_id)
        if not (isinstance(seen, list) and seen[:3] == stamp and len(seen) == 4):
            seen = memo[image_id] = [*stamp, _file_hash(path)]
            changed = True
        digest.update(json.dumps([image_id, stat.st_size, seen[3]]).encode())
    if changed and memo_file is not None:
        try:
            atomic_write_json(memo_file, {"version": MEMO_VERSION, "root": str(root), "files": memo}, indent=None)
        except OSError:
            pass  # a read-only cache folder: the digest is right, only the next call hashes again
    return digest.hexdigest()


def dataset_files_digest(name: str, root: str | os.PathLike | None = None, options: Mapping[str, Any] | None = None,
                         splits: Sequence[str] = ("train", "val", "test"),
                         memo_dir: str | os.PathLike | None = None) -> str | None:
    """A digest of the files behind ``splits`` of a user-registered (``kind="custom"``) dataset, or None.

    Only custom datasets are loaded and read: the registry's benchmarks and offline sets are fixed,
    published files (a run's identity on them must stay computable without them, and hashing
    ImageNet would cost minutes), and generated sets' names and options say what they hold. A custom
    set is whatever its folder holds now. None too when none of its splits is read from a folder.
    """
    if dataset_spec(name).kind != "custom":
        return None
    dataset = get_dataset(name, root, **dict(options or {}))
    return joined_digest({split: image_files_digest(images, memo_dir) for split in splits
                          if (images := getattr(dataset, split)) is not None})


def joined_digest(parts: Mapping[str, str | None]) -> str | None:
    """One 16-hex-digit digest of named digests (those that are None left out); None when all are."""
    kept = {name: d for name, d in parts.items() if d is not None}
    if not kept:
        return None
    return hashlib.blake2b(json.dumps(kept, sort_keys=True).encode(), digest_size=8).hexdigest()
