"""Detection post-processing: per-class score threshold, clipping, per-class NMS, top-k, rescaling to the original image."""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

__all__ = ["postprocess_boxes", "rescale_detections"]


def postprocess_boxes(
    class_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_hw: Sequence[int],
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    detections_per_img: int = 100,
) -> dict[str, torch.Tensor]:
    """Turn per-region class probabilities and per-class boxes into final detections for one image.

    Args:
        class_probs: [R, K+1] softmax probabilities, column 0 = background.
        boxes: [R, K+1, 4] per-class decoded boxes (xyxy, input-image pixels), or [R, 4] when
            the same box serves every class (class-agnostic regression, or raw proposals).
        image_hw: (H, W) of the image the boxes live in; boxes are clipped to it.
        score_thresh: keep (region, class) pairs with probability strictly above this.
        nms_thresh: IoU threshold of the NMS run independently per class (0.3 in the paper).
        detections_per_img: keep at most this many highest-scoring detections (<= 0: keep all).

    Returns:
        dict with ``boxes`` [D,4] float, ``scores`` [D] float, ``labels`` [D] int64 in 1..K,
        sorted by decreasing score.
    """
    if class_probs.dim() != 2 or class_probs.shape[1] < 2:
        raise ValueError(
            f"postprocess_boxes: class_probs must be [R, K+1] with K >= 1, got {tuple(class_probs.shape)}"
        )
    num_rois, num_cols = class_probs.shape
    if boxes.dim() == 2 and boxes.shape == (num_rois, 4):
        boxes = boxes[:, None, :].expand(num_rois, num_cols, 4)
    if boxes.shape != (num_rois, num_cols, 4):
        raise ValueError(
            f"postprocess_boxes: boxes must be [R, K+1, 4] = {(num_rois, num_cols, 4)} or [R, 4], "
            f"got {tuple(boxes.shape)}"
        )
    if len(image_hw) != 2:
        raise ValueError(f"postprocess_boxes: image_hw must be (H, W), got {image_hw!r}")
    height, width = int(image_hw[0]), int(image_hw[1])

    boxes = clip_boxes_to_image(boxes.reshape(-1, 4), (height, width)).reshape(num_rois, num_cols, 4)
    # Drop the background column, then flatten (region, class) pairs into one candidate list.
    scores = class_probs[:, 1:].reshape(-1)
    cand_boxes = boxes[:, 1:, :].reshape(-1, 4)
    labels = torch.arange(1, num_cols, device=class_probs.device).repeat(num_rois)

    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    scores, cand_boxes, labels = scores[keep], cand_boxes[keep], labels[keep]
    # batched_nms suppresses only within the same label and returns indices by decreasing score.
    keep = batched_nms(cand_boxes, scores, labels, nms_thresh)
    if detections_per_img > 0:
        keep = keep[:detections_per_img]
    return {"boxes": cand_boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def rescale_detections(
    dets: dict[str, torch.Tensor],
    scale: float | Sequence[float],
    orig_hw: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Map detections from the resized input image back to the original image.

    Args:
        dets: dict with ``boxes`` [D,4] in resized-image pixels (other keys are passed through).
        scale: resized/original size ratio, a float or (scale_y, scale_x).
        orig_hw: (H0, W0) of the original image; boxes are clipped to it.

    Returns:
        A new dict with ``boxes`` divided by the scale and clipped.
    """
    if "boxes" not in dets:
        raise ValueError("rescale_detections: dets has no 'boxes' entry")
    if isinstance(scale, (int, float)):
        sy = sx = float(scale)
    else:
        if len(scale) != 2:
            raise ValueError(f"rescale_detections: scale must be a float or (sy, sx), got {scale!r}")
        sy, sx = float(scale[0]), float(scale[1])
    if sy <= 0 or sx <= 0:
        raise ValueError(f"rescale_detections: scale must be positive, got {(sy, sx)}")
    if len(orig_hw) != 2:
        raise ValueError(f"rescale_detections: orig_hw must be (H0, W0), got {orig_hw!r}")
    boxes = dets["boxes"]
    factor = boxes.new_tensor([sx, sy, sx, sy])
    out = dict(dets)
    out["boxes"] = clip_boxes_to_image(boxes / factor, (int(orig_hw[0]), int(orig_hw[1])))
    return out
