"""Density-map ground truth: every head becomes a small 2-D Gaussian of unit mass.

A crowd-counting network does not predict points; it predicts a *density map* ``D`` (``H x W``
float32) whose sum over any region is the number of people in it. The ground truth is made from the
head annotations:

.. math::

    D(p) = \\sum_{i=1}^{N} G_{\\sigma_i}(p - h_i), \\qquad \\sum_p G_{\\sigma_i}(p - h_i) = 1,

so ``D.sum() == N`` (the count) exactly, up to float32 rounding.

Conventions
-----------
* **Where a head sits.** A head at ``(x, y)`` is placed in pixel ``(row, col) = (int(y), int(x))``
  and its kernel is centred on that pixel's centre, as in the original MCNN/CSRNet code (which
  writes a 1 into that pixel of an empty image and blurs it).
* **Which heads count.** Only points inside the image (``0 <= x < W``, ``0 <= y < H``, finite) are
  used; others are silently ignored here. Callers are expected to clean the points first with
  :func:`helpers.data.clean_points`, which drops them *and reports* how many it dropped.
  Duplicated points are kept: each is a head of the published count.
* **The kernel.** Exactly the discrete kernel of ``scipy.ndimage.gaussian_filter``: the 1-D weights
  ``exp(-x^2 / (2 sigma^2))`` for integer ``x`` in ``[-r, r]``, divided by their sum, with radius
  ``r = int(truncate * sigma + 0.5)`` (``truncate * sigma`` rounded half up; 16 px for
  ``sigma = 4``). The 2-D kernel is the outer product of two such 1-D kernels.
* **Borders.** A kernel that sticks out of the image is *renormalised over the part inside*, so a
  head next to the border still adds exactly 1. The original code filters with
  ``mode='constant'`` and loses the outside part: up to 75 % of a head in a corner. Because the
  kernel is separable, the inside mass is the product of the two 1-D inside sums.
* **Sigma.** ``fixed``: the same ``sigma`` for every head. ``adaptive`` (geometry-adaptive kernels
  of MCNN, Zhang et al. 2016, used by CSRNet): ``sigma_i = beta * mean distance from head i to its
  k nearest other heads`` (see :func:`adaptive_sigmas` for 0-3 heads and repeated points).

Speed: instead of one full-image ``gaussian_filter`` per head (the original method, kept here as
:func:`reference_density_map` for comparisons), each truncated kernel is computed as two 1-D
vectors and added into a slice of the map around its head. Part A (482 images, 241k heads) takes a
few seconds instead of hours; values agree with the original to float32 rounding away from the
borders.

Cache: maps are stored as one HDF5 file per image under
``cache_root()/density/<dataset id>/<params key>/``, never inside the dataset (which may be
read-only). See :func:`load_density` and :func:`build_cache`.

Command line::

    python -m helpers.density build [--part A|B] [--split train|test|all] [--method adaptive|fixed]
                                    [--sigma S] [--beta B] [--k K] [--root ROOT] [--workers N]

builds (or brings up to date) the cache for both parts and splits by default and prints a JSON
summary: images built, rebuilt because stale, skipped because fresh, heads, seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from helpers import config
from helpers.errors import AnnotationError, CacheError, CrowdError, ImageReadError, one_line

METHODS = ("adaptive", "fixed")
#: Bump when the way maps are computed or stored changes: older cache files are then rebuilt.
FORMAT_VERSION = 1
#: HDF5 storage of cached maps: lzf with byte shuffling, in chunks of 64 full rows. Measured on
#: ShanghaiTech maps: files are about 0.6 of the raw float32 size (gzip level 1: 0.56, plain lzf:
#: 0.75), writing costs about 20 ms and reading about 5 ms per map (uncompressed: 1 ms), which
#: saves over 1 GB for the two parts at a read cost far below decoding the JPEG.
COMPRESSION = {"compression": "lzf", "shuffle": True}
CHUNK_ROWS = 64


# --------------------------------------------------------------------------- parameters


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _num(value: float) -> str:
    """A float written exactly and stably for file names (``repr``: 0.3 -> '0.3')."""
    return repr(float(value))


@dataclass(frozen=True)
class DensityParams:
    """How sigma is chosen for each head, and how far kernels reach.

    ``method``     ``"adaptive"`` (``sigma_i = beta * mean distance to k nearest other heads``) or
                   ``"fixed"`` (``sigma`` for every head).
    ``sigma``      fixed sigma in pixels; for ``adaptive`` the sigma of a lone head (nothing to
                   measure a distance to) and of a head whose k neighbours all coincide with it.
    ``beta``, ``k``  the adaptive rule's factor and neighbour count (MCNN/CSRNet: 0.3 and 3).
    ``truncate``   kernels end at radius ``int(truncate * sigma + 0.5)`` pixels (as scipy).
    ``min_sigma``, ``max_sigma``  optional clamps on every sigma, in pixels (None: no clamp).

    The defaults are the MCNN/CSRNet adaptive kernels. For the sparser Part B, the CSRNet scripts
    used a fixed kernel instead: ``DensityParams("fixed", sigma=15.0)``.
    """

    method: str = "adaptive"
    sigma: float = 4.0
    beta: float = 0.3
    k: int = 3
    truncate: float = 4.0
    min_sigma: float | None = None
    max_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        _check_positive("sigma", self.sigma)
        _check_positive("beta", self.beta)
        _check_positive("truncate", self.truncate)
        _check_positive("min_sigma", self.min_sigma, allow_none=True)
        _check_positive("max_sigma", self.max_sigma, allow_none=True)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {self.k!r}")
        if (
            self.min_sigma is not None
            and self.max_sigma is not None
            and float(self.min_sigma) > float(self.max_sigma)
        ):
            raise ValueError(
                f"min_sigma ({self.min_sigma}) must not exceed max_sigma ({self.max_sigma})"
            )

    def to_attrs(self) -> dict[str, str | float | int]:
        """The parameters as HDF5-storable scalars; an unset clamp is stored as ``"none"``."""
        attrs: dict[str, str | float | int] = {}
        for name, value in asdict(self).items():
            if value is None:
                attrs[name] = "none"
            elif name == "method":
                attrs[name] = str(value)
            elif name == "k":
                attrs[name] = int(value)
            else:
                attrs[name] = float(value)
        return attrs

    @classmethod
    def from_attrs(cls, attrs) -> DensityParams:
        """Inverse of :meth:`to_attrs` (extra keys are ignored)."""
        values = {}
        for name in ("method", "sigma", "beta", "k", "truncate", "min_sigma", "max_sigma"):
            value = attrs[name]
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value == "none":
                value = None
            elif name == "method":
                value = str(value)
            elif name == "k":
                value = int(value)
            else:
                value = float(value)
            values[name] = value
        return cls(**values)

    def key(self) -> str:
        """A stable, readable name for these parameters (cache folder names).

        Only what changes the maps is included: ``beta`` and ``k`` do not matter for ``fixed``.
        Numbers are written exactly (``repr``), so different parameters never share a key.
        """
        if self.method == "fixed":
            parts = ["fixed", f"s{_num(self.sigma)}"]
        else:
            parts = ["adaptive", f"k{int(self.k)}", f"b{_num(self.beta)}", f"s{_num(self.sigma)}"]
        parts.append(f"t{_num(self.truncate)}")
        if self.min_sigma is not None:
            parts.append(f"min{_num(self.min_sigma)}")
        if self.max_sigma is not None:
            parts.append(f"max{_num(self.max_sigma)}")
        return "_".join(parts)

    def sigmas(self, points: np.ndarray) -> np.ndarray:
        """Sigma of each head of ``(N, 2)`` points under these parameters: ``(N,)`` float64 px."""
        return head_sigmas(points, self)


# --------------------------------------------------------------------------- geometry


def _as_points(points) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) of (x, y), got {pts.shape}")
    return pts


def _as_shape(shape) -> tuple[int, int]:
    try:
        height, width = int(shape[0]), int(shape[1])
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"shape must be positive (H, W), got {shape!r}")
    return height, width


def inside_image(points, shape) -> np.ndarray:
    """Boolean ``(N,)``: which ``(x, y)`` points lie in an image of ``shape`` ``(H, W, ...)``.

    Inside means finite and ``0 <= x < W``, ``0 <= y < H`` (the rule of
    :func:`helpers.data.clean_points`).
    """
    pts = _as_points(points)
    height, width = _as_shape(shape)
    with np.errstate(invalid="ignore"):
        return (pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height)


def head_pixels(points) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` int64 ``(N,)``: the pixel of each in-image head, ``(int(y), int(x))``."""
    pts = _as_points(points)
    return pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)


