"""Your own data: a folder of annotated images, and ``crowd import-points`` that arranges one.

:func:`records_in_folder` lists a folder of images with a points file next to each
(``IMG.csv``/``.txt``/``.json`` or UCF-QNRF ``IMG_ann.mat``). :func:`import_points` reads the
export of an annotation tool (LabelMe, CVAT, VIA: :mod:`helpers.tools.annotations`) and writes a
dataset in the ShanghaiTech layout that ``crowd train/evaluate/density --data-root`` read::

    DATASET/part_B/train_data/images/<name>.jpg
    DATASET/part_B/train_data/ground-truth/GT_<name>.mat    (or images/<name>.csv)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from helpers import data
from helpers.errors import AnnotationError, DatasetNotFoundError
from helpers.tools.annotations import FORMATS, AnnotatedImage, read_export


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


@dataclass
class ImportSummary:
    """What :func:`import_points` wrote: where, how many images and heads, and notes to read."""

    root: str
    part: str
    split: str
    images: int
    heads: int
    outside: int  # points outside their image (kept in the file; dropped when loaded)
    names: list[str]
    split_images: int  # images now in the split (earlier imports included)
    fit: int | None = None  # train split: how helpers.data.split_fit_val cuts it
    val: int | None = None
    notes: list[str] = field(default_factory=list)


def locate_image(item: AnnotatedImage, images_dir: str | Path | None = None) -> Path | None:
    """The image file of an exported annotation: as named, else in ``images_dir``, else in an
    ``images/`` folder or the export's folder by file name (CVAT zips keep images in ``images/``).

    Inputs:
    - item: AnnotatedImage; images_dir: folder to look in first, or None
    Returns:
    - path: Path of the image, or None when no candidate exists
    """
    base, name = item.source.parent, item.image.name
    candidates = [Path(images_dir) / name] if images_dir is not None else []
    candidates += [item.image, base / "images" / name, base / name]
    return next((c for c in candidates if c.is_file()), None)


def _check_item(item: AnnotatedImage, image: Path | None) -> tuple[int, int]:
    """The image's (height, width), checked against the size the tool recorded."""
    if image is None and item.image_data is None:
        raise AnnotationError(f"{item.source}: the image {item.image.name} it annotates was not found "
                              f"(looked for {item.image}, and by name in images/ and next to the "
                              "export). Put the images there or pass --images DIR.")
    if image is not None:
        height, width = data.image_size(image)
    else:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(item.image_data)) as im:
            width, height = im.size
    if item.size is not None and tuple(item.size) != (height, width):
        raise AnnotationError(f"{item.source}: {item.image.name} was annotated at {item.size[1]}x{item.size[0]} "
                              f"pixels but the image file is {width}x{height}: the points would not fit it. "
                              "Use the image the tool was given, not a resized copy.")
    return height, width


def _targets(split_dir: Path, name: str, suffix: str, points_format: str) -> tuple[Path, Path, Path]:
    """(image, points file, the other format's points file) for one image."""
    mat = split_dir / "ground-truth" / f"GT_{name}.mat"
    csv_file = split_dir / "images" / f"{name}.csv"
    return (split_dir / "images" / f"{name}{suffix.lower()}",
            *((mat, csv_file) if points_format == "mat" else (csv_file, mat)))


def _write_points(path: Path, points: np.ndarray) -> None:
    from helpers.tools.fileio import write_text_atomic
    from helpers.tools.synth import write_points_mat

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mat":
        write_points_mat(path, points)
    else:
        write_text_atomic(path, "x,y\n" + "".join(f"{x!r},{y!r}\n" for x, y in points.tolist()))


