"""Density-map ground truth: exact counts, agreement with the original method, downsampling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from helpers import data
from helpers import density as dens
from helpers.analysis import ground_truth
from helpers.tools.cache import params_from_attrs, params_key, params_to_attrs

REL = 1e-4  # count tolerance, relative


# --------------------------------------------------------------------------- independent references


def slow_reference(points, sigmas, shape, truncate=4.0) -> np.ndarray:
    """The original method, written out independently: one full-image filter per head (float64)."""
    out = np.zeros(shape, dtype=np.float64)
    for (x, y), s in zip(np.asarray(points), np.asarray(sigmas), strict=True):
        delta = np.zeros(shape, dtype=np.float64)
        delta[int(y), int(x)] = 1.0
        out += gaussian_filter(delta, float(s), mode="constant", truncate=truncate)
    return out


def brute_sigmas(points, k=3, beta=0.3, fallback=4.0) -> np.ndarray:
    """beta * mean distance to the min(k, N-1) nearest other heads, from all pairwise distances."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if n == 1:
        return np.array([fallback])
    dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, : min(k, n - 1)]
    return beta * nearest.mean(axis=1)


def border_mask(points, sigmas, shape, truncate=4.0) -> np.ndarray:
    """Pixels within reach of a kernel that crosses the border (computed here, not by the module)."""
    mask = np.zeros(shape, dtype=bool)
    for (x, y), s in zip(points, sigmas, strict=True):
        r, row, col = int(truncate * s + 0.5), int(y), int(x)
        if row - r < 0 or col - r < 0 or row + r >= shape[0] or col + r >= shape[1]:
            mask[max(0, row - r) : row + r + 1, max(0, col - r) : col + r + 1] = True
    return mask


def total(a) -> float:
    return float(np.asarray(a, dtype=np.float64).sum())


# --------------------------------------------------------------------------- parameters


def test_params_validation_and_keys():
    for bad in (
        {"method": "gauss"},
        {"sigma": 0},
        {"sigma": -1.0},
        {"sigma": float("nan")},
        {"beta": 0},
        {"k": 0},
        {"k": 2.5},
        {"truncate": 0},
        {"min_sigma": -1},
        {"min_sigma": 5.0, "max_sigma": 2.0},
    ):
        with pytest.raises(ValueError):
            dens.DensityParams(**bad)
    p = dens.DensityParams()
    assert params_key(p) == params_key(dens.DensityParams()) == "adaptive_k3_b0.3_s4.0_t4.0"
    keys = {
        params_key(dens.DensityParams(**kw))
        for kw in (
            {},
            {"beta": 0.31},
            {"k": 4},
            {"sigma": 5.0},
            {"truncate": 3.0},
            {"min_sigma": 1.0},
            {"max_sigma": 20.0},
            {"method": "fixed"},
        )
    }
    assert len(keys) == 8
    # beta and k do not change fixed-sigma maps, so they do not change the key
    assert params_key(dens.DensityParams("fixed", beta=0.5, k=7)) == params_key(dens.DensityParams("fixed"))
    for q in (p, dens.DensityParams("fixed", 2.5, min_sigma=1.0, max_sigma=9.0)):
        attrs = params_to_attrs(q)
        assert all(isinstance(v, (str, int, float)) for v in attrs.values())
        assert params_from_attrs(attrs) == q


# --------------------------------------------------------------------------- sigmas


def test_adaptive_sigmas_match_brute_force():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 200, size=(120, 2))
    for k, beta in ((3, 0.3), (1, 0.5), (6, 0.2)):
        np.testing.assert_allclose(
            dens.adaptive_sigmas(pts, k, beta), brute_sigmas(pts, k, beta), rtol=1e-12
        )


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_adaptive_sigmas_few_heads(n):
    pts = np.array([[10.0, 10.0], [20.0, 10.0], [10.0, 40.0], [50.0, 50.0]])[:n]
    sig = dens.adaptive_sigmas(pts, k=3, beta=0.3, fallback_sigma=4.0)
    assert sig.shape == (n,) and sig.dtype == np.float64
    if n:
        np.testing.assert_allclose(sig, brute_sigmas(pts, 3, 0.3, 4.0), rtol=1e-12)
    if n == 1:
        assert sig[0] == 4.0


