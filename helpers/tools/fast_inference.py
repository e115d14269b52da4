"""Fast inference on a CPU: BatchNorm folding, ``channels_last`` and int8 quantization.

Counting a photo with a trained network is a forward pass, and on a CPU three changes make it
several times cheaper without retraining:

* **BatchNorm folding.** In evaluation mode a BatchNorm layer is a fixed per-channel affine map
  ``y = gamma (x - mu) / sqrt(var + eps) + beta``. Following a convolution ``x = W * u + b`` it can
  be folded into it: ``W' = W gamma / sqrt(var + eps)``, ``b' = (b - mu) gamma / sqrt(var + eps) +
  beta``. One layer less to run, the same output up to float rounding (:func:`fold_batchnorm`).
* **channels_last.** oneDNN's convolutions are fastest on ``N H W C`` memory; PyTorch otherwise
  reorders every tensor before and after each convolution.
* **int8 post-training static quantization** (:func:`quantize_int8`). Weights and activations are
  stored as 8-bit integers with an affine map ``x ~ s (q - z)``, ``q = round(x / s) + z`` (scale
  ``s``, zero point ``z``; weights per output channel). Convolutions then run on integers, which
  processors with VNNI or AMX instructions (``vpdpbusd``: four 8-bit products summed per lane)
  do about four times as fast as float32. The activation ranges are measured once on a few
  *calibration images* (training images, never the test set). The final 1 x 1 output
  convolution stays in float32: a count is a sum over thousands of output cells,
  and rounding the output cells to 256 levels would bias it.

:func:`prepare_fast_cpu` applies what helps on this processor: folding and ``channels_last``
always, int8 when the processor has fast int8 (:func:`has_fast_int8`) and calibration images are
given. ``helpers.tools.inference.count_image(..., fast=True)`` uses it on CPU. It is worth it when counting many
images or large photos on a CPU: ``benchmarks/inference.py`` measures the speed-up and the count
difference (on a 2-core AVX-512 VNNI machine: CSRNet about 5x faster, counts within a fraction of
a percent; HeatmapCNN, already small, gains less). ``torch.compile`` was tried and not used: on
such a CPU it compiled for minutes and gave no speed-up over the quantized model.

The quantized model runs on CPU only (the ``x86`` engine of ``torch.ao.quantization``). That API
is deprecated: if it is missing or fails in a later torch, :func:`prepare_fast_cpu` prints one
line and returns the float32 model (folded, ``channels_last``) instead.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from helpers.errors import CrowdError
from helpers.tools.messages import one_line

#: Quantization engine used on x86 processors (oneDNN/FBGEMM kernels).
ENGINE = "x86"
#: What a missing or changed ``torch.ao.quantization`` raises; int8 then falls back to float32.
INT8_FAILURES = (ImportError, AttributeError, RuntimeError, NotImplementedError, TypeError, CrowdError)
#: CPU flags that mean fast 8-bit dot products.
FAST_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")


def has_fast_int8() -> bool:
    """Whether this processor runs int8 convolutions fast (VNNI or AMX) and torch can use them."""
    quantized = getattr(torch.backends, "quantized", None)
    if quantized is None or ENGINE not in getattr(quantized, "supported_engines", ()):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False  # not Linux: no way to check cheaply, keep float32
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return any(flag in flags for flag in FAST_INT8_FLAGS)


def _sequences(module: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """``(dotted name, Sequential)`` of every ``nn.Sequential`` inside ``module``."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Sequential)]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with every BatchNorm2d folded into the Conv2d before it.

    Only a convolution directly followed by a BatchNorm in the same ``nn.Sequential`` is folded
    (the layout of both networks of the series); the BatchNorm becomes ``nn.Identity``. Outputs
    equal the original's up to float rounding. ``module`` itself is not changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    for _, seq in _sequences(folded):
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[first], seq._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[first] = fuse_conv_bn_eval(conv, bn)
                seq._modules[second] = nn.Identity()
    return folded


