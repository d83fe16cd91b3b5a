"""Tests for detres.evaluation.voc: devkit rules on hand-worked cases and the shared VOC reference cases."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from detres.evaluation.voc import (
    evaluate_voc,
    evaluate_voc_class,
    evaluate_voc_detections,
    load_voc_annotations,
    voc_ap,
    voc_ground_truth,
)

EVALREF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "evalref" / "voc"
needs_evalref = pytest.mark.skipif(not EVALREF.is_dir(), reason=f"shared reference data not found at {EVALREF}")

SQUARE = (0.0, 0.0, 10.0, 10.0)  # continuous 0-based xyxy, i.e. devkit pixels 1..10


def write_xml(path: Path, objects: list[tuple[str, tuple[int, int, int, int], bool]]) -> None:
    body = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, diff in objects
    )
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{body}</annotation>")


def test_voc_ap_known_values():
    # Ranked TP, FP, TP with 2 positives: recall .5 .5 1, precision 1 .5 2/3.
    rec, prec = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    # Area: recall 0 -> .5 at precision 1, .5 -> 1 at 2/3: 1/2 + 1/3 = 5/6.
    assert voc_ap(rec, prec) == pytest.approx(5 / 6, abs=1e-12)
    # 11-point: t = 0 .. 0.5 (6 points) see precision 1, t = 0.6 .. 1 (5 points) see 2/3: (6 + 10/3) / 11.
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(28 / 33, abs=1e-12)
    # Envelope: precision .5 at recall .2 is lifted to the 1.0 reached later at recall .4.
    assert voc_ap([0.2, 0.4], [0.5, 1.0]) == pytest.approx(0.4, abs=1e-12)
    # Recall exactly 0.4 counts at t = 0.4: t = 0, .1, .2, .3, .4 -> 5/11.
    assert voc_ap([0.2, 0.4], [0.5, 1.0], use_07_metric=True) == pytest.approx(5 / 11, abs=1e-12)
    # Recall exactly 0.3 counts at t = 0.3 (t = 0, .1, .2, .3 -> 4/11); np.arange(0, 1.1, .1) would give 3/11.
    assert voc_ap([0.3], [1.0], use_07_metric=True) == pytest.approx(4 / 11, abs=1e-12)
    assert voc_ap([], []) == 0.0 and voc_ap([], [], use_07_metric=True) == 0.0
    assert math.isnan(voc_ap([math.nan], [0.0]))
    with pytest.raises(ValueError, match="same length"):
        voc_ap([0.5], [1.0, 0.5])


def test_duplicate_detection_is_a_false_positive():
    gts = {"a": [(SQUARE, False)], "b": [(SQUARE, False)]}
    dets = [("a", 0.9, SQUARE), ("a", 0.8, SQUARE), ("b", 0.7, SQUARE)]
    result = evaluate_voc_class(gts, dets)
    np.testing.assert_array_equal(result["tp"], [1, 0, 1])
    np.testing.assert_array_equal(result["fp"], [0, 1, 0])
    assert result["ap"] == pytest.approx(5 / 6, abs=1e-12)  # same ranking as test_voc_ap_known_values
    assert evaluate_voc_class(gts, dets, use_07_metric=True)["ap"] == pytest.approx(28 / 33, abs=1e-12)


def test_difficult_match_is_neither_tp_nor_fp():
    gts = {"a": [(SQUARE, True)], "b": [(SQUARE, False)]}
    dets = [
        ("a", 0.9, SQUARE),  # matches the difficult box: ignored
        ("a", 0.85, SQUARE),  # again: still ignored, not a duplicate FP
        ("b", 0.8, SQUARE),  # TP
        ("a", 0.7, (5.0, 5.0, 20.0, 20.0)),  # IoU 25/300 with the difficult box: FP
    ]
    result = evaluate_voc_class(gts, dets)
    assert result["npos"] == 1
    np.testing.assert_array_equal(result["tp"], [0, 0, 1, 0])
    np.testing.assert_array_equal(result["fp"], [0, 0, 0, 1])
    # Recall 1 is reached at precision 1/1: AP 1 (counting the difficult matches as FP would give 1/3).
    assert result["ap"] == pytest.approx(1.0, abs=1e-12)


def test_best_overlap_is_taken_even_when_already_matched():
    # det2's best box is A (IoU 1), already taken, so det2 is a duplicate FP although B (IoU 80/120)
    # is still free: the devkit never re-assigns to the second-best box.
    gts = {"img": [(SQUARE, False), ((2.0, 0.0, 12.0, 10.0), False)]}
    dets = [("img", 0.9, SQUARE), ("img", 0.8, SQUARE)]
    result = evaluate_voc_class(gts, dets)
    np.testing.assert_array_equal(result["tp"], [1, 0])
    assert result["ap"] == pytest.approx(0.5, abs=1e-12)  # recall .5 at precision 1
    assert evaluate_voc_class(gts, dets, use_07_metric=True)["ap"] == pytest.approx(6 / 11, abs=1e-12)


def test_equal_overlaps_pick_the_first_box():
    # Two identical boxes: the devkit's strict "ov > ovmax" keeps the first. Difficult first -> ignored.
    det = [("img", 0.9, SQUARE)]
    first_difficult = evaluate_voc_class({"img": [(SQUARE, True), (SQUARE, False)]}, det)
    assert first_difficult["tp"][0] == 0 and first_difficult["fp"][0] == 0 and first_difficult["ap"] == 0.0
    first_normal = evaluate_voc_class({"img": [(SQUARE, False), (SQUARE, True)]}, det)
    assert first_normal["tp"][0] == 1 and first_normal["ap"] == pytest.approx(1.0, abs=1e-12)


def test_iou_equal_to_threshold_matches_with_devkit_plus_one_areas(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    write_xml(ann / "img.xml", [("obj", (1, 1, 10, 10), False)])
    # Devkit boxes (1,1,10,10) and (1,1,10,5): +1 areas 100 and 50, IoU exactly 0.5 -> TP under IoU >= 0.5.
    # Without the +1 the IoU would be 9*4 / (9*9) = 0.444 (an FP).
    (tmp_path / "obj.txt").write_text("img 0.9 1 1 10 5\n")
    pattern = str(tmp_path / "{cls}.txt")
    assert evaluate_voc(ann, None, pattern, iou_thresh=0.5)["mAP"] == pytest.approx(1.0, abs=1e-12)
    assert evaluate_voc(ann, None, pattern, iou_thresh=0.51)["mAP"] == 0.0


def tie_case(tp_first: bool) -> tuple[dict, list]:
    """40 images with one box each. Images j0..j19 get a hit at score 0.9; images i0..i19 get one miss
    and one hit, all at score 0.5, in the order given. The 0.9 hits are interleaved in the input so that
    an unstable sort would shuffle the 0.5 block."""
    gts = {f"{p}{k}": [(SQUARE, False)] for p in "ij" for k in range(20)}
    dets = []
    for k in range(20):
        pair = [(f"i{k}", 0.5, (50.0, 50.0, 60.0, 60.0)), (f"i{k}", 0.5, SQUARE)]
        dets += [(f"j{k}", 0.9, SQUARE)] + (pair[::-1] if tp_first else pair)
    return gts, dets


def test_equal_scores_keep_input_order():
    # Ranks 1..20: the 0.9 hits, recall 1/2 at precision 1. Then the 0.5 block in input order.
    gts, dets = tie_case(tp_first=False)
    result = evaluate_voc_class(gts, dets)
    np.testing.assert_array_equal(result["tp"], [1] * 20 + [0, 1] * 20)
    # Miss first: the k-th hit of the block is at rank 20 + 2k, precision (20+k)/(20+2k), decreasing in k.
    expected = Fraction(1, 2) + sum(Fraction(20 + k, 20 + 2 * k) for k in range(1, 21)) / 40
    assert result["ap"] == pytest.approx(float(expected), abs=1e-12)
    gts, dets = tie_case(tp_first=True)
    result = evaluate_voc_class(gts, dets)
    np.testing.assert_array_equal(result["tp"], [1] * 20 + [1, 0] * 20)
    # Hit first: rank 19 + 2k, precision (20+k)/(19+2k), also decreasing in k.
    expected = Fraction(1, 2) + sum(Fraction(20 + k, 19 + 2 * k) for k in range(1, 21)) / 40
    assert result["ap"] == pytest.approx(float(expected), abs=1e-12)


def load_case1(convert) -> tuple[dict, list]:
    """evalref/voc/case1: 'object x y w h' ground truth and 'object score x y w h' detections."""
    gts, dets = {}, []
    for gt_file in sorted((EVALREF / "case1" / "gts").glob("*.txt")):
        image = gt_file.stem
        gts[image] = [
            (convert(*map(float, line.split()[1:])), False) for line in gt_file.read_text().splitlines() if line.strip()
        ]
        for line in (EVALREF / "case1" / "dets" / gt_file.name).read_text().splitlines():
            if line.strip():
                fields = line.split()
                dets.append((image, float(fields[1]), convert(*map(float, fields[2:]))))
    return gts, dets


def xywh_pixels(x, y, w, h):
    """A box w pixels wide starting at pixel x: devkit corners (x, y, x+w-1, y+h-1), continuous
    (x-1, y-1, x+w-1, y+h-1)."""
    return (x - 1, y - 1, x + w - 1, y + h - 1)


def xywh_inclusive_corners(x, y, w, h):
    """Object-Detection-Metrics' reading: devkit corners (x, y, x+w, y+h), i.e. (w+1) x (h+1) pixels."""
    return (x - 1, y - 1, x + w, y + h)


