"""The few-shot sampler: determinism, validation sizes, the ImageNet rule, short classes, saved ids."""
import json
import os
import random

import pytest
from PIL import Image

import safelib.data as D
from safelib.data import splits as splits_module


def reader(image_id):
    return Image.new("RGB", (4, 4))


def make_set(per_class=(20, 20, 20), name="toy/train", shuffle_seed=None):
    part = name.split("/")[-1]  # ids differ between splits, as real files do
    rows = [(f"{part}/c{k}/img_{j:03d}.jpg", k) for k, n in enumerate(per_class) for j in range(n)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return D.ImageSet([r[0] for r in rows], [r[1] for r in rows], [f"class{k}" for k in range(len(per_class))],
                      reader, name)


def make_dataset(train=(20, 20, 20), val=(6, 6, 6), test=(5, 5, 5)):
    parts = [make_set(n, f"toy/{p}") if n else None for n, p in zip((train, val, test), ("train", "val", "test"))]
    return D.SplitDataset("toy", parts[2].classnames, ("a {}.",), parts[0], parts[1], parts[2])


def test_same_seed_same_ids_even_when_listing_order_differs():
    a, va = D.sample_few_shot(make_set(), 4, seed=1)
    b, vb = D.sample_few_shot(make_set(shuffle_seed=7), 4, seed=1)
    assert a.ids == b.ids and va.ids == vb.ids
    assert len(set(a.ids)) == 12 and a.class_counts() == (4, 4, 4)


def test_different_seed_different_ids():
    ids = {D.sample_few_shot(make_set(), 4, seed=s)[0].ids for s in (1, 2, 3)}
    assert len(ids) == 3


def test_same_ids_on_a_shuffled_directory_listing(tmp_path, monkeypatch):
    for k in range(2):
        for j in range(10):
            (tmp_path / f"c{k}").mkdir(exist_ok=True)
            Image.new("RGB", (2, 2)).save(tmp_path / f"c{k}" / f"{j}.png")

    def read():
        return splits_module.read_class_folders(tmp_path, ["c0", "c1"], ["a", "b"], "folder")

    plain = D.sample_few_shot(read(), 3, seed=2)[0].ids
    real_scandir = os.scandir

    class Shuffled:
        def __init__(self, path):
            self.entries = list(real_scandir(path))
            random.Random(str(path)).shuffle(self.entries)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(splits_module.os, "scandir", Shuffled)
    assert D.sample_few_shot(read(), 3, seed=2)[0].ids == plain


@pytest.mark.parametrize("shots, val_size", [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)])
def test_validation_is_min_k_4_per_class_from_the_val_split(shots, val_size):
    data = make_dataset()
    train, val = D.sample_few_shot(data, shots, seed=1)
    assert train.class_counts() == (shots,) * 3
    assert val.class_counts() == (val_size,) * 3
    assert set(val.ids) <= set(data.val.ids) and set(train.ids) <= set(data.train.ids)
    assert train.name == "toy/train@%dshot/seed1" % shots


def test_imagenet_rule_validation_from_unused_train_never_test():
    data = make_dataset(val=None)
    for shots in (1, 4, 16):
        train, val = D.sample_few_shot(data, shots, seed=3)
        assert not set(train.ids) & set(val.ids)
        assert set(val.ids) <= set(data.train.ids) and not set(val.ids) & set(data.test.ids)
        assert val.class_counts() == (min(shots, 4),) * 3


def test_short_classes_are_sampled_with_replacement_and_warn():
    with pytest.warns(D.FewShotWarning, match="has only 3 images but 8 shots per class were asked for"):
        train, _ = D.sample_few_shot(make_dataset(train=(3, 20, 20)), 8, seed=1)
    assert train.class_counts() == (8, 8, 8)
    assert len(set(train.ids[:8])) <= 3


def test_imagenet_rule_with_too_few_left_warns_and_uses_what_is_left():
    with pytest.warns(D.FewShotWarning, match="has only 1 images left .* but 4 validation images per class"):
        train, val = D.sample_few_shot(make_set((5, 20)), 4, seed=1)
    assert val.class_counts() == (1, 4) and not set(train.ids) & set(val.ids)


def test_bare_train_set_and_explicit_val_shots():
    train, val = D.sample_few_shot(make_set(), 2, seed=1, val_shots=0)
    assert len(val) == 0 and len(train) == 6


@pytest.mark.parametrize("args, error, match", [
    ((0, 1), ValueError, "shots must be a positive int"),
    ((1.5, 1), ValueError, "shots must be a positive int"),
    ((1, -1), ValueError, "seed must be a non-negative int"),
])
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        D.sample_few_shot(make_set(), *args)


def test_test_only_and_empty_classes_and_wrong_types():
    data = make_dataset()
    test_only = D.SplitDataset("shift", data.classnames, ("{}",), None, None, data.test)
    with pytest.raises(ValueError, match="test-only"):
        D.sample_few_shot(test_only, 1, 1)
    with pytest.raises(ValueError, match=r"classes \['class1'\] have no training images"):
        D.sample_few_shot(make_set((3, 0, 3)), 1, 1)
    with pytest.raises(TypeError, match="SplitDataset"):
        D.sample_few_shot(["a"], 1, 1)


def test_saved_ids_round_trip_and_are_checked(tmp_path):
    data = make_dataset(val=None)
    train, val = D.sample_few_shot(data, 4, seed=2)
    path = D.save_few_shot(tmp_path / "runs" / D.few_shot_filename("toy", 4, 2), train, val,
                           dataset="toy", shots=4, seed=2)
    assert path.name == "toy_4shot_seed2.json" and [p.name for p in path.parent.iterdir()] == [path.name]
    saved = json.loads(path.read_text())
    assert saved["train"]["ids"] == list(train.ids) and saved["seed"] == 2
    again_train, again_val = D.load_few_shot(path, data)
    assert again_train.ids == train.ids and again_val.ids == val.ids and again_val.labels == val.labels
    other = D.SplitDataset("other", data.classnames, ("{}",), data.train, None, data.test)
    with pytest.raises(ValueError, match="saved for dataset 'toy'"):
        D.load_few_shot(path, other)
    saved["train"]["ids"][0] = "c9/missing.jpg"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="not in 'toy/train'"):
        D.load_few_shot(path, data)


def test_bad_val_shots_and_changed_labels_on_reload(tmp_path):
    with pytest.raises(ValueError, match="val_shots must be an int >= 0"):
        D.sample_few_shot(make_set(), 2, 1, val_shots=-1)
    data = make_dataset()
    train, val = D.sample_few_shot(data, 2, seed=1)
    path = D.save_few_shot(tmp_path / "s.json", train, val, dataset="toy", shots=2, seed=1)
    saved = json.loads(path.read_text())
    saved["val"]["labels"][0] = 2
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="val labels differ"):
        D.load_few_shot(path, data)
    test_only = D.SplitDataset("toy", data.classnames, ("{}",), None, None, data.test)
    with pytest.raises(ValueError, match="no train split"):
        D.load_few_shot(path, test_only)


def test_no_image_left_for_validation_is_a_clear_error():
    """One image per class and no val split: nothing is left to validate on, so say so up front."""
    with pytest.raises(ValueError, match="no image is left for the few-shot validation set"), \
            pytest.warns(D.FewShotWarning, match="only 0 images left"):
        D.sample_few_shot(make_set(per_class=(1, 1, 1)), shots=1, seed=1)
    train, val = D.sample_few_shot(make_set(per_class=(1, 1, 1)), shots=1, seed=1, val_shots=0)
    assert len(train) == 3 and len(val) == 0
