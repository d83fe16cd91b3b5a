"""Parse one PASCAL VOC annotation XML file into a plain record (shared by the VOC loader and VOC evaluation)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from detres.utils.parsing import parse_finite_number

__all__ = ["VOCAnnotationError", "parse_voc_xml"]

_BOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


class VOCAnnotationError(ValueError):
    """A VOC annotation file is malformed; the message names the file and the field."""


def _text(parent: ET.Element, tag: str) -> str | None:
    """Stripped text of the direct child `tag`, or None when the child or its text is absent."""
    node = parent.find(tag)
    if node is None or node.text is None or not node.text.strip():
        return None
    return node.text.strip()


def _number(text: str, path: Path, where: str) -> int | float:
    """Parse a coordinate; integral values stay ints (the usual VOC case), fractional ones stay floats."""
    try:
        return parse_finite_number(text, f"{path}: {where}")
    except ValueError as exc:
        raise VOCAnnotationError(str(exc)) from None


def _flag(obj: ET.Element, tag: str, path: Path, where: str) -> bool:
    """0/1 flag such as <difficult>; a missing or empty element means False, as in the devkit reader."""
    text = _text(obj, tag)
    if text is None:
        return False
    if text not in ("0", "1"):
        raise VOCAnnotationError(f"{path}: {where}/{tag}: expected 0 or 1, got {text!r}")
    return text == "1"


def _size(root: ET.Element, path: Path) -> tuple[int | None, int | None]:
    """Image width/height from <size>; None when the file has no <size> (evaluation does not need it)."""
    size = root.find("size")
    if size is None:
        return None, None
    dims = []
    for tag in ("width", "height"):
        text = _text(size, tag)
        if text is None:
            raise VOCAnnotationError(f"{path}: field 'size/{tag}' is missing")
        value = _number(text, path, f"size/{tag}")
        if not isinstance(value, int) or value <= 0:
            raise VOCAnnotationError(f"{path}: size/{tag}: expected a positive integer, got {text!r}")
        dims.append(value)
    return dims[0], dims[1]


def _parse_object(obj: ET.Element, index: int, path: Path) -> dict[str, Any]:
    """One <object>: name, 1-based inclusive bbox exactly as written, difficult and truncated flags."""
    name = _text(obj, "name")
    if name is None:
        raise VOCAnnotationError(f"{path}: object #{index}: field 'name' is missing or empty")
    where = f"object #{index} ({name})"
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise VOCAnnotationError(f"{path}: {where}: field 'bndbox' is missing")
    coords = []
    for tag in _BOX_FIELDS:
        text = _text(bndbox, tag)
        if text is None:
            raise VOCAnnotationError(f"{path}: {where}: field 'bndbox/{tag}' is missing")
        coords.append(_number(text, path, f"{where}: bndbox/{tag}"))
    xmin, ymin, xmax, ymax = coords
    # Inclusive pixel boxes: xmin == xmax is a valid one-pixel-wide box, xmax < xmin is not a box.
    if xmax < xmin or ymax < ymin:
        raise VOCAnnotationError(
            f"{path}: {where}: bndbox has xmax < xmin or ymax < ymin: "
            f"(xmin, ymin, xmax, ymax) = ({xmin}, {ymin}, {xmax}, {ymax})"
        )
    return {
        "name": name,
        "bbox": (xmin, ymin, xmax, ymax),
        "difficult": _flag(obj, "difficult", path, where),
        "truncated": _flag(obj, "truncated", path, where),
    }


def parse_voc_xml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a VOC annotation file.

    Returns ``dict(filename, width, height, objects=[dict(name, bbox, difficult, truncated)])`` where
    ``bbox`` is ``(xmin, ymin, xmax, ymax)`` in the file's 1-based inclusive pixel convention (ints,
    or floats when the file has fractional values). ``filename``/``width``/``height`` are None when
    the file omits them. Missing ``difficult``/``truncated`` mean False. Raises FileNotFoundError or
    VOCAnnotationError (a ValueError) naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise VOCAnnotationError(f"{path}: not well-formed XML ({exc})") from None
    if root.tag != "annotation":
        raise VOCAnnotationError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    width, height = _size(root, path)
    objects = [_parse_object(obj, k, path) for k, obj in enumerate(root.findall("object"))]
    return {"filename": _text(root, "filename"), "width": width, "height": height, "objects": objects}