@needs_evalref
def test_case1_hand_worked():
    # 15 boxes, 24 detections, ranked by score with ties in file order (00005 before 00007 at .95, ...).
    # IoU (w*h areas) >= 0.5 only for the .91 detection in 00003 (0.567): a single TP at rank 3,
    # recall 1/15 at precision 1/3. Area AP = 1/15 * 1/3 = 1/45; 11-point: only t = 0 sees it: 1/33.
    gts, dets = load_case1(xywh_pixels)
    res = evaluate_voc_class(gts, dets, 0.5)
    assert res["npos"] == 15 and len(res["tp"]) == 24
    np.testing.assert_array_equal(np.flatnonzero(res["tp"]) + 1, [3])
    assert res["ap"] == pytest.approx(1 / 45, abs=1e-12)
    assert evaluate_voc_class(gts, dets, 0.5, use_07_metric=True)["ap"] == pytest.approx(1 / 33, abs=1e-12)

    # IoU >= 0.3: TPs at ranks 1 (.95, 00005, IoU .344), 3, 10 (.70, .462), 12 (.62, .310), 13 (.54, .480)
    # and 14 (.48, .390); the .18 detection in 00003 has IoU .295 and stays an FP.
    # Envelope precision: 1 at recall 1/15, 2/3 at 2/15, max(3/10, 4/12, 5/13, 6/14) = 3/7 at 3..6/15.
    res = evaluate_voc_class(gts, dets, 0.3)
    np.testing.assert_array_equal(np.flatnonzero(res["tp"]) + 1, [1, 3, 10, 12, 13, 14])
    area = Fraction(1, 15) * (1 + Fraction(2, 3) + 4 * Fraction(3, 7))
    assert res["ap"] == pytest.approx(float(area), abs=1e-12)  # 0.225397
    # 11-point: t=0 -> 1, t=.1 -> 2/3, t=.2,.3,.4 -> 3/7 (recall 6/15 = .4 counts at .4), t>=.5 -> 0.
    eleven = (1 + Fraction(2, 3) + 3 * Fraction(3, 7)) / 11
    assert evaluate_voc_class(gts, dets, 0.3, use_07_metric=True)["ap"] == pytest.approx(float(eleven), abs=1e-12)


