"""Finding and reading crowd datasets: images, head points, splits, and the ``verify`` command.

Conventions (shared by every module):

* images are ``H x W x 3`` ``uint8`` RGB arrays, whatever the file holds (grayscale, RGBA,
  palette, 16-bit);
* head points are ``float64`` arrays of shape ``(N, 2)`` in ``(x, y)`` pixel order, with pixel
  ``(i, j)`` covering ``x in [j, j+1)``, ``y in [i, i+1)``; a point is inside the image when
  ``0 <= x < W`` and ``0 <= y < H``.

Point policy (:func:`clean_points`), applied by :func:`load_example` and reported, never silent:

* NaN or infinite coordinates are dropped;
* points outside the image are dropped (``policy="drop"``, the default) or moved onto the nearest
  border pixel (``policy="clip"``);
* exact duplicates are kept and counted: ShanghaiTech has about 190 of them and its published
  head counts include them, so removing them would change the ground truth.

Bad files (policy; every error is a :class:`helpers.errors.CrowdError` naming the file):

* records come from the *images*: an annotation without an image is ignored (``verify`` reports
  it); an image without an annotation is listed with ``points_path=None`` and
  :func:`load_example` refuses it (:class:`AnnotationError`) unless ``require_points=False``;
* a file that is not an image (an HTML error page or text named ``.jpg``), a damaged header or
  a truncated file raises :class:`ImageReadError`. A JPEG whose header is intact but whose
  compressed pixels are damaged decodes with garbled blocks: no decoder can tell, only the
  sha256 check of ``verify`` finds it;
* images over :data:`MAX_IMAGE_PIXELS` (or ``max_pixels``) are refused from their header,
  before decoding: Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) is set to
  that limit while the file is opened (and put back afterwards);
* an annotation must hold a numeric ``(N, 2)`` array of ``(x, y)`` (``.mat`` and ``.json``:
  exactly two columns, so a transposed ``2 x N`` array is refused, not misread); truncated
  files, missing keys, strings and other shapes raise :class:`AnnotationError`.

Command line::

    python -m helpers.data verify [ROOT]   # file counts, pairing, sha256 against data/*.sha256
    python -m helpers.data where           # which dataset the series will use, and why
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helpers import config
from helpers.errors import AnnotationError, CrowdError, DatasetNotFoundError, ImageReadError

PARTS = ("A", "B")
OFFICIAL_SPLITS = ("train", "test")
#: ``fit`` + ``val`` = the official ``train`` split; ``test`` is never used to choose a model.
SPLITS = ("train", "test", "fit", "val")
EXPECTED_IMAGES = {("A", "train"): 300, ("A", "test"): 182, ("B", "train"): 400, ("B", "test"): 316}
VAL_FRACTION = 0.1
VAL_SEED = 2016  # the year ShanghaiTech was published; fixed so every notebook sees the same split
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
POINT_SUFFIXES = (".mat", ".csv", ".json", ".txt")
#: Largest image we decode (pixels). 100 MP is 300 MB as RGB uint8; bigger files are refused
#: before decoding, which also guards against decompression bombs.
MAX_IMAGE_PIXELS = 100_000_000


# --------------------------------------------------------------------------- data location


@dataclass(frozen=True)
class DataSource:
    """Which dataset the series uses: its root folder, whether it is synthetic, and why."""

    root: Path
    synthetic: bool
    origin: str  # "argument", "CROWD_DATA", "data/ShanghaiTech" or "synthetic"

    @property
    def name(self) -> str:
        return "synthetic crowds" if self.synthetic else "ShanghaiTech"


def resolve_data_source(root: str | Path | None = None, *, allow_synthetic: bool = True) -> DataSource:
    """Decide where the data is: ``root``, else ``CROWD_DATA``, else ``data/ShanghaiTech``.

    When none of those is set or present and ``allow_synthetic`` is true, the synthetic crowd set
    is generated (once, deterministically) and used instead. A path that was asked for explicitly
    but has the wrong layout is an error, never a silent fallback.
    """
    if root is not None:
        return DataSource(check_layout(Path(root)), synthetic=False, origin="argument")
    env = config.env_data_root()
    if env is not None:
        return DataSource(check_layout(env, hint="CROWD_DATA"), synthetic=False, origin="CROWD_DATA")
    default = config.default_data_root()
    if default.exists():
        return DataSource(check_layout(default), synthetic=False, origin="data/ShanghaiTech")
    if not allow_synthetic:
        raise DatasetNotFoundError(
            f"No dataset found: CROWD_DATA is not set and {default} does not exist. "
            "Download ShanghaiTech as described in data/README.md, then set CROWD_DATA to the "
            "folder that holds part_A and part_B."
        )
    from helpers.tools import synth

    return DataSource(synth.ensure_synthetic(), synthetic=True, origin="synthetic")


def banner(source: DataSource) -> str:
    """A Markdown banner for the top of a notebook saying which data is in use."""
    if source.synthetic:
        return (
            "**Running on SYNTHETIC crowds** (no ShanghaiTech dataset was found). Everything works "
            "and the numbers are real for this data, but they are not ShanghaiTech results. To use "
            "the real dataset, download it as described in `data/README.md` and set "
            "`CROWD_DATA=/path/to/ShanghaiTech` (the folder holding `part_A` and `part_B`) "
            f"before starting Jupyter. Synthetic set: `{source.root}`."
        )
    mode = "quick mode (`CROWD_QUICK=1`: small subsets)" if config.quick_mode() else "full mode"
    return f"Using **ShanghaiTech** at `{source.root}` (from {source.origin}), {mode}."


def _part_dir(root: Path, part: str) -> Path | None:
    for name in (f"part_{part}", f"part_{part}_final"):
        if (root / name).is_dir():
            return root / name
    return None


def check_layout(root: Path, hint: str = "") -> Path:
    """Return ``root`` resolved if it holds a ShanghaiTech layout, else raise with what is missing."""
    root = Path(root).expanduser().resolve()
    where = f" (set by {hint})" if hint else ""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Dataset folder {root}{where} does not exist. Point it at the folder that holds "
            "part_A and part_B (see data/README.md)."
        )
    found = [p for p in PARTS if _part_dir(root, p) is not None]
    if not found:
        inside = sorted(p.name for p in root.iterdir())[:8]
        raise DatasetNotFoundError(
            f"{root}{where} is not a ShanghaiTech root: looked for part_A/ or part_A_final/ and "
            f"part_B/ or part_B_final/, found {inside or 'an empty folder'}. If you unpacked the "
            "archive one level deeper, point at the inner folder."
        )
    return root


def split_dir(root: Path, part: str, split: str) -> Path:
    """The folder of one official split, e.g. ``root/part_A/train_data`` (or ``part_A_final``)."""
    part = _check_part(part)
    if split not in OFFICIAL_SPLITS:
        raise ValueError(f"split_dir takes 'train' or 'test', not {split!r}")
    pdir = _part_dir(root, part)
    if pdir is None:
        raise DatasetNotFoundError(
            f"Part {part} is missing under {root}: expected part_{part}/ or part_{part}_final/."
        )
    sdir = pdir / f"{split}_data"
    if not (sdir / "images").is_dir():
        raise DatasetNotFoundError(
            f"Expected images in {sdir / 'images'} but that folder does not exist. "
            f"ShanghaiTech layout: part_{part}/{split}_data/images and .../ground-truth."
        )
    return sdir


# --------------------------------------------------------------------------- records and splits


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: its name (e.g. ``IMG_12``) and files (``points_path`` may be None)."""

    name: str
    image_path: Path
    points_path: Path | None


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem))


