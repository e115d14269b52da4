"""Counting and localization metrics against hand-computed cases and brute force."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from helpers import metrics

# --------------------------------------------------------------------------- counting


def test_mae_rmse_mre_by_hand():
    pred = [10.0, 20.0, 30.0, 3.0]
    true = [12.0, 20.0, 25.0, 0.0]
    # errors -2, 0, 5, 3
    assert metrics.mae(pred, true) == pytest.approx((2 + 0 + 5 + 3) / 4)
    assert metrics.rmse(pred, true) == pytest.approx(math.sqrt((4 + 0 + 25 + 9) / 4))
    # the image with true count 0 is left out of the relative error
    summary = metrics.counting_summary(pred, true)
    assert summary["mre"] == pytest.approx((2 / 12 + 0 / 20 + 5 / 25) / 3)
    assert summary["n_mre"] == 3


def test_rmse_docstring_names_the_papers_mse():
    doc = metrics.rmse.__doc__
    assert '"MSE"' in doc and "square root" in doc


def test_counting_summary():
    s = metrics.counting_summary([11, 9, 14], [10, 10, 10])
    assert s["n"] == 3 and s["n_mre"] == 3
    assert s["mae"] == pytest.approx(2.0)
    assert s["rmse"] == pytest.approx(math.sqrt((1 + 1 + 16) / 3))
    assert s["mre"] == pytest.approx(0.2)
    assert s["mean_true"] == pytest.approx(10.0)
    assert s["mean_pred"] == pytest.approx(34 / 3)
    assert s["bias"] == pytest.approx(4 / 3)


def test_counting_edge_cases():
    assert math.isnan(metrics.mae([], []))
    assert math.isnan(metrics.rmse([], []))
    assert math.isnan(metrics.counting_summary([1.0, 2.0], [0.0, 0.0])["mre"])
    assert metrics.counting_summary([], [])["n"] == 0
    with pytest.raises(ValueError, match="one value per image"):
        metrics.mae([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        metrics.rmse([np.nan], [1])


# --------------------------------------------------------------------------- GAME

PRED_4X4 = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 2.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.5, 0.0, 0.0, 1.0],
    ]
)
# (x, y): pixels (row, col) = (0,0), (1,3), (3,1), (2,2), (0,3)
POINTS_4X4 = np.array([[0.5, 0.5], [3.2, 1.9], [1.5, 3.5], [2.5, 2.5], [3.9, 0.1]])


def test_game_hand_made_4x4():
    # L0: |4.5 - 5|.  L1 quadrants: pred 1, 2, 0.5, 1 vs true 1, 2, 1, 1.
    # L2 per pixel: (1,3) 2 vs 1, (3,0) 0.5 vs 0, (3,3) 1 vs 0, and misses at (3,1), (2,2), (0,3).
    assert metrics.game(PRED_4X4, POINTS_4X4, 0) == pytest.approx(0.5)
    assert metrics.game(PRED_4X4, POINTS_4X4, 1) == pytest.approx(0.5)
    assert metrics.game(PRED_4X4, POINTS_4X4, 2) == pytest.approx(1 + 0.5 + 1 + 1 + 1 + 1)
    levels = metrics.game_levels(PRED_4X4, POINTS_4X4, levels=(0, 1, 2))
    assert levels == pytest.approx({0: 0.5, 1: 0.5, 2: 5.5})
    pred_r, true_r = metrics.game_regions(PRED_4X4, POINTS_4X4, 1)
    np.testing.assert_allclose(pred_r, [[1, 2], [0.5, 1]])
    np.testing.assert_allclose(true_r, [[1, 2], [1, 1]])


def test_game_truth_density_equals_points():
    true_density = np.zeros((4, 4))
    for x, y in POINTS_4X4:
        true_density[int(y), int(x)] += 1
    for level in (0, 1, 2):
        assert metrics.game(PRED_4X4, true_density, level) == pytest.approx(
            metrics.game(PRED_4X4, POINTS_4X4, level)
        )
    assert metrics.game(true_density, POINTS_4X4, 2) == 0.0


def test_grid_edges_like_array_split():
    np.testing.assert_array_equal(metrics.grid_edges(10, 4), [0, 3, 6, 8, 10])
    np.testing.assert_array_equal(metrics.grid_edges(5, 2), [0, 3, 5])
    np.testing.assert_array_equal(metrics.grid_edges(2, 4), [0, 1, 2, 2, 2])
    for size, parts in [(10, 4), (7, 8), (1024, 8), (13, 3)]:
        sizes = np.diff(metrics.grid_edges(size, parts))
        expected = [len(a) for a in np.array_split(np.arange(size), parts)]
        assert sizes.tolist() == expected


def test_game_non_divisible_image():
    # 5 x 5 image split 3 + 2: region pixel counts 9, 6 / 6, 4.
    pred = np.ones((5, 5))
    pts = np.array([[4.5, 4.5]] * 25)
    pred_r, true_r = metrics.game_regions(pred, pts, 1)
    np.testing.assert_allclose(pred_r, [[9, 6], [6, 4]])
    np.testing.assert_allclose(true_r, [[0, 0], [0, 25]])
    assert metrics.game(pred, pts, 1) == pytest.approx(9 + 6 + 6 + 21)
    assert metrics.game(pred, pts, 0) == pytest.approx(0.0)
    # row boundary at y = 3: y = 2.99 is in the top half, y = 3.0 in the bottom half
    _, top = metrics.game_regions(np.zeros((5, 5)), [[0.0, 2.99]], 1)
    _, bottom = metrics.game_regions(np.zeros((5, 5)), [[0.0, 3.0]], 1)
    assert top[0, 0] == 1 and bottom[1, 0] == 1
    # points outside the image are counted in the nearest border region
    _, outside = metrics.game_regions(np.zeros((5, 5)), [[-1.0, 7.0]], 1)
    np.testing.assert_allclose(outside, [[0, 0], [1, 0]])


def test_game_stride_matches_upsampled_when_aligned():
    rng = np.random.default_rng(1)
    small = rng.random((4, 8))
    full = np.kron(small, np.ones((4, 4))) / 16  # same mass at image resolution 16 x 32
    pts = rng.uniform(0, [32, 16], size=(30, 2))
    for level in (0, 1, 2):
        assert metrics.game(small, pts, level, image_shape=(16, 32), stride=4) == pytest.approx(
            metrics.game(full, pts, level)
        )
    # stride inferred from image_shape / map shape, and image_shape inferred from stride
    assert metrics.game(small, pts, 2, image_shape=(16, 32)) == pytest.approx(metrics.game(full, pts, 2))
    assert metrics.game(small, pts, 2, stride=4) == pytest.approx(metrics.game(full, pts, 2))


def test_game_stride_cell_centres_by_hand():
    # One cell of stride 4 covering a 4 x 4 image: centre (2, 2) is in the bottom-right quadrant.
    one = np.ones((1, 1))
    assert metrics.game(one, [[3.0, 3.0]], 1, image_shape=(4, 4), stride=4) == 0.0
    assert metrics.game(one, [[1.0, 1.0]], 1, image_shape=(4, 4), stride=4) == 2.0
    # 10 x 10 image, stride 4, map 3 x 3 (zero-padded, as helpers.density.downsample_density):
    # centres 2, 6, 10; halves [0, 5) and [5, 10); the centre at 10 (beyond the image) goes to
    # the last half. Rows/cols {0} and {1, 2}.
    d = np.arange(9.0).reshape(3, 3)
    pred_r, _ = metrics.game_regions(d, None, 1, image_shape=(10, 10), stride=4)
    np.testing.assert_allclose(pred_r, [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]])
    # 9 x 9 image: stride 4 gives centres 2, 6, 10 -> {0}, {1, 2}; the stretched map
    # (stride None: 9 / 3 = 3) gives centres 1.5, 4.5, 7.5 -> {0, 1}, {2} (halves [0, 5), [5, 9)).
    pred_r, _ = metrics.game_regions(d, None, 1, image_shape=(9, 9), stride=4)
    np.testing.assert_allclose(pred_r, [[0, 3], [9, 24]])
    pred_r, _ = metrics.game_regions(d, None, 1, image_shape=(9, 9))
    np.testing.assert_allclose(pred_r, [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]])


def test_game_level0_is_count_error_and_its_mean_is_mae():
    rng = np.random.default_rng(2)
    preds, truths, shapes = [], [], []
    for k in range(5):
        h, w = 37 + k, 53 - k
        preds.append(rng.random((-(-h // 8), -(-w // 8))))
        truths.append(rng.uniform(0, [w, h], size=(k * 7, 2)))
        shapes.append((h, w, 3))
    per_image = [metrics.game_levels(p, t, (0, 1, 2, 3), image_shape=shape, stride=8)
                 for p, t, shape in zip(preds, truths, shapes, strict=True)]
    res = {level: np.mean([g[level] for g in per_image]) for level in (0, 1, 2, 3)}
    expected_mae = metrics.mae([p.sum() for p in preds], [len(t) for t in truths])
    assert res[0] == pytest.approx(expected_mae)
    assert res[0] <= res[1] + 1e-9 <= res[2] + 2e-9 <= res[3] + 3e-9  # finer grids never lower


def test_game_bad_input():
    with pytest.raises(ValueError, match="level"):
        metrics.game(PRED_4X4, POINTS_4X4, -1)
    with pytest.raises(ValueError, match="NaN"):
        metrics.game(np.full((2, 2), np.nan), POINTS_4X4, 0)
    with pytest.raises(ValueError, match="truth_kind"):
        metrics.game(PRED_4X4, POINTS_4X4, 0, truth_kind="heads")


# --------------------------------------------------------------------------- peaks


def _blobs(shape, centres, amps, sigma=1.5, stride=1.0):
    """Unnormalised Gaussians of height ``amp`` at image points ``(x, y)``, sampled at cell centres."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    yc, xc = (rows + 0.5) * stride, (cols + 0.5) * stride
    d = np.zeros(shape)
    for (x, y), a in zip(centres, amps, strict=True):
        d += a * np.exp(-((xc - x) ** 2 + (yc - y) ** 2) / (2 * (sigma * stride) ** 2))
    return d


