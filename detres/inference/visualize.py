"""Draw detections (boxes, class names, scores) on images and write them as PNG files."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from detres.data.image_io import read_image_rgb
from detres.engine.atomic import atomic_write_bytes


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per label (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any,
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.5,
) -> np.ndarray:
    """A copy of the RGB ``image`` with every detection scoring at least ``score_thresh`` drawn on it."""
    canvas = np.ascontiguousarray(image.copy())
    boxes, labels, scores = np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels), np.asarray(scores)
    scale = max(0.35, min(canvas.shape[:2]) / 600)
    thickness = max(1, int(round(2 * scale)))
    for (x1, y1, x2, y2), label, score in sorted(zip(boxes, labels, scores), key=lambda d: d[2]):
        if score < score_thresh:
            continue
        color = class_color(int(label))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)) - 1, int(round(y2)) - 1)
        cv2.rectangle(canvas, p1, p2, color, thickness)
        name = class_names[int(label) - 1] if 1 <= int(label) <= len(class_names) else str(int(label))
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, 1)
        top = max(p1[1] - th - base, 0)
        cv2.rectangle(canvas, (p1[0], top), (p1[0] + tw, top + th + base), color, -1)
        cv2.putText(canvas, text, (p1[0], top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), 1, cv2.LINE_AA)
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
) -> list[Path]:
    """Draw the first ``count`` images' detections (original resolution) into ``out_dir``; returns the paths."""
    written = []
    for index, det in enumerate(detections[:count]):
        ann = dataset.annotation(index)
        if ann["image_id"] != det["image_id"]:
            raise ValueError(f"detections are not in dataset order: image {index} is {ann['image_id']!r}, "
                             f"detection is for {det['image_id']!r}")
        image = read_image_rgb(ann["file_name"])
        drawn = draw_detections(image, det["boxes"], det["labels"], det["scores"], class_names, score_thresh=score_thresh)
        path = Path(out_dir) / f"{Path(ann['file_name']).stem}.png"
        write_png(path, drawn)
        written.append(path)
    return written
