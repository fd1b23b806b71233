"""The book's figures: each helper draws what it is given, from tiny synthetic inputs."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import safelib as sl  # noqa: E402
from safelib.book import plots  # noqa: E402


def _attention(n: int = 3, heads: int = 2, grid: int = 4) -> torch.Tensor:
    return torch.rand(n, heads, 1 + grid * grid).softmax(-1)


def test_attention_grid_drops_the_mean_token_and_renormalises():
    attention = _attention()
    heat = plots.attention_grid(attention)
    assert heat.shape == (3, 4, 4)
    np.testing.assert_allclose(heat.sum((1, 2)), 1.0, rtol=1e-5)
    expected = attention[0, :, 1:].mean(0)
    np.testing.assert_allclose(heat[0].ravel(), (expected / expected.sum()).numpy(), rtol=1e-5)


def test_attention_grid_matches_target_attention_mass():
    attention = _attention(n=2)
    coverage = np.zeros((2, 4, 4), dtype=np.float32)
    coverage[:, 1:3, 1:3] = 1.0
    heat = plots.attention_grid(attention)
    mass = sl.target_attention_mass(attention, coverage)
    np.testing.assert_allclose(heat[:, 1:3, 1:3].sum((1, 2)), mass.numpy(), rtol=1e-5)


def test_attention_grid_refuses_non_square_grids():
    with pytest.raises(ValueError, match="square"):
        plots.attention_grid(torch.rand(1, 2, 1 + 6))
    with pytest.raises(ValueError, match="N x heads"):
        plots.attention_grid(torch.rand(2, 17))


def test_attention_figures_draw_over_images(tmp_path):
    images = [np.full((32, 32, 3), 200, dtype=np.uint8) for _ in range(3)]
    coverage = np.zeros((3, 4, 4), dtype=np.float32)
    coverage[:, :2, :2] = 1.0
    fig = plots.show_attention(images, _attention(), titles=["a", "b", "c"], coverage=coverage, columns=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert len(fig.axes[0].patches) == 4  # the 2 x 2 target cells are boxed
    fig.savefig(tmp_path / "maps.png")
    fig = plots.attention_before_after(images, _attention(), _attention(), coverage=coverage, titles=list("abc"),
                                       masses=([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]))
    assert any(t.get_text() == "on target 0.40" for t in fig.axes[3].texts)
    assert len(fig.axes) == 6
    fig.savefig(tmp_path / "before_after.png")
    with pytest.raises(ValueError, match="images"):
        plots.show_attention(images[:2], _attention())


def test_curves_and_sweep(tmp_path):
    fig = plots.plot_training_curve([2.0, 1.5, 1.2], [0.3, 0.5, 0.7])
    fig.savefig(tmp_path / "curve.png")
    sweep = sl.sweep_blend(torch.randn(8, 4), torch.randn(8, 4), torch.arange(8) % 2,
                           torch.nn.functional.normalize(torch.randn(4, 2), dim=0), 10.0, grid=(0.0, 0.5, 1.0))
    fig = plots.plot_blend_sweep(sweep, chosen=0.5)
    fig.savefig(tmp_path / "sweep.png")
    fig = plots.plot_blend_sweep([{"blend": 0.0, "accuracy": 0.5, "cross_entropy": 1.0},
                                  {"blend": 1.0, "accuracy": 0.7, "cross_entropy": 0.8}])
    assert isinstance(fig, Figure)
    fig = plots.plot_target_mass([0.2, 0.3], [0.4, 0.5])
    assert isinstance(fig, Figure)


def test_accuracy_vs_shots_from_records(tmp_path):
    records = pd.DataFrame({
        "dataset": "toy", "method": ["zero_shot", "safe"] * 4, "shots": [1, 1, 1, 1, 4, 4, 4, 4],
        "seed": [1, 1, 2, 2, 1, 1, 2, 2], "test_acc": [50, 55, 52, 57, 50, 70, 52, 72.0],
    })
    fig = plots.plot_accuracy_vs_shots(records)
    fig.savefig(tmp_path / "shots.png")
    assert fig.axes[0].get_xlabel() == "shots per class"
    with pytest.raises(ValueError, match="columns"):
        plots.plot_accuracy_vs_shots(records.drop(columns="seed"))
    with pytest.raises(ValueError, match="no records"):
        plots.plot_accuracy_vs_shots(records.iloc[:0])


def test_widget_explorers_build_and_update():
    pytest.importorskip("ipywidgets")
    from safelib.book import widgets

    images = [np.zeros((16, 16, 3), dtype=np.uint8) for _ in range(3)]
    explorer = widgets.attention_explorer(images, _attention(), _attention(), np.ones((3, 4, 4), np.float32),
                                          titles=list("abc"))
    slider = explorer.children[0]
    slider.value = 2  # re-draws without error
    with pytest.raises(ValueError, match="images"):
        widgets.attention_explorer(images[:2], _attention(), _attention())
    explorer = widgets.blend_explorer(torch.randn(6, 4), torch.randn(6, 4), torch.arange(6) % 2,
                                      torch.nn.functional.normalize(torch.randn(4, 2), dim=0), 10.0)
    slider, label = explorer.children
    slider.value = 1.0
    assert label.value.startswith("blend 1.00: accuracy")
