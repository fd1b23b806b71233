"""``python -m safelib.reproduce``: grids are checked before anything runs, case ids are stable,
shards split the cases disjointly, two shards on one folder run each case exactly once, and a
failed case is recorded and retried on request.

The execution tests use a tiny notebook (it appends its case to a counter file and sleeps), so
they test the runner, not the book; the book's own notebooks run in ``test_notebooks.py``
(the smoke grid, including a SIGKILL mid-case and the resume).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from safelib.reproduce import GridError, Layout, case_id, load_grid
from safelib.reproduce.__main__ import shard_of

ROOT = Path(__file__).resolve().parent.parent
GRIDS = ROOT / "notebooks" / "grids"


def _notebook(path: Path, parameters: str, body: str) -> Path:
    nb = new_notebook(cells=[new_code_cell(parameters, metadata={"tags": ["parameters"]}), new_code_cell(body)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


COUNTER_PARAMETERS = '''counter = "counter.txt"
label = "a"
sleep = 0.0
lr = 0.001
fail = False
dataset = "miniworld_shape_largest"
methods = None
model = "miniclip"
options = {"lr": 0.001}
out_dir = "runs"
cache_dir = "cache"'''
COUNTER_BODY = '''import os, time
with open(counter, "a") as f:
    f.write(f"{label} {os.getpid()}\\n")
time.sleep(sleep)
assert not fail, "asked to fail"'''


@pytest.fixture
def counter_grid(tmp_path):
    """A grid of 4 cases of a notebook that logs each execution to a counter file."""
    _notebook(tmp_path / "count.ipynb", COUNTER_PARAMETERS, COUNTER_BODY)
    counter = tmp_path / "counter.txt"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"notebooks: [count]\nparameters: {{counter: {str(counter)!r}, sleep: 3.0}}\n"
                    "grid: {label: [a, b, c, d]}\n")
    return grid, counter


def _grid(tmp_path: Path, text: str) -> Path:
    _notebook(tmp_path / "count.ipynb", COUNTER_PARAMETERS, COUNTER_BODY)
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "safelib.reproduce", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# --- checked before anything runs -------------------------------------------------------------


def test_undeclared_parameter_is_an_error(tmp_path):
    grid = _grid(tmp_path, "notebooks: [count]\ngrid: {labl: [a]}\n")
    with pytest.raises(GridError, match=r"'labl' is not declared by the notebook's parameters cell"):
        load_grid(grid)


def test_yaml_float_without_dot_is_an_error_with_a_suggestion(tmp_path):
    grid = _grid(tmp_path, "notebooks: [count]\nparameters: {lr: 1e-3}\n")
    with pytest.raises(GridError, match=r"lr = '1e-3' is a string.*write 1\.0e-3 instead"):
        load_grid(grid)


def test_yaml_float_without_dot_inside_a_dict_is_an_error(tmp_path):
    grid = _grid(tmp_path, "notebooks: [count]\nparameters: {options: {lr: 5e-4}}\n")
    with pytest.raises(GridError, match=r"options\.lr = '5e-4' is a string.*write 5\.0e-4"):
        load_grid(grid)


def test_wrong_type_is_an_error(tmp_path):
    grid = _grid(tmp_path, "notebooks: [count]\nparameters: {sleep: soon}\n")
    with pytest.raises(GridError, match=r"sleep = 'soon' is a str; the notebook's default 0.0 is a float"):
        load_grid(grid)


@pytest.mark.parametrize("text, message", [
    ("parameters: {dataset: miniwrold}", r"dataset: unknown dataset 'miniwrold'; valid: .*miniworld_shape_largest"),
    ("parameters: {methods: [safe, sfae]}", r"methods: unknown method 'sfae'; valid: .*safe_a_tip"),
    ("parameters: {model: RN51}", r"model: unknown model 'RN51'; valid: RN50"),
])
def test_unknown_registered_names_are_errors(tmp_path, text, message):
    grid = _grid(tmp_path, f"notebooks: [count]\n{text}\n")
    with pytest.raises(GridError, match=message):
        load_grid(grid)


def test_runner_parameters_are_not_set_by_the_grid(tmp_path):
    grid = _grid(tmp_path, "notebooks: [count]\nparameters: {out_dir: elsewhere}\n")
    with pytest.raises(GridError, match=r"'out_dir' is set by the runner"):
        load_grid(grid)


def test_every_problem_is_reported_at_once_and_nothing_runs(tmp_path):
    grid = _grid(tmp_path, "notebooks: [count]\ngrid: {labl: [a], lr: [1e-3]}\n")
    process = _cli(str(grid), "--out", str(tmp_path / "out"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "2 problem(s), nothing was run" in err and "labl" in err and "1.0e-3" in err
    assert not (tmp_path / "out").exists()


def test_shipped_grids_are_valid():
    smoke, miniworld, paper = (load_grid(GRIDS / f"{name}.yaml") for name in ("smoke", "miniworld", "paper-rn50"))
    assert "grids/run_protocol" in {case.notebook for case in smoke.cases}  # every notebook: test_notebooks.py
    assert len(miniworld.cases) == 2 * 5 * 3
    assert len(paper.cases) == 11 * 5 * 3 + 4 * 3  # 11 datasets x shots x seeds, and 4 shifts x seeds


def test_the_python3_kernel_is_this_interpreter(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    from safelib.reproduce.execute import ensure_kernel

    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))  # restored after the test
    ensure_kernel(tmp_path)
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


# --- case identity and shards ----------------------------------------------------------------


def test_case_id_is_a_readable_slug_and_a_hash_of_the_parameters():
    one = case_id("grids/run_protocol", {"dataset": "dtd", "shots": 16, "seed": 1}, ("dataset", "shots", "seed"))
    assert one.startswith("dtd-shots16-seed1-") and len(one.rsplit("-", 1)[1]) == 8
    assert one == case_id("grids/run_protocol", {"seed": 1, "shots": 16, "dataset": "dtd"}, ("dataset", "shots", "seed"))
    assert one != case_id("grids/run_protocol", {"dataset": "dtd", "shots": 16, "seed": 1, "device": "cuda"},
                          ("dataset", "shots", "seed"))


def test_shards_are_disjoint_and_cover_the_grid():
    cases = load_grid(GRIDS / "paper-rn50.yaml").cases
    shards = [shard_of(list(cases), i, 7) for i in range(1, 8)]
    keys = [c.key for shard in shards for c in shard]
    assert sorted(keys) == sorted(c.key for c in cases) and len(set(keys)) == len(keys)
    assert [c.key for c in shard_of(list(reversed(cases)), 3, 7)] == [c.key for c in shards[2]]


# --- execution ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_shards_and_a_whole_run_at_once_on_one_folder_run_every_case_exactly_once(tmp_path, counter_grid):
    """Shards 1/2 and 2/2 split the cases; a third process over all of them (a resubmitted job,
    a second machine) at the same time finds each case finished or locked, never runs one twice."""
    grid, counter = counter_grid
    out = tmp_path / "out"
    processes = [_cli(str(grid), "--out", str(out), "--shard", shard) for shard in ("1/2", "2/2", "1/1")]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    labels = [line.split()[0] for line in counter.read_text().splitlines()]
    assert sorted(labels) == list("abcd")
    layout = Layout(out)
    for case in load_grid(grid).cases:
        status = json.loads(layout.status(case).read_text())
        assert status["status"] == "finished" and layout.notebook(case).is_file()
    again = _cli(str(grid), "--out", str(out))  # everything finished: runs nothing
    assert again.wait(timeout=300) == 0
    assert len(counter.read_text().splitlines()) == 4


@pytest.mark.slow
def test_a_failed_case_is_recorded_the_grid_goes_on_and_retry_reruns_it(tmp_path):
    _notebook(tmp_path / "count.ipynb", COUNTER_PARAMETERS, COUNTER_BODY)
    counter = tmp_path / "counter.txt"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"parameters: {{counter: {str(counter)!r}}}\ncases:\n"
                    "  - {notebook: count, name: bad, parameters: {label: bad, fail: true}}\n"
                    "  - {notebook: count, name: good, parameters: {label: good}}\n")
    out = tmp_path / "out"
    process = _cli(str(grid), "--out", str(out))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1 and "FAILED count/bad-" in err
    bad, good = load_grid(grid).cases
    layout = Layout(out)
    status = json.loads(layout.status(bad).read_text())
    assert status["status"] == "failed" and "asked to fail" in status["error"]["evalue"]
    assert "assert not fail" in status["error"]["source"] and "AssertionError" in status["error"]["traceback"]
    assert not layout.notebook(bad).exists() and layout.failed(bad).is_file()
    assert json.loads(layout.status(good).read_text())["status"] == "finished"
    # without --retry-failed the failure stays (and the exit code says so); with it, it reruns
    process = _cli(str(grid), "--out", str(out))
    process.communicate(timeout=300)
    assert process.returncode == 1 and counter.read_text().split().count("bad") == 1
    process = _cli(str(grid), "--out", str(out), "--retry-failed")
    process.communicate(timeout=300)
    assert counter.read_text().split().count("bad") == 2 and counter.read_text().split().count("good") == 1


def test_dry_run_lists_the_cases_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    process = _cli(str(GRIDS / "paper-rn50.yaml"), "--out", str(out), "--dry-run", "--shard", "2/40")
    text, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    total = 11 * 5 * 3 + 4 * 3
    assert f"case(s) in shard 2/40 of {total} in" in text
    assert "run_protocol/imagenet-" in text or "run_protocol/" in text
    assert not out.exists()
