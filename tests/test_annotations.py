"""Readers of annotation-tool exports (LabelMe, CVAT for images 1.1, VIA CSV) and crowd import-points.

The fixtures are written by hand as the tools write them (LabelMe 5.x JSON; CVAT's XML format
document, version 1.1, annotation mode; VIA 2's ``pack_via_metadata('csv')``), with known points.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers import data
from helpers.errors import AnnotationError, CrowdError
from helpers.tools import annotations, folders

H, W = 60, 80
POINTS = {"a": [[10.5, 20.25], [30.0, 40.75], [79.5, 59.5]], "b": [[1.0, 2.0]], "c": []}


def _jpeg(path, height=H, width=W):
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
    return path


def _labelme(folder, name, points, *, extra_shapes=(), height=H, width=W, image_path=None, image_data=None):
    shapes = [{"label": "head", "points": [p], "group_id": None, "description": "", "shape_type": "point",
               "flags": {}, "mask": None} for p in points]
    doc = {"version": "5.5.0", "flags": {}, "shapes": shapes + list(extra_shapes),
           "imagePath": image_path or f"{name}.jpg", "imageData": image_data,
           "imageHeight": height, "imageWidth": width}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>7</id>
      <name>heads</name>
      <size>3</size>
      <mode>annotation</mode>
      <labels>
        <label><name>head</name><color>#ff0000</color><type>points</type><attributes></attributes></label>
      </labels>
    </task>
  </meta>
  <image id="0" name="a.jpg" width="80" height="60">
    <points label="head" source="manual" occluded="0" points="10.50,20.25;30.00,40.75" z_order="0">
    </points>
    <points label="head" source="manual" occluded="0" points="79.50,59.50" z_order="0">
    </points>
    <tag label="good_frame" source="manual"></tag>
  </image>
  <image id="1" name="b.jpg" width="80" height="60">
    <points label="head" source="manual" occluded="0" points="1.00,2.00" z_order="0">
    </points>
    <points label="dog" source="manual" occluded="0" points="5.00,5.00" z_order="0">
    </points>
  </image>
  <image id="2" name="c.jpg" width="80" height="60">
  </image>
</annotations>
"""

VIA_HEADER = "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes"


def _via_line(name, count, index, shape, attributes=None):
    def esc(obj):
        return '"' + json.dumps(obj, separators=(",", ":")).replace('"', '""') + '"'
    return f"{name},1234,\"{{}}\",{count},{index},{esc(shape)},{esc(attributes or {})}"


def _via(points):
    lines = [VIA_HEADER]
    for name, pts in points.items():
        if not pts:
            lines.append(f'{name}.jpg,1234,"{{}}",0,0,"{{}}","{{}}"')  # VIA's row for an image without regions
        for i, (x, y) in enumerate(pts):
            lines.append(_via_line(f"{name}.jpg", len(pts), i, {"name": "point", "cx": x, "cy": y},
                                   {"type": "head"}))
    return "\n".join(lines)


@pytest.fixture()
def images(tmp_path):
    for name in POINTS:
        _jpeg(tmp_path / f"{name}.jpg")
    return tmp_path


def _by_name(items):
    return {it.name: it.points for it in items}


# --------------------------------------------------------------------------- reading


def test_three_formats_give_the_known_points(images):
    for name, pts in POINTS.items():
        _labelme(images, name, pts)
    (images / "annotations.xml").write_text(CVAT)
    (images / "via.csv").write_text(_via(POINTS))
    for fmt, src in (("labelme", images), ("cvat", images / "annotations.xml"), ("via", images / "via.csv")):
        got = _by_name(annotations.read_export(src, fmt, label="head"))
        assert sorted(got) == sorted(POINTS), fmt
        for name, pts in POINTS.items():
            assert got[name].dtype == np.float64 and got[name].shape == (len(pts), 2)
            np.testing.assert_array_equal(got[name], np.asarray(pts, float).reshape(-1, 2), err_msg=fmt)


def test_sizes_and_labels(images):
    items = annotations.read_cvat(_write(images / "annotations.xml", CVAT))
    assert [it.size for it in items] == [(H, W)] * 3
    assert len(_by_name(items)["b"]) == 2  # no label filter: the "dog" point counts too
    assert annotations.read_labelme(_labelme(images, "a", POINTS["a"])).size == (H, W)


def _write(path, text):
    path.write_text(text)
    return path


