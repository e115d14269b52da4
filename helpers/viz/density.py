"""Figures of ground-truth density maps: kernels, fixed vs adaptive sigma, counts, downsampling.

Each function takes already computed arrays (see :mod:`helpers.density`), only draws them,
returns the matplotlib Figure and, when ``name`` is not None, saves it as
``report/figures/<name>.png`` and ``.pdf``. Density maps are ``H x W`` float32 in people per pixel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from helpers.viz.common import add_colorbar, finish_figure, new_figure
from helpers.viz.dataset import draw_points

DENSITY_CMAP = "inferno"
DENSITY_UNITS = "density (people / pixel)"
#: Colour scales end at this quantile of the map's values (the brightest peaks saturate), so the
#: spread-out mass stays visible; the colour bar says what the top colour means.
VMAX_QUANTILE = 0.999




def _vmax(*maps: np.ndarray) -> float:
    """A shared top of the colour scale: the largest ``VMAX_QUANTILE`` value of the maps (> 0)."""
    tops = [float(np.quantile(m, VMAX_QUANTILE)) for m in maps if np.size(m)]
    peak = max([float(np.max(m)) for m in maps if np.size(m)] + [0.0])
    top = max(tops + [0.0])
    if top <= 0:
        top = peak
    return top if top > 0 else 1.0


def show_density(fig, ax, density: np.ndarray, title: str | None = None, vmax: float | None = None,
                 label: str = DENSITY_UNITS, extent=None):
    """Draw an ``H x W`` map on ``ax`` with a labelled colour bar; returns the image artist.

    ``vmax`` defaults to the map's 99.9 % quantile (brighter peaks saturate). ``extent`` is passed
    to ``imshow`` (e.g. to draw a downsampled map in full-image pixel coordinates).
    """
    d = np.asarray(density)
    top = _vmax(d) if vmax is None else float(vmax)
    im = ax.imshow(d, cmap=DENSITY_CMAP, vmin=0.0, vmax=top, interpolation="nearest", extent=extent)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    add_colorbar(fig, im, ax, label)
    return im


# --------------------------------------------------------------------------- detection vs density


def dense_crop(
    image: np.ndarray,
    points: np.ndarray,
    nn_px: np.ndarray,
    center: tuple[float, float],
    size: int = 160,
    name: str | None = "02_dense_crop",
):
    """What a detector would face: a ``size x size`` crop of a dense image, and head spacing.

    ``image`` ``H x W x 3`` uint8, ``points`` ``(N, 2)`` (x, y) px, ``nn_px`` ``(N,)`` distance
    from each head to its nearest other head (px), ``center`` (x, y) of the crop (moved inside the
    image if needed). Panels: the whole image with the crop outlined; the crop enlarged with its
    heads; histograms of the nearest-neighbour distance for all heads and for those in the crop.
    """
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    size = int(min(size, h, w))
    x0 = int(np.clip(round(center[0] - size / 2), 0, w - size))
    y0 = int(np.clip(round(center[1] - size / 2), 0, h - size))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    nn = np.asarray(nn_px, dtype=np.float64).reshape(-1)
    inside = (pts[:, 0] >= x0) & (pts[:, 0] < x0 + size) & (pts[:, 1] >= y0) & (pts[:, 1] < y0 + size)

    fig, axes = new_figure(ncols=3, width=4.2, height=4.0, layout="constrained")
    draw_points(axes[0], image, pts, marker_scale=0.4)
    axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), size, size, fill=False, edgecolor="cyan", lw=1.5))
    axes[0].set_title(f"whole image: {len(pts)} heads, {w}x{h} px", fontsize=9)

    crop = image[y0 : y0 + size, x0 : x0 + size]
    draw_points(axes[1], crop, pts[inside] - [x0, y0], marker_scale=0.7)
    axes[1].set_title(f"{size}x{size} px crop (cyan box): {int(inside.sum())} heads", fontsize=9)

    finite = nn[np.isfinite(nn)]
    if finite.size:
        edges = np.histogram_bin_edges(finite, bins=30, range=(0.0, float(np.quantile(finite, 0.99)) + 1e-9))
        axes[2].hist(finite, bins=edges, color="tab:blue", alpha=0.6,
                     label=f"all heads (median {np.median(finite):.1f} px)")
        in_crop = nn[inside & np.isfinite(nn)]
        if in_crop.size:
            axes[2].hist(in_crop, bins=edges, color="tab:orange", alpha=0.8,
                         label=f"heads in the crop (median {np.median(in_crop):.1f} px)")
        axes[2].legend(fontsize=8)
    axes[2].set_title("distance to the nearest other head", fontsize=9)
    axes[2].set_xlabel("nearest-neighbour distance (pixels)")
    axes[2].set_ylabel("number of heads")
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- kernels


def kernel_profiles(
    kernels: Mapping[float, np.ndarray],
    curves: Mapping[float, tuple[np.ndarray, np.ndarray]] | None = None,
    truncate: float = 4.0,
    name: str | None = "02_kernels",
):
    """Discrete truncated 1-D kernels as stems, with the continuous Gaussian as a line.

    ``kernels`` maps sigma (px) to the ``(2r+1,)`` weights at offsets ``-r..r``; ``curves`` maps
    sigma to ``(x, g(x))`` of the continuous density. Left panel linear, right panel log scale
    (where the truncation at ``r = int(truncate * sigma + 0.5)`` shows as the end of the stems).
    """
    fig, axes = new_figure(ncols=2, width=5.2, height=3.8, layout="constrained")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, (sigma, kern) in enumerate(kernels.items()):
        color = colors[i % len(colors)]
        kern = np.asarray(kern, dtype=np.float64)
        radius = (len(kern) - 1) // 2
        offsets = np.arange(-radius, radius + 1)
        for ax in axes:
            ax.plot(offsets, kern, "o", ms=3, color=color,
                    label=f"discrete, sigma = {sigma:g} px, radius r = {radius}")
            ax.vlines(offsets, 0 if ax is axes[0] else 1e-12, kern, color=color, lw=0.6, alpha=0.6)
            if curves is not None and sigma in curves:
                x, g = curves[sigma]
                ax.plot(x, g, "-", color=color, lw=1.0, alpha=0.7,
                        label=f"continuous N(0, {sigma:g}²)" if ax is axes[0] else None)
    axes[0].set_title("1-D kernels (weights sum to 1)", fontsize=9)
    axes[1].set_yscale("log")
    axes[1].set_ylim(bottom=1e-8)
    axes[1].set_title(f"log scale: kernels end at r = int({truncate:g} sigma + 0.5)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("offset from the head's pixel (pixels)")
        ax.set_ylabel("weight (fraction of one head per pixel)")
    axes[0].legend(fontsize=7)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- fixed vs adaptive


def density_comparison(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
    name: str | None = "02_fixed_vs_adaptive",
    share_scale: bool = False,
):
    """One row per image: the image with its heads, then one panel per density map.

    ``rows`` holds ``(label, image H x W x 3, points (N, 2), {panel title: map H x W})``; every
    row must have the same number of maps. With ``share_scale`` the maps of a row share one
    colour scale, so their heights compare directly. Each map panel has a colour bar in people
    per pixel, and its title gives the map's sum.
    """
    if not rows:
        raise ValueError("density_comparison needs at least one row")
    n_maps = len(rows[0][3])
    if any(len(r[3]) != n_maps for r in rows):
        raise ValueError("every row needs the same number of maps")
    aspects = [max(0.3, r[1].shape[0] / r[1].shape[1]) for r in rows]  # rows sized by image shape
    fig, axes = new_figure(ncols=1 + n_maps, nrows=len(rows), width=4.3,
                           height=4.3 * float(np.mean(aspects)) + 0.7, squeeze=False,
                           layout="constrained", gridspec_kw={"height_ratios": aspects})
    for row_axes, (label, image, points, maps) in zip(axes, rows, strict=True):
        draw_points(row_axes[0], image, points, marker_scale=0.4,
                    title=f"{label}: {len(points)} heads")
        top = _vmax(*maps.values()) if share_scale else None
        for ax, (title, dmap) in zip(row_axes[1:], maps.items(), strict=True):
            total = float(np.asarray(dmap, dtype=np.float64).sum())
            show_density(fig, ax, dmap, title=f"{title}\nsum = {total:.2f}", vmax=top)
    return finish_figure(fig, name)


def sigma_vs_density(
    geometry: Mapping[str, Mapping[str, np.ndarray]],
    row_fraction: Mapping[str, np.ndarray] | None = None,
    fixed_sigma: float | None = None,
    name: str | None = "02_sigma_vs_density",
):
    """Adaptive sigma against local crowd density, one panel per label (log-log axes).

    ``geometry`` maps a label to :func:`helpers.density.local_geometry` output (``local_density``
    in heads per 100 x 100 px and ``sigma`` in px, both ``(N,)``); ``row_fraction`` maps the same
    labels to each head's ``y / H`` and colours the dots by it. ``fixed_sigma`` draws a dashed
    line for comparison. Heads with an undefined local density (NaN) are left out.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    labels = list(geometry)
    fig, axes = new_figure(ncols=max(1, len(labels)), width=5.0, height=4.0, squeeze=False,
                           layout="constrained")
    for ax, label in zip(axes[0], labels, strict=False):
        geo = geometry[label]
        dens = np.asarray(geo["local_density"], dtype=np.float64)
        sig = np.asarray(geo["sigma"], dtype=np.float64)
        ok = np.isfinite(dens) & np.isfinite(sig) & (dens > 0) & (sig > 0)
        if row_fraction is not None and label in row_fraction:
            colour = np.asarray(row_fraction[label], dtype=np.float64)[ok]
            sc = ax.scatter(dens[ok], sig[ok], c=colour, cmap="viridis", vmin=0, vmax=1, s=6,
                            alpha=0.7, linewidths=0)
            add_colorbar(fig, sc, ax, "row y / H (0 = top of the image)")
        else:
            ax.scatter(dens[ok], sig[ok], s=6, alpha=0.6, color="tab:blue", linewidths=0)
        if fixed_sigma is not None:
            ax.axhline(fixed_sigma, ls="--", color="tab:red", lw=1, label=f"fixed sigma = {fixed_sigma:g} px")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # ticks at 1, 2, 5, 10, ... written as plain numbers
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{label}: {int(ok.sum())} heads", fontsize=9)
        ax.set_xlabel("local density (heads per 100 x 100 px)")
        ax.set_ylabel("adaptive sigma (pixels)")
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- counts


