"""One run = one method on one few-shot sample, from a validated config to a written record.

``run`` loads the model and the dataset, draws (and saves) the few-shot sample, reads or builds
the feature caches, fits the method on few-shot train + validation, predicts the test split and
writes the record: the config, package version and git commit, library versions, seed,
sampled-ids file, validation and test accuracy, the hyperparameters chosen on validation, wall
time per stage and peak memory. A run whose record exists is not redone (resume).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import RunConfig, RunConfigError
from .records import RECORD_FORMAT, jsonable, provenance, read_record, write_record
from .. import data
from ..clip.models import load_clip
from ..clip.text import zero_shot_classifier
from ..data import get_dataset
from ..features.extract import cache_image_features
from ..features.maps import place_maps
from ..methods import METHODS, ClipHead, FewShotData, SplitFeatures, accuracy, make_method
from ..perf.calibration import plan_for_maps


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
    cache_plan = None
    if kind == "dense":
        with stages("plan_cache"):
            splits["train"], cache_plan = _placed_train_maps(splits["train"], method.config, config)
    head = ClipHead(classifier=classifier, logit_scale=clip.logit_scale, attnpool=clip.attnpool,
                    classnames=tuple(dataset.classnames))
    with stages("fit"):
        method.fit(FewShotData(train=splits["train"], val=splits["val"], head=head, seed=config.seed))
    with stages("predict"):
        val_logits = method.predict(splits["val"])
        test_logits = method.predict(splits["test"])

    record = {
        "format": RECORD_FORMAT,
        "config": config.to_dict(),
        "identity": config.identity,
        "setting": config.setting,
        "dataset": config.dataset, "method": config.method, "backbone": config.backbone,
        "weights": config.weights, "shots": config.shots, "seed": config.seed,
        "val_acc": accuracy(val_logits, splits["val"].labels),
        "test_acc": accuracy(test_logits, splits["test"].labels),
        "chosen": jsonable(method.chosen),
        "num_classes": len(dataset.classnames),
        "num_images": {"train": len(train_set), "val": len(val_set), "test": len(dataset.test)},
        "sampled_ids": os.path.relpath(ids_file, path.parent),
        "sampling_warnings": [str(w.message) for w in caught if issubclass(w.category, data.FewShotWarning)],
        "cache_plan": cache_plan,
        "timings": stages.seconds,
        "wall_seconds": sum(stages.seconds.values()),
        "peak_memory_mb": stages.peak_memory_mb(),
        **provenance(),
        "device_name": _device_name(torch.device(config.device)),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_record(path, record)
    return record


def _placed_train_maps(train: Any, method_config: Any, config: RunConfig) -> tuple[Any, dict]:
    """Put the train maps where the planner says (GPU, pinned RAM or streamed memmaps); return its plan.

    The plan, with its predicted bytes and seconds per epoch from rates measured on this machine,
    goes into the record, so a run's speed can be checked against what was expected.
    """

    training = getattr(method_config, "safe", method_config)  # SAFE-A nests SAFE's settings
    plan = plan_for_maps(train.dense, config.device, batch_size=training.batch_size, epochs=training.epochs,
                         cache_dir=config.cache_dir)
    placed = place_maps(train.dense, plan, config.device)
    return SplitFeatures(labels=train.labels, pooled=train.pooled, dense=placed), plan.as_record()


def feature_kind(method: str) -> str:
    """What a method needs cached: dense maps if it pools them itself (SAFE, SAFE-A), else pooled features."""

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

    return load_clip(backbone, weights, device=device)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, options_json: str) -> Any:

    return get_dataset(name, root, **json.loads(options_json))


_CLASSIFIERS: dict[tuple[int, tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}


def _text_classifier(clip: Any, classnames: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:

    key = (id(clip.model), tuple(classnames), tuple(templates))
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()  # one model at a time: do not pin old models' weights
        _CLASSIFIERS[key] = zero_shot_classifier(clip, classnames, templates)
    return _CLASSIFIERS[key]


def _split_features(clip: Any, config: RunConfig, images: Any, split: str, kind: str, views: int,
                    progress: bool) -> Any:
    """The split's cached features (extracted on a miss) as a ``SplitFeatures`` over memmaps."""

    entry = cache_image_features(
        clip, images, config.cache_dir, split=split, kind=kind, views=views,
        # The eval transform draws nothing at random: seed 0 lets every seed's runs share the test cache.
        seed=config.seed if views else 0,
        batch_size=config.batch_size, num_workers=config.num_workers, autocast_dtype=config.autocast_dtype,
        progress=progress, dataset=config.dataset, dataset_options=json.dumps(config.dataset_options, sort_keys=True),
    )
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
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise RunConfigError(f"method_configs: {unknown} are not among the methods run ({', '.join(methods)}); "
                             "a misspelled name would silently run that method with its defaults")
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
