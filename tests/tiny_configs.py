"""Config dicts for tool tests: a quarter-width ResNet-18 detector on ~128 px shapes-world images (CPU-test sized)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_train_det_config(det: Path, output_dir: Path | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A det config training on ``det``'s COCO train split and testing on its val split; each keyword is a
    top-level section whose keys override the defaults here (``solver={"max_iter": 20}``)."""
    cfg: dict[str, Any] = {
        "task": "det", "device": "cpu",
        "model": {"depth": 18, "base_width": 16, "anchor_sizes": [16, 32, 64],
                  "rpn": {"pre_nms_top_n_train": 300, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 300,
                          "post_nms_top_n_test": 50, "batch_size_per_image": 64},
                  "roi_heads": {"batch_size_per_image": 16, "pooler_resolution": 8}},
        "data": {"format": "coco", "train_images": str(det / "images"),
                 "train_ann": str(det / "annotations" / "instances_train.json"), "val_images": str(det / "images"),
                 "val_ann": str(det / "annotations" / "instances_val.json"), "num_workers": 0},
        "input": {"min_size_train": [128], "max_size_train": 192, "min_size_test": 128, "max_size_test": 192},
        "solver": {"images_per_batch": 2, "base_lr": 0.005, "max_iter": 2, "steps": [], "eval_period": 0,
                   "checkpoint_period": 2, "log_period": 1},
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
