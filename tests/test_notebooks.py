"""The book's notebooks: well formed as committed, and each runs end to end at tiny parameters.

They run the way readers batch them: ``python -m safelib.reproduce notebooks/grids/smoke.yaml``,
one papermill execution per notebook on a ``python3`` kernel that the runner makes resolve to this
interpreter. The run is killed with SIGKILL in the middle of a case and started again, as a job
array's node would be: the grid finishes, and the cases finished before the kill are not executed
again. Then each executed notebook's outputs are checked.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

import safelib as sl
from safelib.reproduce import Layout, is_finished, load_grid
from safelib.reproduce.grid import declared_parameters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb")) + sorted((NOTEBOOK_DIR / "grids").glob("*.ipynb"))
SMOKE = NOTEBOOK_DIR / "grids" / "smoke.yaml"
# Override for trying the notebooks against another mini-CLIP file (e.g. an intermediate checkpoint).
MINICLIP = os.environ.get("SAFELIB_TEST_MINICLIP", "shipped")
KILL_AFTER = 2  # cases finished before the SIGKILL (the next one is running when it lands)


def test_every_notebook_has_a_smoke_case():
    names = {case.notebook for case in load_grid(SMOKE).cases}
    assert names == {p.relative_to(NOTEBOOK_DIR).with_suffix("").as_posix() for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    """The first code cell tagged `parameters` (at most a Markdown title above it), every cell without
    outputs or execution counts."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = 1 if nb.cells[0].cell_type == "markdown" else 0  # a chapter's title comes first
    cell = nb.cells[first]
    assert cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []), \
        f"{path.name}: the first cell (or the one below a Markdown title) must be a code cell tagged 'parameters'"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [first], f"{path.name}: exactly one parameters cell, the first code cell"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"
    assert "import safelib as sl" in "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def _smoke_grid(where: Path) -> Path:
    """smoke.yaml, or a copy using the mini-CLIP file named by SAFELIB_TEST_MINICLIP."""
    if MINICLIP == "shipped":
        return SMOKE
    spec = yaml.safe_load(SMOKE.read_text())
    spec["notebook_dir"] = str(NOTEBOOK_DIR)
    for case in spec["cases"]:
        declared = next(c.source for c in nbformat.read(NOTEBOOK_DIR / f"{case['notebook']}.ipynb", 4).cells
                        if "parameters" in c.metadata.get("tags", []))
        for name in ("pretrained", "weights"):
            if f"\n{name} = " in f"\n{declared}":
                case.setdefault("parameters", {})[name] = MINICLIP
    path = where / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _start(grid: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "safelib.reproduce", str(grid), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _statuses(out: Path) -> dict[str, dict]:
    found = {}
    for path in (out / "status").rglob("*.json"):
        try:
            found[f"{path.parent.name}/{path.stem}"] = json.loads(path.read_text())
        except json.JSONDecodeError:  # pragma: no cover - written atomically
            pass
    return found


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke grid, SIGKILL it while a case runs, run it again to the end.

    Returns (out folder, statuses before the kill, key of the killed case, statuses at the end).
    """
    if MINICLIP == "shipped" and not sl.miniclip.CHECKPOINT.is_file():
        pytest.skip(f"the shipped mini-CLIP checkpoint {sl.miniclip.CHECKPOINT} is not there yet")
    where = tmp_path_factory.mktemp("smoke")
    grid, out = _smoke_grid(where), where / "out"
    process = _start(grid, out)
    deadline = time.monotonic() + 1200
    while True:
        assert process.poll() is None, f"the grid ended before it could be killed: {process.communicate()}"
        assert time.monotonic() < deadline, "no case started in time"
        statuses = _statuses(out)
        finished = [k for k, s in statuses.items() if s["status"] == "finished"]
        running = [k for k, s in statuses.items() if s["status"] == "running"]
        if len(finished) >= KILL_AFTER and running:
            time.sleep(1.0)  # well inside the case: its kernel is up and executing
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(0.3)
    before = _statuses(out)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # as a scheduler would: the kernel it left goes too
    except ProcessLookupError:
        pass  # the kernel saw its parent die and exited by itself
    killed = [k for k, s in before.items() if s["status"] == "running"]
    assert len(killed) == 1, before
    layout = Layout(out)
    case = next(c for c in load_grid(grid).cases if c.key == killed[0])
    assert not is_finished(layout, case) and not layout.notebook(case).exists(), \
        "a killed case must leave nothing a later run takes for finished"

    rerun = _start(grid, out)
    stdout, stderr = rerun.communicate(timeout=1800)
    assert rerun.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return out, before, killed[0], _statuses(out), load_grid(grid)


@pytest.mark.slow
def test_smoke_grid_finishes_after_a_sigkill_without_redoing_finished_cases(smoke):
    out, before, killed, after, grid = smoke
    assert set(after) == {c.key for c in grid.cases}
    assert all(s["status"] == "finished" for s in after.values())
    done_before = [k for k, s in before.items() if s["status"] == "finished"]
    assert len(done_before) >= KILL_AFTER
    for key in done_before:  # executed once: the same status (start time, process) as before the kill
        assert after[key] == before[key], key
    assert after[killed]["pid"] != before[killed]["pid"]  # the killed case ran again, from scratch
    layout = Layout(out)
    assert not list((out / "notebooks").rglob(".*.partial.ipynb"))
    for case in grid.cases:
        assert layout.notebook(case).is_file()


def _executed(smoke, notebook: str) -> tuple[nbformat.NotebookNode, dict]:
    out, _, _, after, grid = smoke
    case = next(c for c in grid.cases if c.notebook == notebook)
    return nbformat.read(Layout(out).notebook(case), as_version=4), after[case.key]


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int, str]:
    """All text output of a run notebook, how many figures it drew, and what it wrote to stderr."""
    text, figures, stderr = [], 0, []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("name") == "stderr":
                stderr.append(output.get("text", ""))
            text.append(output.get("text", ""))
            data = output.get("data", {})
            text.append(data.get("text/plain", ""))
            figures += "image/png" in data
            assert output.get("output_type") != "error", "".join(output.get("traceback", []))
    return "\n".join(text), figures, "".join(stderr)


@pytest.mark.slow
def test_01_attention_pooling_runs(smoke):
    text, figures, _ = _outputs(_executed(smoke, "01_attention_pooling")[0])
    assert figures >= 1
    assert "largest relative difference" in text and "zero-shot" in text


@pytest.mark.slow
def test_02_safe_runs(smoke):
    out = smoke[0]
    text, figures, _ = _outputs(_executed(smoke, "02_safe")[0])
    assert figures >= 3  # training curve, blend sweep, attention before / after
    records = [p for p in (out / "records").rglob("*.run.json") if p.parent.name == "safe"
               and sl.read_record(p)["config"]["shots"] == 2  # the notebook's run: an ordinary run record
               and sl.read_record(p)["config"]["seed"] == 1]  # (the other seeds are its evidence section)
    assert len(records) == 1
    record = sl.read_record(records[0])
    assert len(record["chosen"]["train_losses"]) == 2
    assert f"{record['test_acc']:5.1f}%" in text and "attention mass on the target" in text


@pytest.mark.slow
def test_03_methods_runs_and_its_status_lists_its_records(smoke):
    out = smoke[0]
    nb, status = _executed(smoke, "03_methods")
    _, figures, _ = _outputs(nb)
    assert figures >= 1
    records = [json.loads((out / r).read_text()) for r in status["records"]]
    asked = declared_parameters(NOTEBOOK_DIR / "03_methods.ipynb")["methods"]  # the chapter's default list
    assert sorted(r["config"]["method"] for r in records) == sorted(asked)
    assert all(r["config"]["shots"] == 1 for r in records)


@pytest.mark.slow
def test_04_scale_runs(smoke):
    text, _, _ = _outputs(_executed(smoke, "04_scale")[0])
    assert "on colab-t4" in text and "on here (cpu)" in text and "measured by calibrate()" in text


@pytest.mark.slow
def test_05_results_default_run_is_clean(smoke):
    text, figures, stderr = _outputs(_executed(smoke, "05_results")[0])
    assert stderr == ""  # the book builds with warnings as errors; a stderr output is a warning
    assert "cited" in text
    shipped = ROOT / "results" / "miniworld"
    assert figures >= (2 if shipped.is_dir() else 1)


@pytest.mark.slow
def test_run_protocol_runs_every_method_asked_and_lists_their_records(smoke):
    out = smoke[0]
    nb, status = _executed(smoke, "grids/run_protocol")
    _outputs(nb)
    records = [json.loads((out / r).read_text()) for r in status["records"]]
    assert sorted(r["config"]["method"] for r in records) == ["safe", "tip_adapter", "zero_shot"]
    assert all(r["config"]["shots"] == 1 and r["config"]["seed"] == 1 for r in records)


# A build machine with almost nothing free: the probes profile_here reads, replaced inside the kernel.
TINY_MACHINE = """import safelib.perf.planner as _planner
_planner._free_disk = lambda cache_dir: 1e9    # 1 GB of free disk
_planner._available_ram = lambda: 8e9          # 8 GB of available RAM: room for one view of the maps
"""


def test_04_scale_renders_on_a_machine_with_1_gb_of_free_disk(tmp_path, monkeypatch):
    """The chapter at its full-size defaults (16-shot ImageNet, K=10: a 32 GB cache) on a build machine
    with 1 GB of free disk and 8 GB of RAM: it plans for the named profile as on any machine, says plainly
    that the cache does not fit here and what would, plans the one view that does, and neither raises
    (a CI build once failed here with PlanError) nor writes to stderr."""
    import papermill

    from safelib.reproduce.execute import ensure_kernel

    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ensure_kernel(tmp_path / "kernel")
    nb = nbformat.read(NOTEBOOK_DIR / "04_scale.ipynb", as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(TINY_MACHINE))
    source, out = tmp_path / "04_scale.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(str(source), str(out), parameters={"calibration_mb": 2}, cwd=str(NOTEBOOK_DIR),
                               kernel_name="python3", progress_bar=False)
    text, figures, stderr = _outputs(nbformat.read(out, as_version=4))
    assert stderr == ""
    assert "on colab-t4" in text and "-> memmap" in text            # the named profile's plan, as on any machine
    assert "the cache does not fit on here (cpu)" in text           # this machine: said, not raised
    assert "memmap  needs  32.11 GB of   1.00 GB: does not fit" in text
    assert "At most 1 view of 16000 images fits; or free 31.11 GB more disk" in text
    assert "K=1 on here (cpu)" in text and "measured by calibrate()" in text  # the view that fits, planned
    assert figures == 2                                             # cache by views; epoch predictions
