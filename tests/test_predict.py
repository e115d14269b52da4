"""Inference on any image: whole vs tiled maps, exact counts, image inputs, the predict command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from helpers import predict
from helpers.errors import CheckpointError, ImageReadError
from helpers.models import IMAGENET_MEAN, IMAGENET_STD, HeatmapCNN
from helpers.predict import Prediction, count, upsample_density
from helpers.tools import cli, inference
from helpers.tools.checkpoints import save_checkpoint
from helpers.tools.inference import as_rgb_uint8, count_image

# Normalised value of a white red channel: (1 - mean_R) / std_R.
WHITE_R = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- toy models


class CellConv(nn.Module):
    """One 8x8 stride-8 convolution (+ optional softplus): each cell sees only its own pixels."""

    output_stride = 8

    def __init__(self, weight: torch.Tensor | None = None, bias: float = 0.0, softplus: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 8, stride=8)
        with torch.no_grad():
            if weight is not None:
                self.conv.weight.copy_(weight)
            self.conv.bias.fill_(bias)
        self.softplus = softplus

    def forward(self, x):
        y = self.conv(x)
        return nn.functional.softplus(y) if self.softplus else y


def constant_model() -> CellConv:
    """Outputs exactly 1.0 in every cell."""
    return CellConv(weight=torch.zeros(1, 3, 8, 8), bias=1.0, softplus=False)


def red_mean_model() -> CellConv:
    """relu(mean of the normalised red channel over the cell): WHITE_R for a white cell, 0 for black."""
    w = torch.zeros(1, 3, 8, 8)
    w[0, 0] = 1.0 / 64
    model = CellConv(weight=w, bias=0.0, softplus=False)
    return nn.Sequential(model, nn.ReLU())


class Recorder(nn.Module):
    """Wraps a model and records the shape of every input it receives."""

    output_stride = 8

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def random_heatmap_cnn(seed: int = 0, width: int = 4) -> HeatmapCNN:
    """A random HeatmapCNN whose output clearly depends on the image (larger head weights)."""
    torch.manual_seed(seed)
    model = HeatmapCNN(width=width).eval()
    nn.init.normal_(model.head.weight, std=1.0)
    return model


def smooth_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A random uint8 RGB image with structure at several scales."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random((*shape, 3)), (3, 3, 0))
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * 255).astype(np.uint8)


# --------------------------------------------------------------------------- tiling


def test_tiled_equals_whole_image_for_heatmap_cnn():
    model = random_heatmap_cnn()
    image = smooth_image((600, 900))
    whole = count(image, model, tile=0)
    tiled = count_image(image, model, tile=256, overlap=64)
    assert not whole.tiled and whole.n_tiles == 1
    assert tiled.tiled and tiled.n_tiles == 15  # 3 x 5 tiles of 256 every 192 px
    assert whole.density_lowres.shape == tiled.density_lowres.shape == (75, 113)
    lo = whole.density_lowres
    assert lo.std() > 0.05 * lo.mean(), "the test model must respond to the image"
    # brief: within 1 %; with the default context margin (80 px) tiles are exact up to rounding
    assert tiled.count == pytest.approx(whole.count, rel=1e-5)
    np.testing.assert_allclose(tiled.density_lowres, lo, rtol=1e-4, atol=1e-6 * lo.max())


@pytest.mark.parametrize("tile", [64, 256, 512])
def test_core_tiles_are_exact(tile):
    """The core's tiles (context margin from the receptive field, no overlap) equal the whole image."""
    model = random_heatmap_cnn(seed=4)
    image = smooth_image((300, 459), seed=5)  # neither side a multiple of 8 or of the tile
    whole = count(image, model, tile=0)
    tiled = count(image, model, tile=tile)
    assert tiled.n_tiles == -(-300 // tile) * -(-459 // tile)
    assert tiled.tiled == (tiled.n_tiles > 1)
    assert tiled.count == pytest.approx(whole.count, rel=1e-6)
    lo = whole.density_lowres
    np.testing.assert_allclose(tiled.density_lowres, lo, rtol=1e-5, atol=1e-6 * lo.max())


def test_count_by_hand_equals_count():
    """Resize, normalise, pad, forward, divide by the scale, sum: the method of count()."""
    model = random_heatmap_cnn(seed=6)
    image = smooth_image((101, 150), seed=6)
    x = predict.prepare_image(image, input_scale=0.5)
    assert x.shape == (1, 3, 56, 80)  # 51 x 75 padded to multiples of 8
    with torch.no_grad():
        by_hand = model.eval()(x).sum().item() / 2.0
    assert count(image, model, scale=2.0, input_scale=0.5).count == pytest.approx(by_hand, rel=1e-5)


def test_blending_reduces_seam_errors_with_small_margins():
    """Without enough context the tiles are wrong near their edges; overlap blending helps."""
    model = random_heatmap_cnn()
    image = smooth_image((600, 900), seed=1)
    whole = count(image, model, tile=0).density_lowres.astype(np.float64)

    def error(**kw) -> tuple[float, float]:
        lo = count_image(image, model, tile=256, **kw).density_lowres
        inner = (slice(4, -4), slice(4, -4))  # away from the image borders
        rel_map = np.abs(lo - whole)[inner].sum() / whole[inner].sum()
        return abs(lo.sum() / whole.sum() - 1), rel_map

    no_context = error(margin=0, overlap=0)
    blended = error(margin=0, overlap=64)
    some_context = error(margin=64, overlap=64)
    assert blended[1] < 0.6 * no_context[1]  # measured: 0.054 -> 0.027 mean relative error
    assert some_context[0] < 0.01 and some_context[1] < 0.01  # measured: 6e-5 and 5e-4


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "margin"),
    [((600, 900), 256, 64, 0), ((600, 900), 256, 64, 64), ((37, 53), 16, 8, 8),
     ((1000, 1000), 128, 0, 0), ((601, 899), 64, 32, 16)],
)
def test_tiling_never_double_counts(shape, tile, overlap, margin):
    scale = 4.0
    pred = count_image(np.zeros((*shape, 3), np.uint8), constant_model(), scale=scale, tile=tile,
                       overlap=overlap, margin=margin)
    cells = -(-shape[0] // 8) * -(-shape[1] // 8)
    assert pred.tiled
    assert np.all(pred.density_lowres == np.float32(1 / scale))  # a weighted average of 1s is 1
    assert pred.count == cells / scale


def test_tiles_align_with_the_whole_image_grid():
    """A model whose cells see only their own pixels gives the same map however it is tiled."""
    torch.manual_seed(3)
    model = CellConv(weight=torch.randn(1, 3, 8, 8) * 0.05)
    image = smooth_image((203, 317), seed=2)
    whole = count(image, model, tile=0)
    assert predict.context_margin(model) == 0
    for tile, overlap in [(64, 0), (64, 32), (96, 24), (512, 0)]:
        tiled = count_image(image, model, tile=tile, overlap=overlap)
        np.testing.assert_allclose(tiled.density_lowres, whole.density_lowres, rtol=1e-6)


def test_context_margin_from_receptive_field():
    assert predict.context_margin(HeatmapCNN(width=4)) == 80  # field 162: 77 px -> 80
    assert predict.context_margin(nn.Identity()) is None


def test_tile_starts_and_weights():
    assert inference.tile_starts(600, 256, 192) == [0, 192, 344]
    assert inference.tile_starts(200, 256, 192) == [0]
    w_first = inference.blend_weights(8, 4, first=True, last=False)
    w_next = inference.blend_weights(8, 4, first=False, last=True)
    np.testing.assert_allclose(w_first, [1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    # consecutive tiles overlapping by exactly 4 cells: weights sum to 1 there
    np.testing.assert_allclose(w_first[4:] + w_next[:4], 1.0)


def test_automatic_tiling_above_the_pixel_budget(monkeypatch):
    image = smooth_image((300, 400))
    model = constant_model()
    assert not count(image, model).tiled
    monkeypatch.setattr(predict, "AUTO_TILE_PIXELS", 100_000)
    monkeypatch.setattr(predict, "DEFAULT_TILE", 128)
    pred = count(image, model)
    assert pred.tiled and pred.n_tiles == 3 * 4
    assert pred.count == 38 * 50


@pytest.mark.parametrize("kwargs", [dict(tile=100), dict(tile=256, overlap=12),
                                    dict(tile=256, overlap=192), dict(tile=256, margin=4),
                                    dict(tile=-8)])
def test_bad_tiling_arguments(kwargs):
    with pytest.raises(ValueError):
        count_image(np.zeros((64, 64, 3), np.uint8), constant_model(), **kwargs)
    if "overlap" not in kwargs:
        with pytest.raises(ValueError):
            count(np.zeros((64, 64, 3), np.uint8), constant_model(), **kwargs)


def test_large_image_memory_stays_bounded():
    """6000 x 4000 in tiles of 1024: no forward pass or numpy array is anywhere near full size."""
    h, w = 4000, 6000
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    torch.manual_seed(0)
    inner = CellConv(weight=torch.randn(1, 3, 8, 8) * 0.05, bias=-1.0)
    model = Recorder(inner)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        pred = count(image, model, tile=1024)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pred.tiled and pred.image_shape == (h, w)
    assert pred.density_lowres.shape == (500, 750)
    assert len(model.shapes) == pred.n_tiles == 4 * 6  # 1024 tiles every 1024 px (margin 0)
    assert max(s[2] for s in model.shapes) <= 1024 and max(s[3] for s in model.shapes) <= 1024
    # one full-resolution float32 channel would be 96 MB, the normalised image 288 MB; measured
    # 57 MB: the temporaries of normalising one 1024 x 1024 tile (12.6 MB each)
    assert peak < h * w * 4, f"numpy peak {peak / 1e6:.0f} MB"
    # spot-check cells against the convolution computed by hand
    wt = inner.conv.weight.detach().double().numpy()[0]  # (3, 8, 8)
    rng = np.random.default_rng(1)
    for i, j in zip(rng.integers(0, 500, 20), rng.integers(0, 750, 20), strict=True):
        pixels = image[8 * i : 8 * i + 8, 8 * j : 8 * j + 8].astype(np.float64) / 255
        block = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
        expected = np.log1p(np.exp((block * wt).sum() - 1.0))
        assert pred.density_lowres[i, j] == pytest.approx(expected, rel=1e-4)
    print(f"6000x4000, {pred.n_tiles} tiles: {seconds:.1f} s, numpy peak {peak / 1e6:.0f} MB")


# --------------------------------------------------------------------------- density and points


def test_density_at_image_resolution_keeps_the_count_for_odd_sizes():
    model = random_heatmap_cnn(seed=2)
    image = smooth_image((37, 53), seed=3)
    pred = count(image, model, scale=2.0)
    assert pred.image_shape == (37, 53)
    assert pred.density_lowres.shape == (5, 7) and pred.density_lowres.dtype == np.float32
    assert pred.density.shape == (37, 53) and pred.density.dtype == np.float32
    assert float(pred.density.sum(dtype=np.float64)) == pytest.approx(pred.count, rel=1e-6)
    # block sums of the full-resolution map give the cells back (cut cells included)
    sums = np.add.reduceat(np.add.reduceat(pred.density.astype(np.float64), np.arange(0, 37, 8), 0),
                           np.arange(0, 53, 8), 1)
    np.testing.assert_allclose(sums, pred.density_lowres, rtol=1e-6)
    # a cell cut to 5 x 5 pixels spreads its people over those 25 pixels evenly
    assert pred.density[36, 52] == pytest.approx(pred.density_lowres[4, 6] / 25, rel=1e-6)
    assert pred.density[0, 0] == pytest.approx(pred.density_lowres[0, 0] / 64, rel=1e-6)


def test_upsample_density_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        upsample_density(np.zeros((4, 7), np.float32), (37, 53))


def test_padding_is_the_mean_colour_and_points_are_cell_centres():
    """White 8x8 blocks on black: one person each (scale = WHITE_R); a block cut by the border
    covers 5 of its cell's 8 rows, the rest being padding (0 after normalisation)."""
    image = np.zeros((37, 53, 3), np.uint8)
    image[8:16, 16:24] = 255  # cell (1, 2)
    image[24:32, 40:48] = 255  # cell (3, 5)
    image[32:37, 0:8] = 255  # cell (4, 0), rows 32-36 only
    pred = count(image, red_mean_model(), scale=WHITE_R)
    assert pred.count == pytest.approx(2 + 5 / 8, rel=1e-5)
    assert pred.density_lowres[4, 0] == pytest.approx(5 / 8, rel=1e-5)
    # default: the round(2.625) = 3 strongest maxima, at cell centres (x, y)
    np.testing.assert_allclose(pred.points, [[20, 12], [44, 28], [4, 36]])
    thresholded = count(image, red_mean_model(), scale=WHITE_R, threshold=0.7)
    np.testing.assert_allclose(thresholded.points, [[20, 12], [44, 28]])
    # a cell sticking out of the image: its point is moved inside (W = 49, last cell 48-55)
    narrow = np.zeros((16, 49, 3), np.uint8)
    narrow[8:16, 48] = 255  # one column of cell (1, 6): 1/8 of the cell white
    pts = count(narrow, red_mean_model(), scale=WHITE_R / 8).points
    np.testing.assert_allclose(pts, [[48.5, 12]])


# --------------------------------------------------------------------------- inputs


def _reference_count(rgb: np.ndarray) -> float:
    torch.manual_seed(5)
    return count_image(rgb, CellConv(weight=torch.randn(1, 3, 8, 8) * 0.05)).count


def test_inputs_path_pil_and_array_agree(tmp_path):
    rgb = smooth_image((45, 70), seed=4)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    expected = _reference_count(rgb)
    assert _reference_count(as_rgb_uint8(Image.fromarray(rgb))) == expected
    torch.manual_seed(5)
    model = CellConv(weight=torch.randn(1, 3, 8, 8) * 0.05)
    for image in (path, str(path), Image.open(path), rgb):
        pred = count_image(image, model)
        assert isinstance(pred, Prediction) and pred.image_shape == (45, 70)
        assert pred.count == expected


def test_grayscale_rgba_uint16_float_and_bool_arrays():
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(as_rgb_uint8(gray), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(as_rgb_uint8(gray[:, :, None]), as_rgb_uint8(gray))
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)  # 16-bit
    np.testing.assert_array_equal(as_rgb_uint8(rgb / 255.0), rgb)  # float in [0, 1]
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.int64)), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(gray > 127)[..., 0], np.where(gray > 127, 255, 0))
    # RGBA: composited over white, value * a + 255 * (1 - a)
    alpha = rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)
    out = as_rgb_uint8(np.concatenate([rgb, alpha], axis=2))
    a = alpha / 255.0
    expected = rgb * a + 255 * (1 - a)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert np.abs(out - expected).max() <= 1.0
    rgba16 = np.concatenate([rgb, alpha], axis=2).astype(np.uint16) * 257
    np.testing.assert_array_equal(as_rgb_uint8(rgba16), out)
    la = np.stack([gray, alpha[..., 0]], axis=2)  # gray + alpha
    expected_la = gray * a[..., 0] + 255 * (1 - a[..., 0])
    assert np.abs(as_rgb_uint8(la)[..., 1] - expected_la).max() <= 1.0
    # all of them go through count
    for image in (gray, rgb.astype(np.uint16) * 257, rgb / 255.0, np.concatenate([rgb, alpha], 2)):
        assert count_image(image, constant_model()).count == 3 * 4
    with pytest.raises(ImageReadError, match="as_rgb_uint8"):  # the core takes uint8 RGB only
        count(gray, constant_model())


