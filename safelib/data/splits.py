"""Readers for the split sources the few-shot field uses, each returning (train, val, test).

- CoOp's ``split_zhou_<Dataset>.json``: ``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}``
  with paths relative to the dataset's image folder (CoOp's ``read_split``).
- FGVCAircraft's official ``variants.txt`` + ``images_variant_{train,val,test}.txt`` (CoOp reads these,
  not a split_zhou file).
- ImageNet: class folders ``images/train/<wnid>`` and ``images/val/<wnid>``; CoOp tests on val and has
  no validation split, so ``val`` is None and the sampler draws validation images from train.
- ImageNet-V2/-Sketch/-A/-R: test-only class folders named by wnid (or by index, for V2).

Class names are the field's cleaned names: CoOp's names with ``_`` read as spaces (as CoOp's prompt
learner and Tip-Adapter's classifier do). Every file list is sorted, so ids never depend on how a
filesystem happens to list a directory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .imageset import FolderReader, ImageSet, check_confined

Splits = tuple[ImageSet | None, ImageSet | None, ImageSet]  # (train, val, test); None = no such split
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class SplitFormatError(ValueError):
    """A split file exists but does not say what the field's format says."""


def clean_classname(name: str) -> str:
    """CoOp stores ``Apply_Eye_Makeup``; prompts read ``Apply Eye Makeup``."""
    return " ".join(name.replace("_", " ").split())


def _sorted_set(items: Sequence[tuple[str, int]], classnames: tuple[str, ...], image_dir: Path,
                name: str) -> ImageSet:
    items = sorted(items)
    return ImageSet(tuple(p for p, _ in items), tuple(y for _, y in items), classnames,
                    FolderReader(image_dir), name)


def read_coop_split(split_file: Path, image_dir: Path, name: str = "") -> Splits:
    """CoOp's split json -> (train, val, test); class names come from the file itself."""
    split_file, image_dir = Path(split_file), Path(image_dir)
    try:
        data = json.loads(split_file.read_text())
    except json.JSONDecodeError as err:
        raise SplitFormatError(f"{split_file} is not valid JSON ({err}); re-download it from CoOp's "
                               "DATASETS.md link") from err
    missing = [k for k in ("train", "val", "test") if k not in data]
    if missing:
        raise SplitFormatError(f"{split_file} has no {missing} entries; a CoOp split has 'train', 'val' and "
                               f"'test' lists (found keys {sorted(data)})")
    names: dict[int, str] = {}
    parts: dict[str, list[tuple[str, int]]] = {}
    for part in ("train", "val", "test"):
        rows = []
        for row in data[part]:
            if not (isinstance(row, list) and len(row) == 3):
                raise SplitFormatError(f"{split_file} [{part!r}]: each entry must be [path, label, classname], "
                                       f"got {row!r}")
            path, label, classname = str(row[0]), int(row[1]), clean_classname(str(row[2]))
            check_confined(path, f"{split_file} [{part!r}]", SplitFormatError)
            if names.setdefault(label, classname) != classname:
                raise SplitFormatError(f"{split_file}: label {label} is called both {names[label]!r} and "
                                       f"{classname!r}")
            rows.append((path, label))
        parts[part] = rows
    if sorted(names) != list(range(len(names))):
        raise SplitFormatError(f"{split_file}: labels must be 0..K-1 without gaps, got {sorted(names)[:10]}...")
    classnames = tuple(names[k] for k in range(len(names)))
    train, val, test = (_sorted_set(parts[p], classnames, image_dir, f"{name}/{p}") for p in ("train", "val", "test"))
    return train, val, test


def read_fgvc_aircraft(dataset_dir: Path, name: str = "fgvc_aircraft") -> Splits:
    """FGVCAircraft's official variant files: ``<image id> <variant name with spaces>`` per line."""
    dataset_dir = Path(dataset_dir)
    classnames = tuple(line.strip() for line in (dataset_dir / "variants.txt").read_text().splitlines()
                       if line.strip())
    label_of = {c: k for k, c in enumerate(classnames)}
    parts = []
    for part in ("train", "val", "test"):
        path = dataset_dir / f"images_variant_{part}.txt"
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise SplitFormatError(f"{path}:{number}: variant {variant!r} is not in variants.txt")
            rows.append((f"{image}.jpg", label_of[variant]))
        parts.append(_sorted_set(rows, classnames, dataset_dir / "images", f"{name}/{part}"))
    return parts[0], parts[1], parts[2]


def list_images(folder: Path) -> list[str]:
    """Image files directly in ``folder``, sorted, hidden files skipped (CoOp's listdir_nohidden)."""
    with os.scandir(folder) as entries:  # scandir: no extra stat per file (ImageNet train has 1.28M)
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file()
                      and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> list[str]:
    """Sub-folders of ``folder`` (one per class), sorted, hidden ones skipped."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def read_class_folders(image_dir: Path, folder_names: Sequence[str], classnames: Sequence[str],
                       name: str) -> ImageSet:
    """``image_dir/<folder_names[k]>/*`` has label k; ids are ``<folder>/<file>``."""
    image_dir = Path(image_dir)
    rows = []
    for label, folder in enumerate(folder_names):
        sub = image_dir / folder
        if not sub.is_dir():
            raise FileNotFoundError(f"{name}: class folder {sub} is missing")
        rows.extend((f"{folder}/{f}", label) for f in list_images(sub))
    return _sorted_set(rows, tuple(classnames), image_dir, name)
