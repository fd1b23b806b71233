"""Figures of the SAFE book: where the pooling looks, how training went, how the methods compare.

Every function takes numbers a notebook has just computed (attention weights, a run record's
fields, a table of records) and returns a matplotlib ``Figure``; none of them computes a result
itself, so a figure can never show something the notebook's code did not produce. Seaborn sets
the look. Used by ``notebooks/01_attention_pooling``, ``02_safe`` and ``03_methods``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..clip.attnpool import grid_side, spatial_attention
from ..data.targets import target_cells

__all__ = [
    "attention_grid",
    "show_attention",
    "attention_before_after",
    "plot_training_curve",
    "plot_blend_sweep",
    "plot_accuracy_vs_shots",
    "plot_target_mass",
    "plot_cache_by_views",
    "plot_epoch_predictions",
]

_HEAT = "magma"


def _style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)


def attention_grid(attention: torch.Tensor | np.ndarray) -> np.ndarray:
    """Head-averaged spatial attention N x g x g from ``attention_weights``' N x heads x (1 + g*g).

    ``sl.spatial_attention`` on a square grid: the mean token dropped, each map renormalised to sum
    to 1 (the quantity ``target_attention_mass`` sums over the target's cells).
    """
    attention = torch.as_tensor(attention)
    spatial = spatial_attention(attention)                                  # N x g*g
    side = grid_side(attention.shape[-1])
    return spatial.view(-1, side, side).numpy()


def _image_array(image) -> np.ndarray:
    """H x W x 3 floats in [0, 1] from a PIL image or an array (uint8 or float)."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    return np.clip(array, 0, 1)


def _draw(ax, image, heat: np.ndarray, coverage: np.ndarray | None, vmax: float, title: str | None,
          note: str | None = None) -> None:
    array = _image_array(image)
    height, width = array.shape[:2]
    ax.imshow(array, extent=(0, width, height, 0))
    # The grid cells are large (4 x 4 for the mini-CLIP, 7 x 7 for RN50): show them as blocks.
    ax.imshow(heat, cmap=_HEAT, alpha=0.5, vmin=0, vmax=vmax, extent=(0, width, height, 0),
              interpolation="nearest")
    if coverage is not None:

        side = coverage.shape[-1]
        cell_w, cell_h = width / side, height / side
        for r, c in zip(*np.nonzero(target_cells(coverage[None]).numpy()[0])):
            ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan",
                                   linewidth=1.6))
    if note:
        ax.text(0.03, 0.04, note, transform=ax.transAxes, fontsize=8, color="white",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=9)


def show_attention(images: Sequence, attention: torch.Tensor | np.ndarray, titles: Sequence[str] | None = None,
                   coverage: np.ndarray | None = None, columns: int | None = None, size: float = 2.2) -> Figure:
    """Each image with the pooling's head-averaged attention drawn over it, one grid cell per block.

    images: N images (PIL or H x W x 3 arrays); attention: N x heads x (1 + g*g) from
    ``sl.attention_weights``; coverage: optional N x g x g target coverage
    (``sl.target_grid_masks``): the target's cells, as ``sl.target_attention_mass`` counts them
    (at least a quarter covered, and always the best-covered one), are boxed in cyan.
    """
    _style()
    heat = attention_grid(attention)
    n = len(heat)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} attention maps")
    columns = columns or min(n, 6)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.3), squeeze=False)
    vmax = float(heat.max())
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        _draw(ax, images[i], heat[i], None if coverage is None else coverage[i], vmax,
              None if titles is None else titles[i])
    fig.tight_layout()
    return fig


def attention_before_after(images: Sequence, before: torch.Tensor | np.ndarray, after: torch.Tensor | np.ndarray,
                           coverage: np.ndarray | None = None, titles: Sequence[str] | None = None,
                           labels: tuple[str, str] = ("original pooling", "fine-tuned pooling"),
                           masses: tuple[Sequence[float], Sequence[float]] | None = None,
                           size: float = 2.2) -> Figure:
    """Two rows over the same images: attention of the original pooling, then of the fine-tuned one.

    Both rows share one colour scale, so a brighter target cell after training means more attention.
    ``masses``: optional (before, after) per-image target attention masses, written in each panel.
    """
    _style()
    heat_before, heat_after = attention_grid(before), attention_grid(after)
    n = len(images)
    if not len(heat_before) == len(heat_after) == n:
        raise ValueError(f"{n} images, {len(heat_before)} maps before and {len(heat_after)} after")
    fig, axes = plt.subplots(2, n, figsize=(size * n, 2 * size + 0.5), squeeze=False)
    vmax = float(max(heat_before.max(), heat_after.max()))
    for row, (heat, label) in enumerate(zip((heat_before, heat_after), labels)):
        for i in range(n):
            title = None if titles is None or row else titles[i]
            note = None if masses is None else f"on target {float(masses[row][i]):.2f}"
            _draw(axes[row, i], images[i], heat[i], None if coverage is None else coverage[i], vmax, title, note)
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    return fig


