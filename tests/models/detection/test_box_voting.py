"""Tests for box voting (ResNet Appendix B, after Gidaris & Komodakis): hand-worked averages and a naive loop
reference."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from detres.models.detection.box_voting import box_voting

# Kept K = (0,0,10,10), score 0.9, class 1. The pre-NMS union set:
#   K itself                      IoU 1            -> votes with 0.9
#   V = (2,0,12,10), 0.6, class 1  IoU 80/120 = 0.67 -> votes with 0.6
#   W = (5,0,15,10), 0.3, class 1  IoU 50/150 = 0.33 -> below 0.5, no vote
#   X = (0,0,10,10), 0.5, class 2  other class       -> no vote
KEPT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
ALL = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
ALL_SCORES = torch.tensor([0.9, 0.6, 0.3, 0.5])
ALL_LABELS = torch.tensor([1, 1, 1, 2])


def test_hand_example_score_weighted_mean_of_same_class_overlaps():
    boxes, scores = box_voting(KEPT, torch.tensor([0.9]), torch.tensor([1]), ALL, ALL_SCORES, ALL_LABELS, 0.5)
    # x1 = (0.9*0 + 0.6*2) / 1.5 = 0.8; x2 = (0.9*10 + 0.6*12) / 1.5 = 16.2 / 1.5 = 10.8; y unchanged.
    torch.testing.assert_close(boxes, torch.tensor([[0.8, 0.0, 10.8, 10.0]]))
    assert scores.tolist() == pytest.approx([0.9])  # score unchanged


def test_lower_threshold_admits_more_voters_and_the_boundary_votes():
    # voting_iou 0.3: W (IoU 1/3) votes too: x1 = (0 + 1.2 + 0.3*5) / 1.8 = 1.5; x2 = (9 + 7.2 + 4.5) / 1.8 = 11.5.
    boxes, _ = box_voting(KEPT, torch.tensor([0.9]), torch.tensor([1]), ALL, ALL_SCORES, ALL_LABELS, 0.3)
    torch.testing.assert_close(boxes, torch.tensor([[1.5, 0.0, 11.5, 10.0]]))
    # IoU exactly 0.5 (K vs its lower half (0,0,10,5), 50/100) votes: y2 = (0.5*10 + 0.5*5) / 1.0 = 7.5.
    others = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    boxes, _ = box_voting(
        KEPT, torch.tensor([0.5]), torch.tensor([1]), others, torch.tensor([0.5, 0.5]), torch.tensor([1, 1]), 0.5
    )
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 7.5]]))


def test_threshold_above_one_or_no_overlaps_leave_boxes_unchanged():
    boxes, scores = box_voting(KEPT, torch.tensor([0.9]), torch.tensor([1]), ALL, ALL_SCORES, ALL_LABELS, 1.01)
    assert torch.equal(boxes, KEPT) and scores.tolist() == pytest.approx([0.9])
    # Union set without the kept box and nothing overlapping it: no voters at all.
    far = torch.tensor([[50.0, 50.0, 60.0, 60.0]])
    boxes, _ = box_voting(KEPT, torch.tensor([0.9]), torch.tensor([1]), far, torch.tensor([0.8]), torch.tensor([1]))
    assert torch.equal(boxes, KEPT)
    # Voters of zero total weight also leave the box alone (no 0/0).
    boxes, _ = box_voting(
        KEPT, torch.tensor([0.9]), torch.tensor([1]), ALL[1:2], torch.tensor([0.0]), torch.tensor([1])
    )
    assert torch.equal(boxes, KEPT)


def test_voting_only_its_own_box_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 5], dim=1)
    scores, labels = torch.rand(20, generator=gen), torch.arange(20)  # every box its own class
    voted, _ = box_voting(boxes, scores, labels, boxes, scores, labels)
    torch.testing.assert_close(voted, boxes)


def _naive_voting(kept, kept_labels, all_boxes, all_scores, all_labels, thr):
    out = []
    for k in range(kept.shape[0]):
        num, den = [0.0] * 4, 0.0
        for j in range(all_boxes.shape[0]):
            if all_labels[j] != kept_labels[k]:
                continue
            if box_iou(kept[k : k + 1], all_boxes[j : j + 1]).item() >= thr:
                w = all_scores[j].item()
                num = [n + w * v for n, v in zip(num, all_boxes[j].tolist())]
                den += w
        out.append([n / den for n in num] if den > 0 else kept[k].tolist())
    return torch.tensor(out, dtype=kept.dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_a_naive_loop_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 60
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50
    all_boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30 + 2], dim=1)
    all_scores = torch.rand(n, generator=gen, dtype=torch.float64)
    all_labels = torch.randint(1, 4, (n,), generator=gen)
    pick = torch.randperm(n, generator=gen)[:15]
    kept, kept_scores, kept_labels = all_boxes[pick], all_scores[pick], all_labels[pick]
    for thr in (0.3, 0.5, 0.7):
        voted, scores = box_voting(kept, kept_scores, kept_labels, all_boxes, all_scores, all_labels, thr)
        torch.testing.assert_close(voted, _naive_voting(kept, kept_labels, all_boxes, all_scores, all_labels, thr))
        assert torch.equal(scores, kept_scores)


def test_empty_inputs_and_shape_errors():
    empty = torch.zeros(0, 4)
    boxes, scores = box_voting(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), ALL, ALL_SCORES, ALL_LABELS)
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    boxes, _ = box_voting(
        KEPT, torch.tensor([0.9]), torch.tensor([1]), empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    )
    assert torch.equal(boxes, KEPT)
    with pytest.raises(ValueError, match="all boxes"):
        box_voting(KEPT, torch.tensor([0.9]), torch.tensor([1]), ALL, ALL_SCORES[:2], ALL_LABELS)


def test_voted_boxes_never_round_past_the_voters_range():
    """Boxes that all end at the image border (x2 = y2 = 96) vote with arbitrary scores: the weighted mean must stay
    <= 96 (float32 rounding of sum(w * 96) / sum(w) exceeds it for some weights, e.g. through box refinement)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = 7
        x1 = torch.rand(n, generator=g) * 3 + 80
        boxes = torch.stack([x1, x1, torch.full((n,), 96.0), torch.full((n,), 96.0)], dim=1)
        scores = torch.rand(n, generator=g) * torch.rand(n, generator=g)
        labels = torch.ones(n, dtype=torch.long)
        voted, _ = box_voting(boxes[:1], scores[:1], labels[:1], boxes, scores, labels, iou_thresh=0.5)
        assert float(voted[:, 2:].max()) <= 96.0
