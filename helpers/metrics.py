"""Counting and localization metrics for crowd counting (numpy/scipy only).

Counting
--------
* :func:`mae`, :func:`rmse`, :func:`mean_relative_error`, :func:`counting_summary`: errors of the
  per-image counts. **Naming trap:** crowd-counting papers (MCNN, CSRNet, and the tables that
  copy them) report a column called "MSE" that is in fact the *root* mean squared error,
  ``sqrt(mean((pred - true)^2))``. That is :func:`rmse` here.
* :func:`game`, :func:`game_levels`, :func:`mean_game`: the Grid Average Mean absolute Error
  GAME(L) of Guerrero-Gomez-Olmedo et al. (2015), which punishes a count that is right for the
  wrong reasons (too many people on the left, too few on the right).

Localization
------------
* :func:`find_peaks`, :func:`peaks_by_count`: head positions read off a density map.
* :func:`match_points`: one-to-one matching of predicted to annotated heads within a radius.
* :func:`localization_scores`, :func:`localization_over_radii`, :class:`LocalizationAccumulator`:
  precision, recall and F1, per image or summed over a dataset.

All coordinates are image pixels ``(x, y)`` with the continuous convention of
:mod:`helpers.density`: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, so its
centre is ``(col + 0.5, row + 0.5)``. A density cell ``(i, j)`` of a map with output stride ``s``
covers ``[j s, (j + 1) s) x [i s, (i + 1) s)`` and its centre is ``((j + 0.5) s, (i + 0.5) s)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

# --------------------------------------------------------------------------- helpers


def _counts_pair(pred_counts, true_counts) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-D float64 arrays of equal length (one count per image)."""
    p = np.asarray(pred_counts, dtype=np.float64).reshape(-1)
    t = np.asarray(true_counts, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(
            f"pred_counts and true_counts must have one value per image each, "
            f"got {p.size} predicted and {t.size} true counts"
        )
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("counts must be finite numbers (found NaN or infinity)")
    return p, t


def _as_points(points, name: str = "points") -> np.ndarray:
    """An ``(N, 2)`` float64 array of finite ``(x, y)``; ``None`` or empty gives ``(0, 2)``."""
    if points is None:
        return np.zeros((0, 2), dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of (x, y) pixels, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return pts


def _as_density(density, name: str = "density") -> np.ndarray:
    """A finite 2-D float64 array."""
    d = np.asarray(density, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"{name} must be a 2-D h x w map, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return d


def _as_shape(shape, name: str = "image_shape") -> tuple[int, int]:
    """``(H, W)`` from ``(H, W)`` or ``(H, W, C)``, both >= 1."""
    dims = tuple(int(v) for v in tuple(shape)[:2])
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"{name} must be (H, W) with H, W >= 1, got {shape!r}")
    return dims  # type: ignore[return-value]


# --------------------------------------------------------------------------- counting


def mae(pred_counts, true_counts) -> float:
    """Mean absolute error of the counts: ``mean(|pred - true|)`` (people per image).

    ``pred_counts``, ``true_counts``: one count per image (same length). NaN for no images.
    """
    p, t = _counts_pair(pred_counts, true_counts)
    return float(np.abs(p - t).mean()) if p.size else float("nan")


def rmse(pred_counts, true_counts) -> float:
    """Root mean squared error of the counts: ``sqrt(mean((pred - true)^2))`` (people per image).

    This is the number that crowd-counting papers (MCNN, CSRNet and most tables since) print in
    their column headed **"MSE"**: despite the name it is the square root of the mean squared
    error, in people, directly comparable with the MAE. NaN for no images.
    """
    p, t = _counts_pair(pred_counts, true_counts)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else float("nan")


def mean_relative_error(pred_counts, true_counts) -> float:
    """Mean relative count error ``mean(|pred - true| / true)`` over images with ``true > 0``.

    Images whose true count is 0 have no relative error and are **left out** of the mean (their
    absolute error still shows in :func:`mae`). NaN when no image has ``true > 0``. A fraction,
    not a percentage: 0.1 means 10 %.
    """
    p, t = _counts_pair(pred_counts, true_counts)
    keep = t > 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.abs(p[keep] - t[keep]) / t[keep]))


