"""Checks shared by the figure tests: a figure saved as PNG + PDF, its colour-bar labels."""

from __future__ import annotations


def assert_saved(folder, name):
    """``folder/name.png`` and ``.pdf`` exist, are not empty, and start with their magic bytes."""
    for ext in ("png", "pdf"):
        path = folder / f"{name}.{ext}"
        assert path.is_file() and path.stat().st_size > 1000, f"{path} missing or empty"
    assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def colorbar_labels(fig) -> list[str]:
    """The labels of the colour bars of ``fig``."""
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
