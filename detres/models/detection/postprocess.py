"""Detection post-processing: per-class score threshold, clipping, per-class NMS (or soft-NMS), optional box voting,
top-k, rescaling to the original image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from detres.models.detection.box_voting import box_voting as vote_boxes
from detres.models.detection.soft_nms import soft_nms

__all__ = ["NMS_METHODS", "check_postprocess_options", "postprocess_boxes", "rescale_detections"]

# "nms": hard per-class NMS (the paper); "soft_linear" / "soft_gaussian": soft-NMS (Bodla et al. 2017).
NMS_METHODS = ("nms", "soft_linear", "soft_gaussian")


def check_postprocess_options(
    *,
    nms_method: str = "nms",
    soft_nms_sigma: float = 0.5,
    soft_nms_score_thresh: float = 0.001,
    box_voting_iou: float = 0.5,
) -> None:
    """Raise ValueError for an unknown NMS method or out-of-range soft-NMS / voting parameters."""
    if nms_method not in NMS_METHODS:
        raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}")
    if not soft_nms_sigma > 0:
        raise ValueError(f"soft_nms_sigma must be > 0, got {soft_nms_sigma}")
    if not soft_nms_score_thresh >= 0:
        raise ValueError(f"soft_nms_score_thresh must be >= 0, got {soft_nms_score_thresh}")
    if not box_voting_iou >= 0:
        raise ValueError(f"box_voting_iou must be >= 0, got {box_voting_iou}")


def postprocess_boxes(
    class_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_hw: Sequence[int],
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    detections_per_img: int = 100,
    nms_method: str = "nms",
    soft_nms_sigma: float = 0.5,
    soft_nms_score_thresh: float = 0.001,
    box_voting: bool = False,
    box_voting_iou: float = 0.5,
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
        nms_method: "nms" (hard, the paper), "soft_linear" (score *= 1 - IoU when IoU > nms_thresh)
            or "soft_gaussian" (score *= exp(-IoU^2 / soft_nms_sigma)); soft-NMS keeps boxes whose
            decayed score stays strictly above ``soft_nms_score_thresh`` and reports decayed scores.
        box_voting: after NMS, replace each kept box by the score-weighted mean of the thresholded
            pre-NMS boxes of its class with IoU >= ``box_voting_iou`` (ResNet Appendix B); scores unchanged.

    Returns:
        dict with ``boxes`` [D,4] float, ``scores`` [D] float, ``labels`` [D] int64 in 1..K,
        sorted by decreasing score.
    """
    if class_probs.dim() != 2 or class_probs.shape[1] < 2:
        raise ValueError(f"postprocess_boxes: class_probs must be [R, K+1] with K >= 1, got {tuple(class_probs.shape)}")
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

    check_postprocess_options(
        nms_method=nms_method,
        soft_nms_sigma=soft_nms_sigma,
        soft_nms_score_thresh=soft_nms_score_thresh,
        box_voting_iou=box_voting_iou,
    )

    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    scores, cand_boxes, labels = scores[keep], cand_boxes[keep], labels[keep]
    if nms_method == "nms":
        # batched_nms suppresses only within the same label and returns indices by decreasing score.
        keep = batched_nms(cand_boxes, scores, labels, nms_thresh)
        kept_scores = scores[keep]
    else:
        keep, kept_scores = soft_nms(
            cand_boxes,
            scores,
            labels,
            method=nms_method[len("soft_") :],
            iou_thresh=nms_thresh,
            sigma=soft_nms_sigma,
            score_thresh=soft_nms_score_thresh,
        )
    if detections_per_img > 0:
        keep, kept_scores = keep[:detections_per_img], kept_scores[:detections_per_img]
    kept_boxes, kept_labels = cand_boxes[keep], labels[keep]
    if box_voting:
        kept_boxes, kept_scores = vote_boxes(
            kept_boxes, kept_scores, kept_labels, cand_boxes, scores, labels, iou_thresh=box_voting_iou
        )
    return {"boxes": kept_boxes, "scores": kept_scores, "labels": kept_labels}


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