def counting_summary(pred_counts, true_counts) -> dict[str, float | int]:
    """All count metrics at once, as plain numbers (JSON-ready).

    Keys: ``n`` (images), ``mae``, ``rmse`` (papers' "MSE"), ``mre`` (see
    :func:`mean_relative_error`), ``n_mre`` (images with ``true > 0`` used by it), ``mean_true``,
    ``mean_pred``, ``bias`` (``mean(pred - true)``: positive means over-counting).
    """
    p, t = _counts_pair(pred_counts, true_counts)
    n = int(p.size)
    nan = float("nan")
    return {
        "n": n,
        "mae": mae(p, t),
        "rmse": rmse(p, t),
        "mre": mean_relative_error(p, t),
        "n_mre": int((t > 0).sum()),
        "mean_true": float(t.mean()) if n else nan,
        "mean_pred": float(p.mean()) if n else nan,
        "bias": float((p - t).mean()) if n else nan,
    }


# --------------------------------------------------------------------------- GAME


def grid_edges(size: int, parts: int) -> np.ndarray:
    """Integer region boundaries splitting ``size`` pixels into ``parts`` runs, like np.array_split.

    Returns ``parts + 1`` ints from 0 to ``size``; the first ``size % parts`` runs are one pixel
    longer than the others (``size = 10, parts = 4`` gives ``[0, 3, 6, 8, 10]``). Runs can be
    empty when ``parts > size``.
    """
    if size < 0 or parts < 1:
        raise ValueError(f"need size >= 0 and parts >= 1, got size={size}, parts={parts}")
    base, extra = divmod(int(size), int(parts))
    k = np.arange(parts + 1)
    return k * base + np.minimum(k, extra)


