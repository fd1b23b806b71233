"""``python -m safelib.runs``: run methods over shots and seeds, then print the aggregated table.

Example (the mini-CLIP acceptance grid, offline on a CPU)::

    python -m safelib.runs --dataset miniworld_shape_largest --methods all --shots 1 2 4 8 16 --seeds 1 2 3

Finished runs are skipped, so an interrupted grid resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import RunConfigError
from .runner import run_grid
from ..methods import METHODS
from .aggregate import aggregate, load_records, summary_table

JSON_TYPES = {str: "string", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


def main(argv: list[str] | None = None) -> int:
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
    # json.loads('"safe"') is a str, which later reads as the letters s, a, f, e: name the type here
    for flag, value, example in (("--method-config", method_configs, '{"safe": {"epochs": 10}}'),
                                 ("--dataset-options", dataset_options, '{"per_class": [4, 2, 6]}')):
        if not isinstance(value, dict):
            what = "method names to option dicts" if flag == "--method-config" else "option names to values"
            parser.error(f"{flag} must be a JSON object mapping {what}, e.g. '{example}'; got a JSON "
                         f"{JSON_TYPES.get(type(value), type(value).__name__)}: {json.dumps(value)}")
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

    table = aggregate(load_records(Path(args.out_dir) / args.dataset))
    table = table[table["method"].isin(methods) & table["shots"].isin(args.shots)]
    print(summary_table(table).to_string())
    print(f"\nwall time: {time.perf_counter() - start:.1f} s (records under {args.out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