def _nearest(found, centre):
    return np.min(np.hypot(found[:, 0] - centre[0], found[:, 1] - centre[1]))


def test_find_peaks_recovers_blob_centres():
    centres = [(12.6, 10.3), (35.2, 25.9), (8.1, 30.5)]
    d = _blobs((40, 50), centres, [1.0, 0.8, 0.1])
    found = metrics.find_peaks(d, threshold=0.01, min_distance=3)
    assert found.shape == (3, 2)
    for c in centres:
        assert _nearest(found, c) <= 1.0
    # strongest first
    assert _nearest(found[:1], centres[0]) <= 1.0
    # the threshold removes the weak blob (height ~0.1)
    strong = metrics.find_peaks(d, threshold=0.3, min_distance=3)
    assert strong.shape == (2, 2)
    assert _nearest(strong, centres[2]) > 10


def test_find_peaks_stride_maps_to_image_pixels():
    centres = [(50.0, 30.0), (100.0, 90.0)]
    d = _blobs((16, 20), centres, [1.0, 1.0], sigma=1.0, stride=8.0)
    found = metrics.find_peaks(d, threshold=0.1, min_distance=2, stride=8)
    assert found.shape == (2, 2)
    for c in centres:
        assert _nearest(found, c) <= 4 * math.sqrt(2)  # within half a cell on each axis
    # coordinates are cell centres: (j + 0.5) * 8
    assert np.all(((found / 8) - 0.5) % 1 == 0)