def _check_part(part: str) -> str:
    part = str(part).upper().removeprefix("PART_")
    if part not in PARTS:
        raise ValueError(f"part must be 'A' or 'B', not {part!r}")
    return part


def find_points_file(image_path: Path) -> Path | None:
    """The annotation of an image, by the conventions of ShanghaiTech, UCF-QNRF and plain files.

    Looks for ``../ground-truth/GT_<stem>.mat`` (or ``ground_truth``), then next to the image
    ``<stem>_ann.mat`` (UCF-QNRF), ``<stem>.mat``, ``<stem>.csv``, ``<stem>.json``, ``<stem>.txt``.
    """
    stem = image_path.stem
    candidates = [
        image_path.parent.parent / gt / f"GT_{stem}.mat" for gt in ("ground-truth", "ground_truth")
    ]
    candidates.append(image_path.with_name(f"{stem}_ann.mat"))
    candidates += [image_path.with_suffix(s) for s in POINT_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (not recursive), in natural order (IMG_2 before IMG_10)."""
    return sorted(
        (p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=_natural_key,
    )


def records_in_folder(folder: str | Path) -> list[ImageRecord]:
    """Records for a user's own folder of images with a points file next to each (or none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder} is not a folder of images.")
    return [ImageRecord(p.stem, p, find_points_file(p)) for p in list_images(folder)]


def list_records(part: str, split: str, root: str | Path | None = None) -> list[ImageRecord]:
    """The images of one split, in natural order.

    ``split`` is ``train`` or ``test`` (the official splits), or ``fit`` / ``val``: the official
    train split cut into a fixed, seeded 90 % / 10 % (see :func:`split_fit_val`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    base = resolve_data_source(root).root if root is None else check_layout(Path(root))
    official = "test" if split == "test" else "train"
    sdir = split_dir(base, part, official)
    records = [ImageRecord(p.stem, p, find_points_file(p)) for p in list_images(sdir / "images")]
    if split in ("fit", "val"):
        fit, val = split_fit_val(records)
        records = fit if split == "fit" else val
    return records


def split_fit_val(
    records: Sequence[ImageRecord], fraction: float = VAL_FRACTION, seed: int = VAL_SEED
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Cut the official train split into ``fit`` and ``val``: a fixed, seeded random ``fraction``.

    The choice depends only on the sorted image names and the seed, so it is the same on every
    machine. Models are selected on ``val``; ``test`` is only for the final numbers.
    """
    ordered = sorted(records, key=lambda r: _natural_key(Path(r.name)))
    n_val = max(1, round(fraction * len(ordered))) if len(ordered) > 1 else 0
    rng = np.random.default_rng(seed)
    val_idx = set(rng.choice(len(ordered), size=n_val, replace=False).tolist())
    fit = [r for i, r in enumerate(ordered) if i not in val_idx]
    val = [r for i, r in enumerate(ordered) if i in val_idx]
    return fit, val


def take_evenly(records: Sequence[ImageRecord], n: int | None) -> list[ImageRecord]:
    """At most ``n`` records spread evenly over the list (quick mode's subsets); None keeps all."""
    if n is None or n >= len(records):
        return list(records)
    idx = np.linspace(0, len(records) - 1, num=n).round().astype(int)
    return [records[i] for i in idx]


# --------------------------------------------------------------------------- images


def read_image(
    path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, exif_orientation: bool = False
) -> np.ndarray:
    """Read any image file as ``H x W x 3`` ``uint8`` RGB.

    Grayscale is repeated over three channels, alpha is composited over white, palette images are
    expanded, 16-bit images are scaled to 8 bits. ``exif_orientation`` applies the camera's
    rotation tag (for phone photos; dataset annotations refer to the stored pixels, so it is off by
    default). Files larger than ``max_pixels`` are refused before decoding.
    """
    from PIL import ImageOps

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"Image {path} does not exist. Check the path.")
    try:
        with _open_image(path, max_pixels) as im:
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            im.load()
            return _to_rgb_uint8(im)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path} could not be decoded ({exc}); the file is probably truncated or corrupt. "
            "Download it again (python -m helpers.data verify finds every bad file)."
        ) from exc


