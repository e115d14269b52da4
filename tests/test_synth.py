"""The synthetic crowd set: geometry of the drawn people, the ShanghaiTech file format, the reader
round trip, determinism, and the generate-once behaviour of ``ensure_synthetic``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers import data
from helpers.errors import CrowdError, DatasetNotFoundError
from helpers.tools import cli, synth

SMALL = {"part_A/train": 8, "part_A/test": 2, "part_B/train": 3, "part_B/test": 2}


def _files(root: Path) -> dict[str, bytes]:
    """Every image and annotation file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".jpg", ".mat")
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def full_home(tmp_path_factory) -> Path:
    """A project folder whose data/synthetic holds the default (full-size) set, seed 0."""
    home = tmp_path_factory.mktemp("home")
    start = time.perf_counter()
    synth.ensure_synthetic(home / "data" / "synthetic", progress=False)
    print(f"full synthetic set generated in {time.perf_counter() - start:.1f} s")
    return home


@pytest.fixture(scope="module")
def full_root(full_home) -> Path:
    return full_home / "data" / "synthetic"


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "synthetic"
    synth.ensure_synthetic(root, seed=0, sizes=SMALL, progress=False)
    return root


# ------------------------------------------------------------------------- scene geometry


@pytest.mark.parametrize("part,index", [("A", 1), ("A", 2), ("A", 4), ("B", 3), ("B", 5)])
def test_points_sit_on_drawn_heads(part, index):
    scene = synth.image_scene(part, "train", index, with_labels=True)
    height, width = scene.image.shape[:2]
    pts, radii, labels = scene.points, scene.radii, scene.labels
    n = scene.count
    assert n > 0 and pts.shape == (n, 2) and pts.dtype == np.float64 and radii.shape == (n,)
    assert np.all((pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height))

    # every visible head pixel of person i lies in the ellipse around point i (1 px tolerance)
    ys, xs = np.nonzero(labels > 0)
    owner = labels[ys, xs] - 1
    dx = (xs + 0.5 - pts[owner, 0]) / (synth.HEAD_ASPECT * radii[owner] + 1.0)
    dy = (ys + 0.5 - pts[owner, 1]) / (radii[owner] + 1.0)
    assert np.all(dx**2 + dy**2 <= 1.0)

    # the pixel holding each point shows that person's head (fully hidden people must be rare)
    col, row = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    own = labels[row, col] == np.arange(1, n + 1)
    assert own.mean() >= 0.97, f"only {own.mean():.1%} of head centres are visible"
    # a visible head is about as large as drawn: at least a third of its ellipse area
    area = np.bincount(owner, minlength=n)
    drawn = np.pi * synth.HEAD_ASPECT * radii**2
    assert np.mean(area >= drawn / 3) >= 0.95
    # the point is the centre of the head (pixel j covers [j, j+1)): centroids of whole heads agree
    whole = area >= 0.97 * drawn
    assert whole.sum() >= 5
    cx = np.bincount(owner, xs + 0.5, minlength=n)[whole] / area[whole]
    cy = np.bincount(owner, ys + 0.5, minlength=n)[whole] / area[whole]
    assert abs(np.mean(cx - pts[whole, 0])) < 0.1  # a half-pixel slip would show as 0.5
    assert abs(np.mean(cy - pts[whole, 1])) < 0.25  # nearer heads below nibble at the chin

    # and the head changes the picture there: colour differs from the empty background
    diff = np.abs(scene.image[row, col].astype(int) - scene.background[row, col].astype(int)).max(1)
    assert np.mean(diff[own] > 10) >= 0.95, "heads should stand out from the background"

    # far from every person the picture is exactly the background (same light and noise)
    import cv2

    drawn_mask = cv2.dilate((labels != 0).astype(np.uint8), np.ones((13, 13), np.uint8)) > 0
    assert (~drawn_mask).any()
    assert np.array_equal(scene.image[~drawn_mask], scene.background[~drawn_mask])


