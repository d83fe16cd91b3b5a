"""Detection post-processing: per-class score threshold, clipping, per-class NMS (or soft-NMS), optional box voting,
top-k, rescaling to the original image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from detres.models.detection.box_voting import box_voting as vote_boxes
from detres.models.detection.soft_nms import soft_nms
from detres.structures.boxes import check_image_hw

__all__ = ["NMS_METHODS", "DetectionPostprocess", "check_postprocess_values", "rescale_detections"]

# "nms": hard per-class NMS (the paper); "soft_linear" / "soft_gaussian": soft-NMS (Bodla et al. 2017).
NMS_METHODS = ("nms", "soft_linear", "soft_gaussian")


def check_postprocess_values(
    *,
    nms_method: str | None = None,
    soft_nms_sigma: float | None = None,
    soft_nms_score_thresh: float | None = None,
    voting_iou: float | None = None,
) -> None:
    """Raise ValueError for an unknown NMS method or an out-of-range soft-NMS / voting value (None: not given)."""
    if nms_method is not None and nms_method not in NMS_METHODS:
        raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}")
    if soft_nms_sigma is not None and not soft_nms_sigma > 0:
        raise ValueError(f"soft_nms_sigma must be > 0, got {soft_nms_sigma}")
    if soft_nms_score_thresh is not None and not soft_nms_score_thresh >= 0:
        raise ValueError(f"soft_nms_score_thresh must be >= 0, got {soft_nms_score_thresh}")
    if voting_iou is not None and not voting_iou >= 0:
        raise ValueError(f"voting_iou must be >= 0, got {voting_iou}")


@dataclass(frozen=True)
class DetectionPostprocess:
    """Per-class detections of one image from region class probabilities and per-class boxes.

    score_thresh: keep (region, class) pairs with probability strictly above this.
    nms_thresh: IoU threshold of the NMS run independently per class (0.3 in the paper).
    detections_per_img: keep at most this many highest-scoring detections (<= 0: keep all).
    nms_method: "nms" (hard, the paper), "soft_linear" (score *= 1 - IoU when IoU > nms_thresh) or
        "soft_gaussian" (score *= exp(-IoU^2 / soft_nms_sigma)); soft-NMS keeps boxes whose decayed score
        stays strictly above ``soft_nms_score_thresh`` and reports decayed scores.
    voting: after NMS, replace each kept box by the score-weighted mean of the thresholded pre-NMS boxes
        of its class with IoU >= ``voting_iou`` (ResNet Appendix B); scores unchanged.
    """

    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    nms_method: str
    soft_nms_sigma: float
    soft_nms_score_thresh: float
    voting: bool
    voting_iou: float

    def __post_init__(self) -> None:
        check_postprocess_values(
            nms_method=self.nms_method,
            soft_nms_sigma=self.soft_nms_sigma,
            soft_nms_score_thresh=self.soft_nms_score_thresh,
            voting_iou=self.voting_iou,
        )

    @classmethod
    def from_config(cls, roi_cfg: Mapping[str, Any]) -> DetectionPostprocess:
        """The post-processing of a ``model.roi_heads`` config tree."""
        return cls(
            score_thresh=float(roi_cfg["score_thresh"]),
            nms_thresh=float(roi_cfg["nms_thresh"]),
            detections_per_img=int(roi_cfg["detections_per_img"]),
            nms_method=str(roi_cfg["nms_method"]),
            soft_nms_sigma=float(roi_cfg["soft_nms_sigma"]),
            soft_nms_score_thresh=float(roi_cfg["soft_nms_score_thresh"]),
            voting=bool(roi_cfg["box_voting"]),
            voting_iou=float(roi_cfg["box_voting_iou"]),
        )

    def __call__(
        self, class_probs: torch.Tensor, boxes: torch.Tensor, image_hw: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """``class_probs`` [R, K+1] (column 0 = background), ``boxes`` [R, K+1, 4] per-class decoded boxes (xyxy,
        input-image pixels) or [R, 4] when one box serves every class, clipped to ``image_hw`` (H, W).

        Returns ``boxes`` [D,4] float, ``scores`` [D] float, ``labels`` [D] int64 in 1..K, by decreasing score.
        """
        if class_probs.dim() != 2 or class_probs.shape[1] < 2:
            raise ValueError(f"postprocess: class_probs must be [R, K+1] with K >= 1, got {tuple(class_probs.shape)}")
        num_rois, num_cols = class_probs.shape
        if boxes.dim() == 2 and boxes.shape == (num_rois, 4):
            boxes = boxes[:, None, :].expand(num_rois, num_cols, 4)
        if boxes.shape != (num_rois, num_cols, 4):
            raise ValueError(
                f"postprocess: boxes must be [R, K+1, 4] = {(num_rois, num_cols, 4)} or [R, 4], "
                f"got {tuple(boxes.shape)}"
            )
        height, width = check_image_hw(image_hw, "postprocess: image_hw")  # traced sizes stay traced

        boxes = clip_boxes_to_image(boxes.reshape(-1, 4), (height, width)).reshape(num_rois, num_cols, 4)
        # Drop the background column, then flatten (region, class) pairs into one candidate list.
        scores = class_probs[:, 1:].reshape(-1)
        cand_boxes = boxes[:, 1:, :].reshape(-1, 4)
        labels = torch.arange(1, num_cols, device=class_probs.device).repeat(num_rois)

        keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
        scores, cand_boxes, labels = scores[keep], cand_boxes[keep], labels[keep]
        if self.nms_method == "nms":
            # batched_nms suppresses only within the same label and returns indices by decreasing score.
            keep = batched_nms(cand_boxes, scores, labels, self.nms_thresh)
            kept_scores = scores[keep]
        else:
            keep, kept_scores = soft_nms(
                cand_boxes,
                scores,
                labels,
                method=self.nms_method[len("soft_") :],
                iou_thresh=self.nms_thresh,
                sigma=self.soft_nms_sigma,
                score_thresh=self.soft_nms_score_thresh,
            )
        if self.detections_per_img > 0:
            keep, kept_scores = keep[: self.detections_per_img], kept_scores[: self.detections_per_img]
        kept_boxes, kept_labels = cand_boxes[keep], labels[keep]
        if self.voting:
            kept_boxes, kept_scores = vote_boxes(
                kept_boxes, kept_scores, kept_labels, cand_boxes, scores, labels, iou_thresh=self.voting_iou
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
