"""Issue 16: kill -9 a small grid at random points (model loading, caching, calibration, training,
record writing) ten times in a row, then rerun it cleanly. Every record must equal an uninterrupted
run's, no temporary file may remain, and no run that had finished may run again."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safelib.runs import read_record

GRID = """
import sys, torch, safelib as sl
torch.set_num_threads(1)
sl.run_grid("miniworld_shape_largest", ["zero_shot", "safe", "tip_adapter_f"], [1], [1],
            method_configs={"safe": {"epochs": 3}, "tip_adapter_f": {"epochs": 2}},
            dataset_options={"per_class": [4, 2, 6]}, train_views=2, out_dir=sys.argv[1], cache_dir=sys.argv[2],
            progress=False)
"""
# What differs between two identical runs by nature: when they ran and how long they took.
TIMING_FIELDS = {"timings", "wall_seconds", "finished", "peak_memory_mb", "cache_plan"}
KILLS = 10


def _start(root: Path, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", GRID, str(root / "runs"), str(root / "cache")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _records(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "runs").rglob("*.run.json"))}


def _comparable(record: dict) -> dict:
    """The record without its timings (any ``*_seconds`` too) and the two folders, which differ between roots."""
    config = {k: v for k, v in record["config"].items() if k not in ("out_dir", "cache_dir")}
    return _untimed({**{k: v for k, v in record.items() if k not in TIMING_FIELDS}, "config": config})


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _leftovers(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        found += [str(p) for p in folder.rglob("*.tmp")] + [str(p) for p in folder.glob("safelib-calibrate-*")]
    return found


def test_kill_9_at_random_points_then_a_clean_rerun_equals_an_uninterrupted_run(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    reference = tmp_path / "reference"
    start = time.monotonic()
    process = _start(reference, tmp)
    assert process.wait() == 0, process.stderr.read()
    duration = time.monotonic() - start
    expected = _records(reference)
    assert len(expected) == 3

    killed = tmp_path / "killed"
    chooser = random.Random(16)
    finished: dict[str, bytes] = {}
    for _ in range(KILLS):
        process = _start(killed, tmp)
        time.sleep(chooser.uniform(0.15, 1.0) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = _records(killed)
        for name, content in finished.items():  # a finished run never runs again, nor is rewritten
            assert now[name] == content, f"{name} changed after it had finished"
        finished = now
    process = _start(killed, tmp)
    assert process.wait() == 0, process.stderr.read()
    final = _records(killed)
    for name, content in finished.items():
        assert final[name] == content, f"{name} ran again after it had finished"

    assert sorted(final) == sorted(expected)
    for name in expected:
        assert _comparable(read_record(killed / name)) == _comparable(read_record(reference / name)), name
    assert _leftovers(killed, tmp) == []