def _body_head_activation(module: nn.Module) -> tuple[list[nn.Module], nn.Conv2d, str]:
    """The float pipeline of a density network: its feature layers, 1 x 1 output and activation."""
    from helpers.models import CSRNet, HeatmapCNN

    if isinstance(module, CSRNet):
        return [module.frontend, module.backend], module.output_layer, "relu"
    if isinstance(module, HeatmapCNN):
        return [module.body], module.head, "softplus"
    raise CrowdError(
        f"int8 quantization knows HeatmapCNN and CSRNet, not {type(module).__name__}; use "
        "prepare_fast_cpu(model) without calibration images (folding and channels_last only)."
    )


class QuantizedDensityNet(nn.Module):
    """``activation(head(dequant(body(quant(stem(x))))))``: int8 ``body``, float32 output layer.

    Built by :func:`quantize_int8` from the network's layers (``body``: its feature layers in
    order). With ``float_stem`` the layers up to the first ReLU stay float32 (the ``stem``;
    otherwise it is empty): a little more accurate, but at full resolution the first layer is a
    large part of the cost, so the speed-up drops, most for the small HeatmapCNN. Takes and returns float
    tensors like the original network (``(B, 3, H, W)`` normalised image -> ``(B, 1, H/8, W/8)``
    density x scale).
    """

    def __init__(self, body: list[nn.Module], head: nn.Conv2d, activation: str,
                 float_stem: bool = False) -> None:
        super().__init__()
        from collections import OrderedDict

        from torch.ao.quantization import DeQuantStub, QuantStub

        leaves: OrderedDict[str, nn.Module] = OrderedDict()
        for part in body:
            children = part.named_children() if isinstance(part, nn.Sequential) else [("layer", part)]
            for name, child in children:
                leaves[name if name not in leaves else f"{name}_{len(leaves)}"] = child
        names = list(leaves)
        first_relu = next((i for i, n in enumerate(names) if isinstance(leaves[n], nn.ReLU)), -1)
        if not float_stem:
            first_relu = -1
        self.stem = nn.Sequential(OrderedDict((n, leaves[n]) for n in names[: first_relu + 1]))
        self.quant = QuantStub()
        self.body = nn.Sequential(OrderedDict((n, leaves[n]) for n in names[first_relu + 1 :]))
        self.dequant = DeQuantStub()
        self.head = head
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.dequant(self.body(self.quant(self.stem(x)))))
        return F.softplus(y) if self.activation == "softplus" else F.relu(y)


