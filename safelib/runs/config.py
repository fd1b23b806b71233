"""The run config: everything one run needs, validated when built, before any work is done.

A bad field is rejected with a message that names it and says what would be right. The config's
``identity`` (a hash of what the run computes, not of where files live) names its record, so a
rerun finds a finished run and a changed hyperparameter never reuses an old one.
"""
from __future__ import annotations

import dataclasses
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
from ..clip.models import valid_model_names
from ..methods import METHODS, method_config

# Fields that say where things live or how fast they run, not what is computed: left out of
# the run's identity, so moving a cache or switching worker count never reruns a finished run.
_NOT_IDENTITY = ("data_root", "cache_dir", "out_dir", "num_workers", "batch_size")


class RunConfigError(ValueError):
    """A run config that is wrong; the message names the field and says what would be right."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, validated when built (before any work is done).

    backbone, weights: ``load_clip(backbone, weights)``; "miniclip" with "shipped" is the offline default.
    dataset, dataset_options: a registered dataset (``safelib.data.list_datasets()``), options for
        generated ones.
    shots, seed: the few-shot sample (the field: shots 1/2/4/8/16, seeds 1/2/3); the seed also
        seeds every method's training.
    method, method_config: a name of ``safelib.methods.METHODS`` and overrides of its config.
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
    method_config: Mapping[str, Any] = field(default_factory=dict)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    train_views: int = 10
    data_root: str | None = None
    cache_dir: str = "cache"
    out_dir: str = "runs"
    device: str = "cpu"
    autocast_dtype: str | None = None
    batch_size: int = 64
    num_workers: int = 0

    def __post_init__(self) -> None:

        _check(self.dataset in data.list_datasets(), "dataset",
               f"unknown dataset {self.dataset!r}; registered: {', '.join(data.list_datasets())}")
        _check(self.method in METHODS, "method", f"unknown method {self.method!r}; valid: {', '.join(sorted(METHODS))}")
        for name, low in (("shots", 1), ("seed", 0), ("train_views", 1), ("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low, name,
                   f"must be an int >= {low}, got {value!r}")
        _check(self.backbone in valid_model_names(), "backbone",
               f"unknown backbone {self.backbone!r}; valid: {', '.join(valid_model_names())}")
        _check(self.weights is None or isinstance(self.weights, str), "weights",
               f"must be a weights tag, a file path or None, got {self.weights!r}")
        for name in ("cache_dir", "out_dir"):
            _check(isinstance(getattr(self, name), (str, os.PathLike)), name, f"must be a path, got {getattr(self, name)!r}")
        _check(self.autocast_dtype in (None, "float16", "bfloat16"), "autocast_dtype",
               f"must be None, 'float16' or 'bfloat16', got {self.autocast_dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise RunConfigError(f"RunConfig.device: {self.device!r} is not a device ({error}); "
                                 "use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
        if device.type == "cuda":
            _check(torch.cuda.is_available(), "device", f"{self.device!r} requested but CUDA is not available here; use 'cpu'")
        _check(isinstance(self.method_config, Mapping), "method_config",
               f"must be a dict of {self.method}'s options, got {type(self.method_config).__name__}")
        _check(isinstance(self.dataset_options, Mapping), "dataset_options",
               f"must be a dict, got {type(self.dataset_options).__name__}")
        try:  # store the full, validated method config so the record shows every default too
            full = method_config(self.method, dict(self.method_config)).to_dict()
        except (ValueError, TypeError) as error:
            raise RunConfigError(f"RunConfig.method_config: {error}") from None
        object.__setattr__(self, "method_config", jsonable(full))
        object.__setattr__(self, "dataset_options", jsonable(dict(self.dataset_options)))
        object.__setattr__(self, "shots", int(self.shots))
        object.__setattr__(self, "seed", int(self.seed))

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    @property
    def identity(self) -> str:
        """A short hash of what the run computes (not where files live): part of the record's name."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def setting(self) -> str:
        """A short hash of the method and model settings alone (not dataset, shots or seed): the
        key under which aggregation averages seeds and datasets."""
        skip = (*_NOT_IDENTITY, "dataset", "dataset_options", "shots", "seed")
        fields = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

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


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise RunConfigError(f"RunConfig.{name}: {message}")
