"""Resolve a method config's ``preset`` for a run's dataset and shots: one pure function.

``resolve_preset(config, dataset, shots, train_views)`` returns the config with the preset's
settings filled in (fields set by hand win: a preset fills only fields still at ours' default)
and the record fields that name the resolved settings under the reference's own names. The
numbers and their sources are in :mod:`safelib.methods.reference`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .base import MethodConfig
from .clip_adapter import ClipAdapterConfig
from .coop import CoopConfig
from .reference import (
    CLIP_ADAPTER,
    COOP,
    LATER_FIELDS,
    RAFT,
    RAFT_NOTE,
    RAFT_REPO,
    check_preset,
    coop_epochs,
    reference_label,
    tip_adapter_settings,
)
from .safe import SafeConfig
from .safe_a import SafeAConfig
from .tip_adapter import TipAdapterConfig, TipAdapterFConfig

__all__ = ["resolve_preset", "selection_of", "without_later_fields"]


def _fill(config: Any, values: dict[str, Any]) -> Any:
    """``config`` with each of ``values`` applied where the field is still at its class default."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    changes = {k: v for k, v in values.items() if getattr(config, k) == defaults.get(k)}
    return dataclasses.replace(config, **changes)


def _fallback_note(dataset: str | None, used: str) -> dict[str, Any]:
    if dataset == used:
        return {}
    return {"preset_note": f"the reference never ran {dataset!r}; its {used} settings are used"}


def resolve_preset(config: MethodConfig, dataset: str | None, shots: int | None = None,
                   train_views: int | None = None) -> tuple[MethodConfig, dict[str, Any]]:
    """(``config`` with its preset applied for ``dataset`` and ``shots``, record fields).

    Pure: the same inputs give the same outputs; a config without a preset comes back unchanged
    with no fields. The fields name the settings the reference's own way, whichever preset.
    """
    if isinstance(config, SafeAConfig):
        adapter, fields = resolve_preset(config.adapter, dataset, shots, train_views)
        safe, safe_fields = _resolve_safe(config.safe)
        fields = {**({"adapter": fields} if fields else {}), **({"safe": safe_fields} if safe_fields else {})}
        return dataclasses.replace(config, adapter=adapter, safe=safe), fields
    if isinstance(config, SafeConfig):
        return _resolve_safe(config)
    if isinstance(config, TipAdapterConfig):
        return _resolve_tip(config, dataset, train_views)
    if isinstance(config, ClipAdapterConfig):
        return _resolve_clip_adapter(config, dataset)
    if isinstance(config, CoopConfig):
        return _resolve_coop(config, dataset, shots)
    return config, {}


