"""The small training loop shared by the adapters that learn on cached features.

CLIP-Adapter and Tip-Adapter-F both train a few parameters on frozen, cached pooled features.
Epoch ``e`` reads augmented view ``e mod V``: the cache holds V augmented views of each training
image, so cycling through them is what a fresh augmentation per epoch would have given
(Tip-Adapter-F draws one augmentation per epoch in the same way).

Both loops stop with `TrainingDivergedError` when the loss or the parameters stop being finite
(``check_epoch``, named by ``method``): a diverged adapter would otherwise predict at chance.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_epoch


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
    method: str = "train_on_views",
) -> list[float]:
    """Cross-entropy training with AdamW and a cosine schedule; returns the mean loss per epoch.

    ``views`` is ``V x N x D`` (features already in the form ``logits_fn`` expects); ``method`` names
    the caller in a `TrainingDivergedError`.
    """
    _check_views(method, views, labels)
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
        check_epoch(method, epoch + 1, epochs, losses[-1], params, lr=lr, weight_decay=weight_decay)
    return losses


def _check_views(method: str, views: Tensor, labels: Tensor) -> None:
    """Shape, and finiteness: a NaN in the cache must not pass for a diverged learning rate."""
    if views.ndim != 3 or views.shape[1] != labels.shape[0]:
        raise ValueError(f"views must be V x N x D with N = {labels.shape[0]}, got {tuple(views.shape)}")
    if not bool(torch.isfinite(views).all()):
        raise ValueError(f"{method}: the cached training features hold NaN or inf; rebuild the feature cache")


def dassl_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """The lr of ``epoch`` under CoOp's trainer (Dassl): ``warmup_lr`` for the warm-up epochs, then
    cosine from ``lr`` over ``epochs`` steps, one step per epoch (``dassl/optim/lr_scheduler.py``)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def train_sgd_random_views(
    params: list[nn.Parameter],
    logits_fn: Callable[[Tensor], Tensor],
    views: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    warmup_epochs: int,
    warmup_lr: float,
    seed: int,
    method: str = "train_sgd_random_views",
) -> list[float]:
    """CoOp's trainer on cached features: SGD, Dassl's warm-up + per-epoch cosine, shuffled batches
    with the last short batch dropped when there are at least ``batch_size`` samples (Dassl's
    ``drop_last``). Each sample of each step reads a random one of its V cached views: the
    practical equivalent of CoOp's fresh augmentation per step. Returns the mean loss per epoch."""
    _check_views(method, views, labels)
    num_views, n = views.shape[0], views.shape[1]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    labels = labels.to(views.device)
    stop = n - n % batch_size if n >= batch_size else n
    losses = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = dassl_lr(epoch, lr, epochs, warmup_epochs, warmup_lr)
        order = torch.randperm(n, generator=generator)
        picks = torch.randint(num_views, (n,), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            batch = views[picks[index].to(views.device), index.to(views.device)]  # B x D
            loss = F.cross_entropy(logits_fn(batch), labels[index.to(views.device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * index.numel()
            seen += index.numel()
        losses.append(total / seen)
        check_epoch(method, epoch + 1, epochs, losses[-1], params, lr=lr, weight_decay=weight_decay)
    return losses
