"""The HDF5 cache of density maps (helpers.tools.cache): build, skip, rebuild, load, command."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import data
from helpers import density as dens
from helpers.analysis import ground_truth
from helpers.errors import CacheError
from helpers.tools import cache, cli
from helpers.tools.folders import records_in_folder
from helpers.tools.synth import write_points_mat

REL = 1e-4  # count tolerance, relative


def total(a) -> float:
    return float(np.asarray(a, dtype=np.float64).sum())


# --------------------------------------------------------------------------- cache




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
        gt = root / "part_A" / "train_data" / "ground-truth"
        gt.mkdir(parents=True, exist_ok=True)
        write_points_mat(
            gt / f"GT_IMG_{i}.mat",
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
    stats = cache.build_cache(records, params, progress=False)
    assert (stats["images"], stats["built"], stats["skipped_fresh"], stats["rebuilt_stale"]) == (
        3,
        3,
        0,
        0,
    )
    assert stats["heads"] == sum(len(p) for p in truth.values())
    for record in records:
        path = cache.cache_path(record, params)
        assert path.is_file() and path.suffix == ".h5"
        assert Path(os.environ["CROWD_CACHE"]) in path.parents and root not in path.parents
        with h5py.File(path, "r") as fh:
            assert fh["density"].dtype == np.float32
            assert fh.attrs["n_points"] == len(truth[record.name])
            assert fh.attrs["params_key"] == cache.params_key(params)
            assert fh.attrs["format_version"] == cache.FORMAT_VERSION
            assert cache.params_from_attrs(fh.attrs) == params
        cached = cache.load_density(record, params)
        np.testing.assert_array_equal(cached, dens.compute_density(record, params))
        assert abs(total(cached) - len(truth[record.name])) <= REL * len(truth[record.name])
        assert cache.cache_status(record, params) == "fresh"
    before = {r.name: cache.cache_path(r, params).stat().st_mtime_ns for r in records}
    stats = cache.build_cache(records, params, progress=False)
    assert (stats["built"], stats["skipped_fresh"], stats["rebuilt_stale"]) == (0, 3, 0)
    assert before == {r.name: cache.cache_path(r, params).stat().st_mtime_ns for r in records}


def test_cache_rebuilds_when_params_change(tiny):
    _, truth, records = tiny
    cache.build_cache(records, dens.DensityParams(), progress=False)
    fixed = dens.DensityParams("fixed", sigma=2.0)
    assert cache.cache_path(records[0], fixed) != cache.cache_path(records[0], dens.DensityParams())
    assert cache.cache_status(records[0], fixed) == "missing"
    stats = cache.build_cache(records, fixed, progress=False)
    assert stats["built"] == 3
    np.testing.assert_array_equal(
        cache.load_density(records[0], fixed), dens.compute_density(records[0], fixed)
    )
    # a file holding maps of other parameters at this path (copied by hand) is stale
    path = cache.cache_path(records[1], fixed)
    path.write_bytes(cache.cache_path(records[1], dens.DensityParams()).read_bytes())
    assert cache.cache_status(records[1], fixed) == "stale"
    stats = cache.build_cache(records, fixed, progress=False)
    assert (stats["rebuilt_stale"], stats["skipped_fresh"]) == (1, 2)
    with h5py.File(path, "r") as fh:
        assert fh.attrs["method"] == "fixed"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "attrs"])
def test_cache_rebuilds_damaged_file(tiny, damage):
    _, truth, records = tiny
    params = dens.DensityParams()
    cache.build_cache(records, params, progress=False)
    path = cache.cache_path(records[2], params)
    good = cache.load_density(records[2], params)
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
    assert cache.cache_status(records[2], params) == "stale"
    stats = cache.build_cache(records, params, progress=False)
    assert (stats["rebuilt_stale"], stats["skipped_fresh"]) == (1, 2)
    np.testing.assert_array_equal(cache.load_density(records[2], params, build=False), good)


def test_cache_rebuilds_when_annotation_changes(tiny):
    root, truth, records = tiny
    params = dens.DensityParams()
    cache.build_cache(records, params, progress=False)
    record = records[0]
    stamp = os.stat(record.points_path).st_mtime_ns
    new_points = truth[record.name][:2]
    write_points_mat(record.points_path, new_points)
    os.utime(record.points_path, ns=(stamp + 10**9, stamp + 10**9))
    assert cache.cache_status(record, params) == "stale"
    dmap = cache.load_density(record, params)  # rebuilt on load
    assert abs(total(dmap) - 2) <= REL * 2
    stats = cache.build_cache(records, params, progress=False)
    assert stats["skipped_fresh"] == 3


def test_cache_with_read_only_dataset(tiny):
    root, truth, records = tiny
    before = snapshot(root)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(stat.S_IMODE(modes[p]) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        stats = cache.build_cache(records, dens.DensityParams(), progress=False)
        assert stats["built"] == 3
        assert cache.load_density(
            records[0], dens.DensityParams(), build=False
        ).shape == data.image_size(records[0].image_path)
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert snapshot(root) == before  # nothing written inside the dataset


def test_cache_errors(tiny, tmp_path):
    _, _, records = tiny
    with pytest.raises(CacheError, match="build"):
        cache.load_density(records[0], dens.DensityParams(), build=False)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(CacheError) as err:
        cache.load_density(records[0], dens.DensityParams(), cache_dir=blocker)
    assert "CROWD_CACHE" in str(err.value) and "not_a_folder" in str(err.value)


def test_cache_for_own_folder_with_csv_points(tmp_path, isolated_home):
    folder = tmp_path / "my photos"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "street.png")
    (folder / "street.csv").write_text("x,y\n1.5,2.5\n28,18\n15,10\n")
    records = records_in_folder(folder)
    path = cache.cache_path(records[0])
    assert path.name == "street.png.h5" and cache.dataset_id(folder) in str(path)
    assert abs(total(cache.load_density(records[0])) - 3) <= REL * 3
    assert snapshot(folder) == {
        str(folder / "street.csv"): (folder / "street.csv").stat().st_mtime_ns,
        str(folder / "street.png"): (folder / "street.png").stat().st_mtime_ns,
    }


def test_cache_parallel_workers(tiny):
    _, _, records = tiny
    stats = cache.build_cache(records, dens.DensityParams(), progress=False, workers=2)
    assert stats["built"] == 3
    np.testing.assert_array_equal(
        cache.load_density(records[1], build=False), dens.compute_density(records[1])
    )


def test_count_table(tiny):
    _, truth, records = tiny
    rows = ground_truth.count_table(records, dens.DensityParams(), factor=4)
    for row, record in zip(rows, records, strict=True):
        n = len(truth[record.name])
        assert row["n_points"] == n and row["n_raw"] == n + 1  # one point outside is dropped
        assert abs(row["sum"] - n) <= REL * n and abs(row["sum_pooled"] - n) <= REL * n
        assert row["sum_no_renorm"] < row["sum"]


def test_command_line(tiny, capsys):
    root, truth, _ = tiny
    build = ["density", "build", "--root", str(root)]
    assert cli.main([*build, "--part", "A", "--split", "train", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["built"] == 3 and summary["heads"] == sum(len(p) for p in truth.values())
    assert cli.main([*build, "--part", "A", "--method", "fixed", "--sigma", "-1"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.main(["density", "build", "--root", str(root / "nowhere"), "--no-progress"]) == 1
