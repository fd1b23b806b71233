"""CLIP-Adapter (Gao et al. 2021): a residual bottleneck MLP on the frozen image features.

    f' = r * A(f) + (1 - r) * f,     logits = logit_scale * normalize(f') @ W

``A`` is CLIP-Adapter's MLP: Linear(D, D/4, no bias) - ReLU - Linear(D/4, D, no bias) - ReLU.
Both layers lack a bias and ReLU is positively homogeneous, so ``A(c f) = c A(f)`` for
``c > 0``: feeding normalised features (as we do) gives exactly the same logits as CLIP-Adapter's
unnormalised ones, and lets the same code adapt SAFE's blended (already unit) features.

Our choices, stated: AdamW (lr 1e-3, weight decay 1e-4, cosine schedule) on the cached
augmented views, one view per epoch; the last epoch is kept (no epoch is selected on any
split). The residual ratio ``r`` is chosen on the few-shot validation split from ``ratios``
(CLIP-Adapter's own default 0.2 first, so it wins ties); one adapter is trained per ratio.

``preset="reference"``: CLIP-Adapter's fixed ratio 0.2 trained with CoOp's RN50 trainer (SGD lr
0.002, momentum 0.9, weight decay 5e-4, batch 32, one warm-up epoch at 1e-5, cosine, 200 epochs;
``safelib.methods.reference``). CoOp's trainer draws a fresh augmentation every step; on cached
views the practical equivalent is a random one of the V cached views per sample per step
(``trainer="coop"``), with the cache's crop scale (0.5-1, not Dassl's 0.08-1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.text import class_logits
from .base import (FewShotData, FewShotMethod, MethodConfig, FieldChecks, SplitFeatures, eval_view, loss_warnings,
                   pool_split, select_best)
from ..seeding import seeded
from .feature_training import train_on_views, train_sgd_random_views
from .reference import COOP, preset_problem, require_resolved

TRAINERS = ("adamw", "coop")


def adapter_mix(features: Tensor, adapted: Tensor, ratio: float) -> Tensor:
    """CLIP-Adapter's residual mixing ``r * A(f) + (1 - r) * f`` (not yet normalised)."""
    return ratio * adapted + (1.0 - ratio) * features


class Adapter(nn.Module):
    """CLIP-Adapter's bottleneck MLP ``A``."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return F.relu(self.up(F.relu(self.down(features))))  # N x D -> N x D/r -> N x D


class ClipAdapterHead(nn.Module):
    """Adapter + residual mix + text classifier: features ``N x D`` -> logits ``N x K``."""

    def __init__(self, classifier: Tensor, logit_scale: float, ratio: float, reduction: int) -> None:
        super().__init__()
        self.adapter = Adapter(classifier.shape[0], reduction)
        self.register_buffer("classifier", classifier.detach().float().clone())  # D x K
        self.logit_scale = float(logit_scale)
        self.ratio = float(ratio)

    def forward(self, features: Tensor) -> Tensor:
        mixed = adapter_mix(features, self.adapter(features), self.ratio)
        return class_logits(mixed, self.classifier, self.logit_scale)  # N x K


@dataclass(frozen=True)
class ClipAdapterConfig(MethodConfig):
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    reduction: int = 4
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # "adamw": ours (cosine per step, epoch e reads view e mod V); "coop": CoOp's trainer (SGD momentum
    # 0.9, one warm-up epoch at 1e-5, cosine per epoch, a random cached view per sample per step).
    trainer: str = "adamw"
    preset: str = "ours"  # or "reference" (see the module docstring)

    def __post_init__(self) -> None:
        check = FieldChecks(self)
        check.add(preset_problem(self.preset))
        check.choice("trainer", TRAINERS, "ours, or CoOp's SGD trainer")
        check.grid("ratios", low=0.0, high=1.0)
        for name in ("reduction", "epochs", "batch_size"):
            check.integer(name, low=1)
        check.number("lr", above=0.0)
        check.number("weight_decay", low=0.0)
        check.raise_any()


class ClipAdapter(FewShotMethod):
    """CLIP-Adapter on the cached pooled features, residual ratio chosen on validation."""

    name = "clip_adapter"
    config_class = ClipAdapterConfig

    def _fit(self, data: FewShotData) -> None:
        cfg = self.config
        require_resolved(cfg, self.name)
        train = F.normalize(data.pooled(data.train).float(), dim=-1)  # V x N x D
        val = F.normalize(eval_view(data.pooled(data.val)).float(), dim=-1)  # N x D
        heads, val_logits, losses = [], [], []
        for ratio in cfg.ratios:
            with seeded(data.seed):
                head = ClipAdapterHead(data.head.classifier, data.head.logit_scale, ratio, cfg.reduction)
            head = head.to(train.device)
            losses.append(self._train(head, train, data))
            self.training_warnings += loss_warnings(f"{self.name} (ratio {ratio})", losses[-1], data.head.num_classes)
            head.eval()
            with torch.no_grad():
                val_logits.append(head(val))
            heads.append(head)
        best, scores = select_best(cfg.ratios, val_logits, data.val.labels)
        self._model = heads[best]
        self._head, self._pool_batch = data.head, data.pool_batch
        self.chosen = {
            "ratio": cfg.ratios[best],
            "sweep": [{"ratio": r, **s} for r, s in zip(cfg.ratios, scores)],
            "train_loss": losses[best],
        }

    def _train(self, head: ClipAdapterHead, train: Tensor, data: FewShotData) -> list[float]:
        cfg = self.config
        params = list(head.adapter.parameters())
        if cfg.trainer == "coop":
            return train_sgd_random_views(
                params, head, train, data.train.labels, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                momentum=COOP.momentum, weight_decay=cfg.weight_decay, warmup_epochs=COOP.warmup_epochs,
                warmup_lr=COOP.warmup_lr, seed=data.seed, method=self.name,
            )
        return train_on_views(params, head, train, data.train.labels, epochs=cfg.epochs, batch_size=cfg.batch_size,
                              lr=cfg.lr, weight_decay=cfg.weight_decay, seed=data.seed, method=self.name)

    def _predict(self, test: SplitFeatures) -> Tensor:
        features = eval_view(pool_split(test, self._head, self._pool_batch)).float()
        features = F.normalize(features.to(self._model.classifier.device), dim=-1)
        return self._model(features)
