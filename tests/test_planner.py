"""Cache planner, placed maps feeding SAFE's trainer, calibration, and few-shot ImageNet from its archive."""
import dataclasses
import io
import math
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from safelib.perf.calibration import calibrate, synthetic_attnpool
from safelib.data.imagenet_archive import archive_imageset, extract_images, index_train_archive
from safelib.data.sampling import sample_few_shot
from safelib.data.splits import read_class_folders
from safelib.methods.safe import SafeConfig, train_safe
from safelib.features.maps import DeviceMaps, StreamedMaps, place_maps
from safelib.perf import planner
from safelib.perf.planner import (GB, PROFILES, CachePlan, DeviceProfile, NoFit, PlanError, Rates, Workload,
                                  get_profile, plan_cache, predict_epoch, profile_here, try_plan_cache)

RATES = Rates(step_s=0.01, map_s=1e-3, gather_Bps={"device": 1e10, "pinned": 1e9, "memmap_warm": 5e8,
                                                     "memmap_cold": 1e8}, h2d_Bps=1e10, source="test")


# ------------------------------------------------------------------ planner
def test_t4_plan_for_16_shot_imagenet_k10():
    """The issue's case: 16-shot ImageNet, K=10 views of RN50 maps, on a Colab T4 (16 GB GPU, 12.7 GB RAM)."""
    workload = Workload.few_shot(1000, 16, 10)
    plan = plan_cache(workload, get_profile("colab-t4"))
    print("\n" + plan.summary())
    record = plan.as_record()
    # the sizes it compared: 16,000 x 10 x 2048*7*7 fp16 = 32.1 GB
    assert record["workload"]["map_bytes"] == 2048 * 7 * 7 * 2 == 200_704
    assert record["workload"]["cache_bytes"] == 16_000 * 10 * 200_704
    assert record["fits"]["device"]["budget"] < record["fits"]["device"]["needed"]   # 14.5 GB GPU budget
    assert record["fits"]["pinned"]["budget"] < record["fits"]["pinned"]["needed"]   # 10.4 GB RAM budget
    assert record["placement"] == "memmap"
    assert record["max_views"] == {"device": 4, "pinned": 3, "memmap": 21}
    predicted = record["predicted"]
    # one view of every image per epoch: 3.2 GB to the GPU, of which what the page cache misses from disk
    assert predicted["h2d_bytes"] == 16_000 * 200_704
    hit = PROFILES["colab-t4"].page_cache_bytes() / workload.cache_bytes
    assert predicted["page_cache_hit"] == pytest.approx(hit) and 0.3 < hit < 0.35
    assert predicted["disk_read_bytes"] == pytest.approx(16_000 * 200_704 * (1 - hit))
    # with the T4's nominal rates the disk, not the attnpool, sets the epoch time
    assert predicted["io_s"] > 3 * predicted["compute_s"]
    assert predicted["epoch_s"] == pytest.approx(max(predicted["io_s"], predicted["compute_s"]))
    assert record["rates"]["source"].startswith("nominal")
    assert record["predicted_run_s"] == pytest.approx(20 * predicted["epoch_s"])


def test_fewer_views_move_the_cache_into_gpu_memory():
    plan = plan_cache(Workload.few_shot(1000, 16, 4), get_profile("colab-t4"))
    assert plan.placement == "device"
    assert plan.predictions["device"]["epoch_s"] < plan.predictions["memmap"]["epoch_s"]
    assert plan.predictions["device"]["h2d_bytes"] == 0


def test_refuses_a_cache_that_fits_nowhere_with_the_numbers():
    tiny_disk = DeviceProfile("tiny", "cuda", gpu_bytes=8 * GB, ram_bytes=8 * GB, disk_bytes=20 * GB, cpus=2,
                              autocast_dtype="float16", nominal=RATES)
    with pytest.raises(PlanError, match=r"32\.11 GB.*memmap: needs 32\.11 GB, has 20\.00 GB.*At most 6 views"):
        plan_cache(Workload.few_shot(1000, 16, 10), tiny_disk)


