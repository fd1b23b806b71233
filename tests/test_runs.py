"""Run records: validated configs, end-to-end runs on a toy dataset, resume, atomic writes, aggregation."""
from __future__ import annotations

import dataclasses
import importlib.metadata
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
from safelib.clip.models import weights_file_digest
from safelib.runs import RunConfig, RunConfigError, read_record, run, write_record
from safelib.runs.config import identity_of

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
def clip(make_tiny_clip):
    """A tiny random ResNet CLIP standing in for RN50 (random weights): plumbing, not accuracy."""
    model = make_tiny_clip()
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
    assert isinstance(config.method_config, sl.methods.TipAdapterConfig)  # typed, held once
    assert config.method_config.alphas == (1.0, 2.0)
    plain = config.to_dict()["method_config"]
    assert plain["alphas"] == [1.0, 2.0] and plain["betas"] == list(config.method_config.betas)  # full, with defaults
    again = RunConfig.from_dict(config.to_dict())
    assert again == config and again.identity == config.identity
    typed = _config(tmp_path, method_config=sl.methods.TipAdapterConfig(alphas=(1.0, 2.0)))
    assert typed == config and typed.identity == config.identity  # a MethodConfig is taken as it is
    assert dataclasses.replace(config, seed=2).method_config is config.method_config
    with pytest.raises(RunConfigError, match="RunConfig.method_config: .*TipAdapterConfig.*got SafeConfig"):
        _config(tmp_path, method_config=sl.SafeConfig())
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
    assert record["libraries"]["torch"] == importlib.metadata.version("torch")
    assert record["libraries"]["numpy"] == importlib.metadata.version("numpy")
    assert record["safelib_version"] == sl.__version__
    assert record["num_images"] == {"train": 6, "val": 6, "test": 12}
    ids = json.loads((path.parent / record["sampled_ids"]).read_text())
    assert len(ids["train"]["ids"]) == 6 and ids["seed"] == 1
    assert record["config"]["method_config"]["alphas"] == list(sl.methods.TipAdapterConfig().alphas)

    assert not {"dataset", "method", "backbone", "weights", "shots", "seed", "setting"} & set(record)  # in config only
    assert record["config"] == config.to_dict() and record["identity"] == config.identity

    # A rerun finds the record and does no work at all.
    monkeypatch.setattr(runner, "_run", lambda *a, **k: pytest.fail("a finished run was redone"))
    assert run(config, clip=clip) == read_record(path)


def test_runs_share_the_feature_cache_and_differ_by_seed(tmp_path, clip):
    first = run(_config(tmp_path, method="zero_shot"), clip=clip)
    second = run(_config(tmp_path, method="tip_adapter"), clip=clip)
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

