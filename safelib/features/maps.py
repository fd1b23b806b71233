"""Dense maps as one type: ``DenseMaps``, views x N x C x H x W, wherever their bytes live.

A dense map is the frozen trunk's output for one image view. One object carries all of them from
the cache to SAFE's trainer and to every method that pools: ``DenseMaps.of(x)`` takes a cache entry,
a ``V x N x C x H x W`` tensor (or ``N x C x H x W``, one view), per-view arrays, or a ``DenseMaps``
(returned as is), and checks the shape once. Where the bytes live is its placement:

    DeviceMaps    one tensor (in the training device's memory once placed); a batch is an index
    PinnedMaps    one page-locked host tensor; rows gathered into a pinned buffer, copied asynchronously
    StreamedMaps  one array per view (a cache entry's memmaps); ``prefetch`` batches are read ahead in a
                  background thread while the current one trains

``maps.placed(placement, device)`` (or ``place_maps``) moves them where the planner said
(``safelib.perf.planner``). The dtype/device policy, in one place: maps keep the dtype they were
stored in (the cache's fp16) wherever they live, so half the bytes cross PCIe; ``view(v)`` hands one
view in that dtype where it lies (a memmap wrapped, not read), and callers cast where they compute;
training batches (``gather``, ``epoch_batches``) arrive on the training device as float32.
"""
from __future__ import annotations

import os
import queue
import threading
import warnings
from pathlib import Path
from typing import ClassVar, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .cache import CacheEntry

PLACEMENTS = ("device", "pinned", "memmap")  # fastest first

_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def _torch_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.empty(0, dtype)).dtype


def _wrap(array) -> Tensor:
    """A (read-only, memory-mapped) array as a tensor sharing its memory: nothing is read or copied."""
    if isinstance(array, Tensor):
        return array
    with warnings.catch_warnings():  # a read-only memmap: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(array))


