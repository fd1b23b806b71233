"""Run one case: take its lock, execute the notebook with papermill, write its status, never half of it.

Layout under ``--out DIR``::

    notebooks/<notebook>/<case>.ipynb        the executed notebook (final name only once finished)
    notebooks/<notebook>/.<case>.partial.ipynb   while it runs (papermill saves it cell by cell)
    notebooks/<notebook>/<case>.failed.ipynb     the executed notebook of a failed attempt
    status/<notebook>/<case>.json            parameters, status, wall time, notebook, records, error
    locks/<notebook>/<case>.lock             flock'ed while a process runs the case
    records/   cache/                        what the notebooks write (``out_dir``, ``cache_dir``)

A case is finished when its status says so *and* its executed notebook carries the final name.
The lock is an ``fcntl.flock``: the kernel releases it when its holder dies, even by SIGKILL, so
a status still saying "running" whose lock can be taken was left by a dead process, and the case
is rerun from scratch. Two shards on one DIR never run the same case: the second cannot take
the lock and moves on.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import papermill
from papermill.exceptions import PapermillExecutionError

from ..atomic import atomic_write_json
from ..runs.config import RunConfig
from ..runs.records import RECORD_SUFFIX
from .case import Case
from .grid import RUNNER_PARAMETERS, Grid, declared_parameters

STATUS_FORMAT = "safelib.reproduce.case/1"
KERNEL_NAME = "python3"
FINISHED, FAILED, RUNNING = "finished", "failed", "running"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Notebook parameter names that mean a RunConfig field (the chapters say model/pretrained).
_CONFIG_NAMES = {"model": "backbone", "pretrained": "weights", "methods": "method", "seeds": "seed"}


class Layout:
    """Where everything of a results folder lives."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out).resolve()
        self.records = self.root / "records"
        self.cache = self.root / "cache"

    def notebook(self, case: Case) -> Path:
        return self.root / "notebooks" / case.stem / f"{case.id}.ipynb"

    def partial(self, case: Case) -> Path:
        return self.root / "notebooks" / case.stem / f".{case.id}.partial.ipynb"

    def failed(self, case: Case) -> Path:
        return self.root / "notebooks" / case.stem / f"{case.id}.failed.ipynb"

    def status(self, case: Case) -> Path:
        return self.root / "status" / case.stem / f"{case.id}.json"

    def lock(self, case: Case) -> Path:
        return self.root / "locks" / case.stem / f"{case.id}.lock"


def read_status(layout: Layout, case: Case) -> dict[str, Any] | None:
    path = layout.status(case)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # written atomically, so never seen in practice; treat as absent
        return None


def is_finished(layout: Layout, case: Case) -> bool:
    status = read_status(layout, case)
    return bool(status and status.get("status") == FINISHED and layout.notebook(case).is_file())


@contextmanager
def case_lock(layout: Layout, case: Case) -> Iterator[bool]:
    """Yield True holding the case's exclusive lock, or False when another process holds it."""
    path = layout.lock(case)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_case(grid: Grid, case: Case, layout: Layout, *, retry_failed: bool = False) -> str:
    """Run the case unless finished (or failed, without ``retry_failed``); returns what happened:
    "finished", "failed", "skipped" (finished before), "skipped-failed" or "busy" (another process has it)."""
    if is_finished(layout, case):
        return "skipped"
    with case_lock(layout, case) as held:
        if not held:
            return "busy"
        status = read_status(layout, case)  # re-read under the lock: another shard may have just ended it
        if status and status.get("status") == FINISHED and layout.notebook(case).is_file():
            return "skipped"
        if status and status.get("status") == FAILED and not retry_failed:
            return "skipped-failed"
        return _execute(grid, case, layout)


