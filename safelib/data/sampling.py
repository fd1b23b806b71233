"""The few-shot sampler: K shots per class from train, min(K, 4) per class for validation.

The field's protocol (CoOp, Tip-Adapter): for each seed 1/2/3 and each K in 1/2/4/8/16, draw K
training images per class from the train split and a few-shot validation set of ``min(K, 4)``
per class from the val split. ImageNet has no val split in CoOp (its val is the test set), so
its validation images come from train images not drawn as shots. A class with fewer than K
images is sampled with replacement, as Tip-Adapter's copy of ``generate_fewshot_dataset``
(``repeat=True``, Tip-Adapter ``datasets/utils.py``) does, with a warning; CoOp (Dassl,
``repeat=False``) keeps all images of a short class instead. Each class's ids are sorted before drawing and the generator is numpy's
PCG64 seeded through SeedSequence, so the same seed gives the same ids on any machine.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_write_json
from .imageset import ImageSet
from .registry import SplitDataset

MAX_VAL_SHOTS = 4
_TRAIN_STREAM, _VAL_STREAM = 0, 1


class FewShotWarning(UserWarning):
    """A class had too few images for the requested shots (sampled with replacement, or fewer)."""


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _draw(pool: tuple[int, ...], k: int, rng: np.random.Generator, replace_if_short: bool,
          what: str) -> list[int]:
    """``k`` of ``pool`` (already sorted by id), returned in id order."""
    if len(pool) >= k:
        picks = rng.choice(len(pool), size=k, replace=False)
    elif replace_if_short and pool:
        warnings.warn(f"{what} has only {len(pool)} images but {k} shots per class were asked for: drawing {k} "
                      "with replacement (as Tip-Adapter does), so its shots repeat images", FewShotWarning,
                      stacklevel=3)
        picks = rng.choice(len(pool), size=k, replace=True)
    else:
        if len(pool) < k:
            warnings.warn(f"{what} has only {len(pool)} images left (not drawn as shots) but {k} validation "
                          f"images per class were asked for: using those {len(pool)}", FewShotWarning,
                          stacklevel=3)
        picks = np.arange(len(pool))
    return [pool[int(p)] for p in sorted(picks)]


def _unused(pool: tuple[int, ...], taken: list[int]) -> tuple[int, ...]:
    taken_set = set(taken)
    return tuple(i for i in pool if i not in taken_set)


def sample_few_shot(data: SplitDataset | ImageSet, shots: int, seed: int,
                    val_shots: int | None = None) -> tuple[ImageSet, ImageSet]:
    """(K-shot train set, few-shot validation set) for ``seed``; see the module docstring for the rules.

    ``data`` is a loaded dataset (validation drawn from its val split, or from unused train images
    when it has none) or a bare train ImageSet (validation from its unused images). ``val_shots``
    defaults to ``min(shots, 4)``.
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive int (the field uses 1, 2, 4, 8, 16), got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int (the field uses 1, 2, 3), got {seed!r}")
    val_shots = min(int(shots), MAX_VAL_SHOTS) if val_shots is None else val_shots
    if isinstance(val_shots, bool) or not isinstance(val_shots, (int, np.integer)) or val_shots < 0:
        raise ValueError(f"val_shots must be an int >= 0, got {val_shots!r}")
    if isinstance(data, SplitDataset):
        if data.train is None:
            raise ValueError(f"dataset {data.name!r} is test-only (a domain-shift set); sample shots from the "
                             "dataset it shifts from (imagenet)")
        train, val_source = data.train, data.val
    elif isinstance(data, ImageSet):
        train, val_source = data, None
    else:
        raise TypeError(f"data must be a SplitDataset (get_dataset) or an ImageSet, got {type(data).__name__}")

    by_class = train.indices_by_class()
    empty = [train.classnames[k] for k, pool in enumerate(by_class) if not pool]
    if empty:
        raise ValueError(f"{train.name or 'train set'}: classes {empty[:5]} have no training images")
    rng = _rng(seed, _TRAIN_STREAM)
    chosen = [_draw(pool, int(shots), rng, True, f"{train.name} class {train.classnames[k]!r}")
              for k, pool in enumerate(by_class)]
    shot_set = train.subset([i for c in chosen for i in c], name=f"{train.name}@{shots}shot/seed{seed}")

    rng = _rng(seed, _VAL_STREAM)
    if val_source is not None:
        pools, source, replace = val_source.indices_by_class(), val_source, True
    else:  # ImageNet rule: validation from train images not drawn as shots, never from test
        pools = tuple(_unused(pool, c) for pool, c in zip(by_class, chosen))
        source, replace = train, False
    picked = [_draw(pool, int(val_shots), rng, replace, f"{source.name} class {source.classnames[k]!r}")
              for k, pool in enumerate(pools)] if val_shots else []
    val_set = source.subset([i for c in picked for i in c], name=f"{source.name}@{val_shots}val/seed{seed}")
    if val_shots and len(val_set) == 0:
        raise ValueError(
            f"{source.name}: no image is left for the few-shot validation set ({val_shots} per class asked "
            f"for, after drawing {shots} shots per class); use fewer shots, a dataset with a val split, or "
            "val_shots=0 for methods that select nothing on validation"
        )
    return shot_set, val_set


