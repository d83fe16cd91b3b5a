"""Tests for detres/engine/tasks/classification.py: outputs of a run, precise BN, exact resume, plateau LR drops."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detres.config.load import load_config
from detres.data.image_io import ImageReadError
from detres.data.shapes.world import generate_shapes_world
from detres.engine.logging import read_json_lines
from detres.engine.tasks.classification import train_classifier
from detres.models.build import build_classifier
from detres.utils.torch_files import load_checkpoint

NO_DET = dict(num_det_train=0, num_det_val=0, num_loc_train=0, num_loc_val=0)


@pytest.fixture(scope="module")
def square_world(tmp_path_factory) -> Path:
    """10 classes x 3 training / 2 validation images, all exactly 32x32."""
    root = tmp_path_factory.mktemp("square")
    generate_shapes_world(root, seed=1, num_cls_train_per_class=3, num_cls_val_per_class=2, cls_size=(32, 32), **NO_DET)
    return root / "cls"


@pytest.fixture(scope="module")
def varied_world(tmp_path_factory) -> Path:
    """10 classes x 3 training / 1 validation images of 40..48 pixels."""
    root = tmp_path_factory.mktemp("varied")
    generate_shapes_world(root, seed=2, num_cls_train_per_class=3, num_cls_val_per_class=1, cls_size=(40, 48), **NO_DET)
    return root / "cls"


def _cfg(data: Path, out: Path, *overrides: str):
    base = [
        f"output_dir={out}",
        "device=cpu",
        f"data.train_dir={data / 'train'}",
        f"data.val_dir={data / 'val'}",
        "data.num_workers=0",
        "model.arch=cifar",
        "model.depth=8",
        "model.shortcut=A",
        "augment.scale_min=32",
        "augment.scale_max=40",
        "augment.crop=32",
        "test.resize=32",
        "test.scales=[32, 40]",
        "test.batch_size=8",
        "solver.batch_size=4",
        "solver.base_lr=0.02",
        "solver.log_period=1",
        "solver.eval_period=1000",
        "solver.checkpoint_period=1000",
        "bn_recompute.batch_size=7",
    ]
    return load_config(None, base + list(overrides), task="cls")


def _losses(out: Path) -> dict[int, tuple[float, float]]:
    return {r["iter"]: (r["loss"], r["lr"]) for r in read_json_lines(out / "metrics.jsonl") if "loss" in r}


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float64)


def _plain_torch_errors(state: dict, val_dir: Path) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 error of a saved model on 32x32 validation images, recomputed with plain torch:
    1-crop = the image minus the per-pixel mean image; 10-crop = the 5 crops of a 32 crop from a 32 image
    are the image itself, the other 5 its mirror (mean image subtracted after flipping), softmax averaged;
    multi-scale (32, 40) = per-channel mean, an 8x8 feature window at 32 px (one window) and every 8x8
    window of the 10x10 map at 40 px (bilinear enlargement), softmax averaged over windows, then scales."""
    model = build_classifier(**state["model_args"])
    model.load_state_dict(state["model"])
    model.eval()
    stats = state["data_stats"]
    assert stats["std"] is None and stats["mean_mode"] == "per_pixel" and stats["fixed_mean"] is None
    mean_image = stats["mean_image"].numpy()
    channel_mean = stats["channel_mean"].numpy()

    def chw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()[None]

    def dense(view: torch.Tensor) -> torch.Tensor:
        f = model.forward_features(view)[0]
        k = 8
        return torch.stack(
            [
                model.fc(f[:, i : i + k, j : j + k].mean(dim=(1, 2))).softmax(dim=0)
                for i in range(f.shape[1] - k + 1)
                for j in range(f.shape[2] - k + 1)
            ]
        ).mean(dim=0)

    class_names = state["class_names"]
    probs: dict[str, list[torch.Tensor]] = {"1crop": [], "10crop": [], "multiscale": []}
    labels = []
    with torch.no_grad():
        for path in sorted(val_dir.glob("*/*.png")):
            labels.append(class_names.index(path.parent.name))
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            assert rgb.shape == (32, 32, 3)
            img = rgb.astype(np.float32)
            probs["1crop"].append(model(chw(img - mean_image))[0].softmax(dim=0))
            pair = torch.cat([chw(img - mean_image), chw(img[:, ::-1] - mean_image)])
            probs["10crop"].append(model(pair).softmax(dim=1).mean(dim=0))
            big = cv2.resize(rgb, (40, 40), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            probs["multiscale"].append((dense(chw(img - channel_mean)) + dense(chw(big - channel_mean))) / 2)
    t = torch.tensor(labels)
    out = {}
    for mode, p in probs.items():
        p = torch.stack(p)
        top = p.topk(6, dim=1)
        # no near-ties at the top-1 or top-5 cut, so the reference is well posed
        assert (top.values[:, 0] / top.values[:, 1]).min() > 1.0001, mode
        assert (top.values[:, 4] / top.values[:, 5]).min() > 1.0001, mode
        n = len(labels)
        out[mode] = {
            "top1_err": 1.0 - int((top.indices[:, 0] == t).sum()) / n,
            "top5_err": 1.0 - int((top.indices[:, :5] == t[:, None]).any(dim=1).sum()) / n,
            "n": n,
        }
    return out


def test_a_run_writes_everything_and_recomputes_bn_over_the_whole_training_set(square_world, tmp_path):
    out = tmp_path / "run"
    # Deterministic inputs (32x32 images, scale 32, crop 32, no flip, no colour noise) so the BN
    # statistics can be checked against an independent computation.
    cfg = _cfg(
        square_world,
        out,
        "augment.scale_max=32",
        "augment.flip=false",
        "augment.color_pca=false",
        "solver.max_iter=6",
        "solver.eval_period=3",
    )
    metrics = train_classifier(cfg)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "last.pt", "model_final.pt"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # before = the model of last.pt (saved at the last iteration), after = model_final.pt
    final, last = load_checkpoint(out / "model_final.pt"), load_checkpoint(out / "last.pt")
    for stage, state in (("before_bn_recompute", last), ("after_bn_recompute", final)):
        assert set(metrics[stage]) == {"1crop", "10crop", "multiscale"}
        ref = _plain_torch_errors(state, square_world / "val")
        for mode, result in metrics[stage].items():
            assert result["n"] == 20 and result["top5_k"] == 5, (stage, mode)
            assert result["top1_err"] == pytest.approx(ref[mode]["top1_err"], abs=1e-9), (stage, mode)
            assert result["top5_err"] == pytest.approx(ref[mode]["top5_err"], abs=1e-9), (stage, mode)
    records = read_json_lines(out / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in records if "val_top1_err" in r] == [3, 6]

    assert final["bn_recomputed"] is True and last["bn_recomputed"] is False and final["iter"] == 6
    # Independent statistics of bn1's input: conv1 over all 30 mean-subtracted training images
    # (30 = 4 batches of 7 + 2, so a dropped last batch would change them).
    paths = sorted((square_world / "train").glob("*/*.png"))
    assert len(paths) == 30
    images = np.stack([_read_rgb(p) for p in paths])
    x = torch.from_numpy((images - images.mean(axis=0)).transpose(0, 3, 1, 2))
    y = F.conv2d(x, final["model"]["conv1.weight"].double(), padding=1)
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(final["model"]["bn1.running_mean"].double(), mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final["model"]["bn1.running_var"].double(), var, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(last["model"]["bn1.running_var"].double(), var, rtol=1e-2)  # momentum averages differ

    with pytest.raises(FileExistsError, match="last.pt exists"):
        train_classifier(cfg)


@pytest.mark.parametrize("stop_at", [7, 3], ids=["epoch-boundary", "mid-epoch"])
def test_resume_reproduces_the_uninterrupted_losses(varied_world, tmp_path, stop_at):
    # 30 images / batch 4 = 7 iterations per epoch; 14 iterations cross an epoch and an LR step,
    # with the full augmentation (random scale, crop, flip, PCA colour noise).
    common = ["solver.lr_schedule=step", "solver.steps=[10]", "test.modes=[1crop]", "bn_recompute.enabled=false"]
    straight = tmp_path / "straight"
    train_classifier(_cfg(varied_world, straight, *common, "solver.max_iter=14", "data.num_workers=1"))
    resumed = tmp_path / "resumed"
    train_classifier(_cfg(varied_world, resumed, *common, f"solver.max_iter={stop_at}"))
    assert load_checkpoint(resumed / "last.pt")["iter"] == stop_at
    train_classifier(_cfg(varied_world, resumed, *common, "solver.max_iter=14"), resume=True)

    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    for it in expected:
        assert got[it][0] == pytest.approx(expected[it][0], abs=1e-6), f"iteration {it}"
        assert got[it][1] == expected[it][1]
    assert expected[10][1] == pytest.approx(0.02) and expected[11][1] == pytest.approx(0.002)
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(resumed / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_plateau_schedule_drops_the_lr_when_validation_error_stalls(varied_world, tmp_path):
    out = tmp_path / "plateau"
    # A threshold no error change can beat: after the first validation nothing counts as improving.
    cfg = _cfg(
        varied_world,
        out,
        "solver.lr_schedule=plateau",
        "solver.base_lr=0.001",
        "solver.plateau_patience=2",
        "solver.plateau_threshold=1.0",
        "solver.eval_period=1",
        "solver.max_iter=6",
        "test.modes=[1crop]",
        "bn_recompute.enabled=false",
    )
    train_classifier(cfg)
    records = read_json_lines(out / "metrics.jsonl")
    dropped = [r["iter"] for r in records if r.get("lr_dropped")]
    assert dropped == [3, 5]
    lrs = [lr for _, (_, lr) in sorted(_losses(out).items())]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert load_checkpoint(out / "last.pt")["schedule"]["plateau_drops"] == 2


def test_a_corrupt_image_met_in_a_loader_worker_is_named_in_one_line(tmp_path):
    train, val = tmp_path / "data" / "train", tmp_path / "data" / "val"
    rng = np.random.default_rng(0)
    for split, n in ((train, 4), (val, 2)):
        for cls in ("a", "b"):
            (split / cls).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(split / cls / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    bad = train / "b" / "9.png"
    # Cut short after a valid header: the up-front header check (data/validate.py) passes, decoding fails.
    bad.write_bytes(cv2.imencode(".png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[1].tobytes()[:1500])
    # The statistics read every training image first (main process): clean error before training.
    with pytest.raises(ImageReadError, match="9.png"):
        train_classifier(_cfg(tmp_path / "data", tmp_path / "a", "data.num_workers=1", "solver.max_iter=1"))
    # Statistics from a subset that misses the file: the training loop meets it inside a worker.
    with pytest.raises(ImageReadError) as err:
        train_classifier(
            _cfg(
                tmp_path / "data",
                tmp_path / "b",
                "data.num_workers=1",
                "solver.max_iter=4",
                "data.stats_max_images=1",
                "augment.color_pca=false",
                "solver.batch_size=9",
            )
        )
    assert str(err.value) == f"image file '{bad}' is corrupt or not an image format OpenCV can decode"


def test_plateau_min_epochs_holds_the_lr_until_that_many_epochs_have_passed(varied_world, tmp_path):
    out = tmp_path / "plateau_min"
    # 30 images / batch 4 = 7 iterations per epoch; the error never counts as improving after the
    # first validation, so without the minimum the LR would drop at 3, 5, 7, 9 (see the test above).
    cfg = _cfg(
        varied_world,
        out,
        "solver.lr_schedule=plateau",
        "solver.base_lr=0.001",
        "solver.plateau_patience=2",
        "solver.plateau_threshold=1.0",
        "solver.eval_period=1",
        "solver.max_iter=10",
        "solver.plateau_min_epochs=1",
        "test.modes=[1crop]",
        "bn_recompute.enabled=false",
    )
    train_classifier(cfg)
    records = read_json_lines(out / "metrics.jsonl")
    assert [r["iter"] for r in records if r.get("lr_dropped")] == [7]  # 1 epoch after the start, then none
    lrs = [lr for _, (_, lr) in sorted(_losses(out).items())]
    assert lrs == pytest.approx([1e-3] * 7 + [1e-4] * 3)
    assert load_checkpoint(out / "last.pt")["schedule"]["last_drop_iter"] == 7


def test_flat_validation_folder_with_a_labels_file(varied_world, tmp_path):
    # The same 10 validation images as a flat folder + labels file, plus one image of a class the
    # training set lacks: the run sees the same validation set and counts the extra one.
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for i, path in enumerate(sorted((varied_world / "val").glob("*/*.png"))):
        (flat / f"val_{i}.png").write_bytes(path.read_bytes())
        lines.append(f"val_{i}.png\t{path.parent.name}\t0\t0\t5\t5")
    (flat / "val_99.png").write_bytes(path.read_bytes())
    lines.insert(3, "val_99.png\tnot_a_training_class\t0\t0\t5\t5")
    (tmp_path / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    common = [
        "solver.max_iter=2",
        "solver.eval_period=2",
        "test.modes=[1crop, multiscale]",
        "bn_recompute.enabled=false",
    ]
    folder = train_classifier(_cfg(varied_world, tmp_path / "folder", *common))
    with pytest.warns(UserWarning, match="skipped 1 of 11 images .*not_a_training_class") as record:
        listed = train_classifier(
            _cfg(
                varied_world,
                tmp_path / "listed",
                *common,
                f"data.val_dir={flat}",
                f"data.val_labels={tmp_path / 'val_annotations.txt'}",
            )
        )
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    assert listed["val_images"] == folder["val_images"] == 10 and listed["val_skipped_unknown_class"] == 1
    assert "val_skipped_unknown_class" not in folder
    assert listed["final"] == folder["final"]
    start = read_json_lines(tmp_path / "listed" / "metrics.jsonl")[0]
    assert start["val_skipped_unknown_class"] == 1 and start["val_skipped_classes"] == {"not_a_training_class": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("val_0.png\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected"):
        train_classifier(
            _cfg(varied_world, tmp_path / "bad", *common, f"data.val_dir={flat}", f"data.val_labels={bad}")
        )
