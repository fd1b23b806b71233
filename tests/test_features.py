"""Dense-map extraction and the on-disk cache: hits, misses, damage, resumption."""
import json
import os

import numpy as np
import pytest
import torch

import safelib as sl
from safelib.features import cache as cache_mod
from safelib.features.cache import CacheError, CacheWriter, cache_key, find_entry, open_entry
from safelib.features.maps import DenseMaps
from safelib.features.extract import cache_features, dense_features, feature_cache_fields, pooled_features, tensor_batches


@pytest.fixture(scope="module")
def clip(make_tiny_clip):
    return make_tiny_clip()


def _fields(clip, n, views=2, **overrides):
    args = dict(kind="dense", dataset="toy", split="train", ids=[f"img{i}" for i in range(n)],
                transform="test", views=views, view_seed=1)
    args.update(overrides)
    return feature_cache_fields(clip, **args)


def _images(n, views=2, seed=0):
    return torch.randn(views, n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_dense_features_match_open_clip_and_pool_to_encode_image(clip):
    images = _images(5, views=1)[0]
    dense = dense_features(clip, images, batch_size=2)
    assert dense.shape == (5, clip.dense_channels, clip.grid, clip.grid)
    with torch.no_grad():
        reference = clip.model.encode_image(images)
    torch.testing.assert_close(pooled_features(clip.attnpool, dense), reference, rtol=1e-4, atol=1e-5)


def test_dense_features_rejects_bad_input(clip):
    with pytest.raises(ValueError, match="N x 3 x S x S"):
        dense_features(clip, torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="batch_size"):
        dense_features(clip, torch.zeros(1, 3, 64, 64), batch_size=0)
    with pytest.raises(ValueError, match="autocast_dtype.*valid"):
        dense_features(clip, torch.zeros(1, 3, 64, 64), autocast_dtype="float8")


def test_key_changes_with_every_field(clip):
    base = _fields(clip, 4)
    keys = {cache_key(base)}
    for change in [dict(kind="pooled"), dict(dataset="other"), dict(split="val"), dict(views=3),
                   dict(view_seed=2), dict(transform="other"), dict(autocast_dtype="float16"),
                   dict(ids=["img0", "img1", "img2", "imgX"])]:
        keys.add(cache_key(_fields(clip, 4, **change)))
    keys.add(cache_key({**base, "weights": "openai"}))
    keys.add(cache_key({**base, "model": "RN50"}))
    keys.add(cache_key({**base, "image_size": 224}))
    assert len(keys) == 12
    with pytest.raises(ValueError, match="kind.*valid: dense, pooled"):
        _fields(clip, 4, kind="maps")
    with pytest.raises(TypeError, match="JSON"):
        cache_key({"transform": object()})


def test_miss_builds_then_hit_reads_without_the_trunk(clip, tmp_path, monkeypatch):
    views = _images(5)
    fields = _fields(clip, 5)
    entry = cache_features(clip, fields, tensor_batches(views, batch_size=2), tmp_path, progress=False)
    assert entry.num_views == 2 and entry.num_rows == 5 and entry[0].dtype == np.float16
    expected = dense_features(clip, views[1])
    torch.testing.assert_close(entry.rows(1, slice(None)).float(), expected, rtol=2e-3, atol=2e-3)
    assert isinstance(entry[0], np.memmap)

    def no_trunk(*_a, **_k):
        raise AssertionError("a cache hit must not run the trunk")

    monkeypatch.setattr(type(clip), "trunk", no_trunk)
    again = cache_features(clip, fields, tensor_batches(views), tmp_path, progress=False)
    np.testing.assert_array_equal(again[1], entry[1])


def test_pooled_cache_holds_encode_image_features(clip, tmp_path):
    views = _images(3, views=1)
    entry = cache_features(clip, _fields(clip, 3, views=1, kind="pooled"), tensor_batches(views), tmp_path,
                           progress=False)
    assert entry.item_shape == (clip.embed_dim,)
    with torch.no_grad():
        reference = clip.model.encode_image(views[0])
    torch.testing.assert_close(entry.to_tensor(0).float(), reference, rtol=2e-3, atol=2e-3)


def _build(clip, tmp_path, n=5):
    fields = _fields(clip, n)
    return fields, cache_features(clip, fields, tensor_batches(_images(n), 2), tmp_path, progress=False)


def test_truncated_view_file_is_detected_and_rebuilt(clip, tmp_path):
    fields, entry = _build(clip, tmp_path)
    before = np.array(entry[0])
    target = entry.path / "view_000.npy"
    del entry
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) - 100)
    assert find_entry(tmp_path, fields) is None
    with pytest.raises(CacheError, match="corrupt"):
        open_entry(tmp_path / cache_key(fields), fields)
    rebuilt = cache_features(clip, fields, tensor_batches(_images(5), 2), tmp_path, progress=False)
    np.testing.assert_array_equal(rebuilt[0], before)


