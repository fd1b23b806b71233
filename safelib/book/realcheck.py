"""The appendix's check with real weights: the published RN50 numbers it sets ours beside.

The published numbers are *cited*, never ours: they come from the log Tip-Adapter's authors
committed (``exp.log`` in github.com/gaopengcuhk/Tip-Adapter, commit 30d2598 of 2023-05-10), one
seed, OpenAI's RN50, CoOp's test splits, one prompt template per dataset (the same templates as
``safelib.data.TEMPLATES``). Zero-shot CLIP selects nothing; Tip-Adapter-F searched alpha and beta
on the full validation split (on the test split for ImageNet) and took its best epoch on the test
split, so its numbers are upper-biased next to ours, which select on the few-shot validation set.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["CITED_SOURCE", "CITED_SELECTION", "TIP_ADAPTER_LOG_RN50", "cited", "plot_cited", "quiet_logs", "summary"]

CITED_SOURCE = ("Tip-Adapter's exp.log (github.com/gaopengcuhk/Tip-Adapter, commit 30d2598, 2023-05-10): "
                "OpenAI's RN50, one seed, CoOp's test splits")
CITED_SELECTION = ("zero-shot CLIP selects nothing; Tip-Adapter-F searched alpha and beta on the full "
                   "validation split (the test split for ImageNet) and picked its epoch on the test split")
# dataset -> (zero-shot, Tip-Adapter-F at 16 shots), test accuracy in %, as printed in that log.
TIP_ADAPTER_LOG_RN50: dict[str, tuple[float, float]] = {
    "imagenet": (60.32, 65.51),
    "caltech101": (85.92, 92.86),
    "oxford_pets": (85.83, 89.70),
    "stanford_cars": (55.74, 75.74),
    "oxford_flowers": (66.02, 94.80),
    "food101": (77.32, 79.43),
    "fgvc_aircraft": (17.10, 35.55),
    "sun397": (58.52, 71.47),
    "dtd": (42.20, 66.55),
    "eurosat": (37.52, 84.54),
    "ucf101": (61.35, 78.03),
}


def cited(dataset: str) -> dict[str, float]:
    """The cited RN50 zero-shot and 16-shot Tip-Adapter-F accuracy (%) of one benchmark."""
    if dataset not in TIP_ADAPTER_LOG_RN50:
        raise KeyError(f"no cited RN50 numbers for {dataset!r}; the log has {sorted(TIP_ADAPTER_LOG_RN50)}")
    zero_shot, tip_f = TIP_ADAPTER_LOG_RN50[dataset]
    return {"zero_shot": zero_shot, "tip_adapter_f_16": tip_f}


def plot_cited(ours: Mapping[str, Mapping[str, float]] | None = None, dataset: str | None = None) -> Figure:
    """Cited RN50 zero-shot and 16-shot Tip-Adapter-F per benchmark, with ours where a run gave them.

    ``ours``: {"zero_shot": {dataset: acc}, "safe": {dataset: acc}} from this notebook's records;
    ``dataset``: the benchmark this chapter checks, highlighted.
    """
    ours = ours or {}
    names = list(TIP_ADAPTER_LOG_RN50)
    y = np.arange(len(names))
    zero = [TIP_ADAPTER_LOG_RN50[n][0] for n in names]
    tip_f = [TIP_ADAPTER_LOG_RN50[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    ax.barh(y + 0.2, zero, height=0.4, color="#9bb7d4", label="zero-shot CLIP (cited)")
    ax.barh(y - 0.2, tip_f, height=0.4, color="#e3a66b", label="Tip-Adapter-F, 16 shots (cited)")
    for key, marker, label in (("zero_shot", "o", "zero-shot CLIP (ours)"), ("safe", "D", "SAFE, 16 shots (ours)")):
        points = [(names.index(d), acc) for d, acc in ours.get(key, {}).items() if d in names and acc is not None]
        if points:
            rows, accs = zip(*points)
            ax.scatter(accs, [r + (0.2 if key == "zero_shot" else -0.2) for r in rows], marker=marker,
                       color="black", zorder=3, label=label)
    ax.set_yticks(y, [f"> {n} <" if n == dataset else n for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_title("OpenAI's RN50: the Tip-Adapter log's numbers (cited)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def summary(dataset: str, records: Mapping[str, Mapping] | None, shots: int = 16) -> pd.DataFrame:
    """One row per number, as text: cited beside ours ("not run" where no run of ours produced it)."""
    records = records or {}
    numbers = cited(dataset)

    def ours(method: str) -> str:
        record = records.get(method)
        return "not run" if record is None else f"{float(record['test_acc']):.2f}"

    rows = [  # text cells, so that a number nobody produced reads as such, not as NaN
        {"method": "zero-shot CLIP", "cited (%)": f"{numbers['zero_shot']:.2f}", "ours (%)": ours("zero_shot")},
        {"method": "Tip-Adapter-F, 16 shots", "cited (%)": f"{numbers['tip_adapter_f_16']:.2f}",
         "ours (%)": "not in this book"},
        {"method": f"SAFE, {shots} shots", "cited (%)": "not published", "ours (%)": ours("safe")},
    ]
    return pd.DataFrame(rows).set_index("method")


@contextlib.contextmanager
def quiet_logs(level: int = logging.CRITICAL) -> Iterator[None]:
    """Hold back log records below ``level`` (open_clip logs a failed download as an ERROR on the
    root logger, which a notebook shows as stderr output; the exception that follows says the same)."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)
