"""Box refinement (ResNet paper, Appendix B): a second Fast R-CNN pass on the regressed boxes, union, NMS, voting.

For inference, each proposal's regressed box (that of its top-scoring foreground class) becomes a new
RoI; a new feature is pooled from it on the same trunk features and gives new class scores and new
class-specific boxes. The new predictions join the original ones (2 x 300 with the paper's 300
proposals); per class, NMS at the model's IoU threshold (0.3) runs on this union, then box voting:
each kept box becomes the score-weighted mean of the union boxes of its class overlapping it.

A step of :class:`detres.inference.test_time.TestTimeAugmentation` (``TestConfig.box_refinement``), which
scores both passes with the same region scorer and post-processes the union as the eval forward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detres.inference.region_scorer import RegionScorer, Scored

__all__ = ["refined_rois", "refine"]


def refined_rois(
    class_probs: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], image_sizes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Per image, the new RoIs [Ni,4]: each region's box of its top-scoring foreground class, clipped to the image.

    ``class_probs``: per image [Ni,K+1] (column 0 = background); ``boxes``: per image [Ni,K+1,4]
    per-class boxes or [Ni,4] class-agnostic ones (as ``RoIHeads.decode_predictions`` returns).
    Ties go to the lower class index. One gather over all regions of all images (no loops).
    """
    if not (len(class_probs) == len(boxes) == len(image_sizes)):
        raise ValueError(
            f"refined_rois: got {len(class_probs)} score sets, {len(boxes)} box sets and {len(image_sizes)} image sizes"
        )
    if len(class_probs) == 0:
        return []
    counts = [int(p.shape[0]) for p in class_probs]
    probs = torch.cat(list(class_probs))
    all_boxes = torch.cat(list(boxes))
    if all_boxes.dim() == 3:
        top = probs[:, 1:].argmax(dim=1) + 1  # first maximum: the lowest class index on ties
        rois = all_boxes[torch.arange(all_boxes.shape[0], device=all_boxes.device), top]
    else:
        rois = all_boxes
    # Clip each RoI to its own image: per-RoI (W, H, W, H) limits.
    limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=rois.dtype, device=rois.device)
    limits = limits.repeat_interleave(torch.tensor(counts, device=rois.device), dim=0)
    rois = torch.minimum(rois.clamp(min=0), limits)
    return list(rois.split(counts))


def refine(scorer: RegionScorer, probs: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> Scored:
    """The refinement pass: score each region's regressed box with ``scorer``; per image the union of both passes.

    ``probs`` / ``boxes``: the first pass's per-image class probabilities and boxes (``scorer.score`` of
    the proposals). Returns per image ([2Ni,K+1], [2Ni,K+1,4] or [2Ni,4]): first pass, then second.
    """
    rois = refined_rois(probs, boxes, scorer.image_sizes)
    new_probs, new_boxes = scorer.score(rois)
    return (
        [torch.cat([p, q]) for p, q in zip(probs, new_probs)],
        [torch.cat([b, c]) for b, c in zip(boxes, new_boxes)],
    )
