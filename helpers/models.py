"""Density-regression networks for crowd counting, and receptive-field arithmetic.

Two fully-convolutional networks map a normalised RGB image to a density map at 1/8 resolution:

``HeatmapCNN``
    A compact network (0.3-2 M parameters) that learns from scratch and trains in minutes on a
    laptop CPU at reduced resolution.
``CSRNet``
    Li, Zhang and Chen, *CSRNet: Dilated Convolutional Neural Networks for Understanding the
    Highly Congested Scenes*, CVPR 2018: the first ten VGG16 convolutions (ImageNet weights when
    available) followed by six dilated convolutions. About 16.26 M parameters.

Shapes and units (both models)
------------------------------
* Input ``(B, 3, H, W)`` float32: RGB scaled to ``[0, 1]`` then normalised with
  ``(x - IMAGENET_MEAN) / IMAGENET_STD`` per channel.
* Output ``(B, 1, H // 8, W // 8)`` float32, non-negative: one value per 8x8 input block, in the
  units of the training targets (for example density x 100). Each of the three 2x2 max-pools
  floors odd sizes, so ``floor(floor(floor(H/2)/2)/2) = H // 8`` and the last ``H % 8`` rows (and
  ``W % 8`` columns) of an image only reach the output through the receptive field of their
  neighbours. The data pipeline therefore pads images to a multiple of 8.
* ``model.output_stride == 8``. The models make no device calls: move them with ``.to(device)``;
  they also run in ``torch.channels_last`` memory format.

Receptive field
---------------
``receptive_field(model)`` walks the convolution and pooling layers in forward order and applies

    k_eff = d (k - 1) + 1,   r_out = r_in + (k_eff - 1) j_in,   j_out = j_in s,

starting from ``r = 1, j = 1`` (one input pixel). ``effective_kernel`` and ``stacked_taps`` show
which input pixels a (stack of) dilated kernel(s) touches, for the gridding effect.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.errors import CheckpointError, CrowdError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in ``[0, 1]``; subtract before dividing by ``IMAGENET_STD``."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in ``[0, 1]``."""

MODEL_NAMES: tuple[str, ...] = ("heatmap_cnn", "csrnet")
"""Names accepted by :func:`build_model`."""

DOWNLOAD_TIMEOUT_S = 20.0
"""Socket timeout (seconds) for the one-off VGG16 weight download, so an offline machine with a
silently dropping firewall fails within seconds instead of hanging."""