def knn_distances(points, k: int = 3) -> np.ndarray:
    """Distances (px) from each head to its ``min(k, N-1)`` nearest *other* heads: ``(N, k')``.

    Sorted nearest first; ``k' = min(k, N - 1)`` columns (0 columns for N <= 1). Repeated points
    are at distance 0 from each other.
    """
    pts = _as_points(points)
    n = len(pts)
    k_eff = min(int(k), n - 1)
    if n == 0 or k_eff <= 0:
        return np.zeros((n, 0), dtype=np.float64)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(pts).query(pts, k=k_eff + 1)
    # Column 0 is a zero: the point itself, or a repeat of it, which is equivalent since both
    # are at distance 0 and the columns are sorted.
    return np.asarray(dist, dtype=np.float64).reshape(n, k_eff + 1)[:, 1:]


def adaptive_sigmas(
    points,
    k: int = 3,
    beta: float = 0.3,
    fallback_sigma: float = 4.0,
    min_sigma: float | None = None,
    max_sigma: float | None = None,
) -> np.ndarray:
    """Geometry-adaptive sigmas ``(N,)`` float64 (px): ``beta * mean distance to k nearest others``.

    The MCNN/CSRNet rule (k = 3, beta = 0.3). Small images:

    * 0 heads: an empty array; 1 head: ``fallback_sigma`` (there is no distance to measure);
    * 2 or 3 heads (N <= k): the ``N - 1`` neighbours that exist are averaged.

    Repeated points: a head whose k nearest other heads all sit *exactly* on it (a mean distance
    of 0, e.g. the same head clicked k+1 times) gets ``fallback_sigma``, like a lone head, so every
    sigma is positive and finite. A head with only some of its neighbours on it keeps the usual
    rule (the mean is then positive, just smaller). ``min_sigma`` / ``max_sigma`` finally clamp
    all sigmas.
    """
    pts = _as_points(points)
    _check_positive("fallback_sigma", fallback_sigma)
    _check_positive("beta", beta)
    if len(pts) and not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates; clean them first")
    dists = knn_distances(pts, k)
    if dists.shape[1] == 0:
        sigmas = np.full(len(pts), float(fallback_sigma))
    else:
        sigmas = float(beta) * dists.mean(axis=1)
        sigmas[~(sigmas > 0)] = float(fallback_sigma)
    return _clamp(sigmas, min_sigma, max_sigma)


