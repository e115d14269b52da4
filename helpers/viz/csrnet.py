"""Figures for CSRNet: which input pixels its dilated backend reaches, and pretrained vs not.

Each plotting function only draws what it is given (or cheap arithmetic on receptive-field rows
from :func:`helpers.models.receptive_field`), returns the matplotlib Figure and, when ``name`` is
not None, saves it as ``report/figures/<name>.png`` and ``.pdf``. Single dilated kernels and the
gridding of small stacks are drawn by :func:`helpers.viz.models.plot_effective_kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from helpers.viz.common import add_colorbar, finish_figure, new_figure


def input_paths_1d(layers: Sequence[Any]) -> np.ndarray:
    """Paths from each input pixel to one output, along one axis, for a chain of layers.

    ``layers``: objects with ``kernel``, ``stride`` and ``dilation`` (the rows of
    :func:`helpers.models.receptive_field`, in forward order). Output ``i`` of a layer reads
    inputs ``s i + d k`` (``k = 0 .. kernel-1``, up to a constant offset), so walking back from one
    output the footprint is up-sampled by ``s`` and convolved with the dilated kernel.

    Returns an int64 array of length ``R`` (the receptive field in input pixels). Zeros inside
    it are input pixels the output never sees; for a 2-D square network the map is the outer
    product of this line with itself. A 1 x 1 layer changes nothing.
    """
    line = np.ones(1, dtype=np.int64)
    for layer in reversed(list(layers)):
        k, s, d = int(layer.kernel), int(layer.stride), int(layer.dilation)
        if s > 1:
            up = np.zeros(s * (len(line) - 1) + 1, dtype=np.int64)
            up[::s] = line
            line = up
        taps = np.zeros(d * (k - 1) + 1, dtype=np.int64)
        taps[::d] = 1
        line = np.convolve(line, taps)
    return line


def _tap_panel(fig, ax, taps: np.ndarray, title: str) -> None:
    taps = np.asarray(taps, dtype=float)
    shown = np.ma.masked_where(taps == 0, taps)
    ax.imshow(np.zeros_like(taps), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    im = ax.imshow(shown, cmap="viridis", vmin=0, interpolation="nearest")
    n = taps.shape[0]
    ax.set_xticks(range(0, n, max(1, n // 6)))
    ax.set_yticks(range(0, n, max(1, n // 6)))
    ax.set_xlabel("input column (pixels)")
    ax.set_ylabel("input row (pixels)")
    ax.set_title(title, fontsize=9)
    add_colorbar(fig, im, ax, "paths to the output (white: never seen)")


def plot_csrnet_coverage(rows: Sequence[Any], name: str | None = None):
    """Why CSRNet's all-2 backend does not grid: coverage on the feature map and on the input.

    ``rows``: :func:`helpers.models.receptive_field` of a CSRNet (layer names ``frontend.*``,
    ``backend.*``, ``output_layer``). Left: the taps of the six dilation-2 backend convolutions
    on the stride-8 feature map (every other cell only). Right: paths from each input pixel to
    one output, along one axis, for the frontend alone and for the whole network (log scale);
    the whole network reaches every pixel of its receptive field.
    """
    rows = list(rows)
    backend = [r for r in rows if str(r.name).startswith("backend.")]
    frontend = [r for r in rows if str(r.name).startswith("frontend.")]
    if not backend or not frontend:
        raise ValueError("plot_csrnet_coverage needs the receptive-field rows of a CSRNet "
                         "(layers named frontend.* and backend.*)")
    back_line = input_paths_1d(backend)
    fig, (ax_map, ax_line) = new_figure(ncols=2, width=5.2, height=4.2)
    dil = ", ".join(str(r.dilation) for r in backend)
    unseen = float(np.mean(np.outer(back_line, back_line) == 0))
    _tap_panel(fig, ax_map, np.outer(back_line, back_line),
               f"backend alone (dilations {dil})\non the stride-8 map: {unseen:.0%} of cells never seen")
    ax_map.set_xlabel("feature-map column (cells of 8 px)")
    ax_map.set_ylabel("feature-map row (cells of 8 px)")

    for label, chain, color in (("frontend conv1_1 ... conv4_3", frontend, "tab:blue"),
                                ("whole CSRNet", rows, "tab:red")):
        line = input_paths_1d(chain).astype(float)
        offset = np.arange(len(line)) - (len(line) - 1) / 2
        zeros = int(np.sum(line == 0))
        ax_line.semilogy(offset, np.where(line > 0, line / line.sum(), np.nan), color=color, lw=1.2,
                         label=f"{label}: RF {len(line)} px, {zeros} unseen")
    ax_line.set_xlabel("input pixel offset from the output's centre (pixels)")
    ax_line.set_ylabel("share of paths (log scale)")
    ax_line.set_title("along one input axis", fontsize=9)
    ax_line.grid(alpha=0.3, which="both")
    ax_line.legend(fontsize=8, loc="lower center")
    fig.suptitle("CSRNet: gaps of the dilated backend are filled by the dense frontend")
    return finish_figure(fig, name, tight=True)


def _history_rows(history: Any) -> list[dict[str, float]]:
    if hasattr(history, "history"):
        history = history.history
    return [dict(r) for r in history]


def plot_pretrained_comparison(histories: Mapping[str, Any], name: str | None = None,
                               title: str | None = None,
                               loss_label: str = "training loss (MSE on scaled density)"):
    """Training loss (left) and validation MAE (right) per epoch for several runs.

    ``histories`` maps a label (e.g. ``"ImageNet frontend"``, ``"random init"``) to a run's
    history rows (``result.history`` of :func:`helpers.tools.trainer.train`, or the result itself).
    ``loss_label``: the left axis's label (runs trained with other losses: say what is plotted).
    """
    if not histories:
        raise ValueError("plot_pretrained_comparison needs at least one history")
    fig, (ax_loss, ax_mae) = new_figure(ncols=2, width=5.0, height=3.8)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]
    all_mae: list[float] = []
    for i, (label, history) in enumerate(histories.items()):
        rows = _history_rows(history)
        color = colors[i % len(colors)]
        epochs = [int(r["epoch"]) for r in rows]
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", ms=3, color=color,
                     label=label)
        val = [(int(r["epoch"]), float(r["val_mae"])) for r in rows if math.isfinite(float(r["val_mae"]))]
        if val:
            ve, mae = zip(*val, strict=True)
            all_mae.extend(mae)
            ax_mae.plot(ve, mae, marker="o", ms=3, color=color,
                        label=f"{label}: best {min(mae):.2f}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel(loss_label)
    ax_loss.set_title("Training loss")
    ax_mae.set_xlabel("epoch")
    ax_mae.set_ylabel("validation MAE (people per image)")
    ax_mae.set_title("Validation error")
    if all_mae and max(all_mae) - min(all_mae) < 1.0:  # nearly flat curves: show at least 1 person
        mid = 0.5 * (max(all_mae) + min(all_mae))
        ax_mae.set_ylim(mid - 0.5, mid + 0.5)
    for ax in (ax_loss, ax_mae):
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return finish_figure(fig, name, tight=True)
