"""Density-map figures: each one draws tiny inputs, has the expected panels, and saves PNG + PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from figure_checks import assert_saved, colorbar_labels  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from helpers import density as dens  # noqa: E402
from helpers.analysis import ground_truth  # noqa: E402
from helpers.viz import density as vd  # noqa: E402


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


@pytest.fixture()
def scene():
    """A 48 x 64 image with 5 heads (two close pairs and a lone one) and its adaptive map."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    points = np.array([[10.2, 12.5], [13.0, 12.0], [40.5, 30.5], [42.0, 33.0], [60.0, 5.0]])
    return image, points, dens.density_map(points, image.shape, dens.DensityParams())


def test_dense_crop(figures, scene):
    image, points, _ = scene
    nn = dens.knn_distances(points, 1)[:, 0]
    fig = vd.dense_crop(image, points, nn, center=(12.0, 12.0), size=20, name="02_t_crop")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    t = titles(fig)
    assert t[0] == "whole image: 5 heads, 64x48 px"
    # the 20 x 20 crop at the top-left corner (moved inside the image) holds the first two heads
    assert t[1] == "20x20 px crop (cyan box): 2 heads"
    assert fig.axes[2].get_xlabel() == "nearest-neighbour distance (pixels)"
    assert_saved(figures, "02_t_crop")


def test_kernel_profiles(figures):
    kernels = {1.0: dens.gaussian_kernel_1d(1.0), 2.0: dens.gaussian_kernel_1d(2.0)}
    xs = np.linspace(-10, 10, 201)
    curves = {s: (xs, np.exp(-xs**2 / (2 * s * s)) / (np.sqrt(2 * np.pi) * s)) for s in kernels}
    fig = vd.kernel_profiles(kernels, curves, truncate=4.0, name="02_t_kernels")
    assert len(fig.axes) == 2
    assert fig.axes[1].get_yscale() == "log"
    labels = fig.axes[0].get_legend_handles_labels()[1]
    # radius int(4 * sigma + 0.5): 4 px for sigma 1, 8 px for sigma 2
    assert "discrete, sigma = 1 px, radius r = 4" in labels
    assert "discrete, sigma = 2 px, radius r = 8" in labels
    assert_saved(figures, "02_t_kernels")


def test_density_comparison(figures, scene):
    image, points, adaptive = scene
    fixed = dens.density_map(points, image.shape, dens.DensityParams("fixed", sigma=3.0))
    rows = [("sparse", image, points, {"fixed": fixed, "adaptive": adaptive}),
            ("dense", image, points[:3], {"fixed": fixed, "adaptive": adaptive})]
    fig = vd.density_comparison(rows, name="02_t_compare")
    assert len(fig.axes) == 2 * 3 + 4  # 2 rows x (image + 2 maps), one colour bar per map
    t = titles(fig)
    assert "sparse: 5 heads" in t and "dense: 3 heads" in t
    assert "fixed\nsum = 5.00" in t and "adaptive\nsum = 5.00" in t
    assert colorbar_labels(fig) == [vd.DENSITY_UNITS] * 4
    with pytest.raises(ValueError):
        vd.density_comparison([("a", image, points, {"x": fixed}), ("b", image, points, {})], name=None)
    assert_saved(figures, "02_t_compare")


def test_sigma_vs_density(figures, scene):
    image, points, _ = scene
    params = dens.DensityParams()
    geo = ground_truth.local_geometry(points, params)
    rows = {"one": points[:, 1] / image.shape[0]}
    fig = vd.sigma_vs_density({"one": geo, "two": geo}, rows, fixed_sigma=15.0, name="02_t_sigma")
    assert len(fig.axes) == 2 + 1  # one colour bar, for the panel with row fractions
    assert titles(fig)[:2] == ["one: 5 heads", "two: 5 heads"]
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    assert colorbar_labels(fig) == ["row y / H (0 = top of the image)"]
    assert_saved(figures, "02_t_sigma")


def test_count_errors(figures):
    rows = [
        {"n_points": 100, "sum": 100.0, "sum_pooled": 100.0, "sum_no_renorm": 98.0, "sum_cv2": 103.0},
        {"n_points": 10, "sum": 10.0, "sum_pooled": 10.0, "sum_no_renorm": 9.0, "sum_cv2": 9.5},
        {"n_points": 0, "sum": 0.0, "sum_pooled": 0.0, "sum_no_renorm": 0.0, "sum_cv2": 0.0},
    ]
    fig = vd.count_errors(rows, factor=8, name="02_t_counts")
    assert len(fig.axes) == 2
    assert titles(fig)[0] == "count error per image (2 images)"  # the empty image is left out
    # the plotted relative errors, in percent, of the original border handling: -2 % and -10 %
    offsets = {c.get_label(): c.get_offsets() for c in fig.axes[0].collections}
    assert np.allclose(offsets["original border handling"][:, 1], [-2.0, -10.0])
    assert np.allclose(offsets["original + cv2 resize x 64"][:, 1], [3.0, -5.0])
    # bar lengths: mean |relative error| (exact zeros drawn at the 1e-12 floor)
    widths = [p.get_width() for p in fig.axes[1].patches]
    assert np.allclose(widths, [1e-12, 1e-12, 0.06, 0.04])
    assert_saved(figures, "02_t_counts")


@pytest.mark.parametrize("shape", [(48, 64), (16, 64)], ids=["landscape", "wide"])
def test_downsampling(figures, shape):
    points = np.array([[5.0, 5.0], [30.5, 10.2], [60.0, 15.0]])
    full = dens.density_map(points, shape, dens.DensityParams("fixed", sigma=2.0))
    pooled = dens.downsample_density(full, 8)
    resized = ground_truth.resize_density_cv2(full, 8)
    fig = vd.downsampling(full, pooled, 8, resized, count=3, name="02_t_down")
    assert len(fig.axes) == 3 + 3
    t = titles(fig)
    assert t[0] == f"full resolution {shape[1]}x{shape[0]}\nsum = 3.000"
    assert t[1] == f"sum-pooled by 8: {pooled.shape[1]}x{pooled.shape[0]}\nsum = 3.000"
    assert colorbar_labels(fig) == [vd.DENSITY_UNITS] + ["density (people / 8x8-pixel block)"] * 2
    assert_saved(figures, "02_t_down")


def test_density_panel(figures, scene):
    image, points, density = scene
    fig = vd.density_panel(image, points, density, title="one image")
    assert len(fig.axes) == 2 + 1
    assert titles(fig)[:2] == ["5 heads", "density map, sum = 5.00"]
    assert not figures.exists() or not any(figures.iterdir()), "name=None must not save"
    vd.density_panel(image, points, density, name="02_t_panel")
    assert_saved(figures, "02_t_panel")
