"""Optional ipywidgets explorers for the SAFE book (install the ``book`` extra for ipywidgets).

They only re-draw what a notebook has already computed, one image or one blend at a time, with
the figures of ``safelib.book.plots``. The rendered book shows the static figures instead; these are
for readers running the notebooks in Jupyter or Colab.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from ..methods.blend import sweep_blend
from .plots import attention_before_after

__all__ = ["attention_explorer", "blend_explorer"]


def _widgets():
    try:
        import ipywidgets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the explorers need ipywidgets: pip install 'safelib[book]' (or ipywidgets)") from error
    return ipywidgets


def attention_explorer(images: Sequence, before: torch.Tensor, after: torch.Tensor,
                       coverage: np.ndarray | None = None, titles: Sequence[str] | None = None):
    """A slider over images: the original and fine-tuned pooling's attention on the chosen one.

    images, before, after, coverage, titles: as for ``safelib.book.plots.attention_before_after``, for
    all N images; the widget shows one at a time. Returns the widget (display it, or let Jupyter).
    """
    import matplotlib.pyplot as plt
    from IPython.display import display


    widgets = _widgets()
    if not len(images) == len(before) == len(after):
        raise ValueError(f"{len(images)} images, {len(before)} maps before and {len(after)} after")
    output = widgets.Output()
    slider = widgets.IntSlider(value=0, min=0, max=len(images) - 1, description="image")

    def show(index: int) -> None:
        with output:
            output.clear_output(wait=True)
            fig = attention_before_after([images[index]], before[index:index + 1], after[index:index + 1],
                                         None if coverage is None else coverage[index:index + 1],
                                         None if titles is None else [titles[index]], size=3.0)
            display(fig)
            plt.close(fig)  # shown once, in the output area

    slider.observe(lambda change: show(change["new"]), names="value")
    show(0)
    return widgets.VBox([slider, output])


def blend_explorer(f_ft: torch.Tensor, f_orig: torch.Tensor, labels: torch.Tensor, text_weights: torch.Tensor,
                   logit_scale: float):
    """A blend slider printing the accuracy of the blended features on the given labelled set.

    Use it on validation features to see the choice SAFE makes; on test features only to look,
    never to choose.
    """

    widgets = _widgets()
    label = widgets.HTML()
    slider = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="blend")

    def show(blend: float) -> None:
        point = sweep_blend(f_ft, f_orig, labels, text_weights, logit_scale, grid=(float(blend),))[0]
        label.value = (f"blend {point.blend:.2f}: accuracy {100 * point.accuracy:.1f}% "
                       f"({point.correct}/{len(labels)}), cross-entropy {point.cross_entropy:.3f}")

    slider.observe(lambda change: show(change["new"]), names="value")
    show(slider.value)
    return widgets.VBox([slider, label])