def test_try_plan_cache_says_what_would_fit_where_plan_cache_refuses(monkeypatch):
    """A build machine with 1 GB of free disk and 8 GB of RAM (the probes profile_here reads): real work is
    refused with PlanError; try_plan_cache returns the same refusal as a NoFit a notebook can print."""
    monkeypatch.setattr(planner, "_free_disk", lambda cache_dir: 1 * GB)
    monkeypatch.setattr(planner, "_available_ram", lambda: 8 * GB)
    here = profile_here("cpu", rates=RATES)
    assert here.disk_bytes == 1 * GB
    workload = Workload.few_shot(1000, 16, 10)
    with pytest.raises(PlanError) as refused:
        plan_cache(workload, here, RATES)
    nofit = try_plan_cache(workload, here, RATES)
    assert isinstance(nofit, NoFit) and str(refused.value) == nofit.message
    assert nofit.max_views == 1                                    # one 3.2 GB view fits in 5.85 GB of RAM
    assert nofit.disk_short_bytes == pytest.approx(workload.cache_bytes - 1 * GB)
    summary = nofit.summary()
    assert "memmap  needs  32.11 GB of   1.00 GB: does not fit (max 0 views)" in summary
    assert ("the cache does not fit on here (cpu). At most 1 view of 16000 images fits; "
            "or free 31.11 GB more disk for the memmapped cache.") in summary
    # what it says would fit does: that many views, or the full cache with that much more disk
    assert isinstance(try_plan_cache(Workload.few_shot(1000, 16, nofit.max_views), here, RATES), CachePlan)
    roomier = dataclasses.replace(here, disk_bytes=here.disk_bytes + nofit.disk_short_bytes)
    assert plan_cache(workload, roomier, RATES).placement == "memmap"
    # a cache that fits comes back as the same plan plan_cache makes
    assert try_plan_cache(workload, PROFILES["colab-t4"]) == plan_cache(workload, PROFILES["colab-t4"])
    # not even one view: fewer images, and the disk still missing
    tiny = dataclasses.replace(here, ram_bytes=3 * GB)
    assert try_plan_cache(workload, tiny, RATES).what_would_fit() == (
        "At most 0 views of 16000 images fit: use fewer images; or free 31.11 GB more disk for the memmapped cache.")


def test_a_requested_placement_that_does_not_fit_is_refused():
    with pytest.raises(PlanError, match="device: needs"):
        plan_cache(Workload.few_shot(1000, 16, 10), PROFILES["colab-t4"], placement="device")
    with pytest.raises(ValueError, match="not available on cpu"):
        plan_cache(Workload.few_shot(10, 16, 2), PROFILES["cpu"], placement="pinned")


def test_prediction_adds_io_and_compute_on_a_cpu_and_overlaps_them_on_a_gpu():
    workload = Workload(images=100, views=2, map_shape=(8, 2, 2), batch_size=10)
    cpu = DeviceProfile("c", "cpu", gpu_bytes=0, ram_bytes=64 * GB, disk_bytes=GB, cpus=2, autocast_dtype=None)
    p = predict_epoch(workload, cpu, RATES, "device")
    assert p["compute_s"] == pytest.approx(10 * 0.01 + 100 * 1e-3)
    assert p["io_s"] == pytest.approx(100 * 64 / 1e10)
    assert p["epoch_s"] == pytest.approx(p["io_s"] + p["compute_s"])
    gpu = DeviceProfile("g", "cuda", gpu_bytes=GB, ram_bytes=64 * GB, disk_bytes=GB, cpus=2, autocast_dtype=None,
                        ram_reserve_bytes=0)
    q = predict_epoch(workload, gpu, RATES, "pinned")
    assert q["h2d_bytes"] == 100 * 64 and q["epoch_s"] == pytest.approx(max(q["io_s"], q["compute_s"]))


def test_configs_are_validated_with_what_would_be_right():
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        Workload(images=10, views=0)
    with pytest.raises(ValueError, match="a cpu profile has no GPU memory"):
        DeviceProfile("x", "cpu", gpu_bytes=GB, ram_bytes=GB, disk_bytes=GB, cpus=1, autocast_dtype=None)
    with pytest.raises(ValueError, match="gather_Bps must have exactly the keys"):
        Rates(step_s=0, map_s=1, gather_Bps={"device": 1}, h2d_Bps=0, source="x")
    with pytest.raises(ValueError, match="unknown device profile 'tpu'"):
        get_profile("tpu")


def test_workload_from_cached_maps():
    maps = [np.zeros((5, 8, 3, 3), np.float16)] * 3
    w = Workload.from_maps(maps)
    assert (w.views, w.images, w.map_shape, w.map_bytes) == (3, 5, (8, 3, 3), 8 * 9 * 2)
    assert Workload.from_maps(torch.zeros(2, 4, 8, 3, 3)).bytes_per_value == 4


