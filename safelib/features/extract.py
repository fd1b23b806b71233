"""Dense maps from CLIP's frozen trunk, and their on-disk cache.

Everything below ``attnpool`` is frozen, so a dense map (N x C x H x W, RN50: 2048 x 7 x 7) depends
only on the image view and the weights: the trunk runs once per view, the maps go to the cache
(``safelib.features.cache``, fp16), and SAFE's training epochs only ever read them. Methods that need only
pooled features (zero-shot, linear probe, adapters) cache N x D features the same way.
Taught in "SAFE, step by step"
(notebooks/02_safe.ipynb), section "One run: cache the dense maps, fit, choose the blend, test".
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..clip.attnpool import attention_pool
from ..clip.models import ClipModel, cached_module_digest
from ..data import ImageSet, ImageViews, ViewSpec, collate_views, image_files_digest
from .cache import CacheEntry, CacheWriter, entry_lock, find_entry, ids_digest

FEATURE_KINDS = ("dense", "pooled")
IMAGE_DIGESTS = "image-digests"  # the folder under a cache root holding image_files_digest's memos
AUTOCAST_DTYPES = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_digest(clip: ClipModel) -> str:
    """A hash of the image tower's weights (``module_digest``), computed once per model.

    The weights' name ("shipped", a file path) is not enough for a cache key: a re-pretrained
    mini-CLIP or a replaced file keeps its name and would silently be served the old maps.
    """
    return cached_module_digest(clip.model.visual)


def check_autocast_dtype(autocast_dtype: str | None) -> None:
    """Refuse an autocast dtype the trunk cannot run in, naming the valid ones (`AUTOCAST_DTYPES`)."""
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype={autocast_dtype!r}; valid: {', '.join(map(repr, AUTOCAST_DTYPES))}")


def _autocast(device: torch.device, autocast_dtype: str | None):
    check_autocast_dtype(autocast_dtype)
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[autocast_dtype])



@torch.no_grad()
def dense_features(clip: ClipModel, images: torch.Tensor, batch_size: int = 64,
                   autocast_dtype: str | None = None) -> torch.Tensor:
    """Frozen-trunk dense maps N x C x H x W (float32) for preprocessed images N x 3 x S x S.

    Runs on the model's device in batches and returns there; ``autocast_dtype`` ("float16",
    "bfloat16") trades exactness for speed on a GPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a batch N x 3 x S x S, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = clip.device
    maps = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        with _autocast(device, autocast_dtype):
            maps.append(clip.trunk(batch).float())                     # B x C x H x W
    return torch.cat(maps)


