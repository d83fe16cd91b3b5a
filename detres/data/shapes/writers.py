"""Shapes world files: per-image random streams and writers of the ImageFolder, COCO + VOC and ILSVRC-LOC layouts.

Boxes in files: COCO ``[x, y, w, h]`` of the continuous 0-based box; VOC and the ILSVRC-style
XML/CSV 1-based inclusive integers (see ``detres.data.shapes.world`` for the full conventions).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detres.data.shapes.render import CATEGORIES, WNIDS
from detres.data.shapes.scene import (
    Scene,
    render_classification_image,
    render_detection_image,
    render_localization_image,
)
from detres.utils.atomic import atomic_write_text

GENERATOR_VERSION = 1
_TASK_KEYS = {"cls": 1, "det": 2, "loc": 3}
_SPLIT_KEYS = {"train": 1, "val": 2}


def image_rng(seed: int, task: str, split: str, *index: int) -> np.random.Generator:
    """The random stream of one image, independent of how many other images are generated."""
    if task not in _TASK_KEYS or split not in _SPLIT_KEYS:
        raise ValueError(f"image_rng: unknown task/split {task!r}/{split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _TASK_KEYS[task], _SPLIT_KEYS[split], *index]))


def _png_bytes(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    return buf.tobytes()


def _write_file(path: Path, data: bytes) -> None:
    """Temp file + os.replace (never a half-written file), without fsync: thousands of small files
    would spend most of the run in fsync, and the marker (fsync'ed) already tells a complete run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def json_text(obj: Any) -> str:
    """Canonical JSON (sorted keys, compact, trailing newline), so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def _coco_polygons(mask: np.ndarray, box: np.ndarray) -> list[list[float]]:
    """Outer outline(s) of the visible mask (COCO polygons have no holes, so a ring's hole is filled).

    Traced on the mask upsampled 2x, so the outline runs a quarter pixel outside every pixel centre
    of the mask: rasterising it (pycocotools) gives back all mask pixels, one-pixel tips included.
    """
    up = np.repeat(np.repeat(mask.astype(np.uint8), 2, 0), 2, 1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [((c.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0).ravel().tolist() for c in contours if len(c) >= 3]
    if not polys:  # cannot happen for a non-empty mask (2x upsampling gives >= 4 corners); keep COCO valid
        x1, y1, x2, y2 = (float(v) for v in box)
        polys = [[x1, y1, x2, y1, x2, y2, x1, y2]]
    return polys


def _voc_box(box: np.ndarray) -> tuple[int, int, int, int]:
    """Continuous 0-based xyxy (integral) -> VOC 1-based inclusive integers."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return x1 + 1, y1 + 1, x2, y2


def _xml_text(folder: str, filename: str, scene: Scene, names: Sequence[str], database: str) -> str:
    h, w = scene.image.shape[:2]
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = database
    size = ET.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for box, label, difficult, truncated in zip(scene.boxes, scene.labels, scene.difficult, scene.truncated):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = names[int(label) - 1]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        bnd = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), _voc_box(box)):
            ET.SubElement(bnd, tag).text = str(value)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _coco_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]


# --------------------------------------------------------------------------- the three tasks


def write_cls_task(root: Path, seed: int, counts: dict[str, int], size_range: tuple[int, int]) -> None:
    """``<root>/cls/<split>/<class>/<class>_<i>.png``: ImageFolder, ``counts[split]`` images per class."""
    for split, n in counts.items():
        for label, name in enumerate(CATEGORIES, start=1):
            folder = root / "cls" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                scene = render_classification_image(
                    image_rng(seed, "cls", split, label, i), label, size_range=size_range
                )
                _write_file(folder / f"{name}_{i:05d}.png", _png_bytes(scene.image))


def write_det_task(root: Path, seed: int, counts: dict[str, int], size_range: tuple[int, int]) -> None:
    """``<root>/det``: images + COCO ``instances_<split>.json`` and the same boxes as a PASCAL VOC tree."""
    det = root / "det"
    voc = det / "voc"
    for sub in (
        det / "images",
        det / "annotations",
        voc / "Annotations",
        voc / "JPEGImages",
        voc / "ImageSets" / "Main",
    ):
        sub.mkdir(parents=True, exist_ok=True)
    image_id, ann_id = 0, 0
    stems: dict[str, list[str]] = {}
    for split, n in counts.items():
        images, annotations, stems[split] = [], [], []
        for i in range(n):
            scene = render_detection_image(image_rng(seed, "det", split, i), size_range=size_range)
            image_id += 1
            stem = f"{split}_{i + 1:06d}"
            file_name = f"{stem}.png"
            data = _png_bytes(scene.image)
            _write_file(det / "images" / file_name, data)
            _write_file(voc / "JPEGImages" / file_name, data)
            h, w = scene.image.shape[:2]
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
                ann_id += 1
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": _coco_polygons(mask, box),
                    }
                )
            _write_file(
                voc / "Annotations" / f"{stem}.xml",
                _xml_text("voc", file_name, scene, CATEGORIES, "detres shapes world").encode("utf-8"),
            )
            stems[split].append(stem)
        coco = {
            "info": {"description": f"detres shapes world detection ({split})", "version": str(GENERATOR_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": _coco_categories(),
        }
        atomic_write_text(det / "annotations" / f"instances_{split}.json", json_text(coco))
    for split in counts:
        atomic_write_text(voc / "ImageSets" / "Main" / f"{split}.txt", "".join(s + "\n" for s in stems[split]))
    atomic_write_text(
        voc / "ImageSets" / "Main" / "trainval.txt",
        "".join(s + "\n" for split in ("train", "val") for s in stems.get(split, [])),
    )


def write_loc_task(root: Path, seed: int, counts: dict[str, int], size_range: tuple[int, int]) -> None:
    """``<root>/loc``: ILSVRC CLS-LOC style XML + images, synset mapping and ``LOC_<split>_solution.csv``."""
    loc = root / "loc"
    loc.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        (loc / "Annotations" / split).mkdir(parents=True, exist_ok=True)
        (loc / "Data" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            label = i % len(CATEGORIES) + 1  # round-robin: classes are balanced
            scene = render_localization_image(image_rng(seed, "loc", split, i), label, size_range=size_range)
            wnid = WNIDS[label - 1]
            # ImageNet naming: train "<wnid>_<n>", val "<prefix>_val_<8 digits>".
            stem = f"{wnid}_{i + 1}" if split == "train" else f"SHAPES_{split}_{i + 1:08d}"
            file_name = f"{stem}.png"
            _write_file(loc / "Data" / split / file_name, _png_bytes(scene.image))
            _write_file(
                loc / "Annotations" / split / f"{stem}.xml",
                _xml_text(split, file_name, scene, WNIDS, "detres shapes world (ILSVRC style)").encode("utf-8"),
            )
            preds = " ".join(f"{wnid} {' '.join(str(v) for v in _voc_box(b))}" for b in scene.boxes)
            rows.append(f"{stem},{preds}\n")
        atomic_write_text(loc / f"LOC_{split}_solution.csv", "ImageId,PredictionString\n" + "".join(rows))
    atomic_write_text(
        loc / "LOC_synset_mapping.txt", "".join(f"{wnid} {name}\n" for wnid, name in zip(WNIDS, CATEGORIES))
    )