# --------------------------------------------------------------------------------------------
# HeatmapCNN
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int, dilation: int = 1) -> list[nn.Module]:
    """3x3 convolution ("same" padding), batch norm, ReLU. No conv bias: BN has its own shift."""
    return [
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _inverse_softplus(y: float) -> float:
    """The ``x`` with ``softplus(x) = log(1 + e^x) = y`` (for ``y > 0``)."""
    return y + math.log(-math.expm1(-y))


class HeatmapCNN(nn.Module):
    """A compact fully-convolutional density regressor that learns well from scratch.

    Layout for ``width = w`` (``s`` = stride relative to the input)::

        s=1  conv 3->w/2                         pool 2x2
        s=2  conv w/2->w,  conv w->w             pool 2x2
        s=4  conv w->2w,   conv 2w->2w           pool 2x2
        s=8  conv 2w->4w (d=1), conv 4w->4w (d=2), conv 4w->4w (d=4), conv 4w->2w (d=1)
             1x1 conv 2w->1, softplus

    Every 3x3 convolution is Conv-BN-ReLU. 0.51 M parameters for the default ``w = 32``
    (0.29 M at 24, 1.15 M at 48, 2.05 M at 64); the count grows as ``w**2``.

    Design rationale

    * **Narrow early, wide late.** Compute is spent where the feature map is large, parameters
      where it is small. Few channels at full and half resolution keep a 384x512 forward pass
      at 2.8 GMAC (CSRNet: 81 GMAC), so training on CPU at reduced resolution takes minutes.
    * **Output stride 8** as in CSRNet: one output value per 8x8 block is fine enough to place
      heads in dense crowds, and three pools grow the receptive field cheaply.
    * **Dilated tail (1, 2, 4).** Counting needs context: is this blob a head or a bag? Dilation
      grows the receptive field to 162 input pixels without further down-sampling and with no
      extra parameters. Dilations 1, 2, 4 (no common factor > 1 across the stack) avoid the
      *gridding* effect of repeating one dilation (see :func:`stacked_taps`).
    * **Batch norm** lets a plain stack of convolutions train from random init with a large
      learning rate; no ImageNet weights are needed.
    * **Softplus output.** Densities are non-negative. A linear output lets the background go
      negative, and those negative values cancel real people in the sum: counts come out
      systematically low. A ReLU output is exactly zero on the background but passes no gradient
      where its input is negative, so an unlucky initialisation or one large early step can leave
      the whole map at zero for good (a "dead" output). Softplus ``log(1 + e^x)`` is positive with
      a non-zero gradient everywhere; the background approaches zero smoothly (at ``x = -7`` it
      is below 0.001 per cell).
    * **Small initial output.** The 1x1 head starts with tiny weights and a bias chosen so that
      every output cell starts at ``init_output`` (default 1.0, in target units). Training
      multiplies densities by a scale (100 by default), so a cell's target is 100 x the people
      in its 8x8 block: about 4 on average on ShanghaiTech Part A at full resolution, about 1 on
      Part B, and much more in dense spots. An initial 1.0 (0.01 people per cell, 31 people
      for a 384x512 input) starts the count below the truth instead of far above it. Going
      much lower slows the start: softplus has slope ``1 - e^{-y}`` at output ``y``, 0.63 at
      1.0 but 0.1 at 0.1, and with 0.1 fitting one batch took several times more steps.

    Args:
        width: channel multiplier ``w`` (even, >= 4).
        init_output: the initial value of every output cell (> 0).
    """

    output_stride: int = 8

    def __init__(self, width: int = 32, init_output: float = 1.0) -> None:
        super().__init__()
        if width < 4 or width % 2:
            raise ValueError(f"HeatmapCNN width must be an even integer >= 4, got {width}")
        if not init_output > 0:
            raise ValueError(f"HeatmapCNN init_output must be > 0, got {init_output}")
        self.width = int(width)
        self.init_output = float(init_output)
        w = self.width
        spec: list[tuple[str, int, int, int]] = [  # name, c_in, c_out, dilation ("pool" = pool)
            ("conv1", 3, w // 2, 1),
            ("pool1", 0, 0, 0),
            ("conv2_1", w // 2, w, 1),
            ("conv2_2", w, w, 1),
            ("pool2", 0, 0, 0),
            ("conv3_1", w, 2 * w, 1),
            ("conv3_2", 2 * w, 2 * w, 1),
            ("pool3", 0, 0, 0),
            ("conv4_1", 2 * w, 4 * w, 1),
            ("dconv4_2", 4 * w, 4 * w, 2),
            ("dconv4_3", 4 * w, 4 * w, 4),
            ("conv4_4", 4 * w, 2 * w, 1),
        ]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, c_in, c_out, dilation in spec:
            if name.startswith("pool"):
                layers[name] = nn.MaxPool2d(2, 2)
                continue
            conv, bn, relu = _conv_bn_relu(c_in, c_out, dilation)
            layers[name] = conv
            layers[name.replace("conv", "bn")] = bn
            layers[name.replace("conv", "relu")] = relu
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


# --------------------------------------------------------------------------------------------
# CSRNet
# --------------------------------------------------------------------------------------------

# VGG16 configuration "D" up to conv4_3: (name, out_channels) or "M" for a 2x2 max-pool.
_VGG_FRONTEND: tuple[tuple[str, int] | str, ...] = (
    ("conv1_1", 64), ("conv1_2", 64), "M",
    ("conv2_1", 128), ("conv2_2", 128), "M",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512),
)  # fmt: skip
_CSRNET_BACKEND: tuple[int, ...] = (512, 512, 512, 256, 128, 64)

FRONTEND_CONV_NAMES: tuple[str, ...] = tuple(s[0] for s in _VGG_FRONTEND if s != "M")
"""CSRNet's ten frontend convolutions, ``conv1_1`` ... ``conv4_3``."""
# Index of each frontend conv inside torchvision's ``vgg16().features`` / ``vgg16_bn().features``.
_TV_CONV_INDEX_PLAIN: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
_TV_CONV_INDEX_BN: tuple[int, ...] = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30)


class CSRNet(nn.Module):
    """CSRNet (Li et al., CVPR 2018), configuration B: VGG16 frontend + dilated backend.

    * ``frontend``: the first ten convolutions of VGG16 (``conv1_1`` ... ``conv4_3``, 3x3,
      padding 1, ReLU) with the three 2x2 max-pools between them: output stride 8, 512 channels.
    * ``backend``: six 3x3 convolutions with dilation 2 and padding 2 (512, 512, 512, 256, 128,
      64 channels), each followed by ReLU.
    * ``output_layer``: a 1x1 convolution to one channel.

    Initialisation: backend and output weights ``normal(0, 0.01)``, biases 0, as in the paper.
    The frontend gets ImageNet VGG16 weights when ``pretrained`` is given and the weights can be
    had (see :func:`load_vgg16_frontend`); otherwise He (Kaiming) normal init as in torchvision's
    VGG, which trains from scratch far better than ``normal(0, 0.01)`` through 13 plain layers.

    Output: the paper's output layer is linear and the loss (pixel-wise MSE) is computed on it;
    a linear output keeps a gradient at every pixel, which matters early in training when most
    outputs are near zero. ``loss_output(x)`` (or ``forward_raw``) returns that linear map for
    training. ``forward(x)`` returns ``relu`` of it: a density is never negative, and clipping
    at prediction time stops negative background values from cancelling real people in the
    count (it can only raise a count, never lower it).

    Args:
        pretrained: ``False``/``None`` for random init; ``True`` or ``"imagenet"`` for the
            torchvision ImageNet weights; a path to a ``.pth`` state dict; or a state dict.
        batch_norm: add BatchNorm after every 3x3 convolution (frontend and backend). ImageNet
            weights then come from torchvision's ``vgg16_bn``.
    """

    output_stride: int = 8

    def __init__(
        self,
        pretrained: bool | str | Path | Mapping[str, torch.Tensor] | None = False,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.batch_norm = bool(batch_norm)
        front: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, n_pool = 3, 0
        for item in _VGG_FRONTEND:
            if item == "M":
                n_pool += 1
                front[f"pool{n_pool}"] = nn.MaxPool2d(2, 2)
                continue
            name, c_out = item
            self._add_conv(front, name, c_in, c_out, dilation=1)
            c_in = c_out
        self.frontend = nn.Sequential(front)
        back: OrderedDict[str, nn.Module] = OrderedDict()
        for i, c_out in enumerate(_CSRNET_BACKEND, start=1):
            self._add_conv(back, f"dconv{i}", c_in, c_out, dilation=2)
            c_in = c_out
        self.backend = nn.Sequential(back)
        self.output_layer = nn.Conv2d(c_in, 1, 1)
        self.reset_parameters()
        self.frontend_pretrained = False
        if pretrained is True:
            pretrained = "imagenet"
        if pretrained is not None and pretrained is not False:
            self.frontend_pretrained = load_vgg16_frontend(self, pretrained)

    def _add_conv(
        self, layers: OrderedDict[str, nn.Module], name: str, c_in: int, c_out: int, dilation: int
    ) -> None:
        suffix = name.removeprefix("dconv").removeprefix("conv")
        layers[name] = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation)
        if self.batch_norm:
            layers[f"bn{suffix}"] = nn.BatchNorm2d(c_out)
        layers[f"relu{suffix}"] = nn.ReLU(inplace=True)

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


# --------------------------------------------------------------------------------------------
# ImageNet VGG16 weights for the CSRNet frontend
# --------------------------------------------------------------------------------------------


class PretrainedWeightsWarning(UserWarning):
    """ImageNet weights could not be loaded; the model starts from random init."""


# Process-wide memory of the download attempt: warn once, do not retry a failed download.
_VGG_STATE: dict[str, object] = {"warned": False, "failed": {}}


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily give new sockets a timeout (urllib's default is to wait forever)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _imagenet_weights(batch_norm: bool):  # -> torchvision WeightsEnum member
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    return VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1


def _hub_checkpoint_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _fetch_imagenet_state_dict(batch_norm: bool) -> dict[str, torch.Tensor] | None:
    """torchvision's VGG16 ImageNet state dict (hub cache, else download), or None with one warning."""
    weights = _imagenet_weights(batch_norm)
    cached = _hub_checkpoint_path(weights.url)
    failed: dict[str, str] = _VGG_STATE["failed"]  # type: ignore[assignment]
    if weights.url in failed and not cached.is_file():
        return None  # already tried in this process and warned
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=True)
    except Exception as exc:  # URLError/timeout (OSError), bad hash or corrupt file, ...
        reason = f"{type(exc).__name__}: {exc}"
        failed[weights.url] = reason
        if not _VGG_STATE["warned"]:
            _VGG_STATE["warned"] = True
            name = cached.name
            warnings.warn(
                f"ImageNet VGG16 weights unavailable ({reason}); CSRNet frontend starts from "
                "random init: expect much slower training and worse accuracy. To fix: download "
                f"{name} ({weights.url}) on a machine with internet and pass its path "
                f"(CSRNet(pretrained='path/to/{name}')) or put it in the torch hub cache "
                f"({cached.parent}).",
                PretrainedWeightsWarning,
                stacklevel=3,
            )
        return None


def _read_state_dict_file(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"VGG16 weight file not found: {path}. Pass the path of a torchvision VGG16 state "
            "dict such as vgg16-397923af.pth."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors, refused globals under weights_only
        raise CheckpointError(
            f"cannot read VGG16 weights from {path} ({type(exc).__name__}: {exc}). It must be a "
            "plain tensor state dict saved with torch.save (loaded with weights_only=True); "
            "re-download vgg16-397923af.pth if the file is damaged."
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to "
            "tensors). Save model.state_dict(), not the model."
        )
    return obj


def _features_prefix(state: Mapping[str, torch.Tensor], where: str) -> str:
    for prefix in ("features.", "module.features.", ""):
        if f"{prefix}0.weight" in state:
            return prefix
    keys = ", ".join(list(state)[:5])
    raise CheckpointError(
        f"{where} is not a torchvision VGG16 state dict: no 'features.0.weight' key "
        f"(first keys: {keys or 'none'}). Use torchvision.models.vgg16(...).state_dict() or "
        "vgg16-397923af.pth."
    )


def load_vgg16_frontend(
    model: CSRNet,
    weights: str | Path | Mapping[str, torch.Tensor] | None = "imagenet",
) -> bool:
    """Copy VGG16 convolution weights into ``model.frontend``; True when loaded.

    Args:
        model: a :class:`CSRNet`; its ten frontend convolutions (and BN layers when
            ``batch_norm=True``) receive torchvision's ``features.{0,2,5,7,10,12,14,17,19,21}``
            (``vgg16_bn``: ``features.{0,3,7,...,30}`` plus the BN after each).
        weights: ``"imagenet"`` for torchvision's ``VGG16_Weights.IMAGENET1K_V1``
            (``VGG16_BN_Weights`` for a batch-norm model), read from the torch hub cache
            (``~/.cache/torch/hub/checkpoints``) or downloaded there once; a path to a ``.pth``
            state dict; a state dict; or ``None`` (do nothing, return False).

    Returns:
        True when the weights were copied. False when ``"imagenet"`` weights cannot be had (no
        internet): a :class:`PretrainedWeightsWarning` explains the fix, once per process, and
        the model keeps its random init.

    Raises:
        CheckpointError: unreadable file, not a VGG16 state dict, a missing key, a shape
            mismatch, or a batch-norm layout that does not match ``model.batch_norm``. The model
            is left unchanged.
    """
    if weights is None:
        return False
    if isinstance(weights, str) and weights.lower() == "imagenet":
        state = _fetch_imagenet_state_dict(model.batch_norm)
        if state is None:
            return False
        where = "torchvision ImageNet VGG16 weights"
    elif isinstance(weights, (str, Path)):
        path = Path(weights).expanduser()
        state = _read_state_dict_file(path)
        where = str(path)
    elif isinstance(weights, Mapping):
        state, where = weights, "the given state dict"
    else:
        raise TypeError(f"weights must be 'imagenet', a path or a state dict, not {type(weights)}")

    prefix = _features_prefix(state, where)
    has_bn = f"{prefix}1.running_mean" in state
    if has_bn != model.batch_norm:
        have, want = ("vgg16_bn", "vgg16") if has_bn else ("vgg16", "vgg16_bn")
        raise CheckpointError(
            f"{where} has the {have} layout but the model was built with "
            f"batch_norm={model.batch_norm}: use {want} weights or CSRNet(batch_norm={has_bn})."
        )
    index = _TV_CONV_INDEX_BN if has_bn else _TV_CONV_INDEX_PLAIN
    layers = dict(model.frontend.named_children())
    plan: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # (destination, source, source key)
    for conv_name, idx in zip(FRONTEND_CONV_NAMES, index, strict=True):
        targets = [(layers[conv_name], idx)]
        if has_bn:
            targets.append((layers["bn" + conv_name.removeprefix("conv")], idx + 1))
        for module, i in targets:
            for key, dest in module.state_dict(keep_vars=True).items():
                src_key = f"{prefix}{i}.{key}"
                if src_key not in state:
                    raise CheckpointError(
                        f"{where} has no '{src_key}' (needed for frontend layer "
                        f"{conv_name}); is it a complete VGG16 state dict?"
                    )
                src = state[src_key]
                if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dest.shape):
                    shape = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src)
                    raise CheckpointError(
                        f"{where}: '{src_key}' has shape {shape} but CSRNet frontend "
                        f"{conv_name} ({key}) needs {tuple(dest.shape)}; these are not VGG16 "
                        "weights."
                    )
                plan.append((dest, src, src_key))
    with torch.no_grad():
        for dest, src, _ in plan:
            dest.copy_(src.to(dtype=dest.dtype, device=dest.device))
    return True


