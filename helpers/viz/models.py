"""Figures and tables about the networks: receptive fields, layer shapes, dilated kernels, outputs.

Each figure function takes already computed data (from :mod:`helpers.models` and
:mod:`helpers.analysis.diagnostics`), only draws it, returns the matplotlib Figure and, when ``name`` is not
None, saves it as ``report/figures/<name>.png`` and ``.pdf``. The ``*_markdown`` functions return
Markdown tables for ``IPython.display.Markdown``.

Units: receptive fields, jumps and head sizes in input pixels; predicted and true densities in
people per output cell (``s x s`` input pixels, ``s`` = the output stride, 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from helpers.viz.common import add_colorbar, finish_figure, new_figure

DENSITY_CMAP = "inferno"
KIND_COLORS = {"conv": "tab:blue", "maxpool": "tab:red", "avgpool": "tab:orange"}
#: Colour scales of density panels end at this quantile of the values shown (peaks saturate).
VMAX_QUANTILE = 0.999




def _cell_units(stride: int) -> str:
    return f"people per {stride}x{stride}-pixel cell"


# --------------------------------------------------------------------------- tables


def receptive_field_markdown(rows: Sequence[Any]) -> str:
    """Markdown table of :func:`helpers.models.receptive_field` rows.

    Columns: layer, kind, kernel ``k``, dilation ``d``, effective kernel ``k_eff = d (k-1) + 1``,
    stride ``s``, jump ``j`` (input pixels between neighbouring outputs, after the layer) and
    receptive field ``r`` (input pixels, after the layer).
    """
    lines = ["| # | layer | kind | k | d | k_eff | s | jump j (px) | RF r (px) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, start=1):
        k_eff = r.dilation * (r.kernel - 1) + 1
        lines.append(f"| {i} | `{r.name}` | {r.kind} | {r.kernel} | {r.dilation} | {k_eff} | "
                     f"{r.stride} | {r.jump} | **{r.rf}** |")
    return "\n".join(lines)


def layer_shapes_markdown(rows: Sequence[Any], hide_kinds: Sequence[str] = ("BatchNorm2d", "ReLU")) -> str:
    """Markdown table of :func:`helpers.analysis.diagnostics.layer_shapes` rows.

    Rows whose kind is in ``hide_kinds`` are left out to keep the table short (batch norm and
    ReLU keep the shape of their input), but their parameters count in the total line.
    Columns: layer, kind, output shape, stride (input size / output size), parameters, MACs per
    image (millions).
    """
    lines = ["| layer | kind | output shape (B, C, H, W) | stride | parameters | MMAC / image |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r.kind in hide_kinds:
            continue
        shape = " x ".join(str(v) for v in r.shape)
        stride = "" if r.stride is None else str(r.stride)
        macs = f"{r.macs / 1e6:,.1f}" if r.macs else ""
        params = f"{r.params:,}" if r.params else ""
        lines.append(f"| `{r.name}` | {r.kind} | {shape} | {stride} | {params} | {macs} |")
    total_p = sum(r.params for r in rows)
    total_m = sum(r.macs for r in rows)
    hidden = f" (including the hidden {', '.join(hide_kinds)} layers)" if hide_kinds else ""
    lines.append(f"| **total**{hidden} | | | | **{total_p:,}** | **{total_m / 1e6:,.1f}** |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- receptive field


def plot_receptive_field_growth(
    rows: Sequence[Any] | Mapping[str, Sequence[Any]],
    head_sizes: Mapping[str, float] | None = None,
    title: str | None = None,
    name: str | None = "03_receptive_field",
):
    """Receptive field (left) and jump (right) after each layer, in input pixels.

    ``rows``: :func:`helpers.models.receptive_field` rows of one model, or ``{label: rows}`` for
    several models (one line each). Markers show the layer kind (circle: convolution, square:
    pooling); for a single model the x ticks name the layers. ``head_sizes`` maps a label to a
    size in pixels drawn as a dashed horizontal line on the left panel (for example the median
    head size of the training images) to compare the receptive field with.
    """
    models = dict(rows) if isinstance(rows, Mapping) else {"": list(rows)}
    if not models or not all(len(v) for v in models.values()):
        raise ValueError("plot_receptive_field_growth needs at least one layer per model")
    fig, (ax_rf, ax_jump) = new_figure(ncols=2, width=6.0, height=4.2, layout="constrained",
                                       gridspec_kw={"width_ratios": [1.6, 1.0]})
    line_colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]
    for m, (label, layers) in enumerate(models.items()):
        x = np.arange(1, len(layers) + 1)
        rf = [r.rf for r in layers]
        jump = [r.jump for r in layers]
        color = line_colors[m % len(line_colors)] if label else "0.3"
        ax_rf.plot(x, rf, "-", color=color, lw=1.2, label=(f"{label}: RF {rf[-1]} px" if label else None))
        ax_jump.step(x, jump, where="post", color=color, lw=1.2, label=label or None)
        for xi, r in zip(x, layers, strict=True):
            marker = "s" if "pool" in r.kind else "o"
            face = KIND_COLORS.get(r.kind, "tab:gray") if not label else color
            ax_rf.plot(xi, r.rf, marker, color=face, ms=5 if marker == "o" else 6, zorder=3)
        ax_rf.annotate(f"{rf[-1]} px", (x[-1], rf[-1]), textcoords="offset points", xytext=(-8, 6),
                       ha="right", fontsize=8, color=color)
    if len(models) == 1 and "" in models:
        layers = models[""]
        names = [r.name.split(".")[-1] for r in layers]
        for ax in (ax_rf, ax_jump):
            ax.set_xticks(np.arange(1, len(layers) + 1), names, rotation=70, fontsize=7)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker="o", color=KIND_COLORS["conv"], label="convolution"),
                   Line2D([], [], ls="", marker="s", color=KIND_COLORS["maxpool"], label="2x2 max-pool")]
    else:
        handles = []
        for ax in (ax_rf, ax_jump):
            ax.set_xlabel("layer (convolutions and pools, in forward order)")
    if head_sizes:
        styles = [":", "--", "-."]
        for i, (label, size) in enumerate(head_sizes.items()):
            line = ax_rf.axhline(float(size), color="tab:orange", ls=styles[i % len(styles)], lw=1.2,
                                 label=f"{label}: {float(size):.0f} px")
            handles.append(line)
    ax_rf.legend(handles=handles + [h for h in ax_rf.get_legend_handles_labels()[0] if h not in handles],
                 fontsize=8, loc="upper left")
    ax_rf.set_ylabel("receptive field r (input pixels)")
    ax_rf.set_title("Receptive field after each layer", fontsize=10)
    top_rf = max(r.rf for layers in models.values() for r in layers)
    if head_sizes:
        top_rf = max([top_rf] + [float(v) for v in head_sizes.values()])
    ax_rf.set_ylim(0, 1.12 * top_rf)
    ax_rf.grid(alpha=0.3)
    ax_jump.set_ylabel("jump j (input pixels between outputs)")
    ax_jump.set_title("Jump (cumulative stride)", fontsize=10)
    ax_jump.set_yscale("log", base=2)
    top = max(r.jump for layers in models.values() for r in layers)
    ax_jump.set_yticks([2**i for i in range(int(math.log2(max(top, 1))) + 1)],
                       [str(2**i) for i in range(int(math.log2(max(top, 1))) + 1)])
    ax_jump.grid(alpha=0.3)
    if len(models) > 1:
        ax_jump.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    return finish_figure(fig, name)


def plot_receptive_field_on_image(
    image: np.ndarray,
    points: np.ndarray,
    center: tuple[float, float],
    rf: int,
    stride: int = 8,
    head_size: float | None = None,
    name: str | None = "03_receptive_field_on_image",
):
    """What one output cell sees: its ``stride x stride`` cell and its ``rf x rf`` field.

    ``image`` ``H x W x 3`` uint8, ``points`` ``(N, 2)`` (x, y) heads, ``center`` the (x, y)
    pixel whose cell is shown, ``rf`` the receptive field in pixels. Left: the whole image with
    the field outlined; right: the field enlarged, with the cell (cyan), the heads (dots) and, if
    ``head_size`` is given, a circle of that diameter around the centre for scale. The field is
    clipped at the image border (the network sees zero padding there).
    """
    from matplotlib.patches import Circle, Rectangle

    h, w = image.shape[:2]
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cx, cy = float(center[0]), float(center[1])
    cell_x0, cell_y0 = stride * math.floor(cx / stride), stride * math.floor(cy / stride)
    mid_x, mid_y = cell_x0 + stride / 2, cell_y0 + stride / 2
    x0, y0 = mid_x - rf / 2, mid_y - rf / 2
    fig, axes = new_figure(ncols=2, width=4.8, height=4.6 * min(1.2, max(0.5, h / w)) + 0.4,
                           layout="constrained")
    axes[0].imshow(image)
    axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), rf, rf, fill=False, edgecolor="yellow", lw=1.5))
    axes[0].set_title(f"image {w}x{h} px: receptive field {rf}x{rf} px (yellow)", fontsize=9)
    axes[1].imshow(image, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    inside = (pts[:, 0] >= x0) & (pts[:, 0] < x0 + rf) & (pts[:, 1] >= y0) & (pts[:, 1] < y0 + rf)
    if inside.any():
        axes[1].scatter(pts[inside, 0], pts[inside, 1], s=8, c="lime", edgecolors="black", linewidths=0.3)
    axes[1].add_patch(Rectangle((cell_x0 - 0.5, cell_y0 - 0.5), stride, stride, fill=False,
                                edgecolor="cyan", lw=1.5))
    if head_size:
        axes[1].add_patch(Circle((mid_x, mid_y), head_size / 2, fill=False, edgecolor="white", ls="--", lw=1))
    axes[1].set_xlim(x0 - 0.5, x0 + rf - 0.5)
    axes[1].set_ylim(y0 + rf - 0.5, y0 - 0.5)
    extra = f", white circle: a {head_size:.0f} px head" if head_size else ""
    axes[1].set_title(f"the field enlarged: {int(inside.sum())} heads; cyan: the {stride}x{stride} "
                      f"output cell{extra}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    return finish_figure(fig, name)


def plot_input_gradient(
    grad: np.ndarray,
    box: tuple[int, int, int, int],
    cell_box: tuple[int, int, int, int] | None = None,
    title: str | None = None,
    name: str | None = "03_input_gradient",
):
    """Where one output cell looks: ``|d output / d input|`` with the theoretical field outlined.

    ``grad`` ``(H, W)`` from :func:`helpers.analysis.diagnostics.input_gradient`; ``box`` ``(x0, y0, x1, y1)``
    inclusive pixel bounds of the theoretical receptive field
    (:func:`helpers.analysis.diagnostics.receptive_field_box`); ``cell_box`` the same for the output cell's own
    pixels. Left: the gradient magnitude relative to its maximum, log colour scale (1e-3 to 1).
    Right: its profile along x and y through the centre of the field (averaged over 9 rows or
    columns), with the field's edges as dashed lines.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    g = np.asarray(grad, dtype=np.float64)
    peak = float(g.max()) if g.size and g.max() > 0 else 1.0
    rel = g / peak
    x0, y0, x1, y1 = (int(v) for v in box)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    fig, (ax_map, ax_prof) = new_figure(ncols=2, width=5.0, height=4.4, layout="constrained")
    im = ax_map.imshow(np.where(rel > 0, rel, np.nan), cmap="viridis", norm=LogNorm(1e-3, 1.0),
                       interpolation="nearest")
    ax_map.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                               edgecolor="tab:red", ls="--", lw=1.2))
    if cell_box is not None:
        a, b, c, d = (int(v) for v in cell_box)
        ax_map.add_patch(Rectangle((a - 0.5, b - 0.5), c - a + 1, d - b + 1, fill=False,
                                   edgecolor="white", lw=1.2))
    ax_map.set_xlim(-0.5, g.shape[1] - 0.5)
    ax_map.set_ylim(g.shape[0] - 0.5, -0.5)
    ax_map.set_xlabel("x (input pixels)")
    ax_map.set_ylabel("y (input pixels)")
    ax_map.set_title(f"|gradient| of one output cell (white), theoretical field {x1 - x0 + 1} px (red)",
                     fontsize=9)
    add_colorbar(fig, im, ax_map, "|d output / d input| / maximum (blank = exactly 0)")
    band = 4  # average 2 * band + 1 rows (columns) through the centre: a smoother profile
    rows = rel[max(0, cy - band) : cy + band + 1, :]
    cols = rel[:, max(0, cx - band) : cx + band + 1]
    if rows.size and cols.size:
        ax_prof.plot(np.arange(g.shape[1]) - cx, rows.mean(axis=0), color="tab:blue", lw=1,
                     label=f"along x (mean of {rows.shape[0]} rows)")
        ax_prof.plot(np.arange(g.shape[0]) - cy, cols.mean(axis=1), color="tab:green", lw=1, alpha=0.8,
                     label=f"along y (mean of {cols.shape[1]} columns)")
    for edge in (x0 - cx, x1 - cx):
        ax_prof.axvline(edge, color="tab:red", ls="--", lw=1)
    ax_prof.set_yscale("log")
    ax_prof.set_ylim(1e-5, 1.5)
    ax_prof.set_xlabel("offset from the centre of the field (pixels)")
    ax_prof.set_ylabel("|gradient| / maximum")
    ax_prof.set_title("profile through the centre; red: edges of the theoretical field", fontsize=9)
    ax_prof.grid(alpha=0.3, which="both")
    ax_prof.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- dilated kernels


