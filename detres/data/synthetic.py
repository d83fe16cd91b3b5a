"""Shapes world: a seeded generator of toy classification/detection/localization data in standard file formats.

Ten shape categories, each with its own texture and a jittered hue, are drawn with OpenCV on
cluttered backgrounds (gradients, low-frequency blotches, noise, small blobs and thin lines that
are not objects). The same categories are written in three on-disk layouts so that every loader
reads real files:

* ``<root>/cls/{train,val}/<class>/*.png`` -- ImageFolder, one object per image;
* ``<root>/det/images/*.png`` + ``<root>/det/annotations/instances_{train,val}.json`` (COCO) and
  ``<root>/det/voc/{Annotations,JPEGImages,ImageSets/Main}`` (PASCAL VOC) describing the same boxes;
* ``<root>/loc/{Annotations,Data}/{train,val}/`` -- ILSVRC CLS-LOC style XML + images, with
  ``LOC_synset_mapping.txt`` and ``LOC_{train,val}_solution.csv``.

Coordinate conventions. In memory (``Scene.boxes``) boxes are float32 xyxy in continuous 0-based
pixel coordinates: a box covering pixel columns ``i0..i1`` is ``(i0, ., i1 + 1, .)``. COCO files
hold ``[x, y, w, h] = [i0, j0, i1 - i0 + 1, j1 - j0 + 1]``. VOC *and* the ILSVRC-style XML/CSV hold
1-based inclusive integers ``(i0 + 1, j0 + 1, i1 + 1, j1 + 1)`` (ImageNet publishes its boxes "in
PASCAL VOC format"), so the project's VOC rule ``(x1 - 1, y1 - 1, x2, y2)`` recovers the continuous box
exactly. Every box is the tight box of the object's visible pixels (its mask after clipping to the
image and removing what later objects cover), so it is exact by construction.

Every image has its own random stream keyed by (seed, task, split, index), so a set generated with
smaller counts is a prefix of a larger one and the output is byte-identical for a given seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import cv2
import numpy as np

from detres.engine.atomic import atomic_write_text

# Alphabetical, so that ImageFolder's sorted-folder labels (0..K-1) equal ``CATEGORIES`` indices and
# the detection label of category ``CATEGORIES[l - 1]`` is ``l`` (COCO category id ``l``).
CATEGORIES: tuple[str, ...] = (
    "circle", "cross", "diamond", "ellipse", "heart", "hexagon", "ring", "square", "star", "triangle",
)
# Texture of each category (same order); shape and texture both identify the class.
TEXTURES: tuple[str, ...] = (
    "solid", "diagonal_stripes", "gradient", "concentric", "outline", "grid", "speckle", "checker", "dots",
    "stripes",
)
# WordNet-like ids for the ILSVRC-style files ("n" + 8 digits, like n01440764).
WNIDS: tuple[str, ...] = tuple(f"n{90000001 + i:08d}" for i in range(len(CATEGORIES)))

GENERATOR_VERSION = 1
MARKER_NAME = ".shapes_world.json"
_OWNED_SUBDIRS = ("cls", "det", "loc")
_TASK_KEYS = {"cls": 1, "det": 2, "loc": 3}
_SPLIT_KEYS = {"train": 1, "val": 2}

# An object is "difficult" (VOC flag) when its box is tiny or most of it is cut off / hidden.
DIFFICULT_MIN_SIDE = 8
DIFFICULT_MIN_VISIBLE_FRACTION = 0.4

# Counts for ``--small`` / quick experiments (the function defaults are the README demo sizes).
SMALL_COUNTS: dict[str, int] = dict(
    num_cls_train_per_class=10, num_cls_val_per_class=4, num_det_train=40, num_det_val=16,
    num_loc_train=30, num_loc_val=10,
)


class Scene(NamedTuple):
    """One rendered image with its objects (boxes/labels follow the project conventions)."""

    image: np.ndarray  # uint8 [H, W, 3] RGB
    boxes: np.ndarray  # float32 [N, 4] xyxy, continuous 0-based, tight around ``masks``
    labels: np.ndarray  # int64 [N], 1..K (``CATEGORIES[label - 1]``)
    masks: np.ndarray  # bool [N, H, W], visible pixels of each object (disjoint)
    difficult: np.ndarray  # bool [N]
    truncated: np.ndarray  # bool [N], part of the object lies outside the image


def image_rng(seed: int, task: str, split: str, *index: int) -> np.random.Generator:
    """The random stream of one image, independent of how many other images are generated."""
    if task not in _TASK_KEYS or split not in _SPLIT_KEYS:
        raise ValueError(f"image_rng: unknown task/split {task!r}/{split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _TASK_KEYS[task], _SPLIT_KEYS[split], *index]))


# --------------------------------------------------------------------------- drawing one object


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    hsv = np.array([[[h % 180.0, np.clip(s, 0, 255), np.clip(v, 0, 255)]]], dtype=np.float32)
    hsv = np.round(hsv).astype(np.uint8)
    hsv[..., 0] %= 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _class_colours(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Primary and secondary colour: hue centred on the class but spread so neighbours overlap."""
    spacing = 180.0 / len(CATEGORIES)  # OpenCV hue units (0..180)
    hue = (label - 1) * spacing + rng.normal(0.0, 0.5 * spacing)
    sat, val = rng.uniform(110, 255), rng.uniform(120, 255)
    primary = _hsv_to_rgb(hue, sat, val)
    # Secondary: same family, clearly darker, so the texture shows at every hue.
    secondary = _hsv_to_rgb(hue + rng.uniform(-8, 8), sat * rng.uniform(0.6, 1.0), val * rng.uniform(0.25, 0.5))
    return primary, secondary


