"""Shapes world objects: the ten shape categories and drawing one textured, coloured object as (patch, mask)."""

from __future__ import annotations

import math

import cv2
import numpy as np

# Alphabetical, so that ImageFolder's sorted-folder labels (0..K-1) equal ``CATEGORIES`` indices and
# the detection label of category ``CATEGORIES[l - 1]`` is ``l`` (COCO category id ``l``).
CATEGORIES: tuple[str, ...] = (
    "circle",
    "cross",
    "diamond",
    "ellipse",
    "heart",
    "hexagon",
    "ring",
    "square",
    "star",
    "triangle",
)
# Texture of each category (same order); shape and texture both identify the class.
TEXTURES: tuple[str, ...] = (
    "solid",
    "diagonal_stripes",
    "gradient",
    "concentric",
    "outline",
    "grid",
    "speckle",
    "checker",
    "dots",
    "stripes",
)
# WordNet-like ids for the ILSVRC-style files ("n" + 8 digits, like n01440764).
WNIDS: tuple[str, ...] = tuple(f"n{90000001 + i:08d}" for i in range(len(CATEGORIES)))


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
        return np.array(
            [[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a]]
        )
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
        return (fu * fu + fv * fv < 0.32**2).astype(np.float32)
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