def _place_image(item: AnnotatedImage, image: Path | None, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    if image is None:
        target.write_bytes(item.image_data)
    elif link:
        os.symlink(image.resolve(), target)
    else:
        shutil.copyfile(image, target)


def import_points(source: str | Path, fmt: str, out: str | Path, *, part: str = "B", split: str = "train",
                  label: str | None = None, images_dir: str | Path | None = None, link: bool = False,
                  points_format: str = "mat", overwrite: bool = False) -> ImportSummary:
    """Arrange an annotation tool's export as a ShanghaiTech-layout dataset at ``out``.

    Inputs:
    - source: the export file or folder; fmt: "labelme", "cvat" or "via"
    - out: dataset root to write (created); part: "A" or "B"; split: "train" or "test"
    - label: keep only shapes with this label (None: every point shape)
    - images_dir: folder holding the images (None: where the export says, or beside it)
    - link: symbolic links instead of copies; points_format: "mat" (GT_<name>.mat) or "csv"
    - overwrite: replace images of the same name already in the split (else refused)
    Returns:
    - summary: ImportSummary (also the JSON that ``crowd import-points`` prints)
    """
    part = str(part).upper().removeprefix("PART_")
    if part not in data.PARTS or split not in data.OFFICIAL_SPLITS or points_format not in ("mat", "csv"):
        raise AnnotationError(f"part must be A or B, split train or test, points mat or csv; got {part!r}, "
                              f"{split!r}, {points_format!r}.")
    items = read_export(source, fmt, label=label)
    if not items:
        raise AnnotationError(f"{source}: the {fmt} export names no images.")
    names = [it.name for it in items]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise AnnotationError(f"{source}: several images are named {twice} (without extension); rename them.")
    split_dir = Path(out).expanduser() / f"part_{part}" / f"{split}_data"
    plan = []
    for item, name in zip(items, names, strict=True):
        image = locate_image(item, images_dir)
        height, width = _check_item(item, image)
        suffix = (image or item.image).suffix or ".jpg"
        targets = _targets(split_dir, name, suffix, points_format)
        taken = [t for t in targets if t.exists() or t.is_symlink()]
        if taken and not overwrite:
            raise AnnotationError(f"{taken[0]} already exists; pass --overwrite to replace it, or choose "
                                  "another --out.")
        plan.append((item, image, targets, height, width))
    outside = 0
    for item, image, (image_target, points_target, other), height, width in plan:
        _place_image(item, image, image_target, link)
        other.unlink(missing_ok=True)
        _write_points(points_target, item.points)
        pts = item.points
        outside += int(((pts[:, 0] < 0) | (pts[:, 0] >= width) | (pts[:, 1] < 0) | (pts[:, 1] >= height)).sum())
    return _summary(Path(out).expanduser(), part, split, items, names, outside)


def _summary(root: Path, part: str, split: str, items: list[AnnotatedImage], names: list[str],
             outside: int) -> ImportSummary:
    records = data.list_records(part, split, root)
    summary = ImportSummary(str(root.resolve()), part, split, len(items), sum(len(it.points) for it in items),
                            outside, names, len(records))
    if outside:
        summary.notes.append(f"{outside} point(s) lie outside their image; they are dropped when the "
                             "images are loaded (helpers.data.clean_points).")
    if split == "train":
        fit, val = data.split_fit_val(records)
        summary.fit, summary.val = len(fit), len(val)
        if len(records) < 2:
            summary.notes.append(f"the train split has {len(records)} image(s): training needs at least 2 "
                                 "(one is held out for validation). Import more images.")
        elif len(val) == 1:
            summary.notes.append(f"validation uses 1 image of {len(records)} (helpers.data.split_fit_val "
                                 "keeps 10 %, at least one): its MAE is a noisy guide; annotate more images "
                                 "when you can.")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``crowd import-points``."""
    p.description = ("Read head points exported by LabelMe (JSON), CVAT (for images 1.1 XML) or VIA (CSV) "
                     "and write a ShanghaiTech-layout dataset for crowd train/evaluate/density "
                     "--data-root OUT. Prints a JSON summary.")
    p.add_argument("source", help="the export: a file, or a folder (LabelMe: its .json files)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="the annotation tool")
    p.add_argument("--out", required=True, help="dataset root to write (e.g. data/my_crowds)")
    p.add_argument("--part", default="B", type=str.upper, choices=list(data.PARTS), help="part (default B)")
    p.add_argument("--split", default="train", choices=list(data.OFFICIAL_SPLITS),
                   help="train (fit + val) or test (held out; default train)")
    p.add_argument("--label", help="keep only shapes with this label (default: every point shape)")
    p.add_argument("--images", help="folder holding the images (default: as the export names them)")
    p.add_argument("--link", action="store_true", help="symbolic links instead of copies of the images")
    p.add_argument("--points", default="mat", choices=["mat", "csv"],
                   help="mat: ground-truth/GT_<name>.mat as ShanghaiTech (default); csv: images/<name>.csv")
    p.add_argument("--overwrite", action="store_true", help="replace images of the same name")


def run(args: argparse.Namespace) -> int:
    """``crowd import-points``: import, print the summary as one JSON line, return 0."""
    summary = import_points(args.source, args.format, args.out, part=args.part, split=args.split,
                            label=args.label, images_dir=args.images, link=args.link,
                            points_format=args.points, overwrite=args.overwrite)
    print(json.dumps(asdict(summary)))
    return 0
