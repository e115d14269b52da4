"""Density-regression networks: HeatmapCNN and CSRNet, VGG16 weights, receptive fields.

Both networks are fully convolutional, from a normalised image to a density map at 1/8 resolution:

* input ``(B, 3, H, W)`` float32: RGB in ``[0, 1]`` normalised with ``(x - IMAGENET_MEAN) /
  IMAGENET_STD`` per channel, H and W multiples of 8 (the data pipeline pads);
* output ``(B, 1, H/8, W/8)`` float32 >= 0: people x ``scale`` per 8 x 8 block
  (``model.output_stride == 8``). ``model.loss_output(x)`` is what training fits.

``HeatmapCNN`` (0.1-2 M parameters) learns from scratch in minutes on a CPU; ``CSRNet`` (Li et
al., CVPR 2018, 16.26 M) is ten VGG16 convolutions and six dilated ones. See docs/models.md.
"""

from __future__ import annotations

import contextlib
import math
import socket
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from helpers.errors import CheckpointError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in ``[0, 1]``; subtract before dividing by ``IMAGENET_STD``."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in ``[0, 1]``."""
MODEL_NAMES: tuple[str, ...] = ("heatmap_cnn", "csrnet")
"""Names accepted by :func:`build_model`."""
DOWNLOAD_TIMEOUT_S = 20.0
"""Socket timeout (seconds) of the VGG16 download: an offline machine fails fast, never hangs."""


# -------------------- HeatmapCNN


def _inverse_softplus(y: float) -> float:
    """The ``x`` with ``softplus(x) = log(1 + e^x) = y`` (for ``y > 0``)."""
    return y + math.log(-math.expm1(-y))


