"""Scoring a counter on a whole split: per-image rows, dataset metrics, CSV/JSON files, tables.

Everything that counts people is scored by the same code, :func:`evaluate_predictor`: a trained
checkpoint (:func:`evaluate_checkpoint`), the baselines of :mod:`helpers.tools.baselines`, or any
function of your own. A *predictor* is a callable::

    predictor(image) -> (count, density or None, points or None)

with ``image`` an ``H x W x 3`` uint8 RGB array, ``count`` the predicted number of people,
``density`` an ``H x W`` float map of people per pixel (its sum is the count; a coarser map is
taken to be stretched over the whole image) and ``points`` an ``(M, 2)`` array of predicted head
positions ``(x, y)`` in image pixels. GAME needs the map, localization the points; a predictor
that returns ``None`` for one of them gets empty columns there.

Per image (one CSV row): the true and predicted counts, the error ``pred - true`` and its absolute
value, the crowd-size bucket of the true count (:data:`BUCKET_EDGES`), seconds, GAME(0..3)
(:func:`helpers.metrics.game`) two ways, and matched heads ``tp``, false alarms ``fp`` and missed
heads ``fn`` (:func:`helpers.metrics.match_points`) under two matching conventions:

* ``game{L}``: against the ground-truth **density map** (the series' default adaptive kernels,
  :class:`helpers.density.DensityParams`, read from the cache :mod:`helpers.tools.cache`), as the
  field's code (CSRNet, C^3 Framework) computes GAME; ``game{L}_points``: against the number of
  annotated heads in each region (Gaussians cross region borders, so the two differ).
* ``tp_r{r}`` ...: within a fixed radius of ``r`` pixels; ``tp_p2p{delta}`` ...: P2PNet's per-head
  thresholds, ``delta`` x the mean distance from the head to its 3 nearest annotated heads
  (:func:`helpers.metrics.knn_radii`). A checkpoint's peaks are refined within their cell
  (:class:`CheckpointPredictor`).

Over the split (the summary): MAE, RMSE, mean relative error and bias
(:func:`helpers.metrics.counting_summary`), the mean GAME(L) over images (``game`` and
``game_points``), precision / recall / F1 summed over all heads (:class:`LocalizationAccumulator`)
per radius and per delta, and the MAE in each crowd-size bucket; ``conventions`` says all this.

**"MSE" in papers is our RMSE.** Crowd-counting papers print a column called MSE that holds
``sqrt(mean((pred - true)^2))``; the summary calls it ``rmse`` and says so in its ``note``.

Predicted maps are not all kept: a Part A test split at full resolution would hold 182 maps of a
few MB each. ``keep_maps=N`` keeps the images, maps and points of the N best and N worst images
(by absolute error) for figures (:mod:`helpers.viz.evaluation`); ``keep_names`` keeps chosen
images; ``on_image`` sees every image once.

Command line::

    crowd evaluate --checkpoint runs/NAME/best.pt --part B [--split test] [--limit N]
        [--csv PATH] [--device D] [--threshold T]
    crowd evaluate --baseline mean|hog --part B [--split test] [--limit N] [--csv PATH]

prints one JSON object (the summary, with the CSV and JSON paths) and writes the per-image CSV
(default ``<run folder>/eval_<part>_<split>.csv`` next to the checkpoint, ``runs/baselines/...``
for a baseline; ``_n<N>`` is added to the name when only N images of the split were used) and the
summary beside it as ``.json``. Quick mode (``CROWD_QUICK=1``) scores :data:`QUICK_IMAGES` images
spread over the split.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import io
import json
import math
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers import config
from helpers.errors import CrowdError
from helpers.metrics import METHODS, Matching, match_points, scores_from_counts

#: Matching radii (image pixels) for localization scores.
DEFAULT_RADII = (4, 8, 16)
#: P2PNet's per-head thresholds (Song et al., ICCV 2021): delta x the mean distance to 3 nearest heads.
P2P_DELTAS = (0.5, 0.25)
#: GAME levels reported: L = 0 (the count error) to 3 (an 8 x 8 grid of regions).
GAME_LEVELS = (0, 1, 2, 3)
#: Lower edges of the crowd-size buckets (true number of people in the image).
BUCKET_EDGES = (0, 50, 100, 250, 500, 1000)
#: Images scored in quick mode (spread evenly over the split) unless ``limit`` says otherwise.
QUICK_IMAGES = 20
NOTE = (
    "rmse is the root mean squared count error, sqrt(mean((pred - true)^2)); crowd-counting "
    "papers print this number in a column called MSE."
)

CONVENTIONS = {
    "game": "GAME(L) against the ground-truth density maps (adaptive kernels: sigma = 0.3 x mean "
            "distance to the 3 nearest heads), as the field's code computes it",
    "game_points": "point GAME(L): against the number of annotated heads in each region",
    "per_radius": "one-to-one matching of predicted and annotated heads within r pixels",
    "per_delta": "P2PNet's convention: one-to-one matching within delta x the mean distance from "
                 "each annotated head to its 3 nearest annotated heads (one head: 16 px)",
}

Predictor = Callable[[np.ndarray], tuple[float, "np.ndarray | None", "np.ndarray | None"]]


# --------------------------------------------------------------------------- buckets


def bucket_labels(edges: Sequence[int] = BUCKET_EDGES) -> list[str]:
    """Names of the crowd-size buckets: ``["0-49", "50-99", ..., "1000+"]`` for the defaults."""
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bucket edges must start at 0 and increase, got {edges}")
    labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)]
    return labels + [f"{edges[-1]}+"]


def bucket_of(true_count: float, edges: Sequence[int] = BUCKET_EDGES) -> str:
    """The bucket label of an image with ``true_count`` people (see :func:`bucket_labels`)."""
    labels = bucket_labels(edges)
    k = int(np.searchsorted(np.asarray(edges, dtype=np.float64), float(true_count), side="right")) - 1
    return labels[max(0, k)]


def _rkey(radius: float) -> str:
    """A radius as it appears in column names and JSON keys: 4.0 -> "4", 2.5 -> "2.5"."""
    return f"{float(radius):g}"


def match_columns(radii: Iterable[float] = DEFAULT_RADII, deltas: Iterable[float] = P2P_DELTAS) -> list[str]:
    """Suffixes of the tp/fp/fn columns: ``r4`` (within 4 px), ..., ``p2p0.5`` (P2PNet, delta 0.5)."""
    return [f"r{_rkey(r)}" for r in radii] + [f"p2p{_rkey(d)}" for d in deltas]


# --------------------------------------------------------------------------- results


@dataclass(eq=False)
class KeptImage:
    """One scored image kept for figures (all arrays in the original image's pixels).

    ``image`` ``H x W x 3`` uint8; ``true_points`` ``(N, 2)`` annotated heads; ``density``
    ``H x W`` predicted people per pixel (or None); ``points`` ``(M, 2)`` predicted heads (or
    None); ``row`` the image's CSV row.
    """

    name: str
    image: np.ndarray = field(repr=False)
    true_points: np.ndarray = field(repr=False)
    density: np.ndarray | None = field(repr=False)
    points: np.ndarray | None = field(repr=False)
    row: dict[str, Any] = field(repr=False)

    @property
    def true_count(self) -> int:
        return int(self.row["true_count"])

    @property
    def pred_count(self) -> float:
        return float(self.row["pred_count"])

    @property
    def abs_error(self) -> float:
        return float(self.row["abs_error"])


@dataclass(eq=False)
class EvaluationResult:
    """Rows (one dict per image, the CSV), the summary (JSON-ready) and the kept images.

    ``best`` holds the kept images with the smallest absolute error (smallest first), ``worst``
    those with the largest (largest first), ``named`` the images asked for by name.
    """

    model: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    radii: tuple[float, ...] = DEFAULT_RADII
    best: list[KeptImage] = field(default_factory=list)
    worst: list[KeptImage] = field(default_factory=list)
    named: dict[str, KeptImage] = field(default_factory=dict)

    @property
    def true_counts(self) -> np.ndarray:
        """``(n,)`` float64 annotated counts, in row order."""
        return np.array([r["true_count"] for r in self.rows], dtype=np.float64)

    @property
    def pred_counts(self) -> np.ndarray:
        """``(n,)`` float64 predicted counts, in row order."""
        return np.array([r["pred_count"] for r in self.rows], dtype=np.float64)

    @property
    def kept(self) -> list[KeptImage]:
        """Every kept image once, by increasing absolute error."""
        seen: dict[int, KeptImage] = {}
        for k in [*self.best, *self.worst, *self.named.values()]:
            seen[id(k)] = k
        return sorted(seen.values(), key=lambda k: k.abs_error)


class _Keeper:
    """Holds at most ``n`` best and ``n`` worst images (by absolute error) while scoring."""

    def __init__(self, n: int, names: Collection[str]) -> None:
        self.n = int(n)
        self.names = set(names)
        self._best: list[tuple[float, int, KeptImage]] = []  # max-heap on error via -error
        self._worst: list[tuple[float, int, KeptImage]] = []  # min-heap on error
        self.named: dict[str, KeptImage] = {}
        self._seq = 0

    def wants(self, name: str, error: float) -> bool:
        if name in self.names:
            return True
        if self.n <= 0:
            return False
        if len(self._best) < self.n or len(self._worst) < self.n:
            return True
        return error < -self._best[0][0] or error > self._worst[0][0]

    def add(self, kept: KeptImage) -> None:
        err, seq = kept.abs_error, self._seq
        self._seq += 1
        if kept.name in self.names:
            self.named[kept.name] = kept
        if self.n <= 0:
            return
        # ties keep the earlier image (a lower sequence number wins)
        if len(self._best) < self.n:
            heapq.heappush(self._best, (-err, seq, kept))
        elif err < -self._best[0][0]:
            heapq.heapreplace(self._best, (-err, seq, kept))
        if len(self._worst) < self.n:
            heapq.heappush(self._worst, (err, -seq, kept))
        elif err > self._worst[0][0]:
            heapq.heapreplace(self._worst, (err, -seq, kept))

    def best(self) -> list[KeptImage]:
        return [k for _, _, k in sorted(self._best, key=lambda t: (-t[0], t[1]))]

    def worst(self) -> list[KeptImage]:
        return [k for _, _, k in sorted(self._worst, key=lambda t: (-t[0], -t[1]))]


# --------------------------------------------------------------------------- scoring


def _check_output(out: Any) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """Validate a predictor's ``(count, density, points)``."""
    if not isinstance(out, tuple) or len(out) != 3:
        raise ValueError("a predictor must return a tuple (count, density or None, points or None)")
    count, density, points = out
    count = float(count)
    if not math.isfinite(count):
        raise CrowdError(f"The predictor returned a count of {count}; it must be a finite number.")
    if density is not None:
        density = np.asarray(density)
        if density.ndim != 2:
            raise ValueError(f"a predicted density must be a 2-D map, got shape {density.shape}")
    if points is not None:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return count, density, points


def _score_image(name: str, true_points: np.ndarray, shape: tuple[int, int], count: float,
                 density: np.ndarray | None, points: np.ndarray | None, acc: LocalizationAccumulator,
                 seconds: float, edges: Sequence[int], true_density: np.ndarray | None) -> dict[str, Any]:
    """The CSV row of one image (its matches are added to ``acc`` when there are points)."""
    from helpers.metrics import game_levels

    true = int(len(true_points))
    row: dict[str, Any] = {
        "name": name,
        "true_count": true,
        "pred_count": count,
        "error": count - true,
        "abs_error": abs(count - true),
        "bucket": bucket_of(true, edges),
    }
    for suffix, truth, kind in (("", true_density, "density"), ("_points", true_points, "points")):
        games = {} if density is None or truth is None else game_levels(
            density, truth, GAME_LEVELS, image_shape=shape, truth_kind=kind)
        row.update({f"game{level}{suffix}": games.get(level, float("nan")) for level in GAME_LEVELS})
    matches = acc.add(points, true_points) if points is not None else {}
    for key in acc.columns:
        m = matches.get(key)
        row.update({f"{k}_{key}": None if m is None else getattr(m, k) for k in ("tp", "fp", "fn")})
    row["seconds"] = float(seconds)
    return row


class LocalizationAccumulator:
    """Dataset-level localization: tp, fp, fn summed over images, then precision, recall, F1.

    The micro-average: every head weighs the same, so a crowded image counts more than a sparse
    one. ``acc = LocalizationAccumulator((4, 8, 16)); acc.add(pred_points, true_points)`` per
    image; ``acc.scores()`` gives ``{"precision", "recall", "f1"}`` (means over the radii),
    ``"per_radius": {r: scores_from_counts(...)}``, ``"per_delta": {delta: ...}`` (P2PNet's
    per-head thresholds, :func:`helpers.metrics.knn_radii`) and ``"images"``.
    """

    def __init__(self, radii: Iterable[float] = (4, 8, 16), method: str = "hungarian",
                 deltas: Iterable[float] = P2P_DELTAS) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.radii = tuple(float(r) for r in radii)
        self.deltas = tuple(float(d) for d in deltas)
        if not self.radii:
            raise ValueError("need at least one radius")
        self.method = method
        self.images = 0
        self.columns = match_columns(self.radii, self.deltas)
        self.counts = {key: [0, 0, 0] for key in self.columns}

    def add(self, pred, true) -> dict[str, Matching]:
        """Match one image's points under every convention and add the counts.

        Returns the matchings by column suffix (:func:`match_columns`: ``"r8"``, ``"p2p0.5"``).
        """
        from helpers.metrics import knn_radii

        spacing = knn_radii(true, delta=1.0)  # d_n: mean distance to the 3 nearest heads
        limits = [*self.radii, *(d * spacing for d in self.deltas)]
        out = {key: match_points(pred, true, limit, method=self.method)
               for key, limit in zip(self.columns, limits, strict=True)}
        for key, m in out.items():
            self.counts[key] = [self.counts[key][0] + m.tp, self.counts[key][1] + m.fp, self.counts[key][2] + m.fn]
        self.images += 1
        return out

    def scores(self) -> dict:
        """Micro-averaged scores per radius and per delta, the means over radii, and ``images``."""
        per = {r: scores_from_counts(*self.counts[f"r{_rkey(r)}"]) for r in self.radii}
        means = {k: float(np.mean([s[k] for s in per.values()])) for k in ("precision", "recall", "f1")}
        per_delta = {d: scores_from_counts(*self.counts[f"p2p{_rkey(d)}"]) for d in self.deltas}
        return {**means, "per_radius": per, "per_delta": per_delta, "images": self.images}


def true_density(record, params=None) -> np.ndarray:
    """The ground-truth map GAME is scored against: ``H x W`` float32 people per pixel.

    ``params``: :class:`helpers.density.DensityParams` (default: the series' adaptive kernels).
    Read from the HDF5 cache (:func:`helpers.tools.cache.load_density`, built on first use);
    when the cache cannot be written, the same map is computed and not stored.
    """
    from helpers.density import DensityParams, compute_density
    from helpers.errors import CacheError
    from helpers.tools.cache import load_density

    params = DensityParams() if params is None else params
    try:
        return load_density(record, params)
    except CacheError:
        return compute_density(record, params)


def evaluate_predictor(
    predictor: Predictor,
    records: Sequence,
    *,
    name: str = "model",
    radii: Iterable[float] = DEFAULT_RADII,
    deltas: Iterable[float] = P2P_DELTAS,
    density_fn: Callable[..., np.ndarray] = true_density,
    keep_maps: int = 0,
    keep_names: Collection[str] = (),
    on_image: Callable[[KeptImage], None] | None = None,
    bucket_edges: Sequence[int] = BUCKET_EDGES,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Score ``predictor`` (module docstring) on every record, in order, with the shared metrics.

    ``records``: :class:`helpers.data.ImageRecord` list (each is read with
    :func:`helpers.data.load_example`, so the true points follow the dataset's point policy).
    ``keep_maps``: keep the ``N`` best and ``N`` worst images for figures; ``keep_names``: keep
    these images too; ``on_image(kept)`` is called with every image (do not store them all).
    ``settings``: extra facts copied into ``summary["settings"]``. ``radii``: fixed matching
    radii in pixels; ``deltas``: P2PNet's per-head thresholds; ``density_fn(record)``: the true
    density map of a record for GAME (default :func:`true_density`; only called for
    predictors that return a map).
    """
    from tqdm.auto import tqdm

    from helpers.data import load_example

    radii = tuple(float(r) for r in radii)
    if not radii:
        raise ValueError("need at least one matching radius")
    acc = LocalizationAccumulator(radii, deltas=deltas)
    keeper = _Keeper(keep_maps, keep_names)
    rows: list[dict[str, Any]] = []
    any_points = False
    for record in tqdm(list(records), desc=f"evaluating {name}", unit="img", disable=not progress):
        example = load_example(record)
        image = example.image
        shape = image.shape[:2]
        t0 = time.perf_counter()
        count, density, points = _check_output(predictor(image))
        seconds = time.perf_counter() - t0
        any_points = any_points or points is not None
        truth = density_fn(record) if density is not None else None
        row = _score_image(record.name, example.points, shape, count, density, points, acc,
                           seconds, bucket_edges, truth)
        rows.append(row)
        if on_image is not None or keeper.wants(record.name, row["abs_error"]):
            kept = KeptImage(record.name, image, example.points, density, points, row)
            keeper.add(kept)
            if on_image is not None:
                on_image(kept)
    summary = summarize(rows, radii, name=name, bucket_edges=bucket_edges, deltas=acc.deltas,
                        localization=acc.scores() if any_points else None)
    if settings:
        summary["settings"] = dict(settings)
    return EvaluationResult(model=name, rows=rows, summary=summary, radii=radii,
                            best=keeper.best(), worst=keeper.worst(), named=keeper.named)


def _game_means(rows: Sequence[Mapping[str, Any]], suffix: str) -> dict[str, float] | None:
    """Mean of the rows' ``game{L}{suffix}`` columns per level; None if any value is missing."""
    means = {}
    for level in GAME_LEVELS:
        values = np.array([_num(r.get(f"game{level}{suffix}")) for r in rows], dtype=np.float64)
        if not values.size or not np.isfinite(values).all():
            return None
        means[str(level)] = float(values.mean())
    return means


def _summed_scores(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """Scores of the rows' ``tp_{key}``, ``fp_{key}``, ``fn_{key}`` sums; None if any is missing."""
    sums = []
    for kind in ("tp", "fp", "fn"):
        vals = [_num(r.get(f"{kind}_{key}")) for r in rows]
        if not vals or not np.isfinite(vals).all():
            return None
        sums.append(int(sum(vals)))
    return scores_from_counts(*sums)


def summarize(rows: Sequence[Mapping[str, Any]], radii: Iterable[float] = DEFAULT_RADII, *,
              name: str = "model", bucket_edges: Sequence[int] = BUCKET_EDGES,
              localization: Mapping[str, Any] | None = None,
              deltas: Iterable[float] = P2P_DELTAS) -> dict[str, Any]:
    """The dataset metrics of per-image rows (also works on rows read back from a CSV).

    ``localization``: precomputed :meth:`LocalizationAccumulator.scores`; by default the scores
    are recomputed from the rows' ``tp_r/fp_r/fn_r`` and ``tp_p2p...`` columns (the same sums).
    Missing values (NaN GAME, empty match counts) leave those metrics as None. Rows of CSVs
    written before the density-map GAME (``game{L}`` but no ``game{L}_points``) held point
    GAME: it is read as ``game_points``.
    """
    from helpers.metrics import counting_summary

    radii = tuple(float(r) for r in radii)
    pred = np.array([float(r["pred_count"]) for r in rows], dtype=np.float64)
    true = np.array([float(r["true_count"]) for r in rows], dtype=np.float64)
    counts = counting_summary(pred, true)
    out: dict[str, Any] = {"model": name, "images": counts["n"]}
    out.update({k: counts[k] for k in ("mae", "rmse", "mre", "n_mre", "bias", "mean_true", "mean_pred")})

    legacy = bool(rows) and "game0" in rows[0] and "game0_points" not in rows[0]
    out["game"] = None if legacy else _game_means(rows, "")
    out["game_points"] = _game_means(rows, "" if legacy else "_points")

    deltas = tuple(float(d) for d in deltas)
    if localization is None:
        per = {r: _summed_scores(rows, f"r{_rkey(r)}") for r in radii}
        per_delta = {d: _summed_scores(rows, f"p2p{_rkey(d)}") for d in deltas}
        if per and all(v is not None for v in per.values()):
            localization = {k: float(np.mean([s[k] for s in per.values()])) for k in ("precision", "recall", "f1")}
            localization["per_radius"] = per
            localization["per_delta"] = per_delta if all(v is not None for v in per_delta.values()) else None
    if localization is not None:
        per_delta = localization.get("per_delta")
        out["localization"] = {
            "radii": [float(r) for r in radii],
            "precision": float(localization["precision"]),
            "recall": float(localization["recall"]),
            "f1": float(localization["f1"]),
            "per_radius": {_rkey(r): dict(s) for r, s in localization["per_radius"].items()},
            "deltas": list(deltas) if per_delta else None,
            "per_delta": {_rkey(d): dict(s) for d, s in per_delta.items()} if per_delta else None,
        }
    else:
        out["localization"] = None

    buckets = []
    for label in bucket_labels(bucket_edges):
        sel = np.array([r["bucket"] == label for r in rows], dtype=bool)
        if sel.any():
            err = pred[sel] - true[sel]
            buckets.append({"bucket": label, "images": int(sel.sum()), "mae": float(np.abs(err).mean()),
                            "rmse": float(np.sqrt(np.mean(err**2))), "mean_true": float(true[sel].mean())})
    out["buckets"] = buckets
    secs = np.array([_num(r.get("seconds")) for r in rows], dtype=np.float64)
    secs = secs[np.isfinite(secs)]
    out["seconds_per_image"] = float(secs.mean()) if secs.size else None
    out["note"] = NOTE
    out["conventions"] = dict(CONVENTIONS)
    return out


def _num(value: Any) -> float:
    """A CSV or row value as a float (empty / None -> NaN)."""
    if value is None or value == "":
        return float("nan")
    return float(value)


# --------------------------------------------------------------------------- checkpoints


def select_records(part: str, split: str = "test", root: str | Path | None = None,
                   limit: int | None = None) -> list:
    """The records of a split; at most ``limit`` spread evenly over it (quick mode: 20)."""
    from helpers.data import list_records, take_evenly

    if limit is not None and int(limit) < 1:
        raise CrowdError(f"--limit must be at least 1 image, got {limit}")
    records = list_records(part, split, root)
    if not records:
        raise CrowdError(f"Part {part} {split} split has no images; check the dataset folder.")
    if limit is None and config.quick_mode():
        limit = QUICK_IMAGES
    return take_evenly(records, None if limit is None else int(limit))


class CheckpointPredictor:
    """A predictor (module docstring) that runs a trained checkpoint.

    The image is first resized by ``resize`` (default: the ``resize`` the checkpoint was trained
    and validated at, from its stored config, made as :class:`helpers.samples.CrowdDataset` makes
    it), then counted by :func:`helpers.predict.count` (whole image padded to a multiple of 8,
    tiled only beyond 2.5 MP). The density is brought back to the original ``H x W`` with
    mass-preserving area resampling and the points are scaled back, so every metric is in the
    original image's pixels. ``threshold`` (people per 8 x 8 cell): head points are the local
    maxima above it; None takes the ``round(count)`` strongest maxima. ``refine`` (default True)
    moves each head point from its cell's centre to the mass-weighted centroid of the 3 x 3
    cells around it (``refine`` of :func:`helpers.predict.count`): at stride 8 a centre is up to 4
    px off per axis.

    Attributes: ``model`` (eval mode), ``info`` (:class:`helpers.tools.checkpoints.CheckpointInfo`),
    ``device``, ``resize``, ``threshold``, ``refine``.
    """

    def __init__(self, checkpoint: str | Path, *, device: Any = None, threshold: float | None = None,
                 resize: float | None = None, refine: bool = True) -> None:
        from helpers.tools.checkpoints import load_model

        self.device = config.pick_device(None if device is None else str(device))
        self.model, self.info = load_model(checkpoint, self.device)
        factor = float(self.info.config.get("resize", 1.0) if resize is None else resize)
        if not 0 < factor <= 4:
            raise CrowdError(f"resize must be in (0, 4], got {factor}")
        self.resize = factor
        self.threshold = threshold
        self.refine = bool(refine)

    def __call__(self, image: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        from helpers.predict import count

        pred = count(image, self.model, scale=self.info.scale, input_scale=self.resize,
                     device=self.device, threshold=self.threshold, refine=self.refine)
        return pred.count, pred.density, np.asarray(pred.points, dtype=np.float64).reshape(-1, 2)


def evaluate_checkpoint(
    checkpoint: str | Path,
    part: str,
    split: str = "test",
    *,
    root: str | Path | None = None,
    limit: int | None = None,
    device: Any = None,
    radii: Iterable[float] = DEFAULT_RADII,
    threshold: float | None = None,
    refine: bool = True,
    progress: bool = True,
    keep_maps: int = 0,
    keep_names: Collection[str] = (),
    on_image: Callable[[KeptImage], None] | None = None,
    name: str | None = None,
) -> EvaluationResult:
    """Score a trained checkpoint on ``part``/``split`` (see :class:`CheckpointPredictor`).

    ``limit``: at most this many images, spread over the split (quick mode: 20). ``name``: the
    model's name in tables (default ``<model_name> (<run folder>)``). ``threshold``, ``refine``:
    how head points are read off the map (:class:`CheckpointPredictor`). The other arguments are
    those of :func:`evaluate_predictor`. Raises :class:`CrowdError` for an unreadable checkpoint
    or a missing dataset.
    """
    records = select_records(part, split, root, limit)
    predictor = CheckpointPredictor(checkpoint, device=device, threshold=threshold, refine=refine)
    info = predictor.info
    path = Path(checkpoint)
    label = name or f"{info.model_name} ({path.parent.name or path.stem})"
    settings = {
        "checkpoint": str(path), "model_name": info.model_name, "epoch": info.epoch,
        "resize": predictor.resize, "threshold": threshold, "refine": predictor.refine, "part": str(part).upper(),
        "split": split, "device": str(predictor.device),
    }
    result = evaluate_predictor(predictor, records, name=label, radii=radii, keep_maps=keep_maps,
                                keep_names=keep_names, on_image=on_image, progress=progress,
                                settings=settings)
    result.summary.update({"part": str(part).upper(), "split": split})
    return result


# --------------------------------------------------------------------------- every trained run

#: Where a model comes from (:func:`run_origin`), as the results tables say it.
ORIGINS = {"own": "your run", "quick": "your quick smoke run",
           "demo": "demo model trained automatically, not yours",
           "shipped": "shipped with the project, not yours"}


def run_origin(run) -> str:
    """``"shipped"``, ``"demo"``, ``"quick"`` or ``"own"`` for a :class:`helpers.tools.runs.RunInfo`.

    Shipped: the project's trained model (``run.shipped``); demo: trained automatically when no
    run existed (:func:`helpers.tools.runs.demo_folder`, ``..._demo``); quick: a run of the
    student's own on few images (``run.demo``, quick mode); own: any other run.
    """
    if getattr(run, "shipped", False):
        return "shipped"
    folder = Path(run.name).name
    if folder.endswith("_demo") or folder.endswith("_demo_synthetic"):
        return "demo"
    return "quick" if run.demo else "own"


def run_label(run) -> str:
    """A run's name in tables and legends: ``HeatmapCNN (heatmap_cnn_B_quick)``."""
    return f"{run.title} ({run.name})"


def choose_runs(source=None, *, parts: Sequence[str] = ("A", "B"), all_runs: bool = False,
                fallback_parts: Sequence[str] = ("B",), root: str | Path | None = None) -> dict[str, list]:
    """The runs notebook 05 evaluates, per part: ``{part: [RunInfo, ...]}``.

    Per part, :func:`helpers.tools.runs.models_to_show`: the best validated run of each model
    trained on the same kind of data as ``source`` (default :func:`helpers.data.resolve_data_source`),
    with the shipped model beside them when they are only quick runs (``all_runs``: every
    validated run instead of the best of each model). A part in ``fallback_parts`` with no run
    gets the shipped model, or on synthetic data a demo model trained now (:func:`run_origin`
    says which); other parts without a run of the student's own are left out. ``root``: the runs
    folder (default ``runs/``).
    """
    from helpers.data import resolve_data_source
    from helpers.tools import runs

    source = source if source is not None else resolve_data_source()
    kind = runs.SYNTHETIC if source.synthetic else runs.SHANGHAITECH
    found = [r for r in runs.find_runs(root) if r.ok and r.best_val_mae is not None and r.data == kind]
    out: dict[str, list] = {}
    for part in [str(p).strip().upper().removeprefix("PART_") for p in parts]:
        own = [r for r in found if r.part == part]
        fallback = part in [str(p).upper() for p in fallback_parts]
        if not own and not fallback:
            continue
        shown = [r for r in runs.models_to_show(part, source, root=root, train_if_missing=fallback)
                 if r.ok and not (r.shipped and source.synthetic)]  # the shipped models saw real photos
        if not shown and fallback:
            shown = [runs.run_info(runs.ensure_checkpoint("heatmap_cnn", part, source=source, root=root), root)]
        if all_runs:
            paths = {r.path.resolve() for r in own}
            shown = own + [r for r in shown if r.path.resolve() not in paths]
        if shown:
            out[part] = shown
    return out


def evaluate_runs(chosen: Mapping[str, Sequence], split: str = "test", *, root: str | Path | None = None,
                  limit: int | None = None, keep_maps: int = 0,
                  on_image: Callable[[str], Callable[[KeptImage], None] | None] | None = None,
                  progress: bool = True) -> dict[str, dict[str, EvaluationResult]]:
    """Score every run of :func:`choose_runs` on its own part's ``split``: ``{part: {label: result}}``.

    Labels are :func:`run_label`; each summary gets ``part``, ``split``, ``run`` and ``origin``
    (:func:`run_origin`, shown by :func:`results_table`). ``on_image(label)`` may return a
    callback for that model's images (e.g. a :class:`helpers.tools.report.BandCounter`).
    """
    out: dict[str, dict[str, EvaluationResult]] = {}
    for part, part_runs in chosen.items():
        for run in part_runs:
            label = run_label(run)
            result = evaluate_checkpoint(run.path, part, split, root=root, limit=limit, progress=progress,
                                         keep_maps=keep_maps, name=label,
                                         on_image=None if on_image is None else on_image(label))
            result.summary.update({"run": run.name, "origin": run_origin(run)})
            out.setdefault(part, {})[label] = result
    return out


def part_tables(per_part: Mapping[str, Mapping[str, Any]], split: str = "test") -> str:
    """One Markdown table per part (:func:`results_table`), each under a ``### Part X`` heading."""
    blocks = [f"### Part {part}, {split} split\n\n{results_table(results)}" for part, results in per_part.items()]
    return "\n".join(blocks) if blocks else "(no trained runs to evaluate)\n"


# --------------------------------------------------------------------------- files


def _cell(value: Any) -> str:
    """A CSV cell: exact floats (repr), empty for None/NaN."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(float(value)) else repr(float(value))
    return str(value)


def csv_text(result: EvaluationResult | Sequence[Mapping[str, Any]]) -> str:
    """The per-image rows as CSV text (header first; floats written exactly)."""
    rows = result.rows if isinstance(result, EvaluationResult) else list(result)
    buffer = io.StringIO()
    if rows:
        columns = list(rows[0].keys())
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def write_csv(result: EvaluationResult | Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the per-image rows to ``path`` atomically; returns the path."""
    from helpers.tools.fileio import write_text_atomic

    path = Path(path)
    write_text_atomic(path, csv_text(result))
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by :func:`write_csv`: numbers as int/float, empty cells as None."""
    path = Path(path)
    if not path.is_file():
        raise CrowdError(f"Evaluation file {path} does not exist; run crowd evaluate first.")
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if key in ("name", "bucket"):
                    row[key] = text
                elif text == "":
                    row[key] = None
                else:
                    try:
                        row[key] = int(text)
                    except ValueError:
                        row[key] = float(text)
            out.append(row)
    return out


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf as None, numpy numbers as Python numbers and keys as strings."""
    if isinstance(obj, Mapping):
        return {str(_rkey(k) if isinstance(k, float) else k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_summary(result: EvaluationResult | Mapping[str, Any], path: str | Path) -> Path:
    """Write the summary as JSON to ``path`` atomically; returns the path."""
    from helpers.tools.fileio import write_json_atomic

    summary = result.summary if isinstance(result, EvaluationResult) else result
    path = Path(path)
    write_json_atomic(path, jsonable(summary))
    return path


# --------------------------------------------------------------------------- tables


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else "–"


def _summary_of(item: Any) -> Mapping[str, Any]:
    return item.summary if isinstance(item, EvaluationResult) else item


def results_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: MAE, RMSE (papers' "MSE"), GAME(1..3) against the density ground truth,
    point GAME(3), F1 within 8 px and with P2PNet's per-head thresholds (delta 0.5).

    When a summary says where its model comes from (``origin``, :func:`run_origin`), a "Trained"
    column says it, in bold for models the student did not train (shipped or demo).

    ``results`` maps a model name to its summary (or :class:`EvaluationResult`); missing
    metrics show as "–" (e.g. published numbers, which only give MAE and MSE, see
    :func:`helpers.tools.baselines.published_summaries`).
    """
    origins = any(_summary_of(item).get("origin") for item in results.values())
    header = ("| Model | Images | MAE | RMSE (papers: \"MSE\") | GAME(1), density GT | GAME(2), density GT "
              "| GAME(3), density GT | point GAME(3) | F1 @ 8 px | F1 (P2PNet, δ=0.5) |"
              + (" Trained |" if origins else "") + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              + ("---|" if origins else ""))
    lines = [header]
    for model, item in results.items():
        s = _summary_of(item)
        game, game_points = s.get("game") or {}, s.get("game_points") or {}
        loc = s.get("localization") or {}
        f1 = ((loc.get("per_radius") or {}).get("8") or {}).get("f1")
        f1_p2p = ((loc.get("per_delta") or {}).get("0.5") or {}).get("f1")
        images = s.get("images")
        cells = [
            str(model).replace("|", "\\|"),
            "–" if images is None else str(images),
            _fmt(s.get("mae")),
            _fmt(s.get("rmse")),
            *[_fmt(game.get(str(level))) for level in (1, 2, 3)],
            _fmt(game_points.get("3")),
            _fmt(f1, 3),
            _fmt(f1_p2p, 3),
        ]
        if origins:
            origin = ORIGINS.get(s.get("origin") or "", "")
            cells.append(f"**{origin}**" if "not yours" in origin else origin)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Any], report_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report/results.md`` (the table and notes) and ``report/results.json`` atomically.

    Returns the two paths. ``report_dir`` defaults to :func:`helpers.config.report_dir`.
    """
    from helpers.tools.fileio import write_json_atomic, write_text_atomic

    folder = Path(report_dir) if report_dir is not None else config.report_dir()
    md = (
        "# Results\n\n"
        + results_table(results)
        + "\nMAE and RMSE in people per image. RMSE is the root mean squared count error, the "
        "number papers print in their column called MSE. GAME(L): mean over images of the summed "
        "absolute count error over a 2^L x 2^L grid of regions; \"density GT\": the true count of a "
        "region is the mass of the ground-truth density map in it (adaptive Gaussian kernels), as "
        "the field's code computes GAME; \"point GAME\": the number of annotated heads in it "
        "(larger, because a head's Gaussian spreads over region borders). F1 @ 8 px: predicted "
        "heads matched one-to-one to annotated heads within 8 pixels; F1 (P2PNet, δ=0.5): within "
        "0.5 x the mean distance from each head to its 3 nearest annotated heads (Song et al., "
        "ICCV 2021). Rows marked \"published\" are the papers' own numbers, not reproduced here.\n"
    )
    md_path, json_path = folder / "results.md", folder / "results.json"
    write_text_atomic(md_path, md)
    write_json_atomic(json_path, jsonable({k: _summary_of(v) for k, v in results.items()}))
    return md_path, json_path


# --------------------------------------------------------------------------- command line


def default_csv_path(part: str, split: str, n_used: int, n_split: int, *,
                     checkpoint: str | Path | None = None, baseline: str | None = None) -> Path:
    """``<run>/eval_<part>_<split>.csv`` (checkpoint) or ``runs/baselines/<name>_<part>_<split>.csv``.

    ``_n<N>`` is appended to the stem when only ``N`` of the split's images were scored.
    """
    suffix = f"_n{n_used}" if n_used < n_split else ""
    if checkpoint is not None:
        return Path(checkpoint).parent / f"eval_{part}_{split}{suffix}.csv"
    return config.runs_root() / "baselines" / f"{baseline}_{part}_{split}{suffix}.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``crowd evaluate``: score a trained checkpoint or a baseline on a split.

    Prints one JSON object with MAE, RMSE, GAME(0-3) against the density ground truth and against
    point counts, precision/recall/F1 at each matching radius and with P2PNet's per-head
    thresholds, and the MAE per crowd-size bucket; writes a per-image CSV and the JSON summary.
    Crowd-counting papers call the RMSE 'MSE' (it is the root of the mean squared error).
    """
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a checkpoint written by crowd train (best.pt / last.pt)")
    what.add_argument("--baseline", choices=["mean", "hog"],
                      help="mean: the mean count of the fit split for every image; hog: OpenCV's "
                      "HOG pedestrian detector")
    p.add_argument("--part", required=True, type=str.upper, choices=["A", "B"], help="ShanghaiTech part")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "fit"],
                   help="split to score (default test)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"score at most N images spread over the split (quick mode: {QUICK_IMAGES})")
    p.add_argument("--csv", default=None, help="per-image CSV (default: next to the checkpoint, or "
                   "runs/baselines/ for a baseline); the JSON summary is written beside it")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    p.add_argument("--data-root", default=None, help="dataset root (default: CROWD_DATA, else synthetic)")
    p.add_argument("--threshold", type=float, default=None,
                   help="head points: local maxima above this many people per 8x8 cell (default: "
                   "the round(count) strongest maxima)")
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII),
                   help="matching radii in pixels (default 4 8 16)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="head points at cell centres (default: refined to the centroid of the 3x3 cells)")


def _baseline(kind: str, part: str, root: str | None):
    from helpers.tools import baselines

    if kind == "mean":
        from helpers.data import list_records

        model = baselines.MeanCountBaseline().fit(list_records(part, "fit", root))
        return model, "mean count (fit split)", {"baseline": "mean", "fit_split": "fit",
                                                 "fit_images": model.n_fit, "mean_count": model.mean_count}
    detector = baselines.HogPeopleDetector()
    detector.check_available()
    return detector, "HOG people detector", {"baseline": "hog", **detector.settings()}


def run(args: argparse.Namespace) -> int:
    """``crowd evaluate``: score, write the CSV and JSON summary, print the summary as JSON."""
    progress = sys.stderr.isatty()
    try:
        from helpers.data import list_records

        records = select_records(args.part, args.split, args.data_root, args.limit)
        n_split = len(list_records(args.part, args.split, args.data_root))
        if args.checkpoint is not None:
            result = evaluate_checkpoint(args.checkpoint, args.part, args.split, root=args.data_root,
                                         limit=args.limit, device=args.device, radii=args.radii,
                                         threshold=args.threshold, refine=args.refine, progress=progress)
        else:
            predictor, name, settings = _baseline(args.baseline, args.part, args.data_root)
            settings.update({"part": args.part, "split": args.split})
            result = evaluate_predictor(predictor, records, name=name, radii=args.radii,
                                        progress=progress, settings=settings)
            result.summary.update({"part": args.part, "split": args.split})
        csv_path = Path(args.csv) if args.csv else default_csv_path(
            args.part, args.split, len(records), n_split, checkpoint=args.checkpoint,
            baseline=args.baseline)
        write_csv(result, csv_path)
        json_path = write_summary(result, csv_path.with_suffix(".json"))
    except OSError as exc:
        raise CrowdError(str(exc)) from exc
    out = jsonable(result.summary)
    out.update({"csv": str(csv_path), "json": str(json_path)})
    print(json.dumps(out))
    return 0
