"""Box helpers (formats, clipping, validity masks) for float xyxy boxes in 0-based continuous pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert, clip_boxes_to_image, remove_small_boxes

__all__ = [
    "box_area",
    "remove_small_boxes",
    "clip_boxes",
    "boxes_inside_image",
    "nonempty_mask",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "voc_to_xyxy",
    "xyxy_to_voc",
    "check_boxes",
    "check_image_hw",
]

# box_area(boxes) -> Tensor[N] and remove_small_boxes(boxes, min_size) -> LongTensor of kept indices
# (keeps w >= min_size and h >= min_size) are torchvision.ops functions, re-exported unchanged.


def check_boxes(boxes: Tensor, name: str = "boxes") -> Tensor:
    """Raise ValueError unless ``boxes`` is a floating tensor of shape [..., 4]; return it."""
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape [N, 4], got {type(boxes).__name__}")
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {boxes.dtype}")
    return boxes


def _traced_sizes(image_hw: Sequence[int] | Tensor) -> bool:
    """(height, width) given as two 0-dim tensors while ``torch.jit.trace`` records (an image's traced shape)."""
    return (
        torch.jit.is_tracing()
        and isinstance(image_hw, (tuple, list))
        and len(image_hw) == 2
        and all(isinstance(v, Tensor) and v.dim() == 0 for v in image_hw)
    )


def check_image_hw(image_hw: Sequence[int] | Tensor, name: str = "image_hw") -> tuple[int, int]:
    """Return ``image_hw`` as a (height, width) tuple of ints, or raise ValueError naming the problem.

    Under ``torch.jit.trace`` an image's sizes are 0-dim tensors recording where they come from; they are
    returned as they are, since ints would freeze the traced (exported) model to the example's size."""
    if _traced_sizes(image_hw):
        return image_hw[0], image_hw[1]
    values = image_hw.tolist() if isinstance(image_hw, Tensor) else list(image_hw)
    if len(values) != 2:
        raise ValueError(f"{name}: expected (height, width), got {image_hw!r}")
    h, w = int(values[0]), int(values[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: height and width must be positive, got {image_hw!r}")
    return h, w


def clip_boxes(boxes: Tensor, image_hw: Sequence[int] | Tensor) -> Tensor:
    """Clip xyxy boxes to [0, W] x [0, H] (continuous coordinates, so the image edge is W, not W-1)."""
    check_boxes(boxes)
    return clip_boxes_to_image(boxes, check_image_hw(image_hw))


def boxes_inside_image(boxes: Tensor, image_hw: Sequence[int] | Tensor, allowed_border: float = 0) -> Tensor:
    """BoolTensor[N]: box lies within the image enlarged by ``allowed_border`` pixels on every side.

    This is Faster R-CNN's "cross-boundary anchor" test; a box touching the edge (x2 == W) is inside.
    """
    check_boxes(boxes)
    h, w = check_image_hw(image_hw)
    b = float(allowed_border)
    return (boxes[..., 0] >= -b) & (boxes[..., 1] >= -b) & (boxes[..., 2] <= w + b) & (boxes[..., 3] <= h + b)


def nonempty_mask(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """BoolTensor[N]: width > min_size and height > min_size (strict, so zero-area boxes always fail)."""
    check_boxes(boxes)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths > min_size) & (heights > min_size)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO (x, y, w, h) -> (x1, y1, x2, y2) with x2 = x + w."""
    return box_convert(check_boxes(boxes), in_fmt="xywh", out_fmt="xyxy")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> COCO (x, y, w, h) with w = x2 - x1."""
    return box_convert(check_boxes(boxes), in_fmt="xyxy", out_fmt="xywh")


def voc_to_xyxy(boxes: Tensor) -> Tensor:
    """VOC 1-based inclusive pixel box -> 0-based continuous xyxy: (x1-1, y1-1, x2, y2)."""
    check_boxes(boxes)
    offset = boxes.new_tensor([1.0, 1.0, 0.0, 0.0])
    return boxes - offset


def xyxy_to_voc(boxes: Tensor) -> Tensor:
    """0-based continuous xyxy -> VOC 1-based inclusive pixel box: (x1+1, y1+1, x2, y2)."""
    check_boxes(boxes)
    offset = boxes.new_tensor([1.0, 1.0, 0.0, 0.0])
    return boxes + offset
