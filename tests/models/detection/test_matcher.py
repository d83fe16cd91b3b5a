"""Tests for detres.models.detection.matcher: thresholds, ignore band, best-anchor rule with ties, torchvision
agreement."""

import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from detres.models.detection.matcher import Matcher


def test_thresholds_and_ignore_band():
    iou = torch.tensor(
        [
            [0.80, 0.50, 0.10, 0.69, 0.30],
            [0.75, 0.20, 0.29, 0.00, 0.05],
        ]
    )
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    # col0: best gt0 (0.8) -> 0; col1 0.5 -> band; col2 0.29 -> below; col3 0.69 -> band; col4 0.30 -> band.
    assert matches.tolist() == [0, -2, -1, -2, -2]


def test_low_quality_rule_keeps_all_ties_and_uses_each_predictions_best_gt():
    iou = torch.tensor(
        [
            [0.40, 0.40, 0.10, 0.00],  # gt0 best = 0.40, tied at preds 0 and 1
            [0.00, 0.45, 0.20, 0.00],  # gt1 best = 0.45 at pred 1
        ]
    )
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # pred0 and pred1 become positive; pred1's own best gt is gt1. pred2 stays below low, pred3 below.
    assert matches.tolist() == [0, 1, -1, -1]


def test_gt_overlapping_nothing_creates_no_positive():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.8, 0.0]])
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # gt0's best IoU is 0: it must not turn the zero-overlap predictions 0 and 2 into positives.
    assert matches.tolist() == [-1, 1, -1]


def test_zero_ground_truth_gives_all_background():
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(0, 5))
    assert matches.dtype == torch.int64
    assert matches.tolist() == [-1] * 5


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_matches_torchvision_on_random_iou(allow_low_quality):
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        iou = torch.rand(6, 200, generator=gen) * 0.9 + 0.01  # strictly positive, no exact ties
        ours = Matcher(0.7, 0.3, allow_low_quality)(iou)
        ref = TVMatcher(0.7, 0.3, allow_low_quality)(iou)
        assert torch.equal(ours, ref)


def test_invalid_thresholds_raise():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match="2-D"):
        Matcher(0.7, 0.3)(torch.zeros(5))


# ------------------------------------------------------------------------------------------ crowd regions
def test_intersection_over_area_is_relative_to_the_first_box():
    from detres.models.detection.matcher import intersection_over_area

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 10.0], [5.0, 5.0, 5.0, 9.0]])
    regions = torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 0.0, 15.0, 5.0]])
    iof = intersection_over_area(boxes, regions)
    # box 0 lies wholly in region 0 (1.0 although their IoU is 0.25); a quarter of it in region 1.
    # box 1 (area 400): 200 inside region 0, 50 inside region 1. box 2 is empty: 0, not NaN.
    torch.testing.assert_close(iof, torch.tensor([[1.0, 0.25], [0.5, 0.125], [0.0, 0.0]]))


def test_crowd_ignore_mask_uses_a_strict_threshold():
    from detres.models.detection.matcher import crowd_ignore_mask

    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 132.0, 132.0]])
    crowd = torch.tensor([[0.0, 0.0, 32.0, 24.0]])  # covers 0.75 of the first two boxes, nothing of the third
    assert crowd_ignore_mask(boxes, crowd, 0.7).tolist() == [True, True, False]
    assert crowd_ignore_mask(boxes, crowd, 0.75).tolist() == [False, False, False]  # "> thresh", as Detectron
    assert crowd_ignore_mask(boxes, crowd, 1.0).tolist() == [False, False, False]  # >= 1: off
    assert crowd_ignore_mask(boxes, None, 0.7).tolist() == [False, False, False]
    assert crowd_ignore_mask(boxes, torch.zeros(0, 4), 0.7).tolist() == [False, False, False]
