"""Tests for detres.evaluation.voc.voc_pr_curves: the evaluator's own precision/recall arrays and their AP."""

from __future__ import annotations

import numpy as np
import pytest

from detres.evaluation.voc import evaluate_voc_detections, voc_ap, voc_pr_curves

NAMES = ["cat", "dog"]


def _known_case() -> tuple[list[dict], dict]:
    """3 cats + 1 difficult cat; cat detections: TP, duplicate, on the difficult one, TP, miss; 1 undetected dog."""
    ground_truth = {
        1: {"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1]), "difficult": np.array([False])},
        2: {
            "boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [70, 0, 90, 20]], float),
            "labels": np.array([1, 1, 1, 2]),
            "difficult": np.array([False, False, True, False]),
        },
    }
    detections = [
        {
            "image_id": 1,
            "boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float),
            "scores": np.array([0.9, 0.8]),
            "labels": np.array([1, 1]),
        },
        {
            "image_id": 2,
            "boxes": np.array([[50, 50, 60, 60], [0, 0, 10, 10], [100, 100, 110, 110]], float),
            "scores": np.array([0.7, 0.6, 0.5]),
            "labels": np.array([1, 1, 1]),
        },
    ]
    return detections, ground_truth


def test_arrays_are_the_hand_computed_ranked_precision_and_recall():
    detections, ground_truth = _known_case()
    curves = voc_pr_curves(detections, ground_truth, NAMES)
    cat = curves["cat"]
    # Ranked: TP, duplicate FP, difficult (neither), TP, FP; npos = 3.
    np.testing.assert_allclose(cat["recall"], [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(cat["precision"], [1, 1 / 2, 1 / 2, 2 / 3, 1 / 2])
    assert cat["npos"] == 3
    assert cat["ap"] == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))  # envelope area: 5/9
    assert curves["dog"]["ap"] == 0.0 and curves["dog"]["recall"].size == 0 and curves["dog"]["npos"] == 1


@pytest.mark.parametrize("use_07_metric", [False, True])
def test_area_of_the_arrays_by_the_evaluator_rule_is_the_reported_ap(use_07_metric):
    detections, ground_truth = _known_case()
    reported = evaluate_voc_detections(detections, ground_truth, NAMES, use_07_metric=use_07_metric)["per_class"]
    curves = voc_pr_curves(detections, ground_truth, NAMES, use_07_metric=use_07_metric)
    assert list(curves) == NAMES
    for name in NAMES:
        assert curves[name]["ap"] == reported[name]
        assert voc_ap(curves[name]["recall"], curves[name]["precision"], use_07_metric) == reported[name]
    if use_07_metric:  # 11-point: t = 0..0.3 see precision 1, t = 0.4..0.6 see 2/3
        assert reported["cat"] == pytest.approx((4 * 1 + 3 * 2 / 3) / 11)


def test_iou_threshold_is_passed_through():
    detections, ground_truth = _known_case()
    detections[1]["boxes"][1] = [0, 0, 10, 14]  # IoU 100/140 = 0.714 with its cat
    loose = voc_pr_curves(detections, ground_truth, NAMES, iou_thresh=0.5)["cat"]
    strict = voc_pr_curves(detections, ground_truth, NAMES, iou_thresh=0.75)["cat"]
    assert loose["recall"][-1] == pytest.approx(2 / 3) and strict["recall"][-1] == pytest.approx(1 / 3)
    reported = evaluate_voc_detections(detections, ground_truth, NAMES, iou_thresh=0.75)["per_class"]["cat"]
    assert strict["ap"] == reported
