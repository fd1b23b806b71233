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


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
