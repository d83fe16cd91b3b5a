"""Penn-Fudan pedestrians: PASCAL Annotation v1.00 text files -> a COCO instances JSON (one class, 'person')."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from detres.utils.atomic import write_json_atomic

__all__ = ["parse_pennfudan_annotation", "pennfudan_to_coco", "convert_pennfudan"]

PERSON_CATEGORY = {"id": 1, "name": "person", "supercategory": "person"}

_FILENAME_RE = re.compile(r'^Image filename\s*:\s*"([^"]+)"\s*$')
_SIZE_RE = re.compile(r"^Image size \(X x Y x C\)\s*:\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")
_COUNT_RE = re.compile(r"^Objects with ground truth\s*:\s*(\d+)")
_BOX_RE = re.compile(
    r'^Bounding box for object\s+(\d+)\s+"([^"]*)"\s*\(Xmin, Ymin\)\s*-\s*\(Xmax, Ymax\)\s*:\s*'
    r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*-\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*$"
)


def parse_pennfudan_annotation(path: str | os.PathLike) -> dict[str, Any]:
    """Read one ``Annotation/*.txt`` file.

    Returns ``dict(filename, width, height, objects=[dict(label, bbox)])`` with ``filename`` the image's
    base name and ``bbox`` the file's 1-based inclusive (xmin, ymin, xmax, ymax). Both object labels of
    the set (PASpersonWalking, PASpersonStanding) are pedestrians. Raises ValueError naming the file and
    line when a field is missing or malformed, when the declared object count disagrees with the boxes,
    or when a box is empty or leaves the image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Penn-Fudan annotation '{path}' does not exist")
    filename = width = height = declared = None
    objects: list[dict[str, Any]] = []
    for lineno, raw in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _FILENAME_RE.match(line):
            filename = m.group(1).replace("\\", "/").rsplit("/", 1)[-1]
        elif m := _SIZE_RE.match(line):
            width, height = int(m.group(1)), int(m.group(2))
        elif m := _COUNT_RE.match(line):
            declared = int(m.group(1))
        elif line.startswith("Bounding box"):
            m = _BOX_RE.match(line)
            if m is None:
                raise ValueError(f"{path}:{lineno}: cannot parse bounding box line {line!r}")
            bbox = tuple(int(v) for v in m.group(3, 4, 5, 6))
            objects.append({"index": int(m.group(1)), "label": m.group(2), "bbox": bbox, "line": lineno})
    for field, value in (("Image filename", filename), ("Image size", width), ("Objects with ground truth", declared)):
        if value is None:
            raise ValueError(f"{path}: no '{field}' line")
    if declared != len(objects):
        raise ValueError(f"{path}: declares {declared} objects but has {len(objects)} bounding box lines")
    for obj in objects:
        x1, y1, x2, y2 = obj["bbox"]
        if not (1 <= x1 <= x2 <= width and 1 <= y1 <= y2 <= height):
            raise ValueError(
                f"{path}:{obj['line']}: box {obj['bbox']} is empty or outside the {width}x{height} image "
                "(1-based inclusive coordinates expected)"
            )
    return {
        "filename": filename,
        "width": width,
        "height": height,
        "objects": [{"label": o["label"], "bbox": o["bbox"]} for o in objects],
    }


def pennfudan_to_coco(root: str | os.PathLike) -> dict[str, Any]:
    """COCO instances dict for ``root`` (the PennFudanPed folder): images in sorted annotation order with
    ids 1..N and ``file_name`` relative to ``root/PNGImages``; every box category 1 'person'.

    A 1-based inclusive box (x1, y1, x2, y2) becomes COCO ``[x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]``
    (0-based continuous), ``area`` = w * h (box area; the masks are not used), ``iscrowd`` = 0.
    """
    root = Path(root)
    ann_dir, img_dir = root / "Annotation", root / "PNGImages"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"Penn-Fudan folder '{root}' has no Annotation/ subfolder")
    files = sorted(ann_dir.glob("*.txt"))
    if not files:
        raise ValueError(f"Penn-Fudan folder '{ann_dir}' holds no *.txt annotation files")
    images, annotations = [], []
    for image_id, txt in enumerate(files, start=1):
        rec = parse_pennfudan_annotation(txt)
        if not (img_dir / rec["filename"]).is_file():
            raise FileNotFoundError(f"{txt}: image '{img_dir / rec['filename']}' does not exist")
        images.append({"id": image_id, "file_name": rec["filename"], "width": rec["width"], "height": rec["height"]})
        for obj in rec["objects"]:
            x1, y1, x2, y2 = obj["bbox"]
            w, h = x2 - x1 + 1, y2 - y1 + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": PERSON_CATEGORY["id"],
                    "bbox": [x1 - 1, y1 - 1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "Penn-Fudan Pedestrian Database converted by detres.data.datasets.pennfudan"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(PERSON_CATEGORY)],
    }


def convert_pennfudan(root: str | os.PathLike, out_file: str | os.PathLike) -> dict[str, int]:
    """Convert ``root`` (PennFudanPed) to a COCO JSON at ``out_file``; returns the image and box counts."""
    coco = pennfudan_to_coco(root)
    write_json_atomic(out_file, coco, indent=None)
    return {"images": len(coco["images"]), "boxes": len(coco["annotations"])}