@needs_evalref
def test_case1_reproduces_object_detection_metrics_numbers():
    # With (w+1)(h+1) areas the .18 detection reaches IoU .303 and becomes a 7th TP at rank 23, adding
    # 1/15 of recall at precision 7/23. This is the reading used by the Object-Detection-Metrics project,
    # whose published result for this sample (IoU 0.3) is AP 24.57%.
    gts, dets = load_case1(xywh_inclusive_corners)
    res = evaluate_voc_class(gts, dets, 0.3)
    np.testing.assert_array_equal(np.flatnonzero(res["tp"]) + 1, [1, 3, 10, 12, 13, 14, 23])
    area = Fraction(1, 15) * (1 + Fraction(2, 3) + 4 * Fraction(3, 7) + Fraction(7, 23))
    assert res["ap"] == pytest.approx(float(area), abs=1e-12)
    assert round(res["ap"] * 100, 2) == 24.57
    eleven = (1 + Fraction(2, 3) + 3 * Fraction(3, 7)) / 11  # recall 7/15 < .5 adds no 11-point sample
    assert evaluate_voc_class(gts, dets, 0.3, use_07_metric=True)["ap"] == pytest.approx(float(eleven), abs=1e-12)


def toy_results_file(path: Path, images: set[str] | None = None) -> Path:
    """Rewrite toyexample's per-image 'cat score x1 y1 x2 y2' files as the devkit's per-class cat.txt."""
    lines = []
    for det_file in sorted((EVALREF / "toyexample" / "dets_classname_abs_xyx2y2").glob("*.txt")):
        if images is not None and det_file.stem not in images:
            continue
        for line in det_file.read_text().splitlines():
            fields = line.split()
            if fields:
                lines.append(" ".join([det_file.stem] + fields[1:]))
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_evalref
def test_toyexample_real_voc_xml(tmp_path):
    # 12 cats in 10 images (one image without objects), 12 detections. Ranked: 8 TPs, the .85 detection on
    # 2007_000733 (no cat there) as FP, then 3 TPs (all IoU > .7). Precision 1 up to recall 8/12, then
    # 8/9, 9/10, 10/11, 11/12 whose envelope is 11/12 for recall 9/12..11/12.
    toy_results_file(tmp_path / "cat.txt")
    pattern = str(tmp_path / "{cls}.txt")
    ann = EVALREF / "toyexample" / "Annotations"
    result = evaluate_voc(ann, None, pattern)
    assert result["classes"] == ["cat"] and result["num_positives"] == {"cat": 12}
    assert result["mAP"] == pytest.approx(8 / 12 + 3 / 12 * 11 / 12, abs=1e-12)  # 129/144 = 0.895833
    # 11-point: t = 0 .. .6 see precision 1 (7 points), t = .7, .8, .9 see 11/12, t = 1 sees nothing.
    result07 = evaluate_voc(ann, None, pattern, use_07_metric=True)
    assert result07["mAP"] == pytest.approx((7 + 3 * 11 / 12) / 11, abs=1e-12)  # 39/44 = 0.886364


