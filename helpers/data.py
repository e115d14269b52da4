"""Finding and reading crowd datasets: records, images, head points, the point policy, the splits.

Images are (H, W, 3) uint8 RGB whatever the file holds. Head points are (N, 2) float64 (x, y)
pixels; pixel (i, j) covers x in [j, j+1), y in [i, i+1): a point is inside when 0 <= x < W and
0 <= y < H. Bad files raise a CrowdError subclass naming the file. The choices: docs/data.md.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from helpers import config
from helpers.errors import AnnotationError, DatasetNotFoundError, ImageReadError

PARTS = ("A", "B")
OFFICIAL_SPLITS = ("train", "test")
#: ``fit`` + ``val`` = the official ``train`` split; ``test`` is never used to choose a model.
SPLITS = ("train", "test", "fit", "val")
VAL_FRACTION = 0.1
VAL_SEED = 2016  # the year ShanghaiTech was published; fixed so every notebook sees the same split
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
POINT_SUFFIXES = (".mat", ".csv", ".json", ".txt")
#: Largest image we decode (pixels): 100 MP is 300 MB as RGB uint8.
MAX_IMAGE_PIXELS = 100_000_000
_REDOWNLOAD = "Download it again (crowd verify finds every bad file)."


@dataclass(frozen=True)
class DataSource:
    """Which dataset the series uses: its root folder, whether it is synthetic, and why."""

    root: Path
    synthetic: bool
    origin: str  # "argument", "CROWD_DATA", "data/ShanghaiTech" or "synthetic"

    @property
    def name(self) -> str:
        return "synthetic crowds" if self.synthetic else "ShanghaiTech"

    @property
    def ready(self) -> bool:
        """False only for a synthetic set not generated yet (``crowd synth`` generates it)."""
        return any(_part_dir(self.root, p) for p in PARTS)


def resolve_data_source(root: str | Path | None = None, *, allow_synthetic: bool = True) -> DataSource:
    """Decide where the data is: ``root``, else CROWD_DATA, else data/ShanghaiTech, else synthetic.

    Inputs:
    - root: folder holding part_A / part_B, or None to decide from the environment
    - allow_synthetic: bool, when False a missing dataset raises DatasetNotFoundError
    Returns:
    - source: DataSource; a path given explicitly with a wrong layout raises, never falls back
    """
    env, default = config.env_data_root(), config.default_data_root()
    if root is not None or env is not None:
        origin = "argument" if root is not None else "CROWD_DATA"
        return DataSource(check_layout(root if root is not None else env, origin), False, origin)
    if default.exists():
        return DataSource(check_layout(default), synthetic=False, origin="data/ShanghaiTech")
    if not allow_synthetic:
        raise DatasetNotFoundError(f"No dataset: CROWD_DATA is unset and {default} does not exist. Download "
                                   "ShanghaiTech (data/README.md) and set CROWD_DATA to its folder.")
    return DataSource(config.synthetic_root().absolute(), synthetic=True, origin="synthetic")


def _part_dir(root: Path, part: str) -> Path | None:
    return next((root / n for n in (f"part_{part}", f"part_{part}_final") if (root / n).is_dir()), None)


def check_layout(root: Path, hint: str = "") -> Path:
    """Check that ``root`` holds part_A/ and/or part_B/ (or part_A_final/, part_B_final/).

    Inputs:
    - root: folder to check
    - hint: str, where the path came from (e.g. "CROWD_DATA"), for the message
    Returns:
    - root: absolute resolved Path; DatasetNotFoundError says what is missing otherwise
    """
    root = Path(root).expanduser().resolve()
    where = f"{root} (from {hint})" if hint else str(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"Dataset folder {where} does not exist. Set CROWD_DATA to the folder holding "
                                   "part_A and part_B (data/README.md), or run `crowd synth` for the synthetic set.")
    if not any(_part_dir(root, p) for p in PARTS):
        found = sorted(p.name for p in root.iterdir())[:8] or "an empty folder"
        raise DatasetNotFoundError(f"{where} is not a ShanghaiTech root: no part_A/ or part_B/ (or *_final/) in "
                                   f"it, found {found}. If it is one level too high, point at the inner folder.")
    return root


def split_dir(root: Path, part: str, split: str) -> Path:
    """The folder of one official split, e.g. ``root/part_A/train_data`` (or ``part_A_final``).

    Inputs:
    - root: dataset root; part: "A" or "B"; split: "train" or "test"
    Returns:
    - folder: Path holding images/ (DatasetNotFoundError when it is missing)
    """
    part = str(part).upper().removeprefix("PART_")
    pdir = _part_dir(root, part)
    if pdir is None:
        raise DatasetNotFoundError(f"Part {part} is missing under {root}: expected part_{part}/ or part_{part}_final/.")
    if not (pdir / f"{split}_data" / "images").is_dir():
        raise DatasetNotFoundError(f"{pdir}/{split}_data/images does not exist (expected layout: part_{part}/"
                                   f"{split}_data/images and .../ground-truth).")
    return pdir / f"{split}_data"


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: its name (e.g. ``IMG_12``) and files (``points_path`` may be None)."""

    name: str
    image_path: Path
    points_path: Path | None


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem))


