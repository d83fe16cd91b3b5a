"""Tests for VGG-16 and AlexNet as train_cls models: config → model, tiny runs, checkpoint rebuild, clear errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from detres.config.load import load_config
from detres.data.shapes.world import generate_shapes_world
from detres.engine.cls_eval import evaluate_checkpoint, load_classifier
from detres.engine.logging import read_json_lines
from detres.engine.tasks.classification import train_classifier
from detres.models.backbones.alexnet import AlexNet
from detres.models.backbones.vgg import VGG
from detres.models.build import build_classifier, classifier_kwargs_from_config
from detres.utils.torch_files import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
NO_DET = dict(num_det_train=0, num_det_val=0, num_loc_train=0, num_loc_val=0)
MODES = ("1crop", "10crop", "multiscale")


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tool_main():
    spec = importlib.util.spec_from_file_location("train_cls_tool", ROOT / "tools" / "train_cls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """10 classes x 2 training / 1 validation images, all 64x64."""
    root = tmp_path_factory.mktemp("archs")
    generate_shapes_world(root, seed=3, num_cls_train_per_class=2, num_cls_val_per_class=1, cls_size=(64, 64), **NO_DET)
    return root / "cls"


def _overrides(data: Path, out: Path, size: int) -> list[str]:
    return [
        f"output_dir={out}",
        "device=cpu",
        f"data.train_dir={data / 'train'}",
        f"data.val_dir={data / 'val'}",
        "data.num_workers=0",
        f"augment.scale_min={size}",
        f"augment.scale_max={size + 8}",
        f"augment.crop={size}",
        f"test.resize={size}",
        f"test.scales=[{size}, {size + 16}]",
        "test.batch_size=10",
        "solver.batch_size=4",
        "solver.base_lr=0.001",
        "solver.max_iter=2",
        "solver.log_period=1",
        "solver.eval_period=1000",
        "solver.checkpoint_period=1000",
        "bn_recompute.enabled=false",
    ]


def test_paper_configs_build_the_paper_nets():
    alex = load_config(ROOT / "configs/cls/alexnet_imagenet.yaml")
    assert (alex.solver.batch_size, alex.solver.base_lr, alex.solver.momentum, alex.solver.weight_decay) == (
        128,
        0.01,
        0.9,
        0.0005,
    )
    assert (alex.augment.scale_min, alex.augment.scale_max, alex.augment.crop) == (256, 256, 224)
    args = classifier_kwargs_from_config(alex.model, num_classes=1000)
    assert args == {"arch": "alexnet", "depth": 8, "num_classes": 1000, "dropout": 0.5, "groups": 1}
    assert _count(build_classifier(**args)) == 62_378_344  # see tests/models/test_alexnet.py
    vgg = load_config(ROOT / "configs/cls/vgg16_imagenet.yaml")
    assert (vgg.solver.batch_size, vgg.solver.base_lr, vgg.solver.weight_decay) == (256, 0.01, 0.0005)
    args = classifier_kwargs_from_config(vgg.model, num_classes=1000)
    assert args == {"arch": "vgg16", "depth": 16, "num_classes": 1000, "dropout": 0.5, "batch_norm": False}
    assert _count(build_classifier(**args)) == 138_357_544  # torchvision's vgg16
    two_gpu = load_config(ROOT / "configs/cls/alexnet_imagenet.yaml", ["model.groups=2", "model.dropout=0.3"])
    net = build_classifier(**classifier_kwargs_from_config(two_gpu.model, num_classes=5))
    assert net.groups == 2 and net.classifier[2].p == 0.3 and net.fc.out_features == 5
    with pytest.raises(ValueError, match="depth 16"):
        build_classifier(arch="vgg16", depth=19)


def test_alexnet_trains_through_the_tool_and_its_checkpoint_rebuilds(world, tmp_path, capsys):
    out = tmp_path / "alexnet"
    # any cls config + model.arch=alexnet; 64-px crops (AlexNet's minimum is 63)
    argv = ["--config", str(ROOT / "configs/cls/shapes_r18.yaml"), *_overrides(world, out, 64), "model.arch=alexnet"]
    assert tool_main()(argv) == 0, capsys.readouterr().err
    losses = [r["loss"] for r in read_json_lines(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    state = load_checkpoint(out / "model_final.pt")
    assert state["model_args"] == {"arch": "alexnet", "depth": 8, "num_classes": 10, "dropout": 0.5, "groups": 1}
    assert state["bn_recomputed"] is False
    loaded = load_classifier(out / "model_final.pt")
    assert isinstance(loaded.model, AlexNet)
    for key, value in state["model"].items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    result = evaluate_checkpoint(out / "model_final.pt", world / "val", modes=MODES)
    assert set(result["results"]) == set(MODES) and result["num_images"] == 10
    # at the training size (one window) the dense test is the 1-crop test
    one = evaluate_checkpoint(
        out / "model_final.pt", world / "val", modes=("1crop", "multiscale"), scales=[64], resize=None, crop=64
    )
    assert one["results"]["multiscale"]["top1_err"] == one["results"]["1crop"]["top1_err"]


def test_vgg16_trains_on_32_pixel_crops(world, tmp_path):
    out = tmp_path / "vgg"
    cfg = load_config(None, _overrides(world, out, 32) + ["model.arch=vgg16"], task="cls")
    metrics = train_classifier(cfg)
    assert set(metrics["final"]) == set(MODES)
    assert metrics["model_args"]["arch"] == "vgg16"
    loaded = load_classifier(out / "model_final.pt")
    assert isinstance(loaded.model, VGG) and loaded.model.fc.out_features == 10


def test_clear_errors_before_training(world, tmp_path, capsys):
    main = tool_main()
    base = ["--config", str(ROOT / "configs/cls/shapes_r18.yaml")]
    assert main(base + _overrides(world, tmp_path / "a", 32) + ["model.arch=alexnet"]) == 2
    assert "AlexNet needs inputs of at least 63x63 pixels, got 32x32" in capsys.readouterr().err
    assert main(base + _overrides(world, tmp_path / "b", 64) + ["model.arch=alexnet", "bn_recompute.enabled=true"]) == 2
    err = capsys.readouterr().err
    assert "model.arch=alexnet has no BatchNorm layers: set bn_recompute.enabled=false" in err
    assert not (tmp_path / "b" / "last.pt").exists()
