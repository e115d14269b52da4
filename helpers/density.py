"""Density-map ground truth: every head becomes a small 2-D Gaussian of unit mass.

A network predicts a density map ``D`` (``(H, W)`` float32) whose sum over any region is the number
of people in it: ``D(p) = sum_i G_sigma_i(p - h_i)`` with ``sum_p G = 1``, so ``D.sum() == N``.

* A head at ``(x, y)`` sits in pixel ``(int(y), int(x))``; its kernel is centred on that pixel, as
  in the original MCNN/CSRNet code. Points outside the image are ignored (clean them first with
  :func:`helpers.data.clean_points`, which reports them); duplicates are kept.
* The kernel is exactly that of ``scipy.ndimage.gaussian_filter``: radius ``int(truncate*sigma+0.5)``.
* A kernel that sticks out of the image is renormalised over the part inside, so every head adds
  exactly 1 (the original code loses up to 75 % of a head in a corner).
* Sigma is ``fixed`` or ``adaptive``: ``beta`` times the mean distance to the ``k`` nearest heads.

The original (slow) recipe is :func:`helpers.analysis.ground_truth.reference_density_map`; the
HDF5 cache of maps is :mod:`helpers.tools.cache` (``crowd density build``); see docs/data.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from helpers import data
from helpers.data import as_points

METHODS = ("adaptive", "fixed")


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class DensityParams:
    """How sigma is chosen for each head, and how far kernels reach.

    ``method``     ``"adaptive"`` (``sigma_i = beta * mean distance to k nearest other heads``) or
                   ``"fixed"`` (``sigma`` for every head).
    ``sigma``      fixed sigma in pixels; for ``adaptive`` the sigma of a lone head and of a head
                   whose k neighbours all coincide with it.
    ``beta``, ``k``  the adaptive rule's factor and neighbour count (MCNN/CSRNet: 0.3 and 3).
    ``truncate``   kernels end at radius ``int(truncate * sigma + 0.5)`` pixels (as scipy).
    ``min_sigma``, ``max_sigma``  optional clamps on every sigma, in pixels (None: no clamp).

    The defaults are the MCNN/CSRNet adaptive kernels; for Part B the CSRNet scripts used
    ``DensityParams("fixed", sigma=15.0)``.
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
        for name in ("sigma", "beta", "truncate"):
            _check_positive(name, getattr(self, name))
        _check_positive("min_sigma", self.min_sigma, allow_none=True)
        _check_positive("max_sigma", self.max_sigma, allow_none=True)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {self.k!r}")
        if None not in (self.min_sigma, self.max_sigma) and self.min_sigma > self.max_sigma:
            raise ValueError(f"min_sigma ({self.min_sigma}) must not exceed max_sigma ({self.max_sigma})")


def _as_shape(shape) -> tuple[int, int]:
    try:
        height, width = int(shape[0]), int(shape[1])
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"shape must be positive (H, W), got {shape!r}")
    return height, width


def inside_image(points, shape) -> np.ndarray:
    """Which points lie in the image: finite, ``0 <= x < W`` and ``0 <= y < H``.

    Inputs:
    - points: float array (N, 2) of (x, y) pixels
    - shape: (H, W) or (H, W, 3)
    Returns:
    - inside: bool array (N,)
    """
    pts = as_points(points)
    height, width = _as_shape(shape)
    with np.errstate(invalid="ignore"):
        return (pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height)


def knn_distances(points, k: int = 3) -> np.ndarray:
    """Distances from each head to its nearest *other* heads, nearest first.

    Inputs:
    - points: float array (N, 2) of (x, y) pixels (repeated points are at distance 0)
    - k: int, neighbours wanted
    Returns:
    - distances: float64 array (N, min(k, N - 1)) in pixels (no columns when N <= 1)
    """
    pts = as_points(points)
    n = len(pts)
    k_eff = min(int(k), n - 1)
    if n == 0 or k_eff <= 0:
        return np.zeros((n, 0), dtype=np.float64)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(pts).query(pts, k=k_eff + 1)
    # Column 0 is the point itself (or a repeat of it: also 0, so equivalent).
    return np.asarray(dist, dtype=np.float64).reshape(n, k_eff + 1)[:, 1:]


