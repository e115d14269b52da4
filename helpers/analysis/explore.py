"""Looking at a crowd dataset before any model: per-image statistics and the head-size proxy.

Everything here reads image *headers* (size and colour mode) and the annotation files only, so a
whole ShanghaiTech pass takes seconds: no JPEG is decoded.

* :func:`image_stats` -- one :class:`ImageStats` row per image (size, count, grayscale, mean
  nearest-neighbour distance, what the point policy did);
* :func:`summarize_counts` -- n / total / min / median / mean / max of the counts per part and split;
* :func:`declared_count` -- the count a ShanghaiTech ``.mat`` file states itself (an independent check);
* :func:`mean_knn_distance` -- each head's mean distance to its ``k`` nearest heads (pixels), the
  quantity the geometry-adaptive Gaussian kernel uses for its width;
* :func:`nn_distance_by_row` -- that distance binned by normalised image row ``y / H``, with a
  least-squares line: how perspective makes heads larger towards the bottom of the picture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from helpers import data
from helpers.errors import AnnotationError

#: PIL modes that hold a single grey channel (with or without alpha, any bit depth).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: Neighbours used for the head-size proxy (the geometry-adaptive kernel of MCNN uses k = 3).
DEFAULT_K = 3
#: Fields of :class:`helpers.data.PointReport` that are counts and add up over a split.
REPORT_FIELDS = ("n_raw", "n_kept", "non_finite", "outside", "duplicates")


# --------------------------------------------------------------------------- single images


def is_grayscale_file(path: str | Path) -> bool:
    """True when the image file stores one grey channel (PIL mode ``L``, ``I;16``, ...).

    Reads the header only. The decision is about the *file*: :func:`helpers.data.read_image`
    still returns such images as ``H x W x 3`` RGB (the grey value repeated three times).
    """
    from PIL import Image, UnidentifiedImageError

    from helpers.errors import ImageReadError

    try:
        with Image.open(path) as im:
            return im.mode in GRAY_MODES
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"{path} is not a readable image ({exc}).") from exc


def declared_count(points_path: str | Path) -> int | None:
    """The head count a ShanghaiTech ``.mat`` file states in its ``number`` field, or None.

    The file holds ``image_info{1,1}`` with fields ``location`` (the ``(N, 2)`` points) and
    ``number`` (``[[N]]``). Comparing ``number`` with the points actually read is an independent
    check of the reader; files without that field (other formats) give None.
    """
    import scipy.io

    path = Path(points_path)
    if path.suffix.lower() != ".mat":
        return None
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many types on broken files
        raise AnnotationError(
            f"{path} could not be read as a .mat file ({type(exc).__name__}: {exc}); it is probably "
            "truncated. Download it again (crowd verify finds every bad file)."
        ) from exc
    try:
        info = mat["image_info"][0, 0][0, 0]
        return int(np.asarray(info["number"]).ravel()[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def mean_knn_distance(points: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Mean Euclidean distance from each point to its ``k`` nearest *other* points.

    ``points`` is ``(N, 2)`` ``(x, y)`` in pixels; returns ``(N,)`` float64 pixels. With
    ``N <= k`` every point uses the ``N - 1`` others; a lone point (``N == 1``) gets NaN because it
    has no neighbour. Coincident points are each other's neighbours at distance 0. The per-neighbour
    distances come from :func:`helpers.density.knn_distances`, the same ones the adaptive kernel uses.
    """
    from helpers import density

    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    dists = density.knn_distances(points, k)  # (N, min(k, N-1))
    if dists.shape[1] == 0:
        return np.full(len(dists), np.nan) if len(dists) else np.zeros(0, dtype=np.float64)
    return dists.mean(axis=1)


# --------------------------------------------------------------------------- per-image table