def test_find_peaks_zeros_plateaus_and_min_distance():
    z = metrics.find_peaks(np.zeros((8, 8)), threshold=0, min_distance=2)
    assert z.shape == (0, 2) and not np.isnan(z).any()
    assert metrics.peaks_by_count(np.zeros((8, 8))).shape == (0, 2)
    plateau = np.zeros((5, 5))
    plateau[2, 1:3] = 1.0  # two equal neighbouring cells: one head
    np.testing.assert_allclose(metrics.find_peaks(plateau, 0.5, min_distance=1), [[1.5, 2.5]])
    assert len(metrics.find_peaks(plateau, 0.5, min_distance=0)) == 2
    # two blobs 4 cells apart: min_distance 5 keeps only the stronger one
    d = _blobs((20, 20), [(8.5, 10.5), (12.5, 10.5)], [1.0, 0.9], sigma=0.8)
    assert len(metrics.find_peaks(d, 0.1, min_distance=2)) == 2
    np.testing.assert_allclose(metrics.find_peaks(d, 0.1, min_distance=5), [[8.5, 10.5]])
    with pytest.raises(ValueError, match="min_distance"):
        metrics.find_peaks(d, 0.1, min_distance=-1)


def test_peaks_by_count_keeps_round_sum_strongest():
    centres = [(10.5, 10.5), (30.5, 12.5), (20.5, 30.5), (40.5, 35.5)]
    d = _blobs((45, 50), centres, [1.0, 0.9, 0.8, 0.7], sigma=1.2)
    d *= 3.0 / d.sum()  # the map says 3 people: the weakest blob is dropped
    found = metrics.peaks_by_count(d, min_distance=2)
    assert found.shape == (3, 2)
    np.testing.assert_allclose(found, centres[:3])
    assert len(metrics.peaks_by_count(d, min_distance=2, count=10)) == 4  # only 4 maxima exist


