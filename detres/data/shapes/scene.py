"""Shapes world scenes: cluttered backgrounds, objects pasted with exact visible-pixel boxes, per-task recipes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from detres.data.shapes.render import CATEGORIES, render_object

# An object is "difficult" (VOC flag) when its box is tiny or most of it is cut off / hidden.
DIFFICULT_MIN_SIDE = 8
DIFFICULT_MIN_VISIBLE_FRACTION = 0.4


class Scene(NamedTuple):
    """One rendered image with its objects (boxes/labels follow the project conventions)."""

    image: np.ndarray  # uint8 [H, W, 3] RGB
    boxes: np.ndarray  # float32 [N, 4] xyxy, continuous 0-based, tight around ``masks``
    labels: np.ndarray  # int64 [N], 1..K (``CATEGORIES[label - 1]``)
    masks: np.ndarray  # bool [N, H, W], visible pixels of each object (disjoint)
    difficult: np.ndarray  # bool [N]
    truncated: np.ndarray  # bool [N], part of the object lies outside the image


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cluttered RGB background: gradient + blotches + distractor blobs and lines (not objects)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    phi = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * math.cos(phi) + yy * math.sin(phi)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = c0 * (1.0 - t[..., None]) + c1 * t[..., None]
    coarse = rng.normal(0.0, 18.0, (max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).astype(np.uint8)
    # Distractors are small (radius <= 3) or thin, so none can be mistaken for a labelled shape.
    for _ in range(int(rng.integers(2, 9))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(1, 4)), colour, -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 5))):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(image, p0, p1, colour, 1, cv2.LINE_AA)
    return image


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Continuous xyxy of the pixels in ``mask`` (x2/y2 exclusive)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compose_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    labels: Sequence[int],
    sizes: Sequence[float],
    *,
    border_prob: float = 0.0,
    max_iou: float = 0.3,
    min_kept_fraction: float = 0.6,
    min_pixels: int = 12,
    max_tries: int = 30,
) -> Scene:
    """Paste objects one by one onto a background, keeping overlap limited.

    ``border_prob``: chance that an object is placed so it may be cut by the image border.
    A placement is rejected when its box overlaps an earlier box with IoU > ``max_iou`` or hides
    more than ``1 - min_kept_fraction`` of an earlier object's visible pixels; an object that
    cannot be placed in ``max_tries`` is dropped (so N can be smaller than ``len(labels)``).
    """
    image = render_background(rng, height, width)
    owner = np.zeros((height, width), np.int16)  # 0 = background, k + 1 = k-th kept object
    kept_labels: list[int] = []
    full_pixels: list[int] = []
    truncated: list[bool] = []
    for label, size in zip(labels, sizes):
        patch, mask = render_object(rng, int(label), float(size))
        h, w = mask.shape
        for _ in range(max_tries):
            fits = w <= width and h <= height
            if rng.random() < border_prob or not fits:
                x0 = int(rng.integers(-w // 2, width - w // 2 + 1))
                y0 = int(rng.integers(-h // 2, height - h // 2 + 1))
            else:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            local = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            if int(local.sum()) < min_pixels:
                continue
            new = np.zeros((height, width), bool)
            new[iy0:iy1, ix0:ix1] = local
            new_box = _tight_box(new)
            ok = True
            for k in range(len(kept_labels)):
                current = owner == k + 1
                remaining = current & ~new
                if (
                    remaining.sum() < max(min_pixels, min_kept_fraction * current.sum())
                    or _iou(new_box, _tight_box(current)) > max_iou
                ):
                    ok = False
                    break
            if not ok:
                continue
            kept_labels.append(int(label))
            owner[new] = len(kept_labels)
            image[iy0:iy1, ix0:ix1][local] = patch[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][local]
            full_pixels.append(int(mask.sum()))
            truncated.append(bool(local.sum() < mask.sum()))
            break
    # Sensor-like noise over everything; it changes colours, not which pixel belongs to what.
    noise = rng.normal(0.0, rng.uniform(2.0, 7.0), image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)

    n = len(kept_labels)
    masks = np.stack([owner == k + 1 for k in range(n)]) if n else np.zeros((0, height, width), bool)
    boxes = np.array([_tight_box(m) for m in masks], np.float32).reshape(n, 4)
    visible_fraction = np.array([m.sum() / f for m, f in zip(masks, full_pixels)], np.float64)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    difficult = (sides < DIFFICULT_MIN_SIDE) | (visible_fraction < DIFFICULT_MIN_VISIBLE_FRACTION)
    return Scene(
        image, boxes, np.array(kept_labels, np.int64), masks, difficult.astype(bool), np.array(truncated, bool)
    )


def check_size_range(name: str, size_range: Sequence[int]) -> tuple[int, int]:
    """Validated ``(min_px, max_px)`` image side range; ``name`` is the argument named in the error."""
    if len(size_range) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size_range
    ):
        raise ValueError(f"{name}: expected (min_px, max_px) integers, got {size_range!r}")
    lo, hi = int(size_range[0]), int(size_range[1])
    if not 32 <= lo <= hi <= 4096:
        raise ValueError(f"{name}: need 32 <= min_px <= max_px <= 4096, got {size_range!r}")
    return lo, hi


def _image_hw(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    return int(rng.integers(size_range[0], size_range[1] + 1)), int(rng.integers(size_range[0], size_range[1] + 1))


def render_classification_image(
    rng: np.random.Generator, label: int, *, size_range: tuple[int, int] = (64, 96)
) -> Scene:
    """One object of class ``label``, fully inside an image with sides in ``size_range``."""
    height, width = _image_hw(rng, check_size_range("size_range", size_range))
    size = rng.uniform(0.45, 0.85) * min(height, width)
    return compose_scene(rng, height, width, [label], [size])


def render_detection_image(
    rng: np.random.Generator,
    *,
    size_range: tuple[int, int] = (96, 160),
    max_objects: int = 5,
    min_object_size: float = 10.0,
    max_object_fraction: float = 0.6,
    border_prob: float = 0.2,
) -> Scene:
    """1..``max_objects`` objects of random classes, log-uniform sizes from ``min_object_size`` to
    ``max_object_fraction`` of the shorter image side; some cut by the image border."""
    if max_objects < 1:
        raise ValueError(f"render_detection_image: max_objects must be >= 1, got {max_objects}")
    height, width = _image_hw(rng, check_size_range("size_range", size_range))
    n = int(rng.integers(1, max_objects + 1))
    labels = rng.integers(1, len(CATEGORIES) + 1, n)
    hi = max(min_object_size, max_object_fraction * min(height, width))
    sizes = np.exp(rng.uniform(math.log(min_object_size), math.log(hi), n))
    # Big objects first: small ones then fill the gaps instead of being buried.
    order = np.argsort(-sizes, kind="stable")
    return compose_scene(rng, height, width, labels[order], sizes[order], border_prob=border_prob)


def render_localization_image(
    rng: np.random.Generator,
    label: int,
    *,
    size_range: tuple[int, int] = (96, 160),
    second_object_prob: float = 0.3,
) -> Scene:
    """One dominant object of class ``label`` and sometimes a second, smaller one of the same class."""
    height, width = _image_hw(rng, check_size_range("size_range", size_range))
    main = rng.uniform(0.4, 0.8) * min(height, width)
    sizes = [main]
    if rng.random() < second_object_prob:
        sizes.append(main * rng.uniform(0.3, 0.55))
    return compose_scene(rng, height, width, [label] * len(sizes), sizes, border_prob=0.1)
