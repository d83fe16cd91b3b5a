"""Tests for detres.evaluation.results_io: COCO results entries and devkit result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detres.evaluation.results_io import (
    detections_to_coco_results,
    load_coco_results,
    read_voc_results,
    write_coco_results,
    write_voc_results,
)
from detres.evaluation.voc import evaluate_voc, evaluate_voc_detections, load_voc_annotations, voc_ground_truth

EVALREF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "evalref" / "voc"
needs_evalref = pytest.mark.skipif(not EVALREF.is_dir(), reason=f"shared reference data not found at {EVALREF}")


def test_detections_to_coco_results_known_values():
    dets = [
        {
            "image_id": torch.tensor(42),
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.5, 1.5, 2.5, 4.0]]),
            "scores": torch.tensor([0.75, 0.25]),
            "labels": torch.tensor([2, 1]),
        },
        {
            "image_id": 7,
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long),
        },
    ]
    results = detections_to_coco_results(dets, {1: 1, 2: 18})
    # xyxy continuous -> COCO x, y, w, h with the original category id.
    assert results == [
        {"image_id": 42, "category_id": 18, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.75},
        {"image_id": 42, "category_id": 1, "bbox": [0.5, 1.5, 2.0, 2.5], "score": 0.25},
    ]
    assert all(type(r["score"]) is float and type(r["image_id"]) is int for r in results)


def test_detections_to_coco_results_errors():
    det = {"image_id": 1, "boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([3])}
    with pytest.raises(ValueError, match="label 3 has no entry in label_to_category_id"):
        detections_to_coco_results([det], {1: 1})
    with pytest.raises(ValueError, match=r"detections\[0\]: missing key 'scores'"):
        detections_to_coco_results([{"image_id": 1, "boxes": np.zeros((1, 4)), "labels": [1]}], {1: 1})
    with pytest.raises(ValueError, match=r"detections\[0\]\['boxes'\]: expected shape \[N, 4\]"):
        detections_to_coco_results([dict(det, boxes=np.zeros((1, 5)))], {3: 1})
    with pytest.raises(ValueError, match="finite"):
        detections_to_coco_results([dict(det, scores=np.array([math.nan]))], {3: 1})


def test_coco_results_files(tmp_path):
    results = [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": np.float32(0.5)}]
    path = write_coco_results(results, tmp_path / "sub" / "dt.json")
    assert json.loads(path.read_text()) == [
        {"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["dt.json"]  # no temporary file left behind
    loaded, _ = load_coco_results(path)
    assert loaded[0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    (tmp_path / "ds.json").write_text(json.dumps({"images": [], "annotations": loaded}))
    assert load_coco_results(tmp_path / "ds.json")[0] == loaded
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"bad\.json: a results dict must have an 'annotations' list"):
        load_coco_results(tmp_path / "bad.json")


def test_write_voc_results_uses_one_based_devkit_coordinates(tmp_path):
    dets = [
        {
            "image_id": 0,
            "boxes": np.array([[0.0, 0.0, 10.0, 5.0], [2.5, 3.0, 7.0, 9.0]], dtype=np.float32),
            "scores": np.array([0.5, 0.25], dtype=np.float32),
            "labels": np.array([1, 3]),
        },
        {
            "image_id": 1,
            "boxes": np.array([[4.0, 4.0, 8.0, 8.0]]),
            "scores": np.array([0.125]),
            "labels": np.array([1]),
        },
    ]
    paths = write_voc_results(dets, ["cat", "dog", "bird"], ["000005", "000007"], str(tmp_path / "comp4_det_{cls}.txt"))
    assert [p.name for p in paths] == ["comp4_det_cat.txt", "comp4_det_dog.txt", "comp4_det_bird.txt"]
    # Continuous (x1, y1, x2, y2) is written as devkit (x1 + 1, y1 + 1, x2, y2).
    assert paths[0].read_text() == "000005 0.5 1.0 1.0 10.0 5.0\n000007 0.125 5.0 5.0 8.0 8.0\n"
    assert paths[1].read_text() == ""  # every class gets a file, so none is reported missing
    assert paths[2].read_text() == "000005 0.25 3.5 4.0 7.0 9.0\n"
    ids, scores, boxes = read_voc_results(paths[2])
    assert ids == ["000005"] and scores.tolist() == [0.25]
    assert boxes.tolist() == [[2.5, 3.0, 7.0, 9.0]]  # read back to continuous: the exact inverse
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_write_voc_results_errors(tmp_path):
    det = {"image_id": 3, "boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([1])}
    with pytest.raises(ValueError, match=r"must contain '\{cls\}'"):
        write_voc_results([det], ["a"], None, str(tmp_path / "out.txt"))
    with pytest.raises(ValueError, match="image_id 3 has no entry in image_ids"):
        write_voc_results([det], ["a"], {0: "x"}, str(tmp_path / "{cls}.txt"))
    with pytest.raises(ValueError, match=r"label 2 is outside 1\.\.1"):
        write_voc_results([dict(det, labels=np.array([2]))], ["a"], None, str(tmp_path / "{cls}.txt"))


def test_read_voc_results_errors(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("a 0.5 1 1 5 5\n\nb x 1 1 5 5\n")
    with pytest.raises(ValueError, match=r"r\.txt:3: score and box must be numbers"):
        read_voc_results(path)
    path.write_text("a 0.5 1 1 5 5\n")
    with pytest.raises(ValueError, match=r"r\.txt:1: image id 'a' is not in the evaluated image set"):
        read_voc_results(path, image_ids={"b"})


@needs_evalref
def test_written_files_evaluate_exactly_like_memory(tmp_path):
    """float32 model-style detections around the toyexample cats, with tied scores: the devkit files
    written by write_voc_results give exactly the in-memory mAP (full-precision numbers, same order)."""
    ann = EVALREF / "toyexample" / "Annotations"
    records = load_voc_annotations(ann)
    image_ids = sorted(records)
    ground_truth = voc_ground_truth(records, ["cat", "dog"])
    rng = np.random.default_rng(0)
    dets = []
    for index, image in enumerate(image_ids):
        gt_boxes = ground_truth[image]["boxes"]
        boxes = np.concatenate([gt_boxes + rng.normal(0, 25, gt_boxes.shape), rng.uniform(0, 300, (3, 4))])
        boxes = np.sort(boxes.reshape(-1, 2, 2), axis=1).reshape(-1, 4)  # x1 <= x2, y1 <= y2
        n = len(boxes)
        dets.append(
            {
                "image_id": index,
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "scores": torch.tensor(rng.choice([0.3, 0.6, 0.9], n), dtype=torch.float32),
                "labels": torch.tensor(rng.choice([1, 2], n)),
            }
        )
    by_index = {index: ground_truth[image] for index, image in enumerate(image_ids)}
    for iou in (0.3, 0.5):
        write_voc_results(dets, ["cat", "dog"], image_ids, str(tmp_path / "{cls}.txt"))
        with pytest.warns(UserWarning, match="no non-difficult ground truth"):  # 'dog' has no objects
            memory = evaluate_voc_detections(dets, by_index, ["cat", "dog"], iou_thresh=iou)
        with pytest.warns(UserWarning, match="no non-difficult ground truth"):
            files = evaluate_voc(ann, None, str(tmp_path / "{cls}.txt"), classes=["cat", "dog"], iou_thresh=iou)
        assert files["per_class"]["cat"] == memory["per_class"]["cat"]
        assert 0.0 < files["mAP"] < 1.0 and files["mAP"] == memory["mAP"]
