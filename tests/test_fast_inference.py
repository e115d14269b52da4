"""Fast CPU inference: BatchNorm folding is exact, int8 counts stay close, predict's switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from helpers.models import CSRNet, HeatmapCNN
from helpers.samples import normalize_image
from helpers.tools import fast_inference as fi
from helpers.tools import inference
from helpers.tools.inference import count_image
from helpers.tools.trainer import recalibrate_batchnorm

needs_x86 = pytest.mark.skipif(fi.ENGINE not in torch.backends.quantized.supported_engines,
                               reason="this PyTorch build has no x86 quantization engine")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def blob_image(seed: int, shape=(192, 256)) -> np.ndarray:
    """An RGB uint8 'crowd': smooth background and 20-60 dark blobs, like heads."""
    rng = np.random.default_rng(seed)
    h, w = shape
    base = ndimage.gaussian_filter(rng.uniform(60, 200, (h, w, 3)), sigma=(12, 12, 0))
    mask = np.zeros((h, w))
    for _ in range(int(rng.integers(20, 60))):
        y, x = rng.integers(0, h), rng.integers(0, w)
        mask[y, x] = 1.0
    mask = ndimage.gaussian_filter(mask, 3) * 60
    image = base - 120 * np.clip(mask, 0, 1)[..., None] + rng.normal(0, 4, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(normalize_image(image))[None]


@pytest.fixture(scope="module")
def heatmap_model() -> HeatmapCNN:
    """A small HeatmapCNN whose output depends on the image: random weights, BatchNorm statistics
    measured on blob images (not the identity of a fresh network), an image-dependent head."""
    torch.manual_seed(0)
    model = HeatmapCNN(width=8, init_output=1.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.head.weight.normal_(0, 0.3)
    return recalibrate_batchnorm(model, (tensor(blob_image(s)) for s in range(100, 108)))


def test_fold_batchnorm_gives_the_same_output_and_leaves_the_model_alone(heatmap_model):
    before = {k: v.clone() for k, v in heatmap_model.state_dict().items()}
    folded = fi.fold_batchnorm(heatmap_model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in heatmap_model.modules())
    assert n_bn > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = tensor(blob_image(1))
    with torch.no_grad():
        a, b = heatmap_model.eval()(x), folded(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float rounding only
    for key, value in heatmap_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_prepare_without_calibration_is_float32_channels_last(heatmap_model):
    fast = fi.prepare_fast_cpu(heatmap_model)
    assert fast.fast_kind == "float32"
    x = tensor(blob_image(2))
    with torch.no_grad():
        a = heatmap_model.eval()(x)
        b = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@needs_x86
def test_int8_counts_stay_within_two_percent(heatmap_model):
    calibration = [tensor(blob_image(s)) for s in range(200, 206)]  # not the images scored below
    q = fi.quantize_int8(heatmap_model, calibration)
    assert isinstance(q, fi.QuantizedDensityNet)
    quantized_convs = [m for m in q.modules()
                       if "quantized" in type(m).__module__ and "Conv" in type(m).__name__]
    assert len(quantized_convs) >= 5, "the body runs in int8"
    assert isinstance(q.head, torch.nn.Conv2d), "the output layer stays float"
    rel = []
    with torch.no_grad():
        for seed in range(10, 16):
            x = tensor(blob_image(seed))
            a, b = heatmap_model.eval()(x), q(x)
            assert b.shape == a.shape and (b >= 0).all()
            rel.append(abs(b.sum().item() - a.sum().item()) / a.sum().item())
            # the maps agree cell by cell, not only in their sums (random weights: about 0.94;
            # rounding noise averages out in the sums)
            corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
            assert corr > 0.9, corr
    assert np.mean(rel) < 0.02, rel


@needs_x86
def test_csrnet_quantizes_and_keeps_its_stride():
    torch.manual_seed(0)
    model = CSRNet(pretrained=False)
    x = torch.randn(1, 3, 64, 96)
    q = fi.quantize_int8(model, [torch.randn(1, 3, 64, 96)])
    with torch.no_grad():
        out = q(x)
    assert out.shape == (1, 1, 8, 12) and (out >= 0).all()
    assert q.output_stride == 8


def test_count_fast_on_cpu_matches_float_tiled_and_is_prepared_once(heatmap_model):
    model = fi.fold_batchnorm(heatmap_model)  # a fresh module: nothing prepared for it yet
    model.output_stride = 8
    image = blob_image(7, shape=(320, 448))
    plain = count_image(image, model, tile=0)
    fast = count_image(image, model, fast=True, tile=0)
    tiled = count_image(image, model, fast=True, tile=128)  # tiles with context margins
    assert tiled.n_tiles > 1
    tol = 0.02 if fi.has_fast_int8() else 1e-4  # int8 where it is fast, else float32
    assert fast.count == pytest.approx(plain.count, rel=tol)
    assert tiled.count == pytest.approx(plain.count, rel=tol)
    prepared = inference._FAST_CPU_MODELS[model][1]
    count_image(image, model, fast=True)
    assert inference._FAST_CPU_MODELS[model][1] is prepared  # kept, not prepared again
    with torch.no_grad():
        model.head.bias.add_(0.5)  # new weights: prepared again, and the count follows
    again = count_image(image, model, fast=True, tile=0)
    assert inference._FAST_CPU_MODELS[model][1] is not prepared
    assert again.count > fast.count
    # the caller's model still runs in float32 with its own weights
    assert not any(type(m).__module__.startswith("torch.ao") for m in model.modules())


@pytest.mark.parametrize("failure", ["missing module", "raises"])
def test_int8_failure_falls_back_to_float32_with_one_line(heatmap_model, monkeypatch, capsys, failure):
    """torch.ao.quantization is deprecated: missing or broken, the fast path counts in float32."""
    import sys

    model = fi.fold_batchnorm(heatmap_model)  # a fresh module: nothing prepared for it yet
    model.output_stride = 8
    image = blob_image(8, shape=(160, 224))
    plain = count_image(image, model, tile=0)
    monkeypatch.setattr(fi, "has_fast_int8", lambda: True)  # int8 is tried on any processor
    if failure == "missing module":
        monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # import raises ImportError
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("quantized::conv2d is not supported in this build")

        monkeypatch.setattr(fi, "quantize_int8", broken)
    capsys.readouterr()
    fast = count_image(image, model, fast=True, tile=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("int8 quantization failed (")
    assert err[0].endswith("counting in float32 instead.")
    assert inference._FAST_CPU_MODELS[model][1].fast_kind == "float32"
    assert fast.count == pytest.approx(plain.count, rel=1e-5)  # folded float32: rounding only
    exact = fi.prepare_fast_cpu(model)  # the float32 fast model, asked for directly
    with torch.no_grad():
        expected = exact(tensor(image).contiguous(memory_format=torch.channels_last)).sum().item()
    assert fast.count == pytest.approx(expected, rel=1e-6)
