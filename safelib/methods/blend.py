"""Residual blending of fine-tuned and original pooled features, and choosing the blend weight.

SAFE keeps CLIP's original pooling next to the fine-tuned one and mixes their unit features:

    f = normalize(blend * n(f_ft) + (1 - blend) * n(f_orig))

``blend = 0`` is zero-shot CLIP, ``blend = 1`` the fine-tuned pooling alone. The weight is called
``blend`` (not ``alpha``, which Tip-Adapter already uses). It is chosen on the few-shot validation
set by accuracy, ties broken by validation cross-entropy, then by closeness to 0.5 (our rule: the
paper's full text was not available). Each attnpool pools the evaluation set once; a sweep over
``blend`` then costs only these cheap mixes. Taught in "SAFE, step by step"
(notebooks/02_safe.ipynb), section "Choosing the blend on validation".
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..clip.text import class_logits  # CLIP's logits; imported from here by safe.py and classifier.py
from .base import TrainingWarning

DEFAULT_BLEND_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
# How the two poolings are mixed: their unit features (ours, above), or their logits (RAFT's
# ``alpha * cls_logits + (1 - alpha) * clip_logits``, each logit ``logit_scale * cos(f, w_k)``).
BLEND_BY = ("features", "logits")


def blend_features(f_ft: torch.Tensor, f_orig: torch.Tensor, blend: float) -> torch.Tensor:
    """Unit-norm blend N x D of fine-tuned and original features N x D (differentiable).

    At ``blend = 0`` the fine-tuned term is left out rather than multiplied by 0: ``0 * NaN`` is NaN,
    and blend 0 must give CLIP's features whatever the fine-tuned pooling holds. For finite features
    the result is the same bits either way (adding ``0 * x`` changes nothing).
    """
    if f_ft.shape != f_orig.shape:
        raise ValueError(f"f_ft {tuple(f_ft.shape)} and f_orig {tuple(f_orig.shape)} must have one shape")
    _check_blend(blend)
    mixed = (1 - blend) * F.normalize(f_orig, dim=-1)
    if blend != 0:
        mixed = blend * F.normalize(f_ft, dim=-1) + mixed
    return F.normalize(mixed, dim=-1)


def blended_logits(f_ft: torch.Tensor, f_orig: torch.Tensor, text_weights: torch.Tensor, logit_scale: float,
                   blend: float, by: str = "features") -> torch.Tensor:
    """Logits N x K of the blend of fine-tuned and original features N x D, mixed ``by`` "features"
    (``class_logits`` of ``blend_features``) or by "logits" (the mix of each pooling's own logits)."""
    if by == "features":
        return class_logits(blend_features(f_ft, f_orig, blend), text_weights.to(f_ft.device), logit_scale)
    if by != "logits":
        raise ValueError(f"by={by!r}; valid: {', '.join(BLEND_BY)}")
    _check_blend(blend)
    weights = text_weights.to(f_ft.device)
    mixed = (1 - blend) * class_logits(f_orig, weights, logit_scale)
    if blend != 0:  # as in blend_features: blend 0 is CLIP's logits whatever f_ft holds
        mixed = blend * class_logits(f_ft, weights, logit_scale) + mixed
    return mixed


def _check_blend(blend: float) -> None:
    if not (isinstance(blend, (int, float)) and 0.0 <= blend <= 1.0):
        raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")


@dataclass(frozen=True)
class BlendPoint:
    """One blend weight evaluated on one labelled set (accuracy in percent, like every accuracy here)."""

    blend: float
    accuracy: float
    cross_entropy: float
    correct: int


@dataclass(frozen=True)
class BlendChoice:
    """The chosen weight, how it was chosen ("validation" or "fixed") and the whole sweep behind it.

    ``fallback`` says which blends were left out of the choice because their validation logits were
    not finite (a fine-tuned pooling that is NaN on some image); None when every point counted.
    """

    blend: float
    selected_by: str
    sweep: tuple[BlendPoint, ...] = ()
    fallback: str | None = None

    def as_record(self) -> dict:
        """Plain values for a run record (``fallback`` only when there was one)."""
        record = {"blend": self.blend, "selected_by": self.selected_by,
                  "sweep": [vars(p).copy() for p in self.sweep]}
        if self.fallback is not None:
            record["fallback"] = self.fallback
        return record


@torch.no_grad()
def sweep_blend(f_ft: torch.Tensor, f_orig: torch.Tensor, labels: torch.Tensor, text_weights: torch.Tensor,
                logit_scale: float, grid: Sequence[float] = DEFAULT_BLEND_GRID,
                by: str = "features") -> tuple[BlendPoint, ...]:
    """Accuracy and cross-entropy at every ``blend`` in ``grid`` (features pooled once, reused), the
    two poolings mixed ``by`` "features" or "logits" (`blended_logits`)."""
    if len(grid) == 0:
        raise ValueError("blend grid is empty; give at least one value in [0, 1]")
    if labels.ndim != 1 or len(labels) != len(f_ft):
        raise ValueError(f"labels must be N={len(f_ft)} class indices, got shape {tuple(labels.shape)}")
    f_ft, f_orig = f_ft.float(), f_orig.float()
    labels = labels.to(f_ft.device)
    points = []
    for blend in grid:
        logits = blended_logits(f_ft, f_orig, text_weights, logit_scale, float(blend), by)
        correct = int((logits.argmax(-1) == labels).sum())
        points.append(BlendPoint(float(blend), 100.0 * correct / len(labels), float(F.cross_entropy(logits, labels)),
                                 correct))
    return tuple(points)


def choose_blend(f_ft: torch.Tensor, f_orig: torch.Tensor, labels: torch.Tensor, text_weights: torch.Tensor,
                 logit_scale: float, grid: Sequence[float] = DEFAULT_BLEND_GRID, by: str = "features") -> BlendChoice:
    """The grid's best ``blend`` on validation features: accuracy, then lower CE, then nearer 0.5.

    Points whose cross-entropy is not finite (NaN fine-tuned features) are left out, with a
    `TrainingWarning` and a note in the choice's ``fallback``; blend 0 needs only CLIP's features,
    so it stays a candidate. If no point is finite the validation features themselves are broken.
    """
    sweep = sweep_blend(f_ft, f_orig, labels, text_weights, logit_scale, grid, by)
    finite = [p for p in sweep if math.isfinite(p.cross_entropy)]
    if not finite:
        raise ValueError("every blend gives non-finite validation logits, so CLIP's own (original) validation "
                         "features are not finite: check the feature cache")
    fallback = None
    if len(finite) < len(sweep):
        left_out = [p.blend for p in sweep if not math.isfinite(p.cross_entropy)]
        fallback = (f"blends {left_out} were left out of the choice: the fine-tuned pooling gives non-finite "
                    f"validation logits there; chosen among {[p.blend for p in finite]}")
        warnings.warn(f"SAFE: {fallback}", TrainingWarning, stacklevel=2)
    # CE compared to 1e-6 relative: float noise must not outrank the 0.5 rule
    best = min(finite, key=lambda p: (-p.correct, _round_rel(p.cross_entropy), abs(p.blend - 0.5)))
    return BlendChoice(best.blend, "validation", sweep, fallback)


def fixed_blend(blend: float) -> BlendChoice:
    """A preset ``blend``: no validation data needed."""
    _check_blend(blend)
    return BlendChoice(float(blend), "fixed")


def _round_rel(x: float, digits: int = 6) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
