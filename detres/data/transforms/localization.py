"""Localization transforms (ResNet paper, Appendix C): classification scale augmentation with boxes, 1-crop and dense
test views.

Boxes are 0-based continuous ``xyxy`` in pixels. Resizing maps ``x -> x * new_w / w`` (pixel
corners, the convention of cv2's half-pixel-centred resize), so mapping back divides by the same
factors and is exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detres.data.transforms.classification import (
    Normalize,
    ScaleAugmentTrainTransform,
    resize_shorter_side,
    shorter_side_size,
)

__all__ = ["LocTestTransform", "LocTrainTransform", "LocView", "TEST_MODES", "clip_and_keep"]

TEST_MODES = ("1crop", "dense")


def clip_and_keep(boxes: np.ndarray, labels: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes [N,4] to the ``width`` x ``height`` image; drop those left with no area (with their labels)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], np.asarray(labels, dtype=np.int64).reshape(-1)[keep]


class LocTrainTransform:
    """Scale augmentation of classification (shorter side ~ U{scale_min..scale_max}, random ``crop``² window,
    horizontal flip) applied to the image and its boxes; boxes are clipped to the crop, empty ones dropped.

    The geometry is :class:`ScaleAugmentTrainTransform`'s own (same draws, same resize), so the localizer
    sees crops exactly like those its backbone was pre-trained on. Output: float32 RGB 0..255 [crop, crop, 3];
    normalisation is the model's (its pixel mean comes from the backbone checkpoint).
    """

    def __init__(
        self, *, scale_min: int, scale_max: int, crop: int, hflip_prob: float = 0.5, seed: int | None = None
    ) -> None:
        # The per-channel mean here is a placeholder: only the geometry of this transform is used.
        self.geometry = ScaleAugmentTrainTransform(
            normalize=Normalize(mean=(0.0, 0.0, 0.0)),
            scale_min=scale_min,
            scale_max=scale_max,
            crop=crop,
            hflip_prob=hflip_prob,
            seed=seed,
        )
        self.crop = int(crop)

    def set_random_seed(self, seed: int) -> None:
        self.geometry.set_random_seed(seed)

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        params = self.geometry.sample_params(h, w)
        out = self.geometry.crop_and_flip(image, **params)
        new_h, new_w = shorter_side_size(h, w, params["scale"])  # the size crop_and_flip resized to
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array(
            [new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32
        )
        boxes -= np.array([params["left"], params["top"], params["left"], params["top"]], dtype=np.float32)
        boxes, labels = clip_and_keep(boxes, labels, self.crop, self.crop)
        if params["flip"]:
            boxes = np.stack([self.crop - boxes[:, 2], boxes[:, 1], self.crop - boxes[:, 0], boxes[:, 3]], axis=1)
        return np.ascontiguousarray(out), boxes.astype(np.float32).reshape(-1, 4), labels


@dataclass(frozen=True)
class LocView:
    """Where a test view's pixels come from: view x = orig x * ``sx`` - ``left`` (same for y)."""

    sx: float
    sy: float
    left: int
    top: int

    def to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """View boxes [N,4] -> original-image boxes, clipped to the ``width`` x ``height`` original."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = (boxes + [self.left, self.top, self.left, self.top]) / [self.sx, self.sy, self.sx, self.sy]
        out[:, 0::2] = out[:, 0::2].clip(0, width)
        out[:, 1::2] = out[:, 1::2].clip(0, height)
        return out


class LocTestTransform:
    """Test views: "dense" = the whole image with its shorter side = ``scale``; "1crop" = its centre ``crop``².

    Returns (float32 RGB 0..255 view [h, w, 3], :class:`LocView` to map boxes back to the original).
    """

    def __init__(self, *, mode: str, scale: int, crop: int | None = None) -> None:
        if mode not in TEST_MODES:
            raise ValueError(f"LocTestTransform: mode must be one of {TEST_MODES}, got {mode!r}")
        if mode == "1crop" and (crop is None or int(crop) > int(scale)):
            raise ValueError(f"LocTestTransform: 1crop needs crop <= scale, got crop={crop} scale={scale}")
        self.mode, self.scale, self.crop = mode, int(scale), None if crop is None else int(crop)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, LocView]:
        h, w = image.shape[:2]
        resized = resize_shorter_side(image, self.scale)
        new_h, new_w = resized.shape[:2]
        top = left = 0
        if self.mode == "1crop":
            top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2  # as cls_transforms.center_crop
            resized = resized[top : top + self.crop, left : left + self.crop]
        return np.ascontiguousarray(resized, dtype=np.float32), LocView(new_w / w, new_h / h, left, top)
