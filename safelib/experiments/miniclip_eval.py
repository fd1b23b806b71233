"""Does SAFE help the mini-CLIP where we know which region matters?

    python -m safelib.experiments.miniclip_eval --out runs/miniclip_eval/shape_largest.json

On a target-among-distractors task (default: the shape of the one large object among small
distractors of any shape) this fits, per few-shot seed, zero-shot CLIP, a linear probe on the
original pooled features, and SAFE with each trainable set of the attention pooling (all,
attention only, values only). It reports each one's test accuracy and the attention mass on the
target's grid cells (heads averaged, mean token excluded): for zero-shot and the linear probe that
is the original pooling's, for SAFE the fine-tuned pooling's. The record (config, provenance,
per-seed numbers, timings) is written as JSON; the Markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..clip.attnpool import attention_weights
from ..clip.models import load_clip
from ..clip.text import zero_shot_classifier
from ..data import get_dataset, sample_few_shot
from ..data import miniworld_tasks as mt
from ..features.extract import dense_features
from ..methods import ClipHead, FewShotData, SplitFeatures, make_method
from ..methods.base import accuracy
from ..runs import provenance, write_record

# Row label -> (method name, config). SAFE's settings are ours, fixed before looking at test.
ROWS: dict[str, tuple[str, dict]] = {
    "zero-shot": ("zero_shot", {}),
    "linear probe": ("linear_probe", {}),
    "SAFE (all)": ("safe", {"trainable": "all"}),
    "SAFE (attention)": ("safe", {"trainable": "attention"}),
    "SAFE (values)": ("safe", {"trainable": "values"}),
}


@dataclass(frozen=True)
class EvalConfig:
    """What the comparison depends on. `pool_per_class` = (train pool, val pool, test) images per class."""

    task: str = "miniworld_shape_largest"
    shots: int = 16
    seeds: tuple[int, ...] = (1, 2, 3)
    pool_per_class: tuple[int, int, int] = (32, 8, 100)
    task_seed: int = 0
    checkpoint: str | None = None  # None: the shipped mini-CLIP
    safe: dict = field(default_factory=lambda: {"epochs": 30, "lr": 1e-3, "batch_size": 32})
    rows: tuple[str, ...] = tuple(ROWS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "pool_per_class", tuple(int(n) for n in self.pool_per_class))
        object.__setattr__(self, "rows", tuple(self.rows))
        if self.task not in mt.TASK_NAMES:
            raise ValueError(f"task must be a mini-world task; valid: {mt.TASK_NAMES}")
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; valid: {list(ROWS)}")
        if self.shots < 1 or self.pool_per_class[0] < self.shots:
            raise ValueError(f"need 1 <= shots <= train pool per class, got shots={self.shots}, "
                             f"pool_per_class={self.pool_per_class}")
        if not self.seeds:
            raise ValueError("seeds must name at least one few-shot seed (the field uses 1, 2, 3)")


def _dense_maps(clip, images, batch_size: int = 64) -> torch.Tensor:
    """N x C x H x W frozen-trunk maps of an ImageSet (one eval view)."""
    pixels = torch.stack([clip.preprocess(images.load_image(i)) for i in range(len(images))])  # N x 3 x S x S
    return dense_features(clip, pixels, batch_size=batch_size)


def _rows_of(ids: tuple[str, ...], pool_ids: tuple[str, ...]) -> torch.Tensor:
    where = {image_id: row for row, image_id in enumerate(pool_ids)}
    return torch.tensor([where[i] for i in ids])


@torch.no_grad()
def _mass(attnpool, dense: torch.Tensor, coverage: np.ndarray) -> float:
    return float(mt.target_attention_mass(attention_weights(attnpool, dense), coverage).mean())


def evaluate(config: EvalConfig = EvalConfig(), clip=None, progress: bool = True) -> dict:
    """Run the comparison; returns the record (per-seed accuracies in percent and attention masses)."""
    start = time.perf_counter()
    clip = clip if clip is not None else load_clip("miniclip", pretrained=config.checkpoint)
    data = get_dataset(config.task, per_class=config.pool_per_class, seed=config.task_seed)
    head = ClipHead(zero_shot_classifier(clip, data.classnames, data.templates), clip.logit_scale,
                    clip.attnpool, data.classnames)
    pools = {name: getattr(data, name) for name in ("train", "val", "test")}
    dense = {name: _dense_maps(clip, images) for name, images in pools.items()}  # N x C x H x W each
    coverage = mt.target_grid_masks(pools["test"], clip.grid)  # N x grid x grid
    test = SplitFeatures(labels=torch.tensor(pools["test"].labels), dense=dense["test"][None])
    original_mass = _mass(clip.attnpool, dense["test"], coverage)
    features_s = time.perf_counter() - start

    per_seed: dict[str, list[dict]] = {row: [] for row in config.rows}
    for seed in config.seeds:
        train, val = sample_few_shot(data, config.shots, seed)
        splits = {}
        for name, few in (("train", train), ("val", val)):
            rows = _rows_of(few.ids, pools[name].ids)
            splits[name] = SplitFeatures(labels=torch.tensor(few.labels), dense=dense[name][rows][None])
        few_shot = FewShotData(splits["train"], splits["val"], head, seed=seed)
        for row in config.rows:
            method_name, options = ROWS[row]
            if method_name == "safe":
                options = {**config.safe, **options}
            t0 = time.perf_counter()
            method = make_method(method_name, options).fit(few_shot)
            acc = accuracy(method.predict(test), test.labels)
            mass = _mass(method.training.attnpool, dense["test"], coverage) if method_name == "safe" else original_mass
            per_seed[row].append({"seed": seed, "test_acc": acc, "target_mass": mass,
                                  "chosen": method.chosen, "seconds": time.perf_counter() - t0})
            if progress:
                print(f"seed {seed} {row:18s} acc {acc:5.1f}  target mass {mass:.3f}", flush=True)

    summary = {row: {"test_acc_mean": float(np.mean([r["test_acc"] for r in runs])),
                     "test_acc_std": float(np.std([r["test_acc"] for r in runs])),
                     "target_mass_mean": float(np.mean([r["target_mass"] for r in runs])),
                     "target_mass_min_gain": float(min(r["target_mass"] - original_mass for r in runs))}
               for row, runs in per_seed.items()}

    return {"kind": "miniclip_safe_comparison", "config": asdict(config), "provenance": provenance(),
            "original_target_mass": original_mass, "per_seed": per_seed, "summary": summary,
            "timings": {"features_s": features_s, "total_s": time.perf_counter() - start}}


def markdown_table(record: dict) -> str:
    """The comparison as a Markdown table: mean +- std over seeds, attention mass on the target."""
    seeds = record["config"]["seeds"]
    lines = [f"| method | test acc. (%), mean ± std over seeds {', '.join(map(str, seeds))} | "
             "target attention mass (mean) | per-seed accuracy |", "|---|---|---|---|"]
    for row, runs in record["per_seed"].items():
        s = record["summary"][row]
        per = " / ".join(f"{r['test_acc']:.1f}" for r in runs)
        lines.append(f"| {row} | {s['test_acc_mean']:.1f} ± {s['test_acc_std']:.1f} | {s['target_mass_mean']:.3f} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = EvalConfig()
    p.add_argument("--task", default=d.task, choices=mt.TASK_NAMES)
    p.add_argument("--shots", type=int, default=d.shots)
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--checkpoint", default=None, help="a mini-CLIP safetensors file (default: the shipped one)")
    p.add_argument("--safe", default=json.dumps(d.safe), help="SAFE options as JSON (see safelib.SafeConfig)")
    p.add_argument("--out", default="runs/miniclip_eval/record.json", help="JSON run record to write")
    a = p.parse_args(argv)
    config = EvalConfig(task=a.task, shots=a.shots, seeds=tuple(a.seeds), checkpoint=a.checkpoint,
                        safe=json.loads(a.safe))
    record = evaluate(config)

    write_record(a.out, record)
    print(markdown_table(record))
    print(f"original pooling's target mass: {record['original_target_mass']:.3f}; record: {a.out}")


if __name__ == "__main__":
    main()
