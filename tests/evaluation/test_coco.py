"""Tests for detres.evaluation.coco: equality with pycocotools run directly, hand-computed answers, input errors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detres.evaluation.coco import SUMMARY_KEYS, evaluate_coco, evaluate_coco_detections

EVALREF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "evalref" / "coco"
needs_evalref = pytest.mark.skipif(not EVALREF.is_dir(), reason=f"shared reference data not found at {EVALREF}")


def reference_eval(gt_path: Path, results: list, iou_type: str, cat_ids: list | None = None) -> np.ndarray:
    """pycocotools used directly, the way its own demo does it: the independent reference."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def summary_array(result: dict) -> np.ndarray:
    return np.array([result["summary"][k] for k in SUMMARY_KEYS])


def load(path: Path):
    with open(path) as handle:
        return json.load(handle)


# The numbers the cocoapi evaluation demo prints for these fake results (pycocoEvalDemo), 3 decimals.
DEMO_BBOX = [0.505, 0.697, 0.573, 0.586, 0.519, 0.501, 0.387, 0.594, 0.595, 0.640, 0.566, 0.564]
DEMO_SEGM = [0.320, 0.562, 0.299, 0.387, 0.310, 0.327, 0.268, 0.415, 0.417, 0.469, 0.377, 0.381]


@needs_evalref
@pytest.mark.parametrize(
    "dt_name, iou_type, demo",
    [("dt_fakebbox100.json", "bbox", DEMO_BBOX), ("dt_fakesegm100.json", "segm", DEMO_SEGM)],
)
def test_matches_pycocotools_on_100_val2014_images(dt_name, iou_type, demo):
    gt_path, dt_path = EVALREF / "gt_val2014_100img.json", EVALREF / dt_name
    result = evaluate_coco(str(gt_path), str(dt_path), iou_type=iou_type)
    expected = reference_eval(gt_path, load(dt_path), iou_type)
    np.testing.assert_array_equal(summary_array(result), expected)
    np.testing.assert_allclose(summary_array(result), demo, atol=5e-4)
    assert result["num_images"] == 100 and result["num_results"] == 734


@needs_evalref
def test_results_given_as_dataset_dict_with_annotations():
    gt_path = EVALREF / "gt_val2014_100img_nocrowd_area_wh.json"
    dt_path = EVALREF / "dt_fakebbox100_as_dataset.json"
    result = evaluate_coco(gt_path, dt_path)
    expected = reference_eval(gt_path, load(dt_path)["annotations"], "bbox")
    np.testing.assert_array_equal(summary_array(result), expected)


def coco_quiet(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@needs_evalref
def test_input_forms_give_the_same_numbers():
    gt_path, dt_path = EVALREF / "mini" / "gt.json", EVALREF / "mini" / "dt.json"
    expected = summary_array(evaluate_coco(str(gt_path), str(dt_path)))
    results = load(dt_path)
    for gt, dt in [(load(gt_path), results), (coco_quiet(gt_path), {"annotations": results}), (gt_path, results)]:
        np.testing.assert_array_equal(summary_array(evaluate_coco(gt, dt)), expected)


@needs_evalref
def test_mini_bbox_and_segm():
    gt_path, dt_path = EVALREF / "mini" / "gt.json", EVALREF / "mini" / "dt.json"
    results = load(dt_path)
    bbox = evaluate_coco(gt_path, dt_path, iou_type="bbox")
    np.testing.assert_array_equal(summary_array(bbox), reference_eval(gt_path, results, "bbox"))
    # These results carry both 'bbox' and 'segmentation'. For mask AP we drop 'bbox' so cocoapi uses the
    # mask area for small/medium/large (detectron2 does the same); the reference gets the same input.
    segm = evaluate_coco(gt_path, dt_path, iou_type="segm")
    no_box = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    np.testing.assert_array_equal(summary_array(segm), reference_eval(gt_path, no_box, "segm"))
    assert [c["name"] for c in bbox["per_category"]] == ["person", "bed"]
    assert bbox["per_category"][1]["AP"] == -1.0  # 'bed' has no ground truth


@needs_evalref
def test_per_category_ap_equals_pycocotools_restricted_to_that_category():
    gt_path, dt_path = EVALREF / "gt_val2014_100img.json", EVALREF / "dt_fakebbox100.json"
    result = evaluate_coco(gt_path, dt_path)
    by_id = {c["id"]: c["AP"] for c in result["per_category"]}
    assert len(by_id) == 80
    for cat_id in (1, 18, 62):  # person, dog, chair: categories with ground truth in these images
        expected = reference_eval(gt_path, load(dt_path), "bbox", cat_ids=[cat_id])[0]
        assert by_id[cat_id] == pytest.approx(expected, abs=1e-12)
    defined = [ap for ap in by_id.values() if ap != -1.0]
    assert len(defined) < 80  # some categories have no ground truth in 100 images and report -1
    # Every defined category contributes T x R entries, so their mean is the overall AP.
    assert np.mean(defined) == pytest.approx(result["summary"]["AP"], abs=1e-12)


def one_image_gt(gt_boxes: list[list[float]]) -> dict:
    return {
        "images": [{"id": 1, "width": 640, "height": 480}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": 7, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, b in enumerate(gt_boxes)
        ],
    }


def test_known_answer_perfect_detection():
    gt = one_image_gt([[10, 10, 100, 100]])  # area 10000 > 96^2: a "large" object
    result = evaluate_coco(gt, [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 100, 100], "score": 0.9}])
    s = result["summary"]
    for key in ("AP", "AP50", "AP75", "APl", "AR1", "AR10", "AR100", "ARl"):
        assert s[key] == pytest.approx(1.0, abs=1e-12), key
    for key in ("APs", "APm", "ARs", "ARm"):
        assert s[key] == -1.0, key  # no small/medium ground truth
    assert result["per_category"][0]["AP"] == pytest.approx(1.0, abs=1e-12)


