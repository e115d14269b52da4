"""Figures of predictions on any image: the density map drawn over the photo, with the count.

:func:`overlay_figure` only draws (it computes nothing about the model) and returns the Figure;
:func:`save_png` writes it atomically to any path (the ``predict`` command's overlays), and
``name=...`` saves it into ``report/figures/`` like every other figure of the series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers.viz.common import add_colorbar, new_figure, save_figure
from helpers.viz.density import DENSITY_CMAP, DENSITY_UNITS, VMAX_QUANTILE

#: Longest side (pixels) at which the photo and the map are drawn; larger images are shrunk for
#: drawing only (points and axes stay in the original pixel coordinates).
MAX_DRAW_SIDE = 1600
OVERLAY_DPI = 150


def _infer_stride(image_shape: tuple[int, int], map_shape: tuple[int, int]) -> int:
    """The smallest ``s`` with ``ceil(H / s), ceil(W / s) == map_shape`` (1 at image resolution)."""
    H, W = image_shape
    h, w = map_shape
    if h < 1 or w < 1 or h > H or w > W:
        raise ValueError(f"a {h}x{w} density map cannot cover a {H}x{W} image")
    s = max(1, -(-H // h) - 1)
    while s <= H:
        if -(-H // s) == h and -(-W // s) == w:
            return s
        if -(-H // s) < h:
            break
        s += 1
    raise ValueError(
        f"a {h}x{w} density map does not fit a {H}x{W} image at any whole-number stride; pass "
        "the map at image resolution or at the model's stride (ceil(H/s) x ceil(W/s))"
    )


def _shrink(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average ``array`` down to ``shape`` (rows, cols) when it is larger."""
    import cv2

    if array.shape[0] <= shape[0] and array.shape[1] <= shape[1]:
        return array
    rows, cols = min(array.shape[0], shape[0]), min(array.shape[1], shape[1])
    return cv2.resize(np.ascontiguousarray(array), (cols, rows), interpolation=cv2.INTER_AREA)


def overlay_figure(
    image: np.ndarray,
    density: np.ndarray,
    count: float,
    title: str | None = None,
    points: np.ndarray | None = None,
    *,
    alpha: float = 0.7,
    max_side: int = MAX_DRAW_SIDE,
    name: str | None = None,
):
    """The predicted density drawn over the photo, a colour bar, and the count in the title.

    Args:
        image: ``H x W x 3`` uint8 RGB photo.
        density: people per pixel at image resolution ``(H, W)``, or people per cell of a map at
            stride ``s`` with ``(ceil(H/s), ceil(W/s))`` cells (e.g. ``Prediction.density_lowres``);
            cells cut by the image border hold the people of their part inside the image.
        count: the predicted number of people (shown in the title).
        title: what the image is (e.g. its file name), put before the count.
        points: optional ``(M, 2)`` ``(x, y)`` head positions in image pixels, drawn as dots.
        alpha: opacity of the densest colour; lower densities are more transparent, so the
            photo shows through where the model sees nobody.
        max_side: the photo and the map are shrunk for drawing to at most this many pixels.
        name: if given, also save as ``report/figures/<name>.png`` and ``.pdf``.

    The colour scale is people per pixel, from 0 to the map's 99.9 % quantile (brighter peaks
    saturate). Returns the Figure.
    """
    import matplotlib as mpl

    image = np.asarray(image)
    d = np.asarray(density, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    if d.ndim != 2:
        raise ValueError(f"density must be a 2-D map, got shape {d.shape}")
    H, W = image.shape[:2]
    s = _infer_stride((H, W), d.shape)
    if s > 1:  # people per cell -> people per image pixel of each cell
        rows_in = np.minimum(s, H - np.arange(d.shape[0]) * s)
        cols_in = np.minimum(s, W - np.arange(d.shape[1]) * s)
        d = d / np.outer(rows_in, cols_in)

    factor = min(1.0, max_side / max(H, W))
    draw_shape = (max(1, round(H * factor)), max(1, round(W * factor)))
    photo = _shrink(image, draw_shape)
    d_draw = _shrink(d.astype(np.float32), (max(1, round(d.shape[0] * s * factor)),
                                             max(1, round(d.shape[1] * s * factor))))

    positive = d_draw[d_draw > 0]
    vmax = float(np.quantile(positive, VMAX_QUANTILE)) if positive.size else 0.0
    if vmax <= 0:
        vmax = float(d_draw.max()) if d_draw.size and d_draw.max() > 0 else 1.0
    norm = mpl.colors.Normalize(vmin=0.0, vmax=vmax)
    cmap = mpl.colormaps[DENSITY_CMAP]
    level = np.clip(norm(d_draw), 0.0, 1.0)
    rgba = cmap(level)
    rgba[..., 3] = alpha * np.sqrt(level)  # transparent where there is nobody

    fig_w = 8.0
    fig_h = min(12.0, fig_w * 0.85 * H / W + 0.9)
    fig, ax = new_figure(width=fig_w, height=fig_h, layout="constrained")
    ax.imshow(photo, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="antialiased")
    # The map may extend past the image into the padding (cells cut by the border); axis limits
    # below crop it back to the image.
    ax.imshow(rgba, extent=(-0.5, d.shape[1] * s - 0.5, d.shape[0] * s - 0.5, -0.5),
              interpolation="bilinear")
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        size = 2 if len(pts) > 800 else 5 if len(pts) > 200 else 10
        ax.scatter(pts[:, 0] - 0.5, pts[:, 1] - 0.5, s=size, c="cyan", edgecolors="black",
                   linewidths=0.3, label=f"{len(pts)} head points")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{W} x {H} px")
    label = f"{title}: " if title else ""
    ax.set_title(f"{label}predicted count {count:,.1f}", fontsize=11)
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    add_colorbar(fig, mappable, ax, DENSITY_UNITS)
    if name is not None:
        save_figure(fig, name)
    return fig


def save_png(fig, path: str | Path, dpi: int = OVERLAY_DPI) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (folders created); returns the path."""
    from helpers.tools.fileio import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