def adaptive_sigmas(points, k: int = 3, beta: float = 0.3, fallback_sigma: float = 4.0,
                    min_sigma: float | None = None, max_sigma: float | None = None) -> np.ndarray:
    """Geometry-adaptive sigmas (MCNN/CSRNet): ``beta * mean distance to the k nearest others``.

    With N <= k heads the N - 1 others are averaged; a lone head, or one whose neighbours all
    sit exactly on it, gets ``fallback_sigma``, so every sigma is positive and finite.

    Inputs:
    - points: float array (N, 2) of finite (x, y) pixels
    - k: int; beta: float; fallback_sigma: float, pixels
    - min_sigma, max_sigma: float or None, clamps applied last (pixels)
    Returns:
    - sigmas: float64 array (N,) in pixels
    """
    pts = as_points(points)
    _check_positive("fallback_sigma", fallback_sigma)
    _check_positive("beta", beta)
    if not np.isfinite(pts).all():
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
    """The sigma of each head under ``params`` (fixed or adaptive).

    Inputs:
    - points: float array (N, 2) of (x, y) pixels
    - params: DensityParams
    Returns:
    - sigmas: float64 array (N,) in pixels
    """
    pts = as_points(points)
    if params.method == "fixed":
        return _clamp(np.full(len(pts), float(params.sigma)), params.min_sigma, params.max_sigma)
    return adaptive_sigmas(pts, params.k, params.beta, params.sigma, params.min_sigma, params.max_sigma)


