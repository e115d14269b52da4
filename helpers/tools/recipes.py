"""Recommended training settings for each model and ShanghaiTech part, full and quick.

::

    from helpers.tools.recipes import recommended_config
    from helpers.tools.trainer import train

    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B")             # full or quick by CROWD_QUICK
    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B", epochs=10)   # any TrainConfig field
    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B_bayes", loss="bayesian")  # point loss
    result = train(cfg)

Full mode is tuned for a small CPU (2 cores, no GPU) and a budget of tens of minutes; CSRNet also
has a CUDA recipe (:data:`GPU`: full resolution, sized to a Colab session), chosen when the device
is a CUDA GPU (:func:`choose_recipe`). Quick mode (``CROWD_QUICK=1``) is a smoke run of one to two
minutes on the same code path. Why each setting was chosen is in docs/training.md ("Recipes").
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers import config as settings
from helpers.errors import CrowdError

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import light
    from helpers.tools.trainer import TrainConfig

#: Full-mode settings per (model, part). Keys are :class:`helpers.tools.trainer.TrainConfig` fields.
FULL: dict[tuple[str, str], dict[str, Any]] = {
    ("heatmap_cnn", "B"): {
        "model_kwargs": {"width": 16, "init_output": 3.0},
        "resize": 0.5, "crop": 384, "batch_size": 4, "epochs": 20, "lr": 1e-3, "warmup_epochs": 1.0,
        "scheduler": "cosine", "rescale": [0.8, 1.2], "flip": True, "grad_clip": 10.0,
        "count_loss_weight": 0.01, "cache_in_memory": True, "workers": 1,
        "ema_decay": 0.995, "bn_recalibrate": 64,  # count_calibration: worse on Part B's validation
    },
    ("heatmap_cnn", "A"): {
        "model_kwargs": {"width": 16, "init_output": 10.0},
        "resize": 0.5, "crop": 256, "batch_size": 8, "epochs": 30, "lr": 1e-3, "warmup_epochs": 1.0,
        "scheduler": "cosine", "rescale": [0.8, 1.2], "flip": True, "grad_clip": 10.0,
        "count_loss_weight": 0.01, "cache_in_memory": True, "workers": 1,
        "ema_decay": 0.995, "bn_recalibrate": 64, "count_calibration": True,
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

#: CUDA recipes (a Colab T4 or better): CSRNet as the C^3 Framework reproduction trains it (Adam 1e-5,
#: weight decay 1e-4, targets x100, pixel-mean MSE, full resolution, ImageNet weights), on a cosine
#: schedule sized to one Colab session, with AMP and a time budget per call (resume on the next
#: session). Expected numbers: published, unmeasured here (docs/training.md, "CSRNet on a GPU").
GPU: dict[tuple[str, str], dict[str, Any]] = {
    ("csrnet", "B"): {
        "model_kwargs": {"pretrained": "imagenet"}, "resize": 1.0, "crop": 512, "batch_size": 4,
        "epochs": 100, "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-4, "scale": 100.0,
        "reduction": "mean", "scheduler": "cosine", "warmup_epochs": 1.0, "flip": True, "rescale": None,
        "grad_clip": 10.0, "amp": True, "cache_in_memory": True, "max_minutes": 150.0,
    },
    ("csrnet", "A"): {
        "model_kwargs": {"pretrained": "imagenet"}, "resize": 1.0, "crop": 384, "batch_size": 4,
        "epochs": 200, "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-4, "scale": 100.0,
        "reduction": "mean", "scheduler": "cosine", "warmup_epochs": 1.0, "flip": True, "rescale": None,
        "grad_clip": 10.0, "amp": True, "cache_in_memory": True, "max_minutes": 150.0,
    },
}  # fmt: skip
RECIPE_KINDS = ("cpu", "gpu")

#: Quick-mode changes applied over the full settings (sizes and iteration counts only).
QUICK: dict[str, dict[str, Any]] = {
    # 256 steps on 16 images at quarter resolution (init_output x 4: a cell covers 4x the area),
    # a short weight average and validation every 8 epochs: it learns in about 1.5 minutes on 2 CPUs.
    "heatmap_cnn": {"max_fit": 16, "max_val": 12, "epochs": 64, "val_every": 8, "resize": 0.25,
                    "crop": 192, "batch_size": 4, "model_kwargs": {"width": 16, "init_output": 12.0},
                    "ema_decay": 0.95, "bn_recalibrate": 16, "warmup_epochs": 1.0, "checkpoint_every": 0},
    "csrnet": {"max_fit": 8, "max_val": 3, "epochs": 3, "crop": 128, "batch_size": 2,
               "warmup_epochs": 0.5, "checkpoint_every": 0},
}  # fmt: skip


#: The point losses' length settings as the papers use them at full resolution (input pixels):
#: the Bayesian likelihood's sigma (px) and DM-Count's Sinkhorn eps (px^2). Heads shrink with
#: ``resize``, so :func:`point_loss_kwargs` scales them: sigma x resize, eps x resize^2.
POINT_LOSS_FULL_RES = {"bayesian": {"sigma": 8.0}, "dm_count": {"eps": 10.0}}


def point_loss_kwargs(loss: str, resize: float) -> dict[str, float]:
    """The recipe's ``loss_kwargs`` for ``loss`` at ``resize`` (empty for ``mse``)."""
    power = {"sigma": 1, "eps": 2}
    return {k: v * float(resize) ** power[k] for k, v in POINT_LOSS_FULL_RES.get(loss, {}).items()}


