"""Tests for detres.models.detection.transform: the detector's test-scale resize, normalisation, padding and the way
back to the original image's pixels."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import detres.models.detection.transform as transform_module
from detres.data.transforms import detection as data_transforms
from detres.data.transforms.detection import build_det_transforms
from detres.models.detection.faster_rcnn import FasterRCNN
from detres.models.detection.transform import DetectorTransform, boxes_to_original, resized_size
from tests.tiny_configs import build_test_detector


def _transform(min_size: int = 96, max_size: int = 200) -> DetectorTransform:
    return DetectorTransform(
        pixel_mean=(10.0, 20.0, 30.0), pixel_std=(1.0, 2.0, 4.0), min_size=min_size, max_size=max_size
    )


class FractionRPN(nn.Module):
    """No proposals (the heads below need none)."""

    def forward(self, features, image_sizes, targets=None):
        return [torch.zeros(0, 4) for _ in image_sizes], {}


class FractionHeads(nn.Module):
    """One detection per image at fixed fractions of the (network input) size it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, features, proposals, image_sizes, targets=None):
        self.sizes += list(image_sizes)
        out = []
        for h, w in image_sizes:
            box = torch.tensor([[0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h]])
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out, {}


def _fraction_model(min_size: int, max_size: int) -> FasterRCNN:
    return FasterRCNN(nn.Identity(), FractionRPN(), FractionHeads(), transform=_transform(min_size, max_size)).eval()


def test_known_answer_resize_and_boxes_back_in_original_pixels():
    # 60x77 at shorter side 96: factor 1.6, the width 123.2 rounds to 123, so x maps back by 77/123 and y by 1/1.6.
    # 50x100 with the longer side capped at 160: factor 1.6 on both axes -> 80x160.
    model = _fraction_model(96, 160)  # 96 * 100 / 50 = 192 > 160: the cap decides for the second image
    dets = model([torch.rand(3, 60, 77) * 255, torch.rand(3, 50, 100) * 255])
    assert model.roi_heads.sizes == [(96, 123), (80, 160)]
    for det, (h, w) in zip(dets, [(60, 77), (50, 100)]):
        torch.testing.assert_close(det["boxes"], torch.tensor([[0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h]]))
        assert det["boxes"].dtype == torch.float32
    # By hand: a box in the 96x123 input's pixels, divided by the per-axis factors (123/77, 96/60), clipped.
    resized_box = torch.tensor([[12.3, 9.6, 130.0, 96.0]])
    want = torch.tensor([[12.3 * 77 / 123, 9.6 / 1.6, 77.0, 60.0]])
    got = boxes_to_original(resized_box, torch.zeros(3, 60, 77), torch.zeros(3, 96, 123))
    torch.testing.assert_close(got, want)


def test_two_images_of_different_sizes_in_one_call_equal_two_calls():
    torch.manual_seed(0)
    model = build_test_detector(
        3,
        test_scale=(96, 200),
        depth=18,
        base_width=8,
        anchor_sizes=[16, 32],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 100, "post_nms_top_n_test": 20},
        roi_heads={"pooler_resolution": 4, "score_thresh": 0.0},
    ).eval()
    g = torch.Generator().manual_seed(0)
    # Both reach the same 96x128 network input, so the batch adds no padding and the results must be identical.
    images = [torch.rand(3, 60, 80, generator=g) * 255, torch.rand(3, 90, 120, generator=g) * 255]
    with torch.no_grad():
        together = model(images)
        alone = [model([img])[0] for img in images]
        padded = torch.zeros(2, 3, 90, 120)
        padded[0, :, :60, :80] = images[0]
        padded[1] = images[1]
        from_batch = model(padded, image_sizes=[(60, 80), (90, 120)])
    assert all(len(d["scores"]) > 0 for d in together)
    for a, b, c, (h, w) in zip(together, alone, from_batch, [(60, 80), (90, 120)]):
        assert all(torch.equal(a[k], c[k]) for k in ("boxes", "scores", "labels"))  # the same batch of two
        # One image alone is a batch of one, whose convolutions round differently (features ~1e-3 apart).
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        assert bool((a["boxes"][:, 2] <= w).all() and (a["boxes"][:, 3] <= h).all())
    # Sizes that differ at the test scale too: each image keeps its own factors.
    fractions = _fraction_model(96, 200)
    dets = fractions([torch.rand(3, 60, 77), torch.rand(3, 150, 100)])
    for det, (h, w) in zip(dets, [(60, 77), (150, 100)]):
        torch.testing.assert_close(det["boxes"], torch.tensor([[0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h]]))


