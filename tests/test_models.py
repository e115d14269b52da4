"""The networks: shapes, non-negativity, parameter counts, VGG16 weight mapping, receptive fields."""

from __future__ import annotations

import copy
import socket
import time
import urllib.error
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision
from scipy.signal import convolve2d
from torch import nn

from helpers import models
from helpers.analysis.diagnostics import effective_kernel, stacked_taps
from helpers.errors import CheckpointError
from helpers.models import (
    CSRNet,
    HeatmapCNN,
    PretrainedWeightsWarning,
    build_model,
    count_parameters,
    load_vgg16_frontend,
    receptive_field,
)

# VGG16 (configuration D) up to conv4_3 and the CSRNet backend, written out independently of the
# module under test: ("conv", c_in, c_out, kernel, dilation) or ("pool", 2, 2).
CSRNET_LAYERS = (
    [("conv", 3, 64, 3, 1), ("conv", 64, 64, 3, 1), ("pool", 2, 2)]
    + [("conv", 64, 128, 3, 1), ("conv", 128, 128, 3, 1), ("pool", 2, 2)]
    + [("conv", 128, 256, 3, 1), ("conv", 256, 256, 3, 1), ("conv", 256, 256, 3, 1), ("pool", 2, 2)]
    + [("conv", 256, 512, 3, 1), ("conv", 512, 512, 3, 1), ("conv", 512, 512, 3, 1)]
    + [("conv", 512, 512, 3, 2), ("conv", 512, 512, 3, 2), ("conv", 512, 512, 3, 2)]
    + [("conv", 512, 256, 3, 2), ("conv", 256, 128, 3, 2), ("conv", 128, 64, 3, 2)]
    + [("conv", 64, 1, 1, 1)]
)
TV_FRONTEND_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)  # torchvision vgg16().features indices
FRONTEND_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                  "conv4_1", "conv4_2", "conv4_3")  # fmt: skip


def hand_rf(layers) -> list[int]:
    """Receptive field after each layer: r += (d(k-1)+1 - 1) j ; j *= s."""
    r, j, out = 1, 1, []
    for layer in layers:
        if layer[0] == "conv":
            k, d, s = layer[3], layer[4], 1
        else:
            k, s, d = layer[1], layer[2], 1
        r += (d * (k - 1)) * j
        j *= s
        out.append(r)
    return out


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    """torchvision vgg16(weights=None) feature weights, every tensor randomised (biases are 0)."""
    torch.manual_seed(1)
    sd = torchvision.models.vgg16(weights=None).features.state_dict()
    return {f"features.{k}": torch.randn_like(v) for k, v in sd.items()}


@pytest.fixture(scope="module")
def vgg_bn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    sd = torchvision.models.vgg16_bn(weights=None).features.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            out[f"features.{k}"] = v.clone()
        elif k.endswith("running_var"):
            out[f"features.{k}"] = torch.rand_like(v) + 0.5
        else:
            out[f"features.{k}"] = torch.randn_like(v)
    return out


@pytest.fixture()
def fresh_vgg_state(monkeypatch, tmp_path):
    """Forget earlier download attempts and point the torch hub cache at an empty folder."""
    monkeypatch.setattr(models, "_VGG_STATE", {"warned": False, "failed": {}})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


# ------------------------------------------------------------------ shapes, outputs