def test_head_size_grows_with_row_and_part_a_is_denser(full_root):
    for part, index in [("A", 1), ("A", 5), ("B", 3), ("B", 4)]:
        scene = synth.image_scene(part, "train", index, with_labels=True)
        y, r = scene.points[:, 1], scene.radii
        slope, _ = np.polyfit(y, r, 1)
        assert slope > 0 and np.corrcoef(y, r)[0, 1] > 0.9, (part, index)
        # the same from the picture itself: visible head areas grow with the row
        area = np.bincount(scene.labels[scene.labels > 0] - 1, minlength=scene.count)
        assert np.corrcoef(y, area)[0, 1] > 0.6, (part, index)

    manifest = synth.read_manifest(full_root)
    a = manifest["counts"]["part_A/train"]["per_image"] + manifest["counts"]["part_A/test"]["per_image"]
    b = manifest["counts"]["part_B/train"]["per_image"] + manifest["counts"]["part_B/test"]["per_image"]
    assert len(a) == 90 and len(b) == 90
    assert np.mean(a) > 3 * np.mean(b)
    assert 50 <= min(a) and max(a) <= 600 and max(a) >= 400
    assert 5 <= min(b) and max(b) <= 150 and min(b) <= 10


# ------------------------------------------------------------------------- file format


def test_mat_file_has_the_shanghaitech_structure(tmp_path):
    for n in (0, 1, 37, 300):
        pts = np.random.default_rng(n).uniform(0, 500, (n, 2))
        path = tmp_path / f"GT_IMG_{n}.mat"
        synth.write_points_mat(path, pts)
        mat = scipy.io.loadmat(path)
        info = mat["image_info"]
        assert info.shape == (1, 1) and info.dtype == object
        struct = info[0, 0]
        assert struct.shape == (1, 1) and struct.dtype.names == ("location", "number")
        location, number = struct[0, 0][0], struct[0, 0][1]
        assert location.dtype == np.float64 and location.shape == (n, 2)
        np.testing.assert_array_equal(location, pts)
        assert number.shape == (1, 1) and number.dtype.kind == "u" and int(number[0, 0]) == n
        np.testing.assert_array_equal(data.read_points(path), pts.reshape(-1, 2))
    # no date in the header: the same points give the same bytes
    synth.write_points_mat(tmp_path / "again.mat", pts)
    assert (tmp_path / "again.mat").read_bytes() == (tmp_path / "GT_IMG_300.mat").read_bytes()


@pytest.mark.dataset
def test_mat_structure_matches_a_real_file(real_data_root, small_root):
    def shape_of(path: Path) -> list:
        mat = scipy.io.loadmat(path)
        info = mat["image_info"]
        struct = info[0, 0]
        fields = struct[0, 0]
        return [
            sorted(k for k in mat if not k.startswith("__")),
            info.shape, info.dtype.kind, struct.shape, struct.dtype.names,
            fields[0].dtype, fields[0].ndim, fields[0].shape[1], fields[1].shape, fields[1].dtype.kind,
        ]

    real = real_data_root / "part_A" / "train_data" / "ground-truth" / "GT_IMG_1.mat"
    ours = small_root / "part_A" / "train_data" / "ground-truth" / "GT_IMG_1.mat"
    assert shape_of(ours) == shape_of(real)


# ------------------------------------------------------------------------- reader round trip


@pytest.mark.parametrize("part,split", [("A", "train"), ("A", "test"), ("B", "train"), ("B", "test")])
def test_reader_returns_the_generated_points(small_root, part, split):
    manifest = synth.read_manifest(small_root)
    records = data.list_records(part, split, root=small_root)
    key = f"part_{part}/{split}"
    assert [r.name for r in records] == [f"IMG_{i}" for i in range(1, SMALL[key] + 1)]
    assert len(records) == manifest["counts"][key]["images"]
    for i, record in enumerate(records, start=1):
        example = data.load_example(record)
        scene = synth.image_scene(part, split, i)
        assert example.count == manifest["counts"][key]["per_image"][i - 1] == scene.count
        np.testing.assert_array_equal(example.points, scene.points)
        assert example.report.n_raw == example.report.n_kept  # nothing dropped by the reader
        assert example.image.dtype == np.uint8 and example.image.shape == scene.image.shape
        # JPEG at quality 90 keeps the picture: small mean error against the rendered image
        error = np.abs(example.image.astype(float) - scene.image.astype(float)).mean()
        limit = 25 if scene.gray else 6  # grayscale files lose the colour
        assert error < limit, f"{record.image_path}: mean error {error:.1f}"


