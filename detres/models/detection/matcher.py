"""IoU-threshold matching of predictions (anchors / proposals) to ground-truth boxes."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Matcher", "intersection_over_area", "crowd_ignore_mask"]


class Matcher:
    """Assign every prediction (column of an IoU matrix) to its best ground-truth box, or to no box.

    For prediction j with best IoU v over the ground truths:
        v >= high_threshold              -> index of that ground truth (>= 0)
        low_threshold <= v < high        -> BETWEEN_THRESHOLDS (-2), the ignore band
        v < low_threshold                -> BELOW_LOW_THRESHOLD (-1)
    With ``allow_low_quality_matches`` (Faster R-CNN's RPN rule), for every ground truth the
    prediction(s) with the highest IoU to it -- all of them when tied -- are matched as well, each to
    its own best ground truth. A ground truth whose best IoU is 0 overlaps nothing and gives no match
    (otherwise every non-overlapping prediction would tie at 0 and become positive).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self,
        high_threshold: float = 0.7,
        low_threshold: float = 0.3,
        allow_low_quality_matches: bool = False,
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError(
                f"Matcher: low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})"
            )
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: Tensor) -> Tensor:
        """iou: [M ground truths, N predictions] -> LongTensor[N] of gt indices or -1 / -2."""
        if not isinstance(iou, Tensor) or iou.ndim != 2:
            shape = tuple(iou.shape) if isinstance(iou, Tensor) else type(iou).__name__
            raise ValueError(f"Matcher: iou must be a 2-D tensor [num_gt, num_preds], got {shape}")
        num_gt, num_preds = iou.shape
        if num_gt == 0:
            # No objects: everything is background.
            return torch.full((num_preds,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        if num_preds == 0:
            return torch.empty((0,), dtype=torch.int64, device=iou.device)

        best_iou, best_gt = iou.max(dim=0)
        matches = best_gt.clone()
        matches[best_iou < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_iou >= self.low_threshold) & (best_iou < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            is_best_for_some_gt = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)
            matches[is_best_for_some_gt] = best_gt[is_best_for_some_gt]
        return matches


def intersection_over_area(boxes: Tensor, regions: Tensor) -> Tensor:
    """[N, 4] boxes, [M, 4] regions (xyxy) -> [N, M]: area(boxes[i] & regions[j]) / area(boxes[i]).

    The COCO "iscrowd" overlap (pycocotools' ``iou`` with ``iscrowd=1``): how much of a box lies inside
    a region, 1.0 for a box wholly inside it whatever the region's size. Empty boxes give 0.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or regions.ndim != 2 or regions.shape[-1] != 4:
        raise ValueError(
            "intersection_over_area: expected [N, 4] and [M, 4] boxes, "
            f"got {tuple(boxes.shape)} and {tuple(regions.shape)}"
        )
    top_left = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return torch.where(area[:, None] > 0, inter / area[:, None].clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


def crowd_ignore_mask(boxes: Tensor, crowd_boxes: Tensor | None, thresh: float) -> Tensor:
    """Bool[N]: boxes (anchors or proposals) that lie more than ``thresh`` inside some crowd region.

    Detectron's crowd filter (``TRAIN.CROWD_FILTER_THRESH`` = 0.7 on Fast R-CNN proposals, after
    py-faster-rcnn's COCO loader; mmdetection's ``ignore_iof_thr`` for anchors): such boxes are
    neither positive nor negative training examples. A crowd region holds several unannotated
    objects, so a box inside it is not background, yet it is no single object either. With no
    crowd boxes, or ``thresh >= 1`` (the fraction never exceeds 1), nothing is ignored.
    """
    if crowd_boxes is None or crowd_boxes.numel() == 0 or boxes.shape[0] == 0 or thresh >= 1.0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    crowd = crowd_boxes.to(device=boxes.device, dtype=boxes.dtype).reshape(-1, 4)
    return intersection_over_area(boxes, crowd).max(dim=1).values > thresh