def _polygon_vertices(name: str, rng: np.random.Generator, radius: float) -> np.ndarray | None:
    """Vertices (before rotation) of the polygonal shapes; None for shapes drawn as conics."""
    r = radius
    if name == "square":
        return np.array([[-r, -r], [r, -r], [r, r], [-r, r]]) / math.sqrt(2.0)
    if name == "triangle":
        t = np.deg2rad(90.0 + 120.0 * np.arange(3))
        return r * np.stack([np.cos(t), np.sin(t)], 1)
    if name == "hexagon":
        t = np.deg2rad(60.0 * np.arange(6))
        return r * np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    if name == "diamond":
        return np.array([[0.0, -r], [0.55 * r, 0.0], [0.0, r], [-0.55 * r, 0.0]])
    if name == "cross":
        a = 0.3 * r
        return np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a],
                         [-r, a], [-r, -a], [-a, -a]])
    if name == "heart":
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        x = 16.0 * np.sin(t) ** 3
        y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        return (r / 17.0) * np.stack([x, y + 2.5], 1)  # +2.5 centres the curve vertically
    return None


def _shape_mask(name: str, rng: np.random.Generator, side: int, radius: float, angle: float) -> np.ndarray:
    """Hard (non anti-aliased) mask so the drawn pixels and the mask are the same set."""
    mask = np.zeros((side, side), np.uint8)
    centre = np.array([side / 2.0, side / 2.0])
    shift = 4  # sub-pixel vertex precision for cv2 drawing
    scale = float(1 << shift)
    if name in ("circle", "ring"):
        c = tuple(int(round(v * scale)) for v in centre)
        cv2.circle(mask, c, int(round(radius * scale)), 255, -1, cv2.LINE_8, shift)
        if name == "ring":
            inner = radius * rng.uniform(0.45, 0.6)
            cv2.circle(mask, c, int(round(inner * scale)), 0, -1, cv2.LINE_8, shift)
        return mask > 0
    if name == "ellipse":
        axes = (int(round(radius * scale)), int(round(radius * rng.uniform(0.4, 0.62) * scale)))
        c = tuple(int(round(v * scale)) for v in centre)
        cv2.ellipse(mask, c, axes, math.degrees(angle), 0, 360, 255, -1, cv2.LINE_8, shift)
        return mask > 0
    verts = _polygon_vertices(name, rng, radius)
    if verts is None:
        raise ValueError(f"unknown shape {name!r}")
    verts = verts * np.array([rng.uniform(0.85, 1.15), 1.0])  # mild aspect jitter
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = verts @ rot.T + centre
    cv2.fillPoly(mask, [np.round(pts * scale).astype(np.int32)], 255, cv2.LINE_8, shift)
    return mask > 0