def _clamp(sigmas: np.ndarray, min_sigma: float | None, max_sigma: float | None) -> np.ndarray:
    if min_sigma is not None:
        sigmas = np.maximum(sigmas, float(min_sigma))
    if max_sigma is not None:
        sigmas = np.minimum(sigmas, float(max_sigma))
    return sigmas


def head_sigmas(points, params: DensityParams = DensityParams()) -> np.ndarray:
    """Sigma of each head ``(N,)`` float64 px, by ``params.method`` (fixed or adaptive)."""
    pts = _as_points(points)
    if params.method == "fixed":
        sigmas = np.full(len(pts), float(params.sigma))
        return _clamp(sigmas, params.min_sigma, params.max_sigma)
    return adaptive_sigmas(
        pts, params.k, params.beta, params.sigma, params.min_sigma, params.max_sigma
    )


def local_geometry(points, params: DensityParams = DensityParams()) -> dict[str, np.ndarray]:
    """Per-head numbers for studying sigma against crowd density; every array is ``(N,)``.

    ``mean_knn_px``: mean distance to the ``k`` nearest other heads (NaN for a lone head);
    ``local_density``: heads per 100 x 100 pixels, estimated as ``k / (pi d_k^2)`` with ``d_k`` the
    distance to the k-th neighbour (NaN when undefined); ``sigma``: the sigma ``params`` gives.
    """
    pts = _as_points(points)
    dists = knn_distances(pts, params.k)
    n = len(pts)
    if dists.shape[1] == 0:
        mean_knn = np.full(n, np.nan)
        density = np.full(n, np.nan)
    else:
        mean_knn = dists.mean(axis=1)
        d_k = dists[:, -1]
        with np.errstate(divide="ignore"):
            density = np.where(d_k > 0, dists.shape[1] / (np.pi * d_k**2) * 1e4, np.nan)
    return {"mean_knn_px": mean_knn, "local_density": density, "sigma": head_sigmas(pts, params)}


# --------------------------------------------------------------------------- kernels and maps


def kernel_radius(sigma: float, truncate: float = 4.0) -> int:
    """Kernel radius in pixels: ``int(truncate * sigma + 0.5)``, exactly as scipy.ndimage."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The discrete 1-D kernel ``(2r+1,)`` float64 of ``scipy.ndimage.gaussian_filter``; sums to 1."""
    _check_positive("sigma", sigma)
    radius = kernel_radius(sigma, truncate)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    return phi / phi.sum()


