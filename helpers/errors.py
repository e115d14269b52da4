"""The project's exception types: bad input (a wrong path, a corrupt file, a checkpoint from another
model) raises a CrowdError subclass saying what is wrong, which file, and what to do."""

from __future__ import annotations

import re


class CrowdError(Exception):
    """A problem with the user's input or environment, explained in a one-line message (an error
    from a DataLoader worker, which torch re-creates with the whole traceback, is cut back to it)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0]),)
        super().__init__(*args)


def _unwrap_worker_message(message: str) -> str:
    """``"Caught XError in DataLoader worker process 0.\\nOriginal Traceback ... XError: msg"``
    (torch's ``ExceptionWrapper``) -> ``"msg (in DataLoader worker process 0)"``."""
    head = re.match(r"Caught \w+ (in [^\n]*?)\.?\nOriginal Traceback", message)
    original = head and re.match(r"[\w.]+Error: (.*)$", message.rstrip().splitlines()[-1])
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