def megapixels(n: float) -> str:
    """A pixel count for messages: ``"300 MP"``, ``"2.5 MP"``, or ``"2,240 pixels"`` below 1 MP."""
    if n >= 10e6:
        return f"{n / 1e6:.0f} MP"
    return f"{n / 1e6:.1f} MP" if n >= 1e6 else f"{int(n):,} pixels"


def _too_large(path: Path, width: int, height: int, max_pixels: int) -> ImageReadError:
    return ImageReadError(
        f"Image {path} is {width}x{height} = {megapixels(width * height)}, over the limit of "
        f"{megapixels(max_pixels)} (a guard against decompression bombs). Downscale it first, or "
        "raise max_pixels if you have the memory (about 3 bytes per pixel, plus the model's needs)."
    )


@contextlib.contextmanager
def _open_image(path: Path, max_pixels: int) -> Iterator:
    """``PIL.Image.open`` with Pillow's decompression-bomb guard set to ``max_pixels``.

    Larger images are refused from their header, before any pixel is decoded, with
    :func:`_too_large`; files that are not images raise :class:`ImageReadError`.
    """
    from PIL import Image, UnidentifiedImageError

    previous = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = int(max_pixels)
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        Image.MAX_IMAGE_PIXELS = None  # only to read the size from the header for the message
        try:
            with Image.open(path) as im:
                width, height = im.size
        finally:
            Image.MAX_IMAGE_PIXELS = previous
        raise _too_large(path, width, height, max_pixels) from exc
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path} is not a readable image ({type(exc).__name__}: {exc}). The file is damaged, "
            "or is not an image at all (e.g. an HTML error page saved with an image name): "
            "download it again (python -m helpers.data verify finds every bad file)."
        ) from exc
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise _too_large(path, width, height, max_pixels)
        yield im


