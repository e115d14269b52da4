"""Notebook 02's comparisons of the ground truth with the original recipe, and per-head geometry.

* :func:`reference_density_map` -- the original MCNN/CSRNet recipe, one ``gaussian_filter`` per head;
* :func:`local_geometry` -- per head: mean distance to the k nearest, local density, sigma;
* :func:`truncated_support` -- the pixels where the renormalised map and the original differ;
* :func:`resize_density_cv2` -- the original CSRNet downsampling (bicubic resize x 64), which only
  approximates the count, against :func:`helpers.density.downsample_density`;
* :func:`count_table` -- counts kept and lost per image by each of those choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from helpers.data import as_points
from helpers.density import (
    DensityParams,
    density_map,
    downsample_density,
    head_sigmas,
    inside_image,
    knn_distances,
    record_points,
)

DEFAULT_PARAMS = DensityParams()


def reference_density_map(points, sigmas, shape, truncate: float = 4.0) -> np.ndarray:
    """The original (slow) MCNN/CSRNet recipe: one full-image ``gaussian_filter`` per head.

    A float32 image with a single 1 at ``(int(y), int(x))`` is blurred with ``mode='constant'``
    and the results are summed in float32: mass outside the image is lost. O(H W r) per head.

    Inputs:
    - points: float array (N, 2) of (x, y) pixels; sigmas: float array (N,), pixels
    - shape: (H, W); truncate: float, radius in sigmas
    Returns:
    - density: float32 array (H, W)
    """
    from scipy.ndimage import gaussian_filter

    pts = as_points(points)
    height, width = int(shape[0]), int(shape[1])
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    keep = inside_image(pts, (height, width))
    pts, sig = pts[keep], sig[keep]
    out = np.zeros((height, width), dtype=np.float32)
    delta = np.zeros((height, width), dtype=np.float32)
    for x, y, s in zip(pts[:, 0].tolist(), pts[:, 1].tolist(), sig.tolist(), strict=True):
        delta[int(y), int(x)] = 1.0
        out += gaussian_filter(delta, s, mode="constant", truncate=truncate)
        delta[int(y), int(x)] = 0.0
    return out


def local_geometry(points, params: DensityParams = DEFAULT_PARAMS) -> dict[str, np.ndarray]:
    """Per-head numbers for studying sigma against crowd density; every array is ``(N,)``.

    ``mean_knn_px``: mean distance to the ``k`` nearest other heads (NaN for a lone head);
    ``local_density``: heads per 100 x 100 pixels, estimated as ``k / (pi d_k^2)`` with ``d_k`` the
    distance to the k-th neighbour (NaN when undefined); ``sigma``: the sigma ``params`` gives.
    """
    pts = as_points(points)
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


def truncated_support(points, sigmas, shape, truncate: float = 4.0) -> np.ndarray:
    """``H x W`` bool: pixels reached by a kernel that sticks out of the image.

    Outside this mask the renormalised map equals the original method's map; inside it, ours is
    larger (it keeps the mass the original loses).
    """
    pts = as_points(points)
    height, width = _shape(shape)
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    keep = inside_image(pts, (height, width))
    pts, sig = pts[keep], sig[keep]
    mask = np.zeros((height, width), dtype=bool)
    rows, cols = pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)
    radii = (float(truncate) * sig + 0.5).astype(np.int64)
    cut = (
        (rows - radii < 0) | (cols - radii < 0) | (rows + radii >= height) | (cols + radii >= width)
    )
    for r, c, rad in zip(rows[cut].tolist(), cols[cut].tolist(), radii[cut].tolist(), strict=True):
        mask[max(0, r - rad) : r + rad + 1, max(0, c - rad) : c + rad + 1] = True
    return mask


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


def count_table(
    records: Sequence,
    params: DensityParams = DEFAULT_PARAMS,
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
        points, shape, n_raw = record_points(record)
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


def _shape(shape) -> tuple[int, int]:
    return int(shape[0]), int(shape[1])
