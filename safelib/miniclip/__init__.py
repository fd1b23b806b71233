"""The mini-CLIP: a small ResNet CLIP pretrained by us on the mini-world, shipped with safelib.

It is the offline default model: `load_clip("miniclip")` calls `build_miniclip()`. See
`safelib/miniclip/pretrain.py` for how `CHECKPOINT` was made and `safelib/assets/` for its log.
"""
from __future__ import annotations

import json
from dataclasses import asdict
import os
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import PreprocessCfg
from open_clip.factory import set_model_preprocess_cfg
from safetensors import safe_open
from safetensors.torch import load_file

from .config import MiniClipConfig, clip_from_config

CHECKPOINT: Path = Path(__file__).resolve().parent.parent / "assets" / "miniclip.safetensors"
META_KEY = "open_clip_config"

__all__ = ["CHECKPOINT", "MiniClipConfig", "build_miniclip", "clip_from_config", "get_tokenizer", "preprocess_images", "read_metadata"]


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a mini-CLIP safetensors file (model config, pretraining summary)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise ValueError(f"{path} has no {META_KEY!r} metadata; is it a mini-CLIP checkpoint from safelib.miniclip.pretrain?")
    return {k: json.loads(v) for k, v in meta.items()}


def build_miniclip(state_dict_path: str | os.PathLike | None = None) -> open_clip.model.CLIP:
    """The mini-CLIP, in eval mode and float32, with weights from `state_dict_path` (default: the shipped one)."""
    path = Path(state_dict_path) if state_dict_path is not None else CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"mini-CLIP checkpoint {path} not found; the shipped one is {CHECKPOINT}, "
            "or train one with `python -m safelib.miniclip.pretrain`"
        )
    model = clip_from_config(read_metadata(path)[META_KEY])
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only BatchNorm's integer step counters are left out of the file (unused in eval mode).
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # What open_clip.create_model records, so open_clip's own transforms work on this model.
    set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=model.visual.image_size)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def get_tokenizer(context_length: int | None = None):
    """The standard CLIP (RN50) tokenizer, cut to the mini-CLIP's context length.

    Its vocabulary ships with open_clip, so it works offline. The default length is the one in
    the shipped checkpoint's config.
    """
    if context_length is None:
        context_length = MiniClipConfig().context_length
        if CHECKPOINT.is_file():
            context_length = read_metadata(CHECKPOINT)[META_KEY]["text_cfg"]["context_length"]
    return open_clip.get_tokenizer("RN50", context_length=context_length)


def preprocess_images(images: np.ndarray) -> torch.Tensor:
    """uint8 images B x S x S x 3 -> normalised float32 B x 3 x S x S (CLIP's mean and std).

    The batched equivalent of the eval transform for images already at the model's size.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)  # BHWC -> BCHW
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
