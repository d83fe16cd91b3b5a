"""Detection result files: COCO results JSON and PASCAL VOC devkit per-class text files (read and write)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detres.utils.atomic import atomic_write_text, read_json, to_jsonable

__all__ = [
    "CLASS_PLACEHOLDER",
    "as_numpy",
    "detections_to_coco_results",
    "iter_detections",
    "load_coco_results",
    "read_voc_results",
    "write_coco_results",
    "write_voc_results",
]

# The per-class result path pattern of the VOC tools contains this placeholder, e.g. "out/{cls}.txt".
CLASS_PLACEHOLDER = "{cls}"


def as_numpy(value: Any, dtype: Any, where: str) -> np.ndarray:
    """numpy view of a tensor/array/list; torch tensors are detached and moved to the CPU first."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot be read as a numeric array ({exc})") from None


def _unpack_detection(det: Any, index: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Validate one per-image detection dict and return (image_id, boxes [N,4], scores [N], labels [N])."""
    where = f"detections[{index}]"
    if not isinstance(det, Mapping):
        raise ValueError(f"{where}: expected a dict with image_id/boxes/scores/labels, got {type(det).__name__}")
    for key in ("image_id", "boxes", "scores", "labels"):
        if key not in det:
            raise ValueError(f"{where}: missing key {key!r}")
    image_id = det["image_id"]
    if hasattr(image_id, "item"):
        image_id = image_id.item()
    boxes = as_numpy(det["boxes"], np.float64, f"{where}['boxes']")
    scores = as_numpy(det["scores"], np.float64, f"{where}['scores']")
    labels = as_numpy(det["labels"], np.int64, f"{where}['labels']")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}['boxes']: expected shape [N, 4], got {list(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"{where}: boxes has {n} rows but scores has shape {list(scores.shape)} "
            f"and labels has shape {list(labels.shape)}"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError(f"{where}: boxes and scores must be finite (found NaN or inf)")
    return image_id, boxes, scores, labels


def iter_detections(dets: Sequence[Any]):
    """Yield validated (image_id, boxes, scores, labels) for each per-image detection dict."""
    for index, det in enumerate(dets):
        yield _unpack_detection(det, index)


def detections_to_coco_results(
    dets: Sequence[Mapping[str, Any]], label_to_category_id: Mapping[int, int]
) -> list[dict[str, Any]]:
    """Turn model detections into COCO results entries.

    ``dets``: per-image dicts ``{"image_id", "boxes" [N,4] xyxy 0-based continuous in ORIGINAL image
    coordinates, "scores" [N], "labels" [N] contiguous 1..K}``. A box (x1, y1, x2, y2) becomes the COCO
    ``[x1, y1, x2 - x1, y2 - y1]`` (the inverse of the x, y, x+w, y+h rule); ``label_to_category_id``
    maps contiguous labels to the dataset's original category ids.
    """
    results: list[dict[str, Any]] = []
    for image_id, boxes, scores, labels in iter_detections(dets):
        for box, score, label in zip(boxes, scores, labels):
            label = int(label)
            if label not in label_to_category_id:
                raise ValueError(
                    f"detections for image {image_id!r}: label {label} has no entry in label_to_category_id "
                    f"(known labels: {sorted(label_to_category_id)})"
                )
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label_to_category_id[label]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return results


def write_coco_results(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write a COCO results list (as from detections_to_coco_results) to ``path`` atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(to_jsonable(list(results)), allow_nan=False))
    return path


def load_coco_results(source: str | os.PathLike | Sequence[Any] | Mapping[str, Any]) -> tuple[list[Any], str]:
    """Return (results list, name for messages) from a path, a results list, or a dict with ``annotations``.

    A results file may hold the plain list cocoapi expects or a dataset-style dict whose ``annotations``
    list holds the detections.
    """
    if isinstance(source, (str, os.PathLike)):
        data, name = read_json(source, what="results file"), str(Path(source))
    else:
        data, name = source, "<results>"
    if isinstance(data, Mapping):
        if "annotations" not in data:
            raise ValueError(f"{name}: a results dict must have an 'annotations' list (found keys {sorted(data)})")
        data = data["annotations"]
        name = f"{name}['annotations']"
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"{name}: expected a list of result entries, got {type(data).__name__}")
    return list(data), name


def _devkit_number(value: float) -> str:
    """Shortest text that reads back as exactly the same double, so file and in-memory evaluation agree."""
    return repr(float(value))


def write_voc_results(
    dets: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    image_ids: Mapping[Any, str] | Sequence[str] | None,
    out_pattern: str,
) -> list[Path]:
    """Write one devkit result file per class: lines ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``.

    ``dets`` are per-image dicts as in detections_to_coco_results, labels 1..K meaning
    ``class_names[label - 1]``. Boxes are written in the devkit's 1-based convention
    (x1 + 1, y1 + 1, x2, y2), the inverse of the (x1 - 1, y1 - 1, x2, y2) rule used when reading.
    ``image_ids`` maps a detection's ``image_id`` to the devkit id string (a dict, or a list indexed by
    the integer image_id; None writes ``str(image_id)``). ``out_pattern`` contains ``{cls}``. Every class
    gets a file (possibly empty), each written atomically; the written paths are returned in class order.
    """
    if CLASS_PLACEHOLDER not in out_pattern:
        raise ValueError(f"out_pattern {out_pattern!r} must contain {CLASS_PLACEHOLDER!r}")
    lines: list[list[str]] = [[] for _ in class_names]
    for image_id, boxes, scores, labels in iter_detections(dets):
        if image_ids is None:
            name = str(image_id)
        else:
            try:
                name = image_ids[image_id]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"image_id {image_id!r} has no entry in image_ids") from None
        if not name or any(ch.isspace() for ch in str(name)):
            raise ValueError(f"image id {name!r} (for image_id {image_id!r}) is empty or contains whitespace")
        for box, score, label in zip(boxes, scores, labels):
            if not 1 <= label <= len(class_names):
                raise ValueError(f"detections for image {image_id!r}: label {label} is outside 1..{len(class_names)}")
            x1, y1, x2, y2 = box  # written with the xyxy_to_voc rule (x1 + 1, y1 + 1, x2, y2)
            fields = [name, _devkit_number(score)] + [_devkit_number(v) for v in (x1 + 1.0, y1 + 1.0, x2, y2)]
            lines[label - 1].append(" ".join(fields))
    paths = []
    for cls_name, cls_lines in zip(class_names, lines):
        path = Path(out_pattern.replace(CLASS_PLACEHOLDER, cls_name))
        atomic_write_text(path, "".join(line + "\n" for line in cls_lines))
        paths.append(path)
    return paths


def read_voc_results(
    path: str | os.PathLike, image_ids: Container[str] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a devkit result file; returns (image ids, scores [N], boxes [N,4] 0-based continuous).

    File boxes are 1-based inclusive (devkit); they are converted with (x1 - 1, y1 - 1, x2, y2), which
    makes a plain continuous IoU equal to the devkit's ``+1`` pixel IoU. Blank lines are skipped; a
    malformed line, or an image id outside ``image_ids`` when given, raises ValueError naming the file
    and line number.
    """
    path = Path(path)
    ids: list[str] = []
    rows: list[list[float]] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(
                    f"{path}:{lineno}: expected 6 fields '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                    f"got {len(fields)}: {line.strip()!r}"
                )
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score and box must be numbers: {line.strip()!r}") from None
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{path}:{lineno}: score and box must be finite: {line.strip()!r}")
            if image_ids is not None and fields[0] not in image_ids:
                raise ValueError(f"{path}:{lineno}: image id {fields[0]!r} is not in the evaluated image set")
            ids.append(fields[0])
            rows.append(values)
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    # Same rule as detres.structures.boxes.voc_to_xyxy, in numpy so this module needs no torch import.
    boxes = table[:, 1:] - np.array([1.0, 1.0, 0.0, 0.0])
    return ids, table[:, 0].copy(), boxes
