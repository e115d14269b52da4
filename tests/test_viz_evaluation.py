"""Evaluation figures: each runs on tiny inputs and writes a PNG and a PDF into report/figures/."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.tools.evaluate import EvaluationResult, KeptImage, summarize  # noqa: E402
from helpers.viz import evaluation as ev  # noqa: E402

H, W = 48, 64


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_HOME", str(tmp_path))
    yield tmp_path
    plt.close("all")


def _saved(home, name):
    png, pdf = home / "report" / "figures" / f"{name}.png", home / "report" / "figures" / f"{name}.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    assert pdf.read_bytes()[:5] == b"%PDF-", f"{pdf} is not a PDF"
    return png


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((H, W, 3)) * 255).astype(np.uint8)


def _density(points, shape=(H, W)):
    d = np.zeros(shape, np.float32)
    for x, y in points:
        d[int(y), int(x)] += 1.0
    return d


def _rows(true, pred):
    from helpers.tools.evaluate import bucket_of

    return [{"name": f"IMG_{i}", "true_count": t, "pred_count": p, "error": p - t, "abs_error": abs(p - t),
             "bucket": bucket_of(t), "seconds": 0.1} for i, (t, p) in enumerate(zip(true, pred, strict=True))]


def _result(name, true, pred, n_keep=2):
    rows = _rows(true, pred)
    kept = []
    rng = np.random.default_rng(1)
    for row in rows:
        pts = np.column_stack([rng.uniform(0, W, 5), rng.uniform(0, H, 5)])
        kept.append(KeptImage(row["name"], _image(), pts, _density(pts) * 0.9, pts + 1.0, row))
    kept.sort(key=lambda k: k.abs_error)
    return EvaluationResult(name, rows, summarize(rows, name=name), best=kept[:n_keep],
                            worst=kept[::-1][:n_keep])


def test_density_overlay(home):
    pts = np.array([[10.0, 10.0], [30.0, 20.0], [50.5, 40.2]])
    fig = ev.density_overlay(_image(), _density(pts), 3, 2.7, title="IMG_1", points=pts,
                             name="t_overlay")
    assert "true 3" in fig.axes[0].get_title() and "2.7" in fig.axes[0].get_title()
    assert len(fig.axes) == 2  # image + colour bar
    _saved(home, "t_overlay")


def test_error_panels_and_block_sums(home):
    true = _density([[5.0, 5.0], [40.0, 30.0]])
    pred = _density([[6.0, 5.0]]) * 1.5
    fig = ev.error_panels(true, pred, block=16, title="IMG_1", name="t_error")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("ground truth: 2.0") and "-0.5" in titles[2]
    assert len(fig.axes) == 6  # three panels, three colour bars
    _saved(home, "t_error")
    sums = ev.block_sums(pred - true, 16)
    assert sums.shape == (3, 4) and sums.sum() == pytest.approx(-0.5)
    assert sums[0, 0] == pytest.approx(0.5) and sums[1, 2] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="image resolution"):
        ev.error_panels(true, pred[:8, :8])


def test_points_figure_legend_counts(home):
    true = np.array([[10.0, 10.0], [30.0, 30.0], [50.0, 10.0]])
    pred = np.array([[11.0, 10.0], [30.0, 33.0], [5.0, 40.0]])  # two matches, one false alarm
    fig = ev.points_figure(_image(), pred, true, radius=4, title="IMG_1", name="t_points")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["missed head (FN): 1", "matched prediction (TP): 2", "false alarm (FP): 1"]
    assert "precision 0.67, recall 0.67, F1 0.67" in fig.axes[0].get_title()
    _saved(home, "t_points")
    ev.points_figure(_image(), None, true)  # a predictor without points: everything missed


def test_count_scatter_several_models(home):
    a = _result("model A", [10, 60, 120, 300], [12, 50, 130, 280])
    fig = ev.count_scatter({"model A": a, "mean": ([10, 60, 120, 300], [122.5] * 4)}, name="t_scatter")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "model A (MAE 10.5)" and labels[1] == "mean (MAE 88.8)"  # (112.5 + 62.5 + 2.5 + 177.5) / 4 = 88.75
    assert labels[2].startswith("identity")
    assert fig.axes[0].get_xlabel() == "true count (people)"
    _saved(home, "t_scatter")
    ev.count_scatter({"A": a}, log=True)


def test_error_by_bucket_several_models(home):
    a = _result("A", [10, 60, 120, 300, 40], [12, 50, 130, 280, 40])
    b = _result("B", [10, 60, 120, 300, 40], [30, 80, 100, 200, 45])
    fig = ev.error_by_bucket({"A": a, "B": b.summary, "B rows": b.rows}, name="t_buckets")
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["0-49\n(2 img)", "50-99\n(1 img)", "100-249\n(1 img)", "250-499\n(1 img)"]
    heights = [p.get_height() for p in ax.patches[:4]]
    assert heights == pytest.approx([1.0, 10.0, 10.0, 20.0])  # model A's MAE per bucket
    _saved(home, "t_buckets")


def test_best_worst_grid(home):
    r = _result("A", [10, 60, 120, 300], [12, 50, 130, 280], n_keep=2)
    fig = ev.best_worst_grid(r, n=2, name="t_grid")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "IMG_0: true 10, pred 12.0 (+2.0)"
    assert titles[2] == "IMG_3: true 300, pred 280.0 (-20.0)"
    _saved(home, "t_grid")
    with pytest.raises(ValueError, match="keep_maps"):
        ev.best_worst_grid([], [])