def few_shot_filename(dataset: str, shots: int, seed: int, options: Mapping[str, Any] | None = None) -> str:
    """The conventional file name for a sample's ids, e.g. ``oxford_pets_16shot_seed1.json``.

    A generated dataset's options change its images, so they are in the name (a short hash), e.g.
    ``miniworld_shape_largest-3f2a9c10_2shot_seed1.json``: a run with other options never overwrites
    the sample an earlier record points to.
    """
    if options:
        tag = hashlib.sha256(json.dumps(dict(options), sort_keys=True).encode()).hexdigest()[:8]
        dataset = f"{dataset}-{tag}"
    return f"{dataset}_{shots}shot_seed{seed}.json"


def save_few_shot(path: str | Path, train: ImageSet, val: ImageSet, *, dataset: str, shots: int,
                  seed: int, options: Mapping[str, Any] | None = None) -> Path:
    """Write the sampled ids (and labels) as JSON beside a run's results, atomically; returns the path."""
    path = Path(path)
    payload = {
        "dataset": dataset, "shots": int(shots), "seed": int(seed), "classnames": list(train.classnames),
        **({"dataset_options": dict(options)} if options else {}),
        "train": {"source": train.name, "ids": list(train.ids), "labels": list(train.labels)},
        "val": {"source": val.name, "ids": list(val.ids), "labels": list(val.labels)},
    }
    atomic_write_json(path, payload)
    return path


def _rebuild(source: ImageSet, ids: list[str], labels: list[int], path: Path, part: str) -> ImageSet:
    where = {i: n for n, i in enumerate(source.ids)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise ValueError(f"{path}: {part} ids {missing[:3]} are not in {source.name!r}; the file was saved "
                         "for a different dataset or split")
    subset = source.subset([where[i] for i in ids])
    if list(subset.labels) != list(labels):
        raise ValueError(f"{path}: {part} labels differ from {source.name!r}'s; the dataset changed since saving")
    return subset


def load_few_shot(path: str | Path, data: SplitDataset) -> tuple[ImageSet, ImageSet]:
    """Re-create a saved sample from ``data`` (to audit or re-use a run); checks ids and labels match."""
    path = Path(path)
    saved = json.loads(path.read_text())
    if saved.get("dataset") != data.name:
        raise ValueError(f"{path} was saved for dataset {saved.get('dataset')!r}, not {data.name!r}")
    if data.train is None:
        raise ValueError(f"dataset {data.name!r} has no train split to rebuild a few-shot sample from")
    val_source = data.val if data.val is not None else data.train
    shots, seed = saved["shots"], saved["seed"]
    train = _rebuild(data.train, saved["train"]["ids"], saved["train"]["labels"], path, "train")
    val = _rebuild(val_source, saved["val"]["ids"], saved["val"]["labels"], path, "val")
    return (train.subset(range(len(train)), name=saved["train"]["source"] or f"{data.name}@{shots}shot/seed{seed}"),
            val.subset(range(len(val)), name=saved["val"]["source"]))
