"""Looking inside a density network: layer shapes and cost, sanity checks, predictions to plot.

* :func:`layer_shapes` pushes a batch through a model and records, for every layer, the shape
  of its output, its own number of parameters and its multiply-accumulates (MACs) per image.
* :func:`overfit_batch` trains a model on one fixed batch: a network that cannot drive the loss
  of two samples towards zero has a bug (wrong targets, a broken layer, a bad learning rate), and
  it is far cheaper to find out here than after an hour of training.
* :func:`batch_dependence` shows what batch normalisation does differently in training and
  evaluation mode: in training mode an image's prediction depends on the other images of the
  batch.
* :func:`predict_samples` runs a trained model on evaluation samples and returns the image, the
  true and the predicted density (people per output cell) and both counts, ready to plot.

Shapes follow PyTorch: ``(B, C, H, W)``. Densities returned here are in people per output cell
(the network's output divided by the training ``scale``).
* :func:`format_receptive_field`, :func:`effective_kernel` and :func:`stacked_taps` print the
  receptive field of a model and show which input pixels (stacks of) dilated kernels touch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn


# --------------------------------------------------------------------------- layer shapes


@dataclass(frozen=True)
class LayerShape:
    """One row of :func:`layer_shapes`.

    ``name`` is the module path (``"body.conv1"``), or ``"input"`` / ``"output"`` for the two
    ends; ``kind`` the module class (``"Conv2d"``); ``shape`` the output shape ``(B, C, H, W)``;
    ``params`` the parameters of this module alone (not of its children); ``macs`` the
    multiply-accumulates of one image through this layer (convolutions and linear layers; 0 for
    the others, whose cost is negligible); ``stride`` the input height divided by the output
    height (None for outputs that are not ``(B, C, H, W)``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    macs: int
    stride: int | None = None


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates per image of a convolution or linear layer producing ``out``."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        per_output = (module.in_channels // module.groups) * k_h * k_w
        return int(out[0].numel()) * per_output
    if isinstance(module, nn.Linear):
        return int(out[0].numel()) * module.in_features
    return 0


def layer_shapes(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[int],
    leaves_only: bool = True,
) -> list[LayerShape]:
    """Push ``inputs`` through ``model`` and record every layer's output shape, parameters, MACs.

    ``inputs``: a ``(B, C, H, W)`` tensor, or just its shape (a random normal batch is made).
    With ``leaves_only`` only modules without children are listed (convolutions, batch norms,
    ReLUs, pools, ...), in the order they run; otherwise containers are listed too. The first row
    is ``"input"`` and the last ``"output"`` (the model's return value: for :class:`HeatmapCNN`
    that includes the softplus, which is a function and not a module). Runs in evaluation mode
    without gradients, so batch-norm running statistics are not touched; the model's mode is
    restored afterwards. Only modules that return a single tensor are recorded.
    """
    import torch

    x = inputs if isinstance(inputs, torch.Tensor) else torch.randn(*[int(v) for v in inputs])
    if x.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(x.shape)}")
    device = next(model.parameters(), torch.empty(0)).device
    x = x.to(device)
    in_h = int(x.shape[2])
    records: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if module is model or (leaves_only and next(module.children(), None) is not None):
            continue

        def hook(mod, _inp, out, name=name):
            if isinstance(out, torch.Tensor):
                records.append((name, mod, out.detach()))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def stride_of(t: torch.Tensor) -> int | None:
        return in_h // int(t.shape[2]) if t.dim() == 4 and int(t.shape[2]) > 0 else None

    rows = [LayerShape("input", "Tensor", tuple(x.shape), 0, 0, stride_of(x))]
    for name, mod, out in records:
        rows.append(LayerShape(name, type(mod).__name__, tuple(out.shape), _own_params(mod),
                               _macs(mod, out), stride_of(out)))
    if isinstance(y, torch.Tensor):
        rows.append(LayerShape("output", "Tensor", tuple(y.shape), 0, 0, stride_of(y)))
    return rows


