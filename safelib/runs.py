"""One run = one method on one few-shot sample; its record is the only source of the book's numbers.

``run(RunConfig(...))`` loads the model and the dataset, draws (and saves) the few-shot sample,
reads or builds the feature caches, fits the method on few-shot train + validation, predicts the
test split, and writes a JSON record: the config, package version and git commit, library
versions, seed, sampled-ids file, validation and test accuracy, the hyperparameters chosen on
validation, wall time per stage and peak memory. One file per run, written to a temporary name
and renamed, so job-array shards on a shared filesystem never interleave and a killed run leaves
no partial record; a rerun finds the record and skips the work (resume).

``safelib.aggregate`` reads the records back into tables. From a shell::

    python -m safelib.runs --dataset miniworld_shape_largest --methods all --shots 1 2 4 8 16 --seeds 1 2 3
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

RECORD_FORMAT = "safelib.run/1"
RECORD_SUFFIX = ".run.json"
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "numpy", "scikit-learn", "safetensors", "pandas")
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
        from . import data
        from .methods import METHODS, method_config
        from .models import valid_model_names

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
        object.__setattr__(self, "method_config", _jsonable(full))
        object.__setattr__(self, "dataset_options", _jsonable(dict(self.dataset_options)))
        object.__setattr__(self, "shots", int(self.shots))
        object.__setattr__(self, "seed", int(self.seed))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

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


# --- the run -------------------------------------------------------------------------------------

def run(config: RunConfig, *, clip: Any = None, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run one method on one few-shot sample and write its record; an existing record is returned as is.

    ``clip`` may pass an already loaded model (a notebook's); it must be the config's backbone
    and weights.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"run takes a RunConfig, got {type(config).__name__}")
    path = config.record_path()
    if path.exists() and not overwrite:
        return read_record(path)
    from . import data
    from .methods import ClipHead, FewShotData, make_method

    stages = StageTimer(torch.device(config.device))
    with stages("load_model"):
        clip = _checked_clip(config, clip)
    with stages("sample"):
        dataset = _dataset(config.dataset, config.data_root, json.dumps(config.dataset_options, sort_keys=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", data.FewShotWarning)
            train_set, val_set = data.sample_few_shot(dataset, config.shots, config.seed)
        ids_file = data.save_few_shot(
            Path(config.out_dir) / config.dataset / "samples" / data.few_shot_filename(config.dataset, config.shots, config.seed),
            train_set, val_set, dataset=config.dataset, shots=config.shots, seed=config.seed,
        )
    with stages("text_classifier"):
        classifier = _text_classifier(clip, dataset.classnames, dataset.templates)
    method = make_method(config.method, dict(config.method_config))
    kind = feature_kind(config.method)
    with stages("features"):
        splits = {
            "train": _split_features(clip, config, train_set, "train", kind, config.train_views, progress),
            "val": _split_features(clip, config, val_set, "val", kind, 0, progress),
            "test": _split_features(clip, config, dataset.test, "test", kind, 0, progress),
        }
    head = ClipHead(classifier=classifier, logit_scale=clip.logit_scale, attnpool=clip.attnpool,
                    classnames=tuple(dataset.classnames))
    with stages("fit"):
        method.fit(FewShotData(train=splits["train"], val=splits["val"], head=head, seed=config.seed))
    with stages("predict"):
        val_logits = method.predict(splits["val"])
        test_logits = method.predict(splits["test"])
    from .methods import accuracy

    record = {
        "format": RECORD_FORMAT,
        "config": config.to_dict(),
        "identity": config.identity,
        "setting": config.setting,
        "dataset": config.dataset, "method": config.method, "backbone": config.backbone,
        "weights": config.weights, "shots": config.shots, "seed": config.seed,
        "val_acc": accuracy(val_logits, splits["val"].labels),
        "test_acc": accuracy(test_logits, splits["test"].labels),
        "chosen": _jsonable(method.chosen),
        "num_classes": len(dataset.classnames),
        "num_images": {"train": len(train_set), "val": len(val_set), "test": len(dataset.test)},
        "sampled_ids": os.path.relpath(ids_file, path.parent),
        "sampling_warnings": [str(w.message) for w in caught if issubclass(w.category, data.FewShotWarning)],
        "timings": stages.seconds,
        "wall_seconds": sum(stages.seconds.values()),
        "peak_memory_mb": stages.peak_memory_mb(),
        **provenance(),
        "device_name": _device_name(torch.device(config.device)),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_record(path, record)
    return record


def feature_kind(method: str) -> str:
    """What a method needs cached: dense maps if it pools them itself (SAFE, SAFE-A), else pooled features."""
    from .methods import METHODS

    return getattr(METHODS[method], "feature_kind", "pooled")


def _checked_clip(config: RunConfig, clip: Any) -> Any:
    if clip is None:
        return _load_clip(config.backbone, config.weights, config.device)
    if clip.name != config.backbone or (clip.pretrained or None) != (config.weights or None):
        raise RunConfigError(
            f"RunConfig.backbone/weights: the clip passed in is {clip.name}/{clip.pretrained}, "
            f"the config says {config.backbone}/{config.weights}"
        )
    return clip.to(config.device)


@functools.lru_cache(maxsize=2)
def _load_clip(backbone: str, weights: str | None, device: str) -> Any:
    from .models import load_clip

    return load_clip(backbone, weights, device=device)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, options_json: str) -> Any:
    from .data import get_dataset

    return get_dataset(name, root, **json.loads(options_json))


_CLASSIFIERS: dict[tuple[int, tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}


def _text_classifier(clip: Any, classnames: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
    from .text import zero_shot_classifier

    key = (id(clip.model), tuple(classnames), tuple(templates))
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()  # one model at a time: do not pin old models' weights
        _CLASSIFIERS[key] = zero_shot_classifier(clip, classnames, templates)
    return _CLASSIFIERS[key]


def _split_features(clip: Any, config: RunConfig, images: Any, split: str, kind: str, views: int,
                    progress: bool) -> Any:
    """The split's cached features (extracted on a miss) as a ``SplitFeatures`` over memmaps."""
    from .data import ImageViews, ViewSpec, collate_views
    from .features import cache_features, feature_cache_fields
    from .methods import SplitFeatures

    spec = ViewSpec.for_clip(clip, views=views, seed=config.seed)
    fields = feature_cache_fields(
        clip, kind=kind, dataset=config.dataset, split=f"{split}:{images.name}", ids=list(images.ids),
        transform=repr(spec), views=spec.num_views, view_seed=spec.seed, autocast_dtype=config.autocast_dtype,
        dataset_options=json.dumps(config.dataset_options, sort_keys=True),
    )
    dataset = ImageViews(images, spec)

    def batches(start: int) -> Iterator[torch.Tensor]:
        # A Subset keeps each image's own index, so a resumed extraction cuts the same views.
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, len(dataset))), batch_size=config.batch_size,
            num_workers=config.num_workers, collate_fn=collate_views,
        )
        for batch in loader:
            yield batch.images  # V x B x 3 x S x S

    entry = cache_features(clip, fields, batches, config.cache_dir, progress=progress)
    labels = torch.tensor(images.labels, dtype=torch.long)
    return SplitFeatures(labels=labels, **{kind: entry})


