"""Prompt templates per dataset: the field's exact wording, so our zero-shot numbers compare with theirs.

The few-shot literature (CoOp, Tip-Adapter) fixed one template per dataset and, for ImageNet, an
ensemble of seven; we keep exactly those. They are dataset metadata, so they live with the datasets.
"""
from __future__ import annotations

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
