"""Config dicts for tool tests: a quarter-width ResNet-18 detector on ~128 px shapes-world images (CPU-test sized)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_det_world(root: Path, *, train: int, val: int, size: tuple[int, int] = (64, 96), seed: int = 0) -> Path:
    """The detection part only of a shapes world (COCO format) under ``root``, images of ``size``: its ``det``
    folder."""
    from detres.data.shapes.world import generate_shapes_world

    generate_shapes_world(
        root,
        seed=seed,
        num_cls_train_per_class=0,
        num_cls_val_per_class=0,
        num_det_train=train,
        num_det_val=val,
        num_loc_train=0,
        num_loc_val=0,
        det_size=size,
    )
    return root / "det"


def tiny_train_det_config(det: Path, output_dir: Path | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A det config training on ``det``'s COCO train split and testing on its val split; each keyword is a
    top-level section whose keys override the defaults here (``solver={"max_iter": 20}``)."""
    cfg: dict[str, Any] = {
        "task": "det",
        "device": "cpu",
        "model": {
            "depth": 18,
            "base_width": 16,
            "anchor_sizes": [16, 32, 64],
            "rpn": {
                "pre_nms_top_n_train": 300,
                "post_nms_top_n_train": 50,
                "pre_nms_top_n_test": 300,
                "post_nms_top_n_test": 50,
                "batch_size_per_image": 64,
            },
            "roi_heads": {"batch_size_per_image": 16, "pooler_resolution": 8},
        },
        "data": {
            "format": "coco",
            "train_images": str(det / "images"),
            "train_ann": str(det / "annotations" / "instances_train.json"),
            "val_images": str(det / "images"),
            "val_ann": str(det / "annotations" / "instances_val.json"),
            "num_workers": 0,
        },
        "input": {"min_size_train": [128], "max_size_train": 192, "min_size_test": 128, "max_size_test": 192},
        "solver": {
            "images_per_batch": 2,
            "base_lr": 0.005,
            "max_iter": 2,
            "steps": [],
            "eval_period": 0,
            "checkpoint_period": 2,
            "log_period": 1,
        },
        "test": {"vis_images": 2},
    }
    if output_dir is not None:
        cfg["output_dir"] = str(output_dir)
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_tiny_cls_run(folder: Path, *, max_iter: int = 1) -> Path:
    """Random 32 px PNGs in ``folder/data/{train,val}/{a,b}`` (3 / 2 per class) and ``folder/cfg.yaml``: a CIFAR
    ResNet-8 trained on them into ``folder/run`` with one loader worker. Returns the config path."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            images = folder / "data" / split / cls
            images.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    cfg = {
        "task": "cls",
        "output_dir": str(folder / "run"),
        "device": "cpu",
        "model": {"arch": "cifar", "depth": 8, "shortcut": "A"},
        "data": {
            "train_dir": str(folder / "data" / "train"),
            "val_dir": str(folder / "data" / "val"),
            "num_workers": 1,
        },
        "augment": {"scale_min": 32, "scale_max": 36, "crop": 32, "color_pca": False},
        "solver": {"batch_size": 2, "max_iter": max_iter, "log_period": 1},
        "test": {"resize": 32, "scales": [32], "modes": ["1crop"]},
    }
    return write_yaml(folder / "cfg.yaml", cfg)


def det_model_config(**model: Any):
    """A ``task: det`` config's ``model`` tree: the defaults with ``model`` merged in (nested dicts for ``rpn`` and
    ``roi_heads``), validated as a YAML file would be."""
    from detres.config.load import config_from_tree

    return config_from_tree({"task": "det", "model": model}, task="det").model


def det_input_config(**inp: Any):
    """A ``task: det`` config's ``input`` tree (the detector's test scale): the defaults with ``inp`` merged in."""
    from detres.config.load import config_from_tree

    return config_from_tree({"task": "det", "input": inp}, task="det").input


def build_test_detector(
    num_classes: int,
    *,
    test_scale: tuple[int, int] | None = None,
    frozen_bn: bool = True,
    class_agnostic_bbox: bool = False,
    **model: Any,
):
    """``FasterRCNN.from_config`` of :func:`det_model_config` (``model`` keys as there), testing at ``test_scale``
    = (min_size_test, max_size_test) (None: the config's defaults)."""
    from detres.models.detection.faster_rcnn import FasterRCNN

    scale = {} if test_scale is None else {"min_size_test": test_scale[0], "max_size_test": test_scale[1]}
    return FasterRCNN.from_config(
        det_model_config(**model),
        input_cfg=det_input_config(**scale),
        num_classes=num_classes,
        frozen_bn=frozen_bn,
        class_agnostic_bbox=class_agnostic_bbox,
    )


def loc_model_config(**model: Any):
    """A ``task: loc`` config's ``model`` tree: the defaults with ``model`` merged in (nested dicts for ``rpn`` and
    ``rcnn``), validated as a YAML file would be."""
    from detres.config.load import config_from_tree

    return config_from_tree({"task": "loc", "model": model}, task="loc").model
