"""One run = one method on one few-shot sample, from a validated config to a written record.

``run`` loads the model and the dataset, draws (and saves) the few-shot sample, reads or builds
the feature caches, fits the method on few-shot train + validation, predicts the test split and
writes the record: the config, package version and git commit, library versions, seed,
sampled-ids file, validation and test accuracy, the hyperparameters chosen on validation, wall
time per stage and peak memory. A run whose record exists is not redone (resume).
``run(config, return_method=True)`` also hands back what was fitted (a ``FittedRun``), so a
chapter draws its figures from the very run its record describes.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .aggregate import records_frame
from .config import RunConfig, RunConfigError, identity_of
from .records import RECORD_FORMAT, jsonable, provenance, read_record, write_record
from .. import data
from ..clip.attnpool import attention_weights
from ..clip.models import clip_digest, load_clip
from ..clip.text import zero_shot_classifier
from ..data import ImageSet, SplitDataset, get_dataset
from ..data.targets import target_attention_mass, target_grid_masks
from ..features.extract import cache_image_features
from ..methods import METHODS, ClipHead, FewShotData, FewShotMethod, MethodConfig, SplitFeatures, accuracy
from ..methods.presets import resolve_preset, selection_of
from ..perf.calibration import plan_for_maps, remove_stale_samples

# (name, data root, options as canonical JSON) -> the loaded dataset
LoadDataset = Callable[[str, "str | None", str], SplitDataset]


@dataclass
class FittedRun:
    """What one run fitted and scored: the method, the features it saw, the images behind them.

    ``splits``: "train" (as placed for training), "val" and "test" ``SplitFeatures``; the test
    labels are in ``test_set``'s classes. ``test_classes``: the columns of the method's logits
    that were scored (None: all; set when the test dataset holds a subset of the classes).
    """

    config: RunConfig
    method: FewShotMethod
    head: ClipHead
    splits: dict[str, SplitFeatures]
    train_set: ImageSet
    val_set: ImageSet
    test_set: ImageSet
    test_classes: torch.Tensor | None = None

    def test_logits(self) -> torch.Tensor:
        """The scored test logits (restricted to the test dataset's classes)."""
        return _scored(self.method.predict(self.splits["test"]), self.test_classes)


def run(config: RunConfig, *, clip: Any = None, overwrite: bool = False, progress: bool = False,
        return_method: bool = False) -> dict[str, Any] | tuple[dict[str, Any], FittedRun]:
    """Run one method on one few-shot sample and write its record; an existing record is returned as is.

    ``clip`` may pass an already loaded model (a notebook's); it must be the config's backbone
    and weights. ``return_method=True`` returns ``(record, FittedRun)``; when the record exists
    the method is fitted again (runs are deterministic) and the stored record is returned unchanged.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"run takes a RunConfig, got {type(config).__name__}")
    path = config.record_path()
    if path.exists() and not overwrite and not return_method:
        return read_record(path)
    remove_stale_samples()  # what an earlier, killed run's calibration left in the temp dir
    record, fitted = _run(config, clip, progress, _load_dataset)
    if path.exists() and not overwrite:
        stored = read_record(path)
        if stored["test_acc"] != record["test_acc"]:
            warnings.warn(f"{path}: refitting gave test accuracy {record['test_acc']:.2f}, the record says "
                          f"{stored['test_acc']:.2f} (another thread count or library version?); "
                          "the record is kept: pass overwrite=True to replace it", stacklevel=2)
        record = stored
    else:
        write_record(path, record)
    return (record, fitted) if return_method else record


def _run(config: RunConfig, clip: Any, progress: bool, datasets: LoadDataset) -> tuple[dict[str, Any], FittedRun]:
    stages = StageTimer(torch.device(config.device))
    with stages("load_model"):
        clip = _checked_clip(config, clip)
    with stages("sample"):
        dataset = datasets(config.dataset, config.data_root, config.options_key)
        test_data = dataset if config.test_dataset is None else datasets(config.test_dataset, config.data_root,
                                                                          config.test_options_key)
        test_classes = _test_classes(config, dataset, test_data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", data.FewShotWarning)
            train_set, val_set = data.sample_few_shot(dataset, config.shots, config.seed)
        sampling_warnings = [str(w.message) for w in caught if issubclass(w.category, data.FewShotWarning)]
        _to_console(config, sampling_warnings)  # they change what the run means: not only in the record
        ids_file = data.save_few_shot(
            Path(config.out_dir) / config.dataset / "samples"
            / data.few_shot_filename(config.dataset, config.shots, config.seed, options=config.dataset_options),
            train_set, val_set, dataset=config.dataset, shots=config.shots, seed=config.seed,
            options=config.dataset_options,
        )
    with stages("text_classifier"):
        classifier = _text_classifier(clip, dataset.classnames, dataset.templates)
    # The preset needs the dataset and shots, which only the run knows (safelib.methods.presets).
    resolved, preset = resolve_preset(config.method_config, config.dataset, config.shots, config.train_views)
    method = METHODS[config.method](resolved)
    if selection_of(preset) == "full_val":  # the reference's selection split, where there is one; never test
        val_set = dataset.val if dataset.val is not None else val_set
        preset["selection_used"] = "full_val" if dataset.val is not None else "few_shot_val (no val split)"
    train_views = 0 if method.train_view == "eval" else config.train_views
    kind = method.feature_kind
    with stages("features"):
        train_key, test_key = (config.dataset, config.options_key), (config.test_on, config.test_options_key)
        splits = {
            "train": _split_features(clip, config, train_set, "train", kind, train_views, progress, train_key),
            "val": _split_features(clip, config, val_set, "val", kind, 0, progress, train_key),
            "test": _split_features(clip, config, test_data.test, "test", kind, 0, progress, test_key),
        }
    cache_plan = None
    if kind == "dense":
        with stages("plan_cache"):
            splits["train"], cache_plan = _placed_train_maps(splits["train"], method.config, config)
    head = ClipHead(classifier=classifier, logit_scale=clip.logit_scale, attnpool=clip.attnpool,
                    classnames=tuple(dataset.classnames), clip=clip)
    with stages("fit"):
        method.fit(FewShotData(train=splits["train"], val=splits["val"], head=head, seed=config.seed))
    training_warnings = list(getattr(method, "training_warnings", []))
    _to_console(config, training_warnings)
    with stages("predict"):
        val_logits = method.predict(splits["val"])
        test_logits = _scored(method.predict(splits["test"]), test_classes)

    plain = config.to_dict()  # the one place the config becomes plain values
    record = {
        "format": RECORD_FORMAT,
        "config": plain,
        "identity": identity_of(plain, config.weights_digest, config.data_digest),
        # what was loaded: the weights file's content hash (None: a tag or random) and the whole model's
        "weights_digest": config.weights_digest,
        "model_digest": clip_digest(clip),
        "data_digest": config.data_digest,  # a custom dataset's image files (None: a registry or generated set)
        "val_acc": accuracy(val_logits, splits["val"].labels),
        "test_acc": accuracy(test_logits, splits["test"].labels),
        "chosen": jsonable(method.chosen),
        "preset": jsonable(preset),
        "num_classes": len(dataset.classnames),
        "num_images": {"train": len(train_set), "val": len(val_set), "test": len(test_data.test)},
        "sampled_ids": os.path.relpath(ids_file, config.record_path().parent),
        "sampling_warnings": sampling_warnings,
        "training_warnings": training_warnings,
        "cache_plan": cache_plan,
        "timings": stages.seconds,
        "wall_seconds": sum(stages.seconds.values()),
        "peak_memory_mb": stages.peak_memory_mb(),
        **provenance(),
        "device_name": _device_name(torch.device(config.device)),
        "torch_threads": torch.get_num_threads(),  # CPU results are bitwise reproducible at a fixed thread count
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.test_dataset is not None:
        record["test_num_classes"] = len(test_data.classnames)
    sweep = getattr(method, "blend_sweep_accuracy", None)  # SAFE: test accuracy at every blend of its grid,
    if sweep is not None:                                   # for notebooks/06_ablations only, never selection
        record["test_sweep"] = sweep(splits["test"], test_classes)
    pools = getattr(method, "attention_pools", lambda: None)()  # SAFE and SAFE-A, on tasks with a drawn target
    if pools is not None and data.has_targets(test_data.test):
        with stages("attention"):
            record["attention_on_target"] = attention_on_target(*pools, splits["test"], test_data.test)
    fitted = FittedRun(config=config, method=method, head=head, splits=splits, train_set=train_set,
                       val_set=val_set, test_set=test_data.test, test_classes=test_classes)
    return record, fitted


@torch.no_grad()
def attention_on_target(fine_tuned: torch.nn.Module, original: torch.nn.Module, test: SplitFeatures,
                        images: ImageSet, batch_size: int = 256) -> dict[str, float]:
    """Mean share of spatial attention on each test image's target (``data.target_attention_mass``), for the
    original and the fine-tuned pooling: the number chapters 01, 02 and 06 read to see *where* SAFE looks."""
    dense = test.dense.eval_view()
    coverage = torch.as_tensor(target_grid_masks(images, dense.shape[-1]))
    masses = {}
    for name, pool in (("original", original), ("fine_tuned", fine_tuned)):
        device = next(pool.parameters()).device
        per_image = [target_attention_mass(attention_weights(pool, dense[s:s + batch_size].to(device)),
                                           coverage[s:s + batch_size]).cpu()
                     for s in range(0, len(dense), batch_size)]
        masses[name] = float(torch.cat(per_image).mean())
    return masses


class RunWarning(UserWarning):
    """Something that changes what a run's numbers mean (a short class, a loss that rose): shown on the
    console as well as kept in the record."""


def _to_console(config: RunConfig, messages: Sequence[str]) -> None:
    for message in messages:
        warnings.warn(f"{config.method} on {config.dataset} ({config.shots}-shot, seed {config.seed}): {message}",
                      RunWarning, stacklevel=3)


def _test_classes(config: RunConfig, dataset: SplitDataset, test_data: SplitDataset) -> torch.Tensor | None:
    """For each test class, its column among ``dataset``'s classes; None when the lists are the same.

    ImageNet-A and -R hold 200 of ImageNet's classes: their logits are restricted to those columns.
    """
    if test_data is dataset or tuple(test_data.classnames) == tuple(dataset.classnames):
        return None
    missing = [c for c in test_data.classnames if c not in dataset.classnames]
    if missing:
        raise RunConfigError(
            f"RunConfig.test_dataset: {config.test_dataset!r} has {len(missing)} class(es) that {config.dataset!r} "
            f"lacks (e.g. {missing[:3]}); a test dataset's classes must be among the training dataset's")
    column = {name: k for k, name in enumerate(dataset.classnames)}
    return torch.tensor([column[c] for c in test_data.classnames])


def _scored(logits: torch.Tensor, test_classes: torch.Tensor | None) -> torch.Tensor:
    return logits if test_classes is None else logits[:, test_classes.to(logits.device)]


def _placed_train_maps(train: SplitFeatures, method_config: MethodConfig,
                       config: RunConfig) -> tuple[SplitFeatures, dict]:
    """The train split with its ``DenseMaps`` where the planner says (GPU, pinned RAM or streamed memmaps),
    and the plan's record.

    The plan, with its predicted bytes and seconds per epoch from rates measured on this machine,
    goes into the record, so a run's speed can be checked against what was expected.
    """
    training = method_config.safe_config  # SAFE's settings (SAFE-A nests them)
    plan = plan_for_maps(train.dense, config.device, batch_size=training.batch_size, epochs=training.epochs,
                         cache_dir=config.cache_dir)
    placed = train.dense.placed(plan.placement, config.device)
    return SplitFeatures(labels=train.labels, pooled=train.pooled, dense=placed), plan.as_record()


def feature_kind(method: str) -> str:
    """What a method needs cached: dense maps if it pools them itself (SAFE, SAFE-A), else pooled features."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[method].feature_kind


def _checked_clip(config: RunConfig, clip: Any) -> Any:
    if clip is None:
        return load_clip(config.backbone, config.weights, device=config.device)
    if clip.name != config.backbone or (clip.pretrained or None) != (config.weights or None):
        raise RunConfigError(
            f"RunConfig.backbone/weights: the clip passed in is {clip.name}/{clip.pretrained}, "
            f"the config says {config.backbone}/{config.weights}"
        )
    return clip.to(config.device)


def _load_dataset(name: str, root: str | None, options_key: str) -> SplitDataset:
    return get_dataset(name, root, **json.loads(options_key))


# Per-model memo: the text classifier of (class names, templates), dropped with the model.
_CLASSIFIERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _text_classifier(clip: Any, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    per_model = _CLASSIFIERS.setdefault(clip.model, {})
    key = (tuple(classnames), tuple(templates))
    if key not in per_model:
        per_model[key] = zero_shot_classifier(clip, classnames, templates)
    return per_model[key]


def _split_features(clip: Any, config: RunConfig, images: Any, split: str, kind: str, views: int,
                    progress: bool, source: tuple[str, str]) -> SplitFeatures:
    """The split's cached features (extracted on a miss) as a ``SplitFeatures`` over memmaps.

    ``source``: (dataset name, options as canonical JSON) of the images: the cache key's fields.
    """
    name, options_key = source
    entry = cache_image_features(
        clip, images, config.cache_dir, split=split, kind=kind, views=views,
        # The eval transform draws nothing at random: seed 0 lets every seed's runs share the test cache.
        seed=config.seed if views else 0,
        batch_size=config.batch_size, num_workers=config.num_workers, autocast_dtype=config.autocast_dtype,
        progress=progress, dataset=name, dataset_options=options_key,
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


MethodSettings = MethodConfig | Mapping[str, Any] | Sequence[MethodConfig | Mapping[str, Any]]


class GridRecords(list):
    """The records of a grid, in run order (a list of dicts), with the file each one is in.

    ``paths[i]`` is ``self[i]``'s record file; ``fitted[i]`` its ``FittedRun`` when the grid was
    asked for them; ``frame()`` is the ``load_records`` table of these records, without re-reading.
    """

    def __init__(self, records: list[dict[str, Any]], paths: list[Path], fitted: list[FittedRun] | None = None):
        super().__init__(records)
        self.paths = paths
        self.fitted = fitted

    def frame(self) -> pd.DataFrame:
        return records_frame(zip(self, self.paths))


def run_grid(
    dataset: str,
    methods: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    *,
    method_configs: Mapping[str, MethodSettings] | None = None,
    progress: bool = True,
    return_methods: bool = False,
    clip: Any = None,
    **common: Any,
) -> GridRecords:
    """Every (seed, shots, method, setting) run, skipping those with a record already; returns the records.

    ``method_configs`` maps a method name to its config (a dict of overrides or a ``MethodConfig``)
    or to a list of them, one run per setting (e.g. SAFE with ``trainable`` "all" and "attention").
    ``common`` holds the other ``RunConfig`` fields. Configs are all built (and so validated) and
    the datasets' class lists checked before the first run starts; the model and each dataset are
    loaded once for the whole grid. ``return_methods=True`` fits finished runs again too (see
    ``run``) and keeps every ``FittedRun`` in the result's ``fitted``.
    """
    overrides = dict(method_configs or {})
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise RunConfigError(f"method_configs: {unknown} are not among the methods run ({', '.join(methods)}); "
                             "a misspelled name would silently run that method with its defaults")
    configs = [
        RunConfig(dataset=dataset, method=m, shots=k, seed=s, method_config=setting, **common)
        for s in seeds for k in shots for m in methods for setting in _settings(overrides.get(m))
    ]
    datasets = functools.cache(_load_dataset)  # loaded once for the grid (a folder listing can be slow)
    for config in {(c.dataset, c.options_key, c.test_on, c.test_options_key): c for c in configs}.values():
        if config.test_dataset is not None:  # class lists checked before any run starts
            _test_classes(config, datasets(config.dataset, config.data_root, config.options_key),
                          datasets(config.test_dataset, config.data_root, config.test_options_key))
    remove_stale_samples()  # what an earlier, killed run's calibration left in the temp dir
    records, paths, fitted = [], [], []
    bar = tqdm(configs, desc="runs", unit="run") if progress else configs
    for config in bar:
        if progress:
            bar.set_postfix_str(f"{config.method} {config.shots}-shot seed {config.seed}")
        path = config.record_path()
        if path.exists() and not return_methods:
            records.append(read_record(path))
        else:
            clip = clip if clip is not None else load_clip(config.backbone, config.weights, device=config.device)
            record, fit = _run(config, clip, False, datasets)
            if path.exists():
                record = read_record(path)
            else:
                write_record(path, record)
            records.append(record)
            fitted.append(fit)
        paths.append(path)
    return GridRecords(records, paths, fitted if return_methods else None)


def _settings(value: MethodSettings | None) -> list[MethodConfig | Mapping[str, Any]]:
    if value is None:
        return [{}]
    if isinstance(value, (Mapping, MethodConfig)):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        return list(value)
    raise RunConfigError(f"method_configs: each value must be a dict of options, a MethodConfig or a non-empty "
                         f"list of them, got {value!r}")