def test_adaptive_sigmas_coincident_points_stay_positive():
    # four clicks on one head: its 3 nearest others are all at distance 0 -> fallback sigma
    pts = np.array([[30.0, 30.0]] * 4 + [[60.0, 30.0], [90.0, 30.0]])
    sig = dens.adaptive_sigmas(pts, k=3, fallback_sigma=4.0)
    assert np.isfinite(sig).all() and (sig > 0).all()
    np.testing.assert_array_equal(sig[:4], 4.0)
    np.testing.assert_allclose(sig[4:], brute_sigmas(pts)[4:])
    # two coincident heads alone: no distance to measure either
    np.testing.assert_array_equal(
        dens.adaptive_sigmas([[5.0, 5.0], [5.0, 5.0]], fallback_sigma=3.0), 3.0
    )
    # a pair inside a crowd keeps the rule (its mean includes one zero)
    pair = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    np.testing.assert_allclose(dens.adaptive_sigmas(pair)[0], 0.3 * (0 + 5 + 10) / 3)


def test_sigma_clamps_and_fixed():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 300, size=(40, 2))
    raw = dens.adaptive_sigmas(pts)
    clamped = dens.adaptive_sigmas(pts, min_sigma=2.0, max_sigma=5.0)
    np.testing.assert_allclose(clamped, np.clip(raw, 2.0, 5.0))
    fixed = dens.head_sigmas(pts, dens.DensityParams("fixed", sigma=2.5))
    np.testing.assert_array_equal(fixed, 2.5)
    geo = ground_truth.local_geometry(pts)
    np.testing.assert_allclose(geo["sigma"], 0.3 * geo["mean_knn_px"])
    assert (geo["local_density"] > 0).all()


# --------------------------------------------------------------------------- kernel and maps


@pytest.mark.parametrize("sigma", [0.3, 0.625, 1.0, 2.37, 4.0, 11.0])
def test_kernel_is_scipys(sigma):
    kern = dens.gaussian_kernel_1d(sigma)
    r = int(4.0 * sigma + 0.5)
    assert kern.shape == (2 * r + 1,) and dens.kernel_radius(sigma) == r
    delta = np.zeros(2 * r + 41)
    delta[r + 20] = 1.0
    filtered = gaussian_filter1d(delta, sigma, mode="constant")
    np.testing.assert_allclose(kern, filtered[20 : 20 + 2 * r + 1], rtol=0, atol=1e-15)
    assert abs(kern.sum() - 1) < 1e-12


def test_interior_matches_original_method():
    rng = np.random.default_rng(3)
    shape = (70, 90)
    # heads well inside: no kernel is truncated, so the whole map must agree
    inner = rng.uniform([25, 25], [65, 45], size=(12, 2))
    sig = dens.head_sigmas(inner, dens.DensityParams("fixed", sigma=3.0))
    ours = dens.density_from_sigmas(inner, sig, shape)
    ref = slow_reference(inner, sig, shape)
    assert np.abs(ours - ref).max() <= 1e-5 * ref.max()
    # adaptive sigmas, heads everywhere: agree away from the borders; with renormalize=False
    # (the original border handling) agree everywhere
    pts = rng.uniform([0, 0], [90, 70], size=(40, 2))
    params = dens.DensityParams()
    sig = brute_sigmas(pts)
    ours = dens.density_map(pts, shape, params)
    ref = slow_reference(pts, sig, shape)
    interior = ~border_mask(pts, sig, shape)
    assert interior.sum() > 500
    assert np.abs(ours - ref)[interior].max() <= 1e-5 * ref.max()
    lossy = dens.density_map(pts, shape, params, renormalize=False)
    assert np.abs(lossy - ref).max() <= 1e-5 * ref.max()
    # the original loses mass at the borders; ours keeps it
    assert total(ref) < len(pts) - 0.5
    assert abs(total(ours) - len(pts)) <= REL * len(pts)


def _edge_points(h, w):
    eps = 1e-6
    return np.array(
        [
            [0, 0],
            [w - eps, 0],
            [0, h - eps],
            [w - eps, h - eps],  # corners
            [w / 2, 0],
            [w / 2, h - eps],
            [0, h / 2],
            [w - eps, h / 2],  # edges
            [0.5, 1.5],
            [w - 1.5, h - 0.5],
            [3.0, h / 3],
            [w / 3, 2.0],  # near the border
        ],
        dtype=np.float64,
    )


CASES = {
    "0 heads": np.zeros((0, 2)),
    "1 head": np.array([[20.5, 15.5]]),
    "2 heads": np.array([[10.0, 10.0], [30.0, 20.0]]),
    "3 heads": np.array([[10.0, 10.0], [30.0, 20.0], [5.0, 25.0]]),
    "coincident": np.array([[12.0, 9.0]] * 5 + [[12.0, 10.0], [40.0, 20.0]]),
    "borders and corners": _edge_points(32, 48),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["adaptive", "fixed"])
