"""The project's exception types.

Every error a student can cause with bad input (a wrong path, a corrupt file, a checkpoint from
another model) is raised as a subclass of :class:`CrowdError` with a message that says what is
wrong, which file, and what to do. Command-line entry points print that one line and exit 1.
"""

from __future__ import annotations


class CrowdError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message.

    An error raised in a ``DataLoader`` worker process reaches the main process re-created by
    torch with the worker's whole traceback as its message; the constructor keeps only our
    one-line message (plus which worker), so command lines still print one clear line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0]),)
        super().__init__(*args)


def _unwrap_worker_message(message: str) -> str:
    """``"Caught XError in DataLoader worker process 0.\\nOriginal Traceback ... XError: msg"``
    (torch's ``ExceptionWrapper``) -> ``"msg (in DataLoader worker process 0)"``."""
    import re

    head = re.match(r"Caught \w+ (in [^\n]*?)\.?\nOriginal Traceback", message)
    if head is None:
        return message
    last = message.rstrip().splitlines()[-1]
    original = re.match(r"[\w.]+Error: (.*)$", last)
    return f"{original.group(1)} ({head.group(1)})" if original else message


class DatasetNotFoundError(CrowdError):
    """The dataset folder is missing or does not have the expected layout."""


class ImageReadError(CrowdError):
    """An image file is missing, not an image, truncated, or too large."""


class AnnotationError(CrowdError):
    """A head-point annotation file is missing, unreadable or has the wrong structure."""


class CacheError(CrowdError):
    """A cache file cannot be written (read-only location, disk full)."""


class CheckpointError(CrowdError):
    """A checkpoint is missing, unsafe, or belongs to another model."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` of a library's exception on one line, shortened to ``limit`` characters.

    For quoting inside our own messages: h5py and torch messages can span several lines.
    """
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
