"""The results chapter and the shipped records it reads.

- The shipped records stay true: one record of each method (its smallest shot count) is rerun from
  scratch and must give the committed test accuracy exactly.
- The chapter's RN50 branch works on RN50-shaped records (synthetic ones, written with
  ``sl.write_record``): per-dataset tables, the 11-dataset mean and the domain-shift table.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import nbformat
import pytest

import safelib as sl
from safelib.reproduce.execute import ensure_kernel

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "results" / "miniworld"
CHAPTER = ROOT / "notebooks" / "05_results.ipynb"
REGENERATE = ("python -m safelib.reproduce notebooks/grids/miniworld.yaml --out /tmp/miniworld && "
              "rm -rf results/miniworld && cp -r /tmp/miniworld/records results/miniworld")


def _cheapest_per_method(frame):
    """Per method, the record with the fewest shots (then the first dataset and seed)."""
    ordered = frame.sort_values(["shots", "dataset", "seed", "path"])
    return ordered.groupby("method", sort=True).head(1)


@pytest.mark.slow
def test_one_record_of_each_method_reruns_to_the_committed_accuracy(tmp_path):
    if not SHIPPED.is_dir():
        pytest.skip(f"{SHIPPED} does not exist yet; generate it with: {REGENERATE}")
    frame = sl.load_records(SHIPPED)
    assert set(frame["method"]) == set(sl.METHODS), "the shipped records must cover every method"
    mismatches = []
    for _, row in _cheapest_per_method(frame).iterrows():
        record = sl.read_record(row["path"])
        values = {**record["config"], "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}
        fresh = sl.run(sl.RunConfig.from_dict(values))
        if fresh["test_acc"] != record["test_acc"]:
            mismatches.append(f"{row['path']}: rerun {fresh['test_acc']!r}, committed {record['test_acc']!r}")
    assert not mismatches, ("rerunning from scratch moved results; if on purpose, regenerate them: "
                            f"{REGENERATE}\n" + "\n".join(mismatches))


def _synthetic_rn50_records(folder: Path) -> int:
    """RN50-shaped records: 11 datasets x 2 methods x shots 1, 16 x seeds 1, 2, and ImageNet -> 4 variants."""
    rng = random.Random(0)
    cases = [(d, None, m, k, s) for d in sl.list_datasets(kind="benchmark") for m in ("zero_shot", "safe")
             for k in (1, 16) for s in (1, 2)]
    cases += [("imagenet", t, m, 16, s) for t in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
              for m in ("zero_shot", "safe") for s in (1, 2)]
    for dataset, test_dataset, method, shots, seed in cases:
        config = sl.RunConfig(dataset=dataset, test_dataset=test_dataset, method=method, shots=shots, seed=seed,
                              backbone="RN50", weights="openai", out_dir=str(folder))
        sl.write_record(config.record_path(), {
            "format": sl.runs.RECORD_FORMAT, "config": config.to_dict(), "val_acc": rng.uniform(50, 90),
            "test_acc": rng.uniform(50, 90), "wall_seconds": 1.0, "chosen": {}, "git_commit": "f" * 40,
        })
    return len(cases)


@pytest.mark.slow
def test_rn50_branch_draws_the_tables_from_rn50_records(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    folder = tmp_path / "rn50"
    count = _synthetic_rn50_records(folder)
    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))
    ensure_kernel(tmp_path / "kernel")
    out = tmp_path / "05_results.ipynb"
    papermill.execute_notebook(str(CHAPTER), str(out), parameters={"results_dir": str(folder)},
                               kernel_name="python3", progress_bar=False, cwd=str(CHAPTER.parent))
    nb = nbformat.read(out, as_version=4)
    text, figures = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error"
            text.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
            figures += "image/png" in output.get("data", {})
    text = "\n".join(text)
    assert f"{count} run records" in text
    assert "No RN50 run records" not in text  # the plain "not yet" message is for folders without them
    assert "The 11-dataset mean" in text and "mean (11 datasets)" in text
    assert "Domain shift" in text and all(v in text for v in ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2"))
    assert figures >= 11  # accuracy against shots, one per dataset


def test_chapter_names_the_command_that_regenerates_the_shipped_records():
    source = "".join(cell.source for cell in nbformat.read(CHAPTER, as_version=4).cells)
    assert "python -m safelib.reproduce notebooks/grids/miniworld.yaml --out /tmp/miniworld" in source
    assert "cp -r /tmp/miniworld/records results/miniworld" in source
