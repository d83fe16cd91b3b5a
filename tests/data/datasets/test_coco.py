"""Tests for detres.data.datasets.coco: coco128 counts recomputed from the raw JSON, label mapping, degenerate boxes."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detres.data.datasets.coco import CocoDetection
from detres.data.transforms.detection import build_det_transforms


@pytest.fixture(scope="module")
def coco128(shared_dir: Path) -> tuple[Path, Path, dict]:
    root = shared_dir / "data" / "coco128"
    ann_file = root / "annotations" / "instances_train2017.json"
    if not ann_file.is_file():
        pytest.skip(f"coco128 not found at {root}")
    return root / "train2017", ann_file, json.loads(ann_file.read_text())


def _raw_boxes_by_image(raw: dict, include_crowd: bool) -> dict[int, list[tuple]]:
    by_image: dict[int, list[tuple]] = defaultdict(list)
    for a in raw["annotations"]:
        if a["iscrowd"] and not include_crowd:
            continue
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append((x, y, x + w, y + h, a["category_id"]))
    return by_image


def test_coco128_targets_match_the_raw_json(coco128) -> None:
    image_dir, ann_file, raw = coco128
    ds = CocoDetection(image_dir, ann_file)
    n_crowd = sum(1 for a in raw["annotations"] if a["iscrowd"])
    expected = _raw_boxes_by_image(raw, include_crowd=False)
    # The counts SOURCE.txt states, recomputed from the JSON itself.
    assert len(raw["images"]) == 128 and len(raw["annotations"]) == 939 and n_crowd == 10
    assert len(ds) == 128 and ds.ids == sorted(im["id"] for im in raw["images"])
    assert ds.num_crowd == 10 and ds.num_degenerate == 0
    assert ds.num_boxes == 939 - 10 == sum(len(v) for v in expected.values())
    total = 0
    for i, img_id in enumerate(ds.ids):
        ann = ds.annotation(i)
        assert ann["image_id"] == img_id
        rows = sorted(expected.get(img_id, []))
        got = sorted(
            tuple(b) + (ds.label_to_category_id[int(lab)],) for b, lab in zip(ann["boxes"].tolist(), ann["labels"])
        )
        assert len(got) == len(rows)
        for g, r in zip(got, rows):
            np.testing.assert_allclose(g[:4], r[:4], atol=1e-3)  # xywh -> xyxy (float32)
            assert g[4] == r[4]
        total += len(got)
    assert total == 929


def test_coco128_label_category_round_trip(coco128) -> None:
    image_dir, ann_file, raw = coco128
    ds = CocoDetection(image_dir, ann_file)
    cat_ids = sorted(c["id"] for c in raw["categories"])
    assert len(ds.categories) == 80
    assert [c["id"] for c in ds.categories] == cat_ids
    names = {c["id"]: c["name"] for c in raw["categories"]}
    for label in range(1, 81):
        cid = ds.label_to_category_id[label]
        assert ds.category_id_to_label[cid] == label
        assert ds.categories[label - 1] == {"id": cid, "name": names[cid]}
    # COCO ids run 1..90 with gaps: person (1) is label 1, toothbrush (90) label 80.
    assert ds.category_id_to_label[1] == 1 and ds.category_id_to_label[90] == 80
    assert names[90] == "toothbrush"


def test_coco128_with_crowd_kept_has_all_939_boxes(coco128) -> None:
    image_dir, ann_file, raw = coco128
    kinds = {type(a["segmentation"]).__name__ for a in raw["annotations"]}
    assert kinds == {"list", "dict"}  # polygons and RLE both present; they must not matter
    ds = CocoDetection(image_dir, ann_file, skip_crowd=False)
    assert ds.num_boxes == 939 and ds.num_crowd == 0


def test_coco128_images_without_boxes(coco128) -> None:
    image_dir, ann_file, raw = coco128
    annotated = {a["image_id"] for a in raw["annotations"]}
    empty_ids = sorted(im["id"] for im in raw["images"] if im["id"] not in annotated)
    assert len(empty_ids) == 2
    ds = CocoDetection(image_dir, ann_file)
    for img_id in empty_ids:
        sample = ds[ds.ids.index(img_id)]
        assert sample["boxes"].shape == (0, 4) and sample["labels"].shape == (0,)
        assert sample["difficult"].shape == (0,) and sample["image_id"] == img_id
    kept = CocoDetection(image_dir, ann_file, remove_images_without_boxes=True)
    assert len(kept) == 126 and not set(empty_ids) & set(kept.ids)


def test_coco128_sample_decoding_and_transform(coco128) -> None:
    image_dir, ann_file, raw = coco128
    crowd_img = next(a["image_id"] for a in raw["annotations"] if a["iscrowd"])
    ds = CocoDetection(image_dir, ann_file)
    i = ds.ids.index(crowd_img)
    sample = ds[i]
    h, w = ds.image_hw(i)
    info = next(im for im in raw["images"] if im["id"] == crowd_img)
    assert (h, w) == (info["height"], info["width"]) == sample["orig_size"]
    assert sample["image"].shape == (3, h, w) and sample["image"].dtype == torch.float32
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 255
    assert sample["scale"] == 1.0 and Path(sample["file_name"]).name == info["file_name"]
    n_noncrowd = sum(1 for a in raw["annotations"] if a["image_id"] == crowd_img and not a["iscrowd"])
    assert sample["boxes"].shape == (n_noncrowd, 4) and not sample["difficult"].any()

    ds.transforms = build_det_transforms(train=False, min_size=100, max_size=1000)
    small = ds[i]
    scale = 100 / min(h, w)
    assert small["image"].shape[1:] == (round(h * scale), round(w * scale))
    assert small["scale"] == pytest.approx(scale)
    sx, sy = small["scale_xy"]
    expected = sample["boxes"] * torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(small["boxes"], expected, atol=1e-3, rtol=0)


def test_coco128_subset_split(coco128) -> None:
    image_dir, ann_file, raw = coco128
    ids = sorted(im["id"] for im in raw["images"])
    val = CocoDetection(image_dir, ann_file, image_ids=ids[96:])
    assert val.ids == ids[96:] and len(val) == 32
    with pytest.raises(ValueError, match="not in COCO annotation file"):
        CocoDetection(image_dir, ann_file, image_ids=[-5])


def _write_tiny_coco(tmp_path: Path, annotations: list[dict], images=None, categories=None) -> tuple[Path, Path]:
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    images = images or [
        {"id": 11, "file_name": "a.png", "height": 32, "width": 48},
        {"id": 12, "file_name": "b.png", "height": 40, "width": 20},
    ]
    for im in images:
        cv2.imwrite(str(image_dir / im["file_name"]), np.full((im["height"], im["width"], 3), 100, np.uint8))
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(doc))  # json writes NaN for float('nan'), as broken tools do
    return image_dir, ann_file


def _ann(ann_id: int, image_id: int, bbox, cat: int = 7, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": iscrowd, "area": 1.0}


def test_degenerate_boxes_dropped_with_one_counted_warning(tmp_path: Path) -> None:
    anns = [
        _ann(1, 11, [1, 2, 10, 5], cat=7),  # fine
        _ann(2, 11, [5, 5, 0, 8]),  # zero width
        _ann(3, 11, [48, 5, 0.5, 4]),  # right of the 48-wide image, within the 1 px tolerance: zero width clipped
        _ann(4, 11, [40, 30, 8.5, 2.5], cat=3),  # partly outside (by 0.5 px): clipped to (40, 30, 48, 32)
        _ann(5, 11, [1, 1, 3, 0]),  # zero height
        _ann(6, 11, [2, 2, 6, 6], iscrowd=1),  # crowd: excluded, counted separately
        _ann(7, 11, [-0.5, -1, 6.5, 7], cat=3),  # starts outside (within 1 px): clipped to (0, 0, 6, 6)
    ]
    image_dir, ann_file = _write_tiny_coco(tmp_path, anns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(image_dir, ann_file)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith("dropped 3 degenerate boxes") and "ann.json" in messages[0]
    assert "[2, 3, 5]" in messages[0]
    assert ds.num_degenerate == 3 and ds.num_crowd == 1 and ds.num_boxes == 3
    ann = ds.annotation(0)
    np.testing.assert_allclose(ann["boxes"], [[1, 2, 11, 7], [40, 30, 48, 32], [0, 0, 6, 6]])
    # Category ids 3 and 7 are labels 1 and 2 (sorted id order), whatever order the JSON lists them in.
    assert ds.category_id_to_label == {3: 1, 7: 2}
    assert ds.categories == [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    np.testing.assert_array_equal(ann["labels"], [2, 1, 1])
    empty = ds[1]  # image 12 has no annotations at all
    assert empty["boxes"].shape == (0, 4) and empty["image"].shape == (3, 40, 20)


def test_min_box_size_drops_small_boxes(tmp_path: Path) -> None:
    anns = [
        _ann(1, 11, [1, 2, 10, 5]),
        _ann(2, 11, [1, 2, 2, 9]),  # 2 wide: too small
        _ann(3, 11, [1, 1, 3, 3]),  # 3x3: too small
        _ann(4, 11, [20, 20, 4, 4]),  # exactly 4x4: kept
    ]
    image_dir, ann_file = _write_tiny_coco(tmp_path, anns)
    with pytest.warns(UserWarning, match=r"dropped 2 boxes smaller than min_box_size=4\.0.*\[2, 3\]"):
        ds = CocoDetection(image_dir, ann_file, min_box_size=4)
    assert ds.num_small == 2 and ds.num_degenerate == 0 and ds.num_boxes == 2
    np.testing.assert_allclose(ds.annotation(0)["boxes"], [[1, 2, 11, 7], [20, 20, 24, 24]])


def test_bad_inputs_give_errors_naming_the_file(tmp_path: Path) -> None:
    image_dir, ann_file = _write_tiny_coco(tmp_path, [_ann(1, 11, [1, 2, 10, 5], cat=99)])
    with pytest.raises(ValueError, match=r"ann\.json.*category_id 99"):
        CocoDetection(image_dir, ann_file)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(image_dir, tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        CocoDetection(image_dir, broken)
    image_dir, ann_file = _write_tiny_coco(tmp_path, [_ann(1, 11, [1, 2, 3])])
    with pytest.raises(ValueError, match=r"ann\.json.*annotation 1.*bbox"):
        CocoDetection(image_dir, ann_file)


def test_image_size_mismatch_names_the_image(tmp_path: Path) -> None:
    image_dir, ann_file = _write_tiny_coco(tmp_path, [])
    cv2.imwrite(str(image_dir / "a.png"), np.zeros((10, 10, 3), np.uint8))  # JSON says 48x32
    ds = CocoDetection(image_dir, ann_file)
    with pytest.raises(ValueError, match=r"a\.png.*10x10.*48x32"):
        ds[0]
    (image_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        ds[1]


def test_duplicate_image_ids_are_an_error_naming_the_file_ids_and_file_names(tmp_path: Path) -> None:
    # Issue #6: pycocotools keeps the last image of a repeated id and piles every annotation on it, so
    # id 11 loaded b.png with a.png's box and nothing said so.
    images = [
        {"id": 11, "file_name": "a.png", "height": 32, "width": 48},
        {"id": 11, "file_name": "b.png", "height": 32, "width": 48},
        {"id": 12, "file_name": "c.png", "height": 32, "width": 48},
    ]
    image_dir, ann_file = _write_tiny_coco(tmp_path, [_ann(1, 11, [1, 2, 10, 5])], images=images)
    with pytest.raises(ValueError, match=r"ann\.json.*image id.*id 11: 'a\.png', 'b\.png'") as info:
        CocoDetection(image_dir, ann_file)
    assert "c.png" not in str(info.value)
    ids = [11, 12]
    image_dir, ann_file = _write_tiny_coco(
        tmp_path, [], images=[{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in ids]
    )
    with pytest.raises(ValueError, match=r"image_ids: \[12\] listed more than once"):
        CocoDetection(image_dir, ann_file, image_ids=[12, 11, 12])


def test_evaluation_ground_truth_is_the_loaded_boxes_plus_clipped_crowd_regions(tmp_path: Path) -> None:
    anns = [
        _ann(1, 11, [1, 2, 10, 5], cat=7),  # kept as it is: the file's area (1.0) is kept
        _ann(2, 11, [5, 5, 0, 8]),  # zero width: dropped from targets and evaluation alike
        _ann(3, 11, [40, 30, 8.5, 2.5], cat=3),  # clipped to (40, 30, 48, 32): area becomes 8 * 2
        _ann(4, 11, [30, 20, 18.5, 12.5], cat=3, iscrowd=1),  # crowd, clipped to (30, 20, 48, 32)
        _ann(5, 11, [48, 5, 0.5, 4], iscrowd=1),  # crowd outside the image (within 1 px): nothing to ignore
        _ann(6, 12, [2, 2, 6, 6], iscrowd=1),  # crowd only: the image has no targets
    ]
    image_dir, ann_file = _write_tiny_coco(tmp_path, anns)
    with pytest.warns(UserWarning, match=r"dropped 2 degenerate boxes.*\[2, 5\]"):
        ds = CocoDetection(image_dir, ann_file)
    assert ds.num_crowd == 3 and ds.num_boxes == 2
    gt = ds.evaluation_ground_truth(0)
    assert gt["image_id"] == 11 and gt["orig_size"] == (32, 48) and gt["file_name"].endswith("a.png")
    np.testing.assert_allclose(gt["boxes"], [[1, 2, 11, 7], [40, 30, 48, 32], [30, 20, 48, 32]])
    np.testing.assert_array_equal(gt["labels"], [2, 1, 1])
    np.testing.assert_array_equal(gt["iscrowd"], [False, False, True])
    np.testing.assert_allclose(gt["area"], [1.0, 16.0, 18 * 12])
    # The targets are the non-crowd part, in float32 (the sample contract).
    np.testing.assert_array_equal(ds.annotation(0)["boxes"], gt["boxes"][:2].astype(np.float32))
    assert ds.annotation(0)["boxes"].dtype == np.float32
    crowd_only = ds.evaluation_ground_truth(1)
    np.testing.assert_array_equal(crowd_only["iscrowd"], [True])
    np.testing.assert_allclose(crowd_only["boxes"], [[2, 2, 8, 8]])
    # skip_crowd=False: crowd boxes are ordinary targets, so there are no crowd regions to ignore.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = CocoDetection(image_dir, ann_file, skip_crowd=False)
    assert not kept.evaluation_ground_truth(0)["iscrowd"].any() and kept.num_boxes == 4


def test_crowd_regions_reach_the_training_targets_resized_and_flipped(tmp_path: Path) -> None:
    # Issue #6: crowd regions must reach the RPN / RoI heads (which ignore anchors and proposals inside
    # them), so the sample carries them and the transforms move them exactly like the gt boxes.
    from detres.data.collate import collate_detection

    anns = [
        _ann(1, 11, [2, 4, 10, 8]),  # gt (2, 4, 12, 12)
        _ann(2, 11, [20, 4, 16, 12], iscrowd=1),  # crowd (20, 4, 36, 16)
        _ann(3, 11, [40, 20, 20, 20], iscrowd=1),  # crowd, clipped to the 48x32 image: (40, 20, 48, 32)
    ]
    image_dir, ann_file = _write_tiny_coco(tmp_path, anns)
    ds = CocoDetection(image_dir, ann_file)
    ann = ds.annotation(0)
    assert ann["crowd_boxes"].dtype == np.float32
    np.testing.assert_array_equal(ann["crowd_boxes"], [[20, 4, 36, 16], [40, 20, 48, 32]])
    np.testing.assert_array_equal(ann["boxes"], [[2, 4, 12, 12]])
    # 32x48 -> shorter side 16: scale 0.5, 16x24, then flipped about x = 24 (x1' = 24 - x2, x2' = 24 - x1).
    ds.transforms = build_det_transforms(train=True, min_size=16, max_size=1000, flip_prob=1.0, seed=0)
    sample = ds[0]
    assert sample["image"].shape == (3, 16, 24)
    torch.testing.assert_close(sample["boxes"], torch.tensor([[18.0, 2.0, 23.0, 6.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        sample["crowd_boxes"], torch.tensor([[6.0, 2.0, 14.0, 8.0], [0.0, 10.0, 4.0, 16.0]]), atol=1e-4, rtol=0
    )
    empty = ds[1]  # image 12: no annotations, no crowd
    assert empty["crowd_boxes"].shape == (0, 4) and empty["crowd_boxes"].dtype == torch.float32
    t0, t1 = collate_detection([sample, empty])["targets"]
    torch.testing.assert_close(t0["crowd_boxes"], sample["crowd_boxes"])
    assert t0["crowd_boxes"].dtype == torch.float32 and t1["crowd_boxes"].shape == (0, 4)
    # With skip_crowd=False the crowd annotations are ordinary targets and there are no crowd regions.
    kept = CocoDetection(image_dir, ann_file, skip_crowd=False)
    assert kept.annotation(0)["crowd_boxes"].shape == (0, 4) and len(kept.annotation(0)["boxes"]) == 3


def test_coco128_crowd_region_resized_and_flipped_by_hand(coco128) -> None:
    # Image 357 (640x218) has one crowd region, bbox [466, 0, 173, 73] -> xyxy (466, 0, 639, 73).
    image_dir, ann_file, raw = coco128
    crowd = [a for a in raw["annotations"] if a["image_id"] == 357 and a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [466, 0, 173, 73]
    ds = CocoDetection(image_dir, ann_file)
    i = ds.ids.index(357)
    np.testing.assert_array_equal(ds.annotation(i)["crowd_boxes"], [[466, 0, 639, 73]])
    plain = ds[i]
    # Shorter side 218 -> 109: scale exactly 0.5, 320x109; flip about x = 320.
    ds.transforms = build_det_transforms(train=True, min_size=109, max_size=1000, flip_prob=1.0, seed=0)
    sample = ds[i]
    assert sample["image"].shape == (3, 109, 320)
    torch.testing.assert_close(sample["crowd_boxes"], torch.tensor([[0.5, 0.0, 87.0, 36.5]]), atol=1e-3, rtol=0)
    half = plain["boxes"] * 0.5
    flipped = torch.stack([320 - half[:, 2], half[:, 1], 320 - half[:, 0], half[:, 3]], dim=1)
    torch.testing.assert_close(sample["boxes"], flipped, atol=1e-3, rtol=0)
