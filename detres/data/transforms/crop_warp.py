"""R-CNN region crops: crop each box of an image and warp it to size x size pixels, and map warped boxes back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["context_boxes", "crop_and_warp", "image_hw", "image_to_warped", "warped_to_image"]


def _as_chw_float(image: np.ndarray | Tensor) -> Tensor:
    """A uint8 image or any ndarray is [H,W,3] (as read from disk); a float tensor is [3,H,W] (a LocDataset sample)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        hwc = True
    else:
        hwc = image.dtype == torch.uint8
    if image.ndim != 3:
        raise ValueError(f"crop_and_warp: expected a 3-d image, got shape {tuple(image.shape)}")
    image = image.permute(2, 0, 1) if hwc else image
    if image.shape[0] != 3:
        raise ValueError(
            f"crop_and_warp: expected 3 channels ([H,W,3] uint8 or [3,H,W] float), got {tuple(image.shape)}"
        )
    return image.to(torch.float32)


def image_hw(image: np.ndarray | Tensor) -> tuple[int, int]:
    """(height, width) of an image in either layout :func:`crop_and_warp` accepts."""
    return tuple(int(v) for v in _as_chw_float(image).shape[-2:])  # type: ignore[return-value]


def _check_rois(boxes: Tensor, name: str) -> Tensor:
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {tuple(boxes.shape)}")
    if boxes.numel() and bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
        raise ValueError(f"{name}: every box needs x2 > x1 and y2 > y1")
    return boxes


def context_boxes(rois: Tensor, size: int, context_padding: float = 0.0) -> Tensor:
    """The image windows actually warped: each RoI grown so that, once warped to ``size``, it lies
    ``context_padding`` pixels inside every border (R-CNN's context padding; 0 = the RoI itself)."""
    rois = _check_rois(rois, "rois")
    if not 0 <= 2 * context_padding < size:
        raise ValueError(f"context_padding must lie in [0, size/2), got {context_padding} for size {size}")
    scale = size / (size - 2.0 * context_padding)  # the RoI fills size - 2p of the size warped pixels
    centres = (rois[:, :2] + rois[:, 2:]) / 2
    half = (rois[:, 2:] - rois[:, :2]) / 2 * scale
    return torch.cat((centres - half, centres + half), dim=1)


def crop_and_warp(
    image: np.ndarray | Tensor,
    boxes: Tensor,
    size: int = 224,
    context_padding: float = 0.0,
    *,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    sampling_ratio: int = 0,
) -> Tensor:
    """Crop ``boxes`` [N,4] (0-based continuous xyxy image pixels) and warp each to [3,size,size] -> [N,3,size,size].

    The image is first normalised ((x - pixel_mean) / pixel_std, per channel, when given). Warped pixel (i, j)
    covers the window's continuous square [j, j+1] x [i, i+1] scaled by (box size / size), so
    :func:`warped_to_image` is the exact inverse mapping. Implementation: torchvision's ``roi_align``
    (aligned=True: pixel k's centre is k + 0.5), i.e. bilinear sampling, averaging ``sampling_ratio``² samples per
    output pixel (0 = adaptive, ceil(box/size) per axis, which also anti-aliases a shrinking warp). Parts of a box
    outside the image read 0 *after normalisation*, i.e. the pixel mean when ``pixel_mean`` is given (black when
    not), except a half-pixel border band that repeats the edge pixels (bilinear clamping).
    """
    chw = _as_chw_float(image)
    if pixel_mean is not None:
        chw = chw - torch.as_tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    if pixel_std is not None:
        chw = chw / torch.as_tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    windows = context_boxes(boxes, int(size), context_padding)
    if windows.shape[0] == 0:
        return chw.new_zeros((0, 3, int(size), int(size)))
    rois = torch.cat((windows.new_zeros((windows.shape[0], 1)), windows), dim=1)
    return roi_align(
        chw[None], rois, (int(size), int(size)), spatial_scale=1.0, sampling_ratio=int(sampling_ratio), aligned=True
    )


def warped_to_image(boxes_in_crop: Tensor, rois: Tensor, size: int = 224, context_padding: float = 0.0) -> Tensor:
    """Boxes [N,4] in the warped crop of ``rois[i]`` (continuous warped pixels) -> image pixels [N,4]."""
    boxes_in_crop = torch.as_tensor(boxes_in_crop, dtype=torch.float32)
    origin, scale = _warp_frame(boxes_in_crop, rois, size, context_padding, "warped_to_image")
    return origin + boxes_in_crop * scale


def image_to_warped(boxes: Tensor, rois: Tensor, size: int = 224, context_padding: float = 0.0) -> Tensor:
    """Image-pixel boxes [N,4] -> the warped-crop pixels of ``rois[i]`` (the inverse of :func:`warped_to_image`)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    origin, scale = _warp_frame(boxes, rois, size, context_padding, "image_to_warped")
    return (boxes - origin) / scale


def _warp_frame(boxes: Tensor, rois: Tensor, size: int, context_padding: float, who: str) -> tuple[Tensor, Tensor]:
    """Per RoI, the image position of the warped crop's origin and the image pixels per crop pixel ([N,4] each,
    xyxy layout) — the affine map between a warped crop and its image."""
    windows = context_boxes(rois, int(size), context_padding)
    if boxes.shape != windows.shape:
        raise ValueError(f"{who}: boxes {tuple(boxes.shape)} and rois {tuple(windows.shape)} differ")
    origin = windows[:, :2].repeat(1, 2)
    return origin, ((windows[:, 2:] - windows[:, :2]) / float(size)).repeat(1, 2)
