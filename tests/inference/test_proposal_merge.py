"""Tests for detres.inference.proposal_merge: union of proposal sets, NMS by objectness, cap."""

from __future__ import annotations

import pytest
import torch

from detres.inference.proposal_merge import merge_proposal_sets


def test_hand_worked_union():
    a = ([torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])], [torch.tensor([0.9, 0.4])])
    # [0,0,10,11] overlaps a's first box at IoU 100/110 = 0.91 > 0.7 and scores lower: suppressed;
    # [0,0,10,20] overlaps it at IoU 0.5: kept.
    b = ([torch.tensor([[0.0, 0.0, 10.0, 11.0], [0.0, 0.0, 10.0, 20.0]])], [torch.tensor([0.8, 0.7])])
    boxes, scores = merge_proposal_sets([a, b], nms_thresh=0.7, max_proposals=10)
    assert scores[0].tolist() == pytest.approx([0.9, 0.7, 0.4])
    assert boxes[0].tolist() == [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [50.0, 50.0, 60.0, 60.0]]
    boxes, scores = merge_proposal_sets([a, b], nms_thresh=0.7, max_proposals=2)
    assert scores[0].tolist() == pytest.approx([0.9, 0.7])


def test_one_set_already_nmsed_comes_back_unchanged():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 20], dim=1)
    scores = torch.rand(40, generator=g)
    from torchvision.ops import nms

    keep = nms(boxes, scores, 0.7)
    merged, merged_scores = merge_proposal_sets([([boxes[keep]], [scores[keep]])], nms_thresh=0.7, max_proposals=300)
    assert torch.equal(merged[0], boxes[keep]) and torch.equal(merged_scores[0], scores[keep])


def test_bad_input():
    one = ([torch.zeros(0, 4)], [torch.zeros(0)])
    with pytest.raises(ValueError, match="no proposal sets"):
        merge_proposal_sets([])
    with pytest.raises(ValueError, match="different numbers of images"):
        merge_proposal_sets([one, ([torch.zeros(0, 4)] * 2, [torch.zeros(0)] * 2)])
    with pytest.raises(ValueError, match="max_proposals"):
        merge_proposal_sets([one], max_proposals=0)
