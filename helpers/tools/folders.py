"""Your own data: records for a folder of images with a points file next to each image (or none).

Points files: ``IMG.csv`` / ``IMG.txt`` (x, y per line), ``IMG.json`` or UCF-QNRF ``IMG_ann.mat``,
found by :func:`helpers.data.find_points_file` and read by :func:`helpers.data.read_points`.
"""

from __future__ import annotations

from pathlib import Path

from helpers import data
from helpers.errors import DatasetNotFoundError


def records_in_folder(folder: str | Path) -> list[data.ImageRecord]:
    """Records for a user's own folder of images, each with a points file next to it (or none).

    Inputs:
    - folder: folder of images (not recursive)
    Returns:
    - records: list of ImageRecord in natural order (points_path None when no annotation)
    """
    if not Path(folder).is_dir():
        raise DatasetNotFoundError(f"{folder} is not a folder of images. Check the path.")
    return [data.ImageRecord(p.stem, p, data.find_points_file(p)) for p in data.list_images(Path(folder))]
