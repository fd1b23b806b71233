"""Does SAFE help the mini-CLIP where we know which region matters? (the mini-CLIP acceptance runs)

    python -m safelib.experiments.miniclip_eval --task miniworld_shape_largest

On a target-among-distractors task (default: the shape of the one large object among small
distractors of any shape) one ``run_grid`` fits, per few-shot seed, zero-shot CLIP, a linear probe
and SAFE with each trainable set of the attention pooling (all, attention only, values only). Each
is an ordinary run (``safelib.runs``): one record per run under ``out_dir``, the book's only source
of numbers. On top, from the fitted methods, the attention mass on the target's grid cells of the
test split (heads averaged, mean token excluded), as each SAFE record keeps it
(``record["attention_on_target"]``): for zero-shot and the linear probe the original pooling's, for
SAFE the fine-tuned pooling's. ``--summary`` writes a small JSON that points at the records and
copies their masses; the Markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_json
from ..data import miniworld_tasks as mt
from ..runs import provenance, run_grid

SUMMARY_FORMAT = "safelib.miniclip_eval/2"
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
    """What the comparison depends on. ``pool_per_class`` = (train pool, val pool, test) images per
    class of the task (its ``dataset_options``); ``train_views``: augmented views per training image."""

    task: str = "miniworld_shape_largest"
    shots: int = 16
    seeds: tuple[int, ...] = (1, 2, 3)
    pool_per_class: tuple[int, int, int] = (32, 8, 100)
    task_seed: int = 0
    checkpoint: str | None = None  # None: the shipped mini-CLIP
    safe: dict = field(default_factory=lambda: {"epochs": 30, "lr": 1e-3, "batch_size": 32})
    rows: tuple[str, ...] = tuple(ROWS)
    train_views: int = 10

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

    def method_configs(self) -> dict[str, list[dict]]:
        """``run_grid``'s ``method_configs``: one entry per row, SAFE's rows on top of ``safe``."""
        out: dict[str, list[dict]] = {}
        for row in self.rows:
            method, options = ROWS[row]
            out.setdefault(method, []).append({**self.safe, **options} if method == "safe" else dict(options))
        return out


def _row_of(record: dict) -> str:
    config = record["config"]
    for row, (method, options) in ROWS.items():
        if method == config["method"] and all(config["method_config"].get(k) == v for k, v in options.items()):
            return row
    raise ValueError(f"no row for the run {config['method']} {config['method_config']}")


def _attention_on_target(record: dict, path: str | os.PathLike) -> dict[str, float]:
    """The SAFE record's attention on the target (original and fine-tuned pooling), which ``sl.run`` keeps."""
    if "attention_on_target" not in record:
        raise ValueError(f"{path} has no attention_on_target (written before runs kept it): delete it and rerun")
    return record["attention_on_target"]


def evaluate(config: EvalConfig = EvalConfig(), clip: Any = None, cache_dir: str = "cache",
             out_dir: str = "runs/miniclip_eval", progress: bool = True) -> dict:
    """Run the grid (finished runs are read back); return the summary.

    The summary: per row, per seed, the run record's path, test accuracy (percent, from the record)
    and attention mass on the target; means over seeds; the original pooling's mass.
    """
    records = run_grid(
        config.task, list(dict.fromkeys(ROWS[r][0] for r in config.rows)), [config.shots], list(config.seeds),
        method_configs=config.method_configs(), clip=clip, progress=progress,
        backbone="miniclip", weights=config.checkpoint or "shipped", train_views=config.train_views,
        dataset_options={"per_class": list(config.pool_per_class), "seed": config.task_seed},
        cache_dir=cache_dir, out_dir=out_dir,
    )
    original, per_seed = None, {row: [] for row in config.rows}
    for record, path in zip(records, records.paths):
        row = _row_of(record)
        mass = None
        if record["config"]["method"] == "safe":  # every run shares the task's test split and original pooling
            masses = _attention_on_target(record, path)
            original, mass = masses["original"], masses["fine_tuned"]
        per_seed[row].append({"seed": record["config"]["seed"], "test_acc": record["test_acc"], "target_mass": mass,
                              "record": os.path.relpath(path, out_dir)})
    for runs in per_seed.values():  # zero-shot and the linear probe pool with the original layer
        for entry in runs:
            entry["target_mass"] = original if entry["target_mass"] is None else entry["target_mass"]
    summary = {row: {"test_acc_mean": float(np.mean([r["test_acc"] for r in runs])),
                     "test_acc_std": float(np.std([r["test_acc"] for r in runs])),
                     "target_mass_mean": None if original is None else float(np.mean([r["target_mass"] for r in runs]))}
               for row, runs in per_seed.items()}
    return {"format": SUMMARY_FORMAT, "config": asdict(config), "records_under": str(out_dir),
            "original_target_mass": original, "per_seed": per_seed, "summary": summary,
            "provenance": provenance()}


def markdown_table(summary: dict) -> str:
    """The comparison as a Markdown table: mean +- std over seeds, attention mass on the target."""
    seeds = summary["config"]["seeds"]
    lines = [f"| method | test acc. (%), mean ± std over seeds {', '.join(map(str, seeds))} | "
             "target attention mass (mean) | per-seed accuracy |", "|---|---|---|---|"]
    for row, runs in summary["per_seed"].items():
        s = summary["summary"][row]
        per = " / ".join(f"{r['test_acc']:.1f}" for r in runs)
        mass = "n/a" if s["target_mass_mean"] is None else f"{s['target_mass_mean']:.3f}"
        lines.append(f"| {row} | {s['test_acc_mean']:.1f} ± {s['test_acc_std']:.1f} | {mass} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = EvalConfig()
    p.add_argument("--task", default=d.task, choices=mt.TASK_NAMES)
    p.add_argument("--shots", type=int, default=d.shots)
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--checkpoint", default=None, help="a mini-CLIP safetensors file (default: the shipped one)")
    p.add_argument("--safe", default=json.dumps(d.safe), help="SAFE options as JSON (see safelib.SafeConfig)")
    p.add_argument("--train-views", type=int, default=d.train_views)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--out-dir", default="runs/miniclip_eval", help="where the run records go")
    p.add_argument("--summary", default=None, help="JSON summary to write (paths of the records, attention masses)")
    a = p.parse_args(argv)
    config = EvalConfig(task=a.task, shots=a.shots, seeds=tuple(a.seeds), checkpoint=a.checkpoint,
                        safe=json.loads(a.safe), train_views=a.train_views)
    summary = evaluate(config, cache_dir=a.cache_dir, out_dir=a.out_dir)
    if a.summary:
        Path(a.summary).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(a.summary), summary, sort_keys=True, indent=1)
    print(markdown_table(summary))
    print(f"original pooling's target mass: {summary['original_target_mass']:.3f}; records under {a.out_dir}")


if __name__ == "__main__":
    main()