# --------------------------------------------------------------------------------------------
# Factory and counting
# --------------------------------------------------------------------------------------------


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build ``"heatmap_cnn"`` (:class:`HeatmapCNN`) or ``"csrnet"`` (:class:`CSRNet`).

    Keyword arguments go to the constructor (``width=...``; ``pretrained=...``, ...).
    """
    key = str(name).strip().lower().replace("-", "_")
    if key == "heatmap_cnn":
        return HeatmapCNN(**kwargs)  # type: ignore[arg-type]
    if key == "csrnet":
        return CSRNet(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BN running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Receptive field
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RFLayer:
    """Receptive-field bookkeeping after one convolution or pooling layer (input pixels).

    ``jump`` is the cumulative stride (distance in input pixels between neighbouring outputs),
    ``rf`` the side of the square input region one output sees, and ``start`` the input
    coordinate (pixel centres at 0, 1, 2, ...) of the centre of output 0's field, so output
    ``i`` sees input pixels ``start + i * jump +- (rf - 1) / 2``.
    """

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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _square(value: object, what: str, name: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"layer {name}: non-square {what} {tuple(value)} is not supported")
        value = value[0]
    return int(value)  # type: ignore[call-overload]


def receptive_field(model: nn.Module) -> list[RFLayer]:
    """One :class:`RFLayer` per ``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d``, in module order.

    Assumes the model is a single chain whose module registration order is its forward order
    (true for both networks here). Uses ``k_eff = d (k - 1) + 1``, ``r_out = r_in + (k_eff - 1)
    j_in``, ``j_out = j_in s`` and ``start_out = start_in + ((k_eff - 1) / 2 - p) j_in``.
    """
    rows: list[RFLayer] = []
    jump, rf, start = 1, 1, 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kind = "conv"
        elif isinstance(m, nn.MaxPool2d):
            kind = "maxpool"
        elif isinstance(m, nn.AvgPool2d):
            kind = "avgpool"
        else:
            continue
        k = _square(m.kernel_size, "kernel", name)
        s = _square(m.stride if m.stride is not None else m.kernel_size, "stride", name)
        d = _square(getattr(m, "dilation", 1), "dilation", name)
        k_eff = d * (k - 1) + 1
        pad = m.padding
        if pad == "same":
            p = (k_eff - 1) // 2
        elif pad == "valid":
            p = 0
        else:
            p = _square(pad, "padding", name)
        start = start + ((k_eff - 1) / 2 - p) * jump
        rf = rf + (k_eff - 1) * jump
        jump = jump * s
        rows.append(RFLayer(name or type(m).__name__, kind, k, s, d, p, jump, rf, start))
    return rows


def format_receptive_field(rows: Sequence[RFLayer]) -> str:
    """A plain-text table of :func:`receptive_field` rows."""
    lines = [f"{'layer':<22}{'kind':<9}{'k':>3}{'s':>3}{'d':>3}{'jump':>6}{'RF':>6}"]
    for r in rows:
        lines.append(
            f"{r.name:<22}{r.kind:<9}{r.kernel:>3}{r.stride:>3}{r.dilation:>3}{r.jump:>6}{r.rf:>6}"
        )
    return "\n".join(lines)


def effective_kernel(kernel_size: int, dilation: int) -> np.ndarray:
    """0/1 mask ``(k_eff, k_eff)`` int64 of the input taps a dilated ``k x k`` kernel touches."""
    if kernel_size < 1 or dilation < 1:
        raise ValueError("kernel_size and dilation must be >= 1")
    k_eff = dilation * (kernel_size - 1) + 1
    line = np.zeros(k_eff, dtype=np.int64)
    line[::dilation] = 1
    return np.outer(line, line)


def stacked_taps(dilations: Sequence[int], kernel: int = 3) -> np.ndarray:
    """How many paths connect each input pixel to one output of a stack of dilated convs.

    Returns an int64 array ``(R, R)`` with ``R = 1 + sum(d_i (kernel - 1))``, the full 2-D
    convolution of the layers' :func:`effective_kernel` masks. Zeros inside the square are input
    pixels the output never sees: dilations ``(2, 2, 2)`` touch only every other pixel
    (gridding), ``(1, 2, 3)`` touch them all.
    """
    line = np.ones(1, dtype=np.int64)
    for d in dilations:
        line = np.convolve(line, effective_kernel(kernel, int(d))[0])
    return np.outer(line, line)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def summarize(name: str, height: int = 384, width: int = 512, repeats: int = 3) -> dict:
    """Parameters, output shape, final receptive field and CPU forward time of one model."""
    model = build_model(name).eval()
    x = torch.randn(1, 3, height, width)
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            y = model(x)
            times.append(time.perf_counter() - t0)
    rf = receptive_field(model)
    return {
        "model": name,
        "parameters": count_parameters(model),
        "input": [1, 3, height, width],
        "output": list(y.shape),
        "output_stride": model.output_stride,
        "receptive_field": rf[-1].rf,
        "forward_s_median": float(np.median(times)),
        "threads": torch.get_num_threads(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.models",
        description="Print parameter count, receptive field and CPU forward time of the models.",
    )
    parser.add_argument("--model", choices=[*MODEL_NAMES, "all"], default="all")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="also print the receptive-field table")
    args = parser.parse_args(argv)
    try:
        if min(args.size) < 8:
            raise ValueError(f"--size must be at least 8 x 8, got {args.size}")
        names = MODEL_NAMES if args.model == "all" else (args.model,)
        for name in names:
            print(json.dumps(summarize(name, *args.size, repeats=args.repeats)))
            if args.table:
                print(format_receptive_field(receptive_field(build_model(name))))
    except (CrowdError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
