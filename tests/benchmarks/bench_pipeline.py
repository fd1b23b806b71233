"""SAFE's whole pipeline at (scaled) 16-shot ImageNet size, K=10, measured side by side in one run.

Prints, for one device:

    1. decode        JPEG decode images/s; the loader's decode-once K-view rate vs decoding per view
    2. trunk         random-weight RN50 trunk images/s: fp32, and fp16/bf16 autocast + channels_last
    3. SAFE epoch    train_safe on synthetic fp16 maps shaped like 16-shot ImageNet (2048x7x7, K=10),
                     written in the cache format; fast pooling vs open_clip's AttentionPool2d
    4. planner       calibrate() + plan_cache() prediction against the measured epochs, per placement
    5. whole run     decode + K-view trunk pass + E epochs, over the floor of one trunk pass over the images

On a CPU the image count is divided by --scale (default 100: 10 classes x 16 shots = 160 images,
so 1,600 cached maps, 321 MB); ``--device cuda --scale 1`` is the full size (16,000 images, 32.1 GB).
Trunk and decode rates are measured on a few batches and extrapolated; the SAFE epochs are run whole.
Ratios, not timed asserts: shared machines are noisy.

    python tests/benchmarks/bench_pipeline.py [--device cpu] [--scale 100] [--epochs 20]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import safelib as sl
import safelib.methods.safe as safe_module
from safelib.features.cache import CacheWriter
from safelib.perf.calibration import calibrate
from safelib.data import ImageSet, ViewSpec
from safelib.data.loading import ImageViews
from safelib.methods.safe import SafeConfig, train_safe
from safelib.features.maps import place_maps
from safelib.perf.planner import GB, Workload, plan_cache, profile_here, try_plan_cache

FULL_CLASSES, SHOTS, VIEWS = 1000, 16, 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time counts every thread of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------ 1. decode
def imagenet_like_jpegs(count: int) -> list[bytes]:
    """JPEGs of ImageNet's typical size (500 x 375, quality 90) cut from scikit-image's photographs."""
    from skimage import data as photos

    sources = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket()]
    out = []
    for i in range(count):
        picture = Image.fromarray(sources[i % len(sources)]).resize((500 + i % 7, 375), Image.BICUBIC)
        buf = io.BytesIO()
        picture.transpose(Image.FLIP_LEFT_RIGHT if i % 2 else Image.ROTATE_180).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class BytesReader:
    def __init__(self, blobs: list[bytes]):
        self.blobs = blobs

    def __call__(self, image_id: str) -> Image.Image:
        image = Image.open(io.BytesIO(self.blobs[int(image_id)]))
        image.load()
        return image


def bench_decode(count: int, size: int) -> dict:
    blobs = imagenet_like_jpegs(count)
    images = ImageSet(tuple(map(str, range(count))), (0,) * count, ("x",), BytesReader(blobs), "jpegs")
    for spec in (ViewSpec(size, views=VIEWS, seed=0), ViewSpec(size, views=0)):  # warm-up: lazy imports, caches
        ImageViews(images, spec)[0]
    # the four ways interleaved image by image, so that load drifting on a shared machine hits all alike
    once = ImageViews(images, ViewSpec(size, views=VIEWS, seed=0))
    one_view = ImageViews(images, ViewSpec(size, views=1, seed=0))
    evaluation = ImageViews(images, ViewSpec(size, views=0))
    ways = {
        "decode": lambda i: images.load_image(i),
        "k_views_decode_once": lambda i: once[i],
        # what a loader without decode-once does: decode again for every view
        "k_views_decode_each": lambda i: [one_view[i] for _ in range(VIEWS)],
        "eval_view": lambda i: evaluation[i],
    }
    seconds = {key: [0.0, 0.0] for key in ways}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker process
    try:
        for i in range(count):
            for key, way in ways.items():
                wall, cpu = timed(lambda: way(i), torch.device("cpu"))
                seconds[key][0] += wall
                seconds[key][1] += cpu
    finally:
        torch.set_num_threads(threads)
    out = {key: (count / wall, count / cpu) for key, (wall, cpu) in seconds.items()}
    out["jpeg_kB"] = statistics.mean(map(len, blobs)) / 1e3
    return out


# ------------------------------------------------------------------ 2. trunk
def trunk_modes(device: torch.device) -> list[tuple[str, str | None, bool]]:
    modes = [("fp32", None, False), ("fp32 channels_last", None, True)]
    if device.type == "cuda":
        modes.append(("fp16 autocast + channels_last", "float16", True))
        if torch.cuda.is_bf16_supported():
            modes.append(("bf16 autocast + channels_last", "bfloat16", True))
    else:
        modes.append(("bf16 autocast + channels_last", "bfloat16", True))
    return modes


def bench_trunk(clip, device: torch.device, batch: int, repeats: int) -> dict:
    """images/s (wall, CPU) per mode; modes interleaved round by round so load drift hits all alike."""
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)
    modes = trunk_modes(device)
    times = {label: [] for label, _, _ in modes}
    for round_ in range(repeats + 1):
        for label, dtype, channels_last in modes:
            clip.visual.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
            autocast = torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()

            def step():
                with autocast:
                    clip.trunk(x)

            if round_ == 0:
                step()  # warm-up
                sync(device)
            times[label].append(timed(step, device))
    clip.visual.to(memory_format=torch.contiguous_format)
    return {label: (batch / statistics.median(t[0] for t in ts[1:]), batch / statistics.median(t[1] for t in ts[1:]))
            for label, ts in times.items()}


# ------------------------------------------------------------------ 3. SAFE epochs on cached maps
def synthetic_cache(root: str, images: int, views: int, shape: tuple[int, int, int], device: torch.device,
                    seed: int = 0):
    """fp16 maps like a trunk's (non-negative: layer4 ends in a ReLU), written in the cache format.

    Drawn on ``device`` and handed over as fp16 numpy, so the full 32 GB is written at disk speed."""
    writer = CacheWriter(root, {"kind": "dense", "synthetic": True, "images": images, "views": views},
                         rows=images, item_shape=shape, views=views)
    g = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, images, 256):
        b = min(256, images - start)
        maps = torch.randn(views, b, *shape, generator=g, device=device).relu_().half()
        writer.write(maps.cpu().numpy())
    return writer.finish(verify="size")


def safe_epoch_seconds(attnpool, maps, labels, text, batch: int, epochs: int,
                       open_clip_pool: bool = False, feature_augment: str = "none") -> tuple[float, float]:
    """(wall, CPU) seconds per epoch of ``train_safe`` (CPU time: all threads, the reader's too).

    feature_augment: SafeConfig's option (views drawn from the maps while training)."""
    config = SafeConfig(epochs=epochs, batch_size=batch, lr=1e-5, feature_augment=feature_augment)
    original = safe_module.attention_pool
    if open_clip_pool:  # same trainer, pooling swapped for open_clip's full self-attention forward
        safe_module.attention_pool = lambda pool, x: pool(x)
    try:
        cpu = time.process_time()
        result = train_safe(attnpool, maps, labels, text, 100.0, config, seed=1)
        cpu = time.process_time() - cpu
    finally:
        safe_module.attention_pool = original
    return result.seconds / epochs, cpu / epochs


# ------------------------------------------------------------------ 6. against the limits
def trunk_flops(clip) -> float:
    """FLOPs of one image through the frozen trunk (torch's FLOP counter: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, clip.image_size, clip.image_size, device=clip.device)
    with FlopCounterMode(display=False) as counter:
        clip.trunk(x)
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n matrix product: the practical ceiling for the trunk's convolutions."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(timed(lambda: a @ b, device)[0] for _ in range(repeats + 1))
    return 2 * n ** 3 / seconds


def copy_rate(device: torch.device, megabytes: int, repeats: int) -> float:
    """Bytes/s of a large on-device copy (read + write counted once each): the memory-bandwidth ceiling."""
    x = torch.empty(megabytes * 2 ** 20 // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    seconds = statistics.median(timed(lambda: y.copy_(x), device)[0] for _ in range(repeats + 1))
    return 2 * x.numel() * 2 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=None, help="divide 16,000 images by this (CPU default 100)")
    parser.add_argument("--batch", type=int, default=32, help="SAFE batch size")
    parser.add_argument("--epochs", type=int, default=SafeConfig().epochs, help="epochs of the whole-run estimate "
                        "(SAFE's default)")
    parser.add_argument("--measure-epochs", type=int, default=2, help="SAFE epochs run per measurement")
    parser.add_argument("--decode-images", type=int, default=16)
    parser.add_argument("--trunk-batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sample-mb", type=float, default=64, help="calibration sample size")
    parser.add_argument("--calibrate-repeats", type=int, default=5, help="timed steps per calibrate() measurement")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic cache is written (default: a tmp dir)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps CPU-second measurements free of OpenMP spin-waiting on a busy machine)")
    parser.add_argument("--skip-open-clip", action="store_true", help="skip the open_clip pooling epoch")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or (1 if device.type == "cuda" else 100)
    classes = FULL_CLASSES // scale
    images = classes * SHOTS
    trunk_batch = args.trunk_batch or (128 if device.type == "cuda" else 8)
    wall = time.perf_counter()

    print(f"# SAFE pipeline benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}); {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}")
    print(f"workload: {classes} classes x {SHOTS} shots = {images} images, K={VIEWS} views of RN50 maps "
          f"2048x7x7 fp16 (16-shot ImageNet / {scale})\n")

    cpu_clock = device.type == "cpu"  # CPU seconds mean something only when the CPU does the work
    both = (lambda pair, fmt="{:8.2f}": fmt.format(pair[0]) + (f" ({fmt.format(pair[1]).strip()} CPU)"
                                                              if cpu_clock else ""))

    # 1. decode
    decode = bench_decode(args.decode_images, 224)
    print(f"## 1. decode ({args.decode_images} JPEGs of 500x375, {decode['jpeg_kB']:.0f} kB each; one process, "
          "1 torch thread as in a loader worker; images/s wall (CPU))")
    print(f"decode only                   {both(decode['decode'])}")
    print(f"eval view (decode + resize)   {both(decode['eval_view'])}")
    print(f"K={VIEWS} views, decode once      {both(decode['k_views_decode_once'])}")
    once, each = decode["k_views_decode_once"], decode["k_views_decode_each"]
    print(f"K={VIEWS} views, decode per view  {both(each)}  -> decode-once {once[0] / each[0]:.2f}x"
          + (f" ({once[1] / each[1]:.2f}x CPU)" if cpu_clock else "") + "\n")

    # 2. trunk
    clip = sl.random_clip("RN50").to(device)
    trunk = bench_trunk(clip, device, trunk_batch, args.repeats)
    print(f"## 2. trunk (random-weight RN50, 224 px, batch {trunk_batch}; images/s wall (CPU), median of {args.repeats})")
    for label, rate in trunk.items():
        print(f"{label:<32}{both(rate)}  {rate[0] / trunk['fp32'][0]:.2f}x fp32")
    best = max(trunk, key=lambda k: trunk[k][0])
    print(f"one decode-once loader process makes {once[0] * VIEWS:.1f} views/s; the best trunk ({best}) eats "
          f"{trunk[best][0]:.1f}/s -> {'the trunk' if once[0] * VIEWS > trunk[best][0] else 'decoding'} is the floor here\n")

    # 3 + 4. SAFE epochs, calibrated prediction
    attnpool = clip.attnpool
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(images) % classes
    text = F.normalize(torch.randn(clip.embed_dim, classes, generator=g), dim=0).to(device)
    workload = Workload(images=images, views=VIEWS, batch_size=args.batch, epochs=args.epochs,
                        name=f"16-shot ImageNet / {scale}, K={VIEWS}")

    def calibrated(root: str, clock) -> "sl.CachePlan":
        rates = calibrate(device, batch_size=args.batch, attnpool=attnpool, temp_dir=root,
                          repeats=args.calibrate_repeats,
                          sample_bytes=args.sample_mb * 1e6, clock=clock)
        return plan_cache(workload, profile_here(device, root, rates), rates)

    clocks = {"wall": time.perf_counter, **({"CPU": time.process_time} if cpu_clock else {})}
    with tempfile.TemporaryDirectory(dir=args.cache_dir, prefix="safelib-bench-") as root:
        start = time.perf_counter()
        entry = synthetic_cache(root, images, VIEWS, (2048, 7, 7), device)
        print(f"## 3. SAFE epochs and 4. the planner (batch {args.batch}; synthetic cache "
              f"{images * VIEWS * 200_704 / GB:.2f} GB written in {time.perf_counter() - start:.1f} s)")
        load = [os.getloadavg()[0]]
        before = {name: calibrated(root, clock) for name, clock in clocks.items()}
        plan = before["wall"]
        print(plan.summary())
        rates = plan.rates
        print(f"wall rates: step {rates.step_s * 1e3:.1f} ms + {rates.map_s * 1e3:.3f} ms/map; gather GB/s "
              + ", ".join(f"{k} {v / GB:.2f}" for k, v in rates.gather_Bps.items())
              + (f"; h2d {rates.h2d_Bps / GB:.1f} GB/s" if rates.h2d_Bps else ""))
        measured = {}
        for placement in plan.predictions:
            maps = place_maps(entry, placement, device)
            measured[placement] = safe_epoch_seconds(attnpool, maps, labels, text, args.batch, args.measure_epochs)
            del maps
        load.append(os.getloadavg()[0])
        after = {name: calibrated(root, clock) for name, clock in clocks.items()}
        load.append(os.getloadavg()[0])
        print(f"load average (1 min) before / after the epochs / after re-calibrating: "
              + " / ".join(f"{x:.1f}" for x in load) + f" on {os.cpu_count()} CPUs")
        print(f"\nper epoch, {args.measure_epochs} epochs measured; predicted from calibrate() run just before "
              "and just after the epochs")
        print(f"{'placement':<10}{'clock':<6}{'pred before':>12}{'pred after':>12}{'measured':>10}"
              f"{'meas/before':>12}{'meas/after':>12}")
        for placement, pair in measured.items():
            for k, name in enumerate(clocks):
                p0 = before[name].predictions[placement]["epoch_s"]
                p1 = after[name].predictions[placement]["epoch_s"]
                print(f"{placement:<10}{name:<6}{p0:>12.2f}{p1:>12.2f}{pair[k]:>10.2f}{pair[k] / p0:>12.2f}"
                      f"{pair[k] / p1:>12.2f}")
        ours = measured[plan.placement]
        if not args.skip_open_clip:
            slow = safe_epoch_seconds(attnpool, place_maps(entry, plan, device), labels, text,
                                      args.batch, args.measure_epochs, open_clip_pool=True)
            print(f"\nSAFE epoch ({plan.placement} placement), same trainer: open_clip pooling {both(slow)} s, "
                  f"fast path {both(ours)} s -> {slow[0] / ours[0]:.1f}x"
                  + (f" ({slow[1] / ours[1]:.1f}x CPU)" if cpu_clock else ""))
        # the same epoch with feature-space augmentation drawn from the maps
        variants = {"flip+crop": safe_epoch_seconds(attnpool, place_maps(entry, plan, device), labels, text,
                                                    args.batch, args.measure_epochs, feature_augment="flip+crop")}
        print(f"SAFE epoch ({plan.placement}): no augmentation {both(ours)} s; "
              + "; ".join(f"{name} maps {both(pair)} s" for name, pair in variants.items()))
        print(f"load average (1 min) after the epoch variants: {os.getloadavg()[0]:.1f}")
        del entry

    # 5b. whole run per number of image views K, and with feature-space augmentation (one trunk pass)
    print(f"\n## 5b. whole SAFE run / one trunk pass over the same {images} images, per image views K "
          f"({best}, {args.epochs} epochs; decode once, K views cut per image)")
    print(f"{'clock':<6}{'setting':<34}{'decode s':>9}{'trunk s':>9}{'epochs s':>9}{'total s':>9}{'/ floor':>8}")
    for k, name in enumerate(clocks):
        per_view = max(1 / once[k] - 1 / decode["decode"][k], 0.0) / VIEWS     # crop + resize + normalise
        floor = images / decode["eval_view"][k] + images / trunk[best][k]
        rows = [(f"K={views} image views", views, ours[k]) for views in (1, 4, 10)]
        rows.append(("K=1 + flip+crop maps", 1, variants["flip+crop"][k]))
        for label, views, epoch_s in rows:
            decode_s = images * (1 / decode["decode"][k] + views * per_view)
            trunk_s = images * views / trunk[best][k]
            total = decode_s + trunk_s + args.epochs * epoch_s
            print(f"{name:<6}{label:<34}{decode_s:>9.1f}{trunk_s:>9.1f}{args.epochs * epoch_s:>9.1f}"
                  f"{total:>9.1f}{total / floor:>7.1f}x")

    # 5. whole run over the floor
    print(f"\n## 5. whole SAFE run vs the floor: one trunk pass over the same {images} images ({best}, "
          f"{args.epochs} epochs)")
    for k, name in enumerate(clocks):
        decode_s = images / once[k]
        trunk_s = images * VIEWS / trunk[best][k]
        run = decode_s + trunk_s + args.epochs * ours[k]
        floor = images / decode["eval_view"][k] + images / trunk[best][k]
        print(f"{name:<5} SAFE: decode + {VIEWS} views {decode_s:.1f} s + trunk on {images * VIEWS} views {trunk_s:.1f} s"
              f" + {args.epochs} x {ours[k]:.2f} s epochs = {run:.1f} s; floor {floor:.1f} s -> {run / floor:.1f}x")
    # 6. limits: trunk FLOPs against the matrix rate, epoch bytes against memory bandwidth
    flops = trunk_flops(clip)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    mm32 = matmul_rate(device, torch.float32, 4096 if device.type == "cuda" else 1024, args.repeats)
    mm16 = matmul_rate(device, half, 4096 if device.type == "cuda" else 1024, args.repeats)
    bandwidth = copy_rate(device, 1024 if device.type == "cuda" else 128, args.repeats)
    print(f"\n## 6. against the limits")
    print(f"trunk: {flops / 1e9:.2f} GFLOP/image; matmul fp32 {mm32 / 1e12:.3f} TFLOP/s, {str(half)[6:]} "
          f"{mm16 / 1e12:.3f} TFLOP/s -> ceiling {mm32 / flops:.1f} (fp32) / {mm16 / flops:.1f} images/s; measured "
          f"fp32 {trunk['fp32'][0]:.2f} ({trunk['fp32'][0] * flops / mm32:.0%} of the fp32 matmul rate), "
          f"best {trunk[best][0]:.2f} images/s")
    epoch_bytes = workload.epoch_bytes
    print(f"cache bytes per epoch {epoch_bytes / GB:.3f} GB (fp16) at copy bandwidth {bandwidth / GB:.1f} GB/s -> "
          f"{epoch_bytes / bandwidth * 1e3:.1f} ms floor; measured epoch {ours[0]:.2f} s")
    if scale > 1:
        full = Workload.few_shot(FULL_CLASSES, SHOTS, VIEWS, batch_size=args.batch, epochs=args.epochs)
        full_plan = try_plan_cache(full, profile_here(device, args.cache_dir or tempfile.gettempdir(), plan.rates),
                                   plan.rates)
        where = (f"{full_plan.placement}, {full_plan.epoch_s:.0f} s/epoch predicted" if isinstance(full_plan, sl.CachePlan)
                 else full_plan.message)  # a machine without the disk for it says so rather than stopping
        print(f"\nfull size on this machine (planner, same wall rates): {where}; "
              f"trunk {full.images * VIEWS / trunk[best][0] / 3600:.1f} h, "
              f"decode + views {full.images / once[0] / 3600:.2f} h in one process")
    print(f"\nbenchmark wall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
