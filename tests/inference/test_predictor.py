"""Tests for detres.inference.predictor: test-scale resize, boxes in original pixels, checkpoint loading."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from detres.data.transforms.detection import faster_rcnn_scale
from detres.inference.predictor import Predictor
from detres.models.build import build_detector, detector_state
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import det_model_config

META = {"class_names": ["circle", "square", "star"], "min_size_test": 96, "max_size_test": 144}


class FractionDetector(nn.Module):
    """Stub: one box per image at fixed fractions of the (resized) input it receives, plus one low score."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, images, targets=None, image_sizes=None):
        out = []
        for h, w in image_sizes:
            self.seen.append((h, w))
            boxes = torch.tensor([[0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h], [0.0, 0.0, 0.1 * w, 0.1 * h]])
            out.append({"boxes": boxes, "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([3, 1])})
        return out


@pytest.mark.parametrize("hw", [(50, 70), (40, 150), (200, 97)])
def test_predict_resizes_by_the_test_rule_and_returns_original_pixels(hw):
    h0, w0 = hw
    model = FractionDetector()
    predictor = Predictor.from_model(model, META)
    image = np.random.default_rng(0).integers(0, 255, (h0, w0, 3), dtype=np.uint8)
    result = predictor.predict(image, score_thresh=0.5)
    scale = faster_rcnn_scale(h0, w0, 96, 144)
    assert model.seen == [(int(round(h0 * scale)), int(round(w0 * scale)))]
    np.testing.assert_allclose(result["boxes"], [[0.25 * w0, 0.5 * h0, 0.75 * w0, h0]], atol=1e-3)
    np.testing.assert_allclose(result["scores"], [0.9])
    assert result["labels"].tolist() == [3] and result["class_names"] == ["star"]
    everything = predictor.predict(image)
    assert everything["class_names"] == ["star", "circle"] and everything["boxes"].shape == (2, 4)
    as_float = predictor.predict(image.astype(np.float64), score_thresh=0.5)  # 0..255 floats work the same
    np.testing.assert_allclose(as_float["boxes"], result["boxes"], atol=1e-3)


def test_predict_rejects_non_images():
    predictor = Predictor.from_model(FractionDetector(), META)
    with pytest.raises(ValueError, match="RGB array"):
        predictor.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8 or finite float"):
        predictor.predict(np.zeros((10, 10, 3), np.int32))
    with pytest.raises(ValueError, match="lacks"):
        Predictor.from_model(FractionDetector(), {"class_names": ["a"]})


def test_predictor_from_checkpoint_matches_the_model_on_the_resized_image(tmp_path):
    torch.manual_seed(0)
    model_cfg = det_model_config(
        depth=18,
        base_width=16,
        anchor_sizes=[16, 32],
        aspect_ratios=[1.0],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 100, "post_nms_top_n_test": 20},
        roi_heads={"pooler_resolution": 8, "score_thresh": 0.0},
    )
    model = build_detector(model_cfg, num_classes=3).eval()
    path = tmp_path / "det.pt"
    state = detector_state(model, config={"task": "det", "model": model_cfg}, meta=META)
    save_checkpoint(path, {**state, "iter": 0})
    predictor = Predictor(path)
    image = np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    result = predictor.predict(image)
    assert len(result["scores"]) > 0
    # Reference: resize by hand (96 / 60 -> 96 x 144), run the original model, divide by the scale.
    resized = cv2.resize(image, (144, 96), interpolation=cv2.INTER_LINEAR)
    with torch.no_grad():
        ref = model([torch.from_numpy(resized).permute(2, 0, 1).float()])[0]
    np.testing.assert_allclose(result["boxes"], (ref["boxes"] / torch.tensor([1.6, 1.6, 1.6, 1.6])).numpy(), atol=1e-3)
    np.testing.assert_allclose(result["scores"], ref["scores"].numpy(), atol=1e-5)
    assert result["labels"].tolist() == ref["labels"].tolist()
    assert bool((result["boxes"][:, [0, 2]] <= 90).all()) and bool((result["boxes"][:, [1, 3]] <= 60).all())
