"""Issue 16, the run side: identities that cover what changes the numbers, strict records, warnings
on the console, seeds and weights checked before any work. Cases from
shared/reviews/reliability-2026-12-01.md (P.1, P.2, P.3, 1.6, 1.9, 1.24, 1.42 (JSON), 3.12)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import safelib.data as D
import safelib.runs as runs
from safelib.clip import CHECKPOINT, load_clip, weights_file_digest
from safelib.data.splits import read_class_folders
from safelib.runs import RunConfig, RunConfigError, read_record, write_record
from safelib.runs.aggregate import aggregate, load_records
from safelib.runs.runner import RunWarning

TASK = "miniworld_shape_largest"
SMALL = {"per_class": [4, 2, 6]}


def _config(tmp_path: Path, **changes) -> RunConfig:
    values = dict(dataset=TASK, method="zero_shot", shots=1, seed=1, dataset_options=SMALL, train_views=1,
                  cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"))
    values.update(changes)
    return RunConfig(**values)


def test_sample_files_of_other_dataset_options_do_not_overwrite_each_other(tmp_path):
    """P.1: the sampled-ids file name holds the options, so an earlier record keeps pointing at its sample."""
    first = runs.run(_config(tmp_path))
    second = runs.run(_config(tmp_path, dataset_options={"per_class": [8, 2, 6]}))
    where = Path(_config(tmp_path).record_path()).parent
    first_ids, second_ids = (where / r["sampled_ids"] for r in (first, second))
    assert first_ids.resolve() != second_ids.resolve()
    assert json.loads(first_ids.read_text())["dataset_options"] == SMALL


def test_a_weights_file_replaced_at_the_same_path_is_a_new_run(tmp_path):
    """3.12: the identity holds the file's content digest, so resume never returns the old file's record."""
    weights = tmp_path / "weights.safetensors"
    shutil.copy(CHECKPOINT, weights)
    before = _config(tmp_path, backbone="miniclip", weights=str(weights))
    first = runs.run(before)
    tensors = load_file(weights)
    tensors["visual.attnpool.c_proj.weight"] = tensors["visual.attnpool.c_proj.weight"] * -1.0
    save_file(tensors, weights, metadata=json.loads(json.dumps(_metadata(CHECKPOINT))))
    after = _config(tmp_path, backbone="miniclip", weights=str(weights))
    assert after.identity != before.identity and after.record_path() != before.record_path()
    second = runs.run(after)
    assert second["weights_digest"] == weights_file_digest("miniclip", weights) != first["weights_digest"]
    assert second["model_digest"] != first["model_digest"]
    table = aggregate(load_records(tmp_path / "runs"))
    assert len(table) == 2  # two cells: one name, two weights


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def test_weights_none_is_refused_for_miniclip_and_random_weights_are_reproducible(tmp_path):
    """P.3: 'none' used to run the shipped weights and file them as random."""
    with pytest.raises(RunConfigError, match=r"RunConfig\.weights: None \(random weights\) is not available for miniclip"):
        _config(tmp_path, weights=None)
    with pytest.raises(ValueError, match="not available for miniclip"):
        load_clip("miniclip", None)
    a, b = load_clip("RN50", None), load_clip("RN50", None)
    assert all((x == y).all() for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_unknown_weights_are_refused_before_any_work(tmp_path):
    with pytest.raises(RunConfigError, match=r"RunConfig\.weights: 'nope\.safetensors' is neither a weights tag of miniclip"):
        _config(tmp_path, weights="nope.safetensors")


@pytest.mark.parametrize("seed", [2**63, 2**70])
def test_seeds_beyond_the_generator_are_refused_up_front(tmp_path, seed):
    """1.9: a seed >= 2**64 used to fail only after the features were extracted."""
    with pytest.raises(RunConfigError, match=r"RunConfig\.seed: must fit a 64-bit generator seed"):
        _config(tmp_path, seed=seed)


@pytest.mark.parametrize("options, field", [({"bogus": 1}, "bogus"), ({"per_class": "abc"}, "per_class")])
def test_bad_dataset_options_are_refused_by_the_config(tmp_path, options, field):
    """1.24, 1.25: bad options used to fail at run time with an internal TypeError."""
    with pytest.raises(RunConfigError, match=rf"RunConfig\.dataset_options: .*{field}"):
        _config(tmp_path, dataset_options=options)


def test_more_shots_than_images_warn_on_the_console(tmp_path):
    """1.6: the sampling warnings used to be kept in the record only."""
    with pytest.warns(RunWarning, match=r"zero_shot on miniworld_shape_largest \(8-shot, seed 1\): .*only 4 images"):
        record = runs.run(_config(tmp_path, shots=8))
    assert record["sampling_warnings"]


def test_records_are_strict_json_with_a_note_of_non_finite_values(tmp_path):
    """1.42: records held bare NaN tokens, which strict parsers reject."""
    path = write_record(tmp_path / "r.run.json", {"format": "safelib.run/1", "test_acc": 50.0,
                                                  "chosen": {"val_loss": float("nan"), "sweep": [1.0, float("inf")]}})
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON token {name}"))
    record = read_record(path)
    assert record["chosen"] == {"val_loss": None, "sweep": [1.0, None]}
    assert record["non_finite"] == {"chosen.val_loss": "nan", "chosen.sweep[1]": "inf"}


def test_records_say_what_was_loaded(tmp_path):
    record = runs.run(_config(tmp_path))
    assert record["weights_digest"] == weights_file_digest("miniclip", "shipped")
    assert len(record["model_digest"]) == 16
    assert record["training_warnings"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runs.run(_config(tmp_path)) == record  # resumed: the same record, nothing redone


# ----------------------------------------------------------------- a user's image folder: its files name the run
FOLDER = "toy_identity_folder"
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30)}


def _folder_splits(dataset_dir: Path) -> tuple:
    """A user's dataset: one sub-folder of images per class, cut into train/val/test."""
    return D.fixed_split(read_class_folders(dataset_dir, list(COLOURS), list(COLOURS), FOLDER))


