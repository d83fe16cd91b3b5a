"""Tests for detres.evaluation.localization: the ILSVRC devkit's localization rules on hand-worked cases, and the
prediction text format (read / write round trip, every malformed line named by file:line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detres.evaluation.localization import (
    devkit_box,
    evaluate_localization,
    format_loc_predictions,
    guess_is_correct,
    inclusive_iou,
    read_loc_predictions,
    write_loc_predictions,
)

GT_BOX = (1, 1, 100, 100)  # 100 x 100 = 10,000 inclusive pixels


def evaluate(gt_objects, guesses, **kwargs):
    return evaluate_localization({"a": gt_objects}, {"a": guesses}, **kwargs)


def test_inclusive_iou_hand_worked():
    assert inclusive_iou(GT_BOX, GT_BOX) == 1.0
    # (1, 1, 100, 50): 100 x 50 = 5,000 pixels, all inside GT: 5,000 / 10,000 = 0.5 exactly.
    assert inclusive_iou((1, 1, 100, 50), GT_BOX) == 0.5
    # Exclusive coordinates would give (99 * 49) / (99 * 99) = 0.4949...: the +1 matters at the threshold.
    assert inclusive_iou((1, 1, 100, 49), GT_BOX) == 0.49  # 4,900 / 10,000
    assert inclusive_iou((1, 1, 100, 51), GT_BOX) == 0.51  # 5,100 / 10,000
    # Shifted: (4, 1, 13, 10) vs (1, 1, 10, 10): columns 4..10 = 7 wide, 10 tall -> 70 / (100 + 100 - 70) = 7/13.
    assert inclusive_iou((4, 1, 13, 10), (1, 1, 10, 10)) == pytest.approx(7 / 13)
    # Touching at one pixel column: x 10..10 is 1 pixel wide -> 10 / (100 + 100 - 10).
    assert inclusive_iou((10, 1, 19, 10), (1, 1, 10, 10)) == pytest.approx(10 / 190)
    assert inclusive_iou((11, 1, 20, 10), (1, 1, 10, 10)) == 0.0  # adjacent, no shared pixel
    assert inclusive_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 1.0  # a one-pixel box


def test_devkit_box_inverts_the_voc_rule_and_keeps_the_iou():
    # VOC / ILSVRC (1, 1, 100, 50) is continuous (0, 0, 100, 50) in detres; back to the devkit's numbers.
    assert devkit_box((0.0, 0.0, 100.0, 50.0)) == (1.0, 1.0, 100.0, 50.0)
    a, b = (0.0, 0.0, 100.0, 50.0), (20.0, 10.0, 90.0, 80.0)  # continuous IoU: 70 * 40 / (5000 + 4900 - 2800)
    assert inclusive_iou(devkit_box(a), devkit_box(b)) == pytest.approx(2800 / 7100)


@pytest.mark.parametrize("ymax, correct", [(49, False), (50, True), (51, True)])
def test_right_label_iou_just_below_at_and_above_half(ymax, correct):
    # IoU 0.49 / 0.50 / 0.51 (see above): the devkit marks a guess wrong when ov < 0.50, so 0.5 is correct.
    gt = [(3, GT_BOX)]
    assert guess_is_correct((3, (1, 1, 100, ymax)), 3, gt) is correct
    result = evaluate(gt, [(3, (1, 1, 100, ymax))])
    expected = 0.0 if correct else 1.0
    assert result["top1_loc_err"] == result["top5_loc_err"] == result["gt_known_loc_err"] == expected
    assert result["top1_cls_err"] == result["top5_cls_err"] == 0.0  # the label is right either way


def test_wrong_label_with_perfect_box_is_a_localization_and_classification_error():
    result = evaluate([(3, GT_BOX)], [(4, GT_BOX)])
    assert result == {
        "top1_loc_err": 1.0,
        "top5_loc_err": 1.0,
        "gt_known_loc_err": 1.0,
        "top1_cls_err": 1.0,
        "top5_cls_err": 1.0,
        "num_images": 1,
        "num_blacklisted": 0,
        "iou_thresh": 0.5,
        "max_guesses": 5,
    }


def test_several_ground_truth_boxes_any_one_matches():
    gt = [(2, (1, 1, 10, 10)), (2, (50, 50, 80, 90)), (7, (1, 1, 30, 30))]
    assert evaluate(gt[:2], [(2, (50, 50, 80, 90))])["top1_loc_err"] == 0.0  # the second box is matched
    # A box of another class does not count for the guessed label, even when it overlaps perfectly.
    assert not guess_is_correct((2, (1, 1, 30, 30)), 2, gt)


def test_image_with_two_classes_scores_the_mean_over_its_classes():
    # The devkit's e(i) / n: class 2 found, class 7 not -> 0.5 for this image.
    gt = [(2, (1, 1, 10, 10)), (7, (1, 1, 30, 30))]
    result = evaluate(gt, [(2, (1, 1, 10, 10)), (5, (1, 1, 30, 30))])
    assert result["top5_loc_err"] == 0.5 and result["top5_cls_err"] == 0.5


def test_top1_versus_top5_and_fewer_than_five_guesses():
    gt = {"a": [(1, GT_BOX)], "b": [(2, GT_BOX)], "c": [(3, GT_BOX)], "d": [(4, GT_BOX)]}
    pred = {
        "a": [(1, GT_BOX)],  # right at rank 1
        "b": [(9, GT_BOX), (2, (1, 1, 100, 60))],  # right at rank 2 (IoU 0.6); only 2 guesses
        "c": [(8, GT_BOX), (7, GT_BOX), (6, GT_BOX), (5, GT_BOX), (3, GT_BOX)],  # right at rank 5
        "d": [],  # no guess at all: wrong on every metric
    }
    result = evaluate_localization(gt, pred)
    assert result["num_images"] == 4
    assert result["top1_loc_err"] == 3 / 4 and result["top5_loc_err"] == 1 / 4
    assert result["top1_cls_err"] == 3 / 4 and result["top5_cls_err"] == 1 / 4
    assert result["gt_known_loc_err"] == 1 / 4


def test_ground_truth_class_error_uses_the_first_guess_with_that_label():
    # Guess 1 names the class with a bad box (IoU 0.3), guess 2 names it with a good one: top-5 is right, but
    # asked for the ground-truth class the predictor answers with its first box for that class -> wrong.
    result = evaluate([(3, GT_BOX)], [(3, (1, 1, 100, 30)), (3, GT_BOX)])
    assert result["top5_loc_err"] == 0.0 and result["top1_loc_err"] == 1.0 and result["gt_known_loc_err"] == 1.0
    # The label ranks 3rd, with a good box: top-1/top-5 differ, the ground-truth-class error is 0.
    result = evaluate([(3, GT_BOX)], [(1, GT_BOX), (2, GT_BOX), (3, (1, 1, 100, 90))])
    assert (result["top1_loc_err"], result["top5_loc_err"], result["gt_known_loc_err"]) == (1.0, 0.0, 0.0)
    assert (result["top1_cls_err"], result["top5_cls_err"]) == (1.0, 0.0)


def test_blacklist_excludes_an_image_from_every_metric():
    gt = {"a": [(1, GT_BOX)], "b": [(2, GT_BOX)]}
    pred = {"a": [(1, GT_BOX)], "b": [(5, GT_BOX)]}
    assert evaluate_localization(gt, pred)["top1_loc_err"] == 0.5
    result = evaluate_localization(gt, pred, blacklist=["b", "not_listed"])
    assert result["num_images"] == 1 and result["num_blacklisted"] == 1
    assert all(result[k] == 0.0 for k in ("top1_loc_err", "top5_loc_err", "gt_known_loc_err", "top1_cls_err"))
    with pytest.raises(ValueError, match="no image to evaluate"):
        evaluate_localization(gt, pred, blacklist=["a", "b"])


def test_in_memory_errors_name_the_image():
    gt = {"a": [(1, GT_BOX)]}
    with pytest.raises(ValueError, match="'a': 6 guesses, at most 5"):
        evaluate_localization(gt, {"a": [(1, GT_BOX)] * 6})
    with pytest.raises(ValueError, match="predictions: no entry for image 'a'"):
        evaluate_localization(gt, {})
    with pytest.raises(ValueError, match="image 'a' has no object"):
        evaluate_localization({"a": []}, {"a": []})
    with pytest.raises(ValueError, match="image 'a', guess 1: box has xmax < xmin"):
        evaluate_localization(gt, {"a": [(1, (10, 1, 9, 5))]})
    # numpy values (what a predictor hands over) are accepted.
    result = evaluate_localization(gt, {"a": [(np.int64(1), tuple(np.array(GT_BOX, dtype=np.float32)))]})
    assert result["top1_loc_err"] == 0.0


# ------------------------------------------------------------------ prediction text format
def test_prediction_file_round_trip(tmp_path: Path):
    ids = ["x1", "x2", "x3"]
    pred = {
        "x1": [(1, (1, 2, 30, 40)), (10, (5.5, 6.25, 7.125, 80.1))],
        "x2": [],  # written as an empty line, read back as no guess
        "x3": [(k, (k, k, 10 + k, 20 + k)) for k in range(1, 6)],
    }
    path = write_loc_predictions(tmp_path / "pred.txt", ids, pred)
    assert path.read_text().splitlines()[0] == "1 1 2 30 40 10 5.5 6.25 7.125 80.1"
    assert read_loc_predictions(path, ids, num_classes=10) == pred
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    with pytest.raises(ValueError, match="6 guesses, at most 5"):
        format_loc_predictions(["x"], {"x": [(1, GT_BOX)] * 6})
    with pytest.raises(ValueError, match="labels must be 1-based integers"):
        format_loc_predictions(["x"], {"x": [(0, GT_BOX)]})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("1 1 1 10", "expected groups of 5 numbers"),
        (" ".join(["1 1 1 10 10"] * 6), "6 guesses, at most 5 allowed"),
        ("0 1 1 10 10", r"label must be an integer in 1\.\.4, got '0'"),
        ("5 1 1 10 10", r"label must be an integer in 1\.\.4, got '5'"),
        ("1.5 1 1 10 10", "label must be an integer"),
        ("1 1 1 ten 10", "guess 1 box: expected a number, got 'ten'"),
        ("1 1 1 10 10 2 1 nan 10 10", "guess 2 box: expected a finite number"),
        ("1 20 1 10 10", "guess 1: box has xmax < xmin"),
    ],
)
def test_malformed_prediction_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str):
    path = tmp_path / "pred.txt"
    path.write_text(f"1 1 1 10 10\n{bad_line}\n3 1 1 10 10\n")
    with pytest.raises(ValueError, match=message) as info:
        read_loc_predictions(path, ["a", "b", "c"], num_classes=4)
    assert f"{path}:2:" in str(info.value)


def test_prediction_file_line_count_must_match_the_image_list(tmp_path: Path):
    path = tmp_path / "pred.txt"
    path.write_text("1 1 1 10 10\n2 1 1 10 10\n")
    with pytest.raises(ValueError, match=r"2 lines, expected one line per image .* \(3 images\)"):
        read_loc_predictions(path, ["a", "b", "c"], num_classes=4)
    with pytest.raises(FileNotFoundError, match="prediction file not found"):
        read_loc_predictions(tmp_path / "missing.txt", ["a"], num_classes=4)
