"""A per-image browser over a model's test predictions, largest error first (notebook 05).

``PredictionBrowser(result, predictor, records)`` shows, for the image at a slider position, the
photo with its annotated heads (the truth), the predicted density and the error. Only widgets
that ipywidgets 7.7 and 8.x share are used (``IntSlider``, ``HTML``, ``Image``, ``VBox``); the
picture is a PNG (:func:`helpers.viz.common.figure_png`), so it also works when the notebook is
executed without a browser. :meth:`PredictionBrowser.show` is what the slider calls.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from helpers.viz.common import figure_png
from helpers.viz.dataset import draw_points
from helpers.viz.density import show_density


def browser_figure(kept, title: str | None = None):
    """Photo with true heads | predicted density, for one kept image (``KeptImage``-like).

    ``kept``: has ``image`` ``H x W x 3`` uint8, ``true_points`` ``(N, 2)``, ``density`` (``H x W``
    people per pixel, or None), ``true_count`` and ``pred_count``. A pyplot-free Figure.
    """
    from matplotlib.figure import Figure

    image = np.asarray(kept.image)
    h, w = image.shape[:2]
    fig = Figure(figsize=(10.0, 10.0 * 0.5 * h / w + 0.8), layout="constrained")
    ax_img, ax_den = fig.subplots(1, 2)
    draw_points(ax_img, image, np.asarray(kept.true_points).reshape(-1, 2),
                title=f"truth: {kept.true_count:,} annotated heads")
    if kept.density is not None:
        show_density(fig, ax_den, kept.density, title=f"predicted density: {kept.pred_count:,.1f} people")
    else:
        ax_den.set_axis_off()
        ax_den.set_title("no density map from this predictor", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


class PredictionBrowser:
    """Browse one model's scored images, sorted by absolute count error (largest first).

    Inputs: ``result`` an :class:`helpers.tools.evaluate.EvaluationResult` (its rows give the
    order; its kept images are drawn as they are); ``predictor`` and ``records`` (the
    :class:`helpers.data.ImageRecord` list that was scored): to draw the other images, each is
    read and predicted again when its turn comes (None: only kept images can be shown).
    Attributes: ``rows`` (sorted), ``slider``, ``html``, ``image``, ``widget`` (display it).
    """

    def __init__(self, result, predictor: Callable | None = None, records: Sequence | None = None,
                 *, dpi: int = 80) -> None:
        import ipywidgets as widgets

        self.model = result.model
        self.rows = sorted(result.rows, key=lambda r: -float(r["abs_error"]))
        if not self.rows:
            raise ValueError("the evaluation result has no scored images to browse")
        self.kept = {k.name: k for k in result.kept}
        self.records = {r.name: r for r in (records or [])}
        self.predictor = predictor
        self.dpi = int(dpi)
        self.slider = widgets.IntSlider(value=0, min=0, max=len(self.rows) - 1, step=1,
                                        description="rank", continuous_update=False)
        self.html = widgets.HTML(value="")
        self.image = widgets.Image(value=b"", format="png")
        self.widget = widgets.VBox([self.slider, self.html, self.image])
        self.slider.observe(self._on_change, names="value")
        self.show(0)

    def _on_change(self, change: dict[str, Any]) -> None:
        self.show(int(change["new"]))

    def _kept(self, name: str):
        if name in self.kept:
            return self.kept[name]
        if self.predictor is None or name not in self.records:
            return None
        from helpers.data import load_example
        from helpers.tools.evaluate import KeptImage

        example = load_example(self.records[name])
        count, density, points = self.predictor(example.image)
        row = next(r for r in self.rows if r["name"] == name)
        self.kept[name] = KeptImage(name, example.image, example.points, density, points, row)
        return self.kept[name]

    def caption(self, index: int) -> str:
        """The HTML line of the image at ``index``: rank, name, truth, prediction, error."""
        row = self.rows[index]
        error = float(row["pred_count"]) - float(row["true_count"])
        word = "too many" if error > 0 else "too few" if error < 0 else "exact"
        return (f"<b>{index + 1} of {len(self.rows)}</b> (largest error first), {html.escape(self.model)}: "
                f"<code>{html.escape(str(row['name']))}</code>, truth <b>{int(row['true_count']):,}</b>, "
                f"predicted <b>{float(row['pred_count']):,.1f}</b>, error <b>{error:+,.1f}</b> ({word})")

    def show(self, index: int) -> None:
        """Draw the image at ``index`` of :attr:`rows` into the widgets (the slider's callback)."""
        index = int(np.clip(index, 0, len(self.rows) - 1))
        self.html.value = self.caption(index)
        kept = self._kept(str(self.rows[index]["name"]))
        if kept is None:
            self.html.value += ("<br><i>not kept by the evaluation: pass predictor= and records= to "
                                "browse every image</i>")
            self.image.value = b""
            return
        self.image.value = figure_png(browser_figure(kept), dpi=self.dpi)
