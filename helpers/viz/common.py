"""Saving figures for the report, the slide style, and small drawing helpers shared by the topic modules.

A saved figure shows its catalogue caption (:data:`helpers.tools.report.FIGURES`) under it when a
notebook displays it. ``with slide_style(): ...`` draws figures for slides: 16:9, larger fonts
and lines.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from helpers import config

DPI = 200
#: Size of a figure drawn in :func:`slide_style`: 16:9 inches, a widescreen slide.
SLIDE_SIZE = (13.333, 7.5)
#: Matplotlib settings of :func:`slide_style`: fonts and lines readable from the back of a room.
SLIDE_RC = {
    "font.size": 18, "axes.titlesize": 22, "axes.labelsize": 20, "xtick.labelsize": 16,
    "ytick.labelsize": 16, "legend.fontsize": 16, "figure.titlesize": 24, "lines.linewidth": 3.0,
    "lines.markersize": 9, "axes.linewidth": 1.5, "xtick.major.width": 1.5, "ytick.major.width": 1.5,
}  # fmt: skip
_SLIDE: ContextVar[bool] = ContextVar("slide_style", default=False)


@contextlib.contextmanager
def slide_style() -> Iterator[None]:
    """Figures made inside are for slides: :data:`SLIDE_SIZE` (16:9) and :data:`SLIDE_RC`.

    ``with viz.slide_style(): viz_evaluation.count_scatter(results, name="05_count_scatter_B")``
    """
    import matplotlib

    token = _SLIDE.set(True)
    try:
        with matplotlib.rc_context(SLIDE_RC):
            yield
    finally:
        _SLIDE.reset(token)


def in_slide_style() -> bool:
    """True inside :func:`slide_style`."""
    return _SLIDE.get()


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("_")
    if not slug:
        raise ValueError("a figure needs a non-empty name")
    return slug.removesuffix(".png").removesuffix(".pdf")


def save_figure(fig, name: str, folder: str | Path | None = None) -> list[Path]:
    """Save ``fig`` as ``<name>.png`` (200 dpi) and ``<name>.pdf`` into ``report/figures/``.

    Returns the two paths. Each file is written to a temporary name first and then renamed, so an
    interrupted save never leaves a broken figure behind.
    """
    from helpers.tools.fileio import atomic_path

    out_dir = Path(folder) if folder is not None else config.figures_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _slug(name)
    paths = []
    for ext in ("png", "pdf"):
        target = out_dir / f"{stem}.{ext}"
        with atomic_path(target, suffix=f".{ext}") as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=ext)
        paths.append(target)
    _caption_under(fig, stem)
    return paths


def _display_with_caption(fig, caption: str) -> None:
    """Show ``fig`` and its caption once: the figure is closed afterwards, so the inline backend's
    end-of-cell display does not show it a second time when it was also the cell's value."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, Markdown, display

    display(Image(data=figure_png(fig, dpi=fig.dpi, close=False), format="png"), Markdown(caption))
    plt.close(fig)


def _caption_under(fig, stem: str) -> None:
    """When a notebook shows ``fig`` (at the end of the cell, or as its value), its catalogue
    caption is shown right under it (IPython calls ``_ipython_display_`` instead of drawing)."""
    from helpers.tools.report import figure_caption

    caption = figure_caption(stem) or "(not in the figure catalogue, helpers/tools/report.py)"
    fig._ipython_display_ = functools.partial(_display_with_caption, fig, f"**Figure `{stem}`.** {caption}")


def finish_figure(fig, name: str | None, tight: bool = False):
    """Lay out ``fig`` (``tight``), save it under ``name`` when one is given, and return it."""
    if tight:
        fig.tight_layout()
    if name is not None:
        save_figure(fig, name)
    return fig


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 4.0, **kwargs):
    """``plt.subplots`` with a size per panel in inches; returns ``(fig, axes)``.

    Inside :func:`slide_style` the whole figure is :data:`SLIDE_SIZE` (16:9) instead.
    """
    import matplotlib.pyplot as plt

    size = SLIDE_SIZE if in_slide_style() else (width * ncols, height * nrows)
    return plt.subplots(nrows, ncols, figsize=size, **kwargs)


def add_colorbar(fig, mappable, ax, label: str):
    """A colour bar beside ``ax`` with a label (units!)."""
    cbar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(label)
    return cbar


def figure_png(fig, dpi: int = 100, close: bool = True) -> bytes:
    """``fig`` rendered as PNG bytes, e.g. for an ``ipywidgets.Image``; closes the figure by default.

    An ``Image`` widget holding these bytes is the light way to redraw a picture from widget
    callbacks: it also works when the notebook is executed without a browser (nbconvert, nbval),
    where large plots inside an ``Output`` widget can stall the executor.
    """
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        plt.close(fig)
    return buffer.getvalue()


def show_source(obj) -> object:
    """The source code of a function or class, highlighted, for display in a notebook.

    Inputs:
    - obj: a function, class or method (e.g. ``helpers.density.density_map``)

    Returns:
    - an ``IPython.display.Markdown`` object: the last expression of a cell shows it; its
      ``.data`` holds the Markdown text (a fenced Python block headed by where the code lives)
    """
    import inspect

    from IPython.display import Markdown

    source = inspect.getsource(obj)
    where = f"{obj.__module__}.{obj.__qualname__}"
    lines = inspect.getsourcelines(obj)[1]
    return Markdown(f"`{where}` (line {lines}):\n\n```python\n{source.rstrip()}\n```")