def to_rgb_uint8(im) -> np.ndarray:
    """Convert a PIL image of any mode to ``H x W x 3`` uint8 RGB, as :func:`read_image` does."""
    im.load()
    return _to_rgb_uint8(im)


def _to_rgb_uint8(im) -> np.ndarray:
    """Convert a loaded PIL image of any mode to an ``H x W x 3`` uint8 RGB array."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def image_size(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only.

    Images over ``max_pixels`` are refused as by :func:`read_image` (a density map of that size
    would not fit in memory either).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"Image {path} does not exist. Check the path.")
    try:
        with _open_image(path, max_pixels) as im:
            return im.size[1], im.size[0]
    except OSError as exc:
        raise ImageReadError(
            f"{path} is not a readable image ({type(exc).__name__}: {exc}). Download it again "
            "(python -m helpers.data verify finds every bad file)."
        ) from exc


# --------------------------------------------------------------------------- points


def read_points(path: str | Path) -> np.ndarray:
    """Read head points from an annotation file as ``(N, 2)`` float64 ``(x, y)`` pixels.

    Formats: ShanghaiTech ``.mat`` (``image_info``), UCF-QNRF ``.mat`` (``annPoints``), ``.csv``
    (``x,y`` per row, optional header), ``.json`` (``[[x, y], ...]``, ``[{"x":..,"y":..}]`` or
    ``{"points": ...}``) and ``.txt`` (whitespace-separated, first two columns are x and y).
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"Annotation {path} does not exist. Check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".mat":
            raw = _points_from_mat(path)
        elif suffix == ".csv":
            raw = _points_from_csv(path)
        elif suffix == ".json":
            raw = _points_from_json(path)
        elif suffix == ".txt":
            raw = _points_from_txt(path)
        else:
            raise AnnotationError(f"{path}: unknown annotation format; use .mat, .csv, .json or .txt.")
    except AnnotationError:
        raise
    except Exception as exc:  # scipy, json and csv raise many types on broken files
        raise AnnotationError(
            f"{path} could not be read as head points ({type(exc).__name__}: {exc}). The file is "
            "probably truncated or in another format; download it again or check its structure."
        ) from exc
    return _as_points(raw, path)


def _points_from_mat(path: Path):
    import scipy.io

    mat = scipy.io.loadmat(path)
    if "image_info" in mat:
        try:
            return mat["image_info"][0, 0][0, 0][0]
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            raise AnnotationError(
                f"{path}: 'image_info' does not have the ShanghaiTech structure "
                "image_info[0,0][0,0][0] = (N, 2) points. Download the ground truth again, or "
                "save your points as an N x 2 array named 'annPoints'."
            ) from exc
    if "annPoints" in mat:
        return mat["annPoints"]
    keys = sorted(k for k in mat if not k.startswith("__"))
    raise AnnotationError(
        f"{path}: no head points found; expected the key 'image_info' (ShanghaiTech) or "
        f"'annPoints' (UCF-QNRF), found {keys}. Use the ground-truth file of this image, or "
        "save its points as an N x 2 array named 'annPoints' (or as a .csv of x,y rows)."
    )