def test_the_resize_rule_is_the_data_pipeline_one(monkeypatch):
    assert transform_module.faster_rcnn_scale is data_transforms.faster_rcnn_scale
    calls = []

    def spy(*args):
        calls.append(args)
        return data_transforms.faster_rcnn_scale(*args)

    monkeypatch.setattr(transform_module, "faster_rcnn_scale", spy)
    assert _transform(96, 200).scaled_size((60, 77)) == (96, 123)
    assert calls == [(60, 77, 96.0, 200.0)]
    monkeypatch.undo()
    # The same sizes as the data pipeline's resize (albumentations, Python's round: ties to even), ties included.
    pipeline = build_det_transforms(train=False, min_size=96, max_size=200)
    for h, w in [(60, 77), (50, 100), (200, 97), (40, 150), (64, 30), (96, 96), (120, 125)]:
        sample = {"image": np.zeros((h, w, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32), "labels": []}
        assert resized_size(h, w, 96.0, 200.0) == tuple(pipeline(sample)["image"].shape[:2]), (h, w)
    assert resized_size(120, 125, 96.0, 200.0) == (96, 100)  # 125 * 0.8 = 100.0 exactly
    assert resized_size(2, 5, 3.0, 100.0) == (3, 8)  # 5 * 1.5 = 7.5: a tie, rounded to the even 8
    assert resized_size(2, 3, 3.0, 100.0) == (3, 4)  # 3 * 1.5 = 4.5 -> 4


def test_pyramid_sizes_keep_the_test_scale_ratio():
    transform = _transform(600, 1000)
    assert transform.scaled_size((600, 900), 1000) == (1000, 1500)  # 1500 <= 1000 * 5/3: not capped
    assert transform.scaled_size((600, 1200), 1000) == (833, 1667)  # capped at 1666.7: factor 1.389
    assert transform.scaled_size((300, 200), 400) == (600, 400)  # the shorter side is the width here
    assert transform.scaled_size((600, 1200), 1000, 1200) == (600, 1200)  # an explicit cap


def test_resize_is_cv2_inter_linear_up_to_its_rounding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    transform = _transform(96, 200)
    h, w = transform.scaled_size(image.shape[:2])
    ours = transform.resize(torch.from_numpy(image).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
    # On float input cv2 computes the same interpolation (its float32 source coordinates and weights: ~1e-5
    # relative, 2e-3 grey levels at most) ...
    float_cv2 = cv2.resize(image.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, float_cv2, rtol=0, atol=2e-3)
    # ... and on uint8 input with 11-bit fixed-point weights, rounded to integers: within one grey level.
    uint8_cv2 = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    assert np.abs(ours - uint8_cv2).max() <= 1.0


def test_traced_transform_follows_the_input_size():
    transform = _transform(64, 100)

    class Resize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = transform

        def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            resized = self.transform.resize(image)
            return resized, boxes_to_original(boxes, image, resized)

    boxes = torch.tensor([[10.0, 20.0, 60.0, 63.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Resize(), (torch.rand(3, 40, 60) * 255, boxes))
    for shape in [(3, 70, 50), (3, 40, 120), (3, 64, 64)]:
        image = torch.rand(shape) * 255
        got, want = traced(image, boxes), Resize()(image, boxes)
        assert got[0].shape == want[0].shape and torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_training_mode_takes_the_images_at_their_size():
    model = _fraction_model(96, 200).train()
    seen = []
    model.trunk.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    model([torch.rand(3, 60, 77), torch.rand(3, 50, 100)], targets)
    assert seen == [(2, 3, 64, 112)] and model.roi_heads.sizes == [(60, 77), (50, 100)]


def test_state_dicts_with_top_level_normalisation_buffers_load():
    model = _fraction_model(96, 200)
    state = {k: v for k, v in model.state_dict().items()}
    old = {
        ("pixel_mean" if k == "transform.pixel_mean" else "pixel_std" if k == "transform.pixel_std" else k): v + 1
        for k, v in state.items()
    }
    fresh = _fraction_model(96, 200)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.transform.pixel_mean, state["transform.pixel_mean"] + 1)
    assert torch.equal(fresh.transform.pixel_std, state["transform.pixel_std"] + 1)


def test_bad_test_scales_are_refused():
    with pytest.raises(ValueError, match="min_size <= max_size"):
        _transform(100, 50)
    with pytest.raises(ValueError, match="pixel_std"):
        DetectorTransform(pixel_mean=(0, 0, 0), pixel_std=(1, 0, 1), min_size=10, max_size=10)
