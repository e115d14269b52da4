"""Counting and localization metrics for crowd counting (numpy and scipy only).

Counting: :func:`mae`, :func:`rmse` (papers' "MSE"), :func:`counting_summary`, and GAME(L)
(:func:`game`), which punishes a count that is right for the wrong reasons. Localization: head
points read off a density map (:func:`find_peaks`, :func:`peaks_by_count`), matched one-to-one
to the annotated heads (:func:`match_points`, within a radius or P2PNet's per-head
:func:`knn_radii`), precision, recall and F1. Coordinates are image
pixels ``(x, y)``: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``; a cell
``(i, j)`` at stride ``s`` has its centre at ``((j + 0.5) s, (i + 0.5) s)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from helpers.data import as_points


def _counts_pair(pred_counts, true_counts) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-D float64 arrays of equal length (one count per image)."""
    p = np.asarray(pred_counts, dtype=np.float64).reshape(-1)
    t = np.asarray(true_counts, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"pred_counts and true_counts must have one value per image each, "
                         f"got {p.size} predicted and {t.size} true counts")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("counts must be finite numbers (found NaN or infinity)")
    return p, t


def _as_density(density, name: str = "density") -> np.ndarray:
    d = np.asarray(density, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"{name} must be a 2-D h x w map, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return d


# --------------------------------------------------------------------------- counting


def mae(pred_counts, true_counts) -> float:
    """Mean absolute error of the counts, ``mean(|pred - true|)``.

    Inputs:
    - pred_counts, true_counts: sequences of N floats, one count per image
    Returns:
    - mae: float, people per image (NaN for no images)
    """
    p, t = _counts_pair(pred_counts, true_counts)
    return float(np.abs(p - t).mean()) if p.size else float("nan")


def rmse(pred_counts, true_counts) -> float:
    """Root mean squared error of the counts, ``sqrt(mean((pred - true)^2))``.

    Crowd-counting papers (MCNN, CSRNet and most tables since) print this in a column headed
    **"MSE"**: despite the name it is the square root of the mean squared error, in people.

    Inputs:
    - pred_counts, true_counts: sequences of N floats, one count per image
    Returns:
    - rmse: float, people per image (NaN for no images)
    """
    p, t = _counts_pair(pred_counts, true_counts)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else float("nan")


def counting_summary(pred_counts, true_counts) -> dict[str, float | int]:
    """All count metrics at once, as plain numbers (JSON-ready).

    Inputs:
    - pred_counts, true_counts: sequences of N floats, one count per image
    Returns:
    - summary: dict with ``n`` (images), ``mae``, ``rmse``, ``mre`` (mean of ``|pred - true| /
      true`` over the ``n_mre`` images with ``true > 0``, a fraction; NaN if none), ``n_mre``,
      ``mean_true``, ``mean_pred`` and ``bias`` (``mean(pred - true)``: > 0 is over-counting)
    """
    p, t = _counts_pair(pred_counts, true_counts)
    n, keep, nan = int(p.size), t > 0, float("nan")
    return {
        "n": n, "mae": mae(p, t), "rmse": rmse(p, t),
        "mre": float(np.mean(np.abs(p[keep] - t[keep]) / t[keep])) if keep.any() else nan,
        "n_mre": int(keep.sum()),
        "mean_true": float(t.mean()) if n else nan,
        "mean_pred": float(p.mean()) if n else nan,
        "bias": float((p - t).mean()) if n else nan,
    }  # fmt: skip


def grid_edges(size: int, parts: int) -> np.ndarray:
    """Region boundaries splitting ``size`` pixels into ``parts`` runs, like ``np.array_split``.

    Inputs:
    - size: int >= 0 pixels; parts: int >= 1
    Returns:
    - edges: int array (parts + 1,) from 0 to size; the first ``size % parts`` runs are one
      pixel longer (``size = 10, parts = 4`` gives ``[0, 3, 6, 8, 10]``)
    """
    if size < 0 or parts < 1:
        raise ValueError(f"need size >= 0 and parts >= 1, got size={size}, parts={parts}")
    base, extra = divmod(int(size), int(parts))
    k = np.arange(parts + 1)
    return k * base + np.minimum(k, extra)


def _region_of(coords: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Region index of each continuous coordinate; values outside the image go to the end runs."""
    return np.clip(np.searchsorted(edges, coords, side="right") - 1, 0, len(edges) - 2)


def _density_regions(density: np.ndarray, row_edges, col_edges, stride: tuple[float, float]) -> np.ndarray:
    """``n x n`` region sums of a map whose cell centres are at ``(k + 0.5) * stride``."""
    (h, w), n = density.shape, len(row_edges) - 1
    rows = np.zeros((n, h))
    rows[_region_of((np.arange(h) + 0.5) * stride[0], row_edges), np.arange(h)] = 1.0
    cols = np.zeros((w, n))
    cols[np.arange(w), _region_of((np.arange(w) + 0.5) * stride[1], col_edges)] = 1.0
    return rows @ density @ cols


def _point_regions(points: np.ndarray, row_edges, col_edges) -> np.ndarray:
    """``n x n`` numbers of points per region (points outside go to the border regions)."""
    counts = np.zeros((len(row_edges) - 1, len(col_edges) - 1))
    np.add.at(counts, (_region_of(points[:, 1], row_edges), _region_of(points[:, 0], col_edges)), 1.0)
    return counts


def _stride_of(map_shape, image_shape, stride) -> tuple[float, float]:
    if stride is None:  # the map stretched over the whole image
        return tuple(i / c if c else 1.0 for i, c in zip(image_shape, map_shape, strict=True))  # type: ignore[return-value]
    s = float(stride)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"stride must be a positive number of image pixels per cell, got {stride!r}")
    return (s, s)


def _game_truth(truth, truth_kind: str) -> tuple[np.ndarray, bool]:
    """``(truth array, is_points)``: an (N, 2) array is points unless ``truth_kind="density"``."""
    t = np.zeros((0, 2)) if truth is None else np.asarray(truth, dtype=np.float64)
    if truth_kind not in ("auto", "points", "density"):
        raise ValueError(f"truth_kind must be 'auto', 'points' or 'density', got {truth_kind!r}")
    points = truth_kind == "points" or (truth_kind == "auto" and (t.size == 0 or (t.ndim == 2 and t.shape[1] == 2)))
    return (as_points(t, "truth points", finite=True) if points else _as_density(t, "true density")), points


def game_regions(pred_density, truth, level: int, image_shape: Sequence[int] | None = None,
                 stride: float | None = None, truth_kind: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true counts of the ``2^L x 2^L`` GAME regions (arguments and rules: :func:`game`).

    Returns:
    - pred_regions, true_regions: float arrays (2^L, 2^L), people per region
    """
    if isinstance(level, bool) or int(level) != level or level < 0:
        raise ValueError(f"GAME level must be a whole number >= 0, got {level!r}")
    pred = _as_density(pred_density, "pred_density")
    t, points = _game_truth(truth, truth_kind)
    if image_shape is not None:
        shape = tuple(int(v) for v in tuple(image_shape)[:2])
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"image_shape must be (H, W) with H, W >= 1, got {image_shape!r}")
    elif not points:
        shape = t.shape
    else:
        s = 1.0 if stride is None else float(stride)
        shape = (max(1, round(pred.shape[0] * s)), max(1, round(pred.shape[1] * s)))
    rows, cols = grid_edges(shape[0], 2 ** int(level)), grid_edges(shape[1], 2 ** int(level))
    pred_regions = _density_regions(pred, rows, cols, _stride_of(pred.shape, shape, stride))
    if points:
        return pred_regions, _point_regions(t, rows, cols)
    return pred_regions, _density_regions(t, rows, cols, _stride_of(t.shape, shape, None))


def game(pred_density, truth, level: int, image_shape: Sequence[int] | None = None,
         stride: float | None = None, truth_kind: str = "auto") -> float:
    """GAME(L) of one image: the absolute count errors of the ``2^L x 2^L`` regions, summed.

    ``GAME(L) = sum over regions r of |pred_r - true_r|`` (Guerrero-Gomez-Olmedo et al., 2015);
    GAME(0) is the count error, and GAME grows with L when people are counted in the wrong place.
    The image is split into ``2^L`` rows and columns of regions as by :func:`grid_edges`. A cell
    goes whole to the region holding its centre (exact at stride 1, or when the boundaries are
    multiples of the stride), a point ``(x, y)`` to the region holding it; cells or points beyond
    the border go to the nearest border region, so no mass is lost.

    Inputs:
    - pred_density: float array (h, w), predicted people per cell (its sum is the count)
    - truth: float array (N, 2) of head points (x, y) in image pixels, or a true density map
      (an array with 2 columns is taken as points unless ``truth_kind="density"``)
    - level: int L >= 0
    - image_shape: (H, W) of the image; default the true density's shape, or for points the
      predicted map's shape times ``stride`` (1 if not given)
    - stride: float, image pixels per predicted cell; None = the map stretched over the image
    - truth_kind: "auto", "points" or "density"
    Returns:
    - game: float, people
    """
    pred_regions, true_regions = game_regions(pred_density, truth, level, image_shape, stride, truth_kind)
    return float(np.abs(pred_regions - true_regions).sum())


def game_levels(pred_density, truth, levels: Iterable[int] = (0, 1, 2, 3),
                image_shape: Sequence[int] | None = None, stride: float | None = None,
                truth_kind: str = "auto") -> dict[int, float]:
    """GAME(L) of one image at several levels.

    Inputs:
    - levels: ints L >= 0; the other arguments as in :func:`game`
    Returns:
    - games: dict {L: game(..., L)} in people
    """
    return {int(level): game(pred_density, truth, level, image_shape, stride, truth_kind)
            for level in levels}


def _cells_to_pixels(rows: np.ndarray, cols: np.ndarray, stride: float) -> np.ndarray:
    """``(M, 2)`` image ``(x, y)`` of the centres of density cells ``(rows, cols)``."""
    return np.column_stack([(cols + 0.5) * stride, (rows + 0.5) * stride]).astype(np.float64).reshape(-1, 2)


def _refine(density: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractional ``(rows, cols)``: the mass-weighted centroid of each peak's 3 x 3 cells (none outside)."""
    pad, steps = np.pad(np.maximum(density, 0.0), 1), np.array([-1.0, 0.0, 1.0])
    win = np.stack([pad[rows + 1 + dr, cols + 1 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=1)
    win = win.reshape(-1, 3, 3) / np.maximum(win.sum(axis=1), 1e-30).reshape(-1, 1, 1)
    return rows + win.sum(axis=2) @ steps, cols + win.sum(axis=1) @ steps


def _local_maxima(density: np.ndarray, threshold: float, min_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the peaks, strongest first, no two within ``min_distance`` cells."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    if isinstance(min_distance, bool) or int(min_distance) != min_distance or min_distance < 0:
        raise ValueError(f"min_distance must be a whole number of cells >= 0, got {min_distance!r}")
    md = int(min_distance)
    if density.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    local_max = ndimage.maximum_filter(density, size=2 * md + 1, mode="constant", cval=-np.inf)
    rows, cols = np.nonzero((density == local_max) & (density > threshold))
    order = np.argsort(-density[rows, cols], kind="stable")  # ties keep row-major order
    rows, cols = rows[order], cols[order]
    if md == 0 or len(rows) < 2:
        return rows, cols
    # plateaus give several candidates: keep the first, drop later ones within md (square metric)
    cells = np.column_stack([rows, cols]).astype(np.float64)
    keep = np.ones(len(rows), dtype=bool)
    for k, neighbours in enumerate(cKDTree(cells).query_ball_point(cells, r=md, p=np.inf)):
        if keep[k]:
            keep[[o for o in neighbours if o > k]] = False
    return rows[keep], cols[keep]


def find_peaks(density, threshold: float, min_distance: int = 1, stride: float = 1,
               refine: bool = False) -> np.ndarray:
    """Head positions from a density map: its local maxima above a threshold, strongest first.

    A peak is the largest value in the (2 d + 1) x (2 d + 1) square around it (outside the map
    counts as minus infinity); of equal maxima (a plateau) closer than d cells only the first in
    row-major order is kept. Positions are cell centres (within s / 2 pixels of the head), or with
    ``refine`` the mass-weighted centroid of the peak's 3 x 3 cells (cells beyond the map left out).

    Inputs:
    - density: float array (h, w), people per cell
    - threshold: float, a peak must be strictly greater (people per cell)
    - min_distance: int d, in cells
    - stride: float s, image pixels per cell
    - refine: bool, sub-cell positions (see above)
    Returns:
    - points: float64 array (M, 2), (x, y) in image pixels; (0, 2) for an all-zero map
    """
    d = _as_density(density)
    rows, cols = _local_maxima(d, float(threshold), min_distance)
    return _cells_to_pixels(*(_refine(d, rows, cols) if refine else (rows, cols)), float(stride))


def peaks_by_count(density, min_distance: int = 1, stride: float = 1, count: int | None = None,
                   refine: bool = False) -> np.ndarray:
    """The ``round(density.sum())`` strongest local maxima: head points without a threshold.

    Same maxima and coordinates as :func:`find_peaks` with threshold 0. In a dense crowd merged
    Gaussians give fewer maxima than people, and then all of them are returned.

    Inputs:
    - density, min_distance, stride, refine: as in :func:`find_peaks`
    - count: int, how many to keep instead of round(density.sum())
    Returns:
    - points: float64 array (K, 2), (x, y) in image pixels, strongest first
    """
    d = _as_density(density)
    k = int(round(float(d.sum()))) if count is None else int(count)
    if k <= 0:
        return np.zeros((0, 2), dtype=np.float64)
    rows, cols = (v[:k] for v in _local_maxima(d, 0.0, min_distance))
    return _cells_to_pixels(*(_refine(d, rows, cols) if refine else (rows, cols)), float(stride))


# --------------------------------------------------------------------------- matching


class Matching(NamedTuple):
    """:func:`match_points`: ``tp, fp, fn`` and ``pairs`` (tp, 2) int64 (pred, true), by pred index."""

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray


#: Groups with more than this many ``pred x true`` cells (80 MB of float64) use Hopcroft-Karp.
DENSE_LIMIT = 10_000_000
METHODS = ("hungarian", "greedy")


def _candidate_pairs(pred: np.ndarray, true: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, ...]:
    """All ``(pred i, true j, distance)`` with ``distance <= radii[j]`` (np.hypot, inclusive)."""
    from scipy.spatial import cKDTree

    # query a hair wider, then decide with exact distances (the boundary must not depend on the tree)
    found = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radii.max() * (1 + 1e-9) + 1e-12,
                                                 output_type="ndarray")
    i, j = found["i"].astype(np.int64), found["j"].astype(np.int64)
    dist = np.hypot(pred[i, 0] - true[j, 0], pred[i, 1] - true[j, 1])
    ok = dist <= radii[j]
    return i[ok], j[ok], dist[ok]


def _greedy(i: np.ndarray, j: np.ndarray, dist: np.ndarray) -> list[tuple[int, int]]:
    """Pairs nearest first (ties by pred index, then true index), each point used once."""
    used_p: set[int] = set()
    used_t: set[int] = set()
    pairs = []
    for a, b in zip(*(v[np.lexsort((j, i, dist))].tolist() for v in (i, j)), strict=True):
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
            pairs.append((a, b))
    return pairs


def _one_group(ci: np.ndarray, cj: np.ndarray, cd: np.ndarray, dense_limit: int):
    """Maximum matching of one connected group, nearest among those (or Hopcroft-Karp if huge)."""
    from scipy import sparse
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rows, ri = np.unique(ci, return_inverse=True)
    cols, rj = np.unique(cj, return_inverse=True)
    if len(rows) * len(cols) > dense_limit:
        adj = sparse.csr_matrix((np.ones(len(ri)), (ri, rj)), shape=(len(rows), len(cols)))
        match = maximum_bipartite_matching(adj, perm_type="column")
        return list(zip(rows[match >= 0].tolist(), cols[match[match >= 0]].tolist(), strict=True))
    # pairs beyond the radius cost more than any set of allowed ones: the assignment first
    # maximises the number of allowed pairs, then minimises their total distance
    big = min(len(rows), len(cols)) * cd.max() + 1.0
    cost = np.full((len(rows), len(cols)), big)
    cost[ri, rj] = cd
    a, b = linear_sum_assignment(cost)
    ok = cost[a, b] < big
    return list(zip(rows[a[ok]].tolist(), cols[b[ok]].tolist(), strict=True))


def _hungarian(i, j, dist, n_pred: int, n_true: int, dense_limit: int) -> list:
    """One-to-one matching, solved separately on each connected group of heads within reach."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return []
    n = n_pred + n_true
    _, labels = connected_components(sparse.coo_matrix((np.ones(len(i)), (i, j + n_pred)), shape=(n, n)),
                                     directed=False)
    order = np.argsort(labels[i], kind="stable")
    i, j, dist, group = i[order], j[order], dist[order], labels[i][order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    pairs: list[tuple[int, int]] = []
    for s, e in zip(starts.tolist(), np.r_[starts[1:], len(i)].tolist(), strict=True):
        pairs += _one_group(i[s:e], j[s:e], dist[s:e], dense_limit)
    return pairs


def knn_radii(points, delta: float = 0.5, k: int = 3, single: float = 16.0) -> np.ndarray:
    """P2PNet's per-head radii (Song et al., ICCV 2021): ``delta`` x the mean distance from each head
    to its ``k`` nearest annotated neighbours (fewer if there are fewer); a lone head: ``single`` px.

    Inputs:
    - points: float array (N, 2), annotated heads (x, y) in pixels
    - delta: float (P2PNet reports 0.5 and 0.25); k: int >= 1; single: float pixels
    Returns:
    - radii: float64 array (N,), pixels
    """
    from scipy.spatial import cKDTree

    pts = as_points(points, "points", finite=True)
    if len(pts) < 2:
        return np.full(len(pts), float(delta) * float(single))
    dist, _ = cKDTree(pts).query(pts, k=list(range(2, min(int(k), len(pts) - 1) + 2)))  # 1: itself
    return float(delta) * dist.mean(axis=1)


def match_points(pred, true, radius, method: str = "hungarian", dense_limit: int = DENSE_LIMIT) -> Matching:
    """One-to-one matching of predicted to annotated heads within ``radius`` pixels (of each head).

    ``"hungarian"`` finds the largest possible number of pairs and, among those, the smallest
    total distance (``scipy.optimize.linear_sum_assignment`` on each group of heads within reach
    of each other; a group of more than ``dense_limit`` matrix cells, about 3000 x 3000, gets a
    maximum matching by Hopcroft-Karp, not the nearest one). ``"greedy"`` takes pairs nearest
    first: common in published code, but a prediction between two heads may take the one another
    prediction needed, so it can match fewer.

    Inputs:
    - pred: float array (M, 2) predicted (x, y); true: float array (N, 2) annotated (x, y)
      (None or empty is fine)
    - radius: float pixels, or float array (N,), one per annotated head (e.g. :func:`knn_radii`);
      a pair at distance exactly the radius matches
    - method: "hungarian" or "greedy"; dense_limit: int, see above
    Returns:
    - matching: :class:`Matching` (tp, fp = M - tp, fn = N - tp, pairs (tp, 2) int64)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    p, t = as_points(pred, "pred", finite=True), as_points(true, "true", finite=True)
    r = np.asarray(radius, dtype=np.float64)
    if r.ndim > 1 or (r.ndim == 1 and r.shape != (len(t),)) or not np.all(np.isfinite(r) & (r >= 0)):
        raise ValueError(f"radius must be a finite number of pixels >= 0, or one per annotated head "
                         f"({len(t)}), got {radius!r}")
    if len(p) == 0 or len(t) == 0:
        return Matching(0, len(p), len(t), np.zeros((0, 2), dtype=np.int64))
    i, j, dist = _candidate_pairs(p, t, np.broadcast_to(r, (len(t),)))
    if method == "greedy":
        pairs = _greedy(i, j, dist)
    else:
        pairs = _hungarian(i, j, dist, len(p), len(t), int(dense_limit))
    arr = np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return Matching(len(arr), len(p) - len(arr), len(t) - len(arr), arr)


def scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)`` and F1 ``2 tp / (2 tp + fp + fn)``.

    A ratio with a zero denominator is 1 when there are neither predictions nor heads (nothing
    to find, nothing wrongly found), else 0.

    Inputs:
    - tp, fp, fn: ints >= 0, matched pairs, unmatched predictions, missed heads
    Returns:
    - scores: dict with precision, recall, f1 (floats in [0, 1]) and tp, fp, fn
    """
    tp, fp, fn = int(tp), int(fp), int(fn)
    if min(tp, fp, fn) < 0:
        raise ValueError(f"match counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    empty = 1.0 if tp + fp + fn == 0 else 0.0
    return {
        "precision": tp / (tp + fp) if tp + fp else empty,
        "recall": tp / (tp + fn) if tp + fn else empty,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "tp": tp, "fp": fp, "fn": fn,
    }  # fmt: skip


def localization_scores(pred, true, radius: float, method: str = "hungarian") -> dict[str, float | int]:
    """Precision, recall and F1 of one image's predicted head points.

    Inputs:
    - pred, true, radius, method: as in :func:`match_points`
    Returns:
    - scores: dict as :func:`scores_from_counts` returns
    """
    m = match_points(pred, true, radius, method=method)
    return scores_from_counts(m.tp, m.fp, m.fn)
