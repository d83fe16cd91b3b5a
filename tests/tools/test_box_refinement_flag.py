"""tools/test_det.py and tools/infer.py: --box-refinement (and test.box_refinement) reach the refinement path."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detres.data.synthetic import generate_shapes_world
from detres.inference.visualize import write_png
from detres.models.build import build_detector
from detres.utils.checkpoint import save_checkpoint

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_refine_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_det, infer = _tool("test_det"), _tool("infer")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refine_world")
    generate_shapes_world(root, num_cls_train_per_class=0, num_cls_val_per_class=0, num_det_train=1, num_det_val=1,
                          num_loc_train=0, num_loc_val=0, det_size=(64, 96))
    return root / "det"


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory) -> Path:
    categories = json.loads((world / "annotations" / "instances_val.json").read_text())["categories"]
    names = [c["name"] for c in categories]
    ids = {c["name"]: c["id"] for c in categories}
    torch.manual_seed(0)
    args = dict(depth=18, base_width=16, num_classes=len(names), anchor_sizes=[16, 32], aspect_ratios=[1.0],
                rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, pooler_resolution=8, score_thresh=0.0)
    model = build_detector(**args)
    path = tmp_path_factory.mktemp("refine_ckpt") / "det.pt"
    meta = {"class_names": sorted(names), "min_size_test": 64, "max_size_test": 96,
            "label_to_category_id": {i + 1: ids[name] for i, name in enumerate(sorted(names))}}
    save_checkpoint(path, {"model": model.state_dict(), "model_args": dict(args, weights_path=None), "meta": meta,
                           "iter": 0})
    return path


def _spy(monkeypatch) -> list[int]:
    """Count the images detect_batch sends through box refinement."""
    import detres.inference.detect as detect

    calls: list[int] = []
    real = detect.detect_with_refinement

    def spy(model, images, image_sizes=None, **kwargs):
        calls.append(len(image_sizes))
        return real(model, images, image_sizes, **kwargs)

    monkeypatch.setattr(detect, "detect_with_refinement", spy)
    return calls


def test_infer_box_refinement_flag(checkpoint, tmp_path, monkeypatch, capsys):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    write_png(image, np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    calls = _spy(monkeypatch)
    base = ["--checkpoint", str(checkpoint), "--input", str(image), "--score-thresh", "0", "--device", "cpu"]
    assert infer.main([*base, "--out", str(tmp_path / "o1")]) == 0
    assert calls == []  # off by default
    assert infer.main([*base, "--out", str(tmp_path / "o2"), "--box-refinement"]) == 0, capsys.readouterr().err
    assert calls == [1]
    out = json.loads((tmp_path / "o2" / "detections.json").read_text())["images"][0]
    assert len(out["scores"]) > 0 and all(0 <= b[0] <= b[2] <= 96 and 0 <= b[1] <= b[3] <= 64 for b in out["boxes"])


def test_test_det_box_refinement_flag_and_config(world, checkpoint, tmp_path, monkeypatch, capsys):
    cfg = {"task": "det", "output_dir": str(tmp_path / "run"), "device": "cpu",
           "data": {"format": "coco", "val_images": str(world / "images"),
                    "val_ann": str(world / "annotations" / "instances_val.json"), "num_workers": 0},
           "input": {"min_size_test": 64, "max_size_test": 96}, "test": {"vis_images": 0}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    calls = _spy(monkeypatch)
    argv = ["--config", str(path), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "t")]
    assert test_det.main(argv) == 0, capsys.readouterr().err
    assert calls == []  # the default config: off
    assert test_det.main([*argv, "--box-refinement"]) == 0
    assert calls == [1]
    assert (tmp_path / "t" / "metrics.json").is_file()
    # The config switch alone, and --no-box-refinement overriding it.
    assert test_det.main([*argv, "test.box_refinement=true"]) == 0
    assert calls == [1, 1]
    assert test_det.main([*argv, "--no-box-refinement", "test.box_refinement=true"]) == 0
    assert calls == [1, 1]
