"""The table at the end of a batch: mean ± std over seeds per dataset x method x shots, and the
mean over datasets, from every run record under ``DIR/records`` (whichever shard wrote it).
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from ..atomic import atomic_write_json, atomic_write_text
from ..data import list_datasets
from ..runs.aggregate import BENCHMARK_MEAN, aggregate, benchmark_mean, load_records, summary_table
from ..runs.records import provenance

TABLE_CSV = "results.csv"
TABLE_MD = "results.md"


def results_table(records_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the tidy aggregated table, its printable summary) of the records under ``records_dir``.

    The mean over datasets is the 11-benchmark mean when all 11 are there (``aggregate``), else
    the mean over the datasets present when there are several, labelled with their count.
    """
    records = load_records(records_dir)
    if records.empty:
        return pd.DataFrame(), pd.DataFrame()
    table = aggregate(records)
    own = records[records["test_dataset"] == ""]["dataset"].unique()
    benchmarks = set(list_datasets(kind="benchmark"))
    if len(own) > 1 and not benchmarks <= set(own):
        mean = benchmark_mean(records, sorted(own))
        mean["dataset"] = mean["dataset"].replace(BENCHMARK_MEAN, f"mean ({len(own)} datasets)")
        table = pd.concat([table, mean], ignore_index=True)
    return table, summary_table(table)


def write_tables(root: str | Path) -> pd.DataFrame:
    """Write ``results.csv`` (tidy) and ``results.md`` (the summary) into ``root``; return the summary."""
    root = Path(root)
    table, summary = results_table(root / "records") if (root / "records").is_dir() else (pd.DataFrame(),) * 2
    atomic_write_text(root / TABLE_CSV, table.to_csv(index=False))
    atomic_write_text(root / TABLE_MD, markdown(summary))
    return summary


def markdown(summary: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' ``to_markdown`` needs an extra package)."""
    if summary.empty:
        return "No run records yet.\n"
    frame = summary.reset_index()
    header = [str(c) if not isinstance(c, (int,)) else f"{c} shots" for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def record_invocation(records_dir: str | Path, shard: tuple[int, int], argv: list[str]) -> Path:
    """Append this invocation to ``records/reproduce-shard<I>of<N>.json``: the command, commit, thread count.

    Records say which commit made them but not how many threads (results can move in the last
    digits with the thread count); this file travels with the records (not a ``.run.json``, so
    aggregation never reads it) and says so, for every (re)start of every shard.
    """
    path = Path(records_dir) / f"reproduce-shard{shard[0]}of{shard[1]}.json"
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        entries = []
    source = provenance()
    entries.append({
        "command": shlex.join(["python", "-m", "safelib.reproduce", *argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": source["git_commit"], "git_dirty": source["git_dirty"],
        "safelib_version": source["safelib_version"], "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "host_cpus": os.cpu_count(),
        "host": socket.gethostname(), "python": sys.executable,
    })
    return atomic_write_json(path, entries)
