"""CoOp (Zhou et al. 2022): learn the prompt's context words, keep CLIP frozen.

    prompt_k = [SOS] v_1 ... v_M [CLASS_k] . [EOS]        t_k = text_tower(prompt_k)
    logits   = logit_scale * normalize(f) @ normalize(t)^T

The M context vectors ``v`` (word-embedding width) are shared by every class and are the only
trained parameters; the class name's own tokens and "." follow them ("end" position). The image
tower is frozen, so the image features come from the shared cache and only the text tower runs
while training: every step encodes all K prompts, and the loss backpropagates through the text
transformer into ``v``.

CoOp's settings (M=16, random init std 0.02, SGD lr 0.002 momentum 0.9 weight decay 5e-4, batch
32, one warm-up epoch at lr 1e-5, cosine; 50 epochs at 1 shot, 100 at 2-4, 200 at 8-16, ImageNet
50 always) are both presets' defaults: ``safelib.methods.reference`` cites their files. What
differs, stated: CoOp draws a fresh augmentation (crop scale 0.08-1) every step; here each sample
of each step reads a random one of its V cached augmented views (crop scale 0.5-1, the cache's).
CoOp trains in fp16; we train in fp32. Nothing is selected on validation (CoOp keeps its last
epoch too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from ..clip.text import class_logits
from .base import (FewShotData, FewShotMethod, FieldChecks, MethodConfig, SplitFeatures, eval_view, loss_warnings,
                   pool_split)
from ..seeding import seeded
from .feature_training import train_sgd_random_views
from .reference import COOP, coop_epochs, preset_problem, require_resolved


class PromptLearner(nn.Module):
    """CoOp's generic context ``v`` (M x width) and the fixed token embeddings around it.

    ``forward()`` gives the K prompts' input embeddings ``K x L x width``; ``tokens`` (K x L) are
    the tokenized "X X ... X <name>." prompts, whose EOS position the text tower pools at.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_ctx: int,
                 init: Tensor | None = None, init_std: float = 0.02) -> None:
        super().__init__()
        placeholder = " ".join(["X"] * n_ctx)
        tokens = tokenizer([f"{placeholder} {name.replace('_', ' ')}." for name in classnames])
        if bool((tokens[:, -1] != 0).any()):
            raise ValueError(f"a prompt of {n_ctx} context tokens plus a class name fills the text tower's "
                             f"context length {tokens.shape[1]}; use fewer context tokens (n_ctx)")
        device = model.token_embedding.weight.device
        tokens = tokens.to(device)
        with torch.no_grad():
            embedding = model.token_embedding(tokens)  # K x L x width
        width = embedding.shape[-1]
        if init is None:
            init = torch.empty(n_ctx, width).normal_(std=init_std)
        if tuple(init.shape) != (n_ctx, width):
            raise ValueError(f"init must be n_ctx x width = {n_ctx} x {width}, got {tuple(init.shape)}")
        self.ctx = nn.Parameter(init.detach().clone().to(device=device, dtype=embedding.dtype))
        self.register_buffer("tokens", tokens)
        self.register_buffer("prefix", embedding[:, :1].clone())  # SOS
        self.register_buffer("suffix", embedding[:, 1 + n_ctx:].clone())  # class name, ".", EOS, padding

    def forward(self) -> Tensor:
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)  # K x M x width
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # K x L x width


def encode_prompt_embeddings(model: nn.Module, prompts: Tensor, tokens: Tensor) -> Tensor:
    """open_clip's ``CLIP.encode_text`` from the token embeddings on: ``K x L x width -> K x D``.

    The same steps in the same order (positional embedding, causal transformer, final norm, pooling
    at the EOS token, projection), so prompts that embed real words reproduce ``encode_text``.
    """
    cast_dtype = model.transformer.get_cast_dtype()
    x = prompts.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


@dataclass(frozen=True)
class CoopConfig(MethodConfig):
    """CoOp's settings (see the module docstring); ``epochs=None`` is CoOp's schedule for the shots
    (the run also knows ImageNet's 50); ``preset`` "ours" and "reference" are the same here."""

    n_ctx: int = COOP.n_ctx
    init_std: float = COOP.init_std
    epochs: int | None = None
    batch_size: int = COOP.batch_size
    lr: float = COOP.lr
    momentum: float = COOP.momentum
    weight_decay: float = COOP.weight_decay
    warmup_epochs: int = COOP.warmup_epochs
    warmup_lr: float = COOP.warmup_lr
    preset: str = "ours"

    def __post_init__(self) -> None:
        check = FieldChecks(self)
        check.add(preset_problem(self.preset))
        for name in ("n_ctx", "batch_size"):
            check.integer(name, low=1)
        check.integer("epochs", low=1, optional=True)  # None: CoOp's schedule for the shots
        check.integer("warmup_epochs", low=0)
        for name in ("lr", "warmup_lr", "init_std"):
            check.number(name, above=0.0)
        check.number("weight_decay", low=0.0)
        check.number("momentum", low=0.0, below=1.0)
        check.raise_any()


class Coop(FewShotMethod):
    """CoOp: 16 context vectors shared by the classes, trained against cached image features."""

    name = "coop"
    config_class = CoopConfig

    def _fit(self, data: FewShotData) -> None:
        cfg = self.config
        require_resolved(cfg, self.name)
        clip = data.head.clip
        if clip is None or not data.head.classnames:
            raise ValueError("coop encodes its own prompts: it needs ClipHead(clip=<ClipModel>, classnames=...) "
                             "(sl.run fills both)")
        epochs = cfg.epochs if cfg.epochs is not None else coop_epochs(_shots(data.train.labels))
        with seeded(data.seed):
            learner = PromptLearner(clip.model, clip.tokenizer, data.head.classnames, cfg.n_ctx,
                                    init_std=cfg.init_std)
        model, scale = clip.model, data.head.logit_scale
        device = learner.ctx.device
        train = F.normalize(data.pooled(data.train).float(), dim=-1).to(device)  # V x N x D

        def logits_fn(features: Tensor) -> Tensor:
            text = F.normalize(encode_prompt_embeddings(model, learner(), learner.tokens).float(), dim=-1)
            return class_logits(features, text.t(), scale, normalize=False)  # B x K

        losses = train_sgd_random_views(
            [learner.ctx], logits_fn, train, data.train.labels, epochs=epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, seed=data.seed, method=self.name,
        )
        self.training_warnings += loss_warnings(self.name, losses, data.head.num_classes)
        with torch.no_grad():
            text = encode_prompt_embeddings(model, learner(), learner.tokens).float()
        self._text = F.normalize(text, dim=-1).t().contiguous()  # D x K
        self._scale = scale
        self._head, self._pool_batch = data.head, data.pool_batch
        self.chosen = {"epochs": epochs, "n_ctx": cfg.n_ctx, "train_loss": losses}

    def _predict(self, test: SplitFeatures) -> Tensor:
        features = eval_view(pool_split(test, self._head, self._pool_batch)).float().to(self._text.device)
        return class_logits(features, self._text, self._scale)


def _shots(labels: Tensor) -> int:
    """Images per class of a few-shot train split (its largest class)."""
    return int(torch.bincount(labels.long()).max().item())


__all__ = ["Coop", "CoopConfig", "PromptLearner", "encode_prompt_embeddings"]