COUNT_METHODS = (
    ("sum", "ours (renormalised at borders)", "tab:green", "o"),
    ("sum_pooled", "ours, sum-pooled", "tab:blue", "s"),
    ("sum_no_renorm", "original border handling", "tab:orange", "^"),
    ("sum_cv2", "original + cv2 resize x f²", "tab:red", "v"),
)


def count_errors(rows: Sequence[Mapping], factor: int = 8, name: str | None = "02_count_errors"):
    """How far each way of making the map is from the head count, per image.

    ``rows`` are :func:`helpers.density.count_table` dicts (``n_points`` and the ``sum*`` keys).
    Left: relative error ``(sum - n_points) / n_points`` in percent against the head count.
    Right: the mean absolute relative error of each method (log scale; a floor of 1e-12 stands
    for an exact zero). Images without heads are left out.
    """
    rows = [r for r in rows if r["n_points"] > 0]
    fig, axes = new_figure(ncols=2, width=5.4, height=4.0, layout="constrained")
    counts = np.array([r["n_points"] for r in rows], dtype=np.float64)
    means = []
    for key, label, color, marker in COUNT_METHODS:
        label = label.replace("f²", f"{factor * factor}").replace("sum-pooled", f"sum-pooled by {factor}")
        rel = np.array([(r[key] - r["n_points"]) / r["n_points"] for r in rows], dtype=np.float64)
        if key == "sum":  # hollow and larger: it sits under the pooled markers, at 0
            axes[0].scatter(counts, 100 * rel, s=60, facecolors="none", edgecolors=color,
                            marker=marker, label=label, linewidths=1.2)
        else:
            axes[0].scatter(counts, 100 * rel, s=16, color=color, marker=marker, label=label, alpha=0.8)
        means.append((label, float(np.mean(np.abs(rel))) if rel.size else 0.0, color))
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("heads in the image (count)")
    axes[0].set_ylabel("(map sum - count) / count (%)")
    axes[0].set_title(f"count error per image ({len(rows)} images)", fontsize=9)
    axes[0].legend(fontsize=7)
    ypos = np.arange(len(means))
    axes[1].barh(ypos, [max(m, 1e-12) for _, m, _ in means], color=[c for _, _, c in means])
    axes[1].set_yticks(ypos, [lab for lab, _, _ in means], fontsize=8)
    axes[1].invert_yaxis()
    axes[1].set_xscale("log")
    axes[1].set_xlabel("mean |relative count error| (log scale)")
    axes[1].set_title("mean absolute relative error", fontsize=9)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- downsampling


