"""Recommended training settings for each model and ShanghaiTech part, full and quick.

::

    from helpers.tools.recipes import recommended_config
    from helpers.train import train

    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B")             # full or quick by CROWD_QUICK
    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B", epochs=10)   # any TrainConfig field
    result = train(cfg)

Full mode is tuned for a small CPU (2 cores, no GPU) and a budget of tens of minutes; on a GPU
the same settings train faster, and more epochs help. Quick mode (``CROWD_QUICK=1``) is a smoke
run of about one to two minutes on such a CPU, validation included: a handful of images, small
crops, a few epochs. It shows that the loop runs and the loss falls, not a useful model.

Why these settings (HeatmapCNN)
-------------------------------
* **A narrow network** (``width=16``, 0.13 M parameters, about MCNN's size): on a CPU the
  compute per image grows as ``width**2``, so width 16 trains about 4x more images per minute
  than the default 32. With a fixed time budget, more epochs of a small model beat a few of a
  larger one.
* **A starting output near the mean density** (``init_output``, in ``scale x`` people per
  output cell): Part B at half resolution has about 125 people on 48 x 64 cells, i.e. 4 per
  cell after the x100 scale; starting at 3 (Part A, denser: 10) skips the slow first hundreds of
  steps in which the network only raises its overall level.
* **Half resolution** (``resize=0.5``): 4x fewer pixels per image, so 4x more images per second;
  Part B heads stay 5-20 pixels wide, still enough for a stride-8 output.
* **In-memory cache** of the decoded, resized images and densities (0.5 GB for Part B at half
  resolution) and **one loader worker** that crops and augments while the main process trains:
  after the first epoch no JPEG is decoded and no HDF5 file is read again.
* **Large crops**: on Part B, batches of 4 crops of 384 x 384 (the full height of a
  half-resolution image, 3/4 of its width): batch-norm statistics of such windows resemble those
  of the whole images the model is evaluated on. In 25-minute runs they reached a lower
  validation MAE than batches of 8 crops of 256 x 256 (26.9 against 29.7), for the same pixels
  per step. Part A images are smaller, so its crops stay at 256.
* **Adam, a one-epoch linear warm-up and a cosine decay** from ``lr=1e-3``, gradient clipping
  at norm 10. The validation curve is noisy while the learning rate is high and settles as it
  decays: keep the whole cosine schedule inside a time budget (:func:`epochs_for_budget`).
* **Flips and mild rescaling** (0.8-1.2) as augmentation, and a small **count term** in the loss
  (``count_loss_weight=0.01``, in people^2 per crop).
* **Weight averaging** (``ema_decay=0.995``): validation and ``best.pt`` use an exponential moving
  average of the weights over the last ~200 steps, which smooths the noisy validation curve of a
  high learning rate.
* **BatchNorm statistics recomputed on whole images** before every validation
  (``bn_recalibrate=64`` fit images, :mod:`helpers.train`). A count sums thousands of output
  cells, so it is very sensitive to the BatchNorm statistics: the running averages (of training
  crops, and averaged along with the weights) made whole images come out ~20 people too high.
  In 25-minute Part B runs (``benchmarks/accuracy.py --fit-epochs``, test MAE, 316 images):
  29.5 without either, 28.3 with weight averaging alone, 21.1 and 21.5 with both (two runs;
  bias -3.8 and -2.7).
* **Tried and not kept** (same 25-minute Part B runs, judged by validation MAE; test MAE in
  parentheses): crops of 256 x 256 in batches of 8 with the whole-image BatchNorm statistics,
  validation 31.1 against 18.2 (test 29.0, whole images undercounted by 25 people); stronger
  rescaling 0.6-1.5, validation 20.1 (test 23.6, bias -12); freezing BatchNorm for the last
  third of training, validation 45-50; a learning rate of 3e-4, slower. In every run the
  validation MAE is lowest about 60% into the cosine schedule and rises afterwards (by 3 to 12
  people) while the training loss still falls; ``best.pt`` keeps the low point. In the run
  checked, the rise is mostly a growing undercount of whole images (validation bias -1.5 at the
  best epoch, -16.5 at the last; spread of the errors 35.6 and 40.1). What to do about it is an
  exercise of notebook 03.

The Part B settings were chosen by validation MAE in 25-minute runs on a shared 2-core CPU
(``benchmarks/accuracy.py``); Part A uses the same choices with a larger ``init_output``,
untested at that length.

Speed on a shared CPU: with more runnable processes than cores, ``torch.set_num_threads(1)``
(or ``OMP_NUM_THREADS=1``) was about 4x faster per training step than torch's default of one
thread per core, because the threads of one step wait for each other.

CSRNet
------
The VGG16 frontend is large (about 16 M parameters, ~30x the compute of HeatmapCNN), so the
recipe trains at half resolution with small batches; with ImageNet weights the default Adam
learning rate 1e-5 of :data:`helpers.train.DEFAULT_LR` is used.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers import config as settings
from helpers.errors import CrowdError

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    from helpers.train import TrainConfig

#: Full-mode settings per (model, part). Keys are :class:`helpers.train.TrainConfig` fields.
FULL: dict[tuple[str, str], dict[str, Any]] = {
    ("heatmap_cnn", "B"): {
        "model_kwargs": {"width": 16, "init_output": 3.0},
        "resize": 0.5, "crop": 384, "batch_size": 4, "epochs": 20, "lr": 1e-3, "warmup_epochs": 1.0,
        "scheduler": "cosine", "rescale": [0.8, 1.2], "flip": True, "grad_clip": 10.0,
        "count_loss_weight": 0.01, "cache_in_memory": True, "workers": 1,
        "ema_decay": 0.995, "bn_recalibrate": 64,
    },
    ("heatmap_cnn", "A"): {
        "model_kwargs": {"width": 16, "init_output": 10.0},
        "resize": 0.5, "crop": 256, "batch_size": 8, "epochs": 30, "lr": 1e-3, "warmup_epochs": 1.0,
        "scheduler": "cosine", "rescale": [0.8, 1.2], "flip": True, "grad_clip": 10.0,
        "count_loss_weight": 0.01, "cache_in_memory": True, "workers": 1,
        "ema_decay": 0.995, "bn_recalibrate": 64,
    },
    ("csrnet", "B"): {
        "resize": 0.5, "crop": 256, "batch_size": 4, "epochs": 30, "warmup_epochs": 1.0,
        "scheduler": "cosine", "rescale": [0.8, 1.2], "flip": True, "grad_clip": 10.0,
        "cache_in_memory": True, "workers": 0,
    },
    ("csrnet", "A"): {
        "resize": 0.5, "crop": 256, "batch_size": 4, "epochs": 40, "warmup_epochs": 1.0,
        "scheduler": "cosine", "rescale": [0.8, 1.2], "flip": True, "grad_clip": 10.0,
        "cache_in_memory": True, "workers": 0,
    },
}  # fmt: skip

#: Quick-mode changes applied over the full settings (sizes and iteration counts only).
QUICK: dict[str, dict[str, Any]] = {
    "heatmap_cnn": {"max_fit": 16, "max_val": 6, "epochs": 8, "crop": 192, "batch_size": 4,
                    "warmup_epochs": 1.0, "checkpoint_every": 0},
    "csrnet": {"max_fit": 8, "max_val": 3, "epochs": 3, "crop": 128, "batch_size": 2,
               "warmup_epochs": 0.5, "checkpoint_every": 0},
}  # fmt: skip


def _norm_model(model: str) -> str:
    return str(model).strip().lower().replace("-", "_")


def _norm_part(part: str) -> str:
    return str(part).strip().upper().removeprefix("PART_")


def recipe_settings(model: str, part: str, quick: bool | None = None) -> dict[str, Any]:
    """The recipe's TrainConfig fields (a fresh dict) for ``model`` on ``part``."""
    key = (_norm_model(model), _norm_part(part))
    if key not in FULL:
        models = sorted({m for m, _ in FULL})
        raise CrowdError(
            f"No recipe for model {model!r} on part {part!r}: models are {', '.join(models)}, parts A and B."
        )
    values = copy.deepcopy(FULL[key])
    if settings.quick_mode() if quick is None else quick:
        values.update(copy.deepcopy(QUICK[key[0]]))
    return values


