"""Measure, on this machine, the rates the cache planner predicts with.

A prediction is only as good as its rates, and spec sheets say little about a shared 2-vCPU VM
or a Colab disk. ``calibrate`` times the pieces of a SAFE epoch separately, on small synthetic
data shaped like the real maps, in a few seconds:

    compute   SAFE's optimizer step (``safelib.methods.safe.SafeStep``, the one ``train_safe`` takes)
              at two batch sizes, fitted as step_s + batch * map_s
    gather    assembling batches from each placement the device has (``safelib.features.maps``)
    h2d       pinned host -> GPU copies (CUDA only)
    disk      reading a freshly written memmap after asking the OS to drop its pages (cold), and again (warm)

The memmap sample goes to the system's temp dir, never into the cache: a shared cache may be
read-only (so the disk rates are the temp dir's disk; ``temp_dir=`` measures another). Its folder
is named by host and process id, so a later calibration removes the folders of processes killed
mid-way (``remove_stale_samples``) and never one that a live process (another shard) holds.
"""
from __future__ import annotations

import copy
import datetime as _dt
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import owner_tag, remove_dead_owners
from ..clip.attnpool import trained_grid
from ..features.cache import BYTES_PER_VALUE
from ..features.maps import DenseMaps, DeviceMaps, MapsLike, PinnedMaps, StreamedMaps, drop_page_cache
from ..methods.safe import SafeConfig, SafeStep
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


SAMPLE_PREFIX = "safelib-calibrate-"


def remove_stale_samples(temp_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove the sample folders of calibrations whose process is gone (killed mid-way); returns them.

    Only this host's folders (``safelib-calibrate-<host>-<pid>-*``) are judged, and one whose
    process lives (another shard calibrating now) is kept (``safelib.atomic.remove_dead_owners``).
    """
    return remove_dead_owners(temp_dir or tempfile.gettempdir(), SAMPLE_PREFIX)


def synthetic_attnpool(map_shape: tuple[int, int, int] = (2048, 7, 7), seed: int = 0) -> nn.Module:
    """A random-weight open_clip attention pooling for maps C x H x W (RN50's shape by default)."""
    from open_clip.modified_resnet import AttentionPool2d

    channels, height, width = map_shape
    if height != width:
        raise ValueError(f"open_clip's attention pooling needs a square grid, got {height} x {width}")
    torch.manual_seed(seed)
    return AttentionPool2d(height, channels, max(1, channels // 64), channels // 2)


def time_safe_step(attnpool: nn.Module, batch_size: int, num_classes: int = 1000, repeats: int = 3,
                   logit_scale: float = 100.0, config: SafeConfig | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for one SAFE optimiser step (``SafeStep``, ``train_safe``'s own) on a batch already on
    the attnpool's device, with ``config`` (default ``SafeConfig()``: on CUDA, fp16 autocast with
    gradient scaling) at a tiny learning rate, so the repeats time the same weights. Synthetic maps and
    text classifier; ``logit_scale`` (CLIP's is 100) changes the numbers, not the time.
    """
    device = next(attnpool.parameters()).device
    channels, side = attnpool.positional_embedding.shape[1], trained_grid(attnpool)
    text = F.normalize(torch.randn(attnpool.c_proj.out_features, num_classes, device=device), dim=0)
    batch = torch.randn(batch_size, channels, side, side, device=device).relu()
    target = torch.randint(num_classes, (batch_size,), device=device)
    config = replace(config or SafeConfig(), lr=1e-6)
    step = SafeStep(attnpool, text, logit_scale, config, steps=repeats + 1)
    return _median_time(lambda: step(batch, target), repeats, device, clock)


def _gather_rate(maps: DenseMaps, device: torch.device, batch_size: int, host_only: bool, repeats: int,
                 before: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes/s of assembling every row of a placement in shuffled batches (``host_only``: without the copy
    to the device, which ``h2d`` measures apart)."""
    n = maps.num_images
    order = torch.randperm(n * maps.num_views)
    view_of_row, rows = order // n, order % n

    def one_pass() -> None:
        for start in range(0, len(order), batch_size):
            v, r = view_of_row[start:start + batch_size], rows[start:start + batch_size]
            maps.assemble(v, r) if host_only else maps.gather(v, r, device)

    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = clock()
        one_pass()
        _sync(device)
        times.append(clock() - start)
    return maps.nbytes / statistics.median(times)


def calibrate(device: str | torch.device = "cpu", map_shape: tuple[int, int, int] = (2048, 7, 7),
              batch_size: int = 32, attnpool: nn.Module | None = None, temp_dir: str | os.PathLike | None = None,
              sample_bytes: float = 128e6, repeats: int = 3, num_classes: int = 1000,
              clock: Callable[[], float] = time.perf_counter) -> Rates:
    """Measured ``Rates`` for SAFE on ``device`` with maps of ``map_shape`` (fp16 in the cache).

    A sample file of about ``sample_bytes`` is written under ``temp_dir`` (default: the system's temp
    dir; never the cache, which may be read-only), read back cold and warm, and removed; stale samples
    of killed calibrations are removed first. Takes seconds to a minute on a busy CPU.
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

    map_bytes = int(np.prod(map_shape)) * BYTES_PER_VALUE  # the cache stores fp16
    rows = max(batch_size * 2, int(sample_bytes // map_bytes))
    maps = torch.randn(1, rows, *map_shape).to(torch.float16)
    cuda = device.type == "cuda"
    gather = {"device": _gather_rate(DeviceMaps(maps.to(device)), device, batch_size, False, repeats, clock=clock)}
    h2d = 0.0
    if cuda:
        gather["pinned"] = _gather_rate(PinnedMaps(maps.pin_memory()), device, batch_size, True, repeats, clock=clock)
        host = maps[0, :batch_size * 4].pin_memory()
        h2d = host.nbytes / _median_time(lambda: host.to(device, non_blocking=True), repeats, device, clock)
    remove_stale_samples(temp_dir)
    with tempfile.TemporaryDirectory(dir=temp_dir, prefix=f"{SAMPLE_PREFIX}{owner_tag()}-") as tmp:
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


def plan_for_maps(dense: MapsLike, device: str | torch.device = "cpu", *, batch_size: int = 32, epochs: int = 20,
                  cache_dir: str | os.PathLike | None = None, rates: Rates | None = None,
                  placement: str | None = None):
    """Measure (once per process, device and map shape) and plan where ``dense`` should live for training.

    ``dense`` is the train split's maps (a ``DenseMaps`` or anything ``DenseMaps.of`` takes). Returns
    the ``CachePlan``; ``maps.placed(plan.placement, device)`` then puts them there, and ``plan.as_record()``
    goes into the run record. Raises ``PlanError`` (with the sizes) when the maps fit nowhere.
    """
    device = torch.device(device)
    maps = DenseMaps.of(dense)
    workload = Workload.from_maps(maps, batch_size=batch_size, epochs=epochs)
    if rates is None:
        key = (str(device), workload.map_shape, batch_size)
        if key not in _MEASURED:
            # calibrate times batches of two or more; a batch of one costs about as much per step
            _MEASURED[key] = calibrate(device, workload.map_shape, max(2, batch_size),
                                       sample_bytes=min(64e6, 4 * workload.cache_bytes), repeats=2)
        rates = _MEASURED[key]
    root = cache_dir if cache_dir is not None else (maps.path or ".")
    return plan_cache(workload, profile_here(device, root, rates), rates, placement)