def _points_from_csv(path: Path):
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or not "".join(row).strip():
                continue
            try:
                rows.append([float(row[0]), float(row[1])])
            except (ValueError, IndexError) as exc:
                if i == 0:  # a header line such as "x,y"
                    continue
                raise AnnotationError(
                    f"{path}, line {i + 1}: expected 'x,y' numbers, got {row}. Fix or remove "
                    "that line."
                ) from exc
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def _points_from_json(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("points", data.get("annPoints"))
    if data and isinstance(data, list) and isinstance(data[0], dict):
        data = [[d["x"], d["y"]] for d in data]
    if data is None or not isinstance(data, list):
        raise AnnotationError(
            f"{path}: expected a list of [x, y] or an object with 'points'. Write the points as "
            '[[x, y], ...] or {"points": [[x, y], ...]}.'
        )
    if not data:
        return np.zeros((0, 2))
    arr = np.asarray(data, dtype=np.float64)
    return arr.reshape(1, 2) if arr.shape == (2,) else arr  # one point as [x, y]


def _points_from_txt(path: Path):
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return np.asarray([[float(r[0]), float(r[1])] for r in rows], dtype=np.float64).reshape(-1, 2)


def _as_points(raw, path: Path) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    exact = path.suffix.lower() in (".mat", ".json")  # other formats may add columns (w, h, ...)
    if (
        arr.dtype.kind not in "fiu"
        or arr.ndim != 2
        or arr.shape[1] < 2
        or (exact and arr.shape[1] != 2)
    ):
        hint = " (it looks transposed: 2 x N)" if arr.ndim == 2 and arr.shape[0] == 2 else ""
        raise AnnotationError(
            f"{path}: head points must be a numeric (N, 2) array of (x, y), got shape "
            f"{arr.shape} and type {arr.dtype}{hint}. Save the points as N rows of x, y numbers "
            "(pixels)."
        )
    return np.ascontiguousarray(arr[:, :2], dtype=np.float64)


@dataclass
class PointReport:
    """What :func:`clean_points` did to one image's annotation."""

    n_raw: int = 0
    n_kept: int = 0
    non_finite: int = 0  # dropped
    outside: int = 0  # dropped or clipped, by policy
    duplicates: int = 0  # kept
    policy: str = "drop"

    @property
    def changed(self) -> bool:
        return self.non_finite > 0 or self.outside > 0


def clean_points(
    points: np.ndarray, image_shape: tuple[int, ...], policy: str = "drop"
) -> tuple[np.ndarray, PointReport]:
    """Apply the point policy (module docstring) to ``(N, 2)`` points for an image of ``(H, W)``."""
    if policy not in ("drop", "clip"):
        raise ValueError("policy must be 'drop' or 'clip'")
    height, width = int(image_shape[0]), int(image_shape[1])
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    report = PointReport(n_raw=len(pts), policy=policy)
    finite = np.isfinite(pts).all(axis=1)
    report.non_finite = int((~finite).sum())
    pts = pts[finite]
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height)
    report.outside = int((~inside).sum())
    if policy == "drop":
        pts = pts[inside]
    else:
        pts = pts.copy()
        pts[:, 0] = np.clip(pts[:, 0], 0, np.nextafter(width, 0))
        pts[:, 1] = np.clip(pts[:, 1], 0, np.nextafter(height, 0))
    report.duplicates = int(len(pts) - len(np.unique(pts, axis=0))) if len(pts) else 0
    report.n_kept = len(pts)
    return pts, report


@dataclass
class Example:
    """A loaded image with its cleaned points and the report of what cleaning did."""

    record: ImageRecord
    image: np.ndarray  # H x W x 3 uint8 RGB
    points: np.ndarray  # (N, 2) float64 (x, y)
    report: PointReport = field(default_factory=PointReport)

    @property
    def count(self) -> int:
        return len(self.points)


def missing_annotation(image_path: str | Path, need: str = "") -> AnnotationError:
    """The error for an image without an annotation file (``need``: why one is needed)."""
    image_path = Path(image_path)
    return AnnotationError(
        f"No annotation found for {image_path}{need}: expected ground-truth/GT_{image_path.stem}.mat, "
        "or a .csv/.json/.txt/_ann.mat file next to the image. Add the annotation, or move the "
        "image out of the dataset (python -m helpers.data verify lists every unpaired file)."
    )