def find_points_file(image_path: Path) -> Path | None:
    """An image's annotation: ../ground-truth/GT_<stem>.mat, else <stem>_ann.mat, .mat, .csv, .json, .txt.

    Inputs:
    - image_path: Path of the image file
    Returns:
    - points_path: Path of the first file that exists, or None
    """
    stem = image_path.stem
    candidates = [image_path.parent.parent / gt / f"GT_{stem}.mat" for gt in ("ground-truth", "ground_truth")]
    candidates += [image_path.with_name(f"{stem}_ann.mat")] + [image_path.with_suffix(s) for s in POINT_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (not recursive), in natural order (IMG_2 before IMG_10).

    Inputs:
    - folder: Path
    Returns:
    - paths: list of Path with suffixes in IMAGE_SUFFIXES
    """
    images = (p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(images, key=_natural_key)


def list_records(part: str, split: str, root: str | Path | None = None) -> list[ImageRecord]:
    """The images of one split, in natural order.

    Inputs:
    - part: "A" or "B"
    - split: "train" or "test" (official), or "fit" / "val" (train cut 90 % / 10 % by split_fit_val)
    - root: dataset root, or None for resolve_data_source()
    Returns:
    - records: list of ImageRecord
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    sdir = split_dir(check_layout(resolve_data_source(root).root), part, "test" if split == "test" else "train")
    records = [ImageRecord(p.stem, p, find_points_file(p)) for p in list_images(sdir / "images")]
    return split_fit_val(records)[split == "val"] if split in ("fit", "val") else records


def split_fit_val(records: Sequence[ImageRecord], fraction: float = VAL_FRACTION,
                  seed: int = VAL_SEED) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Cut the official train split into ``fit`` and ``val`` (seeded, by sorted names: the same everywhere).

    Inputs:
    - records: the train split's ImageRecords (any order)
    - fraction: float, share of images in val (at least one when there are two or more)
    - seed: int
    Returns:
    - fit, val: two lists of ImageRecord in natural order, disjoint, together all records
    """
    ordered = sorted(records, key=lambda r: _natural_key(Path(r.name)))
    n_val = max(1, round(fraction * len(ordered))) if len(ordered) > 1 else 0
    val_idx = set(np.random.default_rng(seed).choice(len(ordered), size=n_val, replace=False).tolist())
    fit = [r for i, r in enumerate(ordered) if i not in val_idx]
    return fit, [r for i, r in enumerate(ordered) if i in val_idx]


def take_evenly(records: Sequence, n: int | None) -> list:
    """At most ``n`` items spread evenly over the list (quick mode's subsets).

    Inputs:
    - records: sequence (of ImageRecord, or anything)
    - n: int, or None to keep all
    Returns:
    - subset: list, first and last items included
    """
    if n is None or n >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, num=n).round().astype(int)]


def read_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
               exif_orientation: bool = False) -> np.ndarray:
    """Read any image file as RGB: grayscale repeated, alpha over white, 16-bit scaled to 8.

    Inputs:
    - path: image file
    - max_pixels: int, larger files are refused from their header, before decoding
    - exif_orientation: bool, apply the camera's rotation tag (phone photos; off for datasets)
    Returns:
    - image: uint8 array (H, W, 3) RGB
    """
    with _open_image(Path(path), max_pixels) as im:
        return to_rgb_uint8(ImageOps.exif_transpose(im) if exif_orientation else im)


def image_size(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """The size of an image file, read from its header only (refused over ``max_pixels``).

    Inputs:
    - path: image file; max_pixels: int
    Returns:
    - (height, width): ints, pixels
    """
    with _open_image(Path(path), max_pixels) as im:
        return im.size[1], im.size[0]


def megapixels(n: float) -> str:
    """A pixel count for messages.

    Inputs: n, a number of pixels. Returns: str, "300 MP", "2.5 MP", or "2,240 pixels" below 1 MP.
    """
    return f"{n / 1e6:.0f} MP" if n >= 10e6 else f"{n / 1e6:.1f} MP" if n >= 1e6 else f"{int(n):,} pixels"


@contextlib.contextmanager
def _open_image(path: Path, max_pixels: int) -> Iterator:
    """``PIL.Image.open`` refusing files over ``max_pixels`` from their header (Pillow's own guard
    is lifted while the header is read, then put back); every failure becomes ImageReadError."""
    if not path.is_file():
        raise ImageReadError(f"Image {path} does not exist. Check the path.")
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        try:
            im = Image.open(path)
        except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise ImageReadError(f"{path} is not a readable image ({type(exc).__name__}: {exc}): damaged, or "
                                 f"not an image at all (e.g. an HTML error page). {_REDOWNLOAD}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
        with im:
            (width, height), limit = im.size, megapixels(max_pixels)
            if width * height > max_pixels:
                raise ImageReadError(f"Image {path} is {width}x{height} = {megapixels(width * height)}, over the "
                                     f"limit of {limit} (a decompression-bomb guard). Downscale it, or raise max_pixels.")
            yield im
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path} could not be decoded ({exc}); the file is probably truncated or corrupt. "
                             f"{_REDOWNLOAD}") from exc


def to_rgb_uint8(im) -> np.ndarray:
    """Convert a PIL image of any mode as :func:`read_image` does.

    Inputs:
    - im: PIL.Image (any mode: L, I;16, P, RGBA, CMYK, ...)
    Returns:
    - image: uint8 array (H, W, 3) RGB
    """
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def as_points(points, name: str = "points", *, finite: bool = False) -> np.ndarray:
    """Check and convert head points (the one converter used by data, density and metrics).

    Inputs:
    - points: array-like (N, 2) of (x, y) pixels; None or empty means no points
    - name: str, what the points are, for the error message
    - finite: bool, also refuse NaN and infinite coordinates
    Returns:
    - points: float64 array (N, 2); a bad shape or type raises ValueError naming ``name``
    """
    arr = np.zeros((0, 2)) if points is None else np.asarray(points)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != 2:
        hint = " (it looks transposed: 2 x N)" if arr.ndim == 2 and arr.shape[0] == 2 else ""
        raise ValueError(f"{name} must be a numeric (N, 2) array of (x, y) pixels, got shape "
                         f"{arr.shape} and type {arr.dtype}{hint}")
    pts = np.ascontiguousarray(arr, dtype=np.float64)
    if finite and not np.isfinite(pts).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return pts


def read_points(path: str | Path) -> np.ndarray:
    """Read head points: ShanghaiTech or UCF-QNRF .mat, .csv/.txt (x,y or x y per line, optional
    header), .json ([[x, y], ...], [{"x":.., "y":..}] or {"points": ...}).

    Inputs:
    - path: annotation file
    Returns:
    - points: float64 array (N, 2) of (x, y) pixels; unreadable files raise AnnotationError
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"Annotation {path} does not exist. Check the path.")
    reader = {".mat": _points_from_mat, ".csv": _points_from_text, ".txt": _points_from_text,
              ".json": _points_from_json}.get(path.suffix.lower())
    if reader is None:
        raise AnnotationError(f"{path}: unknown annotation format; use .mat, .csv, .json or .txt.")
    try:
        raw = reader(path)
    except AnnotationError:
        raise
    except Exception as exc:  # scipy and json raise many types on broken files
        raise AnnotationError(f"{path} could not be read as head points ({type(exc).__name__}: {exc}). It is "
                              "probably truncated or in another format; download it again or check it.") from exc
    try:
        return as_points(raw, "head points")
    except ValueError as exc:
        raise AnnotationError(f"{path}: {exc}. Save the points as N rows of x, y numbers.") from exc


def _points_from_mat(path: Path):
    import scipy.io
    mat = scipy.io.loadmat(path)
    if "annPoints" in mat:
        return mat["annPoints"]
    try:
        return mat["image_info"][0, 0][0, 0][0]
    except KeyError:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise AnnotationError(f"{path}: no head points; expected the key 'image_info' (ShanghaiTech) or "
                              f"'annPoints' (UCF-QNRF), found {keys}. Save them as an N x 2 'annPoints'.") from None
    except (IndexError, TypeError, ValueError) as exc:
        raise AnnotationError(f"{path}: 'image_info' lacks the ShanghaiTech structure image_info[0,0][0,0][0]"
                              " = (N, 2) points. Download the ground truth again, or save 'annPoints'.") from exc


def _points_from_text(path: Path) -> np.ndarray:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            rows.append([float(fields[0]), float(fields[1])])
        except (ValueError, IndexError) as exc:
            if i > 0:  # the first line may be a header such as "x,y"
                raise AnnotationError(f"{path}, line {i + 1}: expected the x, y numbers of head points, "
                                      f"got {line.strip()!r}. Fix or remove that line.") from exc
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def _points_from_json(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("points", data.get("annPoints"))
    if data and isinstance(data, list) and isinstance(data[0], dict):
        data = [[d["x"], d["y"]] for d in data]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of [x, y] or an object with 'points'. Write the "
                              'points as [[x, y], ...] or {"points": [[x, y], ...]}.')
    return np.atleast_2d(data)  # one point may be written as [x, y]


@dataclass
class PointReport:
    """What :func:`clean_points` did to one image's annotation (counts of points)."""

    n_raw: int = 0
    n_kept: int = 0
    non_finite: int = 0  # dropped
    outside: int = 0  # dropped or clipped, by policy
    duplicates: int = 0  # kept
    policy: str = "drop"


def clean_points(points: np.ndarray, image_shape: tuple[int, ...],
                 policy: str = "drop") -> tuple[np.ndarray, PointReport]:
    """The point policy, reported, never silent: NaN/inf points are dropped, points outside the
    image dropped or clipped, exact duplicates kept and counted.

    Inputs:
    - points: float array (N, 2) of (x, y) pixels
    - image_shape: (H, W) or (H, W, 3)
    - policy: "drop" or "clip" for points outside the image (NaN / inf are always dropped)
    Returns:
    - points: float64 array (M, 2), M <= N, every point inside the image
    - report: PointReport (raw, kept, non-finite, outside and duplicate counts)
    """
    if policy not in ("drop", "clip"):
        raise ValueError("policy must be 'drop' or 'clip'")
    height, width = int(image_shape[0]), int(image_shape[1])
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(pts).all(axis=1)
    report = PointReport(n_raw=len(pts), non_finite=int((~finite).sum()), policy=policy)
    pts = pts[finite]
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height)
    report.outside = int((~inside).sum())
    if policy == "drop":
        pts = pts[inside]
    else:
        pts = np.clip(pts, 0, [np.nextafter(width, 0), np.nextafter(height, 0)])
    report.n_kept, report.duplicates = len(pts), len(pts) - len(np.unique(pts, axis=0))
    return pts, report


