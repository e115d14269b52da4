"""Head points from the exports of annotation tools: LabelMe JSON, CVAT for images 1.1 XML, VIA CSV.

Each reader returns :class:`AnnotatedImage` items: the image file the export names and its
``(N, 2)`` float64 ``(x, y)`` points in pixels, exactly as the tool wrote them. A head is a
``point`` shape; a ``circle`` counts as its centre (some people circle heads); any other shape
(rectangle, polygon, ...) is refused, so that boxes drawn around heads are never silently
dropped. A file that cannot be read raises :class:`helpers.errors.AnnotationError` naming the
file, the line (JSON: line and column, or the shape's index; XML: the element's line; CSV: the
row's line) and what is wrong. docs/data.md ("Your own data") describes the formats.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

import numpy as np

from helpers.errors import AnnotationError

FORMATS = ("labelme", "cvat", "via")
#: VIA's CSV header: version 2 writes it without ``#``, versions 1.0.x with it.
VIA_COLUMNS = ("filename", "file_size", "file_attributes", "region_count", "region_id",
               "region_shape_attributes", "region_attributes")
_HINT = "Mark each head with one point (a circle counts as its centre)."


@dataclass(frozen=True)
class AnnotatedImage:
    """One image named by an export, with its head points.

    ``image``: where the export says the image is (it may not exist); ``points``: float64
    ``(N, 2)`` ``(x, y)`` pixels; ``source``: the export file; ``size``: ``(height, width)`` the
    tool recorded, or None; ``image_data``: the image bytes a LabelMe file embeds, or None.
    """

    image: Path
    points: np.ndarray
    source: Path
    size: tuple[int, int] | None = None
    image_data: bytes | None = None

    @property
    def name(self) -> str:
        return self.image.stem


def _number(value, where: str, what: str) -> float:
    """``value`` as a finite float, else AnnotationError naming ``where``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or isinstance(value, bool):
        raise AnnotationError(f"{where}: {what} must be a finite number, got {value!r}. {_HINT}")
    return number


def _points(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------- LabelMe


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}). "
                              "Save it again from the annotation tool.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path} could not be read as UTF-8 text ({exc}).") from exc


