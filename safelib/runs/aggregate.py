"""Run records -> tidy tables: mean and std over seeds per dataset and shot, and the 11-dataset mean.

Records are found by glob (one JSON file per run, see ``safelib.runs``), so records written by
many machines into one folder aggregate without any coordination. Tables are long ("tidy"):
one row per (dataset and its options, test dataset, model, method, setting, shots), ready for
seaborn and the book; every column is read from the record's ``config``. A table cell never
merges runs on different data, models or settings. Std is the sample standard deviation over
seeds (ddof = 1; NaN with a single seed).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..data import list_datasets
from .config import setting_of
from .records import RECORD_SUFFIX, read_record

BENCHMARK_MEAN = "mean (11 datasets)"
# dataset_options and test_dataset: canonical JSON / a name ("" = dataset's own test split);
# setting: the canonical JSON of the method's flattened settings (``RunConfig.setting``).
# weights_digest: the weights file's content hash ("" for tags and random weights), so runs on two
# files with one name (a re-pretrained mini-CLIP) never share a cell; data_digest likewise for a custom
# dataset's image files ("" for the registry's and generated sets), so runs before and after an edit never do.
GROUP = ["dataset", "dataset_options", "data_digest", "test_dataset", "backbone", "weights", "weights_digest", "method",
         "setting", "shots"]
DATA_COLUMNS = ("dataset", "dataset_options", "data_digest", "test_dataset")
METRICS = ["val_acc", "test_acc", "wall_seconds"]


def load_records(*sources: str | os.PathLike) -> pd.DataFrame:
    """One row per record under each folder (searched recursively) or matching each glob pattern.

    Temporary files of interrupted writes never match (they end in ``.tmp``).
    """
    if not sources:
        raise ValueError("give at least one folder or glob pattern of run records (e.g. 'runs')")
    paths: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            paths += sorted(source.rglob(f"*{RECORD_SUFFIX}"))
        else:
            paths += sorted(Path(p) for p in glob.glob(str(source), recursive=True) if not p.endswith(".tmp"))
    return records_frame((read_record(path), path) for path in dict.fromkeys(paths))  # de-duplicated, order kept


def records_frame(records: Iterable[tuple[Mapping[str, Any], str | os.PathLike]]) -> pd.DataFrame:
    """The ``load_records`` table of (record, path) pairs already in memory."""
    rows = []
    for record, path in records:
        config = record["config"]
        test = config.get("test_dataset")
        test_options = config.get("test_dataset_options") or {}
        rows.append({
            "dataset": config["dataset"], "dataset_options": _canonical(config.get("dataset_options") or {}),
            "data_digest": record.get("data_digest") or "",
            "test_dataset": "" if test is None else test + (f" {_canonical(test_options)}" if test_options else ""),
            "backbone": config["backbone"], "weights": str(config["weights"]),
            "weights_digest": record.get("weights_digest") or "", "method": config["method"],
            "setting": _canonical(setting_of(config)), "shots": config["shots"], "seed": config["seed"],
            "val_acc": record["val_acc"], "test_acc": record["test_acc"], "wall_seconds": record["wall_seconds"],
            "chosen": _canonical(record["chosen"]), "git_commit": record.get("git_commit"), "path": str(path),
        })
    columns = [*GROUP, "seed", *METRICS, "chosen", "git_commit", "path"]
    return pd.DataFrame(rows, columns=columns)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def aggregate(records: pd.DataFrame, benchmark_datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds per group, plus ``BENCHMARK_MEAN`` rows where all 11 datasets are in.

    ``benchmark_datasets`` defaults to the registry's 11 benchmarks.
    """
    _check_columns(records)
    table = _over_seeds(records)
    mean = benchmark_mean(records, benchmark_datasets)
    return pd.concat([table, mean], ignore_index=True) if len(mean) else table


