"""Bad input never crashes the series or loses work.

Every bad case of the project's checklist is built here, in a temporary folder, and sent through
every stage that can meet it:

    reader     helpers.data          list_records / load_example (image + points + point policy)
    density    helpers.density       load_density (ground truth, HDF5 cache under CROWD_CACHE)
    samples    helpers.samples       CrowdDataset (train crop and eval) through make_loader
    predict    helpers.tools.inference     count_image(path, checkpoint) and the command line
    evaluate   helpers.tools.evaluate      evaluate_checkpoint and the command line

Each stage ends either in a documented policy (checked: the counts that come out) or in one
project exception (:class:`helpers.errors.CrowdError` subclass) whose one-line message names the
file, says what is wrong and what to do. Nothing here needs the real dataset.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from helpers import config, data, predict
from helpers import density as dens
from helpers.errors import (
    AnnotationError,
    CacheError,
    CheckpointError,
    CrowdError,
    ImageReadError,
)
from helpers.models import HeatmapCNN
from helpers.samples import CrowdDataset
from helpers.tools import cache as density_cache
from helpers.tools import checkpoints, cli, evaluate, fileio, inference, verify
from helpers.tools.folders import records_in_folder
from helpers.tools.loading import make_loader
from helpers.tools.synth import write_points_mat

H, W = 40, 56  # every test image fits in one 64 x 64 training crop, so crops hold every head
CROP = 64
#: An error message must tell the reader what to do: a sentence or clause that starts with one of
#: these imperative verbs ("... is truncated. Download it again", "...; load it with ...").
ADVICE = re.compile(
    r"(?:^|[.;:]\s+|,\s+or\s+)(?:download|use|set|check|convert|downscale|raise|delete|remove|"
    r"free|make sure|save|add|move|fix|load it|build|train|write)\b",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private project folder and cache; one torch thread (the machine is shared)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CROWD_HOME", str(home))
    monkeypatch.setenv("CROWD_CACHE", str(home / "cache"))
    monkeypatch.setenv("CROWD_DEVICE", "cpu")
    for key in ("CROWD_DATA", "CROWD_QUICK"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    inference._MODEL_CACHE.clear()
    yield home
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> HeatmapCNN:
    torch.manual_seed(seed)
    return HeatmapCNN(width=4, init_output=5.0).eval()


def write_checkpoint(path: Path, model: torch.nn.Module | None = None, **extra) -> Path:
    model = tiny_model() if model is None else model
    ckpt = {"model": model.state_dict(), "model_name": "heatmap_cnn",
            "model_kwargs": {"width": 4}, "scale": 10.0, "epoch": 1}
    ckpt.update(extra)
    return checkpoints.save_checkpoint(path, ckpt)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "best.pt")


# --------------------------------------------------------------------------- building files


def pixels(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg_bytes(h: int = H, w: int = W) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(h, w)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming ``width x height`` RGB, with 8 bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + png_chunk(b"IEND", b""))


def save_mode(mode: str, suffix: str = ".png") -> Callable[[Path], Path]:
    """Write the standard test picture in a PIL ``mode`` (16-bit: ``I;16``)."""

    def write(path: Path) -> Path:
        path = path.with_suffix(suffix)
        if mode == "I;16":
            gray = (pixels()[:, :, 0].astype(np.uint16) * 257)
            im = Image.fromarray(gray)
            assert im.mode == "I;16"
        else:
            im = Image.fromarray(pixels()).convert(mode)
        im.save(path)
        return path

    return write


def save_rgb16(path: Path) -> Path:
    """The standard test picture as a 48-bit (16 bits per channel) RGB PNG."""
    import cv2

    path = path.with_suffix(".png")
    assert cv2.imwrite(str(path), (pixels().astype(np.uint16) * 257)[:, :, ::-1])  # cv2 is BGR
    return path


def write_mat_structure(path: Path, value) -> None:
    """A .mat whose ``image_info`` holds ``value`` where ShanghaiTech has the (N, 2) locations."""
    struct_ = np.empty((1, 1), dtype=[("location", object), ("number", object)])
    struct_[0, 0]["location"] = value
    struct_[0, 0]["number"] = np.array([[1.0]])
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = struct_
    scipy.io.savemat(path, {"image_info": cell})


GOOD_POINTS = np.array([[5.5, 6.0], [20.0, 30.25], [50.0, 10.0], [33.3, 22.2]])


# --------------------------------------------------------------------------- the case table


@dataclass(frozen=True)
class Ok:
    """The stage succeeds; ``count`` is the ground-truth head count it must show (None: no check)."""

    count: int | None = None


@dataclass(frozen=True)
class Fails:
    """The stage raises ``exc`` naming ``file`` ("image" or "points") and matching ``what``."""

    exc: type[CrowdError]
    what: str
    file: str = "image"


@dataclass(frozen=True)
class Case:
    """One bad input in a ShanghaiTech layout: ``build(split_dir)`` writes IMG_1 and its GT."""

    id: str
    build: Callable[[Path], None]
    reader: Ok | Fails
    density: Ok | Fails
    samples: Ok | Fails
    predict: Ok | Fails
    evaluate: Ok | Fails
    check: Callable[[data.Example], None] | None = None  # more checks of the reader's result


def _image_and_points(image: Callable[[Path], Path] | bytes | None, points) -> Callable[[Path], None]:
    """A builder: IMG_1 written by ``image`` (a writer, raw bytes or None), GT_IMG_1.mat from
    ``points`` (an (N, 2) array, a writer of the .mat, raw bytes or None)."""

    def build(split: Path) -> None:
        img = split / "images" / "IMG_1.jpg"
        gt = split / "ground-truth" / "GT_IMG_1.mat"
        if image is None:
            Image.fromarray(pixels()).save(img, quality=90)
        elif isinstance(image, bytes):
            img.write_bytes(image)
        else:
            image(img)
        if points is None:
            return
        if isinstance(points, bytes):
            gt.write_bytes(points)
        elif callable(points):
            points(gt)
        else:
            write_points_mat(gt, np.asarray(points, dtype=np.float64))

    return build


def _truncated_mat() -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"annPoints": np.ones((200, 2))})
    blob = buf.getvalue()
    return blob[: len(blob) // 2]


def _orphan_annotation(split: Path) -> None:
    _image_and_points(None, GOOD_POINTS)(split)
    write_points_mat(split / "ground-truth" / "GT_IMG_2.mat", GOOD_POINTS)  # no IMG_2.jpg


def _check_bad_points(ex: data.Example) -> None:
    assert ex.report.n_raw == 7 and ex.report.non_finite == 2 and ex.report.outside == 3
    assert ex.report.n_kept == ex.count == 2


def _check_duplicates(ex: data.Example) -> None:
    assert ex.report.duplicates == 2 and ex.count == 5 and ex.report.non_finite == ex.report.outside == 0


def _check_rgb(ex: data.Example) -> None:
    assert ex.image.dtype == np.uint8 and ex.image.shape == (H, W, 3)


def _check_16bit(ex: data.Example) -> None:
    _check_rgb(ex)
    np.testing.assert_array_equal(ex.image[:, :, 1], pixels()[:, :, 0])  # 16-bit scaled to 8


def _check_rgb16(ex: data.Example) -> None:
    np.testing.assert_array_equal(ex.image, pixels())


BAD_POINTS = [[5, 5], [np.nan, 3], [4, np.inf], [-1, 10], [10, -0.5], [W, 3], [10.5, H - 0.5]]
DUPLICATES = [[5, 5], [5, 5], [5, 5], [20, 30], [40.5, 12]]


def _image_fails(exc, what, density: Ok | Fails | None = None) -> dict:
    """An unreadable image: every stage that reads pixels fails the same way."""
    f = Fails(exc, what)
    return dict(reader=f, density=density or f, samples=f, predict=f, evaluate=f)


def _points_fail(what: str) -> dict:
    f = Fails(AnnotationError, what, file="points")
    return dict(reader=f, density=f, samples=f, predict=Ok(), evaluate=f)


def _fine(count: int) -> dict:
    return dict(reader=Ok(count), density=Ok(count), samples=Ok(count), predict=Ok(),
                evaluate=Ok(count))


CASES = [
    Case("image_without_annotation", _image_and_points(None, None),
         reader=Fails(AnnotationError, "No annotation"),
         density=Fails(AnnotationError, "No annotation"),
         samples=Fails(AnnotationError, "No annotation"),
         predict=Ok(),  # counting needs no annotation
         evaluate=Fails(AnnotationError, "No annotation")),
    # policy: records come from images; the orphan is ignored by every stage, `verify` reports it
    Case("annotation_without_image", _orphan_annotation, **_fine(4)),
    Case("corrupt_jpeg_header",
         _image_and_points(jpeg_bytes()[:160] + b"\x00" * 4 + jpeg_bytes()[164:], GOOD_POINTS),
         **_image_fails(ImageReadError, "not a readable image")),
    # policy: damaged compressed pixels behind an intact header decode as garbled blocks (libjpeg
    # cannot tell); only `crowd verify` (sha256) catches them
    Case("corrupt_jpeg_scan_data",
         _image_and_points(jpeg_bytes()[:650] + bytes(
             np.random.default_rng(3).integers(0, 255, len(jpeg_bytes()) - 652, dtype=np.uint8)
         ) + b"\xff\xd9", GOOD_POINTS), **_fine(4), check=_check_rgb),
    # density needs only the header (the size), which a truncated file still has
    Case("truncated_jpeg", _image_and_points(jpeg_bytes()[: len(jpeg_bytes()) // 2], GOOD_POINTS),
         **_image_fails(ImageReadError, "truncated", density=Ok(4))),
    Case("text_named_jpg", _image_and_points(b"just some notes, not a picture\n", GOOD_POINTS),
         **_image_fails(ImageReadError, "not a readable image")),
    Case("html_named_jpg",
         _image_and_points(b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", GOOD_POINTS),
         **_image_fails(ImageReadError, "not a readable image")),
    Case("over_pixel_limit", _image_and_points(png_header_only(20_000, 15_000), GOOD_POINTS),
         **_image_fails(ImageReadError, r"over the limit of 100 MP")),
    Case("truncated_mat", _image_and_points(None, _truncated_mat()), **_points_fail("truncated")),
    Case("mat_keys_missing",
         _image_and_points(None, lambda p: scipy.io.savemat(p, {"points": GOOD_POINTS})),
         **_points_fail("image_info")),
    Case("mat_wrong_structure",
         _image_and_points(None, lambda p: scipy.io.savemat(p, {"image_info": np.float64(3)})),
         **_points_fail("structure")),
    Case("mat_wrong_shape", _image_and_points(None, lambda p: write_mat_structure(p, np.ones((5, 1)))),
         **_points_fail(r"\(N, 2\)")),
    Case("mat_transposed", _image_and_points(None, lambda p: write_mat_structure(p, GOOD_POINTS.T)),
         **_points_fail("transposed")),
    Case("mat_3d", _image_and_points(None, lambda p: write_mat_structure(p, np.ones((4, 2, 2)))),
         **_points_fail(r"\(N, 2\)")),
    Case("mat_strings",
         _image_and_points(None, lambda p: write_mat_structure(p, np.array(["12.5", "x"]))),
         **_points_fail("numeric")),
    Case("mat_string_instead_of_points",
         _image_and_points(None, lambda p: scipy.io.savemat(p, {"annPoints": "head points"})),
         **_points_fail("numeric")),
    Case("empty_points", _image_and_points(None, np.zeros((0, 2))), **_fine(0)),
    # policy: NaN/inf and out-of-image points are dropped and reported (clean_points)
    Case("nan_negative_outside_points", _image_and_points(None, BAD_POINTS), **_fine(2),
         check=_check_bad_points),
    # policy: exact duplicates are kept and counted (the published counts include them)
    Case("duplicate_points", _image_and_points(None, DUPLICATES), **_fine(5), check=_check_duplicates),
    Case("grayscale_jpeg", _image_and_points(save_mode("L", ".jpg"), GOOD_POINTS), **_fine(4),
         check=_check_rgb),
    Case("rgba_png", _image_and_points(save_mode("RGBA"), GOOD_POINTS), **_fine(4), check=_check_rgb),
    Case("palette_png", _image_and_points(save_mode("P"), GOOD_POINTS), **_fine(4), check=_check_rgb),
    Case("gray_alpha_png", _image_and_points(save_mode("LA"), GOOD_POINTS), **_fine(4), check=_check_rgb),
    Case("cmyk_jpeg", _image_and_points(save_mode("CMYK", ".jpg"), GOOD_POINTS), **_fine(4),
         check=_check_rgb),
    Case("16bit_gray_png", _image_and_points(save_mode("I;16"), GOOD_POINTS), **_fine(4),
         check=_check_16bit),
    Case("16bit_rgb_png", _image_and_points(save_rgb16, GOOD_POINTS), **_fine(4),
         check=_check_rgb16),
    Case("one_pixel_image",
         _image_and_points(lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p), [[0.5, 0.5]]),
         **_fine(1)),
    # policy: smaller than the crop is padded (mean colour, zero density), the count is kept
    Case("smaller_than_crop",
         _image_and_points(lambda p: Image.fromarray(pixels(9, 13)).save(p), [[1, 1], [12.5, 8.5]]),
         **_fine(2)),
]


# --------------------------------------------------------------------------- stages


def _records(root: Path) -> list[data.ImageRecord]:
    return data.list_records("B", "train", root=root)


def stage_reader(root: Path) -> data.Example:
    (record,) = _records(root)
    return data.load_example(record)


def stage_density(root: Path) -> np.ndarray:
    (record,) = _records(root)
    return density_cache.load_density(record)


def stage_samples(root: Path) -> tuple[float, float]:
    records = _records(root)
    train = CrowdDataset(records, "train", crop=CROP, flip=True)
    loader = make_loader(train, batch_size=1, shuffle=True, seed=1)
    loader.sampler.set_epoch(0)
    (image, target), = list(loader)
    assert image.shape == (1, 3, CROP, CROP) and target.shape == (1, 1, CROP // 8, CROP // 8)
    _, eval_target = CrowdDataset(records, "eval")[0]
    return float(target.sum()), float(eval_target.sum())


def stage_predict(root: Path, ckpt: Path) -> predict.Prediction:
    (record,) = _records(root)
    return inference.count_image(record.image_path, ckpt, device="cpu")


def stage_evaluate(root: Path, ckpt: Path) -> evaluate.EvaluationResult:
    return evaluate.evaluate_checkpoint(ckpt, "B", "train", root=root, device="cpu", progress=False)


def assert_clear_error(exc: BaseException, exc_type: type, path: Path, what: str) -> None:
    """``exc`` is ``exc_type``, and its one-line message names ``path``, matches ``what`` and
    gives advice."""
    assert isinstance(exc, exc_type), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    names = {str(path), str(Path(path).resolve())}
    assert any(n in message for n in names), f"message does not name {path}: {message}"
    assert re.search(what, message, re.IGNORECASE), f"expected {what!r} in: {message}"
    assert ADVICE.search(message), f"message gives no advice: {message}"
    assert "\n" not in message and "Traceback" not in message, f"not one line: {message!r}"


def expect(outcome: Ok | Fails, run: Callable[[], object], files: dict[str, Path]):
    """Run one stage and hold it to its expected outcome; returns the result on success."""
    if isinstance(outcome, Fails):
        with pytest.raises(CrowdError) as info:
            run()
        assert_clear_error(info.value, outcome.exc, files[outcome.file], outcome.what)
        return None
    return run()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_case_through_every_stage(case: Case, tmp_path, ckpt, isolated):
    root = tmp_path / "ShanghaiTech"
    split = root / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    case.build(split)
    (image_path,) = data.list_images(split / "images")
    files = {"image": image_path, "points": split / "ground-truth" / "GT_IMG_1.mat"}
    dataset_before = snapshot(root)

    example = expect(case.reader, lambda: stage_reader(root), files)
    if isinstance(case.reader, Ok):
        assert example.image.dtype == np.uint8 and example.image.ndim == 3
        assert example.image.shape[2] == 3
        if case.reader.count is not None:
            assert example.count == case.reader.count
        if case.check is not None:
            case.check(example)

    dmap = expect(case.density, lambda: stage_density(root), files)
    if isinstance(case.density, Ok) and case.density.count is not None:
        assert dmap.dtype == np.float32 and dmap.shape == data.image_size(image_path)
        assert dmap.sum(dtype=np.float64) == pytest.approx(case.density.count, abs=1e-4)
        cached = list((isolated / "cache").rglob("*.h5"))
        assert len(cached) == 1  # the cache went to CROWD_CACHE

    sums = expect(case.samples, lambda: stage_samples(root), files)
    if isinstance(case.samples, Ok) and case.samples.count is not None:
        assert sums == pytest.approx((case.samples.count, case.samples.count), abs=1e-4)

    pred = expect(case.predict, lambda: stage_predict(root, ckpt), files)
    if isinstance(case.predict, Ok):
        assert np.isfinite(pred.count) and pred.count >= 0
        assert pred.image_shape == data.image_size(image_path)

    result = expect(case.evaluate, lambda: stage_evaluate(root, ckpt), files)
    if isinstance(case.evaluate, Ok) and case.evaluate.count is not None:
        (row,) = result.rows
        assert row["true_count"] == case.evaluate.count
        assert np.isfinite(result.summary["mae"])

    assert snapshot(root) == dataset_before  # no stage writes into the dataset


def test_orphan_annotation_is_reported_by_verify(tmp_path):
    root = tmp_path / "ShanghaiTech"
    split = root / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    _orphan_annotation(split)
    Image.fromarray(pixels()).save(split / "images" / "IMG_3.jpg")  # and an image without one
    (tmp_path / "empty.sha256").write_text("")
    report = verify.verify(root, tmp_path / "empty.sha256", progress=False)
    orphan = [p for p in report.problems if "GT_IMG_2.mat" in p]
    lonely = [p for p in report.problems if "IMG_3.jpg" in p]
    assert orphan and "annotation without an image" in orphan[0]
    assert lonely and "no annotation" in lonely[0]
    assert [r.name for r in _records(root)] == ["IMG_1", "IMG_3"]


@pytest.mark.parametrize("case_id", ["html_named_jpg", "mat_transposed"])
def test_loader_worker_process_errors_stay_one_clear_line(case_id, tmp_path):
    """In a DataLoader worker the error is re-created by torch in the main process: it keeps
    its type and our one-line message (torch would put the worker's traceback there)."""
    case = next(c for c in CASES if c.id == case_id)
    root = tmp_path / "ds"
    split = root / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    case.build(split)
    loader = make_loader(CrowdDataset(_records(root), "train", crop=CROP), workers=1)
    loader.sampler.set_epoch(0)
    with pytest.raises(CrowdError) as info:
        list(loader)
    files = {"image": split / "images" / "IMG_1.jpg", "points": split / "ground-truth" / "GT_IMG_1.mat"}
    assert_clear_error(info.value, case.samples.exc, files[case.samples.file], case.samples.what)
    assert str(info.value).endswith("(in DataLoader worker process 0)")


# --------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("case_id", ["truncated_jpeg", "html_named_jpg", "over_pixel_limit"])
def test_predict_command_reports_bad_image_and_goes_on(case_id, tmp_path, ckpt, capsys):
    case = next(c for c in CASES if c.id == case_id)
    split = tmp_path / "ds" / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    case.build(split)
    bad = split / "images" / "IMG_1.jpg"
    good = tmp_path / "good.png"
    Image.fromarray(pixels()).save(good)
    out = tmp_path / "overlays"
    status = cli.main(["predict", str(bad), str(good), "--checkpoint", str(ckpt), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: {bad}: ") and ADVICE.search(line)
    (row,) = [json.loads(x) for x in captured.out.splitlines()]
    assert row["path"] == str(good) and Path(row["overlay"]).is_file()  # the next image was done


@pytest.mark.parametrize("case_id", ["truncated_mat", "html_named_jpg"])
def test_evaluate_command_one_line_error(case_id, tmp_path, ckpt, capsys):
    case = next(c for c in CASES if c.id == case_id)
    root = tmp_path / "ds"
    split = root / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    case.build(split)
    status = cli.main(["evaluate", "--checkpoint", str(ckpt), "--part", "B", "--split", "train",
                            "--data-root", str(root), "--csv", str(tmp_path / "e.csv"),
                            "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and str(split) in line and ADVICE.search(line)
    assert not (tmp_path / "e.csv").exists()


# --------------------------------------------------------------------------- user folders


def _user_folder(tmp_path: Path, points_name: str | None, points_text: str | None) -> Path:
    folder = tmp_path / "my photos"
    folder.mkdir()
    Image.fromarray(pixels()).save(folder / "street.png")
    if points_name is not None:
        (folder / points_name).write_text(points_text)
    return folder


USER_CASES = [
    # (id, points file, its text, expected count or (exception, what))
    ("csv_ok", "street.csv", "x,y\n1.5,2.5\n28,18\n15,10\n", 3),
    ("csv_nan_negative_outside", "street.csv", "x,y\n1,1\nnan,3\n-2,4\n56,3\n10,39.5\n", 2),
    ("csv_duplicates", "street.csv", "1,1\n1,1\n2,2\n", 3),
    ("csv_empty", "street.csv", "x,y\n", 0),
    ("csv_words", "street.csv", "x,y\n1,2\nthree,4\n", (AnnotationError, "line 3")),
    ("json_ok", "street.json", json.dumps({"points": [{"x": 3, "y": 4}, {"x": 9, "y": 9}]}), 2),
    ("json_three_columns", "street.json", json.dumps([[1, 2, 3], [4, 5, 6]]),
     (AnnotationError, r"\(N, 2\)")),
    ("json_strings", "street.json", json.dumps(["a", "b"]), (AnnotationError, "head points")),
    ("json_truncated", "street.json", '{"points": [[1, 2], [3', (AnnotationError, "truncated")),
    ("json_wrong_object", "street.json", json.dumps({"heads": [[1, 2]]}), (AnnotationError, "points")),
    ("txt_words", "street.txt", "1 2\nthree four\n", (AnnotationError, "head points")),
]


@pytest.mark.parametrize("case_id,name,text,outcome", USER_CASES, ids=[c[0] for c in USER_CASES])
def test_user_folder_points_files(case_id, name, text, outcome, tmp_path, ckpt):
    folder = _user_folder(tmp_path, name, text)
    (record,) = records_in_folder(folder)
    assert record.points_path == folder / name
    before = snapshot(folder)
    predictor = evaluate.CheckpointPredictor(ckpt, device="cpu")
    stages = {
        "reader": lambda: data.load_example(record).count,
        "density": lambda: float(density_cache.load_density(record).sum(dtype=np.float64)),
        "samples": lambda: float(CrowdDataset([record], "eval")[0][1].sum()),
        "evaluate": lambda: evaluate.evaluate_predictor(predictor, [record], progress=False)
        .rows[0]["true_count"],
    }
    for stage, run in stages.items():
        if isinstance(outcome, tuple):
            with pytest.raises(CrowdError) as info:
                run()
            assert_clear_error(info.value, outcome[0], folder / name, outcome[1])
        else:
            assert run() == pytest.approx(outcome, abs=1e-4), stage
    assert snapshot(folder) == before  # the cache lives in CROWD_CACHE, not next to the photos


def test_user_image_without_points(tmp_path, ckpt):
    folder = _user_folder(tmp_path, None, None)
    (record,) = records_in_folder(folder)
    assert record.points_path is None
    with pytest.raises(AnnotationError) as info:
        data.load_example(record)
    assert_clear_error(info.value, AnnotationError, folder / "street.png", "No annotation")
    assert data.load_example(record, require_points=False).count == 0  # policy when asked for
    with pytest.raises(AnnotationError) as info:
        density_cache.load_density(record)
    assert_clear_error(info.value, AnnotationError, folder / "street.png", "No annotation")
    with pytest.raises(AnnotationError) as info:
        CrowdDataset([record], "eval").true_count(0)
    assert_clear_error(info.value, AnnotationError, folder / "street.png", "No annotation")
    assert inference.count_image(folder / "street.png", ckpt, device="cpu").count >= 0


# --------------------------------------------------------------------------- pixel limit, tiling


def test_pixel_limit_is_checked_from_the_header_and_stated(tmp_path):
    """Headers over the limit are refused before decoding, with the limit in the message."""
    before = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30_000, 30_000))  # 900 MP claimed in 60 bytes
    for read in (data.read_image, data.image_size, predict.load_image):
        with pytest.raises(ImageReadError) as info:
            read(bomb)
        assert_clear_error(info.value, ImageReadError, bomb, "30000x30000.*over the limit of 100 MP")
    # 96 MP: over Pillow's own default guard (89 MP) but under ours (100 MP), so the guard in
    # force is ours; with max_pixels below it, it is refused and the limit is stated
    mid = tmp_path / "mid.png"
    mid.write_bytes(png_header_only(12_000, 8_000))
    assert data.image_size(mid) == (8_000, 12_000)
    with pytest.raises(ImageReadError) as info:
        data.read_image(mid, max_pixels=90_000_000)
    assert_clear_error(info.value, ImageReadError, mid, "over the limit of 90 MP")
    # a real small image against a small limit, and the limit of in-memory images
    small = tmp_path / "small.png"
    Image.fromarray(pixels()).save(small)
    with pytest.raises(ImageReadError) as info:
        predict.count(small, tiny_model(), max_pixels=1000)
    assert_clear_error(info.value, ImageReadError, small, "over the limit")
    with pytest.raises(ImageReadError, match="over the limit"):
        predict.count(np.zeros((50, 50, 3), np.uint8), tiny_model(), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global guard is put back after each file


class Recorder(torch.nn.Module):
    """A stride-8 model that records the size of every forward pass."""

    output_stride = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 8, stride=8)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.nn.functional.softplus(self.conv(x))


def test_huge_photo_is_tiled_with_bounded_memory(tmp_path):
    """A photo over the automatic-tiling budget is never run through the network whole.

    2400 x 1600 (3.8 MP) stands for a 24 MP phone photo: whatever the size, no forward pass is
    larger than a tile plus its context margin, so memory does not grow with the photo.
    """
    photo = tmp_path / "phone.jpg"
    big = np.kron(pixels(25, 38), np.ones((64, 64, 1), np.uint8))[:1600, :2400]
    Image.fromarray(big).save(photo, quality=85)
    assert big.shape[0] * big.shape[1] > predict.AUTO_TILE_PIXELS
    torch.manual_seed(0)
    model = Recorder()
    pred = predict.count(photo, model)
    margin = predict.context_margin(model) or 0
    assert pred.tiled and pred.n_tiles == len(model.shapes) > 1
    limit = predict.DEFAULT_TILE + 2 * margin
    assert max(max(s[2], s[3]) for s in model.shapes) <= limit
    assert pred.image_shape == (1600, 2400)
    model.shapes.clear()
    whole = predict.count(photo, model, tile=0)  # same answer as one pass (exact tiles)
    assert model.shapes == [(1, 3, 1600, 2400)]
    assert pred.count == pytest.approx(whole.count, rel=1e-5)


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: code that runs if the file is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _ckpt_other_model(path: Path) -> None:
    write_checkpoint(path, model_name="csrnet", model_kwargs={})


def _ckpt_missing_keys(path: Path) -> None:
    state = tiny_model().state_dict()
    dropped = sorted(state)[:3]
    for key in dropped:
        del state[key]
    checkpoints.save_checkpoint(path, {"model": state, "model_name": "heatmap_cnn",
                                       "model_kwargs": {"width": 4}, "scale": 10.0})


def _ckpt_no_model_entry(path: Path) -> None:
    checkpoints.save_checkpoint(path, {"weights": torch.ones(3), "epoch": 2})


def _ckpt_other_width(path: Path) -> None:
    write_checkpoint(path, model_kwargs={"width": 8})


def _ckpt_pickled_code(path: Path) -> None:
    torch.save({"model": {}, "model_name": "heatmap_cnn",
                "payload": _Payload(path.parent / "code_ran")}, path)


def _ckpt_truncated(path: Path) -> None:
    write_checkpoint(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _ckpt_not_a_dict(path: Path) -> None:
    torch.save([torch.ones(2)], path)


CKPT_CASES = [
    ("other_model", _ckpt_other_model, r"does not match a csrnet network: missing \d+ key"),
    ("missing_keys", _ckpt_missing_keys, r"missing 3 key"),
    ("no_model_entry", _ckpt_no_model_entry, "no 'model' entry"),
    ("other_width", _ckpt_other_width, "has shape"),
    ("pickled_code", _ckpt_pickled_code, "Refusing to load.*pickled"),
    ("truncated", _ckpt_truncated, "truncated or corrupt"),
    ("not_a_dict", _ckpt_not_a_dict, "not a checkpoint dict"),
    ("missing_file", None, "does not exist"),
]


@pytest.mark.parametrize("case_id,build,what", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint_through_every_stage(case_id, build, what, tmp_path, capsys):
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    if build is not None:
        build(path)
    root = tmp_path / "ds"
    split = root / "part_B" / "test_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    _image_and_points(None, GOOD_POINTS)(split)
    image = split / "images" / "IMG_1.jpg"
    stages = {
        "load_model": lambda: checkpoints.load_model(path, device="cpu"),
        "predict": lambda: inference.count_image(image, path, device="cpu"),
        "evaluate": lambda: evaluate.evaluate_checkpoint(path, "B", "test", root=root,
                                                         device="cpu", progress=False),
    }
    for stage, run in stages.items():
        try:
            run()
        except CrowdError as exc:
            assert_clear_error(exc, CheckpointError, path, what)
        else:
            pytest.fail(f"{stage} accepted the bad checkpoint")
    # both command lines: one line on stderr naming the file, exit status 1
    assert cli.main(["predict", str(image), "--checkpoint", str(path), "--out", str(tmp_path / "o")]) == 1
    assert cli.main(["evaluate", "--checkpoint", str(path), "--part", "B", "--data-root", str(root),
                          "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and str(path) in line for line in err)
    assert not (path.parent / "code_ran").exists()  # the pickled code never ran


def test_checkpoint_for_the_other_model_asked_by_name(tmp_path):
    path = write_checkpoint(tmp_path / "hm.pt")
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_model(path, device="cpu", expect_model="csrnet")
    assert_clear_error(info.value, CheckpointError, path, "holds a heatmap_cnn checkpoint")


# --------------------------------------------------------------------------- failing writes


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


WRITE_FAILURES = [
    ("disk_full", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left"),
    ("permission", PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    # what torch.save really raises when the disk fills up under its zip writer
    ("torch_writer", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                  "576 vs 534"), "unexpected pos"),
]


@pytest.mark.parametrize("label,error,shown", WRITE_FAILURES, ids=[w[0] for w in WRITE_FAILURES])
def test_checkpoint_write_failure_keeps_the_previous_file(label, error, shown, tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "run" / "last.pt", epoch=1)
    good = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)  # most of the file gets written...
        with open(target, "r+b") as fh:
            fh.truncate(len(good) // 3)
        raise error  # ...then the disk is full

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CrowdError) as info:
        write_checkpoint(path, epoch=2)
    assert_clear_error(info.value, CheckpointError, path, shown)
    assert re.search(r"disk|space|writable|permission", str(info.value), re.IGNORECASE)
    assert path.read_bytes() == good  # the previous good checkpoint is intact
    assert checkpoints.load_checkpoint(path)["epoch"] == 1
    assert _leftovers(path.parent) == []  # and no half-written temporary file is left


_FULL_DISK = r"""
import resource, signal, sys
from pathlib import Path
import torch
from helpers import data
from helpers.tools import cache as density_cache
from helpers.tools.checkpoints import save_checkpoint
from helpers.errors import CacheError, CheckpointError

ckpt, root, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(record,) = data.list_records("B", "train", root=root)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    save_checkpoint(ckpt, {"weights": torch.ones(100_000)})
except CheckpointError as exc:
    print("checkpoint:", exc)
try:
    density_cache.load_density(record)
except CacheError as exc:
    print("cache:", exc)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_FSIZE (Linux)")
def test_real_full_disk_keeps_files_and_does_not_crash(tmp_path, isolated):
    """No monkeypatching: the kernel refuses writes past a file-size limit, as on a full disk.

    torch reports it as RuntimeError, HDF5 as OSError or RuntimeError, and HDF5 used to leave a
    handle that crashed Python at exit (h5py#914): the child process must end normally.
    """
    limit = 4096
    root = tmp_path / "ds"
    split = root / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    rng = np.random.default_rng(5)
    Image.fromarray(pixels(200, 300)).save(split / "images" / "IMG_1.jpg")
    write_points_mat(split / "ground-truth" / "GT_IMG_1.mat", rng.uniform(0, 200, (60, 2)))
    (record,) = _records(root)
    density_cache.load_density(record)
    cache = density_cache.cache_path(record)
    ckpt = write_checkpoint(tmp_path / "run" / "last.pt", epoch=1)
    good_cache, good_ckpt = cache.read_bytes(), ckpt.read_bytes()
    assert len(good_cache) > limit and len(good_ckpt) > limit  # a new file cannot be written
    write_points_mat(record.points_path, rng.uniform(0, 200, (30, 2)))  # the map is now stale
    stamp = record.points_path.stat().st_mtime_ns + 10**9
    os.utime(record.points_path, ns=(stamp, stamp))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROWD_")}
    env.update(CROWD_HOME=str(isolated), CROWD_CACHE=str(config.cache_root()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(ckpt), str(root), str(limit)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith(f"checkpoint: Could not write the checkpoint {ckpt} (RuntimeError")
    assert lines[1].startswith(f"cache: Cannot write the density cache in {cache.parent} (OSError")
    assert all(ADVICE.search(line) for line in lines)
    assert ckpt.read_bytes() == good_ckpt and cache.read_bytes() == good_cache
    assert _leftovers(ckpt.parent) == [] and _leftovers(cache.parent) == []


def test_checkpoint_folder_not_writable(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "run" / "last.pt", epoch=1)
    good = path.read_bytes()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    with pytest.raises(CrowdError) as info:
        write_checkpoint(path, epoch=2)
    assert_clear_error(info.value, CheckpointError, path, "Permission denied")
    assert path.read_bytes() == good


@pytest.mark.parametrize("label,error,shown", WRITE_FAILURES[:2] + [
    ("h5py_runtime", RuntimeError("Unable to flush raw data (file write failed: errno = 28, "
                                  "error message = 'No space left on device')\n, filename = 'x'"),
     "Unable to flush"),
], ids=["disk_full", "permission", "h5py_runtime"])
def test_cache_write_failure_keeps_the_previous_file(label, error, shown, tmp_path, monkeypatch):
    split = tmp_path / "ds" / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    _image_and_points(None, GOOD_POINTS)(split)
    (record,) = _records(tmp_path / "ds")
    params = dens.DensityParams()
    first = density_cache.load_density(record, params)
    cache = density_cache.cache_path(record, params)
    good = cache.read_bytes()
    # the annotation changes, so the map must be rebuilt, and the disk is now full
    write_points_mat(record.points_path, GOOD_POINTS[:2])
    stamp = record.points_path.stat().st_mtime_ns + 10**9
    os.utime(record.points_path, ns=(stamp, stamp))

    def full_disk(path):
        raise error

    real_fsync = fileio._fsync_file
    monkeypatch.setattr(fileio, "_fsync_file", full_disk)
    for run in (lambda: density_cache.load_density(record, params),
                lambda: density_cache.build_cache([record], params, progress=False),
                lambda: CrowdDataset([record], "eval", density_fn=density_cache.load_density)[0]):
        with pytest.raises(CrowdError) as info:
            run()
        assert_clear_error(info.value, CacheError, cache.parent, shown)
        assert "CROWD_CACHE" in str(info.value)
        assert cache.read_bytes() == good  # the previous file is intact...
        assert _leftovers(cache.parent) == []  # ...and no temporary file is left
    monkeypatch.setattr(fileio, "_fsync_file", real_fsync)  # room on the disk again
    assert density_cache.cache_status(record, params) == "stale"  # rebuilt once there is room again
    second = density_cache.load_density(record, params)
    assert first.sum() == pytest.approx(4, abs=1e-4) and second.sum() == pytest.approx(2, abs=1e-4)


def test_cache_location_not_writable(tmp_path, monkeypatch):
    split = tmp_path / "ds" / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    _image_and_points(None, GOOD_POINTS)(split)
    (record,) = _records(tmp_path / "ds")
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CROWD_CACHE", str(blocker))
    with pytest.raises(CrowdError) as info:
        density_cache.load_density(record)
    assert_clear_error(info.value, CacheError, blocker, "Cannot write the density cache")
    assert "CROWD_CACHE" in str(info.value)


def _tiny_dataset(root: Path) -> list[data.ImageRecord]:
    split = root / "part_B" / "train_data"
    (split / "images").mkdir(parents=True)
    (split / "ground-truth").mkdir(parents=True)
    for i in (1, 2):
        Image.fromarray(pixels(seed=i)).save(split / "images" / f"IMG_{i}.jpg")
        write_points_mat(split / "ground-truth" / f"GT_IMG_{i}.mat", GOOD_POINTS[: 2 * i])
    return _records(root)


def test_caches_never_go_into_the_dataset(tmp_path, isolated):
    """Even with write permission, the dataset is not touched: caches go to CROWD_CACHE."""
    root = tmp_path / "ShanghaiTech"
    records = _tiny_dataset(root)
    before = snapshot(root)
    stats = density_cache.build_cache(records, progress=False)
    assert stats["built"] == 2
    assert all(Path(d).is_relative_to(config.cache_root()) for d in stats["cache_dirs"])
    sums = [float(CrowdDataset(records, "eval")[i][1].sum()) for i in (0, 1)]
    assert sums == pytest.approx([2, 4], abs=1e-4)
    assert snapshot(root) == before


def _permissions_enforced(folder: Path) -> bool:
    """False when this process may write into a read-only folder (root, CAP_DAC_OVERRIDE)."""
    probe = folder / "probe"
    probe.mkdir()
    probe.chmod(0o500)
    try:
        (probe / "x").write_text("x")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
    return False


def test_read_only_dataset_folder(tmp_path, ckpt):
    if not _permissions_enforced(tmp_path):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): file permissions are not "
                    "enforced, so a read-only dataset cannot be simulated with chmod; "
                    "test_caches_never_go_into_the_dataset still checks nothing is written there")
    root = tmp_path / "ShanghaiTech"
    records = _tiny_dataset(root)
    before = snapshot(root)
    paths = [root, *root.rglob("*")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
    try:
        for p, mode in modes.items():
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        with pytest.raises(PermissionError):
            (root / "probe").write_text("x")
        assert density_cache.build_cache(records, progress=False)["built"] == 2
        ds = CrowdDataset(records, "train", crop=CROP)
        assert float(ds[0][1].sum()) == pytest.approx(2, abs=1e-4)
        result = evaluate.evaluate_checkpoint(ckpt, "B", "train", root=root, device="cpu",
                                              progress=False)
        assert [r["true_count"] for r in result.rows] == [2, 4]
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert snapshot(root) == before