def test_circles_count_as_their_centre(images):
    circle = {"label": "head", "points": [[40.0, 30.0], [45.0, 30.0]], "group_id": None,
              "shape_type": "circle", "flags": {}}
    pts = annotations.read_labelme(_labelme(images, "a", [], extra_shapes=[circle])).points
    np.testing.assert_array_equal(pts, [[40.0, 30.0]])
    via = _write(images / "v.csv", "\n".join([VIA_HEADER, _via_line("a.jpg", 1, 0, {"name": "circle", "cx": 7,
                                                                                   "cy": 9, "r": 4})]))
    np.testing.assert_array_equal(annotations.read_via_csv(via)[0].points, [[7.0, 9.0]])


def test_via_1_header_with_hash_is_accepted(images):
    text = "#" + _via({"a": POINTS["a"]})
    np.testing.assert_array_equal(annotations.read_via_csv(_write(images / "v.csv", text))[0].points, POINTS["a"])


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("text, expected", [
    ('{\n  "shapes": [\n    {"label": "head",, }\n  ]\n}', "line 3 column"),
    ('[1, 2]', "not a LabelMe file"),
])
def test_labelme_bad_json(tmp_path, text, expected):
    path = _write(tmp_path / "x.json", text)
    with pytest.raises(AnnotationError, match=expected) as info:
        annotations.read_labelme(path)
    assert str(path) in str(info.value)


def test_labelme_box_is_refused_by_index(tmp_path):
    box = {"label": "head", "points": [[1, 2], [5, 6]], "shape_type": "rectangle", "flags": {}}
    path = _labelme(tmp_path, "a", POINTS["a"], extra_shapes=[box])
    with pytest.raises(AnnotationError, match=r"shape 3 .*rectangle, not a head point") as info:
        annotations.read_labelme(path)
    assert str(path) in str(info.value)
    nan = {"label": "head", "points": [["x", 2]], "shape_type": "point"}
    with pytest.raises(AnnotationError, match=r"shape 0: x must be a finite number"):
        annotations.read_labelme(_labelme(tmp_path, "b", [], extra_shapes=[nan]))


@pytest.mark.parametrize("edit, line, expected", [
    (lambda t: t.replace("</points>", "</point>", 1), 17, "not well-formed XML .mismatched tag"),
    (lambda t: t.replace('points="1.00,2.00"', 'points="1.00;2.00"'), 23, "must be 'x,y' pairs"),
    (lambda t: t.replace('points="79.50,59.50"', 'points="79.50,abc"'), 18, "y must be a finite number"),
    (lambda t: t.replace('<tag label="good_frame" source="manual"></tag>',
                         '<box label="head" xtl="1" ytl="1" xbr="2" ybr="2"></box>'),
     20, "<box label='head'> is not a head point"),
    (lambda t: t.replace('<image id="2" name="c.jpg" width="80" height="60">', '<track id="0" label="head">')
     .replace("  </image>\n</annotations>", "  </track>\n</annotations>"), 28, "CVAT for video"),
    (lambda t: t.replace("<version>1.1</version>", "<version>2.0</version>"), 3, "version '2.0'"),
])
def test_cvat_errors_name_the_line(tmp_path, edit, line, expected):
    path = _write(tmp_path / "annotations.xml", edit(CVAT))
    with pytest.raises(AnnotationError, match=expected) as info:
        annotations.read_cvat(path)
    assert str(info.value).startswith(f"{path}, line {line}"), str(info.value)


def test_cvat_line_numbers_are_those_of_the_file():
    lines = CVAT.splitlines()
    assert 'points="1.00,2.00"' in lines[23 - 1] and 'points="79.50,59.50"' in lines[18 - 1]
    assert "<tag " in lines[20 - 1] and lines[19 - 1].strip() == "</points>"


def test_via_errors_name_the_line(tmp_path):
    good = _via({"a": POINTS["a"]}).splitlines()
    cases = [
        (good[:2] + ["a.jpg,1234,{}"] + good[2:], 3, "3 columns instead of 7"),
        (good + [_via_line("a.jpg", 1, 0, {"name": "polygon", "all_points_x": [1, 2, 3],
                                          "all_points_y": [1, 2, 3]})], 5, "'polygon' is not a head point"),
        (good + [_via_line("a.jpg", 1, 0, {"name": "point", "cx": None, "cy": 1})], 5, "cx must be a finite"),
        (good + ['a.jpg,1234,"{}",1,0,"{""name"":","{}"'], 5, "not valid JSON"),
        (["filename,size", *good[1:]], 1, "not a VIA CSV export"),
    ]
    for rows, line, expected in cases:
        path = _write(tmp_path / "via.csv", "\n".join(rows))
        with pytest.raises(AnnotationError, match=expected) as info:
            annotations.read_via_csv(path)
        assert str(info.value).startswith(f"{path}, line {line}:"), str(info.value)