def test_flipped_bytes_fail_the_checksum(clip, tmp_path):
    fields, entry = _build(clip, tmp_path)
    target = entry.path / "view_001.npy"
    del entry
    data = bytearray(target.read_bytes())
    data[-7] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        open_entry(target.parent, fields)
    assert open_entry(target.parent, fields, verify="size").num_rows == 5  # a shape check cannot see it
    with pytest.raises(ValueError, match="verify.*valid"):
        open_entry(target.parent, fields, verify="fast")


def test_wrong_key_is_a_mismatch_and_is_rebuilt(clip, tmp_path):
    fields, entry = _build(clip, tmp_path)
    other = _fields(clip, 5, view_seed=7)
    os.replace(entry.path, tmp_path / cache_key(other))  # an entry filed under another key
    with pytest.raises(CacheError, match="mismatch"):
        open_entry(tmp_path / cache_key(other), other)
    assert find_entry(tmp_path, other) is None
    rebuilt = cache_features(clip, other, tensor_batches(_images(5, seed=1), 2), tmp_path, progress=False)
    assert rebuilt.fields["view_seed"] == 7


def test_missing_marker_is_incomplete(clip, tmp_path):
    fields, entry = _build(clip, tmp_path)
    (entry.path / cache_mod.MARKER).unlink()
    with pytest.raises(CacheError, match="incomplete"):
        open_entry(entry.path, fields)


def test_interrupted_write_resumes_from_last_checksummed_chunk(clip, tmp_path):
    n, views = 7, _images(7)
    fields = _fields(clip, n)
    item = (clip.dense_channels, clip.grid, clip.grid)
    writer = CacheWriter(tmp_path, fields, rows=n, item_shape=item, views=2, chunk_rows=2)
    writer.write(dense_features(clip, views[:, :3].flatten(0, 1)).unflatten(0, (2, 3)))  # then "crash"
    del writer
    assert find_entry(tmp_path, fields) is None  # no marker: never used
    progress = json.loads((tmp_path / cache_key(fields) / cache_mod.PROGRESS).read_text())
    assert progress["rows"] == 2  # rows 0-1 are one closed chunk; row 2 sits in an open one

    seen = []

    def batches(start):
        seen.append(start)
        return tensor_batches(views, 2)(start)

    entry = cache_features(clip, fields, batches, tmp_path, progress=False)
    assert seen == [2]
    full = dense_features(clip, views.flatten(0, 1)).unflatten(0, (2, n))
    torch.testing.assert_close(entry.to_tensor().float(), full, rtol=2e-3, atol=2e-3)


def test_resume_distrusts_a_damaged_partial_write(clip, tmp_path):
    fields = _fields(clip, 4)
    item = (clip.dense_channels, clip.grid, clip.grid)
    writer = CacheWriter(tmp_path, fields, rows=4, item_shape=item, views=2, chunk_rows=2)
    writer.write(torch.ones(2, 2, *item))
    del writer
    partial = tmp_path / cache_key(fields) / "view_000.npy.partial"
    data = bytearray(partial.read_bytes())
    data[200] ^= 0xFF
    partial.write_bytes(bytes(data))
    assert CacheWriter(tmp_path, fields, rows=4, item_shape=item, views=2, chunk_rows=2).start_row == 0


def test_writer_rejects_bad_rows(clip, tmp_path):
    item = (4, 2, 2)
    writer = CacheWriter(tmp_path, {"a": 1}, rows=3, item_shape=item, views=2)
    with pytest.raises(ValueError, match="views x B x item"):
        writer.write(torch.zeros(1, 2, *item))
    with pytest.raises(ValueError, match="non-finite"):
        writer.write(torch.full((2, 1, *item), 1e6))  # overflows fp16
    with pytest.raises(ValueError, match="overflows"):
        writer.write(torch.zeros(2, 4, *item))
    with pytest.raises(RuntimeError, match="finish"):
        writer.finish()
    with pytest.raises(ValueError, match="dtype.*valid"):
        CacheWriter(tmp_path, {"a": 2}, rows=3, item_shape=item, dtype="int8")
    with pytest.raises(ValueError, match="rows >= 1"):
        CacheWriter(tmp_path, {"a": 3}, rows=0, item_shape=item)


