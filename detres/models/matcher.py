"""IoU-threshold matching of predictions (anchors / proposals) to ground-truth boxes."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Matcher"]


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
