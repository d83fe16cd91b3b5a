"""Tests for detres.models.localization.rpn_localizer: the RPN-stage localizer (C4 trunk + per-class RPN) and its
checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from detres.config.load import load_config
from detres.models.localization.rpn_localizer import RPNLocalizer, load_localizer
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import loc_model_config

MODEL = dict(depth=18, base_width=8, anchor_sizes=[16, 32], aspect_ratios=[1.0])


def _localizer() -> RPNLocalizer:
    return RPNLocalizer.from_config(loc_model_config(**MODEL), num_classes=3)


def test_training_losses_and_class_boxes():
    torch.manual_seed(0)
    model = _localizer()
    assert isinstance(model, RPNLocalizer) and model.num_classes == 3 and model.rpn.sampler.batch_size_per_image == 8
    images = torch.rand(2, 3, 64, 64) * 255
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([3])},
    ]
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn.head.cls_logits.weight.grad is not None
    assert model.trunk.conv1.weight.grad is None  # freeze_at=2: the stem is frozen
    out = model.eval().class_boxes(torch.rand(3, 80, 48) * 255, [1, 3], top_n=5)
    assert sorted(out) == [1, 3]
    boxes, scores = out[3]
    assert boxes.shape == (5, 4) and bool((scores[:-1] >= scores[1:]).all())
    assert float(boxes[:, 2].max()) <= 48 and float(boxes[:, 3].max()) <= 80  # clipped to the image


def test_load_localizer_rebuilds_the_model(tmp_path):
    model = _localizer().eval()
    model.pixel_mean.copy_(torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1))  # the checkpoint carries its statistics
    path = tmp_path / "loc.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": {"task": "loc", "model": MODEL},
            "meta": {"synsets": ["a", "b", "c"]},
            "stage": "rpn",
            "iter": 3,
        },
    )
    loaded, meta = load_localizer(path)
    assert meta["synsets"] == ["a", "b", "c"] and meta["iter"] == 3
    image = torch.rand(3, 64, 64) * 255
    a, b = model.class_boxes(image, [2])[2], loaded.class_boxes(image, [2])[2]
    torch.testing.assert_close(a[0], b[0]) and torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(loaded.pixel_mean.flatten(), torch.tensor([10.0, 20.0, 30.0]))


def test_load_localizer_refuses_other_checkpoints(tmp_path):
    path = tmp_path / "det.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "meta": {}})
    with pytest.raises(ValueError, match="not a train_loc RPN-stage checkpoint"):
        load_localizer(path)


def test_loc_config_values_reach_the_per_class_rpn():
    cfg = load_config(
        None,
        ["task=loc", "model.depth=18", "model.base_width=8", "model.rpn.allowed_border=5", "model.rpn.nms_thresh=0.6"],
    )
    model = RPNLocalizer.from_config(cfg.model, num_classes=4)
    assert model.rpn.allowed_border == 5 and model.rpn.nms_thresh == 0.6 and model.num_classes == 4
    assert model.rpn.sampler.batch_size_per_image == cfg.model.rpn.batch_size_per_image
    assert model.rpn.anchor_generator.sizes == tuple(float(s) for s in cfg.model.anchor_sizes)
