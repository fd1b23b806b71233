"""The book's figures: each helper draws what it is given, from tiny synthetic inputs."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

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


def test_attention_grid_refuses_non_square_grids():
    with pytest.raises(ValueError, match="square"):
        plots.attention_grid(torch.rand(1, 2, 1 + 6))
    with pytest.raises(ValueError, match="N x heads"):
        plots.attention_grid(torch.rand(2, 17))


def _heat(ax) -> np.ndarray:
    """The attention map drawn over the image in a panel (the second image on the axes)."""
    return np.asarray(ax.get_images()[1].get_array())


def test_attention_figures_draw_each_images_own_map_over_it(tmp_path):
    images = [np.full((32, 32, 3), 200, dtype=np.uint8) for _ in range(3)]
    coverage = np.zeros((3, 4, 4), dtype=np.float32)
    coverage[:, :2, :2] = 1.0
    attention = _attention()
    fig = plots.show_attention(images, attention, titles=["a", "b", "c"], coverage=coverage, columns=2)
    assert len(fig.axes) == 5 and not fig.axes[3].axison  # 3 panels on a 2 x 2 grid, the last one blank
    assert fig.axes[4].get_ylabel() == "share of the attention per grid cell"  # and one colour bar
    heat = plots.attention_grid(attention)
    for i in range(3):
        np.testing.assert_array_equal(_heat(fig.axes[i]), heat[i])
        assert fig.axes[i].get_title() == "abc"[i]
    assert fig.axes[0].get_images()[1].get_clim() == (0, pytest.approx(heat.max()))  # one colour scale
    boxes = sorted((r.get_x(), r.get_y()) for r in fig.axes[0].patches)
    assert boxes == [(0, 0), (0, 8), (8, 0), (8, 8)]  # the target's 2 x 2 cells of 8 px, boxed
    fig.savefig(tmp_path / "maps.png")
    plt.close(fig)

    before, after = _attention(), _attention()
    fig = plots.attention_before_after(images, before, after, coverage=coverage, titles=list("abc"),
                                       masses=([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]))
    assert len(fig.axes) == 7  # 2 x 3 panels and one colour bar for both rows
    np.testing.assert_array_equal(_heat(fig.axes[1]), plots.attention_grid(before)[1])  # row 0: before
    np.testing.assert_array_equal(_heat(fig.axes[4]), plots.attention_grid(after)[1])   # row 1: after
    assert [t.get_text() for t in fig.axes[3].texts] == ["on target 0.40"]
    assert fig.axes[0].get_ylabel() == "original pooling" and fig.axes[3].get_ylabel() == "fine-tuned pooling"
    fig.savefig(tmp_path / "before_after.png")
    plt.close(fig)
    with pytest.raises(ValueError, match="images"):
        plots.show_attention(images[:2], _attention())


def test_training_curve_draws_loss_and_accuracy_per_epoch():
    fig = plots.plot_training_curve([2.0, 1.5, 1.2], [30.0, 50.0, 70.0])
    loss_ax, accuracy_ax = fig.axes
    (loss,), (accuracy,) = loss_ax.lines, accuracy_ax.lines
    np.testing.assert_array_equal(loss.get_xdata(), [1, 2, 3])  # epochs count from 1
    np.testing.assert_array_equal(loss.get_ydata(), [2.0, 1.5, 1.2])
    np.testing.assert_array_equal(accuracy.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(accuracy.get_ydata(), [30.0, 50.0, 70.0])  # percent, as given
    assert len(plots.plot_training_curve([1.0, 0.5]).axes) == 1  # no accuracies, no second axis
    plt.close("all")


def test_blend_sweep_draws_every_point_and_marks_the_choice():
    sweep = sl.sweep_blend(torch.randn(8, 4), torch.randn(8, 4), torch.arange(8) % 2,
                           torch.nn.functional.normalize(torch.randn(4, 2), dim=0), 10.0, grid=(0.0, 0.5, 1.0))
    fig = plots.plot_blend_sweep(sweep, chosen=0.5)
    accuracy_ax, entropy_ax = fig.axes
    accuracy, chosen = accuracy_ax.lines
    np.testing.assert_array_equal(accuracy.get_xdata(), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(accuracy.get_ydata(), [p.accuracy for p in sweep])
    np.testing.assert_array_equal(entropy_ax.lines[0].get_ydata(), [p.cross_entropy for p in sweep])
    np.testing.assert_array_equal(chosen.get_xdata(), [0.5, 0.5])  # the vertical line at the chosen blend
    assert [t.get_text() for t in accuracy_ax.texts] == ["chosen 0.5"]

    fig = plots.plot_blend_sweep([{"blend": 0.0, "accuracy": 50.0, "cross_entropy": 1.0},
                                  {"blend": 1.0, "accuracy": 70.0, "cross_entropy": 0.8}])
    (accuracy,) = fig.axes[0].lines  # the record form; nothing chosen, nothing marked
    np.testing.assert_array_equal(accuracy.get_ydata(), [50.0, 70.0])
    assert len(fig.axes[0].texts) == 0
    plt.close("all")


def test_target_mass_puts_before_on_x_and_after_on_y():
    fig = plots.plot_target_mass([0.2, 0.3], [0.4, 0.5])
    (ax,) = fig.axes
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[0.2, 0.4], [0.3, 0.5]])
    np.testing.assert_array_equal(ax.lines[0].get_xydata(), [[0, 0], [1, 1]])  # the diagonal: no change
    plt.close(fig)
    fig = plots.plot_target_mass([0.2, 0.3], [0.4, 0.5], uniform=0.25)
    (ax,) = fig.axes
    assert [tuple(line.get_xdata()) for line in ax.lines[1:]] == [(0.25, 0.25), (0, 1)]  # uniform, both axes
    plt.close(fig)


def test_blend_curves_draw_each_sweep_on_a_full_axis_with_chance_and_choice():
    val = [{"blend": 0.0, "accuracy": 40.0}, {"blend": 0.5, "accuracy": 60.0}, {"blend": 1.0, "accuracy": 50.0}]
    test = [{"blend": 0.0, "accuracy": 35.0}, {"blend": 0.5, "accuracy": 45.0}, {"blend": 1.0, "accuracy": 55.0}]
    fig = plots.plot_blend_curves({"val": val, "test": test}, chance=100 / 6, chosen={"val": 0.5},
                                  band={"test": ([30, 40, 50], [40, 50, 60])})
    (ax,) = fig.axes
    val_line, star, test_line, chance = ax.lines
    np.testing.assert_array_equal(val_line.get_ydata(), [40.0, 60.0, 50.0])
    np.testing.assert_array_equal(star.get_xydata(), [[0.5, 60.0]])  # the chosen blend, on its line
    np.testing.assert_array_equal(test_line.get_ydata(), [35.0, 45.0, 55.0])
    assert chance.get_ydata()[0] == pytest.approx(100 / 6)
    assert ax.get_ylim() == (0, 100) and len(ax.collections) == 1  # the whole axis; one band
    with pytest.raises(ValueError, match="no sweeps"):
        plots.plot_blend_curves({})
    plt.close(fig)


def test_blend_sweep_says_what_one_validation_image_is_worth():
    sweep = [{"blend": 0.0, "accuracy": 50.0, "cross_entropy": 1.0, "correct": 12},
             {"blend": 1.0, "accuracy": 75.0, "cross_entropy": 0.8, "correct": 18}]
    fig = plots.plot_blend_sweep(sweep)
    assert "one of the 24 images = 4.2 accuracy points" in fig.axes[0].get_xlabel()
    plt.close(fig)


def test_accuracy_vs_shots_from_records(tmp_path):
    records = pd.DataFrame({
        "dataset": "toy", "method": ["zero_shot", "safe"] * 4, "shots": [1, 1, 1, 1, 4, 4, 4, 4],
        "seed": [1, 1, 2, 2, 1, 1, 2, 2], "test_acc": [50, 55, 52, 57, 50, 70, 52, 72.0],
    })
    fig = plots.plot_accuracy_vs_shots(records)
    fig.savefig(tmp_path / "shots.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "shots per class" and ax.get_title() == "toy (seeds 1, 2)"
    zero_shot, safe = ax.lines[:2]  # one line per method, the mean over seeds
    np.testing.assert_array_equal(zero_shot.get_xdata(), [1, 4])
    np.testing.assert_array_equal(zero_shot.get_ydata(), [51.0, 51.0])
    np.testing.assert_array_equal(safe.get_ydata(), [56.0, 71.0])
    assert len(ax.collections) == 2  # and a +- 1 std band each
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero_shot", "safe"]
    plt.close(fig)
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
