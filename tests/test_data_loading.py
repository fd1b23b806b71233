"""Transforms and the view loader: shapes, seeding per (seed, view, index), one decode per image."""
import numpy as np
import pytest
import torch
from PIL import Image

import safelib.data as D
from safelib.data.loading import ImageViews


class CountingReader:
    """A picklable reader that draws a distinct pattern per id and counts its calls (in this process)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image_id):
        self.calls += 1
        rng = np.random.default_rng(int(image_id))
        return Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8))


def make_set(n=6):
    return D.ImageSet([str(i) for i in range(n)], [i % 2 for i in range(n)], ("a", "b"), CountingReader(), "toy")


def collect(loader):
    images, indices = [], []
    for batch in loader:
        images.append(batch.images)
        indices.append(batch.indices)
    images, indices = torch.cat(images, dim=1), torch.cat(indices)
    return images[:, indices.argsort()]  # V x N x 3 x S x S in index order


def test_transforms_shapes_and_normalisation():
    picture = Image.new("RGB", (50, 30), (255, 255, 255))
    out = D.eval_transform(16)(picture)
    assert out.shape == (3, 16, 16)
    expected = (1 - torch.tensor(D.CLIP_MEAN)) / torch.tensor(D.CLIP_STD)
    assert torch.allclose(out[:, 8, 8], expected, atol=1e-4)
    assert D.train_transform(16)(picture).shape == (3, 16, 16)
    crop = D.train_transform(16).transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.interpolation.value == "bicubic"


@pytest.mark.parametrize("call, match", [
    (lambda: D.train_transform(0), "size must be a positive int"),
    (lambda: D.eval_transform(8, mean=(0.5, 0.5)), "need 3 values"),
    (lambda: D.eval_transform(8, std=(1, 0, 1)), "std must be positive"),
    (lambda: D.train_transform(8, scale=(0.8, 0.5)), "scale must satisfy"),
    (lambda: D.ViewSpec(8, views=-1), "views must be 'eval'"),
    (lambda: D.ViewSpec(8, views="train"), "views must be 'eval'"),
    (lambda: D.ViewSpec(8, seed=-2), "seed must be a non-negative"),
    (lambda: D.view_loader(make_set(), D.ViewSpec(8), batch_size=0), "batch_size must be"),
    (lambda: D.view_loader(make_set(), D.ViewSpec(8), num_workers=-1), "num_workers must be"),
])
def test_bad_settings_are_explained(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_batches_are_views_first_with_labels_and_indices():
    spec = D.ViewSpec(size=12, views=3, seed=5)
    batch = next(iter(D.view_loader(make_set(), spec, batch_size=4)))
    assert batch.images.shape == (3, 4, 3, 12, 12)
    assert batch.labels.tolist() == [0, 1, 0, 1] and batch.indices.tolist() == [0, 1, 2, 3]
    assert not torch.equal(batch.images[0], batch.images[1])  # views differ


def test_eval_mode_is_one_eval_view():
    images = make_set()
    for views in (0, "eval"):
        spec = D.ViewSpec(size=12, views=views)
        assert spec.is_eval and spec.num_views == 1
        batch = next(iter(D.view_loader(images, spec, batch_size=2)))
        assert batch.images.shape == (1, 2, 3, 12, 12)
        assert torch.equal(batch.images[0, 1], D.eval_transform(12)(images.load_image(1)))


def test_views_depend_only_on_seed_view_and_index():
    images = make_set()
    spec = D.ViewSpec(size=12, views=2, seed=3)
    a = collect(D.view_loader(images, spec, batch_size=4))
    b = collect(D.view_loader(images, spec, batch_size=1, shuffle=True))
    assert torch.equal(a, b)
    c = collect(D.view_loader(images, D.ViewSpec(size=12, views=2, seed=4), batch_size=4))
    assert not torch.equal(a, c)
    # view v of image i is reproducible on its own
    view = ImageViews(images, spec)[4][0][1]
    assert torch.equal(view, a[1, 4])


def test_views_are_the_same_with_worker_processes():
    images = make_set(8)
    spec = D.ViewSpec(size=12, views=2, seed=3)
    a = collect(D.view_loader(images, spec, batch_size=3))
    b = collect(D.view_loader(images, spec, batch_size=2, num_workers=2))
    assert torch.equal(a, b)


def test_each_image_is_decoded_once_per_pass_and_global_rng_is_untouched():
    images = make_set()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    list(D.view_loader(images, D.ViewSpec(size=12, views=4, seed=1), batch_size=4))
    assert images.reader.calls == len(images)  # 6 decodes for 24 views
    assert torch.equal(torch.rand(3), before)


def test_loader_options_pass_through_and_for_clip():
    class FakeClip:
        image_size, mean, std = 20, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    spec = D.ViewSpec.for_clip(FakeClip(), views=2, seed=9)
    assert (spec.size, spec.mean, spec.std, spec.views, spec.seed) == (20, (0.5,) * 3, (0.25,) * 3, 2, 9)
    loader = D.view_loader(make_set(), spec, batch_size=2, num_workers=0, pin_memory=True, drop_last=True)
    assert loader.pin_memory and loader.drop_last and loader.num_workers == 0
    empty = make_set().subset([])
    with pytest.raises(ValueError, match="is empty"):
        D.view_loader(empty, spec)


def test_view_seeds_are_distinct():
    seeds = {D.view_seed(s, v, i) for s in range(3) for v in range(4) for i in range(50)}
    assert len(seeds) == 3 * 4 * 50 and all(0 <= x < 2 ** 63 for x in seeds)