def plot_effective_kernels(
    kernels: Mapping[str, np.ndarray],
    label: str = "paths from the input pixel to the output",
    title: str | None = None,
    unit: str = "pixels",
    name: str | None = "04_effective_kernels",
):
    """Dilated kernels or stacks of them as grids of input pixels, one panel each.

    ``kernels`` maps a panel title to a 2-D integer array: a 0/1 mask from
    :func:`helpers.analysis.diagnostics.effective_kernel` or the path counts of
    :func:`helpers.analysis.diagnostics.stacked_taps`. Pixels with 0 (never seen by the output)
    are drawn in light grey with a cross; the others are coloured by their value (colour bar:
    ``label``). The panel title says how many pixels of the square are unseen. ``unit`` names what one grid
    square is (for the axis labels), e.g. ``"stage-4 cells (8 px)"`` for kernels that act on a
    feature map with jump 8.
    """
    if not kernels:
        raise ValueError("plot_effective_kernels needs at least one kernel")
    import matplotlib.pyplot as plt

    n = len(kernels)
    fig, axes = new_figure(ncols=n, width=3.6, height=3.6, squeeze=False, layout="constrained")
    for ax, (panel, arr) in zip(axes[0], kernels.items(), strict=True):
        a = np.asarray(arr)
        if a.ndim != 2:
            raise ValueError(f"{panel}: expected a 2-D array, got shape {a.shape}")
        masked = np.ma.masked_equal(a, 0)
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.92")
        top = max(1, int(a.max()))
        im = ax.imshow(masked, cmap=cmap, vmin=0 if top == 1 else 1, vmax=top, interpolation="nearest")
        zeros = np.argwhere(a == 0)
        if len(zeros) and a.shape[0] <= 41:
            ax.scatter(zeros[:, 1], zeros[:, 0], marker="x", s=max(2.0, 300.0 / a.shape[0]), c="0.6",
                       linewidths=0.6)
        if a.shape[0] <= 41:
            ax.set_xticks(np.arange(-0.5, a.shape[1], 1), minor=True)
            ax.set_yticks(np.arange(-0.5, a.shape[0], 1), minor=True)
            ax.grid(which="minor", color="white", lw=0.4)
            ax.tick_params(which="minor", length=0)
        c = a.shape[0] // 2
        ax.set_xticks([0, c, a.shape[1] - 1], [f"{-c}", "0", f"+{a.shape[1] - 1 - c}"])
        ax.set_yticks([0, c, a.shape[0] - 1], [f"{-c}", "0", f"+{a.shape[0] - 1 - c}"])
        ax.set_xlabel(f"input offset x ({unit})")
        ax.set_ylabel(f"input offset y ({unit})")
        unseen = int((a == 0).sum())
        ax.set_title(f"{panel}\n{a.shape[0]}x{a.shape[1]} squares, {unseen} of {a.size} unseen", fontsize=9)
        add_colorbar(fig, im, ax, label)
    if title:
        fig.suptitle(title, fontsize=11)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- output stride


