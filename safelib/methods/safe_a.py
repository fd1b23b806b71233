"""SAFE-A: SAFE composed with an adapter. SAFE is trained first and frozen; its blended features
then feed an adapter exactly as CLIP's own features feed it.

    f_b    = normalize(b * n(f_ft) + (1 - b) * n(f_orig))                  SAFE's blended features
    Tip:   logits = logit_scale * f_b @ W + alpha * exp(-beta * (1 - f_b @ K^T)) @ L,
           K = the training images' f_b averaged over their cached views, then trained (Tip-Adapter-F)
    CLIP-Adapter: logits = logit_scale * n(r * A(f_b) + (1 - r) * f_b) @ W

The paper's abstract names an adapter variant but not the adapter (its full text was not
available to us), so both are here and the results decide which the book calls SAFE-A.

The joint search, kept small and stated: for each blend ``b`` in ``blends`` (4 values by
default) the adapter is fitted on ``f_b`` and searches its own hyperparameters on the few-shot
validation split (Tip: the alpha x beta grid of ``TipAdapterConfig``; CLIP-Adapter: its ratios);
the (b, alpha, beta) or (b, r) with the best validation accuracy wins, ties to the lower
validation cross-entropy, then to the earlier blend in ``blends`` (0.5 is listed first). SAFE's
own blend choice is recorded but not imposed: the adapter changes which blend works best.
``blends`` leaves out 0, which would be the plain adapter on CLIP's features, not SAFE-A.
Every choice uses the few-shot validation split only, never test (unlike the published
Tip-Adapter numbers: see ``safelib.methods.tip_adapter``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import Tensor

from ..features.maps import DenseMaps
from .base import (
    ClipHead,
    FewShotData,
    FewShotMethod,
    FieldChecks,
    MethodConfig,
    SplitFeatures,
    TrainingDivergedError,
    config_from_dict,
    best_index,
    validation_scores,
)
from .blend import blend_features
from .clip_adapter import ClipAdapter, ClipAdapterConfig
from .safe import Safe, SafeConfig, safe_features
from .tip_adapter import TipAdapterF, TipAdapterFConfig

DEFAULT_BLENDS: tuple[float, ...] = (0.5, 0.25, 0.75, 1.0)


def _nested(value: Any, cls: type, name: str) -> Any:
    """A nested config given as a dict (run configs, JSON) becomes its validated dataclass."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return config_from_dict(cls, dict(value), name)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


@dataclass(frozen=True)
class SafeAConfig(MethodConfig):
    """``safe``: SAFE's config (its blend choice is recorded, the adapter search picks the blend);
    ``blends``: the blends searched jointly with the adapter's own hyperparameters."""

    safe: SafeConfig = field(default_factory=SafeConfig)
    blends: tuple[float, ...] = DEFAULT_BLENDS

    @property
    def safe_config(self) -> SafeConfig:
        """The SAFE training settings this config runs (its nested ``safe``)."""
        return self.safe

    def __post_init__(self) -> None:
        object.__setattr__(self, "safe", _nested(self.safe, SafeConfig, "safe"))
        check = FieldChecks(self)
        if check.grid("blends", low=0.0, high=1.0):
            object.__setattr__(self, "blends", tuple(float(b) for b in self.blends))
        check.raise_any()


