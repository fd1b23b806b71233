"""A fitted SAFE model as one object: images in, class logits out; saved and loaded as a file.

It holds what SAFE adds to CLIP (the fine-tuned attnpool, the text classifier, the blend, the
class names and prompt templates) and borrows the frozen trunk and original attnpool from a
``ClipModel``. The file is safetensors (no pickle: safe to receive from someone else) with the
metadata needed to rebuild it; loading onto another backbone or other weights is refused: the file
holds the digest of the whole image tower (trunk and pooling) it was fitted on.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from ..clip.miniclip import read_safetensors
from ..clip.models import ClipModel, load_clip, module_digest
from .safe import Safe, safe_features, safe_logits

# /3: the digest covers the whole image tower (``module_digest`` of ``visual``, the value the feature cache keys
# on), not only attnpool: the trunk makes the dense maps, so a file fitted on one trunk gives other logits on
# another. Computed afresh, not memoised per model: weights edited in place must not pass.
FILE_FORMAT = "safelib.SafeClassifier/3"
OLD_FORMATS = ("safelib.SafeClassifier/1", "safelib.SafeClassifier/2")


class SafeClassifier(nn.Module):
    """``logits = logit_scale * blend(f_ft, f_orig) @ W_text`` for preprocessed images N x 3 x S x S.

    ``clip``'s trunk and original attnpool stay frozen and are not part of the saved file; only
    ``attnpool`` (the fine-tuned copy) and ``text_weights`` (D x K) are. ``clip`` is borrowed, not a
    submodule: move it with ``clip.to(device)`` alongside ``classifier.to(device)``.
    """

    def __init__(self, clip: ClipModel, attnpool: nn.Module, text_weights: Tensor, classnames: Sequence[str],
                 templates: Sequence[str], blend: float):
        super().__init__()
        if text_weights.ndim != 2 or text_weights.shape[0] != clip.embed_dim:
            raise ValueError(f"text_weights must be D x K with D={clip.embed_dim}, got {tuple(text_weights.shape)}")
        if len(classnames) != text_weights.shape[1]:
            raise ValueError(f"{len(classnames)} classnames for {text_weights.shape[1]} text_weights columns")
        if not 0 <= blend <= 1:
            raise ValueError(f"blend must be in [0, 1], got {blend}")
        if attnpool.state_dict().keys() != clip.attnpool.state_dict().keys():
            raise ValueError("attnpool is not an attention pooling of this clip's kind (its tensors differ)")
        self.clip = clip
        self.attnpool = attnpool.eval().requires_grad_(False)
        self.register_buffer("text_weights", text_weights.detach().float().clone())
        self.classnames, self.templates, self.blend = tuple(classnames), tuple(templates), float(blend)

    @classmethod
    def from_safe(cls, clip: ClipModel, method: Safe, templates: Sequence[str]) -> "SafeClassifier":
        """Package a fitted ``Safe`` method (its attnpool, text classifier, chosen blend) with ``clip``."""
        if not isinstance(method, Safe):
            raise TypeError(f"from_safe packages a fitted Safe method, got {type(method).__name__}")
        if not method.fitted:
            raise RuntimeError("fit the Safe method before packaging it")
        if method.config.blend_by != "features" or method.config.background:
            raise ValueError("SafeClassifier packages SAFE with feature blending and no background query; this Safe "
                             f"has blend_by={method.config.blend_by!r}, background={method.config.background}")
        head = method.head
        classnames = head.classnames or tuple(f"class {k}" for k in range(head.num_classes))
        return cls(clip, method.training.attnpool, head.classifier, classnames, templates, method.blend.blend)

    @torch.no_grad()
    def features_from_dense(self, dense: Tensor) -> Tensor:
        """Blended unit features N x D from dense maps N x C x H x W (``safe_features``, as ``Safe`` predicts)."""
        return safe_features(self.attnpool, self.clip.attnpool, dense.to(self.text_weights.device), self.blend)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Class logits N x K for preprocessed images N x 3 x S x S (``safe_logits``, as ``Safe`` predicts)."""
        dense = self.clip.trunk(images.to(self.text_weights.device))                  # N x C x H x W
        return safe_logits(self.attnpool, self.clip.attnpool, dense, self.text_weights, self.clip.logit_scale,
                           self.blend)

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[str]:
        """Class names of the most likely class."""
        return [self.classnames[k] for k in self(images).argmax(-1).tolist()]

    def metadata(self) -> dict[str, str]:
        return {
            "format": FILE_FORMAT, "backbone": self.clip.name, "weights": "" if self.clip.pretrained is None else str(self.clip.pretrained),
            "visual_digest": module_digest(self.clip.visual),
            "classnames": json.dumps(self.classnames), "templates": json.dumps(self.templates),
            "blend": repr(self.blend),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a .safetensors file atomically (temp file, then rename)."""
        path = Path(path)
        tensors = {f"attnpool.{k}": v.detach().cpu().contiguous() for k, v in self.attnpool.state_dict().items()}
        tensors["text_weights"] = self.text_weights.cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, clip: ClipModel | None = None) -> "SafeClassifier":
        """Rebuild from ``save``'s file onto ``clip`` (default: ``load_clip`` of the saved backbone and weights)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SafeClassifier file at {path}")
        tensors, meta = read_safetensors(path)
        if meta.get("format") in OLD_FORMATS:
            raise ValueError(f"{path} was saved by an older safelib (format {meta['format']!r}), whose check of the "
                             f"model covered only the attention pooling; this one reads {FILE_FORMAT!r}. Fit and "
                             "save the classifier again")
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a SafeClassifier file (format {meta.get('format')!r}, "
                             f"expected {FILE_FORMAT!r})")
        missing = [k for k in ("backbone", "weights", "visual_digest", "classnames", "templates", "blend")
                   if k not in meta]
        if missing:
            raise ValueError(f"{path} is a damaged SafeClassifier file: its metadata lacks {missing}; save it again")
        if clip is None:
            clip = load_clip(meta["backbone"], meta["weights"] or None)
        if clip.name != meta["backbone"]:
            raise ValueError(f"{path} was fitted on backbone {meta['backbone']!r}; it cannot run on {clip.name!r}. "
                             f"Load it with sl.load_clip({meta['backbone']!r}, {meta['weights']!r}).")
        digest = module_digest(clip.visual)
        if digest != meta["visual_digest"]:
            raise ValueError(f"{path} was fitted on {meta['backbone']} with weights {meta['weights']!r}, but the "
                             f"given model's weights ({clip.pretrained!r}) differ (image tower digest {digest} != "
                             f"{meta['visual_digest']}: trunk or pooling); load the same weights")
        try:
            attnpool = copy.deepcopy(clip.attnpool)
            attnpool.load_state_dict({k.removeprefix("attnpool."): v for k, v in tensors.items()
                                      if k.startswith("attnpool.")})
            return cls(clip, attnpool.to(clip.device), tensors["text_weights"].to(clip.device),
                       json.loads(meta["classnames"]), json.loads(meta["templates"]), float(meta["blend"]))
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # RuntimeError: from load_state_dict
            detail = " ".join(str(err).split())  # on one line: load_state_dict's message spans several
            raise ValueError(f"{path} is a damaged SafeClassifier file ({type(err).__name__}: {detail}); "
                             "save it again") from None
