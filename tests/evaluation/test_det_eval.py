"""Tests for detres.evaluation.det_eval: COCO ground truth from VOC sets, difficult objects, perfect detections."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from detres.data.datasets.coco import CocoDetection
from detres.data.datasets.voc import VocDetection
from detres.data.shapes.world import generate_shapes_world
from detres.evaluation.det_eval import dataset_ground_truth, dataset_to_coco_gt, evaluate_detection_dataset


def _write_voc(
    root: Path, images: dict[str, list[tuple[str, tuple[int, int, int, int], bool]]], size: tuple[int, int] = (100, 120)
) -> None:
    """A VOC folder with only XMLs and an image set (evaluation never decodes the images)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, objects in images.items():
        body = "".join(
            f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, diff in objects
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[1]}</width><height>{size[0]}</height>"
            f"<depth>3</depth></size>{body}</annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{s}\n" for s in images))


def _det(image_id, boxes, scores, labels) -> dict:
    return {
        "image_id": image_id,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "labels": np.asarray(labels, np.int64),
    }


@pytest.fixture(scope="module")
def hand_voc(tmp_path_factory) -> VocDetection:
    root = tmp_path_factory.mktemp("voc")
    # VOC 1-based inclusive boxes: (11, 21, 40, 50) is the continuous box (10, 20, 40, 50).
    _write_voc(
        root,
        {
            "img_a": [("cat", (11, 21, 40, 50), False), ("cat", (61, 61, 90, 90), True)],
            "img_b": [("dog", (1, 1, 50, 30), False)],
        },
    )
    return VocDetection(root, "test", class_names=["cat", "dog"], keep_difficult=True)


