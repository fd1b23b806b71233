"""Few-shot methods under one protocol: fit on few-shot train + validation, predict test logits.

`make_method("tip_adapter_f", {"epochs": 10})` builds any of them by name from a plain dict
(what a run config or a papermill parameter holds); `METHODS` lists the names.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import (
    ClipHead,
    FewShotData,
    FewShotMethod,
    MethodConfig,
    SplitFeatures,
    TrainingDivergedError,
    TrainingWarning,
    accuracy,
    config_from_dict,
    select_best,
)
from .clip_adapter import ClipAdapter, ClipAdapterConfig, adapter_mix
from .coop import Coop, CoopConfig
from .linear_probe import LinearProbe, LinearProbeAug, LinearProbeAugConfig, LinearProbeConfig
from .tip_adapter import TipAdapter, TipAdapterConfig, TipAdapterF, TipAdapterFConfig, cache_logits, tip_logits
from .safe import Safe, SafeConfig
from .safe_a import SafeA, SafeAClipAdapter, SafeAClipAdapterConfig, SafeATipConfig
from .zero_shot import ZeroShot, ZeroShotConfig
from .presets import resolve_preset

METHODS: dict[str, type[FewShotMethod]] = {
    cls.name: cls
    for cls in (ZeroShot, LinearProbe, ClipAdapter, TipAdapter, TipAdapterF, Safe, SafeA, SafeAClipAdapter, Coop, LinearProbeAug)
}


def register_method(cls: type[FewShotMethod]) -> type[FewShotMethod]:
    """Add a method class to `METHODS` under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, FewShotMethod)):
        raise TypeError(f"register_method takes a FewShotMethod subclass, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def method_config(name: str, config: MethodConfig | Mapping[str, Any] | None = None) -> MethodConfig:
    """The validated config of method ``name`` from a dict of overrides (lists become tuples)."""
    cls = _method_class(name)
    if isinstance(config, MethodConfig):
        if not isinstance(config, cls.config_class):
            raise TypeError(f"method {name!r} takes a {cls.config_class.__name__}, got {type(config).__name__}")
        return config
    return config_from_dict(cls.config_class, dict(config or {}), f"method {name!r}")


def make_method(name: str, config: MethodConfig | Mapping[str, Any] | None = None) -> FewShotMethod:
    """A fresh, unfitted method by name, e.g. ``make_method("linear_probe")``."""
    return _method_class(name)(method_config(name, config))


def _method_class(name: str) -> type[FewShotMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "register_method",
    "method_config",
    "make_method",
    "ClipHead",
    "FewShotData",
    "FewShotMethod",
    "MethodConfig",
    "SplitFeatures",
    "TrainingDivergedError",
    "TrainingWarning",
    "accuracy",
    "select_best",
    "Safe",
    "SafeConfig",
    "SafeA",
    "SafeATipConfig",
    "SafeAClipAdapter",
    "SafeAClipAdapterConfig",
    "ZeroShot",
    "ZeroShotConfig",
    "LinearProbe",
    "LinearProbeConfig",
    "LinearProbeAug",
    "LinearProbeAugConfig",
    "ClipAdapter",
    "ClipAdapterConfig",
    "adapter_mix",
    "Coop",
    "CoopConfig",
    "resolve_preset",
    "TipAdapter",
    "TipAdapterConfig",
    "TipAdapterF",
    "TipAdapterFConfig",
    "cache_logits",
    "tip_logits",
]
