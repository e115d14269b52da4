"""Figures for the series. Every figure a student may put in a report is made here.

``common`` holds :func:`save_figure` (PNG at 200 dpi and PDF into ``report/figures/``),
:func:`slide_style` (figures for slides) and small drawing helpers; the other modules hold the
figures of one topic each.
"""

from helpers.viz.common import (
    add_colorbar,
    figure_png,
    new_figure,
    save_figure,
    show_source,
    slide_style,
)

__all__ = ["add_colorbar", "figure_png", "new_figure", "save_figure", "show_source", "slide_style"]