def test_known_answer_iou_062_counts_at_3_of_10_thresholds():
    gt = one_image_gt([[0, 0, 100, 100]])
    # Same top-left corner, height 62: IoU = 6200 / 10000 = 0.62, a hit only at IoU thresholds
    # 0.50, 0.55 and 0.60 of the ten 0.50:0.05:0.95, so AP = AR = 3/10.
    result = evaluate_coco(gt, [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 100, 62], "score": 0.8}])
    s = result["summary"]
    assert s["AP50"] == pytest.approx(1.0, abs=1e-12) and s["AP75"] == 0.0
    assert s["AP"] == pytest.approx(0.3, abs=1e-12)
    assert s["AR100"] == pytest.approx(0.3, abs=1e-12) and s["AR1"] == pytest.approx(0.3, abs=1e-12)
    assert s["APl"] == pytest.approx(0.3, abs=1e-12)


def test_known_answer_101_point_interpolation():
    # Two objects, one found (score 0.9), one false positive (0.8): recall reaches 0.5 with precision 1,
    # so 51 of the 101 recall thresholds 0, 0.01, ..., 1 get precision 1 and AP = 51/101 at every IoU.
    gt = one_image_gt([[0, 0, 50, 50], [200, 200, 50, 50]])
    results = [
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 50, 50], "score": 0.9},
        {"image_id": 1, "category_id": 7, "bbox": [400, 300, 20, 20], "score": 0.8},
    ]
    s = evaluate_coco(gt, results)["summary"]
    assert s["AP"] == pytest.approx(51 / 101, abs=1e-12)
    assert s["AP50"] == pytest.approx(51 / 101, abs=1e-12)
    assert s["AR100"] == pytest.approx(0.5, abs=1e-12)


def square_rle(x: int, y: int, size: int, hw: tuple[int, int] = (200, 200)) -> dict:
    mask = np.zeros(hw, dtype=np.uint8, order="F")
    mask[y : y + size, x : x + size] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_segm_uses_mask_area_not_result_bbox_for_area_ranges():
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "segmentation": square_rle(60, 60, 40),
                "bbox": [60, 60, 40, 40],
                "area": 1600,
                "iscrowd": 0,
            }
        ],  # medium: 32^2 < 1600 < 96^2
    }
    results = [
        # A false positive whose mask is small (area 100) but whose 'bbox' field is medium (area 2500),
        # ranked above the perfect mask.
        {
            "image_id": 1,
            "category_id": 7,
            "segmentation": square_rle(150, 150, 10),
            "bbox": [150, 150, 50, 50],
            "score": 0.95,
        },
        {
            "image_id": 1,
            "category_id": 7,
            "segmentation": square_rle(60, 60, 40),
            "bbox": [60, 60, 40, 40],
            "score": 0.9,
        },
    ]
    s = evaluate_coco(gt, results, iou_type="segm")["summary"]
    # All areas: FP then TP -> precision 1/2 at every recall threshold.
    assert s["AP"] == pytest.approx(0.5, abs=1e-12)
    # Medium: the unmatched small-mask FP is outside the range and ignored -> 1.0. Judged by its bbox area
    # (what cocoapi does when 'bbox' is left in) it would count and give 0.5.
    assert s["APm"] == pytest.approx(1.0, abs=1e-12)


def test_inputs_are_not_modified():
    gt = one_image_gt([[0, 0, 50, 50]])
    results = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 50, 50], "score": 0.9}]
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate_coco(gt, results)
    assert gt == gt_before and results == results_before


def test_empty_results_warn_and_report_zero_or_minus_one():
    gt = one_image_gt([[0, 0, 50, 50]])  # area 2500: a "medium" object only
    with pytest.warns(UserWarning, match="no detections"):
        result = evaluate_coco(gt, [])
    s = result["summary"]
    for key in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100", "ARm"):
        assert s[key] == 0.0, key
    for key in ("APs", "APl", "ARs", "ARl"):
        assert s[key] == -1.0, key
    assert result["per_category"][0]["AP"] == 0.0