@needs_evalref
def test_image_set_subset(tmp_path):
    ann = EVALREF / "toyexample" / "Annotations"
    image_set = tmp_path / "val.txt"
    image_set.write_text("2007_000733\n2008_006599\n")
    pattern = str(tmp_path / "{cls}.txt")
    toy_results_file(tmp_path / "cat.txt")
    # As in the devkit, a detection for an image outside the set is an error, not silently dropped.
    with pytest.raises(ValueError, match=r"cat\.txt:1: image id '2007_000549' is not in the evaluated image set"):
        evaluate_voc(ann, image_set, pattern)
    toy_results_file(tmp_path / "cat.txt", images={"2007_000733", "2008_006599"})
    # .99 TP on 2008_006599 (the only cat), then .85 FP: recall 1 at precision 1.
    result = evaluate_voc(ann, image_set, pattern)
    assert result["num_images"] == 2 and result["num_positives"] == {"cat": 1}
    assert result["mAP"] == pytest.approx(1.0, abs=1e-12)


@needs_evalref
def test_missing_result_file_counts_as_zero(tmp_path):
    ann = EVALREF / "toyexample" / "Annotations"
    with pytest.warns(UserWarning, match="result file for class 'cat' not found"):
        result = evaluate_voc(ann, None, str(tmp_path / "{cls}.txt"))
    assert result["per_class"] == {"cat": 0.0} and result["mAP"] == 0.0
    assert result["missing_results"] == ["cat"]


