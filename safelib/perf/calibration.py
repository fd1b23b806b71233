"""Measure, on this machine, the rates the cache planner predicts with.

A prediction is only as good as its rates, and spec sheets say little about a shared 2-vCPU VM
or a Colab disk. ``calibrate`` times the pieces of a SAFE epoch separately, on small synthetic
data shaped like the real maps, in a few seconds:

    compute   SAFE's optimizer step (fast attnpool forward + backward, logits, AdamW) at two batch
              sizes, fitted as step_s + batch * map_s
    gather    assembling batches from each placement the device has (``safelib.features.maps``)
    h2d       pinned host -> GPU copies (CUDA only)
    disk      reading a freshly written memmap after asking the OS to drop its pages (cold), and again (warm)
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.attnpool import attention_pool
from ..features.maps import DeviceMaps, PinnedMaps, StreamedMaps, drop_page_cache
from ..methods.safe import adamw, trainable_attnpool
from .planner import Rates, Workload, plan_cache, profile_here


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(step: Callable[[], None], repeats: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    step()  # warm-up: allocations, kernels, lazy init
    _sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def synthetic_attnpool(map_shape: tuple[int, int, int] = (2048, 7, 7), seed: int = 0) -> nn.Module:
    """A random-weight open_clip attention pooling for maps C x H x W (RN50's shape by default)."""
    from open_clip.modified_resnet import AttentionPool2d

    channels, height, width = map_shape
    if height != width:
        raise ValueError(f"open_clip's attention pooling needs a square grid, got {height} x {width}")
    torch.manual_seed(seed)
    return AttentionPool2d(height, channels, max(1, channels // 64), channels // 2)


def time_safe_step(attnpool: nn.Module, batch_size: int, num_classes: int = 1000, repeats: int = 3,
                   pool_fn: Callable = attention_pool, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for one SAFE optimizer step on a batch already on the attnpool's device.

    Mirrors ``train_safe``'s defaults: on CUDA, fp16 autocast with gradient scaling (``SafeConfig.amp``).
    """
    param = next(attnpool.parameters())
    device = param.device
    channels = attnpool.positional_embedding.shape[1]
    side = int(round((attnpool.positional_embedding.shape[0] - 1) ** 0.5))
    pool = _trainable_copy(attnpool)
    optimizer = _optimizer([p for p in pool.parameters() if p.requires_grad])
    out_dim = pool.c_proj.out_features
    text = F.normalize(torch.randn(out_dim, num_classes, device=device), dim=0)
    batch = torch.randn(batch_size, channels, side, side, device=device).relu()
    target = torch.randint(num_classes, (batch_size,), device=device)

    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
            features = pool_fn(pool, batch)
        logits = 100.0 * F.normalize(features.float(), dim=-1) @ text
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return _median_time(step, repeats, device, clock)


def _optimizer(params: list) -> torch.optim.Optimizer:

    return adamw(params, lr=1e-6)


def _trainable_copy(attnpool: nn.Module) -> nn.Module:

    return trainable_attnpool(attnpool, "all")


def _gather_rate(maps, device: torch.device, batch_size: int, host_only: bool, repeats: int,
                 before: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes/s of assembling every row of a one-view placement in shuffled batches."""
    n = maps.num_images
    bytes_total = n * maps.num_views * int(np.prod(maps.shape[2:])) * 2
    order = torch.randperm(n * maps.num_views)
    views, rows = order // n, order % n

    def one_pass() -> None:
        for start in range(0, len(order), batch_size):
            v, r = views[start:start + batch_size], rows[start:start + batch_size]
            maps._host(v, r) if host_only else maps.gather(v, r, device)

    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = clock()
        one_pass()
        _sync(device)
        times.append(clock() - start)
    return bytes_total / statistics.median(times)


def calibrate(device: str | torch.device = "cpu", map_shape: tuple[int, int, int] = (2048, 7, 7),
              batch_size: int = 32, attnpool: nn.Module | None = None, cache_dir: str | os.PathLike | None = None,
              sample_bytes: float = 128e6, repeats: int = 3, num_classes: int = 1000,
              clock: Callable[[], float] = time.perf_counter) -> Rates:
    """Measured ``Rates`` for SAFE on ``device`` with maps of ``map_shape`` (fp16 in the cache).

    ``cache_dir`` is where the real cache will live (the disk that is read); a temporary file of
    about ``sample_bytes`` is written there and removed. Takes seconds to a minute on a busy CPU.
    ``clock=time.process_time`` measures CPU seconds instead of wall seconds: on a CPU shared with
    other jobs that is what stays comparable from one minute to the next.
    """
    device = torch.device(device)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (the step is timed at batch/2 and batch), got {batch_size}")
    # a copy: the caller's attnpool stays where it is
    attnpool = copy.deepcopy(attnpool).to(device) if attnpool is not None else synthetic_attnpool(map_shape).to(device)
    # compute: two batch sizes separate the per-step cost (AdamW, launches) from the per-map one
    half = batch_size // 2
    t_half = time_safe_step(attnpool, half, num_classes, repeats, clock=clock)
    t_full = time_safe_step(attnpool, batch_size, num_classes, repeats, clock=clock)
    map_s = max((t_full - t_half) / (batch_size - half), 1e-9)
    step_s = max(t_full - batch_size * map_s, 0.0)
    if t_full <= t_half:  # noise swamped the slope: charge everything per map
        map_s, step_s = t_full / batch_size, 0.0

    map_bytes = int(np.prod(map_shape)) * 2
    rows = max(batch_size * 2, int(sample_bytes // map_bytes))
    maps = torch.randn(1, rows, *map_shape).to(torch.float16)
    cuda = device.type == "cuda"
    gather = {"device": _gather_rate(DeviceMaps(maps.to(device)), device, batch_size, False, repeats, clock=clock)}
    h2d = 0.0
    if cuda:
        gather["pinned"] = _gather_rate(PinnedMaps(maps.pin_memory()), device, batch_size, True, repeats, clock=clock)
        host = maps[0, :batch_size * 4].pin_memory()
        h2d = host.numel() * 2 / _median_time(lambda: host.to(device, non_blocking=True), repeats, device, clock)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="safelib-calibrate-") as tmp:
        path = Path(tmp) / "view.npy"
        memmap = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, *map_shape))
        memmap[:] = maps[0].numpy()
        memmap.flush()
        del memmap
        readable = np.load(path, mmap_mode="r")
        streamed = StreamedMaps([readable], prefetch=0, pin=cuda)
        gather["memmap_warm"] = _gather_rate(streamed, device, batch_size, cuda, repeats, clock=clock)
        cold_note = ""
        if hasattr(os, "posix_fadvise"):
            gather["memmap_cold"] = _gather_rate(streamed, device, batch_size, cuda, repeats,
                                                 before=lambda: drop_page_cache(path), clock=clock)
        else:  # no way to evict our file's pages here (not Linux): the cold rate is not known
            gather["memmap_cold"], cold_note = gather["memmap_warm"], "; cold disk rate not measurable here (= warm)"
        del streamed, readable
    if not cuda:
        gather["pinned"] = gather["device"]  # no pinned placement on a CPU; kept for a complete table
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return Rates(step_s=step_s, map_s=map_s, gather_Bps=gather, h2d_Bps=h2d,
                 source=f"measured by calibrate() on {name}, {when}, maps {tuple(map_shape)}, batch {batch_size}"
                        + ("" if clock is time.perf_counter else f", clock {getattr(clock, '__name__', clock)}")
                        + cold_note,
                 device=name)


_MEASURED: dict[tuple, Rates] = {}


def plan_for_maps(dense, device: str | torch.device = "cpu", *, batch_size: int = 32, epochs: int = 20,
                  cache_dir: str | os.PathLike | None = None, rates: Rates | None = None,
                  placement: str | None = None):
    """Measure (once per process, device and map shape) and plan where ``dense`` should live for training.

    ``dense`` is the train split's maps (a cache entry, per-view arrays or a V x N x ... tensor). Returns
    the ``CachePlan``; ``place_maps(dense, plan, device)`` then puts them there, and ``plan.as_record()``
    goes into the run record. Raises ``PlanError`` (with the sizes) when the maps fit nowhere.
    """

    device = torch.device(device)
    workload = Workload.from_maps(dense, batch_size=batch_size, epochs=epochs)
    if rates is None:
        key = (str(device), workload.map_shape, batch_size, str(cache_dir))
        if key not in _MEASURED:
            # calibrate times batches of two or more; a batch of one costs about as much per step
            _MEASURED[key] = calibrate(device, workload.map_shape, max(2, batch_size), cache_dir=cache_dir,
                                       sample_bytes=min(64e6, 4 * workload.cache_bytes), repeats=2)
        rates = _MEASURED[key]
    root = cache_dir if cache_dir is not None else getattr(dense, "path", ".")
    return plan_cache(workload, profile_here(device, root, rates), rates, placement)