def test_batches_must_cover_the_declared_images(clip, tmp_path):
    with pytest.raises(ValueError, match="declares 5"):
        cache_features(clip, _fields(clip, 5), tensor_batches(_images(4), 2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="2 views"):
        cache_features(clip, _fields(clip, 3), tensor_batches(_images(3, views=1), 2), tmp_path, progress=False)


class _Pictures:
    """A picklable reader of generated pictures; ``broken`` ids raise, like an unreadable file."""

    def __init__(self, broken=()):
        self.broken = set(broken)

    def __call__(self, image_id):
        from PIL import Image
        if image_id in self.broken:
            raise OSError(f"cannot read {image_id}")
        rng = np.random.default_rng(int(image_id.removeprefix("pic")))
        return Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))


def _image_set(reader, n=6):
    return sl.ImageSet(ids=[f"pic{i}" for i in range(n)], labels=[i % 2 for i in range(n)],
                       classnames=("a", "b"), reader=reader, name="pictures/train")


def test_image_sets_cache_their_augmented_views_and_resume_identically(clip, tmp_path, monkeypatch):
    from safelib.data import ImageViews, ViewSpec
    from safelib.features.extract import cache_image_features

    fresh = cache_image_features(clip, _image_set(_Pictures()), tmp_path / "a", split="train", views=2, seed=3,
                                 batch_size=2, progress=False)
    spec = ViewSpec.for_clip(clip, views=2, seed=3)
    views_of_4 = ImageViews(_image_set(_Pictures()), spec)[4][0]                   # 2 x 3 x S x S
    torch.testing.assert_close(fresh.rows(1, [4]).float(), dense_features(clip, views_of_4[1:]), rtol=2e-3, atol=2e-3)

    row_bytes = clip.dense_channels * clip.grid ** 2 * 2
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 2 * row_bytes)                  # chunks of 2 images
    with pytest.raises(OSError, match="pic5"):
        cache_image_features(clip, _image_set(_Pictures(broken={"pic5"})), tmp_path / "b", split="train",
                             views=2, seed=3, batch_size=2, progress=False)
    resumed = cache_image_features(clip, _image_set(_Pictures()), tmp_path / "b", split="train", views=2, seed=3,
                                   batch_size=2, progress=False)
    assert resumed.manifest["chunk_rows"] == 2
    for view in range(2):
        np.testing.assert_array_equal(resumed[view], fresh[view])
    eval_entry = cache_image_features(clip, _image_set(_Pictures()), tmp_path / "a", split="test", progress=False)
    assert eval_entry.num_views == 1 and eval_entry.path != fresh.path


def test_every_damaged_part_of_an_entry_is_named(clip, tmp_path):
    fields, entry = _build(clip, tmp_path)
    path = entry.path
    del entry
    manifest = json.loads((path / cache_mod.MANIFEST).read_text())
    marker = json.loads((path / cache_mod.MARKER).read_text())

    def damaged(file, content):
        (path / file).write_text(content if isinstance(content, str) else json.dumps(content))
        try:
            with pytest.raises(CacheError) as caught:
                open_entry(path, fields)
            return caught.value.reason, str(caught.value)
        finally:
            (path / cache_mod.MANIFEST).write_text(json.dumps(manifest))
            (path / cache_mod.MARKER).write_text(json.dumps(marker))

    assert damaged(cache_mod.MANIFEST, "{not json")[0] == "incomplete"
    reason, message = damaged(cache_mod.MANIFEST, {**manifest, "format_version": 0})
    assert reason == "mismatch" and "format version 0" in message
    reason, message = damaged(cache_mod.MANIFEST, {**manifest, "rows": 4})
    assert reason == "corrupt" and "manifest says" in message
    assert damaged(cache_mod.MARKER, "{")[0] == "corrupt"
    reason, message = damaged(cache_mod.MARKER, {"checksums": [s[:-1] for s in marker["checksums"]]})
    assert reason == "corrupt" and "checksums for" in message
    np.save(path / "view_001.npy", np.zeros(3))  # not even the right kind of array
    with pytest.raises(CacheError, match="manifest says"):
        open_entry(path, fields, verify="none")


def test_tensor_rows_and_all_views_in_ram(clip, tmp_path):
    _, entry = _build(clip, tmp_path)
    rows = entry.rows(0, torch.tensor([3, 1]))
    np.testing.assert_array_equal(rows.numpy(), entry[0][[3, 1]])
    assert len(entry) == 2 and entry.to_tensor().shape == (2, 5, *entry.item_shape)


