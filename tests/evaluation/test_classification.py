"""Tests for detres.evaluation.classification: top-k, 10-crop and dense multi-scale evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from detres.data.datasets.imagefolder import ImageFolderDataset
from detres.data.transforms.classification import (
    CenterCropEvalTransform,
    MultiScaleEvalTransform,
    Normalize,
    TenCropEvalTransform,
)
from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from detres.evaluation.classification import (
    dense_logits,
    dense_probs,
    evaluate_classifier,
    feature_window,
    topk_correct,
    topk_errors,
)
from detres.models.backbones.resnet import CifarResNet, build_resnet


class PixelLogits(nn.Module):
    """Features are the input itself and fc is the identity: a pixel's C channel values are its C class
    logits (C = 3 by default: RGB)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(num_classes))
            self.fc.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


class TinyConvNet(nn.Module):
    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


class ListDataset(Dataset):
    def __init__(self, items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# Two views whose logit average picks class X=0 but whose softmax average picks class Y=1:
# A: p = (0.1, 0.9, ~0); B: p = (0.5, ~0, 0.5)  ->  mean p = (0.3, 0.45, 0.25).
VIEW_A = (0.0, math.log(9.0), -20.0)
VIEW_B = (0.0, -13.8, 0.0)


def _const(logits, h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.tensor(logits, dtype=torch.float32)[:, None, None].expand(len(logits), h, w).clone()


def test_topk_errors_hand_example() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # ranking 3,1,5,2,0,4
            [2.0, 1.0, 0.0, -1.0, -2.0, -3.0],  # ranking 0,1,2,3,4,5
            [0.0, 0.1, 5.0, 1.0, 2.0, 3.0],  # ranking 2,5,4,3,1,0
        ]
    )
    targets = torch.tensor([3, 5, 0])
    assert topk_correct(logits, targets, (1, 2, 5)) == {1: 1, 2: 1, 5: 1}
    errs = topk_errors(logits, targets, ks=(1, 5))
    assert errs[1] == pytest.approx(2 / 3) and errs[5] == pytest.approx(2 / 3)
    # targets at ranks 2, 5 and 2
    assert topk_errors(logits, torch.tensor([1, 4, 5]), ks=(1, 2, 5)) == pytest.approx({1: 1.0, 2: 1 / 3, 5: 0.0})


def test_topk_clips_k_to_num_classes() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    assert topk_errors(logits, torch.tensor([0, 2]), ks=(1, 5)) == {1: 1.0, 5: 0.0}