def test_in_memory_detections_round_trip_to_perfect_ap():
    gt = one_image_gt([[10.5, 20.25, 30, 40], [100, 100, 60, 80]])
    # xyxy 0-based continuous boxes (contracts): COCO x, y, w, h -> x, y, x + w, y + h.
    dets = [
        {
            "image_id": 1,
            "boxes": np.array([[10.5, 20.25, 40.5, 60.25], [100, 100, 160, 180]]),
            "scores": np.array([0.9, 0.8]),
            "labels": np.array([1, 1]),
        }
    ]
    result = evaluate_coco_detections(gt, dets, {1: 7})
    assert result["summary"]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert result["summary"]["AR100"] == pytest.approx(1.0, abs=1e-12)


def test_error_image_id_not_in_gt(tmp_path):
    gt = one_image_gt([[0, 0, 50, 50]])
    path = tmp_path / "dt.json"
    path.write_text(json.dumps([{"image_id": 99, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    with pytest.raises(ValueError, match=r"dt\.json\[0\]: image_id 99 is not an image of the ground truth"):
        evaluate_coco(gt, str(path))


def test_error_missing_bbox_names_entry_and_field():
    gt = one_image_gt([[0, 0, 50, 50]])
    results = [
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.5},
        {"image_id": 1, "category_id": 7, "score": 0.4},
    ]
    with pytest.raises(ValueError, match=r"\[1\]: missing field 'bbox'"):
        evaluate_coco(gt, results)
    with pytest.raises(ValueError, match=r"\[0\]: missing field 'segmentation'"):
        evaluate_coco(gt, results[:1], iou_type="segm")


def test_error_bad_values():
    gt = one_image_gt([[0, 0, 50, 50]])
    with pytest.raises(ValueError, match="category_id 3 is not a category"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="'score' must be a finite number"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "score": float("nan")}])
    with pytest.raises(ValueError, match="'bbox' must be"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco(gt, [], iou_type="keypoints")


def test_error_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    gt = one_image_gt([[0, 0, 50, 50]])
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON"):
        evaluate_coco(gt, bad)
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON"):
        evaluate_coco(bad, [])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(tmp_path / "missing.json", [])
    broken = copy.deepcopy(gt)
    del broken["annotations"][0]["iscrowd"]
    with pytest.raises(ValueError, match=r"annotations\[0\]: missing field 'iscrowd'"):
        evaluate_coco(broken, [])
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"gt\.json: field 'annotations' is missing"):
        evaluate_coco(gt_file, [])


def _merged_gt_with_repeated_ann_ids() -> dict:
    """Two one-image files merged: image ids made unique, but both numbered their annotations 1, 2, 3."""
    gt = {
        "images": [{"id": 1, "height": 200, "width": 200}, {"id": 2, "height": 200, "width": 200}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": [],
    }
    for image_id, shift in ((1, 0), (2, 40)):
        for k, (x, y, w, h) in enumerate([[10, 10, 30, 40], [60, 20, 50, 30], [100, 100, 60, 70]]):
            gt["annotations"].append(
                {
                    "id": k + 1,
                    "image_id": image_id,
                    "category_id": 7,
                    "iscrowd": 0,
                    "bbox": [x + shift, y, w, h],
                    "area": w * h,
                }
            )
    return gt


def test_repeated_annotation_ids_are_an_error_naming_the_file_and_ids(tmp_path):
    # Issue #6: pycocotools keys ground truth by annotation id, so with repeated ids it scores one object's
    # box in place of another's: the ground truth itself, fed back as results, scored AP 0.252 here.
    gt = _merged_gt_with_repeated_ann_ids()
    results = [
        {"image_id": a["image_id"], "category_id": 7, "bbox": a["bbox"], "score": 1.0} for a in gt["annotations"]
    ]
    gt_file = tmp_path / "merged.json"
    gt_file.write_text(json.dumps(gt))
    with pytest.raises(
        ValueError,
        match=r"merged\.json: 3 annotation id\(s\) used more than once.*1 \(2x\), "
        r"2 \(2x\), 3 \(2x\).*unique",
    ):
        evaluate_coco(gt_file, results)
    with pytest.raises(ValueError, match=r"<ground-truth dict>: 3 annotation id"):
        evaluate_coco(gt, results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
    with pytest.raises(ValueError, match=r"annotation id\(s\) used more than once"):
        evaluate_coco(coco, results)
    # Renumbered, the same ground truth scores exactly what it should: 1.
    for new_id, ann in enumerate(gt["annotations"], start=1):
        ann["id"] = new_id
    assert evaluate_coco(gt, results)["summary"]["AP"] == pytest.approx(1.0)


def test_repeated_image_id_error_names_both_file_names():
    gt = one_image_gt([[0, 0, 50, 50]])
    gt["images"] = [
        {"id": 1, "file_name": "x.jpg", "height": 100, "width": 100},
        {"id": 1, "file_name": "y.jpg", "height": 100, "width": 100},
    ]
    with pytest.raises(ValueError, match=r"images\[1\]: duplicate image id 1 \(file names 'x\.jpg' and 'y\.jpg'\)"):
        evaluate_coco(gt, [])