def without_later_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """A method config's plain dict without the fields added after records were first written while
    they hold the value that reproduces the earlier behaviour (nested configs too), so the identity
    (record name) of every earlier run stays what it was."""
    return {k: without_later_fields(v) if isinstance(v, Mapping) else v for k, v in values.items()
            if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def _resolve_safe(config: SafeConfig) -> tuple[SafeConfig, dict[str, Any]]:
    """SAFE's config with RAFT's recipe filled in for ``preset="raft"``; "ours" comes back unchanged."""
    if config.preset != "raft":
        return config, {}
    filled = dataclasses.replace(_fill(config, RAFT), preset="raft:resolved")
    hand = sorted(k for k, v in RAFT.items() if getattr(filled, k) != v)
    fields: dict[str, Any] = {"preset": "raft", "preset_source": RAFT_REPO, "preset_note": RAFT_NOTE,
                              **{k: list(v) if isinstance(v, tuple) else v for k, v in RAFT.items()}}
    if hand:
        fields["preset_overridden"] = hand
    return filled, fields


def _resolve_tip(config: Any, dataset: str | None, train_views: int | None) -> tuple[Any, dict[str, Any]]:
    check_preset(config.preset)
    fields: dict[str, Any] = {}
    scale = [max(config.betas), max(config.alphas)]  # ours: linspace with both end points
    if config.preset == "reference":
        settings, used = tip_adapter_settings(dataset)
        values: dict[str, Any] = {"alphas": settings.alphas, "betas": settings.betas}
        if isinstance(config, TipAdapterFConfig):
            values.update(init_alpha=settings.init_alpha, init_beta=settings.init_beta, lr=settings.lr,
                          epochs=settings.train_epoch)
        config = dataclasses.replace(_fill(config, values), preset=reference_label(dataset))
        # The reference's grid leaves out its end point: record its search_scale, not the grid's maximum.
        scale = [settings.search_scale[0] if config.betas == settings.betas else max(config.betas),
                 settings.search_scale[1] if config.alphas == settings.alphas else max(config.alphas)]
        fields.update(preset="reference", preset_dataset=used, preset_source=settings.source,
                      **_fallback_note(dataset, used), augment_epoch=settings.augment_epoch)
        hand = [name for name in ("alphas", "betas") if getattr(config, name) != values[name]]
        if hand:
            fields["preset_overridden"] = hand
        if train_views is not None and train_views != settings.augment_epoch:
            fields["augment_epoch_note"] = (f"this run cached {train_views} augmented views per image; "
                                            f"the reference's augment_epoch is {settings.augment_epoch}")
    else:
        fields["preset"] = config.preset
        fields["augment_epoch"] = train_views
    fields.update(search_scale=scale, search_step=[len(config.betas), len(config.alphas)],
                  selection=config.selection)
    if isinstance(config, TipAdapterFConfig):
        fields.update(init_alpha=config.init_alpha, init_beta=config.init_beta, lr=config.lr,
                      train_epoch=config.epochs)
    return config, fields


def _resolve_clip_adapter(config: Any, dataset: str | None) -> tuple[Any, dict[str, Any]]:
    check_preset(config.preset)
    fields: dict[str, Any] = {"preset": "reference" if config.preset == "reference" else config.preset}
    if config.preset == "reference":
        ref = CLIP_ADAPTER
        config = dataclasses.replace(_fill(config, {
            "ratios": (ref.ratio,), "trainer": "coop", "lr": ref.lr, "weight_decay": ref.weight_decay,
            "epochs": ref.epochs, "batch_size": ref.batch_size,
        }), preset="reference:all")
        fields.update(preset_source=ref.source, preset_note="one recipe for every dataset (CoOp's rn50.yaml)")
    coop = config.trainer == "coop"
    fields.update(ratio=list(config.ratios), optim="sgd" if coop else "adamw", lr=config.lr,
                  weight_decay=config.weight_decay, max_epoch=config.epochs, batch_size=config.batch_size,
                  views="a random cached view per sample per step" if coop else "cached view e mod V in epoch e")
    if coop:
        fields.update(momentum=COOP.momentum, warmup_epoch=COOP.warmup_epochs, warmup_cons_lr=COOP.warmup_lr,
                      lr_scheduler="cosine")
    return config, fields


def _resolve_coop(config: Any, dataset: str | None, shots: int | None) -> tuple[Any, dict[str, Any]]:
    check_preset(config.preset)
    fields: dict[str, Any] = {"preset": "reference" if config.preset == "reference" else config.preset}
    if config.epochs is None and shots is not None:
        config = dataclasses.replace(config, epochs=coop_epochs(shots, dataset))
    if config.preset == "reference":
        config = dataclasses.replace(config, preset="reference:all")
    fields.update(n_ctx=config.n_ctx, class_token_position="end", max_epoch=config.epochs, lr=config.lr,
                  batch_size=config.batch_size, warmup_epoch=config.warmup_epochs,
                  warmup_cons_lr=config.warmup_lr, preset_source=COOP.source)
    return config, fields


def selection_of(fields: dict[str, Any]) -> str:
    """The validation split a resolved config asks for ("few_shot_val" unless it says "full_val")."""
    return fields.get("selection", fields.get("adapter", {}).get("selection", "few_shot_val"))
