"""Tests for the shapes-world generator: determinism, exact/tight boxes, COCO = VOC = ILSVRC files, loaders."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from detres.data.shapes import world as synthetic
from detres.data.shapes.world import (
    CATEGORIES,
    MARKER_NAME,
    WNIDS,
    generate_shapes_world,
    image_rng,
    render_detection_image,
    render_localization_image,
    render_object,
)

K = len(CATEGORIES)
SEED = 7
TINY = dict(
    num_cls_train_per_class=3,
    num_cls_val_per_class=2,
    num_det_train=12,
    num_det_val=6,
    num_loc_train=20,
    num_loc_val=10,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "world"
    generate_shapes_world(root, seed=SEED, **TINY)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _xml_objects(path: Path) -> list[tuple[str, tuple[float, float, float, float], int]]:
    """(name, continuous xyxy via the VOC rule (x1-1, y1-1, x2, y2), difficult) per object."""
    out = []
    for obj in ET.parse(path).getroot().iter("object"):
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (int(b.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        out.append((obj.findtext("name"), (x1 - 1.0, y1 - 1.0, float(x2), float(y2)), int(obj.findtext("difficult"))))
    return out


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(world, tmp_path):
    again = tmp_path / "again"
    generate_shapes_world(again, seed=SEED, **TINY)
    first, second = _hashes(world), _hashes(again)
    # 50 cls, 18 det images twice, 18 VOC xml, 2 COCO, 3 ImageSets, 30 loc images + xml, 3 loc text, marker
    assert len(first) == 50 + 36 + 18 + 2 + 3 + 60 + 3 + 1
    assert first == second


def test_different_seed_changes_every_image(world, tmp_path):
    other = tmp_path / "other"
    generate_shapes_world(other, seed=SEED + 1, **TINY)
    a, b = _hashes(world), _hashes(other)
    assert a.keys() == b.keys()  # names do not depend on the seed ...
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in pngs)  # ... contents do
    assert a["det/annotations/instances_train.json"] != b["det/annotations/instances_train.json"]


# --------------------------------------------------------------------------- box exactness


def test_scene_boxes_are_tight_around_disjoint_masks():
    n_difficult = n_truncated = 0
    for i in range(60):
        scene = render_detection_image(np.random.default_rng(i))
        h, w = scene.image.shape[:2]
        assert scene.masks.shape == (len(scene.labels), h, w)
        assert scene.masks.sum(0).max(initial=0) <= 1  # visible masks never share a pixel
        assert set(scene.labels.tolist()) <= set(range(1, K + 1))
        for box, mask, difficult, truncated in zip(scene.boxes, scene.masks, scene.difficult, scene.truncated):
            x1, y1, x2, y2 = (int(v) for v in box)
            assert np.array_equal(box, [x1, y1, x2, y2])
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            # tight: mask pixels on all four edge rows/columns, none outside the box
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask.sum() == mask[y1:y2, x1:x2].sum()
            side = min(x2 - x1, y2 - y1)
            if truncated:  # cut by the image border, so the box reaches it
                assert x1 == 0 or y1 == 0 or x2 == w or y2 == h
            if not difficult:
                assert side >= synthetic.DIFFICULT_MIN_SIDE
            n_difficult += int(difficult)
            n_truncated += int(truncated)
    assert n_difficult >= 1 and n_truncated >= 5


def test_render_object_patch_is_cropped_to_its_mask():
    for label in range(1, K + 1):
        patch, mask = render_object(np.random.default_rng(label), label, 40.0)
        assert patch.shape[:2] == mask.shape and patch.dtype == np.uint8
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert 20 <= max(mask.shape) <= 42
    with pytest.raises(ValueError, match="label"):
        render_object(np.random.default_rng(0), K + 1, 40.0)


def test_written_images_and_coco_boxes_equal_the_rendered_scenes(world):
    coco = json.loads((world / "det/annotations/instances_train.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for i, img in enumerate(coco["images"]):
        scene = render_detection_image(image_rng(SEED, "det", "train", i), size_range=(96, 160))
        assert np.array_equal(_read_rgb(world / "det/images" / img["file_name"]), scene.image)  # PNG is lossless
        anns = by_image.get(img["id"], [])
        boxes = np.array(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            np.float32,
        ).reshape(-1, 4)
        assert np.array_equal(boxes, scene.boxes)
        assert [a["category_id"] for a in anns] == scene.labels.tolist()
        assert [a["area"] for a in anns] == [float(m.sum()) for m in scene.masks]


def test_coco_and_voc_describe_the_same_boxes(world):
    voc = world / "det/voc"
    main = voc / "ImageSets/Main"
    split_ids = {}
    for split in ("train", "val"):
        coco = json.loads((world / f"det/annotations/instances_{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, K + 1))
        assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
        anns_by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            assert ann["iscrowd"] == 0
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        split_ids[split] = main.joinpath(f"{split}.txt").read_text().split()
        assert split_ids[split] == [Path(img["file_name"]).stem for img in coco["images"]]
        for img in coco["images"]:
            stem = Path(img["file_name"]).stem
            root = ET.parse(voc / "Annotations" / f"{stem}.xml").getroot()
            assert root.findtext("filename") == img["file_name"]
            assert (voc / "JPEGImages" / img["file_name"]).read_bytes() == (
                world / "det/images" / img["file_name"]
            ).read_bytes()
            assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (
                img["width"],
                img["height"],
            )
            from_coco = [
                (
                    CATEGORIES[a["category_id"] - 1],
                    (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]),
                )
                for a in anns_by_image.get(img["id"], [])
            ]
            from_voc = [(name, box) for name, box, _ in _xml_objects(voc / "Annotations" / f"{stem}.xml")]
            assert from_voc == from_coco
    assert main.joinpath("trainval.txt").read_text().split() == split_ids["train"] + split_ids["val"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 copy keyword
def test_cocoeval_of_ground_truth_as_detections_is_perfect(world):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _quiet(COCO, str(world / "det/annotations/instances_val.json"))
    anns = gt.loadAnns(gt.getAnnIds())
    assert len(anns) >= 6

    def evaluate(dets, iou_type):
        ev = COCOeval(gt, _quiet(gt.loadRes, dets), iou_type)
        _quiet(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
        return ev.stats

    exact = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in anns
    ]
    stats = evaluate(exact, "bbox")
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    segm = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": gt.annToRLE(a), "score": 1.0}
        for a in anns
    ]
    assert evaluate(segm, "segm")[0] == pytest.approx(1.0)
    # control: every box moved off itself -> nothing matches
    moved = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2] + 1, *d["bbox"][1:]]) for d in exact]
    assert evaluate(moved, "bbox")[0] == pytest.approx(0.0)
    # the polygon is the object's outline: pycocotools rasterises it to a superset of the visible
    # pixels (a ring's hole is filled) whose box is exactly the annotated box
    for index, img in enumerate(gt.dataset["images"]):
        scene = render_detection_image(image_rng(SEED, "det", "val", index), size_range=(96, 160))
        for a, mask in zip(gt.imgToAnns[img["id"]], scene.masks):
            raster = gt.annToMask(a).astype(bool)
            assert not (mask & ~raster).any()
            ys, xs = np.nonzero(raster)
            x, y, w, h = a["bbox"]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


# --------------------------------------------------------------------------- localization files


def test_ilsvrc_xml_and_csv_match_the_rendered_scenes(world):
    loc = world / "loc"
    mapping = [line.split(" ", 1) for line in (loc / "LOC_synset_mapping.txt").read_text().splitlines()]
    assert mapping == [[w, n] for w, n in zip(WNIDS, CATEGORIES)]
    for split, n in (("train", TINY["num_loc_train"]), ("val", TINY["num_loc_val"])):
        rows = dict(line.split(",", 1) for line in (loc / f"LOC_{split}_solution.csv").read_text().splitlines()[1:])
        assert len(rows) == n
        for i in range(n):
            label = i % K + 1
            stem = f"{WNIDS[label - 1]}_{i + 1}" if split == "train" else f"SHAPES_val_{i + 1:08d}"
            scene = render_localization_image(image_rng(SEED, "loc", split, i), label, size_range=(96, 160))
            xml = loc / "Annotations" / split / f"{stem}.xml"
            root = ET.parse(xml).getroot()
            assert root.findtext("filename") == f"{stem}.png"
            assert np.array_equal(_read_rgb(loc / "Data" / split / f"{stem}.png"), scene.image)
            objects = _xml_objects(xml)
            assert 1 <= len(objects) <= 2
            assert {name for name, _, _ in objects} == {WNIDS[label - 1]}
            assert np.array_equal(np.array([box for _, box, _ in objects], np.float32), scene.boxes)
            csv = rows[stem].split()
            assert csv == [
                str(v)
                for name, (x1, y1, x2, y2), _ in objects
                for v in (name, int(x1) + 1, int(y1) + 1, int(x2), int(y2))
            ]


# --------------------------------------------------------------------------- balance, sizes, loaders


def test_classes_are_balanced(world):
    for split, n in (("train", TINY["num_cls_train_per_class"]), ("val", TINY["num_cls_val_per_class"])):
        assert sorted(p.name for p in (world / "cls" / split).iterdir()) == list(CATEGORIES)
        assert all(len(list((world / "cls" / split / c).glob("*.png"))) == n for c in CATEGORIES)
    for split, n in (("train", TINY["num_loc_train"]), ("val", TINY["num_loc_val"])):
        first = Counter(_xml_objects(p)[0][0] for p in (world / "loc/Annotations" / split).glob("*.xml"))
        assert first == {w: n // K for w in WNIDS}
    # detection labels are drawn uniformly: over many scenes every class gets a fair share
    counts = Counter(
        label for i in range(100) for label in render_detection_image(np.random.default_rng(1000 + i)).labels.tolist()
    )
    total = sum(counts.values())
    assert set(counts) == set(range(1, K + 1))
    assert min(counts.values()) > 0.5 * total / K


def test_image_sizes_are_in_range_and_match_annotations(world):
    def sizes(paths):
        return [cv2.imread(str(p)).shape[:2] for p in paths]

    cls_hw = sizes((world / "cls").rglob("*.png"))
    det_hw = sizes((world / "det/images").glob("*.png"))
    loc_hw = sizes((world / "loc/Data").rglob("*.png"))
    for hw, (lo, hi) in ((cls_hw, (64, 96)), (det_hw, (96, 160)), (loc_hw, (96, 160))):
        assert all(lo <= v <= hi for pair in hw for v in pair)
        assert len(set(hw)) > 1  # sizes vary
    for split in ("train", "val"):
        coco = json.loads((world / f"det/annotations/instances_{split}.json").read_text())
        for img in coco["images"]:
            assert cv2.imread(str(world / "det/images" / img["file_name"])).shape[:2] == (img["height"], img["width"])
    for xml in (world / "loc/Annotations").rglob("*.xml"):
        root = ET.parse(xml).getroot()
        image = world / "loc/Data" / xml.parent.name / root.findtext("filename")
        assert cv2.imread(str(image)).shape[:2] == (int(root.findtext("size/height")), int(root.findtext("size/width")))


def test_torchvision_imagefolder_reads_the_classification_split(world):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(world / "cls/train"))
    assert ds.classes == list(CATEGORIES)  # alphabetical, so labels equal CATEGORIES indices
    assert len(ds) == K * TINY["num_cls_train_per_class"]
    assert Counter(ds.targets) == {k: TINY["num_cls_train_per_class"] for k in range(K)}
    image, target = ds[len(ds) - 1]
    assert target == K - 1 and 64 <= min(image.size) <= max(image.size) <= 96


# --------------------------------------------------------------------------- re-runs and bad input

SMALLER = dict(
    num_cls_train_per_class=1, num_cls_val_per_class=1, num_det_train=3, num_det_val=2, num_loc_train=2, num_loc_val=1
)


def test_rerun_is_idempotent_and_changed_parameters_regenerate(tmp_path):
    root = tmp_path / "w"
    generate_shapes_world(root, seed=1, **SMALLER)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    generate_shapes_world(root, seed=1, **SMALLER)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    generate_shapes_world(root, seed=1, **dict(SMALLER, num_det_train=1))
    assert sorted(p.name for p in (root / "det/images").iterdir()) == [
        "train_000001.png",
        "val_000001.png",
        "val_000002.png",
    ]
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["status"] == "complete" and marker["params"]["num_det_train"] == 1


def test_interrupted_run_is_detected_and_redone(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    root = tmp_path / "w"
    with monkeypatch.context() as m:
        m.setattr(synthetic, "_generate_loc", boom)
        with pytest.raises(KeyboardInterrupt):
            generate_shapes_world(root, seed=2, **SMALLER)
    assert json.loads((root / MARKER_NAME).read_text())["status"] == "incomplete"
    generate_shapes_world(root, seed=2, **SMALLER)
    clean = tmp_path / "clean"
    generate_shapes_world(clean, seed=2, **SMALLER)
    assert _hashes(root) == _hashes(clean)
    assert not [p for p in root.rglob("*.tmp")]


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "det").mkdir()
    with pytest.raises(FileExistsError, match="det"):
        generate_shapes_world(tmp_path, **SMALLER)
    assert not (tmp_path / MARKER_NAME).exists()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seed=-1), "seed"),
        (dict(cls_size=(10, 20)), "cls_size"),
        (dict(det_size=(160, 96)), "det_size"),
        (dict(num_det_train=-3), "num_det_train"),
        (dict(num_loc_val=1.5), "num_loc_val"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate_shapes_world(tmp_path / "w", **{**SMALLER, **kwargs})
    assert not (tmp_path / "w").exists()
