"""Tests for detres.inference.predictor: original images to the model, its boxes back, checkpoint loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from detres.inference.predictor import Predictor
from detres.models.build import build_detector, detector_state
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import det_input_config, det_model_config

META = {"class_names": ["circle", "square", "star"]}


class FractionDetector(nn.Module):
    """Stub: one box per image at fixed fractions of the input it receives, plus one low score."""

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
def test_predict_gives_the_model_the_original_image_and_returns_its_boxes(hw):
    h0, w0 = hw
    model = FractionDetector()
    predictor = Predictor.from_model(model, META)
    image = np.random.default_rng(0).integers(0, 255, (h0, w0, 3), dtype=np.uint8)
    result = predictor.predict(image, score_thresh=0.5)
    assert model.seen == [(h0, w0)]  # the detector resizes to its test scale itself
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
        Predictor.from_model(FractionDetector(), {"label_to_category_id": {}})


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
    inp = det_input_config(min_size_test=96, max_size_test=144)
    model = build_detector(model_cfg, input_cfg=inp, num_classes=3).eval()
    path = tmp_path / "det.pt"
    state = detector_state(model, config={"task": "det", "model": model_cfg, "input": inp}, meta=META)
    save_checkpoint(path, {**state, "iter": 0})
    predictor = Predictor(path)
    image = np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    result = predictor.predict(image)
    assert len(result["scores"]) > 0
    # Reference, by hand: the resize to the test scale (96 / 60 -> 96 x 144, factor 1.6 on both axes), the model's
    # computation at that scale, the boxes divided by 1.6.
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    resized = torch.nn.functional.interpolate(tensor[None], size=(96, 144), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        batch, sizes = model.preprocess([resized])
        features = model.trunk(batch)
        proposals, _ = model.rpn(features, sizes, None)
        ref = model.roi_heads(features, proposals, sizes, None)[0][0]
    np.testing.assert_allclose(result["boxes"], (ref["boxes"] / 1.6).numpy(), atol=1e-3)
    np.testing.assert_allclose(result["scores"], ref["scores"].numpy(), atol=1e-5)
    assert result["labels"].tolist() == ref["labels"].tolist()
    assert bool((result["boxes"][:, [0, 2]] <= 90).all()) and bool((result["boxes"][:, [1, 3]] <= 60).all())
