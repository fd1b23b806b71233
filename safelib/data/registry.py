"""The dataset registry: one entry per dataset, found by name, with its split source and templates.

Every dataset the book uses, benchmark or offline or generated, goes through :func:`register`,
so the sampler, the CLI and the notebooks see one list. An entry knows where its files go
(CoOp's folder layout under a data root), how to tell whether they are there, how to build
its (train, val, test) image sets, and what to tell a reader whose copy is missing.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .imageset import ImageSet
from .splits import Splits
from .templates import TEMPLATES

KINDS = ("benchmark", "domain-shift", "offline", "generated", "custom")
Build = Callable[..., Splits]


class DatasetMissingError(FileNotFoundError):
    """A registered dataset whose files are not (all) where the registry looks for them."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about one dataset.

    ``build(dataset_dir, **options)`` returns (train, val or None, test). ``folder`` is the
    dataset's folder under the data root (CoOp's name), or None when it has no files there
    (installed packages, generated sets); ``required`` lists paths inside it that must exist.
    ``missing(dataset_dir)``, when given, replaces the ``required`` check and returns what is
    missing, in words. ``templates`` None means ``safelib.data.templates.TEMPLATES[name]``.
    ``check_options(options)``, when given, raises ``ValueError`` for options ``build`` would not
    take (see :func:`check_dataset_options`).
    """

    name: str
    build: Build = field(repr=False)
    title: str = ""
    kind: str = "custom"
    folder: str | None = None
    required: tuple[str, ...] = ()
    how_to_get: str = ""
    templates: tuple[str, ...] | None = None
    download: Callable[[Path], None] | None = field(default=None, repr=False)
    missing: Callable[[Path], list[str]] | None = field(default=None, repr=False)
    check_options: Callable[[Mapping[str, Any]], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"dataset name {self.name!r} must be lower-case letters, digits, '_' or '-'")
        if not callable(self.build):
            raise TypeError(f"dataset {self.name!r}: build must be callable (dataset_dir, **options) -> "
                            "(train, val or None, test)")
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "required", tuple(self.required))
        if self.templates is not None:
            templates = tuple(self.templates)
            if not templates or any(t.count("{}") != 1 for t in templates):
                raise ValueError(f"dataset {self.name!r}: templates must be non-empty strings with one '{{}}' "
                                 f"each, got {templates!r}")
            object.__setattr__(self, "templates", templates)

    def dataset_dir(self, root: str | Path | None = None) -> Path:
        """Where this dataset's files live: ``root/folder`` (the root itself when folder is None)."""
        root = data_root(root)
        return root if self.folder is None else root / self.folder

    def missing_files(self, root: str | Path | None = None) -> list[str]:
        """What is missing, in words; empty when the dataset is ready to load."""
        where = self.dataset_dir(root)
        if self.missing is not None:
            return list(self.missing(where))
        return [str(where / r) for r in self.required if not (where / r).exists()]

    def is_present(self, root: str | Path | None = None) -> bool:
        return not self.missing_files(root)

    @property
    def accepts_options(self) -> bool:
        """Whether ``get_dataset(name, **options)`` takes options: generated sets (and custom ones,
        whose build function decides) do; benchmarks, their variants and the offline sets do not."""
        return self.kind in ("generated", "custom")

    def prompt_templates(self) -> tuple[str, ...]:
        if self.templates is not None:
            return self.templates
        if self.name not in TEMPLATES:
            raise KeyError(f"dataset {self.name!r} has no templates: pass templates= to register(), or add it "
                           f"to safelib.data.templates.TEMPLATES (which has {sorted(TEMPLATES)})")
        return tuple(TEMPLATES[self.name])


@dataclass(frozen=True)
class SplitDataset:
    """A loaded dataset: its splits, class names and prompt templates.

    ``val`` is None where the field has no validation split (ImageNet, the test-only ImageNet
    variants); :func:`safelib.data.sample_few_shot` then draws validation images from train.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train: ImageSet | None
    val: ImageSet | None
    test: ImageSet
    root: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> ImageSet:
        """``"train"``, ``"val"`` or ``"test"``, with a clear error when this dataset has no such split."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        found = getattr(self, name)
        if found is None:
            raise ValueError(f"dataset {self.name!r} has no {name!r} split (the field does not define one)")
        return found


_REGISTRY: dict[str, DatasetSpec] = {}