def _norm_model(model: str) -> str:
    return str(model).strip().lower().replace("-", "_")


def _norm_part(part: str) -> str:
    return str(part).strip().upper().removeprefix("PART_")


def choose_recipe(model: str, device: str | None = None) -> tuple[str, str]:
    """Which recipe trains ``model`` here: ``("gpu", reason)`` or ``("cpu", reason)``.

    The GPU recipe when ``model`` has one (:data:`GPU`) and the device is CUDA
    (:func:`helpers.config.pick_device` of ``device``: CROWD_DEVICE, else automatic); the CPU
    recipe otherwise. ``reason`` says why, e.g. ``"CUDA found"`` or ``"no GPU"``.
    """
    found = settings.pick_device(device)
    has_gpu_recipe = any(m == _norm_model(model) for m, _ in GPU)
    if found.type == "cuda":
        if has_gpu_recipe:
            return "gpu", "CUDA found"
        return "cpu", f"CUDA found, but {_norm_model(model)} has only the CPU recipe"
    return "cpu", "no GPU" if found.type == "cpu" else f"{found.type} device, not CUDA"


def _check_kind(kind: str) -> str:
    kind = str(kind).strip().lower()
    if kind not in RECIPE_KINDS:
        raise CrowdError(f"recipe kind must be cpu or gpu, not {kind!r}")
    return kind


def recipe_settings(model: str, part: str, quick: bool | None = None, kind: str = "cpu") -> dict[str, Any]:
    """The recipe's TrainConfig fields (a fresh dict) for ``model`` on ``part``.

    ``kind``: ``"cpu"`` (:data:`FULL`) or ``"gpu"`` (:data:`GPU`, CUDA); quick mode shrinks
    either with :data:`QUICK`.
    """
    key, table = (_norm_model(model), _norm_part(part)), GPU if _check_kind(kind) == "gpu" else FULL
    if key not in table:
        models = sorted({m for m, _ in table})
        raise CrowdError(
            f"No recipe for model {model!r} on part {part!r} ({kind.lower()} recipes: models "
            f"{', '.join(models)}, parts A and B)."
        )
    values = copy.deepcopy(table[key])
    if settings.quick_mode() if quick is None else quick:
        values.update(copy.deepcopy(QUICK[key[0]]))
    return values


