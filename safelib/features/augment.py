"""Augmentation in feature space: training views drawn from one cached dense map per image.

SAFE's image-space augmentation runs the frozen trunk on K random crops and flips of every image,
so the trunk pass, the bulk of a run, costs K times one pass. Here the trunk runs once and the
views are drawn from the dense map B x C x H x W itself, batch by batch while SAFE trains:

    flip        mirror the map left-right (image column j becomes column W-1-j), per sample with p = 1/2
    crop        a random box of the map, area a fraction of ``scale`` and aspect ratio in 3/4..4/3
                (RandomResizedCrop's ranges), resampled bilinearly back to H x W
    flip+crop   a crop, then a flip

Neither is what the trunk would compute on a flipped or cropped image (its convolutions and
padding are not mirror- or crop-equivariant), so this is a cheaper, different augmentation;
tests/benchmarks/RESULTS.md measures it against K image views (accuracy and time). Pure tensor functions: every draw
comes from the ``torch.Generator`` passed in (a CPU one), so a seed fixes the views exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_AUGMENTS = ("none", "flip", "crop", "flip+crop")
CROP_SCALE = (0.5, 1.0)          # area fraction of the map, as the image-space crops' (``data.transforms``)
CROP_RATIO = (3 / 4, 4 / 3)      # aspect ratio, RandomResizedCrop's default


def check_feature_augment(mode: str) -> None:
    if mode not in FEATURE_AUGMENTS:
        raise ValueError(f"feature_augment={mode!r}; valid: {', '.join(FEATURE_AUGMENTS)}")


def augment_generator(seed: int) -> torch.Generator:
    """A CPU generator for feature augmentation, its stream independent of a ``manual_seed(seed)`` one."""
    state = np.random.SeedSequence([int(seed), 0xF1A7]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1))


def flip_maps(maps: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Each map of B x C x H x W mirrored left-right with probability ``p`` (a new tensor)."""
    flip = (torch.rand(len(maps), generator=generator) < p).to(maps.device)
    return torch.where(flip[:, None, None, None], maps.flip(-1), maps)


def crop_boxes(count: int, generator: torch.Generator, scale: tuple[float, float] = CROP_SCALE,
               ratio: tuple[float, float] = CROP_RATIO) -> Tensor:
    """``count`` random boxes as count x 4 (centre x, centre y, width, height), in units of the map's side."""
    area = torch.empty(count).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(count).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre = torch.rand(count, 2, generator=generator)
    cx = width / 2 + centre[:, 0] * (1 - width)
    cy = height / 2 + centre[:, 1] * (1 - height)
    return torch.stack([cx, cy, width, height], dim=1)


def crop_maps(maps: Tensor, boxes: Tensor) -> Tensor:
    """Box ``boxes[b]`` of map ``b`` resampled bilinearly to the map's own H x W.

    maps: B x C x H x W; boxes: B x 4 from ``crop_boxes``. The full box (0.5, 0.5, 1, 1) gives the
    map back (up to rounding): sample points then fall on the cell centres.
    """
    cx, cy, width, height = boxes.to(maps.device, maps.dtype).unbind(1)
    theta = torch.zeros(len(maps), 2, 3, dtype=maps.dtype, device=maps.device)
    theta[:, 0, 0], theta[:, 0, 2] = width, 2 * cx - 1      # grid_sample's coordinates run from -1 to 1
    theta[:, 1, 1], theta[:, 1, 2] = height, 2 * cy - 1
    grid = F.affine_grid(theta, list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_maps(maps: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """B x C x H x W training maps augmented by ``mode`` (one of ``FEATURE_AUGMENTS``); "none" returns them as is."""
    check_feature_augment(mode)
    if maps.ndim != 4:
        raise ValueError(f"maps must be B x C x H x W, got shape {tuple(maps.shape)}")
    if mode in ("crop", "flip+crop"):
        maps = crop_maps(maps, crop_boxes(len(maps), generator))
    if mode in ("flip", "flip+crop"):
        maps = flip_maps(maps, generator)
    return maps
