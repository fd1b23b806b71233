"""ImageSet: the protocol every split, sample and generated dataset shares."""
import pickle

import numpy as np
import pytest
from PIL import Image

from safelib.data import FolderReader, ImageSet


def gray_reader(image_id: str) -> Image.Image:
    return Image.new("L", (4, 3), color=int(image_id) % 256)


def make_set(n=6, k=3):
    return ImageSet(tuple(str(i) for i in range(n)), tuple(i % k for i in range(n)),
                    tuple(f"c{j}" for j in range(k)), gray_reader, "toy")


def test_load_image_is_rgb_and_subset_keeps_order_and_repeats():
    images = make_set()
    picture = images.load_image(2)
    assert picture.mode == "RGB" and picture.size == (4, 3)
    assert np.asarray(picture)[0, 0].tolist() == [2, 2, 2]
    sub = images.subset([4, 1, 4], name="sub")
    assert sub.ids == ("4", "1", "4") and sub.labels == (1, 1, 1) and sub.name == "sub"
    assert sub.classnames == images.classnames and len(sub) == 3
    assert images.class_counts() == (2, 2, 2)


def test_indices_by_class_orders_by_id_not_by_position():
    images = ImageSet(("b", "a", "c", "d"), (0, 0, 1, 0), ("x", "y"), gray_reader)
    assert images.indices_by_class() == ((1, 0, 3), (2,))


def test_counts_include_empty_classes():
    images = ImageSet(("a",), (2,), ("x", "y", "z"), gray_reader)
    assert images.class_counts() == (0, 0, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=("a", "b"), labels=(0,)), "2 ids but 1 labels"),
    (dict(labels=(0, 5)), r"labels \[5\] are outside 0..1"),
    (dict(classnames=()), "classnames is empty"),
    (dict(reader="not callable"), "reader must be a callable"),
])
def test_bad_image_sets_say_what_is_wrong(kwargs, match):
    fields = dict(ids=("a", "b"), labels=(0, 1), classnames=("x", "y"), reader=gray_reader)
    fields.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ImageSet(**fields)


def test_subset_out_of_range():
    with pytest.raises(IndexError, match="has 6 images"):
        make_set().subset([0, 6])


def test_folder_reader_reads_and_pickles(tmp_path):
    Image.new("RGB", (5, 5), (10, 20, 30)).save(tmp_path / "x.png")
    reader = pickle.loads(pickle.dumps(FolderReader(tmp_path)))
    images = ImageSet(("x.png",), (0,), ("thing",), reader)
    assert np.asarray(images.load_image(0))[0, 0].tolist() == [10, 20, 30]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        reader("nope.png")
