"""Union of several proposal sets of the same images (ensemble members, pyramid levels): NMS on the union, capped."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

__all__ = ["merge_proposal_sets"]


def merge_proposal_sets(
    sets: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]], *, nms_thresh: float = 0.7, max_proposals: int = 300
) -> tuple[list[Tensor], list[Tensor]]:
    """Per image, the union of every set's proposals, NMS at ``nms_thresh`` by objectness, best ``max_proposals``.

    ``sets``: one (boxes per image [Ni,4], scores per image [Ni]) pair per source, all for the same
    images in the same pixels. Returns the merged (boxes, scores) per image, best first. A single set
    already NMS-ed at ``nms_thresh`` and no longer than ``max_proposals`` comes back unchanged.
    """
    if len(sets) == 0:
        raise ValueError("merge_proposal_sets: no proposal sets given")
    if not 0.0 < nms_thresh <= 1.0:
        raise ValueError(f"merge_proposal_sets: nms_thresh must be in (0, 1], got {nms_thresh}")
    if int(max_proposals) < 1:
        raise ValueError(f"merge_proposal_sets: max_proposals must be >= 1, got {max_proposals}")
    num_images = {len(boxes) for boxes, _ in sets} | {len(scores) for _, scores in sets}
    if len(num_images) != 1:
        raise ValueError(f"merge_proposal_sets: the sets cover different numbers of images {sorted(num_images)}")
    merged_boxes, merged_scores = [], []
    for i in range(len(sets[0][0])):
        boxes = torch.cat([s[0][i].float() for s in sets])
        scores = torch.cat([s[1][i].float() for s in sets])
        keep = nms(boxes, scores, nms_thresh)[: int(max_proposals)]  # indices by decreasing score
        merged_boxes.append(boxes[keep])
        merged_scores.append(scores[keep])
    return merged_boxes, merged_scores