def _over_seeds(records: pd.DataFrame) -> pd.DataFrame:
    if records.empty:
        return pd.DataFrame(columns=[*GROUP, "n_seeds", "seeds", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")]])
    grouped = records.groupby(GROUP, sort=True, dropna=False)
    table = grouped[METRICS].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table.insert(0, "n_seeds", grouped["seed"].nunique())
    table.insert(1, "seeds", grouped["seed"].agg(lambda s: ",".join(str(x) for x in sorted(s))))
    return table.reset_index()


def benchmark_mean(records: pd.DataFrame, datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """The 11-dataset mean: per seed, the mean over the datasets (only seeds that have all of
    them), then mean and std over those seeds. Groups missing a dataset get no row."""
    _check_columns(records)
    if datasets is None:
        datasets = list_datasets(kind="benchmark")
    datasets = list(datasets)
    # each benchmark on its own test split, without options (a run tested on ImageNet-A is not ImageNet's)
    subset = records[records["dataset"].isin(datasets) & (records["test_dataset"] == "")
                     & (records["dataset_options"] == _canonical({}))]
    if subset.empty:
        return _over_seeds(subset)
    keys = [c for c in GROUP if c not in DATA_COLUMNS]
    per_seed = subset.groupby([*keys, "seed"], dropna=False).agg(
        n=("dataset", "nunique"), **{m: (m, "mean") for m in METRICS}
    ).reset_index()
    per_seed = per_seed[per_seed["n"] == len(datasets)].drop(columns="n")
    per_seed.insert(0, "dataset", BENCHMARK_MEAN)
    per_seed.insert(1, "dataset_options", _canonical({}))
    per_seed.insert(2, "data_digest", "")
    per_seed.insert(3, "test_dataset", "")
    return _over_seeds(per_seed)


def summary_table(table: pd.DataFrame, metric: str = "test_acc", digits: int = 1) -> pd.DataFrame:
    """Rows (dataset, method), one column per shot count, cells "mean ± std (n)" for printing.

    Dataset options, test dataset, backbone, weights and setting join the rows' index when they
    vary in ``table``, so a second setting of a method is a row of its own, never silently dropped.
    Options and settings are shown in words by the fields that differ, e.g. "epochs=30, lr=0.001".
    """
    if f"{metric}_mean" not in table:
        raise ValueError(f"metric {metric!r} is not in the table; valid: {', '.join(METRICS)}")
    if table.empty:
        return pd.DataFrame()

    def cell(row: pd.Series) -> str:
        std = row[f"{metric}_std"]
        spread = "" if pd.isna(std) else f" ± {std:.{digits}f}"
        return f"{row[f'{metric}_mean']:.{digits}f}{spread} ({row['n_seeds']})"

    cells = table.assign(cell=table.apply(cell, axis=1))
    cells["dataset_options"] = _in_words(cells, "dataset_options", "dataset")
    cells["setting"] = _in_words(cells, "setting", ["dataset", "method"])
    varying = [c for c in ("dataset_options", "data_digest", "test_dataset", "backbone", "weights", "weights_digest",
                           "setting")
               if cells[c].nunique() > 1]
    return cells.pivot(index=["dataset", "method", *varying], columns="shots", values="cell")


def _in_words(table: pd.DataFrame, column: str, within: str | list[str]) -> pd.Series:
    """Each row's ``column`` (canonical JSON of a flat dict) as "name=value, ..." of the fields that
    differ among the rows with the same ``within`` (empty where there is one value only)."""
    out = pd.Series("", index=table.index, dtype=object)
    for _, rows in table.groupby(within, sort=False):
        values = {text: json.loads(text) for text in rows[column].unique()}
        if len(values) < 2:
            continue
        keys = sorted({k for v in values.values() for k in v})
        differ = [k for k in keys if len({_canonical(v.get(k)) for v in values.values()}) > 1]
        words = {text: ", ".join(f"{k}={_word(v.get(k))}" for k in differ) for text, v in values.items()}
        out[rows.index] = rows[column].map(words)
    return out


def _word(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_columns(records: pd.DataFrame) -> None:
    missing = [c for c in [*GROUP, "seed", *METRICS] if c not in records]
    if missing:
        raise ValueError(f"records lack columns {missing}; build them with load_records()")


__all__ = ["BENCHMARK_MEAN", "aggregate", "benchmark_mean", "load_records", "records_frame", "summary_table"]
