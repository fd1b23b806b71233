"""Datasets that install from PyPI and load with no network: real images for offline readers and CI.

- ``textile``: ``conformal-clip-data`` (MIT). 2,000 simulated textile images, 250 x 250 px, in three
  classes (1,000 nominal, 500 local defect, 500 global defect) from a published few-shot CLIP
  benchmark (Megahed et al. 2025, arXiv:2501.12596).
- ``elpv``: ``elpv-dataset`` (data CC-BY-NC-SA 4.0: installed on request, never vendored). 2,624
  grayscale 300 x 300 electroluminescence images of solar cells, labelled with a defect
  probability in {0, 1/3, 2/3, 1}; we call a cell defective when that probability is >= 0.5.
- ``skimage``: eight ``skimage.data`` photos (astronaut, cat, coffee, ...), one per class, for
  demonstrations such as attention maps; too small for accuracy numbers.

Neither package ships a split, so textile and elpv get a fixed one: per class, the sorted ids are
permuted with seed 0 and cut 50 % train / 10 % val / 40 % test.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .imageset import FolderReader, ImageSet
from .registry import register
from .splits import Splits, list_images

SPLIT_FRACTIONS = (0.5, 0.1, 0.4)
SPLIT_SEED = 0

TEXTILE_CLASSES = (("nominal", "defect-free textile"), ("local", "textile with a local defect"),
                   ("global", "textile with a global defect"))
TEXTILE_TEMPLATES = ("a photo of a {}.", "a close-up photo of a {}.")
ELPV_CLASSNAMES = ("functional solar cell", "defective solar cell")
ELPV_TEMPLATES = ("an electroluminescence image of a {}.", "a photo of a {}.")
ELPV_DEFECT_THRESHOLD = 0.5
SKIMAGE_PHOTOS = (("astronaut", "astronaut"), ("chelsea", "cat"), ("coffee", "cup of coffee"),
                  ("rocket", "rocket"), ("camera", "photographer"), ("coins", "coins"), ("moon", "moon"),
                  ("hubble_deep_field", "galaxies"))
SKIMAGE_TEMPLATES = ("a photo of a {}.",)


def fixed_split(images: ImageSet, fractions: Sequence[float] = SPLIT_FRACTIONS, seed: int = SPLIT_SEED) -> Splits:
    """Cut each class into train/val/test by ``fractions`` after a seeded permutation of its sorted ids."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed]))
    parts: list[list[int]] = [[], [], []]
    for pool in images.indices_by_class():
        order = [pool[int(j)] for j in rng.permutation(len(pool))]
        n_train = int(round(fractions[0] * len(pool)))
        n_val = int(round(fractions[1] * len(pool)))
        for part, cut in zip(parts, (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])):
            part.extend(sorted(cut, key=lambda i: images.ids[i]))
    base = images.name
    train, val, test = (images.subset(p, name=f"{base}/{s}") for p, s in zip(parts, ("train", "val", "test")))
    return train, val, test


def _missing_package(module: str, install: str) -> list[str]:
    return [] if importlib.util.find_spec(module) is not None else [f"the Python package {module!r} ({install})"]


# ---------------------------------------------------------------- textile
def textile_images() -> ImageSet:
    """All 2,000 textile images with their labels, ids like ``nominal/textile_0001.jpg``."""
    import conformal_clip_data

    root = Path(conformal_clip_data.textile_simulated_root())
    ids, labels = [], []
    for label, (folder, _) in enumerate(TEXTILE_CLASSES):
        names = list_images(root / folder)
        ids += [f"{folder}/{n}" for n in names]
        labels += [label] * len(names)
    return ImageSet(tuple(ids), tuple(labels), tuple(c for _, c in TEXTILE_CLASSES), FolderReader(root), "textile")


def build_textile(_dataset_dir: Path | None = None) -> Splits:
    return fixed_split(textile_images())


# ---------------------------------------------------------------- elpv
def elpv_images(threshold: float = ELPV_DEFECT_THRESHOLD) -> ImageSet:
    """All 2,624 solar-cell images, defective when the annotated probability is >= ``threshold``."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    ids, labels = [], []
    for number, line in enumerate((root / "labels.csv").read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{root / 'labels.csv'}:{number}: expected 'path probability type', got {line!r}")
        ids.append(fields[0])
        labels.append(int(float(fields[1]) >= threshold))
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return ImageSet(tuple(ids[i] for i in order), tuple(labels[i] for i in order), ELPV_CLASSNAMES,
                    FolderReader(root), "elpv")


def build_elpv(_dataset_dir: Path | None = None, threshold: float = ELPV_DEFECT_THRESHOLD) -> Splits:
    return fixed_split(elpv_images(threshold))


# ---------------------------------------------------------------- skimage
@dataclass(frozen=True)
class SkimageReader:
    """Open a ``skimage.data`` photo by its function name (picklable for worker processes)."""

    def __call__(self, image_id: str) -> Image.Image:
        import skimage.data

        known = [n for n, _ in SKIMAGE_PHOTOS]
        if image_id not in known:
            raise KeyError(f"unknown skimage photo {image_id!r}; known: {known}")
        array = np.asarray(getattr(skimage.data, image_id)())
        return Image.fromarray(array)


def skimage_images() -> ImageSet:
    """One image per class: the photos in :data:`SKIMAGE_PHOTOS`."""
    return ImageSet(tuple(n for n, _ in SKIMAGE_PHOTOS), tuple(range(len(SKIMAGE_PHOTOS))),
                    tuple(c for _, c in SKIMAGE_PHOTOS), SkimageReader(), "skimage")


def build_skimage(_dataset_dir: Path | None = None) -> Splits:
    photos = skimage_images()
    return photos.subset(range(len(photos)), name="skimage/train"), None, photos.subset(
        range(len(photos)), name="skimage/test")


def register_offline() -> None:
    """Register textile, elpv and skimage (idempotent)."""
    register("textile", build_textile, overwrite=True, title="Textile defects (conformal-clip-data)",
             kind="offline", templates=TEXTILE_TEMPLATES,
             missing=lambda _d: _missing_package("conformal_clip_data", "pip install conformal-clip-data"),
             how_to_get="pip install conformal-clip-data (MIT; a safelib dependency)")
    register("elpv", build_elpv, overwrite=True, title="ELPV solar cells (elpv-dataset)", kind="offline",
             templates=ELPV_TEMPLATES,
             missing=lambda _d: _missing_package("elpv_dataset", "pip install elpv-dataset"),
             how_to_get="pip install elpv-dataset, or pip install 'safelib[elpv]' (its images are "
                        "CC-BY-NC-SA 4.0: installed on request, never shipped with safelib)")
    register("skimage", build_skimage, overwrite=True, title="scikit-image sample photos", kind="offline",
             templates=SKIMAGE_TEMPLATES,
             missing=lambda _d: _missing_package("skimage", "pip install scikit-image"),
             how_to_get="pip install scikit-image (a safelib dependency); one photo per class, for "
                        "demonstrations only: train and test are the same eight photos")
