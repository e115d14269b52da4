"""Figures of the dataset itself: counts, image sizes, perspective, and annotated images.

Each function takes already computed data (see :mod:`helpers.analysis.explore`), returns the matplotlib
Figure and, when ``name`` is not None, saves it as ``report/figures/<name>.png`` and ``.pdf``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from helpers.viz.common import add_colorbar, finish_figure, new_figure

SPLIT_COLORS = {"train": "tab:blue", "test": "tab:orange", "fit": "tab:green", "val": "tab:red"}
PART_TITLES = {"A": "Part A (dense, internet images)", "B": "Part B (sparse, Shanghai streets)"}


def _parts(stats) -> list[str]:
    return sorted({row.part for row in stats})




def count_histograms(stats: Sequence, bins: int = 30, name: str | None = "01_count_histograms"):
    """Histogram of heads per image, one panel per part, one colour per split.

    ``stats`` are :class:`helpers.analysis.explore.ImageStats` rows. Bins are shared by the splits of a
    part so their bars compare directly.
    """
    parts = _parts(stats)
    fig, axes = new_figure(ncols=max(1, len(parts)), width=5.5, height=3.8, squeeze=False)
    for ax, part in zip(axes[0], parts, strict=False):
        rows = [r for r in stats if r.part == part]
        edges = np.histogram_bin_edges([r.count for r in rows], bins=bins)
        splits = list(dict.fromkeys(r.split for r in rows))
        for split in splits:
            counts = np.array([r.count for r in rows if r.split == split])
            ax.hist(
                counts, bins=edges, alpha=0.55, color=SPLIT_COLORS.get(split),
                label=f"{split}: {len(counts)} images, mean {counts.mean():.0f}",
                edgecolor="white", linewidth=0.4,
            )
        ax.set_title(f"{PART_TITLES.get(part, 'Part ' + part)}\nheads per image")
        ax.set_xlabel("heads in the image (count)")
        ax.set_ylabel("number of images")
        ax.legend(fontsize=8)
    return finish_figure(fig, name, tight=True)


def image_sizes(stats: Sequence, name: str | None = "01_image_sizes"):
    """Scatter of image width against height, one panel per part, coloured by the head count.

    The most common size is written in the corner with how many images share it (Part B of
    ShanghaiTech is a single point: every image is 1024 x 768).
    """
    from matplotlib.colors import LogNorm

    parts = _parts(stats)
    fig, axes = new_figure(ncols=max(1, len(parts)), width=5.2, height=4.2, squeeze=False)
    for ax, part in zip(axes[0], parts, strict=False):
        rows = [r for r in stats if r.part == part]
        w = np.array([r.width for r in rows])
        h = np.array([r.height for r in rows])
        c = np.array([max(r.count, 1) for r in rows])
        sc = ax.scatter(w, h, c=c, s=18, cmap="viridis", norm=LogNorm(vmin=c.min(), vmax=max(c.max(), c.min() + 1)),
                        edgecolors="k", linewidths=0.2)
        sizes: dict[tuple[int, int], int] = {}
        for wi, hi in zip(w.tolist(), h.tolist(), strict=True):
            sizes[(wi, hi)] = sizes.get((wi, hi), 0) + 1
        (top_w, top_h), top_n = max(sizes.items(), key=lambda kv: kv[1])
        ax.text(0.02, 0.98, f"most common: {top_w}x{top_h} ({top_n} images)", transform=ax.transAxes,
                fontsize=8, va="top", ha="left", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        n_sizes = f"{len(sizes)} distinct size" + ("s" if len(sizes) != 1 else "")
        ax.set_title(f"{PART_TITLES.get(part, 'Part ' + part)}\n{len(rows)} images, {n_sizes}")
        ax.set_xlabel("width W (pixels)")
        ax.set_ylabel("height H (pixels)")
        ax.set_aspect("equal", adjustable="datalim")
        add_colorbar(fig, sc, ax, "heads in the image (log scale)")
    return finish_figure(fig, name, tight=True)


def nn_distance_vs_row(profiles: Mapping[str, object], name: str | None = "01_nn_distance_vs_row"):
    """Mean k-NN head distance against normalised row ``y / H``, with the fitted line.

    ``profiles`` maps a label (e.g. ``"A"``) to a :class:`helpers.analysis.explore.RowProfile`. The band is
    plus/minus one standard deviation of the heads in each bin.
    """
    labels = list(profiles)
    fig, axes = new_figure(ncols=max(1, len(labels)), width=5.2, height=3.9, squeeze=False)
    for ax, label in zip(axes[0], labels, strict=False):
        prof = profiles[label]
        ok = prof.n > 0
        ax.fill_between(prof.centers[ok], (prof.mean - prof.std)[ok], (prof.mean + prof.std)[ok],
                        color="tab:blue", alpha=0.15, label="±1 std over heads in the bin")
        ax.plot(prof.centers[ok], prof.mean[ok], "o-", color="tab:blue", label="bin mean")
        xs = np.linspace(0, 1, 50)
        ax.plot(xs, prof.line(xs), "--", color="tab:red",
                label=f"least squares: {prof.intercept:.1f} + {prof.slope:.1f}·(y/H) px")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{PART_TITLES.get(label, label)}\n{prof.n_points:,} heads, k = {prof.k}")
        ax.set_xlabel("normalised row y / H (0 = top of the image)")
        ax.set_ylabel(f"mean distance to {prof.k} nearest heads (px)")
        ax.legend(fontsize=8, loc="upper left")
    return finish_figure(fig, name, tight=True)


def draw_points(
    ax, image: np.ndarray, points: np.ndarray, show_points: bool = True, title: str | None = None,
    marker_scale: float = 1.0,
):
    """Show an ``H x W x 3`` image on ``ax`` with its ``(N, 2)`` ``(x, y)`` head points as dots.

    ``marker_scale`` shrinks (< 1) or grows the dots, e.g. for small panels in a grid.
    """
    ax.imshow(image)
    if show_points and len(points):
        size = marker_scale * (3 if len(points) > 800 else 6 if len(points) > 200 else 12)
        # Point (x, y) lies in pixel (floor(y), floor(x)), whose centre imshow draws at the integer
        # coordinate; shift by half a pixel so the dot sits where the annotator clicked.
        ax.scatter(points[:, 0] - 0.5, points[:, 1] - 0.5, s=size, c="red", edgecolors="white",
                   linewidths=0.3)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def annotated_grid(
    examples: Sequence, titles: Sequence[str] | None = None, ncols: int = 4,
    name: str | None = "01_annotated_grid",
):
    """A grid of :class:`helpers.data.Example` images with their head points drawn in red."""
    n = len(examples)
    if n == 0:
        raise ValueError("annotated_grid needs at least one example")
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=3.6, height=3.1, squeeze=False,
                           layout="constrained")
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.axis("off")
            continue
        ex = examples[i]
        title = titles[i] if titles is not None else ex.record.name
        h, w = ex.image.shape[:2]
        draw_points(ax, ex.image, ex.points, title=f"{title}: {ex.count} heads, {w}x{h}",
                    marker_scale=0.35)
    fig.suptitle("Images with their head annotations (one red dot per head)")
    return finish_figure(fig, name, tight=False)


def show_example(example, show_points: bool = True, title: str | None = None, name: str | None = None):
    """One :class:`helpers.data.Example` at a readable size, with or without its points."""
    h, w = example.image.shape[:2]
    fig, ax = new_figure(width=7.0, height=7.0 * h / w + 0.6)
    label = title or example.record.name
    extra = f", {example.report.duplicates} duplicate points" if example.report.duplicates else ""
    draw_points(ax, example.image, example.points, show_points,
                title=f"{label}: {example.count} heads, {w}x{h} px{extra}")
    return finish_figure(fig, name, tight=True)
