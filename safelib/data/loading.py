"""Batches of augmented views: each image decoded once per pass, K views cut from that decode.

Training SAFE touches only cached dense maps, so the trunk sees every image K times (K
augmented views) exactly once. Decoding a JPEG costs more than cropping it, so a worker opens
image ``i`` once and cuts all K views from the decoded picture. View ``v`` of image ``i`` is
drawn with its own seed, mixed from ``(seed, v, i)``, so it is the same picture whatever the
batch size, worker count or order: the feature cache can be rebuilt and audited.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .imageset import ImageSet
from .transforms import CLIP_MEAN, CLIP_STD, TRAIN_SCALE, eval_transform, train_transform

if TYPE_CHECKING:
    from ..clip.models import ClipModel


@dataclass(frozen=True)
class ViewSpec:
    """How to turn one image into views: ``views=0`` (or ``"eval"``) is one eval-transform view,
    ``views=K`` is K train-augmented views seeded by ``seed``."""

    size: int
    views: int | str = 0
    seed: int = 0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    scale: tuple[float, float] = TRAIN_SCALE

    def __post_init__(self) -> None:
        views = 0 if self.views == "eval" else self.views
        if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 0:
            raise ValueError(f"views must be 'eval', 0 (one eval view) or a positive number of augmented "
                             f"views, got {self.views!r}")
        object.__setattr__(self, "views", int(views))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        # build once to validate size/mean/std/scale with the transforms' own messages
        self.transform()

    @property
    def is_eval(self) -> bool:
        return self.views == 0

    @property
    def num_views(self) -> int:
        """Views per image in a batch (1 for eval)."""
        return max(1, int(self.views))

    def transform(self):
        """The torchvision transform applied to each view."""
        if self.is_eval:
            return eval_transform(self.size, self.mean, self.std)
        return train_transform(self.size, self.mean, self.std, self.scale)

    @classmethod
    def for_clip(cls, clip: ClipModel, views: int | str = 0, seed: int = 0) -> ViewSpec:
        """The spec matching a loaded model's image size and normalisation (``sl.load_clip``)."""
        return cls(size=int(clip.image_size), views=views, seed=seed,
                   mean=tuple(clip.mean), std=tuple(clip.std))


def view_seed(seed: int, view: int, index: int) -> int:
    """A 63-bit torch seed for view ``view`` of image ``index``; SeedSequence mixes the three well."""
    state = np.random.SeedSequence([int(seed), int(view), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class ViewBatch(NamedTuple):
    """One batch: ``images`` V x B x 3 x S x S, ``labels`` and ``indices`` (into the ImageSet) of length B."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class ImageViews(Dataset):
    """Item ``i``: (V x 3 x S x S views of image ``i``, its label, ``i``), decoding the image once."""

    def __init__(self, images: ImageSet, spec: ViewSpec) -> None:
        if not isinstance(images, ImageSet):
            raise TypeError(f"images must be a safelib ImageSet, got {type(images).__name__}")
        self.images = images
        self.spec = spec
        self.transform = spec.transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        picture = self.images.load_image(index)  # the one decode of this pass
        if self.spec.is_eval:
            views = [self.transform(picture)]
        else:
            views = []
            for v in range(self.spec.views):
                # fork_rng keeps the caller's global RNG untouched; torchvision draws from it
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(self.spec.seed, v, index))
                    views.append(self.transform(picture))
        return torch.stack(views), self.images.labels[index], index  # V x 3 x S x S


def collate_views(items: Sequence[tuple[torch.Tensor, int, int]]) -> ViewBatch:
    """Stack B items of V x 3 x S x S into V x B x 3 x S x S (views first: one trunk call per view)."""
    views = torch.stack([item[0] for item in items], dim=1)  # V x B x 3 x S x S
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    indices = torch.tensor([item[2] for item in items], dtype=torch.long)
    return ViewBatch(views, labels, indices)


def view_loader(images: ImageSet, spec: ViewSpec, *, batch_size: int = 64, num_workers: int = 0,
                pin_memory: bool = False, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
    """A DataLoader of :class:`ViewBatch` over ``images``; shuffling (off by default) is seeded by ``spec.seed``.

    Example::

        spec = ViewSpec.for_clip(clip, views=10, seed=1)
        for batch in view_loader(train_set, spec, batch_size=32, num_workers=4, pin_memory=True):
            dense = clip.trunk(batch.images.flatten(0, 1).to(device))   # (V*B) x C x H x W
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (0 = load in this process), got {num_workers!r}")
    if len(images) == 0:
        raise ValueError(f"ImageSet {images.name!r} is empty; nothing to load")
    # always our own generator: DataLoader otherwise draws its worker base seed from the global RNG
    generator = torch.Generator().manual_seed(int(spec.seed))
    return DataLoader(
        ImageViews(images, spec),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_views,
        persistent_workers=False,
    )
