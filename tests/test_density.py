"""Density-map ground truth: exact counts, agreement with the original method, downsampling, cache."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from helpers import data
from helpers import density as dens
from helpers.errors import CacheError

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
    assert p.key() == dens.DensityParams().key() == "adaptive_k3_b0.3_s4.0_t4.0"
    keys = {
        dens.DensityParams(**kw).key()
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
    assert dens.DensityParams("fixed", beta=0.5, k=7).key() == dens.DensityParams("fixed").key()
    for q in (p, dens.DensityParams("fixed", 2.5, min_sigma=1.0, max_sigma=9.0)):
        attrs = q.to_attrs()
        assert all(isinstance(v, (str, int, float)) for v in attrs.values())
        assert dens.DensityParams.from_attrs(attrs) == q


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
    geo = dens.local_geometry(pts)
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
    approx = dens.resize_density_cv2(dmap, 8)
    assert approx.shape == (101 // 8, 133 // 8)
    assert abs(total(approx) - 60) > 0.05  # interpolation does not keep the count
    with pytest.raises(ValueError):
        dens.downsample_density(dmap, 0)


# --------------------------------------------------------------------------- cache


def write_gt_mat(path: Path, points) -> None:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inner = np.empty((1, 1), dtype=[("location", "O"), ("number", "O")])
    inner[0, 0]["location"] = points
    inner[0, 0]["number"] = np.array([[float(len(points))]])
    outer = np.empty((1, 1), dtype=object)
    outer[0, 0] = inner
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"image_info": outer})


def make_dataset(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """A tiny ShanghaiTech-style part A (train split), with some points outside the image."""
    rng = np.random.default_rng(6)
    truth = {}
    images = root / "part_A" / "train_data" / "images"
    images.mkdir(parents=True)
    for i in range(1, n + 1):
        h, w = 30 + 3 * i, 40 + 5 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            images / f"IMG_{i}.jpg"
        )
        pts = rng.uniform([0, 0], [w, h], size=(4 * i, 2))
        write_gt_mat(
            root / "part_A" / "train_data" / "ground-truth" / f"GT_IMG_{i}.mat",
            np.vstack([pts, [[w + 3.0, 2.0]]]),
        )
        truth[f"IMG_{i}"] = pts
    return truth


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture()
def tiny(tmp_path, isolated_home):
    root = tmp_path / "ShanghaiTech"
    truth = make_dataset(root)
    return root, truth, data.list_records("A", "train", root=root)


def test_cache_build_skip_and_load(tiny, isolated_home):
    root, truth, records = tiny
    params = dens.DensityParams()
    stats = dens.build_cache(records, params, progress=False)
    assert (stats["images"], stats["built"], stats["skipped_fresh"], stats["rebuilt_stale"]) == (
        3,
        3,
        0,
        0,
    )
    assert stats["heads"] == sum(len(p) for p in truth.values())
    for record in records:
        path = dens.cache_path(record, params)
        assert path.is_file() and path.suffix == ".h5"
        assert Path(os.environ["CROWD_CACHE"]) in path.parents and root not in path.parents
        with h5py.File(path, "r") as fh:
            assert fh["density"].dtype == np.float32
            assert fh.attrs["n_points"] == len(truth[record.name])
            assert fh.attrs["params_key"] == params.key()
            assert fh.attrs["format_version"] == dens.FORMAT_VERSION
            assert dens.DensityParams.from_attrs(fh.attrs) == params
        cached = dens.load_density(record, params)
        np.testing.assert_array_equal(cached, dens.compute_density(record, params))
        assert abs(total(cached) - len(truth[record.name])) <= REL * len(truth[record.name])
        assert dens.cache_status(record, params) == "fresh"
    before = {r.name: dens.cache_path(r, params).stat().st_mtime_ns for r in records}
    stats = dens.build_cache(records, params, progress=False)
    assert (stats["built"], stats["skipped_fresh"], stats["rebuilt_stale"]) == (0, 3, 0)
    assert before == {r.name: dens.cache_path(r, params).stat().st_mtime_ns for r in records}


def test_cache_rebuilds_when_params_change(tiny):
    _, truth, records = tiny
    dens.build_cache(records, dens.DensityParams(), progress=False)
    fixed = dens.DensityParams("fixed", sigma=2.0)
    assert dens.cache_path(records[0], fixed) != dens.cache_path(records[0], dens.DensityParams())
    assert dens.cache_status(records[0], fixed) == "missing"
    stats = dens.build_cache(records, fixed, progress=False)
    assert stats["built"] == 3
    np.testing.assert_array_equal(
        dens.load_density(records[0], fixed), dens.compute_density(records[0], fixed)
    )
    # a file holding maps of other parameters at this path (copied by hand) is stale
    path = dens.cache_path(records[1], fixed)
    path.write_bytes(dens.cache_path(records[1], dens.DensityParams()).read_bytes())
    assert dens.cache_status(records[1], fixed) == "stale"
    stats = dens.build_cache(records, fixed, progress=False)
    assert (stats["rebuilt_stale"], stats["skipped_fresh"]) == (1, 2)
    with h5py.File(path, "r") as fh:
        assert fh.attrs["method"] == "fixed"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "attrs"])
def test_cache_rebuilds_damaged_file(tiny, damage):
    _, truth, records = tiny
    params = dens.DensityParams()
    dens.build_cache(records, params, progress=False)
    path = dens.cache_path(records[2], params)
    good = dens.load_density(records[2], params)
    if damage == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not an HDF5 file at all" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with h5py.File(path, "a") as fh:
            fh.attrs["params_key"] = "something else"
    assert dens.cache_status(records[2], params) == "stale"
    stats = dens.build_cache(records, params, progress=False)
    assert (stats["rebuilt_stale"], stats["skipped_fresh"]) == (1, 2)
    np.testing.assert_array_equal(dens.load_density(records[2], params, build=False), good)


def test_cache_rebuilds_when_annotation_changes(tiny):
    root, truth, records = tiny
    params = dens.DensityParams()
    dens.build_cache(records, params, progress=False)
    record = records[0]
    stamp = os.stat(record.points_path).st_mtime_ns
    new_points = truth[record.name][:2]
    write_gt_mat(record.points_path, new_points)
    os.utime(record.points_path, ns=(stamp + 10**9, stamp + 10**9))
    assert dens.cache_status(record, params) == "stale"
    dmap = dens.load_density(record, params)  # rebuilt on load
    assert abs(total(dmap) - 2) <= REL * 2
    stats = dens.build_cache(records, params, progress=False)
    assert stats["skipped_fresh"] == 3


def test_cache_with_read_only_dataset(tiny):
    root, truth, records = tiny
    before = snapshot(root)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(stat.S_IMODE(modes[p]) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        stats = dens.build_cache(records, dens.DensityParams(), progress=False)
        assert stats["built"] == 3
        assert dens.load_density(
            records[0], dens.DensityParams(), build=False
        ).shape == data.image_size(records[0].image_path)
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert snapshot(root) == before  # nothing written inside the dataset


def test_cache_errors(tiny, tmp_path):
    _, _, records = tiny
    with pytest.raises(CacheError, match="build"):
        dens.load_density(records[0], dens.DensityParams(), build=False)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(CacheError) as err:
        dens.load_density(records[0], dens.DensityParams(), cache_dir=blocker)
    assert "CROWD_CACHE" in str(err.value) and "not_a_folder" in str(err.value)


def test_cache_for_own_folder_with_csv_points(tmp_path, isolated_home):
    folder = tmp_path / "my photos"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "street.png")
    (folder / "street.csv").write_text("x,y\n1.5,2.5\n28,18\n15,10\n")
    records = data.records_in_folder(folder)
    path = dens.cache_path(records[0])
    assert path.name == "street.png.h5" and dens.dataset_id(folder) in str(path)
    assert abs(total(dens.load_density(records[0])) - 3) <= REL * 3
    assert snapshot(folder) == {
        str(folder / "street.csv"): (folder / "street.csv").stat().st_mtime_ns,
        str(folder / "street.png"): (folder / "street.png").stat().st_mtime_ns,
    }


def test_cache_parallel_workers(tiny):
    _, _, records = tiny
    stats = dens.build_cache(records, dens.DensityParams(), progress=False, workers=2)
    assert stats["built"] == 3
    np.testing.assert_array_equal(
        dens.load_density(records[1], build=False), dens.compute_density(records[1])
    )


def test_count_table(tiny):
    _, truth, records = tiny
    rows = dens.count_table(records, dens.DensityParams(), factor=4)
    for row, record in zip(rows, records, strict=True):
        n = len(truth[record.name])
        assert row["n_points"] == n and row["n_raw"] == n + 1  # one point outside is dropped
        assert abs(row["sum"] - n) <= REL * n and abs(row["sum_pooled"] - n) <= REL * n
        assert row["sum_no_renorm"] < row["sum"]


def test_command_line(tiny, capsys):
    root, truth, _ = tiny
    assert (
        dens.main(
            ["build", "--root", str(root), "--part", "A", "--split", "train", "--no-progress"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["built"] == 3 and summary["heads"] == sum(len(p) for p in truth.values())
    assert (
        dens.main(
            ["build", "--root", str(root), "--part", "A", "--method", "fixed", "--sigma", "-1"]
        )
        == 1
    )
    assert capsys.readouterr().err.startswith("error: ")
    assert dens.main(["build", "--root", str(root / "nowhere"), "--no-progress"]) == 1
