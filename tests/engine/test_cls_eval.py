"""Tests for detres/engine/cls_eval.py and tools/eval_cls.py: any checkpoint format evaluated on an ImageFolder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from detres.config.load import load_config
from detres.data.cls_pipeline import ClsDataStats, build_eval_transform
from detres.data.datasets.imagefolder import ImageFolderDataset
from detres.data.shapes.world import generate_shapes_world
from detres.data.transforms.classification import (
    Normalize,
    eval_transform_for_mode,
)
from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from detres.engine.cls_eval import evaluate_checkpoint, infer_resnet_layout, load_classifier
from detres.engine.tasks.classification import train_classifier
from detres.evaluation.classification import evaluate_classifier
from detres.models.backbones.weights import StateDictMismatchError
from detres.models.build import build_classifier
from detres.utils.torch_files import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "eval_cls.py"
SHARED = ROOT / ".." / "shared" / "data"
CIFAR_R20 = SHARED / "resnet_cifar_weights" / "pretrained_models" / "resnet20-12fca82f.th"
CIFAR_TEST = SHARED / "cifar10" / "test"
needs_cifar = pytest.mark.skipif(
    not (CIFAR_R20.is_file() and CIFAR_TEST.is_dir()), reason=f"shared CIFAR-10 data/weights not found under {SHARED}"
)


def run_tool(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny train_cls run: (checkpoint, val folder, metrics)."""
    root = tmp_path_factory.mktemp("evalworld")
    generate_shapes_world(
        root,
        seed=3,
        num_cls_train_per_class=2,
        num_cls_val_per_class=2,
        cls_size=(40, 48),
        num_det_train=0,
        num_det_val=0,
        num_loc_train=0,
        num_loc_val=0,
    )
    out = root / "run"
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "device=cpu",
            f"data.train_dir={root / 'cls' / 'train'}",
            f"data.val_dir={root / 'cls' / 'val'}",
            "data.num_workers=0",
            "model.arch=cifar",
            "model.depth=8",
            "model.shortcut=A",
            "augment.scale_min=34",
            "augment.scale_max=40",
            "augment.crop=32",
            "test.resize=36",
            "test.scales=[32, 44]",
            "solver.batch_size=5",
            "solver.max_iter=3",
            "solver.log_period=1",
        ],
        task="cls",
    )
    metrics = train_classifier(cfg)
    return out / "model_final.pt", root / "cls" / "val", metrics


def test_train_cls_checkpoint_gives_what_the_trainer_and_evaluate_classifier_give(trained):
    checkpoint, val_dir, metrics = trained
    report = evaluate_checkpoint(checkpoint, val_dir, modes=("1crop", "10crop", "multiscale"), batch_size=7)
    assert report["format"] == "detres" and report["normalize"] == "checkpoint" and report["bn_recomputed"]
    assert report["geometry"] == {"resize": 36, "crop": 32, "scales": [32, 44], "train_crop": 32}
    for mode in ("1crop", "10crop", "multiscale"):
        got, want = report["results"][mode], metrics["after_bn_recompute"][mode]
        assert (got["top1_err"], got["top5_err"], got["n"]) == (want["top1_err"], want["top5_err"], want["n"])
        assert got["top1_acc"] == pytest.approx(1 - want["top1_err"])
    # Directly: the same model and transforms through evaluate_classifier.
    state = load_checkpoint(checkpoint)
    model = build_classifier(**state["model_args"])
    model.load_state_dict(state["model"])
    stats = ClsDataStats.from_dict(state["data_stats"])
    cfg = load_config(checkpoint.parent / "config.yaml")  # the resolved config the run wrote
    dataset = ImageFolderDataset(val_dir, transform=build_eval_transform(cfg, stats, "1crop"))
    direct = evaluate_classifier(model, dataset, mode="1crop", batch_size=3)
    assert direct == {k: report["results"]["1crop"][k] for k in direct}