class HeatmapCNN(nn.Module):
    """A compact fully-convolutional density regressor that learns well from scratch.

    Layout for ``width = w`` (every 3x3 convolution is Conv-BN-ReLU)::

        s=1  conv 3->w/2                         pool 2x2
        s=2  conv w/2->w,  conv w->w             pool 2x2
        s=4  conv w->2w,   conv 2w->2w           pool 2x2
        s=8  conv 2w->4w (d=1), conv 4w->4w (d=2), conv 4w->4w (d=4), conv 4w->2w (d=1)
             1x1 conv 2w->1, softplus

    0.51 M parameters for ``w = 32`` (grows as ``w**2``). docs/models.md says why it is built so.

    Inputs (constructor):
    - width: int, even, >= 4, the channel multiplier w
    - init_output: float > 0, the initial value of every output cell (people x scale)
    """

    output_stride: int = 8

    def __init__(self, width: int = 32, init_output: float = 1.0) -> None:
        super().__init__()
        if width < 4 or width % 2:
            raise ValueError(f"HeatmapCNN width must be an even integer >= 4, got {width}")
        if not init_output > 0:
            raise ValueError(f"HeatmapCNN init_output must be > 0, got {init_output}")
        self.width, self.init_output = int(width), float(init_output)
        w = self.width
        spec = [  # (name, in channels, out channels, dilation); "pool" = a 2x2 max-pool
            ("conv1", 3, w // 2, 1), "pool1",
            ("conv2_1", w // 2, w, 1), ("conv2_2", w, w, 1), "pool2",
            ("conv3_1", w, 2 * w, 1), ("conv3_2", 2 * w, 2 * w, 1), "pool3",
            ("conv4_1", 2 * w, 4 * w, 1), ("dconv4_2", 4 * w, 4 * w, 2),
            ("dconv4_3", 4 * w, 4 * w, 4), ("conv4_4", 4 * w, 2 * w, 1),
        ]  # fmt: skip
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for item in spec:
            if isinstance(item, str):
                layers[item] = nn.MaxPool2d(2, 2)
                continue
            name, c_in, c_out, d = item  # no conv bias: BN has its own shift
            layers[name] = nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d, bias=False)
            layers[name.replace("conv", "bn")] = nn.BatchNorm2d(c_out)
            layers[name.replace("conv", "relu")] = nn.ReLU(inplace=True)
        self.body = nn.Sequential(layers)
        self.head = nn.Conv2d(2 * w, 1, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for the convolutions, BN to identity, a small constant initial output."""
        for m in self.body.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.001)
        nn.init.constant_(self.head.bias, _inverse_softplus(self.init_output))

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation output ``(B, 1, H//8, W//8)`` (can be negative; for inspection only)."""
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Density map ``(B, 1, H//8, W//8)`` >= 0 for input ``(B, 3, H, W)``."""
        return F.softplus(self.forward_raw(x))

    def loss_output(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor to compute the training loss on: the softplus output (same as ``forward``)."""
        return self(x)


# -------------------- CSRNet

CSRNET_FRONTEND: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
"""VGG16 configuration "D" up to conv4_3: output channels of each 3x3 convolution, "M" a 2x2 max-pool."""
CSRNET_BACKEND: tuple[int, ...] = (512, 512, 512, 256, 128, 64)
"""Output channels of the six dilated (d = 2) 3x3 convolutions of configuration B."""
FRONTEND_CONV_NAMES: tuple[str, ...] = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2",
                                         "conv3_3", "conv4_1", "conv4_2", "conv4_3")
"""Names of the frontend convolutions (VGG's: block, then position in the block)."""
# Index of each frontend conv inside torchvision's ``vgg16().features`` / ``vgg16_bn().features``.
_TV_CONV_INDEX_PLAIN: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
_TV_CONV_INDEX_BN: tuple[int, ...] = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30)


class CSRNet(nn.Module):
    """CSRNet (Li et al., CVPR 2018), configuration B: VGG16 frontend + dilated backend.

    ``frontend``: 3x3 convolutions (padding 1, ReLU) and 2x2 max-pools of :data:`CSRNET_FRONTEND`
    (VGG16 up to conv4_3, stride 8); ``backend``: 3x3 convolutions of :data:`CSRNET_BACKEND`
    (dilation 2, ReLU); ``output_layer``: 1x1 convolution to one channel. ImageNet weights for
    the frontend when ``pretrained`` (:func:`load_vgg16_frontend`), else He init; backend and
    output ``normal(0, 0.01)``. ``loss_output`` is the paper's linear output, ``forward`` its ReLU.

    Inputs (constructor):
    - pretrained: False/None (random init), True or "imagenet" (torchvision weights), a path
      to a .pth state dict, or a state dict
    - batch_norm: bool, BatchNorm after every 3x3 convolution (ImageNet weights of vgg16_bn)
    """

    output_stride: int = 8

    def __init__(self, pretrained: bool | str | Path | Mapping[str, torch.Tensor] | None = False,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.batch_norm = bool(batch_norm)
        front: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, names, pools = 3, iter(FRONTEND_CONV_NAMES), 0
        for item in CSRNET_FRONTEND:
            if item == "M":
                pools += 1
                front[f"pool{pools}"] = nn.MaxPool2d(2, 2)
            else:
                c_in = self._add_conv(front, next(names), c_in, int(item), dilation=1)
        self.frontend = nn.Sequential(front)
        back: OrderedDict[str, nn.Module] = OrderedDict()
        for i, c_out in enumerate(CSRNET_BACKEND, start=1):
            c_in = self._add_conv(back, f"dconv{i}", c_in, c_out, dilation=2)
        self.backend = nn.Sequential(back)
        self.output_layer = nn.Conv2d(c_in, 1, 1)
        self.reset_parameters()
        self.frontend_pretrained = pretrained not in (None, False) and load_vgg16_frontend(
            self, "imagenet" if pretrained is True else pretrained)

    def _add_conv(self, layers: OrderedDict[str, nn.Module], name: str, c_in: int, c_out: int,
                  dilation: int) -> int:
        """Append conv (+ BN) + ReLU named like ``conv1_1``/``bn1_1``/``relu1_1``; returns c_out."""
        suffix = name.removeprefix("dconv").removeprefix("conv")
        layers[name] = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation)
        if self.batch_norm:
            layers[f"bn{suffix}"] = nn.BatchNorm2d(c_out)
        layers[f"relu{suffix}"] = nn.ReLU(inplace=True)
        return c_out

    def reset_parameters(self) -> None:
        """Random init: He normal for the frontend, ``normal(0, 0.01)`` for backend and output."""
        for m in self.frontend.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in [*self.backend.modules(), self.output_layer]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's linear output ``(B, 1, H//8, W//8)``; may be negative."""
        return self.output_layer(self.backend(self.frontend(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Density map ``(B, 1, H//8, W//8)`` >= 0: ``relu`` of the linear output."""
        return F.relu(self.forward_raw(x))

    def loss_output(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor to compute the training loss on: the linear output, as in the paper."""
        return self.forward_raw(x)


# -------------------- ImageNet VGG16 weights for the CSRNet frontend


class PretrainedWeightsWarning(UserWarning):
    """ImageNet weights could not be loaded; the model starts from random init."""


_VGG_STATE: dict[str, object] = {"warned": False, "failed": {}}  # warn once, retry never


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily give new sockets a timeout (urllib's default is to wait forever)."""
    old, _ = socket.getdefaulttimeout(), socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _fetch_imagenet_state_dict(batch_norm: bool) -> dict[str, torch.Tensor] | None:
    """torchvision's VGG16 ImageNet state dict (hub cache, else download), or None with one warning."""
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    failed: dict[str, str] = _VGG_STATE["failed"]  # type: ignore[assignment]
    if weights.url in failed and not cached.is_file():
        return None  # already tried in this process and warned
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=True)
    except Exception as exc:  # URLError/timeout (OSError), bad hash or corrupt file, ...
        failed[weights.url] = reason = f"{type(exc).__name__}: {exc}"
        if not _VGG_STATE["warned"]:
            _VGG_STATE["warned"] = True
            warnings.warn(
                f"ImageNet VGG16 weights unavailable ({reason}); CSRNet frontend starts from "
                "random init: expect much slower training and worse accuracy. To fix: download "
                f"{cached.name} ({weights.url}) on a machine with internet and pass its path "
                f"(CSRNet(pretrained='path/to/{cached.name}')) or put it in the torch hub cache "
                f"({cached.parent}).", PretrainedWeightsWarning, stacklevel=4)
        return None


def _read_state_dict_file(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"VGG16 weight file not found: {path}. Pass the path of a torchvision "
                              "VGG16 state dict such as vgg16-397923af.pth.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors, refused globals under weights_only
        raise CheckpointError(
            f"cannot read VGG16 weights from {path} ({type(exc).__name__}: {exc}). It must be a "
            "plain tensor state dict saved with torch.save (loaded with weights_only=True); "
            "re-download vgg16-397923af.pth if the file is damaged.") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of "
                              "names to tensors). Save model.state_dict(), not the model.")
    return obj


def _vgg_state(model: CSRNet, weights) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """The VGG16 state dict that ``weights`` names (None: unavailable) and a description."""
    if isinstance(weights, str) and weights.lower() == "imagenet":
        return _fetch_imagenet_state_dict(model.batch_norm), "torchvision ImageNet VGG16 weights"
    if isinstance(weights, (str, Path)):
        path = Path(weights).expanduser()
        return _read_state_dict_file(path), str(path)
    if isinstance(weights, Mapping):
        return weights, "the given state dict"
    raise TypeError(f"weights must be 'imagenet', a path or a state dict, not {type(weights)}")


def _frontend_pairs(model: CSRNet, state: Mapping[str, torch.Tensor], where: str):
    """``(destination tensor, source tensor)`` for every frontend weight, checked first."""
    prefix = next((p for p in ("features.", "module.features.", "") if f"{p}0.weight" in state), None)
    if prefix is None:
        raise CheckpointError(
            f"{where} is not a torchvision VGG16 state dict: no 'features.0.weight' key (first "
            f"keys: {', '.join(list(state)[:5]) or 'none'}). Use torchvision.models.vgg16(...)"
            ".state_dict() or vgg16-397923af.pth.")
    has_bn = f"{prefix}1.running_mean" in state
    if has_bn != model.batch_norm:
        have, want = ("vgg16_bn", "vgg16") if has_bn else ("vgg16", "vgg16_bn")
        raise CheckpointError(f"{where} has the {have} layout but the model was built with batch_norm="
                              f"{model.batch_norm}: use {want} weights or CSRNet(batch_norm={has_bn}).")
    layers = dict(model.frontend.named_children())
    pairs = []
    for conv, idx in zip(FRONTEND_CONV_NAMES, _TV_CONV_INDEX_BN if has_bn else _TV_CONV_INDEX_PLAIN,
                         strict=True):
        modules = [(layers[conv], idx)] + ([(layers["bn" + conv[4:]], idx + 1)] if has_bn else [])
        for module, i in modules:
            for key, dest in module.state_dict(keep_vars=True).items():
                src = state.get(f"{prefix}{i}.{key}")
                if src is None:
                    raise CheckpointError(f"{where} has no '{prefix}{i}.{key}' (needed for frontend "
                                          f"layer {conv}); is it a complete VGG16 state dict?")
                if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dest.shape):
                    shape = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src)
                    raise CheckpointError(
                        f"{where}: '{prefix}{i}.{key}' has shape {shape} but CSRNet frontend {conv} "
                        f"({key}) needs {tuple(dest.shape)}; these are not VGG16 weights.")
                pairs.append((dest, src))
    return pairs


def load_vgg16_frontend(model: CSRNet, weights: str | Path | Mapping[str, torch.Tensor] | None = "imagenet") -> bool:
    """Copy VGG16 convolution weights into ``model.frontend``.

    torchvision's ``features.{0,2,5,7,10,12,14,17,19,21}`` go to conv1_1 ... conv4_3
    (``vgg16_bn``: ``features.{0,3,7,...,30}`` and the BatchNorm after each).

    Inputs:
    - model: CSRNet whose ten frontend convolutions (and BN layers if batch_norm) receive the weights
    - weights: "imagenet" (torchvision's VGG16_Weights.IMAGENET1K_V1, or VGG16_BN_Weights, from
      the torch hub cache or downloaded there once), a path to a .pth state dict, a state dict,
      or None (do nothing)

    Returns:
    - loaded: bool, True when the weights were copied; False for None, or when the ImageNet
      weights cannot be had (no internet): a PretrainedWeightsWarning explains the fix, once per
      process, and the model keeps its random init

    Raises CheckpointError (model unchanged) for an unreadable file, a state dict that is not
    VGG16, a missing key, a shape mismatch or a BatchNorm layout unlike ``model.batch_norm``.
    """
    if weights is None:
        return False
    state, where = _vgg_state(model, weights)
    if state is None:
        return False
    pairs = _frontend_pairs(model, state, where)
    with torch.no_grad():
        for dest, src in pairs:
            dest.copy_(src.to(dtype=dest.dtype, device=dest.device))
    return True


# -------------------- Factory, parameters, receptive field


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a network by name.

    Inputs:
    - name: str, "heatmap_cnn" (HeatmapCNN) or "csrnet" (CSRNet); case and "-"/"_" do not matter
    - kwargs: constructor arguments (width=..., init_output=...; pretrained=..., batch_norm=...)

    Returns:
    - model: nn.Module in train mode on the CPU, output stride 8
    """
    key = str(name).strip().lower().replace("-", "_")
    if key == "heatmap_cnn":
        return HeatmapCNN(**kwargs)  # type: ignore[arg-type]
    if key == "csrnet":
        return CSRNet(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and are not counted).

    Inputs:
    - model: nn.Module
    - trainable_only: bool, count only parameters with requires_grad

    Returns:
    - n: int, number of scalar parameters
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class RFLayer:
    """Receptive field after one convolution or pooling layer, in input pixels: ``jump`` is the
    cumulative stride, ``rf`` the side of the square one output sees, ``start`` the centre of
    output 0's field (output ``i`` sees ``start + i * jump +- (rf - 1) / 2``)."""

    name: str
    kind: str
    kernel: int
    stride: int
    dilation: int
    padding: int
    jump: int
    rf: int
    start: float

    @property
    def effective_kernel(self) -> int:
        """``dilation * (kernel - 1) + 1``: the span of the dilated kernel."""
        return self.dilation * (self.kernel - 1) + 1


def _square(value: object, what: str, name: str) -> int:
    values = set(value) if isinstance(value, (tuple, list)) else {value}
    if len(values) != 1:
        raise ValueError(f"layer {name}: non-square {what} {tuple(value)} is not supported")
    return int(values.pop())  # type: ignore[call-overload]


_RF_KINDS = ((nn.Conv2d, "conv"), (nn.MaxPool2d, "maxpool"), (nn.AvgPool2d, "avgpool"))


def receptive_field(model: nn.Module) -> list[RFLayer]:
    """Receptive field, jump and centre after every convolution and pooling layer.

    Walks the model in module order (its forward order for both networks here) from one input
    pixel (``r = 1, j = 1``) with ``k_eff = d (k - 1) + 1``, ``r_out = r_in + (k_eff - 1) j_in``,
    ``j_out = j_in s`` and ``start_out = start_in + ((k_eff - 1) / 2 - p) j_in``.

    Inputs:
    - model: nn.Module, a single chain of Conv2d / MaxPool2d / AvgPool2d (and other) layers

    Returns:
    - rows: list of RFLayer, one per Conv2d / MaxPool2d / AvgPool2d; ``rows[-1].rf`` is the side
      of the input square (pixels) one output cell sees, ``rows[-1].jump`` the output stride
    """
    rows: list[RFLayer] = []
    jump, rf, start = 1, 1, 0.0
    for name, m in model.named_modules():
        kind = next((k for cls, k in _RF_KINDS if isinstance(m, cls)), None)
        if kind is None:
            continue
        k = _square(m.kernel_size, "kernel", name)
        s = _square(m.stride if m.stride is not None else m.kernel_size, "stride", name)
        d = _square(getattr(m, "dilation", 1), "dilation", name)
        k_eff = d * (k - 1) + 1
        pad = m.padding
        p = {"same": (k_eff - 1) // 2, "valid": 0}[pad] if isinstance(pad, str) else _square(
            pad, "padding", name)
        start = start + ((k_eff - 1) / 2 - p) * jump
        rf = rf + (k_eff - 1) * jump
        jump = jump * s
        rows.append(RFLayer(name or type(m).__name__, kind, k, s, d, p, jump, rf, start))
    return rows


