"""The model SAFE adapts: ResNet CLIP loading, the exact one-query attention pooling, zero-shot weights and logits.

Lowest wing of safelib: it imports nothing from the package but ``atomic``.
"""
from .attnpool import attention_pool, attention_weights, grid_side, spatial_attention, trained_grid
from .miniclip import CHECKPOINT, MiniClipConfig, build_miniclip, get_tokenizer
from .models import (RESNET_MODELS, ClipModel, clip_digest, load_clip, module_digest, random_clip, weight_tags,
                     weights_file_digest, wrap_clip)
from .text import class_logits, encode_prompts, zero_shot_classifier

__all__ = [
    "CHECKPOINT", "ClipModel", "MiniClipConfig", "RESNET_MODELS", "attention_pool", "attention_weights",
    "build_miniclip", "class_logits", "clip_digest", "module_digest", "weights_file_digest", "encode_prompts", "get_tokenizer", "grid_side", "load_clip", "random_clip",
    "spatial_attention", "trained_grid", "weight_tags", "wrap_clip", "zero_shot_classifier",
]