def recommended_config(model: str, part: str, out: str | Path, *, quick: bool | None = None,
                       kind: str | None = None, **overrides: Any) -> TrainConfig:
    """The recommended :class:`helpers.tools.trainer.TrainConfig` for ``model`` on ShanghaiTech ``part``.

    ``out`` is the run folder. ``quick`` (None: ``CROWD_QUICK``) gives the smoke-run version.
    ``kind`` ``"gpu"`` or ``"cpu"`` picks the recipe; None chooses by device
    (:func:`choose_recipe` of ``overrides["device"]``, else automatic: the GPU recipe on CUDA).
    ``overrides`` set any other TrainConfig field (``epochs=10``, ``max_minutes=5``,
    ``resume=True``, ``device="cpu"``, ...); an unknown name raises :class:`CrowdError`. With
    ``loss="bayesian"`` or ``"dm_count"`` (learning from the head points) and no ``loss_kwargs``,
    the loss's lengths are the papers' scaled to the recipe's resolution (:func:`point_loss_kwargs`).
    Mixed precision (``amp``) only takes effect on CUDA: the trainer runs float32 elsewhere.
    """
    from helpers.tools.trainer import TrainConfig

    if kind is None:
        kind = choose_recipe(model, overrides.get("device"))[0]
    values = recipe_settings(model, part, quick, kind)
    values.update(model=_norm_model(model), part=_norm_part(part), out=str(Path(out).expanduser()))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise CrowdError(
            f"recommended_config got unknown setting(s) {', '.join(unknown)}; valid names are the "
            "fields of helpers.tools.trainer.TrainConfig."
        )
    values.update(overrides)
    if "loss_kwargs" not in overrides:
        values["loss_kwargs"] = point_loss_kwargs(str(values.get("loss", "mse")).lower().replace("-", "_"),
                                                  values.get("resize", 1.0))
    return TrainConfig(**values)


def run_name(model: str, part: str, source=None, *, quick: bool | None = None, tag: str = "",
             kind: str | None = None) -> str:
    """The name of a run folder: ``<model>_<part>[_<tag>][_gpu][_synthetic][_quick]``.

    The data (``_synthetic`` when ``source``, a :class:`helpers.data.DataSource`, is the synthetic
    set; default: :func:`helpers.data.resolve_data_source`), the recipe (``_gpu`` for the GPU
    recipe; ``kind`` None: :func:`choose_recipe`) and the mode (``_quick`` when ``quick``, default
    ``CROWD_QUICK``) are part of the name, so runs with other settings never share a folder (the
    trainer refuses to resume a run with other settings).
    """
    if source is None:
        from helpers.data import resolve_data_source

        source = resolve_data_source()
    model, part = _norm_model(model), _norm_part(part)
    if part not in ("A", "B"):
        raise CrowdError(f"part must be A or B, got {part!r}")
    tag = str(tag).strip().strip("_")
    quick = settings.quick_mode() if quick is None else bool(quick)
    gpu = _check_kind(kind if kind is not None else choose_recipe(model)[0]) == "gpu"
    return "_".join([model, part] + ([tag] if tag else []) + (["gpu"] if gpu else [])
                    + (["synthetic"] if source.synthetic else []) + (["quick"] if quick else []))


def run_folder(model: str, part: str, source=None, *, quick: bool | None = None, tag: str = "",
               root: str | Path | None = None, kind: str | None = None) -> Path:
    """The run folder of ``model`` on ``part``: ``runs/`` + :func:`run_name` (``runs/heatmap_cnn_B_quick``).

    The one place the notebooks name their runs. ``root``: the runs folder (default
    :func:`helpers.config.runs_root`); ``kind``: the recipe (None: :func:`choose_recipe`).
    """
    base = Path(root).expanduser() if root is not None else settings.runs_root()
    return base / run_name(model, part, source, quick=quick, tag=tag, kind=kind)


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
