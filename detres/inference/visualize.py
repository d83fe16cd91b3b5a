"""Draw detections (boxes, class names, scores) on images and write them as PNG files."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detres.data.image_io import read_image_rgb
from detres.utils.atomic import atomic_write_bytes

FONT = cv2.FONT_HERSHEY_SIMPLEX
VIS_MIN_SIDE = 480  # example PNGs: shorter side enlarged to at least this many pixels so labels are legible


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per label (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def upscale_factor(height: int, width: int, min_side: int) -> int:
    """The smallest integer factor that brings the shorter side to at least ``min_side`` (1 if it already is)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def _label_name(label: int, class_names: Sequence[str]) -> str:
    """Class name of a 1..K label (the number itself when out of range)."""
    return class_names[label - 1] if 1 <= label <= len(class_names) else str(label)


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _pixel_corners(box: np.ndarray, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive pixel corners of a 0-based continuous xyxy box on a canvas ``factor`` times larger."""
    x1, y1, x2, y2 = (float(v) * factor for v in box)
    return (int(round(x1)), int(round(y1))), (int(round(x2)) - 1, int(round(y2)) - 1)


def _draw_dashed_rect(
    canvas: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], color: tuple[int, int, int], thickness: int, dash: int
) -> None:
    """A dashed rectangle outline (ground truth): ``dash`` pixels on, ``dash`` pixels off."""
    (x1, y1), (x2, y2) = p1, p2
    for x in range(x1, x2 + 1, 2 * dash):
        for y in (y1, y2):
            cv2.line(canvas, (x, y), (min(x + dash - 1, x2), y), color, thickness)
    for y in range(y1, y2 + 1, 2 * dash):
        for x in (x1, x2):
            cv2.line(canvas, (x, y), (x, min(y + dash - 1, y2)), color, thickness)


def _draw_label(
    canvas: np.ndarray,
    text: str,
    anchor: tuple[int, int],
    color: tuple[int, int, int],
    font_scale: float,
    thickness: int,
) -> None:
    """``text`` on a filled ``color`` box just above ``anchor`` (inside the box top when there is no room)."""
    (tw, th), base = cv2.getTextSize(text, FONT, font_scale, thickness)
    pad = max(2, th // 4)
    h, w = th + base + 2 * pad, tw + 2 * pad
    left = min(max(anchor[0], 0), max(canvas.shape[1] - w, 0))
    top = anchor[1] - h if anchor[1] - h >= 0 else max(anchor[1], 0)
    cv2.rectangle(canvas, (left, top), (left + w - 1, top + h - 1), color, -1)
    cv2.putText(
        canvas, text, (left + pad, top + pad + th), FONT, font_scale, _text_color(color), thickness, cv2.LINE_AA
    )


def draw_detections(
    image: np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any,
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.5,
    min_side: int = 0,
    gt_boxes: Any = None,
    gt_labels: Any = None,
) -> np.ndarray:
    """A copy of the RGB ``image`` with every detection scoring at least ``score_thresh`` drawn on it.

    Detections: solid outline in the class colour and a filled label "name score". With ``min_side``
    the image is first enlarged by an integer factor (nearest neighbour, see upscale_factor) so the
    shorter side is at least ``min_side`` pixels and the labels are legible; boxes (0-based continuous
    xyxy in ``image`` pixels) are scaled by the same factor. ``gt_boxes``/``gt_labels``, when given,
    are drawn first as thin dashed outlines in the class colour, without a label.
    """
    factor = upscale_factor(*image.shape[:2], min_side) if min_side else 1
    canvas = np.ascontiguousarray(np.repeat(np.repeat(image, factor, axis=0), factor, axis=1))
    boxes, labels, scores = np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels), np.asarray(scores)
    scale = max(0.35, min(canvas.shape[:2]) / 600)
    thickness = max(1, int(round(2 * scale)))
    if gt_boxes is not None:
        for box, label in zip(np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4), np.asarray(gt_labels)):
            _draw_dashed_rect(
                canvas,
                *_pixel_corners(box, factor),
                class_color(int(label)),
                max(1, thickness // 2),
                dash=max(3, 3 * thickness),
            )
    font_scale, font_thickness = max(0.4, 0.75 * scale), max(1, int(round(scale)))
    for box, label, score in sorted(zip(boxes, labels, scores), key=lambda d: d[2]):
        if score < score_thresh:
            continue
        color = class_color(int(label))
        p1, p2 = _pixel_corners(box, factor)
        cv2.rectangle(canvas, p1, p2, color, thickness)
        _draw_label(
            canvas, f"{_label_name(int(label), class_names)} {score:.2f}", p1, color, font_scale, font_thickness
        )
    return canvas


def write_png(path: str | Path, image_rgb: np.ndarray) -> None:
    """Encode an RGB image as PNG and write it atomically."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a PNG for {path}")
    atomic_write_bytes(path, data.tobytes())


def save_detection_pngs(
    dataset: Any,
    detections: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    count: int = 8,
    score_thresh: float = 0.5,
    min_side: int = VIS_MIN_SIDE,
    show_ground_truth: bool = True,
) -> list[Path]:
    """Draw the first ``count`` images' detections into ``out_dir`` (enlarged to ``min_side``, ground truth
    dashed when ``show_ground_truth``); returns the paths."""
    written = []
    for index, det in enumerate(detections[:count]):
        ann = dataset.annotation(index)
        if ann["image_id"] != det["image_id"]:
            raise ValueError(
                f"detections are not in dataset order: image {index} is {ann['image_id']!r}, "
                f"detection is for {det['image_id']!r}"
            )
        image = read_image_rgb(ann["file_name"])
        gt = dict(gt_boxes=ann["boxes"], gt_labels=ann["labels"]) if show_ground_truth else {}
        drawn = draw_detections(
            image,
            det["boxes"],
            det["labels"],
            det["scores"],
            class_names,
            score_thresh=score_thresh,
            min_side=min_side,
            **gt,
        )
        path = Path(out_dir) / f"{Path(ann['file_name']).stem}.png"
        write_png(path, drawn)
        written.append(path)
    return written