@contextlib.contextmanager
def _quiet_quantization() -> Iterator[None]:
    """Silence torch.ao's deprecation notices (the eager-mode API still works as documented)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*")
        yield


def _fuse_lists(wrapper: QuantizedDensityNet) -> list[list[str]]:
    """Names of Conv2d[-BatchNorm2d][-ReLU] runs inside ``wrapper.body`` for ``fuse_modules``."""
    groups = []
    for prefix, seq in _sequences(wrapper.body):
        names = list(seq._modules)
        i = 0
        while i < len(names):
            if isinstance(seq._modules[names[i]], nn.Conv2d):
                group = [names[i]]
                j = i + 1
                if j < len(names) and isinstance(seq._modules[names[j]], nn.BatchNorm2d):
                    group.append(names[j])
                    j += 1
                while j < len(names) and isinstance(seq._modules[names[j]], nn.Identity):
                    j += 1  # a BatchNorm already folded
                if j < len(names) and isinstance(seq._modules[names[j]], nn.ReLU):
                    group.append(names[j])
                    j += 1
                if len(group) > 1:
                    base = f"body.{prefix}." if prefix else "body."
                    groups.append([base + n for n in group])
                i = j
            else:
                i += 1
    return groups


def quantize_int8(module: nn.Module, calibration: Iterable[torch.Tensor],
                  engine: str = ENGINE, float_stem: bool = False) -> QuantizedDensityNet:
    """An int8 copy of a HeatmapCNN or CSRNet, calibrated on ``calibration``.

    ``calibration``: normalised ``(1, 3, H, W)`` float tensors (any sizes; a few training images
    are enough). Convolutions are fused with their BatchNorm and ReLU, weights quantized per
    output channel, activation ranges from a histogram of the calibration activations (torch's
    default ``x86`` configuration). The 1 x 1 output layer and the final activation stay float32.
    ``module`` is not changed. Raises :class:`CrowdError` when the engine is not available.
    """
    import torch.ao.quantization as tq

    if engine not in torch.backends.quantized.supported_engines:
        raise CrowdError(
            f"This PyTorch build has no {engine!r} quantization engine (it has "
            f"{torch.backends.quantized.supported_engines}); use fast=False or float32."
        )
    torch.backends.quantized.engine = engine
    source = copy.deepcopy(module).eval().cpu()
    body, head, activation = _body_head_activation(source)
    wrapper = QuantizedDensityNet(body, head, activation, float_stem).eval()
    with _quiet_quantization():
        tq.fuse_modules(wrapper, _fuse_lists(wrapper), inplace=True)
        wrapper.qconfig = tq.get_default_qconfig(engine)
        wrapper.head.qconfig = None  # the output layer stays float
        wrapper.stem.qconfig = None  # and so does the stem, if any
        tq.prepare(wrapper, inplace=True)
        seen = 0
        with torch.inference_mode():
            for x in calibration:
                wrapper(x.float().cpu())
                seen += 1
        if seen == 0:
            raise ValueError("quantize_int8 needs at least one calibration image")
        tq.convert(wrapper, inplace=True)
    for attr in ("output_stride", "density_scale", "input_scale"):
        if hasattr(module, attr):
            setattr(wrapper, attr, getattr(module, attr))
    return wrapper


def calibration_tensors(images: Iterable[np.ndarray], max_side: int = 1024) -> list[torch.Tensor]:
    """Normalised ``(1, 3, h, w)`` tensors of RGB uint8 images for :func:`quantize_int8`.

    Images larger than ``max_side`` on a side contribute their centre ``max_side`` square (the
    statistics of a window are those of the image; it keeps calibration memory small).
    """
    from helpers.samples import normalize_image

    out = []
    for image in images:
        h, w = image.shape[:2]
        y0, x0 = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
        window = image[y0 : y0 + max_side, x0 : x0 + max_side]
        out.append(torch.from_numpy(normalize_image(window))[None])
    return out


def training_calibration(part: str = "B", n: int = 8, resize: float = 1.0,
                         root: str | Path | None = None) -> list[np.ndarray]:
    """``n`` RGB uint8 images of the ``fit`` split (spread over it), resized by ``resize``.

    The calibration set of the benchmark: training images only, never test images.
    """
    from helpers.data import list_records, read_image, take_evenly
    from helpers.samples import resize_image, scaled_shape

    records = take_evenly(list_records(part, "fit", None if root is None else str(root)), n)
    images = []
    for record in records:
        image = read_image(record.image_path)
        if resize != 1.0:
            image = resize_image(image, scaled_shape(image.shape[:2], resize))
        images.append(image)
    return images


def prepare_fast_cpu(module: nn.Module, calibration: Iterable[torch.Tensor] | None = None,
                     *, int8: bool | None = None) -> nn.Module:
    """The fastest CPU version of ``module`` this processor supports, for inference only.

    BatchNorm folded (:func:`fold_batchnorm`); then int8 (:func:`quantize_int8`) if ``int8`` is
    True, or None and :func:`has_fast_int8` and ``calibration`` images are given; otherwise the
    float32 model in ``channels_last`` memory format, also when quantization fails (one line is
    printed to stderr: :data:`INT8_FAILURES`). The result has an attribute ``fast_kind``:
    ``"int8"`` or ``"float32"``. ``module`` is not changed.
    """
    folded = fold_batchnorm(module).cpu()
    use_int8 = has_fast_int8() and calibration is not None if int8 is None else bool(int8)
    if use_int8:
        if calibration is None:
            raise ValueError("int8 needs calibration images")
        try:
            fast: Any = quantize_int8(folded, calibration)
            fast.fast_kind = "int8"
            return fast.eval()
        except INT8_FAILURES as exc:  # torch.ao.quantization is deprecated: missing or changed
            print(f"int8 quantization failed ({one_line(exc)}); "
                  "counting in float32 instead.", file=sys.stderr, flush=True)
    fast = folded.to(memory_format=torch.channels_last)
    fast.fast_kind = "float32"
    return fast.eval()
