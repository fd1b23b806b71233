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

How it is computed: the 1 + H*W tokens are built once, every other step is a (batched) matrix
product, and float32/float64 training runs a hand-written backward (`_FusedPool`) that reuses the
forward's spent blocks: about 20x open_clip's forward + backward on RN50 on a CPU
(`tests/benchmarks/bench_attnpool.py`, `tests/benchmarks/RESULTS.md`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def trained_grid(attnpool: nn.Module) -> int:
    """Side of the square grid the positional embedding was trained on (7 for RN50 at 224 px)."""
    return grid_side(attnpool.positional_embedding.shape[0])


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


# Token block per chunk of samples: bounds the saved activations of a huge batch. Measured at batch 128
# (RN50, 52 MB of tokens) one chunk was faster than 16 MB chunks (16.3x -> 19.4x open_clip), so it is large.
CHUNK_BYTES = 256 * 2 ** 20


def _checked(attnpool: nn.Module, dense: torch.Tensor, interpolate_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps N x C x HW in the pooling's dtype, positional embedding (1+HW) x C) after the shape checks."""
    if dense.ndim != 4:
        raise ValueError(f"dense maps must be N x C x H x W, got shape {tuple(dense.shape)}")
    _, channels, height, width = dense.shape
    expected = attnpool.positional_embedding.shape[1]
    if channels != expected:
        raise ValueError(f"dense maps have {channels} channels but this attnpool expects {expected}")
    dtype = attnpool.q_proj.weight.dtype
    # cached maps are fp16; compute in the pooling's own dtype (a no-op when they match)
    x = dense.to(dtype).flatten(2)                                                   # N x C x HW
    pos = positional_embedding(attnpool, height, width, interpolate_pos).to(dtype)  # (1+HW) x C
    return x, pos


def _by_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A C_out x C_in projection as heads x d x C_in: head h owns output rows h*d .. h*d+d-1."""
    return weight.view(heads, -1, weight.shape[-1])


def _tokens(x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens T = [mean_i x_i, x_1 .. x_HW] + p as N x C x (1+HW), and token 0 alone, N x C (contiguous)."""
    mean = x.mean(dim=-1, keepdim=True)                                             # N x C x 1
    tokens = torch.cat([mean, x], dim=-1)
    tokens += pos.T.contiguous()  # broadcasting a contiguous C x L block is 2x faster than the strided p^T
    return tokens, tokens[:, :, 0].contiguous()


def _attend(tokens: torch.Tensor, t0: torch.Tensor, wq, bq, wk, heads: int):
    """Token 0's scaled query q0 (N x C), u_h = Wk_h^T q0_h (heads x N x C) and its attention (N x heads x L)."""
    n, channels, _ = tokens.shape
    head_dim = channels // heads
    scale = head_dim ** -0.5
    q0 = torch.addmm(bq, t0, wq.T, beta=scale, alpha=scale)                  # scale the one query
    u = torch.bmm(q0.view(n, heads, head_dim).transpose(0, 1), _by_head(wk, heads))  # heads x N x C
    scores = torch.bmm(u.transpose(0, 1), tokens)                           # N x heads x L: u . t_i
    # softmax in float32 at least: fp16 exponentials of peaky scores lose the small weights
    attention = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
    return q0, u, attention


def _fused_forward(tokens: torch.Tensor, t0: torch.Tensor, wq, bq, wk, wv, bv, heads: int):
    """Token 0's attention and pooled values for one chunk of samples; every product a matrix product.

    Returns q0 (scaled, N x C), u (heads x N x C), attention a (N x heads x L), z (N x heads x C)
    and the values before c_proj (N x C). Written in differentiable ops, so autograd can also run it.
    """
    n, channels, _ = tokens.shape
    q0, u, attention = _attend(tokens, t0, wq, bq, wk, heads)
    z = torch.bmm(attention, tokens.transpose(1, 2))                        # N x heads x C: sum_i a_i t_i
    values = torch.bmm(z.transpose(0, 1), _by_head(wv, heads).transpose(1, 2))     # heads x N x d
    values = values.transpose(0, 1).reshape(n, channels) + bv
    return q0, u, attention, z, values


def _chunks(n: int, channels: int, length: int, itemsize: int) -> list[slice]:
    """Equal slices of N samples whose token block stays under ``CHUNK_BYTES``."""
    rows = max(1, CHUNK_BYTES // (channels * length * itemsize))
    count = -(-n // rows)
    size = -(-n // count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b (batched or not), or a @ b when there is no total yet."""
    if total is None:
        return a @ b
    return total.baddbmm_(a, b) if a.ndim == 3 else total.addmm_(a, b)


class _FusedPool(torch.autograd.Function):
    """Attention pooling of token 0 with a hand-written backward (float32 / float64, no autocast).

    Backward, per chunk, with g = dL/dvalues: dz_h = g_h Wv_h, da = dz . t_i, ds = softmax's
    backward, du = ds t_i^T; then dWk_h = q0_h^T du_h, dq0 = du_h Wk_h^T, and dp_i sums
    a_i dz + ds_i u over samples and heads (p_0 also through the query: sum_n dq0 @ Wq).
    """

    @staticmethod
    def forward(ctx, x, pos, wq, bq, wk, wv, bv, wc, bc, heads):
        n, channels, _ = x.shape
        values = x.new_empty(n, channels)
        saved = []
        for rows in _chunks(n, channels, pos.shape[0], x.element_size()):
            tokens, t0 = _tokens(x[rows], pos)
            q0, u, attention, z, values[rows] = _fused_forward(tokens, t0, wq, bq, wk, wv, bv, heads)
            saved.append((tokens, t0, q0, u, attention, z))
        ctx.chunks, ctx.heads = saved, heads
        ctx.save_for_backward(pos, wq, wk, wv, wc, values)
        return torch.addmm(bc, values, wc.T)

    @staticmethod
    def backward(ctx, grad):
        if ctx.chunks is None:
            raise RuntimeError("attention_pool's backward reuses its saved blocks, so it runs once per forward "
                               "(retain_graph=True is not supported): run the forward again for a second backward")
        pos, wq, wk, wv, wc, values = ctx.saved_tensors
        heads, need = ctx.heads, ctx.needs_input_grad
        n, channels = values.shape
        head_dim = channels // heads
        dvalues = grad @ wc                                                  # N x C
        dwc = grad.T @ values if need[7] else None
        dbc = grad.sum(0) if need[8] else None
        dbv = dvalues.sum(0) if need[6] else None
        dwv = dwk = dwq = None  # summed over chunks; the first chunk writes them (no zero-filled 16 MB blocks)
        dq_sum = values.new_zeros(channels)
        dpos = torch.zeros_like(pos) if need[1] else None
        dx = values.new_empty(n, channels, pos.shape[0] - 1) if need[0] else None
        upstream = any(need[:5])  # anything before the values needs dz
        start = 0
        for tokens, t0, q0, u, attention, z in ctx.chunks:
            rows = slice(start, start + len(t0))
            start = rows.stop
            m = len(t0)
            dv = dvalues[rows].view(m, heads, head_dim).transpose(0, 1)         # heads x m x d
            if need[5]:
                dwv = _accumulate(dwv, dv.transpose(1, 2), z.transpose(0, 1))
            if not upstream:
                continue
            # z and then u are spent once read, so their storage takes dz and du: no fresh 33 MB blocks to fault in
            dz = torch.bmm(dv, _by_head(wv, heads), out=z.view(heads, m, channels))  # heads x m x C
            da = torch.bmm(dz.transpose(0, 1), tokens)                           # m x heads x L
            ds = attention * (da - (attention * da).sum(-1, keepdim=True))       # softmax backward
            if dpos is not None:  # dp_i = sum a_i dz + ds_i u over samples and heads; as dz = dv Wv_h and
                # u = q0_h Wk_h, sum each head's L x d block first: half the products of summing dz and u
                length = attention.shape[-1]
                dpos.addmm_(torch.bmm(attention.permute(1, 2, 0), dv).transpose(0, 1).reshape(length, channels), wv)
                score_part = torch.bmm(ds.permute(1, 2, 0), q0.view(m, heads, head_dim).transpose(0, 1))
                dpos.addmm_(score_part.transpose(0, 1).reshape(length, channels), wk)
            if dx is not None:                                                   # dt_i per sample (query part below)
                dtokens = torch.bmm(dz.transpose(0, 1).transpose(1, 2), attention)
                dtokens.baddbmm_(u.transpose(0, 1).transpose(1, 2), ds)           # m x C x L
            du = torch.bmm(ds, tokens.transpose(1, 2), out=u.view(m, heads, channels))  # m x heads x C
            if need[4]:
                dwk = _accumulate(dwk, q0.view(m, heads, head_dim).permute(1, 2, 0), du.transpose(0, 1))
            dq = torch.bmm(du.transpose(0, 1), _by_head(wk, heads).transpose(1, 2))  # heads x m x d
            dq = dq.transpose(0, 1).reshape(m, channels) * head_dim ** -0.5      # d loss / d(Wq t0 + bq)
            dq_sum += dq.sum(0)
            if need[2]:
                dwq = _accumulate(dwq, dq.T, t0)
            if dx is not None:                                                   # x's share of dt_i and dt_0
                dt0 = dtokens[:, :, 0] + dq @ wq
                dx[rows] = dtokens[:, :, 1:] + dt0.unsqueeze(-1) / dx.shape[-1]
        if dpos is not None:
            dpos[0] += dq_sum @ wq                                               # p_0 also feeds the query
        ctx.chunks = None
        return (dx, dpos, dwq, dq_sum if need[3] else None, None if dwk is None else dwk.view_as(wk),
                None if dwv is None else dwv.view_as(wv), dbv, dwc, dbc, None)


def _fused_pool(attnpool: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Pooled features N x D of maps N x C x HW: the hand-written backward where it applies."""
    weights = (attnpool.q_proj.weight, attnpool.q_proj.bias, attnpool.k_proj.weight, attnpool.v_proj.weight,
               attnpool.v_proj.bias, attnpool.c_proj.weight, attnpool.c_proj.bias)
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cuda", "cpu") else False
    if x.dtype in (torch.float32, torch.float64) and not autocast:
        return _FusedPool.apply(x, pos, *weights, attnpool.num_heads)
    # half precision or autocast: the same forward, differentiated by autograd
    wq, bq, wk, wv, bv, wc, bc = weights
    tokens, t0 = _tokens(x, pos)
    values = _fused_forward(tokens, t0, wq, bq, wk, wv, bv, attnpool.num_heads)[-1]
    return F.linear(values, wc, bc)


def _fused_attention(attnpool: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    tokens, t0 = _tokens(x, pos)
    return _attend(tokens, t0, attnpool.q_proj.weight, attnpool.q_proj.bias, attnpool.k_proj.weight,
                   attnpool.num_heads)[-1]


def attention_weights(attnpool: nn.Module, dense: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
    """Where the pooling looks: N x heads x (1 + H*W), rows sum to 1, index 0 is the mean token."""
    x, pos = _checked(attnpool, dense, interpolate_pos)
    return _fused_attention(attnpool, x, pos)


def attention_pool(attnpool: nn.Module, dense: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
    """Pooled features N x D, equal to `attnpool(dense)` and differentiable in every attnpool tensor."""
    x, pos = _checked(attnpool, dense, interpolate_pos)
    return _fused_pool(attnpool, x, pos)


def grid_side(tokens: int) -> int:
    """Side g of the square grid behind 1 + g*g tokens (the mean token first); refuses other counts."""
    side = math.isqrt(max(tokens - 1, 0))
    if side * side != tokens - 1 or side == 0:
        raise ValueError(f"{tokens - 1} spatial tokens are not a square grid (1 + g*g tokens expected)")
    return side


def spatial_attention(attention: torch.Tensor) -> torch.Tensor:
    """Where the pooling looks among grid cells: N x H*W, heads averaged, the mean token dropped, rows sum to 1.

    attention: ``attention_weights``' N x heads x (1 + H*W). The book draws these maps and measures
    how much of them lands on a target, so both read the same numbers (float32).
    """
    if attention.ndim != 3:
        raise ValueError(f"attention must be N x heads x (1 + H*W), got shape {tuple(attention.shape)}")
    spatial = attention[:, :, 1:].float().mean(1)                                # N x HW
    return spatial / spatial.sum(1, keepdim=True).clamp_min(1e-12)
