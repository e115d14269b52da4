"""The product trainer: ``train(TrainConfig)`` and ``crowd train`` (resume, DDP, budget, EMA).

Built on the core (:mod:`helpers.train`): every optimisation step is :func:`helpers.train.train_step`
and every validation :func:`helpers.train.evaluate_counts`. Around them this module adds what a
long run needs: a run folder (``config.json``, ``history.csv``, ``last.pt``, ``best.pt``), exact
resume after a kill (random-number-generator states, position in the epoch), several processes
under ``torchrun`` (DistributedDataParallel: NCCL on CUDA, gloo on CPU), a wall-clock budget,
learning-rate schedules, a weight average (EMA), BatchNorm recalibration on whole images,
periodic checkpoints and early stopping. docs/training.md explains each choice.

    result = train(TrainConfig(model="heatmap_cnn", part="B", epochs=30, out="runs/hm_B"))

    crowd train --model heatmap_cnn --part B --epochs 30 --out runs/hm_B [--resume]
    torchrun --nproc_per_node=2 -m helpers train ...
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
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
import torch
from torch import nn

from helpers import config as settings
from helpers.errors import CheckpointError, CrowdError
from helpers.train import evaluate_counts, train_step

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
LOSSES = ("mse", "bayesian", "dm_count")  # pixel MSE on density maps, or a point loss (helpers.losses)
REDUCTIONS = ("mean", "sum")
HISTORY_COLUMNS = ("epoch", "step", "train_loss", "val_mae", "val_rmse", "lr", "seconds")
QUICK_FIT, QUICK_VAL = 16, 6
CHECKPOINT_FORMAT = 1
#: Learning rates used when ``lr`` is not given: Adam for each model, and the paper's SGD value.
DEFAULT_LR = {("adam", "heatmap_cnn"): 1e-3, ("adam", "csrnet"): 1e-5, ("sgd", "heatmap_cnn"): 1e-7,
              ("sgd", "csrnet"): 1e-7}
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "sgd": 5e-4}
#: Sigma (px) of a lone head in adaptive kernels when ``density_sigma`` is not given. Fixed kernels
#: have no default: CSRNet's Part B used 15 px, 4 px is far narrower (docs/training.md).
ADAPTIVE_FALLBACK_SIGMA = 4.0

#: Settings that define a run: a resumed run must use the same values. The others (epochs,
#: patience, device, workers, ...) may change between an interrupted run and its continuation.
RUN_IDENTITY = (
    "model", "model_kwargs", "part", "batch_size", "crop", "resize", "flip", "rescale", "gray_prob",
    "density_method", "density_sigma", "optimizer", "lr", "momentum", "weight_decay", "scheduler",
    "warmup_epochs", "min_lr_ratio", "plateau_factor", "plateau_patience", "scale", "loss",
    "reduction", "loss_kwargs", "count_loss_weight", "grad_clip", "seed", "val_every", "max_fit", "max_val", "amp",
    "channels_last", "ema_decay", "bn_recalibrate", "count_calibration", "init",
)  # fmt: skip


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON-serialisable; saved as ``config.json``).

    Data: ``part`` (A/B) of the dataset at ``data_root`` (default: CROWD_DATA, else the synthetic
    set); training on the ``fit`` split, validation on ``val`` (helpers.data). ``crop`` (px,
    multiple of 8) after ``resize``; ``flip``, ``rescale`` ``[low, high]`` and ``gray_prob``
    augment. Ground truth: ``density_method`` adaptive | fixed kernels with ``density_sigma`` (px
    of the original image; required for fixed, None = 4 for a lone head of adaptive kernels).
    ``max_fit``/``max_val`` cap the number of images (None: all; in quick mode 16 / 6
    unless set, e.g. by a recipe).

    Optimisation: ``optimizer`` adam | sgd with ``lr`` (None: :data:`DEFAULT_LR`), ``momentum``
    (sgd), ``weight_decay`` (None: 0 for adam, 5e-4 for sgd); ``scheduler`` cosine | plateau |
    none; ``scale`` multiplies targets; ``loss`` mse (density maps) | bayesian | dm_count (head
    points, :mod:`helpers.losses`, with ``loss_kwargs`` such as ``sigma``); ``reduction`` mean | sum
    of the MSE; ``count_loss_weight`` (MSE only); ``grad_clip`` (max gradient norm, 0 = off); ``ema_decay`` (weight
    averaging for validation and ``best.pt``, 0 = off); ``bn_recalibrate`` (BatchNorm
    statistics recomputed on that many whole fit images before each validation, 0 = off);
    ``count_calibration`` (then also fit one gain, true / predicted people summed over those fit
    images, that validation and ``best.pt`` apply to every count; needs ``bn_recalibrate``); ``patience`` (stop after
    that many epochs without a better validation MAE, 0 = never); ``val_every`` (epochs).

    Fine-tuning: ``init`` is a checkpoint (``best.pt``, a shipped model) whose weights a new run
    starts from, instead of a fresh initialisation; it must hold the same network (``model``,
    ``model_kwargs``) trained with the same ``scale``. A resumed run takes its weights from
    ``last.pt`` as always.

    Run: ``out`` folder (None: ``runs/<model>_part<part>``); ``resume`` continues ``out/last.pt``;
    ``checkpoint_every`` optimiser steps (0: only at epoch ends); ``device`` (None: automatic);
    ``workers`` data-loading processes (None: automatic); ``cache_in_memory`` keeps decoded images
    and densities in RAM (helpers.samples); ``amp``, ``channels_last`` (CUDA only) and
    ``deterministic`` (CUDA: deterministic kernels, no cudnn.benchmark); ``max_minutes``
    wall-clock budget of one call to :func:`train` (None: no limit). docs/training.md explains them.
    """

    # the model and the data
    model: str = "heatmap_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
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
    density_sigma: float | None = None
    # optimisation
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.95
    weight_decay: float | None = None
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    # the loss, the weights kept, when to stop
    scale: float = 100.0
    loss: str = "mse"
    reduction: str = "mean"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    count_loss_weight: float = 0.0
    grad_clip: float = 10.0
    ema_decay: float = 0.0
    bn_recalibrate: int = 0
    count_calibration: bool = False
    seed: int = 0
    patience: int = 0
    val_every: int = 1
    max_fit: int | None = None
    max_val: int | None = None
    # the run: where, resume, devices, speed, budget
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
        values = dict(values)
        if values.get("loss") in REDUCTIONS and "reduction" not in values:  # before --reduction existed
            values["reduction"], values["loss"] = values["loss"], "mse"
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def resolved(self) -> TrainConfig:
        """A checked copy with the automatic values (lr, weight decay, out, subsets) filled in."""
        from helpers.models import MODEL_NAMES

        c = dataclasses.replace(self, model_kwargs=dict(self.model_kwargs))
        c.model = str(c.model).strip().lower().replace("-", "_")
        c.part = str(c.part).upper().removeprefix("PART_")
        c.optimizer = str(c.optimizer).lower()
        c.scheduler = str(c.scheduler).lower()
        c.loss, c.loss_kwargs = str(c.loss).lower().replace("-", "_"), dict(c.loss_kwargs)
        checks = [
            (c.model in MODEL_NAMES, f"--model must be one of {', '.join(MODEL_NAMES)}, not {self.model!r}"),
            (c.part in ("A", "B"), f"--part must be A or B, not {self.part!r}"),
            (c.optimizer in OPTIMIZERS, f"--optimizer must be adam or sgd, not {self.optimizer!r}"),
            (c.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}"),
            (c.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}"
             + (f" (the MSE reduction is now --reduction {self.loss})" if self.loss in REDUCTIONS else "")),
            (c.reduction in REDUCTIONS, f"--reduction must be mean or sum, not {self.reduction!r}"),
            (c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}"),
            (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
            (c.crop >= 8 and c.crop % 8 == 0, f"--crop must be a positive multiple of 8 (the output stride), got {c.crop}"),
            (0 < c.resize <= 4, f"--resize must be in (0, 4], got {c.resize}"),
            (c.lr is None or (math.isfinite(c.lr) and c.lr > 0), f"--lr must be a positive number, got {c.lr}"),
            (math.isfinite(c.scale) and c.scale > 0, f"--scale must be a positive number, got {c.scale}"),
            (c.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {c.grad_clip}"),
            (0 <= c.ema_decay < 1, f"--ema-decay must be in [0, 1) (0 = off), got {c.ema_decay}"),
            (c.bn_recalibrate >= 0, f"--bn-recalibrate must be >= 0 images (0 = off), got {c.bn_recalibrate}"),
            (not c.count_calibration or c.bn_recalibrate > 0,
             "--count-calibration fits its gain on the --bn-recalibrate images: give --bn-recalibrate N (e.g. 64)"),
            (c.patience >= 0, f"--patience must be >= 0 (0 = off), got {c.patience}"),
            (c.val_every >= 1, f"--val-every must be >= 1, got {c.val_every}"),
            (c.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {c.checkpoint_every}"),
            (0 <= c.gray_prob <= 1, f"--gray-prob must be in [0, 1], got {c.gray_prob}"),
            (c.count_loss_weight >= 0, f"--count-loss-weight must be >= 0, got {c.count_loss_weight}"),
            (c.workers is None or c.workers >= 0, f"--workers must be >= 0, got {c.workers}"),
            (c.momentum >= 0, f"--momentum must be >= 0, got {c.momentum}"),
            (c.weight_decay is None or c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}"),
            (c.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {c.warmup_epochs}"),
            (c.density_sigma is None or c.density_sigma > 0, f"--density-sigma must be > 0 pixels, got {c.density_sigma}"),
            (c.density_sigma is not None or c.density_method != "fixed",
             "--density-method fixed needs --density-sigma (pixels of the original image, e.g. 15 as CSRNet "
             "used for Part B); runs made before this rule used 4"),
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
        point_loss(c)  # checks loss_kwargs
        if c.rescale is not None:
            if len(c.rescale) != 2 or not 0 < float(c.rescale[0]) <= float(c.rescale[1]):
                raise CrowdError(f"--rescale takes LOW HIGH with 0 < LOW <= HIGH, got {c.rescale}")
            c.rescale = [float(c.rescale[0]), float(c.rescale[1])]
        if c.model == "csrnet":
            c.model_kwargs.setdefault("pretrained", "imagenet")
        if c.density_sigma is None:
            c.density_sigma = ADAPTIVE_FALLBACK_SIGMA
        if c.lr is None:
            c.lr = DEFAULT_LR[(c.optimizer, c.model)]
        if c.weight_decay is None:
            c.weight_decay = DEFAULT_WEIGHT_DECAY[c.optimizer]
        if c.out is None:
            c.out = str(settings.runs_root() / f"{c.model}_part{c.part}")
        if c.init is not None:
            c.init = str(Path(c.init).expanduser().resolve())
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
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys.numpy(), dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
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


class LossOutput(nn.Module):
    """Wraps a model so that ``forward`` returns ``model.loss_output(x)``: the tensor the loss is
    computed on, and what DistributedDataParallel must call to synchronise the gradients."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.loss_output(x)


def _saved_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Model constructor arguments as stored in checkpoints (no init-only ones such as pretrained)."""
    from helpers.tools.checkpoints import INIT_ONLY_KWARGS

    return {k: v for k, v in cfg.model_kwargs.items() if k not in INIT_ONLY_KWARGS}


def _make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """cosine: linear warm-up, then a cosine decay to ``min_lr_ratio x lr`` at the last step
    (stepped per batch); plateau: divided when validation stalls (stepped per epoch); none."""
    if cfg.scheduler == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch)
        warmup = min(total, max(0, round(cfg.warmup_epochs * steps_per_epoch)))
        floor = cfg.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    return None


def _default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    return 0 if cpus <= 2 else min(4, cpus // 2)


def _check_finite_params(model: nn.Module) -> None:
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


def ema_update(ema_model: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """One step of the weight average: ``ema = d * ema + (1 - d) * model`` for every floating
    parameter and buffer (BatchNorm statistics too), ``d = min(decay, (1 + step) / (10 + step))``
    so that early averages are not dominated by the random initial weights. Integer buffers
    (BatchNorm's batch counter) are copied."""
    d = min(float(decay), (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for avg, new in zip(ema_model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new.detach(), alpha=1.0 - d)
            else:
                avg.copy_(new)


def recalibrate_batchnorm(model: nn.Module, images, *, channels_last: bool = False, amp: bool = False):
    """A copy of ``model`` whose BatchNorm running statistics are recomputed on ``images``.

    ``images``: an iterable of normalised ``(1, 3, H, W)`` tensors (any sizes). Each goes through
    the copy in train mode without gradients; every BatchNorm layer's running mean and variance
    become the plain average of the per-image batch statistics (``momentum=None``), instead of
    the exponential average over training crops. Weights are not changed; ``model`` itself is
    not touched. Returns the copy in eval mode (the model unchanged if it has no BatchNorm).
    """
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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


def count_gain(counts: dict[str, Any]) -> float:
    """The factor that makes predicted counts sum to the true ones: ``sum(true) / sum(pred)``.

    ``counts``: :func:`helpers.train.evaluate_counts` of whole fit images. BatchNorm statistics
    move every cell of a whole image a little, so counts (sums of thousands of cells) can be off
    by the same factor on every image; this gain, fitted on training images only, removes it.
    1.0 when nothing was predicted or nobody is annotated (no gain can be fitted).
    """
    pred, true = float(np.sum(counts["pred"])), float(np.sum(counts["true"]))
    return true / pred if pred > 0 and true > 0 and math.isfinite(pred) else 1.0


# --------------------------------------------------------------------------- training


def train(config: TrainConfig, callback: Callable[[dict[str, Any]], None] | None = None, *,
          clock: Callable[[], float] = time.perf_counter,
          on_step: Callable[[nn.Module, int], None] | None = None) -> TrainResult:
    """Train (or, with ``config.resume``, continue training) and return a :class:`TrainResult`.

    ``callback(row)`` is called on the main process after every epoch with the history row (a
    notebook can redraw a live plot). ``clock`` is the clock of the ``max_minutes`` budget, in
    seconds (a simulated one makes the budget end at a known step). ``on_step(model, step)`` is
    called on every process after every optimiser step (e.g. to slow a demonstration down, or to
    look at the weights). Raises :class:`CrowdError` on bad settings, data problems, a diverging
    loss (NaN/inf) or a checkpoint that does not match the settings.
    """
    d = _init_distributed(config.device)
    try:
        return _Run(config, d, clock=clock, callback=callback, on_step=on_step).train()
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Run:
    """One call of :func:`train`: the objects of the run and the steps of its loop."""

    def __init__(self, config: TrainConfig, d: _Dist, *, clock, callback, on_step) -> None:
        self.d, self.clock, self.callback, self.on_step = d, clock, callback, on_step
        self.started = clock()
        self.cfg = cfg = config.resolved()
        self.deadline = math.inf if cfg.max_minutes is None else self.started + 60.0 * float(cfg.max_minutes)
        self.out = Path(cfg.out).expanduser()
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        ckpt = self._resume_checkpoint()
        self._setup_device()
        self._setup_data(ckpt)
        self._setup_model(ckpt)
        self.state = self._restore(ckpt) if ckpt is not None else _State()
        if ckpt is None and cfg.resume and d.main:
            print(f"note: {self.last_path} does not exist yet; starting a new run.")
        self._prepare_folder()

    # ---- setup

    def _resume_checkpoint(self) -> dict[str, Any] | None:
        """The ``last.pt`` to continue (None for a new run), checked against the settings."""
        from helpers.tools.checkpoints import load_checkpoint

        cfg, out = self.cfg, self.out
        if self.last_path.exists() and not cfg.resume:
            raise CrowdError(
                f"{out} already holds a training run (last.pt). Continue it with --resume "
                "(resume=True), or choose another --out folder."
            )
        if not (cfg.resume and self.last_path.exists()):
            return None
        ckpt = load_checkpoint(self.last_path, map_location="cpu")
        if "config" not in ckpt or "optimizer" not in ckpt:
            raise CheckpointError(f"{self.last_path} is not a resumable training checkpoint.")
        diff = _identity_diff(TrainConfig.from_dict(ckpt["config"]), cfg)
        if diff:
            raise CrowdError(
                f"Cannot resume {out} with different settings ({'; '.join(diff)}). Resume with "
                "the original settings, or start a new run in another --out folder."
            )
        return ckpt

    def _setup_device(self) -> None:
        cfg, d = self.cfg, self.d
        if d.enabled and torch.cuda.is_available() and (cfg.device is None or cfg.device.startswith("cuda")):
            self.device = torch.device("cuda", d.local_rank)
        else:
            self.device = settings.pick_device(cfg.device)
        on_cuda = self.device.type == "cuda"
        self.use_amp = bool(cfg.amp and on_cuda)
        self.channels_last = bool(cfg.channels_last and on_cuda)
        if on_cuda:
            torch.backends.cudnn.benchmark = not cfg.deterministic
            if cfg.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
        self.workers = _default_workers(self.device) if cfg.workers is None else cfg.workers
        seed_everything(cfg.seed)

    def _setup_data(self, ckpt: dict[str, Any] | None) -> None:
        from helpers.data import list_records, resolve_data_source, take_evenly
        from helpers.density import DensityParams
        from helpers.samples import CrowdDataset
        from helpers.tools.loading import make_loader

        cfg = self.cfg
        root = cfg.data_root if cfg.data_root is not None else str(resolve_data_source().root)
        trained_on = ckpt.get("data_root") if ckpt is not None else None
        if trained_on and Path(trained_on).expanduser().resolve() != Path(root).expanduser().resolve():
            raise CrowdError(
                f"Cannot resume {self.out}: it was trained on the dataset at {trained_on}, but the "
                f"data now found is {root}. Point CROWD_DATA (or data_root) at {trained_on} to "
                "resume, or start a new run in another --out folder."
            )
        self.root = root
        fit = take_evenly(list_records(cfg.part, "fit", root), cfg.max_fit)
        val = take_evenly(list_records(cfg.part, "val", root), cfg.max_val)
        if not fit or not val:
            raise CrowdError(
                f"Part {cfg.part} at {root} has {len(fit)} fit and {len(val)} val images; training "
                "needs at least one of each (the official train split needs >= 2 images)."
            )
        self.n_fit, self.n_val = len(fit), len(val)
        common = {"density_params": DensityParams(method=cfg.density_method, sigma=cfg.density_sigma),
                  "resize": cfg.resize, "cache_in_memory": cfg.cache_in_memory,
                  "targets": "density" if cfg.loss == "mse" else "points", **_density_source()}
        train_set = CrowdDataset(fit, "train", crop=cfg.crop, flip=cfg.flip, rescale=cfg.rescale,
                                 gray_prob=cfg.gray_prob, seed=cfg.seed, **common)
        self.val_set = CrowdDataset(val, "eval", **common)
        # whole fit images (as validation prepares them) for the BatchNorm recalibration
        self.recal_set = (CrowdDataset(take_evenly(fit, cfg.bn_recalibrate), "eval", **common)
                          if cfg.bn_recalibrate else None)
        self.loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                  device=self.device, workers=self.workers, distributed=self.d.enabled)
        self.steps_per_epoch = math.ceil(self.loader.sampler.num_samples / cfg.batch_size)

    def _setup_model(self, ckpt: dict[str, Any] | None) -> None:
        from helpers.models import build_model

        cfg, d = self.cfg, self.d
        # A resumed or fine-tuned run gets all its weights from a checkpoint: no ImageNet download.
        fresh = ckpt is None and cfg.init is None
        model = build_model(cfg.model, **(cfg.model_kwargs if fresh else _saved_kwargs(cfg)))
        if fresh and d.main and getattr(model, "frontend_pretrained", True) is False:
            print("note: the CSRNet frontend starts from random init (no ImageNet weights).")
        if ckpt is None and cfg.init is not None:
            load_init_weights(model, cfg, announce=d.main)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema_model = None
        if cfg.ema_decay > 0:
            self.ema_model = copy.deepcopy(model).eval()
            self.ema_model.requires_grad_(False)
        self.net = LossOutput(model)  # what train_step calls (through DDP when distributed)
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.net, device_ids=ids)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        self.scheduler = _make_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.loss_fn = point_loss(cfg, stride=int(model.output_stride))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)

    def _restore(self, ckpt: dict[str, Any]) -> _State:
        """Load weights, average, optimiser, scheduler, scaler, RNG and loop state from last.pt."""
        from helpers.tools.checkpoints import check_state_dict, strip_prefix

        cfg, d = self.cfg, self.d
        model_state = strip_prefix(ckpt["model"])
        check_state_dict(self.model, model_state, str(self.last_path), cfg.model)
        self.model.load_state_dict(model_state)
        if self.ema_model is not None:
            if "ema" not in ckpt:
                raise CheckpointError(f"{self.last_path} has no weight average (ema) to resume with ema_decay > 0.")
            self.ema_model.load_state_dict(strip_prefix(ckpt["ema"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if cfg.scheduler == "cosine":  # the same value unless --epochs changed the schedule
                for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                               self.scheduler.lr_lambdas, strict=True):
                    group["lr"] = base * factor(self.scheduler.last_epoch)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
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
        return state

    def _prepare_folder(self) -> None:
        from helpers.tools import fileio

        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            fileio.remove_stale_temp_files(self.out)  # half-written files of a killed run (never read)
            fileio.write_json_atomic(self.out / "config.json", self.cfg.to_dict())
            fileio.write_text_atomic(self.out / "history.csv", history_csv(self.state.history))
        _barrier(self.d)

    # ---- checkpoints and validation (each written once)

    def _save_last(self) -> None:
        from helpers.tools.checkpoints import save_checkpoint

        _check_finite_params(self.model)
        if self.d.main:
            ckpt = {
                "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                "model_name": self.cfg.model, "model_kwargs": _saved_kwargs(self.cfg),
                "scale": float(self.cfg.scale), "stride": int(self.model.output_stride),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "scaler": self.scaler.state_dict(), "rng": _rng_state(), "config": self.cfg.to_dict(),
                "world_size": self.d.world, "data_root": self.root,
            }  # fmt: skip
            if self.ema_model is not None:
                ckpt["ema"] = self.ema_model.state_dict()
            ckpt.update(dataclasses.asdict(self.state))
            save_checkpoint(self.last_path, ckpt)
        _barrier(self.d)

    def _save_best(self, weights: nn.Module | None, gain: float, epoch: int, mae: float, rmse: float) -> None:
        """Write ``best.pt``: the validated weights (rank 0 only) of ``epoch``, their count gain
        (:meth:`_validate`; predictions are divided by ``scale / count_gain``) and their scores."""
        from helpers.tools.checkpoints import save_checkpoint

        _check_finite_params(self.model)
        if self.d.main:
            save_checkpoint(self.best_path, {
                "format": CHECKPOINT_FORMAT, "model": weights.state_dict(), "model_name": self.cfg.model,
                "model_kwargs": _saved_kwargs(self.cfg), "scale": float(self.cfg.scale),
                "count_gain": gain, "stride": int(self.model.output_stride), "epoch": epoch,
                "batch_in_epoch": self.state.batch_in_epoch, "step": self.state.step,
                "val_mae": mae, "val_rmse": rmse, "best_val_mae": mae, "config": self.cfg.to_dict(),
                "data_root": self.root,
            })  # fmt: skip

    def _validate(self) -> tuple[float, float, nn.Module | None]:
        """Validate the weights to keep (rank 0) and share the scores with every process.

        The weights are the average's with ``ema_decay``, recalibrated on whole fit images with
        ``bn_recalibrate``; with ``count_calibration`` their counts are multiplied by ``gain`` =
        true / predicted people summed over those fit images (1 otherwise). Returns ``(mae, rmse,
        weights, gain)`` (weights None on other ranks); the random generators are left as they
        were, so validating never changes the training.
        """
        rng = _rng_state()
        weights, mae, rmse, gain = None, float("nan"), float("nan"), 1.0
        if self.d.main:
            weights = self.ema_model if self.ema_model is not None else self.model
            if self.recal_set is not None:
                images = (self.recal_set[i][0][None] for i in range(len(self.recal_set)))
                weights = recalibrate_batchnorm(weights, images, channels_last=self.channels_last,
                                                amp=self.use_amp)
            if self.cfg.count_calibration:
                gain = count_gain(evaluate_counts(weights, self.recal_set, scale=self.cfg.scale,
                                                  device=self.device, amp=self.use_amp))
            metrics = evaluate_counts(weights, self.val_set, scale=self.cfg.scale / gain,
                                      device=self.device, amp=self.use_amp)
            mae, rmse = metrics["mae"], metrics["rmse"]
        mae, rmse = _broadcast_floats([mae, rmse], self.d)
        _set_rng_state(rng)
        self.net.train()
        return mae, rmse, weights, gain

    # ---- the loop

    def train(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        state.stop_reason, state.time_stop = "", None  # a new call starts with a new budget
        self.epoch_t0 = time.perf_counter() - state.epoch_seconds
        # A run that stopped early stays stopped unless the patience was raised or switched off.
        state.stopped_early = bool(cfg.patience) and state.epochs_since_best >= cfg.patience
        self._announce()
        self.net.train()
        from tqdm.auto import tqdm

        # one bar for the whole call: a notebook receives every bar (and update) as messages
        with tqdm(total=cfg.epochs * self.steps_per_epoch, unit="batch", leave=False, mininterval=1.0,
                  initial=min(state.epoch, cfg.epochs) * self.steps_per_epoch + state.batch_in_epoch,
                  disable=not self.d.main) as self.bar:
            while state.epoch < cfg.epochs and not state.stopped_early:
                if self._time_is_up() or not self._run_epoch():
                    self._stop_for_time()
                    break
                self._finish_epoch()
        _barrier(self.d)
        reason = state.stop_reason or ("patience" if state.stopped_early else "epochs")
        return TrainResult(out=self.out, last=self.last_path, best=self.best_path,
                           history=list(state.history), best_val_mae=state.best_val_mae,
                           best_epoch=state.best_epoch, stopped_early=state.stopped_early,
                           config=cfg, stop_reason=reason, time_stop=state.time_stop)

    def _announce(self) -> None:
        cfg, state, d = self.cfg, self.state, self.d
        if not d.main:
            return
        if state.stopped_early:
            print(f"{self.out}: this run stopped early at epoch {state.epoch} (patience "
                  f"{cfg.patience}); nothing to do.")
        elif state.epoch >= cfg.epochs:
            print(f"{self.out}: already trained for {state.epoch} epochs (--epochs {cfg.epochs}); "
                  "nothing to do.")
        else:
            print(f"training {cfg.model} on part {cfg.part}: {self.n_fit} fit / {self.n_val} val "
                  f"images from {self.root}, device {self.device}"
                  + (f" x {d.world} processes" if d.enabled else "")
                  + f", epoch {state.epoch + 1} of {cfg.epochs}, out {self.out}", flush=True)

    def _time_is_up(self) -> bool:
        """Rank 0's clock decides, so that every process stops after the same step."""
        if self.deadline == math.inf:
            return False
        return _broadcast_floats([float(self.clock() >= self.deadline)], self.d)[0] > 0

    def _loss_value(self, loss: torch.Tensor) -> float:
        """The batch loss averaged over processes; stops every process together on NaN/inf."""
        value = _mean_over_ranks(loss, self.d)
        if not math.isfinite(value):
            raise CrowdError(
                f"The training loss became {value} at step {self.state.step + 1} (epoch "
                f"{self.state.epoch + 1}): training diverged. Lower the learning rate (now --lr "
                f"{self.cfg.lr:g}) or enable gradient clipping (--grad-clip). The checkpoints in "
                f"{self.out} are from before the divergence."
            )
        return value

    def _run_epoch(self) -> bool:
        """Train the rest of the current epoch; False if the time budget ran out before its end."""
        cfg, state = self.cfg, self.state
        self.lr_used = float(self.optimizer.param_groups[0]["lr"])
        self.epoch_t0 = time.perf_counter() - state.epoch_seconds
        self.loader.sampler.set_epoch(state.epoch, start=state.batch_in_epoch * cfg.batch_size)
        bar = self.bar  # the run's progress bar (train())
        bar.set_description(f"epoch {state.epoch + 1}/{cfg.epochs}", refresh=False)
        for images, targets in self.loader:
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = (targets.to(self.device, non_blocking=True) if torch.is_tensor(targets)
                       else [t.to(self.device) for t in targets])  # point targets: a list per batch
            self.lr_used = float(self.optimizer.param_groups[0]["lr"])
            loss = train_step(self.net, images, targets, self.optimizer, self.scaler,
                              scale=cfg.scale, reduction=cfg.reduction, count_weight=cfg.count_loss_weight,
                              grad_clip=cfg.grad_clip, amp=self.use_amp, loss_value_fn=self._loss_value,
                              loss_fn=self.loss_fn)
            self._after_step(loss)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            bar.update(1)  # redraws at most once a second (mininterval)
            mid_epoch = state.batch_in_epoch < self.steps_per_epoch
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and mid_epoch:
                state.epoch_seconds = time.perf_counter() - self.epoch_t0
                self._save_last()
            if mid_epoch and self._time_is_up():
                return False
        return True

    def _after_step(self, loss: float) -> None:
        """Schedule, average and count after one optimiser step."""
        state = self.state
        if self.scheduler is not None and self.cfg.scheduler == "cosine":
            self.scheduler.step()
        if self.ema_model is not None:
            ema_update(self.ema_model, self.model, self.cfg.ema_decay, state.step)
        state.step += 1
        state.batch_in_epoch += 1
        state.epoch_loss_sum += loss
        state.epoch_batches += 1
        if self.on_step is not None:
            self.on_step(self.model, state.step)

    def _finish_epoch(self) -> None:
        """End of an epoch: validate, schedule, record, keep the best, checkpoint, report."""
        cfg, state = self.cfg, self.state
        epoch = state.epoch + 1
        validate = epoch % cfg.val_every == 0 or epoch == cfg.epochs
        mae, rmse, weights, gain = self._validate() if validate else (float("nan"), float("nan"), None, 1.0)
        if self.scheduler is not None and cfg.scheduler == "plateau" and validate:
            self.scheduler.step(mae)
        improved = validate and math.isfinite(mae) and mae < state.best_val_mae
        if improved:
            state.best_val_mae, state.best_epoch, state.epochs_since_best = mae, epoch, 0
        else:
            state.epochs_since_best += 1
        seconds = time.perf_counter() - self.epoch_t0
        row = {"epoch": epoch, "step": state.step,
               "train_loss": state.epoch_loss_sum / max(1, state.epoch_batches),
               "val_mae": mae, "val_rmse": rmse, "lr": self.lr_used, "seconds": seconds}
        state.history.append(row)
        state.epoch = epoch
        state.batch_in_epoch, state.epoch_loss_sum, state.epoch_batches, state.epoch_seconds = 0, 0.0, 0, 0.0
        state.stopped_early = bool(cfg.patience) and state.epochs_since_best >= cfg.patience
        if improved:
            self._save_best(weights, gain, epoch, mae, rmse)
        self._save_last()
        if self.d.main:
            self._report_epoch(row, validate, improved)

    def _report_epoch(self, row: dict[str, Any], validated: bool, improved: bool) -> None:
        from helpers.tools.fileio import write_text_atomic

        cfg, state = self.cfg, self.state
        write_text_atomic(self.out / "history.csv", history_csv(state.history))
        val_text = f"val MAE {row['val_mae']:.2f} RMSE {row['val_rmse']:.2f}" if validated else "val -"
        self._say(f"epoch {row['epoch']}/{cfg.epochs}  step {state.step}  loss {row['train_loss']:.4g}  "
                  f"{val_text}  lr {row['lr']:.2e}  {row['seconds']:.1f}s" + ("  *best" if improved else ""))
        if self.callback is not None:
            self.callback(dict(row))
        if state.stopped_early:
            self._say(f"early stopping: no better validation MAE for {cfg.patience} epochs "
                      f"(best {state.best_val_mae:.2f} at epoch {state.best_epoch})")

    def _say(self, text: str) -> None:
        """Print a line while the run's progress bar is shown (above it, tqdm.write), at once."""
        self.bar.write(text)
        sys.stdout.flush()

    def _stop_for_time(self) -> None:
        """The budget is used: validate the weights reached (unless the last completed epoch
        already was), keep them as best.pt when better, and write a resumable last.pt."""
        cfg, state = self.cfg, self.state
        partial = state.batch_in_epoch > 0
        label = state.epoch + 1 if partial else state.epoch  # the epoch of these weights
        need_val = partial or not state.history or not math.isfinite(float(state.history[-1]["val_mae"]))
        if need_val:
            mae, rmse, weights, gain = self._validate()
        else:
            last = state.history[-1]  # already validated: nothing new to keep
            mae, rmse, weights, gain = float(last["val_mae"]), float(last["val_rmse"]), None, 1.0
        improved = need_val and math.isfinite(mae) and mae < state.best_val_mae
        if improved:
            state.best_val_mae, state.best_epoch, state.epochs_since_best = mae, label, 0
        minutes = (self.clock() - self.started) / 60.0
        state.stop_reason = "time"
        state.time_stop = {"epoch": label, "batch_in_epoch": state.batch_in_epoch, "step": state.step,
                           "val_mae": mae, "val_rmse": rmse, "minutes": minutes, "improved": bool(improved)}
        if improved:
            self._save_best(weights, gain, label, mae, rmse)
        if partial:
            state.epoch_seconds = time.perf_counter() - self.epoch_t0
        self._save_last()
        if self.d.main:
            where = (f"epoch {state.epoch + 1} batch {state.batch_in_epoch}/{self.steps_per_epoch}"
                     if partial else f"the end of epoch {state.epoch}")
            val_text = f"val MAE {mae:.2f} RMSE {rmse:.2f}" + ("  *best" if improved else "")
            self._say(f"time budget of {cfg.max_minutes:g} min used ({minutes:.1f} min): stopped at {where}, "
                      f"step {state.step}; {val_text}. Continue with --resume (resume=True).")


def _effective_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments with the defaults filled in (without init-only ones such as pretrained)."""
    import inspect

    from helpers.models import CSRNet, HeatmapCNN
    from helpers.tools.checkpoints import INIT_ONLY_KWARGS

    cls = {"heatmap_cnn": HeatmapCNN, "csrnet": CSRNet}[name]
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {k: v for k, v in {**defaults, **kwargs}.items() if k not in INIT_ONLY_KWARGS}


def load_init_weights(model: nn.Module, cfg: TrainConfig, announce: bool = True) -> None:
    """Copy the weights of the checkpoint ``cfg.init`` into ``model`` (fine-tuning).

    The checkpoint is read safely (:func:`helpers.tools.checkpoints.load_checkpoint`); it must
    hold the network ``cfg`` builds (same model name and constructor arguments, every key and
    shape) and have been trained with the same ``scale``, else :class:`CheckpointError` says
    which settings to use.
    """
    from helpers.tools.checkpoints import check_state_dict, load_checkpoint, strip_prefix

    path = cfg.init
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt.get("model"), dict) or "model_name" not in ckpt:
        raise CheckpointError(f"--init {path} has no 'model' weights and 'model_name': it was not "
                              "written by crowd train. Start from a run's best.pt or a shipped model.")
    name, kwargs = str(ckpt["model_name"]), dict(ckpt.get("model_kwargs") or {})
    if name not in ("heatmap_cnn", "csrnet"):
        raise CheckpointError(f"--init {path} names an unknown model {name!r}.")
    if name != cfg.model or _effective_kwargs(name, kwargs) != _effective_kwargs(cfg.model, _saved_kwargs(cfg)):
        flags = " ".join([f"--model {name}"] + [f"--model-arg {k}={json.dumps(v)}" for k, v in kwargs.items()])
        raise CheckpointError(f"--init {path} holds a {name} with {kwargs or 'default settings'}, but this run "
                              f"builds a {cfg.model} with {_saved_kwargs(cfg) or 'default settings'}. "
                              f"Fine-tune the same network: {flags}.")
    scale = float(ckpt.get("scale", 1.0))
    if scale != float(cfg.scale):
        raise CheckpointError(f"--init {path} was trained with --scale {scale:g}, this run uses "
                              f"--scale {cfg.scale:g}: its outputs would be off by that factor. "
                              f"Fine-tune with --scale {scale:g}.")
    state = strip_prefix(ckpt["model"])
    check_state_dict(model, state, str(path), cfg.model)
    model.load_state_dict(state)
    if announce:
        trained = dict(ckpt.get("config") or {})
        note = ""
        if float(trained.get("resize", cfg.resize) or 1.0) != float(cfg.resize):
            note = (f" note: it was trained at --resize {trained.get('resize')}, this run uses "
                    f"--resize {cfg.resize}; heads will look {cfg.resize / float(trained['resize']):.2g}x as large.")
        print(f"fine-tuning: starting from the weights of {path} ({name}).{note}", flush=True)


def point_loss(cfg: TrainConfig, stride: int = 8) -> Callable | None:
    """The point loss of ``cfg.loss`` with ``cfg.loss_kwargs`` bound (None for ``mse``), for
    :func:`helpers.train.train_step`'s ``loss_fn``; unknown or bad ``loss_kwargs`` raise CrowdError."""
    import functools
    import inspect

    from helpers import losses

    fn = {"bayesian": losses.bayesian_loss, "dm_count": losses.dm_count_loss}.get(cfg.loss)
    if fn is None:
        if cfg.loss_kwargs:
            raise CrowdError(f"--loss-arg {sorted(cfg.loss_kwargs)} only applies to --loss bayesian or dm_count.")
        return None
    params = {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in ("pred", "points", "stride")}
    for key, value in cfg.loss_kwargs.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key not in params or not number or not (value >= 0 if key in ("background", "ot_weight", "tv_weight")
                                                   else value > 0) or (type(params[key]) is int and type(value) is not int):
            raise CrowdError(f"--loss-arg {key}={value!r}: --loss {cfg.loss} takes {', '.join(sorted(params))} "
                             "(positive numbers; iters an integer; background and the weights may be 0).")
    return functools.partial(fn, stride=stride, **cfg.loss_kwargs)


def _density_source() -> dict[str, Any]:
    """How the datasets get full-resolution density maps: from the HDF5 cache of the tools."""
    from helpers.tools.cache import load_density

    return {"density_fn": load_density}


# --------------------------------------------------------------------------- command line


def key_value_arg(text: str) -> tuple[str, Any]:
    """Parse a ``KEY=VALUE`` option: the value as JSON when it is JSON, else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


EPILOG = """examples:
  fast CPU recipe (HeatmapCNN at half resolution):
    crowd train --part B --epochs 30 --resize 0.5 --crop 192 --out runs/hm_B
  continue it after an interruption, or up to 50 epochs:
    crowd train --out runs/hm_B --resume [--epochs 50]
  CSRNet with the paper's optimiser (unscaled densities, summed loss, batch 1):
    crowd train --model csrnet --part A --epochs 400 --optimizer sgd --lr 1e-7 \\
        --scale 1 --reduction sum --batch-size 1 --out runs/csrnet_A
  learn from the head points (no Gaussian ground truth) with the Bayesian loss or DM-Count:
    crowd train --part B --resize 0.5 --loss bayesian --loss-arg sigma=4 --out runs/hm_B_bayes
  two GPUs (--batch-size is per process):
    torchrun --nproc_per_node=2 -m helpers train --model csrnet --part B --out runs/csrnet_B
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``crowd train`` on ``p`` (one per :class:`TrainConfig` field)."""
    p.description = ("Train a crowd-counting density regressor (writes OUT/{config.json,history.csv,"
                     "last.pt,best.pt}). Options not given keep their defaults, or with --resume the "
                     "values of the run being resumed.")
    p.epilog = EPILOG
    a = p.add_argument
    a("--model", help="heatmap_cnn (default) or csrnet")
    a("--model-arg", action="append", type=key_value_arg, metavar="KEY=VALUE",
      help="model constructor argument, e.g. width=16 (heatmap_cnn) or batch_norm=true (csrnet); repeatable")
    a("--pretrained", help="csrnet frontend weights: imagenet (default), none, or a .pth path")
    a("--init", metavar="CHECKPOINT", help="fine-tune: start from the weights of this checkpoint (a "
      "run's best.pt or a shipped model; same --model, --model-arg and --scale)")
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
    a("--density-sigma", type=float, help="sigma in pixels of the original image: required with --density-method "
      "fixed (CSRNet used 15 for Part B); with adaptive, the sigma of a lone head (default 4)")
    a("--optimizer", choices=list(OPTIMIZERS), help="adam (default) or sgd")
    a("--lr", type=float, help="learning rate (default: 1e-3 heatmap_cnn / 1e-5 csrnet with adam, 1e-7 sgd)")
    a("--momentum", type=float, help="SGD momentum (default 0.95)")
    a("--weight-decay", type=float, help="weight decay (default 0 adam, 5e-4 sgd)")
    a("--scheduler", choices=list(SCHEDULERS), help="cosine (default), plateau or none")
    a("--warmup-epochs", type=float, help="cosine warm-up length in epochs (default 1)")
    a("--min-lr-ratio", type=float, metavar="R",
      help="cosine: the final learning rate is R x --lr (default 0.01)")
    a("--plateau-factor", type=float, metavar="F",
      help="plateau: multiply the learning rate by F when validation stalls (default 0.5)")
    a("--plateau-patience", type=int, metavar="N",
      help="plateau: after N epochs without a better validation MAE (default 5)")
    a("--scale", type=float, help="density scale factor for the loss (default 100)")
    a("--loss", choices=list(LOSSES), help="mse on Gaussian density maps (default), or a loss on the head "
      "points: bayesian (Ma et al. 2019, Bayesian+) or dm_count (Wang et al. 2020)")
    a("--reduction", choices=list(REDUCTIONS), help="mse: averaged over pixels (mean, default) or summed (sum)")
    a("--loss-arg", action="append", type=key_value_arg, metavar="KEY=VALUE",
      help="point-loss setting, e.g. sigma=4 or background=0.5 (bayesian), eps=2.5 (dm_count); repeatable")
    a("--count-loss-weight", type=float, help="weight of the squared count error term (default 0)")
    a("--grad-clip", type=float, help="max gradient norm, 0 = off (default 10)")
    a("--ema-decay", type=float, help="validate and keep an average of the weights, e.g. 0.99; 0 = off (default)")
    a("--bn-recalibrate", type=int, metavar="N",
      help="recompute BatchNorm statistics on N whole fit images before each validation; 0 = off (default)")
    a("--count-calibration", dest="count_calibration", action="store_const", const=True,
      help="also fit one count gain on those N fit images (true / predicted people); validation and "
      "best.pt use it (default off)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--patience", type=int, help="early stopping after N epochs without improvement, 0 = off")
    a("--val-every", type=int, help="validate every N epochs (default 1)")
    a("--max-fit", type=int, help="use at most N training images (quick mode: 16)")
    a("--max-val", type=int, help="use at most N validation images (quick mode: 6)")
    a("--max-minutes", type=float, help="wall-clock budget of this call in minutes: stop cleanly "
      "(validate, keep the best, write a resumable last.pt) when it is used (default: no limit)")
    a("--out", help="run folder (default runs/<model>_part<part>)")
    a("--resume", action="store_const", const=True, help="continue the run in --out from last.pt")
    a("--checkpoint-every", type=int, help="also write last.pt every N steps, 0 = epoch ends only (default 100)")
    a("--device", help="cpu, cuda, cuda:1, mps (default: automatic)")
    a("--workers", type=int, help="data-loading processes (default: automatic)")
    a("--cache-in-memory", action="store_const", const=True, help="keep decoded images and densities in RAM")
    a("--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA")
    a("--no-channels-last", dest="channels_last", action="store_const", const=False,
      help="keep the default memory format on CUDA")
    a("--deterministic", action="store_const", const=True, help="deterministic CUDA kernels (slower)")
    a("--json", action="store_true", help="print the result as one JSON line at the end")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crowd train")
    add_arguments(parser)
    return parser


def config_to_argv(config: TrainConfig) -> list[str]:
    """The ``crowd train`` arguments that give ``config`` (only the settings that differ from
    the defaults). ``config_from_args`` of the parsed arguments equals ``config``."""
    defaults, values = TrainConfig().to_dict(), config.to_dict()
    argv: list[str] = []
    for action in _parser()._actions:
        name = action.dest
        if name not in values or values[name] == defaults[name] or not action.option_strings:
            continue
        value, flag = values[name], action.option_strings[0]
        if action.const is not None:  # a switch: it can only set its constant
            if value != action.const:
                raise CrowdError(f"{name}={value!r} has no crowd train option (only {flag}).")
            argv.append(flag)
        elif value is None:
            raise CrowdError(f"{name}=None has no crowd train option; leave it at its default.")
        else:
            argv += [flag, *(map(repr, value) if isinstance(value, list) else [_arg_text(value)])]
    for key, value in values["loss_kwargs"].items():
        argv += ["--loss-arg", f"{key}={_arg_text(value, as_json=True)}"]
    for key, value in values["model_kwargs"].items():
        if key == "pretrained" and (value is None or isinstance(value, str)):
            argv += ["--pretrained", "none" if value is None else value]
        else:
            argv += ["--model-arg", f"{key}={_arg_text(value, as_json=True)}"]
    return argv


def _arg_text(value: Any, as_json: bool = False) -> str:
    """``value`` as a command-line word that reads back as the same value."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if not as_json:
            return value
        try:  # strings that read as JSON (numbers, true, null) must be quoted
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value) if as_json else str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge command-line options over the defaults (or, with --resume, over the stored run)."""
    from helpers.tools.checkpoints import load_checkpoint

    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("model_arg", "loss_arg", "pretrained", "json")}
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
    same_loss = "loss" not in given or str(given["loss"]).lower() == str(base.loss).lower()
    values["loss_kwargs"] = {**(base.loss_kwargs if same_loss else {}), **dict(getattr(args, "loss_arg", None) or [])}
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """``crowd train``: train with the parsed options; with --json, one JSON line at the end."""
    result = train(config_from_args(args))
    if args.json and (not _launched_distributed() or os.environ.get("RANK") == "0"):
        print(json.dumps({"out": str(result.out), "best": str(result.best), "last": str(result.last),
                          "best_val_mae": result.best_val_mae, "best_epoch": result.best_epoch,
                          "epochs": len(result.history), "stopped_early": result.stopped_early,
                          "stop_reason": result.stop_reason}))
    return 0