def _texture(name: str, rng: np.random.Generator, mask: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Weight of the secondary colour per pixel (0..1), in the object's own rotated frame."""
    side = mask.shape[0]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - side / 2.0
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    period = max(3.0, 2.0 * radius / rng.uniform(3.0, 4.5))
    if name == "solid":
        return np.zeros_like(u)
    if name == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if name == "stripes":
        return ((v / period) % 1.0 < 0.5).astype(np.float32)
    if name == "diagonal_stripes":
        return (((u + v) / (1.41 * period)) % 1.0 < 0.5).astype(np.float32)
    if name == "dots":
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.32 ** 2).astype(np.float32)
    if name == "grid":
        return (((u / period) % 1.0 < 0.3) | ((v / period) % 1.0 < 0.3)).astype(np.float32)
    if name == "concentric":
        return ((np.hypot(u, v) / period) % 1.0 < 0.5).astype(np.float32)
    if name == "speckle":
        return (rng.random(u.shape) < 0.4).astype(np.float32)
    if name == "gradient":
        return np.clip((u + radius) / (2.0 * radius), 0.0, 1.0).astype(np.float32)
    if name == "outline":
        width = max(1, int(round(radius * 0.22)))
        inner = cv2.erode(mask.astype(np.uint8), np.ones((2 * width + 1, 2 * width + 1), np.uint8))
        return (mask & (inner == 0)).astype(np.float32)
    raise ValueError(f"unknown texture {name!r}")