def test_topk_input_errors() -> None:
    with pytest.raises(ValueError, match="class indices"):
        topk_errors(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="targets"):
        topk_errors(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="logits"):
        topk_errors(torch.zeros(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("model_fn", [TinyConvNet, lambda: CifarResNet(1, num_classes=5, widths=(4, 8, 8))])
def test_dense_logits_average_equals_pooled_logits(model_fn) -> None:
    torch.manual_seed(0)
    model = model_fn().eval()
    x = torch.randn(2, 3, 20, 28)
    dense = dense_logits(model, x)
    assert dense.shape[:2] == (2, model.fc.out_features) and dense.shape[2:] == model.forward_features(x).shape[2:]
    torch.testing.assert_close(dense.mean(dim=(2, 3)), model(x), rtol=1e-5, atol=1e-5)
    # one position by hand: fc applied to that feature vector
    feats = model.forward_features(x)
    torch.testing.assert_close(dense[1, :, 2, 3], model.fc(feats[1, :, 2, 3]), rtol=1e-5, atol=1e-5)
    # window=None pools the whole map: the net's own forward
    torch.testing.assert_close(dense_logits(model, x, None)[:, :, 0, 0], model(x), rtol=1e-5, atol=1e-5)
    # a 2x3 window at (1, 2) by hand: fc of the mean feature vector over rows 1..2, columns 2..4
    win = dense_logits(model, x, (2, 3))
    assert win.shape[2:] == (feats.shape[2] - 1, feats.shape[3] - 2)
    torch.testing.assert_close(win[0, :, 1, 2], model.fc(feats[0, :, 1:3, 2:5].mean(dim=(1, 2))), rtol=1e-5, atol=1e-5)


def test_1crop_known_answer_and_training_mode_restored() -> None:
    model = PixelLogits(num_classes=7).train()
    # 7 classes, so top-5 is a real cut. Labels are ranked 1st, 1st, 2nd and 6th:
    items = [
        (_const((5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)), 0),
        (_const((0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0)), 1),
        (_const((1.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0)), 0),
        (_const((6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0)), 5),
    ]
    res = evaluate_classifier(model, ListDataset(items), mode="1crop", batch_size=3)
    assert res == {"top1_err": pytest.approx(2 / 4), "top5_err": pytest.approx(1 / 4), "n": 4, "top5_k": 5}
    res2 = evaluate_classifier(model, ListDataset(items), mode="1crop", topk=2)
    assert res2["top5_k"] == 2 and res2["top5_err"] == pytest.approx(1 / 4)
    res6 = evaluate_classifier(model, ListDataset(items), mode="1crop", topk=6)
    assert res6["top5_k"] == 6 and res6["top5_err"] == 0.0
    res1 = evaluate_classifier(model, ListDataset(items[2:3]), mode="1crop", topk=1)
    assert res1["top5_err"] == 1.0
    # k above the number of classes is clipped to it: every label is in the top 7
    res10 = evaluate_classifier(model, ListDataset(items), mode="1crop", topk=10)
    assert res10["top5_k"] == 7 and res10["top5_err"] == 0.0 and res10["top1_err"] == pytest.approx(2 / 4)
    assert model.training


def test_10crop_averages_softmax_not_logits() -> None:
    crops = torch.stack([_const(VIEW_A)] * 5 + [_const(VIEW_B)] * 5)  # [10, 3, 4, 4]
    res = evaluate_classifier(PixelLogits(), ListDataset([(crops, 1)]), mode="10crop")
    assert res["top1_err"] == 0.0  # logit averaging would choose class 0
    res0 = evaluate_classifier(PixelLogits(), ListDataset([(crops, 0)]), mode="10crop")
    assert res0["top1_err"] == 1.0


def test_multiscale_scores_training_size_windows_not_single_positions() -> None:
    # One 4x4 image, left half logits A and right half logits B, scored with a 4-pixel training
    # crop (PixelLogits has stride 1, so the window is the whole 4x4 map): the window averages the
    # features, mean logits (0, -5.8, -10) -> class 0, as the net's own 1-crop forward says.
    # Softmax at every single position and then averaged (the old dense test) would pick class 1.
    image = torch.cat([_const(VIEW_A, 4, 2), _const(VIEW_B, 4, 2)], dim=2)
    assert PixelLogits()(image[None]).argmax().item() == 0
    assert dense_probs(PixelLogits(), image[None], window=1).argmax().item() == 1
    res = evaluate_classifier(PixelLogits(), ListDataset([(image, 0)]), mode="multiscale", scales=(4,), crop=4)
    assert res["top1_err"] == 0.0
    # Pre-resized views (MultiScaleEvalTransform output): scale 1 shows A, scale 2 shows B, so
    # averaging softmax over scales picks class 1 (averaging logits would pick class 0).
    views = [_const(VIEW_A, 4, 4), _const(VIEW_B, 6, 6)]
    res = evaluate_classifier(
        PixelLogits(), ListDataset([(views, 1), (views, 1), (views, 0)]), mode="multiscale", crop=4
    )
    assert res["top1_err"] == pytest.approx(1 / 3) and res["n"] == 3


def test_dense_probs_softmax_per_window_then_mean_hand_values() -> None:
    # A 2x3 "feature map" whose columns hold logits x, y, z. Training-size window 2x2 -> two windows:
    #   (x + y) / 2 = (ln 9, 0, -20)  -> softmax ~ (0.9, 0.1, 0)
    #   (y + z) / 2 = (0, -20, ln 4)  -> softmax ~ (0.2, 0, 0.8)      mean: (0.55, 0.05, 0.40)
    x = (2 * math.log(9.0), 0.0, -40.0)
    y = (0.0, 0.0, 0.0)
    z = (0.0, -40.0, 2 * math.log(4.0))
    image = torch.stack([_const(x, 2, 1), _const(y, 2, 1), _const(z, 2, 1)], dim=-1)[..., 0, :][None]
    assert image.shape == (1, 3, 2, 3)
    model = PixelLogits()
    assert feature_window(model, 2) == (2, 2)
    torch.testing.assert_close(
        dense_probs(model, image, window=(2, 2)), torch.tensor([[0.55, 0.05, 0.40]]), atol=1e-6, rtol=0
    )
    # Single positions (window 1) give softmax(x), softmax(y), softmax(z) averaged instead.
    per_position = (
        torch.tensor([81 / 82, 1 / 82, 0.0]) + torch.full((3,), 1 / 3) + torch.tensor([1 / 17, 0.0, 16 / 17])
    ) / 3
    torch.testing.assert_close(dense_probs(model, image, window=1)[0], per_position, atol=1e-6, rtol=0)
    # A window larger than the map along a side pools that whole side; larger along both: global average.
    glob = torch.tensor([x, y, z]).mean(dim=0).softmax(dim=0)
    for window in (3, (2, 3), (5, 7), None):
        torch.testing.assert_close(dense_probs(model, image, window=window)[0], glob, atol=1e-6, rtol=0)
    # Through the evaluator: top-1 is class 0 (0.55); top-2 adds class 2 (0.40), never class 1 (0.05).
    res = evaluate_classifier(
        model,
        ListDataset([(image[0], 0), (image[0], 2), (image[0], 1)]),
        mode="multiscale",
        scales=(2,),
        crop=2,
        topk=2,
    )
    assert res["top1_err"] == pytest.approx(2 / 3) and res["top5_err"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "make_model, crop, window",
    [
        (lambda: build_resnet(18, num_classes=6, base_width=8), 64, (2, 2)),
        (lambda: build_resnet(18, num_classes=6, base_width=8), 224, (7, 7)),
        (lambda: CifarResNet(1, num_classes=6, widths=(4, 8, 8)), 32, (8, 8)),
    ],
    ids=["resnet18-64px", "resnet18-224px", "cifar-32px"],
)
def test_dense_at_the_training_scale_equals_1crop(make_model, crop, window) -> None:
    torch.manual_seed(0)
    model = make_model()
    with torch.no_grad():  # non-trivial BN statistics so the test is not about an identity-like net
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    assert feature_window(model, crop) == window and not model.training
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(crop, crop, 3)).astype(np.uint8) for _ in range(4)]
    norm = Normalize(mean=(120.0, 115.0, 100.0), std=(60.0, 60.0, 60.0))
    one = CenterCropEvalTransform(normalize=norm, resize=crop, crop=crop)
    dense = MultiScaleEvalTransform(normalize=norm, scales=(crop,))
    x = torch.stack([one(im) for im in images])
    views = torch.stack([dense(im)[0] for im in images])
    assert torch.equal(x, views)
    with torch.no_grad():
        ref = model(x).softmax(dim=1)
        got = dense_probs(model, views, window=feature_window(model, crop))
        old = dense_probs(model, views, window=1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (old - ref).abs().max() > 1e-3  # the per-position average is a different number
    labels = [int(t) for t in ref.argmin(dim=1)]  # make some samples wrong and some right
    labels[0] = int(ref[0].argmax())
    a = evaluate_classifier(model, ListDataset([(one(im), t) for im, t in zip(images, labels)]), mode="1crop")
    b = evaluate_classifier(
        model, ListDataset([(dense(im), t) for im, t in zip(images, labels)]), mode="multiscale", crop=crop
    )
    assert a == b and a["top1_err"] == pytest.approx(0.75)


def test_multiscale_needs_the_training_crop() -> None:
    with pytest.raises(ValueError, match="crop=<training crop size"):
        evaluate_classifier(PixelLogits(), ListDataset([(_const(VIEW_A), 0)]), mode="multiscale", scales=(4,))


def test_mode_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="10crop"):
        evaluate_classifier(PixelLogits(), ListDataset([(_const(VIEW_A), 0)]), mode="10crop")
    with pytest.raises(ValueError, match="mode"):
        evaluate_classifier(PixelLogits(), ListDataset([(_const(VIEW_A), 0)]), mode="dense")
    with pytest.raises(TypeError, match="forward_features"):
        evaluate_classifier(
            nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), ListDataset([(_const(VIEW_A), 0)]), mode="multiscale", crop=4
        )


