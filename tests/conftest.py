"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

import safelib as sl  # noqa: E402


def build_tiny_clip(seed: int = 0) -> "sl.ClipModel":
    """A random ResNet CLIP small enough for many CPU tests: 64 px, 2x2 grid, C=256, D=32, 4 heads, 16-token prompts.

    Wrapped by ``sl.clip.wrap_clip`` exactly as ``load_clip`` wraps its models (frozen, eval transform, tokenizer).
    """
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=64,
                                                                  head_width=64),
                           text_cfg=CLIPTextCfg(context_length=16, width=32, heads=2, layers=1))
    return sl.clip.wrap_clip("tiny", None, model, open_clip.get_tokenizer("RN50", context_length=16))


@pytest.fixture(scope="session")
def rn50() -> "sl.ClipModel":
    """A random-weight RN50 CLIP (QuickGELU, as OpenAI's weights), built once per test session."""
    return sl.random_clip("RN50", seed=0)


@pytest.fixture(scope="session")
def tiny_clip() -> "sl.ClipModel":
    """One tiny CLIP shared by the whole session: for tests that only read it."""
    return build_tiny_clip()


@pytest.fixture(scope="session")
def make_tiny_clip():
    """``build_tiny_clip`` itself, for tests that need their own copy or another seed: ``make_tiny_clip(seed=1)``."""
    return build_tiny_clip


def build_channel_block_task(clip: "sl.ClipModel", classes: int, n: int = 24, views: int = 2, seed: int = 0):
    """A small separable task on dense maps: class k brightens a class-specific channel block.

    Returns (dense V x N x C x S x S, labels N, unit text weights D x classes).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    c, s = clip.dense_channels, clip.grid
    dense = torch.rand(views, n, c, s, s, generator=g)
    block = c // classes
    for k in range(classes):
        dense[:, labels == k, k * block:(k + 1) * block] += 1.0
    text = torch.nn.functional.normalize(torch.randn(clip.embed_dim, classes, generator=g), dim=0)
    return dense, labels, text


@pytest.fixture(scope="session")
def make_channel_block_task():
    """``build_channel_block_task``, shared by the SAFE and ablation tests."""
    return build_channel_block_task


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
