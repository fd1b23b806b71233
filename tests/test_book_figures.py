"""The figures and the kernel-free slider added for the built book (chapter 04's two figures, 02's slider)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

import safelib as sl  # noqa: E402
from safelib.book import plots, widgets  # noqa: E402


def test_cache_by_views_draws_size_and_epoch_time_per_placement():
    rows = pd.DataFrame({"views": [1, 2, 3], "cache GB": [3.2, 6.4, 9.6], "placement": ["device", "pinned", "memmap"],
                         "predicted s / epoch": [1.0, 2.0, 30.0]})
    fig = plots.plot_cache_by_views(rows)
    size_ax, time_ax = fig.axes
    assert [round(p.get_height(), 1) for p in size_ax.patches] == [3.2, 6.4, 9.6]
    assert len(time_ax.lines) == 3
    with pytest.raises(ValueError, match="lack columns"):
        plots.plot_cache_by_views(rows.drop(columns="placement"))


def test_epoch_predictions_has_a_bar_per_fitting_placement_and_marks_the_choice():
    nominal = SimpleNamespace(placement="memmap", predictions={"memmap": {"epoch_s": 40.0}})
    here = SimpleNamespace(placement="device", predictions={"device": {"epoch_s": 0.5}, "memmap": {"epoch_s": 9.0}})
    fig = plots.plot_epoch_predictions({"t4 (nominal)": nominal, "here": here})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t4 (nominal): memmap", "here: device", "here: memmap"]
    assert sum("(chosen)" in t.get_text() for t in ax.texts) == 2
    with pytest.raises(ValueError, match="no plans"):
        plots.plot_epoch_predictions({})


def test_attention_slider_embeds_every_frame_and_needs_no_kernel():
    images = [np.full((16, 16, 3), 40 * i, dtype=np.uint8) for i in range(3)]
    before = torch.softmax(torch.randn(3, 2, 1 + 16), -1)
    after = torch.softmax(torch.randn(3, 2, 1 + 16), -1)
    html = widgets.attention_slider(images, before, after, titles=["a", "b", "c"])._repr_html_()
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 3
    assert 'type="range" min="0" max="2"' in html and "<script" not in html
    assert html.count("display:block") == 1  # one frame shown at a time
    with pytest.raises(ValueError, match="3 images, 2 maps before"):
        widgets.attention_slider(images, before[:2], after)
    assert sl.widgets.attention_slider is widgets.attention_slider
