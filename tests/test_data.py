"""The dataset layer: locating data, reading images and points, splits and ``verify``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers import data
from helpers.errors import AnnotationError, DatasetNotFoundError, ImageReadError
from helpers.tools import synth, verify
from helpers.tools.folders import records_in_folder


def write_gt_mat(path: Path, points: np.ndarray) -> None:
    """Write points in the ShanghaiTech structure: image_info[0,0][0,0] = (location, number)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inner = np.empty((1, 1), dtype=[("location", "O"), ("number", "O")])
    inner[0, 0]["location"] = points
    inner[0, 0]["number"] = np.array([[float(len(points))]])
    outer = np.empty((1, 1), dtype=object)
    outer[0, 0] = inner
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"image_info": outer})


def make_layout(root: Path, part_dir: str = "part_A", gt_dir: str = "ground-truth", n: int = 3) -> dict:
    """A tiny ShanghaiTech-style dataset; returns {image name: points}."""
    rng = np.random.default_rng(0)
    truth = {}
    for split in ("train", "test"):
        for i in range(1, n + 1):
            name = f"IMG_{i}"
            h, w = 40 + i, 60 + 2 * i
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            (root / part_dir / f"{split}_data" / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / part_dir / f"{split}_data" / "images" / f"{name}.jpg")
            pts = rng.uniform([0, 0], [w, h], size=(i * 4, 2))
            write_gt_mat(root / part_dir / f"{split}_data" / gt_dir / f"GT_{name}.mat", pts)
            truth[(split, name)] = pts
    return truth


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("part_dir,gt_dir", [("part_A", "ground-truth"), ("part_A_final", "ground_truth")])
def test_reads_both_layouts(tmp_path, part_dir, gt_dir):
    truth = make_layout(tmp_path, part_dir, gt_dir)
    for split in ("train", "test"):
        records = data.list_records("A", split, root=tmp_path)
        assert [r.name for r in records] == ["IMG_1", "IMG_2", "IMG_3"]
        for rec in records:
            ex = data.load_example(rec)
            np.testing.assert_allclose(ex.points, truth[(split, rec.name)])
            assert ex.image.dtype == np.uint8 and ex.image.ndim == 3 and ex.image.shape[2] == 3


def test_natural_order(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in (10, 2, 1):
        Image.new("RGB", (8, 8)).save(folder / f"IMG_{i}.jpg")
    assert [r.name for r in records_in_folder(folder)] == ["IMG_1", "IMG_2", "IMG_10"]


def test_wrong_root_explains(tmp_path):
    (tmp_path / "ShanghaiTech" / "part_A").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="part_A"):
        data.check_layout(tmp_path)  # one level too high
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        data.check_layout(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match="images"):
        data.list_records("A", "train", root=tmp_path / "ShanghaiTech")


def test_crowd_data_pointing_nowhere_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_DATA", str(tmp_path / "missing"))
    with pytest.raises(DatasetNotFoundError, match="CROWD_DATA"):
        data.resolve_data_source()


def test_resolve_prefers_crowd_data(tmp_path, monkeypatch):
    make_layout(tmp_path)
    monkeypatch.setenv("CROWD_DATA", str(tmp_path))
    source = data.resolve_data_source()
    assert source.root == tmp_path.resolve() and not source.synthetic
    assert "ShanghaiTech" in synth.banner(source)


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16", "RGB", "CMYK"])
def test_any_mode_becomes_rgb_uint8(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    if mode == "I;16":
        gray16 = (rng.integers(0, 65535, (12, 16))).astype(np.uint16)
        im = Image.fromarray(gray16)
        expected_gray = np.round(gray16 / 257.0).astype(np.uint8)
    else:
        im = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    im.save(path)
    out = data.read_image(path)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":
        np.testing.assert_array_equal(out[:, :, 0], expected_gray)
    if mode in ("L", "I;16", "LA"):
        assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[0, 0] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = data.read_image(tmp_path / "a.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)


def test_bad_images_get_clear_errors(tmp_path):
    (tmp_path / "page.jpg").write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageReadError, match="not a readable image"):
        data.read_image(tmp_path / "page.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.jpg")
    blob = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        data.read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match="over the limit"):
        data.read_image(tmp_path / "ok.jpg", max_pixels=1000)
    with pytest.raises(ImageReadError, match="does not exist"):
        data.read_image(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------- points


def test_point_formats_agree(tmp_path):
    pts = np.array([[1.5, 2.25], [10.0, 3.0], [7.0, 7.5]])
    write_gt_mat(tmp_path / "a.mat", pts)
    scipy.io.savemat(tmp_path / "b_ann.mat", {"annPoints": pts})
    (tmp_path / "c.csv").write_text("x,y\n" + "\n".join(f"{x},{y}" for x, y in pts) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(pts.tolist()))
    (tmp_path / "e.json").write_text(json.dumps({"points": [{"x": x, "y": y} for x, y in pts]}))
    (tmp_path / "f.txt").write_text("\n".join(f"{x} {y} 5 5" for x, y in pts))
    for name in ("a.mat", "b_ann.mat", "c.csv", "d.json", "e.json", "f.txt"):
        np.testing.assert_allclose(data.read_points(tmp_path / name), pts, err_msg=name)


def test_empty_annotations(tmp_path):
    write_gt_mat(tmp_path / "a.mat", np.zeros((0, 2)))
    (tmp_path / "b.csv").write_text("x,y\n")
    (tmp_path / "c.json").write_text("[]")
    for name in ("a.mat", "b.csv", "c.json"):
        assert data.read_points(tmp_path / name).shape == (0, 2)


def test_bad_annotations_get_clear_errors(tmp_path):
    scipy.io.savemat(tmp_path / "keys.mat", {"something": np.zeros((3, 2))})
    with pytest.raises(AnnotationError, match="image_info"):
        data.read_points(tmp_path / "keys.mat")
    scipy.io.savemat(tmp_path / "shape.mat", {"annPoints": np.zeros((3, 1))})
    with pytest.raises(AnnotationError, match=r"\(N, 2\)"):
        data.read_points(tmp_path / "shape.mat")
    scipy.io.savemat(tmp_path / "text.mat", {"annPoints": "not points"})
    with pytest.raises(AnnotationError):
        data.read_points(tmp_path / "text.mat")
    write_gt_mat(tmp_path / "ok.mat", np.ones((50, 2)))
    blob = (tmp_path / "ok.mat").read_bytes()
    (tmp_path / "cut.mat").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AnnotationError, match="truncated"):
        data.read_points(tmp_path / "cut.mat")
    (tmp_path / "bad.csv").write_text("x,y\n1,2\nthree,4\n")
    with pytest.raises(AnnotationError, match="line 3"):
        data.read_points(tmp_path / "bad.csv")


