"""The model SAFE adapts: ResNet CLIP loading, the exact one-query attention pooling, zero-shot weights.

Lowest wing of safelib: it imports nothing from the package but ``atomic``.
"""
from .attnpool import attention_pool, attention_weights, trained_grid
from .miniclip import CHECKPOINT, MiniClipConfig, build_miniclip, get_tokenizer
from .models import RESNET_MODELS, ClipModel, load_clip, random_clip, weight_tags
from .text import encode_prompts, zero_shot_classifier

__all__ = [
    "CHECKPOINT", "ClipModel", "MiniClipConfig", "RESNET_MODELS", "attention_pool", "attention_weights",
    "build_miniclip", "encode_prompts", "get_tokenizer", "load_clip", "random_clip", "trained_grid", "weight_tags",
    "zero_shot_classifier",
]
