"""Zero-shot classifier weights: the text features of prompts, one unit column per class.

CLIP classifies by comparing an image feature with the text features of prompts such as
"a photo of a {}, a type of pet.". The prompts themselves are dataset metadata
(``safelib.data.templates``); this module only encodes them, and holds CLIP's logits
``logit_scale * cos(f, w_k)``. Taught in notebooks/01_attention_pooling, section "Zero-shot classification".
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .models import ClipModel


def _check_prompts(classnames: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError("classnames must be a non-empty sequence of class names, e.g. ['cat', 'dog']")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError("templates must be a non-empty sequence of strings, e.g. ['a photo of a {}.']")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name")


@torch.no_grad()
def encode_prompts(clip: "ClipModel", prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-norm text features (P x D, float32) of `prompts`, encoded in batches to bound memory."""
    device = clip.device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = clip.tokenizer(list(prompts[start:start + batch_size])).to(device)
        chunks.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1))
    return torch.cat(chunks)


def zero_shot_classifier(
    clip: "ClipModel",
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompt-ensemble classifier W (D x K, float32, unit columns).

    Per class: normalise each template's text feature, average over templates, renormalise —
    the ensembling of the CLIP paper, which averages directions rather than raw features.
    """
    _check_prompts(classnames, templates)
    prompts = [template.format(name) for name in classnames for template in templates]
    text = encode_prompts(clip, prompts, batch_size)                 # (K*T) x D
    text = text.view(len(classnames), len(templates), -1).mean(1)   # K x D
    return F.normalize(text, dim=-1).T.contiguous()                  # D x K


def class_logits(features: torch.Tensor, text_weights: torch.Tensor, logit_scale: float,
                 normalize: bool = True) -> torch.Tensor:
    """CLIP's logits N x K: ``logit_scale * normalize(f) @ W``, i.e. ``logit_scale * cos(f, w_k)``.

    text_weights: D x K unit columns (``zero_shot_classifier``), moved to the features' device and
    dtype. The one copy of the formula: zero-shot CLIP, SAFE, the baselines and the book all call it.
    ``normalize=False`` is for features that are already unit-norm: normalising twice would move the
    last bits of the logits.
    """
    if features.shape[-1] != text_weights.shape[0]:
        raise ValueError(f"features have D={features.shape[-1]} but text_weights are {tuple(text_weights.shape)} "
                         "(expected D x K)")
    if normalize:
        features = F.normalize(features, dim=-1)
    return logit_scale * features @ text_weights.to(device=features.device, dtype=features.dtype)  # N x K