@pytest.mark.parametrize("name", ["heatmap_cnn", "csrnet"])
@pytest.mark.parametrize(("h", "w"), [(64, 64), (96, 128), (136, 72), (100, 77)])
def test_output_shape_is_input_floor_divided_by_8(name, h, w):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert model.output_stride == 8
    with torch.inference_mode():
        y = model(torch.randn(2, 3, h, w))
    # Three 2x2 floor-pools: floor(floor(floor(h/2)/2)/2) == h // 8 (100x77 -> 12x9).
    assert y.shape == (2, 1, h // 8, w // 8)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("name", ["heatmap_cnn", "csrnet"])
def test_channels_last_gives_same_output(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        ref = model(x)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out.contiguous(), ref, rtol=1e-4, atol=1e-5)


def test_heatmap_outputs_nonnegative_even_when_raw_is_negative():
    torch.manual_seed(0)
    model = HeatmapCNN().eval()
    x = torch.randn(3, 3, 64, 64) * 3
    with torch.no_grad():
        assert (model(x) >= 0).all()
        model.head.bias.fill_(-30.0)
        assert (model.forward_raw(x) < 0).all()
        y = model(x)
    assert (y >= 0).all() and torch.isfinite(y).all()
    assert float(y.max()) < 1e-6


@pytest.mark.parametrize("init_output", [None, 0.1, 2.5])
def test_heatmap_initial_output_is_small_constant(init_output):
    torch.manual_seed(0)
    model = (HeatmapCNN() if init_output is None else HeatmapCNN(init_output=init_output)).eval()
    expected = 1.0 if init_output is None else init_output
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    # Head weights start at std 1e-3, so every cell is softplus(bias) = init_output, within 2 %.
    assert abs(float(y.mean()) - expected) < 0.02 * expected
    assert float(y.std()) < 0.02 * expected


def test_csrnet_relu_output_and_linear_loss_output():
    torch.manual_seed(0)
    model = CSRNet().eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        model.output_layer.bias.fill_(-1.0)
        raw = model.forward_raw(x)
        y = model(x)
        loss_out = model.loss_output(x)
    assert (raw < 0).all()
    assert (y == 0).all()
    torch.testing.assert_close(loss_out, raw)
    torch.testing.assert_close(y, raw.clamp(min=0))


def test_csrnet_backend_init_normal_001():
    torch.manual_seed(0)
    model = CSRNet()
    w = torch.cat([m.weight.detach().flatten() for m in model.backend if isinstance(m, nn.Conv2d)])
    assert abs(float(w.std()) - 0.01) < 0.0005
    biases = [m.bias.detach() for m in model.backend if isinstance(m, nn.Conv2d)]
    assert all(float(b.abs().max()) == 0 for b in biases)
    assert model.output_layer.bias.item() == 0.0


# ------------------------------------------------------------------ parameter counts


def heatmap_expected_params(w: int) -> int:
    convs = [(3, w // 2), (w // 2, w), (w, w), (w, 2 * w), (2 * w, 2 * w),
             (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w), (4 * w, 2 * w)]  # fmt: skip
    # 3x3 convs without bias + BN (gamma, beta) + 1x1 head with bias.
    return sum(9 * a * b + 2 * b for a, b in convs) + 2 * w + 1


@pytest.mark.parametrize("width", [24, 32, 48, 64])
def test_heatmap_parameter_count(width):
    n = count_parameters(HeatmapCNN(width=width))
    assert n == heatmap_expected_params(width)
    assert 250_000 <= n <= 2_100_000  # "a few hundred thousand to about two million"


def test_csrnet_parameter_count_from_layer_list():
    expected = sum(k * k * a * b + b for kind, a, b, k, _ in
                   (layer for layer in CSRNET_LAYERS if layer[0] == "conv"))  # fmt: skip
    model = CSRNet()
    assert count_parameters(model) == expected
    assert round(expected / 1e6, 2) == 16.26
    frontend = sum(9 * a * b + b for kind, a, b, *_ in CSRNET_LAYERS[:13] if kind == "conv")
    assert count_parameters(model.frontend) == frontend == 7_635_264


def test_build_model_names_and_kwargs():
    assert isinstance(build_model("heatmap_cnn", width=16), HeatmapCNN)
    assert build_model("HeatmapCNN".replace("CNN", "_cnn")).width == 32
    assert isinstance(build_model("csrnet", batch_norm=True), CSRNet)
    with pytest.raises(ValueError, match="heatmap_cnn, csrnet"):
        build_model("resnet")


# ------------------------------------------------------------------ VGG16 weights


def assert_frontend_equals(model: CSRNet, state: dict, indices=TV_FRONTEND_CONVS) -> None:
    layers = dict(model.frontend.named_children())
    for name, idx in zip(FRONTEND_NAMES, indices, strict=True):
        assert torch.equal(layers[name].weight, state[f"features.{idx}.weight"]), name
        assert torch.equal(layers[name].bias, state[f"features.{idx}.bias"]), name


def test_load_vgg16_state_dict_maps_every_conv(vgg_state):
    torch.manual_seed(0)
    model = CSRNet()
    backend_before = copy.deepcopy(model.backend.state_dict())
    assert load_vgg16_frontend(model, weights=vgg_state) is True
    assert_frontend_equals(model, vgg_state)
    for k, v in model.backend.state_dict().items():
        assert torch.equal(v, backend_before[k])


def test_load_vgg16_from_pth_file(vgg_state, tmp_path):
    path = tmp_path / "vgg16.pth"
    # A real torchvision file also holds the classifier; the loader must ignore extra keys.
    torch.save({**vgg_state, "classifier.6.bias": torch.zeros(1000)}, path)
    model = CSRNet(pretrained=path)
    assert model.frontend_pretrained is True
    assert_frontend_equals(model, vgg_state)
    assert load_vgg16_frontend(CSRNet(), str(path)) is True


def test_load_vgg16_bn_layout(vgg_bn_state, vgg_state):
    model = CSRNet(batch_norm=True)
    assert load_vgg16_frontend(model, vgg_bn_state) is True
    bn_convs = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30)
    assert_frontend_equals(model, vgg_bn_state, bn_convs)
    bn = model.frontend.bn4_3
    torch.testing.assert_close(bn.running_var, vgg_bn_state["features.31.running_var"])
    torch.testing.assert_close(bn.weight, vgg_bn_state["features.31.weight"])
    with pytest.raises(CheckpointError, match="batch_norm"):
        load_vgg16_frontend(CSRNet(batch_norm=True), vgg_state)
    with pytest.raises(CheckpointError, match="vgg16_bn layout"):
        load_vgg16_frontend(CSRNet(), vgg_bn_state)


def test_wrong_shape_raises_and_leaves_model_unchanged(vgg_state):
    bad = dict(vgg_state)
    bad["features.21.weight"] = torch.zeros(512, 256, 3, 3)  # conv4_3 with the wrong input width
    model = CSRNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"features\.21\.weight.*conv4_3"):
        load_vgg16_frontend(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_missing_key_and_foreign_dict_raise(vgg_state):
    partial = {k: v for k, v in vgg_state.items() if not k.startswith("features.19.")}
    with pytest.raises(CheckpointError, match=r"features\.19\.weight"):
        load_vgg16_frontend(CSRNet(), partial)
    with pytest.raises(CheckpointError, match="not a torchvision VGG16"):
        load_vgg16_frontend(CSRNet(), HeatmapCNN().state_dict())


@dataclass
class NotATensor:
    value: int = 1


def test_bad_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vgg16_frontend(CSRNet(), tmp_path / "missing.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"features.0.weight": NotATensor()}, unsafe)  # refused by weights_only=True
    with pytest.raises(CheckpointError, match="weights_only"):
        load_vgg16_frontend(CSRNet(), unsafe)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vgg16_frontend(CSRNet(), garbage)


def test_imagenet_offline_warns_once_and_keeps_random_init(monkeypatch, fresh_vgg_state):
    calls = []

    def no_internet(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_internet)
    torch.manual_seed(0)
    model = CSRNet()
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_vgg16_frontend(model, "imagenet") is False
        assert load_vgg16_frontend(model, "imagenet") is False
        assert CSRNet(pretrained=True).frontend_pretrained is False
    messages = [str(w.message) for w in caught if issubclass(w.category, PretrainedWeightsWarning)]
    assert len(messages) == 1, messages
    assert "ImageNet VGG16 weights unavailable (URLError" in messages[0]
    assert "random init" in messages[0] and "vgg16-397923af.pth" in messages[0]
    assert calls == ["https://download.pytorch.org/models/vgg16-397923af.pth"]  # no retries
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_imagenet_download_times_out_instead_of_hanging(monkeypatch, fresh_vgg_state, tmp_path):
    """A server that accepts the connection but never answers (a silent firewall, a dead proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/vgg16-397923af.pth"

    def download(_url, *args, **kwargs):
        return torch.hub.load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", download)
    monkeypatch.setattr(models, "DOWNLOAD_TIMEOUT_S", 0.5)
    before = socket.getdefaulttimeout()
    t0 = time.perf_counter()
    try:
        with pytest.warns(PretrainedWeightsWarning, match="unavailable"):
            assert load_vgg16_frontend(CSRNet(), "imagenet") is False
    finally:
        server.close()
    assert time.perf_counter() - t0 < 10
    assert socket.getdefaulttimeout() == before  # the global default is restored


def test_imagenet_download_success_path(monkeypatch, fresh_vgg_state, vgg_state):
    monkeypatch.setattr(
        torchvision.models._api, "load_state_dict_from_url", lambda url, **kw: vgg_state
    )
    model = CSRNet(pretrained="imagenet")
    assert model.frontend_pretrained is True
    assert_frontend_equals(model, vgg_state)


# ------------------------------------------------------------------ receptive field


def test_receptive_field_small_sequential_by_hand():
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(1, 1, 3, padding=2, dilation=2),
        nn.AvgPool2d(3, stride=2),
    )
    rows = receptive_field(net)
    # conv3: r = 1 + 2*1 = 3; pool2: r = 3 + 1*1 = 4, j = 2;
    # conv3 d2 (k_eff 5): r = 4 + 4*2 = 12; avgpool3 s2: r = 12 + 2*2 = 16, j = 4.
    assert [r.rf for r in rows] == [3, 4, 12, 16]
    assert [r.jump for r in rows] == [1, 2, 2, 4]
    assert [r.kind for r in rows] == ["conv", "maxpool", "conv", "avgpool"]
    assert [r.start for r in rows] == [0.0, 0.5, 0.5, 2.5]
    assert rows[2].effective_kernel == 5


def test_receptive_field_of_both_models_matches_layer_lists():
    assert [r.rf for r in receptive_field(CSRNet())] == hand_rf(CSRNET_LAYERS)
    assert receptive_field(CSRNet())[-1].rf == 284  # conv4_3 reaches 92, backend adds 6*4*8
    heat = [("conv", 0, 0, 3, 1), ("pool", 2, 2), ("conv", 0, 0, 3, 1), ("conv", 0, 0, 3, 1),
            ("pool", 2, 2), ("conv", 0, 0, 3, 1), ("conv", 0, 0, 3, 1), ("pool", 2, 2),
            ("conv", 0, 0, 3, 1), ("conv", 0, 0, 3, 2), ("conv", 0, 0, 3, 4), ("conv", 0, 0, 3, 1),
            ("conv", 0, 0, 1, 1)]  # fmt: skip
    rows = receptive_field(HeatmapCNN())
    assert [r.rf for r in rows] == hand_rf(heat)
    assert rows[-1].rf == 162 and rows[-1].jump == 8


def gradient_extent(model: nn.Module, x: torch.Tensor, i: int, j: int) -> tuple[int, int, int, int]:
    """Rows and columns (first, last) of the input pixels with a non-zero gradient of y[i, j]."""
    x = x.clone().requires_grad_(True)
    model(x)[0, 0, i, j].backward()
    g = x.grad.abs().sum(dim=(0, 1))
    rows = torch.nonzero(g.sum(1)).flatten()
    cols = torch.nonzero(g.sum(0)).flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def make_positive(model: nn.Module) -> nn.Module:
    """Max-pools -> average pools (same k, s) and positive, fan-in-normalised conv weights.

    Every activation is then positive, so every input pixel inside the receptive field has a
    non-zero gradient and the measured extent must equal the computed one exactly.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_().add_(0.01)
                m.weight.div_(m.weight.sum(dim=(1, 2, 3), keepdim=True))
                if m.bias is not None:
                    m.bias.fill_(0.1)
    return model.eval()


def expected_extent(model: nn.Module, i: int) -> tuple[int, int]:
    last = receptive_field(model)[-1]
    centre = last.start + i * last.jump
    return int(centre - (last.rf - 1) / 2), int(centre + (last.rf - 1) / 2)


def test_empirical_receptive_field_heatmap_cnn():
    torch.manual_seed(0)
    size, i = 256, 16
    lo, hi = expected_extent(HeatmapCNN(width=8), i)
    assert (lo, hi) == (51, 212)  # centre 3.5 + 16*8 = 131.5, half-width (162-1)/2
    # Random eval-mode model: ReLUs and max-pools switch paths off, so the extent is <= the RF.
    model = HeatmapCNN(width=8).eval()
    r0, r1, c0, c1 = gradient_extent(model, torch.randn(1, 3, size, size), i, i)
    assert lo <= r0 and r1 <= hi and lo <= c0 and c1 <= hi
    assert r1 - r0 + 1 > 100  # and it is not trivially small
    # All-positive model on a constant input: the extent is exactly the RF.
    positive = make_positive(HeatmapCNN(width=8))
    assert gradient_extent(positive, torch.ones(1, 3, size, size), i, i) == (lo, hi, lo, hi)


def test_empirical_receptive_field_csrnet():
    torch.manual_seed(0)
    size, i = 304, 19
    model = make_positive(CSRNet())
    lo, hi = expected_extent(model, i)
    assert (lo, hi) == (14, 297)  # centre 3.5 + 19*8 = 155.5, half-width (284-1)/2
    assert gradient_extent(model, torch.ones(1, 3, size, size), i, i) == (lo, hi, lo, hi)


def test_effective_kernel_and_gridding():
    k = effective_kernel(3, 2)
    expected = np.zeros((5, 5), dtype=int)
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(k, expected)
    np.testing.assert_array_equal(effective_kernel(3, 1), np.ones((3, 3)))
    for dils in [(2, 2, 2), (1, 2, 3), (1, 2, 4)]:
        taps = stacked_taps(dils)
        brute = np.ones((1, 1), dtype=int)
        for d in dils:
            brute = convolve2d(brute, effective_kernel(3, d))
        np.testing.assert_array_equal(taps, brute)
        assert taps.shape == (1 + 2 * sum(dils),) * 2
        assert taps.sum() == 9 ** len(dils)  # one path per choice of tap in each layer
    grid = stacked_taps((2, 2, 2))
    assert (grid[1::2, :] == 0).all() and (grid[::2, ::2] > 0).all()  # gridding: odd offsets unseen
    assert (stacked_taps((1, 2, 3)) > 0).all() and (stacked_taps((1, 2, 4)) > 0).all()


# ------------------------------------------------------------------ learning


def blob_targets(n: int, size: int, heads: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, 1, size/8, size/8) densities x 100: Gaussian heads (sigma 4 px) summed per 8x8 cell."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    maps = []
    for _ in range(n):
        dens = np.zeros((size, size))
        for x, y in rng.uniform(8, size - 8, size=(heads, 2)):
            g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0**2))
            dens += g / g.sum()
        cells = dens.reshape(size // 8, 8, size // 8, 8).sum(axis=(1, 3))
        maps.append(cells * 100)
    return torch.tensor(np.stack(maps)[:, None], dtype=torch.float32)


def test_heatmap_cnn_overfits_one_batch():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.randn(2, 3, 64, 64)
    target = blob_targets(2, 64, 4, rng)
    assert abs(float(target.sum()) - 2 * 4 * 100) < 0.5  # heads at least 2 sigma from the border
    model = HeatmapCNN().train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model.loss_output(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # About 100x in 200 steps here; ask for 10x.
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