def density_from_sigmas(
    points, sigmas, shape, truncate: float = 4.0, renormalize: bool = True
) -> np.ndarray:
    """Place one unit-mass Gaussian per head with the given sigmas: ``H x W`` float32.

    ``points`` ``(N, 2)`` (x, y) px and ``sigmas`` ``(N,)`` px; points outside the image are
    ignored. ``renormalize=False`` reproduces the original border handling (the part of a kernel
    outside the image is lost) for comparisons.

    How: heads are grouped by kernel radius; within a group the 1-D kernels of all heads are
    computed at once (one ``(n, 2r+1)`` array), their in-image sums come from cumulative sums,
    and each head's clipped outer product is added into its slice of a float64 map.
    """
    pts = _as_points(points)
    height, width = _as_shape(shape)
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if len(sig) != len(pts):
        raise ValueError(f"got {len(pts)} points but {len(sig)} sigmas")
    keep = inside_image(pts, (height, width))
    pts, sig = pts[keep], sig[keep]
    if len(sig) and not (np.isfinite(sig).all() and (sig > 0).all()):
        raise ValueError("every sigma must be positive and finite")
    _check_positive("truncate", truncate)
    out = np.zeros((height, width), dtype=np.float64)
    if len(pts) == 0:
        return out.astype(np.float32)
    rows, cols = head_pixels(pts)
    radii = (float(truncate) * sig + 0.5).astype(np.int64)
    order = np.argsort(radii, kind="stable")
    sorted_radii = radii[order]
    cuts = np.flatnonzero(np.diff(sorted_radii)) + 1
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True):
        radius = int(sorted_radii[start])
        idx = order[start:stop]
        size = 2 * radius + 1
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        s = sig[idx]
        kern = np.exp((-0.5 / (s * s))[:, None] * (x * x)[None, :])  # (n, size), as scipy
        kern /= kern.sum(axis=1, keepdims=True)
        top, left = rows[idx] - radius, cols[idx] - radius
        ya, yb = np.maximum(0, -top), np.minimum(size, height - top)  # kernel rows inside
        xa, xb = np.maximum(0, -left), np.minimum(size, width - left)
        if renormalize:
            csum = np.zeros((len(idx), size + 1))
            np.cumsum(kern, axis=1, out=csum[:, 1:])
            n = np.arange(len(idx))
            inside_mass = (csum[n, yb] - csum[n, ya]) * (csum[n, xb] - csum[n, xa])
            kern_y = kern / inside_mass[:, None]
        else:
            kern_y = kern
        for i, a, b, c, d, r0, c0 in zip(
            range(len(idx)),
            ya.tolist(),
            yb.tolist(),
            xa.tolist(),
            xb.tolist(),
            (top + ya).tolist(),
            (left + xa).tolist(),
            strict=True,
        ):
            out[r0 : r0 + b - a, c0 : c0 + d - c] += np.multiply.outer(kern_y[i, a:b], kern[i, c:d])
    return out.astype(np.float32)


def density_map(
    points, shape, params: DensityParams = DensityParams(), *, renormalize: bool = True
) -> np.ndarray:
    """The ground-truth density map ``H x W`` float32 of ``(N, 2)`` (x, y) head points.

    ``shape`` is ``(H, W)`` (or an image's ``(H, W, 3)``). Points outside the image are ignored
    (clean them first with :func:`helpers.data.clean_points`, which reports them); adaptive
    sigmas are measured among the in-image heads. The map sums to the number of in-image heads
    (float32 rounding: about 1e-7 relative). ``renormalize=False``: the original border handling.
    """
    pts = _as_points(points)
    height, width = _as_shape(shape)
    pts = pts[inside_image(pts, (height, width))]
    sigmas = head_sigmas(pts, params)
    return density_from_sigmas(pts, sigmas, (height, width), params.truncate, renormalize)


