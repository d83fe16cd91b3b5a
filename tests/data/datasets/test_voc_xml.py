"""Tests for detres.data.datasets.voc_xml.parse_voc_xml on real VOC/BCCD files and on broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from detres.data.datasets.voc_xml import VOCAnnotationError, parse_voc_xml

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
TOY = DATA / "evalref" / "voc" / "toyexample" / "Annotations"
needs_data = pytest.mark.skipif(not TOY.is_dir(), reason=f"shared reference data not found at {TOY}")


@needs_data
def test_real_voc_files():
    rec = parse_voc_xml(TOY / "2007_005688.xml")
    assert rec["filename"] == "2007_005688.jpg" and (rec["width"], rec["height"]) == (500, 334)
    assert rec["objects"] == [
        {"name": "cat", "bbox": (170, 44, 459, 251), "difficult": False, "truncated": False},
        {"name": "cat", "bbox": (72, 123, 387, 334), "difficult": False, "truncated": False},
    ]
    # Children in an unusual order (bndbox fields scrambled, <size> after the objects) parse the same way.
    rec = parse_voc_xml(TOY / "2010_004175.xml")
    assert (rec["width"], rec["height"]) == (400, 300)
    assert rec["objects"] == [{"name": "cat", "bbox": (1, 39, 248, 300), "difficult": False, "truncated": True}]
    assert parse_voc_xml(TOY / "2007_000733.xml")["objects"] == []  # an image without objects


@needs_data
def test_bccd_one_pixel_box_is_kept():
    path = DATA / "bccd" / "BCCD" / "Annotations" / "BloodImage_00338.xml"
    if not path.is_file():
        pytest.skip(f"BCCD not found at {path}")
    boxes = [o["bbox"] for o in parse_voc_xml(path)["objects"]]
    assert (504, 337, 504, 337) in boxes  # xmin == xmax is one inclusive pixel, not an error


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "a.xml"
    path.write_text(body)
    return path


def test_optional_fields_and_fractional_coordinates(tmp_path):
    path = write(
        tmp_path,
        "<annotation><object><name> dog </name><difficult>1</difficult><bndbox>"
        "<xmin>1.5</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20.0</ymax></bndbox></object></annotation>",
    )
    rec = parse_voc_xml(path)
    assert rec["filename"] is None and rec["width"] is None and rec["height"] is None
    obj = rec["objects"][0]
    assert obj["name"] == "dog" and obj["difficult"] is True and obj["truncated"] is False
    assert obj["bbox"] == (1.5, 2, 10, 20) and isinstance(obj["bbox"][1], int)


@pytest.mark.parametrize(
    "body, message",
    [
        ("<annotation><object><name>a</name>", r"a\.xml: not well-formed XML"),
        ("<root/>", r"root element is <root>"),
        ("<annotation><object><bndbox/></object></annotation>", r"object #0: field 'name' is missing"),
        ("<annotation><object><name>a</name></object></annotation>", r"object #0 \(a\): field 'bndbox' is missing"),
        (
            "<annotation><object><name>a</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object></annotation>",
            r"object #0 \(a\): field 'bndbox/ymax' is missing",
        ),
        (
            "<annotation><object><name>a</name><bndbox><xmin>x</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
            r"bndbox/xmin: expected a number, got 'x'",
        ),
        (
            "<annotation><object><name>a</name><bndbox><xmin>6</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
            r"xmax < xmin",
        ),
        (
            "<annotation><object><name>a</name><difficult>yes</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
            r"object #0 \(a\)/difficult: expected 0 or 1, got 'yes'",
        ),
        ("<annotation><size><width>10</width></size></annotation>", r"field 'size/height' is missing"),
        (
            "<annotation><size><width>0</width><height>5</height></size></annotation>",
            r"size/width: expected a positive integer",
        ),
    ],
)
def test_errors_name_file_and_field(tmp_path, body, message):
    with pytest.raises(VOCAnnotationError, match=message):
        parse_voc_xml(write(tmp_path, body))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.xml"):
        parse_voc_xml(tmp_path / "nope.xml")
