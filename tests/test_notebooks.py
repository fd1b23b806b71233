"""The book's notebooks: well formed as committed, and each runs end to end with tiny parameters.

Each notebook is executed with papermill into ``tmp_path`` on a ``python3`` kernel that is made to
resolve to the interpreter running the tests (a kernelspec for ``sys.executable`` is installed in a
temporary folder and put first on ``JUPYTER_PATH``), with ``safelib`` importable from this checkout.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

import safelib as sl

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Override for trying the notebooks against another mini-CLIP file (e.g. an intermediate checkpoint).
MINICLIP = os.environ.get("SAFELIB_TEST_MINICLIP", "shipped")

# Tiny parameters: each notebook runs in well under a minute on a 2-core CPU.
TINY: dict[str, dict] = {
    "01_attention_pooling": {"dataset_options": {"per_class": [2, 1, 3]}, "n_maps": 3, "n_zero_shot": 12},
    "02_safe": {"dataset_options": {"per_class": [4, 2, 4]}, "shots": 2, "train_views": 1,
                "safe_config": {"epochs": 2, "lr": 1e-3}, "n_maps": 2},
    "03_methods": {
        "dataset_options": {"per_class": [2, 1, 3]}, "shots": [1], "seeds": [1], "train_views": 1,
        "method_configs": {"safe": {"epochs": 1}, "safe_a_tip": {"safe": {"epochs": 1}, "adapter": {"epochs": 1}},
                           "safe_a_clip_adapter": {"safe": {"epochs": 1}, "adapter": {"epochs": 1}},
                           "tip_adapter_f": {"epochs": 1}, "clip_adapter": {"epochs": 1}},
    },
    "04_scale": {"map_shape": [256, 7, 7], "calibration_mb": 2},
}


def test_every_notebook_has_tiny_parameters():
    assert {nb.stem for nb in NOTEBOOKS} == set(TINY)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    """First cell tagged `parameters`, every cell without outputs or execution counts."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), \
        f"{path.name}: the first cell must be a code cell tagged 'parameters'"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0], f"{path.name}: exactly one parameters cell, the first"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"
    assert "import safelib as sl" in "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """JUPYTER_PATH with a `python3` kernelspec for this interpreter; PYTHONPATH with this checkout."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name="python3", prefix=str(prefix))
    spec = json.loads((prefix / "share/jupyter/kernels/python3/kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    env = {
        "JUPYTER_PATH": os.pathsep.join([str(prefix / "share/jupyter"), os.environ.get("JUPYTER_PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    return env


def _execute(name: str, tmp_path: Path, env: dict, monkeypatch) -> nbformat.NotebookNode:
    papermill = pytest.importorskip("papermill")
    if MINICLIP == "shipped" and not sl.miniclip.CHECKPOINT.is_file():
        pytest.skip(f"the shipped mini-CLIP checkpoint {sl.miniclip.CHECKPOINT} is not there yet")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parameters = {**TINY[name], "pretrained": MINICLIP}
    if name != "01_attention_pooling":
        parameters |= {"cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "runs")}
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(out), parameters=parameters,
                               kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOK_DIR))
    return nbformat.read(out, as_version=4)


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """All text output of a run notebook, and how many figures it drew."""
    text, figures = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            data = output.get("data", {})
            text.append(data.get("text/plain", ""))
            figures += "image/png" in data
            assert output.get("output_type") != "error", "".join(output.get("traceback", []))
    return "\n".join(text), figures


@pytest.mark.slow
def test_01_attention_pooling_runs(tmp_path, kernel_env, monkeypatch):
    text, figures = _outputs(_execute("01_attention_pooling", tmp_path, kernel_env, monkeypatch))
    assert figures >= 1
    assert "largest relative difference" in text and "zero-shot" in text


@pytest.mark.slow
def test_02_safe_runs(tmp_path, kernel_env, monkeypatch):
    text, figures = _outputs(_execute("02_safe", tmp_path, kernel_env, monkeypatch))
    assert figures >= 3  # training curve, blend sweep, attention before / after
    records = list((tmp_path / "runs" / "notebooks").glob("02_safe_*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["shots"] == 2 and len(record["test_acc"]) == 3
    assert len(record["chosen"]["train_losses"]) == 2
    assert 0 <= record["target_mass"]["finetuned"] <= 1


@pytest.mark.slow
def test_03_methods_runs(tmp_path, kernel_env, monkeypatch):
    text, figures = _outputs(_execute("03_methods", tmp_path, kernel_env, monkeypatch))
    assert figures >= 1
    records = sorted((tmp_path / "runs").rglob("*.run.json"))
    assert {r.parent.name for r in records} == set(sl.METHODS)
    assert all(json.loads(r.read_text())["shots"] == 1 for r in records)


@pytest.mark.slow
def test_04_scale_runs(tmp_path, kernel_env, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MINICLIP", "not used")  # loads no model: needs no checkpoint
    text, _ = _outputs(_execute("04_scale", tmp_path, kernel_env, monkeypatch))
    assert "on colab-t4" in text and "on here (cpu)" in text and "measured by calibrate()" in text