def render_object(rng: np.random.Generator, label: int, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object of category ``CATEGORIES[label - 1]`` with nominal diameter ``size`` pixels.

    Returns ``(patch, mask)``: uint8 RGB ``[h, w, 3]`` and bool ``[h, w]``, both cropped to the
    tight box of the drawn pixels (so ``mask`` touches all four borders of the patch).
    """
    if not 1 <= int(label) <= len(CATEGORIES):
        raise ValueError(f"render_object: label must be in 1..{len(CATEGORIES)}, got {label}")
    if not size >= 4:
        raise ValueError(f"render_object: size must be >= 4 pixels, got {size}")
    name, texture = CATEGORIES[label - 1], TEXTURES[label - 1]
    radius = size / 2.0
    side = int(math.ceil(size)) + 4
    # Hearts are kept roughly upright (otherwise they read as blobs); everything else spins freely.
    angle = rng.uniform(-0.6, 0.6) if name == "heart" else rng.uniform(0.0, 2.0 * math.pi)
    primary, secondary = _class_colours(rng, label)
    mask = _shape_mask(name, rng, side, radius, angle)
    weight = _texture(texture, rng, mask, radius, angle)[..., None]
    patch = np.round(primary * (1.0 - weight) + secondary * weight).astype(np.uint8)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError(f"render_object: {name} of size {size} drew no pixels")
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return patch[crop], mask[crop]


# --------------------------------------------------------------------------- scenes


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
            local = mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            if int(local.sum()) < min_pixels:
                continue
            new = np.zeros((height, width), bool)
            new[iy0:iy1, ix0:ix1] = local
            new_box = _tight_box(new)
            ok = True
            for k in range(len(kept_labels)):
                current = owner == k + 1
                remaining = current & ~new
                if (remaining.sum() < max(min_pixels, min_kept_fraction * current.sum())
                        or _iou(new_box, _tight_box(current)) > max_iou):
                    ok = False
                    break
            if not ok:
                continue
            kept_labels.append(int(label))
            owner[new] = len(kept_labels)
            image[iy0:iy1, ix0:ix1][local] = patch[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0][local]
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
    return Scene(image, boxes, np.array(kept_labels, np.int64), masks, difficult.astype(bool),
                 np.array(truncated, bool))


def _check_size_range(name: str, size_range: Sequence[int]) -> tuple[int, int]:
    if (len(size_range) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                        for v in size_range)):
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
    height, width = _image_hw(rng, _check_size_range("size_range", size_range))
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
    height, width = _image_hw(rng, _check_size_range("size_range", size_range))
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
    height, width = _image_hw(rng, _check_size_range("size_range", size_range))
    main = rng.uniform(0.4, 0.8) * min(height, width)
    sizes = [main]
    if rng.random() < second_object_prob:
        sizes.append(main * rng.uniform(0.3, 0.55))
    return compose_scene(rng, height, width, [label] * len(sizes), sizes, border_prob=0.1)


# --------------------------------------------------------------------------- file formats


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


def _json_text(obj: Any) -> str:
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


def _generate_cls(root: Path, seed: int, counts: dict[str, int], size_range: tuple[int, int]) -> None:
    for split, n in counts.items():
        for label, name in enumerate(CATEGORIES, start=1):
            folder = root / "cls" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                scene = render_classification_image(image_rng(seed, "cls", split, label, i), label,
                                                    size_range=size_range)
                _write_file(folder / f"{name}_{i:05d}.png", _png_bytes(scene.image))


def _generate_det(root: Path, seed: int, counts: dict[str, int], size_range: tuple[int, int]) -> None:
    det = root / "det"
    voc = det / "voc"
    for sub in (det / "images", det / "annotations", voc / "Annotations", voc / "JPEGImages",
                voc / "ImageSets" / "Main"):
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
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()), "iscrowd": 0,
                    "segmentation": _coco_polygons(mask, box),
                })
            _write_file(voc / "Annotations" / f"{stem}.xml",
                        _xml_text("voc", file_name, scene, CATEGORIES, "detres shapes world").encode("utf-8"))
            stems[split].append(stem)
        coco = {
            "info": {"description": f"detres shapes world detection ({split})", "version": str(GENERATOR_VERSION)},
            "licenses": [], "images": images, "annotations": annotations, "categories": _coco_categories(),
        }
        atomic_write_text(det / "annotations" / f"instances_{split}.json", _json_text(coco))
    for split in counts:
        atomic_write_text(voc / "ImageSets" / "Main" / f"{split}.txt", "".join(s + "\n" for s in stems[split]))
    atomic_write_text(voc / "ImageSets" / "Main" / "trainval.txt",
                      "".join(s + "\n" for split in ("train", "val") for s in stems.get(split, [])))


def _generate_loc(root: Path, seed: int, counts: dict[str, int], size_range: tuple[int, int]) -> None:
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
            _write_file(loc / "Annotations" / split / f"{stem}.xml",
                        _xml_text(split, file_name, scene, WNIDS, "detres shapes world (ILSVRC style)").encode("utf-8"))
            preds = " ".join(f"{wnid} {' '.join(str(v) for v in _voc_box(b))}" for b in scene.boxes)
            rows.append(f"{stem},{preds}\n")
        atomic_write_text(loc / f"LOC_{split}_solution.csv", "ImageId,PredictionString\n" + "".join(rows))
    atomic_write_text(loc / "LOC_synset_mapping.txt",
                      "".join(f"{wnid} {name}\n" for wnid, name in zip(WNIDS, CATEGORIES)))


# --------------------------------------------------------------------------- entry point


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 1_000_000:
        raise ValueError(f"{name}: expected an integer in [0, 1e6), got {value!r}")
    return int(value)


def shapes_world_paths(root: str | Path) -> dict[str, Path]:
    """Where ``generate_shapes_world(root)`` puts things (whether or not they exist yet)."""
    root = Path(root)
    return {
        "root": root,
        "marker": root / MARKER_NAME,
        "cls_train": root / "cls" / "train",
        "cls_val": root / "cls" / "val",
        "det_images": root / "det" / "images",
        "det_coco_train": root / "det" / "annotations" / "instances_train.json",
        "det_coco_val": root / "det" / "annotations" / "instances_val.json",
        "voc_root": root / "det" / "voc",
        "loc_root": root / "loc",
        "loc_synset_mapping": root / "loc" / "LOC_synset_mapping.txt",
        "loc_train_solution": root / "loc" / "LOC_train_solution.csv",
        "loc_val_solution": root / "loc" / "LOC_val_solution.csv",
    }


def _read_marker(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable shapes-world marker ({exc}); delete the folder to regenerate") from exc
    if not isinstance(marker, dict) or marker.get("generator") != "detres.data.synthetic":
        raise ValueError(f"{path}: not a detres shapes-world marker; refusing to touch {path.parent}")
    return marker


def generate_shapes_world(
    root: str | Path,
    *,
    seed: int = 0,
    num_cls_train_per_class: int = 100,
    num_cls_val_per_class: int = 25,
    num_det_train: int = 300,
    num_det_val: int = 60,
    num_loc_train: int = 200,
    num_loc_val: int = 50,
    cls_size: tuple[int, int] = (64, 96),
    det_size: tuple[int, int] = (96, 160),
    loc_size: tuple[int, int] = (96, 160),
) -> dict[str, Path]:
    """Write the shapes world under ``root`` and return the paths of what was written.

    Idempotent: a marker file ``<root>/.shapes_world.json`` records the parameters and is marked
    complete last; a call with the same parameters on a complete folder writes nothing. With other
    parameters, or after an interrupted run, the generator's own sub-folders (cls/, det/, loc/) are
    deleted and rewritten. A folder that has those sub-folders but no marker is refused.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    params: dict[str, Any] = {
        "seed": int(seed),
        "num_cls_train_per_class": _check_count("num_cls_train_per_class", num_cls_train_per_class),
        "num_cls_val_per_class": _check_count("num_cls_val_per_class", num_cls_val_per_class),
        "num_det_train": _check_count("num_det_train", num_det_train),
        "num_det_val": _check_count("num_det_val", num_det_val),
        "num_loc_train": _check_count("num_loc_train", num_loc_train),
        "num_loc_val": _check_count("num_loc_val", num_loc_val),
        "cls_size": list(_check_size_range("cls_size", cls_size)),
        "det_size": list(_check_size_range("det_size", det_size)),
        "loc_size": list(_check_size_range("loc_size", loc_size)),
    }
    paths = shapes_world_paths(root)
    root = paths["root"]
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"shapes world root {root} exists and is not a directory")
    marker = _read_marker(paths["marker"])
    if marker is not None and marker.get("status") == "complete" and marker.get("params") == params \
            and marker.get("version") == GENERATOR_VERSION:
        return paths
    owned = [root / d for d in _OWNED_SUBDIRS]
    if marker is None and any(p.exists() for p in owned):
        raise FileExistsError(
            f"{root} already has {', '.join(p.name for p in owned if p.exists())}/ but no {MARKER_NAME}; "
            "it was not written by generate_shapes_world, refusing to overwrite (choose an empty folder)")
    for p in owned:
        if p.exists():
            shutil.rmtree(p)
    header = {"generator": "detres.data.synthetic", "version": GENERATOR_VERSION, "params": params}
    atomic_write_text(paths["marker"], _json_text({**header, "status": "incomplete"}))

    p = params
    _generate_cls(root, p["seed"], {"train": p["num_cls_train_per_class"], "val": p["num_cls_val_per_class"]},
                  tuple(p["cls_size"]))
    _generate_det(root, p["seed"], {"train": p["num_det_train"], "val": p["num_det_val"]}, tuple(p["det_size"]))
    _generate_loc(root, p["seed"], {"train": p["num_loc_train"], "val": p["num_loc_val"]}, tuple(p["loc_size"]))
    atomic_write_text(paths["marker"], _json_text({**header, "status": "complete"}))
    return paths


