"""tools/test_det.py and tools/infer.py: --box-refinement (and test.box_refinement) reach the refinement path."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from detres.inference.visualize import write_png

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_refine_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_det, infer = _tool("test_det"), _tool("infer")


@pytest.fixture
def world(tiny_det_world) -> Path:
    return tiny_det_world


@pytest.fixture
def checkpoint(tiny_det_checkpoint) -> Path:
    return tiny_det_checkpoint


def _spy(monkeypatch) -> list[int]:
    """Count the images detect_batch sends through box refinement (the Appendix-B pipeline with it on)."""
    import detres.inference.detect as detect

    calls: list[int] = []
    real = detect.detect_test_time

    def spy(models, images, image_sizes=None, *, options):
        if options.box_refinement:
            calls.append(len(image_sizes))
        return real(models, images, image_sizes, options=options)

    monkeypatch.setattr(detect, "detect_test_time", spy)
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
    assert sum(calls) == 3  # every val image
    assert (tmp_path / "t" / "metrics.json").is_file()
    # The config switch alone, and --no-box-refinement overriding it.
    assert test_det.main([*argv, "test.box_refinement=true"]) == 0
    assert sum(calls) == 6
    assert test_det.main([*argv, "--no-box-refinement", "test.box_refinement=true"]) == 0
    assert sum(calls) == 6