def recommended_config(model: str, part: str, out: str | Path, *, quick: bool | None = None,
                       **overrides: Any) -> TrainConfig:
    """The recommended :class:`helpers.train.TrainConfig` for ``model`` on ShanghaiTech ``part``.

    ``out`` is the run folder. ``quick`` (None: ``CROWD_QUICK``) gives the smoke-run version.
    ``overrides`` set any other TrainConfig field (``epochs=10``, ``max_minutes=5``,
    ``resume=True``, ...); an unknown name raises :class:`CrowdError`.
    """
    from helpers.train import TrainConfig

    values = recipe_settings(model, part, quick)
    values.update(model=_norm_model(model), part=_norm_part(part), out=str(Path(out).expanduser()))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise CrowdError(
            f"recommended_config got unknown setting(s) {', '.join(unknown)}; valid names are the "
            "fields of helpers.train.TrainConfig."
        )
    values.update(overrides)
    return TrainConfig(**values)


def epochs_for_budget(n_images: int, batch_size: int, minutes: float, steps_per_second: float,
                      val_seconds: float = 0.0, setup_seconds: float = 0.0) -> int:
    """How many epochs of ``n_images`` fit in ``minutes`` at a measured training speed.

    ``steps_per_second``: optimiser steps per second (batches of ``batch_size``); ``val_seconds``:
    the time of one validation pass; ``setup_seconds``: one-off time before the first step
    (loading, caching). At least 1. Use it to set ``epochs`` so that a cosine schedule has
    decayed when a ``max_minutes`` budget runs out.
    """
    if n_images < 1 or batch_size < 1 or minutes <= 0 or steps_per_second <= 0:
        raise CrowdError(
            f"epochs_for_budget needs positive sizes, minutes and speed, got n_images={n_images}, "
            f"batch_size={batch_size}, minutes={minutes}, steps_per_second={steps_per_second}"
        )
    steps = -(-int(n_images) // int(batch_size))
    epoch_seconds = steps / float(steps_per_second) + float(val_seconds)
    return max(1, int((60.0 * minutes - float(setup_seconds)) // epoch_seconds))