# ------------------------------------------------------------------ placed maps feed the trainer
@pytest.fixture(scope="module")
def small_task():
    g = torch.Generator().manual_seed(0)
    pool = synthetic_attnpool((64, 2, 2))
    views, n, classes = 3, 20, 4
    dense = torch.rand(views, n, 64, 2, 2, generator=g).half()
    labels = torch.arange(n) % classes
    text = F.normalize(torch.randn(pool.c_proj.out_features, classes, generator=g), dim=0)
    return pool, dense, labels, text


def _write_views(tmp_path, dense):
    paths = []
    for v, view in enumerate(dense):
        path = tmp_path / f"view{v}.npy"
        np.save(path, view.numpy())
        paths.append(path)
    return [np.load(p, mmap_mode="r") for p in paths]


@pytest.mark.parametrize("placement", ["device", "memmap"])
def test_every_placement_trains_exactly_like_the_plain_cache(tmp_path, small_task, placement):
    pool, dense, labels, text = small_task
    config = SafeConfig(epochs=2, batch_size=6, lr=1e-3)
    plain = train_safe(pool, _write_views(tmp_path, dense), labels, text, 50.0, config, seed=3)
    placed = place_maps(_write_views(tmp_path, dense), placement, "cpu")
    assert placed.placement == placement and placed.shape == tuple(dense.shape)
    trained = train_safe(pool, placed, labels, text, 50.0, config, seed=3)
    assert trained.losses == pytest.approx(plain.losses, rel=1e-6)
    for a, b in zip(trained.attnpool.parameters(), plain.attnpool.parameters()):
        torch.testing.assert_close(a, b)


def test_streamed_reader_reads_ahead_the_same_batches(small_task, tmp_path):
    _, dense, _, _ = small_task
    maps = _write_views(tmp_path, dense)
    order, views = torch.randperm(20), torch.randint(3, (20,))
    ahead = list(StreamedMaps(maps, prefetch=2, pin=False).epoch_batches(order, views, 7, torch.device("cpu")))
    inline = list(DeviceMaps(dense).epoch_batches(order, views, 7, torch.device("cpu")))
    assert [len(r) for r, _ in ahead] == [7, 7, 6]
    for (r1, b1), (r2, b2) in zip(ahead, inline):
        assert torch.equal(r1, r2) and b1.dtype == torch.float32
        torch.testing.assert_close(b1, b2, rtol=0, atol=0)
        torch.testing.assert_close(b1, dense[views[r1], r1].float(), rtol=0, atol=0)


def _readers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "safelib-map-reader" and t.is_alive()]


def test_streamed_reader_stops_cleanly_when_training_stops_early(small_task, tmp_path):
    maps = _write_views(tmp_path, small_task[1])
    assert _readers_alive() == []
    batches = StreamedMaps(maps, prefetch=1, pin=False).epoch_batches(torch.arange(20), torch.zeros(20, dtype=torch.long),
                                                                      2, torch.device("cpu"))
    next(batches)
    assert len(_readers_alive()) == 1
    time.sleep(0.3)  # let the reader fill its queue and block on the next put
    batches.close()  # the reader thread must not hang on its full queue
    deadline = time.monotonic() + 5.0
    while _readers_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _readers_alive() == [], "the map reader thread outlived the training loop"


def test_pinned_needs_cuda(small_task):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="'pinned' needs CUDA"):
        place_maps(small_task[1], "pinned")


# ------------------------------------------------------------------ calibration
def test_calibration_measures_positive_rates_and_plans_with_them(tmp_path):
    rates = calibrate("cpu", map_shape=(64, 2, 2), batch_size=8, temp_dir=tmp_path, sample_bytes=2e5, repeats=1)
    assert rates.source.startswith("measured by calibrate() on cpu")
    assert rates.map_s > 0 and rates.step_s >= 0
    assert all(v > 0 and math.isfinite(v) for v in rates.gather_Bps.values())
    assert list(tmp_path.iterdir()) == []  # the sample file is gone
    profile = DeviceProfile("here", "cpu", gpu_bytes=0, ram_bytes=8 * GB, disk_bytes=GB, cpus=2,
                            autocast_dtype=None, ram_reserve_bytes=0)
    plan = plan_cache(Workload(images=100, views=3, map_shape=(64, 2, 2), batch_size=8), profile, rates)
    assert isinstance(plan, CachePlan) and plan.placement == "device"
    assert plan.as_record()["rates"]["source"] == rates.source


