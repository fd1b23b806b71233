"""Prompt templates and zero-shot classifier weights.

CLIP classifies by comparing an image feature with the text features of prompts such as
"a photo of a {}, a type of pet.". The few-shot literature (CoOp, Tip-Adapter) fixed one
template per dataset and, for ImageNet, an ensemble of seven; we keep exactly those so our
zero-shot numbers are comparable with theirs. Taught in the book's "Zero-shot CLIP" chapter.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .models import ClipModel

# The 7-template ImageNet ensemble used by Tip-Adapter (CoOp's IMAGENET_TEMPLATES_SELECT).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# CoOp's per-dataset templates (CUSTOM_TEMPLATES), keyed by safelib's dataset names.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "imagenet_v2": IMAGENET_TEMPLATES,
    "imagenet_sketch": IMAGENET_TEMPLATES,
    "imagenet_a": IMAGENET_TEMPLATES,
    "imagenet_r": IMAGENET_TEMPLATES,
    "caltech101": ("a photo of a {}.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "sun397": ("a photo of a {}.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "ucf101": ("a photo of a person doing {}.",),
}


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
