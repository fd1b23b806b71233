"""Zero-shot CLIP: the prompt-ensemble text classifier applied to the original pooled features.

The baseline every adaptation must beat. It reads no training data; `fit` only records that
nothing was chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import ClipHead, FewShotData, FewShotMethod, MethodConfig, SplitFeatures, eval_view, pool_split


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    """Zero-shot CLIP has no hyperparameters; the prompt templates live with the dataset."""


class ZeroShot(FewShotMethod):
    """``logits = logit_scale * normalize(f) @ W`` with ``W`` the prompt-ensemble classifier."""

    name = "zero_shot"
    config_class = ZeroShotConfig

    def _fit(self, data: FewShotData) -> None:
        self._head: ClipHead = data.head
        self._pool_batch = data.pool_batch

    def _predict(self, test: SplitFeatures) -> Tensor:
        features = eval_view(pool_split(test, self._head, self._pool_batch)).float()  # N x D
        return self._head.text_logits(F.normalize(features, dim=-1))  # N x K
