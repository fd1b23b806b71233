"""Batch reproductions: a grid of papermill executions of the book's notebooks, resumable and sharded.

``python -m safelib.reproduce GRID.yaml --out DIR [--shard I/N] [--dry-run] [--only PATTERN]
[--retry-failed]`` runs every case of a grid file (``notebooks/grids/*.yaml``): one notebook,
one parameter set, one executed notebook, the run records its cells write, one status file.
A Slurm job array (``notebooks/grids/slurm.sbatch``) or several GPUs run shards side by side on
one shared DIR. This is the top of the library: it uses ``runs`` and ``data``; nothing imports it.

    grid.py     grid file -> checked cases          case.py     a case and its id
    execute.py  lock, execute, status of one case   report.py   the aggregated table
"""
from .case import Case, case_id
from .execute import Layout, is_finished, read_status, run_case
from .grid import Grid, GridError, load_grid
from .report import results_table, write_tables

__all__ = ["Case", "Grid", "GridError", "Layout", "case_id", "is_finished", "load_grid", "read_status",
           "results_table", "run_case", "write_tables"]