@torch.no_grad()
def pooled_features(attnpool: torch.nn.Module, dense: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """N x D features pooled by one attnpool from dense maps (any float dtype, any device; no grad)."""
    param = next(attnpool.parameters())
    out = [attention_pool(attnpool, dense[s:s + batch_size].to(param.device, param.dtype))
           for s in range(0, len(dense), batch_size)]
    return torch.cat(out)


def feature_cache_fields(clip: ClipModel, *, kind: Literal["dense", "pooled"], dataset: str, split: str,
                         ids: list | tuple, transform: str, views: int, view_seed: int,
                         autocast_dtype: str | None = None, **extra: Any) -> dict:
    """Everything that changes cached features, as the key fields of one cache entry.

    ``transform`` is a text description of the view pipeline (``repr`` of a torchvision transform
    is fine); ``extra`` holds any further field that changes the arrays.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind={kind!r}; valid: {', '.join(FEATURE_KINDS)}")
    check_autocast_dtype(autocast_dtype)
    return {
        "kind": kind, "model": clip.name, "weights": str(clip.pretrained), "weights_digest": weights_digest(clip),
        "image_size": int(clip.image_size),
        "dataset": dataset, "split": split, "num_images": len(ids), "ids": ids_digest(ids),
        "transform": transform, "views": int(views), "view_seed": int(view_seed),
        "autocast_dtype": autocast_dtype, **extra,
    }


def cache_features(clip: ClipModel, fields: dict, batches: Callable[[int], Iterable[torch.Tensor]],
                   root: str | os.PathLike, *, verify: Literal["full", "size", "none"] = "full",
                   progress: bool = True) -> CacheEntry:
    """The cache entry for ``fields``: opened if present and sound, else (re)built and opened.

    ``batches(start)`` yields image views ``views x B x 3 x S x S`` for images ``start, start+1, ...``
    (all K views of an image cut from one decode); a rerun after an interruption resumes at the
    first image whose maps were not yet checksummed.
    """
    entry = find_entry(root, fields, verify)
    if entry is not None:
        return entry
    with entry_lock(root, fields):
        # another process may have built it while we waited for the lock
        return find_entry(root, fields, verify) or _build(clip, fields, batches, root, progress)


def _build(clip: ClipModel, fields: dict, batches: Callable[[int], Iterable[torch.Tensor]], root: str | os.PathLike,
           progress: bool) -> CacheEntry:
    kind, rows, views = fields["kind"], fields["num_images"], fields["views"]
    if kind == "dense":
        item = (clip.dense_channels, clip.grid, clip.grid)
    else:
        item = (clip.embed_dim,)
    writer = CacheWriter(root, fields, rows=rows, item_shape=item, views=views)
    bar = tqdm(total=rows, initial=writer.start_row, desc=f"{kind} features ({views} views)",
               unit="img", disable=not progress)
    for batch in _batches_from(batches(writer.start_row), writer.start_row, rows):
        if batch.ndim != 5 or batch.shape[0] != views:
            raise ValueError(f"batches must be views x B x 3 x S x S with {views} views, got {tuple(batch.shape)}")
        k, b = batch.shape[:2]
        dense = dense_features(clip, batch.flatten(0, 1), batch_size=k * b,
                               autocast_dtype=fields["autocast_dtype"])                # (K*B) x C x H x W
        out = dense if kind == "dense" else pooled_features(clip.attnpool, dense)
        writer.write(out.unflatten(0, (k, b)))                                          # K x B x item
        bar.update(b)
    bar.close()
    return writer.finish()


def _batches_from(batches: Iterable[torch.Tensor], start: int, rows: int) -> Iterator[torch.Tensor]:
    """Pass batches through, checking they cover exactly the rows still missing."""
    seen = start
    for batch in batches:
        seen += batch.shape[1]
        if seen > rows:
            raise ValueError(f"batches gave more than the {rows} images the key declares")
        yield batch
    if seen != rows:
        raise ValueError(f"batches gave images {start}..{seen}, the key declares {rows}")


def tensor_batches(views: torch.Tensor, batch_size: int = 64) -> Callable[[int], Iterator[torch.Tensor]]:
    """A ``batches`` source for ``cache_features`` from in-memory views K x N x 3 x S x S."""
    if views.ndim != 5:
        raise ValueError(f"views must be K x N x 3 x S x S, got shape {tuple(views.shape)}")

    def batches(start: int) -> Iterator[torch.Tensor]:
        for s in range(start, views.shape[1], batch_size):
            yield views[:, s:s + batch_size]

    return batches


def cache_image_features(clip: ClipModel, images: ImageSet, root: str | os.PathLike, *, split: str, kind: Literal["dense", "pooled"] = "dense",
                         views: int | str = 0, seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                         autocast_dtype: str | None = None, verify: Literal["full", "size", "none"] = "full",
                         progress: bool = True, dataset: str | None = None, **extra: Any) -> CacheEntry:
    """Cached features of an ``ImageSet``: ``views=0`` one eval view, ``views=K`` K augmented views.

    Each image is decoded once and its K views cut from that decode (``safelib.data``'s
    ``ImageViews``); view ``v`` of image ``i`` is seeded by ``(seed, v, i)``, so a resumed build
    cuts the same views. ``split`` names the set's role ("train", "val", "test") in the key;
    ``dataset`` defaults to the set's name; the set's name is always in the key (a generated set's
    name carries what changes its pixels); a folder's sets add ``image_files`` (``image_files_digest``,
    memoised in ``root/image-digests``), so replaced or deleted images never get old features;
    ``extra`` key fields are anything else that changes it.

    Example::

        train = cache_image_features(clip, few_shot_train, "cache/", split="train", views=10, seed=1)
        train[3]   # memmap N x C x H x W: the fourth augmented view of every image
        maps = DenseMaps.of(train)   # the one dense-map type (what SplitFeatures(dense=train) holds)
    """
    spec = ViewSpec.for_clip(clip, views=views, seed=seed)
    files = image_files_digest(images, Path(root) / IMAGE_DIGESTS)
    if files is not None:  # generated sets keep their keys: their name says what they hold
        extra = {"image_files": files, **extra}
    fields = feature_cache_fields(clip, kind=kind, dataset=dataset or images.name, split=split,
                                  ids=list(images.ids), transform=repr(spec.transform()), views=spec.num_views,
                                  view_seed=spec.seed, autocast_dtype=autocast_dtype, image_set=images.name,
                                  **extra)
    image_views = ImageViews(images, spec)

    def batches(start: int) -> Iterator[torch.Tensor]:
        rest = Subset(image_views, range(start, len(image_views)))  # items keep their index: same views on resume
        loader = DataLoader(rest, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_views,
                            pin_memory=clip.device.type == "cuda")
        for batch in loader:
            yield batch.images                                                  # V x B x 3 x S x S

    return cache_features(clip, fields, batches, root, verify=verify, progress=progress)