def _fake_record(dataset, method, shots, seed, acc, method_config=None, dataset_options=None):
    config = {"dataset": dataset, "dataset_options": dataset_options or {}, "method": method, "backbone": "RN50",
              "weights": "openai", "shots": shots, "seed": seed, "method_config": method_config or {},
              "train_views": 10}
    return {"format": runs.RECORD_FORMAT, "config": config, "val_acc": acc + 1.0,
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
    write_record(tmp_path / "a.run.json", _fake_record("dtd", "safe", 1, 1, 40.0, method_config={"lr": 1e-3}))
    write_record(tmp_path / "b.run.json", _fake_record("dtd", "safe", 1, 1, 60.0, method_config={"lr": 1e-2}))
    table = aggregate(load_records(str(tmp_path / "*.run.json")))
    assert sorted(table.test_acc_mean) == [40.0, 60.0]
    with pytest.raises(ValueError, match="at least one"):
        load_records()
    with pytest.raises(ValueError, match="lack columns"):
        aggregate(pd.DataFrame({"dataset": []}))


# --- the command line ---------------------------------------------------------------------------------

def test_cli_runs_the_grid_and_prints_the_table(tmp_path, clip, monkeypatch, capsys):
    monkeypatch.setattr(runner, "load_clip", lambda *a, **k: clip)
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
    accuracies = {r["config"]["method"]: r["test_acc"] for r in records}
    assert set(accuracies) == set(sl.METHODS)
    assert all(acc > 100 / 6 + 10 for acc in accuracies.values()), accuracies


def test_dense_runs_record_the_cache_plan(tmp_path, clip):
    """Issue 7: the planner's placement and predicted epoch time are in the record of a SAFE run."""
    record = runs.run(_config(tmp_path, method="safe", method_config={"epochs": 2, "batch_size": 4}), clip=clip)
    plan = record["cache_plan"]
    assert plan["placement"] in ("device", "pinned", "memmap")
    assert plan["predicted"]["epoch_s"] > 0 and plan["workload"]["epochs"] == 2
    assert runs.run(_config(tmp_path, method="zero_shot"), clip=clip)["cache_plan"] is None


def test_summary_table_keeps_every_setting_of_a_method_and_names_it_in_words(tmp_path):
    """Two settings of one method at one shot count are two rows, named by the fields that differ."""
    for lr, acc in ((1e-3, 50.0), (1e-2, 90.0)):
        for seed in (1, 2):
            write_record(tmp_path / f"{lr}_{seed}.run.json",
                         _fake_record("toy", "safe", 1, seed, acc, method_config={"lr": lr, "epochs": 30}))
    write_record(tmp_path / "zs.run.json", _fake_record("toy", "zero_shot", 1, 1, 30.0))
    summary = summary_table(aggregate(load_records(tmp_path)))
    assert len(summary) == 3
    assert summary.loc[("toy", "safe", "lr=0.001"), 1].startswith("50.0")
    assert summary.loc[("toy", "safe", "lr=0.01"), 1].startswith("90.0")
    assert summary.loc[("toy", "zero_shot", ""), 1].startswith("30.0")


def test_aggregation_never_merges_runs_on_other_dataset_options(tmp_path):
    """Issue 16 (P.2): runs on one task with other options (another task seed) are other data."""
    for seed, acc in ((0, 30.0), (7, 40.0)):
        write_record(tmp_path / f"{seed}.run.json", _fake_record("miniworld_shape_largest", "zero_shot", 1, 1, acc,
                                                                  dataset_options={"seed": seed}))
    table = aggregate(load_records(tmp_path))
    assert sorted(table.test_acc_mean) == [30.0, 40.0] and list(table.n_seeds) == [1, 1]
    summary = summary_table(table)
    assert summary.loc[("miniworld_shape_largest", "zero_shot", "seed=7"), 1] == "40.0 (1)"


def test_run_grid_refuses_overrides_for_methods_it_does_not_run(tmp_path):
    with pytest.raises(RunConfigError, match="tip_adapterf.*misspelled"):
        runs.run_grid(TOY, ["tip_adapter_f"], [1], [1], progress=False, method_configs={"tip_adapterf": {}},
                      cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "r"), weights=None)


def test_safe_with_batches_of_one_runs_through_the_planner(tmp_path, clip):
    record = runs.run(_config(tmp_path, method="safe", method_config={"epochs": 1, "batch_size": 1}), clip=clip)
    assert record["cache_plan"]["workload"]["batch_size"] == 1


# --- typed configs, identity, test datasets, fitted runs ------------------------------------------

def test_config_hashes_are_stable_and_the_identity_adds_the_weights_content():
    """The config part of the identity is what it was before the config held a typed method config
    and a test dataset (hashes taken at commit ec015ed); the identity adds the weights file's
    content digest, so it differs from that hash and follows the file, not its name."""
    expected = {"safe": "0a0026328b", "tip_adapter": "804db43feb", "safe_a_tip": "972dad85f9"}
    configs = {m: RunConfig(dataset="miniworld_shape_largest", method=m, shots=1, seed=1) for m in expected}
    assert {m: identity_of(c.to_dict()) for m, c in configs.items()} == expected
    assert all(c.weights_digest == weights_file_digest("miniclip", "shipped") for c in configs.values())
    assert all(c.identity == identity_of(c.to_dict(), c.weights_digest) != expected[m] for m, c in configs.items())


