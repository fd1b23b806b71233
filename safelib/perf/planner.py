"""Where SAFE's dense-map cache lives during training, and what an epoch will cost there.

16-shot ImageNet is 16,000 images; an RN50 dense map is 2048 x 7 x 7, 200,704 bytes in fp16, so
K = 10 augmented views are 32.1 GB: more than a Colab T4's 16 GB GPU and its ~12 GB of RAM. One
SAFE epoch reads one cached view of every image, so the cache can live in one of three places:

    device  the maps sit in the training device's memory (GPU memory; on a CPU, plain RAM)
    pinned  page-locked host RAM, copied to the GPU batch by batch (CUDA only)
    memmap  the cache format's per-view files, read in batches; the OS page cache keeps what RAM allows

The planner takes the fastest place the cache fits in, with the sizes written down, and predicts
the epoch from rates *measured* on the machine (``safelib.perf.calibration``): bytes read from disk,
bytes copied to the device, and the attnpool's compute per map. A plan that fits nowhere is refused
with the numbers (``PlanError``); ``try_plan_cache`` returns the same refusal as a ``NoFit`` value instead,
for a page that shows what fits on whatever machine renders it. ``CachePlan.as_record()`` is the plain dict
a run record stores.
Taught in the book's "SAFE at ImageNet scale" chapter (notebooks/04_scale.ipynb).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..features.cache import BYTES_PER_VALUE
from ..features.extract import AUTOCAST_DTYPES
from ..features.maps import PLACEMENTS, DenseMaps, MapsLike

GB = 1e9
GIB = 2 ** 30
KINDS = ("cuda", "cpu")


class PlanError(ValueError):
    """No placement fits the cache; the message gives every size it was compared with."""


def _positive(name: str, value, problems: list[str], allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclass(frozen=True)
class Rates:
    """Throughputs the epoch prediction uses; ``source`` says whether they were measured or assumed.

    step_s + batch * map_s: one optimizer step of SAFE on maps already on the device (attnpool
        forward + backward + AdamW), fitted from two batch sizes.
    gather_Bps: bytes/s of batch assembly per placement (rows picked out of the resident cache,
        fp16 -> fp32); ``memmap_warm`` reads from the page cache, ``memmap_cold`` from the disk.
    h2d_Bps: host -> device copy rate (0 = no separate device, i.e. a CPU).
    """

    step_s: float
    map_s: float
    gather_Bps: dict
    h2d_Bps: float
    source: str
    device: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive("step_s", self.step_s, problems, allow_zero=True)
        _positive("map_s", self.map_s, problems)
        _positive("h2d_Bps", self.h2d_Bps, problems, allow_zero=True)
        need = {"device", "pinned", "memmap_warm", "memmap_cold"}
        if not isinstance(self.gather_Bps, dict) or set(self.gather_Bps) != need:
            problems.append(f"gather_Bps must have exactly the keys {sorted(need)}, got "
                            f"{sorted(self.gather_Bps) if isinstance(self.gather_Bps, dict) else self.gather_Bps!r}")
        else:
            for key, value in self.gather_Bps.items():
                _positive(f"gather_Bps[{key!r}]", value, problems)
        if problems:
            raise ValueError("invalid Rates: " + "; ".join(problems))
        object.__setattr__(self, "gather_Bps", {k: float(v) for k, v in sorted(self.gather_Bps.items())})


@dataclass(frozen=True)
class DeviceProfile:
    """A machine SAFE may train on: its memories (bytes) and, for planning elsewhere, nominal rates.

    gpu_bytes: device memory (0 for a CPU). ram_bytes: host RAM. disk_bytes: free disk for the cache.
    *_reserve_bytes: what the run itself needs there (CUDA context, the two attnpools with AdamW
        state, activations; Python, torch and the notebook in RAM). ``nominal`` are rates from spec
        sheets, used only until ``calibrate()`` has measured the real ones on that machine.
    """

    name: str
    kind: str
    gpu_bytes: float
    ram_bytes: float
    disk_bytes: float
    cpus: int
    autocast_dtype: str | None
    gpu_reserve_bytes: float = 1.5 * GIB
    ram_reserve_bytes: float = 3.0 * GIB
    nominal: Rates | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind not in KINDS:
            problems.append(f"kind={self.kind!r}; valid: {', '.join(KINDS)}")
        for name in ("ram_bytes", "disk_bytes"):
            _positive(name, getattr(self, name), problems)
        for name in ("gpu_bytes", "gpu_reserve_bytes", "ram_reserve_bytes"):
            _positive(name, getattr(self, name), problems, allow_zero=True)
        if self.kind == "cuda" and not self.gpu_bytes:
            problems.append("a cuda profile needs gpu_bytes > 0")
        if self.kind == "cpu" and self.gpu_bytes:
            problems.append(f"a cpu profile has no GPU memory, got gpu_bytes={self.gpu_bytes}")
        if not isinstance(self.cpus, int) or self.cpus < 1:
            problems.append(f"cpus must be an int >= 1, got {self.cpus!r}")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            problems.append(f"autocast_dtype={self.autocast_dtype!r}; valid: {', '.join(map(repr, AUTOCAST_DTYPES))}")
        if problems:
            raise ValueError(f"invalid DeviceProfile {self.name!r}: " + "; ".join(problems))

    @property
    def placements(self) -> tuple[str, ...]:
        """Where a cache can live here: no pinned memory without a GPU (RAM *is* the device)."""
        return PLACEMENTS if self.kind == "cuda" else ("device", "memmap")

    def budget(self, placement: str) -> float:
        """Bytes the cache may occupy in ``placement``."""
        if placement == "device":
            total, reserve = (self.gpu_bytes, self.gpu_reserve_bytes) if self.kind == "cuda" \
                else (self.ram_bytes, self.ram_reserve_bytes)
        elif placement == "pinned":
            # pinned pages cannot be swapped or reclaimed: leave the reserve and keep a page cache
            total, reserve = self.ram_bytes, self.ram_reserve_bytes
        elif placement == "memmap":
            total, reserve = self.disk_bytes, 0.0
        else:
            raise ValueError(f"placement={placement!r}; valid: {', '.join(PLACEMENTS)}")
        return max(0.0, total - reserve)

    def page_cache_bytes(self) -> float:
        """RAM the OS can use to keep memmapped cache pages (RAM minus the run's own reserve)."""
        return max(0.0, self.ram_bytes - self.ram_reserve_bytes)


@dataclass(frozen=True)
class Workload:
    """What one SAFE training streams: ``views`` cached maps of ``images`` images, one view per epoch."""

    images: int
    views: int
    map_shape: tuple[int, int, int] = (2048, 7, 7)
    bytes_per_value: int = BYTES_PER_VALUE  # the cache stores fp16
    batch_size: int = 32
    epochs: int = 20
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_shape", tuple(int(s) for s in self.map_shape))
        problems = []
        for key in ("images", "views", "bytes_per_value", "batch_size", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{key} must be an int >= 1, got {value!r}")
        if len(self.map_shape) != 3 or min(self.map_shape) < 1:
            problems.append(f"map_shape must be C x H x W, got {self.map_shape}")
        if problems:
            raise ValueError(f"invalid Workload {self.name!r}: " + "; ".join(problems))

    @classmethod
    def few_shot(cls, classes: int, shots: int, views: int, **kw) -> "Workload":
        """``classes x shots`` images, e.g. ``few_shot(1000, 16, 10)`` for 16-shot ImageNet with K=10."""
        kw.setdefault("name", f"{classes} classes x {shots} shots, K={views}")
        return cls(images=classes * shots, views=views, **kw)

    @classmethod
    def from_maps(cls, dense: MapsLike, **kw) -> "Workload":
        """The workload of dense maps (a ``DenseMaps`` or anything ``DenseMaps.of`` takes)."""
        maps = DenseMaps.of(dense)
        return cls(images=maps.num_images, views=maps.num_views, map_shape=maps.map_shape,
                   bytes_per_value=maps.dtype.itemsize, **kw)

    @property
    def map_bytes(self) -> int:
        return math.prod(self.map_shape) * self.bytes_per_value

    @property
    def cache_bytes(self) -> int:
        return self.images * self.views * self.map_bytes

    @property
    def epoch_bytes(self) -> int:
        """One view of every image: what an epoch reads, wherever the cache lives."""
        return self.images * self.map_bytes

    @property
    def steps(self) -> int:
        return -(-self.images // self.batch_size)

    def views_within(self, budget_bytes: float) -> int:
        """The most views of these images whose maps fit in ``budget_bytes``."""
        return int(budget_bytes // self.epoch_bytes)


@dataclass(frozen=True)
class CachePlan:
    """The planner's decision, the sizes behind it and the predicted cost of an epoch."""

    placement: str
    profile: DeviceProfile
    workload: Workload
    rates: Rates
    predictions: dict = field(default_factory=dict)  # placement -> prediction dict (those that fit)
    fits: dict = field(default_factory=dict)         # placement -> {"needed", "budget", "fits"}

    @property
    def epoch_s(self) -> float:
        return self.predictions[self.placement]["epoch_s"]

    @property
    def run_s(self) -> float:
        return self.epoch_s * self.workload.epochs

    def max_views(self, placement: str) -> int:
        """The most views that would fit ``placement`` for this many images."""
        return self.workload.views_within(self.profile.budget(placement))

    def as_record(self) -> dict:
        """Plain values for the run record: decision, sizes, prediction, and where the rates came from."""
        w = self.workload
        return {
            "placement": self.placement,
            "profile": self.profile.name,
            "workload": {"name": w.name, "images": w.images, "views": w.views, "map_shape": list(w.map_shape),
                         "map_bytes": w.map_bytes, "cache_bytes": w.cache_bytes, "epoch_bytes": w.epoch_bytes,
                         "batch_size": w.batch_size, "epochs": w.epochs},
            "fits": {k: dict(v) for k, v in self.fits.items()},
            "max_views": {p: self.max_views(p) for p in self.profile.placements},
            "predicted": dict(self.predictions[self.placement]),
            "alternatives": {k: dict(v) for k, v in self.predictions.items() if k != self.placement},
            "predicted_run_s": self.run_s,
            "trunk": trunk_settings(self.profile),
            "rates": {**asdict(self.rates)},
        }

    def summary(self) -> str:
        """A few lines a notebook can print."""
        w, p = self.workload, self.predictions[self.placement]
        lines = _fit_lines(w, self.profile, self.fits)
        lines.append(f"  -> {self.placement}: per epoch {p['disk_read_bytes'] / GB:.2f} GB from disk, "
                     f"{p['h2d_bytes'] / GB:.2f} GB to the device; predicted {p['epoch_s']:.2f} s/epoch "
                     f"(io {p['io_s']:.2f} s, compute {p['compute_s']:.2f} s), {self.run_s:.1f} s for "
                     f"{w.epochs} epochs; rates {self.rates.source}")
        return "\n".join(lines)


def _fit_lines(workload: Workload, profile: DeviceProfile, fits: dict) -> list[str]:
    """The summary's head: the cache's size, then each placement's need, budget and most views."""
    w = workload
    lines = [f"{w.name or 'workload'} on {profile.name}: cache {w.cache_bytes / GB:.1f} GB "
             f"({w.images} images x {w.views} views x {w.map_bytes / 1e3:.1f} kB)"]
    for place, fit in fits.items():
        mark = "fits" if fit["fits"] else "does not fit"
        lines.append(f"  {place:<7} needs {fit['needed'] / GB:6.2f} GB of {fit['budget'] / GB:6.2f} GB: {mark}"
                     f" (max {w.views_within(fit['budget'])} views)")
    return lines


@dataclass(frozen=True)
class NoFit:
    """A cache that fits in none of the placements tried, with the sizes and what would fit.

    ``plan_cache`` raises this as ``PlanError(nofit.message)``: real work must not go on without a place
    for its cache. ``try_plan_cache`` returns it, for a notebook that shows what fits on whatever machine
    runs it (a book page must render on a build machine with little free disk).
    """

    workload: Workload
    profile: DeviceProfile
    fits: dict  # placement -> {"needed", "budget", "fits"}, the placements tried

    @property
    def max_views(self) -> int:
        """The most views of these images that fit in any placement tried (0: not even one)."""
        return max(self.workload.views_within(f["budget"]) for f in self.fits.values())

    @property
    def disk_short_bytes(self) -> float | None:
        """Free disk still missing for the memmapped cache (None when memmap was not tried)."""
        fit = self.fits.get("memmap")
        return None if fit is None else fit["needed"] - fit["budget"]

    def what_would_fit(self) -> str:
        """One sentence: the most views that fit, and the free disk the memmapped cache still lacks."""
        w, n = self.workload, self.max_views
        text = (f"At most {n} view of {w.images} images fits" if n == 1
                else f"At most {n} views of {w.images} images fit" + ("" if n else ": use fewer images"))
        if self.disk_short_bytes is not None:
            text += f"; or free {self.disk_short_bytes / GB:.2f} GB more disk for the memmapped cache"
        return text + "."

    @property
    def message(self) -> str:
        """The refusal: the cache's size, each placement's need and budget, and what would fit."""
        w = self.workload
        table = "; ".join(f"{p}: needs {f['needed'] / GB:.2f} GB, has {f['budget'] / GB:.2f} GB"
                          for p, f in self.fits.items())
        return (f"the cache of {w.name or 'this workload'} ({w.images} images x {w.views} views x {w.map_bytes} B "
                f"= {w.cache_bytes / GB:.2f} GB) does not fit on {self.profile.name}: {table}. {self.what_would_fit()}")

    def summary(self) -> str:
        """A few lines a notebook can print, in the layout of ``CachePlan.summary``."""
        lines = _fit_lines(self.workload, self.profile, self.fits)
        lines.append(f"  -> the cache does not fit on {self.profile.name}. {self.what_would_fit()}")
        return "\n".join(lines)


def trunk_settings(profile: DeviceProfile) -> dict:
    """How the frozen trunk should run on ``profile``. On a GPU: autocast in its half type (fp16 on a T4,
    which has no bf16) and channels_last weights (``clip.visual.to(memory_format=torch.channels_last)``),
    the layout tensor cores want. On a CPU: plain fp32. On our 2-vCPU EPYC, channels_last gave 0.74-1.58x,
    no reliable gain. bf16 gave 1.3-2.3x (AVX-512 bf16), but it changes the cached maps, so it is the
    reader's choice (``autocast_dtype="bfloat16"`` when building the cache); see tests/benchmarks/RESULTS.md."""
    cuda = profile.kind == "cuda"
    return {"autocast_dtype": profile.autocast_dtype if cuda else None, "channels_last": cuda}


def predict_epoch(workload: Workload, profile: DeviceProfile, rates: Rates, placement: str,
                  overlap: bool | None = None) -> dict:
    """Bytes moved and seconds for one epoch with the cache in ``placement``.

    io = assembling batches (from device memory, pinned RAM, or page cache + disk) + host -> device copies;
    compute = steps * step_s + images * map_s. On a GPU a prefetching reader overlaps io with compute
    (epoch = max); on a CPU both share the cores (epoch = sum). ``overlap`` overrides that.
    """
    if placement not in profile.placements:
        raise ValueError(f"placement {placement!r} is not available on {profile.name} ({profile.kind}); "
                         f"valid: {', '.join(profile.placements)}")
    epoch_bytes = workload.epoch_bytes
    disk_bytes, gather_s = 0.0, 0.0
    if placement == "memmap":
        # one uniformly random view per image: the page cache holds a fixed share of the cache
        hit = min(1.0, profile.page_cache_bytes() / workload.cache_bytes)
        disk_bytes = epoch_bytes * (1 - hit)
        gather_s = (epoch_bytes * hit / rates.gather_Bps["memmap_warm"]
                    + disk_bytes / rates.gather_Bps["memmap_cold"])
    else:
        hit = 1.0
        gather_s = epoch_bytes / rates.gather_Bps[placement]
    h2d_bytes = 0.0 if (placement == "device" or profile.kind == "cpu") else float(epoch_bytes)
    h2d_s = h2d_bytes / rates.h2d_Bps if h2d_bytes else 0.0
    io_s = gather_s + h2d_s
    compute_s = workload.steps * rates.step_s + workload.images * rates.map_s
    overlap = (profile.kind == "cuda" and placement != "device") if overlap is None else overlap
    return {"placement": placement, "epoch_s": max(io_s, compute_s) if overlap else io_s + compute_s,
            "io_s": io_s, "compute_s": compute_s, "overlap": bool(overlap), "page_cache_hit": hit,
            "disk_read_bytes": disk_bytes, "h2d_bytes": h2d_bytes, "gather_bytes": float(epoch_bytes)}


def plan_cache(workload: Workload, profile: DeviceProfile, rates: Rates | None = None,
               placement: str | None = None) -> CachePlan:
    """The fastest placement the cache fits in (or the one asked for, if it fits); refuses with numbers.

    ``rates`` default to the profile's nominal ones; pass ``calibrate(...)``'s measured rates on the machine
    that trains. Every placement that fits gets a prediction, so a record shows what was given up.
    Raises ``PlanError`` when the cache fits nowhere (``try_plan_cache`` returns that as a ``NoFit``).
    """
    plan = try_plan_cache(workload, profile, rates, placement)
    if isinstance(plan, NoFit):
        raise PlanError(plan.message)
    return plan


def try_plan_cache(workload: Workload, profile: DeviceProfile, rates: Rates | None = None,
                   placement: str | None = None) -> CachePlan | NoFit:
    """``plan_cache``, but a cache that fits nowhere comes back as a ``NoFit`` (sizes, what would fit)
    instead of raising: for a notebook that must render on any machine, not for a run that needs the plan.
    """
    rates = rates or profile.nominal
    if rates is None:
        raise ValueError(f"profile {profile.name!r} has no nominal rates: measure them with "
                         "safelib.perf.calibration.calibrate(device) and pass rates=")
    fits = {}
    for place in profile.placements:
        budget = profile.budget(place)
        fits[place] = {"needed": float(workload.cache_bytes), "budget": budget,
                       "fits": workload.cache_bytes <= budget}
    predictions = {p: predict_epoch(workload, profile, rates, p) for p in profile.placements if fits[p]["fits"]}
    if placement is not None:
        if placement not in profile.placements:
            raise ValueError(f"placement={placement!r} is not available on {profile.name}; "
                             f"valid: {', '.join(profile.placements)}")
        chosen = placement if fits[placement]["fits"] else None
    else:
        chosen = next((p for p in profile.placements if fits[p]["fits"]), None)
    if chosen is None:
        return NoFit(workload, profile, {p: f for p, f in fits.items() if placement in (None, p)})
    return CachePlan(chosen, profile, workload, rates, predictions, fits)


# --------------------------------------------------------------------------- profiles
# Nominal rates: spec-sheet figures derated for small batches, *not measured*; calibrate() replaces them.
_T4_NOMINAL = Rates(step_s=3e-3, map_s=30e-6,
                    gather_Bps={"device": 150e9, "pinned": 4e9, "memmap_warm": 2e9, "memmap_cold": 150e6},
                    h2d_Bps=11e9, source="nominal (T4 spec sheet, PCIe 3 x16, Colab disk ~150 MB/s); not measured",
                    device="Tesla T4")
_BIG_NOMINAL = Rates(step_s=1e-3, map_s=5e-6,
                     gather_Bps={"device": 1.5e12, "pinned": 10e9, "memmap_warm": 5e9, "memmap_cold": 1.5e9},
                     h2d_Bps=25e9, source="nominal (H100-class spec sheet, PCIe 5, NVMe); not measured",
                     device="80 GB GPU")
_CPU_NOMINAL = Rates(step_s=0.2, map_s=20e-3,
                     gather_Bps={"device": 3e9, "pinned": 3e9, "memmap_warm": 1.5e9, "memmap_cold": 300e6},
                     h2d_Bps=0.0, source="nominal (4-core laptop, SATA SSD); not measured", device="cpu")

PROFILES: dict[str, DeviceProfile] = {
    "colab-t4": DeviceProfile(
        "colab-t4", "cuda", gpu_bytes=15.0 * GIB, ram_bytes=12.7 * GIB, disk_bytes=70 * GB, cpus=2,
        autocast_dtype="float16", nominal=_T4_NOMINAL,
        notes="Colab free tier: T4 (16 GB, 15 GiB usable; fp16, no bf16), ~12.7 GB RAM, 2 vCPUs, ~70 GB free disk"),
    "big-gpu": DeviceProfile(
        "big-gpu", "cuda", gpu_bytes=80 * GIB, ram_bytes=200 * GIB, disk_bytes=500 * GB, cpus=16,
        autocast_dtype="bfloat16", gpu_reserve_bytes=3 * GIB, ram_reserve_bytes=16 * GIB, nominal=_BIG_NOMINAL,
        notes="one 80 GB data-centre GPU (A100/H100 class) with bf16"),
    "cpu": DeviceProfile(
        "cpu", "cpu", gpu_bytes=0, ram_bytes=16 * GIB, disk_bytes=100 * GB, cpus=4, autocast_dtype=None,
        nominal=_CPU_NOMINAL, notes="a 16 GB, 4-core laptop without a GPU"),
}


def get_profile(name: str) -> DeviceProfile:
    """A named profile (``PROFILES``) or ``"here"`` for this machine as measured by ``profile_here``."""
    if name == "here":
        return profile_here()
    if name not in PROFILES:
        raise ValueError(f"unknown device profile {name!r}; valid: {', '.join(PROFILES)}, here")
    return PROFILES[name]


def _available_ram() -> float:
    """MemAvailable (what can be had without swapping), else total physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _free_disk(cache_dir: str | os.PathLike) -> float:
    """Free bytes on the file system that holds ``cache_dir`` (its nearest existing parent if not made yet)."""
    path = Path(cache_dir)
    while not path.exists():
        path = path.parent
    return float(shutil.disk_usage(path).free)


def profile_here(device: str | torch.device = "cuda" if torch.cuda.is_available() else "cpu",
                 cache_dir: str | os.PathLike = ".", rates: Rates | None = None) -> DeviceProfile:
    """This machine as a profile: free GPU memory, available RAM, free disk under ``cache_dir``."""
    device = torch.device(device)
    gpu = 0.0
    autocast = None
    if device.type == "cuda":
        gpu = float(torch.cuda.mem_get_info(device)[0])
        autocast = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return DeviceProfile(f"here ({device.type})", "cuda" if device.type == "cuda" else "cpu", gpu_bytes=gpu,
                         ram_bytes=_available_ram(), disk_bytes=_free_disk(cache_dir),
                         cpus=os.cpu_count() or 1, autocast_dtype=autocast,
                         gpu_reserve_bytes=1.5 * GIB if gpu else 0.0, ram_reserve_bytes=2.0 * GIB,
                         nominal=rates, notes="measured now: free GPU memory, MemAvailable, free disk")
