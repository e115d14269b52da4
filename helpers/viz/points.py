"""Figures about head points found in a predicted density map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from helpers.viz.common import new_figure, save_figure


def plot_heads_vs_threshold(
    thresholds: Sequence[float],
    n_heads: Sequence[int],
    count: float,
    *,
    chosen: float | None = None,
    true_count: float | None = None,
    stride: int = 8,
    title: str | None = None,
    name: str | None = None,
):
    """Number of head points against the peak threshold, with the predicted count for reference.

    Args:
        thresholds: thresholds in people per output cell (increasing).
        n_heads: the number of local maxima above each threshold
            (:func:`helpers.tools.runs.peak_counts`).
        count: the predicted count (the sum of the map), drawn as a horizontal line.
        chosen: the threshold in use, marked with a vertical line.
        true_count: the annotated count, if known, drawn as a second horizontal line.
        stride: the model's output stride (pixels per cell side), for the axis label.
        title: figure title; name: also save to ``report/figures/<name>.png`` and ``.pdf``.

    Returns the Figure.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    n = np.asarray(n_heads, dtype=np.float64)
    if t.shape != n.shape or t.ndim != 1 or not len(t):
        raise ValueError(f"thresholds and n_heads must be two 1-D sequences of equal length, got {t.shape} and {n.shape}")
    fig, ax = new_figure(width=6.0, height=3.6, layout="constrained")
    ax.plot(t, n, marker="o", ms=3, color="tab:blue", label="head points above the threshold")
    ax.axhline(count, color="tab:orange", ls="--", label=f"predicted count {count:.1f} (sum of the map)")
    if true_count is not None:
        ax.axhline(true_count, color="tab:green", ls=":", label=f"annotated count {true_count:.0f}")
    if chosen is not None:
        ax.axvline(chosen, color="gray", lw=1, label=f"threshold in use {chosen:.3g}")
    ax.set_xlabel(f"peak threshold (people per {stride} x {stride} output cell)")
    ax.set_ylabel("number of head points")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Head points found at each threshold", fontsize=11)
    if name is not None:
        save_figure(fig, name)
    return fig