@pytest.mark.parametrize("changes, message", [
    ({"test_dataset": "imagenet_z"}, r"RunConfig\.test_dataset: unknown dataset 'imagenet_z'"),
    ({"test_dataset_options": {"style": "textured"}}, r"RunConfig\.test_dataset_options: .*need a test_dataset"),
    ({"dataset": "dtd", "dataset_options": {"seed": 1}}, r"RunConfig\.dataset_options: 'dtd' takes no options"),
    ({"test_dataset": "imagenet_a", "test_dataset_options": {"x": 1}},
     r"RunConfig\.test_dataset_options: 'imagenet_a' takes no options"),
])
def test_bad_test_dataset_is_rejected(tmp_path, changes, message):
    with pytest.raises(RunConfigError, match=message):
        _config(tmp_path, **changes)


def test_registry_says_which_datasets_take_options_and_have_targets():
    assert data.dataset_spec("miniworld_shape_largest").accepts_options
    assert not data.dataset_spec("imagenet").accepts_options and not data.dataset_spec("imagenet_r").accepts_options
    task = data.get_dataset("miniworld_shape_largest", per_class=[1, 1, 1])
    assert sl.has_targets(task.test) and sl.has_targets(data.sample_few_shot(task, 1, 1)[0])
    assert not sl.has_targets(data.get_dataset(TOY).test)


def test_train_on_one_style_test_on_another(tmp_path, clip):
    """Train and select on plain mini-world scenes, score the same task rendered textured."""
    options = {"per_class": [2, 1, 3], "image_size": 64}
    plain = _config(tmp_path, dataset="miniworld_shape_largest", dataset_options=options, method="zero_shot")
    shifted = dataclasses.replace(plain, test_dataset="miniworld_shape_largest",
                                  test_dataset_options={**options, "style": "textured"})
    assert shifted.identity != plain.identity
    record, fitted = run(shifted, clip=clip, return_method=True)
    task = sl.data.miniworld_tasks.task_of
    assert task(fitted.train_set).style == "plain" and task(fitted.val_set).style == "plain"
    assert task(fitted.test_set).style == "textured"
    assert record["config"]["test_dataset_options"]["style"] == "textured" and record["num_images"]["test"] == 18
    same = run(plain, clip=clip)
    test_caches = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and _manifest(p)["fields"]["split"] == "test"]
    assert len(test_caches) == 2  # the textured test split is cached apart from the plain one
    table = aggregate(load_records(tmp_path / "runs"))
    assert len(table) == 2 and set(table.test_dataset) == {"", 'miniworld_shape_largest {"image_size": 64, '
                                                               '"per_class": [2, 1, 3], "style": "textured"}'}
    assert same["config"]["test_dataset"] is None


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _toy_subset(_dir, keep=(2, 0), extra=None, **_options):
    """The toy test split with fewer (or foreign) classes, in another order: as ImageNet-R is to ImageNet."""
    train, val, test = _toy_splits(_dir)
    names = tuple(test.classnames[k] for k in keep) + ((extra,) if extra else ())
    ids = [i for k in keep for i in test.ids if int(i.split("/")[0]) == k]
    labels = [keep.index(int(i.split("/")[0])) for i in ids]
    subset = data.ImageSet(ids=ids, labels=labels, classnames=names, reader=ToyReader(), name=f"{TOY}_subset/test")
    return None, None, subset


