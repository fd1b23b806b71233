"""Draw from a fixed seed without disturbing the caller's random state.

Random-weight models (``load_clip``) and the adapters' training loops both need a seed of their own;
forking torch's CPU generator keeps whatever the caller drew before and after exactly as it was.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block under a fixed CPU seed, then restore the caller's random state (no-op for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