def test_autocast_extraction_stays_close(clip):
    images = _images(2, views=1)[0]
    exact = dense_features(clip, images)
    fast = dense_features(clip, images, autocast_dtype="bfloat16")
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=0.1, atol=0.1)


def test_too_many_batches_or_bad_views_are_refused(clip, tmp_path):
    with pytest.raises(ValueError, match="more than the 3 images"):
        cache_features(clip, _fields(clip, 3), tensor_batches(_images(4), 2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="K x N x 3 x S x S"):
        tensor_batches(torch.zeros(2, 3, 64, 64))


def test_a_build_waits_for_another_builder_of_the_same_entry(clip, tmp_path):
    import threading

    from safelib.features.cache import entry_lock

    fields = _fields(clip, 3)
    result = {}
    with entry_lock(tmp_path, fields):  # another process building this entry
        worker = threading.Thread(target=lambda: result.setdefault(
            "entry", cache_features(clip, fields, tensor_batches(_images(3), 2), tmp_path, progress=False)))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and find_entry(tmp_path, fields) is None
    worker.join(timeout=30)
    assert result["entry"].num_rows == 3


def test_cache_key_changes_with_the_weights_not_only_their_name(make_tiny_clip):
    """A re-trained model that keeps its name ("shipped", a path) must not be served the old maps."""
    from safelib.features.cache import cache_key
    from safelib.features.extract import feature_cache_fields

    def key(clip):
        return cache_key(feature_cache_fields(clip, kind="dense", dataset="d", split="train", ids=["x"],
                                              transform="t", views=1, view_seed=0))

    same, retrained = make_tiny_clip(), make_tiny_clip()
    assert key(same) == key(make_tiny_clip())
    with torch.no_grad():
        retrained.model.visual.layer4[0].conv1.weight.mul_(1.5)
    assert retrained.pretrained == same.pretrained and key(retrained) != key(same)


# --- DenseMaps: one type for every form dense maps come in ---------------------------------------

def _entry_of(tmp_path, maps: torch.Tensor):
    writer = CacheWriter(tmp_path, {"maps": 1}, rows=maps.shape[1], item_shape=tuple(maps.shape[2:]),
                         views=maps.shape[0])
    writer.write(maps)
    return writer.finish()


def test_dense_maps_take_every_form_and_check_it_once(tmp_path):
    dense = torch.rand(2, 5, 8, 2, 2, generator=torch.Generator().manual_seed(0)).half()
    entry = _entry_of(tmp_path, dense)
    forms = {"tensor": dense, "cache entry": entry, "memmaps": entry.view_arrays, "arrays": [v.numpy() for v in dense],
             "tensors": list(dense), "5-D array": dense.numpy()}
    for name, form in forms.items():
        maps = DenseMaps.of(form)
        assert DenseMaps.of(maps) is maps
        assert (maps.shape, maps.num_views, maps.num_images, maps.map_shape, maps.dtype) == \
               ((2, 5, 8, 2, 2), 2, 5, (8, 2, 2), torch.float16), name
        assert maps.map_bytes == 8 * 2 * 2 * 2 and maps.nbytes == 2 * 5 * maps.map_bytes
        assert len(maps) == 2 and torch.equal(maps[1], dense[1]) and torch.equal(maps.view(0), dense[0]), name
    one = DenseMaps.of(dense[0])  # N x C x H x W: one view, as val and test carry
    assert one.shape == (1, 5, 8, 2, 2) and torch.equal(one.eval_view(), dense[0])
    with pytest.raises(ValueError, match="exactly one eval view; got 2"):
        DenseMaps.of(dense).eval_view()
    with pytest.raises(ValueError, match="views x N x C x H x W"):
        DenseMaps.of(dense[0, 0])
    with pytest.raises(ValueError, match="share one N x C x H x W shape"):
        DenseMaps.of([dense[0].numpy(), dense[1, :3].numpy()])
    with pytest.raises(TypeError, match="CacheEntry"):
        DenseMaps.of("maps")


def test_a_cache_entry_view_is_wrapped_not_read(tmp_path):
    entry = _entry_of(tmp_path, torch.rand(2, 5, 8, 2, 2).half())
    maps = DenseMaps.of(entry)
    assert maps.placement == "memmap" and maps.path == entry.path
    assert maps.view(1).data_ptr() == entry[1].ctypes.data  # the memmap's own pages: nothing copied
    placed = maps.placed("device")
    assert placed.placement == "device" and placed.path == entry.path and torch.equal(placed.view(1), maps.view(1))
