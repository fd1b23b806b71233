"""The mini-CLIP: a small ResNet CLIP pretrained by us on the mini-world, shipped with safelib.

Its architecture is an open_clip ``CLIP`` with a ModifiedResNet vision tower. Why these sizes:
they train on a 2-core CPU in under an hour, yet keep every part SAFE touches: a real ``attnpool``
(8 heads over a 4 x 4 grid of 512-channel tokens plus the mean token) and a text transformer fed by
the standard CLIP tokenizer, so prompts work as they do for RN50.

It is the offline default model: ``load_clip("miniclip")`` calls ``build_miniclip()``. How
``CHECKPOINT`` was made: ``safelib/experiments/miniclip_pretrain.py``; its log: ``safelib/assets/``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import open_clip
import torch
from open_clip.factory import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from safetensors import SafetensorError, safe_open
from torch import nn

from ..atomic import atomic_write_text

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

CHECKPOINT: Path = Path(__file__).resolve().parent.parent / "assets" / "miniclip.safetensors"
META_KEY = "open_clip_config"

__all__ = ["CHECKPOINT", "MiniClipConfig", "build_miniclip", "clip_from_config", "get_tokenizer", "load_weights_file",
           "read_metadata", "read_safetensors", "record_preprocess_cfg"]


def record_preprocess_cfg(model: open_clip.model.CLIP) -> None:
    """Give a model built by hand what ``open_clip.create_model`` records: CLIP's preprocessing for its size.

    Then open_clip's own transforms (and ``ClipModel.mean``/``std``) work on it. A model that
    already has a mean (one from ``create_model``) is left as it is.
    """
    if "mean" not in open_clip.get_model_preprocess_cfg(model):
        set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=model.visual.image_size)))


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator:
    """``safe_open`` whose errors name the file: safetensors' own ("header too large") do not."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}); it is damaged, truncated or another "
                         "format: save or download it again") from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the raw metadata of a safetensors file; a damaged file is a ``ValueError`` naming it."""
    with _opened(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a mini-CLIP safetensors file (model config, pretraining summary)."""
    with _opened(path) as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise ValueError(f"{path} has no {META_KEY!r} metadata; is it a mini-CLIP checkpoint from safelib.experiments.miniclip_pretrain?")
    try:
        return {k: json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its metadata is not JSON ({err}); the file was edited or damaged") from None


def load_weights_file(model: nn.Module, path: str | os.PathLike, what: str) -> dict[str, str]:
    """Load a safetensors state dict into ``model`` (``what`` names it in errors); returns the file's metadata.

    Weights of another architecture are refused up front, naming the file and the first tensors that
    differ, instead of an ``AssertionError`` or a size-mismatch ``RuntimeError`` from deep inside.
    BatchNorm's step counters may be left out of the file (unused in eval mode).
    """
    tensors, metadata = read_safetensors(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    resized = [f"{k} {found[k]} (the model has {expected[k]})" for k in found
               if k in expected and found[k] != expected[k]]
    if missing or unexpected or resized:
        differences = [f"{label} {items[:3]}" + (f" and {len(items) - 3} more" if len(items) > 3 else "")
                       for label, items in (("missing", missing), ("unexpected", unexpected), ("other shapes", resized))
                       if items]
        raise ValueError(f"{path} holds weights of another architecture than {what}: {'; '.join(differences)}. "
                         "Load it with the model it was saved from")
    model.load_state_dict(tensors, strict=False)  # copies into the model's own dtype (float32)
    return metadata


DIGEST_SUFFIX = ".sha256"  # beside a checkpoint we exported: its bytes' sha256 (safetensors has no checksum)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_digest_beside(path: str | os.PathLike) -> Path:
    """Write ``path``'s sha256 to ``path.sha256`` (``sha256sum`` format), so a damaged copy is caught on load."""
    path = Path(path)
    return atomic_write_text(path.with_name(path.name + DIGEST_SUFFIX), f"{file_sha256(path)}  {path.name}\n")


def check_digest_beside(path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose bytes no longer match the sha256 written beside it when it was exported.

    safetensors stores no checksum, so a flipped byte in a tensor loads without error and silently
    changes every number computed with the model; the digest file catches that. No digest file: no check.
    """
    path = Path(path)
    beside = path.with_name(path.name + DIGEST_SUFFIX)
    if not beside.is_file():
        return
    words = beside.read_text().split()
    expected = words[0] if words else ""
    found = file_sha256(path)
    if found != expected:
        raise ValueError(f"{path} is damaged or was edited: its sha256 is {found[:16]}..., but {beside.name} "
                         f"recorded {expected[:16]}... when it was exported. Reinstall safelib for the shipped "
                         "mini-CLIP, or export the checkpoint again")


def build_miniclip(state_dict_path: str | os.PathLike | None = None) -> open_clip.model.CLIP:
    """The mini-CLIP, in eval mode and float32, with weights from `state_dict_path` (default: the shipped one)."""
    path = Path(state_dict_path) if state_dict_path is not None else CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"mini-CLIP checkpoint {path} not found; the shipped one is {CHECKPOINT}, "
            "or train one with `python -m safelib.experiments.miniclip_pretrain`"
        )
    check_digest_beside(path)
    config = read_metadata(path)[META_KEY]
    try:
        model = clip_from_config(config)
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: its {META_KEY!r} metadata does not describe a mini-CLIP ({type(err).__name__}: "
                         f"{err}); the file was edited or is not a mini-CLIP checkpoint") from None
    load_weights_file(model, path, "the mini-CLIP its metadata describes")
    record_preprocess_cfg(model)
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