@dataclass(frozen=True)
class ImageStats:
    """Statistics of one annotated image (one row of the exploration table)."""

    name: str
    part: str  # "A" or "B"
    split: str  # "train", "test", "fit" or "val"
    height: int  # pixels
    width: int  # pixels
    count: int  # heads kept by the point policy (the ground-truth count)
    grayscale: bool  # the file stores one grey channel
    mean_nn: float  # mean over heads of mean_knn_distance (pixels); NaN with fewer than 2 heads
    n_raw: int  # points in the annotation file
    n_kept: int
    non_finite: int  # dropped
    outside: int  # dropped (or clipped, by policy)
    duplicates: int  # exact duplicates, kept

    def as_dict(self) -> dict:
        return asdict(self)


def _part_split_from_path(image_path: Path) -> tuple[str, str]:
    """``("A", "train")`` from ``.../part_A/train_data/images/IMG_1.jpg``; ``"?"`` if unknown."""
    split_dir = image_path.parent.parent
    split = split_dir.name.removesuffix("_data") if split_dir.name.endswith("_data") else "?"
    part_name = split_dir.parent.name.removesuffix("_final")
    part = part_name.removeprefix("part_") if part_name.startswith("part_") else "?"
    return part, split


def image_stats(
    records: Sequence[data.ImageRecord],
    part: str | None = None,
    split: str | None = None,
    *,
    k: int = DEFAULT_K,
    policy: str = "drop",
    progress: bool = True,
) -> list[ImageStats]:
    """One :class:`ImageStats` per record, from the image header and the annotation file.

    ``part`` and ``split`` label the rows; by default they are read from the ShanghaiTech folder
    names (pass ``split="fit"`` or ``"val"`` yourself, the folders only know train/test). Points
    go through :func:`helpers.data.clean_points` with ``policy``, exactly as
    :func:`helpers.data.load_example` does, so ``count`` is the count a model is trained on.
    """
    from tqdm.auto import tqdm

    rows = []
    desc = f"part {part} {split}" if part and split else "images"
    for record in tqdm(records, desc=desc, unit="img", disable=not progress):
        guess_part, guess_split = _part_split_from_path(Path(record.image_path))
        if record.points_path is None:
            raise AnnotationError(
                f"No annotation found for {record.image_path}: expected ground-truth/GT_"
                f"{Path(record.image_path).stem}.mat next to the images folder."
            )
        height, width = data.image_size(record.image_path)
        raw = data.read_points(record.points_path)
        points, report = data.clean_points(raw, (height, width), policy)
        nn = mean_knn_distance(points, k)
        mean_nn = float(np.nanmean(nn)) if len(points) > 1 else float("nan")
        rows.append(
            ImageStats(
                name=record.name,
                part=part or guess_part,
                split=split or guess_split,
                height=int(height),
                width=int(width),
                count=len(points),
                grayscale=is_grayscale_file(record.image_path),
                mean_nn=mean_nn,
                n_raw=report.n_raw,
                n_kept=report.n_kept,
                non_finite=report.non_finite,
                outside=report.outside,
                duplicates=report.duplicates,
            )
        )
    return rows


def group_key(row: ImageStats) -> str:
    """The table key of a row: ``"A/train"``."""
    return f"{row.part}/{row.split}"


def _groups(stats: Iterable[ImageStats]) -> dict[str, list[ImageStats]]:
    groups: dict[str, list[ImageStats]] = {}
    for row in stats:
        groups.setdefault(group_key(row), []).append(row)
    return groups


def summarize_counts(stats: Iterable[ImageStats]) -> dict[str, dict[str, float]]:
    """Count statistics per ``"part/split"`` (in order of first appearance).

    Each value is ``{"n": images, "total": heads, "min", "median", "mean", "max": heads per
    image}``; ``n`` and ``total`` are ints.
    """
    out = {}
    for key, rows in _groups(stats).items():
        counts = np.array([r.count for r in rows], dtype=np.int64)
        out[key] = {
            "n": len(counts),
            "total": int(counts.sum()),
            "min": float(counts.min()),
            "median": float(np.median(counts)),
            "mean": float(counts.mean()),
            "max": float(counts.max()),
        }
    return out


def report_totals(stats: Iterable[ImageStats]) -> dict[str, dict[str, int]]:
    """Sums of the point-report fields (:data:`REPORT_FIELDS`) per ``"part/split"``."""
    return {
        key: {f: int(sum(getattr(r, f) for r in rows)) for f in REPORT_FIELDS}
        for key, rows in _groups(stats).items()
    }


