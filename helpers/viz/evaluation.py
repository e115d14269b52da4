"""Figures of an evaluation: where a model counts right or wrong, and how models compare.

Each function only draws arrays that :mod:`helpers.tools.evaluate` computed, returns the matplotlib
Figure and, when ``name`` is given, saves it as ``report/figures/<name>.png`` and ``.pdf``.
Coordinates are image pixels ``(x, y)``; density maps are ``H x W`` people per pixel.

Several functions take ``results``: a mapping from a model's name to an
:class:`helpers.tools.evaluate.EvaluationResult`, its ``summary`` dict, its per-image rows (as read by
:func:`helpers.tools.evaluate.read_csv`), or a ``(true_counts, pred_counts)`` pair (scatter only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from helpers.viz.common import add_colorbar, finish_figure, new_figure
from helpers.viz.density import VMAX_QUANTILE, show_density

TP_COLOUR = "#1a9641"  # matched: green
FP_COLOUR = "#d7191c"  # false alarm: red
FN_COLOUR = "#fdae61"  # missed head: orange
ERROR_CMAP = "RdBu_r"  # blue = too few predicted, red = too many


def _top(density: np.ndarray) -> float:
    """Top of a density colour scale: the 99.9 % quantile (the maximum if that is 0; 1 if empty)."""
    d = np.asarray(density, dtype=np.float64)
    if d.size == 0:
        return 1.0
    top = float(np.quantile(d, VMAX_QUANTILE))
    if top <= 0:
        top = float(d.max())
    return top if top > 0 else 1.0




# --------------------------------------------------------------------------- single images


def density_overlay(image: np.ndarray, density: np.ndarray, true_count: float, pred_count: float, *,
                    title: str | None = None, points: np.ndarray | None = None,
                    alpha: float = 0.7, name: str | None = None):
    """The predicted density over the photo with a colour bar; true and predicted counts in the title.

    ``density``: ``H x W`` people per pixel, or a map at the model's stride (``ceil(H/s) x
    ceil(W/s)`` cells). ``points``: optional predicted heads ``(M, 2)`` drawn as dots. Drawn by
    :func:`helpers.viz.predict.overlay_figure`.
    """
    from helpers.viz.predict import overlay_figure

    label = f"{title} (true {true_count:,.0f})" if title else f"true {true_count:,.0f}"
    fig = overlay_figure(image, density, float(pred_count), title=label, points=points, alpha=alpha)
    return finish_figure(fig, name)


def block_sums(density: np.ndarray, block: int) -> np.ndarray:
    """Sum ``block x block`` pixel blocks of an ``H x W`` map (zero-padded at the bottom/right).

    Returns ``(ceil(H / block), ceil(W / block))`` float64; the total is unchanged.
    """
    d = np.asarray(density, dtype=np.float64)
    b = int(block)
    if b < 1:
        raise ValueError(f"block must be >= 1 pixel, got {block}")
    h, w = d.shape
    ph, pw = -(-h // b) * b, -(-w // b) * b
    padded = np.zeros((ph, pw))
    padded[:h, :w] = d
    return padded.reshape(ph // b, b, pw // b, b).sum(axis=(1, 3))


def error_panels(true_density: np.ndarray, pred_density: np.ndarray, *, block: int = 16,
                 title: str | None = None, name: str | None = None):
    """Ground truth | prediction | error (prediction minus truth), side by side.

    Both maps ``H x W`` people per pixel at image resolution (e.g. the true map of
    :func:`helpers.density.density_map` and ``KeptImage.density``). The first two panels share
    one colour scale; the error is summed over ``block x block`` pixel blocks (people per block)
    and drawn with a diverging scale centred on 0: red where the model sees too many people,
    blue where it sees too few.
    """
    t = np.asarray(true_density, dtype=np.float64)
    p = np.asarray(pred_density, dtype=np.float64)
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(
            f"the true and predicted maps must both be H x W at image resolution, got {t.shape} and "
            f"{p.shape} (use Prediction.density, not density_lowres)"
        )
    h, w = t.shape
    fig, axes = new_figure(3, 1, width=4.6, height=4.6 * h / w + 0.8, layout="constrained")
    top = max(_top(t), _top(p))
    show_density(fig, axes[0], t, title=f"ground truth: {t.sum():,.1f} people", vmax=top)
    show_density(fig, axes[1], p, title=f"prediction: {p.sum():,.1f} people", vmax=top)
    err = block_sums(p - t, block)
    lim = float(np.max(np.abs(err))) if err.size else 0.0
    lim = lim if lim > 0 else 1.0
    im = axes[2].imshow(err, cmap=ERROR_CMAP, vmin=-lim, vmax=lim, interpolation="nearest",
                        extent=(0, err.shape[1] * block, err.shape[0] * block, 0))
    axes[2].set_xlim(0, w)
    axes[2].set_ylim(h, 0)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    axes[2].set_title(f"error (pred - true): {p.sum() - t.sum():+,.1f} people", fontsize=9)
    add_colorbar(fig, im, axes[2], f"error (people per {block}x{block} px block)")
    for ax in axes:
        ax.set_xlabel(f"{w} x {h} px", fontsize=8)
    if title:
        fig.suptitle(title)
    return finish_figure(fig, name)


def points_figure(image: np.ndarray, pred_points: np.ndarray | None, true_points: np.ndarray, *,
                  radius: float = 8.0, method: str = "hungarian", pairs: bool = False,
                  title: str | None = None, name: str | None = None):
    """Predicted heads on the photo: matches, false alarms and misses in distinct colours.

    Predictions are matched to annotated heads within ``radius`` pixels
    (:func:`helpers.metrics.match_points` with ``method``: "hungarian", one-to-one with the most
    matches, or "greedy", nearest first). Green dots: matched predictions (true positives);
    red crosses: predictions with no head nearby (false alarms); orange rings: annotated heads
    nobody predicted (misses). ``pairs=True`` (for small examples) also draws the matched heads
    as green rings, each joined to its prediction by a line. Precision, recall and F1 are in the
    title.
    """
    from helpers.metrics import match_points, scores_from_counts

    img = np.asarray(image)
    pred = np.zeros((0, 2)) if pred_points is None else np.asarray(pred_points, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true_points, dtype=np.float64).reshape(-1, 2)
    m = match_points(pred, true, radius, method=method)
    s = scores_from_counts(m.tp, m.fp, m.fn)
    matched_pred = np.zeros(len(pred), dtype=bool)
    matched_true = np.zeros(len(true), dtype=bool)
    matched_pred[m.pairs[:, 0]] = True
    matched_true[m.pairs[:, 1]] = True
    h, w = img.shape[:2]
    fig, ax = new_figure(width=8.0, height=min(12.0, 8.0 * 0.85 * h / w + 0.9), layout="constrained")
    ax.imshow(img)
    def size(n: int) -> float:
        return 8.0 if n > 1500 else 16.0 if n > 300 else 36.0

    groups = [  # misses first, so the (usually fewer) predictions are drawn on top
        (true[~matched_true], dict(marker="o", facecolors="none", edgecolors=FN_COLOUR, linewidths=1.0,
                                   s=size(len(true))), f"missed head (FN): {m.fn}"),
        (pred[matched_pred], dict(marker="o", c=TP_COLOUR, edgecolors="white", linewidths=0.5,
                                  s=size(len(pred))), f"matched prediction (TP): {m.tp}"),
        (pred[~matched_pred], dict(marker="x", c=FP_COLOUR, linewidths=1.5, s=size(len(pred))),
         f"false alarm (FP): {m.fp}"),
    ]
    if pairs:
        groups.insert(1, (true[matched_true], dict(marker="o", facecolors="none", edgecolors=TP_COLOUR,
                                                   linewidths=1.0, s=size(len(true))), f"matched head: {m.tp}"))
        for a, b in m.pairs:
            ax.plot(np.r_[pred[a, 0], true[b, 0]] - 0.5, np.r_[pred[a, 1], true[b, 1]] - 0.5, color=TP_COLOUR)
    for pts, style, label in groups:
        # point (x, y) lies in pixel (floor(y), floor(x)), drawn centred on the integer coordinate
        ax.scatter(pts[:, 0] - 0.5, pts[:, 1] - 0.5, label=label, **style)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{w} x {h} px; match radius {radius:g} px", fontsize=9)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}precision {s['precision']:.2f}, recall {s['recall']:.2f}, F1 {s['f1']:.2f} "
                 f"({len(pred)} predicted, {len(true)} annotated)", fontsize=10)
    return finish_figure(fig, name)


# --------------------------------------------------------------------------- comparisons


def _rows_of(item: Any) -> list[Mapping[str, Any]] | None:
    rows = getattr(item, "rows", None)
    if rows is not None:
        return list(rows)
    if isinstance(item, Sequence) and item and isinstance(item[0], Mapping):
        return list(item)
    return None


def _counts_of(item: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(true, pred)`` float64 arrays from a result, rows or a pair of arrays."""
    rows = _rows_of(item)
    if rows is not None:
        true = np.array([float(r["true_count"]) for r in rows])
        pred = np.array([float(r["pred_count"]) for r in rows])
        return true, pred
    if isinstance(item, (tuple, list)) and len(item) == 2:
        true, pred = (np.asarray(v, dtype=np.float64).reshape(-1) for v in item)
        if true.shape != pred.shape:
            raise ValueError(f"true and predicted counts differ in length: {true.size} vs {pred.size}")
        return true, pred
    raise TypeError("expected an EvaluationResult, its rows, or a (true_counts, pred_counts) pair")