def test_refined_peaks_recover_sub_cell_positions_better_than_cell_centres():
    """Gaussian blobs (sigma one cell) at random sub-cell positions on a stride-8 map: the
    centroid of the 3 x 3 cells is nearer the true position than the cell centre, every time."""
    rng = np.random.default_rng(5)
    centre_err, refined_err = [], []
    for _ in range(40):
        true = np.array([rng.uniform(40, 120), rng.uniform(40, 80)])
        d = _blobs((16, 20), [true], [1.0], sigma=1.0, stride=8.0)
        (centre,) = metrics.find_peaks(d, 0.1, stride=8)
        (refined,) = metrics.find_peaks(d, 0.1, stride=8, refine=True)
        centre_err.append(np.hypot(*(centre - true)))
        refined_err.append(np.hypot(*(refined - true)))
    centre_err, refined_err = np.array(centre_err), np.array(refined_err)
    assert np.all(refined_err <= centre_err + 1e-9)
    assert refined_err.mean() < 0.6 * centre_err.mean()
    # peaks_by_count picks the same peaks and refines them the same way
    d = _blobs((16, 20), [(50.0, 30.0), (101.0, 93.0)], [1.0, 0.8], sigma=1.0, stride=8.0)
    np.testing.assert_allclose(metrics.peaks_by_count(d, stride=8, count=2, refine=True),
                               metrics.find_peaks(d, 0.1, stride=8, refine=True))


def test_refinement_by_hand_leaves_out_cells_beyond_the_border():
    d = np.zeros((4, 5))
    d[0, 0], d[0, 1], d[1, 0] = 3.0, 1.0, 2.0  # a peak in the corner: 5 of its 9 cells are outside
    d[3, 3], d[2, 3], d[3, 4], d[2, 4] = 4.0, -1.0, 1.0, 1.0  # negative mass counts as none
    found = metrics.find_peaks(d, 0.5, min_distance=1, stride=2, refine=True)
    # centroid (row, col) of the corner: (2 / 6, 1 / 6); of the other: (3 - 1 / 6, 3 + 2 / 6)
    expected = np.array([[(3 + 2 / 6 + 0.5) * 2, (3 - 1 / 6 + 0.5) * 2], [(1 / 6 + 0.5) * 2, (2 / 6 + 0.5) * 2]])
    np.testing.assert_allclose(found, expected)


# --------------------------------------------------------------------------- matching


def test_hungarian_beats_greedy():
    true = np.array([[0.0, 0.0], [2.0, 0.0]])
    # p0 is nearest to t0 (0.9) but is the only prediction that can reach t1 (1.1);
    # p1 reaches only t0 (1.5; t1 is 3.5 away).
    pred = np.array([[0.9, 0.0], [-1.5, 0.0]])
    greedy = metrics.match_points(pred, true, 2.0, method="greedy")
    assert (greedy.tp, greedy.fp, greedy.fn) == (1, 1, 1)
    np.testing.assert_array_equal(greedy.pairs, [[0, 0]])
    best = metrics.match_points(pred, true, 2.0)
    assert (best.tp, best.fp, best.fn) == (2, 0, 0)
    np.testing.assert_array_equal(best.pairs, [[0, 1], [1, 0]])
    tp, fp, fn, pairs = best  # unpacks as a 4-tuple
    assert tp == 2 and pairs.dtype == np.int64


