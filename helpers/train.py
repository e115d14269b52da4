"""Training a density-regression network: the loss, one step, one epoch, validation, a plain loop.

The network learns ``scale x density``: true densities are tiny (about 0.01-0.5 people per 8 x 8
output cell), so the targets are multiplied by ``scale`` (e.g. 100) before the squared error and
predictions are divided by it again. A count is the sum of a density map.

``fit(model, train_set, val_set, epochs=10, lr=1e-3, scale=100.0)`` is the plain loop a student
reads; the product trainer (resume, GPUs, budget, checkpoints, ``crowd train``) is
:mod:`helpers.tools.trainer`, which calls :func:`train_step` and :func:`evaluate_counts`.
Point-supervised losses: :mod:`helpers.losses`. docs/training.md explains the choices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.errors import CrowdError
from helpers.samples import collate_points


def density_loss(pred, target, scale=1.0, reduction="mean", count_weight=0.0):
    """Pixel MSE between predicted and true density maps (plus an optional count term).

    loss = MSE(pred, scale * target) + count_weight * mean_b((sum pred_b - sum scale * target_b) / scale)^2

    Inputs:
    - pred: float tensor (B, 1, h, w), predicted people x scale per output cell
    - target: float tensor (B, 1, h, w), true people per output cell (sums are the counts)
    - scale: float, the target is multiplied by it before the squared error
    - reduction: "mean" (average over pixels and images) or "sum" (sum over the pixels of each
      image, averaged over images, as in the CSRNet code)
    - count_weight: float >= 0, weight of the squared count error (in people^2, whatever the scale)

    Returns:
    - loss: scalar float tensor
    """
    if pred.shape != target.shape:
        raise CrowdError(
            f"The model output {tuple(pred.shape)} does not match the target {tuple(target.shape)}: "
            "the model must have output stride 8 and the crops must be multiples of 8."
        )
    if reduction not in ("mean", "sum"):
        raise CrowdError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    target = target * scale
    diff2 = (pred - target) ** 2
    loss = diff2.mean() if reduction == "mean" else diff2.sum() / pred.shape[0]
    if count_weight > 0:
        counts = (pred.sum(dim=(1, 2, 3)) - target.sum(dim=(1, 2, 3))) / scale
        loss = loss + count_weight * (counts**2).mean()
    return loss


def train_step(model, images, targets, optimizer, scaler=None, *, scale=1.0, reduction="mean",
               count_weight=0.0, grad_clip=0.0, amp=False, loss_value_fn=None, loss_fn=None) -> float:
    """One optimisation step: forward (mixed precision if amp), loss, backward, clip, step.

    Inputs:
    - model: nn.Module in train mode, on the device of images; its ``loss_output(x)`` is trained
      when it has one (CSRNet: the linear output before the ReLU), else ``model(x)``
    - images: float32 tensor (B, 3, H, W), normalised images, H and W multiples of 8
    - targets: float32 tensor (B, 1, H/8, W/8), true people per output cell; or, with loss_fn, a
      list of B float32 tensors (N_b, 2) of head (x, y) in input pixels
    - optimizer: torch.optim.Optimizer over the model's parameters
    - scaler: torch.amp.GradScaler or None (None: plain backward and step)
    - scale, reduction, count_weight: passed to density_loss
    - grad_clip: float, largest allowed gradient norm (0 = no clipping)
    - amp: bool, run the forward pass under torch.autocast in float16
    - loss_value_fn: None, or (scalar loss tensor) -> float, the reported value (DDP: the mean over processes)
    - loss_fn: None (density_loss), or a point loss (pred, targets) -> scalar tensor such as
      helpers.losses.bayesian_loss; it gets pred = relu(output) / scale, people per cell

    Returns:
    - loss: float, the loss of this batch (before the step)
    """
    forward = getattr(model, "loss_output", model)
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
        pred = forward(images)
    if loss_fn is None:
        loss = density_loss(pred.float(), targets, scale, reduction, count_weight)
    else:
        loss = loss_fn(torch.relu(pred.float()) / scale, targets)
    value = float(loss.item()) if loss_value_fn is None else float(loss_value_fn(loss))
    if not math.isfinite(value):
        raise CrowdError(f"The training loss became {value}: training diverged. Lower the learning "
                         "rate or clip the gradients (grad_clip).")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return value


def train_one_epoch(model, loader, optimizer, *, device, scaler=None, scheduler=None, scale=1.0,
                    reduction="mean", count_weight=0.0, grad_clip=0.0, amp=False,
                    progress=True, loss_fn=None) -> float:
    """Train for one pass over ``loader`` and return the mean batch loss.

    Inputs:
    - model: nn.Module (put in train mode here)
    - loader: iterable of (images, targets) batches: float32 (B, 3, H, W) normalised images and
      float32 (B, 1, H/8, W/8) true people per output cell (or lists of points, see train_step)
    - optimizer: torch.optim.Optimizer over the model's parameters
    - device: torch.device or str the model is on; batches are moved there
    - scaler: torch.amp.GradScaler or None
    - scheduler: a learning-rate scheduler stepped after every batch, or None
    - scale, reduction, count_weight, grad_clip, amp, loss_fn: passed to train_step
    - progress: bool, show a tqdm progress bar

    Returns:
    - mean_loss: float, mean of the batch losses (nan for an empty loader)
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.train()
    total, batches = 0.0, 0
    bar = tqdm(loader, desc="train", unit="batch", leave=False, disable=not progress)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device) if torch.is_tensor(targets) else [t.to(device) for t in targets]
        loss = train_step(model, images, targets, optimizer, scaler, scale=scale, reduction=reduction,
                          count_weight=count_weight, grad_clip=grad_clip, amp=amp, loss_fn=loss_fn)
        if scheduler is not None:
            scheduler.step()
        total += loss
        batches += 1
        bar.set_postfix(loss=f"{loss:.4g}")
    return total / batches if batches else float("nan")