def test_clean_points_policy_is_reported():
    pts = np.array([[1, 1], [np.nan, 2], [5, 5], [5, 5], [-1, 3], [10, 2], [9.99, 4.5], [np.inf, 0]])
    kept, rep = data.clean_points(pts, (5, 10), policy="drop")
    assert rep.n_raw == 8 and rep.non_finite == 2 and rep.outside == 4  # (5,5) twice: y == H is outside
    np.testing.assert_allclose(kept, [[1, 1], [9.99, 4.5]])
    assert rep.n_kept == 2 and rep.duplicates == 0
    clipped, rep = data.clean_points(pts, (5, 10), policy="clip")
    assert rep.n_kept == 6 and rep.outside == 4
    assert (clipped[:, 0] < 10).all() and (clipped[:, 1] < 5).all() and (clipped >= 0).all()
    dup, rep = data.clean_points(np.array([[2.0, 2.0], [2.0, 2.0], [3.0, 1.0]]), (5, 5))
    assert rep.duplicates == 1 and len(dup) == 3  # duplicates are kept, and counted


def test_load_example_requires_annotation(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.jpg")
    (rec,) = records_in_folder(tmp_path)
    with pytest.raises(AnnotationError, match="No annotation"):
        data.load_example(rec)
    assert data.load_example(rec, require_points=False).count == 0


# --------------------------------------------------------------------------- splits


def test_fit_val_split_is_fixed_disjoint_and_complete(tmp_path):
    make_layout(tmp_path, n=20)
    train = data.list_records("A", "train", root=tmp_path)
    fit = data.list_records("A", "fit", root=tmp_path)
    val = data.list_records("A", "val", root=tmp_path)
    assert len(val) == 2 and len(fit) == 18
    assert {r.name for r in fit} | {r.name for r in val} == {r.name for r in train}
    assert not {r.name for r in fit} & {r.name for r in val}
    # the split depends only on the names: shuffling the input changes nothing
    fit2, val2 = data.split_fit_val(list(reversed(train)))
    assert [r.name for r in val2] == [r.name for r in val]


def test_take_evenly():
    recs = list(range(10))
    assert data.take_evenly(recs, 3) == [0, 4, 9] or data.take_evenly(recs, 3) == [0, 5, 9]
    assert data.take_evenly(recs, None) == recs and data.take_evenly(recs, 50) == recs


# --------------------------------------------------------------------------- verify


def test_verify_reports_problems(tmp_path):
    make_layout(tmp_path, n=2)
    (tmp_path / "part_A" / "train_data" / "ground-truth" / "GT_IMG_2.mat").unlink()
    report = verify.verify(tmp_path, checksums=None, progress=False)
    text = "\n".join(report.problems)
    assert not report.ok
    assert "part_A/train: 2 images, expected 300" in text
    assert "IMG_2.jpg: no annotation" in text
    assert "Part B is missing" in text


# --------------------------------------------------------------------------- the real dataset


@pytest.mark.dataset
def test_real_part_b_test(real_data_root):
    records = data.list_records("B", "test", root=real_data_root)
    assert len(records) == 316
    total = sum(len(data.read_points(r.points_path)) for r in records)
    assert total == 39_121


@pytest.mark.dataset
def test_real_part_a_train_loads_as_rgb(real_data_root):
    records = data.list_records("A", "train", root=real_data_root)
    assert len(records) == 300
    total = 0
    for rec in records:
        ex = data.load_example(rec)
        assert ex.image.ndim == 3 and ex.image.shape[2] == 3 and ex.image.dtype == np.uint8
        assert ex.report.outside == 0 and ex.report.non_finite == 0
        total += ex.count
    assert total == 162_413


@pytest.mark.dataset
def test_real_part_a_test_images_are_rgb(real_data_root):
    for rec in data.list_records("A", "test", root=real_data_root):
        image = data.read_image(rec.image_path)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


@pytest.mark.dataset
def test_real_val_split_sizes(real_data_root):
    assert len(data.list_records("A", "val", root=real_data_root)) == 30
    assert len(data.list_records("B", "val", root=real_data_root)) == 40
    assert len(data.list_records("B", "fit", root=real_data_root)) == 360


@pytest.mark.dataset
def test_verify_command_on_real_dataset(real_data_root):
    out = subprocess.run(
        [sys.executable, "-m", "helpers", "verify", str(real_data_root), "--json"],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["checksums_checked"] == 2396
    assert report["counts"] == {"part_A/train": 300, "part_A/test": 182, "part_B/train": 400, "part_B/test": 316}


def test_verify_command_bad_root_exits_1(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "helpers", "verify", str(tmp_path / "nothing")],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error:") and "does not exist" in out.stderr
