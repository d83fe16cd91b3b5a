"""A global-context detector (model.roi_heads.global_context=true) goes through train_det (joint and alternating),
--resume, test_det and infer exactly like a baseline one."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detres.data.image_io import read_image_rgb
from detres.engine.tasks.alternating import STEP_NAMES
from detres.inference.predictor import Predictor
from detres.models.build import load_detector
from detres.models.detection.context import ContextRoIHeads
from detres.utils.torch_files import load_checkpoint
from tests.tool_loader import load_tool

train_det, test_det, infer = load_tool("train_det"), load_tool("test_det"), load_tool("infer")


class _Capture:
    """Runs a main() with stdout/stderr captured (module-scoped fixtures cannot use capsys)."""

    def run(self, main, argv: list[str]) -> int:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained model's evaluation warns about classes without detections
            code = main(argv)
        self.out, self.err = out.getvalue(), err.getvalue()
        return code


def _config(det: Path, out: Path, path: Path, **solver) -> Path:
    """A CPU-test-sized context detector (quarter-width ResNet-18, ~128 px inputs, few RoIs) as a YAML file."""
    cfg = {
        "task": "det",
        "output_dir": str(out),
        "device": "cpu",
        "model": {
            "depth": 18,
            "base_width": 16,
            "freeze_at": 0,
            "anchor_sizes": [16, 32, 64],
            "rpn": {
                "pre_nms_top_n_train": 300,
                "post_nms_top_n_train": 50,
                "pre_nms_top_n_test": 300,
                "post_nms_top_n_test": 50,
                "batch_size_per_image": 64,
            },
            "roi_heads": {"batch_size_per_image": 16, "pooler_resolution": 8, "global_context": True},
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
            "warmup_iters": 0,
            **solver,
        },
        "test": {"vis_images": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _context_half(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sibling classifier's weights on the context half of its input."""
    weight = state["roi_heads.predictor.cls_score.weight"]
    return weight[:, weight.shape[1] // 2 :]


def _conv5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("roi_heads.box_head.") and v.is_floating_point()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_train_resume_test_and_infer_a_context_detector(small_det_world, tmp_path):
    cfg = _config(small_det_world, tmp_path / "run", tmp_path / "ctx.yaml")
    capture = _Capture()
    assert capture.run(train_det.main, ["--config", str(cfg)]) == 0, capture.err
    first = load_checkpoint(tmp_path / "run" / "model_final.pt")
    assert first["config"]["model"]["roi_heads"]["global_context"] is True
    model, _ = load_detector(tmp_path / "run" / "model_final.pt")
    assert isinstance(model.roi_heads, ContextRoIHeads)
    dim = model.roi_heads.box_head.out_features
    assert model.roi_heads.predictor.cls_score.in_features == 2 * dim

    # --resume to 4 iterations: continues from last.pt with the context model; its context layers keep training.
    assert capture.run(train_det.main, ["--config", str(cfg), "--resume", "solver.max_iter=4"]) == 0, capture.err
    summary = json.loads(capture.out)
    assert summary["iterations"] == 4
    final = load_checkpoint(tmp_path / "run" / "model_final.pt")
    assert final["config"]["model"]["roi_heads"]["global_context"] is True and final["iter"] == 4
    assert not torch.equal(_context_half(final["model"]), _context_half(first["model"]))
    assert _changed(_conv5(first["model"]), _conv5(final["model"]))

    # test_det rebuilds the context model from the checkpoint and reproduces the end-of-training numbers.
    assert (
        capture.run(
            test_det.main,
            [
                "--config",
                str(cfg),
                "--checkpoint",
                str(tmp_path / "run" / "model_final.pt"),
                "--out",
                str(tmp_path / "t"),
            ],
        )
        == 0
    ), capture.err
    assert json.loads(capture.out)["COCO"] == pytest.approx(summary["COCO"])

    # infer: the same detections as the Predictor (a context model too) on each image.
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("val_000001.png", "val_000002.png"):
        (folder / name).write_bytes((small_det_world / "images" / name).read_bytes())
    assert (
        capture.run(
            infer.main,
            [
                "--checkpoint",
                str(tmp_path / "run" / "model_final.pt"),
                "--input",
                str(folder),
                "--out",
                str(tmp_path / "o"),
                "--score-thresh",
                "0.0",
                "--device",
                "cpu",
            ],
        )
        == 0
    ), capture.err
    result = json.loads((tmp_path / "o" / "detections.json").read_text())
    predictor = Predictor(tmp_path / "run" / "model_final.pt")
    assert isinstance(predictor.model.roi_heads, ContextRoIHeads)
    total = 0
    for record in result["images"]:
        expected = predictor.predict(read_image_rgb(record["file"]))
        np.testing.assert_allclose(np.asarray(record["boxes"]).reshape(-1, 4), expected["boxes"], atol=1e-4)
        np.testing.assert_allclose(record["scores"], expected["scores"], atol=1e-6)
        total += len(record["scores"])
    assert total > 0


def test_alternating_training_trains_the_context_branch_in_the_fast_rcnn_steps(small_det_world, tmp_path):
    cfg = _config(
        small_det_world,
        tmp_path / "run",
        tmp_path / "alt.yaml",
        training_scheme="alternating",
        alternating_iters=[2, 2, 2, 2],
        alternating_images_per_batch=[1, 2, 1, 2],
        checkpoint_period=100,
    )
    capture = _Capture()
    assert capture.run(train_det.main, ["--config", str(cfg)]) == 0, capture.err
    steps = [load_checkpoint(tmp_path / "run" / f"{name}.pt") for name in STEP_NAMES]
    assert all(s["config"]["model"]["roi_heads"]["global_context"] is True for s in steps)
    s1, s2, s3, s4 = (s["model"] for s in steps)
    # Step 3 trains only the RPN: the context layers are untouched; step 4 (Fast R-CNN) trains them and conv5.
    assert torch.equal(_context_half(s3), _context_half(s2)) and not _changed(_conv5(s2), _conv5(s3))
    assert not torch.equal(_context_half(s4), _context_half(s3)) and _changed(_conv5(s3), _conv5(s4))
    model, _ = load_detector(tmp_path / "run" / "model_final.pt")
    assert isinstance(model.roi_heads, ContextRoIHeads)
