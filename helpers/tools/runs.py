"""Finding trained models, making sure one exists, and saying how far to trust it.

A *run* is a folder written by :mod:`helpers.tools.trainer` (``config.json``, ``history.csv``,
``last.pt``, ``best.pt``). :func:`find_runs` lists every ``runs/<name>/best.pt`` (and one level
deeper, ``runs/<group>/<name>/best.pt``) as a :class:`RunInfo`, best validation MAE first;
:func:`describe_run` turns one into a paragraph for a student: which model, trained on what,
how accurate to expect. :func:`models_to_show` gives the models a notebook shows for a part:
the student's own runs, and the model shipped with the project (:mod:`helpers.tools.shipped`)
when the student has no run of that part, or only quick demo runs; only when neither exists does
:func:`ensure_checkpoint` train a small demo model first, so that a notebook that needs a trained
model also works from a fresh kernel in a fresh project.

What a run was trained on comes from ``config.json`` (model, part, image scale, subset sizes) and
``history.csv`` (epochs, validation errors). Every ``best.pt`` is read once per version and its
checksum verified (:func:`helpers.tools.checkpoints.load_checkpoint`): a damaged one is listed
with ``damaged`` set and never chosen. The checkpoint also gives what those files do not say: the
dataset folder, or the best score when ``best.pt`` is newer than the history (a run stopped by
its time budget).

Also here, for counting your own photos: :func:`save_upload` and :func:`clear_upload` (an
``ipywidgets.FileUpload``, versions 7 and 8, to a file; emptied), :func:`colab_upload` (Colab's
upload dialog, for large photos), :func:`heads_at_threshold`, :func:`peak_counts`,
:func:`threshold_grid` and :func:`threshold_for_count` (head points of a
:class:`helpers.predict.Prediction` at any threshold, without running the model again), and
:func:`runs_markdown` (a table of runs).

Command line::

    crowd runs [--root DIR] [--json]         # list the runs, best first
    crowd runs ensure [--model M] [--part P]  # print a checkpoint path, training if needed
    crowd runs shipped [--json]               # the models shipped with the project
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers import config as settings
from helpers.errors import CheckpointError, CrowdError
from helpers.tools.checkpoints import CheckpointDamagedError, load_checkpoint
from helpers.tools.fileio import file_lock

#: How :func:`data_kind` names the dataset a run was trained on.
SYNTHETIC, SHANGHAITECH, UNKNOWN = "synthetic", "ShanghaiTech", "unknown"
#: A run that trained on at most this many images is a demo: good for trying the pipeline, not
#: for trusting its counts (the quick recipes use 8 to 16).
DEMO_MAX_FIT = 64
#: Display names of the models.
MODEL_TITLES = {"heatmap_cnn": "HeatmapCNN", "csrnet": "CSRNet"}
#: What the images of each part show, by dataset kind.
PART_SCENES = {SHANGHAITECH: {"A": "dense crowds from the internet", "B": "street scenes in Shanghai"},
               SYNTHETIC: {"A": "dense drawn crowds", "B": "sparse drawn crowds"}}


# --------------------------------------------------------------------------- run information


@dataclass(frozen=True)
class RunInfo:
    """What is known about one trained checkpoint (``path``, a ``best.pt``) and its run folder.

    * ``name``: the run folder relative to the runs root (``heatmap_cnn_B``), or the folder's
      own name for a checkpoint elsewhere.
    * ``model`` (``heatmap_cnn`` / ``csrnet``), ``part`` (``A`` / ``B``), ``data``
      (``ShanghaiTech``, ``synthetic`` or ``unknown``, see :func:`data_kind`), ``data_root``.
    * ``best_val_mae``: people per image on the validation images (None if never validated);
      ``best_epoch``: the epoch it was reached at; ``epochs``: epochs completed (history rows).
    * ``input_scale``: images are resized by this factor before inference (``resize``).
    * ``max_fit`` / ``max_val``: the caps on training / validation images (None: all).
    * ``error``: why the checkpoint could not be read (the other fields are then partial);
      ``damaged``: it was written whole but its bytes changed since (checksum mismatch, truncated).
    * ``shipped``: the model shipped with the project (:mod:`helpers.tools.shipped`), not a run
      of the student's own.
    """

    name: str
    path: Path
    model: str
    part: str
    data: str
    data_root: str | None
    best_val_mae: float | None
    best_epoch: int | None
    epochs: int
    input_scale: float = 1.0
    max_fit: int | None = None
    max_val: int | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    error: str | None = None
    damaged: bool = False
    shipped: bool = False

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def ok(self) -> bool:
        """True when the checkpoint was read and names a model."""
        return self.error is None

    @property
    def demo(self) -> bool:
        """Trained on at most :data:`DEMO_MAX_FIT` images (a quick-mode or demo run)."""
        return self.max_fit is not None and self.max_fit <= DEMO_MAX_FIT

    @property
    def title(self) -> str:
        """``HeatmapCNN`` / ``CSRNet`` (or the raw model name); for the shipped model
        ``shipped HeatmapCNN (Part B, trained by the project)``."""
        title = MODEL_TITLES.get(self.model, self.model)
        if self.shipped:
            return f"shipped {title} (Part {self.part}, trained by the project)"
        return title

    @property
    def label(self) -> str:
        """One line for a menu: name, model, part, data, validation MAE."""
        if self.error:
            return f"{self.name}: {'damaged' if self.damaged else 'unreadable'} checkpoint"
        mae = "not validated" if self.best_val_mae is None else f"val MAE {self.best_val_mae:.1f}"
        demo = ", demo" if self.demo else ""
        if self.shipped:
            return f"{self.name}: {self.title}, {self.data}, {mae}"
        return f"{self.name}: {self.title}, part {self.part}, {self.data}{demo}, {mae}"


def data_kind(root: str | os.PathLike[str] | None) -> str:
    """``"synthetic"``, ``"ShanghaiTech"`` or ``"unknown"`` for a dataset folder.

    A folder holding the synthetic set's manifest (``SYNTHETIC.json``) is synthetic; another
    existing folder is taken to be ShanghaiTech (or a set in its layout). A folder that no longer
    exists is synthetic if it is a project's ``data/synthetic`` (where the set is generated),
    otherwise unknown; so is a run that recorded no folder.
    """
    if root is None or str(root).strip() == "":
        return UNKNOWN
    from helpers.tools.synth import MANIFEST_NAME

    path = Path(root).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return SYNTHETIC
    if path.is_dir():
        return SHANGHAITECH
    if path.parts[-2:] == ("data", "synthetic"):
        return SYNTHETIC
    return UNKNOWN


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_history(path: Path) -> list[dict[str, float]]:
    """The rows of ``history.csv`` as numbers; an unreadable or missing file gives ``[]``."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for raw in csv.DictReader(fh):
                row = {}
                for key, value in raw.items():
                    try:
                        row[key] = float(value) if value not in ("", None) else math.nan
                    except ValueError:
                        row[key] = math.nan
                rows.append(row)
    except (OSError, csv.Error):
        return []
    return rows