# ------------------------------------------------------------------ ImageNet archive
WNIDS = ("n01440764", "n01443537", "n01484850")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_archive(tmp_path):
    """A tar of per-class tars, as ILSVRC2012_img_train.tar is distributed; also unpacked, for comparison."""
    archive, unpacked = tmp_path / "ILSVRC2012_img_train.tar", tmp_path / "unpacked"
    with tarfile.open(archive, "w") as outer:
        for k, wnid in enumerate(WNIDS):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for j in range(6 + k):
                    data = _jpeg(100 * k + j)
                    _add(inner, f"{wnid}_{j}.JPEG", data)
                    (unpacked / wnid).mkdir(parents=True, exist_ok=True)
                    (unpacked / wnid / f"{wnid}_{j}.JPEG").write_bytes(data)
            _add(outer, f"{wnid}.tar", inner_bytes.getvalue())
    return archive, unpacked


def test_archive_set_matches_the_unpacked_folder(fake_archive, tmp_path):
    archive, unpacked = fake_archive
    index = index_train_archive(archive, tmp_path / "index.json")
    from_archive = archive_imageset(index)
    from_folder = read_class_folders(unpacked, WNIDS, from_archive.classnames, "imagenet/train")
    assert from_archive.ids == from_folder.ids and from_archive.labels == from_folder.labels
    assert from_archive.classnames[:2] == ("tench", "goldfish")
    i = from_archive.ids.index("n01443537/n01443537_3.JPEG")
    assert np.array_equal(np.asarray(from_archive.load_image(i)), np.asarray(from_folder.load_image(i)))
    # the saved index is reused (same archive size), not rebuilt
    assert index_train_archive(archive, tmp_path / "index.json").members == index.members


def test_extract_only_the_sampled_shots(fake_archive, tmp_path):
    archive, unpacked = fake_archive
    index = index_train_archive(archive)
    shots, val = sample_few_shot(archive_imageset(index), 2, seed=1)
    dest = tmp_path / "imagenet/images/train"
    paths = extract_images(index, [shots, val], dest)
    on_disk = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.JPEG"))
    assert on_disk == sorted(set(shots.ids) | set(val.ids)) and len(on_disk) == len(paths) == 3 * (2 + 2)
    for image_id in on_disk:
        assert (dest / image_id).read_bytes() == (unpacked / image_id).read_bytes()
    # the same sample as drawn from the fully unpacked folder (the sampler sees the same pool)
    full = read_class_folders(unpacked, WNIDS, shots.classnames, "imagenet/train")
    assert sample_few_shot(full, 2, seed=1)[0].ids == shots.ids
    with pytest.raises(KeyError, match="not in"):
        extract_images(index, [["n01440764/missing.JPEG"]], dest)


@pytest.mark.parametrize("placement", ["device", "memmap"])
def test_bytes_an_epoch_moves_are_what_the_planner_predicts(tmp_path, small_task, placement):
    """The deterministic half of the prediction: bytes per epoch (the seconds are a benchmark's job)."""
    pool, dense, labels, text = small_task
    placed = place_maps(_write_views(tmp_path, dense), placement, "cpu")
    train_safe(pool, placed, labels, text, 50.0, SafeConfig(epochs=3, batch_size=6), seed=0)
    workload = Workload.from_maps(placed, batch_size=6)
    profile = DeviceProfile("c", "cpu", gpu_bytes=0, ram_bytes=GB, disk_bytes=GB, cpus=2, autocast_dtype=None,
                            ram_reserve_bytes=0)
    predicted = predict_epoch(workload, profile, RATES, placement)
    assert placed.bytes_gathered == 3 * predicted["gather_bytes"] == 3 * 20 * 64 * 2 * 2 * 2


def test_plan_for_maps_measures_once_and_places_a_cache_entry(tmp_path, small_task):
    from safelib.features.cache import CacheWriter
    from safelib.perf.calibration import _MEASURED, plan_for_maps

    _, dense, _, _ = small_task
    writer = CacheWriter(tmp_path / "cache", {"kind": "dense", "test": 1}, rows=20, item_shape=(64, 2, 2), views=3)
    writer.write(dense)
    entry = writer.finish()
    plan = plan_for_maps(entry, "cpu", batch_size=6, epochs=2, cache_dir=tmp_path)
    assert plan.placement == "device" and plan.workload.cache_bytes == 3 * 20 * 64 * 4 * 2
    assert plan.as_record()["rates"]["source"].startswith("measured by calibrate()")
    assert plan_for_maps(entry, "cpu", batch_size=6, cache_dir=tmp_path).rates is plan.rates  # measured once
    assert len([k for k in _MEASURED if k[1] == (64, 2, 2)]) == 1
    placed = place_maps(entry, plan, "cpu")
    torch.testing.assert_close(placed[2], dense[2])
