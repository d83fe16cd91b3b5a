"""Batching of detection samples: images zero-padded to one size, per-image targets and metadata kept as lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["collate_detection", "pad_images"]


def pad_images(images: Sequence[Tensor], size_divisibility: int = 16, pad_value: float = 0.0) -> Tensor:
    """Stack [3, H_i, W_i] images top-left aligned into [B, 3, H, W]; H, W = the largest sizes rounded
    up to a multiple of ``size_divisibility`` (0 or 1 = no rounding); the rest is ``pad_value``."""
    if len(images) == 0:
        raise ValueError("pad_images: got an empty list of images")
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility: expected >= 0, got {size_divisibility!r}")
    channels = images[0].shape[0]
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != channels:
            got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"pad_images: image {i} must be a [{channels}, H, W] tensor, got {got}")
    if len(images) == 1:  # the same zeros in one F.pad, whose amounts follow a traced image's size (export)
        return _pad_one(images[0], size_divisibility, pad_value)[None]
    max_h = max(int(img.shape[1]) for img in images)
    max_w = max(int(img.shape[2]) for img in images)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    batch = images[0].new_full((len(images), channels, max_h, max_w), pad_value)
    for img, slot in zip(images, batch):
        slot[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch


def _pad_one(image: Tensor, size_divisibility: int, pad_value: float) -> Tensor:
    """A copy of [3, H, W] padded at the bottom and right up to multiples of ``size_divisibility`` (0 or 1: none)."""
    div = max(size_divisibility, 1)
    extra_h = (div - image.shape[1] % div) % div
    extra_w = (div - image.shape[2] % div) % div
    return F.pad(image, (0, extra_w, 0, extra_h), value=pad_value)


def collate_detection(batch: Sequence[dict[str, Any]], size_divisibility: int = 16) -> dict[str, Any]:
    """Collate detection samples (the dataset contract) into one batch dict.

    Returns ``{"images": Tensor[B, 3, Hmax, Wmax], "image_sizes": [(h, w)], "targets": [dict(boxes,
    labels, difficult, crowd_boxes[, seed])], "image_ids", "orig_sizes", "scales", "scales_xy", "file_names"}``
    (lists in batch order). ``crowd_boxes`` [C, 4] float32 are the sample's crowd regions (COCO), which
    the RPN and RoI heads ignore in training; [0, 4] for a sample without any. ``seed`` is there only when
    the sample has one (training: its RPN / RoI sampling seed, see ``detres.engine.seeded_data``).

    ``images`` holds the un-normalised 0..255 images, top-left aligned, padded with 0 at the bottom and
    right up to a multiple of ``size_divisibility``; ``image_sizes`` are the real (unpadded) sizes. This
    is the only padding a batch goes through: the detector normalises the batch as it is and resets the
    padding to 0 after normalisation (the mean colour), so the raw 0 here is a placeholder and the model
    must read the images through ``image_sizes``; it calls :func:`pad_images` itself only when given a
    plain list of images. The unpadded images are not returned separately: ``images[i, :, :h, :w]`` is
    each of them as a view, at no cost, whereas a second copy would double what DataLoader workers ship
    to the main process. Use it as
    ``DataLoader(..., collate_fn=functools.partial(collate_detection, size_divisibility=32))`` to change
    the divisibility.
    """
    if len(batch) == 0:
        raise ValueError("collate_detection: got an empty batch")
    for i, sample in enumerate(batch):
        missing = [k for k in ("image", "boxes", "labels", "image_id", "orig_size") if k not in sample]
        if missing:
            raise ValueError(f"collate_detection: sample {i} ({sample.get('file_name', '?')}) lacks keys {missing}")
    images = [s["image"] for s in batch]
    targets = []
    for s in batch:
        boxes = s["boxes"]
        difficult = s.get("difficult")
        if difficult is None:
            difficult = torch.zeros(boxes.shape[0], dtype=torch.bool)
        crowd = s.get("crowd_boxes")
        if crowd is None:
            crowd = torch.zeros((0, 4), dtype=torch.float32)
        else:
            crowd = torch.as_tensor(crowd, dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": s["labels"], "difficult": difficult, "crowd_boxes": crowd}
        if s.get("seed") is not None:
            target["seed"] = int(s["seed"])  # the image's sampling seed (RPN / RoI sampling), see seeded_data
        targets.append(target)
    scales = [float(s.get("scale", 1.0)) for s in batch]
    return {
        "images": pad_images(images, size_divisibility),
        "image_sizes": [(int(img.shape[1]), int(img.shape[2])) for img in images],
        "targets": targets,
        "image_ids": [s["image_id"] for s in batch],
        "orig_sizes": [tuple(int(v) for v in s["orig_size"]) for s in batch],
        "scales": scales,
        "scales_xy": [tuple(float(v) for v in s.get("scale_xy", (sc, sc))) for s, sc in zip(batch, scales)],
        "file_names": [s.get("file_name", "") for s in batch],
    }
