"""RAFT's pooling with a background query: the attention pooling run for two query tokens.

RAFT (Region Attention Fine-tuning, ICME 2024; code at github.com/WideStars/RA-FT, ``clip/MyPooling.py``)
fine-tunes a copy of RN50's attention pooling whose token sequence holds the mean token twice:

    tokens = [mean + p_0,  mean + p_bg,  x_1 + p_1, ..., x_HW + p_HW]      p_bg starts as a copy of p_0
    f_cls, f_bg = the pooling's multi-head attention output for the first two tokens (queries)
                  over all HW + 2 tokens (keys and values), each through c_proj

``f_cls`` is the fine-tuned feature; ``f_bg`` is trained towards a "background" text class and
away from ``f_cls``. The class query also attends to the background token, so even before training
``f_cls`` differs slightly from CLIP's pooled feature (the mean token is counted twice).
Written from the published description and the repository's forward, in our own tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.attnpool import positional_embedding


class BackgroundPool(nn.Module):
    """A (trainable) attention pooling with RAFT's extra background query token.

    ``pool`` is used as given (copy it first); ``background_position`` (C) is a new parameter
    initialised to the pooling's own ``p_0``. ``forward(dense)`` returns ``(f_cls, f_bg)``, N x D each.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.background_position = nn.Parameter(pool.positional_embedding.detach()[0].clone())

    def forward(self, dense: Tensor) -> tuple[Tensor, Tensor]:
        if dense.ndim != 4:
            raise ValueError(f"dense maps must be N x C x H x W, got shape {tuple(dense.shape)}")
        p = self.pool
        n, channels, height, width = dense.shape
        dtype = p.q_proj.weight.dtype
        x = dense.to(dtype).flatten(2).transpose(1, 2)                                  # N x HW x C
        pos = positional_embedding(p, height, width).to(dtype)                          # (1+HW) x C
        mean = x.mean(1, keepdim=True)                                                  # N x 1 x C
        tokens = torch.cat([mean + pos[0], mean + self.background_position.to(dtype), x + pos[1:]], 1)
        heads = p.num_heads
        head_dim = channels // heads

        def split(t: Tensor) -> Tensor:                                                 # N x heads x L x d
            return t.view(n, t.shape[1], heads, head_dim).transpose(1, 2)

        q = split(F.linear(tokens[:, :2], p.q_proj.weight, p.q_proj.bias))
        k = split(F.linear(tokens, p.k_proj.weight, p.k_proj.bias))
        v = split(F.linear(tokens, p.v_proj.weight, p.v_proj.bias))
        scores = (q * head_dim ** -0.5) @ k.transpose(-1, -2)                          # N x heads x 2 x L
        attention = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        out = (attention @ v).transpose(1, 2).reshape(n, 2, channels)                   # N x 2 x C
        out = F.linear(out, p.c_proj.weight, p.c_proj.bias)                             # N x 2 x D
        return out[:, 0], out[:, 1]

    @torch.no_grad()
    def pooled_features(self, dense: Tensor, batch_size: int = 512) -> Tensor:
        """The class features ``f_cls`` N x D of dense maps, in batches, without grad."""
        param = self.pool.q_proj.weight
        return torch.cat([self(dense[s:s + batch_size].to(param.device, param.dtype))[0]
                          for s in range(0, len(dense), batch_size)])


def background_text(class_weights_of_prompts: Tensor) -> Tensor:
    """RAFT's background text embedding D: the mean of the per-class "the background of {c}." unit
    embeddings (D x K), not renormalised, as RAFT's ``clip_classifier`` leaves it."""
    return class_weights_of_prompts.float().mean(1)