@dataclass
class Example:
    """A loaded image with its cleaned points and the report of what cleaning did."""

    record: ImageRecord
    image: np.ndarray  # (H, W, 3) uint8 RGB
    points: np.ndarray  # (N, 2) float64 (x, y)
    report: PointReport

    @property
    def count(self) -> int:
        return len(self.points)


def missing_annotation(image_path: str | Path, need: str = "") -> AnnotationError:
    """The error for an image without an annotation file.

    Inputs:
    - image_path: the image; need: str, why an annotation is needed (appended to the path)
    Returns:
    - error: AnnotationError (to raise) saying which files were looked for
    """
    image_path = Path(image_path)
    return AnnotationError(f"No annotation found for {image_path}{need}: expected ground-truth/GT_"
                           f"{image_path.stem}.mat or a .csv/.json/.txt/_ann.mat next to it. Add it, or "
                           "move the image out of the dataset (crowd verify lists every unpaired file).")


def load_example(record: ImageRecord, policy: str = "drop", require_points: bool = True) -> Example:
    """Read a record's image and points and apply the point policy.

    Inputs:
    - record: ImageRecord
    - policy: "drop" or "clip" (see clean_points)
    - require_points: bool, when False an image without annotation gets zero points
    Returns:
    - example: Example (image (H, W, 3) uint8, points (N, 2) float64, report)
    """
    image = read_image(record.image_path)
    if record.points_path is None and require_points:
        raise missing_annotation(record.image_path)
    raw = np.zeros((0, 2)) if record.points_path is None else read_points(record.points_path)
    points, report = clean_points(raw, image.shape, policy)
    return Example(record, image, points, report)
