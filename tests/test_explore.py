"""Dataset exploration: k-NN distances, per-image statistics, count summaries, perspective profile."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers import data
from helpers.analysis import explore, tables
from helpers.errors import AnnotationError, ImageReadError
from helpers.viz.common import figure_png

# --------------------------------------------------------------------------- helpers


def brute_knn(points: np.ndarray, k: int) -> np.ndarray:
    """Mean distance to the k nearest other points, from the full distance matrix."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    out = np.empty(n)
    for i in range(n):
        d = sorted(math.dist(pts[i], pts[j]) for j in range(n) if j != i)
        out[i] = np.mean(d[:k]) if d else np.nan
    return out


def write_mat(path: Path, points: np.ndarray) -> None:
    """An annotation in the ShanghaiTech structure: image_info{1,1} struct(location, number)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inner = np.empty((1, 1), dtype=[("location", "O"), ("number", "O")])
    inner[0, 0]["location"] = pts
    inner[0, 0]["number"] = np.array([[len(pts)]], dtype=np.uint16)
    outer = np.empty((1, 1), dtype=object)
    outer[0, 0] = inner
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"image_info": outer})


def write_image(path: Path, width: int, height: int, gray: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB").save(path)


# name -> (width, height, grayscale, raw points, expected kept points, outside, non-finite, duplicates)
TINY = {
    "IMG_1": (40, 30, False, [[1, 1], [5, 1], [5, 1], [20.5, 10.25], [39.9, 29.9]], None, 0, 0, 1),
    "IMG_2": (24, 32, True, [[2, 3], [30, 5], [np.nan, 4], [10, 40], [-1, 2], [12, 20], [3, 30]],
              [[2, 3], [12, 20], [3, 30]], 3, 1, 0),
    "IMG_3": (36, 28, False, [[7.5, 7.5]], None, 0, 0, 0),
}


@pytest.fixture()
def tiny_root(tmp_path) -> Path:
    """A ShanghaiTech-layout dataset of three small JPEGs (one grayscale) in part_A/train_data."""
    root = tmp_path / "ShanghaiTech"
    sdir = root / "part_A" / "train_data"
    for i, (name, (w, h, gray, raw, *_)) in enumerate(TINY.items()):
        write_image(sdir / "images" / f"{name}.jpg", w, h, gray, seed=i)
        write_mat(sdir / "ground-truth" / f"GT_{name}.mat", np.array(raw, dtype=np.float64))
    return root


# --------------------------------------------------------------------------- knn_distances


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 50])
@pytest.mark.parametrize("k", [1, 3])
def test_mean_knn_distance_match_brute_force(n, k):
    pts = np.random.default_rng(n * 10 + k).uniform(0, 100, size=(n, 2))
    got = explore.mean_knn_distance(pts, k)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, brute_knn(pts, k), rtol=1e-12, atol=1e-12, equal_nan=True)


def test_mean_knn_distance_small_cases_by_hand():
    assert np.isnan(explore.mean_knn_distance(np.array([[3.0, 4.0]]))).all()  # no neighbour
    np.testing.assert_allclose(explore.mean_knn_distance(np.array([[0.0, 0.0], [3.0, 4.0]])), [5.0, 5.0])
    # N = 3 <= k: each point averages its two neighbours (3-4-5 triangle).
    tri = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(explore.mean_knn_distance(tri, 3), [(3 + 4) / 2, (3 + 5) / 2, (4 + 5) / 2])


def test_mean_knn_distance_coincident_points():
    pts = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [4.0, 5.0], [10.0, 1.0]])
    got = explore.mean_knn_distance(pts, 3)
    np.testing.assert_allclose(got, brute_knn(pts, 3), atol=1e-12)
    # a triple point: its two twins at 0 and the point at (4, 5), distance 5
    np.testing.assert_allclose(got[:3], 5.0 / 3)
    twins = explore.mean_knn_distance(np.array([[2.0, 2.0], [2.0, 2.0]]), 3)
    np.testing.assert_array_equal(twins, [0.0, 0.0])


def test_mean_knn_distance_rejects_bad_k():
    with pytest.raises(ValueError):
        explore.mean_knn_distance(np.zeros((3, 2)), 0)


# --------------------------------------------------------------------------- summaries


def _row(part: str, split: str, count: int, i: int) -> explore.ImageStats:
    return explore.ImageStats(
        name=f"IMG_{i}", part=part, split=split, height=10, width=10, count=count, grayscale=False,
        mean_nn=float("nan"), n_raw=count + i % 3, n_kept=count, non_finite=i % 2, outside=i % 3 - i % 2,
        duplicates=i % 5,
    )


def test_summarize_counts_against_numpy():
    rng = np.random.default_rng(0)
    table = {("A", "train"): rng.integers(30, 3000, 17), ("A", "test"): rng.integers(30, 3000, 8),
             ("B", "train"): rng.integers(5, 600, 12)}
    rows = [_row(p, s, int(c), i) for (p, s), counts in table.items() for i, c in enumerate(counts)]
    rng.shuffle(rows)  # order of rows must not matter
    summary = explore.summarize_counts(rows)
    assert set(summary) == {"A/train", "A/test", "B/train"}
    for (p, s), counts in table.items():
        got = summary[f"{p}/{s}"]
        assert got["n"] == len(counts)
        assert got["total"] == int(np.sum(counts))
        assert got["min"] == np.min(counts) and got["max"] == np.max(counts)
        assert got["median"] == pytest.approx(float(np.median(counts)))
        assert got["mean"] == pytest.approx(float(np.mean(counts)))
    totals = explore.report_totals(rows)
    for key, sums in totals.items():
        part, split = key.split("/")
        mine = [r for r in rows if r.part == part and r.split == split]
        for field in explore.REPORT_FIELDS:
            assert sums[field] == sum(getattr(r, field) for r in mine)


def test_markdown_table_layout():
    text = tables.markdown_table({"A/train": {"n": 3, "total": 12345, "mean": 2.25}})
    lines = text.splitlines()
    assert lines[0] == "| | n | total | mean |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| A/train | 3 | 12,345 | 2.2 |"  # 2.25 rounds half to even


# --------------------------------------------------------------------------- image_stats on files


def test_image_stats_on_tiny_dataset(tiny_root):
    records = data.list_records("A", "train", tiny_root)
    assert [r.name for r in records] == ["IMG_1", "IMG_2", "IMG_3"]
    stats = explore.image_stats(records, progress=False)
    assert len(stats) == 3
    for row in stats:
        w, h, gray, raw, kept, outside, non_finite, dups = TINY[row.name]
        kept = np.array(raw if kept is None else kept, dtype=np.float64)
        assert (row.part, row.split) == ("A", "train")  # read from the folder names
        assert (row.width, row.height) == (w, h)
        assert row.grayscale is gray
        assert row.n_raw == len(raw)
        assert row.count == row.n_kept == len(kept)
        assert (row.outside, row.non_finite, row.duplicates) == (outside, non_finite, dups)
        expected_nn = np.mean(brute_knn(kept, 3)) if len(kept) > 1 else np.nan
        np.testing.assert_allclose(row.mean_nn, expected_nn, rtol=1e-12, equal_nan=True)
    # the grayscale file still reads as H x W x 3
    gray = data.read_image(records[1].image_path)
    assert gray.shape == (32, 24, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 2])
    summary = explore.summarize_counts(stats)
    assert summary["A/train"]["total"] == 5 + 3 + 1
    relabelled = explore.image_stats(records, "A", "fit", progress=False)
    assert {r.split for r in relabelled} == {"fit"}


def test_declared_count_reads_the_number_field(tiny_root, tmp_path):
    for rec in data.list_records("A", "train", tiny_root):
        assert explore.declared_count(rec.points_path) == len(TINY[rec.name][3])
    other = tmp_path / "ucf_ann.mat"
    scipy.io.savemat(other, {"annPoints": np.zeros((4, 2))})
    assert explore.declared_count(other) is None
    csv = tmp_path / "points.csv"
    csv.write_text("1,2\n")
    assert explore.declared_count(csv) is None
    broken = tmp_path / "broken.mat"
    broken.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(AnnotationError):
        explore.declared_count(broken)


def test_image_stats_needs_annotations(tiny_root):
    rec = data.list_records("A", "train", tiny_root)[0]
    with pytest.raises(AnnotationError, match="No annotation"):
        explore.image_stats([data.ImageRecord(rec.name, rec.image_path, None)], progress=False)


def test_is_grayscale_file_uses_the_file_mode(tmp_path):
    gray_rgb = tmp_path / "gray_as_rgb.png"  # grey pixels but stored as RGB: not a grayscale file
    Image.fromarray(np.full((4, 5, 3), 128, dtype=np.uint8), mode="RGB").save(gray_rgb)
    la = tmp_path / "la.png"
    Image.new("LA", (5, 4)).save(la)
    assert not explore.is_grayscale_file(gray_rgb)
    assert explore.is_grayscale_file(la)
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("<html>404</html>")
    with pytest.raises(ImageReadError):
        explore.is_grayscale_file(bad)


# --------------------------------------------------------------------------- perspective profile


def test_profile_by_row_bins_and_line():
    rng = np.random.default_rng(1)
    rel = rng.uniform(0, 1, 2000)
    dist = 5.0 + 10.0 * rel  # exactly linear
    prof = explore.profile_by_row(dist, rel, bins=4)
    assert prof.slope == pytest.approx(10.0) and prof.intercept == pytest.approx(5.0)
    np.testing.assert_allclose(prof.edges, [0, 0.25, 0.5, 0.75, 1.0])
    for b in range(4):
        inside = (rel >= b / 4) & (rel < (b + 1) / 4)
        assert prof.n[b] == inside.sum()
        assert prof.mean[b] == pytest.approx(dist[inside].mean())
        assert prof.std[b] == pytest.approx(dist[inside].std(), abs=1e-6)
    np.testing.assert_allclose(prof.line([0.0, 1.0]), [5.0, 15.0])
    # noisy data: the line is numpy's least-squares fit over every head
    noisy = dist + rng.normal(0, 2, dist.shape)
    slope, intercept = np.polyfit(rel, noisy, 1)
    prof = explore.profile_by_row(noisy, rel, bins=10)
    assert (prof.slope, prof.intercept) == pytest.approx((slope, intercept))
    assert prof.n.sum() == prof.n_points == len(rel)


def test_nn_distance_by_row_on_tiny_dataset(tiny_root):
    records = data.list_records("A", "train", tiny_root)
    dist, rel = explore.nn_distances_and_rows(records)
    # IMG_3 has a single head: no distance, so it contributes nothing
    exp_d, exp_r = [], []
    for name in ("IMG_1", "IMG_2"):
        w, h, _, raw, kept, *_ = TINY[name]
        pts = np.array(raw if kept is None else kept, dtype=np.float64)
        exp_d.append(brute_knn(pts, 3))
        exp_r.append(pts[:, 1] / h)
    np.testing.assert_allclose(dist, np.concatenate(exp_d))
    np.testing.assert_allclose(rel, np.concatenate(exp_r))
    prof = explore.nn_distance_by_row(records, bins=2)
    assert prof.n_points == len(dist) == 8
    assert prof.n.tolist() == [int((rel < 0.5).sum()), int((rel >= 0.5).sum())]


# --------------------------------------------------------------------------- figures


def test_figures_are_written(tiny_root, isolated_home):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.viz import dataset as viz

    records = data.list_records("A", "train", tiny_root)
    stats = explore.image_stats(records, progress=False)
    examples = [data.load_example(r) for r in records]
    figs = [
        viz.count_histograms(stats, name="t_hist"),
        viz.image_sizes(stats, name="t_sizes"),
        viz.nn_distance_vs_row({"A": explore.nn_distance_by_row(records)}, name="t_row"),
        viz.annotated_grid(examples, ncols=2, name="t_grid"),
        viz.show_example(examples[0], show_points=False, name=None),
    ]
    out = isolated_home / "report" / "figures"
    for stem in ("t_hist", "t_sizes", "t_row", "t_grid"):
        assert (out / f"{stem}.png").stat().st_size > 1000
        assert (out / f"{stem}.pdf").is_file()
    assert not list(out.glob("None*"))
    assert figure_png(figs[-1], dpi=50)[:8] == b"\x89PNG\r\n\x1a\n"
    for fig in figs:
        assert fig.axes[0].get_title()
        plt.close(fig)
    assert figs[0].axes[0].get_xlabel() and figs[0].axes[0].get_ylabel()
    assert figs[1].axes[-1].get_ylabel() == "heads in the image (log scale)"  # the colour bar


# --------------------------------------------------------------------------- real dataset


@pytest.mark.dataset
def test_real_part_b_test_counts(real_data_root):
    stats = explore.image_stats(data.list_records("B", "test", real_data_root), progress=False)
    summary = explore.summarize_counts(stats)
    assert list(summary) == ["B/test"]
    assert summary["B/test"]["n"] == 316
    assert summary["B/test"]["total"] == 39_121
    assert all((r.width, r.height) == (1024, 768) for r in stats)
    assert sum(r.outside + r.non_finite for r in stats) == 0


@pytest.mark.dataset
def test_real_part_a_has_20_grayscale_images(real_data_root):
    n_gray = sum(
        explore.is_grayscale_file(r.image_path)
        for split in ("train", "test")
        for r in data.list_records("A", split, real_data_root)
    )
    assert n_gray == 20