@needs_evalref
def test_class_without_positives_is_undefined_and_left_out_of_map(tmp_path):
    ann = EVALREF / "toyexample" / "Annotations"
    toy_results_file(tmp_path / "cat.txt")
    (tmp_path / "dog.txt").write_text("2007_000733 0.5 1 1 20 20\n")
    with pytest.warns(UserWarning, match=r"no non-difficult ground truth for classes \['dog'\]"):
        result = evaluate_voc(ann, None, str(tmp_path / "{cls}.txt"), classes=["cat", "dog"])
    assert math.isnan(result["per_class"]["dog"])
    assert result["mAP"] == pytest.approx(result["per_class"]["cat"], abs=1e-12)


@needs_evalref
def test_in_memory_evaluation_equals_file_evaluation(tmp_path):
    ann = EVALREF / "toyexample" / "Annotations"
    file_result = evaluate_voc(ann, None, str(toy_results_file(tmp_path / "cat.txt").parent / "{cls}.txt"))
    records = load_voc_annotations(ann)
    ground_truth = voc_ground_truth(records, ["cat"])
    detections = []
    for det_file in sorted((EVALREF / "toyexample" / "dets_classname_abs_xyx2y2").glob("*.txt")):
        rows = [list(map(float, line.split()[1:])) for line in det_file.read_text().splitlines() if line.strip()]
        table = np.asarray(rows).reshape(-1, 5)
        boxes = table[:, 1:] - np.array([1.0, 1.0, 0.0, 0.0])  # devkit -> continuous
        detections.append(
            {
                "image_id": det_file.stem,
                "boxes": boxes,
                "scores": table[:, 0],
                "labels": np.ones(len(rows), dtype=np.int64),
            }
        )
    memory_result = evaluate_voc_detections(detections, ground_truth, ["cat"])
    assert memory_result["mAP"] == file_result["mAP"]
    assert memory_result["num_positives"] == file_result["num_positives"]
    with pytest.raises(ValueError, match="image_id 'nope' is not in the ground truth"):
        evaluate_voc_detections(detections + [dict(detections[0], image_id="nope")], ground_truth, ["cat"])


def test_errors(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    write_xml(ann / "img.xml", [("obj", (1, 1, 10, 10), False)])
    (tmp_path / "obj.txt").write_text("img 0.9 1 1 10 10\nimg 0.8 1 1 10\n")
    with pytest.raises(ValueError, match=r"obj\.txt:2: expected 6 fields"):
        evaluate_voc(ann, None, str(tmp_path / "{cls}.txt"))
    with pytest.raises(ValueError, match=r"must contain '\{cls\}'"):
        evaluate_voc(ann, None, str(tmp_path / "obj.txt"))
    with pytest.raises(FileNotFoundError, match="annotations folder not found"):
        evaluate_voc(tmp_path / "nowhere", None, str(tmp_path / "{cls}.txt"))
    image_set = tmp_path / "set.txt"
    image_set.write_text("img\nother\n")
    with pytest.raises(FileNotFoundError, match=r"image 'other' not found: .*other\.xml"):
        evaluate_voc(ann, image_set, str(tmp_path / "{cls}.txt"))
    with pytest.raises(ValueError, match="iou_thresh"):
        evaluate_voc_class({}, [], iou_thresh=0.0)
