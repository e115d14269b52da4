"""Quoting a library's exception inside our own one-line error messages."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library's exception on one line, for quoting inside our own messages.

    Inputs:
    - exc: the exception (h5py and torch messages can span several lines)
    - limit: int, maximum length of the text in characters
    Returns:
    - text: str, ``"Type: message"`` on one line
    """
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
