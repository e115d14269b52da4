"""Model figures and tables: each one draws tiny inputs, has the expected content, saves PNG + PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from figure_checks import assert_saved, colorbar_labels  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from helpers.analysis import diagnostics as insp  # noqa: E402
from helpers.analysis.diagnostics import effective_kernel, stacked_taps  # noqa: E402
from helpers.models import HeatmapCNN, receptive_field  # noqa: E402
from helpers.viz import models as vm  # noqa: E402


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return HeatmapCNN(width=8).eval()


def test_receptive_field_markdown_rows_and_values(small_model):
    rows = receptive_field(small_model)
    table = vm.receptive_field_markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) == 2 + 13  # header, rule, 9 convs + 3 pools + head
    # the dilation-4 convolution: k_eff = 4 * 2 + 1 = 9, RF 82 + 8 * 8 = 146
    assert "| 11 | `body.dconv4_3` | conv | 3 | 4 | 9 | 1 | 8 | **146** |" in lines
    assert lines[-1].endswith("| **162** |")


def test_layer_shapes_markdown_hides_bn_relu_but_counts_them(small_model):
    shapes = insp.layer_shapes(small_model, (1, 3, 32, 48))
    table = vm.layer_shapes_markdown(shapes)
    assert "BatchNorm2d |" not in table.replace("hidden BatchNorm2d", "")
    assert "| `body.conv1` | Conv2d | 1 x 4 x 32 x 48 | 1 | 108 |" in table  # 9 * 3 * 4 weights
    total = sum(p.numel() for p in small_model.parameters())
    assert f"**{total:,}**" in table.splitlines()[-1]


def test_plot_receptive_field_growth_single_and_compared(figures, small_model):
    rows = receptive_field(small_model)
    fig = vm.plot_receptive_field_growth(rows, head_sizes={"head": 12.0}, name="t_rf")
    assert isinstance(fig, Figure)
    assert_saved(figures, "t_rf")
    ax_rf, ax_jump = fig.axes[:2]
    assert [t.get_text() for t in ax_rf.get_xticklabels()][:2] == ["conv1", "pool1"]
    assert ax_rf.get_ylim()[1] >= 162
    legend = [t.get_text() for t in ax_rf.get_legend().get_texts()]
    assert "head: 12 px" in legend
    # two models: one line each, no per-layer tick names
    fig2 = vm.plot_receptive_field_growth({"a": rows, "b": rows[:5]}, name=None)
    labels = [t.get_text() for t in fig2.axes[0].get_legend().get_texts()]
    assert "a: RF 162 px" in labels and "b: RF 14 px" in labels


def test_plot_receptive_field_on_image(figures):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    points = np.array([[40.0, 30.0], [44.0, 33.0], [5.0, 5.0]])
    fig = vm.plot_receptive_field_on_image(image, points, (42.0, 31.0), rf=30, stride=8, head_size=6,
                                           name="t_rf_img")
    assert_saved(figures, "t_rf_img")
    # cell of (42, 31) is [40, 48) x [24, 32), centre (44, 28); field 30 px: x 29..59, y 13..43
    assert fig.axes[1].get_title().startswith("the field enlarged: 2 heads")
    assert fig.axes[1].get_xlim() == pytest.approx((28.5, 58.5))


def test_plot_input_gradient_from_a_real_gradient(figures, small_model):
    x = torch.randn(1, 3, 64, 64)
    grad = insp.input_gradient(small_model, x, (4, 4))
    box = insp.receptive_field_box(receptive_field(small_model), (4, 4))
    fig = vm.plot_input_gradient(grad, box, (32, 32, 39, 39), name="t_grad")
    assert isinstance(fig, Figure) and len(fig.axes) == 3  # map, colour bar, profile
    assert_saved(figures, "t_grad")
    assert colorbar_labels(fig) == ["|d output / d input| / maximum (blank = exactly 0)"]


def test_plot_effective_kernels_titles_count_unseen(figures):
    kernels = {"d = 2": effective_kernel(3, 2), "d = 2, 2": stacked_taps((2, 2)), "d = 1, 2": stacked_taps((1, 2))}
    fig = vm.plot_effective_kernels(kernels, unit="cells", name="t_kernels")
    assert_saved(figures, "t_kernels")
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert titles[0] == "d = 2\n5x5 squares, 16 of 25 unseen"  # 9 taps of 25
    assert titles[1] == "d = 2, 2\n9x9 squares, 56 of 81 unseen"  # every other row and column
    assert titles[2] == "d = 1, 2\n7x7 squares, 0 of 49 unseen"
    assert fig.axes[0].get_xlabel() == "input offset x (cells)"


def test_plot_stride_cells(figures):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    density = np.zeros((32, 32), dtype=np.float32)
    density[1, 1] = density[2, 2] = density[20, 25] = 1.0
    from helpers.density import downsample_density

    pooled = {s: downsample_density(density, s) for s in (4, 8, 16)}
    fig = vm.plot_stride_cells(image, density, pooled, name="t_stride")
    assert_saved(figures, "t_stride")
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert titles[2] == "stride 4: 8x8 cells\nsum = 3.0, fullest cell 2.00"  # two heads in cell (0, 0)
    assert titles[4] == "stride 16: 2x2 cells\nsum = 3.0, fullest cell 2.00"
    assert colorbar_labels(fig)[-1] == "people per 16x16-pixel cell"


def test_plot_overfit_curve(figures):
    losses = list(100.0 * 0.9 ** np.arange(50))
    fig = vm.plot_overfit_curve(losses, required_ratio=10, name="t_overfit")
    assert_saved(figures, "t_overfit")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_title().endswith("(175x lower)")  # 0.9 ** -49 = 174.6
    assert [t.get_text() for t in ax.get_legend().get_texts()][1] == "first loss / 10"
    assert ax.lines[1].get_ydata()[0] == pytest.approx(10.0)


def sample(name: str, h: int, w: int, scale: float) -> insp.SamplePrediction:
    rng = np.random.default_rng(h * w)
    true = rng.random((-(-h // 8), -(-w // 8))).astype(np.float32)
    pred = (true * scale).astype(np.float32)
    return insp.SamplePrediction(name, rng.integers(0, 255, (h, w, 3), dtype=np.uint8), true, pred,
                                 float(true.sum()), float(pred.sum()))


def test_plot_density_predictions(figures):
    samples = [sample("IMG_1", 40, 64, 0.5), sample("IMG_2", 36, 36, 2.0)]
    fig = vm.plot_density_predictions(samples, title="t", name="t_pred")
    assert_saved(figures, "t_pred")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 6
    s = samples[0]
    assert panels[0].get_title() == "IMG_1 (64x40 px)"
    assert panels[1].get_title() == f"true: {s.true_count:.0f} people"
    assert panels[2].get_title() == f"predicted: {s.pred_count:.1f} (error {s.pred_count - s.true_count:+.1f})"
    assert colorbar_labels(fig) == ["people per 8x8-pixel cell"] * 4
    # the two maps of a row share one colour scale
    assert panels[1].images[0].get_clim() == panels[2].images[0].get_clim()
    # a 36 px image has 5 cells (40 px of extent), drawn cropped to the image
    assert panels[5].get_xlim() == pytest.approx((-0.5, 35.5))


def test_live_history_collects_rows_without_ipython():
    callback = vm.live_history()
    callback({"epoch": 1, "train_loss": 2.0, "val_mae": 5.0, "val_rmse": 6.0})
    callback({"epoch": 2, "train_loss": 1.0, "val_mae": 4.0, "val_rmse": 5.0})
    assert [r["epoch"] for r in callback.rows] == [1, 2]
    assert plt.get_fignums() == []  # nothing drawn outside a notebook


def test_empty_inputs_raise():
    with pytest.raises(ValueError):
        vm.plot_density_predictions([])
    with pytest.raises(ValueError):
        vm.plot_effective_kernels({})
    with pytest.raises(ValueError):
        vm.plot_overfit_curve([])
