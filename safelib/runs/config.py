"""The run config: everything one run needs, validated when built, before any work is done.

A bad field is rejected with a message that names it and says what would be right. The config
holds its method's typed config (a ``MethodConfig``), built once here; it becomes plain JSON once,
in ``to_dict`` when the record is written, and ``RunConfig.from_dict(record["config"])`` reads it
back. The config's ``identity`` (a hash of what the run computes, not of where files live) names
its record, so a rerun finds a finished run and a changed hyperparameter never reuses an old one.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .records import RECORD_SUFFIX, jsonable
from .. import data
from ..clip.models import MINICLIP, valid_model_names, weight_tags, weights_file_digest
from ..features.extract import AUTOCAST_DTYPES, IMAGE_DIGESTS
from ..methods import METHODS, MethodConfig, method_config
from ..methods.presets import without_later_fields

# Fields that say where things live or how fast they run, not what is computed: left out of
# the run's identity, so moving a cache or switching worker count never reruns a finished run.
_NOT_IDENTITY = ("data_root", "cache_dir", "out_dir", "num_workers", "batch_size")
# Fields added after records were first written: left out of the identity while at their default,
# so every earlier record keeps its name.
_LATER_FIELDS = {"test_dataset": None, "test_dataset_options": {}}
# What names the data and the sample rather than the method's setting (aggregation groups on them).
# torch.Generator.manual_seed takes 64 bits; seeds are also offset (seed + k), so keep one bit spare.
MAX_SEED = 2**63 - 1
_DATA_FIELDS = ("dataset", "dataset_options", "test_dataset", "test_dataset_options", "shots", "seed",
                "method", "backbone", "weights")


class RunConfigError(ValueError):
    """A run config that is wrong; the message names the field and says what would be right."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, validated when built (before any work is done).

    backbone, weights: ``load_clip(backbone, weights)``; "miniclip" with "shipped" is the offline default.
    dataset, dataset_options: a registered dataset (``safelib.data.list_datasets()``), options for
        generated ones; the method trains and selects on it.
    test_dataset, test_dataset_options: the dataset whose test split is scored (None: ``dataset``'s
        own). Its classes must be among ``dataset``'s; with fewer (ImageNet-A, -R: 200 of
        ImageNet's 1000) logits and labels are restricted to its classes.
    shots, seed: the few-shot sample (the field: shots 1/2/4/8/16, seeds 1/2/3); the seed also
        seeds every method's training.
    method, method_config: a name of ``safelib.methods.METHODS`` and its config: a dict of
        overrides or the method's ``MethodConfig``; held as the full, typed ``MethodConfig``.
    train_views: augmented views cached per training image (Tip-Adapter's ``augment_epoch`` is 10).
    data_root, cache_dir, out_dir: where data, feature caches and run records live.
    device: "cpu", "cuda", "cuda:1", "mps".
    """

    dataset: str
    method: str
    shots: int
    seed: int
    backbone: str = "miniclip"
    weights: str | None = "shipped"
    method_config: MethodConfig | Mapping[str, Any] = field(default_factory=dict)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    train_views: int = 10
    data_root: str | None = None
    cache_dir: str = "cache"
    out_dir: str = "runs"
    device: str = "cpu"
    autocast_dtype: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    test_dataset: str | None = None
    test_dataset_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        registered = data.list_datasets()
        _check(self.dataset in registered, "dataset",
               f"unknown dataset {self.dataset!r}; registered: {', '.join(registered)}")
        _check(self.test_dataset is None or self.test_dataset in registered, "test_dataset",
               f"unknown dataset {self.test_dataset!r}; None (test on dataset's own test split) or one of: "
               f"{', '.join(registered)}")
        _check(self.method in METHODS, "method", f"unknown method {self.method!r}; valid: {', '.join(sorted(METHODS))}")
        for name, low in (("shots", 1), ("seed", 0), ("train_views", 1), ("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low, name,
                   f"must be an int >= {low}, got {value!r}")
        _check(self.backbone in valid_model_names(), "backbone",
               f"unknown backbone {self.backbone!r}; valid: {', '.join(valid_model_names())}")
        _check(self.seed <= MAX_SEED, "seed", f"must fit a 64-bit generator seed (0 to 2**63 - 1), got {self.seed!r}")
        _check(self.weights is None or isinstance(self.weights, str), "weights",
               f"must be a weights tag, a file path or None, got {self.weights!r}")
        _check(self.weights is not None or self.backbone != MINICLIP, "weights",
               "None (random weights) is not available for miniclip: its architecture comes from its checkpoint; "
               "use 'shipped' or a mini-CLIP checkpoint file")
        _check(self.weights is None or self.weights in weight_tags(self.backbone) or Path(self.weights).is_file(),
               "weights", f"{self.weights!r} is neither a weights tag of {self.backbone} "
               f"({', '.join(weight_tags(self.backbone))}) nor an existing file")
        for name in ("cache_dir", "out_dir"):
            _check(isinstance(getattr(self, name), (str, os.PathLike)), name, f"must be a path, got {getattr(self, name)!r}")
        _check(self.autocast_dtype in AUTOCAST_DTYPES, "autocast_dtype",
               f"must be one of {', '.join(map(repr, AUTOCAST_DTYPES))}, got {self.autocast_dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise RunConfigError(f"RunConfig.device: {self.device!r} is not a device ({error}); "
                                 "use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
        if device.type == "cuda":
            _check(torch.cuda.is_available(), "device", f"{self.device!r} requested but CUDA is not available here; use 'cpu'")
        _check(isinstance(self.method_config, (Mapping, MethodConfig)), "method_config",
               f"must be a dict of {self.method}'s options or its MethodConfig, got {type(self.method_config).__name__}")
        for name, dataset in (("dataset_options", self.dataset), ("test_dataset_options", self.test_dataset)):
            options = getattr(self, name)
            _check(isinstance(options, Mapping), name, f"must be a dict, got {type(options).__name__}")
            _check(not options or dataset is None or data.dataset_spec(dataset).accepts_options, name,
                   f"{dataset!r} takes no options (only generated and custom datasets do), got {dict(options)!r}")
        for name, dataset in (("dataset_options", self.dataset), ("test_dataset_options", self.test_dataset)):
            if dataset is not None and getattr(self, name):
                try:
                    data.check_dataset_options(dataset, getattr(self, name))
                except ValueError as error:
                    raise RunConfigError(f"RunConfig.{name}: {error}") from None
        _check(self.test_dataset is not None or not self.test_dataset_options, "test_dataset_options",
               f"options of a test dataset need a test_dataset, got {dict(self.test_dataset_options)!r} "
               "with test_dataset None")
        try:  # the full, validated, typed config: the record shows every default too
            typed = method_config(self.method, self.method_config)
        except (ValueError, TypeError) as error:
            raise RunConfigError(f"RunConfig.method_config: {error}") from None
        object.__setattr__(self, "method_config", typed)
        object.__setattr__(self, "dataset_options", jsonable(dict(self.dataset_options)))
        object.__setattr__(self, "test_dataset_options", jsonable(dict(self.test_dataset_options)))
        object.__setattr__(self, "shots", int(self.shots))
        object.__setattr__(self, "seed", int(self.seed))

    @functools.cached_property
    def _plain(self) -> dict[str, Any]:
        """Every field as plain JSON values, computed once (the config is frozen)."""
        return jsonable(dataclasses.asdict(self))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the method config as a dict of all its fields): the record's ``config``."""
        return copy.deepcopy(self._plain)

    @functools.cached_property
    def options_key(self) -> str:
        """``dataset_options`` as canonical JSON: the feature cache's key field and the aggregation's column."""
        return _canonical(self._plain["dataset_options"])

    @functools.cached_property
    def test_options_key(self) -> str:
        """The test dataset's options as canonical JSON (``dataset_options`` when testing on ``dataset``)."""
        return _canonical(self._plain["test_dataset_options"]) if self.test_dataset else self.options_key

    @property
    def test_on(self) -> str:
        """The dataset whose test split is scored."""
        return self.test_dataset or self.dataset

    @functools.cached_property
    def weights_digest(self) -> str | None:
        """A content hash of the weights file (the shipped mini-CLIP's too); None for tags and random weights."""
        return weights_file_digest(self.backbone, self.weights)

    @functools.cached_property
    def data_digest(self) -> str | None:
        """A content digest of a user-registered (custom) dataset's image files, and of the test
        dataset's test split; None for the registry's and generated sets, whose data is not read.

        Computed once per config (the hashes are memoised beside the feature cache, which then reuses them).
        """
        memo = Path(self.cache_dir) / IMAGE_DIGESTS
        own = data.dataset_files_digest(self.dataset, self.data_root, self.dataset_options, memo_dir=memo)
        if self.test_dataset is None:
            return own
        test = data.dataset_files_digest(self.test_dataset, self.data_root, self.test_dataset_options,
                                         splits=("test",), memo_dir=memo)
        return data.joined_digest({"dataset": own, "test_dataset": test})

    @property
    def identity(self) -> str:
        """A short hash of what the run computes (not where files live): part of the record's name.

        It covers the weights' content, not only their name: a file replaced at the same path (a
        re-pretrained mini-CLIP) gives a new identity, so resume never serves the old file's records.
        Likewise a custom dataset's image files (``data_digest``): edit one image, and it is a new run.
        """
        return identity_of(self._plain, self.weights_digest, self.data_digest)

    @property
    def setting(self) -> dict[str, Any]:
        """The method and run settings alone (not data, model, shots or seed), flattened to dotted
        names, e.g. ``{"epochs": 30, "lr": 0.001, "train_views": 10, ...}``: what aggregation
        tells settings of one method apart by."""
        return setting_of(self._plain)

    def record_path(self) -> Path:
        weights = Path(str(self.weights)).stem if self.weights else "random"
        name = f"{self.shots}shot_seed{self.seed}_{self.identity}{RECORD_SUFFIX}"
        return Path(self.out_dir) / self.dataset / f"{self.backbone}-{weights}" / self.method / name

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """A config from plain values (a record's ``config``, a YAML grid); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RunConfigError(f"unknown RunConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**values)


def identity_of(plain: Mapping[str, Any], weights_digest: str | None = None, data_digest: str | None = None) -> str:
    """The identity hash of a config's plain dict (``RunConfig.to_dict()`` or a record's ``config``), its
    weights file's content digest (``RunConfig.weights_digest``, a record's ``weights_digest``) and its
    image files' digest (``RunConfig.data_digest``, a record's ``data_digest``). A digest that is None
    adds nothing, so runs on the registry's and generated sets keep their names."""
    fields = {k: v for k, v in plain.items()
              if k not in _NOT_IDENTITY and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    if weights_digest is not None:
        fields["weights_digest"] = weights_digest
    if data_digest is not None:
        fields["data_digest"] = data_digest
    if isinstance(fields.get("method_config"), Mapping):  # and the method configs' later fields (presets)
        fields["method_config"] = without_later_fields(fields["method_config"])
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def setting_of(plain: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened method and run settings of a config's plain dict (see ``RunConfig.setting``)."""
    skip = {*_NOT_IDENTITY, *_DATA_FIELDS, "method_config"}
    flat = _flatten(without_later_fields(plain.get("method_config", {})))
    flat.update({k: v for k, v in plain.items() if k not in skip})
    return dict(sorted(flat.items()))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _canonical(values: Any) -> str:
    return json.dumps(values, sort_keys=True)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise RunConfigError(f"RunConfig.{name}: {message}")