@pytest.fixture
def folder_dataset(tmp_path):
    """``tmp_path/data/toy/<class>/<k>.png``, registered as a custom dataset read from that folder."""
    for name, colour in COLOURS.items():
        folder = tmp_path / "data" / "toy" / name
        folder.mkdir(parents=True)
        for k in range(10):  # 5 train, 1 val, 4 test (fixed_split's fractions)
            Image.new("RGB", (48, 48), tuple(c + 5 * k for c in colour)).save(folder / f"{k}.png")
    D.register(FOLDER, _folder_splits, overwrite=True, kind="custom", folder="toy", templates=("a photo of a {}.",))
    yield tmp_path / "data"
    D.unregister(FOLDER)


def test_a_folder_dataset_with_an_edited_image_is_a_new_run(tmp_path, folder_dataset):
    """The identity held the dataset's name only, so a rerun after a user edited an image returned the
    stale record; now it holds the folder's files (their content digest, stored as ``data_digest``)."""
    def config() -> RunConfig:  # built afresh each time, as a rerun in a new process would
        return _config(tmp_path, dataset=FOLDER, dataset_options={}, data_root=str(folder_dataset))

    before = config()
    first = runs.run(before)
    assert config().identity == before.identity and runs.run(config()) == first  # unchanged folder: resumed
    Image.new("RGB", (48, 48), (30, 30, 200)).save(folder_dataset / "toy" / "red" / "0.png")  # same name, new bytes
    after = config()
    second = runs.run(after)
    assert second["identity"] != first["identity"]  # not the stale record
    assert after.identity == second["identity"] and after.record_path() != before.record_path()
    assert second["data_digest"] == after.data_digest != first["data_digest"] == before.data_digest
    assert len(first["data_digest"]) == 16
    assert RunConfig.from_dict(second["config"]).identity == second["identity"]  # the files as they are now
    assert read_record(before.record_path()) == first  # the old record stays, named by the old files
    assert len(aggregate(load_records(tmp_path / "runs"))) == 2  # two cells: one dataset name, two contents


def test_registry_and_generated_datasets_are_named_without_reading_any_data(tmp_path):
    """The benchmarks' and the mini-world's identities stay what they were, with no data present
    (loading DTD or ImageNet from an empty data root would raise ``DatasetMissingError``)."""
    for changes in ({}, {"dataset": "dtd", "dataset_options": {}}, {"dataset": "imagenet", "dataset_options": {},
                                                                    "test_dataset": "imagenet_a"}):
        config = _config(tmp_path, data_root=str(tmp_path / "no-data"), **changes)
        assert config.data_digest is None
        assert config.identity == runs.config.identity_of(config.to_dict(), config.weights_digest)