def test_dataset_to_coco_gt_converts_voc_boxes_and_marks_difficult_as_crowd(hand_voc):
    gt = dataset_to_coco_gt(hand_voc)
    assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [(im["id"], im["height"], im["width"]) for im in gt["images"]] == [(0, 100, 120), (1, 100, 120)]
    anns = [(a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in gt["annotations"]]
    assert anns == [
        (0, 1, [10.0, 20.0, 30.0, 30.0], 900.0, 0),
        (0, 1, [60.0, 60.0, 30.0, 30.0], 900.0, 1),
        (1, 2, [0.0, 0.0, 50.0, 30.0], 1500.0, 0),
    ]
    assert len({a["id"] for a in gt["annotations"]}) == 3
    truth = dataset_ground_truth(hand_voc)
    np.testing.assert_array_equal(truth[0]["boxes"], [[10, 20, 40, 50], [60, 60, 90, 90]])
    np.testing.assert_array_equal(truth[0]["difficult"], [False, True])


def test_detection_on_a_difficult_object_is_neither_tp_nor_fp(hand_voc):
    # The highest-scoring detection sits on the difficult cat. Counted as FP it would halve precision
    # (cat AP 0.5); had the difficult cat counted as a positive, recall would stop at 1/2 (AP 0.5 again).
    on_difficult = _det(0, [[60, 60, 90, 90], [10, 20, 40, 50]], [0.9, 0.8], [1, 1])
    dog = _det(1, [[0, 0, 50, 30]], [0.7], [2])
    result = evaluate_detection_dataset(hand_voc, [on_difficult, dog], use_07_metric=False)
    assert result["voc"]["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert result["voc"]["mAP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AP50"] == pytest.approx(1.0)
    # Control: the same detection on empty background is an FP and both metrics drop.
    on_background = _det(0, [[60, 0, 90, 15], [10, 20, 40, 50]], [0.9, 0.8], [1, 1])
    worse = evaluate_detection_dataset(hand_voc, [on_background, dog], use_07_metric=False)
    assert worse["voc"]["per_class"]["cat"] == pytest.approx(0.5)
    assert worse["coco"]["summary"]["AP"] < 0.9


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory) -> dict[str, Path]:
    # 22 images: image 21 (seed 0) holds a difficult object.
    return generate_shapes_world(
        tmp_path_factory.mktemp("sw"),
        num_cls_train_per_class=0,
        num_cls_val_per_class=0,
        num_det_train=22,
        num_det_val=0,
        num_loc_train=0,
        num_loc_val=0,
        det_size=(64, 96),
    )


def _ground_truth_as_detections(dataset) -> list[dict]:
    dets = []
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        dets.append(_det(ann["image_id"], ann["boxes"], np.ones(len(ann["labels"])), ann["labels"]))
    return dets


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_perfect_detections_score_one(shapes_world, fmt):
    if fmt == "coco":
        dataset = CocoDetection(shapes_world["det_images"], shapes_world["det_coco_train"])
    else:
        dataset = VocDetection(shapes_world["voc_root"], "train", keep_difficult=True)
        assert dataset.num_difficult > 0  # the generated set has difficult objects; they must not hurt
    dets = _ground_truth_as_detections(dataset)
    assert sum(len(d["labels"]) for d in dets) > 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the set have undefined VOC AP
        result = evaluate_detection_dataset(dataset, dets)
    assert result["coco"]["summary"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AR100"] == pytest.approx(1.0)
    assert result["voc"]["mAP"] == pytest.approx(1.0)
    defined = [ap for ap in result["voc"]["per_class"].values() if ap == ap]
    assert len(defined) >= 3 and all(ap == pytest.approx(1.0) for ap in defined)
    # One shifted box per image (IoU < 0.5 with its object) must cost both metrics.
    for d in dets:
        if len(d["boxes"]):
            width = d["boxes"][0, 2] - d["boxes"][0, 0]
            d["boxes"][0, [0, 2]] += width
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shifted = evaluate_detection_dataset(dataset, dets)
    assert shifted["coco"]["summary"]["AP"] < 0.95 and shifted["voc"]["mAP"] < 0.95


def test_coco_crowd_regions_are_difficult_in_the_voc_ground_truth(shared_dir):
    """coco128 has 10 crowd annotations: they must appear as difficult objects, never as plain ones."""
    import json

    from detres.data.datasets.coco import CocoDetection
    from detres.evaluation.det_eval import dataset_ground_truth

    root = shared_dir / "data" / "coco128"
    ann_file = next((root / "annotations").glob("*.json"))
    raw = json.loads(ann_file.read_text())
    dataset = CocoDetection(root / "train2017", ann_file)
    gt = dataset_ground_truth(dataset)
    assert sum(int(g["difficult"].sum()) for g in gt.values()) == sum(a["iscrowd"] for a in raw["annotations"]) == 10
    assert sum(len(g["labels"]) for g in gt.values()) == len(raw["annotations"])


def _quiet_eval(dataset, dets) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the set have undefined VOC AP
        return evaluate_detection_dataset(dataset, dets)


def _coco_doc(shapes_world) -> dict:
    import json

    return json.loads(Path(shapes_world["det_coco_train"]).read_text())


def test_repeated_annotation_ids_in_a_coco_dataset_still_score_one(shapes_world, tmp_path):
    """Issue #6: two files merged, each numbering its annotations from 1. Loading is right (pycocotools files
    annotations per image), but COCOeval on the raw file scored the ground truth fed back at AP 0.311 while VOC
    said 1.0. Evaluation numbers the annotations afresh, so both metrics see every object."""
    import json

    doc = _coco_doc(shapes_world)
    half = {im["id"] for im in doc["images"][: len(doc["images"]) // 2]}
    counters = {True: 0, False: 0}
    for ann in doc["annotations"]:
        first = ann["image_id"] in half
        counters[first] += 1
        ann["id"] = counters[first]
    assert len({a["id"] for a in doc["annotations"]}) < len(doc["annotations"]) > 10
    ann_file = tmp_path / "merged.json"
    ann_file.write_text(json.dumps(doc))
    dataset = CocoDetection(shapes_world["det_images"], ann_file)
    result = _quiet_eval(dataset, _ground_truth_as_detections(dataset))
    assert result["coco"]["summary"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AR100"] == pytest.approx(1.0)
    assert result["voc"]["mAP"] == pytest.approx(1.0)
    gt = dataset_to_coco_gt(dataset)
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(doc["annotations"]) + 1))


def test_coco_and_voc_score_the_loaded_ground_truth_not_the_raw_file(shapes_world, tmp_path):
    """Issue #6: boxes dropped or clipped at loading were still scored by COCO AP from the raw JSON (ground truth
    fed back: COCO 0.935, VOC 1.0 here). Both now score the loaded boxes and crowd regions."""
    import json

    doc = _coco_doc(shapes_world)
    img = doc["images"][0]
    h, w = img["height"], img["width"]
    cat = doc["categories"][0]["id"]
    # Outside by at most the 1 px tolerance (further is a malformed box, a bad sample: tests/data/test_bad_samples.py).
    extra = [
        [w - 10, h - 8, 10.5, 8.5],  # out of the image on two sides: clipped to 10 x 8
        [5, 5, 0, 12],  # zero width: dropped
        [w + 0.5, 3, 0.5, 10],  # wholly outside: zero width once clipped, dropped
        [-0.5, -1, 14.5, 13],
    ]  # starts outside: clipped to (0, 0, 14, 12)
    next_id = max(a["id"] for a in doc["annotations"]) + 1
    for k, box in enumerate(extra):
        doc["annotations"].append(
            {
                "id": next_id + k,
                "image_id": img["id"],
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
        )
    # A crowd region reaching past the image: ignored by both metrics, clipped like the rest.
    doc["annotations"].append(
        {
            "id": next_id + 9,
            "image_id": img["id"],
            "category_id": cat,
            "iscrowd": 1,
            "bbox": [w - 20, 0, 40, 20],
            "area": 400,
        }
    )
    ann_file = tmp_path / "with_bad_boxes.json"
    ann_file.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="dropped 2 degenerate boxes"):
        dataset = CocoDetection(shapes_world["det_images"], ann_file)
    dets = _ground_truth_as_detections(dataset)
    result = _quiet_eval(dataset, dets)
    assert result["coco"]["summary"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AR100"] == pytest.approx(1.0)
    assert result["voc"]["mAP"] == pytest.approx(1.0)
    gt = dataset_to_coco_gt(dataset)
    first = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
    assert [a["bbox"] for a in first if a["iscrowd"]] == [[w - 20.0, 0.0, 20.0, 20.0]]
    assert [w - 10.0, h - 8.0, 10.0, 8.0] in [a["bbox"] for a in first]
    assert [0.0, 0.0, 14.0, 12.0] in [a["bbox"] for a in first]
    # The whole list: per image (dataset order) the loaded training targets, then its crowd regions, as
    # the dataset hands them to training (annotation()), converted to xywh with the original category ids.
    expected = []
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        crowd_boxes = ann["crowd_boxes"]
        assert len(crowd_boxes) == (1 if ann["image_id"] == img["id"] else 0)
        rows = [(box, dataset.label_to_category_id[int(label)], 0) for box, label in zip(ann["boxes"], ann["labels"])]
        rows += [(box, cat, 1) for box in crowd_boxes]
        expected += [
            (ann["image_id"], c, [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])], crowd)
            for box, c, crowd in rows
        ]
    got = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in gt["annotations"]]
    assert len(got) == len(expected) == dataset.num_boxes + 1
    for g, e in zip(got, expected):
        assert g[:2] == e[:2] and g[3] == e[3] and g[2] == pytest.approx(e[2], abs=1e-4), (g, e)
    assert sum(1 - a["iscrowd"] for a in gt["annotations"]) == dataset.num_boxes
    # A detection on the crowd region is ignored by both metrics; a box off every object costs both.
    dets[0] = _det(
        img["id"],
        np.concatenate([dets[0]["boxes"], [[w - 20, 0, w, 20]]]),
        np.concatenate([dets[0]["scores"], [2.0]]),
        np.concatenate([dets[0]["labels"], [1]]),
    )
    on_crowd = _quiet_eval(dataset, dets)
    assert on_crowd["coco"]["summary"]["AP"] == pytest.approx(1.0) and on_crowd["voc"]["mAP"] == pytest.approx(1.0)


def test_coco_ground_truth_keeps_category_ids_and_only_the_dataset_images(tmp_path):
    import json

    import cv2

    images = [
        {"id": 5, "file_name": "a.png", "height": 30, "width": 40},
        {"id": 9, "file_name": "b.png", "height": 30, "width": 40},
    ]
    (tmp_path / "img").mkdir()
    for im in images:
        cv2.imwrite(str(tmp_path / "img" / im["file_name"]), np.zeros((30, 40, 3), np.uint8))
    anns = [
        {"id": 1, "image_id": 5, "category_id": 70, "bbox": [1, 2, 10, 5], "area": 33.0, "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 3, "bbox": [4, 4, 8, 8], "area": 64.0, "iscrowd": 0},
    ]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 70, "name": "b"}, {"id": 3, "name": "a"}]}
        )
    )
    dataset = CocoDetection(tmp_path / "img", ann_file, image_ids=[9])  # a split: image 5 is not in it
    gt = dataset_to_coco_gt(dataset)
    assert gt["images"] == [{"id": 9, "height": 30, "width": 40, "file_name": str(tmp_path / "img" / "b.png")}]
    assert gt["categories"] == [{"id": 3, "name": "a"}, {"id": 70, "name": "b"}]
    assert gt["annotations"] == [
        {"id": 1, "image_id": 9, "category_id": 3, "bbox": [4.0, 4.0, 8.0, 8.0], "area": 64.0, "iscrowd": 0}
    ]
    result = _quiet_eval(dataset, _ground_truth_as_detections(dataset))
    assert result["coco"]["num_images"] == 1 and result["coco"]["summary"]["AP"] == pytest.approx(1.0)