def count_scatter(results: Mapping[str, Any], *, title: str | None = None, log: bool = False,
                  name: str | None = None):
    """Predicted against true count per image, several models in one plot, with the identity line.

    Points on the dashed line are exact; above it the model over-counts. The legend gives each
    model's MAE. ``log``: logarithmic axes (for Part A's 33 to 3139 people).
    """
    fig, ax = new_figure(width=6.0, height=5.5, layout="constrained")
    top = 1.0
    low = np.inf
    markers = "os^Dvx+*"
    for k, (label, item) in enumerate(results.items()):
        true, pred = _counts_of(item)
        if true.size == 0:
            continue
        mae = float(np.mean(np.abs(pred - true)))
        ax.scatter(true, pred, s=16, alpha=0.7, marker=markers[k % len(markers)],
                   label=f"{label} (MAE {mae:.1f})")
        top = max(top, float(true.max()), float(pred.max()))
        positive = np.concatenate([true[true > 0], pred[pred > 0]])
        if positive.size:
            low = min(low, float(positive.min()))
    lo = 0.0 if not log else (low if np.isfinite(low) else 1.0) * 0.8
    ax.plot([lo, top * 1.05], [lo, top * 1.05], "k--", linewidth=1, label="identity (pred = true)")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(lo, top * 1.05)
    ax.set_ylim(lo, top * 1.05)
    ax.set_aspect("equal")
    ax.set_xlabel("true count (people)")
    ax.set_ylabel("predicted count (people)")
    ax.set_title(title or "Predicted vs true count per image")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return finish_figure(fig, name)