def test_a_test_dataset_with_fewer_classes_is_scored_on_its_classes(tmp_path, clip):
    data.register("toy_runs_subset", _toy_subset, overwrite=True, kind="custom", templates=("a photo of a {}.",))
    data.register("toy_runs_foreign", lambda d: _toy_subset(d, extra="purple square"), overwrite=True,
                  kind="custom", templates=("a photo of a {}.",))
    try:
        config = _config(tmp_path, method="tip_adapter", test_dataset="toy_runs_subset")
        record, fitted = run(config, clip=clip, return_method=True)
        assert record["test_num_classes"] == 2 and record["num_classes"] == 3 and record["num_images"]["test"] == 8
        assert fitted.test_classes.tolist() == [2, 0]  # blue, red: their columns among the three classes
        full = fitted.method.predict(fitted.splits["test"])
        logits = fitted.test_logits()
        assert logits.shape == (8, 2) and torch.equal(logits, full[:, [2, 0]])
        assert record["test_acc"] == pytest.approx(sl.accuracy(logits, fitted.splits["test"].labels))
        with pytest.raises(RunConfigError, match=r"test_dataset: 'toy_runs_foreign' has 1 class.*purple square"):
            runs.run_grid(TOY, ["zero_shot"], [1], [1], progress=False, test_dataset="toy_runs_foreign",
                          backbone="RN50", weights=None, cache_dir=str(tmp_path / "c2"), out_dir=str(tmp_path / "r2"))
        assert not (tmp_path / "r2").exists() and not (tmp_path / "c2").exists()  # refused before any work
    finally:
        data.unregister("toy_runs_subset")
        data.unregister("toy_runs_foreign")


def test_run_returns_the_fitted_method_even_when_the_record_exists(tmp_path, clip):
    config = _config(tmp_path, method="safe", method_config={"epochs": 1, "batch_size": 4})
    record, fitted = run(config, clip=clip, return_method=True)
    assert isinstance(fitted.method, sl.Safe) and fitted.config is config
    assert record["test_acc"] == pytest.approx(sl.accuracy(fitted.test_logits(), fitted.splits["test"].labels))
    mtime = config.record_path().stat().st_mtime_ns
    again, refitted = run(config, clip=clip, return_method=True)
    assert again == read_record(config.record_path()) and config.record_path().stat().st_mtime_ns == mtime
    assert torch.equal(refitted.test_logits(), fitted.test_logits())  # deterministic under the seed


def test_run_grid_runs_several_settings_and_returns_paths(tmp_path, clip):
    settings = [{"alphas": [1.0]}, sl.methods.TipAdapterConfig(alphas=(2.0,))]
    records = runs.run_grid(TOY, ["zero_shot", "tip_adapter"], [1], [1], progress=False, clip=clip,
                            method_configs={"tip_adapter": settings}, backbone="RN50", weights=None, train_views=1,
                            cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"))
    assert [r["config"]["method"] for r in records] == ["zero_shot", "tip_adapter", "tip_adapter"]
    assert [r["chosen"].get("alpha") for r in records] == [None, 1.0, 2.0]
    assert all(read_record(p) == r for r, p in zip(records, records.paths)) and records.fitted is None
    frame = records.frame()
    assert frame.equals(load_records(*records.paths))
    summary = summary_table(aggregate(frame))
    assert ("toy_runs", "tip_adapter", "alphas=[1.0]") in summary.index
    with pytest.raises(RunConfigError, match="method_configs: each value"):
        runs.run_grid(TOY, ["tip_adapter"], [1], [1], progress=False, method_configs={"tip_adapter": []},
                      backbone="RN50", weights=None, out_dir=str(tmp_path / "x"))


class _Spy(sl.methods.ZeroShot):
    """Zero-shot that notes every split it was given to fit on."""

    name = "spy_zero_shot"
    seen: list = []

    def _fit(self, data):
        type(self).seen.append((data.train, data.val))
        super()._fit(data)


def test_a_run_never_fits_on_test_features(tmp_path, clip, monkeypatch):
    monkeypatch.setitem(sl.METHODS, _Spy.name, _Spy)
    _Spy.seen.clear()
    record, fitted = run(_config(tmp_path, method=_Spy.name), clip=clip, return_method=True)
    (train, val), = _Spy.seen
    test = fitted.splits["test"]
    assert len(train) == 6 and len(val) == 6 and len(test) == 12
    test_rows = {tuple(row.tolist()) for row in test.pooled[0]}
    fit_rows = {tuple(row.tolist()) for split in (train, val) for v in range(split.num_views) for row in split.pooled[v]}
    assert not fit_rows & test_rows  # no test image's features among what fit saw