def reference_density_map(points, sigmas, shape, truncate: float = 4.0) -> np.ndarray:
    """The original (slow) method: one full-image ``gaussian_filter`` per head, ``H x W`` float32.

    As in the MCNN/CSRNet scripts: a float32 image with a single 1 at ``(int(y), int(x))`` is
    blurred with ``mode='constant'`` and the results are summed in float32; mass outside the
    image is lost. (The original built the delta image from a 0/1 map, so repeated points
    counted once; here each point is its own head.) Cost: O(H * W * r) per head.
    """
    from scipy.ndimage import gaussian_filter

    pts = _as_points(points)
    height, width = _as_shape(shape)
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    keep = inside_image(pts, (height, width))
    pts, sig = pts[keep], sig[keep]
    out = np.zeros((height, width), dtype=np.float32)
    delta = np.zeros((height, width), dtype=np.float32)
    rows, cols = head_pixels(pts)
    for r, c, s in zip(rows.tolist(), cols.tolist(), sig.tolist(), strict=True):
        delta[r, c] = 1.0
        out += gaussian_filter(delta, s, mode="constant", truncate=truncate)
        delta[r, c] = 0.0
    return out


def truncated_support(points, sigmas, shape, truncate: float = 4.0) -> np.ndarray:
    """``H x W`` bool: pixels reached by a kernel that sticks out of the image.

    Outside this mask the renormalised map equals the original method's map; inside it, ours is
    larger (it keeps the mass the original loses).
    """
    pts = _as_points(points)
    height, width = _as_shape(shape)
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    keep = inside_image(pts, (height, width))
    pts, sig = pts[keep], sig[keep]
    mask = np.zeros((height, width), dtype=bool)
    rows, cols = head_pixels(pts)
    radii = (float(truncate) * sig + 0.5).astype(np.int64)
    cut = (
        (rows - radii < 0) | (cols - radii < 0) | (rows + radii >= height) | (cols + radii >= width)
    )
    for r, c, rad in zip(rows[cut].tolist(), cols[cut].tolist(), radii[cut].tolist(), strict=True):
        mask[max(0, r - rad) : r + rad + 1, max(0, c - rad) : c + rad + 1] = True
    return mask


# --------------------------------------------------------------------------- downsampling


