"""tools/test_det.py and tools/infer.py: --nms-method / --soft-nms-* / --box-voting override the checkpoint's post-
processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from detres.inference.visualize import write_png
from tests.tool_loader import load_tool

test_det, infer = load_tool("test_det"), load_tool("infer")


@pytest.fixture
def world(tiny_det_world) -> Path:
    return tiny_det_world


@pytest.fixture
def checkpoint(tiny_det_checkpoint) -> Path:
    """An untrained tiny detector saved as train_det would (model.roi_heads.box_voting on in its config)."""
    return tiny_det_checkpoint


def _spy(monkeypatch) -> list[dict]:
    """Record the settings of every post-processing the RoI heads run."""
    import dataclasses

    from detres.models.detection.postprocess import DetectionPostprocess

    calls: list[dict] = []
    real = DetectionPostprocess.__call__

    def spy(self, *args, **kwargs):
        calls.append(dataclasses.asdict(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DetectionPostprocess, "__call__", spy)
    return calls


def test_infer_flags_override_the_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    write_png(image, np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    calls = _spy(monkeypatch)
    base = ["--checkpoint", str(checkpoint), "--input", str(image), "--score-thresh", "0", "--device", "cpu"]
    assert infer.main([*base, "--out", str(tmp_path / "o1")]) == 0
    # No flags: the checkpoint's own setting (voting on, hard NMS).
    assert calls[-1]["voting"] is True and calls[-1]["nms_method"] == "nms"
    code = infer.main(
        [
            *base,
            "--out",
            str(tmp_path / "o2"),
            "--no-box-voting",
            "--nms-method",
            "soft_gaussian",
            "--soft-nms-sigma",
            "0.25",
            "--soft-nms-score-thresh",
            "0.01",
            "--box-voting-iou",
            "0.7",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert {
        k: calls[-1][k] for k in ("voting", "nms_method", "soft_nms_sigma", "soft_nms_score_thresh", "voting_iou")
    } == {
        "voting": False,
        "nms_method": "soft_gaussian",
        "soft_nms_sigma": 0.25,
        "soft_nms_score_thresh": 0.01,
        "voting_iou": 0.7,
    }
    # A bad value is a one-line error with exit status 2.
    assert infer.main([*base, "--out", str(tmp_path / "o3"), "--soft-nms-sigma", "0"]) == 2
    assert "soft_nms_sigma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main([*base, "--nms-method", "greedy"])


def test_test_det_flags_reach_the_evaluated_model(world, checkpoint, tmp_path, monkeypatch, capsys):
    cfg = {
        "task": "det",
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "data": {
            "format": "coco",
            "val_images": str(world / "images"),
            "val_ann": str(world / "annotations" / "instances_val.json"),
            "num_workers": 0,
        },
        "input": {"min_size_test": 64, "max_size_test": 96},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seen = []

    def fake_test_detector(models, dataset, meta, cfg, *, out_dir, device, options):
        post = options.postprocess_of(models[0].roi_heads.postprocess)  # what TestTimeAugmentation runs
        seen.append((post.nms_method, post.voting, post.voting_iou))
        return {"coco": {"summary": [0.0] * 12}, "voc": {"mAP": 0.0, "per_class": {}}}

    monkeypatch.setattr(test_det, "test_detector", fake_test_detector)
    argv = ["--config", str(path), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "t")]
    assert test_det.main(argv) == 0
    assert test_det.main([*argv, "--nms-method", "soft_linear", "--no-box-voting"]) == 0
    assert test_det.main([*argv, "--box-voting-iou", "0.6"]) == 0
    assert seen == [("nms", True, 0.5), ("soft_linear", False, 0.5), ("nms", True, 0.6)]
    assert test_det.main([*argv, "--box-voting-iou", "-1"]) == 2
    assert "--box-voting-iou" in capsys.readouterr().err
