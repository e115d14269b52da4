"""Recommended training settings for each model and ShanghaiTech part, full and quick.

::

    from helpers.tools.recipes import recommended_config
    from helpers.tools.trainer import train

    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B")             # full or quick by CROWD_QUICK
    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B", epochs=10)   # any TrainConfig field
    cfg = recommended_config("heatmap_cnn", "B", "runs/hm_B_bayes", loss="bayesian")  # point loss
    result = train(cfg)

Full mode is tuned for a small CPU (2 cores, no GPU) and a budget of tens of minutes; quick mode
(``CROWD_QUICK=1``) is a smoke run of one to two minutes. Why each setting was chosen, with the
validation numbers behind it, is in docs/training.md ("Recipes").
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
    """The recommended :class:`helpers.tools.trainer.TrainConfig` for ``model`` on ShanghaiTech ``part``.

    ``out`` is the run folder. ``quick`` (None: ``CROWD_QUICK``) gives the smoke-run version.
    ``overrides`` set any other TrainConfig field (``epochs=10``, ``max_minutes=5``,
    ``resume=True``, ...); an unknown name raises :class:`CrowdError`. With ``loss="bayesian"`` or
    ``"dm_count"`` (learning from the head points) and no ``loss_kwargs``, the loss's lengths are
    the papers' scaled to the recipe's resolution (:func:`point_loss_kwargs`).
    """
    from helpers.tools.trainer import TrainConfig

    values = recipe_settings(model, part, quick)
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


def run_name(model: str, part: str, source=None, *, quick: bool | None = None, tag: str = "") -> str:
    """The name of a run folder: ``<model>_<part>[_<tag>][_synthetic][_quick]``.

    The data (``_synthetic`` when ``source``, a :class:`helpers.data.DataSource`, is the synthetic
    set; default: :func:`helpers.data.resolve_data_source`) and the mode (``_quick`` when
    ``quick``, default ``CROWD_QUICK``) are part of the name, so a quick run, a full run and a run
    on other data never share a folder (the trainer refuses to resume a run with other settings).
    """
    if source is None:
        from helpers.data import resolve_data_source

        source = resolve_data_source()
    model, part = _norm_model(model), _norm_part(part)
    if part not in ("A", "B"):
        raise CrowdError(f"part must be A or B, got {part!r}")
    tag = str(tag).strip().strip("_")
    quick = settings.quick_mode() if quick is None else bool(quick)
    return "_".join([model, part] + ([tag] if tag else []) + (["synthetic"] if source.synthetic else [])
                    + (["quick"] if quick else []))


def run_folder(model: str, part: str, source=None, *, quick: bool | None = None, tag: str = "",
               root: str | Path | None = None) -> Path:
    """The run folder of ``model`` on ``part``: ``runs/`` + :func:`run_name` (``runs/heatmap_cnn_B_quick``).

    The one place the notebooks name their runs. ``root``: the runs folder (default
    :func:`helpers.config.runs_root`).
    """
    base = Path(root).expanduser() if root is not None else settings.runs_root()
    return base / run_name(model, part, source, quick=quick, tag=tag)


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
