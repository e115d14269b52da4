"""Figures of a training run: loss and validation error against epochs."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from helpers.viz.common import new_figure, save_figure


def _rows(history: Any) -> list[dict[str, float]]:
    """Accept a list of history rows, a TrainResult, a run folder or a history.csv path."""
    if hasattr(history, "history"):
        history = history.history
    if isinstance(history, (str, os.PathLike)):
        from helpers.tools.trainer import read_history

        return read_history(Path(history))
    return [dict(r) for r in history]


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def plot_history(history: Any, name: str | None = None, title: str | None = None):
    """Training loss (left) and validation MAE / RMSE (right) per epoch; returns the figure.

    ``history``: the rows of :func:`helpers.tools.trainer.train` (``result.history`` or the result
    itself), a run folder or its ``history.csv``. The epoch with the lowest validation MAE is
    marked. With ``name`` the figure is also saved to ``report/figures/<name>.png`` and ``.pdf``.
    """
    rows = _rows(history)
    fig, (ax_loss, ax_val) = new_figure(ncols=2, width=5.5, height=3.8)
    epochs = [int(r["epoch"]) for r in rows]
    loss = [float(r.get("train_loss", float("nan"))) for r in rows]
    ax_loss.plot(epochs, loss, marker="o", ms=3, color="tab:blue", label="training loss")
    positive = _finite(loss)
    if positive and min(positive) > 0 and max(positive) / min(positive) > 20:
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (MSE on scaled density)")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)

    val = [(e, float(r.get("val_mae", float("nan"))), float(r.get("val_rmse", float("nan"))))
           for e, r in zip(epochs, rows, strict=True)]
    val = [v for v in val if math.isfinite(v[1])]
    if val:
        ve, mae, rmse = zip(*val, strict=True)
        ax_val.plot(ve, mae, marker="o", ms=3, color="tab:red", label="val MAE")
        ax_val.plot(ve, rmse, marker="s", ms=3, color="tab:orange", alpha=0.8, label="val RMSE")
        best = min(range(len(mae)), key=lambda i: mae[i])
        ax_val.axvline(ve[best], color="gray", ls="--", lw=1)
        ax_val.scatter([ve[best]], [mae[best]], s=80, facecolors="none", edgecolors="black", zorder=3,
                       label=f"best: MAE {mae[best]:.2f} (epoch {ve[best]})")
        ax_val.legend(loc="upper right", fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("count error (people per image)")
    ax_val.set_title("Validation error")
    ax_val.grid(alpha=0.3)
    for ax in (ax_loss, ax_val):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if name:
        save_figure(fig, name)
    return fig
