"""The small training loop shared by the adapters that learn on cached features.

CLIP-Adapter and Tip-Adapter-F both train a few parameters on frozen, cached pooled features.
Epoch ``e`` reads augmented view ``e mod V``: the cache holds V augmented views of each training
image, so cycling through them is what a fresh augmentation per epoch would have given
(Tip-Adapter-F draws one augmentation per epoch in the same way).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed CPU seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train_on_views(
    params: list[nn.Parameter],
    logits_fn: Callable[[Tensor], Tensor],
    views: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    eps: float = 1e-8,
) -> list[float]:
    """Cross-entropy training with AdamW and a cosine schedule; returns the mean loss per epoch.

    ``views`` is ``V x N x D`` (features already in the form ``logits_fn`` expects).
    """
    if views.ndim != 3 or views.shape[1] != labels.shape[0]:
        raise ValueError(f"views must be V x N x D with N = {labels.shape[0]}, got {tuple(views.shape)}")
    n = views.shape[1]
    steps_per_epoch = -(-n // batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    labels = labels.to(views.device)
    losses = []
    for epoch in range(epochs):
        view = views[epoch % views.shape[0]]  # N x D
        order = torch.randperm(n, generator=generator).to(views.device)
        total = 0.0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(logits_fn(view[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * index.numel()
        losses.append(total / n)
    return losses
