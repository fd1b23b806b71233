"""The dense-map cache placed where the planner said, handing SAFE's trainer one batch at a time.

Three homes for ``V x N x C x H x W`` fp16 maps (``safelib.perf.planner``):

    DeviceMaps    one tensor in the training device's memory; a batch is an index on the device
    PinnedMaps    one page-locked host tensor; rows gathered into a pinned buffer, copied asynchronously
    StreamedMaps  the cache entry's per-view memmaps; a background thread reads the next batches
                  (one sorted read per view) while the current one trains

All three keep fp16 until the batch is on the device (half the bytes over PCIe) and are sequences of
per-view arrays, so code that only knows the cache format still works with them. ``train_safe``
asks them for an epoch's batches (``epoch_batches``), which is what lets the streamed one read ahead.
"""
from __future__ import annotations

import os
import queue
import threading
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

PLACEMENTS = ("device", "pinned", "memmap")  # fastest first


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def _torch_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.empty(0, dtype)).dtype


def _as_tensor(view) -> Tensor:
    """A memmapped (read-only) view as a tensor sharing its memory: torch reads it without a numpy copy."""
    if isinstance(view, Tensor):
        return view
    with warnings.catch_warnings():  # read-only memmap: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(view))


class PlacedMaps:
    """Maps ``V x N x C x H x W`` somewhere; subclasses say how a batch of (view, row) pairs is assembled."""

    placement = ""

    def __init__(self, views: Sequence, shape: tuple[int, ...]):
        self._views = views
        self.shape = tuple(int(s) for s in shape)
        self.bytes_gathered = 0  # stored bytes of every batch handed out: what the planner predicts

    @property
    def map_bytes(self) -> int:
        return int(np.prod(self.shape[2:])) * torch.empty((), dtype=_torch_dtype(self.dtype)).element_size()

    @property
    def num_views(self) -> int:
        return self.shape[0]

    @property
    def num_images(self) -> int:
        return self.shape[1]

    @property
    def dtype(self):
        return self._views[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, view: int):
        return self._views[view]

    def __iter__(self):
        return iter(self._views[v] for v in range(self.shape[0]))

    def gather(self, views: Tensor, rows: Tensor, device: torch.device) -> Tensor:
        """Maps of (``views[j]``, ``rows[j]``) as B x C x H x W float32 on ``device``."""
        return self._to_device(self._host(views, rows), device)

    def epoch_batches(self, order: Tensor, views: Tensor, batch_size: int,
                      device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """(rows, maps) for consecutive slices of ``order``; image ``i`` shows view ``views[i]``."""
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            self.bytes_gathered += len(rows) * self.map_bytes
            yield rows, self.gather(views[rows], rows, device)

    def _host(self, views: Tensor, rows: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _to_device(batch: Tensor, device: torch.device) -> Tensor:
        device = torch.device(device)
        if batch.device == device:
            return batch.float()
        return batch.to(device, non_blocking=batch.is_pinned()).float()


class DeviceMaps(PlacedMaps):
    """All maps in the training device's memory: nothing moves but the picked rows."""

    placement = "device"

    def __init__(self, maps: Tensor):
        if maps.ndim != 5:
            raise ValueError(f"maps must be V x N x C x H x W, got shape {tuple(maps.shape)}")
        super().__init__(maps, maps.shape)
        self.maps = maps

    def gather(self, views: Tensor, rows: Tensor, device: torch.device) -> Tensor:
        on = self.maps.device
        if on.type == "cpu" and self.maps.dtype in _NUMPY_DTYPES:
            # numpy copies whole rows (memcpy); torch's CPU index kernel goes element by element in fp16
            picked = torch.from_numpy(self.maps.numpy()[views.numpy(), rows.numpy()])
        else:
            picked = self.maps[views.to(on), rows.to(on)]
        return picked.to(device).float()                                                # B x C x H x W


class PinnedMaps(PlacedMaps):
    """All maps in page-locked RAM; each batch is gathered into a pinned buffer and copied asynchronously."""

    placement = "pinned"

    def __init__(self, maps: Tensor):
        if maps.ndim != 5:
            raise ValueError(f"maps must be V x N x C x H x W, got shape {tuple(maps.shape)}")
        super().__init__(maps, maps.shape)
        self.flat = maps.flatten(0, 1)                                   # (V*N) x C x H x W, a view

    def _host(self, views: Tensor, rows: Tensor) -> Tensor:
        index = (views.cpu() * self.num_images + rows.cpu()).numpy()
        out = torch.empty((len(index), *self.shape[2:]), dtype=self.flat.dtype, pin_memory=self.flat.is_pinned())
        np.take(self.flat.numpy(), index, axis=0, out=out.numpy())                      # row copies into pinned RAM
        return out


class StreamedMaps(PlacedMaps):
    """The cache entry's memmaps, read batch by batch; ``prefetch`` batches are read ahead in a thread."""

    placement = "memmap"

    def __init__(self, views: Sequence, prefetch: int = 2, pin: bool | None = None):
        shapes = {tuple(v.shape) for v in views}
        if len(views) == 0 or len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"views must be per-view arrays sharing one N x C x H x W shape, got {sorted(shapes)}")
        super().__init__(list(views), (len(views), *next(iter(shapes))))
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 (0 = read in the training thread), got {prefetch!r}")
        self.prefetch = prefetch
        self.pin = torch.cuda.is_available() if pin is None else pin

    def _host(self, views: Tensor, rows: Tensor) -> Tensor:
        views, rows = views.cpu().numpy(), rows.cpu().numpy()
        out = torch.empty((len(rows), *self.shape[2:]), dtype=_torch_dtype(self.dtype), pin_memory=self.pin)
        target = out.numpy()
        for v in np.unique(views):          # one read per view, rows ascending: sequential where it can be
            pick = np.flatnonzero(views == v)
            pick = pick[np.argsort(rows[pick])]
            target[pick] = self._views[v][rows[pick]]                                 # numpy: row memcpy
        return out

    def epoch_batches(self, order: Tensor, views: Tensor, batch_size: int,
                      device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        if self.prefetch == 0:
            yield from super().epoch_batches(order, views, batch_size, device)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def read() -> None:
            try:
                for start in range(0, len(order), batch_size):
                    if stop.is_set():
                        return
                    rows = order[start:start + batch_size]
                    ready.put((rows, self._host(views[rows], rows)))
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
                yield rows, self._to_device(host, device)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    pass
                reader.join(timeout=0.05)


def _materialise(views: Sequence, device: torch.device, pin: bool, chunk_rows: int = 256) -> Tensor:
    """Copy per-view arrays into one V x N x C x H x W tensor, chunk by chunk (never two full copies)."""
    first = views[0]
    dtype = _torch_dtype(first.dtype)
    out = torch.empty((len(views), *first.shape), dtype=dtype, device=device, pin_memory=pin)
    for v, view in enumerate(views):
        source = _as_tensor(view)
        for start in range(0, source.shape[0], chunk_rows):
            out[v, start:start + chunk_rows].copy_(source[start:start + chunk_rows])
    return out


def place_maps(dense, plan, device: str | torch.device = "cpu", prefetch: int = 2) -> PlacedMaps:
    """The maps (cache entry, per-view arrays, or a V x N x ... tensor) in ``plan``'s placement.

    ``plan`` is a placement name ("device", "pinned", "memmap") or a ``CachePlan`` (its ``placement``). "pinned" needs CUDA:
    page-locked memory only speeds up copies to a GPU.
    """
    placement = plan if isinstance(plan, str) else plan.placement
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; valid: {', '.join(PLACEMENTS)}")
    device = torch.device(device)
    views = [dense[v] for v in range(dense.shape[0])] if isinstance(dense, Tensor) else list(dense)
    if placement == "device":
        return DeviceMaps(_materialise(views, device, pin=False))
    if placement == "pinned":
        if not torch.cuda.is_available():
            raise ValueError("placement 'pinned' needs CUDA (pinned memory only speeds up copies to a GPU); "
                             "on a CPU use 'device' (maps in RAM) or 'memmap'")
        return PinnedMaps(_materialise(views, torch.device("cpu"), pin=True))
    return StreamedMaps(views, prefetch=prefetch, pin=device.type == "cuda")


def drop_page_cache(path: str | os.PathLike) -> None:
    """Ask the OS to forget ``path``'s cached pages, so the next read comes from the disk (Linux only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