def _execute(grid: Grid, case: Case, layout: Layout) -> str:
    notebook = grid.notebook_dir / f"{case.notebook}.ipynb"
    declared = declared_parameters(notebook)
    parameters = dict(case.parameters)
    if "out_dir" in declared:
        parameters["out_dir"] = str(layout.records)
    if "cache_dir" in declared:
        parameters["cache_dir"] = str(layout.cache)
    partial, final, failed = layout.partial(case), layout.notebook(case), layout.failed(case)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)  # a dead attempt's leftovers: this run starts from scratch
    final.unlink(missing_ok=True)  # never there unless finished; a status-less final is not trusted
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    base = {
        "format": STATUS_FORMAT, "case": case.id, "notebook": case.notebook, "name": case.name,
        "parameters": parameters, "started": started, "pid": os.getpid(), "host": socket.gethostname(),
        "python": sys.executable,
    }
    atomic_write_json(layout.status(case), {**base, "status": RUNNING}, sort_keys=True)
    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(notebook), str(partial), parameters=parameters, kernel_name=KERNEL_NAME,
            progress_bar=False, log_output=False, cwd=str(grid.notebook_dir),
        )
    except PapermillExecutionError as failure:
        error = {"cell_index": failure.cell_index, "source": failure.source, "ename": failure.ename,
                 "evalue": failure.evalue, "traceback": _ANSI.sub("", "\n".join(failure.traceback))}
    except Exception as failure:  # the kernel died, a timeout, a broken notebook: record it, go on
        error = {"cell_index": None, "source": None, "ename": type(failure).__name__, "evalue": str(failure),
                 "traceback": None}
    wall = round(time.perf_counter() - start, 2)
    records = records_of(layout, {**_defaults(declared), **parameters})
    if error is None:
        os.replace(partial, final)
        status = {**base, "status": FINISHED, "wall_seconds": wall, "executed_notebook": _rel(layout, final),
                  "records": records, "error": None}
    else:
        if partial.exists():
            os.replace(partial, failed)
        status = {**base, "status": FAILED, "wall_seconds": wall,
                  "executed_notebook": _rel(layout, failed) if failed.exists() else None,
                  "records": records, "error": error}
    atomic_write_json(layout.status(case), status, sort_keys=True)
    return status["status"]


def records_of(layout: Layout, parameters: Mapping[str, Any]) -> list[str]:
    """The run records under ``DIR/records`` that this case's parameters produce, relative to DIR.

    A record belongs to the case when every case parameter naming a RunConfig field (dataset,
    shots, seed, backbone/model, weights/pretrained, methods, ...) agrees with the record's config;
    a case with no such parameter owns no run record. Records found this way include ones an
    earlier, killed attempt wrote whole (``sl.run`` reuses them), so the list is the same after a resume.
    """
    fields = set(RunConfig.__dataclass_fields__) - set(RUNNER_PARAMETERS)
    wanted = {}
    for name, value in parameters.items():
        field = _CONFIG_NAMES.get(name, name)
        if field in fields and field not in ("data_root", "device", "num_workers", "batch_size"):
            if value is not None or field != "method":
                wanted[field] = value
    if not wanted or not layout.records.is_dir():
        return []
    owned = []
    for path in sorted(layout.records.rglob(f"*{RECORD_SUFFIX}")):
        try:
            config = json.loads(path.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError):
            continue
        if all(_agrees(config.get(field), value) for field, value in wanted.items() if field in config):
            owned.append(_rel(layout, path))
    return owned


def _agrees(recorded: Any, asked: Any) -> bool:
    if isinstance(asked, list) and not isinstance(recorded, list):
        return recorded in asked
    if isinstance(asked, Mapping) and isinstance(recorded, Mapping):
        return all(_agrees(recorded.get(k), v) for k, v in asked.items())  # overrides vs the full config
    return recorded == asked


def _defaults(declared: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in declared.items() if isinstance(v, (str, int, float, list, dict, type(None)))}


def _rel(layout: Layout, path: Path) -> str:
    return os.path.relpath(path, layout.root)


def ensure_kernel(prefix: str | os.PathLike) -> Path:
    """Make ``python3`` resolve to this interpreter's ipykernel for every notebook papermill starts.

    The ``python3`` kernelspec found first on the Jupyter path may start another Python (a
    system one, without safelib). A kernelspec for ``sys.executable`` is written under ``prefix``
    (one per process, so shards never write it at once) and put first on ``JUPYTER_PATH`` of this
    process, whose environment the kernels inherit.
    """
    try:
        from ipykernel.kernelspec import install  # optional: only batch runs need a kernel
    except ImportError:
        raise SystemExit("python -m safelib.reproduce needs ipykernel in this environment: "
                         "pip install ipykernel (or pip install 'safelib[book]')") from None
    prefix = Path(prefix)
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    spec_file = prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"
    spec = json.loads(spec_file.read_text())
    if spec["argv"][0] != sys.executable:
        raise RuntimeError(f"kernelspec {spec_file} starts {spec['argv'][0]}, not {sys.executable}")
    current = os.environ.get("JUPYTER_PATH", "")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(prefix / "share" / "jupyter"), current) if p)
    return spec_file