def summarize_shapes_world(root: str | Path) -> dict[str, Any]:
    """Counts per task, split and class, read back from the files under ``root``."""
    paths = shapes_world_paths(root)
    marker = _read_marker(paths["marker"])
    if marker is None or marker.get("status") != "complete":
        raise FileNotFoundError(f"{paths['root']}: no complete shapes world here (missing or incomplete {MARKER_NAME})")
    summary: dict[str, Any] = {"params": marker["params"], "cls": {}, "det": {}, "loc": {}}
    for split in ("train", "val"):
        summary["cls"][split] = {name: len(list((paths[f"cls_{split}"] / name).glob("*.png"))) for name in CATEGORIES}
        coco = json.loads(paths[f"det_coco_{split}"].read_text(encoding="utf-8"))
        per_class = {name: 0 for name in CATEGORIES}
        for ann in coco["annotations"]:
            per_class[CATEGORIES[ann["category_id"] - 1]] += 1
        summary["det"][split] = {"images": len(coco["images"]), "objects": per_class}
        loc_images = {name: 0 for name in CATEGORIES}
        loc_objects = 0
        for xml_path in sorted((paths["loc_root"] / "Annotations" / split).glob("*.xml")):
            names = [o.findtext("name") for o in ET.parse(xml_path).getroot().iter("object")]
            loc_images[CATEGORIES[WNIDS.index(names[0])]] += 1
            loc_objects += len(names)
        summary["loc"][split] = {"images": loc_images, "objects": loc_objects}
    return summary
