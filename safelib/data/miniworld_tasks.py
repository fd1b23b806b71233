"""Few-shot tasks in the mini-world that pretraining never posed as tasks.

*Target among distractors*: the label is an attribute (shape or colour) of one designated
object, the target, while the other objects vary freely and may carry any other class's
attribute. The target is either the only large object ("largest") or the only outlined one
("outlined"). Zero-shot prompts name only the class ("a star."), so a model whose pooling spreads
its attention over every object is confused; SAFE can learn to pool from the target. Because we
drew the scene we know the target's mask, hence which cells of the attention-pooling grid it
covers, and can measure how much attention lands there (``safelib.data.targets``).

Images are rendered on demand from their id (`"<task>/<split>/<index>"`), a pure function of the
task's seed, so an `ImageSet` costs nothing to build and pickles for worker processes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from PIL import Image

from . import miniworld as mw
from .imageset import ImageSet
from .registry import register

TARGETS: tuple[str, ...] = ("largest", "outlined")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": mw.SHAPES, "colour": tuple(mw.COLOURS)}
TEMPLATES: dict[str, tuple[str, ...]] = {"shape": mw.SHAPE_TEMPLATES, "colour": mw.COLOUR_TEMPLATES}
SPLITS: tuple[str, ...] = ("train", "val", "test")
TASK_NAMES: tuple[str, ...] = tuple(f"miniworld_{a}_{t}" for a in ATTRIBUTES for t in TARGETS)


@dataclass(frozen=True)
class TargetTask:
    """A target-among-distractors task; every image is a function of these fields and its index.

    attribute: what the label is ("shape" or "colour") of the target.
    target: which object is the target: "largest" (distractors all small) or "outlined"
        (the only object with an outline; sizes vary for all).
    distractors: inclusive (low, high) number of distractor objects.
    style / test_style: rendering styles of train+val and of test (differ for a shift study).
    per_class: images per class in (train, val, test).
    """

    attribute: str = "shape"
    target: str = "largest"
    distractors: tuple[int, int] = (2, 3)
    style: str = "plain"
    test_style: str | None = None
    per_class: tuple[int, int, int] = (32, 8, 50)
    image_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {self.attribute!r}; valid: {tuple(ATTRIBUTES)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; valid: {TARGETS}")
        object.__setattr__(self, "distractors", tuple(int(d) for d in self.distractors))
        object.__setattr__(self, "per_class", tuple(int(n) for n in self.per_class))
        lo, hi = self.distractors
        if not 0 <= lo <= hi <= 6:
            raise ValueError(f"distractors must be a (low, high) range within 0..6, got {self.distractors}")
        if len(self.per_class) != 3 or min(self.per_class) < 1:
            raise ValueError(f"per_class must be three counts >= 1 (train, val, test), got {self.per_class}")
        mw.get_style(self.style)
        if self.test_style is not None:
            mw.get_style(self.test_style)
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be an int >= 0 (numpy's generators take no negative seed), got {self.seed}")

    @property
    def classnames(self) -> tuple[str, ...]:
        return ATTRIBUTES[self.attribute]

    @property
    def name(self) -> str:
        return f"miniworld_{self.attribute}_{self.target}"

    @property
    def fingerprint(self) -> str:
        """A short hash of every field that changes an image's pixels (per_class only adds images).

        Ids name an image within one task; caches keyed by ids also need this, or two tasks with
        other seeds or styles would share cached maps of different pictures.
        """
        fields = {k: v for k, v in asdict(self).items() if k != "per_class"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def split_style(self, split: str) -> str:
        return self.test_style if split == "test" and self.test_style is not None else self.style

    def label_of(self, index: int) -> int:
        """Classes cycle with the index, so every split is balanced."""
        return index % len(self.classnames)


def _parse_id(image_id: str) -> tuple[str, int]:
    try:
        *_, split, index = image_id.split("/")
        if split not in SPLITS:
            raise ValueError
        return split, int(index)
    except ValueError:
        raise ValueError(f"not a mini-world task id: {image_id!r}; expected '<task>/<split>/<index>' "
                         f"with split in {SPLITS}") from None


def task_scene(task: TargetTask, image_id: str) -> tuple[mw.Scene, int]:
    """The scene behind an id and the index of its target among `scene.objects`."""
    split, index = _parse_id(image_id)
    rng = np.random.default_rng([task.seed, SPLITS.index(split), index])
    style = mw.get_style(task.split_style(split))
    label = task.classnames[task.label_of(index)]
    size = task.image_size
    n_distractors = int(rng.integers(task.distractors[0], task.distractors[1] + 1))
    if task.target == "largest":
        target = mw.sample_object(rng, size, style, size="large", **{task.attribute: label})
        objects = [target]
        for _ in range(n_distractors):
            objects.append(mw.sample_object(rng, size, style, size="small", avoid=tuple(objects)))
    else:  # "outlined": the target alone has an outline
        target = replace(mw.sample_object(rng, size, style, **{task.attribute: label}), outline=True)
        objects = [target]
        for _ in range(n_distractors):
            objects.append(replace(mw.sample_object(rng, size, style, avoid=tuple(objects)), outline=False))
    # Draw the target at a random depth so distractors sometimes overlap it and sometimes not.
    order = rng.permutation(len(objects))
    objects = tuple(objects[i] for i in order)
    target_index = int(np.argmin(order))
    return mw.make_scene(rng, image_size=size, style=style, objects=objects), target_index


@dataclass(frozen=True)
class TaskReader:
    """id -> PIL image for a task; a frozen dataclass, so DataLoader workers can pickle it."""

    task: TargetTask

    def __call__(self, image_id: str) -> Image.Image:
        return task_scene(self.task, image_id)[0].image


def task_split(task: TargetTask, split: str) -> ImageSet:
    """One split of a task as an `ImageSet` (ids `"<task name>/<split>/<index>"`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = task.per_class[SPLITS.index(split)] * len(task.classnames)
    ids = tuple(f"{task.name}/{split}/{i:05d}" for i in range(n))
    labels = tuple(task.label_of(i) for i in range(n))
    return ImageSet(ids, labels, task.classnames, TaskReader(task), name=f"{task.name}/{split}@{task.fingerprint}")


def task_splits(task: TargetTask) -> tuple[ImageSet, ImageSet, ImageSet]:
    return tuple(task_split(task, s) for s in SPLITS)  # type: ignore[return-value]


def task_of(images: ImageSet) -> TargetTask:
    """The task an ImageSet (or a subset of one, e.g. a few-shot sample) was rendered from."""
    if not isinstance(images.reader, TaskReader):
        raise TypeError(f"ImageSet {images.name!r} is not a mini-world task (its reader is "
                        f"{type(images.reader).__name__}, not TaskReader)")
    return images.reader.task


def has_targets(images: ImageSet) -> bool:
    """Whether the images were drawn from a mini-world task, so each has a known target region
    (``target_grid_masks`` works); real datasets have none."""
    return isinstance(images.reader, TaskReader)



# ----------------------------------------------------------------------------- registry


_BY_NAME = ("attribute", "target")  # fixed by the registered name, e.g. miniworld_shape_largest


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-like value has the type a ``TargetTask`` field declares (lists stand for tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_fits, value, args))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _in_words(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_in_words(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {args[0].__name__}s"
    if hint is type(None):
        return "null"
    return f"{'an' if hint.__name__[0] in 'aeiou' else 'a'} {hint.__name__}"


def check_task_options(attribute: str, target: str, options: Mapping[str, Any]) -> None:
    """Options of a registered task (``TargetTask``'s fields but attribute and target, which its name
    fixes): a ``ValueError`` naming the option, the value and what is allowed, before any image exists."""
    name = TargetTask(attribute=attribute, target=target).name
    hints = typing.get_type_hints(TargetTask)
    allowed = {f.name: hints[f.name] for f in fields(TargetTask) if f.name not in _BY_NAME}
    for key, value in options.items():
        if key not in allowed:
            why = f" ({key} is fixed by the dataset's name)" if key in _BY_NAME else ""
            valid = "; ".join(f"{k}: {_in_words(t)}" for k, t in allowed.items())
            raise ValueError(f"unknown option {key!r} (= {value!r}) for dataset {name!r}{why}; valid options "
                             f"(TargetTask's fields) are {valid}")
        if not _fits(value, allowed[key]):
            raise ValueError(f"option {key!r} of dataset {name!r} must be {_in_words(allowed[key])}, got "
                             f"{type(value).__name__} {value!r}")
    try:
        TargetTask(attribute=attribute, target=target, **options)
    except ValueError as err:
        raise ValueError(f"options {dict(options)!r} of dataset {name!r}: {err}") from None


def _builder(attribute: str, target: str):
    def build(_dataset_dir=None, **options) -> tuple[ImageSet, ImageSet, ImageSet]:
        return task_splits(TargetTask(attribute=attribute, target=target, **options))
    return build


def register_miniworld(overwrite: bool = True) -> list[str]:
    """Register every (attribute, target) task, e.g. `get_dataset("miniworld_shape_largest", seed=1)`."""
    names = []
    for attribute in ATTRIBUTES:
        for target in TARGETS:
            task = TargetTask(attribute=attribute, target=target)
            register(
                task.name, _builder(attribute, target), overwrite=overwrite, kind="generated",
                title=f"mini-world: {attribute} of the {target} object among distractors",
                templates=TEMPLATES[attribute],
                how_to_get="generated in memory from a seed; always present (options: see TargetTask)",
                check_options=functools.partial(check_task_options, attribute, target),
            )
            names.append(task.name)
    return names