#: (path, modification time, size) -> the checkpoint's entries without weights, or the error it
#: raised: each version of a file is read and verified once per process.
_META_CACHE: dict[tuple[str, int, int], dict[str, Any] | CheckpointError] = {}
_HEAVY_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "ema")


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint dict without its weights, read and checksum-verified by
    :func:`helpers.tools.checkpoints.load_checkpoint` (which raises the explanatory
    :class:`CheckpointError` for a missing, damaged or unsafe file). Cached per file version."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _META_CACHE:
        try:
            obj = load_checkpoint(path)
            _META_CACHE[key] = {k: v for k, v in obj.items() if k not in _HEAVY_KEYS}
            if "model" in obj:
                _META_CACHE[key]["has_weights"] = True
        except CheckpointError as exc:
            _META_CACHE[key] = exc
    found = _META_CACHE[key]
    if isinstance(found, CheckpointError):
        raise found
    return found


def _opt_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_info(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> RunInfo:
    """A :class:`RunInfo` for a checkpoint file or a run folder (its ``best.pt``).

    ``root`` (default :func:`helpers.config.runs_root`) only sets the ``name``. Raises
    :class:`CheckpointError` when the checkpoint does not exist; a checkpoint that exists but
    cannot be read gives a RunInfo with ``error`` set.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Give the path of a best.pt written by training "
            "(notebooks 03/04 or crowd train), or a run folder that holds one."
        )
    folder = path.parent
    runs_root = Path(root).expanduser() if root is not None else settings.runs_root()
    try:
        name = folder.resolve().relative_to(runs_root.resolve()).as_posix()
    except ValueError:
        name = folder.name
    if name in ("", "."):
        name = folder.name
    if path.name != "best.pt":
        name = f"{name}/{path.name}"

    cfg = _read_json(folder / "config.json") if path.name == "best.pt" else {}
    history = _read_history(folder / "history.csv") if cfg else []
    val = [(r.get("val_mae", math.nan), int(r.get("epoch", 0) or 0)) for r in history]
    val = [(m, e) for m, e in val if math.isfinite(m)]
    best_mae, best_epoch = min(val) if val else (None, None)
    data_root = cfg.get("data_root")
    model_name, part = cfg.get("model"), cfg.get("part")
    epochs = len(history)
    error, damaged = None, False
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError as exc:
        meta, error, damaged = {}, str(exc), isinstance(exc, CheckpointDamagedError)

    history_file = folder / "history.csv"
    stale = not history_file.is_file() or path.stat().st_mtime > history_file.stat().st_mtime + 1.0
    if not cfg or data_root is None or best_mae is None or stale:
        ckpt_cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        cfg = cfg or ckpt_cfg
        data_root = data_root or meta.get("data_root") or ckpt_cfg.get("data_root")
        model_name = model_name or meta.get("model_name") or ckpt_cfg.get("model")
        part = part or ckpt_cfg.get("part")
        ckpt_mae = _finite(meta.get("best_val_mae"))
        if ckpt_mae is not None:  # the checkpoint's own score is what best.pt holds
            best_mae, best_epoch = ckpt_mae, _opt_int(meta.get("epoch"))
        epochs = max(epochs, _opt_int(meta.get("epoch")) or 0)  # a partial epoch counts
        if meta and "has_weights" not in meta and "model_name" not in meta and error is None:
            error = f"{path} is not a checkpoint written by crowd train"
    if error is None and not model_name:
        error = f"{path} does not say which model it holds"
    return RunInfo(
        name=name,
        path=path,
        model=str(model_name or UNKNOWN),
        part=str(part or "?").upper().removeprefix("PART_"),
        data=data_kind(data_root),
        data_root=None if data_root is None else str(data_root),
        best_val_mae=best_mae,
        best_epoch=best_epoch,
        epochs=int(epochs),
        input_scale=float(cfg.get("resize", 1.0) or 1.0),
        max_fit=_opt_int(cfg.get("max_fit")),
        max_val=_opt_int(cfg.get("max_val")),
        config=dict(cfg),
        error=error,
        damaged=damaged,
    )


def _sort_key(run: RunInfo) -> tuple:
    mae = run.best_val_mae
    return (run.error is not None, mae is None, mae if mae is not None else 0.0, run.name)


def find_runs(root: str | os.PathLike[str] | None = None) -> list[RunInfo]:
    """Every ``<root>/*/best.pt`` and ``<root>/*/*/best.pt``, lowest validation MAE first.

    ``root`` defaults to :func:`helpers.config.runs_root`. Runs without a validation score come
    after the scored ones, unreadable checkpoints last (with ``error`` set). Note that MAEs of
    different parts or datasets are not comparable: filter first (:func:`best_run`).
    """
    root = Path(root).expanduser() if root is not None else settings.runs_root()
    if not root.is_dir():
        return []
    paths = sorted(set(root.glob("*/best.pt")) | set(root.glob("*/*/best.pt")))
    runs = []
    for path in paths:
        try:
            runs.append(run_info(path, root))
        except CheckpointError:  # removed while listing
            continue
    return sorted(runs, key=_sort_key)


def _source_kind(source) -> str:
    return SYNTHETIC if source.synthetic else SHANGHAITECH


def best_run(runs: Sequence[RunInfo], source=None, *, model: str | None = None,
             part: str | None = None) -> RunInfo | None:
    """The readable run with the lowest validation MAE among those that match, or None.

    ``source`` (a :class:`helpers.data.DataSource`): only runs trained on the same kind of data
    (real or synthetic); ``model``, ``part``: only runs of that model / part.
    """
    want_kind = None if source is None else _source_kind(source)
    part = None if part is None else str(part).upper().removeprefix("PART_")
    model = None if model is None else str(model).strip().lower().replace("-", "_")
    matching = [
        r for r in runs
        if r.ok and r.best_val_mae is not None
        and (want_kind is None or r.data == want_kind)
        and (model is None or r.model == model)
        and (part is None or r.part == part)
    ]
    return min(matching, key=_sort_key) if matching else None


# --------------------------------------------------------------------------- a checkpoint, always




def demo_folder(model: str, part: str, source=None, root: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`ensure_checkpoint` trains: ``runs/<model>_<part>_demo`` (real data) or
    ``runs/<model>_<part>_demo_synthetic`` (synthetic), so the two never overwrite each other."""
    root = Path(root).expanduser() if root is not None else settings.runs_root()
    suffix = "_synthetic" if source is not None and source.synthetic else ""
    return root / f"{model}_{part}_demo{suffix}"


def ensure_checkpoint(model: str = "heatmap_cnn", part: str = "B", out: str | os.PathLike[str] | None = None,
                      *, source=None, root: str | os.PathLike[str] | None = None) -> Path:
    """A ``best.pt`` of ``model`` on ``part``, trained on the data in use; trains one if needed.

    Returns the existing run of that model and part with the lowest validation MAE among those
    trained on the same kind of data as ``source`` (default
    :func:`helpers.data.resolve_data_source`: ShanghaiTech when ``CROWD_DATA`` is set, else
    synthetic), e.g. ``runs/heatmap_cnn_B/best.pt`` written by notebook 03. When there is none,
    trains a small one with the quick recipe (:func:`helpers.tools.recipes.recommended_config` with
    ``quick=True``, one to two minutes on a laptop CPU) into ``out`` (default
    :func:`demo_folder`) and returns its ``best.pt``. An interrupted demo run is continued.

    ``root``: the runs folder to search (default :func:`helpers.config.runs_root`). Two processes
    asking at once train once: the second waits for the first (a lock file beside the run).
    """
    from helpers.data import resolve_data_source

    model = str(model).strip().lower().replace("-", "_")
    part = str(part).strip().upper().removeprefix("PART_")
    source = source if source is not None else resolve_data_source()
    kind = _source_kind(source)
    out_dir = Path(out).expanduser() if out is not None else demo_folder(model, part, source, root)

    def existing() -> Path | None:
        runs = find_runs(root)
        if (out_dir / "best.pt").is_file() and all(r.folder.resolve() != out_dir.resolve() for r in runs):
            runs.append(run_info(out_dir / "best.pt", root))
        found = best_run(runs, source, model=model, part=part)
        return None if found is None else found.path

    found = existing()
    if found is not None:
        return found
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        found = existing()  # another process may have trained it while we waited
        if found is not None:
            return found
        last = out_dir / "last.pt"
        if last.is_file():
            info = run_info(last)
            if info.data != kind or info.model != model or info.part != part:
                raise CrowdError(
                    f"{out_dir} already holds a run of {info.model} on part {info.part} trained on "
                    f"{info.data} data, not {model} on part {part} with {kind} data. Pass another "
                    "out= folder, or delete that folder to train a new demo model there."
                )
        from helpers.tools.recipes import recommended_config
        from helpers.tools.trainer import train

        cfg = recommended_config(model, part, out_dir, quick=True, data_root=str(source.root),
                                 resume=last.is_file())
        print(f"No trained {MODEL_TITLES.get(model, model)} for part {part} on {kind} data yet: "
              f"training a small demo model into {out_dir} (about 1-2 minutes on a CPU).", flush=True)
        result = train(cfg)
    if not result.best.is_file():
        raise CrowdError(
            f"Training in {out_dir} finished without a best.pt (no finite validation score). "
            "Delete the folder and try again, or train with notebook 03."
        )
    return result.best


def models_to_show(part: str, source=None, *, root: str | os.PathLike[str] | None = None,
                   train_if_missing: bool = True,
                   shipped_dir: str | os.PathLike[str] | None = None) -> list[RunInfo]:
    """The trained models a notebook shows for ``part``, each labelled by its :class:`RunInfo`.

    The student's best run of each model (HeatmapCNN, then CSRNet) trained on the same kind of
    data as ``source`` (default :func:`helpers.data.resolve_data_source`), then the model shipped
    with the project for ``part`` (``shipped=True``, :func:`helpers.tools.shipped.shipped_run`)
    when the student has no run of that part or only quick demo runs: in quick mode it is shown
    beside the smoke run. Never mixed up: the shipped model's ``title`` and ``label`` say so.
    When there is neither, trains a demo HeatmapCNN (:func:`ensure_checkpoint`) unless
    ``train_if_missing`` is False (then the list may be empty). ``root``: the runs folder;
    ``shipped_dir``: the folder of shipped models (default :data:`helpers.tools.shipped.SHIPPED_DIR`).
    """
    from helpers.data import resolve_data_source
    from helpers.tools.shipped import shipped_run

    part = str(part).strip().upper().removeprefix("PART_")
    source = source if source is not None else resolve_data_source()
    found = find_runs(root)
    own = [r for m in MODEL_TITLES if (r := best_run(found, source, model=m, part=part)) is not None]
    shipped = shipped_run(part, shipped_dir)
    if shipped is not None and all(r.demo for r in own):
        return own + [shipped]
    if not own and train_if_missing:
        ensure_checkpoint("heatmap_cnn", part, source=source, root=root)
        return models_to_show(part, source, root=root, train_if_missing=False, shipped_dir=shipped_dir)
    return own


# --------------------------------------------------------------------------- describing a run


def validation_mean_count(run: RunInfo) -> tuple[float, int] | None:
    """``(mean true count, number of images)`` of the validation images the run was scored on.

    The same images as in training (the ``val`` split of its part, spread-out subset of
    ``max_val``); None when its dataset folder is not available.
    """
    if not run.data_root or run.part not in ("A", "B"):
        return None
    from helpers.data import list_records, read_points, take_evenly

    try:
        records = take_evenly(list_records(run.part, "val", run.data_root), run.max_val)
        counts = [len(read_points(r.points_path)) for r in records if r.points_path is not None]
    except (CrowdError, OSError, ValueError):
        return None
    if not counts:
        return None
    return float(np.mean(counts)), len(counts)


def _inline_html(markdown: str) -> str:
    """The few Markdown marks :func:`describe_run` uses (``**bold**``, ```code```) as HTML."""
    text = html.escape(markdown, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def describe_run(run: RunInfo, *, mean_count: float | None = None, html: bool = False) -> str:
    """A paragraph (Markdown, or HTML with ``html=True``) about the model a notebook will use.

    Says which model it is, what it was trained on (data, part, images, epochs, image scale),
    its validation MAE, and how accurate to expect it to be: the MAE relative to the mean count of
    its validation images (``mean_count``, default :func:`validation_mean_count`), with a warning
    for a demo model and for one trained on synthetic crowds.
    """
    if run.error:
        text = f"**Cannot use `{run.path}`**: {run.error}"
        return _inline_html(text) if html else text
    if run.shipped:
        return _describe_shipped(run, html=html)
    n_val = None
    if mean_count is None:
        found = validation_mean_count(run)
        if found is not None:
            mean_count, n_val = found
    images = "all training images" if run.max_fit is None else f"at most {run.max_fit} training images"
    scene = PART_SCENES.get(run.data, {}).get(run.part, "")
    data = {SYNTHETIC: "**synthetic crowds**", SHANGHAITECH: "**ShanghaiTech**",
            UNKNOWN: "**unknown data** (the dataset folder it recorded is gone)"}[run.data]
    lines = [
        f"**Model in use:** `{run.name}`, a {run.title} trained on {data} part {run.part}"
        + (f" ({scene})" if scene else "")
        + f" for {run.epochs} epoch{'s' if run.epochs != 1 else ''} on {images}. "
        f"Photos are resized by {run.input_scale:g} before counting, the scale it was trained at."
    ]
    rel = None
    if run.best_val_mae is None:
        lines.append("It has **no validation score**, so there is no measure of how accurate it is.")
    else:
        mae = run.best_val_mae
        over = "" if n_val is None else f" over {n_val} validation images"
        if mean_count is not None and mean_count > 0:
            rel = mae / mean_count
            lines.append(
                f"**Validation MAE: {mae:.1f} people per image**{over} whose mean count is "
                f"{mean_count:.1f}: errors of about **{100 * rel:.0f} %** of a typical count."
            )
        else:
            lines.append(f"**Validation MAE: {mae:.1f} people per image**{over}.")
    off = f"{100 * rel:.0f} %" if rel is not None else (
        f"{run.best_val_mae:.0f} people" if run.best_val_mae is not None else "a lot")
    if run.demo:
        lines.append(
            f"**Expect rough counts:** this is a quick demo model, so counts may be off by {off} "
            "or more, and by more still on photos unlike its training images. For a better model "
            "train one in full mode (notebook 03, or 04 for CSRNet); the best run is then picked "
            "automatically."
        )
    elif run.best_val_mae is not None:
        lines.append(
            f"**What to expect:** errors of about {off} on photos like its training images"
            + (f" ({scene})" if scene else "")
            + "; on photos that differ (indoors, close-ups, a different camera height, much denser "
            "or sparser crowds, night) errors can be much larger."
        )
    if run.data == SYNTHETIC:
        lines.append(
            "It was trained on **synthetic crowds** and has never seen a real photo: on a real "
            "photo its count means little. Use it to see how counting works, or set `CROWD_DATA` "
            "to ShanghaiTech and train again."
        )
    text = " ".join(lines)
    return _inline_html(text) if html else text


def _describe_shipped(run: RunInfo, *, html: bool = False) -> str:
    """:func:`describe_run` for the model shipped with the project (numbers from its manifest)."""
    from helpers.tools.shipped import manifest_entry

    entry = manifest_entry(run.part, run.path.parent) or {}
    val, test = entry.get("val") or {}, entry.get("test") or {}
    scene = PART_SCENES[SHANGHAITECH].get(run.part, "")
    text = (
        f"**Model in use: the {run.title}**, not a model of your own: a {MODEL_TITLES.get(run.model, run.model)} "
        f"trained by the project on **ShanghaiTech** part {run.part} ({scene}) for {run.epochs} epochs "
        f"(`{run.path.name}`, see `MODEL_CARD.md` beside it). Photos are resized by "
        f"{run.input_scale:g} before counting."
    )
    if val.get("mae") is not None:
        text += f" **Validation MAE: {val['mae']:.1f} people per image**"
        text += f", test MAE {test['mae']:.1f}." if test.get("mae") is not None else "."
    text += (" Train your own (notebook 03, or 04 for CSRNet) in full mode and it is used "
             "instead.")
    return _inline_html(text) if html else text


# --------------------------------------------------------------------------- your own images


def save_upload(upload: Any, folder: str | os.PathLike[str] | None = None) -> Path | None:
    """Write the first file of an ``ipywidgets.FileUpload`` to ``folder``; returns its path.

    ``upload`` is the widget or its ``.value``, from ipywidgets 8 (a tuple of dicts with ``name``
    and ``content``, a memoryview) or 7 (Colab's: a dict ``{name: {"metadata": ..., "content":
    bytes}}``). ``folder`` defaults to ``build/uploads`` in the project. None when nothing was
    uploaded. The file keeps its name (reduced to safe characters), so the image is then read
    like any other file, with the camera's EXIF rotation applied.
    """
    value = upload.value if hasattr(upload, "value") else upload
    if not value:
        return None
    if isinstance(value, dict):  # ipywidgets 7
        name, item = next(iter(value.items()))
    else:
        item = value[0]
        name = item.get("name") or "upload"
    content = item.get("content")
    if content is None:
        raise CrowdError(f"The uploaded file {name!r} has no content; upload it again.")
    return _write_upload(str(name), content, folder)


def clear_upload(upload: Any) -> None:
    """Forget the file(s) of an ``ipywidgets.FileUpload``, on ipywidgets 8 and 7 alike.

    On 8 this is ``upload.value = ()``. On 7 (Colab) ``value`` is read-only (assigning it raises
    ``TraitError: The "value" trait is read-only``): the widget's files are emptied and its
    value set to ``{}`` the way the widget itself does. Observers of ``value`` see the change.
    """
    if isinstance(upload.value, dict):  # ipywidgets 7
        upload.metadata, upload.data = [], []
        upload.set_trait("value", {})
    else:
        upload.value = ()


def in_colab() -> bool:
    """True inside Google Colab (its ``google.colab`` module is loaded)."""
    return sys.modules.get("google.colab") is not None


def colab_upload(folder: str | os.PathLike[str] | None = None) -> Path | None:
    """Upload a photo with Google Colab's own dialog; returns where it was written (``folder``).

    For large photos (a phone photo of several MB) in Colab, where the ``FileUpload`` widget can
    stall: ``google.colab.files.upload()`` sends the file in chunks. Blocks until the file has
    arrived; the first file is kept, in ``folder`` (default ``build/uploads`` in the project).
    None when nothing was chosen. Raises :class:`CrowdError` outside Colab.
    """
    try:
        from google.colab import files
    except ImportError as exc:
        raise CrowdError("colab_upload works only in Google Colab; here, use the upload button or "
                         "type the photo's path.") from exc
    uploaded = files.upload()  # {file name: bytes}; Colab also leaves a copy in the working folder
    if not uploaded:
        return None
    name, content = next(iter(uploaded.items()))
    return _write_upload(str(name), content, folder)


def _write_upload(name: str, content: Any, folder: str | os.PathLike[str] | None) -> Path:
    """Write uploaded bytes to ``folder`` (default ``build/uploads``) under a safe form of ``name``."""
    from helpers.tools.fileio import atomic_path

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name).strip("._") or "upload"
    out = Path(folder) if folder is not None else settings.project_root() / "build" / "uploads"
    target = out / safe
    with atomic_path(target, suffix=Path(safe).suffix) as tmp:
        tmp.write_bytes(bytes(content))
    return target


def heads_at_threshold(prediction, threshold: float) -> np.ndarray:
    """Head points of a :class:`helpers.predict.Prediction` at another threshold, ``(M, 2)`` ``(x, y)``.

    Every local maximum of ``prediction.density_lowres`` above ``threshold`` people per cell
    (:func:`helpers.metrics.find_peaks`), in the original image's pixels exactly as
    :func:`helpers.predict.count` with ``threshold=`` returns them, without running the model.
    """
    from helpers.metrics import find_peaks

    points = find_peaks(prediction.density_lowres, float(threshold), stride=prediction.stride)
    image_h, image_w = prediction.image_shape
    h, w = prediction.model_shape or prediction.image_shape
    if len(points):
        points[:, 0] = np.minimum(points[:, 0], w - 0.5) * (image_w / w)
        points[:, 1] = np.minimum(points[:, 1], h - 0.5) * (image_h / h)
    return points


def peak_values(prediction) -> np.ndarray:
    """The values (people per cell) of the positive local maxima of ``density_lowres``, largest first.

    ``find_peaks(density_lowres, t)`` finds exactly the maxima whose value is above ``t`` (for any
    ``t >= 0``), so these values give the number of heads at every threshold.
    """
    from helpers.metrics import find_peaks

    lowres = np.asarray(prediction.density_lowres)
    cells = find_peaks(lowres, 0.0)  # (x, y) = (j + 0.5, i + 0.5) at stride 1, strongest first
    if not len(cells):
        return np.zeros(0, dtype=np.float64)
    rows, cols = cells[:, 1].astype(np.int64), cells[:, 0].astype(np.int64)
    return np.sort(lowres[rows, cols].astype(np.float64))[::-1]


def peak_counts(prediction, thresholds: Sequence[float]) -> np.ndarray:
    """The number of head points at each threshold (people per cell): int64 ``(len(thresholds),)``."""
    values = peak_values(prediction)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    return (values[None, :] > t[:, None]).sum(axis=1).astype(np.int64)


def threshold_grid(prediction, n: int = 41) -> np.ndarray:
    """About ``n`` increasing thresholds from 0 to the strongest peak, spaced by numbers of heads.

    0 and the quantiles of :func:`peak_values`: the number of heads falls by about the same step
    from one threshold to the next, even when most peaks are faint (a linear grid would jump
    over them). Duplicates are removed.
    """
    values = peak_values(prediction)
    if not len(values):
        return np.zeros(1, dtype=np.float64)
    q = np.quantile(values, np.linspace(0.0, 1.0, max(2, int(n) - 1)))
    return np.unique(np.concatenate([[0.0], q]))


def threshold_for_count(prediction, thresholds: Sequence[float] | None = None) -> float:
    """The threshold whose number of head points is closest to ``round(prediction.count)``.

    ``thresholds`` (people per cell) default to every distinct outcome: 0, the midpoints between
    consecutive distinct peak values, and the strongest peak (no heads); of several equally close,
    the lowest. A starting value for a threshold slider: the points then agree with the count as
    well as the map allows (fewer when neighbouring heads have merged into one maximum).
    """
    values = peak_values(prediction)
    if thresholds is None:
        distinct = np.unique(values)
        thresholds = np.concatenate([[0.0], (distinct[:-1] + distinct[1:]) / 2, distinct[-1:]])
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    n = (values[None, :] > t[:, None]).sum(axis=1)
    gaps = np.abs(n - round(float(prediction.count)))
    return float(t[np.flatnonzero(gaps == gaps.min())].min())


def runs_markdown(runs: Sequence[RunInfo]) -> str:
    """A Markdown table of runs: name, model, part, data, epochs, images, scale, validation MAE."""
    if not runs:
        return "(no trained runs yet)"
    lines = ["| run | model | part | data | epochs | training images | input scale | val MAE |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in runs:
        if not r.ok:
            lines.append(f"| `{r.name}` | {'damaged' if r.damaged else 'unreadable'} | | | | | | |")
            continue
        mae = "-" if r.best_val_mae is None else f"{r.best_val_mae:.1f}"
        images = "all" if r.max_fit is None else f"<= {r.max_fit}"
        lines.append(f"| `{r.name}` | {r.title} | {r.part} | {r.data} | {r.epochs} | {images} | "
                     f"{r.input_scale:g} | {mae} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _as_json(run: RunInfo) -> dict[str, Any]:
    return {"name": run.name, "path": str(run.path), "model": run.model, "part": run.part,
            "data": run.data, "best_val_mae": run.best_val_mae, "best_epoch": run.best_epoch,
            "epochs": run.epochs, "input_scale": run.input_scale, "max_fit": run.max_fit,
            "demo": run.demo, "error": run.error, "damaged": run.damaged, "shipped": run.shipped}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``crowd runs``: list the trained runs (best validation MAE first), or print
    a checkpoint for a model and part, training a small demo model first if there is none."""
    parser.add_argument("action", nargs="?", choices=["list", "ensure", "shipped"], default="list")
    parser.add_argument("--root", default=None, help="runs folder (default: runs/ in the project)")
    parser.add_argument("--model", default="heatmap_cnn", help="ensure: heatmap_cnn or csrnet")
    parser.add_argument("--part", default="B", help="ensure: A or B")
    parser.add_argument("--json", action="store_true", help="list: one JSON object per line")


def run(args: argparse.Namespace) -> int:
    """``crowd runs``: one line (or JSON object) per run, or ``ensure``'s checkpoint path."""
    if args.action == "ensure":
        print(ensure_checkpoint(args.model, args.part, root=args.root))
        return 0
    if args.action == "shipped":
        from helpers.tools.shipped import shipped_run

        runs = [r for part in ("A", "B") if (r := shipped_run(part)) is not None]
        for found in runs:
            print(json.dumps(_as_json(found)) if args.json else f"{found.label}  [{found.path}]")
        if not runs and not args.json:
            print("no shipped models in this installation")
        return 0
    runs = find_runs(args.root)
    for found in runs:
        print(json.dumps(_as_json(found)) if args.json else f"{found.label}  [{found.path}]")
    if not runs and not args.json:
        print(f"no runs with a best.pt under {args.root or settings.runs_root()}")
    return 0
