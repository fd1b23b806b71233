"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import safelib as sl  # noqa: E402


@pytest.fixture(scope="session")
def rn50() -> "sl.ClipModel":
    """A random-weight RN50 CLIP (QuickGELU, as OpenAI's weights), built once per test session."""
    return sl.random_clip("RN50", seed=0)


@pytest.fixture(scope="session")
def tiny_clip() -> "sl.ClipModel":
    """A random ResNet CLIP small enough that text-side tests take milliseconds, not minutes."""
    import open_clip

    from safelib.clip.models import _wrap

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, width=64, heads=2, layers=2),
        quick_gelu=True,
    )
    return _wrap("tiny", None, model, open_clip.get_tokenizer("RN50"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
