"""Run records: validated configs, end-to-end runs on a toy dataset, resume, atomic writes, aggregation."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

import safelib as sl
import safelib.runs as runs
import safelib.runs.records as records
import safelib.runs.runner as runner
from safelib.runs.__main__ import main as cli_main
from safelib import data
from safelib.runs.aggregate import BENCHMARK_MEAN, aggregate, benchmark_mean, load_records, summary_table
from safelib.runs import RunConfig, RunConfigError, read_record, run, write_record
from test_features import tiny_clip

TOY = "toy_runs"
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))


@dataclass(frozen=True)
class ToyReader:
    """Image ``"<class>/<index>"``: a coloured square on a noisy grey background (picklable)."""

    def __call__(self, image_id: str) -> Image.Image:
        label, index = (int(x) for x in image_id.split("/"))
        rng = np.random.default_rng(label * 1000 + index)
        pixels = rng.integers(90, 160, size=(64, 64, 3), dtype=np.uint8)
        x, y = rng.integers(4, 28, size=2)
        pixels[y:y + 32, x:x + 32] = COLOURS[label]
        return Image.fromarray(pixels)


def _toy_splits(_dir, **_options):
    names = ("red square", "green square", "blue square")

    def images(start: int, per_class: int, split: str) -> data.ImageSet:
        ids = [f"{k}/{start + i}" for k in range(3) for i in range(per_class)]
        return data.ImageSet(ids=ids, labels=[int(i.split("/")[0]) for i in ids], classnames=names,
                             reader=ToyReader(), name=f"{TOY}/{split}")

    return images(0, 4, "train"), images(100, 3, "val"), images(200, 4, "test")


@pytest.fixture(scope="module", autouse=True)
def toy_dataset():
    data.register(TOY, _toy_splits, overwrite=True, kind="custom", templates=("a photo of a {}.",),
                  how_to_get="generated in the test")
    yield
    data.unregister(TOY)


@pytest.fixture(scope="module")
def clip():
    """A tiny random ResNet CLIP standing in for RN50 (random weights): plumbing, not accuracy."""
    model = tiny_clip()
    return sl.ClipModel("RN50", None, model.model, preprocess=None,
                        tokenizer=open_clip.get_tokenizer("RN50", context_length=16))


def _config(tmp_path: Path, **changes) -> RunConfig:
    values = dict(dataset=TOY, method="tip_adapter", shots=2, seed=1, backbone="RN50", weights=None,
                  train_views=2, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"))
    values.update(changes)
    return RunConfig(**values)


# --- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("dataset", "imagenette", "registered: .*toy_runs"),
    ("method", "tip", "valid: .*tip_adapter_f"),
    ("shots", 0, "int >= 1"),
    ("seed", -1, "int >= 0"),
    ("seed", 1.5, "int >= 0"),
    ("backbone", "ViT-B-32", "valid: .*RN50"),
    ("train_views", 0, "int >= 1"),
    ("device", "gpu0", "not a device"),
    ("method_config", {"alpha": 1.0}, "unknown option.*valid options.*alphas"),
    ("method_config", {"betas": ()}, "betas"),
    ("autocast_dtype", "fp8", "float16"),
])
def test_bad_config_is_rejected_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(RunConfigError, match=rf"RunConfig\.{field}: .*{message}"):
        _config(tmp_path, **{field: value})
    assert not (tmp_path / "runs").exists()  # rejected before any work


def test_config_round_trips_and_identity_ignores_where_files_live(tmp_path):
    config = _config(tmp_path, method_config={"alphas": [1.0, 2.0]})
    assert config.method_config["alphas"] == [1.0, 2.0] and "betas" in config.method_config  # full, with defaults
    again = RunConfig.from_dict(config.to_dict())
    assert again.identity == config.identity
    moved = _config(tmp_path / "elsewhere", method_config={"alphas": [1.0, 2.0]})
    assert moved.identity == config.identity and moved.record_path() != config.record_path()
    other_seed = _config(tmp_path, seed=2, method_config={"alphas": [1.0, 2.0]})
    assert other_seed.identity != config.identity and other_seed.setting == config.setting
    assert _config(tmp_path).setting != config.setting
    with pytest.raises(RunConfigError, match="unknown RunConfig field.*'shot'"):
        RunConfig.from_dict({**config.to_dict(), "shot": 3})


# --- a run end to end -------------------------------------------------------------------------------

def test_run_writes_a_complete_record_and_resumes(tmp_path, clip, monkeypatch):
    config = _config(tmp_path)
    record = run(config, clip=clip)
    path = config.record_path()
    assert path.is_file() and read_record(path) == json.loads(json.dumps(record))
    assert 0.0 <= record["test_acc"] <= 100.0 and 0.0 <= record["val_acc"] <= 100.0
    assert {"alpha", "beta"} <= set(record["chosen"])
    assert set(record["timings"]) == {"load_model", "sample", "text_classifier", "features", "fit", "predict"}
    assert record["wall_seconds"] == pytest.approx(sum(record["timings"].values()))
    assert record["peak_memory_mb"]["process_max_rss"] > 0
    assert record["libraries"]["torch"] == torch.__version__.split("+")[0] or record["libraries"]["torch"]
    assert record["safelib_version"] == sl.__version__
    assert record["num_images"] == {"train": 6, "val": 6, "test": 12}
    ids = json.loads((path.parent / record["sampled_ids"]).read_text())
    assert len(ids["train"]["ids"]) == 6 and ids["seed"] == 1
    assert record["config"]["method_config"]["alphas"] == list(sl.methods.TipAdapterConfig().alphas)

    # A rerun finds the record and does no work at all.
    import safelib.runs.runner

    monkeypatch.setattr(safelib.runs.runner, "make_method", lambda *a, **k: pytest.fail("a finished run was redone"))
    assert run(config, clip=clip) == read_record(path)


def test_runs_share_the_feature_cache_and_differ_by_seed(tmp_path, clip):
    first = run(_config(tmp_path, method="zero_shot"), clip=clip)
    second = run(_config(tmp_path, method="linear_probe"), clip=clip)
    assert second["timings"]["features"] < first["timings"]["features"] + 5.0
    caches = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(caches) == 3  # train, val, test: read again, not rebuilt, by the second method
    other_seed = run(_config(tmp_path, method="zero_shot", seed=2), clip=clip)
    assert other_seed["sampled_ids"] != first["sampled_ids"]
    # A new sample needs new train and val caches; the test split's (one eval view) is shared.
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 5
    # Zero-shot does not depend on the sample: the same test accuracy whatever the seed.
    assert other_seed["test_acc"] == first["test_acc"]


@pytest.mark.parametrize("method, options", [
    ("safe", {"epochs": 2}),
    ("safe_a_tip", {"safe": {"epochs": 2}, "blends": [0.5], "adapter": {"epochs": 2}}),
])
def test_safe_runs_on_dense_maps(tmp_path, clip, method, options):
    record = run(_config(tmp_path, method=method, method_config=options), clip=clip)
    assert "blend" in record["chosen"]
    assert RunConfig.from_dict(record["config"]).identity == record["identity"]  # the record re-creates its run
    fields = [json.loads((p / "manifest.json").read_text())["fields"]["kind"] for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert sorted(fields) == ["dense"] * 3


def test_passing_another_model_is_refused(tmp_path, clip):
    with pytest.raises(RunConfigError, match="backbone/weights"):
        run(_config(tmp_path, backbone="RN101"), clip=clip)


# --- records on disk --------------------------------------------------------------------------------

def test_a_killed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "x" / "1shot_seed1_abc.run.json"
    record = _fake_record("dtd", "zero_shot", 1, 1, 50.0)

    def killed(_fd):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(records.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_record(path, record)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temporary file either
    # A hard kill (SIGKILL) can leave a temporary file behind: it is never read as a record.
    (path.parent / f".{path.name}.123.tmp").write_text('{"format": "safelib.run/1", "dataset": ')
    assert load_records(tmp_path / "runs").empty
    monkeypatch.undo()
    write_record(path, record)
    assert len(load_records(tmp_path / "runs")) == 1


def test_read_record_rejects_other_files(tmp_path):
    bad = tmp_path / "a.run.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken JSON"):
        read_record(bad)
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a safelib.run/1"):
        read_record(bad)


# --- aggregation --------------------------------------------------------------------------------------

def _fake_record(dataset, method, shots, seed, acc, setting="s1"):
    return {"format": runs.RECORD_FORMAT, "dataset": dataset, "method": method, "backbone": "RN50",
            "weights": "openai", "setting": setting, "shots": shots, "seed": seed, "val_acc": acc + 1.0,
            "test_acc": acc, "wall_seconds": 2.0, "chosen": {}, "git_commit": None}


def _write_grid(root: Path, datasets, seeds, methods=("zero_shot", "tip_adapter_f"), shots=(1, 16)):
    rng = np.random.default_rng(0)
    accs = {}
    for d in datasets:
        for m in methods:
            for k in shots:
                for s in seeds:
                    acc = float(rng.uniform(20, 90))
                    accs[d, m, k, s] = acc
                    write_record(root / d / m / f"{k}shot_seed{s}_x.run.json", _fake_record(d, m, k, s, acc))
    return accs


def test_aggregate_means_and_stds_over_seeds(tmp_path):
    benchmarks = data.list_datasets(kind="benchmark")
    assert len(benchmarks) == 11
    accs = _write_grid(tmp_path, benchmarks, seeds=(1, 2, 3))
    records = load_records(tmp_path)
    assert len(records) == 11 * 2 * 2 * 3
    table = aggregate(records)
    row = table[(table.dataset == "dtd") & (table.method == "tip_adapter_f") & (table.shots == 16)].iloc[0]
    values = [accs["dtd", "tip_adapter_f", 16, s] for s in (1, 2, 3)]
    assert row.test_acc_mean == pytest.approx(np.mean(values))
    assert row.test_acc_std == pytest.approx(np.std(values, ddof=1))
    assert row.n_seeds == 3 and row.seeds == "1,2,3"
    mean_row = table[(table.dataset == BENCHMARK_MEAN) & (table.method == "zero_shot") & (table.shots == 1)].iloc[0]
    per_seed = [np.mean([accs[d, "zero_shot", 1, s] for d in benchmarks]) for s in (1, 2, 3)]
    assert mean_row.test_acc_mean == pytest.approx(np.mean(per_seed))
    assert mean_row.test_acc_std == pytest.approx(np.std(per_seed, ddof=1))
    summary = summary_table(table)
    assert list(summary.columns) == [1, 16] and (BENCHMARK_MEAN, "zero_shot") in summary.index


def test_benchmark_mean_needs_every_dataset(tmp_path):
    benchmarks = data.list_datasets(kind="benchmark")
    _write_grid(tmp_path, benchmarks[:-1], seeds=(1,))
    records = load_records(tmp_path)
    assert benchmark_mean(records).empty
    assert BENCHMARK_MEAN not in set(aggregate(records).dataset)
    assert aggregate(records)["test_acc_std"].isna().all()  # one seed: no spread


def test_aggregate_keeps_settings_apart(tmp_path):
    write_record(tmp_path / "a.run.json", _fake_record("dtd", "safe", 1, 1, 40.0, setting="lr1"))
    write_record(tmp_path / "b.run.json", _fake_record("dtd", "safe", 1, 1, 60.0, setting="lr2"))
    table = aggregate(load_records(str(tmp_path / "*.run.json")))
    assert sorted(table.test_acc_mean) == [40.0, 60.0]
    with pytest.raises(ValueError, match="at least one"):
        load_records()
    with pytest.raises(ValueError, match="lack columns"):
        aggregate(pd.DataFrame({"dataset": []}))


# --- the command line ---------------------------------------------------------------------------------

def test_cli_runs_the_grid_and_prints_the_table(tmp_path, clip, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_load_clip", lambda *a: clip)
    argv = ["--dataset", TOY, "--methods", "zero_shot", "tip_adapter", "--shots", "1", "2", "--seeds", "1", "2",
            "--backbone", "RN50", "--weights", "none", "--train-views", "2",
            "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "runs")]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "tip_adapter" in out and "wall time" in out
    assert len(load_records(tmp_path / "runs")) == 2 * 2 * 2
    # Rerun: everything is skipped, nothing is written twice.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.run.json")}
    assert cli_main(argv) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.run.json")}
    with pytest.raises(SystemExit):
        cli_main([*argv, "--method-config", '{"zero_shot": {"x": 1}}'])
    assert "RunConfig.method_config" in capsys.readouterr().err


# --- the shipped mini-CLIP: a known-good model on a task it never saw ---------------------------------

@pytest.mark.slow
def test_every_method_beats_chance_with_the_shipped_miniclip(tmp_path):
    """All methods, 16 shots, one seed, on the target-among-distractors task (6-way: chance 16.7 %)."""
    from safelib.clip.miniclip import CHECKPOINT

    if not CHECKPOINT.is_file():
        pytest.skip("the mini-CLIP checkpoint is not shipped in this checkout")
    records = runs.run_grid(
        "miniworld_colour_largest", list(sl.METHODS), [16], [1], progress=False, backbone="miniclip",
        weights="shipped", train_views=4, dataset_options={"per_class": [16, 4, 20]},
        cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"),
    )
    accuracies = {r["method"]: r["test_acc"] for r in records}
    assert set(accuracies) == set(sl.METHODS)
    assert all(acc > 100 / 6 + 10 for acc in accuracies.values()), accuracies


def test_dense_runs_record_the_cache_plan(tmp_path, clip):
    """Issue 7: the planner's placement and predicted epoch time are in the record of a SAFE run."""
    record = runs.run(_config(tmp_path, method="safe", method_config={"epochs": 2, "batch_size": 4}), clip=clip)
    plan = record["cache_plan"]
    assert plan["placement"] in ("device", "pinned", "memmap")
    assert plan["predicted"]["epoch_s"] > 0 and plan["workload"]["epochs"] == 2
    assert runs.run(_config(tmp_path, method="zero_shot"), clip=clip)["cache_plan"] is None


def test_summary_table_keeps_every_setting_of_a_method():
    """Two settings of one method at one shot count are two rows, not one silently dropped."""
    rows = [dict(dataset="toy", backbone="RN50", weights="openai", method="safe", setting=setting, shots=1,
                 seed=seed, val_acc=acc, test_acc=acc, wall_seconds=1.0)
            for setting, acc in (("lr-a", 50.0), ("lr-b", 90.0)) for seed in (1, 2)]
    summary = summary_table(aggregate(pd.DataFrame(rows)))
    assert len(summary) == 2
    assert {cell.split(" ")[0] for cell in summary[1]} == {"50.0", "90.0"}


def test_run_grid_refuses_overrides_for_methods_it_does_not_run(tmp_path):
    with pytest.raises(RunConfigError, match="tip_adapterf.*misspelled"):
        runs.run_grid(TOY, ["tip_adapter_f"], [1], [1], progress=False, method_configs={"tip_adapterf": {}},
                      cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "r"), weights=None)


def test_safe_with_batches_of_one_runs_through_the_planner(tmp_path, clip):
    record = runs.run(_config(tmp_path, method="safe", method_config={"epochs": 1, "batch_size": 1}), clip=clip)
    assert record["cache_plan"]["workload"]["batch_size"] == 1