def test_hungarian_prefers_nearer_pairs_among_maximum_matchings():
    true = np.array([[0.0, 0.0], [10.0, 0.0]])
    pred = np.array([[9.0, 0.0], [1.0, 0.0]])  # the crossing assignment is 18 px, the straight one 2
    m = metrics.match_points(pred, true, 20.0)
    np.testing.assert_array_equal(m.pairs, [[0, 1], [1, 0]])


def test_radius_boundary_is_inclusive():
    true = np.array([[0.0, 0.0]])
    pred = np.array([[3.0, 4.0]])  # distance exactly 5
    assert metrics.match_points(pred, true, 5.0).tp == 1
    assert metrics.match_points(pred, true, 5.0, method="greedy").tp == 1
    assert metrics.match_points(pred, true, 4.999).tp == 0
    assert metrics.match_points(true, true, 0.0).tp == 1  # coincident points at radius 0


def test_empty_sets():
    none = np.zeros((0, 2))
    pts = np.array([[1.0, 1.0], [5.0, 5.0]])
    m = metrics.match_points(none, none, 4)
    assert (m.tp, m.fp, m.fn) == (0, 0, 0) and m.pairs.shape == (0, 2)
    assert metrics.localization_scores(None, [], 4) == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0
    }
    # no predictions: recall 0, precision defined (0), f1 0
    s = metrics.localization_scores(none, pts, 4)
    assert s == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 2}
    # predictions but no heads
    s = metrics.localization_scores(pts, none, 4)
    assert s == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 2, "fn": 0}