def test_grayscale_images_read_as_three_channels(small_root, full_root):
    gray = small_root / "part_A" / "train_data" / "images" / "IMG_7.jpg"
    with Image.open(gray) as im:
        assert im.mode == "L"
    example = data.load_example(data.list_records("A", "train", root=small_root)[6])
    assert example.image.ndim == 3 and example.image.shape[2] == 3
    assert np.array_equal(example.image[..., 0], example.image[..., 1])
    manifest = synth.read_manifest(full_root)
    n_a = sum(manifest["sizes"][k] for k in ("part_A/train", "part_A/test"))
    assert 0.03 <= len(manifest["grayscale"]) / n_a <= 0.08
    for name in manifest["grayscale"]:
        key, stem = name.rsplit("/", 1)
        part, split = key.split("/")
        with Image.open(full_root / part / f"{split}_data" / "images" / f"{stem}.jpg") as im:
            assert im.mode == "L"


def test_full_set_layout_and_reader(full_root):
    manifest = synth.read_manifest(full_root)
    assert manifest["sizes"] == synth.DEFAULT_SIZES and manifest["version"] == synth.GENERATOR_VERSION
    assert data.check_layout(full_root) == full_root.resolve()
    for key, n_images in synth.DEFAULT_SIZES.items():
        part, split = key.split("/")
        records = data.list_records(part[-1], split, root=full_root)
        assert len(records) == n_images
        assert all(r.points_path is not None for r in records)
    # every annotation of one whole split, through the reader, against the manifest
    records = data.list_records("B", "test", root=full_root)
    counts = [data.load_example(r).count for r in records]
    assert counts == manifest["counts"]["part_B/test"]["per_image"]


