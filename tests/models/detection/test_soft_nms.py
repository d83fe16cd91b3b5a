"""Tests for per-class soft-NMS (Bodla et al. 2017): hand-worked decays, a naive loop reference, the NMS limits."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from detres.models.detection.soft_nms import pairwise_iou, soft_nms

# A = (0,0,10,10); B = (0,0,10,5) covers half of A: IoU(A,B) = 50/100 = 0.5; C = (20,20,30,30) is disjoint.
BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [20.0, 20.0, 30.0, 30.0]])
SCORES = torch.tensor([0.9, 0.8, 0.7])
SAME = torch.tensor([1, 1, 1])


def test_linear_hand_example_decays_only_above_nt():
    # Nt = 0.3: A selected; B (IoU 0.5 > 0.3) decays to 0.8 * (1 - 0.5) = 0.4; C (IoU 0) stays 0.7.
    # Then C (0.7) is selected, then B (0.4; IoU(B,C) = 0).
    keep, scores = soft_nms(BOXES, SCORES, SAME, method="linear", iou_thresh=0.3)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.4]))
    # Nt = 0.6: IoU 0.5 is not above it, nothing decays.
    keep, scores = soft_nms(BOXES, SCORES, SAME, method="linear", iou_thresh=0.6)
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores, SCORES)


def test_gaussian_hand_example():
    # B: 0.8 * exp(-0.5^2 / 0.5) = 0.8 * exp(-0.5) = 0.48522; C: exp(0) = 1, stays 0.7.
    keep, scores = soft_nms(BOXES, SCORES, SAME, method="gaussian", sigma=0.5)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.8 * math.exp(-0.5)]))
    assert scores[2].item() == pytest.approx(0.48522, abs=1e-5)


def test_classes_do_not_decay_each_other_and_final_threshold_drops():
    keep, scores = soft_nms(BOXES, SCORES, torch.tensor([1, 2, 1]), method="linear", iou_thresh=0.3)
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores, SCORES)
    # B's decayed 0.4 is not above 0.45: dropped; A and C stay.
    keep, scores = soft_nms(BOXES, SCORES, SAME, method="linear", iou_thresh=0.3, score_thresh=0.45)
    assert keep.tolist() == [0, 2]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7]))


def test_decays_accumulate_over_selections():
    # A (0,0,10,10) 0.9, B (0,0,10,5) 0.8, D (0,5,10,10) 0.75; IoU(A,B) = IoU(A,D) = 0.5, IoU(B,D) = 0.
    # Nt 0.3: after A, B -> 0.4 and D -> 0.375; B next (no overlap with D), then D at 0.375.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 5.0, 10.0, 10.0]])
    keep, scores = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.75]), SAME, method="linear", iou_thresh=0.3)
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.4, 0.375]))
    # Now B overlaps D: B' = (0,0,10,6), IoU(A,B') = 0.6 -> 0.8*0.4 = 0.32; D 0.375 is selected before B';
    # IoU(B',D) = 10/100 = 0.1 <= 0.3 so B' keeps 0.32.
    boxes[1, 3] = 6.0
    keep, scores = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.75]), SAME, method="linear", iou_thresh=0.3)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.375, 0.32]))


def _naive_soft_nms(boxes, scores, labels, method, nt, sigma, thresh):
    """Bodla's Algorithm 1 class by class with Python loops; returns {index: final score}."""
    out = {}
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(len(labels)) if labels[i].item() == c and scores[i].item() > thresh]
        cur = {i: scores[i].item() for i in idx}
        while cur:
            best = max(cur, key=lambda i: (cur[i], -i))
            out[best] = cur.pop(best)
            for j in list(cur):
                o = box_iou(boxes[best : best + 1], boxes[j : j + 1]).item()
                if method == "linear":
                    cur[j] *= (1.0 - o) if o > nt else 1.0
                else:
                    cur[j] *= math.exp(-o * o / sigma)
                if cur[j] <= thresh:
                    del cur[j]
    return out


def _random_boxes(gen, n, size=60.0):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30 + 2
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_a_naive_loop_on_random_inputs(method, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 80
    boxes = _random_boxes(gen, n)
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    labels = torch.randint(1, 5, (n,), generator=gen)
    keep, kept = soft_nms(boxes, scores, labels, method=method, iou_thresh=0.3, sigma=0.5, score_thresh=0.01)
    ref = _naive_soft_nms(boxes, scores, labels, method, 0.3, 0.5, 0.01)
    assert sorted(keep.tolist()) == sorted(ref)
    torch.testing.assert_close(kept, torch.tensor([ref[i] for i in keep.tolist()], dtype=torch.float64))
    assert torch.all(kept[:-1] >= kept[1:])  # decreasing decayed score


def test_gaussian_with_tiny_sigma_is_nms_at_iou_zero():
    # exp(-IoU^2 / 1e-12) underflows to 0 for any overlap: every overlapping classmate is suppressed,
    # exactly hard NMS with threshold 0; survivors keep their scores.
    gen = torch.Generator().manual_seed(3)
    boxes = _random_boxes(gen, 60, size=200.0)
    scores = torch.rand(60, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (60,), generator=gen)
    keep, kept = soft_nms(boxes, scores, labels, method="gaussian", sigma=1e-12, score_thresh=0.0)
    ref = batched_nms(boxes, scores, labels, 0.0)
    assert keep.tolist() == ref.tolist()
    torch.testing.assert_close(kept, scores[ref])


def test_linear_with_a_final_threshold_above_the_decays_is_nms():
    # Clusters of near-duplicates (20 px boxes jittered by < 1 px: IoU >= 361/439 = 0.82) far apart. With
    # Nt 0.3 every duplicate decays to <= 1 * (1 - 0.82) < 0.2, below the 0.2 final threshold, while scores
    # start in [0.5, 1): soft-NMS keeps exactly hard NMS's boxes, undecayed.
    gen = torch.Generator().manual_seed(4)
    centers = torch.tensor([[x * 50.0, y * 50.0] for x in range(3) for y in range(3)], dtype=torch.float64)
    base = torch.cat([centers, centers + 20.0], dim=1).repeat_interleave(4, dim=0)
    boxes = base + torch.rand(base.shape, generator=gen, dtype=torch.float64) - 0.5
    scores = 0.5 + 0.5 * torch.rand(boxes.shape[0], generator=gen, dtype=torch.float64)
    labels = torch.randint(1, 3, (boxes.shape[0],), generator=gen)
    keep, kept = soft_nms(boxes, scores, labels, method="linear", iou_thresh=0.3, score_thresh=0.2)
    ref = batched_nms(boxes, scores, labels, 0.3)
    assert keep.tolist() == ref.tolist()
    torch.testing.assert_close(kept, scores[ref])


def test_empty_input_and_bad_arguments():
    keep, scores = soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert keep.shape == (0,) and keep.dtype == torch.int64 and scores.shape == (0,)
    with pytest.raises(ValueError, match="method"):
        soft_nms(BOXES, SCORES, SAME, method="hard")
    with pytest.raises(ValueError, match="sigma"):
        soft_nms(BOXES, SCORES, SAME, method="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="boxes"):
        soft_nms(BOXES, SCORES[:2], SAME)


def test_pairwise_iou_matches_box_iou_diagonal():
    gen = torch.Generator().manual_seed(5)
    a, b = _random_boxes(gen, 30), _random_boxes(gen, 30)
    torch.testing.assert_close(pairwise_iou(a, b), box_iou(a, b).diagonal())
    # Degenerate (zero-area) pairs give 0, not NaN.
    z = torch.zeros(1, 4)
    assert pairwise_iou(z, z).tolist() == [0.0]