def test_export_paths(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        annotations.read_export(tmp_path / "nope", "cvat")
    with pytest.raises(AnnotationError, match="no .csv file"):
        annotations.read_export(tmp_path, "via")
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        annotations.read_export(tmp_path, "coco")
    assert issubclass(AnnotationError, CrowdError)


# --------------------------------------------------------------------------- import


def test_import_writes_the_shanghaitech_layout(images, tmp_path):
    (images / "via.csv").write_text(_via(POINTS))
    out = tmp_path / "dataset"
    summary = folders.import_points(images / "via.csv", "via", out)
    assert (summary.images, summary.heads, summary.split_images) == (3, 4, 3)
    assert (summary.fit, summary.val) == (2, 1)
    records = data.list_records("B", "train", out)
    assert [r.name for r in records] == ["a", "b", "c"]
    for r in records:
        assert r.points_path == out / "part_B" / "train_data" / "ground-truth" / f"GT_{r.name}.mat"
        np.testing.assert_array_equal(data.read_points(r.points_path), np.reshape(POINTS[r.name], (-1, 2)))
        assert (r.image_path.read_bytes() == (images / f"{r.name}.jpg").read_bytes())
    # CSV points instead; the earlier .mat files are replaced, never left to shadow the new points
    folders.import_points(images / "via.csv", "via", out, points_format="csv", overwrite=True)
    for r in data.list_records("B", "train", out):
        assert r.points_path.suffix == ".csv"
        np.testing.assert_array_equal(data.read_points(r.points_path), np.reshape(POINTS[r.name], (-1, 2)))
    with pytest.raises(AnnotationError, match="already exists; pass --overwrite"):
        folders.import_points(images / "via.csv", "via", out, points_format="csv")


def test_import_refuses_a_resized_image_and_a_missing_one(images, tmp_path):
    _jpeg(images / "a.jpg", H // 2, W // 2)
    _labelme(images, "a", POINTS["a"])
    with pytest.raises(AnnotationError, match=r"annotated at 80x60 pixels but the image file is 40x30"):
        folders.import_points(images / "a.json", "labelme", tmp_path / "ds")
    _labelme(images, "z", [], image_path="elsewhere/z.jpg")
    with pytest.raises(AnnotationError, match="z.jpg it annotates was not found"):
        folders.import_points(images / "z.json", "labelme", tmp_path / "ds")


def test_import_embedded_labelme_image(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(buffer, format="PNG")
    src = tmp_path / "src"
    src.mkdir()
    _labelme(src, "e", POINTS["a"], image_path="e.png", image_data=base64.b64encode(buffer.getvalue()).decode())
    summary = folders.import_points(src, "labelme", tmp_path / "ds", split="test")
    assert summary.outside == 0 and summary.fit is None
    (record,) = data.list_records("B", "test", tmp_path / "ds")
    np.testing.assert_array_equal(data.read_image(record.image_path), np.full((H, W, 3), 90, np.uint8))


def test_points_outside_are_counted_and_few_images_noted(images, tmp_path):
    _labelme(images, "a", [[80.0, 10.0], [5.0, -1.0], [5.0, 5.0]])
    summary = folders.import_points(images / "a.json", "labelme", tmp_path / "ds")
    assert summary.outside == 2 and "outside their image" in summary.notes[0]
    assert (summary.fit, summary.val) == (1, 0) and "training needs at least 2" in summary.notes[1]


@pytest.mark.parametrize("n", range(1, 11))
def test_split_fit_val_on_a_few_images(n):
    """What a student's small folder gets: one validation image from 2 to 14 images, none for 1."""
    records = [data.ImageRecord(f"IMG_{i}", None, None) for i in range(1, n + 1)]
    fit, val = data.split_fit_val(records)
    assert (len(fit), len(val)) == ((1, 0) if n == 1 else (n - 1, 1))
    assert {r.name for r in fit} | {r.name for r in val} == {r.name for r in records}
