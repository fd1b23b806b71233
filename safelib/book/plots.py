"""Figures of the SAFE book: the architecture, where the pooling looks, how training went, how the methods compare.

Every function takes numbers a notebook has just computed (attention weights, a run record's
fields, a table of records) and returns a matplotlib ``Figure``; none of them computes a result
itself, so a figure can never show something the notebook's code did not produce. The one
exception draws no numbers at all: ``architecture_figure``, the picture of SAFE's data flow shown
in the introduction and in chapter 02. Seaborn sets the look. Used by the intro and
``notebooks/01_attention_pooling``, ``02_safe`` and ``03_methods``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.ticker import MaxNLocator

from ..clip.attnpool import grid_side, spatial_attention
from ..data.targets import target_cells

__all__ = [
    "architecture_figure",
    "attention_grid",
    "show_attention",
    "attention_before_after",
    "plot_training_curve",
    "plot_blend_sweep",
    "plot_blend_curves",
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


_COLOURBAR_LABEL = "share of the attention per grid cell"


def _draw(ax, image, heat: np.ndarray, coverage: np.ndarray | None, vmax: float, title: str | None,
          note: str | None = None):
    array = _image_array(image)
    height, width = array.shape[:2]
    ax.imshow(array, extent=(0, width, height, 0))
    # The grid cells are large (4 x 4 for the mini-CLIP, 7 x 7 for RN50): show them as blocks.
    heat_image = ax.imshow(heat, cmap=_HEAT, alpha=0.55, vmin=0, vmax=vmax, extent=(0, width, height, 0),
                           interpolation="nearest")
    if coverage is not None:

        side = coverage.shape[-1]
        cell_w, cell_h = width / side, height / side
        for r, c in zip(*np.nonzero(target_cells(coverage[None]).numpy()[0])):
            ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan",
                                   linewidth=1.6))
    if note:
        ax.text(0.03, 0.04, note, transform=ax.transAxes, fontsize=11, color="white",
                bbox={"facecolor": "black", "alpha": 0.65, "pad": 2, "linewidth": 0})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=11)
    return heat_image


def _colourbar(fig: Figure, heat_image, axes) -> None:
    """One colour bar for every panel (they share one scale), labelled with what the colour means."""
    bar = fig.colorbar(heat_image, ax=axes, fraction=0.025, pad=0.02)
    bar.solids.set_alpha(1)
    bar.set_label(_COLOURBAR_LABEL, fontsize=10)


def show_attention(images: Sequence, attention: torch.Tensor | np.ndarray, titles: Sequence[str] | None = None,
                   coverage: np.ndarray | None = None, columns: int | None = None, size: float = 3.4) -> Figure:
    """Each image with the pooling's head-averaged attention drawn over it, one grid cell per block.

    images: N images (PIL or H x W x 3 arrays); attention: N x heads x (1 + g*g) from
    ``sl.attention_weights``; coverage: optional N x g x g target coverage
    (``sl.target_grid_masks``): the target's cells, as ``sl.target_attention_mass`` counts them
    (at least a quarter covered, and always the best-covered one), are boxed in cyan.
    Panels are laid out three to a row by default, large enough to read in the book's column, with
    one colour bar for all of them (the figure's last axes).
    """
    _style()
    heat = attention_grid(attention)
    n = len(heat)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} attention maps")
    columns = columns or min(n, 3)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns + 0.9, size * rows + 0.2), squeeze=False,
                             layout="constrained")
    vmax = float(heat.max())
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        drawn = _draw(ax, images[i], heat[i], None if coverage is None else coverage[i], vmax,
                      None if titles is None else titles[i])
    _colourbar(fig, drawn, axes)
    return fig


def attention_before_after(images: Sequence, before: torch.Tensor | np.ndarray, after: torch.Tensor | np.ndarray,
                           coverage: np.ndarray | None = None, titles: Sequence[str] | None = None,
                           labels: tuple[str, str] = ("original pooling", "fine-tuned pooling"),
                           masses: tuple[Sequence[float], Sequence[float]] | None = None,
                           size: float = 3.0) -> Figure:
    """Two rows over the same images: attention of the original pooling, then of the fine-tuned one.

    Both rows share one colour scale (one colour bar, the figure's last axes), so a brighter target
    cell after training means more attention. ``masses``: optional (before, after) per-image target
    attention masses, written in each panel. Show three or four images: wider figures shrink in the
    book's column until the labels cannot be read.
    """
    _style()
    heat_before, heat_after = attention_grid(before), attention_grid(after)
    n = len(images)
    if not len(heat_before) == len(heat_after) == n:
        raise ValueError(f"{n} images, {len(heat_before)} maps before and {len(heat_after)} after")
    fig, axes = plt.subplots(2, n, figsize=(size * n + 1.2, 2 * size + 0.4), squeeze=False, layout="constrained")
    vmax = float(max(heat_before.max(), heat_after.max()))
    for row, (heat, label) in enumerate(zip((heat_before, heat_after), labels)):
        for i in range(n):
            title = None if titles is None or row else titles[i]
            note = None if masses is None else f"on target {float(masses[row][i]):.2f}"
            drawn = _draw(axes[row, i], images[i], heat[i], None if coverage is None else coverage[i], vmax, title,
                          note)
        axes[row, 0].set_ylabel(label, fontsize=11)
    _colourbar(fig, drawn, axes)
    return fig


def plot_training_curve(losses: Sequence[float], accuracies: Sequence[float] | None = None,
                        title: str = "SAFE training") -> Figure:
    """Mean training loss per epoch (and training accuracy, in percent, on a second axis, if given)."""
    _style()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    epochs = np.arange(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o", markersize=3, color="C0", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training cross-entropy", color="C0")
    if accuracies is not None:
        twin = ax.twinx()
        twin.plot(epochs, accuracies, marker="s", markersize=3, color="C1", label="train accuracy")
        # measured on the random augmented views the epoch trained on, before each step's update
        twin.set_ylabel("training accuracy (%),\naugmented views", color="C1")
        twin.set_ylim(0, 100)
        twin.grid(False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _sweep_frame(sweep: Sequence[Mapping] | Sequence) -> pd.DataFrame:
    return pd.DataFrame([p if isinstance(p, Mapping) else vars(p) for p in sweep])


def _images_in(points: pd.DataFrame) -> int | None:
    """How many images a sweep was measured on, from its accuracy and count of correct images."""
    if "correct" not in points:
        return None
    known = points[points["correct"] > 0]
    return None if known.empty else int(round(100.0 * known["correct"].iloc[0] / known["accuracy"].iloc[0]))


def plot_blend_sweep(sweep: Sequence[Mapping] | Sequence, chosen: float | None = None,
                     title: str = "Choosing the blend on few-shot validation") -> Figure:
    """Validation accuracy and cross-entropy against ``blend`` (0: zero-shot CLIP, 1: fine-tuned alone).

    sweep: ``BlendChoice.sweep`` points or their record form (dicts with blend, accuracy in percent,
    cross_entropy, and ``correct``, the number of correct images). Where ``correct`` is known the
    accuracy axis gets one tick per image step is worth, and the x label says how many points one image is.
    """
    _style()
    points = _sweep_frame(sweep)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(points["blend"], points["accuracy"], marker="o", color="C0")
    xlabel = "blend  (0 = original pooling, 1 = fine-tuned pooling)"
    n = _images_in(points)
    if n:
        xlabel += f"\none of the {n} images = {100 / n:.1f} accuracy points"
    ax.set_xlabel(xlabel)
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


def plot_blend_curves(sweeps: Mapping[str, Sequence[Mapping] | Sequence], chance: float | None = None,
                      chosen: Mapping[str, float] | None = None, title: str | None = None,
                      band: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Figure:
    """Accuracy against ``blend`` for several sweeps on one full 0-100 % axis (a line each, in order).

    sweeps: label -> sweep points (``sweep_blend``'s, or dicts with blend and accuracy in percent),
    e.g. the validation and the test sweep of one run, or one task against another. ``chance``: a
    dotted line at chance accuracy (100 / number of classes). ``chosen``: label -> the blend chosen on
    validation, marked on that label's line. ``band``: label -> (low, high) per blend, shaded (e.g.
    the range over seeds).
    """
    if not sweeps:
        raise ValueError("no sweeps to plot")
    _style()
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for i, (label, sweep) in enumerate(sweeps.items()):
        points = _sweep_frame(sweep)
        ax.plot(points["blend"], points["accuracy"], marker="o", markersize=4, color=f"C{i}", label=label)
        if band and label in band:
            low, high = band[label]
            ax.fill_between(points["blend"], low, high, color=f"C{i}", alpha=0.15, linewidth=0)
        if chosen and label in chosen:
            at = points.loc[(points["blend"] - chosen[label]).abs().idxmin()]
            ax.plot([at["blend"]], [at["accuracy"]], marker="*", markersize=14, color=f"C{i}",
                    markeredgecolor="black", linestyle="none")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1.2, label=f"chance ({chance:.1f}%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("blend  (0 = original pooling: zero-shot CLIP, 1 = fine-tuned pooling alone)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8, loc="lower left", frameon=True)
    if title:
        ax.set_title(title, fontsize=10)
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
                     labels: tuple[str, str] = ("original pooling", "fine-tuned pooling"),
                     uniform: float | None = None) -> Figure:
    """Per-image attention mass on the target, before against after (points above the diagonal gained).

    ``uniform``: the mass a uniform attention would put on the target (the share of the grid's cells the
    target covers, averaged over the images), drawn as dotted lines on both axes.
    """
    _style()
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(before, after, s=12, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    if uniform is not None:
        ax.axvline(uniform, color="C3", linestyle=":", linewidth=1.2)
        ax.axhline(uniform, color="C3", linestyle=":", linewidth=1.2, label=f"uniform attention ({uniform:.2f})")
        ax.legend(fontsize=8, loc="upper left")
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


# ------------------------------------------------------------------ the picture of the idea
_FROZEN, _TRAINED, _TEXT = "#dfe6ee", "#f6c28b", "#e4efd9"


def _box(ax, x: float, y: float, w: float, h: float, text: str, colour: str, size: float = 9.5,
         edge: str = "#44546a") -> tuple[float, float, float, float]:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=colour,
                                edgecolor=edge, linewidth=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, linespacing=1.35)
    return x, y, w, h


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str | None = None,
           dashed: bool = False, colour: str = "#333333", where: tuple[float, float] = (0, 0.12)) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13, linewidth=1.3, color=colour,
                                 linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))
    if text:
        ax.text((start[0] + end[0]) / 2 + where[0], (start[1] + end[1]) / 2 + where[1], text, ha="center",
                va="bottom", fontsize=8.5, color=colour)


def architecture_figure(grid: int = 4, heads: int | None = None,
                        trained: str = r"$p,\ W_q,\ W_k,\ W_v,\ W_c$") -> Figure:
    """SAFE's data flow as a diagram: frozen trunk -> dense grid -> original and fine-tuned attention
    pooling -> blend -> cosine with CLIP's text classifier.

    It draws no measured numbers, only the structure: ``grid`` (cells per side of the dense map, 4 for
    the mini-CLIP, 7 for RN50 at 224 px) and ``heads`` (the pooling's attention heads, written on the
    pooling boxes when given) come from the model a notebook loaded; ``trained`` names the tensors of
    the fine-tuned copy that learn (the library's default set, ``sl.TRAINABLE_SETS["all"]``).
    Frozen parts are grey-blue, the part SAFE trains is orange, the text side is green.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    fig, ax = plt.subplots(figsize=(11, 4.6))
    ax.set_xlim(0, 12.7)
    ax.set_ylim(0, 6.1)
    ax.axis("off")
    per_head = "" if heads is None else f"\n{heads} heads: one query each"

    # image -> frozen trunk -> dense map
    _box(ax, 0.1, 2.45, 1.25, 1.1, "image\n3 × S × S", "white")
    _box(ax, 1.75, 2.3, 1.55, 1.4, "ResNet trunk\nstem … layer4\n(frozen, run once\nper view)", _FROZEN, 9)
    _arrow(ax, (1.35, 3.0), (1.75, 3.0))
    left, bottom, side = 3.8, 2.35, 1.3
    cell = side / grid
    for r in range(grid):
        for c in range(grid):
            ax.add_patch(Rectangle((left + c * cell, bottom + r * cell), cell, cell, facecolor=_FROZEN,
                                   edgecolor="#44546a", linewidth=0.8))
    ax.text(left + side / 2, bottom - 0.12, f"dense map\nC × {grid} × {grid} (cached)", ha="center", va="top",
            fontsize=9)
    _arrow(ax, (3.3, 3.0), (3.8, 3.0))

    # two poolings of the same cells
    top = _box(ax, 5.6, 4.0, 2.6, 1.25, "original attention pooling\n(frozen)" + per_head, _FROZEN, 9)
    low = _box(ax, 5.6, 0.7, 2.6, 1.4, "fine-tuned copy, trained:\n" + trained + per_head, _TRAINED, 9,
               edge="#b5651d")
    _arrow(ax, (left + side, 3.2), (top[0], top[1] + 0.6))
    _arrow(ax, (left + side, 2.8), (low[0], low[1] + 0.6))

    # blend of the two unit features
    blend = _box(ax, 8.7, 2.2, 2.0, 1.6, "blend\n" r"$f = n(b\,n(f_{ft})$" "\n" r"$+\,(1-b)\,n(f_{orig}))$" "\n"
                 r"$b$ chosen on validation", "white", 8.8)
    _arrow(ax, (top[0] + top[2], top[1] + 0.6), (blend[0] + 0.5, blend[1] + blend[3]), r"$f_{orig}$",
           where=(0.25, 0.05))
    _arrow(ax, (low[0] + low[2], low[1] + 0.6), (blend[0] + 0.5, blend[1]), r"$f_{ft}$", colour="#b5651d",
           where=(0.25, -0.35))

    # text classifier and the cosine
    text = _box(ax, 8.7, 4.75, 3.85, 1.15, "prompts \"a photo of a {class}.\"\n→ frozen text encoder → "
                r"$W$ ($D \times K$)", _TEXT, 9)
    cosine = _box(ax, 11.15, 2.3, 1.45, 1.4, "logits\n" r"$s\,\cos(f, w_k)$" "\nfor each class k", "white", 9)
    _arrow(ax, (blend[0] + blend[2], 3.0), (cosine[0], 3.0), r"$f$")
    _arrow(ax, (11.85, text[1]), (11.85, cosine[1] + cosine[3]), r"$W$", where=(0.2, -0.1))

    # what training does
    ax.text(8.45, 0.95, "training (few-shot images, labels y):\n"
            r"cross-entropy of $s\,\cos(f_{ft}, W)$; only the orange box learns;"
            "\nthe text classifier is the head: no new layer", fontsize=8.5, va="center", color="#b5651d")
    handles = [Rectangle((0, 0), 1, 1, facecolor=colour, edgecolor="#44546a") for colour in (_FROZEN, _TRAINED, _TEXT)]
    ax.legend(handles, ["frozen (CLIP's own)", "trained by SAFE", "text side (frozen)"], loc="upper left",
              fontsize=8.5, frameon=False, ncol=1, bbox_to_anchor=(0.0, 1.0))
    fig.tight_layout()
    return fig