def test_counts_exact_synthetic(case, method):
    pts = CASES[case]
    shape = (32, 48)
    dmap = dens.density_map(pts, shape, dens.DensityParams(method, sigma=6.0))
    assert dmap.dtype == np.float32 and dmap.shape == shape
    assert (dmap >= 0).all()
    if len(pts) == 0:
        assert not dmap.any()
    else:
        assert abs(total(dmap) - len(pts)) <= REL * len(pts)


def test_kernel_larger_than_image_and_head_pixel():
    # a 3 x 4 image with sigma 10: the kernel covers it many times over, the count stays 1
    dmap = dens.density_map([[2.9, 1.2]], (3, 4), dens.DensityParams("fixed", sigma=10.0))
    assert abs(total(dmap) - 1) <= 1e-6
    # a head sits in pixel (int(y), int(x)) and its kernel is centred there
    dmap = dens.density_map([[7.9, 4.2]], (12, 16), dens.DensityParams("fixed", sigma=1.0))
    assert np.unravel_index(dmap.argmax(), dmap.shape) == (4, 7)
    row = dmap[4]
    np.testing.assert_allclose(row[7 - 3 : 7], row[8 : 8 + 3][::-1], rtol=1e-6)


def test_outside_points_are_ignored():
    shape = (30, 40)
    inside = np.array([[5.0, 5.0], [20.0, 15.0], [39.5, 29.5]])
    outside = np.array(
        [[-0.1, 5.0], [40.0, 10.0], [10.0, 30.0], [-3.0, -3.0], [np.nan, 4.0], [5.0, np.inf]]
    )
    for params in (dens.DensityParams(), dens.DensityParams("fixed")):
        with_out = dens.density_map(np.vstack([inside, outside]), shape, params)
        np.testing.assert_array_equal(with_out, dens.density_map(inside, shape, params))
        assert abs(total(with_out) - 3) <= REL * 3


@pytest.mark.dataset
def test_counts_exact_real_images(real_data_root):
    for part in ("A", "B"):
        records = data.take_evenly(data.list_records(part, "train", root=real_data_root), 3)
        records += data.take_evenly(data.list_records(part, "test", root=real_data_root), 1)
        for record in records:
            points, report = data.clean_points(
                data.read_points(record.points_path), data.image_size(record.image_path)
            )
            dmap = dens.compute_density(record)
            assert dmap.shape == data.image_size(record.image_path)
            assert len(points) == report.n_kept > 0
            assert abs(total(dmap) - len(points)) <= REL * len(points), record.image_path
    # the same as going through load_example (decoded image and its shape)
    example = data.load_example(records[0])
    np.testing.assert_array_equal(
        dens.density_map(example.points, example.image.shape), dens.compute_density(records[0])
    )


# --------------------------------------------------------------------------- downsampling


@pytest.mark.parametrize(
    "shape,factor", [((64, 96), 8), ((61, 90), 8), ((37, 23), 4), ((5, 7), 8), ((9, 9), 1)]
)
def test_downsample_preserves_count(shape, factor):
    rng = np.random.default_rng(4)
    dmap = rng.random(shape).astype(np.float32)
    small = dens.downsample_density(dmap, factor)
    out_h, out_w = -(-shape[0] // factor), -(-shape[1] // factor)
    assert small.shape == (out_h, out_w) and small.dtype == np.float32
    manual = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            manual[i, j] = (
                dmap[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
                .astype(np.float64)
                .sum()
            )
    np.testing.assert_allclose(small, manual, rtol=1e-6)
    assert abs(total(small) - total(dmap)) <= 1e-6 * total(dmap)


def test_downsample_of_real_map_and_cv2_approximation():
    rng = np.random.default_rng(5)
    shape = (101, 133)  # not a multiple of 8
    pts = rng.uniform([0, 0], [133, 101], size=(60, 2))
    dmap = dens.density_map(pts, shape, dens.DensityParams("fixed", sigma=1.0))
    assert abs(total(dens.downsample_density(dmap, 8)) - 60) <= REL * 60
    approx = ground_truth.resize_density_cv2(dmap, 8)
    assert approx.shape == (101 // 8, 133 // 8)
    assert abs(total(approx) - 60) > 0.05  # interpolation does not keep the count
    with pytest.raises(ValueError):
        dens.downsample_density(dmap, 0)


