"""Tests for config → detection datasets (COCO and VOC formats of the same shapes-world images)."""

from __future__ import annotations

import pytest
import torch

from detres.config.load import load_config
from detres.data.build import build_detection_dataset, dataset_class_names, dataset_label_to_category_id
from detres.data.shapes.world import CATEGORIES, generate_shapes_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes_world(
        root,
        seed=3,
        num_cls_train_per_class=1,
        num_cls_val_per_class=1,
        num_det_train=6,
        num_det_val=4,
        num_loc_train=1,
        num_loc_val=1,
    )


def _cfg(fmt, world, *extra):
    if fmt == "coco":
        data = [
            f"data.train_images={world['det_images']}",
            f"data.train_ann={world['det_coco_train']}",
            f"data.val_images={world['det_images']}",
            f"data.val_ann={world['det_coco_val']}",
        ]
    else:
        data = [
            f"data.train_images={world['voc_root']}",
            "data.train_ann=train",
            f"data.val_images={world['voc_root']}",
            "data.val_ann=val",
        ]
    return load_config(
        None,
        [
            f"data.format={fmt}",
            "input.min_size_train=[64]",
            "input.max_size_train=100",
            "input.min_size_test=64",
            "input.max_size_test=100",
            *data,
            *extra,
        ],
        task="det",
    )


def test_coco_and_voc_give_the_same_boxes(world):
    coco = build_detection_dataset(_cfg("coco", world), "val", train=False)
    voc = build_detection_dataset(_cfg("voc", world), "val", train=False, class_names=list(CATEGORIES))
    assert len(coco) == len(voc) == 4
    assert dataset_class_names(coco) == list(CATEGORIES)
    for i in range(len(coco)):
        a, b = coco[i], voc[i]
        # evaluation sets yield the original images: the detector resizes them to its test scale itself
        assert tuple(a["image"].shape[1:]) == tuple(a["orig_size"]) and a["scale_xy"] == (1.0, 1.0)
        assert a["image"].shape == b["image"].shape
        # VOC stores integer pixel boxes: equal to the COCO boxes after the 1-based rounding rule
        assert torch.allclose(a["boxes"], b["boxes"], atol=1.0)
        assert torch.equal(a["labels"], b["labels"])
    assert dataset_label_to_category_id(coco) == {i + 1: i + 1 for i in range(len(CATEGORIES))}


def test_training_sets_flip_and_drop_difficult(world):
    voc_eval = build_detection_dataset(_cfg("voc", world), "train", train=False, class_names=list(CATEGORIES))
    plain = voc_eval[0]
    short, long = sorted(plain["image"].shape[1:])  # a training scale that keeps this original image's size
    voc_train = build_detection_dataset(
        _cfg("voc", world, "input.flip_prob=1.0", f"input.min_size_train=[{short}]", f"input.max_size_train={long}"),
        "train",
        train=True,
        class_names=list(CATEGORIES),
    )
    flipped = voc_train[0]
    width = plain["image"].shape[2]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    kept = ~plain["difficult"]
    expected = plain["boxes"][kept][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor(
        [width, 0.0, width, 0.0]
    )
    assert torch.allclose(flipped["boxes"], expected, atol=1e-4)
    assert not flipped["difficult"].any()


def test_unknown_format_is_named(world):
    with pytest.raises(ValueError, match="data.format: expected one of coco, voc"):  # refused when loaded
        _cfg("coco", world, "data.format=yolo")
    cfg = _cfg("coco", world)
    cfg.data.format = "yolo"  # set after loading: the builder still names the key
    with pytest.raises(ValueError, match="data.format"):
        build_detection_dataset(cfg, "train", train=True)
    with pytest.raises(ValueError, match="split"):
        build_detection_dataset(_cfg("coco", world), "test", train=False)