def plot_stride_cells(
    image: np.ndarray,
    density: np.ndarray,
    pooled: Mapping[int, np.ndarray],
    title: str | None = None,
    name: str | None = "03_output_stride",
):
    """An image crop, its full-resolution density, and that density sum-pooled at several strides.

    ``image`` ``h x w x 3`` uint8 and ``density`` ``h x w`` (people per pixel) of the same crop;
    ``pooled`` maps a stride ``s`` to the ``ceil(h/s) x ceil(w/s)`` sum-pooled map (people per
    cell). Each pooled panel is drawn over the crop's pixel grid and titled with its number of
    cells, its sum and its fullest cell.
    """
    h, w = image.shape[:2]
    n = 2 + len(pooled)
    fig, axes = new_figure(ncols=n, width=3.4, height=3.4 * h / w + 0.8, squeeze=False, layout="constrained")
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title(f"crop {w}x{h} px", fontsize=9)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    d = np.asarray(density, dtype=np.float64)
    top = float(np.quantile(d, VMAX_QUANTILE)) or float(d.max()) or 1.0
    im = axes[1].imshow(d, cmap=DENSITY_CMAP, vmin=0, vmax=top, interpolation="nearest")
    axes[1].set_title(f"density, sum = {d.sum():.1f}", fontsize=9)
    add_colorbar(fig, im, axes[1], "people per pixel")
    for ax, (s, p) in zip(axes[2:], pooled.items(), strict=True):
        p = np.asarray(p, dtype=np.float64)
        extent = (-0.5, p.shape[1] * s - 0.5, p.shape[0] * s - 0.5, -0.5)
        im = ax.imshow(p, cmap=DENSITY_CMAP, vmin=0, vmax=float(p.max()) or 1.0,
                       interpolation="nearest", extent=extent)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(f"stride {s}: {p.shape[1]}x{p.shape[0]} cells\nsum = {p.sum():.1f}, "
                     f"fullest cell {p.max():.2f}", fontsize=9)
        add_colorbar(fig, im, ax, _cell_units(s))
    for ax in axes[1:]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- training diagnostics