def test_flat_val_folder_with_labels_file_gives_the_folder_numbers(trained, tmp_path):
    checkpoint, val_dir, _ = trained
    flat = tmp_path / "images"
    flat.mkdir()
    lines = ["# a comment-like line is just an unknown class", ""]
    for i, path in enumerate(sorted(val_dir.glob("*/*.png"))):
        (flat / f"v{i}.png").write_bytes(path.read_bytes())
        lines.append(f"v{i}.png {path.parent.name} 1 2 3 4")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    modes = ("1crop", "10crop", "multiscale")
    folder = evaluate_checkpoint(checkpoint, val_dir, modes=modes, batch_size=7)
    with pytest.warns(UserWarning, match=r"skipped 1 of \d+ images"):
        listed = evaluate_checkpoint(checkpoint, flat, val_labels=labels, modes=modes, batch_size=5)
    assert listed["num_images"] == folder["num_images"] == len(lines) - 2
    assert listed["val_skipped_unknown_class"] == 1 and listed["val_labels"] == str(labels)
    assert listed["results"] == folder["results"]
    # The CLI: --val-labels, and the skipped count is printed.
    out = tmp_path / "r.json"
    proc = run_tool("--checkpoint", checkpoint, "--data", flat, "--val-labels", labels, "--json-out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 images" in proc.stdout
    assert json.loads(out.read_text())["results"]["1crop"] == folder["results"]["1crop"]
    bad = tmp_path / "bad.txt"
    bad.write_text("v0.png\n")
    proc = run_tool("--checkpoint", checkpoint, "--data", flat, "--val-labels", bad, cwd=tmp_path)
    assert proc.returncode == 2 and f"eval_cls: error: {bad}:1: expected" in proc.stderr


def test_arch_or_depth_that_contradicts_the_checkpoint_is_an_error(trained):
    checkpoint, val_dir, _ = trained
    with pytest.raises(ValueError, match="depth=14 was given but the checkpoint holds depth=8"):
        load_classifier(checkpoint, depth=14)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_classifier(checkpoint.parent / "missing.pt")
    with pytest.raises(ValueError, match="no data statistics"):
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), checkpoint.parent / "tv.pth")
        evaluate_checkpoint(checkpoint.parent / "tv.pth", val_dir, normalize="checkpoint")


def test_torchvision_state_dict_matches_the_torchvision_model(tmp_path, trained):
    _, val_dir, _ = trained
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mis-loaded buffer would show
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    assert infer_resnet_layout(reference.state_dict()) == {"arch": "imagenet", "depth": 18, "shortcut": "B"}
    assert infer_resnet_layout(torchvision.models.resnet50().state_dict())["depth"] == 50
    loaded = load_classifier(path)  # arch/depth inferred from the keys
    assert loaded.format == "state_dict" and loaded.model_args["depth"] == 18
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), atol=1e-5, rtol=1e-5)
    report = evaluate_checkpoint(path, val_dir, resize=36, crop=32, batch_size=8)
    assert report["normalize"] == "imagenet"
    norm = Normalize(mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)
    dataset = ImageFolderDataset(
        val_dir, transform=eval_transform_for_mode("1crop", normalize=norm, resize=36, crop=32)
    )
    direct = evaluate_classifier(reference, dataset, mode="1crop", batch_size=8)
    assert direct["top1_err"] == report["results"]["1crop"]["top1_err"]
    with pytest.raises(StateDictMismatchError, match=r"missing keys .*layer1\.0\.conv3\.weight"):
        load_classifier(path, arch="imagenet", depth=50)


@needs_cifar
def test_legacy_cifar_resnet20_on_300_test_images(tmp_path):
    out = tmp_path / "r20.json"
    proc = run_tool(
        "--checkpoint",
        CIFAR_R20,
        "--data",
        CIFAR_TEST,
        "--arch",
        "cifar",
        "--depth",
        "20",
        "--normalize",
        "imagenet",
        "--max-per-class",
        "30",
        "--json-out",
        out,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["format"] == "cifar_legacy" and report["num_images"] == 300
    # Measured on these 300 images (30 per class): 244 right at top-1, 2 wrong at top-5. A colour-order
    # (BGR) or normalisation slip changes these counts (BGR input scores about 72%).
    one = report["results"]["1crop"]
    assert one["n"] == 300 and one["top5_k"] == 5
    assert one["top1_acc"] == pytest.approx(244 / 300) and one["top5_err"] == pytest.approx(2 / 300)
    assert report["best_prec1"] == pytest.approx(91.78, abs=0.01)
    assert "1crop: top-1 acc" in proc.stdout


@needs_cifar
def test_legacy_cifar_resnet20_dense_at_32px_is_the_1crop_test():
    # Trained on 32 px crops: at scale 32 the 8x8 map is exactly one training-size window, so the dense
    # test is the net's own 1-crop forward (the old per-position average scored lower).
    report = evaluate_checkpoint(
        CIFAR_R20,
        CIFAR_TEST,
        arch="cifar",
        depth=20,
        normalize="imagenet",
        modes=("1crop", "multiscale"),
        scales=[32],
        max_per_class=30,
        batch_size=100,
    )
    assert report["geometry"]["train_crop"] == 32
    one, dense = report["results"]["1crop"], report["results"]["multiscale"]
    assert (dense["top1_err"], dense["top5_err"], dense["n"]) == (one["top1_err"], one["top5_err"], one["n"])


def _tool_main():
    spec = importlib.util.spec_from_file_location("eval_cls_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@needs_cifar
def test_cli_depth_mismatch_lists_the_keys_without_a_traceback(tmp_path, capsys):
    main = _tool_main()
    code = main(["--checkpoint", str(CIFAR_R20), "--data", str(CIFAR_TEST), "--depth", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("eval_cls: error: ") and "does not match CifarResNet key-for-key" in err
    assert "layer1.3.conv1.weight" in err and "Traceback" not in err
    code = main(["--checkpoint", str(tmp_path / "nope.th"), "--data", str(CIFAR_TEST)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"eval_cls: error: checkpoint not found: {tmp_path / 'nope.th'}"
