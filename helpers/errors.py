"""The project's exception types.

Every error a student can cause with bad input (a wrong path, a corrupt file, a checkpoint from
another model) is raised as a subclass of :class:`CrowdError` with a message that says what is
wrong, which file, and what to do. Command-line entry points print that one line and exit 1.
"""

from __future__ import annotations


class CrowdError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


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