def evaluate_counts(model, dataset, *, scale, device, amp=False) -> dict[str, Any]:
    """Predicted against annotated counts over whole images, one image at a time.

    Inputs:
    - model: nn.Module returning (1, 1, H/8, W/8) maps of people x scale for a (1, 3, H, W) image
    - dataset: helpers.samples.CrowdDataset in "eval" mode (item i: float32 (3, H, W) image and
      its target; ``dataset.true_count(i)`` the annotated number of people)
    - scale: float, predictions are divided by it
    - device: torch.device or str to run the model on
    - amp: bool, forward pass under torch.autocast in float16

    Returns: dict with
    - mae: float, mean absolute count error (people per image)
    - rmse: float, root mean squared count error (people per image)
    - bias: float, mean of predicted - true (people per image; > 0 means overcounting)
    - pred: list of float, predicted count per image, in dataset order
    - true: list of float, annotated count per image
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    pred = []
    with torch.no_grad():
        for i in range(len(dataset)):
            image = dataset[i][0][None].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = model(image)
            pred.append(float(out.float().sum().double().item()) / scale)
    model.train(was_training)
    true = [float(dataset.true_count(i)) for i in range(len(dataset))]
    err = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    nan = float("nan")
    return {
        "mae": float(np.abs(err).mean()) if len(err) else nan,
        "rmse": float(np.sqrt((err**2).mean())) if len(err) else nan,
        "bias": float(err.mean()) if len(err) else nan,
        "pred": pred,
        "true": true,
    }


def fit(model, train_set, val_set, *, epochs=10, lr=1e-3, batch_size=8, scale=100.0,
        weight_decay=0.0, reduction="mean", count_weight=0.0, grad_clip=10.0, amp=False,
        device=None, seed=0, progress=True, loss_fn=None,
        callback: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train with Adam and a cosine learning-rate decay; validate after every epoch.

    Inputs:
    - model: nn.Module with output stride 8 (moved to device here)
    - train_set: helpers.samples.CrowdDataset in "train" mode (crops of one size)
    - val_set: helpers.samples.CrowdDataset in "eval" mode (whole images)
    - epochs: int, passes over train_set
    - lr: float, initial learning rate (decays to lr / 100 at the last step)
    - batch_size: int, crops per batch
    - scale: float, the network learns scale x density
    - weight_decay, reduction, count_weight, grad_clip, loss_fn: see density_loss and train_step
      (a point loss needs train_set with targets="points")
    - amp: bool, mixed precision (CUDA only; ignored elsewhere)
    - device: torch.device, str or None (None: the model's device)
    - seed: int, seeds the sample order (augmentations depend on train_set's own seed and the epoch)
    - progress: bool, progress bars
    - callback: None or a function called with each history row (e.g. to redraw a plot)

    Returns:
    - history: list of dicts, one per epoch, with epoch (int), train_loss (float), val_mae,
      val_rmse, val_bias (people per image), lr (learning rate used) and seconds (float)
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    amp = bool(amp and device.type == "cuda")
    generator = torch.Generator().manual_seed(int(seed))
    points = getattr(train_set, "targets", "density") == "points"
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                                         collate_fn=collate_points if points else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps))))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    history = []
    for epoch in range(1, epochs + 1):
        started, lr_used = time.perf_counter(), optimizer.param_groups[0]["lr"]
        train_set.epoch = epoch - 1
        loss = train_one_epoch(model, loader, optimizer, device=device, scaler=scaler,
                               scheduler=scheduler, scale=scale, reduction=reduction,
                               count_weight=count_weight, grad_clip=grad_clip, amp=amp,
                               progress=progress, loss_fn=loss_fn)
        val = evaluate_counts(model, val_set, scale=scale, device=device, amp=amp)
        row = {"epoch": epoch, "train_loss": loss, "val_mae": val["mae"], "val_rmse": val["rmse"],
               "val_bias": val["bias"], "lr": lr_used, "seconds": time.perf_counter() - started}
        history.append(row)
        print(f"epoch {epoch}/{epochs}  loss {loss:.4g}  val MAE {val['mae']:.2f}  "
              f"RMSE {val['rmse']:.2f}  bias {val['bias']:+.2f}  lr {lr_used:.2e}  "
              f"{row['seconds']:.1f}s", flush=True)
        if callback is not None:
            callback(dict(row))
    return history
