"""Tests for detres.models.backbones.resnet: architecture vs torchvision, shortcut options A/B/C, plain nets, CIFAR
nets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detres.models.backbones.frozen_bn import FrozenBatchNorm2d
from detres.models.backbones.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ResNet,
    ZeroPadShortcut,
    build_cifar_resnet,
    build_resnet,
    cifar_resnet20,
    resnet18,
    resnet50,
)

torch.set_num_threads(1)

IMAGENET_DEPTHS = (18, 34, 50, 101, 152)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(build, *args, **kwargs) -> nn.Module:
    """Build on the meta device: shapes only, no init cost (for counting tests on deep nets)."""
    with torch.device("meta"):
        return build(*args, **kwargs)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_option_b_matches_torchvision_keys_shapes_and_param_count(depth):
    ours = _meta(build_resnet, depth)
    ref = _meta(getattr(torchvision.models, f"resnet{depth}"), weights=None)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)  # same keys in the same order
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert _n_params(ours) == _n_params(ref)


def test_known_parameter_counts():
    # torchvision's published counts (model documentation).
    assert _n_params(resnet18()) == 11_689_512
    assert _n_params(resnet50()) == 25_557_032


def test_shortcut_options_param_counts_resnet18():
    a = resnet18(shortcut="A")
    b = resnet18(shortcut="B")
    c = resnet18(shortcut="C")
    # B adds three projections (64->128, 128->256, 256->512), each a 1x1 conv + BN (2 params/ch).
    projections_b = sum(cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 512)])
    assert _n_params(b) - _n_params(a) == projections_b == 173_824
    # C: a projection on all 8 blocks.
    blocks_c = [(64, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    assert _n_params(c) - _n_params(a) == sum(cin * cout + 2 * cout for cin, cout in blocks_c)
    assert _n_params(a) < _n_params(b) < _n_params(c)
    # Option A: the shape-changing shortcuts exist but hold no parameters or buffers.
    pads = [m for m in a.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(pads) == 3
    assert not any(k.startswith(("layer2.0.downsample", "layer1.0.downsample")) for k in a.state_dict())
    assert sum(isinstance(blk.downsample, nn.Sequential) for blk in c.modules() if isinstance(blk, BasicBlock)) == 8


def test_option_a_bottleneck_pads_first_block_of_every_stage():
    a = resnet50(shortcut="A")
    # layer1.0 goes 64 -> 256 at stride 1; the other stages start 2x wider and stride 2.
    pads = {name: m for name, m in a.named_modules() if isinstance(m, ZeroPadShortcut)}
    assert sorted(pads) == [f"layer{i}.0.downsample" for i in range(1, 5)]
    assert (pads["layer1.0.downsample"].stride, pads["layer2.0.downsample"].stride) == (1, 2)
    x = torch.randn(1, 3, 64, 64)
    a.eval()
    assert a(x).shape == (1, 1000)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_plain_net_has_no_shortcuts_and_same_params_as_option_a(depth):
    plain = _meta(build_resnet, depth, plain=True)
    res_a = _meta(build_resnet, depth, shortcut="A")
    assert all(
        blk.downsample is None and not blk.residual
        for blk in plain.modules()
        if isinstance(blk, (BasicBlock, Bottleneck))
    )
    assert _n_params(plain) == _n_params(res_a)


def test_zero_pad_shortcut_known_answer():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = ZeroPadShortcut(in_channels=4, out_channels=8, stride=2)(x)
    assert y.shape == (2, 8, 2, 2)
    # planes // 4 = 2 zero channels on each side; the middle holds x[:, :, ::2, ::2].
    assert torch.equal(y[:, :2], torch.zeros(2, 2, 2, 2))
    assert torch.equal(y[:, 6:], torch.zeros(2, 2, 2, 2))
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[0, 2, 1, 1].item() == x[0, 0, 2, 2].item() == 10.0
    # Odd size: same spatial size as a 3x3 stride-2 pad-1 conv.
    odd = torch.randn(1, 4, 7, 7)
    assert ZeroPadShortcut(in_channels=4, out_channels=8, stride=2)(odd).shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="out_channels"):
        ZeroPadShortcut(in_channels=8, out_channels=4)


def test_residual_block_with_zeroed_branch_is_relu_of_shortcut():
    # zero_init_residual makes each branch output 0, so a block computes relu(shortcut(x)).
    net = cifar_resnet20(zero_init_residual=True).eval()
    assert all(torch.count_nonzero(blk.bn2.weight) == 0 for blk in net.modules() if isinstance(blk, BasicBlock))
    x = torch.randn(2, 16, 8, 8)
    block = net.layer2[0]
    with torch.no_grad():
        expected = F.relu(F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
        assert torch.equal(block(x), expected)
        y = torch.randn(2, 32, 4, 4)
        assert torch.equal(net.layer2[1](y), F.relu(y))


def test_plain_block_forward_has_no_addition():
    net = resnet18(plain=True).eval()
    blk = net.layer1[0]
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        expected = F.relu(blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x))))))
        assert torch.equal(blk(x), expected)
        res = resnet18(shortcut="A").eval()  # no projection keys, so the plain weights load
        res.load_state_dict(net.state_dict())
        assert not torch.allclose(res.layer1[0](x), expected)


def test_stride_in_1x1_moves_the_stride():
    caffe = resnet50(stride_in_1x1=True)
    tv = resnet50(stride_in_1x1=False)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert _n_params(caffe) == _n_params(tv)
    x = torch.randn(1, 3, 64, 64)
    assert caffe.eval()(x).shape == tv.eval()(x).shape == (1, 1000)


@pytest.mark.parametrize(
    "factory,channels", [(resnet18, (64, 64, 128, 256, 512)), (resnet50, (64, 256, 512, 1024, 2048))]
)
def test_imagenet_stage_outputs_strides_and_features(factory, channels):
    net = factory(num_classes=7).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        stages = net.stage_outputs(x)
        feats = net.forward_features(x)
        logits = net(x)
    assert list(stages) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for (name, fmap), stride, ch in zip(stages.items(), (2, 4, 8, 16, 32), channels):
        assert fmap.shape == (2, ch, 96 // stride, 128 // stride), name
    assert torch.equal(feats, stages["conv5"])
    torch.testing.assert_close(logits, net.fc(feats.mean(dim=(2, 3))))
    assert logits.shape == (2, 7)


def test_cifar_stage_outputs_strides_and_features():
    net = cifar_resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stages = net.stage_outputs(x)
        feats = net.forward_features(x)
        logits = net(x)
    assert list(stages) == ["conv1", "conv2", "conv3", "conv4"]
    for (name, fmap), stride, ch in zip(stages.items(), (1, 1, 2, 4), (16, 16, 32, 64)):
        assert fmap.shape == (2, ch, 32 // stride, 32 // stride), name
    assert torch.equal(feats, stages["conv4"])
    torch.testing.assert_close(logits, net.fc(feats.mean(dim=(2, 3))))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    "depth,params",
    # 20-56: counts of the public checkpoints (SOURCE.txt); 110 / 1202: paper Table 6 says 1.7M / 19.4M.
    [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962), (1202, 19_421_274)],
)
def test_cifar_param_counts(depth, params):
    net = _meta(build_cifar_resnet, depth)
    assert net.depth == depth
    assert _n_params(net) == params
    # The paper counts: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M.
    paper = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}[depth]
    digits = 2 if depth <= 56 else 1
    assert round(params / 1e6, digits) == paper


def test_cifar_layout_and_plain_counterpart():
    net = cifar_resnet20()
    assert [k for k in net.state_dict() if "downsample" in k] == []  # option A: no shortcut params
    assert [type(m) for m in net.modules() if isinstance(m, ZeroPadShortcut)] == [ZeroPadShortcut] * 2
    plain = build_cifar_resnet(20, plain=True)
    assert _n_params(plain) == _n_params(net)
    assert all(not b.residual and b.downsample is None for b in plain.modules() if isinstance(b, BasicBlock))
    opt_b = build_cifar_resnet(20, shortcut="B")
    # Two projections (16->32, 32->64) with BN.
    assert _n_params(opt_b) - _n_params(net) == (16 * 32 + 64) + (32 * 64 + 128)


def test_he_init_and_zero_init_residual():
    torch.manual_seed(0)
    net = resnet50()
    w = net.layer4[0].conv2.weight  # 512 x 512 x 3 x 3: fan_out = 512 * 9
    assert abs(w.std().item() - math.sqrt(2.0 / (512 * 9))) < 0.02 * math.sqrt(2.0 / (512 * 9))
    assert abs(w.mean().item()) < 1e-3
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    zero = resnet50(zero_init_residual=True)
    assert all(
        torch.all(b.bn3.weight == 0) and torch.all(b.bn2.weight == 1)
        for b in zero.modules()
        if isinstance(b, Bottleneck)
    )


def test_frozen_norm_layer_builds_and_keeps_keys():
    net = resnet18(norm_layer=FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    ref_keys = {k for k in resnet18().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(net.state_dict()) == ref_keys
    # Frozen BN holds buffers only, so fewer trainable tensors than with BatchNorm2d.
    assert _n_params(net) == _n_params(resnet18()) - sum(
        2 * m.num_features for m in net.modules() if isinstance(m, FrozenBatchNorm2d)
    )


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="depth"):
        build_resnet(20)
    with pytest.raises(ValueError, match="depth"):
        build_cifar_resnet(21)
    with pytest.raises(ValueError, match="shortcut"):
        resnet18(shortcut="D")
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(3, shortcut="b")
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, (2, 2, 2))
    with pytest.raises(ValueError, match="block"):
        ResNet("wide", (2, 2, 2, 2))
    with pytest.raises(ValueError, match="zero_init_residual"):
        resnet18(plain=True, zero_init_residual=True)
    with pytest.raises(ValueError, match="layers"):
        build_resnet(18, layers=(1, 1, 1, 1))


@pytest.mark.parametrize(("depth", "giga_mult_adds"), [(18, 1.81), (34, 3.66), (50, 3.86), (101, 7.57), (152, 11.28)])
def test_table1_multiply_adds_at_224(depth, giga_mult_adds):
    """Table 1's FLOPs row (multiply-adds of convs and fc at 224 px, stride in the first 1x1 as in the paper's
    models), counted by torch's FlopCounterMode (2 FLOPs per multiply-add): 1.8 / 3.6 / 3.8 / 7.6 / 11.3 x 10^9,
    where the paper's 3.6 for ResNet-34 is the option-A count and 3.8 for ResNet-50 is 3.86 truncated."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_resnet(depth, num_classes=1000, stride_in_1x1=True).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(giga_mult_adds, abs=0.005)