def downsampling(
    full: np.ndarray,
    pooled: np.ndarray,
    factor: int = 8,
    resized: np.ndarray | None = None,
    count: int | None = None,
    name: str | None = "02_downsampling",
):
    """A full-resolution map next to its sum-pooled version (and optionally the cv2 resize).

    ``full`` ``H x W``, ``pooled`` ``ceil(H/f) x ceil(W/f)``, ``resized`` ``H//f x W//f`` (all
    float32 people per pixel / per block). Titles give each map's shape and sum; ``count`` (the
    number of heads) goes into the figure title. The small maps share one colour scale and are
    drawn without smoothing, so each block shows as a square. Wide images are stacked in a column.
    """
    panels = [(full, f"full resolution {full.shape[1]}x{full.shape[0]}", DENSITY_UNITS)]
    block = f"density (people / {factor}x{factor}-pixel block)"
    panels.append((pooled, f"sum-pooled by {factor}: {pooled.shape[1]}x{pooled.shape[0]}", block))
    if resized is not None:
        panels.append((resized, f"cv2 bicubic resize x {factor * factor}: "
                       f"{resized.shape[1]}x{resized.shape[0]}", block))
    aspect = full.shape[0] / full.shape[1]
    if aspect < 0.55:  # wide: one panel per row
        fig, axes = new_figure(nrows=len(panels), width=9.0, height=9.0 * aspect + 0.8,
                               squeeze=False, layout="constrained")
        axes = axes[:, 0]
    else:
        fig, axes = new_figure(ncols=len(panels), width=4.6, height=4.6 * aspect + 0.8,
                               squeeze=False, layout="constrained")
        axes = axes[0]
    small_top = _vmax(*[p[0] for p in panels[1:]])
    for i, (ax, (dmap, title, label)) in enumerate(zip(axes, panels, strict=True)):
        total = float(np.asarray(dmap, dtype=np.float64).sum())
        show_density(fig, ax, dmap, title=f"{title}\nsum = {total:.3f}", label=label,
                     vmax=None if i == 0 else small_top)
    if count is not None:
        fig.suptitle(f"Downsampling a density map by {factor}: the image has {count} heads",
                     fontsize=10)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- one map


def density_panel(
    image: np.ndarray,
    points: np.ndarray,
    density: np.ndarray,
    title: str | None = None,
    name: str | None = None,
):
    """An image with its heads beside its density map (colour bar in people per pixel)."""
    h, w = image.shape[:2]
    fig, axes = new_figure(ncols=2, width=4.6, height=4.6 * h / w + 0.6, layout="constrained")
    draw_points(axes[0], image, points, marker_scale=1.0, title=f"{len(points)} heads")
    total = float(np.asarray(density, dtype=np.float64).sum())
    show_density(fig, axes[1], density, title=f"density map, sum = {total:.2f}")
    if title:
        fig.suptitle(title, fontsize=10)
    return finish_figure(fig, name)