def _region_of(coords: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Region index of each continuous coordinate; values outside the image go to the end runs."""
    idx = np.searchsorted(edges, coords, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def _density_region_counts(
    density: np.ndarray, row_edges: np.ndarray, col_edges: np.ndarray, stride: tuple[float, float]
) -> np.ndarray:
    """``n x n`` region sums of a density map whose cell centres are at ``(k + 0.5) * stride``."""
    h, w = density.shape
    n = len(row_edges) - 1
    rows = _region_of((np.arange(h) + 0.5) * stride[0], row_edges)
    cols = _region_of((np.arange(w) + 0.5) * stride[1], col_edges)
    row_onehot = np.zeros((n, h))
    row_onehot[rows, np.arange(h)] = 1.0
    col_onehot = np.zeros((w, n))
    col_onehot[np.arange(w), cols] = 1.0
    return row_onehot @ density @ col_onehot


def _point_region_counts(points: np.ndarray, row_edges: np.ndarray, col_edges: np.ndarray) -> np.ndarray:
    """``n x n`` numbers of points per region (points outside the image go to the border regions)."""
    n = len(row_edges) - 1
    counts = np.zeros((n, n))
    if len(points):
        rows = _region_of(points[:, 1], row_edges)
        cols = _region_of(points[:, 0], col_edges)
        np.add.at(counts, (rows, cols), 1.0)
    return counts


def _is_points(truth: np.ndarray, truth_kind: str) -> bool:
    if truth_kind == "points":
        return True
    if truth_kind == "density":
        return False
    if truth_kind != "auto":
        raise ValueError(f"truth_kind must be 'auto', 'points' or 'density', got {truth_kind!r}")
    return truth.size == 0 or (truth.ndim == 2 and truth.shape[1] == 2)


def _stride_of(density_shape: tuple[int, int], image_shape: tuple[int, int], stride) -> tuple[float, float]:
    if stride is None:
        return tuple(  # type: ignore[return-value]
            image / cells if cells else 1.0 for image, cells in zip(image_shape, density_shape, strict=True)
        )
    s = float(stride)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"stride must be a positive number of image pixels per cell, got {stride!r}")
    return (s, s)


def game_regions(
    pred_density,
    truth,
    level: int,
    image_shape: Sequence[int] | None = None,
    stride: float | None = None,
    truth_kind: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true counts of the ``2^L x 2^L`` GAME regions: two ``(2^L, 2^L)`` arrays.

    See :func:`game` for the arguments and the rules.
    """
    if isinstance(level, bool) or int(level) != level or level < 0:
        raise ValueError(f"GAME level must be a whole number >= 0, got {level!r}")
    pred = _as_density(pred_density, "pred_density")
    t = np.zeros((0, 2)) if truth is None else np.asarray(truth, dtype=np.float64)
    points = _is_points(t, truth_kind)
    if points:
        t = _as_points(t, "truth points")
    else:
        t = _as_density(t, "true density")
    if image_shape is not None:
        shape = _as_shape(image_shape)
    elif not points:
        shape = t.shape
    else:
        s = 1.0 if stride is None else float(stride)
        shape = (max(1, round(pred.shape[0] * s)), max(1, round(pred.shape[1] * s)))
    parts = 2 ** int(level)
    row_edges = grid_edges(shape[0], parts)
    col_edges = grid_edges(shape[1], parts)
    pred_regions = _density_region_counts(pred, row_edges, col_edges, _stride_of(pred.shape, shape, stride))
    if points:
        true_regions = _point_region_counts(t, row_edges, col_edges)
    else:
        true_regions = _density_region_counts(t, row_edges, col_edges, _stride_of(t.shape, shape, None))
    return pred_regions, true_regions


def game(
    pred_density,
    truth,
    level: int,
    image_shape: Sequence[int] | None = None,
    stride: float | None = None,
    truth_kind: str = "auto",
) -> float:
    """GAME(L) of one image: summed absolute count error over a ``2^L x 2^L`` grid (people).

    .. math:: \\mathrm{GAME}(L) = \\sum_{r=1}^{4^L} |\\hat C_r - C_r|

    (Guerrero-Gomez-Olmedo et al., 2015). ``GAME(0) = |pred.sum() - true count|``; GAME grows
    with ``L`` whenever people are counted in the wrong place. The dataset-level GAME(L) is the
    mean of this over images (:func:`mean_game`).

    * ``pred_density``: ``h x w`` predicted density (its sum is the predicted count), at image
      resolution or at a model's output stride.
    * ``truth``: an ``(N, 2)`` array of head points ``(x, y)`` in image pixels (each region's true
      count is the number of points in it), or a true density map. An array with exactly 2
      columns is taken as points; pass ``truth_kind="density"`` for a 2-pixel-wide map.
    * ``image_shape``: ``(H, W)`` of the image. Default: the true density's shape, or for points
      the predicted map's shape times ``stride`` (1 if not given).
    * ``stride``: image pixels per predicted-density cell. Default ``None``: the map is taken to
      be stretched over the whole image (``H / h`` down, ``W / w`` across).

    Rules. The image is split into ``2^L`` rows and columns of regions with integer boundaries
    as in ``np.array_split`` (:func:`grid_edges`: the first ``H mod 2^L`` rows are one pixel
    taller). A density cell ``(i, j)`` is given whole to the region that holds its centre
    ``((j + 0.5) s_x, (i + 0.5) s_y)``; a point ``(x, y)`` to the region holding it (so
    ``y = 3.7`` is in pixel row 3). Cells or points beyond the image border are counted in the
    nearest border region, so no mass is lost and GAME(0) is always the count error. A true
    density map is split the same way, with stride ``H / h_true`` (1 at image resolution).

    Exactness: at image resolution (stride 1) every pixel lies in exactly one region and the
    result is exact. At stride ``s`` a cell straddling a region boundary is not split (the
    result is then an approximation); it is exact when the region boundaries are multiples of
    ``s``, e.g. a 1024 x 768 image with ``s = 8`` up to ``L = 3``. To be exact anyway, upsample
    the map yourself (``np.kron(d, np.ones((s, s))) / s**2``) and pass ``stride=1``.
    """
    pred_regions, true_regions = game_regions(pred_density, truth, level, image_shape, stride, truth_kind)
    return float(np.abs(pred_regions - true_regions).sum())


def game_levels(
    pred_density,
    truth,
    levels: Iterable[int] = (0, 1, 2, 3),
    image_shape: Sequence[int] | None = None,
    stride: float | None = None,
    truth_kind: str = "auto",
) -> dict[int, float]:
    """GAME(L) of one image for several levels: ``{L: game(..., L)}`` (see :func:`game`)."""
    return {
        int(level): game(pred_density, truth, level, image_shape, stride, truth_kind)
        for level in levels
    }


def mean_game(
    pred_densities: Sequence,
    truths: Sequence,
    levels: Iterable[int] = (0, 1, 2, 3),
    image_shapes: Sequence[Sequence[int] | None] | None = None,
    stride: float | None = None,
    truth_kind: str = "auto",
) -> dict[int, float]:
    """Dataset-level GAME: ``{L: mean over images of game(pred_i, truth_i, L)}``.

    ``image_shapes``: one ``(H, W)`` per image (or ``None`` for the defaults of :func:`game`).
    ``mean_game(...)[0]`` equals the MAE of the counts. NaN for no images.
    """
    levels = tuple(int(v) for v in levels)
    if len(pred_densities) != len(truths):
        raise ValueError(
            f"need one truth per predicted map, got {len(pred_densities)} maps and {len(truths)} truths"
        )
    if image_shapes is None:
        image_shapes = [None] * len(truths)
    if len(image_shapes) != len(truths):
        raise ValueError(f"need one image shape per image, got {len(image_shapes)} for {len(truths)} images")
    totals = dict.fromkeys(levels, 0.0)
    for pred, truth, shape in zip(pred_densities, truths, image_shapes, strict=True):
        for level, value in game_levels(pred, truth, levels, shape, stride, truth_kind).items():
            totals[level] += value
    n = len(truths)
    return {level: (total / n if n else float("nan")) for level, total in totals.items()}


# --------------------------------------------------------------------------- peaks


def _cells_to_pixels(rows: np.ndarray, cols: np.ndarray, stride: float) -> np.ndarray:
    """``(M, 2)`` image ``(x, y)`` of the centres of density cells ``(rows, cols)``."""
    pts = np.empty((len(rows), 2), dtype=np.float64)
    pts[:, 0] = (cols + 0.5) * stride
    pts[:, 1] = (rows + 0.5) * stride
    return pts


def _local_maxima(density: np.ndarray, threshold: float, min_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the peaks, strongest first, no two within ``min_distance`` cells."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    if isinstance(min_distance, bool) or int(min_distance) != min_distance or min_distance < 0:
        raise ValueError(f"min_distance must be a whole number of cells >= 0, got {min_distance!r}")
    md = int(min_distance)
    if density.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    window = 2 * md + 1
    local_max = ndimage.maximum_filter(density, size=window, mode="constant", cval=-np.inf)
    rows, cols = np.nonzero((density == local_max) & (density > threshold))
    # Strongest first; equal values in row-major order (a stable sort keeps np.nonzero's order).
    order = np.argsort(-density[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    if md == 0 or len(rows) < 2:
        return rows, cols
    # Non-maximum suppression: plateaus (equal neighbouring values) give several candidates;
    # keep the first and drop any later one within min_distance (the square window's metric).
    cells = np.column_stack([rows, cols]).astype(np.float64)
    tree = cKDTree(cells)
    keep = np.ones(len(rows), dtype=bool)
    for k, neighbours in enumerate(tree.query_ball_point(cells, r=md, p=np.inf)):
        if keep[k]:
            for other in neighbours:
                if other > k:
                    keep[other] = False
    return rows[keep], cols[keep]


def find_peaks(density, threshold: float, min_distance: int = 1, stride: float = 1) -> np.ndarray:
    """Head positions from a density map: local maxima above ``threshold``, ``(M, 2)`` ``(x, y)``.

    * ``density``: ``h x w`` map (people per cell), e.g. a prediction at output stride ``stride``.
    * ``threshold``: a cell must be strictly greater than this (people per cell) to be a peak.
    * ``min_distance``: in **density cells**; a peak is the largest value in the
      ``(2 d + 1) x (2 d + 1)`` square around it (``scipy.ndimage.maximum_filter``; outside the
      map counts as minus infinity), and of several equal maxima (a plateau) closer than ``d``
      cells in both directions only the first in row-major order is kept.
    * ``stride``: image pixels per cell; a cell ``(i, j)`` becomes the image point
      ``((j + 0.5) * stride, (i + 0.5) * stride)`` (its centre).

    Returned strongest first. No subpixel refinement: positions are cell centres, so at stride
    ``s`` they are within ``s / 2`` pixels of the peak cell's content. An all-zero map gives an
    empty ``(0, 2)`` array for any ``threshold >= 0``.

    In dense crowds the Gaussians of neighbouring heads overlap and their sum may have one
    maximum for several heads; :func:`peaks_by_count` is a threshold-free alternative.
    """
    d = _as_density(density)
    rows, cols = _local_maxima(d, float(threshold), min_distance)
    return _cells_to_pixels(rows, cols, float(stride))


def peaks_by_count(
    density, min_distance: int = 1, stride: float = 1, count: int | None = None
) -> np.ndarray:
    """The ``round(density.sum())`` strongest local maxima, ``(K, 2)`` ``(x, y)`` image pixels.

    A threshold-free variant of :func:`find_peaks` (same maxima, suppression and coordinates,
    with threshold 0): the map's own count decides how many heads to keep. ``count`` overrides
    the number. When the map has fewer maxima than that (merged Gaussians in a dense crowd),
    all maxima are returned, so ``K`` can be below the count.
    """
    d = _as_density(density)
    k = int(round(float(d.sum()))) if count is None else int(count)
    if k <= 0:
        return np.zeros((0, 2), dtype=np.float64)
    rows, cols = _local_maxima(d, 0.0, min_distance)
    return _cells_to_pixels(rows[:k], cols[:k], float(stride))


# --------------------------------------------------------------------------- matching


class Matching(NamedTuple):
    """Result of :func:`match_points`; unpacks as ``tp, fp, fn, pairs``.

    ``pairs``: ``(tp, 2)`` int64 array of ``(pred index, true index)``, sorted by pred index.
    """

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray


#: Groups with more than this many ``pred x true`` cells (80 MB of float64) use Hopcroft-Karp.
DENSE_LIMIT = 10_000_000
METHODS = ("hungarian", "greedy")


def _candidate_pairs(pred: np.ndarray, true: np.ndarray, radius: float) -> tuple[np.ndarray, ...]:
    """All ``(pred i, true j, distance)`` with ``distance <= radius`` (np.hypot, inclusive)."""
    from scipy.spatial import cKDTree

    # Query a hair wider than asked, then decide with the exact distances, so the boundary rule
    # (distance == radius matches) does not depend on the tree's rounding.
    wide = radius * (1 + 1e-9) + 1e-12
    found = cKDTree(pred).sparse_distance_matrix(cKDTree(true), wide, output_type="ndarray")
    i = found["i"].astype(np.int64)
    j = found["j"].astype(np.int64)
    dist = np.hypot(pred[i, 0] - true[j, 0], pred[i, 1] - true[j, 1])
    ok = dist <= radius
    return i[ok], j[ok], dist[ok]


def _greedy(i: np.ndarray, j: np.ndarray, dist: np.ndarray) -> list[tuple[int, int]]:
    order = np.lexsort((j, i, dist))  # nearest first; ties by pred index, then true index
    used_p: set[int] = set()
    used_t: set[int] = set()
    pairs = []
    for a, b in zip(i[order].tolist(), j[order].tolist(), strict=True):
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
            pairs.append((a, b))
    return pairs


def _hungarian(i: np.ndarray, j: np.ndarray, dist: np.ndarray, radius: float,
               n_pred: int, n_true: int, dense_limit: int) -> list[tuple[int, int]]:
    from scipy import sparse
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse.csgraph import connected_components, maximum_bipartite_matching

    # Heads farther apart than the radius never match, so each connected component of the
    # "within radius" graph is an independent problem: solve the components one by one.
    n = n_pred + n_true
    graph = sparse.coo_matrix((np.ones(len(i)), (i, j + n_pred)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[i]
    order = np.argsort(edge_label, kind="stable")
    i, j, dist, edge_label = i[order], j[order], dist[order], edge_label[order]
    starts = np.flatnonzero(np.r_[True, edge_label[1:] != edge_label[:-1]])
    ends = np.r_[starts[1:], len(i)]
    pairs: list[tuple[int, int]] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        ci, cj, cd = i[s:e], j[s:e], dist[s:e]
        if e - s == 1:
            pairs.append((int(ci[0]), int(cj[0])))
            continue
        rows, ri = np.unique(ci, return_inverse=True)
        cols, rj = np.unique(cj, return_inverse=True)
        if len(rows) * len(cols) <= dense_limit:
            # Forbidden pairs cost more than any set of allowed ones can, so the assignment first
            # maximises the number of allowed pairs, then minimises their total distance.
            big = min(len(rows), len(cols)) * radius + 1.0
            cost = np.full((len(rows), len(cols)), big)
            cost[ri, rj] = cd
            a, b = linear_sum_assignment(cost)
            ok = cost[a, b] < big
            pairs.extend(zip(rows[a[ok]].tolist(), cols[b[ok]].tolist(), strict=True))
        else:
            adj = sparse.csr_matrix((np.ones(len(ri)), (ri, rj)), shape=(len(rows), len(cols)))
            match = maximum_bipartite_matching(adj, perm_type="column")
            ok = match >= 0
            pairs.extend(zip(rows[ok].tolist(), cols[match[ok]].tolist(), strict=True))
    return pairs


def match_points(
    pred, true, radius: float, method: str = "hungarian", dense_limit: int = DENSE_LIMIT
) -> Matching:
    """One-to-one matching of predicted to annotated heads within ``radius`` pixels.

    * ``pred``: ``(M, 2)`` predicted ``(x, y)``; ``true``: ``(N, 2)`` annotated ``(x, y)``
      (``None`` or empty arrays are fine).
    * ``radius``: a pair can match when its Euclidean distance (``np.hypot``) is ``<= radius``
      (a distance exactly equal to the radius **counts**).

    Returns :class:`Matching` ``(tp, fp, fn, pairs)``: ``tp`` matched pairs, ``fp = M - tp``
    unmatched predictions, ``fn = N - tp`` missed heads.

    ``method="hungarian"`` (default) finds the largest possible number of matches, and among
    those the smallest total distance: ``scipy.optimize.linear_sum_assignment`` on the distance
    matrix with pairs beyond the radius given a cost larger than any allowed assignment. It works
    on each connected group of heads within reach of each other separately, so thousands of
    well-spread heads take milliseconds, and one group of 3000 x 3000 (a 72 MB matrix) under a
    second. A group bigger than ``dense_limit`` matrix cells (default :data:`DENSE_LIMIT`, about
    3000 x 3000; beyond roughly 10 000 heads in one group) is matched with Hopcroft-Karp
    (``scipy.sparse.csgraph.maximum_bipartite_matching``): the number of matches is still the
    largest possible, but the pairs are then not the nearest ones.

    ``method="greedy"`` takes pairs nearest first (ties by index). It is common in published
    code, but can match fewer heads than possible: a prediction between two heads may take the
    one another prediction needed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    r = float(radius)
    if not np.isfinite(r) or r < 0:
        raise ValueError(f"radius must be a finite number of pixels >= 0, got {radius!r}")
    p = _as_points(pred, "pred")
    t = _as_points(true, "true")
    if len(p) == 0 or len(t) == 0:
        return Matching(0, len(p), len(t), np.zeros((0, 2), dtype=np.int64))
    i, j, dist = _candidate_pairs(p, t, r)
    if method == "greedy":
        pairs = _greedy(i, j, dist)
    else:
        pairs = _hungarian(i, j, dist, r, len(p), len(t), int(dense_limit))
    arr = np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    tp = len(arr)
    return Matching(tp, len(p) - tp, len(t) - tp, arr)


# --------------------------------------------------------------------------- scores


def scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision, recall and F1 from match counts: ``{precision, recall, f1, tp, fp, fn}``.

    ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``,
    ``f1 = 2 tp / (2 tp + fp + fn)`` (the harmonic mean of the two).

    Empty cases: with no predictions and no heads all three are 1 (nothing to find, nothing
    wrongly found). With no predictions but some heads, precision is 0 (and recall and F1 are 0);
    with predictions but no heads, recall is 0 (and precision and F1 are 0). In words: a ratio
    with a zero denominator is 1 when both sets are empty, else 0.
    """
    tp, fp, fn = int(tp), int(fp), int(fn)
    if min(tp, fp, fn) < 0:
        raise ValueError(f"match counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    both_empty = tp + fp + fn == 0
    empty = 1.0 if both_empty else 0.0
    return {
        "precision": tp / (tp + fp) if tp + fp else empty,
        "recall": tp / (tp + fn) if tp + fn else empty,
        "f1": 2 * tp / (2 * tp + fp + fn) if not both_empty else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def localization_scores(pred, true, radius: float, method: str = "hungarian") -> dict[str, float | int]:
    """Precision, recall, F1 (and tp, fp, fn) of one image's predicted points at ``radius`` px.

    Matching by :func:`match_points`; empty cases as in :func:`scores_from_counts`.
    """
    m = match_points(pred, true, radius, method=method)
    return scores_from_counts(m.tp, m.fp, m.fn)


def _mean_over_radii(per_radius: dict[float, dict]) -> dict:
    return {
        "precision": float(np.mean([s["precision"] for s in per_radius.values()])),
        "recall": float(np.mean([s["recall"] for s in per_radius.values()])),
        "f1": float(np.mean([s["f1"] for s in per_radius.values()])),
        "per_radius": per_radius,
    }


def _check_radii(radii: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in radii)
    if not out:
        raise ValueError("need at least one radius")
    return out


def localization_over_radii(
    pred, true, radii: Iterable[float] = (4, 8, 16), method: str = "hungarian"
) -> dict:
    """Localization scores of one image at several radii, and their means.

    Returns ``{"precision", "recall", "f1"}`` (means over the radii) and ``"per_radius"``:
    ``{radius: localization_scores(pred, true, radius)}``.
    """
    per = {r: localization_scores(pred, true, r, method) for r in _check_radii(radii)}
    return _mean_over_radii(per)


class LocalizationAccumulator:
    """Dataset-level localization: sums tp, fp, fn over images, then precision/recall/F1.

    This is the micro-average: every head in the dataset weighs the same, so a crowded image
    counts more than a sparse one (a mean of per-image F1s, the macro-average, would not). ::

        acc = LocalizationAccumulator(radii=(4, 8, 16))
        for pred_points, true_points in images:
            acc.add(pred_points, true_points)
        acc.scores()   # {"precision", "recall", "f1", "per_radius": {r: {...}}, "images"}
    """

    def __init__(self, radii: Iterable[float] = (4, 8, 16), method: str = "hungarian") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.radii = _check_radii(radii)
        self.method = method
        self.images = 0
        self.counts = {r: [0, 0, 0] for r in self.radii}

    def add(self, pred, true) -> dict[float, Matching]:
        """Match one image's points at every radius and add the counts; returns the matchings."""
        out = {}
        for r in self.radii:
            m = match_points(pred, true, r, method=self.method)
            c = self.counts[r]
            c[0] += m.tp
            c[1] += m.fp
            c[2] += m.fn
            out[r] = m
        self.images += 1
        return out

    def scores(self) -> dict:
        """Micro-averaged scores per radius, their means over radii, and ``images``."""
        per = {r: scores_from_counts(*self.counts[r]) for r in self.radii}
        out = _mean_over_radii(per)
        out["images"] = self.images
        return out


def dataset_localization(
    preds: Iterable, trues: Iterable, radii: Iterable[float] = (4, 8, 16), method: str = "hungarian"
) -> dict:
    """:class:`LocalizationAccumulator` over paired lists of predicted and true point arrays."""
    acc = LocalizationAccumulator(radii, method)
    for p, t in zip(preds, trues, strict=True):
        acc.add(p, t)
    return acc.scores()