class StageTimer:
    """Wall time per named stage, and peak memory over the run."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def peak_memory_mb(self) -> dict[str, float]:
        """Process peak RSS (since the process started, not this run alone) and CUDA peak allocation."""
        peak = {"process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            peak["cuda_max_allocated"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {k: round(v, 1) for k, v in peak.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


# --- provenance ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Package version (stamped at build), git commit when run from a checkout, library versions."""
    from . import __version__

    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    commit, dirty = _git_state(Path(__file__).resolve().parent.parent)
    return {
        "safelib_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": libraries,
    }


def _git_state(where: Path) -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes to tracked files) of the checkout holding safelib, or (None, None)."""
    if not (where / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


# --- records on disk ----------------------------------------------------------------------------

def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write a record atomically: a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(dict(record)), indent=1, sort_keys=True, allow_nan=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A run record; a file that is not one says so."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid run record (broken JSON: {error})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a {RECORD_FORMAT} run record")
    return record


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tuples become lists, numpy and torch scalars become numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return value


# --- many runs ----------------------------------------------------------------------------------

def run_grid(
    dataset: str,
    methods: list[str],
    shots: list[int],
    seeds: list[int],
    *,
    progress: bool = True,
    **common: Any,
) -> list[dict[str, Any]]:
    """Every (seed, shots, method) run, skipping those with a record already; returns the records.

    Configs are all built (and so validated) before the first run starts.
    """
    overrides = common.pop("method_configs", {}) or {}
    configs = [
        RunConfig(dataset=dataset, method=m, shots=k, seed=s, method_config=overrides.get(m, {}), **common)
        for s in seeds for k in shots for m in methods
    ]
    records = []
    bar = _progress(configs, progress)
    for config in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{config.method} {config.shots}-shot seed {config.seed}")
        records.append(run(config))
    return records


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="runs", unit="run")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .methods import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m safelib.runs",
        description="Run few-shot methods over shots and seeds, write one record per run, print the table.",
    )
    parser.add_argument("--dataset", default="miniworld_shape_largest")
    parser.add_argument("--methods", nargs="+", default=["all"], help=f"'all' or names from: {', '.join(METHODS)}")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--backbone", default="miniclip")
    parser.add_argument("--weights", default="shipped")
    parser.add_argument("--train-views", type=int, default=10)
    parser.add_argument("--method-config", default="{}",
                        help='JSON: per-method overrides, e.g. \'{"tip_adapter_f": {"epochs": 10}}\'')
    parser.add_argument("--dataset-options", default="{}", help="JSON: options of a generated dataset")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    try:
        method_configs = json.loads(args.method_config)
        dataset_options = json.loads(args.dataset_options)
    except json.JSONDecodeError as error:
        parser.error(f"--method-config / --dataset-options must be JSON: {error}")
    start = time.perf_counter()
    try:
        run_grid(
            args.dataset, methods, args.shots, args.seeds, backbone=args.backbone,
            weights=None if args.weights in ("none", "None", "") else args.weights, train_views=args.train_views,
            method_configs=method_configs, dataset_options=dataset_options, data_root=args.data_root,
            cache_dir=args.cache_dir, out_dir=args.out_dir, device=args.device, batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
    except RunConfigError as error:
        parser.error(str(error))
    from .aggregate import aggregate, load_records, summary_table

    table = aggregate(load_records(Path(args.out_dir) / args.dataset))
    table = table[table["method"].isin(methods) & table["shots"].isin(args.shots)]
    print(summary_table(table).to_string())
    print(f"\nwall time: {time.perf_counter() - start:.1f} s (records under {args.out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