def format_layer_shapes(rows: Sequence[LayerShape]) -> str:
    """A plain-text table of :func:`layer_shapes` rows with a total line."""
    lines = [f"{'layer':<18}{'kind':<13}{'output shape':<22}{'stride':>7}{'params':>10}{'MMAC':>9}"]
    for r in rows:
        stride = "" if r.stride is None else str(r.stride)
        lines.append(f"{r.name:<18}{r.kind:<13}{str(tuple(r.shape)):<22}{stride:>7}"
                     f"{r.params:>10,}{r.macs / 1e6:>9.1f}")
    total_p = sum(r.params for r in rows)
    total_m = sum(r.macs for r in rows)
    lines.append(f"{'total':<60}{total_p:>10,}{total_m / 1e6:>9.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- receptive field, measured


def receptive_field_box(rf_rows: Sequence[Any], cell: tuple[int, int]) -> tuple[int, int, int, int]:
    """Input pixels ``(x0, y0, x1, y1)`` (inclusive) that output ``cell = (row, col)`` can see.

    From the last row of :func:`helpers.models.receptive_field`: the field of output ``i`` is
    centred on input coordinate ``start + i * jump`` and is ``rf`` pixels wide. The box may
    reach outside the image (those pixels are zero padding).
    """
    last = rf_rows[-1]
    half = (last.rf - 1) / 2
    cy = last.start + int(cell[0]) * last.jump
    cx = last.start + int(cell[1]) * last.jump
    return (math.ceil(cx - half), math.ceil(cy - half), math.floor(cx + half), math.floor(cy + half))


def input_gradient(model: nn.Module, image: torch.Tensor, cell: tuple[int, int]) -> np.ndarray:
    """``|d output[cell] / d input|`` summed over the colour channels: ``(H, W)`` float64.

    ``image`` ``(1, 3, H, W)``; ``cell = (row, col)`` of the output map. Evaluation mode (batch
    norm uses its running statistics, so the gradient comes from this image alone). Pixels where
    the gradient is exactly 0 cannot influence the cell; they all lie outside the theoretical
    receptive field (:func:`receptive_field_box`), and in practice most of the gradient sits in
    a much smaller central region, the *effective* receptive field (Luo et al., NeurIPS 2016).
    """
    import torch

    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, H, W), got {tuple(image.shape)}")
    device = next(model.parameters()).device
    x = image.detach().to(device).clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        out = model(x)
        r, c = int(cell[0]), int(cell[1])
        if not (0 <= r < out.shape[2] and 0 <= c < out.shape[3]):
            raise ValueError(f"cell {cell} is outside the {tuple(out.shape[2:])} output map")
        (grad,) = torch.autograd.grad(out[0, 0, r, c], x)
    finally:
        model.train(was_training)
    return grad[0].abs().sum(dim=0).double().cpu().numpy()


# --------------------------------------------------------------------------- overfit one batch