def test_resolve_data_source_uses_the_synthetic_set(full_home, monkeypatch, capsys):
    monkeypatch.setenv("CROWD_HOME", str(full_home))
    monkeypatch.delenv("CROWD_DATA", raising=False)
    before = _mtimes(full_home / "data" / "synthetic")
    source = data.resolve_data_source()
    assert source.synthetic and source.ready
    assert "SYNTHETIC" in synth.banner(source) and str(source.root) in synth.banner(source)
    assert source.root == (full_home / "data" / "synthetic").absolute()
    assert synth.ensure_dataset() == source  # the notebooks' one call: complete, so untouched
    assert cli.main(["where"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "root": str(source.root), "synthetic": True, "origin": "synthetic"}
    assert _mtimes(full_home / "data" / "synthetic") == before


def test_without_a_dataset_the_core_says_how_to_get_one(isolated_home):
    source = data.resolve_data_source()  # the core never generates anything
    assert source.synthetic and not source.ready and not source.root.exists()
    with pytest.raises(DatasetNotFoundError, match="crowd synth"):
        data.list_records("B", "train")
    with pytest.raises(DatasetNotFoundError, match="CROWD_DATA"):
        data.resolve_data_source(allow_synthetic=False)


# ------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_root):
    again = synth.ensure_synthetic(tmp_path / "again", seed=0, sizes=SMALL, progress=False)
    assert _files(again) == _files(small_root)
    m1, m2 = synth.read_manifest(again), synth.read_manifest(small_root)
    assert m1["counts"] == m2["counts"] and m1["seed"] == m2["seed"] == 0

    other = synth.generate(tmp_path / "other", seed=1, sizes={"part_A/train": 2}, progress=False)
    assert other["seed"] == 1
    for i in (1, 2):
        a = (tmp_path / "other" / "part_A" / "train_data" / "images" / f"IMG_{i}.jpg").read_bytes()
        b = (small_root / "part_A" / "train_data" / "images" / f"IMG_{i}.jpg").read_bytes()
        assert a != b
        p0, p1 = synth.image_scene("A", "train", i, 0).points, synth.image_scene("A", "train", i, 1).points
        assert p0.shape != p1.shape or not np.array_equal(p0, p1)


def test_an_image_does_not_depend_on_the_set_size(small_root, full_root):
    for rel in ("part_A/train_data/images/IMG_3.jpg", "part_B/test_data/ground-truth/GT_IMG_2.mat"):
        assert (small_root / rel).read_bytes() == (full_root / rel).read_bytes()


# ------------------------------------------------------------------------- ensure_synthetic


def test_ensure_is_idempotent_and_repairs(tmp_path):
    root = tmp_path / "synthetic"
    sizes = {"part_A/train": 2, "part_B/test": 1}
    assert synth.ensure_synthetic(root, sizes=sizes, progress=False) == root
    assert synth.is_complete(root, 0, sizes)
    files, mtimes = _files(root), _mtimes(root)
    time.sleep(0.02)
    start = time.perf_counter()
    assert synth.ensure_synthetic(root, sizes=sizes, progress=False) == root
    assert time.perf_counter() - start < 2.0  # a few directory listings, no drawing
    assert _mtimes(root) == mtimes  # nothing rewritten

    # a missing image: regenerated, identical to before
    (root / "part_A" / "train_data" / "images" / "IMG_2.jpg").unlink()
    assert not synth.is_complete(root, 0, sizes)
    synth.ensure_synthetic(root, sizes=sizes, progress=False)
    assert _files(root) == files
    # a broken manifest: regenerated
    (root / synth.MANIFEST_NAME).write_text("{not json")
    synth.ensure_synthetic(root, sizes=sizes, progress=False)
    assert synth.read_manifest(root)["seed"] == 0 and _files(root) == files
    # another seed: replaced by that seed's set
    synth.ensure_synthetic(root, seed=5, sizes=sizes, progress=False)
    assert synth.read_manifest(root)["seed"] == 5 and _files(root) != files
    # no temporary or old folders left next to the root
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["synthetic"]


def test_ensure_never_overwrites_other_data(tmp_path):
    root = tmp_path / "mydata"
    (root / "part_A").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(CrowdError, match="not a synthetic crowd set"):
        synth.ensure_synthetic(root, sizes={"part_B/test": 1}, progress=False)
    assert (root / "notes.txt").read_text() == "mine"


def test_concurrent_calls_generate_once(tmp_path, monkeypatch):
    calls = []
    real_generate = synth.generate

    def counting_generate(*args, **kwargs):
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synth, "generate", counting_generate)
    root = tmp_path / "synthetic"
    sizes = {"part_B/train": 2}
    results, errors = [], []

    def worker():
        try:
            results.append(synth.ensure_synthetic(root, sizes=sizes, progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root, root]
    assert len(calls) == 1
    assert synth.is_complete(root, 0, sizes)


# ------------------------------------------------------------------------- command line


def test_cli_prints_root_and_counts(full_root, capsys):
    before = _mtimes(full_root)
    assert cli.main(["synth", "--root", str(full_root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["root"]) == full_root.absolute() and out["seed"] == 0
    manifest = synth.read_manifest(full_root)
    for key, value in out["counts"].items():
        assert value["images"] == synth.DEFAULT_SIZES[key]
        assert value["heads"] == sum(manifest["counts"][key]["per_image"])
    assert _mtimes(full_root) == before

    assert cli.main(["synth", "--root", str(full_root)]) == 0
    text = capsys.readouterr().out
    assert f"root: {full_root.absolute()}" in text and "part_A/train: 60 images" in text


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["synth", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