def test_dataset_path_reproduces_pycocotools_on_the_raw_file_when_nothing_is_cleaned(shared_dir):
    """The COCO ground truth rebuilt from the loaded dataset (fresh ids, clipped boxes, the file's areas, crowd
    regions) gives cocoapi's own demo numbers on 100 real val2014 images, where loading changes no box."""
    import json
    from collections import defaultdict

    from detres.evaluation.coco import evaluate_coco

    ref = shared_dir / "data" / "evalref" / "coco"
    gt_file, dt_file = ref / "gt_val2014_100img.json", ref / "dt_fakebbox100.json"
    dataset = CocoDetection(ref / "no_images_needed", gt_file)
    assert dataset.num_degenerate == 0 and dataset.num_crowd == 9
    results = json.loads(dt_file.read_text())
    per_image = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    dets = []
    for image_id in dataset.ids:
        rs = per_image[image_id]
        boxes = [[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]] for r in rs]
        # float64, so the boxes are the file's numbers (float32 rounding moves IoUs that sit on a threshold).
        dets.append(
            {
                "image_id": image_id,
                "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
                "scores": np.asarray([r["score"] for r in rs]),
                "labels": np.asarray([dataset.category_id_to_label[r["category_id"]] for r in rs]),
            }
        )
    ours = _quiet_eval(dataset, dets)["coco"]["summary"]
    raw = evaluate_coco(gt_file, results)["summary"]
    assert ours == pytest.approx(raw, abs=1e-6)
    assert ours["AP"] == pytest.approx(0.505, abs=5e-4)  # the cocoapi demo's printed value
