"""Load a ResNet CLIP and split it where SAFE needs it: frozen trunk | attention pooling.

SAFE trains only `visual.attnpool`, so everything below it (stem, layer1..layer4) is a frozen
feature extractor that runs once per image view. `ClipModel` bundles the open_clip model with
that split, the eval transform and the tokenizer. Only ResNet CLIPs have an attention-pooling
layer; ViTs pool with a class token and are refused. Taught in notebooks/01_attention_pooling.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import weakref
from dataclasses import dataclass
from urllib.parse import urlparse
from pathlib import Path
from typing import Callable

import huggingface_hub.constants as hub
import open_clip
import torch
from torch import nn

from .attnpool import attention_pool
from ..seeding import seeded
from .miniclip import CHECKPOINT, build_miniclip, file_sha256, load_weights_file, record_preprocess_cfg

# Every open_clip ResNet CLIP and the weight tags open_clip knows for it.
RESNET_MODELS: tuple[str, ...] = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
MINICLIP = "miniclip"


def valid_model_names() -> tuple[str, ...]:
    return (*RESNET_MODELS, MINICLIP)


def weight_tags(name: str) -> tuple[str, ...]:
    """Pretrained tags open_clip can fetch for `name` (e.g. RN50: openai, yfcc15m, cc12m)."""
    _check_model_name(name)
    if name == MINICLIP:
        return ("shipped",)
    return tuple(open_clip.list_pretrained_tags_by_model(name))


def _check_model_name(name: str) -> None:
    if name in valid_model_names():
        return
    valid = ", ".join(valid_model_names())
    base = name.removesuffix("-quickgelu")
    if base in RESNET_MODELS:
        raise ValueError(f"use the plain name {base!r}: load_clip sets QuickGELU itself when the weights need it")
    if name in open_clip.list_models():
        raise ValueError(
            f"{name!r} is not a ResNet CLIP. SAFE fine-tunes the attention-pooling layer (visual.attnpool) that "
            f"only ResNet CLIPs have; a ViT pools with a class token instead. Valid names: {valid}."
        )
    raise ValueError(f"unknown model {name!r}. Valid names: {valid}.")


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether open_clip's weights tag `pretrained` was trained with QuickGELU (the text tower's activation).

    open_clip builds nn.GELU for the plain names and only warns, so OpenAI weights would run
    with the wrong activation. Every published ResNet CLIP weight set (openai, yfcc15m, cc12m)
    used QuickGELU, so `load_clip` gives a local weights file QuickGELU too (it has no switch for
    a file trained with GELU).
    """
    if pretrained is None:
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