@dataclass(frozen=True)
class SafeATipConfig(SafeAConfig):
    adapter: TipAdapterFConfig = field(default_factory=TipAdapterFConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adapter", _nested(self.adapter, TipAdapterFConfig, "adapter"))


@dataclass(frozen=True)
class SafeAClipAdapterConfig(SafeAConfig):
    adapter: ClipAdapterConfig = field(default_factory=ClipAdapterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adapter", _nested(self.adapter, ClipAdapterConfig, "adapter"))


class SafeA(FewShotMethod):
    """SAFE, frozen, then an adapter on its blended features; blend searched jointly (see module doc)."""

    name = "safe_a_tip"
    config_class: ClassVar[type[SafeAConfig]] = SafeATipConfig
    adapter_class: ClassVar[type[FewShotMethod]] = TipAdapterF
    feature_kind = "dense"

    def _fit(self, data: FewShotData) -> None:
        cfg = self.config
        with _stage(self.name, "in its SAFE stage"):
            self.safe = Safe(cfg.safe).fit(data)  # trained first, then frozen
        self.training_warnings += [f"{self.name}, SAFE stage: {w}" for w in self.safe.training_warnings]
        # Pool every view once with each attnpool; blends then cost only a mix.
        train_ft, train_orig = self._pool_views(data.train.dense)  # V x N x D each
        val_ft, val_orig = self.safe.pool_both(data.val.dense.eval_view())  # N x D each
        head = ClipHead(classifier=data.head.classifier, logit_scale=data.head.logit_scale,
                        classnames=data.head.classnames)
        fitted, scores, sweep = [], [], []
        for b in cfg.blends:
            train = SplitFeatures(labels=data.train.labels, pooled=_blend_views(train_ft, train_orig, b))
            val = SplitFeatures(labels=data.val.labels, pooled=blend_features(val_ft, val_orig, b)[None])
            with _stage(self.name, f"in its adapter at blend {b}"):
                adapter = self.adapter_class(cfg.adapter).fit(FewShotData(train, val, head, seed=data.seed))
            self.training_warnings += [f"{self.name}, blend {b}: {w}" for w in adapter.training_warnings]
            score = validation_scores(adapter.predict(val), data.val.labels)
            fitted.append(adapter)
            scores.append(score)
            sweep.append({"blend": b, **score, **_summary(adapter.chosen)})
        best = best_index(scores)
        self.blend, self.adapter = cfg.blends[best], fitted[best]
        self.chosen = {
            "blend": self.blend,
            "adapter": self.adapter.chosen,
            "sweep": sweep,
            "safe": self.safe.chosen,
        }

    def attention_pools(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """Its SAFE stage's (fine-tuned, original) attention poolings (see ``Safe.attention_pools``)."""
        return self.safe.attention_pools()

    def _pool_views(self, dense: DenseMaps) -> tuple[Tensor, Tensor]:
        pairs = [self.safe.pool_both(dense.view(v)) for v in range(dense.num_views)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _predict(self, test: SplitFeatures) -> Tensor:
        if test.dense is None:
            raise ValueError(f"{self.name} pools dense maps; the test split has only pooled features (cache kind='dense')")
        blended = safe_features(self.safe.training.attnpool, self.safe.original, test.dense.eval_view(),
                                self.blend)[None]                                              # 1 x N x D
        return self.adapter.predict(SplitFeatures(labels=test.labels, pooled=blended))


class SafeAClipAdapter(SafeA):
    """SAFE-A with CLIP-Adapter as the adapter (the second variant)."""

    name = "safe_a_clip_adapter"
    config_class = SafeAClipAdapterConfig
    adapter_class = ClipAdapter


@contextlib.contextmanager
def _stage(method: str, stage: str) -> Iterator[None]:
    """Name SAFE-A and its stage in a `TrainingDivergedError` raised by SAFE or the adapter inside it."""
    try:
        yield
    except TrainingDivergedError as error:
        raise TrainingDivergedError(f"{method}, {stage}: {error}", method=method, epoch=error.epoch) from error


def _blend_views(f_ft: Tensor, f_orig: Tensor, blend: float) -> Tensor:
    """``V x N x D`` blended features, view by view."""
    return torch.stack([blend_features(a.float(), b.float(), blend) for a, b in zip(f_ft, f_orig)])


def _summary(chosen: dict[str, Any]) -> dict[str, Any]:
    """The adapter's scalar choices (alpha, beta, ratio), without its long sweeps and loss curves."""
    return {k: v for k, v in chosen.items() if isinstance(v, (int, float)) and not k.startswith("val_")}
