"""The field's image transforms, owned here rather than taken from open_clip.

open_clip's own train transform differs from what Tip-Adapter used (its crop scale is 0.9-1
and it may add colour jitter), so the few-shot augmentation is written out here:
RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip + CLIP normalisation, Tip-Adapter's
(``main.py``). CoOp (and CLIP-Adapter, which runs in CoOp's trainer) crops at Dassl's default
scale 0.08-1 (``dassl/config/defaults.py``, ``INPUT.RRCROP_SCALE``); pass ``scale=`` for that. The eval
transform is CLIP's: bicubic resize of the short side, centre crop, normalise.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)
TRAIN_SCALE: tuple[float, float] = (0.5, 1.0)


def _check(size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (the model's image size, e.g. 224), got {size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={tuple(mean)} std={tuple(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")


def train_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    scale: tuple[float, float] = TRAIN_SCALE) -> T.Compose:
    """PIL image -> 3 x size x size tensor, randomly cropped and flipped (Tip-Adapter's augmentation)."""
    _check(size, mean, std)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> T.Compose:
    """PIL image -> 3 x size x size tensor, deterministic (CLIP's test-time preprocessing)."""
    _check(size, mean, std)
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def preprocess_images(images: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 images B x S x S x 3 -> normalised float32 B x 3 x S x S.

    The batched equivalent of `eval_transform` for images already at the model's size (the
    mini-world renders at it), without a round trip through PIL.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)  # BHWC -> BCHW
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