def load_example(record: ImageRecord, policy: str = "drop", require_points: bool = True) -> Example:
    """Read a record's image and points and apply the point policy."""
    image = read_image(record.image_path)
    if record.points_path is None:
        if require_points:
            raise missing_annotation(record.image_path)
        raw = np.zeros((0, 2))
    else:
        raw = read_points(record.points_path)
    points, report = clean_points(raw, image.shape, policy)
    return Example(record, image, points, report)


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """Result of :func:`verify`: per-split counts and every problem found."""

    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checked_checksums: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def default_checksum_file() -> Path:
    return config.project_root() / "data" / "ShanghaiTech.sha256"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root: str | Path, checksums: str | Path | None = None, progress: bool = True) -> VerifyReport:
    """Check a ShanghaiTech download: file counts, image/annotation pairs, and sha256 sums."""
    from tqdm.auto import tqdm

    root = check_layout(Path(root))
    report = VerifyReport(root=root)
    expected_hashes: dict[str, str] = {}
    checksum_path = Path(checksums) if checksums else default_checksum_file()
    if checksum_path.is_file():
        for line in checksum_path.read_text().splitlines():
            if line.strip():
                digest, rel = line.split(maxsplit=1)
                expected_hashes[rel.strip()] = digest
    elif checksums:
        raise CrowdError(f"Checksum list {checksum_path} does not exist.")
    else:
        report.problems.append(f"checksum list {checksum_path} not found: sha256 not checked")

    to_hash: list[tuple[str, Path]] = []
    for part in PARTS:
        for split in OFFICIAL_SPLITS:
            key = f"part_{part}/{split}"
            try:
                sdir = split_dir(root, part, split)
            except DatasetNotFoundError as exc:
                report.problems.append(str(exc))
                continue
            images = list_images(sdir / "images")
            report.counts[key] = len(images)
            want = EXPECTED_IMAGES[(part, split)]
            if len(images) != want:
                report.problems.append(f"{key}: {len(images)} images, expected {want}")
            stems = set()
            for img in images:
                stems.add(img.stem)
                gt = find_points_file(img)
                if gt is None:
                    report.problems.append(f"{img}: no annotation (expected ground-truth/GT_{img.stem}.mat)")
                else:
                    to_hash.append((f"part_{part}/{split}_data/ground-truth/{gt.name}", gt))
                to_hash.append((f"part_{part}/{split}_data/images/{img.name}", img))
            for gt_dir in ("ground-truth", "ground_truth"):
                if (sdir / gt_dir).is_dir():
                    for gt in sorted((sdir / gt_dir).glob("GT_*.mat")):
                        if gt.stem.removeprefix("GT_") not in stems:
                            report.problems.append(f"{gt}: annotation without an image")
    if expected_hashes:
        seen = set()
        for rel, path in tqdm(to_hash, desc="sha256", unit="file", disable=not progress):
            seen.add(rel)
            want = expected_hashes.get(rel)
            if want is None:
                report.problems.append(f"{path}: not in the checksum list")
            elif _sha256(path) != want:
                report.problems.append(f"{path}: sha256 mismatch (corrupt or modified file)")
            report.checked_checksums += 1
        missing = sorted(set(expected_hashes) - seen)
        for rel in missing[:20]:
            report.problems.append(f"{rel}: missing")
        if len(missing) > 20:
            report.problems.append(f"... and {len(missing) - 20} more missing files")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.data", description="Check and locate crowd-counting datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="check a ShanghaiTech download (counts, pairs, sha256)")
    p_verify.add_argument("root", nargs="?", help="dataset root (default: CROWD_DATA or data/ShanghaiTech)")
    p_verify.add_argument("--checksums", help="sha256 list (default: data/ShanghaiTech.sha256)")
    p_verify.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("where", help="print which dataset the series will use")
    args = parser.parse_args(argv)
    try:
        if args.command == "where":
            source = resolve_data_source()
            print(json.dumps({"root": str(source.root), "synthetic": source.synthetic, "origin": source.origin}))
            return 0
        root = args.root or config.env_data_root() or config.default_data_root()
        report = verify(root, args.checksums, progress=not args.json)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"root": str(report.root), "ok": report.ok, "counts": report.counts,
                          "checksums_checked": report.checked_checksums, "problems": report.problems}))
    else:
        for key, n in report.counts.items():
            print(f"{key}: {n} images")
        print(f"sha256 checked: {report.checked_checksums} files")
        for problem in report.problems:
            print(f"PROBLEM: {problem}")
        print("dataset complete and intact" if report.ok else f"{len(report.problems)} problem(s) found")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