def read_labelme(path: str | Path, *, label: str | None = None) -> AnnotatedImage:
    """Head points of one LabelMe file: ``shapes`` of ``shape_type`` "point" (or "circle").

    Inputs:
    - path: a LabelMe ``.json`` file (keys ``shapes``, ``imagePath``, ``imageHeight``, ...)
    - label: str, keep only shapes with this label; None keeps every point shape
    Returns:
    - item: AnnotatedImage, its image resolved against the JSON file's folder
    """
    path = Path(path)
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list) or "imagePath" not in doc:
        raise AnnotationError(f"{path}: not a LabelMe file (it needs a 'shapes' list and 'imagePath').")
    rows = []
    for i, shape in enumerate(doc["shapes"]):
        where = f"{path}, shape {i}"
        if not isinstance(shape, dict):
            raise AnnotationError(f"{where}: expected an object with 'shape_type' and 'points'.")
        if label is not None and shape.get("label") != label:
            continue
        kind = shape.get("shape_type") or "polygon"  # LabelMe's default when the key is absent
        pts = shape.get("points")
        if kind not in ("point", "circle"):
            raise AnnotationError(f"{where} (label {shape.get('label')!r}) is a {kind}, not a head point. {_HINT}")
        if not isinstance(pts, list) or not pts or not isinstance(pts[0], list) or len(pts[0]) != 2:
            raise AnnotationError(f"{where}: 'points' must be [[x, y], ...], got {pts!r}.")
        rows.append([_number(pts[0][0], where, "x"), _number(pts[0][1], where, "y")])
    size = None
    if isinstance(doc.get("imageHeight"), int) and isinstance(doc.get("imageWidth"), int):
        size = (doc["imageHeight"], doc["imageWidth"])
    data = None
    if doc.get("imageData"):
        try:
            data = base64.b64decode(doc["imageData"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise AnnotationError(f"{path}: 'imageData' is not valid base64 ({exc}).") from exc
    image = path.parent / str(doc["imagePath"]).replace("\\", "/")
    return AnnotatedImage(image, _points(rows), path, size, data)


# --------------------------------------------------------------------------- CVAT


class _CvatHandler:
    """expat callbacks collecting ``<image>`` elements and their ``<points>`` children."""

    def __init__(self, path: Path, parser, label: str | None) -> None:
        self.path, self.parser, self.label = path, parser, label
        self.items: list[AnnotatedImage] = []
        self.stack: list[str] = []
        self.image: dict | None = None
        self.version_text: list[str] | None = None
        self.version = ""

    def where(self) -> str:
        return f"{self.path}, line {self.parser.CurrentLineNumber}"

    def start(self, tag: str, attrs: dict) -> None:
        parent = self.stack[-1] if self.stack else None
        self.stack.append(tag)
        if tag == "track":
            raise AnnotationError(f"{self.where()}: <track> is CVAT for video; export the task as "
                                  "'CVAT for images 1.1' instead.")
        if tag == "version" and parent == "annotations":
            self.version_text = []
        elif tag == "image" and parent == "annotations":
            if not attrs.get("name"):
                raise AnnotationError(f"{self.where()}: <image> has no name attribute.")
            size = None
            if "width" in attrs and "height" in attrs:
                size = (int(_number(attrs["height"], self.where(), "height")),
                        int(_number(attrs["width"], self.where(), "width")))
            self.image = {"name": attrs["name"], "size": size, "rows": []}
        elif parent == "image" and self.image is not None:
            self._shape(tag, attrs)

    def _shape(self, tag: str, attrs: dict) -> None:
        if tag == "tag" or (self.label is not None and attrs.get("label") != self.label):
            return
        if tag != "points":
            raise AnnotationError(f"{self.where()}: <{tag} label={attrs.get('label')!r}> is not a head "
                                  f"point. {_HINT}")
        text = attrs.get("points", "")
        for pair in text.split(";"):
            xy = pair.split(",")
            if len(xy) != 2:
                raise AnnotationError(f"{self.where()}: points=\"{text}\" must be 'x,y' pairs separated by ';'.")
            self.image["rows"].append([_number(v, self.where(), c) for v, c in zip(xy, "xy", strict=True)])

    def text(self, data: str) -> None:
        if self.version_text is not None:
            self.version_text.append(data)

    def end(self, tag: str) -> None:
        self.stack.pop()
        if tag == "version" and self.version_text is not None:
            self.version, self.version_text = "".join(self.version_text).strip(), None
            if not self.version.startswith("1."):
                raise AnnotationError(f"{self.where()}: CVAT XML version {self.version!r}; this reader "
                                      "knows 'CVAT for images 1.1'. Export in that format.")
        elif tag == "image" and self.image is not None:
            img = self.image
            image = self.path.parent / img["name"].replace("\\", "/")
            self.items.append(AnnotatedImage(image, _points(img["rows"]), self.path, img["size"]))
            self.image = None


def read_cvat(path: str | Path, *, label: str | None = None) -> list[AnnotatedImage]:
    """Head points of a CVAT for images 1.1 export (``annotations.xml``).

    Inputs:
    - path: the XML file: ``<annotations><image name=.. width=.. height=..><points
      points="x1,y1;x2,y2" .../></image>...``
    - label: str, keep only shapes with this label; None keeps every ``<points>`` shape
    Returns:
    - items: list of AnnotatedImage in file order, images resolved against the XML file's folder
    """
    path = Path(path)
    parser = expat.ParserCreate()
    handler = _CvatHandler(path, parser, label)
    parser.StartElementHandler, parser.EndElementHandler = handler.start, handler.end
    parser.CharacterDataHandler = handler.text
    try:
        with open(path, "rb") as fh:
            parser.ParseFile(fh)
    except expat.ExpatError as exc:
        raise AnnotationError(f"{path}, line {exc.lineno} column {exc.offset + 1}: not well-formed XML "
                              f"({expat.errors.messages[exc.code]}). Export the annotations again.") from exc
    except OSError as exc:
        raise AnnotationError(f"{path} could not be read ({exc}).") from exc
    if not handler.version and not handler.items:
        raise AnnotationError(f"{path}: no <annotations> with <image> elements: not a CVAT for images export.")
    return handler.items


# --------------------------------------------------------------------------- VIA


def _via_row(row: list[str], where: str, label: str | None) -> list[float] | None:
    """The head point of one VIA region row, or None for an empty row or another label."""
    try:
        shape = json.loads(row[5] or "{}")
        attributes = json.loads(row[6] or "{}")
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{where}: a region column is not valid JSON ({exc.msg}).") from exc
    if not isinstance(shape, dict) or not isinstance(attributes, dict):
        raise AnnotationError(f"{where}: region_shape_attributes and region_attributes must be JSON objects.")
    if not shape:
        return None  # VIA writes an image without regions as region_count 0 and "{}"
    if label is not None and label not in map(str, attributes.values()):
        return None
    if shape.get("name") not in ("point", "circle"):
        raise AnnotationError(f"{where}: region shape {shape.get('name')!r} is not a head point. {_HINT}")
    return [_number(shape.get("cx"), where, "cx"), _number(shape.get("cy"), where, "cy")]


def read_via_csv(path: str | Path, *, label: str | None = None) -> list[AnnotatedImage]:
    """Head points of a VGG Image Annotator (VIA) CSV export, one row per region.

    Inputs:
    - path: the CSV file; columns filename, file_size, file_attributes, region_count, region_id,
      region_shape_attributes (``{"name":"point","cx":..,"cy":..}``), region_attributes
    - label: str, keep only regions with an attribute of this value; None keeps every point
    Returns:
    - items: list of AnnotatedImage in order of first appearance, images resolved against the
      CSV file's folder
    """
    path = Path(path)
    rows: dict[str, list[list[float]]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.lstrip("#") for h in header] != list(VIA_COLUMNS):
                raise AnnotationError(f"{path}, line 1: not a VIA CSV export; the header must be "
                                      f"{','.join(VIA_COLUMNS)}, got {','.join(header or [])!r}.")
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if not row:
                    continue
                if len(row) != len(VIA_COLUMNS):
                    raise AnnotationError(f"{where}: {len(row)} columns instead of {len(VIA_COLUMNS)} "
                                          "(a comma in a file name must be quoted).")
                point = _via_row(row, where, label)
                rows.setdefault(row[0], [])
                if point is not None:
                    rows[row[0]].append(point)
    except csv.Error as exc:
        raise AnnotationError(f"{path}: not a readable CSV file ({exc}).") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path} could not be read as UTF-8 text ({exc}).") from exc
    return [AnnotatedImage(path.parent / name, _points(pts), path) for name, pts in rows.items()]


# --------------------------------------------------------------------------- any export


def read_export(source: str | Path, fmt: str, *, label: str | None = None) -> list[AnnotatedImage]:
    """Every annotated image of an export: a file, or a folder of them.

    Inputs:
    - source: a LabelMe ``.json`` / CVAT ``.xml`` / VIA ``.csv`` file, or a folder (its LabelMe
      ``*.json`` files, its CVAT ``annotations.xml`` or its single ``*.csv``)
    - fmt: "labelme", "cvat" or "via"
    - label: str or None, passed to the reader
    Returns:
    - items: list of AnnotatedImage
    """
    if fmt not in FORMATS:
        raise AnnotationError(f"unknown annotation format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    source = Path(source).expanduser()
    suffix = {"labelme": ".json", "cvat": ".xml", "via": ".csv"}[fmt]
    if source.is_dir():
        files = sorted(source.glob(f"*{suffix}"))
        if not files:
            raise AnnotationError(f"{source} holds no {suffix} file: no {fmt} export there.")
        if fmt != "labelme" and len(files) > 1:
            raise AnnotationError(f"{source} holds {len(files)} {suffix} files; name the export file itself.")
    elif source.is_file():
        files = [source]
    else:
        raise AnnotationError(f"{source} does not exist. Check the path of the {fmt} export.")
    if fmt == "labelme":
        return [read_labelme(f, label=label) for f in files]
    return (read_cvat if fmt == "cvat" else read_via_csv)(files[0], label=label)