class DenseMaps:
    """Dense maps ``V x N x C x H x W``; subclasses say where they live and how a batch is assembled.

    Build one with ``DenseMaps.of(x)``. It indexes like the 5-D tensor it stands for:
    ``len(maps)`` is the number of views and ``maps[v]`` is ``maps.view(v)``.
    """

    placement: ClassVar[str] = ""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, path: Path | None = None):
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype: torch.dtype = dtype
        self.path = path  # the cache entry the maps came from, if any (the planner measures its disk)
        self.bytes_gathered = 0  # stored bytes of every batch handed out: what the planner predicts

    @classmethod
    def of(cls, maps: "MapsLike") -> "DenseMaps":
        """The maps as a ``DenseMaps``: accepts every form dense maps come in, and checks the shape once.

        A ``DenseMaps`` is returned as is; a tensor stays where it lies (``N x C x H x W`` is one view);
        a ``CacheEntry``'s memmaps and other per-view arrays are read batch by batch, never all at once.
        """
        if isinstance(maps, DenseMaps):
            return maps
        if isinstance(maps, Tensor):
            return DeviceMaps(maps.unsqueeze(0) if maps.ndim == 4 else maps)
        if isinstance(maps, CacheEntry):
            return StreamedMaps(maps.view_arrays, prefetch=0, pin=False, path=maps.path)
        if isinstance(maps, np.ndarray):
            return StreamedMaps([maps] if maps.ndim == 4 else list(maps), prefetch=0, pin=False)
        if isinstance(maps, Sequence) and not isinstance(maps, (str, bytes)):
            if len(maps) and all(isinstance(v, Tensor) for v in maps):
                return DeviceMaps(torch.stack(list(maps)))
            return StreamedMaps(maps, prefetch=0, pin=False)
        raise TypeError(f"dense maps must be a DenseMaps, a V x N x C x H x W (or N x C x H x W) tensor, a "
                        f"CacheEntry or a sequence of per-view N x C x H x W arrays; got {type(maps).__name__}")

    # --- what the maps are -------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return self.shape[0]

    @property
    def num_images(self) -> int:
        return self.shape[1]

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """One map's C x H x W."""
        return self.shape[2:]

    @property
    def map_bytes(self) -> int:
        """Stored bytes of one map."""
        return int(np.prod(self.map_shape)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Stored bytes of every map of every view."""
        return self.num_views * self.num_images * self.map_bytes

    @property
    def device(self) -> torch.device:
        """Where the bytes are (host memory unless placed on a GPU)."""
        return torch.device("cpu")

    def view(self, v: int) -> Tensor:
        """View ``v`` as an N x C x H x W tensor in the stored dtype, where it lies (no copy)."""
        raise NotImplementedError

    def eval_view(self) -> Tensor:
        """The single eval view of a val/test split, N x C x H x W (no copy)."""
        if self.num_views != 1:
            raise ValueError(f"val and test splits carry exactly one eval view; got {self.num_views} views "
                             "(the train split is the one with augmented views)")
        return self.view(0)

    def __len__(self) -> int:
        return self.num_views

    def __getitem__(self, v: int) -> Tensor:
        if not -self.num_views <= v < self.num_views:
            raise IndexError(f"view {v} of {self.num_views}")
        return self.view(v % self.num_views)

    def __iter__(self) -> Iterator[Tensor]:
        return (self.view(v) for v in range(self.num_views))

    def __repr__(self) -> str:
        views, images, *item = self.shape
        return (f"{type(self).__name__}({views} views x {images} images x {' x '.join(map(str, item))}, "
                f"{str(self.dtype).removeprefix('torch.')}, {self.placement} on {self.device})")

    # --- batches for training ----------------------------------------------------------------
    def assemble(self, view_of_row: Tensor, rows: Tensor) -> Tensor:
        """Maps of (``view_of_row[j]``, ``rows[j]``) as B x C x H x W in the stored dtype, where the maps live."""
        raise NotImplementedError

    def gather(self, view_of_row: Tensor, rows: Tensor, device: str | torch.device) -> Tensor:
        """Maps of (``view_of_row[j]``, ``rows[j]``) as B x C x H x W float32 on ``device``."""
        return _to_device(self.assemble(view_of_row, rows), device)

    def epoch_batches(self, order: Tensor, view_of_row: Tensor, batch_size: int,
                      device: str | torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """(rows, maps) for consecutive slices of ``order``; image ``i`` shows view ``view_of_row[i]``."""
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            self.bytes_gathered += len(rows) * self.map_bytes
            yield rows, self.gather(view_of_row[rows], rows, device)

    # --- placement ---------------------------------------------------------------------------
    def placed(self, placement: str, device: str | torch.device = "cpu", prefetch: int = 2) -> "DenseMaps":
        """The same maps in ``placement`` ("device", "pinned", "memmap") for training on ``device``.

        "device" and "pinned" copy the maps there, chunk by chunk (never two full copies in RAM);
        "pinned" needs CUDA: page-locked memory only speeds up copies to a GPU. "memmap" reads the
        per-view arrays batch by batch, ``prefetch`` batches ahead in a background thread.
        """
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}; valid: {', '.join(PLACEMENTS)}")
        device = torch.device(device)
        if placement == "device":
            return DeviceMaps(self._copied(device, pin=False), self.path)
        if placement == "pinned":
            if not torch.cuda.is_available():
                raise ValueError("placement 'pinned' needs CUDA (pinned memory only speeds up copies to a GPU); "
                                 "on a CPU use 'device' (maps in RAM) or 'memmap'")
            return PinnedMaps(self._copied(torch.device("cpu"), pin=True), self.path)
        return StreamedMaps(self._per_view(), prefetch=prefetch, pin=device.type == "cuda", path=self.path)

    def _per_view(self) -> list:
        """One array (or tensor) per view, as a streamed placement reads them."""
        return list(self)

    def _copied(self, device: torch.device, pin: bool, chunk_rows: int = 256) -> Tensor:
        """The maps copied into one V x N x C x H x W tensor on ``device``, chunk by chunk."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device, pin_memory=pin)
        for v in range(self.num_views):
            source = self.view(v)
            for start in range(0, self.num_images, chunk_rows):
                out[v, start:start + chunk_rows].copy_(source[start:start + chunk_rows])
        return out


MapsLike = Union[DenseMaps, Tensor, CacheEntry, np.ndarray, Sequence]  # every form DenseMaps.of accepts


def _to_device(batch: Tensor, device: str | torch.device) -> Tensor:
    device = torch.device(device)
    if batch.device == device:
        return batch.float()
    return batch.to(device, non_blocking=batch.is_pinned()).float()


class _TensorMaps(DenseMaps):
    """Maps held as one V x N x C x H x W tensor."""

    def __init__(self, maps: Tensor, path: Path | None = None):
        if maps.ndim != 5:
            raise ValueError(f"dense maps must be views x N x C x H x W (or N x C x H x W for one view), "
                             f"got shape {tuple(maps.shape)}")
        super().__init__(maps.shape, maps.dtype, path)
        self.maps = maps

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def view(self, v: int) -> Tensor:
        return self.maps[v]


class DeviceMaps(_TensorMaps):
    """All maps in one tensor (the training device's memory once placed): nothing moves but the picked rows."""

    placement = "device"

    def assemble(self, view_of_row: Tensor, rows: Tensor) -> Tensor:
        on = self.maps.device
        if on.type == "cpu" and self.maps.dtype in _NUMPY_DTYPES:
            # numpy copies whole rows (memcpy); torch's CPU index kernel goes element by element in fp16
            return torch.from_numpy(self.maps.numpy()[view_of_row.numpy(), rows.numpy()])
        return self.maps[view_of_row.to(on), rows.to(on)]                                # B x C x H x W


class PinnedMaps(_TensorMaps):
    """All maps in page-locked RAM; each batch is gathered into a pinned buffer and copied asynchronously."""

    placement = "pinned"

    def __init__(self, maps: Tensor, path: Path | None = None):
        super().__init__(maps, path)
        self.flat = maps.flatten(0, 1)                                   # (V*N) x C x H x W, a view

    def assemble(self, view_of_row: Tensor, rows: Tensor) -> Tensor:
        index = (view_of_row.cpu() * self.num_images + rows.cpu()).numpy()
        out = torch.empty((len(index), *self.map_shape), dtype=self.dtype, pin_memory=self.flat.is_pinned())
        np.take(self.flat.numpy(), index, axis=0, out=out.numpy())                      # row copies into pinned RAM
        return out


class StreamedMaps(DenseMaps):
    """One array per view (a cache entry's memmaps), read batch by batch; ``prefetch`` batches ahead in a thread."""

    placement = "memmap"

    def __init__(self, view_arrays: Sequence, prefetch: int = 2, pin: bool | None = None, path: Path | None = None):
        arrays = [v.cpu().numpy() if isinstance(v, Tensor) else v for v in view_arrays]
        shapes = {tuple(v.shape) for v in arrays}
        if len(arrays) == 0 or len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"dense maps' per-view arrays must share one N x C x H x W shape, got {sorted(shapes)}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 (0 = read in the training thread), got {prefetch!r}")
        super().__init__((len(arrays), *next(iter(shapes))), _torch_dtype(arrays[0].dtype), path)
        self.view_arrays = arrays
        self.prefetch = prefetch
        self.pin = torch.cuda.is_available() if pin is None else pin

    def view(self, v: int) -> Tensor:
        return _wrap(self.view_arrays[v])

    def _per_view(self) -> list:
        return list(self.view_arrays)

    def assemble(self, view_of_row: Tensor, rows: Tensor) -> Tensor:
        view_of_row, rows = view_of_row.cpu().numpy(), rows.cpu().numpy()
        out = torch.empty((len(rows), *self.map_shape), dtype=self.dtype, pin_memory=self.pin)
        target = out.numpy()
        for v in np.unique(view_of_row):    # one read per view, rows ascending: sequential where it can be
            pick = np.flatnonzero(view_of_row == v)
            pick = pick[np.argsort(rows[pick])]
            target[pick] = self.view_arrays[v][rows[pick]]                            # numpy: row memcpy
        return out

    def epoch_batches(self, order: Tensor, view_of_row: Tensor, batch_size: int,
                      device: str | torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        if self.prefetch == 0:
            yield from super().epoch_batches(order, view_of_row, batch_size, device)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def read() -> None:
            try:
                for start in range(0, len(order), batch_size):
                    if stop.is_set():
                        return
                    rows = order[start:start + batch_size]
                    ready.put((rows, self.assemble(view_of_row[rows], rows)))
                ready.put(None)
            except BaseException as error:  # hand the failure to the training thread
                ready.put(error)

        reader = threading.Thread(target=read, name="safelib-map-reader", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                rows, host = item
                self.bytes_gathered += len(rows) * self.map_bytes
                yield rows, _to_device(host, device)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    pass
                reader.join(timeout=0.05)


def place_maps(dense: MapsLike, plan, device: str | torch.device = "cpu", prefetch: int = 2) -> DenseMaps:
    """The maps (any form ``DenseMaps.of`` takes) in ``plan``'s placement: ``DenseMaps.placed``.

    ``plan`` is a placement name ("device", "pinned", "memmap") or a ``CachePlan`` (its ``placement``).
    """
    placement = plan if isinstance(plan, str) else plan.placement
    return DenseMaps.of(dense).placed(placement, device, prefetch)


def drop_page_cache(path: str | os.PathLike) -> None:
    """Ask the OS to forget ``path``'s cached pages, so the next read comes from the disk (Linux only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