def size_counts(stats: Iterable[ImageStats]) -> dict[str, dict[tuple[int, int], int]]:
    """How many images have each ``(width, height)``, per part (``"A"``, ``"B"``)."""
    out: dict[str, dict[tuple[int, int], int]] = {}
    for row in stats:
        sizes = out.setdefault(row.part, {})
        sizes[(row.width, row.height)] = sizes.get((row.width, row.height), 0) + 1
    return out



# --------------------------------------------------------------------------- perspective


@dataclass(frozen=True)
class RowProfile:
    """Mean nearest-neighbour distance as a function of normalised image row ``y / H``.

    Arrays have one entry per bin (``edges`` one more). The line ``intercept + slope * (y/H)`` is
    a least-squares fit to every head (not to the bin means), in pixels.
    """

    edges: np.ndarray  # (bins + 1,) in [0, 1]
    centers: np.ndarray  # (bins,)
    mean: np.ndarray  # (bins,) pixels; NaN for an empty bin
    std: np.ndarray  # (bins,) pixels
    n: np.ndarray  # (bins,) heads per bin
    slope: float  # pixels per unit of y/H (bottom minus top of the image)
    intercept: float  # pixels at the top row
    n_points: int
    k: int

    def line(self, rel_row: np.ndarray | float) -> np.ndarray:
        """The fitted distance (pixels) at ``rel_row = y / H``."""
        return self.intercept + self.slope * np.asarray(rel_row, dtype=np.float64)


def nn_distances_and_rows(
    records: Sequence[data.ImageRecord], k: int = DEFAULT_K, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For every head of every record: its ``k``-NN mean distance (px) and its row ``y / H``.

    Returns two ``(total_heads,)`` float64 arrays; images with fewer than two heads contribute
    nothing (their distance is undefined).
    """
    from tqdm.auto import tqdm

    dists, rows = [], []
    for record in tqdm(records, desc="k-NN distances", unit="img", disable=not progress):
        if record.points_path is None:
            continue
        height, width = data.image_size(record.image_path)
        points, _ = data.clean_points(data.read_points(record.points_path), (height, width))
        if len(points) < 2:
            continue
        dists.append(mean_knn_distance(points, k))
        rows.append(points[:, 1] / height)
    if not dists:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(dists), np.concatenate(rows)


def profile_by_row(dist: np.ndarray, rel_row: np.ndarray, bins: int = 10, k: int = DEFAULT_K) -> RowProfile:
    """Bin ``dist`` (px) by ``rel_row`` (``y / H`` in [0, 1)) and fit a least-squares line."""
    dist = np.asarray(dist, dtype=np.float64).ravel()
    rel_row = np.asarray(rel_row, dtype=np.float64).ravel()
    if dist.shape != rel_row.shape:
        raise ValueError(f"dist and rel_row differ in length: {dist.shape} vs {rel_row.shape}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip((rel_row * bins).astype(np.int64), 0, bins - 1)
    n = np.bincount(idx, minlength=bins)
    sums = np.bincount(idx, weights=dist, minlength=bins)
    sq = np.bincount(idx, weights=dist**2, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / n
        std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    if len(dist) >= 2 and np.ptp(rel_row) > 0:
        slope, intercept = np.polyfit(rel_row, dist, 1)
    else:
        slope, intercept = float("nan"), float(np.mean(dist)) if len(dist) else float("nan")
    return RowProfile(
        edges=edges,
        centers=(edges[:-1] + edges[1:]) / 2,
        mean=mean,
        std=std,
        n=n,
        slope=float(slope),
        intercept=float(intercept),
        n_points=len(dist),
        k=k,
    )


def nn_distance_by_row(
    records: Sequence[data.ImageRecord], bins: int = 10, k: int = DEFAULT_K, progress: bool = False
) -> RowProfile:
    """The perspective profile of a set of images: :func:`profile_by_row` over all their heads."""
    dist, rel_row = nn_distances_and_rows(records, k, progress)
    return profile_by_row(dist, rel_row, bins, k)
