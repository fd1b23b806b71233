"""The offline datasets: real labelled images that install from PyPI and load with no network."""
import numpy as np
import pytest

import safelib.data as D


def test_textile_loads_offline_with_real_labelled_images():
    ds = D.get_dataset("textile")
    assert ds.classnames == ("defect-free textile", "textile with a local defect", "textile with a global defect")
    assert ds.train.class_counts() == (500, 250, 250)
    assert ds.val.class_counts() == (100, 50, 50) and ds.test.class_counts() == (400, 200, 200)
    every = set(ds.train.ids) | set(ds.val.ids) | set(ds.test.ids)
    assert len(every) == 2000  # disjoint splits covering all images
    for split in (ds.train, ds.test):
        for i in (0, len(split) - 1):
            picture = split.load_image(i)
            assert picture.mode == "RGB" and picture.size == (250, 250)
            assert np.asarray(picture).std() > 5  # a real texture, not a blank
            folder = split.ids[i].split("/")[0]
            assert ("nominal", "local", "global").index(folder) == split.labels[i]
    assert all("{}" in t for t in ds.templates)


def test_textile_split_is_fixed():
    assert D.get_dataset("textile").test.ids == D.get_dataset("textile").test.ids


def test_textile_few_shot_and_loader_end_to_end():
    train, val = D.sample_few_shot(D.get_dataset("textile"), 2, seed=1)
    assert train.class_counts() == (2, 2, 2) and val.class_counts() == (2, 2, 2)
    batch = next(iter(D.view_loader(train, D.ViewSpec(size=32, views=2, seed=1), batch_size=6)))
    assert batch.images.shape == (2, 6, 3, 32, 32) and batch.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_elpv_when_installed():
    pytest.importorskip("elpv_dataset")
    ds = D.get_dataset("elpv")
    total = len(ds.train) + len(ds.val) + len(ds.test)
    assert total == 2624 and ds.classnames == ("functional solar cell", "defective solar cell")
    assert sum(ds.test.class_counts()) == len(ds.test) and min(ds.test.class_counts()) > 100
    picture = ds.test.load_image(0)
    assert picture.mode == "RGB" and picture.size == (300, 300)
    strict = D.get_dataset("elpv", threshold=1.0)
    assert sum(strict.train.labels) < sum(ds.train.labels)


def test_elpv_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "elpv_dataset" else real(name, *a))
    with pytest.raises(D.DatasetMissingError, match="pip install elpv-dataset"):
        D.get_dataset("elpv")


def test_skimage_photos():
    ds = D.get_dataset("skimage")
    assert len(ds.test) == len(ds.classnames) == 8 and ds.val is None
    assert ds.test.load_image(ds.test.ids.index("camera")).mode == "RGB"  # a grayscale photo, converted


def test_fixed_split_validates():
    with pytest.raises(ValueError, match="summing to 1"):
        D.fixed_split(D.get_dataset("skimage").test, (0.5, 0.5, 0.5))
