"""Soft-NMS (Bodla et al. 2017), per class, all classes at once; in models/, not inference/, because
the eval forward's postprocess uses it."""

from __future__ import annotations

import torch

__all__ = ["SOFT_NMS_METHODS", "pairwise_iou", "soft_nms"]

SOFT_NMS_METHODS = ("linear", "gaussian")


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-by-row IoU of two aligned [N,4] xyxy box sets -> [N] (0 where the union is empty)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str = "linear",
    iou_thresh: float = 0.3,
    sigma: float = 0.5,
    score_thresh: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class soft-NMS: repeatedly select each class's highest-scoring box and decay its classmates.

    Decay of a box with IoU ``o`` to the selected box of its class: ``linear`` multiplies the score
    by ``1 - o`` when ``o > iou_thresh`` (Bodla's N_t) and leaves it alone otherwise; ``gaussian``
    multiplies by ``exp(-o**2 / sigma)`` whatever ``o``. A box whose (decayed) score is not strictly
    above ``score_thresh`` is discarded and never selected. Every class advances by one selection
    per step (a step is O(N), vectorised over boxes and classes), so the loop runs at most
    (largest class size) times; ties go to the lower index.

    Args:
        boxes: [N,4] xyxy. scores: [N]. labels: [N] integer class ids (any values).

    Returns:
        (keep [M] int64 indices into the inputs, decayed scores [M]), by decreasing decayed score.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft_nms: method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"soft_nms: sigma must be > 0, got {sigma}")
    n = boxes.shape[0]
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"soft_nms: need boxes [N,4], scores [N], labels [N]; got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    device = boxes.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), scores.new_zeros(0)
    groups, group = torch.unique(labels, return_inverse=True)
    num_groups = groups.numel()
    index = torch.arange(n, device=device)
    cur = scores.clone()
    active = cur > score_thresh
    selected = torch.zeros(n, dtype=torch.bool, device=device)
    neg_inf = torch.full_like(cur, float("-inf"))
    while bool(active.any()):
        masked = torch.where(active, cur, neg_inf)
        gmax = neg_inf.new_full((num_groups,), float("-inf")).scatter_reduce(0, group, masked, "amax")
        is_best = active & (masked == gmax[group])
        cand = torch.where(is_best, index, torch.full_like(index, n))
        best = torch.full((num_groups,), n, dtype=torch.int64, device=device).scatter_reduce(0, group, cand, "amin")
        live = best < n
        sel = best[live]  # one selection per class that still has active boxes
        selected[sel] = True
        active[sel] = False
        # Each box against the box just selected in its own class (a class without one: a dummy, masked out).
        sel_box = boxes.new_zeros((num_groups, 4))
        sel_box[live] = boxes[sel]
        iou = pairwise_iou(boxes, sel_box[group])
        if method == "linear":
            decay = torch.where(iou > iou_thresh, 1.0 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / sigma)
        cur = torch.where(active & live[group], cur * decay, cur)
        active &= cur > score_thresh
    keep = torch.nonzero(selected).squeeze(1)
    kept_scores = cur[keep]
    order = torch.sort(kept_scores, descending=True, stable=True).indices
    return keep[order], kept_scores[order]