@dataclass(eq=False)
class ClipModel:
    """An open_clip ResNet CLIP, frozen, with the trunk / attention-pooling split SAFE uses."""

    name: str
    pretrained: str | None
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def attnpool(self) -> nn.Module:
        return self.model.visual.attnpool

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def grid(self) -> int:
        return self.image_size // 32

    @property
    def dense_channels(self) -> int:
        return self.attnpool.positional_embedding.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.attnpool.c_proj.out_features

    @property
    def num_heads(self) -> int:
        return self.attnpool.num_heads

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(open_clip.get_model_preprocess_cfg(self.model)["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(open_clip.get_model_preprocess_cfg(self.model)["std"])

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: str | torch.device) -> "ClipModel":
        self.model.to(device)
        return self

    @torch.no_grad()
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen stem..layer4: N x 3 x S x S images -> N x C x S/32 x S/32 dense maps."""
        out = self.visual.forward_intermediates(images, indices=1, intermediates_only=True)
        return out["image_intermediates"][-1]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised pooled features N x D (trunk, then the fast exact attention pooling)."""
        return attention_pool(self.attnpool, self.trunk(images))


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def wrap_clip(name: str, pretrained: str | None, model: nn.Module, tokenizer: Callable) -> ClipModel:
    """A `ClipModel` around an open_clip ResNet CLIP, as `load_clip` returns it: frozen, in eval mode,
    with its eval transform. For models built by hand (the mini-CLIP, the tests' tiny ones)."""
    record_preprocess_cfg(model)
    cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = open_clip.image_transform(
        model.visual.image_size, is_train=False, mean=cfg["mean"], std=cfg["std"],
        interpolation=cfg.get("interpolation", "bicubic"), resize_mode=cfg.get("resize_mode", "shortest"),
    )
    return ClipModel(name, pretrained, _freeze(model), preprocess, tokenizer)


def _weights_error(name: str, pretrained: str, error: Exception) -> RuntimeError:
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    tried = ", ".join(f"{key}={cfg[key]}" for key in ("hf_hub", "url") if cfg.get(key)) or "nothing"
    offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return RuntimeError(
        f"could not fetch {pretrained!r} weights for {name}{offline}: {type(error).__name__}: {error}. "
        f"Tried: {tried}. On a machine with internet run load_clip({name!r}, {pretrained!r}) once "
        f"(or download the file yourself), then pass pretrained='/path/to/weights.safetensors' "
        f"(or a state-dict .pt/.bin), or cache_dir= pointing at the downloaded files."
    )


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable(name: str, pretrained: str):
    """Fail in milliseconds, not minutes, when the hub can't be reached.

    huggingface_hub retries an unreachable host with back-off for about a minute. If no host
    the weights could come from answers, switch the hub to offline mode for this call only, so
    weights already in the local cache still load and missing ones fail at once.
    """
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    hosts = [urlparse(endpoint).hostname] if cfg.get("hf_hub") else []
    hosts += [urlparse(cfg["url"]).hostname] if cfg.get("url") else []
    if hub.HF_HUB_OFFLINE or any(_reachable(host) for host in hosts if host):
        yield
        return
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = "openai",
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Load a ResNet CLIP for SAFE.

    name: RN50, RN101, RN50x4, RN50x16, RN50x64, or "miniclip" (ours, shipped, offline).
    pretrained: an open_clip tag (openai, yfcc15m, cc12m), a local weights file
        (safetensors, or a state dict loaded with weights_only=True), or None for random weights.
        For "miniclip": "shipped" (also what the default tag means) or a mini-CLIP checkpoint file;
        None is refused (its architecture comes from a checkpoint: it has no random variant).
    Random weights (None) are drawn from a fixed seed, so two loads are the same model and a run on
    them can be resumed and compared.
    """
    _check_model_name(name)
    if name == MINICLIP:
        if pretrained is None:
            raise ValueError("weights None (random) is not available for miniclip: its architecture comes from "
                             "its checkpoint; use 'shipped' or a mini-CLIP checkpoint file")
        # the default tag ("openai") means "the weights this model comes with": the shipped ones
        shipped = pretrained in ("shipped", "openai")
        model = build_miniclip(CHECKPOINT if shipped else Path(pretrained))
        tokenizer = open_clip.get_tokenizer("RN50", context_length=model.context_length)
        return wrap_clip(name, "shipped" if shipped else str(pretrained), model, tokenizer).to(device)
    is_file = pretrained is not None and Path(pretrained).exists()
    if pretrained is not None:
        pretrained = str(pretrained)
        if not is_file and pretrained not in weight_tags(name):
            if Path(pretrained).suffix:
                raise FileNotFoundError(f"weights file {pretrained!r} does not exist")
            raise ValueError(
                f"unknown weights {pretrained!r} for {name}. Valid tags: {', '.join(weight_tags(name))}; "
                "or a path to a local weights file."
            )
    if is_file and Path(pretrained).suffix == ".safetensors":
        # our own reader: a corrupt file or another architecture's weights are named, not an AssertionError
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True, device=device)
        load_weights_file(model, pretrained, what=name)
        return wrap_clip(name, pretrained, model, open_clip.get_tokenizer(name))
    fetching = pretrained is not None and not is_file
    try:
        with (_hub_offline_if_unreachable(name, pretrained) if fetching else contextlib.nullcontext()), \
                seeded(RANDOM_WEIGHTS_SEED if pretrained is None else None):
            model = open_clip.create_model(
                name, pretrained=pretrained, force_quick_gelu=is_file or uses_quick_gelu(name, pretrained),
                cache_dir=None if cache_dir is None else str(cache_dir), device=device, weights_only=True,
            )
    except (OSError, RuntimeError, ValueError, AssertionError) as error:
        if is_file:
            raise ValueError(f"{pretrained} could not be loaded as {name} weights ({type(error).__name__}: {error}); "
                             "is it a state dict saved from this model?") from error
        if not fetching:
            raise
        raise _weights_error(name, pretrained, error) from error
    return wrap_clip(name, pretrained, model, open_clip.get_tokenizer(name))


RANDOM_WEIGHTS_SEED = 0


def weights_file_digest(name: str, weights: str | os.PathLike | None) -> str | None:
    """A content hash of the file that ``load_clip(name, weights)`` reads, or None for open_clip tags and
    random weights (a published tag names fixed content; random weights are drawn from a fixed seed).

    Part of a run's identity: a weights file replaced at the same path (a re-pretrained mini-CLIP,
    an edited checkpoint) gives a new identity, so resume never returns the old file's records.
    """
    if weights is None:
        return None
    if name == MINICLIP and str(weights) in ("shipped", "openai"):
        path = CHECKPOINT
    else:
        path = Path(weights)
        if not path.is_file():
            return None  # a tag
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (first 16 hex digits); size and mtime only key the memo, never the digest."""
    return file_sha256(path)[:16]


_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def cached_module_digest(module: nn.Module) -> str:
    """``module_digest``, computed once per module (weights are frozen once loaded), dropped with it."""
    if module not in _DIGESTS:
        _DIGESTS[module] = module_digest(module)
    return _DIGESTS[module]


def clip_digest(clip: "ClipModel") -> str:
    """The whole model's digest (both towers): what a record says was loaded, whatever the weights' name."""
    return cached_module_digest(clip.model)


def random_clip(name: str = "RN50", seed: int = 0, quick_gelu: bool = True) -> ClipModel:
    """A random-weight ResNet CLIP wrapped like `load_clip`'s: plumbing and exactness tests, no download."""
    _check_model_name(name)
    if name == MINICLIP:
        raise ValueError("miniclip ships trained weights: use load_clip('miniclip')")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    return wrap_clip(name, None, model, open_clip.get_tokenizer(name))


def module_digest(module: nn.Module) -> str:
    """A 16-hex-digit hash of a module's weights (names and float32 values), whatever its tags say.

    A name ("shipped", a file path) cannot tell weights apart: a re-pretrained or replaced file keeps
    its name. Used for the feature cache's key (the image tower) and by ``SafeClassifier`` to check
    that a saved file runs on the weights it was fitted on.
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
