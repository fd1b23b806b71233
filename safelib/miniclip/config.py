"""The mini-CLIP's architecture: an open_clip `CLIP` with a ModifiedResNet vision tower.

Why these sizes: they train on a 2-core CPU in under an hour, yet keep every part SAFE touches:
a real `attnpool` (8 heads over a 4 x 4 grid of 512-channel tokens plus the mean token) and a
text transformer fed by the standard CLIP tokenizer, so prompts work as they do for RN50.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import open_clip


@dataclass(frozen=True)
class MiniClipConfig:
    """open_clip model config (the dict `open_clip.model.CLIP(**to_open_clip())` takes)."""

    embed_dim: int = 128
    image_size: int = 128  # 128 px / stride 32 -> a 4 x 4 attention-pooling grid
    vision_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    vision_width: int = 16  # dense channels = 32 * width = 512; heads = 512 // 64 = 8
    text_width: int = 128
    text_heads: int = 2
    text_layers: int = 2
    context_length: int = 40  # captions are <= ~37 tokens; 40 instead of 77 halves the text cost

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the ResNet's stride), got {self.image_size}")
        if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
            raise ValueError(f"vision_layers must be 4 positive block counts, got {self.vision_layers}")
        if (self.vision_width * 32) % 64:
            raise ValueError(f"vision_width * 32 must be a multiple of the head width 64, got width {self.vision_width}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // 32

    def to_open_clip(self) -> dict:
        """The keyword arguments of `open_clip.model.CLIP`, JSON-serialisable."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "layers": list(self.vision_layers),
                "width": self.vision_width,
                "head_width": 64,
                "image_size": self.image_size,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
            "quick_gelu": False,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def clip_from_config(model_cfg: dict) -> open_clip.model.CLIP:
    """Build an open_clip CLIP from `to_open_clip()`'s dict (as stored in the checkpoint)."""
    cfg = dict(model_cfg)
    vision = dict(cfg.pop("vision_cfg"))
    if isinstance(vision.get("layers"), list):
        vision["layers"] = tuple(vision["layers"])  # a tuple is what selects ModifiedResNet
    return open_clip.model.CLIP(
        vision_cfg=open_clip.model.CLIPVisionCfg(**vision),
        text_cfg=open_clip.model.CLIPTextCfg(**cfg.pop("text_cfg")),
        **cfg,
    )