def downsample_density(density, factor: int) -> np.ndarray:
    """Sum-pool ``H x W`` by ``factor``: ``ceil(H/f) x ceil(W/f)`` float32, same total count.

    Each output pixel is the sum of an ``f x f`` block; the bottom/right edge is padded with zeros
    up to a multiple of ``f``, so every input pixel lands in exactly one block and the count is
    preserved (up to float32 rounding; the sums are taken in float64). This is what a network
    with output stride ``f`` (CSRNet: 8) should be trained against.

    The original CSRNet code uses ``cv2.resize(d, (W // 8, H // 8), interpolation=INTER_CUBIC)
    * 64`` instead (:func:`resize_density_cv2`). That only approximates the count: interpolation
    samples the map instead of summing it, so it is not mass-preserving (a peaked kernel between
    two sample points is mostly missed, one on a sample point is over-counted, and bicubic weights
    can even go negative), and when ``H`` or ``W`` is not a multiple of 8 the output covers the
    image with stretched pixels while the factor 64 assumes exact 8 x 8 blocks.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a whole number >= 1, got {factor!r}")
    d = np.asarray(density)
    if d.ndim != 2:
        raise ValueError(f"density must be H x W, got shape {d.shape}")
    f = int(factor)
    height, width = d.shape
    out_h, out_w = -(-height // f), -(-width // f)
    padded = np.zeros((out_h * f, out_w * f), dtype=np.float64)
    padded[:height, :width] = d
    return padded.reshape(out_h, f, out_w, f).sum(axis=(1, 3)).astype(np.float32)


def resize_density_cv2(density, factor: int = 8) -> np.ndarray:
    """The original CSRNet downsampling, for comparison: bicubic resize times ``factor**2``.

    ``cv2.resize(d, (W // f, H // f), interpolation=cv2.INTER_CUBIC) * f * f`` float32. Its sum
    is only approximately the count (see :func:`downsample_density`).
    """
    import cv2

    d = np.asarray(density, dtype=np.float32)
    f = int(factor)
    height, width = d.shape
    small = cv2.resize(d, (max(1, width // f), max(1, height // f)), interpolation=cv2.INTER_CUBIC)
    return (small * (f * f)).astype(np.float32)


# --------------------------------------------------------------------------- records


def _record_points(record) -> tuple[np.ndarray, tuple[int, int], int]:
    """Cleaned points, ``(H, W)`` and the raw point count of a record, without decoding the image."""
    from helpers import data

    if record.points_path is None:
        raise data.missing_annotation(record.image_path, " (a density map needs head points)")
    height, width = data.image_size(record.image_path)
    raw = data.read_points(record.points_path)
    points, report = data.clean_points(raw, (height, width))
    return points, (height, width), report.n_raw


def compute_density(record, params: DensityParams = DensityParams()) -> np.ndarray:
    """The density map ``H x W`` float32 of a record, computed now (no cache involved).

    Same as ``density_map(load_example(record).points, image.shape, params)`` but reads only the
    image header for its size.
    """
    points, shape, _ = _record_points(record)
    return density_map(points, shape, params)


def count_table(
    records: Sequence,
    params: DensityParams = DensityParams(),
    factor: int = 8,
    progress: bool = False,
) -> list[dict]:
    """Counts kept and lost, one dict per record, for a ground-truth sanity table.

    Keys: ``name``, ``height``, ``width``, ``n_raw`` (points in the file), ``n_points`` (in the
    image), ``sum`` (our map), ``sum_no_renorm`` (original border handling), ``sum_pooled`` (our
    map sum-pooled by ``factor``), ``sum_cv2`` (original ``cv2.resize * factor**2``). Sums are
    float64 totals of the float32 maps.
    """
    from tqdm.auto import tqdm

    rows = []
    for record in tqdm(records, desc="count table", unit="img", disable=not progress):
        points, shape, n_raw = _record_points(record)
        exact = density_map(points, shape, params)
        original = density_map(points, shape, params, renormalize=False)
        rows.append(
            {
                "name": record.name,
                "height": shape[0],
                "width": shape[1],
                "n_raw": n_raw,
                "n_points": len(points),
                "sum": float(exact.sum(dtype=np.float64)),
                "sum_no_renorm": float(original.sum(dtype=np.float64)),
                "sum_pooled": float(downsample_density(exact, factor).sum(dtype=np.float64)),
                "sum_cv2": float(resize_density_cv2(original, factor).sum(dtype=np.float64)),
            }
        )
    return rows


# --------------------------------------------------------------------------- cache


def dataset_root_of(record) -> Path:
    """The dataset folder a record belongs to.

    ShanghaiTech layout ``ROOT/part_X/<split>_data/images/IMG.jpg`` gives ``ROOT``; any other
    image (a folder of the user's own) gives its own folder.
    """
    image = Path(record.image_path).expanduser().resolve()
    parents = image.parents
    if (
        len(parents) >= 4
        and parents[0].name == "images"
        and parents[1].name.endswith("_data")
        and parents[2].name.lower().startswith("part_")
    ):
        return parents[3]
    return image.parent


def dataset_id(root: str | Path) -> str:
    """A short folder name for a dataset root: its name plus a hash of its full path."""
    root = Path(root).expanduser().resolve()
    digest = hashlib.sha1(str(root).encode("utf-8")).hexdigest()[:8]
    return f"{root.name or 'root'}-{digest}"


def cache_dir_for(
    params: DensityParams, root: str | Path, cache_dir: str | Path | None = None
) -> Path:
    """The folder holding the maps of one dataset under one set of parameters."""
    base = Path(cache_dir) if cache_dir is not None else config.cache_root() / "density"
    return base / dataset_id(root) / params.key()


def cache_path(
    record, params: DensityParams = DensityParams(), cache_dir: str | Path | None = None
) -> Path:
    """Where a record's map is cached: ``<cache>/density/<dataset id>/<params key>/<rel>.h5``.

    ``<rel>`` is the image's path inside the dataset with ``.h5`` appended
    (``part_A/train_data/images/IMG_1.jpg.h5``). ``cache_dir`` replaces
    ``helpers.config.cache_root() / "density"`` (set ``CROWD_CACHE`` to move the whole cache).
    """
    root = dataset_root_of(record)
    rel = Path(record.image_path).expanduser().resolve().relative_to(root)
    return cache_dir_for(params, root, cache_dir) / rel.parent / f"{rel.name}.h5"


def _source_attrs(record) -> dict[str, str | int]:
    """Paths, sizes and modification times of a record's files: a change means rebuild."""
    attrs: dict[str, str | int] = {}
    for prefix, path in (("annotation", record.points_path), ("image", record.image_path)):
        if path is None:
            from helpers.data import missing_annotation

            raise missing_annotation(record.image_path, " (a density map needs head points)")
        path = Path(path).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError as exc:
            error = ImageReadError if prefix == "image" else AnnotationError
            raise error(f"{path} cannot be read ({exc}). Check that the file exists.") from exc
        attrs[f"{prefix}_path"] = str(path)
        attrs[f"{prefix}_mtime_ns"] = int(stat.st_mtime_ns)
        attrs[f"{prefix}_bytes"] = int(stat.st_size)
    return attrs


def _expected_attrs(record, params: DensityParams) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {"format_version": FORMAT_VERSION, "params_key": params.key()}
    attrs.update(_source_attrs(record))
    return attrs


def _attr_equal(stored, wanted) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(wanted, str):
        return isinstance(stored, str) and stored == wanted
    try:
        return int(stored) == int(wanted)
    except (TypeError, ValueError):
        return False


def _read_cached(path: Path, expected: dict, load: bool) -> tuple[str, np.ndarray | None, int]:
    """``(status, map or None, n_points)`` with status ``missing``, ``stale`` or ``fresh``."""
    if not path.is_file():
        return "missing", None, 0
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            attrs = fh.attrs
            if any(
                name not in attrs or not _attr_equal(attrs[name], value)
                for name, value in expected.items()
            ):
                return "stale", None, 0
            dset = fh["density"]
            if dset.dtype != np.float32 or dset.shape != (
                int(attrs["height"]),
                int(attrs["width"]),
            ):
                return "stale", None, 0
            n_points = int(attrs["n_points"])
            if not load:
                return "fresh", None, n_points
            density = dset[()]
    except Exception:  # noqa: BLE001 - any unreadable file (truncated, garbage, wrong layout) is stale
        return "stale", None, 0
    return "fresh", density, n_points


def cache_status(
    record, params: DensityParams = DensityParams(), cache_dir: str | Path | None = None
) -> str:
    """``"fresh"``, ``"stale"`` (parameters, annotation or file damaged) or ``"missing"``."""
    status, _, _ = _read_cached(
        cache_path(record, params, cache_dir), _expected_attrs(record, params), False
    )
    return status


def _cache_error(path: Path, exc: BaseException) -> CacheError:
    return CacheError(
        f"Cannot write the density cache in {path.parent} ({one_line(exc)}). Make sure "
        "that folder is writable and the disk is not full, or set CROWD_CACHE to a writable "
        "folder (for example CROWD_CACHE=/tmp/crowd-cache)."
    )


def _write_cached(path: Path, density: np.ndarray, attrs: dict) -> None:
    """Write one cache file atomically; a failed write raises :class:`CacheError`.

    The HDF5 file is built in memory and written with plain file I/O: when HDF5 itself meets a
    full disk it keeps a file handle it cannot close, and Python crashes at exit (h5py issues
    #914, #2160). A failed write leaves the previous file at ``path`` as it was.
    """
    import io

    import h5py

    from helpers.tools.fileio import atomic_path

    try:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as fh:
            chunks = (min(CHUNK_ROWS, density.shape[0]), density.shape[1])
            fh.create_dataset(
                "density",
                data=density.astype(np.float32, copy=False),
                chunks=chunks,
                **COMPRESSION,
            )
            for name, value in attrs.items():
                fh.attrs[name] = value
        with atomic_path(path, suffix=".h5") as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except (OSError, RuntimeError) as exc:  # no permission, disk full (h5py: either type)...
        raise _cache_error(path, exc) from exc


def _build_one(record, params: DensityParams, path: Path, expected: dict) -> tuple[np.ndarray, int]:
    points, shape, n_raw = _record_points(record)
    density = density_map(points, shape, params)
    attrs = dict(expected)
    attrs.update(params.to_attrs())
    attrs.update(
        {"height": shape[0], "width": shape[1], "n_points": len(points), "n_raw_points": n_raw}
    )
    attrs["map_sum"] = float(density.sum(dtype=np.float64))
    _write_cached(path, density, attrs)
    return density, len(points)


def load_density(
    record,
    params: DensityParams = DensityParams(),
    build: bool = True,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """A record's density map ``H x W`` float32: from the cache if fresh, else built and cached.

    Fresh means: same format version and parameters, and the annotation and image files have
    the size and modification time recorded when the map was built. Stale or damaged files are
    rebuilt. ``build=False`` raises :class:`CacheError` instead of building.
    """
    path = cache_path(record, params, cache_dir)
    expected = _expected_attrs(record, params)
    status, density, _ = _read_cached(path, expected, True)
    if status == "fresh" and density is not None:
        return density
    if not build:
        raise CacheError(
            f"No up-to-date cached density map for {record.image_path} ({status} at {path}). "
            "Build the cache with: python -m helpers.density build"
        )
    density, _ = _build_one(record, params, path, expected)
    return density


def _cache_task(record, params: DensityParams, cache_dir) -> tuple[str, int]:
    """Bring one record's cache file up to date: ``(status before, n_points)``."""
    path = cache_path(record, params, cache_dir)
    expected = _expected_attrs(record, params)
    status, _, n_points = _read_cached(path, expected, False)
    if status == "fresh":
        return status, n_points
    _, n_points = _build_one(record, params, path, expected)
    return status, n_points


def build_cache(
    records: Sequence,
    params: DensityParams = DensityParams(),
    progress: bool = True,
    workers: int = 1,
    cache_dir: str | Path | None = None,
) -> dict:
    """Make sure every record has an up-to-date cached map; returns statistics.

    ``{"images", "built" (were missing), "rebuilt_stale", "skipped_fresh", "heads", "seconds",
    "params", "cache_dirs"}``. ``workers > 1`` builds in that many processes (one process is
    usually enough: Part A takes seconds).
    """
    from tqdm.auto import tqdm

    from helpers.tools.fileio import remove_stale_temp_files

    start = time.perf_counter()
    # Temporary files of a build that was killed mid-write: never read, but they pile up.
    for folder in sorted({cache_path(r, params, cache_dir).parent for r in records}):
        remove_stale_temp_files(folder)
    stats = {"images": len(records), "built": 0, "rebuilt_stale": 0, "skipped_fresh": 0, "heads": 0}
    label = {"missing": "built", "stale": "rebuilt_stale", "fresh": "skipped_fresh"}
    bar = tqdm(total=len(records), desc="density maps", unit="img", disable=not progress)
    try:
        if workers is None or int(workers) <= 1 or len(records) <= 1:
            results = (_cache_task(r, params, cache_dir) for r in records)
            for status, n_points in results:
                stats[label[status]] += 1
                stats["heads"] += n_points
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # safe with threads (torch, Jupyter)
            with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
                futures = [pool.submit(_cache_task, r, params, cache_dir) for r in records]
                for future in futures:
                    status, n_points = future.result()
                    stats[label[status]] += 1
                    stats["heads"] += n_points
                    bar.update(1)
    finally:
        bar.close()
    roots = sorted({str(cache_dir_for(params, dataset_root_of(r), cache_dir)) for r in records})
    stats.update(
        {
            "seconds": round(time.perf_counter() - start, 3),
            "params": params.key(),
            "cache_dirs": roots,
        }
    )
    return stats


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.density",
        description="Ground-truth density maps: build the HDF5 cache for ShanghaiTech.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build (or bring up to date) the density-map cache")
    p_build.add_argument("--part", choices=["A", "B"], help="dataset part (default: both)")
    p_build.add_argument("--split", choices=["train", "test", "all"], default="all")
    p_build.add_argument("--method", choices=list(METHODS), default="adaptive")
    p_build.add_argument(
        "--sigma", type=float, default=4.0, help="fixed sigma / lone-head sigma (px)"
    )
    p_build.add_argument("--beta", type=float, default=0.3, help="adaptive factor (default 0.3)")
    p_build.add_argument("--k", type=int, default=3, help="adaptive neighbour count (default 3)")
    p_build.add_argument("--truncate", type=float, default=4.0, help="kernel radius in sigmas")
    p_build.add_argument("--min-sigma", type=float, help="clamp every sigma from below (px)")
    p_build.add_argument("--max-sigma", type=float, help="clamp every sigma from above (px)")
    p_build.add_argument(
        "--root", help="dataset root (default: CROWD_DATA, data/ShanghaiTech or synthetic)"
    )
    p_build.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p_build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        from helpers import data

        try:
            params = DensityParams(
                args.method,
                args.sigma,
                args.beta,
                args.k,
                args.truncate,
                args.min_sigma,
                args.max_sigma,
            )
        except ValueError as exc:
            raise CrowdError(f"bad density parameters: {exc}") from exc
        source = data.resolve_data_source(args.root)
        parts = [args.part] if args.part else list(data.PARTS)
        splits = list(data.OFFICIAL_SPLITS) if args.split == "all" else [args.split]
        records = []
        for part in parts:
            for split in splits:
                records += data.list_records(part, split, root=source.root)
        stats = build_cache(records, params, progress=not args.no_progress, workers=args.workers)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats.update(
        {"root": str(source.root), "synthetic": source.synthetic, "parts": parts, "splits": splits}
    )
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