def kernel_radius(sigma: float, truncate: float = 4.0) -> int:
    """Kernel radius exactly as scipy.ndimage: ``int(truncate * sigma + 0.5)``.

    Inputs:
    - sigma: float, pixels; truncate: float, radius in sigmas
    Returns:
    - radius: int, pixels
    """
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The discrete 1-D kernel of ``scipy.ndimage.gaussian_filter``: ``exp(-x^2 / 2 sigma^2)``
    at integer ``x`` in ``[-r, r]``, divided by its sum.

    Inputs:
    - sigma: float, pixels; truncate: float, radius in sigmas
    Returns:
    - kernel: float64 array (2r + 1,) summing to 1
    """
    _check_positive("sigma", sigma)
    radius = kernel_radius(sigma, truncate)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    return phi / phi.sum()


def density_from_sigmas(points, sigmas, shape, truncate: float = 4.0,
                        renormalize: bool = True) -> np.ndarray:
    """Place one unit-mass Gaussian per head with the given sigmas (points outside are ignored).

    How: heads are grouped by kernel radius; a group's 1-D kernels are one ``(n, 2r+1)`` array,
    and each head's clipped outer product is added into its slice of a float64 map.

    Inputs:
    - points: float array (N, 2) of (x, y) pixels
    - sigmas: float array (N,), pixels, positive
    - shape: (H, W) or (H, W, 3)
    - truncate: float, kernel radius in sigmas
    - renormalize: bool, False reproduces the original border handling (mass outside is lost)
    Returns:
    - density: float32 array (H, W), sum = number of in-image heads (renormalize=True)
    """
    pts = as_points(points)
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
    rows, cols = pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)
    radii = (float(truncate) * sig + 0.5).astype(np.int64)
    for radius in np.unique(radii).tolist():
        group = radii == radius
        _add_kernels(out, rows[group], cols[group], sig[group], radius, renormalize)
    return out.astype(np.float32)


def _add_kernels(out: np.ndarray, rows, cols, sig, radius: int, renormalize: bool) -> None:
    """Add the kernels of heads that share one radius into ``out`` (H, W) float64, in place."""
    height, width = out.shape
    size = 2 * radius + 1
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kern = np.exp((-0.5 / (sig * sig))[:, None] * (x * x)[None, :])  # (n, size), as scipy
    kern /= kern.sum(axis=1, keepdims=True)
    top, left = rows - radius, cols - radius
    ya, yb = np.maximum(0, -top), np.minimum(size, height - top)  # kernel rows inside the image
    xa, xb = np.maximum(0, -left), np.minimum(size, width - left)
    kern_y = kern
    if renormalize:  # the mass inside is the product of the two 1-D inside sums (separable)
        csum = np.zeros((len(sig), size + 1))
        np.cumsum(kern, axis=1, out=csum[:, 1:])
        n = np.arange(len(sig))
        kern_y = kern / ((csum[n, yb] - csum[n, ya]) * (csum[n, xb] - csum[n, xa]))[:, None]
    for i in range(len(sig)):
        a, b, c, d = int(ya[i]), int(yb[i]), int(xa[i]), int(xb[i])
        r0, c0 = int(top[i]) + a, int(left[i]) + c
        out[r0 : r0 + b - a, c0 : c0 + d - c] += np.multiply.outer(kern_y[i, a:b], kern[i, c:d])


def density_map(points, shape, params: DensityParams = DensityParams(), *,
                renormalize: bool = True) -> np.ndarray:
    """The ground-truth density map of an image's head points.

    Points outside the image are ignored; adaptive sigmas are measured among in-image heads.

    Inputs:
    - points: float array (N, 2) of (x, y) pixels
    - shape: (H, W) or an image's (H, W, 3)
    - params: DensityParams (sigma rule, truncation)
    - renormalize: bool, False gives the original border handling (for comparisons)
    Returns:
    - density: float32 array (H, W), people per pixel; sums to the number of in-image heads
      (float32 rounding: about 1e-7 relative)
    """
    pts = as_points(points)
    height, width = _as_shape(shape)
    pts = pts[inside_image(pts, (height, width))]
    sigmas = head_sigmas(pts, params)
    return density_from_sigmas(pts, sigmas, (height, width), params.truncate, renormalize)


def downsample_density(density, factor: int) -> np.ndarray:
    """Sum-pool a density map by ``factor``: the target of a network with that output stride.

    The bottom / right edge is padded with zeros to a multiple of ``factor``, so every pixel
    lands in exactly one block and the count is kept (sums in float64). The original CSRNet
    code resizes with bicubic interpolation times ``factor**2`` instead, which only approximates
    the count (see helpers.analysis.ground_truth.resize_density_cv2).

    Inputs:
    - density: float array (H, W)
    - factor: int >= 1
    Returns:
    - pooled: float32 array (ceil(H / factor), ceil(W / factor)), same sum
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


def record_points(record) -> tuple[np.ndarray, tuple[int, int], int]:
    """A record's cleaned points and image size, reading only the image header.

    Inputs:
    - record: helpers.data.ImageRecord with an annotation
    Returns:
    - points: float64 array (N, 2) of (x, y) pixels after the point policy
    - shape: (H, W) ints
    - n_raw: int, points in the annotation file
    """
    if record.points_path is None:
        raise data.missing_annotation(record.image_path, " (a density map needs head points)")
    height, width = data.image_size(record.image_path)
    points, report = data.clean_points(data.read_points(record.points_path), (height, width))
    return points, (height, width), report.n_raw


def compute_density(record, params: DensityParams = DensityParams()) -> np.ndarray:
    """A record's density map, computed now (no cache): the default density_fn of samples.

    Inputs:
    - record: helpers.data.ImageRecord with an annotation
    - params: DensityParams
    Returns:
    - density: float32 array (H, W) at full resolution, sum = the record's count
    """
    points, shape, _ = record_points(record)
    return density_map(points, shape, params)
