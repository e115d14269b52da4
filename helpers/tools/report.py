"""The coursework report: facts for the error analysis, and ``report/report.md`` with its figure sheet.

Error analysis (used by notebook 05). All functions read the per-image rows of
:mod:`helpers.tools.evaluate` (``true_count``, ``pred_count``, ``error = pred - true``, ``bucket``):

* :func:`signed_errors_by_bucket`: per crowd-size bucket the mean *signed* error and the mean
  relative error, so you see whether a model over- or under-counts, not only by how much;
* :func:`extreme_images`: the ``n`` densest (or sparsest) images and how far off they are;
* :class:`BandCounter`: the perspective analysis, the true and predicted people in horizontal
  bands of every image (the top band is far from the camera in most scenes, where heads are small);
* :func:`error_facts`: those numbers as sentences for the discussion, true for any results.

Report assembly (``crowd report``): ``report/report.md`` is a report template with
the results table of notebook 05 (``report/results.md``), every figure of ``report/figures/``
embedded with a caption (:data:`FIGURES`; figures this module does not know are listed at the
end), headings for the discussion that the student writes (marked **TODO (student)**), and a
list of what is still missing and which notebook makes it. ``report/figures/figure_sheet.pdf``
holds the key figures, one 16:9 slide each (the slide style of :mod:`helpers.viz.common`). Both files are written atomically
and are regenerated on every run: write your own report in a copy.

Command line::

    crowd report [--title TITLE] [--all-figures] [--json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from helpers import config
from helpers.errors import CrowdError

# --------------------------------------------------------------------------- error analysis


def _counts(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(true, pred)`` float64 arrays ``(n,)`` of per-image rows."""
    true = np.array([float(r["true_count"]) for r in rows], dtype=np.float64)
    pred = np.array([float(r["pred_count"]) for r in rows], dtype=np.float64)
    return true, pred


def _relative(true: np.ndarray, pred: np.ndarray) -> float | None:
    """Mean of ``(pred - true) / true`` in percent over images with people (None if there are none)."""
    sel = true > 0
    if not sel.any():
        return None
    return float(100.0 * np.mean((pred[sel] - true[sel]) / true[sel]))


