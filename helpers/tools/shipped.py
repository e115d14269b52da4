"""The trained HeatmapCNN models shipped with the project, one per ShanghaiTech part.

A student without a GPU, or who opens notebook 06 first, still has a model that counts well:
``helpers/tools/shipped_models/heatmap_cnn_<PART>.pt`` (package data, so it is found in an
installed package as in a checkout), written by ``benchmarks/package_model.py`` from a run of
``benchmarks/accuracy.py``. Beside them, ``manifest.json`` records for each file its sha256, the
exact training command, the dataset checksum, seed, time, machine and validation / test errors,
and ``MODEL_CARD.md`` says what the models are for and where they stop working.

:func:`shipped_checkpoint` gives a file's path, :func:`read_manifest` / :func:`manifest_entry`
the record, and :func:`shipped_run` a :class:`helpers.tools.runs.RunInfo` with ``shipped=True``
that :func:`helpers.tools.runs.models_to_show` lists beside (never instead of, unannounced) the
student's own runs. Each file is checksum-verified when loaded, like every checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from helpers.errors import CheckpointError, CrowdError
from helpers.tools.checkpoints import CheckpointDamagedError

#: The folder of the shipped models (inside the package).
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_models"
#: The manifest beside them: ``{"format": 1, "models": {"A": {...}, "B": {...}}}``.
MANIFEST_NAME = "manifest.json"
#: The model card generated from the manifest.
MODEL_CARD_NAME = "MODEL_CARD.md"
#: The model every shipped checkpoint holds.
SHIPPED_MODEL = "heatmap_cnn"


def _part(part: str) -> str:
    value = str(part).strip().upper().removeprefix("PART_")
    if value not in ("A", "B"):
        raise CrowdError(f"ShanghaiTech part must be A or B, got {part!r}.")
    return value


def shipped_filename(part: str) -> str:
    """``heatmap_cnn_<PART>.pt``: the file name of the shipped model of ``part``."""
    return f"{SHIPPED_MODEL}_{_part(part)}.pt"


def read_manifest(folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The manifest of the shipped models (``{"format": 1, "models": {PART: entry}}``).

    ``folder`` defaults to :data:`SHIPPED_DIR`; a missing manifest gives no models. Raises
    :class:`CrowdError` for a manifest that is not valid JSON of that shape.
    """
    path = Path(folder if folder is not None else SHIPPED_DIR) / MANIFEST_NAME
    if not path.is_file():
        return {"format": 1, "models": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CrowdError(f"{path} is not readable JSON ({exc}); restore it (git checkout) or "
                         "package the models again (benchmarks/package_model.py).") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise CrowdError(f"{path} has no 'models' object; restore it (git checkout) or package the "
                         "models again (benchmarks/package_model.py).")
    return manifest


def manifest_entry(part: str, folder: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The manifest's record of the shipped model of ``part``, or None when there is none."""
    entry = read_manifest(folder)["models"].get(_part(part))
    return entry if isinstance(entry, dict) else None


def shipped_checkpoint(part: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """The path of the shipped HeatmapCNN of ``part`` (``"A"`` or ``"B"``).

    Raises :class:`CheckpointError` when the project ships no model for that part (or its file
    is missing).
    """
    base = Path(folder if folder is not None else SHIPPED_DIR)
    entry = manifest_entry(part, base)
    path = base / (entry.get("file") if entry and entry.get("file") else shipped_filename(part))
    if entry is None or not path.is_file():
        raise CheckpointError(
            f"No shipped model for part {_part(part)} ({path} or its manifest entry is missing). "
            "Train one (notebook 03, or crowd train --part ...), or restore the shipped_models "
            "folder (git checkout, or reinstall the package)."
        )
    return path


def shipped_run(part: str, folder: str | os.PathLike[str] | None = None):
    """A :class:`helpers.tools.runs.RunInfo` (``shipped=True``) for the shipped model of ``part``.

    Its scores, epochs and settings come from the manifest and the checkpoint (which is read
    and checksum-verified: a damaged file gives a RunInfo with ``error`` and ``damaged`` set).
    None when the project ships no model for the part.
    """
    from helpers.tools import runs

    try:
        path = shipped_checkpoint(part, folder)
    except CheckpointError:
        return None
    entry = manifest_entry(part, folder) or {}
    error, damaged, meta = None, False, {}
    try:
        meta = runs.read_checkpoint_meta(path)
    except CheckpointError as exc:
        error, damaged = str(exc), isinstance(exc, CheckpointDamagedError)
    cfg = dict(meta.get("config") or entry.get("config") or {})
    val = (entry.get("val") or {}).get("mae", meta.get("best_val_mae"))
    return runs.RunInfo(
        name=f"shipped/{path.stem}", path=path, model=str(meta.get("model_name", SHIPPED_MODEL)),
        part=_part(part), data=runs.SHANGHAITECH, data_root=None,
        best_val_mae=None if val is None else float(val), best_epoch=meta.get("epoch"),
        epochs=int(entry.get("epochs") or meta.get("epoch") or 0),
        input_scale=float(cfg.get("resize", 1.0) or 1.0), max_fit=cfg.get("max_fit"),
        max_val=cfg.get("max_val"), config=cfg, error=error, damaged=damaged, shipped=True,
    )