def plot_training_curve(losses: Sequence[float], accuracies: Sequence[float] | None = None,
                        title: str = "SAFE training") -> Figure:
    """Mean training loss per epoch (and training accuracy, in percent, on a second axis, if given)."""
    _style()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    epochs = np.arange(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o", markersize=3, color="C0", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy", color="C0")
    if accuracies is not None:
        twin = ax.twinx()
        twin.plot(epochs, accuracies, marker="s", markersize=3, color="C1", label="train accuracy")
        twin.set_ylabel("train accuracy (%)", color="C1")
        twin.grid(False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_blend_sweep(sweep: Sequence[Mapping] | Sequence, chosen: float | None = None,
                     title: str = "Choosing the blend on few-shot validation") -> Figure:
    """Validation accuracy and cross-entropy against ``blend`` (0: zero-shot CLIP, 1: fine-tuned alone).

    sweep: ``BlendChoice.sweep`` points or their record form (dicts with blend, accuracy in percent, cross_entropy).
    """
    _style()
    points = pd.DataFrame([p if isinstance(p, Mapping) else vars(p) for p in sweep])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(points["blend"], points["accuracy"], marker="o", color="C0")
    ax.set_xlabel("blend  (0 = original pooling, 1 = fine-tuned pooling)")
    ax.set_ylabel("validation accuracy (%)", color="C0")
    twin = ax.twinx()
    twin.plot(points["blend"], points["cross_entropy"], marker="s", markersize=3, color="C1", alpha=0.8)
    twin.set_ylabel("validation cross-entropy", color="C1")
    twin.grid(False)
    if chosen is not None:
        ax.axvline(chosen, color="k", linestyle="--", linewidth=1)
        ax.annotate(f"chosen {chosen:g}", (chosen, ax.get_ylim()[0]), xytext=(4, 6), textcoords="offset points",
                    fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_shots(records: pd.DataFrame, metric: str = "test_acc", title: str | None = None) -> Figure:
    """Accuracy against shots per method, mean over seeds with a +- 1 std band, from ``sl.load_records``."""
    _style()
    missing = [c for c in ("method", "shots", "seed", metric) if c not in records]
    if missing:
        raise ValueError(f"records lack columns {missing}; build them with sl.load_records()")
    if records.empty:
        raise ValueError("no records to plot")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=records, x="shots", y=metric, hue="method", style="method", markers=True, dashes=False,
                 errorbar="sd", ax=ax)
    shots = sorted(records["shots"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)" if metric == "test_acc" else metric)
    if title is None:
        seeds = sorted(records["seed"].unique())
        title = f"{', '.join(sorted(records['dataset'].unique()))} (seeds {', '.join(map(str, seeds))})" \
            if "dataset" in records else None
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_target_mass(before: Sequence[float] | np.ndarray, after: Sequence[float] | np.ndarray,
                     labels: tuple[str, str] = ("original pooling", "fine-tuned pooling")) -> Figure:
    """Per-image attention mass on the target, before against after (points above the diagonal gained)."""
    _style()
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.scatter(before, after, s=12, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"target mass, {labels[0]}")
    ax.set_ylabel(f"target mass, {labels[1]}")
    fig.tight_layout()
    return fig


_PLACEMENT_COLOURS = {"device": "#4c72b0", "pinned": "#55a868", "memmap": "#c44e52"}


def plot_cache_by_views(rows: pd.DataFrame) -> Figure:
    """Cache size and predicted seconds per epoch against cached views, coloured by where the cache lives.

    ``rows``: one row per number of views with columns "views", "cache GB", "placement" and
    "predicted s / epoch", as ``notebooks/04_scale`` builds them from ``plan_cache``.
    """
    missing = [c for c in ("views", "cache GB", "placement", "predicted s / epoch") if c not in rows]
    if missing:
        raise ValueError(f"rows lack columns {missing}")
    _style()
    fig, (size_ax, time_ax) = plt.subplots(1, 2, figsize=(8, 3.2))
    for placement, group in rows.groupby("placement", sort=False):
        colour = _PLACEMENT_COLOURS.get(placement)
        size_ax.bar(group["views"], group["cache GB"], color=colour, label=placement)
        time_ax.plot(group["views"], group["predicted s / epoch"], "o", color=colour, label=placement)
    size_ax.set_xlabel("augmented views cached per image")
    size_ax.set_ylabel("cache size (GB)")
    time_ax.set_xlabel("augmented views cached per image")
    time_ax.set_ylabel("predicted seconds per epoch")
    time_ax.set_ylim(bottom=0)
    size_ax.legend(title="the cache lives in", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig


def plot_epoch_predictions(plans: Mapping[str, object]) -> Figure:
    """Predicted seconds per epoch of every placement that fits, for each plan (bars), the chosen one marked.

    ``plans``: label -> a ``CachePlan`` (its ``predictions`` and ``placement``), e.g. a profile's
    nominal rates beside the rates ``calibrate`` measured here. A placement that does not fit has no bar.
    """
    if not plans:
        raise ValueError("no plans to plot")
    _style()
    placements = [p for p in _PLACEMENT_COLOURS if any(p in plan.predictions for plan in plans.values())]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.55 * len(plans) * max(len(placements), 1)))
    labels, y = [], 0
    for name, plan in plans.items():
        for placement in placements:
            prediction = plan.predictions.get(placement)
            if prediction is None:
                continue
            chosen = placement == plan.placement
            ax.barh(y, prediction["epoch_s"], color=_PLACEMENT_COLOURS[placement], alpha=1.0 if chosen else 0.45,
                    edgecolor="black" if chosen else "none")
            ax.text(prediction["epoch_s"], y, f" {prediction['epoch_s']:.3g} s" + (" (chosen)" if chosen else ""),
                    va="center", fontsize=8)
            labels.append(f"{name}: {placement}")
            y += 1
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("predicted seconds per epoch (log scale)")
    ax.margins(x=0.25)
    fig.tight_layout()
    return fig