def plot_overfit_curve(
    losses: Sequence[float],
    required_ratio: float | None = None,
    title: str | None = None,
    name: str | None = "03_overfit_one_batch",
):
    """Loss against optimisation step when fitting one batch (log scale).

    ``required_ratio``: draws the level ``losses[0] / required_ratio`` that the final loss must
    reach (the check of the notebook).
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        raise ValueError("plot_overfit_curve needs at least one loss value")
    fig, ax = new_figure(width=6.0, height=3.8, layout="constrained")
    steps = np.arange(values.size)
    ax.plot(steps, values, color="tab:blue", lw=1.2, label="training loss on the batch")
    if required_ratio:
        ax.axhline(values[0] / required_ratio, color="tab:red", ls="--", lw=1,
                   label=f"first loss / {required_ratio:g}")
    if np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss (MSE on scaled density)")
    ratio = values[0] / values[-1] if values[-1] > 0 else float("inf")
    ax.set_title(title or f"Overfitting one batch: loss {values[0]:.3g} -> {values[-1]:.3g} "
                 f"({ratio:,.0f}x lower)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return finish_figure(fig, name)


def live_history(title: str | None = None) -> Callable[[dict], None]:
    """A ``callback`` for :func:`helpers.tools.trainer.train` that redraws the learning curves each epoch.

    In a notebook the figure of :func:`helpers.viz.training.plot_history` is shown once and then
    replaced in place after every epoch; elsewhere (no IPython) each epoch's row is printed by the
    training loop anyway and the callback only collects the rows. The collected rows are in the
    callback's ``rows`` attribute. Nothing is saved: call ``plot_history(..., name=...)`` at the
    end for the report figure.
    """
    import matplotlib.pyplot as plt

    from helpers.viz.training import plot_history

    rows: list[dict] = []
    handle: dict[str, Any] = {}

    def callback(row: dict) -> None:
        rows.append(dict(row))
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # pragma: no cover - IPython is installed with Jupyter
            return
        if get_ipython() is None:
            return
        fig = plot_history(rows, title=title)
        if "display" not in handle:
            handle["display"] = display(fig, display_id=True)
        else:
            handle["display"].update(fig)
        plt.close(fig)

    callback.rows = rows  # type: ignore[attr-defined]
    return callback


# --------------------------------------------------------------------------- predictions


def plot_density_predictions(
    samples: Sequence[Any],
    title: str | None = None,
    name: str | None = "03_predictions",
):
    """One row per image: the image, the true density and the predicted density.

    ``samples``: :class:`helpers.analysis.diagnostics.SamplePrediction` objects (``name``, ``image`` ``H x W
    x 3`` uint8, ``true`` and ``pred`` ``(ceil(H/s), ceil(W/s))`` people per cell, ``true_count``,
    ``pred_count``, ``stride``). The two maps of a row share one colour scale (the 99.9 %
    quantile of both), so brighter means more people in both; titles give the counts.
    """
    if not samples:
        raise ValueError("plot_density_predictions needs at least one sample")
    aspects = [max(0.3, s.image.shape[0] / s.image.shape[1]) for s in samples]
    fig, axes = new_figure(ncols=3, nrows=len(samples), width=4.0, height=4.0 * float(np.mean(aspects)) + 0.5,
                           squeeze=False, layout="constrained", gridspec_kw={"height_ratios": aspects})
    for row_axes, s in zip(axes, samples, strict=True):
        h, w = s.image.shape[:2]
        stride = int(getattr(s, "stride", 8))
        row_axes[0].imshow(s.image)
        row_axes[0].set_title(f"{s.name} ({w}x{h} px)", fontsize=9)
        both = np.concatenate([np.ravel(s.true), np.ravel(s.pred)]).astype(np.float64)
        top = float(np.quantile(both, VMAX_QUANTILE)) if both.size else 1.0
        top = top if top > 0 else (float(both.max()) if both.size and both.max() > 0 else 1.0)
        extent = (-0.5, s.true.shape[1] * stride - 0.5, s.true.shape[0] * stride - 0.5, -0.5)
        err = s.pred_count - s.true_count
        for ax, dmap, label in ((row_axes[1], s.true, f"true: {s.true_count:.0f} people"),
                                (row_axes[2], s.pred, f"predicted: {s.pred_count:.1f} "
                                                      f"(error {err:+.1f})")):
            im = ax.imshow(dmap, cmap=DENSITY_CMAP, vmin=0, vmax=top, interpolation="nearest", extent=extent)
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_title(label, fontsize=9)
            add_colorbar(fig, im, ax, _cell_units(stride))
        for ax in row_axes:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    return finish_figure(fig, name)
