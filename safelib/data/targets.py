"""Where a mini-world task's target lies on the attention-pooling grid, and how much attention lands there.

We drew every scene, so we know the target's mask: `target_grid_masks` turns it into the share of
each grid cell the target covers, `target_cells` picks the cells that count, and
`target_attention_mass` measures the share of the pooling's spatial attention (``spatial_attention``,
the quantity the book draws) that falls on them. Notebooks 01 and 02 and the mini-CLIP's acceptance
report these numbers.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..clip.attnpool import spatial_attention
from . import miniworld as mw
from .imageset import ImageSet
from .miniworld_tasks import TargetTask, task_of, task_scene


def target_grid_masks(images: ImageSet, grid: int) -> np.ndarray:
    """N x grid x grid: the fraction of each attention-pooling cell the target covers (visible part).

    Cell (r, c) is token 1 + r * grid + c of `safelib.attention_weights` (token 0 is the mean).
    """
    return _grid_masks(task_of(images), tuple(images.ids), grid).copy()  # a copy: the memo stays as drawn


@functools.lru_cache(maxsize=8)
def _grid_masks(task: TargetTask, ids: tuple[str, ...], grid: int) -> np.ndarray:
    """Drawn once per (task, images, grid): every SAFE run of a grid on one test split reads the same masks."""
    out = np.zeros((len(ids), grid, grid), dtype=np.float32)
    for i, image_id in enumerate(ids):
        scene, t = task_scene(task, image_id)
        out[i] = mw.mask_on_grid(scene.masks[t], grid)
    return out


def target_cells(coverage: np.ndarray | torch.Tensor, min_coverage: float = 0.25) -> torch.Tensor:
    """Boolean N x grid x grid: cells the target covers by at least `min_coverage` (its best cell always)."""
    coverage = torch.as_tensor(coverage)
    flat = coverage.flatten(1)
    cells = flat >= min_coverage
    cells[torch.arange(len(flat)), flat.argmax(1)] = True  # a small target still has one cell
    return cells.view_as(coverage)


def target_attention_mass(attention: torch.Tensor, coverage: np.ndarray | torch.Tensor,
                          min_coverage: float = 0.25) -> torch.Tensor:
    """Per image, the share of spatial attention on the target's cells (heads averaged, mean token excluded).

    attention: N x heads x (1 + grid*grid) from `safelib.attention_weights`; coverage: N x grid x grid.
    Returns N values in [0, 1].
    """
    cells = target_cells(coverage, min_coverage).flatten(1).to(attention.device)  # N x HW
    return (spatial_attention(attention) * cells).sum(1)