FOLDER_CLASSES = ("a", "b", "c", "d", "e", "f", "g")  # 7 classes, so the top-5 cut can miss a label


def _write_folder(root: Path, n_per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for c in FOLDER_CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            h, w = [(40, 40), (36, 50), (48, 40)][i % 3]
            im = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
            cv2.imwrite(str(root / c / f"{i}.png"), im)


def _reference_errors(probs: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Top-1 / top-5 error from averaged probabilities with plain torch.topk (ties would make the
    reference ill-posed, so the 5th and 6th scores of every sample must be clearly apart)."""
    top = probs.topk(6, dim=1).values  # relative gaps: the 5th and 6th probabilities can be tiny
    assert (top[:, 0] / top[:, 1]).min() > 1.001 and (top[:, 4] / top[:, 5]).min() > 1.001
    idx = probs.topk(5, dim=1).indices
    t = torch.tensor(labels)
    n = len(labels)
    return {
        "top1_err": 1.0 - int((idx[:, 0] == t).sum()) / n,
        "top5_err": 1.0 - int((idx == t[:, None]).any(dim=1).sum()) / n,
    }


def _dense_reference(model: nn.Module, view: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax of fc(mean feature vector) of every k x k window (clipped to the map), averaged: explicit loops."""
    f = model.forward_features(view[None])[0]
    kh, kw = min(k, f.shape[1]), min(k, f.shape[2])
    probs = [
        model.fc(f[:, i : i + kh, j : j + kw].mean(dim=(1, 2))).softmax(dim=0)
        for i in range(f.shape[1] - kh + 1)
        for j in range(f.shape[2] - kw + 1)
    ]
    return torch.stack(probs).mean(dim=0)


def test_all_modes_on_tiny_resnet_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    torch.manual_seed(0)
    model = CifarResNet(1, num_classes=7, widths=(4, 8, 8))
    with torch.no_grad():
        model.fc.weight.mul_(20.0)  # spread the scores so no ranking is a near-tie
    norm = Normalize(mean=(128.0, 128.0, 128.0), std=(64.0, 64.0, 64.0))
    modes = {
        "1crop": CenterCropEvalTransform(normalize=norm, resize=36, crop=32),
        "10crop": TenCropEvalTransform(normalize=norm, resize=36, crop=32),
        "multiscale": MultiScaleEvalTransform(normalize=norm, scales=(32, 40, 48)),
    }
    model.eval()
    seen = set()
    for mode, transform in modes.items():
        ds = ImageFolderDataset(tmp_path, transform=transform)
        res = evaluate_classifier(model, ds, mode=mode, batch_size=4, crop=32)
        # the same crops through a plain forward, softmax averaged over crops / windows / scales by hand
        samples = [ds[i] for i in range(len(ds))]
        labels = [t for _, t in samples]
        with torch.no_grad():
            if mode == "1crop":
                probs = torch.stack([model(x[None])[0].softmax(dim=0) for x, _ in samples])
            elif mode == "10crop":
                probs = torch.stack([model(x).softmax(dim=1).mean(dim=0) for x, _ in samples])
            else:  # 32-px training crop -> an 8x8 window of the stride-4 map
                probs = torch.stack(
                    [torch.stack([_dense_reference(model, v, 8) for v in views]).mean(dim=0) for views, _ in samples]
                )
        ref = _reference_errors(probs, labels)
        assert res["n"] == 21 and res["top5_k"] == 5, mode
        assert res["top1_err"] == pytest.approx(ref["top1_err"], abs=1e-9), mode
        assert res["top5_err"] == pytest.approx(ref["top5_err"], abs=1e-9), mode
        seen.add((round(ref["top1_err"] * 21), round(ref["top5_err"] * 21)))
    # the references are not trivial (some labels miss the top 1 and the top 5, some hit them)
    assert all(0 < a < 21 and 0 < b < 21 for a, b in seen), seen
    # Full-size images of different shapes, resized to each scale inside the evaluator.
    full = ImageFolderDataset(
        tmp_path, transform=lambda im: torch.from_numpy(np.moveaxis((im - 128.0) / 64.0, -1, 0)).float()
    )
    res = evaluate_classifier(model, full, mode="multiscale", scales=(32, 40), batch_size=4, crop=32)
    samples = [full[i] for i in range(len(full))]
    probs = []
    with torch.no_grad():
        for x, _ in samples:
            h, w = x.shape[1:]
            per_scale = []
            for s in (32, 40):  # shorter side to s, bilinear (antialiased when shrinking)
                size = (s, round(w * s / h)) if h <= w else (round(h * s / w), s)
                v = (
                    x
                    if size == (h, w)
                    else torch.nn.functional.interpolate(
                        x[None], size=size, mode="bilinear", align_corners=False, antialias=True
                    )[0]
                )
                per_scale.append(_dense_reference(model, v, 8))
            probs.append(torch.stack(per_scale).mean(dim=0))
    ref = _reference_errors(torch.stack(probs), [t for _, t in samples])
    assert res["n"] == 21
    assert res["top1_err"] == pytest.approx(ref["top1_err"], abs=1e-9)
    assert res["top5_err"] == pytest.approx(ref["top5_err"], abs=1e-9)
    assert 0 < ref["top1_err"] < 1 and 0 < ref["top5_err"] < 1


def test_loader_and_dataset_give_same_numbers() -> None:
    torch.manual_seed(1)
    model = TinyConvNet(num_classes=7)
    items = [(torch.randn(3, 12, 12), int(torch.randint(0, 7, ()))) for _ in range(10)]
    a = evaluate_classifier(model, ListDataset(items), mode="1crop", batch_size=3)
    b = evaluate_classifier(model, DataLoader(ListDataset(items), batch_size=4), mode="1crop")
    logits = model.eval()(torch.stack([x for x, _ in items]))
    ref = topk_errors(logits, torch.tensor([t for _, t in items]), ks=(1, 5))
    assert a == b
    assert a["top1_err"] == pytest.approx(ref[1]) and a["top5_err"] == pytest.approx(ref[5])


def test_pretrained_cifar_resnet20_on_real_images(shared_dir: Path) -> None:
    weights = shared_dir / "data" / "resnet_cifar_weights" / "pretrained_models" / "resnet20-12fca82f.th"
    root = shared_dir / "data" / "cifar10" / "test"
    if not weights.is_file() or not root.is_dir():
        pytest.skip("shared CIFAR-10 test images or ResNet-20 weights not present")
    from detres.models.backbones.weights import load_pretrained_backbone

    model = CifarResNet(3, num_classes=10)
    assert load_pretrained_backbone(model, weights) == "cifar_legacy"
    norm = Normalize(mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)  # how these weights were trained
    ds = ImageFolderDataset(root, transform=CenterCropEvalTransform(normalize=norm, resize=None, crop=None))
    ds.samples = ds.samples[::20]  # 500 images, 50 per class
    ds.targets = [t for _, t in ds.samples]
    res = evaluate_classifier(model, ds, mode="1crop", batch_size=100)
    # Dense at the training scale (32 px, the whole 8x8 map is the one window) is the 1-crop test.
    ds.transform = MultiScaleEvalTransform(normalize=norm, scales=(32,))
    dense = evaluate_classifier(model, ds, mode="multiscale", batch_size=100, crop=32)
    assert dense == res
    # Upstream: 8.27% on the original arrays. On these JPEG re-encodings this subset measures 20.0%
    # (the model matches an independent functional re-implementation exactly, so the gap is the
    # lossy data). Chance is 90%; BGR input gives 31%, forgetting the std division 89%.
    # Measured on this fixed 500-image subset: 100 top-1 and 10 top-5 mistakes.
    assert res["n"] == 500 and res["top5_k"] == 5
    assert res["top1_err"] == pytest.approx(100 / 500) and res["top5_err"] == pytest.approx(10 / 500)
