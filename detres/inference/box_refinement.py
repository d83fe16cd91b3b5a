"""Box refinement (ResNet paper, Appendix B): a second Fast R-CNN pass on the regressed boxes, union, NMS, voting.

For inference, each proposal's regressed box (that of its top-scoring foreground class) becomes a new
RoI; a new feature is pooled from it on the same trunk features and gives new class scores and new
class-specific boxes. The new predictions join the original ones (2 x 300 with the paper's 300
proposals); per class, NMS at the model's IoU threshold (0.3) runs on this union, then box voting:
each kept box becomes the score-weighted mean of the union boxes of its class overlapping it by
IoU >= ``box_voting_iou`` (scores unchanged).

Composed from the model's public parts only (``preprocess``, ``trunk``, ``rpn``,
``roi_heads.region_features`` / ``predict`` / ``decode_predictions``) and the shared
:meth:`RoIHeads.postprocess_decoded`, which the ordinary eval forward also uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detres.inference.region_scorer import RegionScorer, Scored, SingleScaleScorer
from detres.models.detection.postprocess import check_postprocess_options

__all__ = ["refined_rois", "refine", "detect_with_refinement"]


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


@torch.no_grad()
def detect_with_refinement(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor] | torch.Tensor,
    image_sizes: Sequence[Sequence[int]] | None = None,
    *,
    voting: bool | None = None,
    voting_iou: float | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The eval forward of a Faster R-CNN with Appendix-B box refinement.

    Args:
        model: a ``FasterRCNN`` in eval mode.
        images, image_sizes: as for the model's forward (a list of [3,H,W] 0..255 tensors, or a
            padded batch with the valid size of each image).
        voting: box voting on the union after NMS; None = the model's ``roi_heads.box_voting``
            (so ``--box-voting`` / ``model.roi_heads.box_voting`` steer both paths; the paper's
            "+box refinement" row uses voting).
        voting_iou: IoU at which a union box votes; None = the model's ``roi_heads.box_voting_iou``.

    Score threshold, NMS threshold / method and detections per image are the RoI heads' own. The
    general composition (with multi-scale, flip, ensembles) is ``detres.inference.test_time``.

    Returns:
        per image ``{"boxes" [D,4], "scores" [D], "labels" [D]}`` in the network input's pixels,
        like the model's eval forward.
    """
    heads = model.roi_heads
    voting = bool(heads.box_voting if voting is None else voting)
    voting_iou = float(heads.box_voting_iou if voting_iou is None else voting_iou)
    check_postprocess_options(
        nms_method=heads.nms_method,
        soft_nms_sigma=heads.soft_nms_sigma,
        soft_nms_score_thresh=heads.soft_nms_score_thresh,
        box_voting_iou=voting_iou,
    )
    scorer = SingleScaleScorer(model, images, image_sizes)
    proposals, _ = scorer.propose()
    probs, boxes = refine(scorer, *scorer.score(proposals))
    return heads.postprocess_decoded(probs, boxes, scorer.image_sizes, box_voting=voting, box_voting_iou=voting_iou)
