"""Optional ipywidgets explorers for the SAFE book (install the ``book`` extra for ipywidgets).

They only re-draw what a notebook has already computed, one image or one blend at a time, with
the figures of ``safelib.book.plots``. The rendered book shows the static figures instead; these are
for readers running the notebooks in Jupyter or Colab.
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..methods.blend import sweep_blend
from .plots import attention_before_after

__all__ = ["attention_explorer", "attention_slider", "blend_explorer", "StaticHTML"]


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
    from IPython.display import display  # IPython comes with the optional ipywidgets

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
        label.value = (f"blend {point.blend:.2f}: accuracy {point.accuracy:.1f}% "
                       f"({point.correct}/{len(labels)}), cross-entropy {point.cross_entropy:.3f}")

    slider.observe(lambda change: show(change["new"]), names="value")
    show(slider.value)
    return widgets.VBox([slider, label])


class StaticHTML:
    """HTML that Jupyter, Colab and the built book show as it is: no kernel needed to use it."""

    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"StaticHTML({len(self.html):,} characters)"


def attention_slider(images: Sequence, before: torch.Tensor, after: torch.Tensor,
                     coverage: np.ndarray | None = None, titles: Sequence[str] | None = None,
                     size: float = 2.6, dpi: int = 72) -> StaticHTML:
    """``attention_explorer`` for readers of the built book: an image slider that works without a kernel.

    Each image's before/after figure is drawn once, embedded as a PNG, and an HTML range input
    picks the one shown (a line of inline JavaScript). Keep it to a few dozen images: the page
    carries them all.
    """
    import matplotlib.pyplot as plt

    if not len(images) == len(before) == len(after):
        raise ValueError(f"{len(images)} images, {len(before)} maps before and {len(after)} after")
    if not len(images):
        raise ValueError("attention_slider needs at least one image")
    frames = []
    for index in range(len(images)):
        fig = attention_before_after([images[index]], before[index:index + 1], after[index:index + 1],
                                     None if coverage is None else coverage[index:index + 1],
                                     None if titles is None else [titles[index]], size=size)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        frames.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    last = len(frames) - 1
    shown = "".join(
        f'<img src="data:image/png;base64,{frame}" alt="attention before and after, test image {i}" '
        f'style="display:{"block" if i == 0 else "none"};max-width:100%">' for i, frame in enumerate(frames))
    move = ("var box=this.closest('.safe-slider');box.querySelector('output').textContent=this.value;"
            "box.querySelectorAll('img').forEach(function(im,i){im.style.display=(i==this.value)?'block':'none';},this);")
    return StaticHTML(
        f'<div class="safe-slider"><label>test image <output>0</output> of 0-{last} '
        f'<input type="range" min="0" max="{last}" value="0" step="1" oninput="{move}" '
        f'style="vertical-align:middle;width:16em"></label><div>{shown}</div></div>')
