"""Tests for detres.engine.optimizer: weight / bias parameter groups, their LR under the schedule, decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detres.engine.lr_schedule import LRSchedule
from detres.engine.optimizer import build_detection_optimizer, detection_param_groups, is_bias, set_lr
from detres.models.backbones.frozen_bn import FrozenBatchNorm2d


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), FrozenBatchNorm2d(3))
        self.frozen = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def test_groups_split_weights_and_biases_and_skip_frozen_parameters():
    net = _Net()
    groups = detection_param_groups(net, base_lr=0.01, weight_decay=5e-4, bias_lr_factor=2.0, weight_decay_bias=0.0)
    assert [g["name"] for g in groups] == ["weights", "biases"]
    assert [id(p) for p in groups[0]["params"]] == [id(net.trunk[0].weight), id(net.head.weight)]
    assert [id(p) for p in groups[1]["params"]] == [id(net.head.bias)]  # frozen Linear and BN buffers excluded
    assert [(g["lr"], g["lr_factor"], g["weight_decay"]) for g in groups] == [(0.01, 1.0, 5e-4), (0.02, 2.0, 0.0)]
    only_head = detection_param_groups(net, base_lr=0.01, weight_decay=5e-4, modules=["head"])
    assert [len(g["params"]) for g in only_head] == [1, 1]
    assert only_head[1]["weight_decay"] == 5e-4 and only_head[1]["lr"] == 0.01  # detectron2's defaults
    with pytest.raises(ValueError, match="no submodules"):
        detection_param_groups(net, base_lr=0.01, weight_decay=0.0, modules=["rpn"])
    assert is_bias("rpn.head.conv.bias") and not is_bias("roi_heads.predictor.bbox_pred.weight")


def test_schedule_scales_every_group_and_decay_applies_to_weights_only():
    net = _Net()
    solver = {"base_lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "bias_lr_factor": 2.0, "weight_decay_bias": 0.0}
    opt = build_detection_optimizer(net, solver)
    schedule = LRSchedule(opt, base_lr=0.01, mode="step", steps=[3], gamma=0.1, warmup_iters=1, warmup_lr=0.001)
    expected = {0: (0.001, 0.002), 1: (0.01, 0.02), 2: (0.01, 0.02), 3: (0.001, 0.002), 9: (0.001, 0.002)}
    for iteration, (lr_w, lr_b) in expected.items():
        set_lr(opt, schedule.lr_at(iteration))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_w, lr_b], rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    # One SGD step at iteration 1 (LR 0.01 / 0.02) with zero gradients: momentum buffer = decay * w, so a
    # weight w becomes w (1 - 0.01 * 5e-4) and a bias does not move.
    set_lr(opt, schedule.lr_at(1))
    with torch.no_grad():
        net.head.weight.fill_(2.0)
        net.head.bias.fill_(3.0)
    for p in (net.trunk[0].weight, net.head.weight, net.head.bias):
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(net.head.weight, torch.full((2, 3), 2.0 * (1 - 0.01 * 5e-4)), rtol=0, atol=1e-7)
    torch.testing.assert_close(net.head.bias, torch.full((2,), 3.0), rtol=0, atol=0)
    # A bias gradient moves at twice the weights' LR: bias 3 - 0.02 * 1 after a unit gradient (fresh SGD).
    opt = build_detection_optimizer(net, dict(solver, momentum=0.0))
    net.head.bias.grad = torch.ones(2)
    net.head.weight.grad = torch.zeros(2, 3)
    net.trunk[0].weight.grad = torch.zeros_like(net.trunk[0].weight)
    opt.step()
    torch.testing.assert_close(net.head.bias, torch.full((2,), 2.98), rtol=0, atol=1e-7)


def test_detector_groups_hold_exactly_the_head_biases():
    from tests.tiny_configs import build_test_detector

    torch.manual_seed(0)
    model = build_test_detector(2, depth=18, base_width=16, freeze_at=2)
    groups = detection_param_groups(model, base_lr=0.001, weight_decay=5e-4, bias_lr_factor=2.0, weight_decay_bias=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    # ResNet convs have no biases and frozen BN has buffers only: the biases are the new layers'.
    assert sorted(names[id(p)] for p in groups[1]["params"]) == [
        "roi_heads.predictor.bbox_pred.bias",
        "roi_heads.predictor.cls_score.bias",
        "rpn.head.bbox_pred.bias",
        "rpn.head.cls_logits.bias",
        "rpn.head.conv.bias",
    ]
    weights = {names[id(p)] for p in groups[0]["params"]}
    assert not any(n.startswith(("trunk.conv1", "trunk.layer1")) for n in weights)  # freeze_at=2
    assert "trunk.layer2.0.conv1.weight" in weights and "roi_heads.box_head.conv5_head.layer4.0.conv1.weight" in weights
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(weights) + len(groups[1]["params"]) == len(trainable)