def data_root(root: str | Path | None = None) -> Path:
    """The data root: ``root`` if given, else ``$SAFELIB_DATA``, else ``./data`` (CoOp's ``$DATA``)."""
    if root is None:
        root = os.environ.get("SAFELIB_DATA", "data")
    return Path(root).expanduser()


def register(name: str, build: Build, *, overwrite: bool = False, **fields: Any) -> DatasetSpec:
    """Add a dataset to the registry (see :class:`DatasetSpec` for ``fields``) and return its spec.

    Example (a generated dataset with its own templates)::

        register("miniworld", build=lambda _dir, **opts: make_splits(**opts), kind="generated",
                 templates=("a picture of a {}.",), how_to_get="generated in memory; always present")
    """
    spec = DatasetSpec(name=name, build=build, **fields)
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a dataset (tests and notebooks that register throw-away sets use this)."""
    dataset_spec(name)
    del _REGISTRY[name]


def list_datasets(kind: str | None = None) -> list[str]:
    """Registered names, in registration order (the paper's order for the benchmarks)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    return [n for n, s in _REGISTRY.items() if kind is None or s.kind == kind]


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; unknown names list the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; registered datasets are: {', '.join(_REGISTRY)}") from None


def missing_message(spec: DatasetSpec, root: str | Path | None = None) -> str:
    """The error text for a missing dataset: what is missing, where it goes, and how the field gets it."""
    lines = [f"dataset {spec.name!r} ({spec.title or spec.name}) is not ready under {spec.dataset_dir(root)}.",
             "Missing:"]
    lines += [f"  - {m}" for m in spec.missing_files(root)]
    if spec.how_to_get:
        lines += ["How to get it:", *("  " + line for line in spec.how_to_get.strip().splitlines())]
    if spec.download is not None:
        lines.append(f"Or call get_dataset({spec.name!r}, root=..., download=True) to fetch what can be fetched.")
    lines.append("The data root is the root= argument, else $SAFELIB_DATA, else ./data.")
    return "\n".join(lines)


def check_dataset_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the option, its value and what is allowed, before any work is done.

    Bad options otherwise surface as a ``TypeError`` deep inside a build function, after a model
    was loaded. A spec's ``check_options`` checks names, types and values (the mini-world's
    ``TargetTask`` fields); otherwise the build function's parameters bound the names, and a
    dataset whose build takes only its folder (the benchmarks) takes no options at all.
    """
    spec = dataset_spec(name)
    if not isinstance(options, Mapping):
        raise ValueError(f"options of dataset {name!r} must be a dict of option -> value, got "
                         f"{type(options).__name__} {options!r}")
    if spec.check_options is not None:
        spec.check_options(options)
        return
    parameters = list(inspect.signature(spec.build).parameters.values())[1:]  # the first is dataset_dir
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return  # the build function takes anything: only it can tell
    allowed = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in allowed]
    if unknown and not allowed:
        raise ValueError(f"dataset {name!r} takes no options, got {dict(options)!r}; options are for generated "
                         f"datasets such as {', '.join(list_datasets('generated')) or 'the mini-world tasks'}")
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (= {options[unknown[0]]!r}) for dataset {name!r}; "
                         f"its options are: {', '.join(allowed)}")


def get_dataset(name: str, root: str | Path | None = None, *, download: bool = False,
                **options: Any) -> SplitDataset:
    """Load a registered dataset's splits; ``options`` go to its build function (generated sets).

    A missing dataset raises :class:`DatasetMissingError` saying which files go where; with
    ``download=True`` the entry's download step (torchvision, where it works) runs first.
    """
    spec = dataset_spec(name)
    check_dataset_options(name, options)
    if download and not spec.is_present(root):
        if spec.download is None:
            raise DatasetMissingError(missing_message(spec, root) + f"\n{name!r} has no automatic download.")
        spec.download(spec.dataset_dir(root))
    if not spec.is_present(root):
        raise DatasetMissingError(missing_message(spec, root))
    train, val, test = spec.build(spec.dataset_dir(root), **options)
    classnames = test.classnames
    for part, images in (("train", train), ("val", val)):
        if images is not None and images.classnames != classnames:
            raise ValueError(f"dataset {name!r}: {part} and test disagree on class names")
    return SplitDataset(name=name, classnames=classnames, templates=spec.prompt_templates(), train=train,
                        val=val, test=test, root=None if spec.folder is None else spec.dataset_dir(root))