def test_all_misses_and_duplicates():
    true = np.array([[0.0, 0.0], [50.0, 50.0]])
    far = np.array([[20.0, 0.0], [0.0, 30.0], [80.0, 80.0]])
    s = metrics.localization_scores(far, true, 8)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 3, 2) and s["f1"] == 0.0
    dup = np.array([[0.5, 0.0], [0.0, 0.5], [0.5, 0.5]])  # three predictions on one head
    for method in metrics.METHODS:
        s = metrics.localization_scores(dup, true, 8, method=method)
        assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
        assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
        assert s["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))


def _brute_force(pred, true, radius):
    """Maximum number of pairs within radius (a number, or one per true head), and the least
    total distance among such matchings."""
    m, n = len(pred), len(true)
    if m == 0 or n == 0:
        return 0, 0.0
    d = np.hypot(pred[:, None, 0] - true[None, :, 0], pred[:, None, 1] - true[None, :, 1])
    radius = np.broadcast_to(np.asarray(radius, dtype=float), (n,))
    best = (0, 0.0)
    if m <= n:  # every matching extends to a one-to-one map of the smaller side into the larger
        assignments = ((range(m), perm) for perm in itertools.permutations(range(n), m))
    else:
        assignments = ((perm, range(n)) for perm in itertools.permutations(range(m), n))
    for rows, cols in assignments:
        ok = [(i, j) for i, j in zip(rows, cols, strict=True) if d[i, j] <= radius[j]]
        key = (len(ok), sum(d[i, j] for i, j in ok))
        if key[0] > best[0] or (key[0] == best[0] and key[1] < best[1]):
            best = key
    return best


def test_random_small_cases_against_brute_force():
    rng = np.random.default_rng(3)
    greedy_short = 0
    for _ in range(250):
        m, n = rng.integers(0, 7, size=2)
        pred = rng.uniform(0, 10, size=(m, 2))
        true = rng.uniform(0, 10, size=(n, 2))
        radius = float(rng.uniform(1, 5))
        best_tp, best_dist = _brute_force(pred, true, radius)
        hung = metrics.match_points(pred, true, radius)
        assert hung.tp == best_tp
        assert hung.fp == m - best_tp and hung.fn == n - best_tp
        dist = np.hypot(*(pred[hung.pairs[:, 0]] - true[hung.pairs[:, 1]]).T)
        assert np.all(dist <= radius)
        assert len(set(hung.pairs[:, 0])) == len(set(hung.pairs[:, 1])) == hung.tp
        assert dist.sum() == pytest.approx(best_dist, abs=1e-9)
        # the sparse fallback (Hopcroft-Karp) finds as many pairs
        assert metrics.match_points(pred, true, radius, dense_limit=0).tp == best_tp
        greedy = metrics.match_points(pred, true, radius, method="greedy")
        assert greedy.tp <= best_tp
        greedy_short += greedy.tp < best_tp
    assert greedy_short > 0  # the random cases include some where greedy falls short


def test_per_head_radii_against_brute_force_and_a_dense_assignment():
    """match_points with one radius per annotated head: the most pairs, then the least distance,
    checked by enumerating assignments and by linear_sum_assignment on a dense matrix in which
    forbidden pairs cost more than any allowed matching."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(11)
    for _ in range(200):
        m, n = rng.integers(0, 7, size=2)
        pred, true = rng.uniform(0, 10, size=(m, 2)), rng.uniform(0, 10, size=(n, 2))
        radii = rng.uniform(0.5, 5, size=n)
        hung = metrics.match_points(pred, true, radii)
        best_tp, best_dist = _brute_force(pred, true, radii)
        assert hung.tp == best_tp and hung.fp == m - best_tp and hung.fn == n - best_tp
        dist = np.hypot(*(pred[hung.pairs[:, 0]] - true[hung.pairs[:, 1]]).T)
        assert np.all(dist <= radii[hung.pairs[:, 1]])
        assert dist.sum() == pytest.approx(best_dist, abs=1e-9)
        if m and n:
            d = np.hypot(pred[:, None, 0] - true[None, :, 0], pred[:, None, 1] - true[None, :, 1])
            allowed = d <= radii[None, :]
            cost = np.where(allowed, d, 1e6)
            a, b = linear_sum_assignment(cost)
            assert hung.tp == int(allowed[a, b].sum())
        assert metrics.match_points(pred, true, radii, dense_limit=0).tp == best_tp
        assert metrics.match_points(pred, true, radii, method="greedy").tp <= best_tp
    # a scalar radius is the same as that radius for every head
    pred, true = rng.uniform(0, 20, size=(30, 2)), rng.uniform(0, 20, size=(25, 2))
    a, b = metrics.match_points(pred, true, 3.0), metrics.match_points(pred, true, np.full(25, 3.0))
    assert a.tp == b.tp and np.array_equal(a.pairs, b.pairs)
    with pytest.raises(ValueError, match="one per annotated head"):
        metrics.match_points(pred, true, np.full(24, 3.0))
    with pytest.raises(ValueError, match="radius"):
        metrics.match_points(pred, true, np.r_[np.full(24, 3.0), -1.0])


def test_knn_radii_against_a_direct_computation():
    rng = np.random.default_rng(2)
    for n in (2, 3, 4, 9, 40):
        pts = rng.uniform(0, 100, size=(n, 2))
        d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2))
        nearest = np.sort(d, axis=1)[:, 1 : min(3, n - 1) + 1]  # column 0: the head itself
        np.testing.assert_allclose(metrics.knn_radii(pts), 0.5 * nearest.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(metrics.knn_radii(pts, delta=0.25, k=1), 0.25 * np.sort(d, axis=1)[:, 1])
    np.testing.assert_array_equal(metrics.knn_radii([[5.0, 5.0]]), [8.0])  # a lone head: 0.5 x 16 px
    np.testing.assert_array_equal(metrics.knn_radii([[5.0, 5.0]], delta=0.25, single=40.0), [10.0])
    assert metrics.knn_radii(None).shape == (0,)


def test_large_matching_is_fast_and_consistent():
    rng = np.random.default_rng(4)
    # 3000 heads on a jittered 4-px grid: one big connected group at radius 8
    gy, gx = np.mgrid[0:50, 0:60]
    true = np.column_stack([gx.ravel(), gy.ravel()]).astype(float) * 4
    pred = true + rng.normal(0, 2.5, size=true.shape)
    pred = np.vstack([pred, rng.uniform(0, 240, size=(200, 2))])
    start = time.perf_counter()
    hung = metrics.match_points(pred, true, 8.0)
    seconds = time.perf_counter() - start
    sparse = metrics.match_points(pred, true, 8.0, dense_limit=0)
    assert hung.tp == sparse.tp
    assert hung.tp + hung.fn == len(true) and hung.tp + hung.fp == len(pred)
    assert seconds < 5.0


# --------------------------------------------------------------------------- scores


def test_scores_from_counts_by_hand():
    s = metrics.scores_from_counts(3, 1, 2)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
