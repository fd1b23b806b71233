"""Runs and their records: the only source of the book's numbers.

``run(RunConfig(...))`` runs one method on one few-shot sample and writes one JSON record;
``run_grid`` runs many and skips finished ones; ``aggregate`` reads records back into tables. From a shell::

    python -m safelib.runs --dataset miniworld_shape_largest --methods all --shots 1 2 4 8 16 --seeds 1 2 3
"""
from .config import RunConfig, RunConfigError
from .records import RECORD_FORMAT, RECORD_SUFFIX, provenance, read_record, write_record
from .runner import FittedRun, GridRecords, feature_kind, run, run_grid
from .aggregate import aggregate, load_records, records_frame, summary_table

__all__ = [
    "FittedRun", "GridRecords", "RECORD_FORMAT", "RECORD_SUFFIX", "RunConfig", "RunConfigError", "aggregate", "feature_kind", "load_records", "provenance", "read_record", "records_frame",
    "run", "run_grid", "summary_table", "write_record",
]
