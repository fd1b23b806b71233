"""Attention pooling of CLIP's ResNet, computed for the one token that matters.

open_clip's `AttentionPool2d` prepends the mean of the dense map as an extra token, adds a
positional embedding, runs full multi-head self-attention over all 1 + H*W tokens and keeps
only output token 0. Only token 0's *query* is ever used, so the same result follows from
one query, re-associated so no H*W keys or values are materialised:

    t_i  = x_i + p_i               (t_0 = mean_i x_i + p_0)
    q0   = Wq t_0 + bq
    u_h  = Wk_h^T q0_h / sqrt(d)   the key bias adds q0_h . bk_h to every score: it cancels
    a_h  = softmax_i(u_h . t_i)    head h's attention over tokens (what the book draws)
    z_h  = sum_i a_h,i t_i         attention-weighted token mean (sum_i a_h,i = 1, so ...)
    out  = Wc concat_h(Wv_h z_h + bv_h) + bc   (... the value bias passes through unchanged)

This is algebra, not an approximation: `tests/test_attnpool.py` checks it against a float64
ground truth. Taught in the book's "Attention pooling" chapter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def trained_grid(attnpool: nn.Module) -> int:
    """Side of the square grid the positional embedding was trained on (7 for RN50 at 224 px)."""
    side = math.isqrt(attnpool.positional_embedding.shape[0] - 1)
    return side


def positional_embedding(attnpool: nn.Module, height: int, width: int, interpolate: bool = False) -> torch.Tensor:
    """(1 + H*W) x C positional embedding for an H x W dense map.

    A grid other than the trained one is refused unless `interpolate=True`: bicubic
    interpolation of the spatial part is common practice but changes the model, so pooled
    features are then no longer CLIP's own.
    """
    pos = attnpool.positional_embedding
    side = trained_grid(attnpool)
    if (height, width) == (side, side):
        return pos
    if not interpolate:
        raise ValueError(
            f"dense map grid {height}x{width} differs from the {side}x{side} grid this attnpool's positional "
            f"embedding was trained on (images of {side * 32} px for this model). Resize images to "
            f"{side * 32} px, or pass interpolate_pos=True to interpolate the positional embedding "
            "(not exact: the pooled features are no longer the model's own)."
        )
    spatial = pos[1:].T.reshape(1, -1, side, side)                              # 1 x C x S x S
    spatial = F.interpolate(spatial.float(), size=(height, width), mode="bicubic", align_corners=False)
    spatial = spatial.to(pos.dtype).reshape(-1, height * width).T               # HW x C
    return torch.cat([pos[:1], spatial])


def _split_tokens(attnpool: nn.Module, dense: torch.Tensor, interpolate_pos: bool):
    """The tokens t_i = x_i + p_i, kept apart as (x, mean, p) and never materialised.

    Keeping the dense map in its own N x C x HW layout saves a 1 + H*W token copy, and keeping
    p apart turns its products into single large matrix products; when the dense maps need no
    gradient (SAFE trains on cached maps) backward then skips the per-sample map gradients.
    """
    if dense.ndim != 4:
        raise ValueError(f"dense maps must be N x C x H x W, got shape {tuple(dense.shape)}")
    _, channels, height, width = dense.shape
    expected = attnpool.positional_embedding.shape[1]
    if channels != expected:
        raise ValueError(f"dense maps have {channels} channels but this attnpool expects {expected}")
    # cached maps are fp16; compute in the pooling's own dtype (a no-op when they match)
    x = dense.to(attnpool.q_proj.weight.dtype).flatten(2)    # N x C x HW (a view)
    mean = x.mean(dim=-1)                                     # N x C, token 0 before its p_0
    pos = positional_embedding(attnpool, height, width, interpolate_pos).to(x.dtype)  # (1+HW) x C
    return x, mean, pos


def _attention(attnpool: nn.Module, x: torch.Tensor, mean: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Head-wise attention of token 0 over all tokens: N x heads x (1 + H*W)."""
    n, channels, _ = x.shape
    heads = attnpool.num_heads
    head_dim = channels // heads
    q0 = F.linear(mean + pos[0], attnpool.q_proj.weight, attnpool.q_proj.bias)    # N x C
    q0 = q0 * head_dim ** -0.5                # scale the one query, not N x heads x C products
    wk = attnpool.k_proj.weight.view(heads, head_dim, channels)                    # heads x d x C
    u = torch.einsum("nhd,hdc->nhc", q0.view(n, heads, head_dim), wk)              # N x heads x C
    scores = torch.cat([torch.bmm(u, mean.unsqueeze(-1)), torch.bmm(u, x)], dim=-1)  # u . x_i
    scores = scores + u @ pos.T                                                     # + u . p_i
    # softmax in float32 at least: fp16 exponentials of peaky scores lose the small weights
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)


def attention_weights(attnpool: nn.Module, dense: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
    """Where the pooling looks: N x heads x (1 + H*W), rows sum to 1, index 0 is the mean token."""
    return _attention(attnpool, *_split_tokens(attnpool, dense, interpolate_pos))


def attention_pool(attnpool: nn.Module, dense: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
    """Pooled features N x D, equal to `attnpool(dense)` and differentiable in every attnpool tensor."""
    x, mean, pos = _split_tokens(attnpool, dense, interpolate_pos)                  # N x C x HW, N x C, L x C
    n, channels, _ = x.shape
    heads = attnpool.num_heads
    head_dim = channels // heads
    attention = _attention(attnpool, x, mean, pos)                                  # N x heads x L
    z = torch.baddbmm(                                                               # z = sum_i a_i t_i, in parts:
        attention @ pos + attention[..., :1] * mean.unsqueeze(1),                    # a . p + a_0 mean
        attention[..., 1:], x.transpose(1, 2),                                       # + a_i x_i
    )                                                                                # N x heads x C
    wv = attnpool.v_proj.weight.view(heads, head_dim, channels)                     # heads x d x C
    values = torch.einsum("nhc,hdc->nhd", z, wv) + attnpool.v_proj.bias.view(heads, head_dim)
    return F.linear(values.reshape(n, channels), attnpool.c_proj.weight, attnpool.c_proj.bias)
