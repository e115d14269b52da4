"""Training a density-regression network: the loop, validation, checkpoints, exact resume.

Python (notebooks)::

    from helpers.train import TrainConfig, train
    result = train(TrainConfig(model="heatmap_cnn", part="B", epochs=30, resize=0.5,
                               out="runs/hm_B"), callback=lambda row: print(row))
    result.best          # runs/hm_B/best.pt, the epoch with the lowest validation MAE

Command line (same options, see ``--help``)::

    python -m helpers.train --model heatmap_cnn --part B --epochs 30 --batch-size 8 --crop 256 \\
        --resize 0.5 --out runs/hm_B [--resume]

A run folder holds ``config.json``, ``history.csv`` (one row per epoch: ``epoch, step,
train_loss, val_mae, val_rmse, lr, seconds``), ``last.pt`` (everything needed to continue) and
``best.pt`` (the weights with the lowest validation MAE).

The loss
--------
Ground-truth densities are tiny (about 1e-3 people per pixel, 0.01-0.5 per 8 x 8 output cell),
so a pixel-wise MSE on raw maps is tiny too and its gradients vanish next to the weight decay
and the optimiser's epsilon. The targets are therefore multiplied by ``scale`` (default 100) and
the network learns ``scale x density``; ``scale`` is stored in every checkpoint and
:func:`helpers.tools.checkpoints.load_model` returns it, so predictions are divided by it
automatically. The loss is::

    loss = MSE(pred, scale * target)  +  count_loss_weight * mean_b((sum(pred_b) - sum(scale * target_b)) / scale)^2

with the MSE averaged over pixels and images (``loss="mean"``, the default) or summed over the
pixels of each image and averaged over images (``loss="sum"``, as in the CSRNet code). The count
term, off by default, is in people^2 whatever the scale. The paper's recipe is SGD with
``lr 1e-7, momentum 0.95, weight decay 5e-4`` on *unscaled* densities with the summed loss and
batch size 1: ``--optimizer sgd --lr 1e-7 --scale 1 --loss sum --batch-size 1``.

Weight averaging
----------------
With ``ema_decay`` > 0 (e.g. 0.99) the loop also keeps an exponential moving average of the
weights (and of the BatchNorm statistics), updated after every optimiser step::

    ema <- d * ema + (1 - d) * weights,    d = min(ema_decay, (1 + step) / (10 + step))

Validation, ``best.pt`` and therefore every prediction use the averaged weights. With a small
batch and a high learning rate each step moves the weights a lot, and the validation error of
the raw weights jumps from epoch to epoch; their average over the last ~1 / (1 - d) steps is
smoother and usually better (Polyak averaging). ``last.pt`` keeps both, so resume stays exact.

Averaged BatchNorm statistics do not belong to the averaged weights (the mean activation of
averaged weights is not the average of the weights' mean activations), and statistics gathered
on training crops in train mode need not match whole images. ``bn_recalibrate=N`` (e.g. 64)
recomputes them before every validation ("precise BatchNorm"): a copy of the validated weights
sees ``N`` whole ``fit`` images (spread over the split, as validation prepares them) in train mode,
and its running mean and variance become the plain average over those images
(:func:`recalibrate_batchnorm`). That copy is validated and saved as ``best.pt``; the training
state is not touched, so resume stays exact. On Part B with ``ema_decay=0.995`` it removed most of
a systematic overcount of whole images (test bias +21 -> +9 people per image).

The learning rate follows ``scheduler``: ``cosine`` (linear warm-up over ``warmup_epochs``, then a
cosine decay to ``min_lr_ratio x lr`` at the last step; its length is set by ``epochs``),
``plateau`` (divide by ``1 / plateau_factor`` when the validation MAE has not improved for
``plateau_patience`` epochs) or ``none``.

Exact resume
------------
``last.pt`` is written at the end of every epoch and every ``checkpoint_every`` optimiser steps.
It holds the weights, the optimiser, scheduler and gradient-scaler states, the random-number
generator states (Python, NumPy, torch CPU and CUDA), the position in the epoch (batches done),
the partial epoch loss, the history and the best score. The sample order of an epoch is a
permutation seeded by ``seed + epoch``, and the augmentation of a sample depends only on
``(seed, epoch, index)`` (:mod:`helpers.samples`), so on resume the loop skips the batches already
done and continues with exactly the same batches. On CPU, a run killed at any point and resumed
with ``--resume`` ends with bitwise the same weights as an uninterrupted run (the test suite checks
this, ``tests/test_faults.py`` also with kills in the middle of a checkpoint write: checkpoints
are written to a temporary file and renamed, and the temporary files a kill leaves behind are
deleted when the run starts again). On CUDA the result is as close as cuDNN's
non-deterministic kernels allow (``--deterministic`` trades speed for repeatability).
``--epochs`` is the total: ``--resume --epochs 50`` continues a finished 30-epoch run for 20 more epochs (with ``cosine`` the
schedule is then recomputed for the new length, so only ``plateau``/``none`` runs extend exactly).

Devices and speed
-----------------
The device is CUDA, then Apple MPS, then CPU (``--device`` or ``CROWD_DEVICE`` to force). On CUDA
the forward pass runs under ``torch.autocast`` (float16) with a ``torch.amp.GradScaler``, in
``channels_last`` memory format with ``cudnn.benchmark``; on other devices the same code runs with
those switched off. Under ``torchrun --nproc_per_node=N`` each process trains on its share of
every epoch (``DistributedSampler``) with ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU);
``--batch-size`` is per process. Rank 0 validates, logs and writes the checkpoints.

A wall-clock budget
-------------------
``max_minutes`` (``--max-minutes``) limits one call to :func:`train`, counted from its start
(data loading included). The clock is checked after every optimiser step and before every
epoch; when the budget is used the loop stops after the current step, validates the weights it
reached (a partial epoch's weights, or the last completed epoch's if it was not validated), keeps
them as ``best.pt`` if their validation MAE is the best so far, and writes ``last.pt`` at that
exact position. That validation runs after the deadline, so the call ends a few seconds late
(one forward pass per validation image). ``TrainResult.stop_reason`` is then ``"time"`` and
``TrainResult.time_stop`` says where it stopped; ``resume=True`` continues exactly from there
with a new budget. The epochs, and with them the cosine schedule, are set by ``epochs`` as
usual: choose ``epochs`` so that they fit in the budget if the learning rate should have
decayed by the end (:func:`helpers.tools.recipes.epochs_for_budget`).

Quick mode (``CROWD_QUICK=1``) trains on 16 ``fit`` images and validates on 6, unless
``max_fit`` / ``max_val`` say otherwise.

Aids for demonstrating and testing interruption: ``CROWD_TRAIN_STEP_DELAY=SECONDS`` sleeps after
every step; ``CROWD_TRAIN_SAVE_RANKS=1`` makes every process write its final weights to
``<out>/rank<r>.pt`` (to check that distributed processes agree).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers import config as settings
from helpers.errors import CheckpointError, CrowdError

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
LOSSES = ("mean", "sum")
HISTORY_COLUMNS = ("epoch", "step", "train_loss", "val_mae", "val_rmse", "lr", "seconds")
QUICK_FIT, QUICK_VAL = 16, 6
CHECKPOINT_FORMAT = 1
#: Learning rates used when ``lr`` is not given: Adam for each model, and the paper's SGD value.
DEFAULT_LR = {("adam", "heatmap_cnn"): 1e-3, ("adam", "csrnet"): 1e-5, ("sgd", "heatmap_cnn"): 1e-7,
              ("sgd", "csrnet"): 1e-7}
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "sgd": 5e-4}
#: The clock of the ``max_minutes`` budget (seconds); tests replace it with a simulated one.
_clock = time.perf_counter

#: Settings that define a run: a resumed run must use the same values. The others (epochs,
#: patience, device, workers, ...) may change between an interrupted run and its continuation.
RUN_IDENTITY = (
    "model", "model_kwargs", "part", "batch_size", "crop", "resize", "flip", "rescale", "gray_prob",
    "density_method", "density_sigma", "optimizer", "lr", "momentum", "weight_decay", "scheduler",
    "warmup_epochs", "min_lr_ratio", "plateau_factor", "plateau_patience", "scale", "loss",
    "count_loss_weight", "grad_clip", "seed", "val_every", "max_fit", "max_val", "amp",
    "channels_last", "ema_decay", "bn_recalibrate",
)  # fmt: skip


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON-serialisable; saved as ``config.json``).

    Data: ``part`` (A/B) of the dataset at ``data_root`` (default: CROWD_DATA, else the synthetic
    set); training on the ``fit`` split, validation on ``val`` (helpers.data). ``crop`` (px,
    multiple of 8) after ``resize``; ``flip``, ``rescale`` ``[low, high]`` and ``gray_prob``
    augment. ``max_fit``/``max_val`` cap the number of images (None: all; quick mode: 16 / 6).

    Optimisation: ``optimizer`` adam | sgd with ``lr`` (None: :data:`DEFAULT_LR`), ``momentum``
    (sgd), ``weight_decay`` (None: 0 for adam, 5e-4 for sgd); ``scheduler`` cosine | plateau |
    none; ``scale`` multiplies targets (module docstring); ``loss`` mean | sum;
    ``count_loss_weight``; ``grad_clip`` (max gradient norm, 0 = off); ``ema_decay`` (weight
    averaging for validation and ``best.pt``, 0 = off; module docstring); ``bn_recalibrate``
    (BatchNorm statistics recomputed on that many whole fit images before each validation, 0 =
    off; module docstring); ``patience`` (stop after
    that many epochs without a better validation MAE, 0 = never); ``val_every`` (epochs).

    Run: ``out`` folder (None: ``runs/<model>_part<part>``); ``resume`` continues ``out/last.pt``;
    ``checkpoint_every`` optimiser steps (0: only at epoch ends); ``device`` (None: automatic);
    ``workers`` data-loading processes (None: automatic); ``cache_in_memory`` keeps decoded images
    and densities in RAM (helpers.samples); ``amp``, ``channels_last`` (CUDA only) and
    ``deterministic`` (CUDA: deterministic kernels, no cudnn.benchmark); ``max_minutes``
    wall-clock budget of one call to :func:`train` (None: no limit; see the module docstring).
    """

    model: str = "heatmap_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    part: str = "B"
    data_root: str | None = None
    epochs: int = 30
    batch_size: int = 8
    crop: int = 256
    resize: float = 1.0
    flip: bool = True
    rescale: list[float] | None = None
    gray_prob: float = 0.0
    density_method: str = "adaptive"
    density_sigma: float = 4.0
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.95
    weight_decay: float | None = None
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    scale: float = 100.0
    loss: str = "mean"
    count_loss_weight: float = 0.0
    grad_clip: float = 10.0
    ema_decay: float = 0.0
    bn_recalibrate: int = 0
    seed: int = 0
    patience: int = 0
    val_every: int = 1
    max_fit: int | None = None
    max_val: int | None = None
    out: str | None = None
    resume: bool = False
    checkpoint_every: int = 100
    device: str | None = None
    workers: int | None = None
    cache_in_memory: bool = False
    amp: bool = True
    channels_last: bool = True
    deterministic: bool = False
    max_minutes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from another version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def resolved(self) -> TrainConfig:
        """A checked copy with the automatic values (lr, weight decay, out, subsets) filled in."""
        from helpers.models import MODEL_NAMES

        c = dataclasses.replace(self, model_kwargs=dict(self.model_kwargs))
        c.model = str(c.model).strip().lower().replace("-", "_")
        c.part = str(c.part).upper().removeprefix("PART_")
        c.optimizer = str(c.optimizer).lower()
        c.scheduler = str(c.scheduler).lower()
        checks = [
            (c.model in MODEL_NAMES, f"--model must be one of {', '.join(MODEL_NAMES)}, not {self.model!r}"),
            (c.part in ("A", "B"), f"--part must be A or B, not {self.part!r}"),
            (c.optimizer in OPTIMIZERS, f"--optimizer must be adam or sgd, not {self.optimizer!r}"),
            (c.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}"),
            (c.loss in LOSSES, f"--loss must be mean or sum, not {self.loss!r}"),
            (c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}"),
            (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
            (c.crop >= 8 and c.crop % 8 == 0, f"--crop must be a positive multiple of 8 (the output stride), got {c.crop}"),
            (0 < c.resize <= 4, f"--resize must be in (0, 4], got {c.resize}"),
            (c.lr is None or (math.isfinite(c.lr) and c.lr > 0), f"--lr must be a positive number, got {c.lr}"),
            (math.isfinite(c.scale) and c.scale > 0, f"--scale must be a positive number, got {c.scale}"),
            (c.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {c.grad_clip}"),
            (0 <= c.ema_decay < 1, f"--ema-decay must be in [0, 1) (0 = off), got {c.ema_decay}"),
            (c.bn_recalibrate >= 0, f"--bn-recalibrate must be >= 0 images (0 = off), got {c.bn_recalibrate}"),
            (c.patience >= 0, f"--patience must be >= 0 (0 = off), got {c.patience}"),
            (c.val_every >= 1, f"--val-every must be >= 1, got {c.val_every}"),
            (c.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {c.checkpoint_every}"),
            (0 <= c.gray_prob <= 1, f"--gray-prob must be in [0, 1], got {c.gray_prob}"),
            (c.count_loss_weight >= 0, f"--count-loss-weight must be >= 0, got {c.count_loss_weight}"),
            (c.workers is None or c.workers >= 0, f"--workers must be >= 0, got {c.workers}"),
            (c.momentum >= 0, f"--momentum must be >= 0, got {c.momentum}"),
            (c.weight_decay is None or c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}"),
            (c.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {c.warmup_epochs}"),
            (c.density_sigma > 0, f"--density-sigma must be > 0 pixels, got {c.density_sigma}"),
            (c.density_method in ("adaptive", "fixed"), f"--density-method must be adaptive or fixed, not {c.density_method!r}"),
            (c.max_fit is None or c.max_fit >= 1, f"--max-fit must be >= 1, got {c.max_fit}"),
            (c.max_val is None or c.max_val >= 1, f"--max-val must be >= 1, got {c.max_val}"),
            (c.max_minutes is None or (math.isfinite(c.max_minutes) and c.max_minutes > 0),
             f"--max-minutes must be a positive number of minutes, got {c.max_minutes}"),
            (0 < c.min_lr_ratio <= 1, f"min_lr_ratio must be in (0, 1], got {c.min_lr_ratio}"),
            (0 < c.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {c.plateau_factor}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CrowdError(message)
        if c.rescale is not None:
            if len(c.rescale) != 2 or not 0 < float(c.rescale[0]) <= float(c.rescale[1]):
                raise CrowdError(f"--rescale takes LOW HIGH with 0 < LOW <= HIGH, got {c.rescale}")
            c.rescale = [float(c.rescale[0]), float(c.rescale[1])]
        if c.model == "csrnet":
            c.model_kwargs.setdefault("pretrained", "imagenet")
        if c.lr is None:
            c.lr = DEFAULT_LR[(c.optimizer, c.model)]
        if c.weight_decay is None:
            c.weight_decay = DEFAULT_WEIGHT_DECAY[c.optimizer]
        if c.out is None:
            c.out = str(settings.runs_root() / f"{c.model}_part{c.part}")
        if settings.quick_mode():
            c.max_fit = QUICK_FIT if c.max_fit is None else c.max_fit
            c.max_val = QUICK_VAL if c.max_val is None else c.max_val
        return c


def _identity_diff(stored: TrainConfig, wanted: TrainConfig) -> list[str]:
    old, new = stored.to_dict(), wanted.to_dict()
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RUN_IDENTITY if old.get(k) != new.get(k)]


@dataclass
class TrainResult:
    """What :func:`train` returns: where things are and how it went."""

    out: Path
    last: Path
    best: Path
    history: list[dict[str, float]]
    best_val_mae: float
    best_epoch: int
    stopped_early: bool
    config: TrainConfig
    #: Why this call ended: ``"epochs"`` (all done), ``"patience"`` (early stopping) or
    #: ``"time"`` (``max_minutes`` used up; continue with ``resume=True``).
    stop_reason: str = "epochs"
    #: For a ``"time"`` stop: where it stopped and the validation of those weights
    #: (``epoch`` = the epoch in progress, ``batch_in_epoch``, ``step``, ``val_mae``, ``val_rmse``,
    #: ``minutes``); None otherwise.
    time_stop: dict[str, Any] | None = None


# --------------------------------------------------------------------------- history


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def history_csv(history: Sequence[dict[str, Any]]) -> str:
    """The history rows as CSV text (missing validation values are empty cells)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in history:
        writer.writerow([_fmt(row.get(c, float("nan"))) for c in HISTORY_COLUMNS])
    return buf.getvalue()


def read_history(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Read a run's ``history.csv`` (or the run folder) into a list of dicts of numbers."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.csv"
    if not path.is_file():
        raise CrowdError(f"{path} does not exist: no training history there.")
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, float] = {}
            for key, value in raw.items():
                if key in ("epoch", "step"):
                    row[key] = int(value)
                else:
                    row[key] = float(value) if value not in ("", None) else float("nan")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- RNG states


def _rng_state() -> dict[str, Any]:
    """Every global random generator's state as tensors and plain types (weights_only-safe)."""
    import torch

    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), [int(x) for x in mt], None if gauss is None else float(gauss)],
        "numpy": [str(np_name), torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys.numpy(), dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    enabled: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _launched_distributed() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _init_distributed(device_pref: str | None) -> _Dist:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo otherwise)."""
    if not _launched_distributed():
        return _Dist()
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if dist.is_initialized():
        return _Dist(True, dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    wanted = device_pref or os.environ.get("CROWD_DEVICE", "").strip() or None
    use_cuda = torch.cuda.is_available() and (wanted is None or wanted.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return _Dist(True, rank, world, local_rank, owns_group=True)


def _barrier(d: _Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def _broadcast_floats(values: list[float], d: _Dist) -> list[float]:
    """Rank 0's values on every rank."""
    if not d.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return [float(v) for v in t.cpu().tolist()]


def _mean_over_ranks(value, d: _Dist) -> float:
    """Mean of a scalar tensor over ranks (a NaN anywhere gives NaN everywhere)."""
    if not d.enabled:
        return float(value.item())
    import torch.distributed as dist

    t = value.detach().double().reshape(1).clone()
    dist.all_reduce(t)
    return float(t.item()) / d.world


# --------------------------------------------------------------------------- pieces


@functools.cache
def _loss_output_class():
    import torch

    class LossOutput(torch.nn.Module):
        """Wraps a model so that ``forward`` returns ``model.loss_output(x)``: the tensor the loss
        is computed on (what DistributedDataParallel must call to synchronise gradients)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.loss_output(x)

    return LossOutput


def _saved_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Model constructor arguments as stored in checkpoints (no init-only ones such as pretrained)."""
    from helpers.tools.checkpoints import INIT_ONLY_KWARGS

    return {k: v for k, v in cfg.model_kwargs.items() if k not in INIT_ONLY_KWARGS}


def density_loss(pred, target, reduction: str = "mean", count_weight: float = 0.0, scale: float = 1.0):
    """Training loss of ``(B, 1, h, w)`` predictions against scaled targets (module docstring)."""
    diff2 = (pred - target) ** 2
    loss = diff2.mean() if reduction == "mean" else diff2.sum() / pred.shape[0]
    if count_weight > 0:
        counts = (pred.sum(dim=(1, 2, 3)) - target.sum(dim=(1, 2, 3))) / scale
        loss = loss + count_weight * (counts**2).mean()
    return loss


def _make_scheduler(name: str, optimizer, cfg: TrainConfig, steps_per_epoch: int):
    import torch

    if name == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch)
        warmup = min(total, max(0, round(cfg.warmup_epochs * steps_per_epoch)))
        floor = cfg.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    return None


def _default_workers(device) -> int:
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    return 0 if cpus <= 2 else min(4, cpus // 2)


def _check_finite_params(model) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CrowdError(
                f"Training diverged: weight {name!r} is NaN or infinite. Nothing was saved from "
                "this state. Lower the learning rate (--lr) or enable gradient clipping (--grad-clip)."
            )


@dataclass
class _State:
    """Loop bookkeeping that goes into every checkpoint."""

    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches done in the current epoch
    step: int = 0  # optimiser steps so far
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    epoch_seconds: float = 0.0
    best_val_mae: float = float("inf")
    best_epoch: int = 0
    epochs_since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""  # "time" when the last call ran out of max_minutes
    time_stop: dict[str, Any] | None = None


def ema_update(ema_model, model, decay: float, step: int) -> None:
    """One step of the weight average: ``ema = d * ema + (1 - d) * model`` for every floating
    parameter and buffer (BatchNorm statistics too), ``d = min(decay, (1 + step) / (10 + step))``
    so that early averages are not dominated by the random initial weights. Integer buffers
    (BatchNorm's batch counter) are copied."""
    import torch

    d = min(float(decay), (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for avg, new in zip(ema_model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new.detach(), alpha=1.0 - d)
            else:
                avg.copy_(new)


def recalibrate_batchnorm(model, images, *, channels_last: bool = False, amp: bool = False):
    """A copy of ``model`` whose BatchNorm running statistics are recomputed on ``images``.

    ``images``: an iterable of normalised ``(1, 3, H, W)`` tensors (any sizes). Each goes through
    the copy in train mode without gradients; every BatchNorm layer's running mean and variance
    become the plain average of the per-image batch statistics (``momentum=None``), instead of
    the exponential average over training crops. Weights are not changed; ``model`` itself is
    not touched. Returns the copy in eval mode (the model unchanged if it has no BatchNorm).
    """
    import copy

    import torch

    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    if not any(isinstance(m, norms) for m in model.modules()):
        return model
    fresh = copy.deepcopy(model)
    momenta = {}
    for m in fresh.modules():
        if isinstance(m, norms):
            m.reset_running_stats()
            momenta[m] = m.momentum
            m.momentum = None  # cumulative average
    fresh.train()
    device = next(fresh.parameters()).device
    seen = 0
    with torch.no_grad():
        for x in images:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                fresh(x)
            seen += 1
    if seen == 0:
        raise ValueError("recalibrate_batchnorm needs at least one image")
    for m, momentum in momenta.items():
        m.momentum = momentum
    return fresh.eval()


def _checkpoint(model, optimizer, scheduler, scaler, state: _State, cfg: TrainConfig, d: _Dist,
                data_root: str, ema_model=None) -> dict[str, Any]:
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_name": cfg.model,
        "model_kwargs": _saved_kwargs(cfg),
        "scale": float(cfg.scale),
        "stride": int(model.output_stride),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
        "config": cfg.to_dict(),
        "world_size": d.world,
        "data_root": data_root,
    }
    if ema_model is not None:
        ckpt["ema"] = ema_model.state_dict()
    ckpt.update(dataclasses.asdict(state))
    return ckpt


# --------------------------------------------------------------------------- evaluation


def evaluate_counts(model, dataset, scale: float, device=None, *, loader=None,
                    amp: bool = False, channels_last: bool = False, progress: bool = False) -> dict[str, Any]:
    """Predicted vs annotated counts of an eval-mode :class:`helpers.samples.CrowdDataset`.

    ``model(x)`` must return ``scale x density``. Returns ``{"mae", "rmse", "pred", "true"}``
    (``pred``/``true``: float64 arrays, one count per image, in dataset order).
    """
    import torch
    from tqdm.auto import tqdm

    from helpers.tools.loading import make_loader

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if loader is None:
        loader = make_loader(dataset, batch_size=1, shuffle=False, device=device)
    loader.sampler.set_epoch(0)
    was_training = model.training
    model.eval()
    preds: list[float] = []
    with torch.no_grad():
        for images, _ in tqdm(loader, desc="validate", leave=False, disable=not progress):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = model(images)
            preds.extend((out.float().sum(dim=(1, 2, 3)) / scale).double().cpu().tolist())
    model.train(was_training)
    true = np.array([dataset.true_count(i) for i in range(len(dataset))], dtype=np.float64)
    pred = np.asarray(preds, dtype=np.float64)
    err = pred - true
    return {
        "mae": float(np.abs(err).mean()) if len(err) else float("nan"),
        "rmse": float(np.sqrt((err**2).mean())) if len(err) else float("nan"),
        "pred": pred,
        "true": true,
    }


# --------------------------------------------------------------------------- training


def train(config: TrainConfig, callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or, with ``config.resume``, continue training) and return a :class:`TrainResult`.

    ``callback(row)`` is called on the main process after every epoch with the history row (a
    notebook can redraw a live plot). Raises :class:`CrowdError` on bad settings, data problems,
    a diverging loss (NaN/inf) or a checkpoint that does not match the settings.
    """
    d = _init_distributed(config.device)
    try:
        return _train(config, callback, d)
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, callback, d: _Dist) -> TrainResult:
    import torch

    from helpers.tools.checkpoints import load_checkpoint, save_checkpoint
    from helpers.data import list_records, resolve_data_source, take_evenly
    from helpers.density import DensityParams
    from helpers.tools.fileio import remove_stale_temp_files, write_json_atomic, write_text_atomic
    from helpers.models import build_model
    from helpers.samples import CrowdDataset
    from helpers.tools.loading import make_loader

    started = _clock()
    cfg = config.resolved()
    deadline = math.inf if cfg.max_minutes is None else started + 60.0 * float(cfg.max_minutes)
    out = Path(cfg.out).expanduser()
    last_path, best_path = out / "last.pt", out / "best.pt"
    ckpt = None
    if last_path.exists() and not cfg.resume:
        raise CrowdError(
            f"{out} already holds a training run (last.pt). Continue it with --resume "
            "(resume=True), or choose another --out folder."
        )
    if cfg.resume and last_path.exists():
        ckpt = load_checkpoint(last_path, map_location="cpu")
        if "config" not in ckpt or "optimizer" not in ckpt:
            raise CheckpointError(f"{last_path} is not a resumable training checkpoint.")
        stored = TrainConfig.from_dict(ckpt["config"])
        diff = _identity_diff(stored, cfg)
        if diff:
            raise CrowdError(
                f"Cannot resume {out} with different settings ({'; '.join(diff)}). Resume with "
                "the original settings, or start a new run in another --out folder."
            )

    # ---- device
    if d.enabled and torch.cuda.is_available() and (cfg.device is None or cfg.device.startswith("cuda")):
        device = torch.device("cuda", d.local_rank)
    else:
        device = settings.pick_device(cfg.device)
    on_cuda = device.type == "cuda"
    use_amp = bool(cfg.amp and on_cuda)
    channels_last = bool(cfg.channels_last and on_cuda)
    if on_cuda:
        torch.backends.cudnn.benchmark = not cfg.deterministic
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    workers = _default_workers(device) if cfg.workers is None else cfg.workers
    seed_everything(cfg.seed)

    # ---- data
    root = cfg.data_root if cfg.data_root is not None else str(resolve_data_source().root)
    trained_on = ckpt.get("data_root") if ckpt is not None else None
    if trained_on and Path(trained_on).expanduser().resolve() != Path(root).expanduser().resolve():
        raise CrowdError(
            f"Cannot resume {out}: it was trained on the dataset at {trained_on}, but the data now "
            f"found is {root}. Point CROWD_DATA (or data_root) at {trained_on} to resume, or start "
            "a new run in another --out folder."
        )
    fit_records = take_evenly(list_records(cfg.part, "fit", root), cfg.max_fit)
    val_records = take_evenly(list_records(cfg.part, "val", root), cfg.max_val)
    if not fit_records or not val_records:
        raise CrowdError(
            f"Part {cfg.part} at {root} has {len(fit_records)} fit and {len(val_records)} val "
            "images; training needs at least one of each (the official train split needs >= 2 images)."
        )
    dparams = DensityParams(method=cfg.density_method, sigma=cfg.density_sigma)
    common = {"density_params": dparams, "resize": cfg.resize, "cache_in_memory": cfg.cache_in_memory}
    train_set = CrowdDataset(fit_records, "train", crop=cfg.crop, flip=cfg.flip, rescale=cfg.rescale,
                             gray_prob=cfg.gray_prob, seed=cfg.seed, **common)
    val_set = CrowdDataset(val_records, "eval", **common)
    # whole fit images (as validation prepares them) for the BatchNorm recalibration
    recal_set = (CrowdDataset(take_evenly(fit_records, cfg.bn_recalibrate), "eval", **common)
                 if cfg.bn_recalibrate else None)
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device,
                         workers=workers, distributed=d.enabled)
    val_loader = make_loader(val_set, 1, shuffle=False, seed=cfg.seed, device=device,
                             workers=min(workers, 2)) if d.main else None
    steps_per_epoch = math.ceil(loader.sampler.num_samples / cfg.batch_size)

    # ---- model, optimiser
    # A resumed run gets all its weights from the checkpoint: no ImageNet download attempt.
    model = build_model(cfg.model, **(cfg.model_kwargs if ckpt is None else _saved_kwargs(cfg)))
    if ckpt is None and d.main and getattr(model, "frontend_pretrained", True) is False:
        print("note: the CSRNet frontend starts from random init (no ImageNet weights).")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema_model = None
    if cfg.ema_decay > 0:
        import copy

        ema_model = copy.deepcopy(model).eval()
        for p in ema_model.parameters():
            p.requires_grad_(False)
    eval_model = ema_model if ema_model is not None else model  # validated and kept as best.pt

    def validated_model():
        """The weights to validate and keep as best.pt (recalibrated copy if bn_recalibrate)."""
        if recal_set is None:
            return eval_model
        images = (recal_set[i][0][None] for i in range(len(recal_set)))
        return recalibrate_batchnorm(eval_model, images, channels_last=channels_last, amp=use_amp)
    net = _loss_output_class()(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if on_cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = _make_scheduler(cfg.scheduler, optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    state = _State()
    if ckpt is not None:
        from helpers.tools.checkpoints import check_state_dict, strip_prefix

        model_state = strip_prefix(ckpt["model"])
        check_state_dict(model, model_state, str(last_path), cfg.model)
        model.load_state_dict(model_state)
        if ema_model is not None:
            if "ema" not in ckpt:
                raise CheckpointError(f"{last_path} has no weight average (ema) to resume with ema_decay > 0.")
            ema_model.load_state_dict(strip_prefix(ckpt["ema"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
            if cfg.scheduler == "cosine":  # the same value unless --epochs changed the schedule
                for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas, strict=True):
                    group["lr"] = base * factor(scheduler.last_epoch)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        names = {f.name for f in dataclasses.fields(_State)}
        state = _State(**{k: ckpt[k] for k in names if k in ckpt})
        state.history = [dict(r) for r in state.history]
        _set_rng_state(ckpt["rng"])
        if state.batch_in_epoch and int(ckpt.get("world_size", 1)) != d.world:
            if d.main:
                print(f"note: the checkpoint was written by {ckpt.get('world_size')} process(es), "
                      f"this run has {d.world}: epoch {state.epoch + 1} restarts from its beginning.")
            state.batch_in_epoch, state.epoch_loss_sum, state.epoch_batches = 0, 0.0, 0
            state.epoch_seconds = 0.0
    elif cfg.resume and d.main:
        print(f"note: {last_path} does not exist yet; starting a new run.")

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)  # half-written files of a killed run (never read)
        write_json_atomic(out / "config.json", cfg.to_dict())
        write_text_atomic(out / "history.csv", history_csv(state.history))
    _barrier(d)

    def save_last() -> None:
        _check_finite_params(model)
        if d.main:
            save_checkpoint(last_path, _checkpoint(model, optimizer, scheduler, scaler, state, cfg, d, root,
                                                   ema_model))
        _barrier(d)

    from tqdm.auto import tqdm

    step_delay = float(os.environ.get("CROWD_TRAIN_STEP_DELAY", "0") or 0)
    state.stop_reason, state.time_stop = "", None  # a new call starts with a new budget

    def time_is_up() -> bool:
        """Rank 0's clock decides, so that every process stops after the same step."""
        if deadline == math.inf:
            return False
        return _broadcast_floats([float(_clock() >= deadline)], d)[0] > 0

    def stop_for_time() -> None:
        """Validate the weights reached (unless the last completed epoch already was), keep
        them as best.pt when better, record the stop and write a resumable last.pt."""
        epoch = state.epoch  # 0-based index of the epoch in progress (or the next one)
        partial = state.batch_in_epoch > 0
        need_val = partial or not state.history or not math.isfinite(float(state.history[-1]["val_mae"]))
        mae = rmse = float("nan")
        if need_val:
            rng = _rng_state()  # validation must not change what a resumed run does
            if d.main:
                vmodel = validated_model()
                metrics = evaluate_counts(vmodel, val_set, cfg.scale, device, loader=val_loader,
                                          amp=use_amp, channels_last=channels_last)
                mae, rmse = metrics["mae"], metrics["rmse"]
            mae, rmse = _broadcast_floats([mae, rmse], d)
            _set_rng_state(rng)
            net.train()
        else:
            mae, rmse = float(state.history[-1]["val_mae"]), float(state.history[-1]["val_rmse"])
        label = epoch + 1 if partial else epoch
        improved = need_val and math.isfinite(mae) and mae < state.best_val_mae
        if improved:
            state.best_val_mae, state.best_epoch, state.epochs_since_best = mae, label, 0
        minutes = (_clock() - started) / 60.0
        state.stop_reason = "time"
        state.time_stop = {"epoch": label, "batch_in_epoch": state.batch_in_epoch,
                           "step": state.step, "val_mae": mae, "val_rmse": rmse,
                           "minutes": minutes, "improved": bool(improved)}
        _check_finite_params(model)
        if improved and d.main:
            save_checkpoint(best_path, {
                "format": CHECKPOINT_FORMAT, "model": vmodel.state_dict(), "model_name": cfg.model,
                "model_kwargs": _saved_kwargs(cfg),
                "scale": float(cfg.scale), "stride": int(model.output_stride), "epoch": label,
                "batch_in_epoch": state.batch_in_epoch,
                "step": state.step, "val_mae": mae, "val_rmse": rmse, "best_val_mae": mae,
                "config": cfg.to_dict(), "data_root": root,
            })
        if partial:
            state.epoch_seconds = time.perf_counter() - epoch_t0
        save_last()
        if d.main:
            where = (f"epoch {epoch + 1} batch {state.batch_in_epoch}/{steps_per_epoch}" if partial
                     else f"the end of epoch {epoch}")
            val_text = f"val MAE {mae:.2f} RMSE {rmse:.2f}" + ("  *best" if improved else "")
            print(f"time budget of {cfg.max_minutes:g} min used ({minutes:.1f} min): stopped at {where}, "
                  f"step {state.step}; {val_text}. Continue with --resume (resume=True).", flush=True)

    epoch_t0 = time.perf_counter() - state.epoch_seconds
    # A run that stopped early stays stopped unless the patience was raised or switched off.
    state.stopped_early = bool(cfg.patience) and state.epochs_since_best >= cfg.patience
    if d.main:
        if state.stopped_early:
            print(f"{out}: this run stopped early at epoch {state.epoch} (patience {cfg.patience}); "
                  "nothing to do.")
        elif state.epoch >= cfg.epochs:
            print(f"{out}: already trained for {state.epoch} epochs (--epochs {cfg.epochs}); nothing to do.")
        else:
            print(f"training {cfg.model} on part {cfg.part}: {len(fit_records)} fit / "
                  f"{len(val_records)} val images from {root}, device {device}"
                  + (f" x {d.world} processes" if d.enabled else "")
                  + f", epoch {state.epoch + 1} of {cfg.epochs}, out {out}", flush=True)
    net.train()
    while state.epoch < cfg.epochs and not state.stopped_early:
        if time_is_up():
            stop_for_time()
            break
        epoch = state.epoch
        lr_used = float(optimizer.param_groups[0]["lr"])
        t0 = epoch_t0 = time.perf_counter() - state.epoch_seconds
        out_of_time = False
        loader.sampler.set_epoch(epoch, start=state.batch_in_epoch * cfg.batch_size)
        bar = tqdm(total=steps_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", leave=False, disable=not d.main)
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True) * cfg.scale
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                pred = net(images)
            pred = pred.float()
            if pred.shape != targets.shape:
                raise CrowdError(
                    f"The model output {tuple(pred.shape)} does not match the target {tuple(targets.shape)}; "
                    f"{cfg.model} must have output stride 8 and crops must be multiples of 8."
                )
            loss = density_loss(pred, targets, cfg.loss, cfg.count_loss_weight, cfg.scale)
            loss_value = _mean_over_ranks(loss, d)
            if not math.isfinite(loss_value):
                raise CrowdError(
                    f"The training loss became {loss_value} at step {state.step + 1} (epoch {epoch + 1}): "
                    f"training diverged. Lower the learning rate (now --lr {cfg.lr:g}) or enable "
                    f"gradient clipping (--grad-clip). The checkpoints in {out} are from before "
                    "the divergence."
                )
            lr_used = float(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and cfg.scheduler == "cosine":
                scheduler.step()
            if ema_model is not None:
                ema_update(ema_model, model, cfg.ema_decay, state.step)
            state.step += 1
            state.batch_in_epoch += 1
            state.epoch_loss_sum += loss_value
            state.epoch_batches += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")
            if step_delay > 0:
                time.sleep(step_delay)
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                    and state.batch_in_epoch < steps_per_epoch):
                state.epoch_seconds = time.perf_counter() - t0
                save_last()
            if state.batch_in_epoch < steps_per_epoch and time_is_up():
                out_of_time = True
                break
        bar.close()
        if out_of_time:
            stop_for_time()
            break

        # ---- end of epoch: validate, schedule, record, checkpoint
        validate = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        mae = rmse = float("nan")
        if validate:
            if d.main:
                vmodel = validated_model()
                metrics = evaluate_counts(vmodel, val_set, cfg.scale, device, loader=val_loader,
                                          amp=use_amp, channels_last=channels_last)
                mae, rmse = metrics["mae"], metrics["rmse"]
            mae, rmse = _broadcast_floats([mae, rmse], d)
            net.train()
        if scheduler is not None and cfg.scheduler == "plateau" and validate:
            scheduler.step(mae)
        improved = validate and math.isfinite(mae) and mae < state.best_val_mae
        if improved:
            state.best_val_mae, state.best_epoch, state.epochs_since_best = mae, epoch + 1, 0
        else:
            state.epochs_since_best += 1
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "step": state.step,
               "train_loss": state.epoch_loss_sum / max(1, state.epoch_batches),
               "val_mae": mae, "val_rmse": rmse, "lr": lr_used, "seconds": seconds}
        state.history.append(row)
        state.epoch += 1
        state.batch_in_epoch, state.epoch_loss_sum, state.epoch_batches, state.epoch_seconds = 0, 0.0, 0, 0.0
        if cfg.patience and state.epochs_since_best >= cfg.patience:
            state.stopped_early = True
        _check_finite_params(model)
        if improved and d.main:
            save_checkpoint(best_path, {
                "format": CHECKPOINT_FORMAT, "model": vmodel.state_dict(), "model_name": cfg.model,
                "model_kwargs": _saved_kwargs(cfg),
                "scale": float(cfg.scale), "stride": int(model.output_stride), "epoch": epoch + 1,
                "step": state.step, "val_mae": mae, "val_rmse": rmse, "best_val_mae": mae,
                "config": cfg.to_dict(), "data_root": root,
            })
        save_last()
        if d.main:
            write_text_atomic(out / "history.csv", history_csv(state.history))
            mark = "  *best" if improved else ""
            val_text = f"val MAE {mae:.2f} RMSE {rmse:.2f}" if validate else "val -"
            print(f"epoch {epoch + 1}/{cfg.epochs}  step {state.step}  loss {row['train_loss']:.4g}  "
                  f"{val_text}  lr {lr_used:.2e}  {seconds:.1f}s{mark}", flush=True)
            if callback is not None:
                callback(dict(row))
            if state.stopped_early:
                print(f"early stopping: no better validation MAE for {cfg.patience} epochs "
                      f"(best {state.best_val_mae:.2f} at epoch {state.best_epoch})")

    if os.environ.get("CROWD_TRAIN_SAVE_RANKS", "").strip() in ("1", "true", "yes"):
        save_checkpoint(out / f"rank{d.rank}.pt", {"model": model.state_dict(), "rank": d.rank})
    _barrier(d)
    reason = state.stop_reason or ("patience" if state.stopped_early else "epochs")
    return TrainResult(out=out, last=last_path, best=best_path, history=list(state.history),
                       best_val_mae=state.best_val_mae, best_epoch=state.best_epoch,
                       stopped_early=state.stopped_early, config=cfg, stop_reason=reason,
                       time_stop=state.time_stop)


# --------------------------------------------------------------------------- command line


def _model_arg(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit status 1, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see python -m helpers.train --help)", file=sys.stderr)
        sys.exit(1)


_EPILOG = """examples:
  fast CPU recipe (HeatmapCNN at half resolution):
    python -m helpers.train --part B --epochs 30 --resize 0.5 --crop 192 --out runs/hm_B
  continue it after an interruption, or up to 50 epochs:
    python -m helpers.train --out runs/hm_B --resume [--epochs 50]
  CSRNet with the paper's optimiser (unscaled densities, summed loss, batch 1):
    python -m helpers.train --model csrnet --part A --epochs 400 --optimizer sgd --lr 1e-7 \\
        --scale 1 --loss sum --batch-size 1 --out runs/csrnet_A
  two GPUs (--batch-size is per process):
    torchrun --nproc_per_node=2 -m helpers.train --model csrnet --part B --out runs/csrnet_B
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m helpers.train",
        description="Train a crowd-counting density regressor (writes OUT/{config.json,history.csv,"
        "last.pt,best.pt}). Options not given keep their defaults, or with --resume the values "
        "of the run being resumed.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--model", help="heatmap_cnn (default) or csrnet")
    a("--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE",
      help="model constructor argument, e.g. width=16 (heatmap_cnn) or batch_norm=true (csrnet); repeatable")
    a("--pretrained", help="csrnet frontend weights: imagenet (default), none, or a .pth path")
    a("--part", help="ShanghaiTech part A or B (default B)")
    a("--data-root", help="dataset root (default: CROWD_DATA, else the synthetic set)")
    a("--epochs", type=int, help="total number of epochs (default 30)")
    a("--batch-size", type=int, help="crops per batch and per process (default 8)")
    a("--crop", type=int, help="crop side in pixels, multiple of 8 (default 256)")
    a("--resize", type=float, help="train and validate at this fraction of the resolution (default 1)")
    a("--no-flip", dest="flip", action="store_const", const=False, help="no random horizontal flips")
    a("--rescale", type=float, nargs=2, metavar=("LOW", "HIGH"), help="random rescaling range, e.g. 0.8 1.2")
    a("--gray-prob", type=float, help="probability of a grayscale training sample (default 0)")
    a("--density-method", choices=["adaptive", "fixed"], help="ground-truth kernels (default adaptive)")
    a("--density-sigma", type=float, help="fixed sigma / fallback sigma in pixels (default 4)")
    a("--optimizer", choices=list(OPTIMIZERS), help="adam (default) or sgd")
    a("--lr", type=float, help="learning rate (default: 1e-3 heatmap_cnn / 1e-5 csrnet with adam, 1e-7 sgd)")
    a("--momentum", type=float, help="SGD momentum (default 0.95)")
    a("--weight-decay", type=float, help="weight decay (default 0 adam, 5e-4 sgd)")
    a("--scheduler", choices=list(SCHEDULERS), help="cosine (default), plateau or none")
    a("--warmup-epochs", type=float, help="cosine warm-up length in epochs (default 1)")
    a("--scale", type=float, help="density scale factor for the loss (default 100)")
    a("--loss", choices=list(LOSSES), help="MSE averaged over pixels (mean, default) or summed (sum)")
    a("--count-loss-weight", type=float, help="weight of the squared count error term (default 0)")
    a("--grad-clip", type=float, help="max gradient norm, 0 = off (default 10)")
    a("--ema-decay", type=float, help="validate and keep an average of the weights, e.g. 0.99; 0 = off (default)")
    a("--bn-recalibrate", type=int, metavar="N",
      help="recompute BatchNorm statistics on N whole fit images before each validation; 0 = off (default)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--patience", type=int, help="early stopping after N epochs without improvement, 0 = off")
    a("--val-every", type=int, help="validate every N epochs (default 1)")
    a("--max-fit", type=int, help="use at most N training images (quick mode: 16)")
    a("--max-val", type=int, help="use at most N validation images (quick mode: 6)")
    a("--max-minutes", type=float, help="wall-clock budget of this call in minutes: stop cleanly "
      "(validate, keep the best, write a resumable last.pt) when it is used (default: no limit)")
    a("--out", help="run folder (default runs/<model>_part<part>)")
    a("--resume", action="store_true", help="continue the run in --out from last.pt")
    a("--checkpoint-every", type=int, help="also write last.pt every N steps, 0 = epoch ends only (default 100)")
    a("--device", help="cpu, cuda, cuda:1, mps (default: automatic)")
    a("--workers", type=int, help="data-loading processes (default: automatic)")
    a("--cache-in-memory", action="store_const", const=True, help="keep decoded images and densities in RAM")
    a("--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA")
    a("--no-channels-last", dest="channels_last", action="store_const", const=False,
      help="keep the default memory format on CUDA")
    a("--deterministic", action="store_const", const=True, help="deterministic CUDA kernels (slower)")
    a("--json", action="store_true", help="print the result as one JSON line at the end")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge command-line options over the defaults (or, with --resume, over the stored run)."""
    from helpers.tools.checkpoints import load_checkpoint

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("model_arg", "pretrained", "json")}
    given["resume"] = bool(args.resume)
    base = TrainConfig()
    if args.resume:
        out = args.out
        if out is None:
            model = (args.model or base.model).strip().lower().replace("-", "_")
            part = str(args.part or base.part).upper()
            out = str(settings.runs_root() / f"{model}_part{part}")
        last = Path(out).expanduser() / "last.pt"
        if last.exists():
            base = TrainConfig.from_dict(load_checkpoint(last)["config"])
            given.setdefault("out", out)
    values = base.to_dict()
    values.update(given)
    same_model = "model" not in given or str(given["model"]).lower() == str(base.model).lower()
    kwargs = dict(base.model_kwargs) if same_model else {}
    kwargs.update(dict(args.model_arg or []))
    if args.pretrained is not None:
        kwargs["pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    values["model_kwargs"] = kwargs
    return TrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json and (not _launched_distributed() or os.environ.get("RANK") == "0"):
        print(json.dumps({"out": str(result.out), "best": str(result.best), "last": str(result.last),
                          "best_val_mae": result.best_val_mae, "best_epoch": result.best_epoch,
                          "epochs": len(result.history), "stopped_early": result.stopped_early,
                          "stop_reason": result.stop_reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
