"""Saving figures for the report, and small drawing helpers shared by the topic modules."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import config

DPI = 200


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
    return paths


def finish_figure(fig, name: str | None, tight: bool = False):
    """Lay out ``fig`` (``tight``), save it under ``name`` when one is given, and return it."""
    if tight:
        fig.tight_layout()
    if name is not None:
        save_figure(fig, name)
    return fig


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 4.0, **kwargs):
    """``plt.subplots`` with a size per panel in inches; returns ``(fig, axes)``."""
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kwargs)


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