def test_exif_rotation_is_applied_to_files(tmp_path):
    rgb = smooth_image((40, 64), seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    path = tmp_path / "phone.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    pred = count(path, constant_model())
    assert pred.image_shape == (64, 40)


@pytest.mark.parametrize(
    "bad",
    [np.full((10, 10, 3), 2.0), np.full((10, 10, 3), np.nan), np.zeros((10, 10, 5), np.uint8),
     np.zeros((0, 10, 3), np.uint8), np.full((10, 10), 300, np.int32), "not an array"],
)
def test_bad_arrays_are_refused(bad):
    with pytest.raises(ImageReadError):
        count_image(bad, constant_model())


def test_bad_files_are_refused(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(ImageReadError, match="not a readable image"):
        count(text, constant_model())
    full = tmp_path / "full.png"
    Image.fromarray(smooth_image((200, 300))).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageReadError):
        count(truncated, constant_model())
    with pytest.raises(ImageReadError, match="over the limit"):
        count(full, constant_model(), max_pixels=50_000)
    with pytest.raises(ImageReadError, match="over the limit"):
        count(np.zeros((300, 300, 3), np.uint8), constant_model(), max_pixels=50_000)


# --------------------------------------------------------------------------- models and scale


def _write_checkpoint(path, scale: float = 50.0) -> HeatmapCNN:
    model = random_heatmap_cnn(seed=9)
    save_checkpoint(path, {"model": model.state_dict(), "model_name": "heatmap_cnn",
                           "model_kwargs": {"width": 4}, "scale": scale})
    return model


def test_checkpoint_path_uses_its_scale_and_is_loaded_once(tmp_path):
    ckpt = tmp_path / "best.pt"
    model = _write_checkpoint(ckpt, scale=50.0)
    image = smooth_image((64, 96), seed=8)
    inference._MODEL_CACHE.clear()
    from_path = count_image(image, ckpt, device="cpu")
    from_module = count(image, model, scale=50.0)
    assert from_path.count == pytest.approx(from_module.count, rel=1e-6)
    assert count(image, model).count == pytest.approx(50.0 * from_path.count, rel=1e-6)
    first = inference.load_cached_model(ckpt, "cpu")
    assert inference.load_cached_model(ckpt, "cpu")[0] is first[0]
    assert len(inference._MODEL_CACHE) == 1
    with pytest.raises(CheckpointError):
        count_image(image, tmp_path / "missing.pt")


def test_images_are_resized_to_the_scale_the_model_was_trained_at(tmp_path):
    image = smooth_image((100, 140), seed=3)
    model = constant_model()  # 1 person per 8x8 cell of whatever it is given
    full = count(image, model)
    assert full.count == 13 * 18  # ceil(100/8) x ceil(140/8) cells
    model.input_scale = 0.5
    half = count(image, model)
    assert half.model_shape == (50, 70) and half.input_scale == 0.5
    assert half.count == 7 * 9  # ceil(50/8) x ceil(70/8) cells
    assert half.density.shape == (100, 140)
    assert half.density.sum(dtype=np.float64) == pytest.approx(half.count, rel=1e-5)
    assert (half.points[:, 0] < 140).all() and (half.points[:, 1] < 100).all()
    assert half.points[:, 0].max() > 70  # points are in original pixels, not the resized image's
    assert count(image, model, input_scale=1.0).count == full.count  # explicit override
    # a checkpoint remembers the resize it was trained at
    ckpt = tmp_path / "half.pt"
    net = random_heatmap_cnn(seed=9)
    save_checkpoint(ckpt, {"model": net.state_dict(), "model_name": "heatmap_cnn",
                           "model_kwargs": {"width": 4}, "scale": 1.0, "config": {"resize": 0.5}})
    inference._MODEL_CACHE.clear()
    from_ckpt = count_image(image, ckpt, device="cpu")
    assert from_ckpt.model_shape == (50, 70)
    assert from_ckpt.count == pytest.approx(count(image, net, input_scale=0.5).count, rel=1e-6)


def test_module_density_scale_attribute_and_mode_restored():
    model = constant_model()
    model.density_scale = 8.0
    model.train()
    pred = count(np.zeros((16, 32, 3), np.uint8), model)
    assert pred.count == 8 / 8.0
    assert model.training  # eval for the call, previous mode restored


# --------------------------------------------------------------------------- overlay and command


def test_overlay_figure_accepts_both_resolutions():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.viz.predict import overlay_figure

    image = smooth_image((37, 53))
    pred = count(image, random_heatmap_cnn())
    for density in (pred.density, pred.density_lowres):
        fig = overlay_figure(image, density, pred.count, title="x.jpg", points=pred.points)
        title = fig.axes[0].get_title()
        assert "x.jpg" in title and f"{pred.count:,.1f}" in title
        assert len(fig.axes) == 2  # the image and its colour bar
        plt.close(fig)
    with pytest.raises(ValueError):
        overlay_figure(image, np.zeros((3, 7)), 0.0)  # no stride s has ceil(37/s), ceil(53/s) = 3, 7


def _run_cli(args, cwd, home) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROWD_")}
    env.update(CROWD_HOME=str(home), OMP_NUM_THREADS="1", CROWD_DEVICE="cpu")
    return subprocess.run([sys.executable, "-m", "helpers", "predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def test_command_line_good_and_bad_images(tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    _write_checkpoint(ckpt, scale=50.0)
    images = tmp_path / "images"
    images.mkdir()
    a, b = smooth_image((120, 160), seed=10), smooth_image((90, 200), seed=11)
    Image.fromarray(a).save(images / "a.png")
    Image.fromarray(b).save(images / "b.jpg", quality=95)
    (images / "bad.jpg").write_text("<html>not found</html>\n")
    out_dir = tmp_path / "overlays"
    names = [str(images / n) for n in ("a.png", "bad.jpg", "b.jpg")]
    proc = _run_cli([*names, "--checkpoint", str(ckpt), "--out", str(out_dir)], tmp_path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [row["path"] for row in lines] == [names[0], names[2]]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {names[1]}: ")
    for row, name in zip(lines, ("a.png", "b.jpg"), strict=True):
        assert set(row) == {"path", "count", "seconds", "tiled", "overlay"}
        assert row["tiled"] is False and row["seconds"] > 0
        expected = count_image(images / name, ckpt, device="cpu").count
        assert row["count"] == pytest.approx(expected, abs=1e-3)
        overlay = Image.open(row["overlay"])
        assert overlay.format == "PNG" and overlay.size[0] > 300
        assert os.path.dirname(row["overlay"]) == str(out_dir)



def test_command_line_missing_checkpoint(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(smooth_image((40, 40))).save(image)
    assert cli.main(["predict", str(image), "--checkpoint", str(tmp_path / "nope.pt")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "nope.pt" in err
    ckpt = tmp_path / "best.pt"
    _write_checkpoint(ckpt)
    assert cli.main(["predict", str(image), "--checkpoint", str(ckpt), "--tile", "100"]) == 1
    assert capsys.readouterr().err.startswith("error: tile must be")
