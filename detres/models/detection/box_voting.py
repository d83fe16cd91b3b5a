"""Box voting (ResNet App. B, after Gidaris & Komodakis); in models/, not inference/, because the
eval forward's postprocess uses it."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

__all__ = ["box_voting"]


def box_voting(
    kept_boxes: torch.Tensor,
    kept_scores: torch.Tensor,
    kept_labels: torch.Tensor,
    all_boxes: torch.Tensor,
    all_scores: torch.Tensor,
    all_labels: torch.Tensor,
    iou_thresh: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each kept (post-NMS) box by the score-weighted mean of the pre-NMS boxes that vote for it.

    The voters of a kept box are the boxes of ``all_*`` (the "union" set before NMS, usually
    including the kept box itself) with the same label and IoU >= ``iou_thresh`` with it; each
    weighs its score. A kept box without voters of positive total weight (e.g. ``iou_thresh > 1``)
    keeps its coordinates. Scores are returned unchanged. One [D, N] IoU matrix, no loops.

    Args:
        kept_boxes: [D,4] xyxy, kept_scores: [D], kept_labels: [D].
        all_boxes: [N,4] xyxy, all_scores: [N] (>= 0), all_labels: [N].
        iou_thresh: voting IoU threshold (0.5 in Gidaris & Komodakis and the ResNet paper).

    Returns:
        (voted boxes [D,4], kept_scores [D]).
    """
    d, n = kept_boxes.shape[0], all_boxes.shape[0]
    if kept_boxes.shape != (d, 4) or kept_scores.shape != (d,) or kept_labels.shape != (d,):
        raise ValueError(
            f"box_voting: kept boxes/scores/labels must be [D,4]/[D]/[D], got {tuple(kept_boxes.shape)}, "
            f"{tuple(kept_scores.shape)}, {tuple(kept_labels.shape)}"
        )
    if all_boxes.shape != (n, 4) or all_scores.shape != (n,) or all_labels.shape != (n,):
        raise ValueError(
            f"box_voting: all boxes/scores/labels must be [N,4]/[N]/[N], got {tuple(all_boxes.shape)}, "
            f"{tuple(all_scores.shape)}, {tuple(all_labels.shape)}"
        )
    if d == 0 or n == 0:
        return kept_boxes.clone(), kept_scores
    voters = (box_iou(kept_boxes, all_boxes.to(kept_boxes.dtype)) >= iou_thresh) & (
        kept_labels[:, None] == all_labels[None, :]
    )
    weights = voters.to(kept_boxes.dtype) * all_scores.to(kept_boxes.dtype)[None, :]  # [D, N]
    total = weights.sum(dim=1, keepdim=True)
    all_boxes = all_boxes.to(kept_boxes.dtype)
    voted = (weights @ all_boxes) / total.clamp(min=torch.finfo(total.dtype).tiny)
    # a weighted mean can round one ulp past its inputs (x2 = 96.00001 on a 96 px image): keep it inside their range
    voted = torch.minimum(torch.maximum(voted, all_boxes.amin(dim=0)), all_boxes.amax(dim=0))
    return torch.where(total > 0, voted, kept_boxes), kept_scores