def signed_errors_by_bucket(rows: Sequence[Mapping[str, Any]],
                            edges: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per crowd-size bucket of the true count: how many images and how wrong, with the sign.

    Returns one dict per non-empty bucket, in bucket order: ``bucket``, ``images``,
    ``mean_true`` and ``mean_pred`` (people per image), ``mean_error`` (mean of ``pred - true``:
    negative = undercounting), ``mae``, and ``relative_error_pct`` (mean of
    ``(pred - true) / true`` in percent, over the bucket's images with at least one person; None
    if it has none). Buckets are :data:`helpers.tools.evaluate.BUCKET_EDGES` (or ``edges``).
    """
    from helpers.tools.evaluate import BUCKET_EDGES, bucket_labels, bucket_of

    edges = BUCKET_EDGES if edges is None else edges
    true, pred = _counts(rows)
    labels = np.array([bucket_of(t, edges) for t in true])
    out = []
    for label in bucket_labels(edges):
        sel = labels == label
        if not sel.any():
            continue
        err = pred[sel] - true[sel]
        out.append({
            "bucket": label,
            "images": int(sel.sum()),
            "mean_true": float(true[sel].mean()),
            "mean_pred": float(pred[sel].mean()),
            "mean_error": float(err.mean()),
            "mae": float(np.abs(err).mean()),
            "relative_error_pct": _relative(true[sel], pred[sel]),
        })
    return out


def extreme_images(rows: Sequence[Mapping[str, Any]], n: int = 5, *, densest: bool = True) -> dict[str, Any]:
    """The ``n`` images with the most (``densest``) or fewest people, and the model's error on them.

    Returns ``names``, ``images`` (at most ``n``), ``mean_true``, ``mean_pred``, ``mean_error``
    (signed, people per image) and ``relative_error_pct`` (mean of ``(pred - true) / true`` in
    percent over those of them with people; None if none has). Ties in the true count keep the
    row order.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 image, got {n}")
    true, pred = _counts(rows)
    order = np.argsort(-true if densest else true, kind="stable")[: int(n)]
    if order.size == 0:
        return {"names": [], "images": 0, "mean_true": None, "mean_pred": None, "mean_error": None,
                "relative_error_pct": None}
    return {
        "names": [str(rows[i]["name"]) for i in order],
        "images": int(order.size),
        "mean_true": float(true[order].mean()),
        "mean_pred": float(pred[order].mean()),
        "mean_error": float((pred[order] - true[order]).mean()),
        "relative_error_pct": _relative(true[order], pred[order]),
    }


def band_counts(true_points: np.ndarray, density: np.ndarray, bands: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted people in ``bands`` horizontal bands of one image, top band first.

    ``true_points``: ``(N, 2)`` annotated heads ``(x, y)`` pixels; ``density``: the predicted
    ``H x W`` people per pixel. Band ``b`` holds rows ``[b H / bands, (b + 1) H / bands)``
    (rounded down to whole rows); a head belongs to the band of its row ``floor(y)``. Returns
    two float64 arrays ``(bands,)``; each sums to the image's true / predicted count.
    """
    d = np.asarray(density, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"density must be an H x W map at image resolution, got shape {d.shape}")
    if int(bands) < 1:
        raise ValueError(f"bands must be at least 1, got {bands}")
    h = d.shape[0]
    edges = (np.arange(int(bands) + 1) * h) // int(bands)  # whole rows, edges[-1] == h
    cumulative = np.concatenate([[0.0], np.cumsum(d.sum(axis=1))])
    pred = cumulative[edges[1:]] - cumulative[edges[:-1]]
    pts = np.asarray(true_points, dtype=np.float64).reshape(-1, 2)
    rows = np.clip(np.floor(pts[:, 1]), 0, max(h - 1, 0)).astype(np.int64)
    true = np.bincount(np.searchsorted(edges, rows, side="right") - 1, minlength=int(bands))[: int(bands)]
    return true.astype(np.float64), pred.astype(np.float64)


@dataclass
class BandCounter:
    """Perspective analysis: true and predicted people per horizontal band, summed over images.

    Pass it as ``on_image=`` to :func:`helpers.tools.evaluate.evaluate_predictor` (or
    ``evaluate_checkpoint``): it sees every scored image once (:func:`band_counts`) and keeps
    only ``bands`` numbers. In street scenes (Part B) the top band is far from the camera, where
    heads are a few pixels wide; the bottom band is close. Images without a predicted map are
    skipped.
    """

    bands: int = 3
    true: np.ndarray = field(init=False, repr=False)
    pred: np.ndarray = field(init=False, repr=False)
    images: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if int(self.bands) < 1:
            raise ValueError(f"bands must be at least 1, got {self.bands}")
        self.bands = int(self.bands)
        self.true = np.zeros(self.bands)
        self.pred = np.zeros(self.bands)

    def __call__(self, kept) -> None:
        if kept.density is None or np.asarray(kept.density).shape != np.asarray(kept.image).shape[:2]:
            return
        t, p = band_counts(kept.true_points, kept.density, self.bands)
        self.true += t
        self.pred += p
        self.images += 1

    def labels(self) -> list[str]:
        """``["top", "middle", "bottom"]`` for 3 bands, else ``["band 1 (top)", ..., "band n (bottom)"]``."""
        if self.bands == 3:
            return ["top", "middle", "bottom"]
        if self.bands == 1:
            return ["whole image"]
        return [f"band {b + 1}" + (" (top)" if b == 0 else " (bottom)" if b == self.bands - 1 else "")
                for b in range(self.bands)]

    def table(self) -> dict[str, dict[str, Any]]:
        """``{band: {true, predicted, error, found_pct}}``: people summed over the images.

        ``found_pct`` = ``100 x predicted / true`` (None when the band holds nobody): below 100
        the model misses people there, above 100 it sees people that are not there.
        """
        out = {}
        for label, t, p in zip(self.labels(), self.true, self.pred, strict=True):
            out[label] = {"true": float(t), "predicted": float(p), "error": float(p - t),
                          "found_pct": float(100.0 * p / t) if t > 0 else None}
        return out


def _over_under(value: float) -> str:
    return "undercounts" if value < 0 else "overcounts"


def error_facts(rows: Sequence[Mapping[str, Any]], model: str = "the model", n: int = 5,
                bands: BandCounter | None = None) -> list[str]:
    """Computed sentences for the error analysis of one model (Markdown, one fact each).

    The overall bias; the ``n`` densest and ``n`` sparsest images (signed relative error); how
    the signed error changes with the true count (a least-squares slope); the bucket with the
    largest mean absolute error; and, with ``bands``, the share of people found in the top and
    bottom bands. Every sentence is worded from the sign and size of the numbers, so it stays
    true whatever they are.
    """
    true, pred = _counts(rows)
    if true.size == 0:
        return [f"{model}: no images were scored."]
    err = pred - true
    facts = []
    bias = float(err.mean())
    facts.append(
        f"Over all {true.size} images {model} {_over_under(bias)} by {abs(bias):.1f} people per image "
        f"on average (mean true count {true.mean():.1f}, mean prediction {pred.mean():.1f}; "
        f"MAE {np.abs(err).mean():.1f})."
    )
    k = min(int(n), true.size)
    for densest, word in ((True, "densest"), (False, "sparsest")):
        ex = extreme_images(rows, k, densest=densest)
        rel = ex["relative_error_pct"]
        size = f"mean true count {ex['mean_true']:.1f}, mean prediction {ex['mean_pred']:.1f}"
        if rel is None:
            facts.append(f"On the {k} {word} images ({size}; none has a person) {model} predicts "
                         f"{ex['mean_pred']:.1f} people per image.")
        else:
            facts.append(f"On the {k} {word} images ({size}) {model} {_over_under(rel)} by "
                         f"{abs(rel):.0f} % on average.")
    if true.size >= 3 and np.ptp(true) > 0:
        slope = float(np.polyfit(true, err, 1)[0])
        facts.append(
            f"Signed error against true count: a least-squares slope of {slope:+.2f}, i.e. every 100 "
            f"extra people change the error by {100 * slope:+.0f} people"
            + (" (the model falls further behind as crowds grow)." if slope < 0 else
               " (the model counts relatively more as crowds grow).")
        )
    buckets = signed_errors_by_bucket(rows)
    if len(buckets) > 1:
        worst = max(buckets, key=lambda b: b["mae"])
        facts.append(f"The largest mean absolute error is in the {worst['bucket']} people bucket: "
                     f"{worst['mae']:.1f} people per image over {worst['images']} image(s), signed "
                     f"{worst['mean_error']:+.1f}.")
    if bands is not None and bands.images:
        table = bands.table()
        labels = list(table)
        parts = []
        for label in (labels[0], labels[-1]):
            found = table[label]["found_pct"]
            if found is not None:
                parts.append(f"{found:.0f} % of the people in the {label} band")
        if parts:
            facts.append(f"Perspective ({bands.images} images, {bands.bands} horizontal bands): {model} "
                         f"predicts {' and '.join(parts)} (100 % = as many as annotated).")
    return facts


# --------------------------------------------------------------------------- figure catalogue


@dataclass(frozen=True)
class FigureSpec:
    """A figure the series makes: its file stem (without a ``_<variant>`` suffix) and caption.

    ``key``: shown in the figure sheet (the slides). The notebook that makes it is the stem's
    two-digit prefix (:attr:`notebook`).
    """

    stem: str
    caption: str
    key: bool = False

    @property
    def notebook(self) -> str:
        return notebook_file(self.stem[:2])


#: Notebook files by number.
NOTEBOOKS = {
    "01": "01_dataset_exploration.ipynb",
    "02": "02_ground_truth.ipynb",
    "03": "03_heatmap_cnn.ipynb",
    "04": "04_csrnet.ipynb",
    "05": "05_evaluation.ipynb",
    "06": "06_count_your_own_image.ipynb",
    "07": "07_your_own_data.ipynb",
    "08": "08_beyond_gaussian_targets.ipynb",
}

#: Report sections: (title, notebook numbers whose figures go there).
SECTIONS = (
    ("Data", ("01",)),
    ("Method", ("02", "03", "04")),
    ("Results", ("05",)),
    ("Counting new photos", ("06",)),
    ("Your own data", ("07",)),
    ("Beyond Gaussian targets", ("08",)),
)

_SPECS = (
    FigureSpec("01_annotated_grid", "Training images with their annotated head points (red).", key=True),
    FigureSpec("01_count_histograms", "Number of annotated heads per image, per part and split.", key=True),
    FigureSpec("01_image_sizes", "Image width against height, coloured by the number of heads."),
    FigureSpec("01_nn_distance_vs_row", "Mean distance from each head to its 3 nearest heads against "
               "its row in the image (train split): the spacing grows towards the bottom "
               "(perspective); it measures head size only in dense crowds (Part A), in sparse "
               "Part B mostly the ground between people."),
    FigureSpec("01_grayscale_example", "One of the grayscale images of the dataset."),
    FigureSpec("02_dense_crop", "A crop of a dense crowd: heads a few pixels apart, too small and "
               "overlapping for a detector."),
    FigureSpec("02_kernels", "Discrete truncated Gaussian kernels against the continuous Gaussian."),
    FigureSpec("02_fixed_vs_adaptive", "Ground-truth density maps with fixed and geometry-adaptive "
               "kernels.", key=True),
    FigureSpec("02_sigma_vs_density", "Adaptive kernel width against the local crowd density."),
    FigureSpec("02_count_errors", "How far each way of making the density map is from the head count."),
    FigureSpec("02_downsampling", "A full-resolution density map and its sum-pooled version at the "
               "network's stride: the count is kept exactly."),
    FigureSpec("03_output_stride", "A crop, its density and the density sum-pooled at several "
               "output strides."),
    FigureSpec("03_receptive_field", "HeatmapCNN: receptive field and jump after each layer."),
    FigureSpec("03_receptive_field_on_image", "What one output cell of HeatmapCNN sees: its cell and "
               "its receptive field on an image.", key=True),
    FigureSpec("03_input_gradient", "Where one output cell looks: the gradient of the output with "
               "respect to the input, with the theoretical receptive field."),
    FigureSpec("03_dilated_tail", "HeatmapCNN's dilated convolutions: which input pixels they read."),
    FigureSpec("03_overfit_one_batch", "Sanity check: the loss when fitting a single batch."),
    FigureSpec("03_history", "HeatmapCNN learning curves: training loss and validation MAE/RMSE "
               "per epoch.", key=True),
    FigureSpec("03_predictions", "HeatmapCNN on validation images: image, true density, predicted "
               "density."),
    FigureSpec("04_effective_kernels", "Dilated 3x3 kernels: which input pixels they read."),
    FigureSpec("04_receptive_field_growth", "Receptive field of stacks of plain and dilated "
               "convolutions."),
    FigureSpec("04_gridding", "Input pixels read by stacks of three dilated 3x3 convolutions: "
               "(2, 2, 2) and (1, 4, 9) leave holes (gridding), (1, 2, 3) and (1, 2, 5) do not."),
    FigureSpec("04_csrnet_coverage", "CSRNet's dilated back end covers its input without holes."),
    FigureSpec("04_overfit_one_batch", "Sanity check: CSRNet's training loss while it fits a "
               "single batch (the _bn variant: CSRNet with batch normalisation)."),
    FigureSpec("04_pretrained_comparison", "CSRNet with and without ImageNet pre-training: learning "
               "curves.", key=True),
    FigureSpec("04_csrnet_history", "CSRNet learning curves: training loss and validation MAE/RMSE "
               "per epoch.", key=True),
    FigureSpec("05_count_scatter", "Predicted against true count per test image, for every model; "
               "the dashed line is a perfect count.", key=True),
    FigureSpec("05_error_by_bucket", "Mean absolute count error per crowd-size bucket, per model.",
               key=True),
    FigureSpec("05_signed_error", "Signed count error (prediction minus truth) against the true "
               "count, per test image: below zero the model undercounts."),
    FigureSpec("05_density_overlay", "The best model's predicted density over a test photo."),
    FigureSpec("05_error_panels", "Ground truth, prediction and their difference (red: too many "
               "people predicted, blue: too few).", key=True),
    FigureSpec("05_points", "Predicted head points: matched (green), false alarms (red crosses) "
               "and missed heads (orange rings).", key=True),
    FigureSpec("05_best_worst", "Test images with the smallest (top) and largest (bottom) count "
               "errors.", key=True),
    FigureSpec("06_overlay_large", "A large photo counted in tiles."),
    FigureSpec("06_overlay", "The predicted density over your own photo, with the count.", key=True),
    FigureSpec("06_heads_vs_threshold", "Number of head points found at each peak threshold."),
    FigureSpec("06_heads", "Head points found in your own photo."),
    FigureSpec("07_annotations", "Made-up images with the head points read back from their LabelMe, "
               "CVAT and VIA exports (one red dot per head)."),
    FigureSpec("07_density_map", "An imported image and its ground-truth density map built by crowd "
               "density build: the map sums to the number of heads."),
    FigureSpec("07_counts", "Held-out images of your own data: predicted against true count, for the "
               "starting model and after fine-tuning on the other images."),
    FigureSpec("08_loss_comparison", "HeatmapCNN trained with pixel MSE on Gaussian maps, the Bayesian "
               "loss and DM-Count: training loss divided by its first epoch's value (the losses have "
               "different units) and validation MAE per epoch.", key=True),
)

#: Every figure the series makes, by stem.
FIGURES: dict[str, FigureSpec] = {s.stem: s for s in _SPECS}

#: The figure sheet's file name (inside ``report/figures``; it is not a figure of its own).
SHEET_NAME = "figure_sheet.pdf"


def notebook_file(number: str) -> str:
    """The notebook file of a two-digit number (``"05"`` -> ``05_evaluation.ipynb``)."""
    return NOTEBOOKS.get(number, f"notebook {number}")


@dataclass(frozen=True)
class FoundFigure:
    """A PNG in ``report/figures``: its path, its catalogue entry (None if unknown) and variant.

    ``variant`` is what follows the catalogue stem (``B`` in ``05_count_scatter_B``, an image
    name in ``06_overlay_IMG_1``), or None.
    """

    path: Path
    spec: FigureSpec | None
    variant: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def caption(self) -> str:
        if self.spec is None:
            return self.name
        if not self.variant:
            return self.spec.caption
        what = f"part {self.variant}" if self.variant in ("A", "B") else f"`{self.variant}`"
        return f"{self.spec.caption.rstrip('.')} ({what})."


def match_figure(stem: str) -> tuple[FigureSpec | None, str | None]:
    """``(spec, variant)`` of a figure file stem: the longest catalogue stem it starts with.

    ``05_count_scatter_B`` -> ``(FIGURES["05_count_scatter"], "B")``; an unknown stem gives
    ``(None, None)``.
    """
    best = None
    for known in FIGURES:
        if (stem == known or stem.startswith(known + "_")) and (best is None or len(known) > len(best)):
            best = known
    if best is None:
        return None, None
    variant = stem[len(best) + 1:] or None
    return FIGURES[best], variant


def figure_caption(stem: str) -> str | None:
    """The caption of a figure file stem (``05_count_scatter_B``), with its variant; None if unknown."""
    spec, variant = match_figure(stem)
    return None if spec is None else FoundFigure(Path(f"{stem}.png"), spec, variant).caption


def _catalogue_order(fig: FoundFigure) -> tuple:
    stems = list(FIGURES)
    return (stems.index(fig.spec.stem), fig.variant or "") if fig.spec else (len(stems), fig.name)


def find_figures(folder: str | Path | None = None) -> tuple[list[FoundFigure], list[FoundFigure]]:
    """The PNG figures in ``folder`` (default ``report/figures``): ``(known, unknown)``.

    Known figures come in catalogue order (:data:`FIGURES`, variants alphabetically), unknown
    ones by name. Hidden and temporary files are ignored.
    """
    folder = Path(folder) if folder is not None else config.report_dir() / "figures"
    if not folder.is_dir():
        return [], []
    found = []
    for path in sorted(folder.glob("*.png")):
        if path.name.startswith("."):
            continue
        spec, variant = match_figure(path.stem)
        found.append(FoundFigure(path, spec, variant))
    known = sorted((f for f in found if f.spec is not None), key=_catalogue_order)
    unknown = sorted((f for f in found if f.spec is None), key=lambda f: f.name)
    return known, unknown


def missing_key_figures(known: Iterable[FoundFigure]) -> dict[str, list[str]]:
    """Key figures (:attr:`FigureSpec.key`) with no file yet: ``{notebook file: [stems]}``."""
    present = {f.spec.stem for f in known if f.spec is not None}
    out: dict[str, list[str]] = {}
    for spec in _SPECS:
        if spec.key and spec.stem not in present:
            out.setdefault(spec.notebook, []).append(spec.stem)
    return out


# --------------------------------------------------------------------------- the report


TODO = "**TODO (student):**"


def _results_table(results_md: str | None) -> str | None:
    """The table and notes of ``results.md`` without its own ``# Results`` heading."""
    if not results_md or not results_md.strip():
        return None
    lines = results_md.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def _evaluation_facts(results: Mapping[str, Any] | None) -> list[str]:
    """Plain facts from ``results.json``: which part and split, how many images per model."""
    if not results:
        return []
    facts = []
    measured = {k: v for k, v in results.items() if isinstance(v, Mapping) and not v.get("published")}
    parts = sorted({str(v.get("part")) for v in measured.values() if v.get("part")})
    splits = sorted({str(v.get("split")) for v in measured.values() if v.get("split")})
    data = sorted({str(v.get("data")) for v in measured.values() if v.get("data")})
    if parts or splits:
        facts.append(f"Evaluated on part {', '.join(parts) or '?'}, {', '.join(splits) or '?'} split"
                     + (f", {', '.join(data)} data" if data else "") + ".")
    for name, s in measured.items():
        mae, rmse = s.get("mae"), s.get("rmse")
        if s.get("images") is not None and mae is not None and math.isfinite(float(mae)):
            rmse_text = "" if rmse is None else f", RMSE {float(rmse):.1f}"
            facts.append(f"{name}: {s['images']} images, MAE {float(mae):.1f}{rmse_text} people per image.")
    published = [k for k, v in results.items() if isinstance(v, Mapping) and v.get("published")]
    if published:
        facts.append(f"{len(published)} published results for comparison (the papers' numbers, not "
                     "reproduced here).")
    return facts


def _embed(fig: FoundFigure, number: int, base: Path) -> str:
    try:
        rel = fig.path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = fig.path.resolve().as_posix()
    return f"![{fig.caption}]({quote(rel)})\n\n*Figure {number}. {fig.caption}*  \n`{fig.path.name}`"


def report_markdown(known: Sequence[FoundFigure], unknown: Sequence[FoundFigure], *,
                    results_md: str | None, results: Mapping[str, Any] | None, base: Path,
                    title: str = "Crowd counting by density-map regression", date: str | None = None) -> str:
    """The report as Markdown. Figure links are relative to ``base`` (the ``report`` folder)."""
    date = date or _dt.date.today().isoformat()
    table = _results_table(results_md)
    missing = missing_key_figures(known)
    out = [
        f"# {title}",
        "",
        f"*Generated by `crowd report` on {date} from the files in `report/`. This file "
        "is rewritten every time the command runs: write your report in a copy (for example "
        "`report/my_report.md`, in this folder so that the figure links keep working). Everything "
        f"marked {TODO} is for you to write.*",
        "",
        "## Summary",
        "",
        f"{TODO} In three to five sentences: the task, the models, the best result on the test set "
        "and the main thing you learned about where the models fail.",
        "",
    ]
    number = 0
    by_section = {nb: [f for f in known if f.spec.stem[:2] == nb] for nb in NOTEBOOKS}
    intro = {
        "Data": f"{TODO} Which dataset and part, how many images in each split, how many people per "
                "image (range, mean), image sizes, and what makes it hard (density, perspective, "
                "occlusion). Notebook 01.",
        "Method": f"{TODO} How the ground-truth density maps are made (kernels, sigma, why the sum "
                  "is the count), the networks (HeatmapCNN, CSRNet: layers, output stride, receptive "
                  "field), the loss and the training recipe (crops, epochs, optimiser, validation). "
                  "Notebooks 02 to 04.",
        "Results": f"{TODO} Which model is best, by how much, and how it compares with the "
                   "baselines and the published numbers. Notebook 05.",
        "Counting new photos": f"{TODO} Optional: what happened on your own photos, and why. Notebook 06.",
        "Your own data": f"{TODO} Optional: how you annotated your own images, and what fine-tuning "
                         "changed on them. Notebook 07.",
        "Beyond Gaussian targets": f"{TODO} Optional: which loss you trained with (MSE on Gaussian "
                                   "maps, Bayesian, DM-Count), chosen on the validation split. "
                                   "Notebook 08.",
    }
    for k, (section, notebooks) in enumerate(SECTIONS, start=1):
        out += [f"## {k}. {section}", "", intro[section], ""]
        if section == "Results":
            if table:
                out += [table, ""]
            else:
                out += ["*The results table is missing: run notebook 05_evaluation.ipynb (it writes "
                        "`report/results.md`).*", ""]
            facts = _evaluation_facts(results)
            if facts:
                out += [f"* {f}" for f in facts] + [""]
        figures = [f for nb in notebooks for f in by_section.get(nb, [])]
        for fig in figures:
            number += 1
            out += [_embed(fig, number, base), ""]
        if not figures:
            made_by = ", ".join(notebook_file(nb) for nb in notebooks)
            out += [f"*No figures yet: run {made_by}.*", ""]
    out += [
        f"## {len(SECTIONS) + 1}. Discussion",
        "",
        "### Where and why the models fail",
        "",
        f"{TODO} Use the error analysis of notebook 05 (signed error per crowd size, the densest and "
        "sparsest images, the perspective bands) and the best/worst images: very dense crowds, "
        "very sparse scenes, small far-away heads, clutter that looks like heads.",
        "",
        "### Counting against localization",
        "",
        f"{TODO} A good count does not mean good head positions: compare MAE with GAME and with "
        "precision/recall/F1 of the predicted points.",
        "",
        "### Limitations",
        "",
        f"{TODO} Training time and data used (quick or full mode), what was not tuned, how many test "
        "images were scored, and what the published numbers were obtained with that you did not do.",
        "",
        "### What I would try next",
        "",
        f"{TODO} Two or three concrete experiments, each with the result you expect and why.",
        "",
    ]
    if unknown:
        out += ["## Other figures", "",
                "Figures in `report/figures` that this template does not know (add them above with a "
                "caption if you use them):", ""]
        for fig in unknown:
            try:
                rel = fig.path.resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                rel = fig.path.resolve().as_posix()
            out.append(f"* [{fig.name}]({quote(rel)})")
        out.append("")
    out += ["## Still missing", ""]
    if table is None:
        out.append("* results table `report/results.md`: run notebook 05_evaluation.ipynb")
    for nb, stems in missing.items():
        out.append(f"* key figures {', '.join(f'`{s}`' for s in stems)}: run {nb}")
    if table is not None and not missing:
        out.append("Nothing: every key figure and the results table are present.")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- figure sheet


def sheet_page(figure: FoundFigure, number: int, title: str | None = None):
    """One page of the figure sheet: a 16:9 slide in the slide style (no pyplot).

    A ``matplotlib.figure.Figure`` of :data:`helpers.viz.common.SLIDE_SIZE` with the fonts of
    :data:`helpers.viz.common.SLIDE_RC`: the PNG fills the page below its caption
    (``number. caption``); the file name and ``title`` are in the bottom right corner.
    """
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    from helpers.viz.common import SLIDE_RC, SLIDE_SIZE

    image = mpimg.imread(figure.path)
    fig = Figure(figsize=SLIDE_SIZE)
    ax = fig.add_axes((0.03, 0.05, 0.94, 0.78))
    ax.imshow(image, interpolation="antialiased")
    ax.set_axis_off()
    head = "\n".join(textwrap.wrap(f"{number}. {figure.caption}", 90))
    fig.suptitle(head, fontsize=SLIDE_RC["font.size"], y=0.975, va="top")
    fig.text(0.99, 0.01, figure.path.name + (f" - {title}" if title else ""), ha="right", va="bottom",
             fontsize=SLIDE_RC["font.size"] // 2, color="0.4")
    return fig


def write_figure_sheet(figures: Sequence[FoundFigure], target: str | Path, *,
                       title: str | None = None, dpi: int = 150) -> int:
    """Write a multi-page PDF with one figure per page (:func:`sheet_page`), atomically.

    ``figures``: PNG figures (:func:`find_figures`). Returns the number of pages
    (``len(figures)``). Writes nothing and returns 0 when ``figures`` is empty.
    """
    if not figures:
        return 0
    from matplotlib.backends.backend_pdf import PdfPages

    from helpers.tools.fileio import atomic_path

    with atomic_path(target, suffix=".pdf") as tmp:
        with PdfPages(tmp) as pdf:
            for k, figure in enumerate(figures, start=1):
                pdf.savefig(sheet_page(figure, k, title), dpi=dpi)
            info = pdf.infodict()
            info["Title"] = title or "Key figures"
    return len(figures)


# --------------------------------------------------------------------------- assembling


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and found."""

    report: Path
    sheet: Path | None
    sheet_pages: int
    figures: list[FoundFigure]
    unknown: list[FoundFigure]
    results: bool
    missing: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"report": str(self.report), "sheet": None if self.sheet is None else str(self.sheet),
                "sheet_pages": self.sheet_pages, "figures": [f.name for f in self.figures],
                "unknown_figures": [f.name for f in self.unknown], "results_table": self.results,
                "missing": self.missing}


def _read_results(folder: Path) -> tuple[str | None, dict[str, Any] | None]:
    md_path, json_path = folder / "results.md", folder / "results.json"
    md = md_path.read_text(encoding="utf-8") if md_path.is_file() else None
    results = None
    if json_path.is_file():
        try:
            value = json.loads(json_path.read_text(encoding="utf-8"))
            results = value if isinstance(value, dict) else None
        except (OSError, ValueError):
            results = None  # an unreadable summary only costs the facts list
    return md, results


def build_report(report_dir: str | Path | None = None, *, title: str = "Crowd counting by density-map regression",
                 all_figures: bool = False, date: str | None = None) -> ReportResult:
    """Write ``report.md`` and ``figures/figure_sheet.pdf`` in ``report_dir`` (default ``report/``).

    The sheet holds the key figures present (every known and unknown figure with
    ``all_figures``); when there is none, no sheet is written (and an old one is removed, so it
    never shows figures that are gone). Both files are written atomically.
    """
    from helpers.tools.fileio import write_text_atomic

    folder = Path(report_dir) if report_dir is not None else config.report_dir()
    if folder.exists() and not folder.is_dir():
        raise CrowdError(f"{folder} is a file, not the report folder; move it away and run again.")
    figures_dir = folder / "figures"
    known, unknown = find_figures(figures_dir)
    results_md, results = _read_results(folder)
    text = report_markdown(known, unknown, results_md=results_md, results=results, base=folder,
                           title=title, date=date)
    report_path = folder / "report.md"
    write_text_atomic(report_path, text)

    sheet_figures = [*known, *unknown] if all_figures else [f for f in known if f.spec.key]
    sheet_path = figures_dir / SHEET_NAME
    pages = write_figure_sheet(sheet_figures, sheet_path, title=title)
    if pages == 0 and sheet_path.exists():
        sheet_path.unlink()
    missing = []
    if _results_table(results_md) is None:
        missing.append("report/results.md (notebook 05_evaluation.ipynb)")
    for nb, stems in missing_key_figures(known).items():
        missing += [f"figure {s} ({nb})" for s in stems]
    return ReportResult(report=report_path, sheet=sheet_path if pages else None, sheet_pages=pages,
                        figures=known, unknown=unknown, results=results_md is not None, missing=missing)


# --------------------------------------------------------------------------- the series' plan


@dataclass(frozen=True)
class Timing:
    """How long a notebook takes in one setting: ``text`` (``"about 25 min"``) and whether it was
    ``measured`` (on the 2-core CPU of the README) or is an estimate (shown as such)."""

    text: str
    measured: bool = True

    def __str__(self) -> str:
        return self.text if self.measured else f"{self.text} (estimate)"


@dataclass(frozen=True)
class NotebookPlan:
    """What a notebook needs from earlier ones, what it writes, and how long it takes.

    ``times`` maps :data:`TIMING_COLUMNS` (``("CPU", "quick")``, ...) to :class:`Timing`.
    """

    number: str
    needs: str
    writes: str
    times: Mapping[tuple[str, str], Timing]

    @property
    def file(self) -> str:
        return notebook_file(self.number)


#: The columns of the time tables: (where, mode).
TIMING_COLUMNS = (("CPU", "quick"), ("CPU", "full"), ("Colab GPU", "quick"), ("Colab GPU", "full"))


def _times(cpu_quick: str, cpu_full: str, gpu_quick: str, gpu_full: str,
           cpu_measured: tuple[bool, bool] = (True, True)) -> dict[tuple[str, str], Timing]:
    """:data:`TIMING_COLUMNS` -> :class:`Timing`; the GPU times are estimates."""
    return dict(zip(TIMING_COLUMNS, (Timing(cpu_quick, cpu_measured[0]), Timing(cpu_full, cpu_measured[1]),
                                     Timing(gpu_quick, False), Timing(gpu_full, False)), strict=True))


#: The series, one entry per notebook. CPU times were measured on a 2-core AMD EPYC (quick: the CI run,
#: whole notebook under nbval, kernel start included; up to 3-4x longer on a busy machine); Colab GPU times are estimates (notebook 04, section 8, derives its own).
PLAN: dict[str, NotebookPlan] = {p.number: p for p in (
    NotebookPlan("01", "nothing (the dataset, or the synthetic crowds made on first use)",
                 "figures `01_*`", _times("about 15 s", "about 30 s", "about 20 s", "about 30 s")),
    NotebookPlan("02", "nothing", "figures `02_*`; in full mode the density cache (`build/cache`, about 2 GB)",
                 _times("about 20 s", "about 2 min", "about 30 s", "about 2 min")),
    NotebookPlan("03", "nothing (02 explains the targets it trains on)",
                 "the run `runs/heatmap_cnn_<part>[_synthetic][_quick]`; figures `03_*`",
                 _times("about 1 min", "about 25 min", "about 1 min", "a few minutes")),
    NotebookPlan("04", "nothing (03 introduces the training loop)",
                 "the run `runs/csrnet_<part>[_synthetic][_quick]` and comparison runs; figures `04_*`",
                 _times("about 1 min", "a 15-minute demonstration (not a real run)", "about 1 min",
                        "minutes to an hour")),
    NotebookPlan("05", "the runs of 03 and 04 (without them: the shipped or a demo model, marked so)",
                 "`report/results.md`, `report/results.json`; figures `05_*`",
                 _times("about 40 s", "10-20 min", "about 30 s", "a few minutes",
                        cpu_measured=(True, False))),
    NotebookPlan("06", "a run of 03 or 04 (without one: the shipped or a demo model, marked so)",
                 "figures `06_*`; your uploads in `build/uploads`",
                 _times("about 15 s", "about 1 min", "about 30 s", "about 30 s")),
    NotebookPlan("07", "nothing (a shipped model or a run of 03 is fine-tuned if there is one)",
                 "a made-up dataset (in the cache folder) and its runs `runs/own_data_demo_*`; figures `07_*`",
                 _times("about 20 s", "about 1 min", "about 1 min", "about 1 min")),
    NotebookPlan("08", "nothing (03 introduces HeatmapCNN and its training)",
                 "the runs `runs/heatmap_cnn_<part>_loss_<mse|bayesian|dm_count>[_synthetic][_quick]`; "
                 "figures `08_*`",
                 _times("about 70 s", "about 1.5 hours (25 min with MSE, up to 1.4x that per point loss)", "about 1 min",
                        "about 15 min",
                        cpu_measured=(True, False))),
)}  # fmt: skip


def _plan(number: str) -> NotebookPlan:
    key = str(number)[:2]
    if key not in PLAN:
        raise CrowdError(f"No notebook {number!r} in the series plan; known: {', '.join(PLAN)}.")
    return PLAN[key]


def plan_markdown(number: str) -> str:
    """The short table a notebook shows under its settings cell: needs, writes, time per mode.

    ``number``: ``"03"`` (or a notebook file name). Markdown, from :data:`PLAN`, the same facts as
    the README table (:func:`plan_table_markdown`).
    """
    plan = _plan(number)
    where = list(dict.fromkeys(w for w, _ in TIMING_COLUMNS))
    lines = [f"**Needs:** {plan.needs}. **Writes:** {plan.writes}.", "",
             "| how long | quick (`QUICK = True`) | full (`QUICK = False`) |", "|---|---|---|"]
    for w in where:
        label = "CPU (measured, 2 cores)" if w == "CPU" else w
        lines.append(f"| {label} | {plan.times[(w, 'quick')]} | {plan.times[(w, 'full')]} |")
    return "\n".join(lines)


def plan_table_markdown() -> str:
    """The README's table of the series: per notebook what it needs and how long it takes."""
    head = " | ".join(f"{m}, {w}" for w, m in TIMING_COLUMNS)
    lines = [f"| notebook | needs | {head} |", "|---|---|" + "---|" * len(TIMING_COLUMNS)]
    for plan in PLAN.values():
        cells = " | ".join(str(plan.times[c]) for c in TIMING_COLUMNS)
        lines.append(f"| {plan.file} | {plan.needs} | {cells} |")
    return "\n".join(lines)


def fallback_banner(runs: Sequence[Any], part: str | None = None) -> str:
    """A loud Markdown banner when results come from a model the student did not train, else ``""``.

    ``runs``: the :class:`helpers.tools.runs.RunInfo` of the models shown; those that are
    shipped with the project or demo models trained automatically
    (:func:`helpers.tools.evaluate.run_origin`) are named, with what to do to get one's own.
    """
    from helpers.tools.evaluate import ORIGINS, run_origin

    borrowed = [r for r in runs if run_origin(r) in ("shipped", "demo")]
    if not borrowed:
        return ""
    where = f" for part {part}" if part else ""
    names = ", ".join(f"`{r.name}` ({ORIGINS[run_origin(r)]})" for r in borrowed)
    return (f"> **⚠ NOT YOUR MODEL{where.upper()}.** These results use {names}: no model of your own "
            f"was found{where}. Train one with notebook 03 (HeatmapCNN) or 04 (CSRNet) and run this "
            "notebook again: your runs are then used, and the rows marked *not yours* in the tables "
            "are these borrowed models.")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``crowd report``: assemble report/report.md (a report template with the
    results table of notebook 05 and every figure in report/figures, with captions and TODO
    headings for your discussion) and report/figures/figure_sheet.pdf (the key figures, one per
    page, for slides). Run the notebooks first; whatever is missing is listed."""
    parser.add_argument("--title", default="Crowd counting by density-map regression", help="report title")
    parser.add_argument("--all-figures", action="store_true",
                        help="put every figure in the sheet, not only the key figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def run(args: argparse.Namespace) -> int:
    """``crowd report``: build the report and print what was written and what is missing."""
    try:
        result = build_report(title=args.title, all_figures=args.all_figures)
    except OSError as exc:
        raise CrowdError(str(exc)) from exc
    if args.json:
        print(json.dumps(result.as_json()))
        return 0
    print(f"wrote {result.report} ({len(result.figures) + len(result.unknown)} figures, results table: "
          f"{'yes' if result.results else 'missing'})")
    if result.sheet is not None:
        print(f"wrote {result.sheet} ({result.sheet_pages} pages)")
    else:
        print("no figure sheet: none of its figures exists yet")
    for item in result.missing:
        print(f"missing: {item}")
    return 0