def _buckets_of(item: Any) -> list[Mapping[str, Any]]:
    """The ``buckets`` list of a summary (from a result, a summary or rows)."""
    summary = getattr(item, "summary", None)
    if summary is None and isinstance(item, Mapping):
        summary = item
    if summary is not None:
        return list(summary.get("buckets") or [])
    rows = _rows_of(item)
    if rows is None:
        raise TypeError("expected an EvaluationResult, a summary dict or per-image rows")
    from helpers.tools.evaluate import summarize

    return summarize(rows)["buckets"]


def error_by_bucket(results: Mapping[str, Any], *, title: str | None = None, name: str | None = None):
    """Mean absolute count error per crowd-size bucket, one bar per model (grouped).

    Buckets are ranges of the true count (:data:`helpers.tools.evaluate.BUCKET_EDGES`); the number of
    images in each is written under its label. Errors grow with the crowd for every counter; the
    question is how fast.
    """
    from helpers.tools.evaluate import bucket_labels

    per_model = {label: {b["bucket"]: b for b in _buckets_of(item)} for label, item in results.items()}
    order = [b for b in bucket_labels() if any(b in m for m in per_model.values())]
    extra = sorted({b for m in per_model.values() for b in m} - set(order))
    order += extra
    fig, ax = new_figure(width=max(6.0, 1.2 * len(order) + 2), height=4.5, layout="constrained")
    n_models = max(1, len(per_model))
    width = 0.8 / n_models
    x = np.arange(len(order))
    for k, (label, buckets) in enumerate(per_model.items()):
        values = [buckets[b]["mae"] if b in buckets else np.nan for b in order]
        bars = ax.bar(x - 0.4 + width * (k + 0.5), values, width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    counts = []
    for b in order:
        ns = {m[b]["images"] for m in per_model.values() if b in m}
        counts.append("/".join(str(n) for n in sorted(ns)))
    ax.set_xticks(x, [f"{b}\n({n} img)" for b, n in zip(order, counts, strict=True)])
    ax.set_xlabel("true count of the image (people)")
    ax.set_ylabel("mean absolute error (people)")
    ax.set_title(title or "Count error by crowd size")
    ax.grid(axis="y", alpha=0.3)
    if per_model:
        ax.legend(fontsize=8)
    return finish_figure(fig, name)


def best_worst_grid(best: Sequence[Any] | Any, worst: Sequence[Any] | None = None, *, n: int = 4,
                    overlay: bool = True, title: str | None = None, name: str | None = None):
    """The ``n`` best (top row) and ``n`` worst (bottom row) images, counts in the titles.

    ``best``/``worst``: lists of :class:`helpers.tools.evaluate.KeptImage`; or pass an
    :class:`helpers.tools.evaluate.EvaluationResult` evaluated with ``keep_maps >= n`` as ``best``.
    ``overlay``: draw the predicted density over each photo (transparent where it is zero).
    """
    import matplotlib as mpl

    from helpers.viz.density import DENSITY_CMAP

    if worst is None:
        best, worst = list(getattr(best, "best", [])), list(getattr(best, "worst", []))
    rows = [("best", list(best)[:n]), ("worst", list(worst)[:n])]
    rows = [(label, items) for label, items in rows if items]
    if not rows:
        raise ValueError("no kept images to draw: evaluate with keep_maps=N first")
    ncols = max(len(items) for _, items in rows)
    fig, axes = new_figure(ncols, len(rows), width=3.6, height=3.2, squeeze=False, layout="constrained")
    cmap = mpl.colormaps[DENSITY_CMAP]
    mappable = None
    for r, (label, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                continue
            k = items[c]
            img = np.asarray(k.image)
            ax.imshow(img)
            if overlay and k.density is not None and np.asarray(k.density).shape == img.shape[:2]:
                d = np.asarray(k.density, dtype=np.float64)
                norm = mpl.colors.Normalize(0.0, _top(d))
                level = np.clip(norm(d), 0, 1)
                rgba = cmap(level)
                rgba[..., 3] = 0.6 * np.sqrt(level)
                ax.imshow(rgba)
                mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0.0, 1.0), cmap=cmap)
            err = k.pred_count - k.true_count
            ax.set_title(f"{k.name}: true {k.true_count}, pred {k.pred_count:.1f} ({err:+.1f})", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{label} {len(items)}", fontsize=10)
    if mappable is not None:
        cbar = fig.colorbar(mappable, ax=axes, fraction=0.02, pad=0.01)
        cbar.set_label("predicted density (fraction of each image's 99.9 % quantile)")
    fig.suptitle(title or "Smallest and largest count errors")
    return finish_figure(fig, name)