def overfit_batch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    *,
    scale: float = 100.0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on one fixed batch for ``steps`` Adam steps; returns the loss of each step.

    ``images`` ``(B, 3, H, W)`` normalised, ``targets`` ``(B, 1, H/8, W/8)`` in people per output
    cell (as :class:`helpers.samples.CrowdDataset` makes them). Each step is
    :func:`helpers.train.train_step`: the mean squared error between the model's ``loss_output``
    (or its output) and ``scale x targets``, then one Adam update. The model is left in training mode with the fitted weights.
    Entry ``i`` of the list is the loss *before* update ``i``, so ``losses[0]`` is the loss of
    the untrained model.
    """
    import torch
    from tqdm.auto import tqdm

    from helpers.train import train_step

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = next(model.parameters()).device
    x, y = images.to(device), targets.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="overfit one batch", unit="step", disable=not progress, leave=False)
    for _ in bar:
        losses.append(train_step(model, x, y, optimizer, scale=float(scale)))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
    return losses


# --------------------------------------------------------------------------- batch norm


def batch_dependence(model: nn.Module, images: torch.Tensor, scale: float = 1.0) -> dict[str, float]:
    """The count of image 0 alone and inside the whole batch, with BN in eval and train mode.

    ``images`` ``(B, 3, H, W)`` with ``B >= 2``, all the same size. In evaluation mode batch norm
    uses its running statistics, so image 0's count does not depend on its batch-mates; in
    training mode it normalises with the statistics of the current batch, so it does. Works on a
    copy: the model and its running statistics are not changed. Counts are ``output.sum() /
    scale``. Returns ``{"eval_alone", "eval_in_batch", "train_alone", "train_in_batch"}``.
    """
    import torch

    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be (B, 3, H, W) with B >= 2, got {tuple(images.shape)}")
    probe = copy.deepcopy(model)
    device = next(probe.parameters()).device
    x = images.to(device)
    out: dict[str, float] = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            probe.train(mode == "train")
            out[f"{mode}_alone"] = float(probe(x[:1]).sum()) / scale
            out[f"{mode}_in_batch"] = float(probe(x)[0].sum()) / scale
    return out


# --------------------------------------------------------------------------- predictions


@dataclass
class SamplePrediction:
    """A model's prediction on one evaluation sample, in people per output cell.

    ``image`` ``(H, W, 3)`` uint8 RGB as the model saw it (after the dataset's ``resize``, without
    the padding); ``true`` and ``pred`` ``(ceil(H/s), ceil(W/s))`` float32 people per ``s x s``
    cell; ``true_count`` the number of annotated heads; ``pred_count`` the sum of ``pred``.
    """

    name: str
    image: np.ndarray = field(repr=False)
    true: np.ndarray = field(repr=False)
    pred: np.ndarray = field(repr=False)
    true_count: float
    pred_count: float
    stride: int = 8


def denormalize_image(chw: np.ndarray | torch.Tensor) -> np.ndarray:
    """Inverse of :func:`helpers.samples.normalize_image`: ``(3, H, W)`` -> ``(H, W, 3)`` uint8."""
    from helpers.models import IMAGENET_MEAN, IMAGENET_STD

    arr = chw.detach().cpu().numpy() if hasattr(chw, "detach") else np.asarray(chw)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    rgb = (arr.astype(np.float32) * std + mean) * 255.0
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def predict_samples(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    scale: float,
    device: Any = None,
) -> list[SamplePrediction]:
    """Run ``model`` (eval mode) on samples of an eval-mode :class:`helpers.samples.CrowdDataset`.

    ``scale``: the training density scale (the model outputs ``scale x density``). The image and
    maps are cropped back to the unpadded size: ``image`` to the resized image, the maps to
    ``ceil(H/s) x ceil(W/s)`` cells (the padding adds no people and at most part of a cell).
    """
    import torch

    if getattr(dataset, "mode", "eval") != "eval":
        raise ValueError("predict_samples needs an eval-mode CrowdDataset (whole images)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[SamplePrediction] = []
    try:
        for i in indices:
            image, target = dataset[int(i)]
            base = dataset._load_base(int(i))  # the unpadded image at the dataset's resize
            h, w = base.image.shape[:2]
            s = int(dataset.stride)
            ch, cw = -(-h // s), -(-w // s)
            with torch.no_grad():
                pred = model(image[None].to(device))[0, 0].float().cpu().numpy() / float(scale)
            pred = np.ascontiguousarray(pred[:ch, :cw], dtype=np.float32)
            true = np.ascontiguousarray(target[0].numpy()[:ch, :cw], dtype=np.float32)
            out.append(SamplePrediction(
                name=dataset.records[int(i)].name, image=base.image, true=true, pred=pred,
                true_count=float(dataset.true_count(int(i))),
                pred_count=float(pred.sum(dtype=np.float64)), stride=s,
            ))
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- dilated kernels


def format_receptive_field(rows: Sequence[Any]) -> str:
    """A plain-text table of :func:`helpers.models.receptive_field` rows."""
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
